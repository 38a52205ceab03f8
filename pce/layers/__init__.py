"""Building blocks with no routing: patch grids, positional channels, SPP, 1x1 convolutions, deformable attention.

Nothing here imports :mod:`pce.moe` or :mod:`pce.models`.
"""
from pce.layers.attention import DeformableAttention
from pce.layers.patches import PatchExtractor, PatchGrid
from pce.layers.pointwise import PointwiseConv
from pce.layers.positional import PositionalEncoding, patch_centers
from pce.layers.spp import SpatialPyramidPooling

__all__ = ["DeformableAttention", "PatchExtractor", "PatchGrid", "PointwiseConv", "PositionalEncoding",
           "patch_centers", "SpatialPyramidPooling"]
