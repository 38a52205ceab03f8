"""Convolutional experts stored as a bank of stacked weights.

An expert type is written once, as :meth:`ExpertBank.run` over *stacked* layers, and executes in two ways:

* ``run(x, ALL)``: every expert on the same input. The first convolution of all experts is fused into one
  convolution with ``E * C_out`` output channels, later ones are grouped convolutions (``groups = E``; on CPU
  E plain convolutions over channel slices, which measured faster than oneDNN's grouped kernel) and
  batch norm runs over the ``E * C`` channels, which is exactly per-expert batch norm.
  Returns ``[N, E * C_out, h, w]``.
* ``run(x, OneExpert(e))``: expert ``e`` alone on its own tokens (slices of the same weights).

So a new expert type is one class with stacked layers and a ``run`` method, plus one registry line.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from pce.moe.stacked import StackedBatchNorm2d, StackedConv2d, StackedKernels
from pce.registry import EXPERTS

__all__ = ["StackedConv2d", "StackedBatchNorm2d", "StackedKernels", "AllExperts", "OneExpert", "ExpertBank",
           "ConvExperts", "build_expert_bank", "torchscript_refusal"]


def torchscript_refusal(what: str) -> RuntimeError:
    """The error PCE modules raise from ``__prepare_scriptable__``, which ``torch.jit.script`` calls on every module
    of a model before compiling any: ``what`` (e.g. ``"PCE layers"``) cannot be scripted, and the capture paths that
    work instead. One message for PCE layers, their dense twins, expert banks and backbones, so a model refuses
    the same way whichever of them ``torch.jit.script`` meets first (a ``RuntimeError``, as smp's
    ``_is_torch_scriptable = False`` promises; TorchScript's own ``NotSupportedError`` is not one)."""
    return RuntimeError(f"{what} cannot be compiled with torch.jit.script (routing, expert banks, registries and "
                        "dataclasses are plain Python); export with torch.export / ONNX (tools/export.py) or "
                        "torch.jit.trace, which keep routing input-dependent")


class AllExperts:
    """Selection: run every expert (tensors carry ``E * C`` channels after the first layer)."""

    def __init__(self, num_experts: int) -> None:
        self.num_experts = num_experts

    def conv(self, layer: StackedConv2d, x: torch.Tensor) -> torch.Tensor:
        return layer.forward_all(x)

    def norm(self, layer: StackedBatchNorm2d, x: torch.Tensor) -> torch.Tensor:
        return layer.forward_all(x)

    def identity(self, x: torch.Tensor, channels: int) -> torch.Tensor:
        """The input as a per-expert tensor (repeat a shared input E times)."""
        return x.repeat(1, self.num_experts, 1, 1) if x.shape[1] == channels else x


class OneExpert:
    """Selection: run expert ``e`` only."""

    def __init__(self, e: int) -> None:
        self.e = e

    def conv(self, layer: StackedConv2d, x: torch.Tensor) -> torch.Tensor:
        return layer.forward_one(x, self.e)

    def norm(self, layer: StackedBatchNorm2d, x: torch.Tensor) -> torch.Tensor:
        return layer.forward_one(x, self.e)

    def identity(self, x: torch.Tensor, channels: int) -> torch.Tensor:
        return x


class ExpertBank(nn.Module):
    """Base class of an expert type: E experts ``[N, C_in, h, w] -> [N, C_out, h, w]``.

    Subclasses build stacked layers in ``__init__`` and implement :meth:`run`.
    ``receptive_radius`` is how many pixels of context one output pixel reads on each side.
    """

    receptive_radius = 0
    fusable_pairs: tuple = ()  # (conv, batch norm) attribute pairs that pce.models.fuse may fold for inference

    def __init__(self, num_experts: int, in_channels: int, out_channels: int) -> None:
        super().__init__()
        if not isinstance(num_experts, int) or num_experts < 1:
            raise ValueError(f"num_experts must be an integer >= 1, got {num_experts!r}")
        self.num_experts, self.in_channels, self.out_channels = num_experts, in_channels, out_channels

    def run(self, x: torch.Tensor, sel) -> torch.Tensor:
        raise NotImplementedError

    def __prepare_scriptable__(self) -> "ExpertBank":
        raise torchscript_refusal("PCE expert banks")

    def forward_all(self, x: torch.Tensor) -> torch.Tensor:
        """All experts on ``[N, C_in, h, w]`` -> ``[N, E, C_out, h, w]``."""
        y = self.run(x, AllExperts(self.num_experts))
        return y.reshape(x.shape[0], self.num_experts, self.out_channels, *y.shape[-2:])

    def forward_one(self, x: torch.Tensor, e: int) -> torch.Tensor:
        """Expert ``e`` on ``[n, C_in, h, w]`` -> ``[n, C_out, h, w]``."""
        return self.run(x, OneExpert(e))

    @contextmanager
    def per_expert(self) -> Iterator["ExpertBank"]:
        """Within this context :meth:`forward_one` reads batch-norm affine views taken once per layer, so
        running several experts costs one gradient buffer per layer rather than one zero-filled buffer each."""
        layers = [m for m in self.modules() if isinstance(m, StackedBatchNorm2d)]
        for m in layers:
            m.split(True)
        try:
            yield self
        finally:
            for m in layers:
                m.split(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_all(x)

    def upcycle(self, source: int = 0, optimizer: Optional[torch.optim.Optimizer] = None) -> None:
        """Copy expert ``source`` into every other expert (sparse upcycling): all stacked layers, parameters and
        batch-norm statistics, and, given the ``optimizer``, its state for them (so the copies continue with
        ``source``'s Adam moments instead of fresh ones, whose first steps are full-size ``lr * sign(g)``)."""
        if not 0 <= source < self.num_experts:
            raise ValueError(f"source expert must be in [0, {self.num_experts}), got {source}")
        for m in self.modules():
            if isinstance(m, (StackedConv2d, StackedBatchNorm2d)):
                for e in range(self.num_experts):
                    if e != source:
                        m.copy_expert(source, e, optimizer)


class TwoConvExpert(ExpertBank):
    """Shared body of the two-convolution experts: conv1, bn1, dropout, conv2, bn2 (stacked over E)."""

    fusable_pairs = (("conv1", "bn1"), ("conv2", "bn2"), ("skip", "skip_bn"))

    def __init__(self, num_experts: int, in_channels: int, out_channels: int, kernel_size: int = 3,
                 dropout: float = 0.0) -> None:
        super().__init__(num_experts, in_channels, out_channels)
        E = num_experts
        self.receptive_radius = 2 * (kernel_size // 2)
        self.conv1 = StackedConv2d(E, in_channels, out_channels, kernel_size)
        self.bn1 = StackedBatchNorm2d(E, out_channels)
        self.drop = nn.Dropout(dropout)
        self.conv2 = StackedConv2d(E, out_channels, out_channels, kernel_size)
        self.bn2 = StackedBatchNorm2d(E, out_channels)


@EXPERTS.register("residual")
class ResidualExpert(TwoConvExpert):
    """Seeds 000/001: Conv-BN-ReLU-Dropout -> Conv-BN -> (+ skip) -> ReLU; 1x1 conv + BN on the skip when
    the channel count changes."""

    def __init__(self, num_experts: int, in_channels: int, out_channels: int, kernel_size: int = 3,
                 dropout: float = 0.0) -> None:
        super().__init__(num_experts, in_channels, out_channels, kernel_size, dropout)
        if in_channels != out_channels:
            self.skip: Optional[StackedConv2d] = StackedConv2d(num_experts, in_channels, out_channels, 1)
            self.skip_bn: Optional[StackedBatchNorm2d] = StackedBatchNorm2d(num_experts, out_channels)
        else:
            self.skip, self.skip_bn = None, None

    def run(self, x: torch.Tensor, sel) -> torch.Tensor:
        h = self.drop(F.relu(sel.norm(self.bn1, sel.conv(self.conv1, x))))
        h = sel.norm(self.bn2, sel.conv(self.conv2, h))
        s = sel.identity(x, self.in_channels) if self.skip is None else sel.norm(self.skip_bn, sel.conv(self.skip, x))
        return F.relu(h + s)


@EXPERTS.register("double_conv")
class DoubleConvExpert(TwoConvExpert):
    """Seed 002: Conv-BN-GELU-Dropout -> Conv-BN, no skip."""

    def run(self, x: torch.Tensor, sel) -> torch.Tensor:
        h = self.drop(F.gelu(sel.norm(self.bn1, sel.conv(self.conv1, x))))
        return sel.norm(self.bn2, sel.conv(self.conv2, h))


@EXPERTS.register("conv_bn_relu")
class ConvBNReLUExpert(ExpertBank):
    """Seeds 003/004: a single Conv-BN-ReLU."""

    fusable_pairs = (("conv", "bn"),)

    def __init__(self, num_experts: int, in_channels: int, out_channels: int, kernel_size: int = 3,
                 dropout: float = 0.0) -> None:
        super().__init__(num_experts, in_channels, out_channels)
        self.receptive_radius = kernel_size // 2
        self.conv = StackedConv2d(num_experts, in_channels, out_channels, kernel_size)
        self.bn = StackedBatchNorm2d(num_experts, out_channels)
        self.drop = nn.Dropout(dropout)

    def run(self, x: torch.Tensor, sel) -> torch.Tensor:
        return self.drop(F.relu(sel.norm(self.bn, sel.conv(self.conv, x))))


class ConvExperts(ExpertBank):
    """The expert bank of :class:`pce.PCEConv2d`: E convolutions of padded inputs, ``[N, C_in, h, w] -> [N, C_out,
    h', w']`` (``h' = (h - d (k - 1) - 1) // s + 1``); ``weight [E, C_out, C_in / groups, kh, kw]``,
    ``bias [E, C_out]``.

    Not in :data:`~pce.registry.EXPERTS`: registered banks keep the map size (``'same'`` odd square kernels, what
    :class:`~pce.models.layer.PCELayer`'s strategies and stitched context execution assume), while this one is a
    valid convolution of any geometry (stride, dilation, rectangular kernels) run on windows its layer cuts.
    Everything that walks expert banks (surgery, upcycling, batch-norm folding) sees its :class:`StackedKernels`
    as a :class:`StackedConv2d`."""

    def __init__(self, num_experts: int, in_channels: int, out_channels: int, kernel_size: Tuple[int, int],
                 stride: Tuple[int, int], dilation: Tuple[int, int], groups: int, bias: bool) -> None:
        super().__init__(num_experts, in_channels, out_channels)
        self.conv = StackedKernels(num_experts, in_channels, out_channels, kernel_size, stride, dilation, groups, bias)

    @property
    def weight(self) -> torch.Tensor:
        return self.conv.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.conv.bias

    def run(self, x: torch.Tensor, sel) -> torch.Tensor:
        return sel.conv(self.conv, x)

    @torch.no_grad()
    def load_from(self, weight: torch.Tensor, bias: Optional[torch.Tensor], noise: float = 0.0) -> None:
        """Every expert := ``weight`` (``[C_out, C_in / groups, kh, kw]``) and ``bias``, the kernels plus
        ``noise * std(weight)`` Gaussian noise each."""
        for e in range(self.num_experts):
            w = weight if noise <= 0 else weight + noise * weight.std() * torch.randn_like(weight)
            self.conv.weights[e].copy_(w)
            if self.conv.biases is not None and bias is not None:
                self.conv.biases[e].copy_(bias)


def build_expert_bank(name: str, num_experts: int, in_channels: int, out_channels: int, **kwargs) -> ExpertBank:
    """Build a registered expert type as a bank of ``num_experts`` experts."""
    return EXPERTS.get(name)(num_experts, in_channels, out_channels, **kwargs)
