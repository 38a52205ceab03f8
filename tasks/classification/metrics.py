"""Classification metrics: top-k accuracy and a mergeable confusion-matrix evaluator.

Ties between logits are broken by ``torch.topk`` (implementation-defined); the
evaluator's top-1 prediction is the first column of the same ``topk`` call, so
``top1`` always equals ``trace(confusion) / num_samples``. With two classes the evaluator also
reports ``AUC``: the ROC AUC (scikit-learn) of the softmax probability of class 1 (e.g. tile AUC).
"""

from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Optional, Sequence, Union

import numpy as np
import torch

__all__ = ["topk_accuracy", "ClassificationEvaluator"]


def _check_inputs(logits: Any, targets: Any, num_classes: Optional[int] = None):
    logits = torch.as_tensor(logits)
    targets = torch.as_tensor(targets)
    if logits.dim() != 2:
        raise ValueError(f"logits must be [B, C], got shape {tuple(logits.shape)}")
    if targets.dim() != 1 or targets.shape[0] != logits.shape[0]:
        raise ValueError(
            f"targets must be [B] with B={logits.shape[0]} (from logits {tuple(logits.shape)}), "
            f"got shape {tuple(targets.shape)}"
        )
    if targets.is_floating_point() or targets.dtype == torch.bool or targets.is_complex():
        raise TypeError(f"targets must be integer class indices, got dtype {targets.dtype}")
    c = logits.shape[1]
    if num_classes is not None and c != num_classes:
        raise ValueError(f"logits have {c} classes (shape {tuple(logits.shape)}), expected num_classes={num_classes}")
    if c < 1:
        raise ValueError(f"logits must have at least one class, got shape {tuple(logits.shape)}")
    targets = targets.to(logits.device).long()
    if targets.numel():
        lo, hi = int(targets.min()), int(targets.max())
        if lo < 0 or hi >= c:
            raise ValueError(f"target {lo if lo < 0 else hi} out of range 0..{c - 1}")
    return logits, targets


def _check_ks(ks: Sequence[int]) -> tuple:
    ks = (ks,) if isinstance(ks, int) else tuple(int(k) for k in ks)
    if not ks or any(k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {ks!r}")
    return ks


@torch.no_grad()
def _correct_counts(logits: torch.Tensor, targets: torch.Tensor, ks: Sequence[int]):
    """Return (number of samples whose target is in the top-min(k, C) for each k, top-1 predictions [B])."""
    c = logits.shape[1]
    maxk = min(max(ks), c)
    idx = logits.topk(maxk, dim=1, largest=True, sorted=True).indices  # [B, maxk]
    hit = idx == targets[:, None]  # [B, maxk], at most one True per row
    cum = hit.cumsum(dim=1)
    counts = {k: int(cum[:, min(k, c) - 1].sum()) if targets.numel() else 0 for k in ks}
    return counts, idx[:, 0]


def topk_accuracy(logits: Any, targets: Any, ks: Sequence[int] = (1, 5)) -> Dict[str, float]:
    """Top-k accuracy of logits [B, C] against integer targets [B].

    Returns {"top{k}": fraction} for each requested k; k > C is clamped to C
    (accuracy 1).  An empty batch gives nan.
    """
    ks = _check_ks(ks)
    logits, targets = _check_inputs(logits, targets)
    n = targets.numel()
    counts, _ = _correct_counts(logits, targets, ks)
    return {f"top{k}": (counts[k] / n if n else math.nan) for k in ks}


class ClassificationEvaluator:
    """Accumulates top-k hits and a top-1 confusion matrix [C, C] (rows = target, cols = prediction).

    Args:
        num_classes: C.
        class_names: optional C names (default "0".."C-1").
        topk: the k of the reported "top{k}" accuracies (clamped to C).
    """

    def __init__(self, num_classes: int, class_names: Optional[Sequence[str]] = None,
                 topk: Sequence[int] = (1, 5)) -> None:
        if int(num_classes) < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes!r}")
        self.num_classes = int(num_classes)
        if class_names is not None and len(class_names) != self.num_classes:
            raise ValueError(f"got {len(class_names)} class_names for num_classes={self.num_classes}")
        self.class_names = [str(n) for n in class_names] if class_names is not None else [
            str(i) for i in range(self.num_classes)
        ]
        self.topk = _check_ks(topk)
        self.reset()

    def reset(self) -> None:
        """Zero all counters."""
        self.confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)
        self.correct = {k: 0 for k in self.topk}
        self.num_samples = 0
        self.scores: list = []  # binary only: softmax probability of class 1 per sample
        self.labels: list = []

    @torch.no_grad()
    def update(self, logits: Any, targets: Any) -> None:
        """Add a batch: logits [B, C], integer targets [B] (tensors or numpy)."""
        logits, targets = _check_inputs(logits, targets, self.num_classes)
        counts, pred = _correct_counts(logits, targets, self.topk)
        for k in self.topk:
            self.correct[k] += counts[k]
        c = self.num_classes
        cm = torch.bincount(targets * c + pred, minlength=c * c).reshape(c, c)
        self.confusion += cm.cpu()
        self.num_samples += targets.numel()
        if c == 2:
            self.scores += logits.float().softmax(dim=1)[:, 1].tolist()
            self.labels += targets.tolist()

    def state_dict(self) -> Dict[str, Any]:
        return {"num_classes": self.num_classes, "topk": list(self.topk), "confusion": self.confusion.clone(),
                "correct": dict(self.correct), "num_samples": self.num_samples,
                "scores": list(self.scores), "labels": list(self.labels)}

    def merge(self, other: Union["ClassificationEvaluator", Mapping[str, Any]]) -> "ClassificationEvaluator":
        """Add another evaluator's (or its ``state_dict()``'s) counts; returns self."""
        s = other.state_dict() if isinstance(other, ClassificationEvaluator) else other
        if int(s["num_classes"]) != self.num_classes or tuple(s["topk"]) != self.topk:
            raise ValueError(
                f"cannot merge: num_classes/topk {s['num_classes']}/{tuple(s['topk'])} vs "
                f"{self.num_classes}/{self.topk}"
            )
        self.confusion += torch.as_tensor(s["confusion"], dtype=torch.int64).cpu()
        for k in self.topk:
            self.correct[k] += int(s["correct"][k])
        self.num_samples += int(s["num_samples"])
        self.scores += list(s.get("scores", []))
        self.labels += list(s.get("labels", []))
        return self

    def synchronize(self, group: Any = None) -> None:
        """All-gather and merge the state of every rank (no-op without a multi-process group)."""
        dist = torch.distributed
        if not dist.is_available() or not dist.is_initialized() or dist.get_world_size(group) == 1:
            return
        states = [None] * dist.get_world_size(group)
        dist.all_gather_object(states, self.state_dict(), group=group)
        self.reset()
        for s in states:
            self.merge(s)

    def compute(self) -> Dict[str, Any]:
        """{"top1", "top5", ... (one per k), "per_class_acc": {name: v} (nan if no sample),
        "mean_class_acc", "confusion_matrix": [[int]], "num_samples"}."""
        n = self.num_samples
        out: Dict[str, Any] = {f"top{k}": (self.correct[k] / n if n else math.nan) for k in self.topk}
        cm = self.confusion.numpy().astype(np.float64)
        support = cm.sum(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            acc = np.where(support > 0, np.diag(cm) / support, np.nan)
        valid = acc[~np.isnan(acc)]
        out["per_class_acc"] = {name: float(v) for name, v in zip(self.class_names, acc)}
        out["mean_class_acc"] = float(valid.mean()) if valid.size else math.nan
        out["confusion_matrix"] = self.confusion.tolist()
        out["num_samples"] = n
        if self.num_classes == 2:
            out["AUC"] = math.nan
            if len(set(self.labels)) == 2:
                from sklearn.metrics import roc_auc_score

                out["AUC"] = float(roc_auc_score(np.asarray(self.labels), np.asarray(self.scores)))
        return out
