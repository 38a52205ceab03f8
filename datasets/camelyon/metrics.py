"""Slide-level metrics from tumour-probability maps: slide AUC (max probability per slide, scikit-learn) and the
Camelyon16 FROC (mean sensitivity at 1/4, 1/2, 1, 2, 4, 8 false positives per slide): true / false positives
from MONAI's ``compute_fp_tp_probs``, the curve from :func:`froc_curve`, the score from MONAI's
``compute_froc_score``.

:func:`froc_curve` is the challenge's ``computeFROC`` with its one quirk removed. The reference script (and
MONAI's ``compute_froc_curve_data``, a copy of it) sweeps ``for Thresh in all_probs[1:]``: it drops the lowest
probability, meant to be the 0 that an undetected lesion contributes. When every lesion is detected there is no
0, so the weakest real hit is dropped and a perfect detector scores below 1 (hits ``[0.997, 0.999, 0.994]``,
no false positive: FROC 0.667). Here a 0 sentinel is always part of the sweep before the first value is dropped,
which gives the reference's curve whenever a lesion is missed (the 0 is already there) and the right one
when none is.

The evaluation mask follows the challenge's ``Evaluation_FROC.py``: lesions dilated by 75 um (5 tumour cells),
holes filled, 8-connected components labelled; lesions whose major axis is below 275 um are isolated tumour
cells (ITC), neither counted as targets nor as false positives.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

__all__ = ["evaluation_mask", "heatmap_detections", "slide_auc", "camelyon_froc", "froc_curve", "FROC_THRESHOLDS"]

FROC_THRESHOLDS = (0.25, 0.5, 1, 2, 4, 8)


def evaluation_mask(tumour: np.ndarray, um_per_px: float, dilate_um: float = 75.0,
                    itc_um: float = 275.0) -> Tuple[np.ndarray, List[int]]:
    """``(labels int32 [h, w], itc labels)`` of a binary tumour mask with ``um_per_px`` microns per pixel."""
    tumour = np.asarray(tumour, bool)
    if not tumour.any():
        return np.zeros(tumour.shape, np.int32), []
    dist = ndimage.distance_transform_edt(~tumour)
    filled = ndimage.binary_fill_holes(dist < dilate_um / (um_per_px * 2))
    labels, n = ndimage.label(filled, structure=np.ones((3, 3), bool))
    itc = []
    for k, sl in enumerate(ndimage.find_objects(labels), start=1):
        ys, xs = np.nonzero(labels[sl] == k)
        cov = np.cov(np.stack([ys, xs])) if len(ys) > 1 else np.zeros((2, 2))
        major = 4 * np.sqrt(max(np.linalg.eigvalsh(np.atleast_2d(cov)).max(), 0.0))  # skimage's definition
        if major < itc_um / um_per_px:
            itc.append(k)
    return labels.astype(np.int32), itc


def heatmap_detections(prob: np.ndarray, threshold: float = 0.5) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Detections ``(probs, ys, xs)`` of a probability map ``[h, w]``: one per 8-connected region of
    ``prob >= threshold``, at its most probable pixel, with that probability."""
    labels, n = ndimage.label(prob >= threshold, structure=np.ones((3, 3), bool))
    if n == 0:
        return np.zeros(0), np.zeros(0, np.int64), np.zeros(0, np.int64)
    idx = np.arange(1, n + 1)
    peaks = ndimage.maximum_position(prob, labels, idx)
    ys, xs = (np.array([p[i] for p in peaks], np.int64) for i in (0, 1))
    return prob[ys, xs].astype(np.float64), ys, xs


def slide_auc(scores: Sequence[float], labels: Sequence[int]) -> float:
    """ROC AUC of slide scores (e.g. the max tile probability) against slide labels (1 = tumour); nan unless
    both labels occur."""
    if len(set(int(v) for v in labels)) < 2:
        return float("nan")
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(np.asarray(labels), np.asarray(scores, np.float64)))


def froc_curve(fp_probs: np.ndarray, tp_probs: np.ndarray, num_targets: int, num_images: int
               ) -> Tuple[np.ndarray, np.ndarray]:
    """``(false positives per image, sensitivity)``, both ``[T + 1]``, of the operating points at every
    detection probability ``T`` above 0 (descending thresholds: decreasing counts), then the ``(0, 0)`` end.

    ``fp_probs``: the probabilities of every false-positive detection over all images; ``tp_probs``: one entry
    per lesion, its best hit's probability or 0 when missed (ITC lesions may appear as 0s; they are not counted
    in ``num_targets``)."""
    fp = np.asarray(fp_probs, np.float64).reshape(-1)
    tp = np.asarray(tp_probs, np.float64).reshape(-1)
    thresholds = np.unique(np.concatenate([[0.0], fp, tp]))[1:]  # the 0 sentinel is what [1:] drops
    fps = [int((fp >= t).sum()) for t in thresholds] + [0]
    tps = [int((tp >= t).sum()) for t in thresholds] + [0]
    return np.asarray(fps, np.float64) / float(num_images), np.asarray(tps, np.float64) / float(num_targets)


def camelyon_froc(prob_maps: Sequence[np.ndarray], tumour_masks: Sequence[Optional[np.ndarray]],
                  um_per_px: Sequence[float], threshold: float = 0.5,
                  eval_thresholds: Sequence[float] = FROC_THRESHOLDS) -> Dict[str, object]:
    """Camelyon16 FROC over slides: ``prob_maps[i]`` and ``tumour_masks[i]`` (bool, same shape; None for a
    normal slide) at ``um_per_px[i]``. Returns ``{"FROC", "sensitivity_at": {fp: s}, "num_lesions"}``."""
    from monai.metrics import compute_fp_tp_probs, compute_froc_score

    fps, tps, targets = [], [], 0
    for prob, mask, um in zip(prob_maps, tumour_masks, um_per_px):
        mask = np.zeros(prob.shape, bool) if mask is None else np.asarray(mask, bool)
        if mask.shape != prob.shape:
            raise ValueError(f"camelyon_froc: tumour mask {mask.shape} and probability map {prob.shape} differ")
        labels, itc = evaluation_mask(mask, um)
        p, ys, xs = heatmap_detections(prob, threshold)
        fp, tp, n = compute_fp_tp_probs(p, ys, xs, labels, labels_to_exclude=itc)
        fps.append(np.asarray(fp))
        tps.append(np.asarray(tp))
        targets += int(n)
    fp_all, tp_all = np.concatenate(fps), np.concatenate(tps)
    if targets == 0:
        return {"FROC": float("nan"), "sensitivity_at": {}, "num_lesions": 0}
    fps_per_image, sensitivity = froc_curve(fp_all, tp_all, targets, len(prob_maps))
    at = {str(t): float(np.interp(t, fps_per_image[::-1], sensitivity[::-1])) for t in eval_thresholds}
    return {"FROC": float(compute_froc_score(fps_per_image, sensitivity, tuple(eval_thresholds))),
            "sensitivity_at": at, "num_lesions": targets}
