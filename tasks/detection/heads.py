"""The detection heads :func:`~pce.tasks.detection.model.build_detector` can put on a PCE backbone + FPN: one
:class:`DetectionHead` per torchvision detector, registered in :data:`DETECTION_HEADS` under the name a config
gives as ``model.head.arch``.

* ``faster_rcnn``: :class:`PCEFasterRCNN`; FPN on every stage + "pool"; anchors ``8 * stride``, ratios 0.5 / 1 / 2.
* ``mask_rcnn``: :class:`PCEMaskRCNN`; as Faster R-CNN, plus a mask head on 14 x 14 RoIs.
* ``retinanet``: :class:`PCERetinaNet`; FPN on the last 3 stages + "p6", "p7"; anchors ``4 * stride * 2^(k/3)``,
  k = 0, 1, 2, ratios 0.5 / 1 / 2.
* ``fcos``: :class:`PCEFCOS`; FPN as RetinaNet; one point per location (anchor ``stride``); its head has
  ``GroupNorm(32)``, so ``fpn_channels`` is a multiple of 32.

These are torchvision's own choices for its ResNet-50-FPN models (Faster / Mask R-CNN: C2-C5 + max pool, anchors
32 .. 512; RetinaNet, FCOS: C3-C5 + ``LastLevelP6P7``, anchors 32 .. 512 with three octave scales / 8 .. 128),
written per stride so they follow the backbone. A new head is one :class:`DetectionHead` plus one
``DETECTION_HEADS.register("name", ...)`` line.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool, LastLevelP6P7

from pce.registry import Registry

from .detectors import PCEFasterRCNN, PCEFCOS, PCEMaskRCNN, PCERetinaNet
from .fpn import PCEFPNBackbone

__all__ = ["DetectionHead", "DETECTION_HEADS", "DEFAULT_ASPECT_RATIOS"]

DEFAULT_ASPECT_RATIOS = (0.5, 1.0, 2.0)
_TRANSFORM_ARGS = {"min_size", "max_size", "image_mean", "image_std", "size_divisible", "fixed_size"}

#: name -> :class:`DetectionHead`; ``model.head.arch`` in a detection config
DETECTION_HEADS = Registry("detection head")


@dataclass(frozen=True)
class DetectionHead:
    """How :func:`~pce.tasks.detection.model.build_detector` builds one torchvision detector.

    Attributes:
        model_cls: the detector class (a torchvision detector with :class:`PCEDetectorMixin`).
        parts: ``(fpn, num_classes, options) -> constructor keyword arguments`` (RoI pools, heads, predictors).
        options: this head's own options with their defaults (popped from the user's keywords; the rest go to
            ``model_cls``).
        derived: constructor arguments ``parts`` / ``build_detector`` set, which the user may not pass.
        anchor_arg: the constructor argument of the anchor generator.
        extra_blocks: ``(fpn_channels, options) -> ExtraFPNBlock or None``.
        stages: default FPN stages (``None``: all); anchor_scale, scales_per_octave, aspect_ratios: default anchors
            (:func:`~pce.tasks.detection.model.default_anchor_sizes`).
    """

    model_cls: type
    parts: Callable[[PCEFPNBackbone, int, Dict[str, Any]], Dict[str, Any]]
    options: Mapping[str, Any] = field(default_factory=dict)
    derived: Tuple[str, ...] = ()
    anchor_arg: str = "anchor_generator"
    extra_blocks: Callable[[int, Dict[str, Any]], Optional[ExtraFPNBlock]] = lambda c, o: None
    stages: Optional[Tuple[int, ...]] = None
    anchor_scale: float = 8.0
    scales_per_octave: int = 1
    aspect_ratios: Tuple[float, ...] = DEFAULT_ASPECT_RATIOS

    @property
    def torchvision_cls(self) -> type:
        """The torchvision detector ``model_cls`` extends."""
        return next(c for c in self.model_cls.__mro__ if c.__module__.startswith("torchvision."))

    def model_args(self) -> set:
        """Keyword arguments the user may give the detector class itself (its own and its transform's)."""
        own = set(inspect.signature(self.torchvision_cls.__init__).parameters) - {"self", "backbone", "num_classes",
                                                                                    "kwargs"}
        return (own | _TRANSFORM_ARGS) - set(self.derived) - {self.anchor_arg, "size_divisible"}

    def split_options(self, kwargs: Mapping[str, Any]) -> Tuple[Dict[str, Any], Dict[str, Any]]:
        """``(head options with defaults, detector keyword arguments)``; ``TypeError`` for a derived or unknown
        keyword, naming the valid ones."""
        for k in (*self.derived, self.anchor_arg, "size_divisible"):
            if k in kwargs:
                raise TypeError(f"build_detector derives {k!r} from the backbone; use "
                                f"{sorted(self.options) + ['anchor_sizes', 'aspect_ratios']} instead, or build "
                                f"{self.model_cls.__name__} yourself")
        options = {k: kwargs.get(k, v) for k, v in self.options.items()}
        rest = {k: v for k, v in kwargs.items() if k not in self.options}
        unknown = set(rest) - self.model_args()
        if unknown:
            raise TypeError(f"unknown detector option(s) {sorted(unknown)}; valid options of this head: "
                            f"{sorted(self.options)} and the {self.torchvision_cls.__name__} options "
                            f"{sorted(self.model_args())}")
        return options, rest


def _roi_pool(fpn: PCEFPNBackbone, size: int, sampling_ratio: int) -> MultiScaleRoIAlign:
    return MultiScaleRoIAlign(featmap_names=fpn.featmap_names, output_size=size, sampling_ratio=sampling_ratio)


def _box_parts(fpn: PCEFPNBackbone, num_classes: int, o: Dict[str, Any]) -> Dict[str, Any]:
    """Faster R-CNN's RoIAlign (stage levels only), two-layer MLP box head and predictor."""
    size, rep = int(o["roi_output_size"]), int(o["representation_size"])
    return {"num_classes": None, "box_roi_pool": _roi_pool(fpn, size, int(o["roi_sampling_ratio"])),
            "box_head": TwoMLPHead(fpn.out_channels * size ** 2, rep),
            "box_predictor": FastRCNNPredictor(rep, num_classes)}


def _mask_parts(fpn: PCEFPNBackbone, num_classes: int, o: Dict[str, Any]) -> Dict[str, Any]:
    """Faster R-CNN's parts plus Mask R-CNN's RoIAlign, convolutional mask head and predictor."""
    layers = tuple(int(c) for c in o["mask_layers"])
    if not layers or min(layers) < 1:
        raise ValueError(f"mask_layers must be a non-empty list of channel counts, got {o['mask_layers']!r}")
    return {**_box_parts(fpn, num_classes, o),
            "mask_roi_pool": _roi_pool(fpn, int(o["mask_roi_output_size"]), int(o["roi_sampling_ratio"])),
            "mask_head": MaskRCNNHeads(fpn.out_channels, layers, 1),
            "mask_predictor": MaskRCNNPredictor(layers[-1], layers[-1], num_classes)}


def _dense_parts(fpn: PCEFPNBackbone, num_classes: int, o: Dict[str, Any]) -> Dict[str, Any]:
    """One-stage heads: torchvision builds its own head from ``out_channels`` and the anchors."""
    return {"num_classes": num_classes}


def _max_pool(channels: int, o: Dict[str, Any]) -> Optional[ExtraFPNBlock]:
    return LastLevelMaxPool() if o["extra_pool"] else None


def _p6p7(channels: int, o: Dict[str, Any]) -> ExtraFPNBlock:
    return LastLevelP6P7(channels, channels)  # from P5 (in == out channels), as torchvision's v2 models


_RCNN_OPTIONS = {"extra_pool": True, "roi_output_size": 7, "roi_sampling_ratio": 2, "representation_size": 1024}
_RCNN_DERIVED = ("box_roi_pool", "box_head", "box_predictor")

DETECTION_HEADS.register("faster_rcnn", DetectionHead(
    PCEFasterRCNN, _box_parts, _RCNN_OPTIONS, _RCNN_DERIVED, "rpn_anchor_generator", _max_pool))
DETECTION_HEADS.register("mask_rcnn", DetectionHead(
    PCEMaskRCNN, _mask_parts, {**_RCNN_OPTIONS, "mask_roi_output_size": 14, "mask_layers": (256, 256, 256, 256)},
    _RCNN_DERIVED + ("mask_roi_pool", "mask_head", "mask_predictor"), "rpn_anchor_generator", _max_pool))
DETECTION_HEADS.register("retinanet", DetectionHead(
    PCERetinaNet, _dense_parts, {}, ("head",), "anchor_generator", _p6p7, stages=(-3, -2, -1), anchor_scale=4.0,
    scales_per_octave=3))
DETECTION_HEADS.register("fcos", DetectionHead(
    PCEFCOS, _dense_parts, {}, ("head",), "anchor_generator", _p6p7, stages=(-3, -2, -1), anchor_scale=1.0,
    aspect_ratios=(1.0,)))
