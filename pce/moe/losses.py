"""Router regularisers and routing statistics.

Losses (all differentiable, unweighted; :func:`router_loss` combines them):

* ``entropy`` (the seeds' confidence loss): mean over patches of ``H(p) = -sum_e p_e log p_e``.
* ``balance`` (Switch Transformer form): ``E * sum_e f_e * P_e`` with ``f_e`` the fraction of patches whose
  largest weight is expert e (not differentiable) and ``P_e`` the mean probability of e. Equals 1 when balanced.
* ``z`` (ST-MoE): mean of ``logsumexp(logits)^2``; zero for routers without logits.
* ``collapse``: the seeds count experts with usage < tau, which has no gradient. We report that count as the
  statistic ``collapsed_experts`` and train on the differentiable surrogate
  ``sum_e relu(tau - P_e) / tau`` (``P_e`` the mean probability), which is 0 once every expert's mean
  probability reaches tau and pushes probability towards starved experts otherwise.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Dict, Iterable, Mapping

import torch

if TYPE_CHECKING:  # pragma: no cover
    from pce.moe.routing import RoutingResult

COLLAPSE_TAU = 0.01


def entropy(p: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Shannon entropy along ``dim`` (natural log), with 0 log 0 = 0."""
    return -(p * p.clamp_min(1e-12).log()).sum(dim)


def routing_aux_losses(result: "RoutingResult", tau: float = COLLAPSE_TAU) -> Dict[str, torch.Tensor]:
    probs = result.probs
    E = probs.shape[-1]
    flat_p = probs.reshape(-1, E)
    mean_p = flat_p.mean(0)
    top1 = result.weights.detach().reshape(-1, E).argmax(-1)
    f = torch.bincount(top1, minlength=E).to(probs.dtype) / max(top1.numel(), 1)
    losses = {
        "entropy": entropy(flat_p).mean(),
        "balance": E * (f * mean_p).sum(),
        "collapse": torch.relu(tau - mean_p).sum() / tau,
    }
    if result.logits is not None:
        losses["z"] = torch.logsumexp(result.logits.reshape(-1, E).float(), dim=-1).pow(2).mean()
    else:
        losses["z"] = probs.new_zeros(())
    return losses


@torch.no_grad()
def routing_statistics(result: "RoutingResult", tau: float = COLLAPSE_TAU) -> Dict[str, torch.Tensor]:
    w = result.weights.detach().reshape(-1, result.weights.shape[-1])
    usage = (w > 0).float().mean(0)
    return {
        "entropy": entropy(result.probs.detach().reshape(-1, w.shape[-1])).mean(),
        "usage": usage,
        "mean_weight": w.mean(0),
        "dropped_fraction": (w.sum(-1) == 0).float().mean(),
        "collapsed_experts": (usage < tau).sum().float(),
    }


@dataclass
class RouterLossWeights:
    """Weights of the router regularisers in the total loss (0 disables a term)."""

    entropy: float = 0.0
    balance: float = 0.01
    z: float = 0.001
    collapse: float = 0.0

    def as_dict(self) -> Dict[str, float]:
        return asdict(self)


def router_loss(routing: Iterable["RoutingResult"],
                weights: RouterLossWeights | Mapping[str, float] | None = None) -> torch.Tensor:
    """Weighted sum of every layer's auxiliary losses, averaged over layers. Returns a scalar tensor."""
    if weights is None:
        weights = RouterLossWeights()
    w = weights.as_dict() if isinstance(weights, RouterLossWeights) else dict(weights)
    unknown = set(w) - set(RouterLossWeights().as_dict())
    if unknown:
        raise KeyError(f"unknown router loss term(s) {sorted(unknown)}; known: {sorted(RouterLossWeights().as_dict())}")
    total, count = None, 0
    for r in routing:
        count += 1
        for name, coef in w.items():
            if coef and name in r.aux_losses:
                term = coef * r.aux_losses[name]
                total = term if total is None else total + term
    if total is None:
        return torch.zeros(())
    return total / max(count, 1)
