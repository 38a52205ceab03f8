"""FX symbolic tracing of PCE models: which modules are leaves, and their registration with timm.

Every module here branches on shapes, devices or data (patch grids, output cells, padding, routing, a CPU fast
path, an on/off switch), so FX graphs hold each as one ``call_module`` node named by its module path (``stages.1.layers.0``)
that runs the real module eagerly (:func:`pce.layers.fx.fx_leaf`). That works with any tracer and no tracer
arguments (``torch.fx.symbolic_trace``, torchvision's ``create_feature_extractor`` / ``get_graph_node_names``);
they are also registered as timm's "notrace" modules, so timm's FX feature extraction
(``timm.models.create_feature_extractor``, ``FeatureGraphNet``, ``feature_cls="fx"``) lists them as leaves too.

>>> import torch, pce
>>> from torchvision.models.feature_extraction import create_feature_extractor
>>> fx_model = create_feature_extractor(pce.build_backbone("pce_tiny").eval(), {"stages.3": "c5"})
>>> fx_model(torch.randn(1, 3, 64, 64))["c5"].shape
torch.Size([1, 256, 2, 2])
"""
from __future__ import annotations

from typing import Tuple, Type

from timm.layers import register_notrace_module
from torch import nn

from pce.layers.attention import DeformableAttention
from pce.layers.pointwise import PointwiseConv
from pce.models.layer import DenseLayer, PCELayer
from pce.models.pce_conv import PCEConv2d

__all__ = ["FX_LEAF_MODULES"]

#: the module classes that FX graphs of PCE models hold as single ``call_module`` nodes
FX_LEAF_MODULES: Tuple[Type[nn.Module], ...] = (PCELayer, DenseLayer, PCEConv2d, DeformableAttention, PointwiseConv)

for _cls in FX_LEAF_MODULES:
    register_notrace_module(_cls)
