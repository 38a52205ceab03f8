"""PASCAL VOC AP at IoU 0.5: box IoU, the AP integral (VOC2007 11-point and VOC2010+ area) and the per-class
greedy matching of the VOC protocol.

Part of detection evaluation: :class:`pce.tasks.detection.evaluator.DetectionEvaluator` (the public entry
point, whose module docstring states the conventions and the protocols) accumulates the per-image records
that :func:`voc_class_ap` reads; :mod:`pce.tasks.detection.ap_coco` computes the COCO numbers.

A record is a dict of numpy arrays: ``pred_boxes`` [N, 4] xyxy, ``pred_scores`` [N], ``pred_labels`` [N],
``gt_boxes`` [M, 4], ``gt_labels`` [M], ``gt_difficult`` bool [M] (see :mod:`pce.tasks.detection.eval_records`).
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Sequence, Tuple

import numpy as np

__all__ = ["box_iou_xyxy", "voc_ap", "voc_class_ap"]


def box_iou_xyxy(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU between boxes ``a`` [N, 4] and ``b`` [M, 4] (xyxy, continuous) -> [N, M].

    A pair whose union is zero (two degenerate boxes) has IoU 0.
    """
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    iw = np.minimum(a[:, None, 2], b[None, :, 2]) - np.maximum(a[:, None, 0], b[None, :, 0])
    ih = np.minimum(a[:, None, 3], b[None, :, 3]) - np.maximum(a[:, None, 1], b[None, :, 1])
    inter = np.clip(iw, 0, None) * np.clip(ih, 0, None)
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    union = area_a[:, None] + area_b[None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)
    return iou


def voc_ap(recall: np.ndarray, precision: np.ndarray, use_07_metric: bool = False) -> float:
    """AP from cumulative ``recall`` [D] and ``precision`` [D] (detections sorted by score).

    ``use_07_metric=True``: VOC2007 11-point interpolation (mean over recall
    thresholds ``t = 0, 0.1, ..., 1`` of ``max(precision[recall >= t])``, 0 if
    empty).  Otherwise the VOC2010+ area under the monotone precision envelope.
    """
    rec = np.asarray(recall, dtype=np.float64).ravel()
    prec = np.asarray(precision, dtype=np.float64).ravel()
    if rec.shape != prec.shape:
        raise ValueError(f"recall shape {rec.shape} != precision shape {prec.shape}")
    if use_07_metric:
        ap = 0.0
        for i in range(11):
            t = i / 10.0  # exact decimal thresholds (np.arange(0, 1.1, 0.1) has 0.30000000000000004)
            p = prec[rec >= t]
            ap += (float(p.max()) if p.size else 0.0) / 11.0
        return ap
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # monotone (non-increasing) envelope
    idx = np.nonzero(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[idx + 1] - mrec[idx]) * mpre[idx + 1]))


def _class_detections(images: Sequence[Mapping[str, Any]], cls: int, use_difficult: bool):
    """The detections and ground truth of label ``cls``: per detection its image, row and score; per image the
    IoU matrix [n_det, n_gt] and the ignore (difficult) flags of its boxes; the number of positives."""
    det_img: List[int] = []
    det_row: List[int] = []
    det_score: List[np.ndarray] = []
    ious: List[np.ndarray] = []
    gt_diff: List[np.ndarray] = []
    npos = 0
    for i, r in enumerate(images):
        gm = r["gt_labels"] == cls
        dm = r["pred_labels"] == cls
        diff = np.zeros(int(gm.sum()), dtype=bool) if use_difficult else r["gt_difficult"][gm]
        npos += int((~diff).sum())
        gt_diff.append(diff)
        ious.append(box_iou_xyxy(r["pred_boxes"][dm], r["gt_boxes"][gm]))
        n = int(dm.sum())
        det_img.extend([i] * n)
        det_row.extend(range(n))
        det_score.append(r["pred_scores"][dm])
    scores = np.concatenate(det_score) if det_score else np.zeros(0)
    return det_img, det_row, scores, ious, gt_diff, npos


def _match(det_img: List[int], det_row: List[int], scores: np.ndarray, ious: List[np.ndarray],
           gt_diff: List[np.ndarray]) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Greedy matching in descending score order: ``(tp, fp, keep)`` per sorted detection; ``keep`` is False for
    a detection matched to a difficult box (neither TP nor FP)."""
    order = np.argsort(-scores, kind="stable")
    matched = [np.zeros(len(d), dtype=bool) for d in gt_diff]
    tp = np.zeros(len(order))
    fp = np.zeros(len(order))
    keep = np.ones(len(order), dtype=bool)
    for k, j in enumerate(order):
        i, row = det_img[j], det_row[j]
        iou = ious[i]
        if iou.shape[1] == 0:
            fp[k] = 1
            continue
        g = int(np.argmax(iou[row]))
        if iou[row, g] >= 0.5:
            if gt_diff[i][g]:
                keep[k] = False  # matched to a difficult box: neither TP nor FP
            elif not matched[i][g]:
                tp[k] = 1
                matched[i][g] = True
            else:
                fp[k] = 1  # duplicate detection
        else:
            fp[k] = 1
    return tp, fp, keep


def voc_class_ap(images: Sequence[Mapping[str, Any]], cls: int, use_difficult: bool) -> Dict[str, Any]:
    """VOC AP at IoU 0.5 for label ``cls`` over the records ``images``: dict(ap07, ap12, npos, num_det)."""
    det_img, det_row, scores, ious, gt_diff, npos = _class_detections(images, cls, use_difficult)
    tp, fp, keep = _match(det_img, det_row, scores, ious, gt_diff)
    if npos == 0:
        return {"ap07": math.nan, "ap12": math.nan, "npos": 0, "num_det": int(keep.sum())}
    tp_c = np.cumsum(tp[keep])
    fp_c = np.cumsum(fp[keep])
    rec = tp_c / npos
    prec = tp_c / np.maximum(tp_c + fp_c, np.finfo(np.float64).tiny)
    return {
        "ap07": voc_ap(rec, prec, use_07_metric=True),
        "ap12": voc_ap(rec, prec, use_07_metric=False),
        "npos": npos,
        "num_det": int(keep.sum()),
    }
