"""COCO-format detection / instance-segmentation data (one JSON file + an image folder), read with pycocotools.

The most common format for a user's own data: a labelling tool (CVAT, Label Studio, Roboflow, ...) exports it,
and PCE trains on it as it is, without converting to VOC XML. Layout (MMDetection's ``data_root`` /
``ann_file`` / ``img_dir`` convention; relative paths are taken under ``root``)::

    ROOT/annotations/instances_train.json     {"images": [...], "annotations": [...], "categories": [...]}
    ROOT/train/000001.jpg                     images[i]["file_name"] under img_dir

Item ``(image, target)``, the same contract as :class:`~pce.datasets.voc.VOCDetection` (so the detection task,
its transforms and evaluator need nothing else):

* image: float32 ``[3, H, W]`` in ``[0, 1]``
* target["boxes"]: float32 ``[N, 4]`` absolute ``xyxy`` pixels; COCO's ``[x, y, w, h]`` is already 0-based and
  continuous, so a box is ``[x, y, x + w, y + h]``
* target["labels"]: int64 ``[N]`` in ``1..len(classes)`` (0 is background)
* target["difficult"], target["iscrowd"]: bool ``[N]``: COCO's ``iscrowd`` (a crowd region is not trained on, and
  the evaluator ignores detections inside it by intersection over the detection's area, as COCOeval does)
* target["masks"]: uint8 ``[N, H, W]`` (only with ``masks=True``): each object's polygon / RLE rasterised by
  ``pycocotools`` (``COCO.annToMask``)
* target["image_id"]: int (dataset index), target["orig_size"]: int64 ``[2]`` ``(H, W)``

Bad input is an error naming the JSON file (and the annotation id) or the image: a missing key, a box that is not
four finite numbers, a box wholly outside its image, an annotation of an unknown image / category, an image whose
size differs from the JSON's ``width`` / ``height``. Degenerate boxes (``w <= 0`` or ``h <= 0``) are dropped with
one warning per file, as torchvision's detection references do; boxes that reach past the image are clipped with a
warning naming them.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
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
from .voc_images import _load_rgb, _to_tensor

__all__ = ["COCODetection", "read_coco_json"]

#: a box may reach this many pixels past the image border before it is reported (rounding in labelling tools)
BORDER_TOLERANCE = 1.0


def read_coco_json(path: str | os.PathLike) -> Any:
    """A ``pycocotools.coco.COCO`` index of the JSON file at ``path`` (pycocotools' own progress prints are
    silenced). ``FileNotFoundError`` / ``ValueError`` name the file when it is missing, not JSON, or lacks a
    key of the format."""
    from pycocotools.coco import COCO

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: COCO annotation file not found (a COCO JSON with images, annotations "
                                f"and categories; ann_file is taken under root unless absolute)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable JSON file ({type(e).__name__}: {e}) (a COCO annotation file)") from None
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data, dict) or k not in data]
    if missing:
        raise ValueError(f"{path}: no {missing} in the JSON (a COCO annotation file with images, annotations "
                         f"and categories)")
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _check_annotation(path: Path, ann: dict, coco: Any) -> None:
    aid = ann.get("id", "?")
    box = ann.get("bbox")
    if not isinstance(box, (list, tuple)) or len(box) != 4 or not all(
            isinstance(v, (int, float)) and math.isfinite(v) for v in box):
        raise ValueError(f"{path}: annotation {aid} has bbox {box!r} (four finite numbers [x, y, w, h])")
    if ann.get("image_id") not in coco.imgs:
        raise ValueError(f"{path}: annotation {aid} names image_id {ann.get('image_id')!r}, which is not in "
                         f"'images' (an id of one of its images)")
    if ann.get("category_id") not in coco.cats:
        raise ValueError(f"{path}: annotation {aid} names category_id {ann.get('category_id')!r}, which is not in "
                         f"'categories' (one of {sorted(coco.cats)})")


@DATASETS.register("coco_detection")
class COCODetection(Dataset):
    """Object detection (and, with ``masks=True``, instance segmentation) from a COCO JSON file.

    ``classes`` (names) selects and orders the categories: label ``c`` is ``classes[c - 1]``; objects of other
    categories are left out. Default: every category of the file, ordered by category id. ``remove_empty``
    drops images without (selected) objects, e.g. for training; evaluation keeps them (they hold false
    positives). ``transforms(image, target) -> (image, target)`` as for VOC.
    """

    def __init__(self, root: str | os.PathLike, ann_file: str | os.PathLike, img_dir: str | os.PathLike = "",
                 transforms: Callable[[torch.Tensor, dict], tuple[torch.Tensor, dict]] | None = None,
                 classes: Sequence[str] | None = None, masks: bool = False, remove_empty: bool = False) -> None:
        self.root = Path(root)
        self.ann_path = Path(ann_file) if Path(ann_file).is_absolute() else self.root / ann_file
        self.img_dir = Path(img_dir) if Path(img_dir).is_absolute() else self.root / img_dir
        self.transforms = transforms
        self.masks = bool(masks)
        self.coco = read_coco_json(self.ann_path)
        for ann in self.coco.dataset["annotations"]:
            _check_annotation(self.ann_path, ann, self.coco)
        self.classes, self.cat_to_label = self._select_classes(classes)
        self.ids: list[int] = sorted(self.coco.imgs)
        if remove_empty:
            self.ids = [i for i in self.ids if any(a["category_id"] in self.cat_to_label
                                                   for a in self.coco.imgToAnns.get(i, []))]
        self._warned: set = set()

    def _select_classes(self, classes: Sequence[str] | None) -> tuple[tuple[str, ...], dict[int, int]]:
        by_name: dict[str, int] = {}
        for cid in sorted(self.coco.cats):
            name = str(self.coco.cats[cid].get("name", cid))
            if name in by_name:
                raise ValueError(f"{self.ann_path}: categories {by_name[name]} and {cid} share the name {name!r} "
                                 f"(unique category names)")
            by_name[name] = cid
        names = tuple(by_name) if classes is None else tuple(classes)
        if not names or len(set(names)) != len(names):
            raise ValueError(f"{self.ann_path}: classes must be a non-empty list of unique names, got {names} "
                             f"(the dataset's classes kwarg)")
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise ValueError(f"{self.ann_path}: classes {unknown} are not categories of the file (one of "
                             f"{sorted(by_name)})")
        return names, {by_name[n]: k + 1 for k, n in enumerate(names)}

    @property
    def num_classes(self) -> int:
        """Number of classes including background."""
        return len(self.classes) + 1

    def __len__(self) -> int:
        return len(self.ids)

    def image_path(self, i: int) -> Path:
        return self.img_dir / str(self.coco.imgs[self.ids[i]]["file_name"])

    def get_annotation(self, i: int) -> dict[str, Any]:
        """Annotation of item ``i`` without loading the image: ``{"id", "size": (H, W) or None, "boxes" float32
        [N, 4] xyxy, "labels" int64 [N], "difficult" bool [N] (iscrowd), "anns": the selected COCO dicts}``;
        degenerate boxes are left out."""
        img = self.coco.imgs[self.ids[i]]
        anns = [a for a in self.coco.imgToAnns.get(self.ids[i], []) if a["category_id"] in self.cat_to_label]
        good = [a for a in anns if a["bbox"][2] > 0 and a["bbox"][3] > 0]
        if len(good) < len(anns) and "degenerate" not in self._warned:
            self._warned.add("degenerate")
            bad = [a.get("id") for a in anns if a not in good]
            warnings.warn(f"{self.ann_path}: annotation(s) {bad} have a box of zero width or height: left out "
                          f"(as torchvision's references do)", stacklevel=3)
        boxes = np.array([a["bbox"] for a in good], dtype=np.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        size = (int(img["height"]), int(img["width"])) if "height" in img and "width" in img else None
        return {"id": self.ids[i], "size": size, "boxes": boxes,
                "labels": np.array([self.cat_to_label[a["category_id"]] for a in good], dtype=np.int64),
                "difficult": np.array([bool(a.get("iscrowd", 0)) for a in good], dtype=bool), "anns": good}

    def _check_boxes(self, i: int, ann: dict[str, Any], h: int, w: int) -> None:
        if ann["size"] is not None and tuple(ann["size"]) != (h, w):
            raise ValueError(f"{self.ann_path}: image {ann['id']} is {ann['size'][1]}x{ann['size'][0]} (WxH) in the "
                             f"JSON but {self.image_path(i)} is {w}x{h} (expected the image's size)")
        for a, (x0, y0, x1, y1) in zip(ann["anns"], ann["boxes"].tolist()):
            if x1 <= 0 or y1 <= 0 or x0 >= w or y0 >= h:
                raise ValueError(f"{self.ann_path}: annotation {a.get('id')} box {a['bbox']} lies outside the "
                                 f"{w}x{h} image {self.image_path(i).name} (expected a box inside the image)")
            tol = BORDER_TOLERANCE
            if (x0 < -tol or y0 < -tol or x1 > w + tol or y1 > h + tol) and a.get("id") not in self._warned:
                self._warned.add(a.get("id"))
                warnings.warn(f"{self.ann_path}: annotation {a.get('id')} box {a['bbox']} extends past the {w}x{h} "
                              f"image: clipped to it", stacklevel=3)

    def _masks(self, ann: dict[str, Any], h: int, w: int) -> np.ndarray:
        """uint8 ``[N, H, W]``: each selected object's polygon / RLE rasterised by pycocotools."""
        if ann["size"] is None:
            raise ValueError(f"{self.ann_path}: image {ann['id']} has no width / height (both, to rasterise masks)")
        missing = [a.get("id") for a in ann["anns"] if not a.get("segmentation")]
        if missing:
            raise ValueError(f"{self.ann_path}: annotation(s) {missing} have no segmentation (a polygon or RLE for "
                             f"every object with masks=True)")
        if not ann["anns"]:
            return np.zeros((0, h, w), dtype=np.uint8)
        return np.stack([self.coco.annToMask(a) for a in ann["anns"]])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, Any]]:
        if i < 0:
            i += len(self)
        ann = self.get_annotation(i)
        img = _load_rgb(self.image_path(i))
        h, w = img.shape[:2]
        self._check_boxes(i, ann, h, w)
        masks = self._masks(ann, h, w) if self.masks else None
        target = detection_target(i, ann["boxes"], ann["labels"], ann["difficult"], (h, w), masks,
                                  iscrowd=ann["difficult"])
        image = _to_tensor(img)
        if self.transforms is not None:
            image, target = self.transforms(image, target)
        return image, target

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(ann_file={str(self.ann_path)!r}, n={len(self)}, classes={len(self.classes)}, "
                f"masks={self.masks})")
