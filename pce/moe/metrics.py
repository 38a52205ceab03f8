"""Routing entropy and the collapse threshold, shared by the router losses (:mod:`pce.moe.losses`), the
threshold router and the analysis statistics (:mod:`pce.analysis.stats`, which holds every detached routing
statistic)."""
from __future__ import annotations

import torch

__all__ = ["entropy", "COLLAPSE_TAU"]

COLLAPSE_TAU = 0.01  # an expert used by fewer than 1% of the patches is collapsed


def entropy(p: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Shannon entropy along ``dim`` (natural log), with 0 log 0 = 0."""
    return -(p * p.clamp_min(1e-12).log()).sum(dim)
