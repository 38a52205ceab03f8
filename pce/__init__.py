"""PCE: Positional Convolution Experts.

>>> import torch, pce
>>> backbone = pce.build_backbone("pce_tiny")
>>> feats = backbone(torch.randn(2, 3, 256, 256))           # OrderedDict of multi-scale maps
>>> [f["name"] for f in backbone.feature_info]
['stage1', 'stage2', 'stage3', 'stage4']
"""
from .attention import DeformableAttention
from .backbone import PCEBackbone, backbone_config, build_backbone, list_backbones
from .experts import ExpertBank, build_expert_bank
from .layer import DenseLayer, PCELayer
from .losses import RouterLossWeights, router_loss
from .patches import PatchExtractor, PatchGrid
from .positional import PositionalEncoding
from .registry import BACKBONES, EXPERTS, ROUTERS, Registry
from .routers import build_router
from .routing import Router, RoutingResult
from .spp import SpatialPyramidPooling

__version__ = "0.1.0"

try:  # register the presets with timm, so timm.create_model("pce_tiny", features_only=True) works
    from . import timm_models  # noqa: F401
except ImportError:  # pragma: no cover - timm is a dependency, but keep the core importable without it
    pass

__all__ = [
    "PCEBackbone", "PCELayer", "DenseLayer", "DeformableAttention", "ExpertBank", "PatchExtractor", "PatchGrid",
    "PositionalEncoding", "Router", "RoutingResult", "RouterLossWeights", "SpatialPyramidPooling", "Registry",
    "BACKBONES", "EXPERTS", "ROUTERS", "backbone_config", "build_backbone", "build_expert_bank", "build_router",
    "list_backbones", "router_loss", "__version__",
]
