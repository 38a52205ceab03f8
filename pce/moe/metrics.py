"""Entropy and the detached per-layer routing statistics (no losses here; see :mod:`pce.moe.losses`)."""
from __future__ import annotations

from typing import Dict

import torch

from pce.moe.routing import RoutingResult

COLLAPSE_TAU = 0.01


def entropy(p: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Shannon entropy along ``dim`` (natural log), with 0 log 0 = 0."""
    return -(p * p.clamp_min(1e-12).log()).sum(dim)


@torch.no_grad()
def routing_statistics(result: RoutingResult, tau: float = COLLAPSE_TAU) -> Dict[str, torch.Tensor]:
    """Detached statistics of one layer's routing ``weights [B, P, E]``: ``entropy`` (mean router entropy,
    nats), ``usage [E]`` (share of patches with a non-zero weight on each expert), ``mean_weight [E]``,
    ``dropped_fraction`` (patches with no expert) and ``collapsed_experts`` (experts with usage < ``tau``)."""
    w = result.weights.detach().reshape(-1, result.num_experts)
    usage = (w > 0).float().mean(0)
    return {
        "entropy": entropy(result.probs.detach().reshape(-1, w.shape[-1])).mean(),
        "usage": usage,
        "mean_weight": w.mean(0),
        "dropped_fraction": (w.sum(-1) == 0).float().mean(),
        "collapsed_experts": (usage < tau).sum().float(),
    }
