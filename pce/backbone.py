"""``pce.backbone``: the backbone API under its historical name (the code lives in :mod:`pce.models.backbone`,
:mod:`pce.models.presets` and :mod:`pce.models.specs`).

>>> from pce.backbone import build_backbone, list_backbones, PCEBackbone, BackboneSpec
"""
from pce.models.backbone import PCEBackbone, iter_backbones, stage_indices  # noqa: F401
from pce.models.presets import backbone_config, backbone_spec, build_backbone, list_backbones  # noqa: F401
from pce.models.specs import BackboneSpec, LayerSpec, StageSpec  # noqa: F401

__all__ = ["PCEBackbone", "iter_backbones", "stage_indices", "backbone_config", "backbone_spec", "build_backbone",
           "list_backbones", "BackboneSpec", "LayerSpec", "StageSpec"]
