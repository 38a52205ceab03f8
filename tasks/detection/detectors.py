"""torchvision's detectors on a :class:`~pce.tasks.detection.fpn.PCEFPNBackbone`, with PCE's controls.

:class:`PCEFasterRCNN`, :class:`PCEMaskRCNN`, :class:`PCERetinaNet` and :class:`PCEFCOS` are torchvision's
``FasterRCNN`` / ``MaskRCNN`` / ``RetinaNet`` / ``FCOS`` (same arguments, same losses in training, same
detections in eval) plus :class:`PCEDetectorMixin`: ``pce_backbone`` (the
:class:`~pce.models.backbone.PCEBackbone` under the FPN: ``set_keys_trainable``, ``set_router_override``,
``init_keys``, ...), ``size_divisibility``, ``num_classes``, :meth:`~PCEDetectorMixin.preprocess` (what the
backbone sees) and :meth:`~PCEDetectorMixin.init_keys` (K-Means keys from detection batches). Routing leaves
them, as every model, through :func:`pce.record_routing`; the detection task adds the router loss at the tasks'
one loss site. :func:`~pce.tasks.detection.model.build_detector` builds them from a preset name.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

import torch
from torchvision.models.detection import FCOS, FasterRCNN, MaskRCNN, RetinaNet

from pce.models.backbone import PCEBackbone

from .fpn import PCEFPNBackbone

__all__ = ["PCEDetectorMixin", "PCEFasterRCNN", "PCEMaskRCNN", "PCERetinaNet", "PCEFCOS"]


def _check_backbone(cls: type, backbone: Any) -> None:
    if not isinstance(backbone, PCEFPNBackbone):
        raise TypeError(f"{cls.__name__} needs a PCEFPNBackbone (pce.tasks.detection.PCEFPNBackbone(backbone)), "
                        f"got {type(backbone).__name__}")


class PCEDetectorMixin:
    """PCE's controls of a torchvision detector whose ``backbone`` is a :class:`PCEFPNBackbone`."""

    backbone: PCEFPNBackbone
    transform: Any

    @property
    def pce_backbone(self) -> PCEBackbone:
        """The :class:`~pce.models.backbone.PCEBackbone` under the FPN (the object with ``set_keys_trainable`` etc.)."""
        return self.backbone.body

    @property
    def size_divisibility(self) -> int:
        return self.backbone.size_divisibility

    @property
    def predicts_masks(self) -> bool:
        """True for detectors that also predict per-object masks (``"masks"`` in their outputs)."""
        return False

    @torch.no_grad()
    def preprocess(self, images: Union[torch.Tensor, Sequence[torch.Tensor]]) -> torch.Tensor:
        """What the backbone sees: images (list of ``[3, H, W]`` in [0, 1], or a ``[B, 3, H, W]`` batch)
        normalised, resized (``min_size`` / ``max_size``) and padded to ``size_divisibility`` -> ``[B, 3, H', W']``."""
        if isinstance(images, torch.Tensor) and images.dim() == 3:
            images = [images]
        images = [im for im in images]
        if not images:
            raise ValueError("preprocess needs at least one image")
        was_training = self.transform.training
        self.transform.eval()  # deterministic size (the last min_size), no random choice
        try:
            return self.transform(images)[0].tensors
        finally:
            self.transform.train(was_training)

    def init_keys(self, batches: Iterable[Any], seed: int = 0, max_samples: int = 20000) -> int:
        """K-Means initialisation of the router keys from detection batches: each entry is a list of images,
        a ``[B, 3, H, W]`` tensor or an ``(images, targets)`` tuple; images are preprocessed like in forward."""
        device = next(self.parameters()).device  # type: ignore[attr-defined]
        data = []
        for b in batches:
            if isinstance(b, tuple) or (isinstance(b, list) and b and not isinstance(b[0], torch.Tensor)):
                b = b[0]
            if isinstance(b, torch.Tensor) and b.dim() == 4:
                b = list(b)
            data.append(self.preprocess([im.to(device) for im in b]))
        return self.pce_backbone.init_keys(data, seed=seed, max_samples=max_samples)


class PCEFasterRCNN(PCEDetectorMixin, FasterRCNN):
    """torchvision Faster R-CNN on a :class:`PCEFPNBackbone`.

    ``forward(images: list[[3, H, W]], targets)`` in training returns torchvision's loss dict
    (``loss_classifier``, ``loss_box_reg``, ``loss_objectness``, ``loss_rpn_box_reg``);
    in eval it returns ``[{"boxes" [N, 4] xyxy in input pixels, "labels" [N] (1..num_classes-1), "scores" [N]}]``.
    ``num_classes`` counts the background; ``None`` when a ``box_predictor`` is given.
    """

    def __init__(self, backbone: PCEFPNBackbone, num_classes: Optional[int] = None, **kwargs: Any) -> None:
        _check_backbone(type(self), backbone)
        super().__init__(backbone, num_classes=num_classes, **kwargs)
        predictor = self.roi_heads.box_predictor
        self.num_classes = int(num_classes if num_classes is not None else predictor.cls_score.out_features)


class PCEMaskRCNN(PCEDetectorMixin, MaskRCNN):
    """torchvision Mask R-CNN on a :class:`PCEFPNBackbone`: Faster R-CNN's losses plus ``loss_mask`` in training
    (targets need ``"masks"`` uint8 ``[N, H, W]``), detections plus ``"masks"`` ``[N, 1, H, W]`` (probabilities
    in [0, 1], pasted into the input image) in eval."""

    def __init__(self, backbone: PCEFPNBackbone, num_classes: Optional[int] = None, **kwargs: Any) -> None:
        _check_backbone(type(self), backbone)
        super().__init__(backbone, num_classes=num_classes, **kwargs)
        predictor = self.roi_heads.box_predictor
        self.num_classes = int(num_classes if num_classes is not None else predictor.cls_score.out_features)

    @property
    def predicts_masks(self) -> bool:
        return True


class _NoBackgroundMixin:
    """One-stage detectors score every class with a sigmoid, label 0 included; here ``num_classes`` counts the
    background as for the R-CNNs and label 0 is never a detection: its logits are ``-inf`` before torchvision's
    post-processing (score 0, below any ``score_thresh``). In training, class 0 is never a positive."""

    def postprocess_detections(self, head_outputs: Dict[str, List[torch.Tensor]], *args: Any) -> Any:
        logits = [torch.cat([torch.full_like(x[..., :1], float("-inf")), x[..., 1:]], dim=-1)
                  for x in head_outputs["cls_logits"]]
        return super().postprocess_detections({**head_outputs, "cls_logits": logits}, *args)  # type: ignore[misc]


class PCERetinaNet(_NoBackgroundMixin, PCEDetectorMixin, RetinaNet):
    """torchvision RetinaNet on a :class:`PCEFPNBackbone` (usually with ``LastLevelP6P7``): ``classification`` and
    ``bbox_regression`` losses in training, detections in eval. ``num_classes`` counts the background, whose label
    0 is never predicted (as the R-CNNs)."""

    def __init__(self, backbone: PCEFPNBackbone, num_classes: int, **kwargs: Any) -> None:
        _check_backbone(type(self), backbone)
        super().__init__(backbone, num_classes=num_classes, **kwargs)
        self.num_classes = int(num_classes)


class PCEFCOS(_NoBackgroundMixin, PCEDetectorMixin, FCOS):
    """torchvision FCOS on a :class:`PCEFPNBackbone`: ``classification``, ``bbox_regression`` and
    ``bbox_ctrness`` losses in training, detections in eval; ``num_classes`` as in :class:`PCERetinaNet`."""

    def __init__(self, backbone: PCEFPNBackbone, num_classes: int, **kwargs: Any) -> None:
        _check_backbone(type(self), backbone)
        super().__init__(backbone, num_classes=num_classes, **kwargs)
        self.num_classes = int(num_classes)
