"""Detectors on a PCE (or dense) backbone + FPN: :func:`build_detector` builds one from a preset name.

>>> model = build_detector("pce_tiny", num_classes=21, min_size=256, max_size=256)     # Faster R-CNN
>>> model = build_detector("pce_tiny", num_classes=21, arch="retinanet")               # or "fcos", "mask_rcnn"
>>> losses = model(images, targets)          # training: torchvision's losses
>>> model.eval(); detections = model(images) # list of {"boxes", "labels", "scores"} (+ "masks": Mask R-CNN)

Pieces (each in its own module, all re-exported here and by :mod:`pce.tasks.detection`):

* :class:`~pce.tasks.detection.fpn.PCEFPNBackbone` -- the backbone (``.body``, a
  :class:`~pce.models.backbone.PCEBackbone`) plus torchvision's :class:`~torchvision.ops.FeaturePyramidNetwork`
  and an extra block (``LastLevelMaxPool``: "pool"; ``LastLevelP6P7``: "p6", "p7"). Its output is an
  ``OrderedDict`` ``'0' .. 'N-1'`` (+ the extra levels) of ``out_channels`` maps, named as torchvision's
  ``BackboneWithFPN`` names them, so torchvision's detectors work on it with their defaults too.
* :mod:`~pce.tasks.detection.detectors` -- :class:`PCEFasterRCNN`, :class:`PCEMaskRCNN`, :class:`PCERetinaNet`,
  :class:`PCEFCOS`: torchvision's detectors plus PCE's controls (``pce_backbone``, ``preprocess``, ``init_keys``).
* :mod:`~pce.tasks.detection.heads` -- :data:`DETECTION_HEADS`: per ``arch``, the detector class, its RoI pools /
  heads, FPN levels and default anchors.
* :func:`build_detector` -- derives the anchors, the RoIAlign feature names and the batching of the transform
  from the backbone's ``feature_info`` and ``size_divisibility``.

Where the PCE controls live: ``model.pce_backbone`` is the :class:`~pce.models.backbone.PCEBackbone`
(``set_keys_trainable``, ``set_router_override``, ``set_attention_enabled``, ``init_keys``, ...); the engine's
phase controller finds it through ``model.modules()`` (:func:`pce.iter_backbones`). Detection batches are
lists of variable-size images: ``model.preprocess`` turns them into the normalised, padded tensor the backbone
sees (use it to build the K-Means batches for ``init_keys``; ``model.init_keys`` accepts image lists directly).

Anchors (Faster / Mask R-CNN): one size per pyramid level, ``anchor_scale * stride`` (default ``anchor_scale=8``:
32, 64, 128, 256, 512 px at strides 4, 8, 16, 32 and the pool level's 64 -- torchvision's / Detectron's FPN
anchors), with the aspect ratios ``(0.5, 1.0, 2.0)`` at every level; RetinaNet and FCOS defaults are in
:mod:`~pce.tasks.detection.heads`. ``anchor_sizes`` overrides them (one int or tuple per level, extra levels
included).
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence, Tuple, Union

from torch import nn
from torchvision.models.detection.anchor_utils import AnchorGenerator

from pce.models.backbone import PCEBackbone
from pce.models.presets import backbone_config

from .detectors import PCEDetectorMixin, PCEFasterRCNN, PCEFCOS, PCEMaskRCNN, PCERetinaNet
from .fpn import PCEFPNBackbone, StageRef, resolve_stages
from .heads import DEFAULT_ASPECT_RATIOS, DETECTION_HEADS

__all__ = ["PCEFPNBackbone", "PCEDetectorMixin", "PCEFasterRCNN", "PCEMaskRCNN", "PCERetinaNet", "PCEFCOS",
           "DETECTION_HEADS", "build_detector", "default_anchor_sizes", "DEFAULT_ASPECT_RATIOS", "IMAGENET_MEAN",
           "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def default_anchor_sizes(strides: Sequence[int], anchor_scale: float = 8.0,
                         scales_per_octave: int = 1) -> Tuple[Tuple[int, ...], ...]:
    """Anchor sizes per level: ``int(x * 2 ** (k / scales_per_octave))`` with ``x = round(anchor_scale * stride)``
    for ``k = 0 .. scales_per_octave - 1`` (torchvision's RetinaNet rule; one size ``x`` per level by default), as
    tuples (AnchorGenerator's format)."""
    if anchor_scale <= 0:
        raise ValueError(f"anchor_scale must be > 0, got {anchor_scale}")
    if not isinstance(scales_per_octave, int) or scales_per_octave < 1:
        raise ValueError(f"scales_per_octave must be a positive integer, got {scales_per_octave!r}")
    bases = [max(1, int(round(anchor_scale * s))) for s in strides]
    return tuple(tuple(int(b * 2 ** (k / scales_per_octave)) for k in range(scales_per_octave)) for b in bases)


def _normalize_anchor_sizes(anchor_sizes: Sequence[Any], num_levels: int, names: Sequence[str]) -> Tuple[Tuple[int, ...], ...]:
    sizes = tuple(tuple(s) if isinstance(s, (list, tuple)) else (s,) for s in anchor_sizes)
    if len(sizes) != num_levels:
        raise ValueError(f"anchor_sizes needs one entry per feature map ({num_levels}: {list(names)}), "
                         f"got {len(sizes)}: {anchor_sizes}")
    for s in sizes:
        if not s or any((not isinstance(v, (int, float))) or v <= 0 for v in s):
            raise ValueError(f"anchor sizes must be positive numbers, got {anchor_sizes}")
    return sizes


def _detector_body(backbone: str, backbone_overrides: Optional[Mapping[str, Any]],
                   returned_stages: Optional[Sequence[StageRef]],
                   head_stages: Optional[Sequence[int]] = None) -> PCEBackbone:
    """The backbone body, built up to the last returned stage and returning exactly the FPN's stages
    (``returned_stages``; else ``backbone_overrides["out_indices"]``; else the head's default ``head_stages``;
    else all)."""
    cfg = backbone_config(backbone, **dict(backbone_overrides or {}))
    if returned_stages is not None and cfg.get("out_indices") is not None:
        raise ValueError("give returned_stages or backbone_overrides['out_indices'], not both")
    if returned_stages is None and cfg.get("out_indices") is None:
        returned_stages = head_stages
    if returned_stages is not None:
        info = [{"name": f"stage{i + 1}"} for i in range(len(cfg["stages"]))]
        idx = resolve_stages(info, returned_stages)
        cfg["stages"] = list(cfg["stages"])[: max(idx) + 1]
        cfg["out_indices"] = idx
    return PCEBackbone(**cfg)


def _anchor_generator(fpn: PCEFPNBackbone, head: Any, anchor_sizes: Optional[Sequence[Any]],
                      anchor_scale: Optional[float], aspect_ratios: Optional[Sequence[float]]) -> AnchorGenerator:
    """The head's default anchors on the FPN's levels, or ``anchor_sizes`` (one entry per level)."""
    names = [f["name"] for f in fpn.feature_info]
    if anchor_sizes is None:
        scale = head.anchor_scale if anchor_scale is None else anchor_scale
        sizes = default_anchor_sizes([f["stride"] for f in fpn.feature_info], scale, head.scales_per_octave)
    else:
        sizes = _normalize_anchor_sizes(anchor_sizes, len(names), names)
    ratios = tuple(float(r) for r in (head.aspect_ratios if aspect_ratios is None else aspect_ratios))
    if not ratios or any(r <= 0 for r in ratios):
        raise ValueError(f"aspect_ratios must be positive, got {aspect_ratios}")
    return AnchorGenerator(sizes=sizes, aspect_ratios=(ratios,) * len(sizes))


def build_detector(backbone: str = "pce_tiny", num_classes: int = 21,
                   backbone_overrides: Optional[Mapping[str, Any]] = None, arch: str = "faster_rcnn",
                   fpn_channels: int = 256, returned_stages: Optional[Sequence[StageRef]] = None,
                   min_size: Union[int, Sequence[int]] = 600, max_size: int = 1000,
                   anchor_sizes: Optional[Sequence[Any]] = None, anchor_scale: Optional[float] = None,
                   aspect_ratios: Optional[Sequence[float]] = None,
                   image_mean: Sequence[float] = IMAGENET_MEAN, image_std: Sequence[float] = IMAGENET_STD,
                   **kwargs: Any) -> nn.Module:
    """A torchvision detector + FPN on a backbone preset (:func:`pce.build_backbone` name, ``pce_*`` or ``dense_*``).

    Args:
        backbone: preset name; ``backbone_overrides``: its :class:`~pce.models.backbone.PCEBackbone` overrides
            (``router="gate"``, ``num_experts=3``, ...).
        num_classes: classes including background.
        arch: the head, a :data:`~pce.tasks.detection.heads.DETECTION_HEADS` name: ``"faster_rcnn"``
            (:class:`PCEFasterRCNN`), ``"mask_rcnn"`` (:class:`PCEMaskRCNN`), ``"retinanet"``
            (:class:`PCERetinaNet`), ``"fcos"`` (:class:`PCEFCOS`).
        fpn_channels: channels of every FPN level.
        returned_stages: stages feeding the FPN (names or indices; default: the head's, see
            :mod:`~pce.tasks.detection.heads`). Stages after the last returned one are not built.
        min_size, max_size: torchvision's resize rule (shorter side to ``min_size``, longer side at most
            ``max_size``); images are padded to the backbone's ``size_divisibility``.
        anchor_sizes: one size (or tuple of sizes) per FPN level, extra levels included; default the head's
            (``anchor_scale * stride`` per level for Faster / Mask R-CNN, see the module doc). ``aspect_ratios``
            apply to every level.
        image_mean, image_std: normalisation of the [0, 1] input images.
        **kwargs: the head's options (Faster / Mask R-CNN: ``extra_pool``, ``roi_output_size``,
            ``roi_sampling_ratio``, ``representation_size``; Mask R-CNN also ``mask_roi_output_size``,
            ``mask_layers``) and any other argument of the torchvision detector (``box_score_thresh``,
            ``rpn_batch_size_per_image``, ``score_thresh``, ``topk_candidates``, ...).
    """
    head = DETECTION_HEADS.get(arch)
    options, model_kwargs = head.split_options(kwargs)
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
        raise ValueError(f"num_classes counts the background too and must be >= 2, got {num_classes!r}")
    body = _detector_body(backbone, backbone_overrides, returned_stages, head.stages)
    fpn = PCEFPNBackbone(body, None, fpn_channels=fpn_channels, extra_blocks=head.extra_blocks(fpn_channels, options),
                         extra_pool=False)
    anchors = _anchor_generator(fpn, head, anchor_sizes, anchor_scale, aspect_ratios)
    return head.model_cls(fpn, min_size=min_size, max_size=max_size, image_mean=list(image_mean),
                          image_std=list(image_std), size_divisible=int(body.size_divisibility),
                          **{head.anchor_arg: anchors}, **head.parts(fpn, num_classes, options), **model_kwargs)
