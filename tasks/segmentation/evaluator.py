"""Semantic-segmentation evaluation from one dataset-wide confusion matrix.

The confusion matrix ``confusion[t, p]`` (int64 [C, C], rows = ground truth,
columns = prediction) is accumulated over *all* pixels of the evaluation set
(not averaged per image).  Pixels whose target equals ``ignore_index`` are not
counted.

Class-exclusion rules (excluded classes are ``float('nan')`` in the per-class
tables and skipped by the means):

* IoU of class c is undefined when the class appears neither in the ground
  truth nor in the prediction (row + column sum 0); such classes are excluded
  from ``mIoU``.  A class that is predicted but absent from the ground truth
  has IoU 0 and *does* count.
* Accuracy (recall) of class c is ``tp / #gt pixels``; it is undefined, hence
  excluded from ``mean_acc``, when the class has no ground-truth pixel (in
  particular when it is absent from both).

Per-class IoU is also reported as flat ``IoU_<name>`` keys (``IoU_tumour``). With two classes (binary
segmentation of image tiles, e.g. tumour vs background), ``tile_AUC`` is the ROC AUC (scikit-learn) of the
fraction of each image's pixels predicted class 1 against whether its ground truth holds class 1.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Optional, Sequence, Union

import numpy as np
import torch

__all__ = ["SegmentationEvaluator", "segmentation_metrics_from_confusion"]


def segmentation_metrics_from_confusion(confusion: Any, class_names: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Metrics from a confusion matrix [C, C] (rows = GT, cols = prediction); see module docstring."""
    cm = np.asarray(confusion.cpu() if isinstance(confusion, torch.Tensor) else confusion, dtype=np.float64)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"confusion must be square [C, C], got shape {cm.shape}")
    c = cm.shape[0]
    names = list(class_names) if class_names is not None else [str(i) for i in range(c)]
    if len(names) != c:
        raise ValueError(f"{len(names)} class_names for {c} classes")
    tp = np.diag(cm)
    gt = cm.sum(axis=1)
    pred = cm.sum(axis=0)
    union = gt + pred - tp
    total = cm.sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, tp / union, np.nan)
        acc = np.where(gt > 0, tp / gt, np.nan)

    def _nanmean(x: np.ndarray) -> float:
        x = x[~np.isnan(x)]
        return float(x.mean()) if x.size else math.nan

    if total > 0:
        freq = gt / total
        fw = float(np.sum(freq[gt > 0] * iou[gt > 0]))
        pixel_acc = float(tp.sum() / total)
    else:
        fw = pixel_acc = math.nan
    return {
        "mIoU": _nanmean(iou),
        "per_class_IoU": {n: float(v) for n, v in zip(names, iou)},
        "pixel_acc": pixel_acc,
        "mean_acc": _nanmean(acc),
        "per_class_acc": {n: float(v) for n, v in zip(names, acc)},
        "fwIoU": fw,
        "confusion_matrix": cm.astype(np.int64).tolist(),
        "num_pixels": int(total),
        **{f"IoU_{n}": float(v) for n, v in zip(names, iou)},
    }


def _tile_auc(scores: Sequence[float], labels: Sequence[int]) -> float:
    """ROC AUC of per-image scores against 0/1 labels; nan unless both labels occur."""
    if len(set(int(v) for v in labels)) < 2:
        return math.nan
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(np.asarray(labels), np.asarray(scores, dtype=np.float64)))


class SegmentationEvaluator:
    """Accumulates a [C, C] int64 confusion matrix (rows = GT, cols = prediction).

    Args:
        num_classes: C; valid labels are 0..C-1.
        ignore_index: target value whose pixels are skipped (None: no ignore value).
        class_names: optional C names for the per-class tables (default "0".."C-1").
        device: where ``confusion`` lives (bincount runs on the input's device).

    Distributed: ``torch.distributed.all_reduce(ev.confusion)`` (on a device the
    backend supports) or :meth:`synchronize`, or :meth:`merge` another evaluator.
    """

    def __init__(
        self,
        num_classes: int,
        ignore_index: Optional[int] = 255,
        class_names: Optional[Sequence[str]] = None,
        device: Union[str, torch.device] = "cpu",
    ) -> None:
        if int(num_classes) < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes!r}")
        self.num_classes = int(num_classes)
        self.ignore_index = None if ignore_index is None else int(ignore_index)
        if class_names is not None and len(class_names) != self.num_classes:
            raise ValueError(f"got {len(class_names)} class_names for num_classes={self.num_classes}")
        self.class_names = [str(n) for n in class_names] if class_names is not None else [
            str(i) for i in range(self.num_classes)
        ]
        self.confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64, device=device)
        self.tile_scores: list = []  # binary only: per image, fraction of pixels predicted 1
        self.tile_labels: list = []  # binary only: per image, 1 when its ground truth holds class 1

    def reset(self) -> None:
        """Zero the confusion matrix."""
        self.confusion.zero_()
        self.tile_scores, self.tile_labels = [], []

    @torch.no_grad()
    def update(self, pred: Any, target: Any) -> None:
        """Add a batch.

        pred: int labels [B, H, W] or logits/probabilities [B, C, H, W] (argmax over C);
        target: int labels [B, H, W].  Unbatched [H, W] / [C, H, W] is accepted too.
        Tensors or numpy arrays.
        """
        pred = torch.as_tensor(pred)
        target = torch.as_tensor(target)
        if target.is_floating_point() or target.dtype == torch.bool or target.is_complex():
            raise TypeError(f"target must be an integer tensor, got dtype {target.dtype}")
        if target.dim() == 2:
            target = target.unsqueeze(0)
            pred = pred.unsqueeze(0)
        if target.dim() != 3:
            raise ValueError(f"target must be [B, H, W] (or [H, W]), got shape {tuple(target.shape)}")
        if pred.dim() == 4:
            if pred.shape[1] != self.num_classes:
                raise ValueError(
                    f"logits have {pred.shape[1]} channels (shape {tuple(pred.shape)}), expected num_classes={self.num_classes}"
                )
            pred = pred.argmax(dim=1)
        elif pred.is_floating_point():
            raise TypeError(
                f"pred of shape {tuple(pred.shape)} has float dtype {pred.dtype}: pass integer labels "
                f"[B, H, W] or logits [B, C, H, W]"
            )
        if pred.shape != target.shape:
            raise ValueError(f"pred labels shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
        if self.num_classes == 2:
            self._update_tiles(pred.to(target.device), target)
        pred = pred.to(target.device).reshape(-1).long()
        target = target.reshape(-1).long()
        if self.ignore_index is not None:
            keep = target != self.ignore_index
            pred, target = pred[keep], target[keep]
        if target.numel() == 0:
            return
        c = self.num_classes
        t_min, t_max = int(target.min()), int(target.max())
        if t_min < 0 or t_max >= c:
            bad = t_min if t_min < 0 else t_max
            raise ValueError(
                f"target value {bad} out of range 0..{c - 1} (ignore_index={self.ignore_index})"
            )
        p_min, p_max = int(pred.min()), int(pred.max())
        if p_min < 0 or p_max >= c:
            bad = p_min if p_min < 0 else p_max
            raise ValueError(f"prediction value {bad} out of range 0..{c - 1} (at a non-ignored pixel)")
        counts = torch.bincount(target * c + pred, minlength=c * c).reshape(c, c)
        self.confusion += counts.to(self.confusion.device)

    def _update_tiles(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Per-image predicted class-1 fraction and ground-truth class-1 presence (ignored pixels left out)."""
        valid = (target != self.ignore_index if self.ignore_index is not None
                 else torch.ones_like(target, dtype=torch.bool))
        n = valid.flatten(1).sum(1).clamp(min=1).double()
        self.tile_scores += ((pred == 1) & valid).flatten(1).sum(1).double().div(n).tolist()
        self.tile_labels += ((target == 1) & valid).flatten(1).any(1).long().tolist()

    def merge(self, other: Union["SegmentationEvaluator", Mapping[str, Any]]) -> "SegmentationEvaluator":
        """Add another evaluator's (or ``state_dict()``'s) confusion matrix; returns self."""
        cm = other.confusion if isinstance(other, SegmentationEvaluator) else torch.as_tensor(other["confusion"])
        if tuple(cm.shape) != (self.num_classes, self.num_classes):
            raise ValueError(f"confusion shape {tuple(cm.shape)} != ({self.num_classes}, {self.num_classes})")
        self.confusion += cm.to(device=self.confusion.device, dtype=torch.int64)
        src = other.state_dict() if isinstance(other, SegmentationEvaluator) else other
        self.tile_scores += list(src.get("tile_scores", []))
        self.tile_labels += list(src.get("tile_labels", []))
        return self

    def state_dict(self) -> Dict[str, Any]:
        """{"num_classes", "ignore_index", "confusion": CPU int64 tensor [C, C]}."""
        return {"num_classes": self.num_classes, "ignore_index": self.ignore_index,
                "confusion": self.confusion.detach().cpu().clone(),
                "tile_scores": list(self.tile_scores), "tile_labels": list(self.tile_labels)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.reset()
        self.merge(state)

    def synchronize(self, group: Any = None) -> None:
        """Sum ``confusion`` over ranks (no-op without an initialised multi-process group)."""
        dist = torch.distributed
        if not dist.is_available() or not dist.is_initialized() or dist.get_world_size(group) == 1:
            return
        t = self.confusion
        if dist.get_backend(group) == "nccl" and t.device.type != "cuda":
            t = t.cuda()
        dist.all_reduce(t, group=group)
        if t is not self.confusion:
            self.confusion.copy_(t.to(self.confusion.device))
        if self.num_classes == 2:
            parts = [None] * dist.get_world_size(group)
            dist.all_gather_object(parts, (self.tile_scores, self.tile_labels), group=group)
            self.tile_scores = [v for p in parts for v in p[0]]
            self.tile_labels = [v for p in parts for v in p[1]]

    def compute(self) -> Dict[str, Any]:
        """{"mIoU", "per_class_IoU": {name: v}, "pixel_acc", "mean_acc", "per_class_acc",
        "fwIoU", "confusion_matrix": [[int]] (rows GT), "num_pixels"}; fractions, nan = excluded."""
        out = segmentation_metrics_from_confusion(self.confusion, self.class_names)
        if self.num_classes == 2:
            out["tile_AUC"] = _tile_auc(self.tile_scores, self.tile_labels)
        return out

    def format_table(self, results: Optional[Mapping[str, Any]] = None, digits: int = 1) -> str:
        """Per-class IoU / accuracy text table in percent."""
        res = self.compute() if results is None else results
        w = max(8, max(len(n) for n in self.class_names))

        def fmt(v: float) -> str:
            return "-" if math.isnan(v) else f"{100.0 * v:.{digits}f}"

        lines = [f"{'class':<{w}} {'IoU':>8} {'Acc':>8}"]
        lines.append("-" * len(lines[0]))
        for n in self.class_names:
            lines.append(f"{n:<{w}} {fmt(res['per_class_IoU'][n]):>8} {fmt(res['per_class_acc'][n]):>8}")
        lines.append("-" * len(lines[0]))
        lines.append(f"{'mean':<{w}} {fmt(res['mIoU']):>8} {fmt(res['mean_acc']):>8}")
        lines.append(f"pixel_acc {fmt(res['pixel_acc'])}  fwIoU {fmt(res['fwIoU'])}")
        return "\n".join(lines)
