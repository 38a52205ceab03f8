"""``pce.backbone``: the backbone API under its historical name (the code lives in :mod:`pce.models.backbone`).

>>> from pce.backbone import build_backbone, list_backbones, PCEBackbone
"""
from pce.models.backbone import PCEBackbone, backbone_config, build_backbone, list_backbones  # noqa: F401

__all__ = ["PCEBackbone", "backbone_config", "build_backbone", "list_backbones"]
