"""The blocks a :class:`~pce.models.backbone.PCEBackbone` is made of: the stem (:class:`Stem`), a stage of PCE or
dense layers with optional deformable attention and stochastic depth (:class:`Stage`), and the stage list
(:class:`StageList`, whose call says what torchvision users should use instead)."""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch
from timm.layers import DropPath
from torch import nn

__all__ = ["conv_bn_relu", "Stem", "Stage", "StageList"]


def conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class Stem(nn.Sequential):
    """Conv-BN-ReLU blocks, each of stride 2 (or one of stride 1); :meth:`forward_intermediates` also returns
    every block's output (the stride-2 map that Unet-style decoders read)."""

    def forward_intermediates(self, x: torch.Tensor) -> List[torch.Tensor]:
        outs = []
        for block in self:
            x = block(x)
            outs.append(x)
        return outs


class Stage(nn.Module):
    """Downsample (3x3 conv, stride 2, when needed) then ``depth`` PCE (or dense) layers, each optionally
    followed by deformable attention. ``[B, C_in, H, W] -> [B, C_out, H / s, W / s]``.

    ``drop_path_rates`` (one per layer; stochastic depth): every layer is residual, ``layer(x) = x + f(x)``, and in
    training its branch ``f(x) = layer(x) - x`` goes through :class:`timm.layers.DropPath`, so a dropped sample
    leaves the layer as ``x``; in eval (or with all rates 0) the layer runs as is."""

    def __init__(self, cin: int, cout: int, stride: int, depth: int, layer_fn: Callable[[], nn.Module],
                 attention_fn: Optional[Callable[[], nn.Module]] = None,
                 drop_path_rates: Optional[Sequence[float]] = None) -> None:
        super().__init__()
        self.down = conv_bn_relu(cin, cout, stride) if (stride != 1 or cin != cout) else nn.Identity()
        self.layers = nn.ModuleList([layer_fn() for _ in range(depth)])
        self.attn = nn.ModuleList([attention_fn() for _ in range(depth)]) if attention_fn else None
        rates = [float(r) for r in (drop_path_rates or [])]
        if rates and len(rates) != depth:
            raise ValueError(f"drop_path_rates: {len(rates)} rates for {depth} layers (one per layer)")
        self.drop_path = nn.ModuleList([DropPath(r) for r in rates]) if any(r > 0 for r in rates) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.down(x)
        for i, layer in enumerate(self.layers):
            if self.drop_path is not None and self.training:
                x = x + self.drop_path[i](layer(x) - x)  # stochastic depth on the residual branch
            else:
                x = layer(x)
            if self.attn is not None:
                x = self.attn[i](x)
        return x


class StageList(nn.ModuleList):
    """The backbone's stages (a ``ModuleList``: the same state-dict keys ``stages.<i>...``). Calling it raises
    the one-line error that says what to use instead: torchvision's ``IntermediateLayerGetter`` (inside
    ``BackboneWithFPN``) runs a model's direct children in turn, and cannot return the stage maps from here."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise TypeError("PCEBackbone.stages: torchvision's IntermediateLayerGetter / BackboneWithFPN cannot return "
                        "PCE stage maps (use pce.tasks.detection.PCEFPNBackbone(backbone, fpn_channels=256): "
                        "torchvision's FPN on the backbone's maps, named '0', '1', ... and 'pool' as "
                        "BackboneWithFPN names them; or torchvision's create_feature_extractor(backbone, "
                        "{'stages.0': '0', ...}))")
