"""Multi-scale PCE backbones (stem + stages of PCE or dense layers) and their controls.

``forward(x)`` returns an ``OrderedDict`` of feature maps (``stage1`` ... ) that torchvision's FPN and
segmentation-models-pytorch decoders consume as is; :meth:`PCEBackbone.forward_intermediates` (timm's
interface) gives chosen stage maps, optionally with the stem's; ``forward(x, return_routing=True)`` is a
convenience over :func:`pce.record_routing`. ``feature_info`` lists ``name``, ``channels``, ``stride``
and ``patch_size`` of each returned map (plus timm's ``num_chs``/``reduction``/``module`` keys).
Presets (``pce_tiny`` ...) and ``build_backbone`` live in :mod:`pce.models.presets`.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from pce.layers.attention import DeformableAttention
from pce.layers.fx import check_map, false_when_traced
from pce.models import fx as _fx  # noqa: F401  registers the FX leaf modules with timm
from pce.models.layer import DenseLayer, PCELayer
from pce.moe.recorder import record_routing
from pce.moe.routing import Router


def conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


_STAGE_KEYS = {"channels", "depth", "patch_size", "stride", "attention", "layer", "num_experts"}


def _stage_spec(i: int, spec: Dict[str, Any], layer: str, num_experts: int) -> Dict[str, Any]:
    """One stage dict, checked, with the backbone's defaults filled in (``ValueError`` naming the stage)."""
    spec = dict(spec)
    unknown = set(spec) - _STAGE_KEYS
    if unknown:
        raise ValueError(f"stage {i}: unknown key(s) {sorted(unknown)}")
    spec.setdefault("depth", 1)
    spec.setdefault("stride", 2)
    spec.setdefault("layer", layer)
    spec.setdefault("num_experts", num_experts)
    if spec["stride"] not in (1, 2):
        raise ValueError(f"stage {i}: stride must be 1 or 2, got {spec['stride']}")
    if spec["layer"] not in ("pce", "dense"):
        raise ValueError(f"stage {i}: layer must be 'pce' or 'dense', got {spec['layer']!r}")
    if not isinstance(spec["num_experts"], int) or spec["num_experts"] < 1:
        raise ValueError(f"stage {i}: num_experts must be an integer >= 1, got {spec['num_experts']!r}")
    return spec


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
    followed by deformable attention. ``[B, C_in, H, W] -> [B, C_out, H / s, W / s]``."""

    def __init__(self, cin: int, cout: int, stride: int, depth: int, layer_fn, attention_fn=None) -> None:
        super().__init__()
        self.down = conv_bn_relu(cin, cout, stride) if (stride != 1 or cin != cout) else nn.Identity()
        self.layers = nn.ModuleList([layer_fn() for _ in range(depth)])
        self.attn = nn.ModuleList([attention_fn() for _ in range(depth)]) if attention_fn else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.down(x)
        for i, layer in enumerate(self.layers):
            x = layer(x)
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
        self.stem = Stem(*stem)
        self.stages = nn.ModuleList()
        info: List[Dict[str, Any]] = []
        cin, stride = stem_channels, stem_stride
        for i, spec in enumerate(stages):
            spec = _stage_spec(i, spec, layer, num_experts)
            cout, depth, patch, s = spec["channels"], spec["depth"], spec["patch_size"], spec["stride"]
            stage_layer, stage_experts = spec["layer"], spec["num_experts"]
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

    def _check_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` when it is ``[B, in_chans, H, W]`` (else ``ValueError``); a checking node in FX graphs."""
        return check_map(x, self.in_chans, "backbone")

    def forward_intermediates(self, x: torch.Tensor, indices: Union[int, Sequence[int], None] = None,
                              intermediates_only: bool = False, stop_early: bool = True,
                              stem_outputs: bool = False
                              ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """timm's interface: the maps of stages ``indices`` (default ``out_indices``; an int ``n``: the last
        ``n`` stages; negative indices count from the end), ``[B, C_i, H / s_i, W / s_i]`` each.

        ``intermediates_only=False`` returns ``(final, intermediates)`` with ``final`` the deepest stage's map
        (all stages run); otherwise the list, computing no stage past the last one asked for when
        ``stop_early``. ``stem_outputs``: prepend the output of every stem block (strides 2, 4)."""
        x = self._check_input(x)
        n = len(self.stages)
        if indices is None:
            wanted = list(self.out_indices)
        elif isinstance(indices, int):
            if not 0 < indices <= n:
                raise ValueError(f"indices={indices}: the last n stages need 1 <= n <= {n}")
            wanted = list(range(n - indices, n))
        else:
            bad = [i for i in indices if not -n <= i < n]
            if bad:
                raise ValueError(f"indices {bad} out of range for {n} stages (0 .. {n - 1}, or negative from the end)")
            wanted = [i % n for i in indices]
        stem = self.stem.forward_intermediates(x)
        outs: List[torch.Tensor] = list(stem) if stem_outputs else []
        h = stem[-1]
        last = max(wanted) if (intermediates_only and stop_early and wanted) else n - 1
        for i, stage in enumerate(self.stages[:last + 1]):
            h = stage(h)
            if i in wanted:
                outs.append(h)
        return outs if intermediates_only else (h, outs)

    def forward(self, x: torch.Tensor, return_routing: bool = False):
        """``x [B, in_chans, H, W]`` -> ``OrderedDict[name, [B, C_i, H/s_i, W/s_i]]``; with ``return_routing``
        also the :class:`~pce.moe.routing.RoutingResult` of every PCE layer (forward order), as
        :func:`pce.record_routing` gives them (not in FX graphs: record around the traced module's call)."""
        return_routing = false_when_traced(return_routing, "an FX-traced backbone returns the maps only: "
                                           "use pce.record_routing(traced_module) around its call")
        if return_routing:
            with record_routing(self) as rec:
                feats = self.forward(x)
            return feats, rec.results
        maps = self.forward_intermediates(x, self.out_indices, intermediates_only=True)
        return OrderedDict((self._all_info[i]["name"], m) for i, m in zip(self.out_indices, maps))

    def truncate_stages(self, keep: int) -> None:
        """Drop every stage from index ``keep`` on (their parameters go too), keeping ``feature_info``,
        ``out_indices``, ``num_features`` and ``out_channels`` consistent with the stages left (timm's
        ``prune_intermediate_layers``)."""
        if not 1 <= keep <= len(self.stages):
            raise ValueError(f"keep={keep}: a backbone keeps 1 .. {len(self.stages)} stages")
        self.stages = self.stages[:keep]
        self._all_info = self._all_info[:keep]
        self.out_indices = tuple(i for i in self.out_indices if i < keep) or (keep - 1,)
        self.feature_info = [self._all_info[i] for i in self.out_indices]
        self.num_features = self._all_info[-1]["channels"]
        self.out_channels = [f["channels"] for f in self.feature_info]

    # -- PCE controls ------------------------------------------------------------------------------
    def pce_layers(self) -> Iterator[PCELayer]:
        return (m for m in self.modules() if isinstance(m, PCELayer))

    def key_routers(self) -> Iterator[Router]:
        """The learned routers that use keys (``Router.uses_keys``), in layer order."""
        return (l.router for l in self.pce_layers() if l.router.uses_keys)

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


def iter_backbones(model: nn.Module) -> Iterator[PCEBackbone]:
    """Every :class:`PCEBackbone` inside ``model`` (a detector, an smp model, a DDP / EMA wrapper, ...): the
    objects whose controls (``set_router_override``, ``set_keys_trainable``, ``init_keys``, ...) phases use."""
    return (m for m in model.modules() if isinstance(m, PCEBackbone))
