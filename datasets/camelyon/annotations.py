"""ASAP XML lesion annotations (Camelyon16/17) and their rasterisation to label masks.

ASAP writes ``<ASAP_Annotations><Annotations><Annotation Name Type PartOfGroup><Coordinates><Coordinate Order X
Y/>...`` with coordinates in level-0 pixels. :func:`read_asap_xml` parses it into :class:`Annotation` objects;
:func:`rasterize` paints them into a ``uint8 [h, w]`` mask of any level-0 box at any downsample, with the
convention of OpenSlide's ``read_region``: mask pixel ``(c, r)`` covers the level-0 square starting at
``(x + c * d, y + r * d)`` and is inside a polygon when its centre ``(x + (c + 0.5) d, y + (r + 0.5) d)`` is
(even-odd rule; a centre exactly on a left or top edge is inside, on a right or bottom edge outside, so
abutting polygons never overlap). Sampling pixel centres makes the mask at downsample 4 the level-0 mask pooled,
up to the pixels the outline crosses.
"""
from __future__ import annotations

import math
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import numpy as np

__all__ = ["Annotation", "read_asap_xml", "write_asap_xml", "rasterize", "DEFAULT_LABEL_MAP", "annotation_labels"]

# Camelyon16: _0 / _1 / Tumor are lesions, _2 / Exclusion are holes inside them; Camelyon17: metastases.
DEFAULT_LABEL_MAP: Dict[str, int] = {"_0": 1, "_1": 1, "Tumor": 1, "metastases": 1, "_2": 0, "Exclusion": 0}

_KINDS = {"polygon": "polygon", "rectangle": "polygon", "spline": "polygon", "dot": "point", "pointset": "point"}
_ASAP_TYPE = {"polygon": "Polygon", "point": "PointSet"}


@dataclass
class Annotation:
    """One ASAP annotation: ``coords`` float64 ``[N, 2]`` (x, y) level-0 pixels in ``Order``.

    ``kind`` is ``"polygon"`` (ASAP Polygon / Rectangle / Spline; Spline control points are joined as a polygon)
    or ``"point"`` (Dot / PointSet, no area); ``type`` keeps ASAP's own ``Type``; ``source`` the XML file it was
    read from (named in errors; empty for annotations made in code).
    """

    name: str
    group: str
    kind: str
    coords: np.ndarray
    type: str = field(default="")
    source: str = field(default="", compare=False, repr=False)

    @property
    def bbox(self) -> Tuple[float, float, float, float]:
        """``(x_min, y_min, x_max, y_max)`` in level-0 pixels."""
        lo, hi = self.coords.min(axis=0), self.coords.max(axis=0)
        return float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1])


def _number(text: Optional[str], path: Path, name: str, attr: str, index: int) -> float:
    if text is None:
        raise ValueError(f"{path}: annotation {name!r}: a Coordinate has no {attr} attribute")
    try:
        v = float(text.strip().replace(",", "."))  # ASAP under a decimal-comma locale writes "1500,25"
    except ValueError:
        raise ValueError(f"{path}: annotation {name!r}: {attr}={text!r} is not a number") from None
    if not math.isfinite(v):
        raise ValueError(f"{path}: annotation {name!r}: {attr}={text.strip()} (Coordinate {index}) is not a finite "
                         f"number (level-0 pixel coordinates)")
    return v


def _parse_annotation(el: ET.Element, path: Path, index: int) -> Annotation:
    name = el.get("Name") or f"#{index}"
    asap_type = el.get("Type")
    kind = _KINDS.get((asap_type or "").lower())
    if kind is None:
        raise ValueError(f"{path}: annotation {name!r}: unknown Type {asap_type!r} "
                         f"(expected Polygon, Rectangle, Spline, Dot or PointSet)")
    pts = []
    coords_el = el.find("Coordinates")
    for i, c in enumerate(coords_el.findall("Coordinate") if coords_el is not None else []):
        order = c.get("Order")
        pts.append((float(_number(order, path, name, "Order", i)) if order is not None else float(i),
                    _number(c.get("X"), path, name, "X", i), _number(c.get("Y"), path, name, "Y", i)))
    if not pts:
        raise ValueError(f"{path}: annotation {name!r} has no <Coordinate> elements")
    pts.sort(key=lambda p: p[0])
    coords = np.array([(x, y) for _, x, y in pts], dtype=np.float64)
    if asap_type.lower() == "rectangle" and len(coords) == 2:
        (x0, y0), (x1, y1) = coords
        coords = np.array([(x0, y0), (x1, y0), (x1, y1), (x0, y1)], dtype=np.float64)
    if kind == "polygon" and len(coords) < 3:
        raise ValueError(f"{path}: annotation {name!r} ({asap_type}) has {len(coords)} coordinates "
                         f"(a polygon needs at least 3)")
    return Annotation(name=name, group=el.get("PartOfGroup") or "None", kind=kind, coords=coords, type=asap_type,
                      source=str(path))


def read_asap_xml(path: str | os.PathLike) -> List[Annotation]:
    """Parse an ASAP XML file into a list of :class:`Annotation` (document order).

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` naming the file (and the annotation) for a
    malformed or truncated file, a missing, non-numeric or non-finite coordinate or an unknown ``Type``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: annotation file not found (expected an ASAP XML file)")
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        raise ValueError(f"{path}: malformed or truncated ASAP XML ({e})") from None
    if root.tag != "ASAP_Annotations":
        raise ValueError(f"{path}: root element <{root.tag}> (expected <ASAP_Annotations>)")
    return [_parse_annotation(el, path, i) for i, el in enumerate(root.iter("Annotation"))]


def write_asap_xml(path: str | os.PathLike, annotations: Iterable[Annotation],
                   groups_colors: Optional[Mapping[str, str]] = None) -> Path:
    """Write ``annotations`` as ASAP XML (what ASAP itself writes); returns the path."""
    root = ET.Element("ASAP_Annotations")
    anns = ET.SubElement(root, "Annotations")
    groups: List[str] = []
    for a in annotations:
        el = ET.SubElement(anns, "Annotation", Name=a.name, Type=a.type or _ASAP_TYPE[a.kind],
                           PartOfGroup=a.group, Color="#F4FA58")
        coords = ET.SubElement(el, "Coordinates")
        for i, (x, y) in enumerate(np.asarray(a.coords, dtype=np.float64)):
            ET.SubElement(coords, "Coordinate", Order=str(i), X=f"{x:.6g}", Y=f"{y:.6g}")
        if a.group not in groups:
            groups.append(a.group)
    gel = ET.SubElement(root, "AnnotationGroups")
    for g in groups:
        color = (groups_colors or {}).get(g, "#FF0000")
        ET.SubElement(ET.SubElement(gel, "Group", Name=g, PartOfGroup="None", Color=color), "Attributes")
    ET.indent(root)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)
    return path


def annotation_labels(annotations: Sequence[Annotation], label_map: Optional[Mapping[str, int]] = None,
                      source: str = "annotations") -> List[int]:
    """The label of every annotation's group; ``ValueError`` naming a group that is not in ``label_map`` (and
    the annotation's XML file, else ``source``)."""
    lm = DEFAULT_LABEL_MAP if label_map is None else label_map
    out = []
    for a in annotations:
        if a.group not in lm:
            raise ValueError(f"{a.source or source}: annotation {a.name!r} is in group {a.group!r}, which is not in the "
                             f"label map (expected one of {sorted(lm)})")
        out.append(int(lm[a.group]))
    return out


def _fill_polygon(mask: np.ndarray, poly: np.ndarray, value: int) -> None:
    """Even-odd scanline fill of ``poly`` ``[N, 2]`` (mask pixel units) into ``mask`` ``[h, w]`` in place:
    pixel ``(c, r)`` is set when its centre ``(c + 0.5, r + 0.5)`` is inside."""
    h, w = mask.shape
    x0, y0 = poly[:, 0], poly[:, 1]
    x1, y1 = np.roll(x0, -1), np.roll(y0, -1)
    r_lo = max(int(math.floor(poly[:, 1].min())), 0)
    r_hi = min(int(math.ceil(poly[:, 1].max())), h)
    if r_lo >= r_hi:
        return
    keep = y0 != y1  # horizontal edges never cross a scanline
    x0, y0, x1, y1 = x0[keep], y0[keep], x1[keep], y1[keep]
    yc = np.arange(r_lo, r_hi, dtype=np.float64)[:, None] + 0.5          # [R, 1] row centres
    crosses = (y0 <= yc) != (y1 <= yc)                                   # [R, E] half-open edge test
    with np.errstate(divide="ignore", invalid="ignore"):
        xs = x0 + (yc - y0) * (x1 - x0) / (y1 - y0)                      # [R, E] crossing abscissae
    for i in range(r_hi - r_lo):
        row = np.sort(xs[i][crosses[i]])
        for xa, xb in zip(row[0::2], row[1::2]):
            c0, c1 = max(int(math.ceil(xa - 0.5)), 0), min(int(math.ceil(xb - 0.5)), w)
            if c0 < c1:
                mask[r_lo + i, c0:c1] = value


def rasterize(annotations: Sequence[Annotation], location: Tuple[float, float], size: Tuple[int, int],
              downsample: float = 1.0, label_map: Optional[Mapping[str, int]] = None) -> np.ndarray:
    """Label mask ``uint8 [h, w]`` of the level-0 box at ``location=(x, y)`` spanning ``size=(w, h)`` pixels at
    ``downsample`` (OpenSlide ``read_region`` convention). Polygons are painted with their group's label
    (``label_map``, default :data:`DEFAULT_LABEL_MAP`), label-0 groups (exclusions) last; points are skipped."""
    w, h = int(size[0]), int(size[1])
    if w <= 0 or h <= 0 or downsample <= 0:
        raise ValueError(f"rasterize: size={tuple(size)} and downsample={downsample} must be positive")
    labels = annotation_labels(annotations, label_map)
    mask = np.zeros((h, w), dtype=np.uint8)
    x, y, d = float(location[0]), float(location[1]), float(downsample)
    box = (x, y, x + w * d, y + h * d)
    order = sorted(range(len(annotations)), key=lambda i: labels[i] == 0)  # stable: exclusions painted last
    for i in order:
        a = annotations[i]
        if a.kind != "polygon":
            continue
        bx0, by0, bx1, by1 = a.bbox
        if bx1 < box[0] or bx0 > box[2] or by1 < box[1] or by0 > box[3]:
            continue
        _fill_polygon(mask, (a.coords - (x, y)) / d, labels[i])
    return mask
