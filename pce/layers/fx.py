"""FX symbolic tracing (``torch.fx.symbolic_trace``, torchvision's ``create_feature_extractor``, timm's FX
feature extraction) of models whose blocks branch on shapes or data.

FX runs ``forward`` once on :class:`torch.fx.Proxy` objects, which cannot drive Python control flow. Two tools,
both no-ops on real tensors, let such models trace with any tracer and no tracer arguments:

* :func:`fx_leaf` (a decorator of ``forward``): under tracing the module records itself as one ``call_module``
  node named by its module path (``stages.1.layers.0``) instead of being traced through, exactly as FX does
  for ``torch.nn`` modules. The traced ``GraphModule`` holds the very same module object and calls it eagerly,
  so its shape logic, routing and routing recording run on every call, as in the original model.
* :func:`check_map`: the ``[B, C, H, W]`` input check; under tracing it is recorded as a ``call_function``
  node, so the traced module still raises the same ``ValueError`` on a wrong input;
* :func:`false_when_traced`: an optional ``bool`` argument of ``forward`` (``return_routing``), which FX turns
  into an input of the graph: the graph takes the ``False`` branch and asserts at run time that it is ``False``.
"""
from __future__ import annotations

import functools
import operator
from typing import Any, Callable, Optional, TypeVar

import torch
from torch import fx

__all__ = ["fx_leaf", "check_map", "false_when_traced", "fx_tracer"]

F = TypeVar("F", bound=Callable[..., Any])


def fx_tracer(*args: Any) -> Optional[fx.Tracer]:
    """The FX tracer running now, when one of ``args`` is one of its proxies (``None`` on real tensors)."""
    for a in args:
        if isinstance(a, fx.Proxy):
            return a.tracer
    return None


def fx_leaf(forward: F) -> F:
    """Decorator of ``nn.Module.forward``: under FX symbolic tracing the call becomes one ``call_module`` node
    (the module is an FX leaf for every tracer); otherwise ``forward`` runs unchanged.

    Raises ``torch.fx.proxy.TraceError`` when the module is the root of the trace (a module cannot be a node of
    its own graph): trace a model that contains it."""

    @functools.wraps(forward)
    def wrapper(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        tracer = fx_tracer(*args, *kwargs.values())
        if tracer is None:
            return forward(self, *args, **kwargs)
        path = tracer.path_of_module(self)
        if not path:
            raise fx.proxy.TraceError(f"{type(self).__name__} branches on shapes and data and is traced as a leaf "
                                      "module: symbolically trace a model that contains it, not the layer itself")
        return tracer.create_proxy("call_module", path, args, kwargs)

    return wrapper  # type: ignore[return-value]


def check_map(x: torch.Tensor, channels: int, what: str) -> torch.Tensor:
    """``x`` itself when it is ``[B, channels, H, W]``; else ``ValueError("{what} expects input [B, channels, H,
    W], got (shape)")``. Under FX tracing: a graph node doing this check when the traced module runs."""
    tracer = fx_tracer(x)
    if tracer is not None:
        return tracer.create_proxy("call_function", check_map, (x, channels, what), {})
    if x.dim() != 4 or x.shape[1] != channels:
        raise ValueError(f"{what} expects input [B, {channels}, H, W], got {tuple(x.shape)}")
    return x


def false_when_traced(flag: Any, message: str) -> Any:
    """``flag`` itself on real values; for an FX proxy (a ``forward`` argument the graph cannot branch on)
    ``False``, after recording ``torch._assert(flag == False, message)``, so the traced module fails loudly
    instead of ignoring ``flag=True``."""
    if not isinstance(flag, fx.Proxy):
        return flag
    torch._assert(operator.eq(flag, False), message)
    return False
