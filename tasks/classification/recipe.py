"""timm's classification training recipe on the task's batches: Mixup / CutMix (``data.mixup``) and the loss.

:func:`build_mixup` turns ``data.mixup`` (the arguments of :class:`timm.data.Mixup`) into a ``Mixup`` that also
smooths the targets by ``model.label_smoothing``; :class:`ClassificationLoss` mixes a training batch with it and
scores the logits: :class:`timm.loss.SoftTargetCrossEntropy` against the mixed soft targets, or cross-entropy with
``label_smoothing`` (the same formula as :class:`timm.loss.LabelSmoothingCrossEntropy`) when nothing is mixed.
Mixup needs an even batch: an odd one (the last batch of an epoch without ``data.drop_last``) is trained unmixed,
with hard targets. timm draws the mixing parameters from numpy's global generator, which the trainer seeds and
stores in every checkpoint, so a resumed run mixes as the uninterrupted one.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy

from pce.engine.config import to_plain
from pce.engine.errors import PCEError

__all__ = ["build_mixup", "ClassificationLoss"]

logger = logging.getLogger("pce")


def _number(opts: Dict[str, Any], key: str, lo: float, hi: float = math.inf) -> float:
    """``opts[key]`` as a float in ``[lo, hi]``; ``PCEError`` naming ``data.mixup.<key>`` otherwise."""
    v = opts[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= float(v) <= hi:
        raise PCEError(f"data.mixup.{key}", f"{v!r} is out of range",
                       f"a number in [{lo:g}, {hi:g}]" if hi < math.inf else f"a number >= {lo:g}")
    return float(v)


def build_mixup(cfg: Any) -> Optional[Mixup]:
    """``timm.data.Mixup`` of ``cfg.data.mixup`` with ``cfg.model.num_classes`` classes and
    ``cfg.model.label_smoothing``; ``None`` while both alphas are 0 and ``cutmix_minmax`` is unset (off)."""
    opts = to_plain(cfg.data.mixup)
    mixup_alpha, cutmix_alpha = _number(opts, "mixup_alpha", 0.0), _number(opts, "cutmix_alpha", 0.0)
    prob, switch = _number(opts, "prob", 0.0, 1.0), _number(opts, "switch_prob", 0.0, 1.0)
    minmax = opts.get("cutmix_minmax")
    if minmax is not None:
        ok = isinstance(minmax, (list, tuple)) and len(minmax) == 2 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in minmax) and 0 < minmax[0] <= minmax[1] <= 1
        if not ok:
            raise PCEError("data.mixup.cutmix_minmax", f"{minmax!r} is not a box size range",
                           "[min, max] fractions of the image side with 0 < min <= max <= 1, or None")
        minmax = [float(v) for v in minmax]
    if mixup_alpha == 0 and cutmix_alpha == 0 and minmax is None:
        return None
    if opts["mode"] not in ("batch", "pair", "elem"):
        raise PCEError("data.mixup.mode", f"{opts['mode']!r} is not a mixup mode", "batch, pair or elem")
    return Mixup(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, cutmix_minmax=minmax, prob=prob,
                 switch_prob=switch, mode=opts["mode"], correct_lam=bool(opts["correct_lam"]),
                 label_smoothing=float(cfg.model.label_smoothing), num_classes=int(cfg.model.num_classes))


class ClassificationLoss:
    """The training loss of a batch, with Mixup / CutMix when configured.

    ``mix(images [B, C, H, W], targets int64 [B])`` gives ``(images, soft targets [B, K] or None)``: the mixed
    images (a copy; the batch itself is left alone) and timm's mixed, smoothed targets, or the inputs unchanged and
    ``None`` without mixup or for an odd batch. ``loss(logits [B, K], targets, soft)`` is
    ``SoftTargetCrossEntropy(logits, soft)`` when ``soft`` is given, else ``cross_entropy(logits, targets,
    label_smoothing)``.
    """

    def __init__(self, mixup: Optional[Mixup] = None, label_smoothing: float = 0.0) -> None:
        self.mixup = mixup
        self.label_smoothing = float(label_smoothing)
        self._soft_ce = SoftTargetCrossEntropy()
        self._warned_odd = False

    def mix(self, images: torch.Tensor, targets: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        if self.mixup is None:
            return images, None
        if images.shape[0] % 2:
            if not self._warned_odd:
                logger.info("data.mixup: a batch of %d images (odd) is trained unmixed (timm's Mixup pairs images; "
                            "data.drop_last=True drops such a last batch)", images.shape[0])
                self._warned_odd = True
            return images, None
        return self.mixup(images.clone(), targets)  # timm mixes in place: keep the loader's batch intact

    def loss(self, logits: torch.Tensor, targets: torch.Tensor, soft: Optional[torch.Tensor] = None) -> torch.Tensor:
        if soft is not None:
            return self._soft_ce(logits, soft.to(logits.dtype))
        return F.cross_entropy(logits, targets, label_smoothing=self.label_smoothing)
