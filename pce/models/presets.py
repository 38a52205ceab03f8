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


def build_backbone(name: str, **overrides: Any) -> PCEBackbone:
    """Build a preset, e.g. ``build_backbone("pce_tiny", router="gate", num_experts=8, top_k=1)``."""
    return PCEBackbone(**backbone_config(name, **overrides))
