"""Register the backbone presets with timm.

``timm.create_model("pce_tiny", num_classes=10)`` gives a :class:`~pce.models.classifier.PCEClassifier`;
``timm.create_model("pce_tiny", features_only=True, out_indices=(1, 2, 3))`` gives a module returning a list
of maps with timm's ``feature_info`` (``.channels()``, ``.reduction()``). There are no pretrained weights:
``pretrained=True`` raises instead of downloading anything.
"""
from __future__ import annotations

from typing import Any, List, Optional, Sequence

import torch
from timm.models import register_model
from timm.models._features import FeatureInfo
from torch import nn

from pce.models.backbone import PCEBackbone
from pce.models.presets import build_backbone, list_backbones
from pce.models.classifier import PCEClassifier

_TIMM_ONLY = ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir", "drop_path_rate", "global_pool")


class TimmFeatures(nn.Module):
    """``features_only`` wrapper: ``forward(x) -> List[Tensor]`` with a timm :class:`FeatureInfo`."""

    def __init__(self, backbone: PCEBackbone) -> None:
        super().__init__()
        self.backbone = backbone
        self.feature_info = FeatureInfo([dict(f) for f in backbone._all_info], backbone.out_indices)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        return list(self.backbone(x).values())


def create_timm_model(name: str, pretrained: bool = False, features_only: bool = False,
                      out_indices: Optional[Sequence[int]] = None, num_classes: int = 1000,
                      drop_rate: float = 0.0, **kwargs: Any) -> nn.Module:
    if pretrained:
        raise ValueError(f"{name}: PCE ships no pretrained weights (nothing is ever downloaded); use pretrained=False")
    for k in _TIMM_ONLY:
        kwargs.pop(k, None)
    if features_only:
        return TimmFeatures(build_backbone(name, out_indices=out_indices, **kwargs))
    return PCEClassifier(name, num_classes, dropout=drop_rate, **kwargs)


def _make_entry(name: str):
    def entry(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        return create_timm_model(name, pretrained=pretrained, **kwargs)

    entry.__name__ = name
    entry.__qualname__ = name
    entry.__module__ = __name__
    entry.__doc__ = f"PCE preset {name!r} (see pce.models.backbone)."
    return entry


for _name in list_backbones():
    globals()[_name] = register_model(_make_entry(_name))
