"""PCE's ``BackboneWithFPN``: a :class:`~pce.models.backbone.PCEBackbone` plus torchvision's FPN, with the map names
torchvision's detectors expect.

>>> fpn = PCEFPNBackbone(pce.build_backbone("pce_tiny"), fpn_channels=256)
>>> list(fpn(torch.randn(1, 3, 128, 128)))          # ['0', '1', '2', '3', 'pool']
>>> model = torchvision.models.detection.FasterRCNN(fpn, num_classes=21)   # torchvision's defaults work

Why not ``torchvision.models.detection.backbone_utils.BackboneWithFPN(pce_backbone, return_layers, ...)``: its
``IntermediateLayerGetter`` runs a model's *direct children* one after another and returns some of their outputs;
a PCE backbone's stage maps come from ``backbone.stages[i]`` inside a ``ModuleList``, so the getter cannot reach
them (it raises "return_layers are not present in model", or PCE's one-line error when it is given ``"stages"``).
:class:`PCEFPNBackbone` is the same thing built on the backbone's own ``forward``: its output maps are named
``'0', '1', ...`` (one per stage, fine to coarse) plus the extra blocks' levels (``'pool'`` for torchvision's
``LastLevelMaxPool``, ``'p6', 'p7'`` for ``LastLevelP6P7``), exactly as ``BackboneWithFPN`` names them, so
torchvision's default ``MultiScaleRoIAlign(featmap_names=['0', '1', '2', '3'])`` and default anchor generators
find them; ``out_channels`` is the FPN width, as every torchvision detector reads it.

A ``torchvision.ops.FeaturePyramidNetwork`` you put on ``pce_backbone(x)`` yourself keeps the backbone's names
(``stage1`` ...); torchvision's default RoI pools then find no map (``IndexError`` in ``poolers.py``): rename the
maps ``'0', '1', ...`` or give the detector ``box_roi_pool=MultiScaleRoIAlign(["stage1", ...], 7, 2)`` (Mask R-CNN:
also ``mask_roi_pool``, output 14).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import torch
from torch import nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool

from pce.models.backbone import PCEBackbone

__all__ = ["PCEFPNBackbone", "resolve_stages", "StageRef"]

StageRef = Union[int, str]


def resolve_stages(feature_info: Sequence[Mapping[str, Any]], returned: Optional[Sequence[StageRef]]) -> List[int]:
    """Indices into ``feature_info`` of the returned stages (names like ``"stage2"`` or 0-based indices)."""
    names = [f["name"] for f in feature_info]
    if returned is None:
        return list(range(len(names)))
    if isinstance(returned, (str, int)):
        returned = [returned]
    out: List[int] = []
    for r in returned:
        if isinstance(r, str):
            if r not in names:
                raise ValueError(f"returned stage {r!r} is not a backbone feature map; available: {names}")
            idx = names.index(r)
        elif isinstance(r, int) and not isinstance(r, bool):
            if not -len(names) <= r < len(names):
                raise ValueError(f"returned stage index {r} out of range for {len(names)} feature maps {names}")
            idx = r % len(names)
        else:
            raise TypeError(f"returned stages are names or integer indices, got {r!r}")
        if idx in out:
            raise ValueError(f"returned stage {names[idx]!r} given twice")
        out.append(idx)
    if not out:
        raise ValueError("returned_stages must name at least one feature map")
    if out != sorted(out):
        raise ValueError(f"returned stages must go from fine to coarse (increasing stride), got {list(returned)}")
    return out


class PCEFPNBackbone(nn.Module):
    """A :class:`~pce.models.backbone.PCEBackbone` (``body``) + torchvision FPN (+ an extra block).

    Args:
        body: the PCE (or dense) backbone.
        returned_stages: the body's maps that feed the FPN (names or indices into ``body.feature_info``;
            default all), fine to coarse.
        fpn_channels: channels of every output map (``out_channels``).
        extra_pool: add torchvision's max-pooled ``"pool"`` level (``LastLevelMaxPool``, stride ``2 x`` the
            coarsest stride); ignored when ``extra_blocks`` is given.
        extra_blocks: any torchvision ``ExtraFPNBlock`` (e.g. ``LastLevelP6P7(fpn_channels, fpn_channels)``, the
            RetinaNet / FCOS levels ``"p6"``, ``"p7"``).

    ``forward(x [B, 3, H, W])`` -> ``OrderedDict`` of ``[B, fpn_channels, H / s, W / s]`` maps named ``'0'`` ..
    ``'N-1'`` (the returned stages, fine to coarse) plus the extra levels. ``feature_info`` lists ``name`` /
    ``channels`` / ``stride`` / ``stage`` (the body's stage name, ``None`` for extra levels) of each output map;
    ``featmap_names`` the names of the stage levels (the ones RoIAlign pools from).
    """

    def __init__(self, body: PCEBackbone, returned_stages: Optional[Sequence[StageRef]] = None,
                 fpn_channels: int = 256, extra_pool: bool = True,
                 extra_blocks: Optional[ExtraFPNBlock] = None) -> None:
        super().__init__()
        if not isinstance(fpn_channels, int) or isinstance(fpn_channels, bool) or fpn_channels < 1:
            raise ValueError(f"fpn_channels must be a positive integer, got {fpn_channels!r}")
        if not isinstance(body, nn.Module) or not hasattr(body, "feature_info"):
            raise TypeError(f"PCEFPNBackbone needs a PCE backbone (pce.build_backbone(...)), got {type(body).__name__}")
        self.body = body
        idx = resolve_stages(body.feature_info, returned_stages)
        self.in_feature_info = [dict(body.feature_info[i]) for i in idx]
        self.in_names = [f["name"] for f in self.in_feature_info]
        if extra_blocks is None and extra_pool:
            extra_blocks = LastLevelMaxPool()
        self.fpn = FeaturePyramidNetwork([f["channels"] for f in self.in_feature_info], fpn_channels,
                                         extra_blocks=extra_blocks)
        self.out_channels = fpn_channels
        self.extra_pool = isinstance(extra_blocks, LastLevelMaxPool)
        self.feature_info: List[Dict[str, Any]] = self._probe_levels()

    def _probe_levels(self) -> List[Dict[str, Any]]:
        """``feature_info`` of the outputs, read from one FPN forward on small zero maps (the extra block decides
        how many levels it adds and at which stride)."""
        strides = [int(f["stride"]) for f in self.in_feature_info]
        side = 4 * strides[-1]  # an input side whose coarsest stage map is 4 x 4
        maps = OrderedDict((str(i), torch.zeros(1, f["channels"], side // s, side // s))
                           for i, (f, s) in enumerate(zip(self.in_feature_info, strides)))
        with torch.no_grad():
            out = self.fpn(maps)
        info = []
        for k, (name, m) in enumerate(out.items()):
            stage = self.in_feature_info[k] if k < len(strides) else None
            info.append({"name": name, "channels": self.out_channels,
                         "stride": strides[k] if stage else max(1, side // int(m.shape[-1])),
                         "stage": stage["name"] if stage else None,
                         "patch_size": stage.get("patch_size") if stage else None})
        return info

    @property
    def featmap_names(self) -> List[str]:
        """Names of the FPN levels built on backbone stages (RoIAlign pools from these, not from the extras)."""
        return [str(i) for i in range(len(self.in_names))]

    @property
    def size_divisibility(self) -> int:
        return self.body.size_divisibility

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        feats = self.body(x)
        return self.fpn(OrderedDict((str(i), feats[n]) for i, n in enumerate(self.in_names)))
