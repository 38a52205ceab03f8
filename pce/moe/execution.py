"""Execution strategies: how a PCE layer runs its experts on a routed patch map.

Every strategy is one class registered in :data:`~pce.registry.EXECUTIONS` and has one contract::

    strategy.check(options)                                   # at construction: reject option combinations
    strategy.resolve(router, device)(bank, view, weights, options) -> mix [B, C, H, W]

``view`` is the layer's :class:`~pce.layers.patched_map.PatchedMap`, ``weights [B, P, E]`` the routing weights,
``mix`` the routing-weighted expert output put back on the map (before the layer's 1x1 projection).

* ``reference`` / ``fused`` / ``dense`` / ``sparse``: every patch in isolation (plus ``halo`` pixels of the
  neighbours), through the dispatcher of the same name in :mod:`pce.moe.dispatch`;
* ``auto``: ``sparse`` when the router emits exact zeros, otherwise ``fused`` on CUDA and ``dense`` on CPU
  (the faster of the two on each, as measured by ``tools/benchmark.py``);
* ``map``: every expert on the whole map, per-patch weights broadcast to pixels (experts see their
  neighbours; cost E x one expert);
* ``context``: top-1 routing where each pixel is computed by its patch's expert and convolutions read the
  neighbouring patches across the border, at the cost of one expert per pixel.
* ``capacity``: static shapes (GShard / Switch style): each expert runs on a fixed buffer of
  ``ceil(cf * N * k / E)`` tokens, its highest-weight ones; tokens over capacity take the skip path. This is what
  runs whenever a graph is captured (:func:`is_capturing`: ``torch.export``, ONNX, ``torch.compile``,
  ``torch.jit.trace``): ``sparse``/``reference``/``auto`` switch to it. ``context`` switches to
  :class:`~pce.moe.execution_static.StaticContextExecution` instead: the same stitched computation on whole maps, every expert's layer on
  the whole map and each pixel's value selected from its patch's expert after every layer (exact, E x the FLOPs).
  (FX keeps PCE layers as leaves that run eagerly in the traced module: :mod:`pce.layers.fx`.)

A new strategy: subclass :class:`Execution`, implement ``__call__``, add ``@EXECUTIONS.register("name")``.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, ClassVar, Iterator, Optional, Tuple

import torch

from pce.layers.patched_map import PatchedMap
from pce.moe.dispatch import (dispatch_capacity, dispatch_context, dispatch_dense, dispatch_fused, dispatch_reference,
                              dispatch_sparse)
from pce.moe.experts import ExpertBank
from pce.moe.routing import Router, expert_capacity
from pce.registry import EXECUTIONS

__all__ = ["ExecutionOptions", "Execution", "build_execution", "is_capturing", "eager_routing", "CapacityExecution"]


_EAGER_UNDER_TRACE = [False]


@contextmanager
def eager_routing() -> Iterator[None]:
    """Inside this block a ``torch.jit.trace`` runs the eager strategies (routing frozen to the example input,
    on purpose): for analyses of one forward such as FLOP counting (:func:`pce.models.flops.count_flops`)."""
    prev, _EAGER_UNDER_TRACE[0] = _EAGER_UNDER_TRACE[0], True
    try:
        yield
    finally:
        _EAGER_UNDER_TRACE[0] = prev


def is_capturing() -> bool:
    """True while a graph is being captured: ``torch.compile`` / ``torch.export`` (dynamo or non-strict),
    ``torch.onnx.export``, ``torch.jit.trace`` or FX symbolic tracing. Data-dependent shapes and host
    synchronisations are impossible (or silently frozen) there."""
    if _EAGER_UNDER_TRACE[0] and torch.jit.is_tracing():
        return False
    return bool(torch.compiler.is_compiling() or torch.compiler.is_exporting() or torch.jit.is_tracing()
                or torch.onnx.is_in_onnx_export() or torch.fx._symbolic_trace.is_fx_symbolic_tracing())


@dataclass(frozen=True)
class ExecutionOptions:
    """The layer options a strategy reads: ``halo`` (context pixels of isolated patches), whether experts see
    the positional channels, the batch-norm statistics mode and whether the patch grid overlaps."""

    halo: int = 0
    experts_see_position: bool = False
    norm_stats: str = "expert"
    overlapping: bool = False


class Execution:
    """Base strategy. ``norm_stats``: the modes it supports; ``neighbours``: experts already see across patch
    borders (so ``halo`` and overlapping patches make no sense)."""

    name: ClassVar[str] = ""
    norm_stats: ClassVar[Tuple[str, ...]] = ("expert",)
    neighbours: ClassVar[bool] = False

    def check(self, opt: ExecutionOptions) -> None:
        """Raise ``ValueError`` for options this strategy cannot honour."""
        if opt.norm_stats not in ("expert", "layer"):
            raise ValueError(f"norm_stats must be 'expert' or 'layer', got {opt.norm_stats!r}")
        if opt.norm_stats not in self.norm_stats:
            raise ValueError(f"norm_stats={opt.norm_stats!r} (batch-norm statistics pooled over the layer's "
                             f"experts) needs execution='context', not {self.name!r}")
        if self.neighbours and (opt.halo or opt.overlapping):
            raise ValueError(f"execution={self.name!r} already gives experts their neighbours: "
                             "use halo=0 and no overlap")
        if opt.halo and opt.experts_see_position and opt.overlapping:
            raise ValueError("experts_see_position with halo needs non-overlapping patches")

    #: shapes independent of the routing (no host sync, no data-dependent sizes): safe in a captured graph
    static: ClassVar[bool] = False

    def resolve(self, router: Router, device: torch.device) -> "Execution":
        """The strategy that runs for this router and device (``auto`` picks one; others are themselves).
        Under graph capture a data-dependent strategy becomes :class:`CapacityExecution`."""
        return self.captured(router) if (not self.static and is_capturing()) else self

    def captured(self, router: Router) -> "Execution":
        """The static strategy standing in for this one in a captured graph (same outputs in eval mode); it
        sizes its buffers with ``router``'s capacity factor."""
        return CapacityExecution(router)

    def __call__(self, bank: ExpertBank, view: PatchedMap, weights: torch.Tensor,
                 opt: ExecutionOptions) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class IsolatedPatches(Execution):
    """Experts see their own patch (plus ``halo`` pixels); ``dispatch(bank, tokens, weights)`` runs them."""

    dispatch: ClassVar[Callable[[ExpertBank, torch.Tensor, torch.Tensor], torch.Tensor]]

    def __call__(self, bank: ExpertBank, view: PatchedMap, weights: torch.Tensor,
                 opt: ExecutionOptions) -> torch.Tensor:
        B, P, n, h = view.batch, view.grid.num_patches, view.grid.patch_size, opt.halo
        if h:
            tokens = view.extractor.extract_windows(view.map(opt.experts_see_position), view.grid, h)
        else:
            tokens = view.patches(opt.experts_see_position)
        out = self.run_experts(bank, tokens.reshape(B * P, *tokens.shape[2:]), weights.reshape(B * P, -1))
        if h:
            out = out[..., h:h + n, h:h + n]
        return view.reassemble(out)

    def run_experts(self, bank: ExpertBank, tokens: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``tokens [N, C, h, w]``, ``weights [N, E]`` -> weighted expert outputs ``[N, C_out, h, w]``."""
        return type(self).dispatch(bank, tokens, weights)


@EXECUTIONS.register("reference")
class ReferenceExecution(IsolatedPatches):
    name, dispatch = "reference", dispatch_reference


@EXECUTIONS.register("fused")
class FusedExecution(IsolatedPatches):
    name, dispatch, static = "fused", dispatch_fused, True


@EXECUTIONS.register("dense")
class DenseExecution(IsolatedPatches):
    name, dispatch, static = "dense", dispatch_dense, True


@EXECUTIONS.register("sparse")
class SparseExecution(IsolatedPatches):
    name, dispatch = "sparse", dispatch_sparse


@EXECUTIONS.register("auto")
class AutoExecution(Execution):
    """``sparse`` for routers with exact zeros; else ``fused`` on CUDA, ``dense`` on CPU."""

    name = "auto"

    def resolve(self, router: Router, device: torch.device) -> Execution:
        if router.is_sparse:
            return SparseExecution().resolve(router, device)
        return FusedExecution() if device.type == "cuda" else DenseExecution()


@EXECUTIONS.register("capacity")
class CapacityExecution(IsolatedPatches):
    """Static-shape top-k dispatch (:func:`pce.moe.dispatch.dispatch_capacity`): expert e runs on the
    ``capacity`` tokens with the largest weights for e, ``ceil(cf * N * k / E)`` with the router's
    ``capacity_factor`` and ``top_k`` (so a capacity router never overflows it), or all ``N`` tokens (masked
    dense execution) when the router has no capacity factor. With no overflow and batch norm in eval mode
    this equals ``sparse`` exactly; in training mode an expert's batch-norm statistics also see the
    zero-weight tokens of its buffer."""

    name, static = "capacity", True

    def __init__(self, router: Optional[Router] = None) -> None:
        self.router = router

    def resolve(self, router: Router, device: torch.device) -> Execution:
        return CapacityExecution(router)

    @staticmethod
    def capacity(n: int, num_experts: int, router: Optional[Router]) -> int:
        """Tokens per expert for ``n`` tokens: ``ceil(cf * n * k / E)`` capped at ``n``; ``n`` without a
        router capacity factor."""
        cf = getattr(router, "capacity_factor", None)
        if cf is None:
            return n
        return expert_capacity(n, cf, getattr(router, "top_k", None) or num_experts, num_experts)

    def run_experts(self, bank: ExpertBank, tokens: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        cap = self.capacity(tokens.shape[0], bank.num_experts, self.router)
        return dispatch_capacity(bank, tokens, weights, cap)


@EXECUTIONS.register("map")
class MapExecution(Execution):
    """Every expert on the whole (padded) map; per-patch weights broadcast to their pixels."""

    name, neighbours, static = "map", True, True

    def __call__(self, bank: ExpertBank, view: PatchedMap, weights: torch.Tensor,
                 opt: ExecutionOptions) -> torch.Tensor:
        g, n = view.grid, view.grid.patch_size
        wmap = weights.reshape(view.batch, g.grid_h, g.grid_w, -1).permute(0, 3, 1, 2)
        wmap = wmap.repeat_interleave(n, dim=2).repeat_interleave(n, dim=3)  # [B, E, Hp, Wp]
        y_all = bank.forward_all(view.map(opt.experts_see_position))  # [B, E, C, Hp, Wp]
        mix = torch.einsum("bechw,behw->bchw", y_all, wmap.to(y_all.dtype))
        return mix[:, :, :g.height, :g.width]


@EXECUTIONS.register("context")
class ContextExecution(Execution):
    """Top-1 routing, experts reading across patch borders (:func:`pce.moe.dispatch.dispatch_context`); under graph
    capture :class:`~pce.moe.execution_static.StaticContextExecution` computes the same with static shapes."""

    name, neighbours, norm_stats = "context", True, ("expert", "layer")

    def captured(self, router: Router) -> Execution:
        """:class:`~pce.moe.execution_static.StaticContextExecution`: the same outputs (and gradients, batch-norm statistics) with static
        shapes, at E x the FLOPs. ``RuntimeError`` for a router that gives patches several experts (``top_k > 1``,
        expert choice), which eager context execution refuses too."""
        top_k = getattr(router, "top_k", None)
        if (top_k is not None and top_k > 1) or getattr(router, "choice_capacity_factor", None) is not None:
            raise RuntimeError(f"execution='context' needs at most one expert per patch, and {type(router).__name__}"
                               f" (top_k={top_k}) gives several; use top_k=1, or execution='capacity' / 'map'")
        from pce.moe.execution_static import StaticContextExecution  # it builds on this module's Execution

        return StaticContextExecution()

    def __call__(self, bank: ExpertBank, view: PatchedMap, weights: torch.Tensor,
                 opt: ExecutionOptions) -> torch.Tensor:
        whole = self.sole_expert_on_map(bank, view, weights, opt)
        if whole is not None:
            return whole
        B, P = view.batch, view.grid.num_patches
        tokens = view.patches(opt.experts_see_position)
        out = dispatch_context(bank, tokens.reshape(B * P, *tokens.shape[2:]), weights.reshape(B * P, -1),
                               view.windows, opt.norm_stats)
        return view.reassemble(out)

    @staticmethod
    def sole_expert_on_map(bank: ExpertBank, view: PatchedMap, weights: torch.Tensor,
                           opt: ExecutionOptions) -> Optional[torch.Tensor]:
        """When every patch is routed to one and the same expert (the ``"shared"`` stabilisation phase): that
        expert on the whole map ``[B, C, H, W]``, times each patch's weight, exactly what the stitched per-patch
        execution computes, without re-tiling the map for every convolution. ``None`` when routing is mixed, a
        patch is dropped, or the grid pads the map (stitched execution zeroes the padding after every layer)."""
        g = view.grid
        if g.overlapping or g.padded_size != (g.height, g.width):
            return None
        B, P, E = weights.shape
        counts = (weights.detach() != 0).sum((0, 1)).tolist()  # a host sync (dispatch makes its own if mixed)
        if sum(counts) != B * P or max(counts) != B * P:
            return None
        e = counts.index(B * P)
        y = bank.forward_one(view.map(opt.experts_see_position), e)  # [B, C, H, W]
        gh, gw, n = g.grid_h, g.grid_w, g.patch_size
        w = weights[..., e].to(y.dtype).reshape(B, 1, gh, 1, gw, 1)
        return (y.reshape(B, -1, gh, n, gw, n) * w).reshape(y.shape)


def build_execution(name: str, options: ExecutionOptions) -> Execution:
    """The registered strategy ``name``, checked against ``options`` (``ValueError`` naming the known ones)."""
    if name not in EXECUTIONS:
        raise ValueError(f"execution must be one of {tuple(EXECUTIONS.names())}, got {name!r}")
    strategy = EXECUTIONS.get(name)()
    strategy.check(options)
    return strategy
