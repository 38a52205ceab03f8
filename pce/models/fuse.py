"""Inference fusion: fold batch norms into the convolutions before them (exact in eval mode).

``fuse_for_inference(model)`` folds, in place,
* every expert's ``StackedBatchNorm2d`` into its ``StackedConv2d`` (per expert: ``w' = w * g / s``,
  ``b' = (b - mean) * g / s + beta`` with ``s = sqrt(var + eps)``), using the pairs each expert type declares
  in ``fusable_pairs``;
* every ``Conv2d`` directly followed by a ``BatchNorm2d`` inside an ``nn.Sequential`` (stems, downsampling),
  with ``torch.nn.utils.fusion.fuse_conv_bn_eval``.
The result is for inference only: calling ``train()`` on a fused model raises.

``capture_blockers(model)`` lists the layers whose execution cannot run in a captured graph (torch.export, ONNX,
torch.compile, jit.trace): ``execution="context"`` (data-dependent shapes). Every other strategy is static or
becomes the static ``capacity`` execution under capture (:mod:`pce.moe.execution`).
"""
from __future__ import annotations

from typing import List, Tuple

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from pce.moe.execution import Execution
from pce.moe.experts import ExpertBank, StackedBatchNorm2d, StackedConv2d


class FoldedNorm(nn.Module):
    """Stands in for a batch norm folded into the convolution before it: the identity."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward_all(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward_one(self, x: torch.Tensor, e: int) -> torch.Tensor:
        return x


@torch.no_grad()
def fold_stacked(conv: StackedConv2d, bn: StackedBatchNorm2d) -> None:
    """Fold ``bn`` into ``conv`` expert by expert (``conv`` gains biases)."""
    C = conv.out_channels
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    shift = bn.bias - bn.running_mean * scale
    if conv.biases is None:
        conv.biases = nn.ParameterList([nn.Parameter(torch.zeros(C, device=scale.device, dtype=scale.dtype))
                                        for _ in range(conv.num_experts)])
    for e in range(conv.num_experts):
        s = scale[e * C:(e + 1) * C]
        conv.weights[e].mul_(s.view(-1, 1, 1, 1))
        conv.biases[e].copy_(conv.biases[e] * s + shift[e * C:(e + 1) * C])


def _no_train(self: nn.Module, mode: bool = True) -> nn.Module:
    if mode:
        raise RuntimeError("this model was fused for inference (pce.models.fuse.fuse_for_inference); rebuild it to train")
    return nn.Module.train(self, False)


def fuse_for_inference(model: nn.Module) -> nn.Module:
    """Fold batch norms into convolutions throughout ``model`` (in place) and return it, in eval mode."""
    model.eval()
    for bank in [m for m in model.modules() if isinstance(m, ExpertBank)]:
        for conv_name, bn_name in getattr(bank, "fusable_pairs", ()):
            conv, bn = getattr(bank, conv_name, None), getattr(bank, bn_name, None)
            if isinstance(conv, StackedConv2d) and isinstance(bn, StackedBatchNorm2d):
                fold_stacked(conv, bn)
                setattr(bank, bn_name, FoldedNorm())
    for seq in [m for m in model.modules() if isinstance(m, nn.Sequential)]:
        names = list(seq._modules)
        for a, b in zip(names, names[1:]):
            conv, bn = seq._modules[a], seq._modules[b]
            if type(conv) is nn.Conv2d and isinstance(bn, nn.BatchNorm2d) and bn.track_running_stats:
                seq._modules[a] = fuse_conv_bn_eval(conv, bn)
                seq._modules[b] = nn.Identity()
    for m in model.modules():
        m.train = _no_train.__get__(m)  # type: ignore[method-assign]
    return model


def capture_blockers(model: nn.Module) -> List[Tuple[str, str]]:
    """``(module name, reason)`` of every layer of ``model`` whose execution strategy cannot be captured in a
    graph (its ``captured()`` stand-in raises); empty when ``model`` exports / compiles."""
    out: List[Tuple[str, str]] = []
    for name, m in model.named_modules():
        strategy = getattr(m, "strategy", None)
        if isinstance(strategy, Execution) and not strategy.static:
            try:
                strategy.captured(getattr(m, "router", None))
            except RuntimeError as e:
                out.append((name, str(e)))
    return out
