"""COCO AP through pycocotools: an in-memory COCO ground truth and result set built from the evaluator's
per-image records, and ``COCOeval`` with ordinary IoU for ignored (difficult) boxes and pycocotools' intersection
over the detection's area for COCO crowd regions (``iscrowd`` targets) -- on boxes
(``iou_type="bbox"``) or on masks (``"segm"``: the records' RLEs, ``pycocotools.mask`` IoU).

Part of detection evaluation: :class:`pce.tasks.detection.evaluator.DetectionEvaluator` (the public entry
point; its module docstring states the COCO protocol used here) calls :func:`coco_precision`;
:mod:`pce.tasks.detection.ap_voc` computes the VOC numbers.
"""

from __future__ import annotations

import contextlib
import io
import math
from typing import Any, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .ap_voc import box_iou_xyxy

__all__ = ["coco_precision", "coco_ap_per_threshold", "nanmean"]


def nanmean(x: np.ndarray) -> float:
    """Mean of the non-nan entries (nan when there is none)."""
    x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else math.nan


def coco_ap_per_threshold(prec: Optional[np.ndarray], has_pos: np.ndarray, num_thresholds: int) -> np.ndarray:
    """COCO AP [T, C] from pycocotools' precision [T, R, C] (nan for classes without positives); without any
    detection (``prec`` None) 0 for every class with positives."""
    if prec is None:  # no detection at all: AP 0 for every class with positives
        return np.where(has_pos[None, :], 0.0, math.nan) * np.ones((num_thresholds, 1))
    valid = prec > -1  # [T, R, C]; a class is either all valid or all -1
    summed = np.where(valid, prec, 0.0).sum(axis=1)
    count = valid.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, summed / np.maximum(count, 1), math.nan)  # [T, C]


def _box_ioa_xyxy(d: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Intersection over the detection's area ``[D, G]`` (pycocotools' overlap with a crowd region)."""
    lt = np.maximum(d[:, None, :2], g[None, :, :2])
    rb = np.minimum(d[:, None, 2:], g[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=2)
    area = ((d[:, 2] - d[:, 0]) * (d[:, 3] - d[:, 1]))[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(area > 0, inter / np.maximum(area, 1e-12), 0.0)


def _make_coco_eval_cls():
    from pycocotools import mask as mask_utils
    from pycocotools.cocoeval import COCOeval

    class _PlainIoUCOCOeval(COCOeval):
        """COCOeval whose ignore (``iscrowd``) boxes / masks use ordinary IoU."""

        def computeIoU(self, imgId, catId):  # noqa: N802 (pycocotools API)
            p = self.params
            gt = self._gts[imgId, catId]
            dt = self._dts[imgId, catId]
            if len(gt) == 0 and len(dt) == 0:
                return []
            inds = np.argsort([-d["score"] for d in dt], kind="mergesort")
            dt = [dt[i] for i in inds][: p.maxDets[-1]]
            crowd = [int(bool(g.get("crowd_region"))) for g in gt]  # COCO crowds: intersection over detection
            if p.iouType == "segm":
                if len(gt) == 0 or len(dt) == 0:
                    return []
                return mask_utils.iou([d["segmentation"] for d in dt], [g["segmentation"] for g in gt], crowd)
            g = np.array([x["bbox"] for x in gt], dtype=np.float64).reshape(-1, 4)
            d = np.array([x["bbox"] for x in dt], dtype=np.float64).reshape(-1, 4)
            g[:, 2:] += g[:, :2]  # xywh -> xyxy
            d[:, 2:] += d[:, :2]
            iou = box_iou_xyxy(d, g)
            if any(crowd) and len(d):
                cols = np.flatnonzero(crowd)
                iou[:, cols] = _box_ioa_xyxy(d, g[cols])
            return iou

    return _PlainIoUCOCOeval


def _coco_lists(images: Sequence[Mapping[str, Any]], use_difficult: bool,
                segm: bool = False) -> Tuple[List[dict], List[dict], List[dict]]:
    """COCO ``images``, ground-truth ``annotations`` (difficult boxes as ``iscrowd=1`` unless ``use_difficult``)
    and detection ``results`` (xywh boxes; with ``segm`` the records' mask RLEs instead, and mask areas) of the
    records; image ids are 1..len(images)."""
    from pycocotools import mask as mask_utils

    coco_images, annotations, results = [], [], []
    ann_id = 0
    for idx, r in enumerate(images):
        img_id = idx + 1  # internal ids: user image_ids may be strings or collide across ranks
        coco_images.append({"id": img_id, "height": int(r["mask_size"][0]), "width": int(r["mask_size"][1])}
                           if segm else {"id": img_id})
        gt_rles = r["gt_rles"] if segm else [None] * len(r["gt_labels"])
        crowds = r.get("gt_crowd", np.zeros(len(r["gt_labels"]), dtype=bool))
        for box, lab, diff, rle, crowd in zip(r["gt_boxes"], r["gt_labels"], r["gt_difficult"], gt_rles, crowds):
            ann_id += 1
            x1, y1, x2, y2 = (float(v) for v in box)
            ann = {"id": ann_id,  # pycocotools requires ids > 0 (0 means "unmatched")
                   "image_id": img_id, "category_id": int(lab), "bbox": [x1, y1, x2 - x1, y2 - y1],
                   "area": (x2 - x1) * (y2 - y1), "iscrowd": int(bool(crowd) or (bool(diff) and not use_difficult)),
                   "crowd_region": bool(crowd)}
            if segm:
                ann.update(segmentation=rle, area=float(mask_utils.area(rle)))
            annotations.append(ann)
        pred_rles = r["pred_rles"] if segm else [None] * len(r["pred_labels"])
        for box, s, lab, rle in zip(r["pred_boxes"], r["pred_scores"], r["pred_labels"], pred_rles):
            x1, y1, x2, y2 = (float(v) for v in box)
            res = {"image_id": img_id, "category_id": int(lab), "score": float(s)}
            if segm:  # COCO's mask field; loadRes turns a result with a "bbox" into a box polygon: no bbox here
                res["segmentation"] = rle
            else:
                res["bbox"] = [x1, y1, x2 - x1, y2 - y1]
            results.append(res)
    return coco_images, annotations, results


def coco_precision(images: Sequence[Mapping[str, Any]], class_names: Sequence[str], iou_thresholds: np.ndarray,
                   max_dets: int, use_difficult: bool, iou_type: str = "bbox") -> Optional[np.ndarray]:
    """pycocotools precision array [T, 101, C] (-1 for classes without GT), or None without detections;
    ``iou_type``: ``"bbox"`` or ``"segm"`` (the records' ``pred_rles`` / ``gt_rles``)."""
    from pycocotools.coco import COCO

    if iou_type not in ("bbox", "segm"):
        raise ValueError(f"iou_type must be 'bbox' or 'segm', got {iou_type!r}")
    coco_images, annotations, results = _coco_lists(images, use_difficult, segm=iou_type == "segm")
    if not results:
        return None  # loadRes([]) raises IndexError
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink):
        gt = COCO()
        gt.dataset = {
            "images": coco_images,
            "annotations": annotations,
            "categories": [{"id": c + 1, "name": n} for c, n in enumerate(class_names)],
        }
        gt.createIndex()
        dt = gt.loadRes(results)
        ev = _make_coco_eval_cls()(gt, dt, iouType=iou_type)
        ev.params.imgIds = [im["id"] for im in coco_images]
        ev.params.catIds = list(range(1, len(class_names) + 1))
        ev.params.iouThrs = iou_thresholds.copy()
        ev.params.maxDets = [max_dets]
        ev.params.areaRng = [[0.0, 1e5**2]]
        ev.params.areaRngLbl = ["all"]
        ev.evaluate()
        ev.accumulate()
    return ev.eval["precision"][:, :, :, 0, 0]
