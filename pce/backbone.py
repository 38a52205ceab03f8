"""``pce.backbone``: the backbone API under its historical name (the code lives in :mod:`pce.models.backbone`).

>>> from pce.backbone import build_backbone, list_backbones, PCEBackbone
"""
from pce.models.backbone import PCEBackbone, iter_backbones  # noqa: F401
from pce.models.presets import backbone_config, build_backbone, list_backbones  # noqa: F401

__all__ = ["PCEBackbone", "iter_backbones", "backbone_config", "build_backbone", "list_backbones"]
