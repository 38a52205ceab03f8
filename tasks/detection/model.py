"""Faster R-CNN + FPN on a PCE (or dense) backbone.

>>> model = build_detector("pce_tiny", num_classes=21, min_size=256, max_size=256)
>>> losses = model(images, targets)          # training: torchvision's losses
>>> model.eval(); detections = model(images) # list of {"boxes", "labels", "scores"}

Pieces:

* :class:`PCEFPNBackbone` -- the backbone (``.body``, a :class:`~pce.models.backbone.PCEBackbone`) plus torchvision's
  :class:`~torchvision.ops.FeaturePyramidNetwork` with a ``LastLevelMaxPool`` level ("pool"). Its output is an
  ``OrderedDict`` ``stage1 .. stageN, pool`` of ``out_channels`` maps.
* :class:`PCEFasterRCNN` -- a :class:`torchvision.models.detection.FasterRCNN` on it: torchvision's losses in
  training, detections in eval. Routing leaves it, as every model, through :func:`pce.record_routing`; the
  detection task adds the router loss at the tasks' one loss site.
* :func:`build_detector` -- derives the anchors, the RoIAlign feature names and the batching of the
  transform from the backbone's ``feature_info`` and ``size_divisibility``.

Where the PCE controls live: ``model.pce_backbone`` is the :class:`~pce.models.backbone.PCEBackbone`
(``set_keys_trainable``, ``set_router_override``, ``set_attention_enabled``, ``init_keys``, ...); the engine's
phase controller finds it through ``model.modules()`` (:func:`pce.iter_backbones`). Detection batches are
lists of variable-size images: :meth:`PCEFasterRCNN.preprocess` turns them into the normalised, padded tensor
the backbone sees (use it to build the K-Means batches for ``init_keys``; :meth:`PCEFasterRCNN.init_keys`
accepts image lists directly).

Anchors: one size per pyramid level, ``anchor_scale * stride`` (default ``anchor_scale=8``: 32, 64, 128, 256,
512 px at strides 4, 8, 16, 32 and the pool level's 64 -- torchvision's / Detectron's FPN anchors), with the
aspect ratios ``(0.5, 1.0, 2.0)`` at every level. ``anchor_sizes`` overrides them (one int or tuple per level,
the pool level included).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn
import inspect

from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

from pce.models.backbone import PCEBackbone
from pce.models.presets import backbone_config

__all__ = ["PCEFPNBackbone", "PCEFasterRCNN", "build_detector", "default_anchor_sizes",
           "DEFAULT_ASPECT_RATIOS", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_ASPECT_RATIOS = (0.5, 1.0, 2.0)
POOL_NAME = "pool"

StageRef = Union[int, str]


def _resolve_stages(feature_info: Sequence[Mapping[str, Any]], returned: Optional[Sequence[StageRef]]) -> List[int]:
    """Indices into ``feature_info`` of the returned stages (names like ``"stage2"`` or 0-based indices)."""
    names = [f["name"] for f in feature_info]
    if returned is None:
        return list(range(len(names)))
    if isinstance(returned, (str, int)):
        returned = [returned]
    out: List[int] = []
    for r in returned:
        if isinstance(r, str):
            if r not in names:
                raise ValueError(f"returned stage {r!r} is not a backbone feature map; available: {names}")
            idx = names.index(r)
        elif isinstance(r, int) and not isinstance(r, bool):
            if not -len(names) <= r < len(names):
                raise ValueError(f"returned stage index {r} out of range for {len(names)} feature maps {names}")
            idx = r % len(names)
        else:
            raise TypeError(f"returned stages are names or integer indices, got {r!r}")
        if idx in out:
            raise ValueError(f"returned stage {names[idx]!r} given twice")
        out.append(idx)
    if not out:
        raise ValueError("returned_stages must name at least one feature map")
    if out != sorted(out):
        raise ValueError(f"returned stages must go from fine to coarse (increasing stride), got {list(returned)}")
    return out


class PCEFPNBackbone(nn.Module):
    """A :class:`~pce.models.backbone.PCEBackbone` (``body``) + torchvision FPN (+ ``LastLevelMaxPool``).

    Args:
        body: the PCE (or dense) backbone.
        returned_stages: the body's maps that feed the FPN (names or indices into ``body.feature_info``;
            default all), fine to coarse.
        fpn_channels: channels of every output map (``out_channels``).
        extra_pool: add torchvision's max-pooled ``"pool"`` level (stride ``2 x`` the coarsest stride).

    ``forward(x [B, 3, H, W])`` -> ``OrderedDict`` of ``[B, fpn_channels, H / s, W / s]`` maps named like the
    body's stages, plus ``"pool"``. ``feature_info`` lists ``name`` / ``channels`` / ``stride`` of each output
    map; ``featmap_names`` the names without the pool level (the ones RoIAlign uses).
    """

    def __init__(self, body: PCEBackbone, returned_stages: Optional[Sequence[StageRef]] = None,
                 fpn_channels: int = 256, extra_pool: bool = True) -> None:
        super().__init__()
        if not isinstance(fpn_channels, int) or fpn_channels < 1:
            raise ValueError(f"fpn_channels must be a positive integer, got {fpn_channels!r}")
        self.body = body
        idx = _resolve_stages(body.feature_info, returned_stages)
        self.in_feature_info = [dict(body.feature_info[i]) for i in idx]
        self.in_names = [f["name"] for f in self.in_feature_info]
        self.fpn = FeaturePyramidNetwork([f["channels"] for f in self.in_feature_info], fpn_channels,
                                         extra_blocks=LastLevelMaxPool() if extra_pool else None)
        self.out_channels = fpn_channels
        self.extra_pool = bool(extra_pool)
        self.feature_info: List[Dict[str, Any]] = [
            {"name": f["name"], "channels": fpn_channels, "stride": f["stride"], "patch_size": f.get("patch_size")}
            for f in self.in_feature_info]
        if extra_pool:
            self.feature_info.append({"name": POOL_NAME, "channels": fpn_channels,
                                      "stride": 2 * self.in_feature_info[-1]["stride"], "patch_size": None})

    @property
    def featmap_names(self) -> List[str]:
        """Names of the FPN levels built on backbone stages (RoIAlign pools from these, not from "pool")."""
        return list(self.in_names)

    @property
    def size_divisibility(self) -> int:
        return self.body.size_divisibility

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        feats = self.body(x)
        return self.fpn(OrderedDict((n, feats[n]) for n in self.in_names))


class PCEFasterRCNN(FasterRCNN):
    """torchvision Faster R-CNN on a :class:`PCEFPNBackbone`.

    ``forward(images: list[[3, H, W]], targets)`` in training returns torchvision's loss dict
    (``loss_classifier``, ``loss_box_reg``, ``loss_objectness``, ``loss_rpn_box_reg``);
    in eval it returns ``[{"boxes" [N, 4] xyxy in input pixels, "labels" [N] (1..num_classes-1), "scores" [N]}]``.

    Args:
        backbone: a :class:`PCEFPNBackbone`.
        num_classes: classes including background (label 0); ``None`` when a ``box_predictor`` is given.
        **kwargs: :class:`~torchvision.models.detection.FasterRCNN` arguments.
    """

    def __init__(self, backbone: PCEFPNBackbone, num_classes: Optional[int] = None, **kwargs: Any) -> None:
        if not isinstance(backbone, PCEFPNBackbone):
            raise TypeError(f"PCEFasterRCNN needs a PCEFPNBackbone, got {type(backbone).__name__}")
        super().__init__(backbone, num_classes=num_classes, **kwargs)
        predictor = self.roi_heads.box_predictor
        self.num_classes = int(num_classes if num_classes is not None else predictor.cls_score.out_features)

    # -- access to the PCE backbone ------------------------------------------------------------------
    @property
    def pce_backbone(self) -> PCEBackbone:
        """The :class:`~pce.models.backbone.PCEBackbone` under the FPN (the object with ``set_keys_trainable`` etc.)."""
        return self.backbone.body

    @property
    def size_divisibility(self) -> int:
        return self.backbone.size_divisibility

    # -- helpers ------------------------------------------------------------------------------------------
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
        device = next(self.parameters()).device
        data = []
        for b in batches:
            if isinstance(b, tuple) or (isinstance(b, list) and b and not isinstance(b[0], torch.Tensor)):
                b = b[0]
            if isinstance(b, torch.Tensor) and b.dim() == 4:
                b = list(b)
            data.append(self.preprocess([im.to(device) for im in b]))
        return self.pce_backbone.init_keys(data, seed=seed, max_samples=max_samples)


# keyword arguments build_detector passes on: FasterRCNN's own plus those of GeneralizedRCNNTransform
_FRCNN_ARGS = ((set(inspect.signature(FasterRCNN.__init__).parameters) - {"self", "backbone", "num_classes", "kwargs",
                "min_size", "max_size", "image_mean", "image_std"}) | {"fixed_size"})


def default_anchor_sizes(strides: Sequence[int], anchor_scale: float = 8.0) -> Tuple[Tuple[int, ...], ...]:
    """One anchor size per level: ``round(anchor_scale * stride)``, as 1-tuples (AnchorGenerator's format)."""
    if anchor_scale <= 0:
        raise ValueError(f"anchor_scale must be > 0, got {anchor_scale}")
    return tuple((max(1, int(round(anchor_scale * s))),) for s in strides)


def _normalize_anchor_sizes(anchor_sizes: Sequence[Any], num_levels: int, names: Sequence[str]) -> Tuple[Tuple[int, ...], ...]:
    sizes = tuple(tuple(s) if isinstance(s, (list, tuple)) else (s,) for s in anchor_sizes)
    if len(sizes) != num_levels:
        raise ValueError(f"anchor_sizes needs one entry per feature map ({num_levels}: {list(names)}), "
                         f"got {len(sizes)}: {anchor_sizes}")
    for s in sizes:
        if not s or any((not isinstance(v, (int, float))) or v <= 0 for v in s):
            raise ValueError(f"anchor sizes must be positive numbers, got {anchor_sizes}")
    return sizes


def _check_detector_args(num_classes: Any, frcnn_kwargs: Mapping[str, Any]) -> None:
    """``TypeError`` / ``ValueError`` for FasterRCNN options :func:`build_detector` derives, unknown ones, and a
    class count without the background."""
    for k in ("rpn_anchor_generator", "box_roi_pool", "size_divisible", "box_head", "box_predictor"):
        if k in frcnn_kwargs:
            raise TypeError(f"build_detector derives {k!r} from the backbone; use anchor_sizes / aspect_ratios / "
                            f"roi_output_size / representation_size instead, or build PCEFasterRCNN yourself")
    unknown = set(frcnn_kwargs) - _FRCNN_ARGS
    if unknown:
        raise TypeError(f"unknown detector option(s) {sorted(unknown)}; valid FasterRCNN options: "
                        f"{sorted(_FRCNN_ARGS)}")
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes counts the background too and must be >= 2, got {num_classes!r}")


def _detector_body(backbone: str, backbone_overrides: Optional[Mapping[str, Any]],
                   returned_stages: Optional[Sequence[StageRef]]) -> Tuple[PCEBackbone, Optional[Sequence[StageRef]]]:
    """``(backbone body, the stages the FPN still has to pick)``: with ``returned_stages`` the body is built up
    to the last of them and returns exactly those maps (nothing left to pick: ``None``)."""
    cfg = backbone_config(backbone, **dict(backbone_overrides or {}))
    if returned_stages is not None:
        if cfg.get("out_indices") is not None:
            raise ValueError("give returned_stages or backbone_overrides['out_indices'], not both")
        info = [{"name": f"stage{i + 1}"} for i in range(len(cfg["stages"]))]
        idx = _resolve_stages(info, returned_stages)
        cfg["stages"] = list(cfg["stages"])[: max(idx) + 1]
        cfg["out_indices"] = idx
        returned_stages = None
    return PCEBackbone(**cfg), returned_stages


def build_detector(backbone: str = "pce_tiny", num_classes: int = 21,
                   backbone_overrides: Optional[Mapping[str, Any]] = None, fpn_channels: int = 256,
                   returned_stages: Optional[Sequence[StageRef]] = None, min_size: Union[int, Sequence[int]] = 600,
                   max_size: int = 1000, anchor_sizes: Optional[Sequence[Any]] = None, anchor_scale: float = 8.0,
                   aspect_ratios: Sequence[float] = DEFAULT_ASPECT_RATIOS, extra_pool: bool = True,
                   roi_output_size: int = 7, roi_sampling_ratio: int = 2, representation_size: int = 1024,
                   image_mean: Sequence[float] = IMAGENET_MEAN, image_std: Sequence[float] = IMAGENET_STD,
                   **frcnn_kwargs: Any) -> PCEFasterRCNN:
    """Faster R-CNN + FPN on a backbone preset (:func:`pce.build_backbone` name, ``pce_*`` or ``dense_*``).

    Args:
        backbone: preset name; ``backbone_overrides``: its :class:`~pce.models.backbone.PCEBackbone` overrides
            (``router="gate"``, ``num_experts=3``, ...).
        num_classes: classes including background.
        fpn_channels: channels of every FPN level.
        returned_stages: stages feeding the FPN (names or indices; default all). Stages after the last
            returned one are not built (no wasted compute, no unused parameters).
        min_size, max_size: torchvision's resize rule (shorter side to ``min_size``, longer side at most
            ``max_size``); images are padded to the backbone's ``size_divisibility``.
        anchor_sizes: one size (or tuple of sizes) per FPN level, pool level included; default
            ``anchor_scale * stride`` per level (see the module doc). ``aspect_ratios`` apply to every level.
        extra_pool: add the max-pooled "pool" level.
        roi_output_size, roi_sampling_ratio: :class:`~torchvision.ops.MultiScaleRoIAlign` settings (it pools
            from the stage levels, not from "pool").
        representation_size: width of the two-layer MLP box head (torchvision's default 1024).
        image_mean, image_std: normalisation of the [0, 1] input images.
        **frcnn_kwargs: any other :class:`~torchvision.models.detection.FasterRCNN` argument
            (``box_score_thresh``, ``box_detections_per_img``, ``rpn_batch_size_per_image``, ...).
    """
    _check_detector_args(num_classes, frcnn_kwargs)
    body, returned_stages = _detector_body(backbone, backbone_overrides, returned_stages)
    fpn_backbone = PCEFPNBackbone(body, returned_stages, fpn_channels=fpn_channels, extra_pool=extra_pool)
    names = [f["name"] for f in fpn_backbone.feature_info]
    if anchor_sizes is None:
        sizes = default_anchor_sizes([f["stride"] for f in fpn_backbone.feature_info], anchor_scale)
    else:
        sizes = _normalize_anchor_sizes(anchor_sizes, len(names), names)
    ratios = tuple(float(r) for r in aspect_ratios)
    if not ratios or any(r <= 0 for r in ratios):
        raise ValueError(f"aspect_ratios must be positive, got {aspect_ratios}")
    anchor_generator = AnchorGenerator(sizes=sizes, aspect_ratios=(ratios,) * len(sizes))
    roi_pool = MultiScaleRoIAlign(featmap_names=fpn_backbone.featmap_names, output_size=roi_output_size,
                                  sampling_ratio=roi_sampling_ratio)
    box_head = TwoMLPHead(fpn_channels * roi_output_size ** 2, representation_size)
    box_predictor = FastRCNNPredictor(representation_size, num_classes)
    return PCEFasterRCNN(fpn_backbone, num_classes=None, min_size=min_size, max_size=max_size, image_mean=list(image_mean),
                         image_std=list(image_std), rpn_anchor_generator=anchor_generator, box_roi_pool=roi_pool,
                         box_head=box_head, box_predictor=box_predictor,
                         size_divisible=int(body.size_divisibility), **frcnn_kwargs)
