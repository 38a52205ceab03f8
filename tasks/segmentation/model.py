"""Semantic-segmentation model: an smp decoder (FPN, Unet, DeepLabV3Plus, ...) on a PCE encoder.

>>> model = build_segmentation_model("FPN", "pce_tiny", num_classes=21, encoder_overrides={"router": "gate"})
>>> logits = model(images)                      # [B, 21, H, W] for any H, W (padded, then cropped back)
>>> losses = model.losses(images, masks)        # {"loss_ce", ["loss_dice", "loss_lovasz"]}
>>> labels = model.predict(images, mode="slide", window=512, stride=341)   # [B, H, W]

Every term is already weighted. Routing leaves the model through :func:`pce.record_routing`; the segmentation
task adds ``loss_router`` at the tasks' one loss site (:class:`pce.tasks.common.RouterLossMixin`).
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from pce.models.backbone import PCEBackbone

from .encoders import PCEEncoder, create_smp_model

__all__ = ["SegmentationModel", "build_segmentation_model"]

Size2 = Union[int, Sequence[int]]


def _pair(v: Size2, what: str) -> Tuple[int, int]:
    if isinstance(v, int):
        v = (v, v)
    v = tuple(int(a) for a in v)
    if len(v) != 2 or min(v) < 1:
        raise ValueError(f"{what} must be a positive int or (h, w), got {v}")
    return v  # type: ignore[return-value]


def _window_starts(size: int, window: int, stride: int) -> List[int]:
    """Start offsets of windows of ``window`` pixels every ``stride`` pixels covering ``[0, size)``; the last
    window ends at ``size``."""
    if window >= size:
        return [0]
    starts = list(range(0, size - window + 1, stride))
    if starts[-1] + window < size:
        starts.append(size - window)
    return starts


class SegmentationModel(nn.Module):
    """Wraps an smp segmentation model (``net``) for training and inference on images of any size.

    Args:
        net: an smp model (``encoder`` / ``decoder`` / ``segmentation_head``) returning logits.
        num_classes: K, the logit channels.
        ignore_index: target value excluded from every loss (VOC: 255).
        ce_weight, dice_weight, lovasz_weight: weights of cross-entropy, smp ``DiceLoss`` and ``LovaszLoss``
            (multiclass, on logits, ``ignore_index`` honoured); a 0 weight leaves the term out.
        class_weights: optional per-class weights of the cross-entropy.
        label_smoothing: of the cross-entropy.
        size_divisibility: inputs are zero-padded (bottom / right) to a multiple of this; default: the least
            common multiple of the encoder's requirement (``PCEBackbone.size_divisibility``) and the decoder's
            (smp's ``encoder.output_stride``, e.g. 32 for FPN / Unet, 16 for DeepLabV3Plus at output stride 16).
    """

    def __init__(self, net: nn.Module, num_classes: int, ignore_index: int = 255,
                 ce_weight: float = 1.0, dice_weight: float = 0.0, lovasz_weight: float = 0.0,
                 class_weights: Optional[Sequence[float]] = None, label_smoothing: float = 0.0,
                 size_divisibility: Optional[int] = None) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.net = net
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.ce_weight, self.dice_weight, self.lovasz_weight = float(ce_weight), float(dice_weight), float(lovasz_weight)
        self.label_smoothing = float(label_smoothing)
        if class_weights is not None:
            cw = torch.as_tensor(class_weights, dtype=torch.float32)
            if cw.shape != (num_classes,):
                raise ValueError(f"class_weights needs {num_classes} entries, got shape {tuple(cw.shape)}")
            self.register_buffer("class_weights", cw, persistent=False)
        else:
            self.class_weights = None
        self.dice = self.lovasz = None
        if self.dice_weight:
            from segmentation_models_pytorch.losses import DiceLoss
            self.dice = DiceLoss("multiclass", from_logits=True, ignore_index=self.ignore_index)
        if self.lovasz_weight:
            from segmentation_models_pytorch.losses import LovaszLoss
            self.lovasz = LovaszLoss("multiclass", ignore_index=self.ignore_index)
        if size_divisibility is None:
            enc = net.encoder
            enc_req = int(getattr(enc, "size_divisibility", 1))
            dec_req = int(enc.output_stride) if getattr(net, "requires_divisible_input_shape", True) else 1
            size_divisibility = math.lcm(enc_req, dec_req)
        if int(size_divisibility) < 1:
            raise ValueError(f"size_divisibility must be >= 1, got {size_divisibility}")
        self.size_divisibility = int(size_divisibility)

    # -- PCE access --------------------------------------------------------------------------------------------
    @property
    def encoder(self) -> nn.Module:
        return self.net.encoder

    @property
    def backbone(self) -> Optional[PCEBackbone]:
        """The PCE backbone inside the encoder (``None`` for non-PCE encoders)."""
        return self.net.encoder.backbone if isinstance(self.net.encoder, PCEEncoder) else None

    # -- forward -------------------------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W] -> logits [B, K, H, W]`` for any ``H, W``: zero-padded to ``size_divisibility``,
        logits cropped back."""
        if images.dim() != 4:
            raise ValueError(f"expected images [B, C, H, W], got {tuple(images.shape)}")
        H, W = images.shape[-2:]
        d = self.size_divisibility
        ph, pw = (-H) % d, (-W) % d
        x = F.pad(images, (0, pw, 0, ph)) if (ph or pw) else images
        logits = self.net(x)
        if ph or pw:
            logits = logits[..., :H, :W]
        return logits

    def losses(self, images: torch.Tensor, masks: torch.Tensor, return_logits: bool = False):
        """Weighted losses of one forward: ``{"loss_ce", ["loss_dice"], ["loss_lovasz"]}``
        (``masks [B, H, W]`` int labels, ``ignore_index`` ignored). With ``return_logits``: ``(losses, logits)``."""
        logits = self(images)
        out = self.loss_terms(logits, masks)
        return (out, logits) if return_logits else out

    def loss_terms(self, logits: torch.Tensor, masks: torch.Tensor) -> Dict[str, torch.Tensor]:
        """The losses of :meth:`losses` from logits already computed (e.g. by a DDP-wrapped forward)."""
        if masks.dim() == 4 and masks.shape[1] == 1:
            masks = masks[:, 0]
        if masks.shape != (logits.shape[0], *logits.shape[2:]):
            raise ValueError(f"masks must be [B, H, W] = {(logits.shape[0], *logits.shape[2:])}, "
                             f"got {tuple(masks.shape)}")
        masks = masks.to(logits.device).long()
        logits = logits.float()
        out: Dict[str, torch.Tensor] = {}
        if self.ce_weight:
            out["loss_ce"] = self.ce_weight * self._cross_entropy(logits, masks)
        if self.dice is not None:
            out["loss_dice"] = self.dice_weight * self.dice(logits, masks)
        if self.lovasz is not None:
            out["loss_lovasz"] = self.lovasz_weight * self.lovasz(logits, masks)
        return out

    def _cross_entropy(self, logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Mean over non-ignored pixels (weighted mean with class weights); 0, not NaN, when all are ignored."""
        valid = masks != self.ignore_index
        total = F.cross_entropy(logits, masks, weight=self.class_weights, ignore_index=self.ignore_index,
                                reduction="sum", label_smoothing=self.label_smoothing)
        if self.class_weights is None:
            denom = valid.sum()
        else:
            denom = (self.class_weights[masks.clamp(0, self.num_classes - 1)] * valid).sum()
        return total / denom.clamp_min(1e-12 if self.class_weights is not None else 1)

    # -- inference -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def predict_logits(self, images: torch.Tensor, mode: str = "whole", window: Optional[Size2] = None,
                       stride: Optional[Size2] = None) -> torch.Tensor:
        """Logits ``[B, K, H, W]`` in eval mode (the previous mode is restored).

        ``mode="whole"``: one forward of the whole image. ``mode="slide"``: windows of ``window`` pixels (int or
        ``(h, w)``, clipped to the image) every ``stride`` pixels (default: two thirds of the window), the last
        window of each row / column flush with the image border; overlapping logits are averaged. Windows run
        one at a time (a batch of the ``B`` images each), so the result does not depend on the window count.
        """
        was_training = self.training
        self.eval()
        try:
            if mode == "whole":
                return self(images)
            if mode != "slide":
                raise ValueError(f"mode must be 'whole' or 'slide', got {mode!r}")
            if window is None:
                raise ValueError("mode='slide' needs window=")
            H, W = images.shape[-2:]
            wh, ww = _pair(window, "window")
            wh, ww = min(wh, H), min(ww, W)
            sh, sw = _pair(stride, "stride") if stride is not None else (max(1, -(-2 * wh // 3)), max(1, -(-2 * ww // 3)))
            ys, xs = _window_starts(H, wh, sh), _window_starts(W, ww, sw)
            if len(ys) == 1 and len(xs) == 1:
                return self(images)
            total = images.new_zeros((images.shape[0], self.num_classes, H, W), dtype=torch.float32)
            count = images.new_zeros((1, 1, H, W), dtype=torch.float32)
            for y in ys:
                for x in xs:
                    total[..., y:y + wh, x:x + ww] += self(images[..., y:y + wh, x:x + ww]).float()
                    count[..., y:y + wh, x:x + ww] += 1
            return total / count
        finally:
            self.train(was_training)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, mode: str = "whole", window: Optional[Size2] = None,
                stride: Optional[Size2] = None) -> torch.Tensor:
        """Label maps ``[B, H, W]`` (int64): argmax of :meth:`predict_logits`."""
        return self.predict_logits(images, mode=mode, window=window, stride=stride).argmax(1)


def build_segmentation_model(arch: str = "FPN", encoder: str = "pce_tiny", num_classes: int = 21,
                             encoder_overrides: Optional[Mapping[str, Any]] = None, *, ignore_index: int = 255,
                             ce_weight: float = 1.0, dice_weight: float = 0.0, lovasz_weight: float = 0.0,
                             class_weights: Optional[Sequence[float]] = None, label_smoothing: float = 0.0,
                             size_divisibility: Optional[int] = None, **decoder_kwargs: Any) -> SegmentationModel:
    """An smp ``arch`` (``"FPN"``, ``"Unet"``, ``"DeepLabV3Plus"``, ...) on ``encoder`` (a PCE preset such as
    ``"pce_tiny"`` / ``"dense_tiny"``, or any smp encoder) with ``num_classes`` outputs.

    ``encoder_overrides``: backbone options of the PCE preset (``router``, ``num_experts``, ``top_k``, ...).
    ``decoder_kwargs`` go to ``smp.create_model`` (``encoder_depth``, ``decoder_channels``,
    ``encoder_output_stride``, ``in_channels``, ...); ``encoder_weights`` defaults to ``None`` (PCE encoders
    have no pretrained weights). The loss options are those of :class:`SegmentationModel`.
    """
    if "classes" in decoder_kwargs:
        raise TypeError("pass num_classes=, not classes=")
    if decoder_kwargs.get("activation") is not None:
        raise ValueError("SegmentationModel works on logits: leave activation=None")
    if decoder_kwargs.get("aux_params") is not None:
        raise ValueError("aux_params (smp's classification head) is not supported by SegmentationModel")
    net = create_smp_model(arch, encoder, encoder_overrides, classes=num_classes, **decoder_kwargs)
    return SegmentationModel(net, num_classes, ignore_index=ignore_index,
                             ce_weight=ce_weight, dice_weight=dice_weight, lovasz_weight=lovasz_weight,
                             class_weights=class_weights, label_smoothing=label_smoothing,
                             size_divisibility=size_divisibility)
