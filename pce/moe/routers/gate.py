"""MLP gate with top-k routing, expert capacity, z-loss and load balancing (seed 002), and expert choice."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from pce.registry import ROUTERS
from pce.moe.routing import Router, RoutingResult, capacity_mask, expert_capacity
from pce.layers.spp import SpatialPyramidPooling


class PooledMLPScorer(nn.Module):
    """Logits ``[B, P, E]`` from a two-layer GELU MLP over pooled patch content + patch position."""

    def __init__(self, in_channels: int, num_experts: int, hidden: int = 64, pool_levels: Sequence[int] = (1, 2)):
        super().__init__()
        self.in_channels = in_channels
        self.spp = SpatialPyramidPooling(pool_levels, "avg")
        self.mlp = nn.Sequential(nn.Linear(self.spp.output_dim(in_channels) + 2, hidden), nn.GELU(),
                                 nn.Linear(hidden, num_experts))

    def forward(self, patches: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        B, P, C, n, m = patches.shape
        if C != self.in_channels:
            raise ValueError(f"gate router expects {self.in_channels} patch channels, got {C}")
        pooled = self.spp(patches.reshape(B * P, C, n, m)).reshape(B, P, -1)
        pos = positions.to(pooled.dtype).unsqueeze(0).expand(B, P, 2)
        return self.mlp(torch.cat([pooled, pos], dim=-1))


@ROUTERS.register("gate")
class GateRouter(Router):
    """Switch-style gate: softmax over MLP logits, top-k (default 1), capacity ``ceil(cf * N * k / E)``.

    Kept weights are the gate probabilities (not renormalised by default, so the gate gets gradient).
    Optional ``noise_std`` adds Gaussian noise to the logits in training (noisy top-k).
    """

    def __init__(self, in_channels: int, num_experts: int, hidden: int = 64, pool_levels: Sequence[int] = (1, 2),
                 top_k: Optional[int] = 1, capacity_factor: Optional[float] = 1.25, renormalize: bool = False,
                 noise_std: float = 0.0) -> None:
        super().__init__(num_experts, top_k=top_k, renormalize=renormalize, capacity_factor=capacity_factor)
        self.scorer = PooledMLPScorer(in_channels, num_experts, hidden, pool_levels)
        self.noise_std = noise_std

    def score(self, patches: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        logits = self.scorer(patches, positions)
        if self.training and self.noise_std > 0:
            logits = logits + self.noise_std * torch.randn_like(logits)
        return logits


@ROUTERS.register("expert_choice")
class ExpertChoiceRouter(Router):
    """Expert choice (Zhou et al. 2022): every expert takes its ``c = ceil(cf * N / E)`` highest-scoring
    patches of the batch (equal scores: the lower patch index first), so load is balanced by construction; a patch
    may get 0..E experts.
    On average a patch gets ``capacity_factor`` experts, so ``top_k=k`` is accepted as ``capacity_factor=k``
    (the same compute as top-k routing) when no capacity factor is given."""

    def __init__(self, in_channels: int, num_experts: int, hidden: int = 64, pool_levels: Sequence[int] = (1, 2),
                 capacity_factor: Optional[float] = None, top_k: Optional[int] = None,
                 renormalize: bool = False) -> None:
        if top_k is not None and capacity_factor is not None:
            raise ValueError("expert_choice: give capacity_factor or top_k (its alias), not both")
        capacity_factor = capacity_factor if capacity_factor is not None else float(top_k or 1)
        super().__init__(num_experts, top_k=None, renormalize=renormalize, capacity_factor=None)
        if capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be > 0, got {capacity_factor}")
        self.scorer = PooledMLPScorer(in_channels, num_experts, hidden, pool_levels)
        self.choice_capacity_factor = capacity_factor

    @property
    def is_sparse(self) -> bool:
        return True

    @property
    def active_fraction(self) -> float:
        return min(1.0, float(self.choice_capacity_factor) / self.num_experts)

    def forward(self, patches: torch.Tensor, positions: torch.Tensor) -> RoutingResult:
        logits = self.scorer(patches, positions)
        probs = logits.softmax(-1)
        B, P, E = probs.shape
        N = B * P
        c = expert_capacity(N, self.choice_capacity_factor, 1, E)
        flat = probs.reshape(N, E)
        # each expert's c highest-scoring patches (ties: the lower index) as a mask: no tensor of c rows, so that a
        # dynamic batch (c symbolic) is captured without guards on c
        keep = capacity_mask(torch.ones_like(flat, dtype=torch.bool), flat.detach(), c)
        weights = (flat * keep).reshape(B, P, E)
        return Router.finalize(self, weights, probs, logits)  # applies ``renormalize``
