"""COCO AP through pycocotools: an in-memory COCO ground truth and result set built from the evaluator's
per-image records, and ``COCOeval`` with ordinary IoU for ignored (difficult) boxes.

Part of detection evaluation: :class:`pce.tasks.detection.evaluator.DetectionEvaluator` (the public entry
point; its module docstring states the COCO protocol used here) calls :func:`coco_precision`;
:mod:`pce.tasks.detection.ap_voc` computes the VOC numbers.
"""

from __future__ import annotations

import contextlib
import io
from typing import Any, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .ap_voc import box_iou_xyxy

__all__ = ["coco_precision"]


def _make_coco_eval_cls():
    from pycocotools.cocoeval import COCOeval

    class _PlainIoUCOCOeval(COCOeval):
        """COCOeval whose ignore (``iscrowd``) boxes use ordinary IoU."""

        def computeIoU(self, imgId, catId):  # noqa: N802 (pycocotools API)
            p = self.params
            gt = self._gts[imgId, catId]
            dt = self._dts[imgId, catId]
            if len(gt) == 0 and len(dt) == 0:
                return []
            inds = np.argsort([-d["score"] for d in dt], kind="mergesort")
            dt = [dt[i] for i in inds][: p.maxDets[-1]]
            g = np.array([x["bbox"] for x in gt], dtype=np.float64).reshape(-1, 4)
            d = np.array([x["bbox"] for x in dt], dtype=np.float64).reshape(-1, 4)
            g[:, 2:] += g[:, :2]  # xywh -> xyxy
            d[:, 2:] += d[:, :2]
            return box_iou_xyxy(d, g)

    return _PlainIoUCOCOeval


def _coco_lists(images: Sequence[Mapping[str, Any]], use_difficult: bool) -> Tuple[List[dict], List[dict], List[dict]]:
    """COCO ``images``, ground-truth ``annotations`` (difficult boxes as ``iscrowd=1`` unless ``use_difficult``)
    and detection ``results`` (xywh boxes) of the records; image ids are 1..len(images)."""
    coco_images, annotations, results = [], [], []
    ann_id = 0
    for idx, r in enumerate(images):
        img_id = idx + 1  # internal ids: user image_ids may be strings or collide across ranks
        coco_images.append({"id": img_id})
        for box, lab, diff in zip(r["gt_boxes"], r["gt_labels"], r["gt_difficult"]):
            ann_id += 1
            x1, y1, x2, y2 = (float(v) for v in box)
            crowd = int(bool(diff) and not use_difficult)
            annotations.append(
                {
                    "id": ann_id,  # pycocotools requires ids > 0 (0 means "unmatched")
                    "image_id": img_id,
                    "category_id": int(lab),
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                    "iscrowd": crowd,
                }
            )
        for box, s, lab in zip(r["pred_boxes"], r["pred_scores"], r["pred_labels"]):
            x1, y1, x2, y2 = (float(v) for v in box)
            results.append(
                {"image_id": img_id, "category_id": int(lab), "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(s)}
            )
    return coco_images, annotations, results


def coco_precision(images: Sequence[Mapping[str, Any]], class_names: Sequence[str], iou_thresholds: np.ndarray,
                   max_dets: int, use_difficult: bool) -> Optional[np.ndarray]:
    """pycocotools precision array [T, 101, C] (-1 for classes without GT), or None without detections."""
    from pycocotools.coco import COCO

    coco_images, annotations, results = _coco_lists(images, use_difficult)
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
        ev = _make_coco_eval_cls()(gt, dt, iouType="bbox")
        ev.params.imgIds = [im["id"] for im in coco_images]
        ev.params.catIds = list(range(1, len(class_names) + 1))
        ev.params.iouThrs = iou_thresholds.copy()
        ev.params.maxDets = [max_dets]
        ev.params.areaRng = [[0.0, 1e5**2]]
        ev.params.areaRngLbl = ["all"]
        ev.evaluate()
        ev.accumulate()
    return ev.eval["precision"][:, :, :, 0, 0]
