"""Routers without learned scores: Gumbel sampling over cosine scores, positional, uniform, shared."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from pce.registry import ROUTERS
from pce.moe.routing import Router, RoutingResult
from pce.moe.routers.cosine import CosineRouter


@ROUTERS.register("gumbel")
class GumbelRouter(CosineRouter):
    """Cosine-similarity scores sampled with Gumbel-softmax in training (seed 004: option B with
    differentiable sampling). ``hard=True`` gives one-hot samples with straight-through gradients.
    In eval: ``softmax(logits)`` (or the arg-max one-hot when ``hard``). No threshold mask by default."""

    def __init__(self, in_channels: int, num_experts: int, tau: float = 1.0, hard: bool = True,
                 threshold: bool = False, **kwargs) -> None:
        super().__init__(in_channels, num_experts, threshold=threshold, **kwargs)
        if tau <= 0:
            raise ValueError(f"gumbel tau must be > 0, got {tau}")
        self.tau = tau
        self.hard = hard

    @property
    def is_sparse(self) -> bool:
        return super().is_sparse or self.hard

    @property
    def active_fraction(self) -> float:
        return 1.0 / self.num_experts if self.hard else super().active_fraction

    def route_weights(self, logits: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        if self.training:
            weights = F.gumbel_softmax(logits, tau=self.tau, hard=self.hard, dim=-1)
        elif self.hard:
            weights = F.one_hot(logits.argmax(-1), self.num_experts).to(probs.dtype)
        else:
            weights = probs
        return self.mask(weights)


@ROUTERS.register("positional")
class PositionalRouter(Router):
    """Deterministic routing by patch position with controllable noise (seed 004, option A).

    The image is tiled into ``rows x cols`` regions (``cols = ceil(sqrt(E))``); a patch goes to the expert of
    its region. Logits are ``strength * one_hot + noise_std * N(0, 1)`` in training (noise only in training),
    so experts specialise by region while the noise keeps a mix.
    """

    parameter_free = True

    def __init__(self, in_channels: Optional[int] = None, num_experts: int = 4, strength: float = 4.0,
                 noise_std: float = 0.5, top_k: Optional[int] = None, renormalize: bool = False,
                 capacity_factor: Optional[float] = None) -> None:
        super().__init__(num_experts, top_k=top_k, renormalize=renormalize, capacity_factor=capacity_factor)
        self.strength = strength
        self.noise_std = noise_std

    def assignment(self, positions: torch.Tensor) -> torch.Tensor:
        """Expert index ``[P]`` for patch centres ``positions [P, 2]`` in [-1, 1]."""
        E = self.num_experts
        cols = math.ceil(math.sqrt(E))
        rows = math.ceil(E / cols)
        r = ((positions[:, 0] + 1) / 2 * rows).floor().clamp(0, rows - 1)
        c = ((positions[:, 1] + 1) / 2 * cols).floor().clamp(0, cols - 1)
        return (r * cols + c).long() % E

    def score(self, patches: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        B, P = patches.shape[:2]
        onehot = F.one_hot(self.assignment(positions), self.num_experts).to(patches.dtype)
        logits = self.strength * onehot.unsqueeze(0).expand(B, P, -1)
        if self.training and self.noise_std > 0:
            logits = logits + self.noise_std * torch.randn_like(logits)
        return logits


@ROUTERS.register("uniform")
class UniformRouter(Router):
    """Equal weights ``1/E`` (seed 003 stabilisation, seed 004 option C). With ``subset=k`` each patch is sent
    to k random experts averaged with weights ``1/k`` during training (all experts at eval)."""

    parameter_free = True

    def __init__(self, in_channels: Optional[int] = None, num_experts: int = 4, subset: Optional[int] = None,
                 top_k: Optional[int] = None, renormalize: bool = False,
                 capacity_factor: Optional[float] = None) -> None:
        super().__init__(num_experts, top_k=None, renormalize=False, capacity_factor=capacity_factor)
        subset = subset if subset is not None else top_k
        if subset is not None and not 1 <= subset <= num_experts:
            raise ValueError(f"subset must be in [1, num_experts={num_experts}], got {subset}")
        self.subset = subset

    @property
    def is_sparse(self) -> bool:
        return (self.subset is not None and self.subset < self.num_experts) or self.capacity_factor is not None

    @property
    def active_fraction(self) -> float:
        return self.subset / self.num_experts if self.subset is not None else 1.0

    def forward(self, patches: torch.Tensor, positions: torch.Tensor) -> RoutingResult:
        B, P = patches.shape[:2]
        E = self.num_experts
        probs = patches.new_full((B, P, E), 1.0 / E)
        weights = probs
        if self.training and self.subset is not None and self.subset < E:
            pick = torch.rand(B, P, E, device=patches.device).topk(self.subset, dim=-1).indices
            weights = torch.zeros_like(probs).scatter_(-1, pick, 1.0 / self.subset)
        return self.finalize(weights, probs, None)


@ROUTERS.register("shared")
class SharedRouter(Router):
    """Every patch to expert 0 with weight 1, in training and eval: the experts act as one shared dense block.

    The stabilisation router of sparse upcycling: train expert 0 on every patch at the cost of one expert, then
    copy it into the others (phase option ``upcycle``, :meth:`pce.models.backbone.PCEBackbone.upcycle_experts`) before
    the learned routers take over, so that every expert starts from weights trained on all the data."""

    parameter_free = True

    def __init__(self, in_channels: Optional[int] = None, num_experts: int = 4, top_k: Optional[int] = None,
                 **_: object) -> None:
        super().__init__(num_experts)

    @property
    def is_sparse(self) -> bool:
        return self.num_experts > 1

    @property
    def active_fraction(self) -> float:
        return 1.0 / self.num_experts

    def forward(self, patches: torch.Tensor, positions: torch.Tensor) -> RoutingResult:
        B, P = patches.shape[:2]
        weights = patches.new_zeros(B, P, self.num_experts)
        weights[..., 0] = 1.0
        return RoutingResult(weights=weights, probs=weights, logits=None)



@ROUTERS.register("all_experts")
class AllExpertsRouter(Router):
    """Every patch to every expert, in training and eval (``top_k`` is ignored): the proposal's first
    stabilisation option. ``reduce="mean"``: weights ``1/E`` (the experts averaged); ``reduce="sum"``: weights ``1``
    (summed without weights; the one router whose weights sum to more than 1 per patch, ``E``). Unlike
    ``"uniform"``, which inherits the learned router's ``top_k`` as a phase override (one random expert per patch
    under top-1), this always runs all E experts on every patch (E x the FLOPs of top-1). In a config:
    ``dict(router_override="all_experts", router_override_kwargs=dict(reduce="sum"))``. A layer with
    ``execution="context"`` (one expert per patch) runs it with ``"map"`` execution for the phase
    (:meth:`pce.engine.phases.PhaseController.fit_executions`). Probabilities are ``1/E`` in both cases."""

    parameter_free = True
    #: every patch goes to every expert (phases switch context execution to map execution for it)
    all_experts = True

    def __init__(self, in_channels: Optional[int] = None, num_experts: int = 4, reduce: str = "mean",
                 **_: object) -> None:
        super().__init__(num_experts)
        if reduce not in ("mean", "sum"):
            raise ValueError(f"reduce must be 'mean' or 'sum', got {reduce!r}")
        self.reduce = reduce

    @property
    def is_sparse(self) -> bool:
        return False

    @property
    def active_fraction(self) -> float:
        return 1.0

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, reduce={self.reduce!r}"

    def forward(self, patches: torch.Tensor, positions: torch.Tensor) -> RoutingResult:
        """``patches [B, P, C, n, n]`` -> weights ``[B, P, E]``, all ``1/E`` (``"mean"``) or ``1`` (``"sum"``)."""
        B, P = patches.shape[:2]
        E = self.num_experts
        probs = patches.new_full((B, P, E), 1.0 / E)
        weights = patches.new_ones(B, P, E) if self.reduce == "sum" else probs
        return RoutingResult(weights=weights, probs=probs, logits=None)
