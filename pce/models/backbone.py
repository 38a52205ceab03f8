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
from dataclasses import replace
from functools import partial
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from timm.layers import calculate_drop_path_rates
from timm.models._features import feature_take_indices
from torch import nn

from pce.layers.attention import DeformableAttention
from pce.layers.fx import check_map, false_when_traced
from pce.models import fx as _fx  # noqa: F401  registers the FX leaf modules with timm
from pce.models.layer import PCELayer  # noqa: F401  registers the "pce" and "dense" layer kinds
from pce.models.routed import (RoutedLayerMixin, init_keys, key_routers, routed_layers, set_attention_enabled,
                               set_keys_trainable, set_router_override, upcycle_experts)
from pce.models.specs import BackboneSpec, StageLike
from pce.models.stages import Stage, StageList, Stem, conv_bn_relu  # noqa: F401  (re-exported)
from pce.moe.experts import torchscript_refusal
from pce.moe.recorder import record_routing
from pce.moe.routing import Router
from pce.registry import LAYERS


def stage_indices(num_stages: int, indices: Union[int, Sequence[int], None]) -> List[int]:
    """timm's index convention for stages (:func:`timm.models._features.feature_take_indices`): ``None`` all,
    an int ``n`` the last ``n``, a sequence the named ones (negative counting from the end). Returns sorted,
    unique absolute indices; ``ValueError`` (not timm's assertion) saying what is valid."""
    if not (indices is None or isinstance(indices, int)):
        indices = [int(i) for i in indices]
    try:
        if indices == []:
            raise ValueError("no stage named")
        taken, _ = feature_take_indices(num_stages, indices)
        if not all(0 <= i < num_stages for i in taken):  # timm asserts, which python -O skips
            raise ValueError("index out of range")
    except (AssertionError, ValueError) as e:
        raise ValueError(f"stage indices {indices!r}: {e}; the model has {num_stages} stages (an int n takes the "
                         f"last n stages, 1 <= n <= {num_stages}; a list names stages 0 .. {num_stages - 1}, "
                         "negative from the end)") from None
    return sorted(set(taken))


def _layer_class(i: int, kind: str) -> Any:
    """The :data:`~pce.registry.LAYERS` entry stage ``i`` builds its layers with."""
    if kind not in LAYERS:
        raise ValueError(f"stage {i}: layer must be one of {' or '.join(map(repr, LAYERS.names()))} "
                         f"(pce.registry.LAYERS), got {kind!r}")
    return LAYERS.get(kind)


class PCEBackbone(nn.Module):
    """Stem + stages of PCE layers with patch sizes that shrink with depth, built from a frozen
    :class:`~pce.models.specs.BackboneSpec` (``PCEBackbone.from_spec(spec)``; ``backbone.spec`` gives it back).

    ``PCEBackbone(stages, **kwargs)`` (or ``PCEBackbone(spec, **overrides)``) builds the spec from keyword
    arguments (:meth:`BackboneSpec.from_kwargs <pce.models.specs.BackboneSpec.from_kwargs>`):

    * ``stages``: one dict per stage with ``channels``, ``depth``, ``patch_size``, ``stride`` (1 or 2) and optionally
      ``attention`` (bool), ``layer`` (a :data:`~pce.registry.LAYERS` name, ``"pce"`` or ``"dense"``: this stage's
      layers, default the backbone's ``layer``) and ``num_experts`` (default the backbone's), so experts can be
      placed in some stages only (e.g. the deep ones, as V-MoE places MoE layers in the last blocks);
    * ``in_chans``; ``stem_channels`` / ``stem_stride`` (1, 2 or 4): the convolutional stem;
    * ``layer``: ``"pce"`` or ``"dense"`` (the dense twin);
    * ``num_experts``, ``router``, ``router_kwargs``, ``top_k``, ``expert``, ``expert_kwargs``, ``pos_encoding``,
      ``num_frequencies``, ``experts_see_position``, ``halo``, ``padding``, ``execution``, ``norm_stats``: the
      :class:`~pce.models.specs.LayerSpec` of every layer;
    * ``attention_kwargs``: for :class:`~pce.layers.attention.DeformableAttention` in stages with ``attention``;
    * ``out_indices``: which stages to return (default all);
    * ``drop_path_rate``: stochastic depth, growing linearly over all layers from 0 to this rate (timm's
      :func:`~timm.layers.calculate_drop_path_rates`), on each layer's residual branch (:class:`Stage`).
    """

    def __init__(self, spec: Union[BackboneSpec, Sequence[StageLike], None] = None, **kwargs: Any) -> None:
        super().__init__()
        if isinstance(spec, BackboneSpec):
            spec = BackboneSpec.from_kwargs(**{**spec.to_kwargs(), **kwargs}) if kwargs else spec
        else:
            spec = BackboneSpec.from_kwargs(**kwargs) if spec is None else BackboneSpec.from_kwargs(spec, **kwargs)
        self.spec = spec
        self.in_chans, self.layer_type, self.padding = spec.in_chans, spec.kind, spec.layer.padding
        stem: List[nn.Module] = [conv_bn_relu(spec.in_chans, spec.stem_channels, 2 if spec.stem_stride >= 2 else 1)]
        if spec.stem_stride == 4:
            stem.append(conv_bn_relu(spec.stem_channels, spec.stem_channels, 2))
        self.stem = Stem(*stem)
        self.stages = StageList()
        info: List[Dict[str, Any]] = []
        cin, stride = spec.stem_channels, spec.stem_stride
        dpr = calculate_drop_path_rates(float(spec.drop_path_rate), [st.depth for st in spec.stages], stagewise=True)
        for i, st in enumerate(spec.stages):
            kind, layer = spec.stage_layer(i)
            make_layer = partial(_layer_class(i, kind).from_spec, st.channels, layer)
            attn = partial(DeformableAttention, st.channels, **(spec.attention_kwargs or {})) if st.attention else None
            self.stages.append(Stage(cin, st.channels, st.stride, st.depth, make_layer, attn, dpr[i]))
            stride *= st.stride
            info.append({"name": f"stage{i + 1}", "channels": st.channels, "stride": stride,
                         "patch_size": st.patch_size, "layer": kind, "num_chs": st.channels, "reduction": stride,
                         "module": f"stages.{i}"})
            cin = st.channels
        n = len(spec.stages)
        self.out_indices = tuple(range(n)) if spec.out_indices is None else tuple(stage_indices(n, spec.out_indices))
        self.feature_info = [info[i] for i in self.out_indices]
        self._all_info = info
        self.num_features = info[-1]["channels"]
        self.out_channels = [f["channels"] for f in self.feature_info]

    @classmethod
    def from_spec(cls, spec: BackboneSpec) -> "PCEBackbone":
        """The backbone ``spec`` describes."""
        return cls(spec)

    def __prepare_scriptable__(self) -> "PCEBackbone":
        """``torch.jit.script`` refuses every backbone, PCE or dense twin, with PCE's clear ``RuntimeError``."""
        raise torchscript_refusal("PCE backbones (and their dense twins)")

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
        wanted = list(self.out_indices) if indices is None else stage_indices(n, indices)
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
        self.spec = replace(self.spec, stages=self.spec.stages[:keep], out_indices=self.out_indices)
        self.feature_info = [self._all_info[i] for i in self.out_indices]
        self.num_features = self._all_info[-1]["channels"]
        self.out_channels = [f["channels"] for f in self.feature_info]

    # -- PCE controls (pce.models.routed's walkers over this backbone) ---------------------------------------
    def pce_layers(self) -> Iterator[RoutedLayerMixin]:
        """Every routed layer of the backbone (its PCE layers, and e.g. a :class:`pce.PCEConv2d` put in by
        :func:`pce.convert`), in module order."""
        return (layer for _, layer in routed_layers(self))

    def key_routers(self) -> Iterator[Router]:
        """The learned routers that use keys (``Router.uses_keys``), in layer order."""
        return key_routers(self)

    def set_keys_trainable(self, flag: bool) -> None:
        """Phase switch for every key-based router: keys EMA-updated (False) or in the graph (True)."""
        set_keys_trainable(self, flag)

    def set_router_override(self, name: Optional[str], **kwargs: Any) -> None:
        """Route every PCE layer with a parameter-free router (``"uniform"``, ``"positional"``, ``"shared"``)
        or ``None`` (the learned routers)."""
        set_router_override(self, name, **kwargs)

    def upcycle_experts(self, source: int = 0, optimizer: Optional[torch.optim.Optimizer] = None) -> int:
        """Copy expert ``source`` into the other experts of every PCE layer (after a stabilisation phase with
        the ``"shared"`` router), with its optimizer state when ``optimizer`` is given. Returns the number of
        layers changed."""
        return upcycle_experts(self, source, optimizer)

    def set_attention_enabled(self, flag: bool) -> None:
        set_attention_enabled(self, flag)

    def init_keys(self, batches: Iterable[torch.Tensor], seed: int = 0, max_samples: int = 20000) -> int:
        """K-Means initialisation of every key-based router, layer by layer (later layers see the features
        produced with the earlier layers' new keys; :func:`pce.models.routed.init_keys`). ``batches``: an iterable
        of input tensors (or ``(images, ...)`` tuples); it is materialised once. Returns the number of routers
        initialised."""
        return init_keys(self, batches, seed=seed, max_samples=max_samples)


def iter_backbones(model: nn.Module) -> Iterator[PCEBackbone]:
    """Every :class:`PCEBackbone` inside ``model`` (a detector, an smp model, a DDP / EMA wrapper, ...): the
    objects whose controls (``set_router_override``, ``set_keys_trainable``, ``init_keys``, ...) phases use."""
    return (m for m in model.modules() if isinstance(m, PCEBackbone))


def init_router_keys(model: nn.Module, batches: Iterable[Any], seed: int = 0, max_samples: int = 20000) -> int:
    """K-Means initialisation of every keyed router of ``model`` from image batches: each
    :class:`PCEBackbone` inside ``model`` initialises its own from ``batches`` (what the backbone sees, e.g. a
    detector's preprocessed images), then the keyed routers outside every backbone (a :func:`pce.convert`-ed
    timm / smp / torchvision model, a converted head) from ``model(batch)``. Returns the number of routers."""
    batches = list(batches)
    backbones = list(iter_backbones(model))
    count = sum(bb.init_keys(batches, seed=seed, max_samples=max_samples) for bb in backbones)
    inside = {id(r) for bb in backbones for r in bb.key_routers()}
    rest = [r for r in key_routers(model) if id(r) not in inside]
    if rest:
        count += init_keys(model, batches, seed=seed + count, max_samples=max_samples, routers=rest)
    return count
