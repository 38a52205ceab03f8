"""The router interface shared by every routing strategy.

A router maps patches ``[B, P, C, n, n]`` (content plus positional channels) and the patch centres
``[P, 2]`` to a :class:`RoutingResult`: non-negative weights ``[B, P, E]`` that sum to at most 1 per patch,
the logits/probabilities they came from, the router's auxiliary losses and detached statistics.

The generic post-processing in :meth:`Router.finalize` gives every router the same options:
``top_k`` (keep the k largest weights; exact zeros elsewhere), ``renormalize`` (kept weights sum to 1; or
``"straight_through"``: they sum to 1 in the forward pass, while gradients flow as if they were the raw
probabilities, so a top-1 expert's output is not scaled down yet the router still learns from the task loss) and
``capacity_factor`` (each expert accepts at most ``ceil(capacity_factor * N * k / E)`` of the ``N = B * P``
patches; the lowest-probability assignments beyond capacity are dropped).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, ClassVar, List, Optional, Tuple, Union

import torch
from torch import nn

if TYPE_CHECKING:  # pragma: no cover - type hints only
    from pce.layers.patched_map import PatchedMap


@dataclass
class RoutingResult:
    """What a router decided for one layer: plain data, no caches, no methods with side effects.

    Attributes:
        weights: ``[B, P, E]`` mixing weights used by the layer (zeros = expert skipped for that patch).
        probs: ``[B, P, E]`` the router's probabilities before top-k / threshold / capacity.
        logits: ``[B, P, E]`` pre-softmax scores, or ``None`` for routers without logits.
        grid: ``(grid_h, grid_w)`` of the patch grid (set by the layer): patch ``p`` sits at row
            ``p // grid_w``, column ``p % grid_w``.
        patch_size / patch_stride: the patch side and step in the layer's map pixels (set by the layer; ``None``
            when the patches are cells of uneven sides).
        map_size: ``(H, W)`` of the map the patches cut (set by the layer: a PCE layer's input, a
            :class:`pce.PCEConv2d`'s output), so maps of the routing can be scaled to the image.
        cell_rows / cell_cols: the borders of uneven cells in map pixels (``gh + 1`` / ``gw + 1`` increasing
            integers from 0 to ``H`` / ``W``: patch ``p`` covers rows ``cell_rows[p // gw]:cell_rows[p // gw + 1]``),
            or ``None`` for square patches (``patch_size`` / ``patch_stride`` describe them).
        balance: the layer's own load-balancing term (a key of :data:`pce.moe.balance.BALANCE_LOSSES`), which the
            ``balance`` weight of :func:`pce.router_loss` applies to this result; ``None``: the default (Switch).

    Losses: :func:`pce.moe.losses.routing_aux_losses`; statistics: :mod:`pce.analysis.stats`.
    """

    weights: torch.Tensor
    probs: torch.Tensor
    logits: Optional[torch.Tensor] = None
    grid: Optional[Tuple[int, int]] = None
    patch_size: Optional[int] = None
    patch_stride: Optional[int] = None
    map_size: Optional[Tuple[int, int]] = None
    cell_rows: Optional[Tuple[int, ...]] = None
    cell_cols: Optional[Tuple[int, ...]] = None
    balance: Optional[str] = None

    @property
    def num_experts(self) -> int:
        return self.weights.shape[-1]

    def detach(self) -> "RoutingResult":
        """A copy with every tensor detached from the autograd graph."""
        d = lambda t: None if t is None else t.detach()  # noqa: E731
        return replace(self, weights=d(self.weights), probs=d(self.probs), logits=d(self.logits))


def top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask ``[..., E]`` of the ``k`` largest entries of the last dimension."""
    idx = scores.topk(k, dim=-1).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, idx, torch.ones_like(idx, dtype=torch.bool))


def expert_capacity(n: int, capacity_factor: float, k: int, num_experts: int) -> int:
    """Tokens one expert accepts of ``n``: ``min(n, ceil(capacity_factor * n * k / num_experts))``.

    Written for graph capture too: with a symbolic ``n`` (a dynamic batch) it stays a symbolic integer with no
    branch on ``n`` (``torch.sym_min``), so ``torch.export`` needs no guard on it; with plain integers it is the
    plain ``min``. Under ``torch.jit.trace`` (fvcore's FLOP counting) a size arrives as a 0-d tensor: it is read as
    the integer it holds (the trace records that capacity as a constant)."""
    if isinstance(n, torch.Tensor):
        n = int(n)
    return torch.sym_min(n, math.ceil(capacity_factor * n * k / num_experts))


def capacity_mask(assigned: torch.Tensor, priority: torch.Tensor, capacity: int) -> torch.Tensor:
    """Keep at most ``capacity`` assignments per expert, highest ``priority`` first.

    ``assigned``: bool ``[N, E]``; ``priority``: ``[N, E]``. Returns bool ``[N, E]``. Vectorised: no loop.
    Equal priorities keep the lower token index first (the order of a stable descending sort), computed with
    unstable sorts only, so that every capture path has it (ONNX has no stable sort): the sorted priorities give
    each token its dense rank (0 = highest; ties share it), and ``dense_rank * N + token`` is a unique integer key
    whose ascending order is the stable order, whatever the sort does with ties.
    """
    n = assigned.shape[0]
    score = torch.where(assigned, priority, torch.full_like(priority, -math.inf))
    values, perm = score.sort(dim=0, descending=True)  # values are deterministic; perm is not, among ties
    ar = torch.arange(n, device=perm.device).unsqueeze(1).expand_as(perm)
    previous = values.gather(0, (ar - 1).clamp_min(0))  # the value one place up (no slice: no size n - 1)
    new = (values != previous) | (ar == 0)  # a sorted position that starts a group of equal priorities
    dense = torch.empty_like(perm).scatter_(0, perm, new.long().cumsum(0) - 1)  # [N, E]: tied tokens share it
    order = (dense * n + ar).argsort(dim=0)  # unique keys: stable order without a stable sort
    rank = torch.empty_like(order).scatter_(0, order, ar)
    return assigned & (rank < capacity)


class Router(nn.Module):
    """Base class: subclasses implement :meth:`score` and may override :meth:`forward` or :meth:`route`.

    The protocol the layer, the engine and the tools rely on (never the class):

    * :meth:`route` ``(view: PatchedMap) -> RoutingResult``: what :class:`~pce.models.layer.PCELayer` calls.
      The default cuts patches with positional channels and calls ``forward``; a router may route from the
      map itself (the cosine router projects the map first, a fast path with the same result).
    * ``parameter_free``: a router without parameters, usable as a phase's ``router_override``.
    * ``uses_keys``: a keyed router (keys initialised by K-Means, EMA-updated, then trainable) also has
      ``keys``, ``set_keys_trainable(flag)``, ``start_collecting()`` / ``stop_collecting()`` and
      ``init_keys(embeddings, seed, max_samples)``.
    * :attr:`active_fraction`: the fraction of the experts one patch runs (FLOP and parameter counts).

    Args:
        num_experts: E >= 1.
        top_k: keep only the k largest weights per patch (``None``: keep all).
        renormalize: ``True``: rescale the kept weights to sum to 1; ``"straight_through"``: the same values,
            gradients of the unrescaled weights; ``False``: keep the probabilities.
        capacity_factor: expert capacity ``ceil(cf * N * k / E)``; ``None`` disables dropping.
    """

    uses_keys: ClassVar[bool] = False
    parameter_free: ClassVar[bool] = False

    def __init__(self, num_experts: int, top_k: Optional[int] = None, renormalize: Union[bool, str] = False,
                 capacity_factor: Optional[float] = None) -> None:
        super().__init__()
        if renormalize not in (True, False, "straight_through"):
            raise ValueError(f"renormalize must be True, False or 'straight_through', got {renormalize!r}")
        if not isinstance(num_experts, int) or num_experts < 1:
            raise ValueError(f"num_experts must be an integer >= 1, got {num_experts!r}")
        if top_k is not None and not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        if capacity_factor is not None and capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be > 0, got {capacity_factor}")
        self.num_experts = num_experts
        self.top_k = top_k
        self.renormalize = renormalize
        self.capacity_factor = capacity_factor

    @property
    def is_sparse(self) -> bool:
        """True when weights contain exact zeros, so skipping experts saves work."""
        return (self.top_k is not None and self.top_k < self.num_experts) or self.capacity_factor is not None

    @property
    def active_fraction(self) -> float:
        """Fraction of the experts one patch runs: ``top_k / E`` under top-k, else 1 (soft routing). With a
        ``capacity_factor`` this is an upper bound (patches over capacity run fewer experts)."""
        if self.top_k is not None and self.top_k < self.num_experts:
            return self.top_k / self.num_experts
        return 1.0

    def route(self, view: "PatchedMap") -> RoutingResult:
        """Route the patches of one map (``view``: :class:`~pce.layers.patched_map.PatchedMap`)."""
        return self(view.patches_with_position(), view.positions)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, top_k={self.top_k}, renormalize={self.renormalize}, "
                f"capacity_factor={self.capacity_factor}")

    def forward(self, patches: torch.Tensor, positions: torch.Tensor) -> RoutingResult:
        """``patches [B, P, C, n, n]``, ``positions [P, 2]`` -> :class:`RoutingResult`."""
        logits = self.score(patches, positions)
        probs = logits.softmax(dim=-1)
        return self.finalize(probs, probs, logits)

    def score(self, patches: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def finalize(self, weights: torch.Tensor, probs: torch.Tensor,
                 logits: Optional[torch.Tensor]) -> RoutingResult:
        """Apply top-k, capacity and renormalisation; attach losses and statistics."""
        B, P, E = weights.shape
        keep = None
        if self.top_k is not None and self.top_k < E:
            keep = top_k_mask(weights.detach(), self.top_k)
        if self.capacity_factor is not None:
            flat_keep = (keep if keep is not None else weights.detach() > 0).reshape(B * P, E)
            k = self.top_k or E
            # no min(N, .) needed (a capacity >= N keeps every token) and no branch on N: a dynamic batch needs no
            # guard here; the float order is the one eager results have always used
            capacity = math.ceil(self.capacity_factor * B * P * k / E)
            flat_keep = capacity_mask(flat_keep, probs.detach().reshape(B * P, E), capacity)
            keep = flat_keep.reshape(B, P, E)
        if keep is not None:
            weights = weights * keep
        if self.renormalize:
            unit = weights / weights.sum(-1, keepdim=True).clamp_min(1e-9)
            weights = unit if self.renormalize is True else weights + (unit - weights).detach()
        return RoutingResult(weights=weights, probs=probs, logits=logits)


def keyed_routers(model: nn.Module) -> List[Router]:
    """Every router of ``model`` that uses keys (``Router.uses_keys``), in module order (what K-Means
    initialisation, EMA and DDP key synchronisation act on)."""
    return [m for m in model.modules() if isinstance(m, Router) and m.uses_keys]
