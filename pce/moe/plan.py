"""Where routed tokens go: the plan of a sparse dispatch and the autograd functions that move rows by it.

:class:`RoutePlan` sorts the routed (token, expert) pairs by expert (the one host synchronisation of a layer).
Rows then move in one of two ways:

* :meth:`RoutePlan.gather` / :meth:`RoutePlan.scatter`: all routed rows as one tensor in expert order, a
  permutation (:class:`_PermuteRows`) when every token has exactly one expert, an index-add when a token has
  several (top-k > 1);
* :meth:`RoutePlan.chunks` / :meth:`RoutePlan.place`, when no token has several experts (top-1, with or without
  drops): each expert's rows gathered on their own and its outputs copied straight into their token rows, so
  that the experts' outputs are never concatenated and then permuted back (one pass over the output instead of
  two, in forward and in backward; the backward buffers are uninitialised unless some token has no expert).

The rows, their order within each expert and what is computed on them are the same either way.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

__all__ = ["RoutePlan"]


class _PermuteRows(torch.autograd.Function):
    """``x[perm]`` for a permutation ``perm`` of the rows, whose gradient is ``grad[inverse]``: unlike
    ``index_select`` its backward allocates no zero-filled buffer and does no scatter-add."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, perm: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return x.index_select(0, perm)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


def _buffer(full: bool, shape: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    """Every row is written (``full``): no zero fill needed."""
    return (torch.empty if full else torch.zeros)(tuple(shape), dtype=like.dtype, device=like.device)


class _GatherChunks(torch.autograd.Function):
    """Rows ``x [N, ...]`` -> one tensor of rows per index tensor (``x.index_select(0, idx)`` each, disjoint
    indices); the backward copies every chunk's gradient into one buffer (``index_copy_``)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, full: bool, *index: torch.Tensor):
        ctx.index, ctx.full, ctx.shape = index, full, x.shape
        return tuple(x.index_select(0, i) for i in index)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        g = _buffer(ctx.full, ctx.shape, grads[0])
        for i, gi in zip(ctx.index, grads):
            g.index_copy_(0, i, gi)
        return (g, None) + (None,) * len(ctx.index)


class _PlaceChunks(torch.autograd.Function):
    """The inverse of :class:`_GatherChunks`: chunks of rows -> ``[N, ...]`` (zeros in rows no chunk names)."""

    @staticmethod
    def forward(ctx, n: int, full: bool, *index_and_rows: torch.Tensor) -> torch.Tensor:
        k = len(index_and_rows) // 2  # index tensors first, then as many row tensors (all tensor arguments, so
        index, rows = index_and_rows[:k], index_and_rows[k:]  # that torch.jit.trace sees them)
        ctx.index = index
        out = _buffer(full, (n, *rows[0].shape[1:]), rows[0])
        for i, r in zip(index, rows):
            out.index_copy_(0, i, r)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return (None, None) + (None,) * len(ctx.index) + tuple(grad.index_select(0, i) for i in ctx.index)


class RoutePlan:
    """Where each routed (token, expert) pair goes: the pairs sorted by expert, tokens per expert, and whether
    the sort is a permutation of the tokens (every token has exactly one expert) or even the identity (every
    token has the same expert). Building it is the one host synchronisation of a layer."""

    def __init__(self, weights: torch.Tensor, num_experts: int) -> None:
        n = weights.shape[0]
        pairs = (weights.detach().t() != 0).nonzero()  # [M, 2] (expert, token), sorted by expert
        self.expert_idx, self.token_idx = pairs[:, 0], pairs[:, 1]
        per_token = torch.bincount(self.token_idx, minlength=n)
        stats = torch.cat([torch.bincount(self.expert_idx, minlength=num_experts),
                           (per_token != 1).sum().view(1), (per_token > 1).sum().view(1)]).tolist()
        self.counts: List[int] = stats[:-2]
        self.num_tokens = n
        self.permutation = stats[-2] == 0
        self.multi = stats[-1] > 0  # some token has several experts
        self.identity = self.permutation and max(self.counts) == n
        self._inverse: Optional[torch.Tensor] = None

    @property
    def inverse(self) -> torch.Tensor:
        """For a permutation: the position of each token in the expert order (built on first use)."""
        if self._inverse is None:
            self._inverse = torch.empty_like(self.token_idx)
            self._inverse[self.token_idx] = torch.arange(self.num_tokens, device=self.token_idx.device)
        return self._inverse

    @property
    def experts(self) -> List[int]:
        """The experts with at least one token, in order."""
        return [e for e, c in enumerate(self.counts) if c]

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Token rows ``[N, ...]`` -> routed rows sorted by expert ``[M, ...]``."""
        if self.identity:
            return x
        if self.permutation:
            return _PermuteRows.apply(x, self.token_idx, self.inverse)
        return x.index_select(0, self.token_idx)

    def scatter(self, y: torch.Tensor) -> torch.Tensor:
        """Routed rows ``[M, ...]`` -> token rows ``[N, ...]``, summed over a token's experts, zeros for a token
        without any."""
        if self.identity:
            return y
        if self.permutation:
            return _PermuteRows.apply(y, self.inverse, self.token_idx)
        return y.new_zeros(self.num_tokens, *y.shape[1:]).index_add(0, self.token_idx, y)

    def weigh(self, y: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return y * weights[self.token_idx, self.expert_idx].to(y.dtype).view(-1, *([1] * (y.dim() - 1)))

    # -- per-expert chunks (no token with several experts) ----------------------------------------------------
    def _chunk_index(self) -> Tuple[torch.Tensor, ...]:
        return tuple(i for i in self.token_idx.split(self.counts) if i.shape[0])

    def chunks(self, x: torch.Tensor) -> List[torch.Tensor]:
        """Token rows ``[N, ...]`` -> the rows of each expert of :attr:`experts`, in the order of :meth:`gather`.
        Needs ``not self.multi``."""
        if self.identity:
            return [x]
        return list(_GatherChunks.apply(x, self.permutation, *self._chunk_index()))

    def place(self, ys: Sequence[torch.Tensor]) -> torch.Tensor:
        """Outputs of each expert of :attr:`experts` -> token rows ``[N, ...]`` (zeros for a token without an
        expert): ``scatter`` of their concatenation, without it. Needs ``not self.multi``."""
        if self.identity:
            return ys[0]
        return _PlaceChunks.apply(self.num_tokens, self.permutation, *self._chunk_index(), *ys)

    def weigh_chunks(self, ys: Sequence[torch.Tensor], weights: torch.Tensor) -> List[torch.Tensor]:
        """Each chunk times its routing weights (:meth:`weigh` per chunk), or the chunks themselves when the
        weights need no gradient and are all exactly 1 (straight-through top-1 in inference: the same values)."""
        w = weights[self.token_idx, self.expert_idx]
        if not w.requires_grad and bool((w == 1).all()):
            return list(ys)
        parts = [p for p in w.split(self.counts) if p.shape[0]]
        return [y * p.to(y.dtype).view(-1, *([1] * (y.dim() - 1))) for y, p in zip(ys, parts)]
