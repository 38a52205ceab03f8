"""Backbone presets and their dense twins: ``build_backbone``, ``list_backbones``, ``backbone_config``.

``build_backbone("pce_tiny", router="gate", num_experts=8)`` builds a preset with overrides;
``list_backbones()`` names the presets. Every ``pce_X`` preset has a ``dense_X`` twin with the same stem,
stages and expert block but no routing (one expert on the whole map), for comparisons at equal active FLOPs.
A new preset is one dict plus one ``BACKBONES.register`` line.
"""
from __future__ import annotations

import copy
import inspect
from typing import Any, Dict, List

from pce.models.backbone import PCEBackbone
from pce.registry import BACKBONES


def _stages(channels, depths, patches, strides, attention=(False,) * 8):
    return [dict(channels=c, depth=d, patch_size=p, stride=s, attention=a)
            for c, d, p, s, a in zip(channels, depths, patches, strides, attention)]


_PRESETS: Dict[str, Dict[str, Any]] = {
    # 28x28 grey images (MNIST, Fashion-MNIST): maps 28 -> 14 -> 7 -> 4, four patches per map.
    "fmnist": dict(in_chans=1, stem_channels=32, stem_stride=1, num_experts=4, top_k=1,
                   stages=_stages((48, 96, 192), (1, 1, 1), (7, 4, 2), (2, 2, 2))),
    # 32x32 colour images (CIFAR): 32 -> 16 -> 8 -> 4.
    "cifar": dict(in_chans=3, stem_channels=32, stem_stride=1, num_experts=4, top_k=1,
                  stages=_stages((64, 128, 256), (1, 1, 1), (8, 4, 2), (2, 2, 2))),
    # 224-ish images: strides 4, 8, 16, 32; patches 16, 8, 4, 2 (a 4x4 grid at 256x256).
    "tiny": dict(in_chans=3, stem_channels=32, stem_stride=4, num_experts=4, top_k=1,
                 stages=_stages((32, 64, 128, 256), (1, 1, 1, 1), (16, 8, 4, 2), (1, 2, 2, 2))),
    "small": dict(in_chans=3, stem_channels=48, stem_stride=4, num_experts=8, top_k=1,
                  stages=_stages((64, 128, 256, 512), (1, 1, 2, 1), (16, 8, 4, 2), (1, 2, 2, 2))),
    "base": dict(in_chans=3, stem_channels=64, stem_stride=4, num_experts=8, top_k=1,
                 stages=_stages((64, 128, 256, 512), (2, 2, 4, 2), (16, 8, 4, 2), (1, 2, 2, 2))),
}
for _name, _cfg in _PRESETS.items():
    BACKBONES.register(f"pce_{_name}", obj=dict(_cfg, layer="pce"))
    BACKBONES.register(f"dense_{_name}", obj=dict(_cfg, layer="dense"))

_ARGS = set(inspect.signature(PCEBackbone.__init__).parameters) - {"self"}


def list_backbones(pattern: str = "") -> List[str]:
    """Names of the registered presets (containing ``pattern``)."""
    return [n for n in BACKBONES.names() if pattern in n]


def backbone_config(name: str, **overrides: Any) -> Dict[str, Any]:
    """The keyword arguments a preset passes to :class:`PCEBackbone`, with ``overrides`` applied."""
    if name not in BACKBONES:
        raise KeyError(f"unknown backbone preset {name!r}; available: {', '.join(list_backbones())}")
    unknown = set(overrides) - _ARGS
    if unknown:
        raise TypeError(f"unknown backbone option(s) {sorted(unknown)} for {name!r}; valid: {sorted(_ARGS)}")
    cfg = copy.deepcopy(BACKBONES.get(name))
    cfg.update(copy.deepcopy(overrides))
    return cfg


def apply_output_stride(cfg: Dict[str, Any], output_stride: int) -> Dict[str, Any]:
    """A copy of backbone kwargs ``cfg`` whose deepest map sits at stride ``output_stride`` (8, 16, 32, ...).

    The backbone is *built* for the stride (no dilation of a built model): every stage whose nominal stride
    exceeds ``output_stride`` gets ``stride=1`` (its downsampling 3x3 conv keeps the resolution) and its
    ``patch_size`` is multiplied by ``nominal_stride / output_stride``, so each PCE layer keeps the same patch
    grid in image pixels (``pce_tiny`` at 16: stage 4 at stride 16 with 4x4 patches instead of stride 32 with
    2x2; one patch still covers 64x64 input pixels). Used by the smp encoder and the timm entry points."""
    cfg = copy.deepcopy(cfg)
    stages = [dict(s) for s in cfg["stages"]]
    previous = int(cfg.get("stem_stride", 4))
    if not isinstance(output_stride, int) or output_stride < previous or output_stride & (output_stride - 1):
        raise ValueError(f"output_stride must be a power of two >= the stem stride ({previous}), got {output_stride!r}")
    nominal = previous
    for s in stages:
        nominal *= int(s.get("stride", 2))
        actual = min(nominal, output_stride)
        s["stride"] = 2 if actual > previous else 1
        s["patch_size"] = int(s["patch_size"]) * (nominal // actual)
        previous = actual
    cfg["stages"] = stages
    return cfg


def build_backbone(name: str, **overrides: Any) -> PCEBackbone:
    """Build a preset, e.g. ``build_backbone("pce_tiny", router="gate", num_experts=8, top_k=1)``."""
    return PCEBackbone(**backbone_config(name, **overrides))
