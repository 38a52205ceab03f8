"""Routed layers: what every layer that routes patches to experts shares, and the walkers over any model.

A *routed layer* (:class:`RoutedLayerMixin`: :class:`~pce.models.layer.PCELayer`, :class:`pce.PCEConv2d`, and any
future one) has a learned ``router``, an optional parameter-free ``router_override`` (training phases), an expert
bank ``experts`` with ``num_experts`` experts, and records its routing (:class:`~pce.moe.recorder.RoutingSource`).
Code above the models never enumerates the classes: it walks a model with the functions here, which work on any
module (a PCE backbone, a classifier, a detector, a timm / smp model converted by :func:`pce.convert`, a DDP / EMA
wrapper):

>>> model, _ = pce.convert(timm.create_model("resnet18"), "layer4.*.conv2", router="cosine")
>>> [name for name, _ in routed_layers(model)]
['layer4.0.conv2', 'layer4.1.conv2']
>>> set_router_override(model, "uniform")          # a stabilisation phase
>>> init_keys(model, [images])                      # K-Means keys of every keyed router, layer by layer
>>> set_keys_trainable(model, True)
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn

from pce.layers.attention import DeformableAttention
from pce.moe.recorder import RoutingSource, strip_wrapper_prefix
from pce.moe.routers import build_router
from pce.moe.routing import Router

__all__ = ["RoutedLayerMixin", "routed_layers", "key_routers", "set_router_override", "set_keys_trainable",
           "upcycle_experts", "set_attention_enabled", "init_keys"]


class RoutedLayerMixin(RoutingSource):
    """Mixin of a routed ``nn.Module``. The class sets ``router``, ``num_experts``, ``experts`` (an
    :class:`~pce.moe.experts.ExpertBank`) and ``router_override = None`` in ``__init__`` and defines
    ``router_in_channels`` (what its router reads: content plus positional channels). ``balance``: the layer's own
    load-balancing term (:mod:`pce.moe.balance`), stamped on the results it records; ``None``: the default."""

    router: Router
    router_override: Optional[Router]
    num_experts: int
    balance: Optional[str] = None

    @property
    def router_in_channels(self) -> int:  # pragma: no cover - every routed layer defines it
        raise NotImplementedError

    def set_router_override(self, name: Optional[str], **kwargs: Any) -> None:
        """Route with a parameter-free registered router (``"uniform"``, ``"positional"``, ``"shared"``) instead of
        the learned one, e.g. during a stabilisation phase; ``None`` restores the learned router. The learned
        router's ``top_k`` carries over unless given, so stabilisation costs what routing costs."""
        if name is None:
            self.router_override = None
            return
        if getattr(self.router, "top_k", None) is not None:
            kwargs.setdefault("top_k", self.router.top_k)
        r = build_router(name, self.router_in_channels, self.num_experts, **kwargs)
        if not r.parameter_free or any(True for _ in r.parameters()):
            raise ValueError(f"router override {name!r} has parameters; use a parameter-free router")
        self.router_override = r.train(self.training)

    def current_router(self) -> Router:
        """The router this forward uses: the override when one is set, else the learned router."""
        return self.router_override if self.router_override is not None else self.router

    @property
    def key_router(self) -> Optional[Router]:
        """The learned router when it uses keys (``Router.uses_keys``: K-Means initialised, EMA-updated), else
        ``None``."""
        return self.router if getattr(self.router, "uses_keys", False) else None

    def set_keys_trainable(self, flag: bool) -> bool:
        """Phase switch of a keyed router (keys in the graph or EMA-updated); returns whether there was one."""
        r = self.key_router
        if r is not None:
            r.set_keys_trainable(flag)
        return r is not None

    def upcycle_experts(self, source: int = 0, optimizer: Optional[torch.optim.Optimizer] = None) -> None:
        """Copy expert ``source`` into every other expert (with its optimizer state when given)."""
        self.experts.upcycle(source, optimizer)


def routed_layers(model: nn.Module) -> Iterator[Tuple[str, RoutedLayerMixin]]:
    """``(name, layer)`` of every routed layer inside ``model`` (any wrapper), in registration order; names as
    :func:`pce.record_routing` gives them (wrapper prefixes such as DDP's ``module.`` removed)."""
    for name, module in model.named_modules():
        if isinstance(module, RoutedLayerMixin):
            yield strip_wrapper_prefix(name), module


def key_routers(model: nn.Module) -> Iterator[Router]:
    """The learned routers of ``model``'s routed layers that use keys, in layer order (what K-Means
    initialisation, ``set_keys_trainable`` and copying keys into an EMA model act on)."""
    return (layer.key_router for _, layer in routed_layers(model) if layer.key_router is not None)


def set_router_override(model: nn.Module, name: Optional[str], **kwargs: Any) -> int:
    """Route every routed layer of ``model`` with the parameter-free router ``name`` (``None``: the learned
    routers). Returns the number of layers."""
    layers = [layer for _, layer in routed_layers(model)]
    for layer in layers:
        layer.set_router_override(name, **kwargs)
    return len(layers)


def set_keys_trainable(model: nn.Module, flag: bool) -> int:
    """Keys of every keyed router of ``model`` in the graph (``True``) or EMA-updated; returns how many."""
    return sum(layer.set_keys_trainable(flag) for _, layer in routed_layers(model))


def upcycle_experts(model: nn.Module, source: int = 0, optimizer: Optional[torch.optim.Optimizer] = None) -> int:
    """Copy expert ``source`` into the other experts of every routed layer (sparse upcycling after a
    ``"shared"`` stabilisation phase), with its optimizer state when given. Returns the number of layers."""
    layers = [layer for _, layer in routed_layers(model)]
    for layer in layers:
        layer.upcycle_experts(source, optimizer)
    return len(layers)


def set_attention_enabled(model: nn.Module, flag: bool) -> int:
    """Switch every deformable-attention block of ``model`` on or off; returns how many."""
    blocks = [m for m in model.modules() if isinstance(m, DeformableAttention)]
    for m in blocks:
        m.enabled = bool(flag)
    return len(blocks)


def _default_forward(model: nn.Module, batch: Any) -> Any:
    device = next(model.parameters()).device
    return model(batch.to(device) if isinstance(batch, torch.Tensor) else batch)


@torch.no_grad()
def init_keys(model: nn.Module, batches: Iterable[Any], seed: int = 0, max_samples: int = 20000,
              routers: Optional[Sequence[Router]] = None,
              forward: Optional[Callable[[nn.Module, Any], Any]] = None) -> int:
    """K-Means initialisation of the keyed routers of ``model`` (default :func:`key_routers`; or ``routers``),
    one router at a time in layer order, so later layers see the features produced with the earlier layers' new
    keys: each collects the embeddings of the patches it routes (a :class:`pce.PCEConv2d`'s router its cells'
    pooled views) over ``forward(model, batch)`` (default ``model(batch)``) of every batch, in eval mode. Batches
    (tensors, or ``(images, ...)`` tuples whose first entry is taken) are materialised once. Router ``i`` uses
    seed ``seed + i``. Returns the number of routers initialised."""
    data: List[Any] = [b[0] if isinstance(b, (tuple, list)) else b for b in batches]
    if not data:
        raise ValueError("init_keys needs at least one batch of images")
    forward = forward or _default_forward
    todo = list(key_routers(model)) if routers is None else list(routers)
    was_training = model.training
    model.eval()
    try:
        for i, r in enumerate(todo):
            r.start_collecting()
            try:
                for x in data:
                    forward(model, x)
            finally:
                emb = r.stop_collecting()
            r.init_keys(emb, seed=seed + i, max_samples=max_samples)
    finally:
        model.train(was_training)
    return len(todo)
