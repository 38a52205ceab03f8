"""The PCE layer: patch grid -> position -> route -> execute the experts -> 1x1 projection (+ skip)."""
from __future__ import annotations

import logging
from typing import Any, Dict, Optional, Set, Tuple

import torch
from torch import nn

from pce.layers.fx import fx_leaf
from pce.layers.patched_map import PatchedMap
from pce.layers.patches import PatchExtractor, PatchGrid
from pce.layers.pointwise import PointwiseConv
from pce.layers.positional import PositionalEncoding
from pce.moe.execution import ExecutionOptions, build_execution
from pce.moe.experts import build_expert_bank
from pce.moe.recorder import RoutingSource
from pce.moe.routers import build_router
from pce.moe.routing import Router

logger = logging.getLogger("pce")


class PCELayer(RoutingSource, nn.Module):
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
    :meth:`set_router_override`; it has no state, so checkpoints never contain it.
    """

    def __init__(self, channels: int, patch_size: int, num_experts: int = 4, router: str = "cosine",
                 router_kwargs: Optional[Dict[str, Any]] = None, top_k: Optional[int] = None,
                 expert: str = "residual", expert_kwargs: Optional[Dict[str, Any]] = None,
                 pos_encoding: str = "coord", num_frequencies: int = 4, experts_see_position: bool = False,
                 halo: int = 0, patch_stride: Optional[int] = None, padding: str = "fit",
                 execution: str = "auto", norm_stats: str = "expert") -> None:
        super().__init__()
        if not isinstance(num_experts, int) or num_experts < 1:
            raise ValueError(f"num_experts must be an integer >= 1, got {num_experts!r}")
        self.options = ExecutionOptions(halo, experts_see_position, norm_stats,
                                        overlapping=patch_stride not in (None, patch_size))
        self.strategy = build_execution(execution, self.options)
        self.channels, self.patch_size, self.num_experts = channels, patch_size, num_experts
        self.halo, self.execution, self.norm_stats = halo, execution, norm_stats
        self.experts_see_position = experts_see_position
        self.extractor = PatchExtractor(patch_size, patch_stride, padding)
        self.pos = PositionalEncoding(pos_encoding, num_frequencies)
        rkw = dict(router_kwargs or {})
        if top_k is not None:
            rkw["top_k"] = top_k
        self.router: Router = build_router(router, self.router_in_channels, num_experts, **rkw)
        expert_in = self.router_in_channels if experts_see_position else channels
        self.experts = build_expert_bank(expert, num_experts, expert_in, channels, **(expert_kwargs or {}))
        self.proj = PointwiseConv(channels, channels, bias=False)
        self.router_override: Optional[Router] = None
        self._grids_seen: Set[Tuple[int, int]] = set()

    def extra_repr(self) -> str:
        return f"channels={self.channels}, patch_size={self.patch_size}, E={self.num_experts}, execution={self.execution!r}"

    @property
    def router_in_channels(self) -> int:
        return self.channels + self.pos.num_channels

    # -- phases ----------------------------------------------------------------------------------
    def set_router_override(self, name: Optional[str], **kwargs: Any) -> None:
        """Route with a parameter-free registered router (``"uniform"``, ``"positional"``, ``"shared"``) instead of
        the learned one, e.g. during a stabilisation phase; ``None`` restores the learned router. The learned
        router's ``top_k`` carries over unless given, so stabilisation costs what routing costs."""
        if name is None:
            self.router_override = None
            return
        if self.router.top_k is not None:
            kwargs.setdefault("top_k", self.router.top_k)
        r = build_router(name, self.router_in_channels, self.num_experts, **kwargs)
        if not r.parameter_free or any(True for _ in r.parameters()):
            raise ValueError(f"router override {name!r} has parameters; use a parameter-free router")
        self.router_override = r.train(self.training)

    def current_router(self) -> Router:
        """The router this forward uses: the override when one is set, else the learned router."""
        return self.router_override if self.router_override is not None else self.router

    def __prepare_scriptable__(self) -> "PCELayer":
        raise RuntimeError("PCE layers cannot be compiled with torch.jit.script (routing, registries and "
                           "dataclasses are plain Python); export with torch.export / ONNX (tools/export.py) "
                           "or torch.jit.trace, which keep routing input-dependent")

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


class DenseLayer(nn.Module):
    """The dense twin of :class:`PCELayer`: one expert of the same type on the whole map, ``x + proj(expert(x))``."""

    def __init__(self, channels: int, expert: str = "residual", expert_kwargs: Optional[Dict[str, Any]] = None,
                 **_: Any) -> None:
        super().__init__()
        self.channels = channels
        self.experts = build_expert_bank(expert, 1, channels, channels, **(expert_kwargs or {}))
        self.proj = PointwiseConv(channels, channels, bias=False)

    @fx_leaf
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, C, H, W]`` -> ``[B, C, H, W]``; an FX leaf like :class:`PCELayer` (the same graph nodes)."""
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"DenseLayer expects [B, {self.channels}, H, W], got {tuple(x.shape)}")
        return x + self.proj(self.experts.forward_one(x, 0))
