"""The PCE layer: patch grid -> position -> route -> execute the experts -> 1x1 projection (+ skip)."""
from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any, Dict, Optional, Set, Tuple

import torch
from torch import nn

from pce.layers.fx import fx_leaf
from pce.layers.patched_map import PatchedMap
from pce.layers.patches import PatchExtractor, PatchGrid
from pce.layers.pointwise import PointwiseConv
from pce.layers.positional import PositionalEncoding
from pce.models.routed import RoutedLayerMixin
from pce.models.specs import LayerSpec, layer_spec
from pce.moe.execution import Execution, build_execution
from pce.moe.experts import build_expert_bank, torchscript_refusal
from pce.moe.routers import build_router
from pce.moe.routing import Router
from pce.registry import EXECUTIONS, LAYERS

logger = logging.getLogger("pce")


def execution_name(strategy: Execution) -> str:
    """The name ``strategy``'s class is registered under in :data:`~pce.registry.EXECUTIONS` (else its ``name``)."""
    return next((n for n in EXECUTIONS.names() if EXECUTIONS.get(n) is type(strategy)), strategy.name)


@LAYERS.register("pce")
class PCELayer(RoutedLayerMixin, nn.Module):
    """One Positional Convolution Experts layer, ``[B, C, H, W] -> [B, C, H, W]``.

    1. fit the patch grid to the map (``padding="fit"``: shrink the patches to tile it when they can, else pad;
       ``"pad"``: zero-pad; ``"error"``: fail, see :mod:`pce.layers.patches`) and add positional channels;
    2. route: weights ``[B, P, E]`` (:meth:`pce.moe.routing.Router.route`); the result goes to any
       :func:`pce.record_routing` block around the forward, and nowhere else;
    3. execute the experts (``execution``: a strategy of :mod:`pce.moe.execution`; default ``"auto"``):
       routing-weighted sum of their outputs, reassembled on the map;
    4. ``out = x + proj_1x1(mixture)``. A patch with all-zero weights (dropped) outputs exactly ``x``.

    ``norm_stats="layer"`` (context execution only): the experts' batch norms share the statistics of all the
    layer's pixels (per-expert affine), as a dense layer's batch norm would, instead of each expert's own.
    ``router_override``: a parameter-free router used instead of the learned one (training phases), set by
    :meth:`~pce.models.routed.RoutedLayerMixin.set_router_override`; it has no state, so checkpoints never contain
    it. The phase controls (override, keys, upcycling) are those of every routed layer
    (:class:`~pce.models.routed.RoutedLayerMixin`).

    Built from a frozen :class:`~pce.models.specs.LayerSpec` (:meth:`from_spec`, or keyword options that make
    one); ``layer.spec`` gives it back.
    """

    def __init__(self, channels: int, patch_size: Optional[int] = None, *, spec: Optional[LayerSpec] = None,
                 **options: Any) -> None:
        """``PCELayer(64, patch_size=8, num_experts=4, router="gate", top_k=1)``: ``options`` are the fields of
        :class:`~pce.models.specs.LayerSpec`, applied to ``spec`` when one is given (:meth:`from_spec`)."""
        super().__init__()
        if patch_size is not None:
            options["patch_size"] = patch_size
        spec = layer_spec(spec, **options)
        if spec.patch_size is None:
            raise TypeError("PCELayer needs a patch_size (or a LayerSpec with one)")
        self._spec = spec
        self.options = spec.execution_options()
        self.strategy: Execution = build_execution(spec.execution, self.options)
        self.channels, self.patch_size, self.num_experts = channels, spec.patch_size, spec.num_experts
        self.halo, self.norm_stats, self.experts_see_position = spec.halo, spec.norm_stats, spec.experts_see_position
        self.extractor = PatchExtractor(spec.patch_size, spec.patch_stride, spec.padding)
        self.pos = PositionalEncoding(spec.pos_encoding, spec.num_frequencies)
        self.router: Router = build_router(spec.router, self.router_in_channels, spec.num_experts, **spec.router_args())
        expert_in = self.router_in_channels if spec.experts_see_position else channels
        self.experts = build_expert_bank(spec.expert, spec.num_experts, expert_in, channels, **spec.expert_kwargs)
        self.proj = PointwiseConv(channels, channels, bias=False)
        self.router_override: Optional[Router] = None
        self._grids_seen: Set[Tuple[int, int]] = set()

    @classmethod
    def from_spec(cls, channels: int, spec: LayerSpec) -> "PCELayer":
        """The layer ``spec`` describes, on ``channels``-channel maps ``[B, channels, H, W]``."""
        return cls(channels, spec=spec)

    @property
    def spec(self) -> LayerSpec:
        """The :class:`~pce.models.specs.LayerSpec` this layer was built from, with its current ``execution``."""
        return self._spec if self._spec.execution == self.execution else replace(self._spec, execution=self.execution)

    @property
    def execution(self) -> str:
        """The registered name of the execution strategy that runs the experts (``layer.strategy``). Setting it
        switches the strategy (checked against the layer's options; ``ValueError`` naming the known ones)."""
        return execution_name(self.strategy)

    @execution.setter
    def execution(self, name: str) -> None:
        self.strategy = build_execution(name, self.options)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, patch_size={self.patch_size}, E={self.num_experts}, execution={self.execution!r}"

    @property
    def router_in_channels(self) -> int:
        return self.channels + self.pos.num_channels

    def __prepare_scriptable__(self) -> "PCELayer":
        raise torchscript_refusal("PCE layers")

    # -- forward -----------------------------------------------------------------------------------
    @fx_leaf
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, C, H, W]`` -> ``[B, C, H, W]``. An FX leaf (:func:`pce.layers.fx.fx_leaf`): the grid, padding
        and routing depend on the map, so FX graphs hold the layer as one ``call_module`` node."""
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"PCELayer expects [B, {self.channels}, H, W], got {tuple(x.shape)}")
        view = PatchedMap(x, self.extractor, self.pos)
        self._log_grid(view.grid)
        router = self.current_router()
        routing = router.route(view)
        g = view.grid
        routing.grid, routing.patch_size, routing.patch_stride = (g.grid_h, g.grid_w), g.patch_size, g.stride
        routing.map_size = (g.height, g.width)
        mix = self.strategy.resolve(router, x.device)(self.experts, view, routing.weights, self.options)
        self.emit_routing(routing)
        return x + self.proj(mix)

    def _log_grid(self, grid: PatchGrid) -> None:
        """Say once per map size when the grid is not the nominal one (patches shrunk to fit, or padding)."""
        size = (grid.height, grid.width)
        if size in self._grids_seen or torch.compiler.is_compiling() or torch.jit.is_tracing():
            return
        self._grids_seen.add(size)
        if grid.patch_size != self.patch_size or grid.pad_h or grid.pad_w:
            logger.info("PCE layer (channels=%d, patch_size=%d): a %dx%d map uses a %dx%d grid of %d-pixel "
                        "patches%s", self.channels, self.patch_size, grid.height, grid.width, grid.grid_h,
                        grid.grid_w, grid.patch_size,
                        f", zero-padded to {grid.padded_size[0]}x{grid.padded_size[1]}"
                        if grid.pad_h or grid.pad_w else " (shrunk to tile the map)")


@LAYERS.register("dense")
class DenseLayer(nn.Module):
    """The dense twin of :class:`PCELayer`: one expert of the same type on the whole map, ``x + proj(expert(x))``.
    Of a :class:`~pce.models.specs.LayerSpec` it reads the expert fields only (other options are ignored)."""

    def __init__(self, channels: int, expert: str = "residual", expert_kwargs: Optional[Dict[str, Any]] = None,
                 **_: Any) -> None:
        super().__init__()
        self.channels = channels
        self.experts = build_expert_bank(expert, 1, channels, channels, **(expert_kwargs or {}))
        self.proj = PointwiseConv(channels, channels, bias=False)

    @classmethod
    def from_spec(cls, channels: int, spec: LayerSpec) -> "DenseLayer":
        """One expert of ``spec.expert`` on ``[B, channels, H, W]`` maps."""
        return cls(channels, expert=spec.expert, expert_kwargs=spec.expert_kwargs)

    def __prepare_scriptable__(self) -> "DenseLayer":
        raise torchscript_refusal("Dense layers (the dense twins of PCE layers)")

    @fx_leaf
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, C, H, W]`` -> ``[B, C, H, W]``; an FX leaf like :class:`PCELayer` (the same graph nodes)."""
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"DenseLayer expects [B, {self.channels}, H, W], got {tuple(x.shape)}")
        return x + self.proj(self.experts.forward_one(x, 0))
