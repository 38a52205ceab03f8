"""Executing an expert bank on routed tokens.

Tokens are ``[N, C, h, w]`` (``N = B * P`` patches), weights ``[N, E]``; the result is the routing-weighted
sum ``[N, C_out, h, w]``. Semantics shared by every path: expert e processes exactly the tokens with a
non-zero weight for e (so its batch-norm statistics come from those tokens), and a token with all-zero
weights outputs zeros.

* :func:`dispatch_reference`: the straightforward loop over experts with a boolean mask (kept for tests).
* :func:`dispatch_fused`: all experts fused into one pass (``ExpertBank.forward_all``: first convolutions
  fused, later ones grouped) then a weighted sum; exact when every weight is non-zero (soft routing).
  Cost ~E x one expert; the fastest soft path on CUDA.
* :func:`dispatch_dense`: soft routing without gathers: each expert runs on all tokens and is accumulated
  with its weights. Same result as the fused path; measured faster on CPU (smaller working set).
* :func:`dispatch_sparse`: sort the (token, expert) pairs by expert, one gather, each expert runs on its
  contiguous slice, one weighted scatter-add. One host synchronisation per layer, cost ~k x one expert.
  When no token has several experts (top-1, with or without drops) each expert's rows are gathered on their
  own and its outputs copied straight into their token rows (:meth:`pce.moe.plan.RoutePlan.chunks` /
  ``place``: no concatenation, no zero-filled buffers unless a token is dropped; skipped when every token goes
  to the same expert), and weights that are exactly 1 without a gradient are not multiplied.
* :func:`dispatch_capacity`: static shapes for captured graphs (export, ONNX, compile): expert e runs on a
  fixed buffer of ``capacity`` tokens, those with its largest weights (top-``capacity`` over tokens), one
  gather and one weighted index-add per expert; all tokens (:func:`dispatch_dense`) when ``capacity >= N``.
  Equal to :func:`dispatch_sparse` in eval mode whenever no expert has more than ``capacity`` tokens.
* :func:`dispatch_rows`: :func:`dispatch_sparse` for tokens cut on demand, already in expert order (no token
  tensor, no gather): windows of a map for :class:`pce.PCEConv2d`.
* :func:`dispatch_map`: experts on whole maps, weighted per pixel (``wmap [B, E, H, W]``), skipping listed-out
  experts: the straightforward context execution of :class:`pce.PCEConv2d` (each pixel by its patch's experts,
  kernels reading across patch borders), cost ~(experts used) x one expert.
* :func:`dispatch_context`: top-1 routing where each expert's convolutions read their neighbours' activations
  across patch borders (each pixel computed once, by its patch's expert: a halo at no extra FLOPs).
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple

import torch

from pce.moe.experts import ExpertBank
from pce.moe.plan import RoutePlan as _Plan
from pce.moe.routing import capacity_mask


def _check(tokens: torch.Tensor, weights: torch.Tensor, bank: ExpertBank) -> None:
    if weights.dim() != 2 or weights.shape != (tokens.shape[0], bank.num_experts):
        raise ValueError(f"weights must be [N={tokens.shape[0]}, E={bank.num_experts}], got {tuple(weights.shape)}")


def dispatch_reference(bank: ExpertBank, tokens: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    _check(tokens, weights, bank)
    out = tokens.new_zeros(tokens.shape[0], bank.out_channels, *tokens.shape[-2:])
    for e in range(bank.num_experts):  # plain per-expert slicing: deliberately the simplest code
        idx = (weights[:, e] != 0).nonzero().squeeze(1)
        if idx.numel() == 0:
            continue
        y = bank.forward_one(tokens[idx], e) * weights[idx, e].view(-1, 1, 1, 1)
        out = out.index_add(0, idx, y)
    return out


def dispatch_fused(bank: ExpertBank, tokens: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    _check(tokens, weights, bank)
    y = bank.forward_all(tokens)  # [N, E, C, h, w]
    return torch.einsum("nechw,ne->nchw", y, weights.to(y.dtype))


def dispatch_dense(bank: ExpertBank, tokens: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    _check(tokens, weights, bank)
    out = None
    with bank.per_expert():
        for e in range(bank.num_experts):
            y = bank.forward_one(tokens, e) * weights[:, e].view(-1, 1, 1, 1)
            out = y if out is None else out + y
    return out


def dispatch_capacity(bank: ExpertBank, tokens: torch.Tensor, weights: torch.Tensor, capacity: int) -> torch.Tensor:
    """``tokens [N, C, h, w]``, ``weights [N, E]`` -> ``[N, C_out, h, w]`` with every shape fixed by ``N`` and
    ``capacity`` (no host sync, no data-dependent size). Assignments beyond an expert's ``capacity`` largest
    weights are dropped (those tokens take the layer's skip path for that expert)."""
    _check(tokens, weights, bank)
    n = tokens.shape[0]
    if not isinstance(n, int):  # symbolic n (a dynamic batch): buffers of a symbolic size would need guards on it
        # (size 1 or not, <= n) that export cannot prove; the same drop as a mask, every expert on every token
        keep = capacity_mask(torch.ones_like(weights, dtype=torch.bool), weights.detach(), capacity)
        return dispatch_dense(bank, tokens, weights * keep)
    if capacity >= n:  # masked dense: every expert on every token, zero weights mask the unassigned ones
        return dispatch_dense(bank, tokens, weights)
    top = weights.detach().topk(capacity, dim=0).indices  # [capacity, E]: each expert's buffer
    out = tokens.new_zeros(n, bank.out_channels, *tokens.shape[-2:])
    with bank.per_expert():
        for e in range(bank.num_experts):
            idx = top[:, e]
            y = bank.forward_one(tokens.index_select(0, idx), e) * weights[idx, e].to(tokens.dtype).view(-1, 1, 1, 1)
            out = out.index_add(0, idx, y)
    return out


def _per_expert(rows: torch.Tensor, counts: List[int],
                fn: Callable[[torch.Tensor, int], torch.Tensor]) -> torch.Tensor:
    """``fn(chunk, e)`` on each non-empty chunk of rows sorted by expert (``counts[e]`` rows for e), results
    concatenated. ``split``, not slicing: its backward is one concatenation, not a zero-filled buffer per expert."""
    outs = [fn(chunk, e) for e, chunk in enumerate(rows.split(counts)) if chunk.shape[0]]
    return torch.cat(outs) if len(outs) > 1 else outs[0]


def dispatch_sparse(bank: ExpertBank, tokens: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    _check(tokens, weights, bank)
    plan = _Plan(weights, bank.num_experts)
    if not any(plan.counts):
        return tokens.new_zeros(tokens.shape[0], bank.out_channels, *tokens.shape[-2:])
    if plan.multi or torch.jit.is_tracing():  # a trace (FLOP counting) records the one-tensor form
        with bank.per_expert():
            y = _per_expert(plan.gather(tokens), plan.counts, bank.forward_one)
        return plan.scatter(plan.weigh(y, weights))
    with bank.per_expert():  # at most one expert per token: outputs copied straight into their rows
        ys = [bank.forward_one(rows, e) for e, rows in zip(plan.experts, plan.chunks(tokens))]
    return plan.place(plan.weigh_chunks(ys, weights))


class StitchedExperts:
    """Selection for :func:`dispatch_context`: every layer of an expert runs on the rows routed to it (sorted by
    expert), and a ``k x k`` convolution reads its ``k // 2`` pixels of border context from the neighbouring
    patches' activations of the previous layer (computed by *their* experts), re-tiled into a map."""

    def __init__(self, plan: _Plan, to_windows: Callable[[torch.Tensor, int], torch.Tensor],
                 tokens: torch.Tensor, norm_stats: str = "expert") -> None:
        self.plan, self.to_windows, self.norm_stats = plan, to_windows, norm_stats
        self.tokens = tokens  # the layer input, token order: context for convolutions reading the input
        self.routed = plan.gather(tokens)  # the rows the experts run on

    def conv(self, layer, x: torch.Tensor) -> torch.Tensor:
        r = layer.kernel_size // 2
        if r:  # rows in token order -> map -> windows with r pixels of context -> sorted by expert
            # the layer input exists at dropped patches too: read it, not the zeros a scatter would give
            rows = self.tokens if x is self.routed else self.plan.scatter(x)
            x = self.plan.gather(self.to_windows(rows, r))
        return _per_expert(x, self.plan.counts, lambda c, e: layer.forward_one(c, e, padding=0))

    def norm(self, layer, x: torch.Tensor) -> torch.Tensor:
        if (self.norm_stats == "layer" and hasattr(layer, "normalize_pooled")
                and (layer.training or layer.running_mean is None)):
            return _per_expert(layer.normalize_pooled(x), self.plan.counts, layer.affine_one)
        return _per_expert(x, self.plan.counts, layer.forward_one)

    def identity(self, x: torch.Tensor, channels: int) -> torch.Tensor:
        return x


def dispatch_context(bank: ExpertBank, tokens: torch.Tensor, weights: torch.Tensor,
                     to_windows: Callable[[torch.Tensor, int], torch.Tensor],
                     norm_stats: str = "expert") -> torch.Tensor:
    """Top-1 (or dropped) routing where experts see across patch borders at the cost of one expert per pixel.

    Each pixel is computed by its patch's expert, layer by layer; a ``k x k`` convolution at a patch border
    reads the neighbouring patch's previous-layer activations (zeros outside the map and, after the first
    layer, for dropped patches; the first layer reads the input everywhere).
    ``to_windows(rows [N, C, n, n], r)`` must return each patch with ``r`` pixels of such context,
    ``[N, C, n + 2r, n + 2r]`` (see :meth:`pce.layers.patches.PatchExtractor.extract_windows`). With every patch on
    one expert this is exactly that expert applied to the whole map. Needs at most one expert per token.
    ``norm_stats``: ``"expert"`` (each expert's batch norm uses the statistics of its own rows) or ``"layer"``
    (statistics of all routed rows of the layer, per-expert affine: what a dense layer's batch norm sees).
    """
    if norm_stats not in ("expert", "layer"):
        raise ValueError(f"norm_stats must be 'expert' or 'layer', got {norm_stats!r}")
    _check(tokens, weights, bank)
    plan = _Plan(weights, bank.num_experts)
    if plan.multi:
        raise ValueError("execution='context' needs at most one expert per patch (top-1 or capacity routing); "
                         "use 'sparse' or 'map' for top-k > 1 and soft routing")
    if not any(plan.counts):
        return tokens.new_zeros(tokens.shape[0], bank.out_channels, *tokens.shape[-2:])
    sel = StitchedExperts(plan, to_windows, tokens, norm_stats)
    with bank.per_expert():
        y = bank.run(sel.routed, sel)
    return plan.scatter(plan.weigh(y, weights))


def dispatch_rows(bank: ExpertBank, rows: Callable[[List[int]], torch.Tensor], weights: torch.Tensor,
                  out_shape: Tuple[int, ...]) -> torch.Tensor:
    """:func:`dispatch_sparse` where ``rows(token indices sorted by expert) -> [M, C, h, w]`` builds the routed rows
    (each token once per expert it has), e.g. windows cut straight from a map; ``weights [N, E]``; ``out_shape``
    ``(C_out, h', w')`` of one expert output. Returns ``[N, C_out, h', w']`` (zeros for dropped tokens)."""
    if weights.dim() != 2 or weights.shape[1] != bank.num_experts:
        raise ValueError(f"weights must be [N, E={bank.num_experts}], got {tuple(weights.shape)}")
    plan = _Plan(weights, bank.num_experts)
    if not any(plan.counts):
        return weights.new_zeros(weights.shape[0], *out_shape)
    with bank.per_expert():
        y = _per_expert(rows(plan.token_idx.tolist()), plan.counts, bank.forward_one)
    return plan.scatter(plan.weigh(y, weights))


def dispatch_map(bank: ExpertBank, x: torch.Tensor, wmap: torch.Tensor,
                 experts: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Every expert of ``experts`` (default: all) on the whole map ``x [B, C, H', W']``, its output
    ``[B, C_out, H, W]`` times its per-pixel weights ``wmap [B, E, H, W]``, summed (zeros if ``experts`` is
    empty). Leave out only experts whose weights are all zero: the result is then exact."""
    experts = range(bank.num_experts) if experts is None else experts
    out = None
    with bank.per_expert():
        for e in experts:
            y = bank.forward_one(x, e)
            w = wmap[:, e:e + 1].to(y.dtype)
            out = y * w if out is None else out.addcmul_(y, w)  # in place on our own sum: one pass per expert
    if out is None:
        return x.new_zeros(x.shape[0], bank.out_channels, *wmap.shape[-2:])
    return out
