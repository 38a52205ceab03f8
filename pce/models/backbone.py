"""Multi-scale PCE backbones, their dense twins, and the preset registry.

``build_backbone("pce_tiny", router="gate", num_experts=8)`` builds a preset with overrides;
``list_backbones()`` names the presets. Every ``pce_X`` preset has a ``dense_X`` twin with the same stem,
stages and expert block but no routing (one expert on the whole map), for comparisons at equal active FLOPs.

``forward(x)`` returns an ``OrderedDict`` of feature maps (``stage1`` ... ) that torchvision's FPN and
segmentation-models-pytorch decoders consume as is; ``forward(x, return_routing=True)`` also returns the
per-layer :class:`~pce.moe.routing.RoutingResult` list. ``feature_info`` lists ``name``, ``channels``, ``stride``
and ``patch_size`` of each returned map (plus timm's ``num_chs``/``reduction``/``module`` keys).
"""
from __future__ import annotations

import copy
import inspect
import math
from collections import OrderedDict
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence

import torch
from torch import nn

from pce.layers.attention import DeformableAttention
from pce.models.layer import DenseLayer, PCELayer
from pce.registry import BACKBONES
from pce.moe.routers.cosine import CosineRouter
from pce.moe.routing import RoutingResult


def conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class Stage(nn.Module):
    """Downsample (3x3 conv, stride 2, when needed) then ``depth`` PCE (or dense) layers, each optionally
    followed by deformable attention."""

    def __init__(self, cin: int, cout: int, stride: int, depth: int, layer_fn, attention_fn=None) -> None:
        super().__init__()
        self.down = conv_bn_relu(cin, cout, stride) if (stride != 1 or cin != cout) else nn.Identity()
        self.layers = nn.ModuleList([layer_fn() for _ in range(depth)])
        self.attn = nn.ModuleList([attention_fn() for _ in range(depth)]) if attention_fn else None

    def forward(self, x: torch.Tensor, routing: Optional[List[RoutingResult]] = None) -> torch.Tensor:
        x = self.down(x)
        for i, layer in enumerate(self.layers):
            x, r = layer(x, return_routing=True)
            if routing is not None and r is not None:
                routing.append(r)
            if self.attn is not None:
                x = self.attn[i](x)
        return x


class PCEBackbone(nn.Module):
    """Stem + stages of PCE layers with patch sizes that shrink with depth.

    Args:
        stages: one dict per stage with ``channels``, ``depth``, ``patch_size``, ``stride`` (1 or 2) and
            optionally ``attention`` (bool), ``layer`` (``"pce"`` or ``"dense"``: this stage's layers, default the
            backbone's ``layer``) and ``num_experts`` (this stage's experts, default the backbone's), so experts
            can be placed in some stages only (e.g. the deep ones, as V-MoE places MoE layers in the last blocks).
        in_chans: input channels. stem_channels / stem_stride (1, 2 or 4): the convolutional stem.
        layer: ``"pce"`` or ``"dense"`` (the dense twin).
        num_experts, router, router_kwargs, top_k, expert, expert_kwargs, pos_encoding, num_frequencies,
        experts_see_position, halo, padding, execution, norm_stats: passed to every :class:`~pce.models.layer.PCELayer`.
        attention_kwargs: for :class:`~pce.layers.attention.DeformableAttention` in stages with ``attention=True``.
        out_indices: which stages to return (default all).
    """

    def __init__(self, stages: Sequence[Dict[str, Any]], in_chans: int = 3, stem_channels: int = 32,
                 stem_stride: int = 4, layer: str = "pce", num_experts: int = 4, router: str = "cosine",
                 router_kwargs: Optional[Dict[str, Any]] = None, top_k: Optional[int] = None,
                 expert: str = "residual", expert_kwargs: Optional[Dict[str, Any]] = None,
                 pos_encoding: str = "coord", num_frequencies: int = 4, experts_see_position: bool = False,
                 halo: int = 0, padding: str = "fit", execution: str = "auto", norm_stats: str = "expert",
                 attention_kwargs: Optional[Dict[str, Any]] = None,
                 out_indices: Optional[Sequence[int]] = None) -> None:
        super().__init__()
        if layer not in ("pce", "dense"):
            raise ValueError(f"layer must be 'pce' or 'dense', got {layer!r}")
        if not isinstance(num_experts, int) or num_experts < 1:
            raise ValueError(f"num_experts must be an integer >= 1, got {num_experts!r}")
        if stem_stride not in (1, 2, 4):
            raise ValueError(f"stem_stride must be 1, 2 or 4, got {stem_stride}")
        if not stages:
            raise ValueError("a backbone needs at least one stage")
        self.in_chans, self.layer_type, self.padding = in_chans, layer, padding
        stem: List[nn.Module] = [conv_bn_relu(in_chans, stem_channels, 2 if stem_stride >= 2 else 1)]
        if stem_stride == 4:
            stem.append(conv_bn_relu(stem_channels, stem_channels, 2))
        self.stem = nn.Sequential(*stem)
        self.stages = nn.ModuleList()
        info: List[Dict[str, Any]] = []
        cin, stride = stem_channels, stem_stride
        for i, spec in enumerate(stages):
            spec = dict(spec)
            unknown = set(spec) - {"channels", "depth", "patch_size", "stride", "attention", "layer", "num_experts"}
            if unknown:
                raise ValueError(f"stage {i}: unknown key(s) {sorted(unknown)}")
            cout, depth, patch = spec["channels"], spec.get("depth", 1), spec["patch_size"]
            s = spec.get("stride", 2)
            if s not in (1, 2):
                raise ValueError(f"stage {i}: stride must be 1 or 2, got {s}")
            stage_layer, stage_experts = spec.get("layer", layer), spec.get("num_experts", num_experts)
            if stage_layer not in ("pce", "dense"):
                raise ValueError(f"stage {i}: layer must be 'pce' or 'dense', got {stage_layer!r}")
            if not isinstance(stage_experts, int) or stage_experts < 1:
                raise ValueError(f"stage {i}: num_experts must be an integer >= 1, got {stage_experts!r}")
            stride *= s

            def make_layer(c=cout, p=patch, kind=stage_layer, e=stage_experts):
                if kind == "dense":
                    return DenseLayer(c, expert=expert, expert_kwargs=expert_kwargs)
                return PCELayer(c, p, num_experts=e, router=router, router_kwargs=router_kwargs,
                                top_k=top_k, expert=expert, expert_kwargs=expert_kwargs, pos_encoding=pos_encoding,
                                num_frequencies=num_frequencies, experts_see_position=experts_see_position,
                                halo=halo, padding=padding, execution=execution, norm_stats=norm_stats)

            attn = (lambda c=cout: DeformableAttention(c, **(attention_kwargs or {}))) if spec.get("attention") else None
            self.stages.append(Stage(cin, cout, s, depth, make_layer, attn))
            info.append({"name": f"stage{i + 1}", "channels": cout, "stride": stride, "patch_size": patch,
                         "layer": stage_layer, "num_chs": cout, "reduction": stride, "module": f"stages.{i}"})
            cin = cout
        self.out_indices = tuple(range(len(stages))) if out_indices is None else tuple(out_indices)
        for i in self.out_indices:
            if not -len(stages) <= i < len(stages):
                raise ValueError(f"out_indices entry {i} out of range for {len(stages)} stages")
        self.out_indices = tuple(i % len(stages) for i in self.out_indices)
        self.feature_info = [info[i] for i in self.out_indices]
        self._all_info = info
        self.num_features = info[-1]["channels"]
        self.out_channels = [f["channels"] for f in self.feature_info]

    @property
    def size_divisibility(self) -> int:
        """Input sizes divisible by this give maps of exactly ``H / stride`` at every stage. With
        ``padding="error"`` they are also the only sizes whose every map fits the patch grid."""
        strides = [f["stride"] for f in self._all_info]
        patched = [f["stride"] * f["patch_size"] for f in self._all_info if f["layer"] == "pce"]
        if self.padding == "error" and patched:
            return math.lcm(max(strides), *patched)
        return max(strides)

    def forward(self, x: torch.Tensor, return_routing: bool = False):
        """``x [B, in_chans, H, W]`` -> ``OrderedDict[name, [B, C_i, H/s_i, W/s_i]]`` (and routing list)."""
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise ValueError(f"backbone expects input [B, {self.in_chans}, H, W], got {tuple(x.shape)}")
        routing: Optional[List[RoutingResult]] = [] if return_routing else None
        feats: "OrderedDict[str, torch.Tensor]" = OrderedDict()
        x = self.stem(x)
        last = max(self.out_indices)
        for i, stage in enumerate(self.stages):
            x = stage(x, routing)
            if i in self.out_indices:
                feats[self._all_info[i]["name"]] = x
            if i == last and not return_routing:
                break
        return (feats, routing) if return_routing else feats

    # -- PCE controls ------------------------------------------------------------------------------
    def pce_layers(self) -> Iterator[PCELayer]:
        return (m for m in self.modules() if isinstance(m, PCELayer))

    def key_routers(self) -> Iterator[CosineRouter]:
        return (l.router for l in self.pce_layers() if isinstance(l.router, CosineRouter))

    def set_keys_trainable(self, flag: bool) -> None:
        """Phase switch for every key-based router: keys EMA-updated (False) or in the graph (True)."""
        for r in self.key_routers():
            r.set_keys_trainable(flag)

    def set_router_override(self, name: Optional[str], **kwargs: Any) -> None:
        """Route every PCE layer with a parameter-free router (``"uniform"``, ``"positional"``, ``"shared"``)
        or ``None`` (the learned routers)."""
        for l in self.pce_layers():
            l.set_router_override(name, **kwargs)

    def upcycle_experts(self, source: int = 0, optimizer: Optional[torch.optim.Optimizer] = None) -> int:
        """Copy expert ``source`` into the other experts of every PCE layer (after a stabilisation phase with
        the ``"shared"`` router), with its optimizer state when ``optimizer`` is given. Returns the number of
        layers changed."""
        layers = list(self.pce_layers())
        for l in layers:
            l.experts.upcycle(source, optimizer)
        return len(layers)

    def set_attention_enabled(self, flag: bool) -> None:
        for m in self.modules():
            if isinstance(m, DeformableAttention):
                m.enabled = bool(flag)

    @torch.no_grad()
    def init_keys(self, batches: Iterable[torch.Tensor], seed: int = 0, max_samples: int = 20000) -> int:
        """K-Means initialisation of every key-based router, layer by layer (later layers see the features
        produced with the earlier layers' new keys). ``batches``: an iterable of input tensors (or
        ``(images, ...)`` tuples); it is materialised once. Returns the number of routers initialised."""
        data = [b[0] if isinstance(b, (tuple, list)) else b for b in batches]
        if not data:
            raise ValueError("init_keys needs at least one batch of images")
        was_training = self.training
        self.eval()
        count = 0
        try:
            for r in list(self.key_routers()):
                r.start_collecting()
                try:
                    for x in data:
                        self(x.to(next(self.parameters()).device))
                finally:
                    emb = r.stop_collecting()
                r.init_keys(emb, seed=seed + count, max_samples=max_samples)
                count += 1
        finally:
            self.train(was_training)
        return count


# -- presets ----------------------------------------------------------------------------------------
def _stages(channels, depths, patches, strides, attention=(False,) * 8):
    return [dict(channels=c, depth=d, patch_size=p, stride=s, attention=a)
            for c, d, p, s, a in zip(channels, depths, patches, strides, attention)]


_PRESETS: Dict[str, Dict[str, Any]] = {
    # 28x28 grey images (MNIST, Fashion-MNIST): maps 28 -> 14 -> 7 -> 4, four patches per map.
    "fmnist": dict(in_chans=1, stem_channels=32, stem_stride=1, num_experts=4, top_k=1,
                   stages=_stages((48, 96, 192), (1, 1, 1), (7, 4, 2), (2, 2, 2))),
    # 32x32 colour images (CIFAR): 32 -> 16 -> 8 -> 4.
    "cifar": dict(in_chans=3, stem_channels=32, stem_stride=1, num_experts=4, top_k=1,
                  stages=_stages((64, 128, 256), (1, 1, 1), (8, 4, 2), (2, 2, 2))),
    # 224-ish images: strides 4, 8, 16, 32; patches 16, 8, 4, 2 (a 4x4 grid at 256x256).
    "tiny": dict(in_chans=3, stem_channels=32, stem_stride=4, num_experts=4, top_k=1,
                 stages=_stages((32, 64, 128, 256), (1, 1, 1, 1), (16, 8, 4, 2), (1, 2, 2, 2))),
    "small": dict(in_chans=3, stem_channels=48, stem_stride=4, num_experts=8, top_k=1,
                  stages=_stages((64, 128, 256, 512), (1, 1, 2, 1), (16, 8, 4, 2), (1, 2, 2, 2))),
    "base": dict(in_chans=3, stem_channels=64, stem_stride=4, num_experts=8, top_k=1,
                 stages=_stages((64, 128, 256, 512), (2, 2, 4, 2), (16, 8, 4, 2), (1, 2, 2, 2))),
}
for _name, _cfg in _PRESETS.items():
    BACKBONES.register(f"pce_{_name}", obj=dict(_cfg, layer="pce"))
    BACKBONES.register(f"dense_{_name}", obj=dict(_cfg, layer="dense"))

_ARGS = set(inspect.signature(PCEBackbone.__init__).parameters) - {"self"}


def list_backbones(pattern: str = "") -> List[str]:
    """Names of the registered presets (containing ``pattern``)."""
    return [n for n in BACKBONES.names() if pattern in n]


def backbone_config(name: str, **overrides: Any) -> Dict[str, Any]:
    """The keyword arguments a preset passes to :class:`PCEBackbone`, with ``overrides`` applied."""
    if name not in BACKBONES:
        raise KeyError(f"unknown backbone preset {name!r}; available: {', '.join(list_backbones())}")
    unknown = set(overrides) - _ARGS
    if unknown:
        raise TypeError(f"unknown backbone option(s) {sorted(unknown)} for {name!r}; valid: {sorted(_ARGS)}")
    cfg = copy.deepcopy(BACKBONES.get(name))
    cfg.update(copy.deepcopy(overrides))
    return cfg


def build_backbone(name: str, **overrides: Any) -> PCEBackbone:
    """Build a preset, e.g. ``build_backbone("pce_tiny", router="gate", num_experts=8, top_k=1)``."""
    return PCEBackbone(**backbone_config(name, **overrides))
