"""Checking one image's predictions and targets and turning them into the evaluator's per-image record.

Part of detection evaluation: :meth:`pce.tasks.detection.evaluator.DetectionEvaluator.update` (the public
entry point) calls :func:`make_record`; the records are what :mod:`pce.tasks.detection.ap_voc` and
:mod:`pce.tasks.detection.ap_coco` read. A record is a dict: ``image_id`` (a JSON scalar or None) and numpy
arrays ``pred_boxes`` [N, 4] float64 xyxy, ``pred_scores`` [N], ``pred_labels`` int64 [N] in 1..C,
``gt_boxes`` [M, 4], ``gt_labels`` [M], ``gt_difficult`` bool [M] (ignored: difficult or crowd), ``gt_crowd`` bool
[M] (COCO crowd regions, from a target's ``iscrowd``); when the prediction has ``masks`` also
``pred_rles`` [N] / ``gt_rles`` [M] (``pycocotools.mask.encode`` run-length encodings of the binary masks) and
``mask_size`` ``(H, W)``, else these are None. Errors name the offending item (``predictions[i]`` / ``targets[i]``).
"""

from __future__ import annotations

from typing import Any, Dict, Mapping

import numpy as np

try:  # torch is optional for this module; tensors are converted if it is present.
    import torch
except ImportError:  # pragma: no cover
    torch = None  # type: ignore[assignment]

__all__ = ["make_record", "encode_masks"]

ArrayLike = Any  # torch.Tensor | np.ndarray | sequence


def _to_numpy(x: ArrayLike) -> np.ndarray:
    if torch is not None and isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _json_scalar(v: Any) -> Any:
    if torch is not None and isinstance(v, torch.Tensor):
        if v.numel() != 1:
            raise ValueError(f"image_id must be a scalar, got a tensor of shape {tuple(v.shape)}")
        v = v.item()
    if isinstance(v, np.generic):
        v = v.item()
    return v


def check_labels(labels: np.ndarray, num_classes: int, where: str) -> np.ndarray:
    """Integer labels in ``1..num_classes`` as int64 (``ValueError`` naming ``where`` otherwise)."""
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        if not np.all(np.equal(np.mod(labels, 1), 0)):
            bad = labels[np.mod(labels, 1) != 0][0]
            raise ValueError(f"{where}: labels must be integers, got {bad!r}")
    labels = labels.astype(np.int64)
    bad = (labels < 1) | (labels > num_classes)
    if np.any(bad):
        raise ValueError(
            f"{where}: label {int(labels[bad][0])} out of range 1..{num_classes} "
            f"(0 is background and must not appear)"
        )
    return labels


def check_boxes(boxes: ArrayLike, where: str) -> np.ndarray:
    """Finite xyxy boxes as float64 [N, 4] (``ValueError`` naming ``where`` otherwise)."""
    b = _to_numpy(boxes).astype(np.float64)
    if b.size == 0:
        return b.reshape(0, 4)
    if b.ndim != 2 or b.shape[1] != 4:
        raise ValueError(f"{where}: boxes must have shape [N, 4] (xyxy), got {tuple(b.shape)}")
    if not np.all(np.isfinite(b)):
        raise ValueError(f"{where}: boxes contain non-finite values (row {int(np.nonzero(~np.isfinite(b))[0][0])})")
    bad = (b[:, 2] < b[:, 0]) | (b[:, 3] < b[:, 1])
    if np.any(bad):
        i = int(np.nonzero(bad)[0][0])
        raise ValueError(f"{where}: box {i} = {b[i].tolist()} has x2 < x1 or y2 < y1; boxes must be xyxy")
    return b


def encode_masks(masks: ArrayLike, n: int, where: str) -> tuple:
    """``(RLEs, (H, W))`` of ``n`` masks ``[n, H, W]`` (or ``[n, 1, H, W]``): binary (> 0) or probabilities
    (> 0.5, as torchvision's Mask R-CNN outputs); ``ValueError`` naming ``where`` for another shape."""
    from pycocotools import mask as mask_utils

    m = _to_numpy(masks)
    if m.ndim == 4 and m.shape[1] == 1:
        m = m[:, 0]
    if m.ndim != 3 or m.shape[0] != n:
        raise ValueError(f"{where}: masks must have shape [N, H, W] with N = {n} (one per box), got {tuple(m.shape)}")
    thr = 0.5 if np.issubdtype(m.dtype, np.floating) else 0
    binary = np.asfortranarray((m > thr).transpose(1, 2, 0).astype(np.uint8))  # [H, W, N], as pycocotools wants
    return list(mask_utils.encode(binary)) if n else [], tuple(int(v) for v in m.shape[1:])


def _mask_fields(pred: Mapping[str, ArrayLike], tgt: Mapping[str, ArrayLike], i: int, n: int,
                 m: int) -> Dict[str, Any]:
    """The record's ``pred_rles`` / ``gt_rles`` / ``mask_size`` (all None without predicted masks)."""
    if pred.get("masks") is None:
        return {"pred_rles": None, "gt_rles": None, "mask_size": None}
    if tgt.get("masks") is None:
        raise KeyError(f"targets[{i}] has no 'masks' but predictions[{i}] has (mask AP needs the ground-truth "
                       f"masks: the dataset's masks=True)")
    pred_rles, size = encode_masks(pred["masks"], n, f"predictions[{i}]")
    gt_rles, gt_size = encode_masks(tgt["masks"], m, f"targets[{i}]")
    if size != gt_size:
        raise ValueError(f"predictions[{i}]: masks are {size[1]}x{size[0]} (WxH) but the target's are "
                         f"{gt_size[1]}x{gt_size[0]} (expected masks of the same image size)")
    return {"pred_rles": pred_rles, "gt_rles": gt_rles, "mask_size": size}


def _check_keys(pred: Mapping[str, ArrayLike], tgt: Mapping[str, ArrayLike], i: int) -> None:
    for key in ("boxes", "scores", "labels"):
        if key not in pred:
            raise KeyError(f"predictions[{i}] has no {key!r} (keys: {sorted(pred)})")
    for key in ("boxes", "labels"):
        if key not in tgt:
            raise KeyError(f"targets[{i}] has no {key!r} (keys: {sorted(tgt)})")


def make_record(pred: Mapping[str, ArrayLike], tgt: Mapping[str, ArrayLike], i: int,
                num_classes: int) -> Dict[str, Any]:
    """The checked record of image ``i`` (see the module docstring) from its prediction and target dicts."""
    _check_keys(pred, tgt, i)
    pb = check_boxes(pred["boxes"], f"predictions[{i}]")
    ps = _to_numpy(pred["scores"]).astype(np.float64).reshape(-1)
    pl = check_labels(_to_numpy(pred["labels"]).reshape(-1), num_classes, f"predictions[{i}]")
    if not (len(pb) == len(ps) == len(pl)):
        raise ValueError(
            f"predictions[{i}]: boxes {len(pb)}, scores {len(ps)} and labels {len(pl)} differ in length"
        )
    if not np.all(np.isfinite(ps)):
        raise ValueError(f"predictions[{i}]: scores contain non-finite values")
    gb = check_boxes(tgt["boxes"], f"targets[{i}]")
    gl = check_labels(_to_numpy(tgt["labels"]).reshape(-1), num_classes, f"targets[{i}]")
    if len(gb) != len(gl):
        raise ValueError(f"targets[{i}]: boxes {len(gb)} and labels {len(gl)} differ in length")
    if tgt.get("difficult") is not None:
        gd = _to_numpy(tgt["difficult"]).reshape(-1).astype(bool)
        if len(gd) != len(gl):
            raise ValueError(f"targets[{i}]: difficult has {len(gd)} entries for {len(gl)} boxes")
    else:
        gd = np.zeros(len(gl), dtype=bool)
    gc = np.zeros(len(gl), dtype=bool)
    if tgt.get("iscrowd") is not None:  # COCO crowd regions: ignored, matched by intersection over detection area
        gc = _to_numpy(tgt["iscrowd"]).reshape(-1).astype(bool)
        if len(gc) != len(gl):
            raise ValueError(f"targets[{i}]: iscrowd has {len(gc)} entries for {len(gl)} boxes")
    image_id = _json_scalar(tgt.get("image_id"))
    return {
        "image_id": image_id,
        "pred_boxes": pb,
        "pred_scores": ps,
        "pred_labels": pl,
        "gt_boxes": gb,
        "gt_labels": gl,
        "gt_difficult": gd | gc,
        "gt_crowd": gc,
        **_mask_fields(pred, tgt, i, len(pb), len(gb)),
    }
