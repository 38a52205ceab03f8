"""The PASCAL VOC on-disk format, without pixels: class names, colour map, folder lookup, split files and
annotation XML.

What lives where among the VOC modules of ``pce.datasets``:

* :mod:`pce.datasets.voc_format` (this module): :data:`VOC_CLASSES`, :data:`VOC_PALETTE`, ``IGNORE_INDEX``,
  :func:`find_voc_root`, split files (``ImageSets/*/{split}.txt``) and :func:`parse_voc_xml`;
* :mod:`pce.datasets.voc_images`: reading pixels (images, index masks);
* :mod:`pce.datasets.voc`: the datasets ``VOCDetection`` / ``VOCSegmentation`` (the public entry point).

Every error about bad input names the offending file.
"""

from __future__ import annotations

import math
import os
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["VOC_CLASSES", "VOC_PALETTE", "IGNORE_INDEX", "find_voc_root", "parse_voc_xml"]

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)

IGNORE_INDEX = 255


def _voc_colormap(n: int = 256) -> list[int]:
    """Standard VOC bit-interleaving colour map as a flat ``[r0, g0, b0, r1, ...]`` list (3*n ints)."""
    palette: list[int] = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette.extend((r, g, b))
    return palette


#: Standard VOC colour map: flat list of 256*3 ints (index 0 black, 1 (128,0,0), ..., 255 (224,224,192)).
VOC_PALETTE: list[int] = _voc_colormap(256)


# ----------------------------------------------------------------------------------------------
# folders and split files
# ----------------------------------------------------------------------------------------------
def find_voc_root(root: str | os.PathLike, year: str) -> Path:
    """Return the ``VOC{year}`` folder given the folder containing ``VOCdevkit`` or ``VOCdevkit`` itself."""
    root = Path(root).expanduser()
    candidates = [root / "VOCdevkit" / f"VOC{year}", root / f"VOC{year}"]
    if root.name == f"VOC{year}":
        candidates.append(root)
    for c in candidates:
        if c.is_dir():
            return c
    raise FileNotFoundError(
        f"Could not find VOC{year} under {root}: looked for {candidates[0]} and {candidates[1]}. "
        "Pass the folder that contains 'VOCdevkit' (or the VOCdevkit folder itself)."
    )


def _read_split(path: Path) -> list[str]:
    """The image ids of a split file (first word of every non-empty line)."""
    if not path.is_file():
        raise FileNotFoundError(f"Split file not found: {path}")
    ids = []
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                parts = line.split()
                if parts:
                    ids.append(parts[0])
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text at byte {e.start} (expected one image id per line)") from None
    return ids


def _resolve_splits(year: Any, image_set: Any) -> list[tuple[str, str]]:
    """Normalise (year, image_set) arguments into a list of (year, image_set) pairs."""
    def is_pair_list(x: Any) -> bool:
        return isinstance(x, (list, tuple)) and len(x) > 0 and all(
            isinstance(p, (list, tuple)) and len(p) == 2 for p in x)

    for arg in (year, image_set):  # explicit [(year, image_set), ...]
        if is_pair_list(arg):
            return [(str(y), str(s)) for y, s in arg]
    years = [str(year)] if isinstance(year, (str, int)) else [str(y) for y in year]
    if not years:
        raise ValueError("year must not be empty")
    if isinstance(image_set, str):
        sets = [image_set] * len(years)
    else:
        sets = [str(s) for s in image_set]
        if len(sets) != len(years):
            raise ValueError(f"image_set {image_set!r} must be a string or have one entry per year {years}")
    return list(zip(years, sets))


# ----------------------------------------------------------------------------------------------
# annotation XML
# ----------------------------------------------------------------------------------------------
def _text(elem: ET.Element | None, tag: str, path: Path, default: str | None = None) -> str:
    child = elem.find(tag) if elem is not None else None
    if child is None or child.text is None or not child.text.strip():
        if default is not None:
            return default
        raise ValueError(f"Malformed VOC annotation {path}: missing <{tag}>")
    return child.text.strip()


def _flag(elem: ET.Element, tag: str, path: Path) -> bool:
    txt = _text(elem, tag, path, default="0")
    try:
        return bool(int(float(txt)))
    except ValueError:
        raise ValueError(f"Malformed VOC annotation {path}: <{tag}> is {txt!r}, expected 0 or 1") from None


def _parse_size(ann: ET.Element, path: Path) -> tuple[int, int, int] | None:
    """``(H, W, depth)`` of ``<size>``, or None when it is absent or not positive."""
    size_el = ann.find("size")
    if size_el is None:
        return None
    try:
        w = int(float(_text(size_el, "width", path)))
        h = int(float(_text(size_el, "height", path)))
        d = int(float(_text(size_el, "depth", path, default="3")))
    except ValueError as e:
        raise ValueError(f"Malformed VOC annotation {path}: bad <size>: {e}") from e
    return (h, w, d) if w > 0 and h > 0 else None


def _parse_object(obj: ET.Element, k: int, path: Path, classes: Sequence[str],
                  class_to_label: dict[str, int]) -> dict[str, Any]:
    """Object ``k`` of the annotation ``path`` (see :func:`parse_voc_xml`)."""
    name = _text(obj, "name", path)
    if name not in class_to_label:
        raise ValueError(
            f"Unknown class name {name!r} in VOC annotation {path} (object {k}); "
            f"known classes: {list(classes)}"
        )
    bb = obj.find("bndbox")
    if bb is None:
        raise ValueError(f"Malformed VOC annotation {path}: object {k} ({name}) has no <bndbox>")
    try:
        box = tuple(float(_text(bb, t, path)) for t in ("xmin", "ymin", "xmax", "ymax"))
    except ValueError as e:
        raise ValueError(f"Malformed VOC annotation {path}: object {k} ({name}) bad <bndbox>: {e}") from e
    if not all(math.isfinite(v) for v in box):
        raise ValueError(f"{path}: object {k} ({name}) has a non-finite <bndbox> {box} (expected pixel "
                         f"coordinates)")
    if box[2] < box[0] or box[3] < box[1]:
        raise ValueError(f"Malformed VOC annotation {path}: object {k} ({name}) has inverted bndbox {box}")
    return {
        "name": name,
        "label": class_to_label[name],
        "difficult": _flag(obj, "difficult", path),
        "truncated": _flag(obj, "truncated", path),
        "pose": _text(obj, "pose", path, default="Unspecified"),
        "bndbox": box,
    }


def parse_voc_xml(path: str | os.PathLike, classes: Sequence[str] = VOC_CLASSES) -> dict[str, Any]:
    """Parse one VOC ``Annotations/*.xml`` file.

    Returns ``{"filename": str, "size": (H, W, depth) or None, "objects": [obj, ...]}`` where each
    obj is ``{"name", "label" (1..len(classes)), "difficult": bool, "truncated": bool,
    "pose": str, "bndbox": (xmin, ymin, xmax, ymax)}`` with the raw VOC 1-based inclusive pixel
    coordinates (as floats). Raises ValueError naming ``path`` for malformed XML, a missing
    ``<bndbox>``/coordinate, an inverted box or a class name not in ``classes``.
    """
    path = Path(path)
    class_to_label = {c: i + 1 for i, c in enumerate(classes)}
    try:
        tree = ET.parse(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"Annotation file not found: {path}") from None
    except ET.ParseError as e:
        raise ValueError(f"Malformed VOC annotation XML {path}: {e}") from e
    ann = tree.getroot()
    if ann.tag != "annotation":
        raise ValueError(f"Malformed VOC annotation {path}: root element is <{ann.tag}>, expected <annotation>")
    size = _parse_size(ann, path)
    objects = [_parse_object(obj, k, path, classes, class_to_label) for k, obj in enumerate(ann.findall("object"))]
    filename = _text(ann, "filename", path, default=path.stem + ".jpg")
    return {"filename": filename, "size": size, "objects": objects}
