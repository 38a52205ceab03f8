"""PASCAL VOC detection and segmentation datasets (read from the standard VOCdevkit layout).

Layout expected under ``root`` (``root`` is the folder that contains ``VOCdevkit`` or the
``VOCdevkit`` folder itself)::

    VOCdevkit/VOC{year}/Annotations/{id}.xml
    VOCdevkit/VOC{year}/JPEGImages/{id}.jpg
    VOCdevkit/VOC{year}/ImageSets/Main/{image_set}.txt
    VOCdevkit/VOC{year}/ImageSets/Segmentation/{image_set}.txt
    VOCdevkit/VOC{year}/SegmentationClass/{id}.png       (palette PNG, class indices, 255 = void)
    VOCdevkit/VOC{year}/SegmentationClassAug/{id}.png    (optional, SBD-augmented masks)

Nothing is downloaded. Every error about bad input names the offending file.
"""

from __future__ import annotations

import math
import os
import warnings
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from .registry import DATASETS

__all__ = [
    "VOC_CLASSES",
    "VOC_PALETTE",
    "parse_voc_xml",
    "find_voc_root",
    "image_to_array",
    "VOCDetection",
    "VOCSegmentation",
]

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
# helpers
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


_HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def image_to_array(im: Image.Image, channels: int = 3) -> np.ndarray:
    """A PIL image as float32 ``[H, W, channels]`` in [0, 1] (``channels`` 1 or 3). 16-bit images are scaled by
    65535 (not clipped to 255 as ``Image.convert`` does); 32-bit float images are taken as [0, 1]."""
    if im.mode in _HIGH_BIT_MODES:
        arr = np.asarray(im, dtype=np.float32)
        if im.mode.startswith("I;16") or (im.mode == "I" and arr.size and arr.max() > 255):
            arr = arr / 65535.0
        elif im.mode == "I":
            arr = arr / 255.0
        arr = np.clip(arr, 0.0, 1.0)[..., None]
        return np.repeat(arr, 3, axis=2) if channels == 3 else arr
    arr = np.asarray(im.convert("L" if channels == 1 else "RGB"), dtype=np.float32) / 255.0
    return arr[..., None] if arr.ndim == 2 else arr


def _load_rgb(path: Path) -> np.ndarray:
    """Load an image file as uint8 RGB [H, W, 3] (16-bit images scaled to 8 bits); errors name the file."""
    if not path.is_file():
        raise FileNotFoundError(f"Image file not found: {path}")
    try:
        with Image.open(path) as im:
            if im.mode in _HIGH_BIT_MODES:
                return np.round(image_to_array(im, 3) * 255.0).astype(np.uint8)
            return np.array(im.convert("RGB"))
    except (UnidentifiedImageError, OSError) as e:
        raise OSError(f"Could not read image {path}: {e}") from e


def _to_tensor(img: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] -> float32 [3, H, W] in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float().div_(255.0)


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

    size = None
    size_el = ann.find("size")
    if size_el is not None:
        try:
            w = int(float(_text(size_el, "width", path)))
            h = int(float(_text(size_el, "height", path)))
            d = int(float(_text(size_el, "depth", path, default="3")))
        except ValueError as e:
            raise ValueError(f"Malformed VOC annotation {path}: bad <size>: {e}") from e
        if w > 0 and h > 0:
            size = (h, w, d)

    objects = []
    for k, obj in enumerate(ann.findall("object")):
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
        objects.append(
            {
                "name": name,
                "label": class_to_label[name],
                "difficult": _flag(obj, "difficult", path),
                "truncated": _flag(obj, "truncated", path),
                "pose": _text(obj, "pose", path, default="Unspecified"),
                "bndbox": box,
            }
        )
    filename = _text(ann, "filename", path, default=path.stem + ".jpg")
    return {"filename": filename, "size": size, "objects": objects}


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
# detection
# ----------------------------------------------------------------------------------------------
@DATASETS.register("voc_detection")
class VOCDetection(Dataset):
    """PASCAL VOC object detection.

    ``year`` may be a string ("2007") or a list like ("2007", "2012") to concatenate years (07+12);
    ``image_set`` is either one split name used for every year or a list with one split per year;
    alternatively pass a list of (year, image_set) pairs as ``year`` (e.g. ``[("2007", "trainval"),
    ("2012", "trainval")]``).

    Item ``(image, target)``:
      * image: float32 [3, H, W] in [0, 1]
      * target["boxes"]: float32 [N, 4] absolute xyxy pixels. VOC stores 1-based inclusive pixel
        indices; like torchvision we convert to 0-based continuous coordinates
        ``(xmin - 1, ymin - 1, xmax, ymax)`` so a box covering pixel columns 0..W-1 is [0, W].
      * target["labels"]: int64 [N] in 1..len(classes) (0 is background)
      * target["difficult"]: bool [N]
      * target["image_id"]: int (dataset index), target["orig_size"]: int64 [2] (H, W)
    With ``keep_difficult=False`` difficult objects are dropped from ``target``. ``transforms`` is
    called as ``transforms(image, target) -> (image, target)``.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        year: str | Sequence[str] | Sequence[tuple[str, str]] = "2007",
        image_set: str | Sequence[str] = "trainval",
        transforms: Callable[[torch.Tensor, dict], tuple[torch.Tensor, dict]] | None = None,
        keep_difficult: bool = True,
        classes: Sequence[str] = VOC_CLASSES,
    ) -> None:
        self.root = Path(root)
        self.classes = tuple(classes)
        if len(set(self.classes)) != len(self.classes) or not self.classes:
            raise ValueError(f"classes must be a non-empty list of unique names, got {self.classes}")
        self.transforms = transforms
        self.keep_difficult = keep_difficult
        self._warned: set = set()
        self.splits = _resolve_splits(year, image_set)
        self.ids: list[str] = []
        self.years: list[str] = []
        self._dirs: list[Path] = []
        for y, s in self.splits:
            voc_dir = find_voc_root(self.root, y)
            ids = _read_split(voc_dir / "ImageSets" / "Main" / f"{s}.txt")
            self.ids.extend(ids)
            self.years.extend([y] * len(ids))
            self._dirs.extend([voc_dir] * len(ids))

    @property
    def num_classes(self) -> int:
        """Number of classes including background."""
        return len(self.classes) + 1

    def __len__(self) -> int:
        return len(self.ids)

    def annotation_path(self, i: int) -> Path:
        return self._dirs[i] / "Annotations" / f"{self.ids[i]}.xml"

    def image_path(self, i: int) -> Path:
        return self._dirs[i] / "JPEGImages" / f"{self.ids[i]}.jpg"

    def get_annotation(self, i: int) -> dict[str, Any]:
        """Annotation of item ``i`` without loading the image (all objects, difficult included).

        Returns ``{"id", "year", "filename", "size": (H, W) or None, "boxes": float32 [N, 4]
        (0-based xyxy, see class doc), "labels": int64 [N], "difficult": bool [N],
        "truncated": bool [N], "names": list[str]}`` as numpy arrays.
        """
        path = self.annotation_path(i)
        ann = parse_voc_xml(path, self.classes)
        objs = ann["objects"]
        boxes = np.array([o["bndbox"] for o in objs], dtype=np.float32).reshape(-1, 4)
        boxes[:, :2] -= 1.0  # 1-based inclusive -> 0-based continuous
        return {
            "id": self.ids[i],
            "year": self.years[i],
            "filename": ann["filename"],
            "size": ann["size"][:2] if ann["size"] else None,
            "boxes": boxes,
            "labels": np.array([o["label"] for o in objs], dtype=np.int64),
            "difficult": np.array([o["difficult"] for o in objs], dtype=bool),
            "truncated": np.array([o["truncated"] for o in objs], dtype=bool),
            "names": [o["name"] for o in objs],
        }

    #: a box may reach this many pixels past the image border before it is reported (VOC rounding)
    BORDER_TOLERANCE = 1.0

    def _check_boxes(self, i: int, ann: dict[str, Any], h: int, w: int) -> None:
        """``<size>`` must be the image's size and no box may lie outside the image (``ValueError`` naming the
        file and object); a box partly outside (beyond :attr:`BORDER_TOLERANCE`) is clipped with a warning."""
        path = self.annotation_path(i)
        if ann["size"] is not None and tuple(ann["size"]) != (h, w):
            raise ValueError(f"{path}: <size> is {ann['size'][1]}x{ann['size'][0]} (WxH) but {self.image_path(i)} "
                             f"is {w}x{h} (expected the image's size)")
        tol = self.BORDER_TOLERANCE
        for k, (box, name) in enumerate(zip(ann["boxes"], ann["names"])):
            x0, y0, x1, y1 = (float(v) for v in box)
            if x1 <= 0 or y1 <= 0 or x0 >= w or y0 >= h:
                raise ValueError(f"{path}: object {k} ({name}) box {[x0 + 1, y0 + 1, x1, y1]} lies outside the "
                                 f"{w}x{h} image (expected a box inside the image)")
            if x0 < -tol or y0 < -tol or x1 > w + tol or y1 > h + tol:
                key = (str(path), k)
                if key not in self._warned:
                    self._warned.add(key)
                    warnings.warn(f"{path}: object {k} ({name}) box {[x0 + 1, y0 + 1, x1, y1]} extends past the "
                                  f"{w}x{h} image: clipped to it", stacklevel=3)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, Any]]:
        if i < 0:
            i += len(self)
        ann = self.get_annotation(i)
        img = _load_rgb(self.image_path(i))
        h, w = img.shape[:2]
        self._check_boxes(i, ann, h, w)
        boxes, labels, difficult = ann["boxes"], ann["labels"], ann["difficult"]
        if not self.keep_difficult:
            keep = ~difficult
            boxes, labels, difficult = boxes[keep], labels[keep], difficult[keep]
        boxes = boxes.copy()
        np.clip(boxes[:, 0::2], 0, w, out=boxes[:, 0::2])
        np.clip(boxes[:, 1::2], 0, h, out=boxes[:, 1::2])
        target = {
            "boxes": torch.from_numpy(boxes),
            "labels": torch.from_numpy(labels),
            "difficult": torch.from_numpy(difficult),
            "image_id": i,
            "orig_size": torch.tensor([h, w], dtype=torch.int64),
        }
        image = _to_tensor(img)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(root={str(self.root)!r}, splits={self.splits}, n={len(self)}, "
                f"classes={len(self.classes)}, keep_difficult={self.keep_difficult})")


# ----------------------------------------------------------------------------------------------
# segmentation
# ----------------------------------------------------------------------------------------------
def load_index_mask(path: str | os.PathLike, num_classes: int, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """Read a palette ('P') or grayscale ('L') PNG of class indices as uint8 [H, W].

    Raises ValueError naming ``path`` for an RGB/RGBA (colour-encoded) mask or for values outside
    ``0..num_classes-1`` and ``ignore_index``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Mask file not found: {path}")
    try:
        with Image.open(path) as im:
            mode = im.mode
            if mode not in ("P", "L"):
                raise ValueError(
                    f"Mask {path} has image mode {mode!r}; it must be a palette ('P') or 8-bit index ('L') PNG "
                    "whose pixel values are class indices (an RGB colour-encoded mask was probably given "
                    "by mistake; convert it to class indices with the VOC palette first)"
                )
            mask = np.array(im)
    except (UnidentifiedImageError, OSError) as e:
        raise OSError(f"Could not read mask {path}: {e}") from e
    valid = np.zeros(256, dtype=bool)
    valid[:num_classes] = True
    valid[ignore_index] = True
    bad = ~valid[mask]
    if bad.any():
        vals = np.unique(mask[bad])
        raise ValueError(
            f"Mask {path} contains values {vals[:10].tolist()} outside 0..{num_classes - 1} and {ignore_index}"
        )
    return mask


@DATASETS.register("voc_segmentation")
class VOCSegmentation(Dataset):
    """PASCAL VOC semantic segmentation.

    Reads ``VOC{year}/JPEGImages/{id}.jpg`` and ``VOC{year}/SegmentationClass/{id}.png`` for the ids
    in ``ImageSets/Segmentation/{image_set}.txt``. With ``use_aug=True`` masks come from
    ``SegmentationClassAug/`` (SBD-augmented, 10582 train images) and, for ``image_set="train"``,
    the split file is ``ImageSets/Segmentation/aug.txt`` (``train_aug.txt`` is accepted as a
    fallback); other splits (e.g. "val") keep ``{image_set}.txt``.

    Item ``(image, mask)``: image float32 [3, H, W] in [0, 1]; mask int64 [H, W] with values in
    0..len(classes) (0 = background) and 255 = ignore. ``transforms(image, mask) -> (image, mask)``.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        year: str = "2012",
        image_set: str = "train",
        transforms: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
        use_aug: bool = False,
        classes: Sequence[str] = VOC_CLASSES,
    ) -> None:
        self.root = Path(root)
        self.year = str(year)
        self.image_set = image_set
        self.transforms = transforms
        self.use_aug = use_aug
        self.classes = tuple(classes)
        self.voc_dir = find_voc_root(self.root, self.year)
        seg_sets = self.voc_dir / "ImageSets" / "Segmentation"
        if use_aug:
            self.mask_dir = self.voc_dir / "SegmentationClassAug"
            split = seg_sets / f"{image_set}.txt"
            if image_set == "train":
                split = seg_sets / "aug.txt"
                if not split.is_file() and (seg_sets / "train_aug.txt").is_file():
                    split = seg_sets / "train_aug.txt"
            if not self.mask_dir.is_dir():
                raise FileNotFoundError(f"use_aug=True but mask folder not found: {self.mask_dir}")
        else:
            self.mask_dir = self.voc_dir / "SegmentationClass"
            split = seg_sets / f"{image_set}.txt"
        self.split_file = split
        self.ids: list[str] = _read_split(split)

    @property
    def num_classes(self) -> int:
        """Number of classes including background."""
        return len(self.classes) + 1

    def __len__(self) -> int:
        return len(self.ids)

    def image_path(self, i: int) -> Path:
        return self.voc_dir / "JPEGImages" / f"{self.ids[i]}.jpg"

    def mask_path(self, i: int) -> Path:
        return self.mask_dir / f"{self.ids[i]}.png"

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        ipath, mpath = self.image_path(i), self.mask_path(i)
        img = _load_rgb(ipath)
        mask = load_index_mask(mpath, self.num_classes)
        if img.shape[:2] != mask.shape[:2]:
            raise ValueError(
                f"Image {ipath} has size {img.shape[1]}x{img.shape[0]} (WxH) but mask {mpath} has size "
                f"{mask.shape[1]}x{mask.shape[0]}"
            )
        image = _to_tensor(img)
        target = torch.from_numpy(mask.astype(np.int64))
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(root={str(self.root)!r}, year={self.year!r}, image_set={self.image_set!r}, "
                f"use_aug={self.use_aug}, n={len(self)})")
