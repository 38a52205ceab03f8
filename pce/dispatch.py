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
  When every token goes to exactly one expert (top-1 without drops) the gather and the scatter are row
  permutations, executed as :class:`_PermuteRows` (no zero-filled buffers in forward or backward), and skipped
  when every token goes to the same expert.
"""
from __future__ import annotations

import torch

from .experts import ExpertBank


def _check(tokens: torch.Tensor, weights: torch.Tensor, bank: ExpertBank) -> None:
    if weights.dim() != 2 or weights.shape != (tokens.shape[0], bank.num_experts):
        raise ValueError(f"weights must be [N={tokens.shape[0]}, E={bank.num_experts}], got {tuple(weights.shape)}")


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


def dispatch_sparse(bank: ExpertBank, tokens: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    _check(tokens, weights, bank)
    pairs = (weights.detach().t() != 0).nonzero()  # [M, 2] (expert, token), sorted by expert
    expert_idx, token_idx = pairs[:, 0], pairs[:, 1]
    n = tokens.shape[0]
    # the one host sync: tokens per expert, and whether every token has exactly one expert
    per_token = torch.bincount(token_idx, minlength=n)
    stats = torch.cat([torch.bincount(expert_idx, minlength=bank.num_experts),
                       (per_token != 1).sum().view(1)]).tolist()
    counts, permutation = stats[:-1], stats[-1] == 0
    # every token with one and the same expert (e.g. the "shared" router): the pairs are already in token order
    identity = permutation and max(counts) == n
    if identity:
        gathered = tokens
    elif permutation:
        inverse = torch.empty_like(token_idx)
        inverse[token_idx] = torch.arange(n, device=token_idx.device)
        gathered = _PermuteRows.apply(tokens, token_idx, inverse)
    else:
        gathered = tokens.index_select(0, token_idx)
    outs = []
    with bank.per_expert():
        # split, not slicing: its backward is one concatenation instead of a zero-filled buffer per expert
        for e, chunk in enumerate(gathered.split(counts)):
            if chunk.shape[0]:
                outs.append(bank.forward_one(chunk, e))
    if not outs:
        return tokens.new_zeros(n, bank.out_channels, *tokens.shape[-2:])
    y = torch.cat(outs) if len(outs) > 1 else outs[0]
    y = y * weights[token_idx, expert_idx].to(y.dtype).view(-1, 1, 1, 1)
    if identity:
        return y
    if permutation:
        return _PermuteRows.apply(y, inverse, token_idx)
    return tokens.new_zeros(n, bank.out_channels, *tokens.shape[-2:]).index_add(0, token_idx, y)


DISPATCHERS = {"reference": dispatch_reference, "fused": dispatch_fused, "dense": dispatch_dense,
               "sparse": dispatch_sparse}
