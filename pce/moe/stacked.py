"""Stacked layers: ``E`` convolutions or batch norms stored as one tensor, run for all experts at once (fused /
grouped) or for one expert on its own tokens. The building blocks of :mod:`pce.moe.experts`; :class:`StackedKernels`:
the same storage for any convolution geometry (:class:`pce.PCEConv2d`)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn


class StackedConv2d(nn.Module):
    """E convolutions ``C_in -> C_out`` (``k x k``, 'same' padding).

    Each expert owns its parameters (``weights[e]`` ``[C_out, C_in, k, k]``), so an expert that receives no
    token gets no gradient and costs nothing in the backward pass or the optimizer step; the fused path
    stacks them into ``weight`` ``[E, C_out, C_in, k, k]`` on the fly (a copy of the weights, not of
    activations).
    """

    def __init__(self, num_experts: int, in_channels: int, out_channels: int, kernel_size: int = 3,
                 bias: bool = False) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"expert kernel_size must be odd, got {kernel_size}")
        self.num_experts, self.in_channels, self.out_channels = num_experts, in_channels, out_channels
        self.kernel_size = kernel_size
        self.weights = nn.ParameterList(
            [nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size)) for _ in range(num_experts)])
        self.biases = nn.ParameterList(
            [nn.Parameter(torch.zeros(out_channels)) for _ in range(num_experts)]) if bias else None
        for w in self.weights:
            nn.init.kaiming_normal_(w, mode="fan_out", nonlinearity="relu")

    @property
    def weight(self) -> torch.Tensor:
        """All experts' kernels stacked: ``[E, C_out, C_in, k, k]``."""
        return torch.stack(list(self.weights))

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return torch.stack(list(self.biases)) if self.biases is not None else None

    def extra_repr(self) -> str:
        return f"E={self.num_experts}, {self.in_channels}->{self.out_channels}, k={self.kernel_size}"

    def forward_all(self, x: torch.Tensor) -> torch.Tensor:
        """Shared input ``[N, C_in, h, w]`` or per-expert input ``[N, E*C_in, h, w]`` -> ``[N, E*C_out, h, w]``."""
        E, k = self.num_experts, self.kernel_size
        if x.shape[1] == self.in_channels:  # shared input: one convolution with E * C_out outputs
            b = torch.cat(list(self.biases)) if self.biases is not None else None
            return F.conv2d(x, torch.cat(list(self.weights)), b, padding=k // 2)
        if x.shape[1] != E * self.in_channels:
            raise ValueError(f"expected {self.in_channels} or {E * self.in_channels} channels, got {x.shape[1]}")
        if x.device.type == "cpu" and E > 1:
            # Measured on CPU (oneDNN): E plain convolutions beat one grouped convolution by 1.5-3.5x
            # (see docs/BENCHMARKS.md); cuDNN's grouped convolution is used elsewhere.
            return torch.cat([self.forward_one(xi, e) for e, xi in enumerate(x.split(self.in_channels, 1))], 1)
        b = torch.cat(list(self.biases)) if self.biases is not None else None
        return F.conv2d(x, torch.cat(list(self.weights)), b, padding=k // 2, groups=E)

    def forward_one(self, x: torch.Tensor, e: int, padding: Optional[int] = None) -> torch.Tensor:
        """Expert ``e`` on ``[n, C_in, h, w]`` -> ``[n, C_out, h, w]`` ('same' padding by default;
        ``padding=0`` gives the valid convolution ``[n, C_in, h + 2r, w + 2r] -> [n, C_out, h, w]``)."""
        b = self.biases[e] if self.biases is not None else None
        return F.conv2d(x, self.weights[e], b, padding=self.kernel_size // 2 if padding is None else padding)

    @torch.no_grad()
    def copy_expert(self, src: int, dst: int, optimizer: Optional[torch.optim.Optimizer] = None) -> None:
        """Overwrite expert ``dst``'s kernel (and bias) with expert ``src``'s, and their optimizer state
        (e.g. Adam moments) when ``optimizer`` is given."""
        pairs = [(self.weights[src], self.weights[dst])]
        if self.biases is not None:
            pairs.append((self.biases[src], self.biases[dst]))
        for a, b in pairs:
            b.copy_(a)
            if optimizer is not None:
                if a in optimizer.state:
                    optimizer.state[b] = {k: v.clone() if torch.is_tensor(v) else v
                                          for k, v in optimizer.state[a].items()}
                else:
                    optimizer.state.pop(b, None)


class StackedBatchNorm2d(nn.BatchNorm2d):
    """E batch norms over C channels each, stored as one ``BatchNorm2d(E * C)``."""

    def __init__(self, num_experts: int, channels: int, **kwargs) -> None:
        super().__init__(num_experts * channels, **kwargs)
        self.num_experts, self.channels = num_experts, channels
        self._split: Optional[tuple] = None

    def split(self, on: bool) -> None:
        """Cache per-expert affine parameters made by one ``split`` (see :meth:`ExpertBank.per_expert`)."""
        self._split = (self.weight.split(self.channels), self.bias.split(self.channels)) if on else None

    def forward_all(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)

    @torch.no_grad()
    def copy_expert(self, src: int, dst: int, optimizer: Optional[torch.optim.Optimizer] = None) -> None:
        """Overwrite expert ``dst``'s affine parameters and running statistics with expert ``src``'s, and the
        matching slices of their optimizer state when ``optimizer`` is given."""
        c = self.channels
        a, b = slice(src * c, (src + 1) * c), slice(dst * c, (dst + 1) * c)
        for t in (self.weight, self.bias, self.running_mean, self.running_var):
            if t is not None:
                t[b] = t[a].clone()
        for p in (self.weight, self.bias):
            state = optimizer.state.get(p) if optimizer is not None and p is not None else None
            for v in (state or {}).values():
                if torch.is_tensor(v) and v.shape == p.shape:  # per-element state (moments); not the step count
                    v[b] = v[a].clone()

    def normalize_pooled(self, x: torch.Tensor) -> torch.Tensor:
        """Training-mode normalisation of all experts' rows ``[N, C, h, w]`` with their joint batch statistics,
        without the affine (apply each expert's with :meth:`affine_one`); every expert's running statistics
        track the joint ones."""
        c = self.channels
        rm = self.running_mean[:c].clone() if self.running_mean is not None else None
        rv = self.running_var[:c].clone() if self.running_var is not None else None
        x = F.batch_norm(x, rm, rv, None, None, True, self.momentum if self.momentum is not None else 0.1, self.eps)
        if rm is not None:
            with torch.no_grad():
                self.running_mean.copy_(rm.repeat(self.num_experts))
                self.running_var.copy_(rv.repeat(self.num_experts))
                if self.num_batches_tracked is not None:
                    self.num_batches_tracked.add_(1)
        return x

    def affine_one(self, x: torch.Tensor, e: int) -> torch.Tensor:
        """Expert ``e``'s scale and shift on normalised rows."""
        c = self.channels
        weight, bias = (self._split[0][e], self._split[1][e]) if self._split is not None else (
            self.weight[e * c:(e + 1) * c], self.bias[e * c:(e + 1) * c])
        return x * weight.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)

    def forward_one(self, x: torch.Tensor, e: int) -> torch.Tensor:
        s = slice(e * self.channels, (e + 1) * self.channels)
        use_batch = self.training or self.running_mean is None
        weight, bias = (self._split[0][e], self._split[1][e]) if self._split is not None else (self.weight[s], self.bias[s])
        return F.batch_norm(
            x, self.running_mean[s] if self.running_mean is not None else None,
            self.running_var[s] if self.running_var is not None else None,
            weight, bias, use_batch, self.momentum if self.momentum is not None else 0.1, self.eps,
        )


class StackedKernels(StackedConv2d):
    """E kernels of one convolution geometry (any kernel size, stride, dilation, groups), each expert's own
    parameters (``weights[e] [C_out, C_in / groups, kh, kw]``, ``biases[e] [C_out]``: :class:`StackedConv2d`'s
    storage, so expert surgery, upcycling and batch-norm folding apply as they are). Inputs come padded:
    ``forward_one`` is the valid convolution. The kernels of :class:`pce.PCEConv2d`."""

    def __init__(self, num_experts: int, in_channels: int, out_channels: int, kernel_size: Tuple[int, int],
                 stride: Tuple[int, int], dilation: Tuple[int, int], groups: int, bias: bool) -> None:
        nn.Module.__init__(self)  # StackedConv2d's own constructor: odd square 'same' kernels only
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"in_channels={in_channels} and out_channels={out_channels} must be divisible by "
                             f"groups={groups}")
        self.num_experts, self.in_channels, self.out_channels = num_experts, in_channels, out_channels
        self.kernel_size, self.stride, self.dilation, self.groups = kernel_size, stride, dilation, groups
        shape = (out_channels, in_channels // groups, *kernel_size)
        self.weights = nn.ParameterList([nn.Parameter(torch.empty(shape)) for _ in range(num_experts)])
        self.biases = nn.ParameterList([nn.Parameter(torch.empty(out_channels)) for _ in range(num_experts)]) \
            if bias else None
        fan_in = shape[1] * kernel_size[0] * kernel_size[1]
        for e in range(num_experts):  # nn.Conv2d's initialisation
            nn.init.kaiming_uniform_(self.weights[e], a=5 ** 0.5)
            if self.biases is not None:
                nn.init.uniform_(self.biases[e], -fan_in ** -0.5, fan_in ** -0.5)

    def extra_repr(self) -> str:
        return (f"E={self.num_experts}, {self.in_channels}->{self.out_channels}, k={self.kernel_size}, "
                f"stride={self.stride}, dilation={self.dilation}, groups={self.groups}")

    def forward_one(self, x: torch.Tensor, e: int, padding: int = 0) -> torch.Tensor:
        """Expert ``e``: ``[n, C_in, h, w]`` -> ``[n, C_out, h', w']`` (valid unless ``padding``)."""
        b = self.biases[e] if self.biases is not None else None
        return F.conv2d(x, self.weights[e], b, self.stride, padding, self.dilation, self.groups)

    def forward_all(self, x: torch.Tensor) -> torch.Tensor:
        """Every expert on ``[N, C_in, h, w]`` -> ``[N, E * C_out, h', w']``."""
        return torch.cat([self.forward_one(x, e) for e in range(self.num_experts)], 1)
