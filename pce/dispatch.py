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
"""
from __future__ import annotations

import torch

from .experts import ExpertBank


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


def dispatch_sparse(bank: ExpertBank, tokens: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    _check(tokens, weights, bank)
    pairs = (weights.detach().t() != 0).nonzero()  # [M, 2] (expert, token), sorted by expert
    expert_idx, token_idx = pairs[:, 0], pairs[:, 1]
    counts = torch.bincount(expert_idx, minlength=bank.num_experts).tolist()  # the one host sync
    gathered = tokens.index_select(0, token_idx)
    outs = []
    start = 0
    with bank.per_expert():
        for e, c in enumerate(counts):
            if c:
                outs.append(bank.forward_one(gathered[start:start + c], e))
            start += c
    out = tokens.new_zeros(tokens.shape[0], bank.out_channels, *tokens.shape[-2:])
    if not outs:
        return out
    y = torch.cat(outs) * weights[token_idx, expert_idx].view(-1, 1, 1, 1)
    return out.index_add(0, token_idx, y)


DISPATCHERS = {"reference": dispatch_reference, "fused": dispatch_fused, "dense": dispatch_dense,
               "sparse": dispatch_sparse}
