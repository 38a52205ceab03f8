"""What ``torch.jit`` needs to trace PCE models for fvcore's FLOP count (:func:`pce.models.flops.count_flops`):
:class:`TraceableScatter` (bool-scalar scatters as tensors) and :class:`TraceableOutputs` (mapping outputs as
tuples)."""
from __future__ import annotations

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

__all__ = ["TraceableScatter", "TraceableOutputs"]


class TraceableScatter(TorchFunctionMode):
    """``t.scatter_(dim, index, True)`` with a *bool* scalar (the routers' top-k masks, e.g.
    ``pce.moe.routing.top_k_mask``) has no TorchScript schema, so ``torch.jit`` tracing fails on it with an
    internal assert. While tracing, bool scalars are passed as a tensor source instead (same result)."""

    _FUNCS = (torch.Tensor.scatter_, torch.Tensor.scatter, torch.scatter)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self._FUNCS and len(args) >= 4 and isinstance(args[3], bool) and isinstance(args[2], torch.Tensor):
            make = torch.ones_like if args[3] else torch.zeros_like
            args = (args[0], args[1], args[2], make(args[2], dtype=args[0].dtype)) + tuple(args[4:])
        return func(*args, **kwargs)


class TraceableOutputs(nn.Module):
    """Wraps models whose output is a mapping (backbones) so that ``torch.jit`` can trace them."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: torch.Tensor):
        out = self.model(*args)
        if isinstance(out, dict):
            return tuple(out.values())
        return out
