"""Inference fusion: fold batch norms into the convolutions before them (exact in eval mode).

``fuse_for_inference(model)`` folds, in place,
* every expert's ``StackedBatchNorm2d`` into its ``StackedConv2d`` (per expert: ``w' = w * g / s``,
  ``b' = (b - mean) * g / s + beta`` with ``s = sqrt(var + eps)``), using the pairs each expert type declares
  in ``fusable_pairs``;
* every ``BatchNorm2d`` that directly follows a plain ``Conv2d`` (with ``torch.nn.utils.fusion.fuse_conv_bn_eval``)
  or a :class:`pce.PCEConv2d` (into every expert's kernel: the layer outputs ``sum_e w_e conv_e(x)`` with weights
  summing to 1 per patch, so ``BN(sum_e w_e conv_e(x)) = sum_e w_e BN(conv_e(x))``; only when its router
  renormalises and drops no patch, i.e. no capacity; otherwise the pair is left as it is). "Directly follows":
  adjacent in an ``nn.Sequential`` (stems, downsampling), or, in a model ``torch.fx.symbolic_trace`` can trace (a
  timm ResNet's ``conv2`` -> ``bn2``), the batch norm's input is the convolution's output and nothing else reads
  it. Each folded batch norm becomes an ``nn.Identity``.
The result is for inference only: calling ``train()`` on a fused model raises.

``capture_blockers(model)`` lists the layers whose execution cannot run in a captured graph (torch.export, ONNX,
torch.compile, jit.trace): ``execution="context"`` layers whose router gives a patch several experts (context
computes one expert per patch). Every other strategy is static or becomes a static one under capture (context:
every expert on the whole map, each pixel kept from its patch's expert; the rest: ``capacity``; see
:mod:`pce.moe.execution`); :class:`pce.PCEConv2d` runs its dense implementation there.
"""
from __future__ import annotations

import logging
import warnings
from collections import Counter
from typing import List, Tuple

import torch
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

from pce.models.pce_conv import PCEConv2d
from pce.moe.execution import Execution
from pce.moe.experts import ExpertBank, StackedBatchNorm2d, StackedConv2d

logger = logging.getLogger("pce")


class FoldedNorm(nn.Module):
    """Stands in for a batch norm folded into the convolution before it: the identity."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward_all(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward_one(self, x: torch.Tensor, e: int) -> torch.Tensor:
        return x


@torch.no_grad()
def fold_kernels(conv: StackedConv2d, scale: torch.Tensor, shift: torch.Tensor) -> None:
    """``conv``'s experts followed by the affine map ``y * scale + shift`` (``[E * C_out]``: one per expert, or
    ``[C_out]``: shared), folded into their kernels and biases (``conv`` gains biases)."""
    C, E = conv.out_channels, conv.num_experts
    scale, shift = scale.reshape(-1, C).expand(E, C), shift.reshape(-1, C).expand(E, C)
    if conv.biases is None:
        conv.biases = nn.ParameterList([nn.Parameter(torch.zeros(C, device=scale.device, dtype=scale.dtype))
                                        for _ in range(E)])
    for e in range(E):
        conv.weights[e].mul_(scale[e].view(-1, *[1] * (conv.weights[e].dim() - 1)))
        conv.biases[e].copy_(conv.biases[e] * scale[e] + shift[e])


def _affine(bn: nn.BatchNorm2d) -> Tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode batch norm as ``y * scale + shift``."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale + (bn.bias if bn.bias is not None else 0)
    return scale, shift


@torch.no_grad()
def fold_stacked(conv: StackedConv2d, bn: StackedBatchNorm2d) -> None:
    """Fold ``bn`` into ``conv`` expert by expert (``conv`` gains biases)."""
    fold_kernels(conv, *_affine(bn))


def _sums_to_one(layer: PCEConv2d) -> bool:
    """Whether ``layer``'s routing weights sum to 1 on every patch (renormalised, no capacity drops)."""
    routers = [layer.router] + ([layer.router_override] if layer.router_override is not None else [])
    return all(bool(getattr(r, "renormalize", False)) and getattr(r, "capacity_factor", None) is None
               and getattr(r, "choice_capacity_factor", None) is None for r in routers)


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    if not (isinstance(bn, nn.BatchNorm2d) and not isinstance(bn, StackedBatchNorm2d) and bn.track_running_stats
            and bn.running_mean is not None):
        return False
    return type(conv) is nn.Conv2d or (isinstance(conv, PCEConv2d) and _sums_to_one(conv))


def _sequential_pairs(model: nn.Module) -> List[Tuple[str, str]]:
    """``(conv, batch norm)`` module paths adjacent in an ``nn.Sequential``."""
    out = []
    for name, seq in model.named_modules():
        if isinstance(seq, nn.Sequential):
            prefix = name + "." if name else ""
            names = list(seq._modules)
            out += [(prefix + a, prefix + b) for a, b in zip(names, names[1:])]
    return out


def _graph_pairs(model: nn.Module) -> List[Tuple[str, str]]:
    """``(conv, batch norm)`` module paths of an FX trace of ``model`` where the batch norm reads the module's
    output and nothing else does, each module called once; none when ``model`` does not trace."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = fx.symbolic_trace(model).graph
    except Exception as e:  # noqa: BLE001 - any model FX cannot trace: fold what nn.Sequential shows
        logger.debug("fuse_for_inference: %s does not FX-trace (%s); folding nn.Sequential pairs only",
                     type(model).__name__, e)
        return []
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    out = []
    for node in graph.nodes:
        src = node.args[0] if node.op == "call_module" and node.args else None
        if isinstance(src, fx.Node) and src.op == "call_module" and len(src.users) == 1:
            if calls[src.target] == 1 and calls[node.target] == 1:
                out.append((str(src.target), str(node.target)))
    return out


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent), leaf, new)


def fold_conv_bn(model: nn.Module) -> List[Tuple[str, str]]:
    """Fold every batch norm that directly follows a plain ``nn.Conv2d`` or a :class:`pce.PCEConv2d` (see the
    module docstring) into it, in place, in eval mode. Returns the ``(conv, batch norm)`` paths folded."""
    done: List[Tuple[str, str]] = []
    seen = set()
    for conv_name, bn_name in _graph_pairs(model) + _sequential_pairs(model):
        if conv_name in seen or bn_name in seen:
            continue
        conv, bn = model.get_submodule(conv_name), model.get_submodule(bn_name)
        if not _foldable(conv, bn):
            if isinstance(conv, PCEConv2d) and isinstance(bn, nn.BatchNorm2d):
                logger.info("fuse_for_inference: %s is not folded into %s (its routing weights need not sum to 1)",
                            bn_name, conv_name)
            continue
        if isinstance(conv, PCEConv2d):
            fold_kernels(conv.experts.conv, *_affine(bn))
        else:
            _replace(model, conv_name, fuse_conv_bn_eval(conv, bn))
        _replace(model, bn_name, nn.Identity())
        seen.update((conv_name, bn_name))
        done.append((conv_name, bn_name))
    return done


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
    fold_conv_bn(model)
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
