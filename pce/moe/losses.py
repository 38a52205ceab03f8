"""Router regularisers and routing statistics.

Losses (all differentiable, unweighted; :func:`router_loss` combines them):

* ``entropy`` (the seeds' confidence loss): mean over patches of ``H(p) = -sum_e p_e log p_e``.
* ``balance``: each layer's own balancing term (``result.balance``, see :mod:`pce.moe.balance`), by default the
  Switch Transformer form ``E * sum_e f_e * P_e`` with ``f_e`` the fraction of patches whose largest weight is
  expert e (not differentiable) and ``P_e`` the mean probability of e (equals 1 when balanced); a
  :class:`pce.PCEConv2d` built with ``balance="entropy"`` or ``"none"`` gets that term instead.
* ``batch_entropy`` (PatchConvMoE): ``log E - H(mean_{B, P} p)`` for every layer
  (:func:`pce.moe.balance.batch_entropy_balance`): 0 when the batch-mean routing distribution is uniform.
* ``z`` (ST-MoE): mean of ``logsumexp(logits)^2``; zero for routers without logits.
* ``collapse``: the seeds count experts with usage < tau, which has no gradient. We report that count as the
  statistic ``collapsed_experts`` and train on the differentiable surrogate
  ``sum_e relu(tau - P_e) / tau`` (``P_e`` the mean probability), which is 0 once every expert's mean
  probability reaches tau and pushes probability towards starved experts otherwise.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, Iterable, Mapping

import torch

from pce.moe.balance import balance_loss, batch_entropy_balance
from pce.moe.metrics import COLLAPSE_TAU, entropy
from pce.moe.routing import RoutingResult


def routing_aux_losses(result: RoutingResult, tau: float = COLLAPSE_TAU) -> Dict[str, torch.Tensor]:
    """The unweighted differentiable losses of one layer's routing: ``entropy``, ``balance`` (the layer's own
    term, :func:`pce.moe.balance.balance_loss`), ``batch_entropy``, ``collapse``, ``z``."""
    probs = result.probs
    E = probs.shape[-1]
    flat_p = probs.reshape(-1, E)
    mean_p = flat_p.mean(0)
    losses = {
        "entropy": entropy(flat_p).mean(),
        "balance": balance_loss(result),
        "batch_entropy": batch_entropy_balance(result),
        "collapse": torch.relu(tau - mean_p).sum() / tau,
    }
    if result.logits is not None:
        losses["z"] = torch.logsumexp(result.logits.reshape(-1, E).float(), dim=-1).pow(2).mean()
    else:
        losses["z"] = probs.new_zeros(())
    return losses


@dataclass
class RouterLossWeights:
    """Weights of the router regularisers in the total loss (0 disables a term). ``balance`` weighs each layer's
    own balancing term (Switch unless the layer chose another), ``batch_entropy`` the batch-entropy term of every
    layer."""

    entropy: float = 0.0
    balance: float = 0.01
    z: float = 0.001
    collapse: float = 0.0
    batch_entropy: float = 0.0

    def as_dict(self) -> Dict[str, float]:
        return asdict(self)

    @classmethod
    def coerce(cls, weights: "RouterLossWeights | Mapping[str, float] | None") -> "RouterLossWeights":
        """``None`` -> defaults; a mapping -> its fields (``KeyError`` naming unknown terms)."""
        if weights is None or isinstance(weights, cls):
            return weights or cls()
        w = dict(weights)
        unknown = set(w) - set(cls().as_dict())
        if unknown:
            raise KeyError(f"unknown router loss term(s) {sorted(unknown)}; known: {sorted(cls().as_dict())}")
        return cls(**{k: float(v) for k, v in w.items()})


def router_loss(routing: Iterable[RoutingResult],
                weights: RouterLossWeights | Mapping[str, float] | None = None,
                device: torch.device | None = None) -> torch.Tensor:
    """Weighted sum of every layer's auxiliary losses, averaged over layers: a float32 scalar (zero, on
    ``device``, when ``routing`` is empty, e.g. for a dense twin)."""
    w = RouterLossWeights.coerce(weights).as_dict()
    total, count = None, 0
    for r in routing:
        count += 1
        aux = routing_aux_losses(r) if any(w.values()) else {}
        for name, coef in w.items():
            if coef and name in aux:
                term = coef * aux[name].float()
                total = term if total is None else total + term
    if total is None:
        return torch.zeros((), device=device)
    return total / max(count, 1)
