"""Routing maps: which expert takes which patch, per PCE layer, placed on the input image.

>>> maps = routing_maps(model, images)              # images [B, C, H, W]
>>> m = maps["backbone.stages.2.layers.0"]
>>> m.expert.shape, m.entropy.shape, m.weights.shape   # [B, gh, gw], [B, gh, gw], [B, gh, gw, E]

Everything comes through :func:`pce.record_routing` (the one channel by which routing leaves a model), so any
model with PCE layers works: a backbone, a classifier, Faster R-CNN, an smp model, a DDP / EMA wrapper.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from torch import nn

from pce.moe.metrics import entropy
from pce.moe.recorder import record_routing, strip_wrapper_prefix
from pce.moe.routing import RoutingResult

__all__ = ["LayerMap", "routing_maps", "layer_map", "feature_strides"]


@dataclass
class LayerMap:
    """One layer's routing of a batch, on its patch grid.

    Attributes:
        expert: ``int64 [B, gh, gw]`` argmax expert per patch (of the mixing weights), ``-1`` for a dropped patch.
        entropy: ``[B, gh, gw]`` routing entropy of the router's probabilities (nats).
        weights: ``[B, gh, gw, E]`` mixing weights.
        grid: ``(gh, gw)``.
        patch_size / stride: patch side and step in *input-image* pixels when the layer's feature stride is known
            (``feature_stride``), else in the layer's map pixels.
        map_patch_size / map_stride: the same in the layer's map pixels; ``feature_stride``: map -> image scale
            (``None`` when unknown).
    """

    expert: torch.Tensor
    entropy: torch.Tensor
    weights: torch.Tensor
    grid: Tuple[int, int]
    patch_size: Optional[int]
    stride: Optional[int]
    map_patch_size: Optional[int] = None
    map_stride: Optional[int] = None
    feature_stride: Optional[int] = None

    @property
    def num_experts(self) -> int:
        return int(self.weights.shape[-1])


def feature_strides(model: nn.Module) -> Dict[str, int]:
    """``{module path prefix of a stage: feature stride}`` for every PCE backbone inside ``model``
    (e.g. ``{"backbone.stages.2": 8}``), from ``backbone.feature_info``."""
    from pce.models.backbone import PCEBackbone

    out: Dict[str, int] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, PCEBackbone):
            prefix = strip_wrapper_prefix(name)
            for info in getattr(mod, "feature_info", []) or []:
                if "module" in info and "stride" in info:
                    out[(prefix + "." if prefix else "") + str(info["module"])] = int(info["stride"])
    return out


def stride_of(layer: str, strides: Dict[str, int]) -> Optional[int]:
    """The feature stride of the stage that holds ``layer`` (longest matching prefix), or ``None``."""
    best = None
    for prefix, s in strides.items():
        if (layer == prefix or layer.startswith(prefix + ".")) and (best is None or len(prefix) > len(best[0])):
            best = (prefix, s)
    return best[1] if best else None


def grid_of(result: RoutingResult) -> Tuple[int, int]:
    """``(gh, gw)`` of a result; a square grid is assumed when the layer did not set one."""
    if result.grid is not None:
        return int(result.grid[0]), int(result.grid[1])
    P = result.weights.shape[1]
    side = int(round(P ** 0.5))
    if side * side != P:
        raise ValueError(f"routing result without a grid and a non-square patch count {P}")
    return side, side


def layer_map(result: RoutingResult, feature_stride: Optional[int] = None) -> LayerMap:
    """A :class:`LayerMap` of one :class:`RoutingResult` (``weights [B, P, E]`` -> ``[B, gh, gw, ...]``)."""
    w = result.weights.detach().float().cpu()
    B, P, E = w.shape
    gh, gw = grid_of(result)
    expert = torch.where(w.sum(-1) > 0, w.argmax(-1), torch.full((B, P), -1, dtype=torch.int64))
    ent = entropy(result.probs.detach().float().cpu())
    scale = feature_stride or 1
    ps, st = result.patch_size, result.patch_stride
    return LayerMap(expert=expert.reshape(B, gh, gw), entropy=ent.reshape(B, gh, gw), weights=w.reshape(B, gh, gw, E),
                    grid=(gh, gw), patch_size=None if ps is None else ps * scale,
                    stride=None if st is None else st * scale, map_patch_size=ps, map_stride=st,
                    feature_stride=feature_stride)


def _default_forward(model: nn.Module, images: Any) -> Any:
    return model(images)


@torch.no_grad()
def routing_maps(model: nn.Module, images: Any,
                 forward: Optional[Callable[[nn.Module, Any], Any]] = None) -> Dict[str, LayerMap]:
    """``{layer name: LayerMap}`` in forward order for one batch ``images`` (``[B, C, H, W]``, or what
    ``forward(model, images)`` takes, e.g. a list of images for a detector). Runs in eval mode without
    gradients (the model's mode is restored). A layer that runs several times per forward keeps its first run."""
    forward = forward or _default_forward
    was_training = model.training
    model.eval()
    try:
        with record_routing(model, detach=True) as rec:
            forward(model, images)
    finally:
        model.train(was_training)
    strides = feature_strides(model)
    out: Dict[str, LayerMap] = {}
    for name, results in rec.by_layer().items():
        out[name] = layer_map(results[0], stride_of(name, strides))
    return out


def records_by_layer(records: List[Tuple[str, RoutingResult]]) -> Dict[str, RoutingResult]:
    """The first result of every layer name of ``records`` (forward order)."""
    out: Dict[str, RoutingResult] = {}
    for name, r in records:
        out.setdefault(name, r)
    return out
