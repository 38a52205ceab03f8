"""PCE: Positional Convolution Experts.

>>> import torch, pce
>>> backbone = pce.build_backbone("pce_tiny")
>>> feats = backbone(torch.randn(2, 3, 256, 256))           # OrderedDict of multi-scale maps
>>> [f["name"] for f in backbone.feature_info]
['stage1', 'stage2', 'stage3', 'stage4']
"""
from pce.layers.attention import DeformableAttention
from pce.models.backbone import PCEBackbone, iter_backbones
from pce.models.presets import backbone_config, backbone_spec, build_backbone, list_backbones
from pce.models.specs import BackboneSpec, LayerSpec, StageSpec
from pce.moe.experts import ExpertBank, build_expert_bank
from pce.models.layer import DenseLayer, PCELayer
from pce.moe.losses import RouterLossWeights, router_loss
from pce.layers.patches import PatchExtractor, PatchGrid
from pce.layers.positional import PositionalEncoding
from pce.registry import BACKBONES, EXECUTIONS, EXPERTS, LAYERS, ROUTERS, Registry
from pce.moe.routers import build_router
from pce.moe.routing import Router, RoutingResult
from pce.moe.recorder import RoutingRecorder, record_routing
from pce.moe.execution import Execution, ExecutionOptions
from pce.layers.spp import SpatialPyramidPooling
from pce.models.pce_conv import PCEConv2d
from pce.models.convert import convert

__version__ = "0.1.0"

from pce.models import timm_models  # noqa: F401,E402  registers the presets: timm.create_model("pce_tiny")

__all__ = [
    "PCEBackbone", "PCELayer", "DenseLayer", "DeformableAttention", "ExpertBank", "PatchExtractor", "PatchGrid",
    "PositionalEncoding", "Router", "RoutingResult", "RouterLossWeights", "SpatialPyramidPooling", "Registry",
    "BACKBONES", "EXPERTS", "ROUTERS", "backbone_config", "build_backbone", "build_expert_bank", "build_router",
    "list_backbones", "router_loss", "record_routing", "RoutingRecorder", "iter_backbones", "EXECUTIONS",
    "Execution", "ExecutionOptions", "PCEConv2d", "convert", "LayerSpec", "StageSpec", "BackboneSpec", "LAYERS",
    "backbone_spec", "__version__",
]
