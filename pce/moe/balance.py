"""Load-balancing losses chosen per layer.

:func:`pce.router_loss` applies the same terms to every layer. Here each routing layer may name its own
balancing term in a ``balance`` attribute (:class:`pce.PCEConv2d` takes ``balance=``; layers without one use
``default``):

* ``"switch"``: the Switch Transformer term of :func:`pce.moe.losses.routing_aux_losses` (1 when balanced);
* ``"entropy"``: :func:`batch_entropy_balance`, ``log E - H(mean routing distribution of the batch)``, >= 0 and
  0 exactly when the batch-mean distribution is uniform: minimising it maximises that entropy (each patch may
  still be confident, unlike the per-patch entropy term);
* ``"none"``: no balancing.

>>> with pce.record_routing(model) as rec:
...     out = model(x)
>>> loss = task_loss + 0.01 * layer_balance_loss(rec.records, model)
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Iterable, Tuple

import torch
from torch import nn

from pce.moe.losses import routing_aux_losses
from pce.moe.metrics import entropy
from pce.moe.recorder import routing_sources, strip_wrapper_prefix
from pce.moe.routing import RoutingResult

__all__ = ["batch_entropy_balance", "balance_loss", "layer_balance_loss", "BALANCE_LOSSES"]


def batch_entropy_balance(result: RoutingResult) -> torch.Tensor:
    """``log E - H(mean_{B, P} probs)``: a scalar >= 0, zero when the batch uses every expert equally on average
    (``probs [B, P, E]``, the router's probabilities before top-k, so every expert's logit gets a gradient)."""
    E = result.probs.shape[-1]
    mean_p = result.probs.reshape(-1, E).float().mean(0)
    return math.log(E) - entropy(mean_p)


def _switch(result: RoutingResult) -> torch.Tensor:
    return routing_aux_losses(result)["balance"].float()


def _none(result: RoutingResult) -> torch.Tensor:
    return result.probs.new_zeros((), dtype=torch.float32)


#: ``name -> loss(result) -> scalar``; a layer's ``balance`` attribute picks one.
BALANCE_LOSSES: Dict[str, Callable[[RoutingResult], torch.Tensor]] = {
    "switch": _switch, "entropy": batch_entropy_balance, "none": _none,
}


def balance_loss(result: RoutingResult, kind: str = "switch") -> torch.Tensor:
    """The balancing term ``kind`` (a key of :data:`BALANCE_LOSSES`) of one layer's routing: a float32 scalar."""
    if kind not in BALANCE_LOSSES:
        raise ValueError(f"balance must be one of {sorted(BALANCE_LOSSES)}, got {kind!r}")
    return BALANCE_LOSSES[kind](result)


def layer_balance_loss(records: Iterable[Tuple[str, RoutingResult]], model: nn.Module,
                       default: str = "switch") -> torch.Tensor:
    """Mean over the recorded layers (``RoutingRecorder.records``: ``(layer name, result)``) of each layer's own
    balancing term: the ``balance`` attribute of the layer of that name in ``model``, else ``default``. Zero
    (float32 scalar) when nothing was recorded."""
    kinds = {strip_wrapper_prefix(n): getattr(m, "balance", None) or default for n, m in routing_sources(model)}
    terms = [balance_loss(r, kinds.get(name, default)) for name, r in records]
    if not terms:
        return torch.zeros(())
    return torch.stack(terms).mean()
