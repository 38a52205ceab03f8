"""PASCAL VOC detection and segmentation datasets (read from the standard VOCdevkit layout).

Layout expected under ``root`` (``root`` is the folder that contains ``VOCdevkit`` or the
``VOCdevkit`` folder itself)::

    VOCdevkit/VOC{year}/Annotations/{id}.xml
    VOCdevkit/VOC{year}/JPEGImages/{id}.jpg
    VOCdevkit/VOC{year}/ImageSets/Main/{image_set}.txt
    VOCdevkit/VOC{year}/ImageSets/Segmentation/{image_set}.txt
    VOCdevkit/VOC{year}/SegmentationClass/{id}.png       (palette PNG, class indices, 255 = void)
    VOCdevkit/VOC{year}/SegmentationClassAug/{id}.png    (optional, SBD-augmented masks)
    VOCdevkit/VOC{year}/SegmentationObject/{id}.png      (instance index per pixel; detection with masks=True)

Nothing is downloaded. Every error about bad input names the offending file.

This module holds the datasets (the public entry point of VOC reading); the format without pixels
(:data:`VOC_CLASSES`, :data:`VOC_PALETTE`, folder lookup, split files, :func:`parse_voc_xml`) is in
:mod:`pce.datasets.voc_format`, pixel reading (:func:`image_to_array`, :func:`load_index_mask`) in
:mod:`pce.datasets.voc_images`.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .detection_target import detection_target
from .registry import DATASETS
from .voc_format import VOC_CLASSES, _read_split, _resolve_splits, find_voc_root, parse_voc_xml
from .voc_images import _load_rgb, _to_tensor, load_index_mask
from .voc_instances import load_instance_masks

__all__ = ["VOCDetection", "VOCSegmentation"]


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
      * with ``masks=True``: target["masks"]: uint8 [N, H, W], object ``k``'s pixels in
        ``SegmentationObject/{id}.png`` (value ``k + 1``; void 255 and background are 0), for Mask R-CNN. The
        ids then come from ``ImageSets/Segmentation/{image_set}.txt`` (the images VOC gives instance masks).
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
        masks: bool = False,
    ) -> None:
        self.root = Path(root)
        self.classes = tuple(classes)
        self.masks = bool(masks)
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
            ids = _read_split(voc_dir / "ImageSets" / ("Segmentation" if self.masks else "Main") / f"{s}.txt")
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

    def instance_mask_path(self, i: int) -> Path:
        return self._dirs[i] / "SegmentationObject" / f"{self.ids[i]}.png"

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
        masks = load_instance_masks(self.instance_mask_path(i), len(labels), (h, w)) if self.masks else None
        if not self.keep_difficult:
            keep = ~difficult
            boxes, labels, difficult = boxes[keep], labels[keep], difficult[keep]
            masks = masks[keep] if masks is not None else None
        target = detection_target(i, boxes, labels, difficult, (h, w), masks)
        image = _to_tensor(img)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(root={str(self.root)!r}, splits={self.splits}, n={len(self)}, "
                f"classes={len(self.classes)}, keep_difficult={self.keep_difficult}, masks={self.masks})")


# ----------------------------------------------------------------------------------------------
# segmentation
# ----------------------------------------------------------------------------------------------
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
