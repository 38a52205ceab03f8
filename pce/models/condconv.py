"""CondConv at any convolution of a model: the outside baseline of patch routing, at the same place.

CondConv (Yang et al., NeurIPS 2019; timm's :class:`timm.layers.CondConv2d`) mixes ``E`` expert kernels per
*image*: ``W(x) = sum_e r_e(x) W_e`` with ``r(x) = sigmoid(Linear(GAP(x)))``, then one convolution. PCE mixes per
*patch*. :func:`convert_condconv` puts a :class:`CondConvLayer` in place of the ``nn.Conv2d`` modules a target
selects (the same module paths, globs and predicates as :func:`pce.convert`), so a study compares PCE, CondConv and
the plain convolution at one place of one network (``model.condconv`` entries in a config).

Upcycling: each expert starts as ``2 W / E`` and the routing layer's bias at 0, so with a zero routing weight
(``sigmoid(0) = 1/2``) the layer computes exactly the original convolution; the routing weight starts small and
random (``init_std``), which breaks the symmetry between the otherwise identical experts.
"""
from __future__ import annotations

from typing import Any, List, Sequence, Tuple, Union

import torch
import torch.nn as nn

from .convert import Target, _candidates, _resolve

__all__ = ["CondConvLayer", "convert_condconv"]


class CondConvLayer(nn.Module):
    """A drop-in for ``conv`` (same arguments, same output shape) whose kernel is mixed per image.

    ``x [B, C_in, H, W] -> [B, C_out, H', W']``; routing weights ``[B, E]`` = ``sigmoid(routing(GAP(x)))``
    (kept in :attr:`last_routing` after each forward, detached, for inspection)."""

    def __init__(self, conv: nn.Conv2d, num_experts: int = 4, init_std: float = 0.01) -> None:
        super().__init__()
        from timm.layers import CondConv2d

        if num_experts < 1:
            raise ValueError(f"num_experts is {num_experts} (expected at least 1)")
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise ValueError(f"CondConv needs numeric zero padding, got padding={conv.padding!r}, "
                             f"padding_mode={conv.padding_mode!r} (a convolution with padding=int and zeros)")
        self.num_experts = num_experts
        self.routing = nn.Linear(conv.in_channels, num_experts)
        self.conv = CondConv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                               padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                               bias=conv.bias is not None, num_experts=num_experts)
        self.last_routing: torch.Tensor = torch.empty(0)
        with torch.no_grad():
            nn.init.normal_(self.routing.weight, std=init_std)
            nn.init.zeros_(self.routing.bias)
            w = conv.weight.detach().reshape(1, -1).to(self.conv.weight.dtype)
            self.conv.weight.copy_((2.0 / num_experts) * w.expand_as(self.conv.weight))
            if conv.bias is not None:
                self.conv.bias.copy_((2.0 / num_experts) * conv.bias.detach().reshape(1, -1).expand_as(self.conv.bias))
        self.to(conv.weight.device)

    def routing_weights(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, E]`` in ``(0, 1)``: ``sigmoid(Linear(mean over H, W of x))``."""
        return torch.sigmoid(self.routing(x.mean(dim=(2, 3))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.routing_weights(x)
        self.last_routing = r.detach()
        return self.conv(x, r)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}"


def convert_condconv(model: nn.Module, targets: Union[Target, Sequence[Target]], num_experts: int = 4,
                     init_std: float = 0.01) -> Tuple[nn.Module, List[str]]:
    """Replace the ``targets`` of ``model`` (module paths, globs or predicates selecting plain ``nn.Conv2d``, as
    :func:`pce.convert` takes them) in place by :class:`CondConvLayer` and return ``(model, replaced paths)``;
    a target that selects nothing is a ``ValueError`` naming it and the closest paths."""
    targets = [targets] if isinstance(targets, str) or callable(targets) else list(targets)
    convs, skipped = _candidates(model), []
    names: List[str] = []
    for t in targets:
        names += [n for n in _resolve(model, t, convs, skipped) if n not in names]
    for name in names:
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf,
                CondConvLayer(model.get_submodule(name), num_experts=num_experts, init_std=init_std))
    return model, names


def condconv_options() -> Tuple[str, ...]:
    """The keys of one ``model.condconv`` config entry."""
    return ("target", "num_experts", "init_std")


def apply_condconv_entries(model: nn.Module, entries: Sequence[Any]) -> List[List[str]]:
    """Each ``{target, num_experts, init_std}`` entry applied in turn; returns the replaced paths per entry."""
    done = []
    for entry in entries:
        entry = dict(entry)
        target = entry.pop("target")
        target = target if isinstance(target, str) else list(target)
        done.append(convert_condconv(model, target, **entry)[1])
    return done
