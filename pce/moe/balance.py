"""Load-balancing terms, chosen per layer.

Each routing layer may name its own balancing term: :class:`pce.PCEConv2d` takes ``balance=`` and stamps it on
every :class:`~pce.moe.routing.RoutingResult` it records (``result.balance``); :func:`pce.router_loss` applies its
``balance`` weight to that term (results without one, e.g. a :class:`~pce.models.layer.PCELayer`'s: ``"switch"``),
so the one router-loss site of training honours every layer's choice.

* ``"switch"``: :func:`switch_balance`, the Switch Transformer term ``E * sum_e f_e P_e`` (1 when balanced);
* ``"entropy"``: :func:`batch_entropy_balance`, ``log E - H(mean routing distribution of the batch)`` (PatchConvMoE),
  >= 0 and 0 exactly when the batch-mean distribution is uniform: minimising it maximises that entropy (each patch
  may still be confident, unlike the per-patch entropy term); also the ``batch_entropy`` term of
  :class:`~pce.moe.losses.RouterLossWeights` for every layer;
* ``"none"``: no balancing.

>>> with pce.record_routing(model) as rec:
...     out = model(x)
>>> loss = task_loss + pce.router_loss(rec.results, {"balance": 0.01})   # each layer's own term
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Optional

import torch

from pce.moe.metrics import entropy
from pce.moe.routing import RoutingResult

__all__ = ["switch_balance", "batch_entropy_balance", "balance_loss", "BALANCE_LOSSES",
           "DEFAULT_BALANCE"]

#: the balancing term of results that do not name one
DEFAULT_BALANCE = "switch"


def switch_balance(result: RoutingResult) -> torch.Tensor:
    """``E * sum_e f_e P_e`` (Switch Transformer): ``f_e`` the fraction of patches whose largest weight is expert
    ``e`` (no gradient), ``P_e`` the mean probability of ``e``. 1 when balanced; in ``probs``' dtype."""
    probs = result.probs
    E = probs.shape[-1]
    top1 = result.weights.detach().reshape(-1, E).argmax(-1)
    f = torch.bincount(top1, minlength=E).to(probs.dtype) / max(top1.numel(), 1)
    return E * (f * probs.reshape(-1, E).mean(0)).sum()


def batch_entropy_balance(result: RoutingResult) -> torch.Tensor:
    """``log E - H(mean_{B, P} probs)``: a float32 scalar >= 0, zero when the batch uses every expert equally on
    average (``probs [B, P, E]``, the router's probabilities before top-k, so every expert's logit gets a
    gradient)."""
    E = result.probs.shape[-1]
    mean_p = result.probs.reshape(-1, E).float().mean(0)
    return math.log(E) - entropy(mean_p)


def _none(result: RoutingResult) -> torch.Tensor:
    return result.probs.new_zeros((), dtype=torch.float32)


#: ``name -> loss(result) -> scalar``; a layer's ``balance`` attribute (and its results' ``balance``) picks one.
BALANCE_LOSSES: Dict[str, Callable[[RoutingResult], torch.Tensor]] = {
    "switch": switch_balance, "entropy": batch_entropy_balance, "none": _none,
}


def balance_loss(result: RoutingResult, kind: Optional[str] = None) -> torch.Tensor:
    """The balancing term ``kind`` (a key of :data:`BALANCE_LOSSES`; default the one ``result`` names, else
    ``"switch"``) of one layer's routing: a float32 scalar."""
    kind = kind or result.balance or DEFAULT_BALANCE
    if kind not in BALANCE_LOSSES:
        raise ValueError(f"balance must be one of {sorted(BALANCE_LOSSES)}, got {kind!r}")
    return BALANCE_LOSSES[kind](result).float()
