"""The static-shape form of ``execution="context"`` under graph capture (``torch.export``, ONNX,
``torch.compile``, ``jit.trace``): :class:`StaticContextExecution`, which
:meth:`pce.moe.execution.ContextExecution.captured` returns. Every layer of the expert bank runs every expert on the
whole padded map and keeps, per pixel, its patch's expert's output: the stitched computation of eager context
execution with static shapes (exact, E x the cost). Not registered: it is reached only through ``captured()``.
"""
from __future__ import annotations

from typing import Optional

import torch

from pce.layers.patched_map import PatchedMap
from pce.moe.execution import Execution, ExecutionOptions
from pce.moe.experts import ExpertBank, StackedBatchNorm2d
from pce.moe.routing import Router

__all__ = ["StaticContextExecution"]

class StaticContextExecution(Execution):
    """Context execution with static shapes: what :class:`ContextExecution` resolves to under graph capture
    (``torch.export``, ONNX, ``torch.compile``, ``jit.trace``). Not registered: build ``execution="context"``.

    :func:`pce.moe.dispatch.dispatch_context` computes each pixel with its patch's expert, layer by layer, a
    convolution reading the previous layer's values of the neighbouring patches (as *their* experts computed
    them). Here every layer runs on the whole padded map ``[B, C, Hp, Wp]`` (:class:`_StitchedMap`): a
    convolution runs every expert's kernels on the stitched map (one fused convolution, ``E * C_out`` outputs)
    and keeps, at each pixel, the output of the pixel's expert (a gather); batch norm normalises each pixel with
    its expert's statistics. That is the same computation, with no data-dependent shape and no host
    synchronisation. It is exact, with the eager path's semantics throughout:

    * padding and dropped patches: a ``k x k`` convolution reads zeros outside the map, in the grid's padding and,
      after the first layer, at dropped patches (all-zero weights); ``1 x 1`` convolutions read the rows as they
      are; outputs are cropped to the map and dropped patches output zeros;
    * training-mode batch norm: expert e's statistics over the pixels of the patches routed to it (their
      padding included), or over all routed pixels with ``norm_stats="layer"``; running statistics updated
      as :meth:`~pce.moe.stacked.StackedBatchNorm2d.forward_one` / ``normalize_pooled`` do, only for experts
      with pixels (masked means, no branch); eval mode: each pixel's expert's running statistics;
    * the output is scaled by each patch's weight for its expert, ``weights[b, p, e]`` gathered, so gradients
      reach that entry only (straight-through and renormalised weights as in eager);
    * an expert without pixels gets zero gradients (eager: none, as it does not run);
    * dropout masks are drawn on the whole map (the same distribution, other draws).

    Cost: E x the FLOPs of eager context execution (every expert on every pixel, in every layer), and E x one
    layer's activations for the convolution outputs; the weighted sums, gathers and masks are elementwise. A
    capacity-bounded schedule would not be exact: a convolution at a patch border needs the neighbours' values
    of every layer, whatever expert computed them. Routing must be top-1 (or dropped), as in eager execution;
    a patch with several experts (which eager refuses) is computed by the first of them.
    """

    name, neighbours, static, norm_stats = "context", True, True, ("expert", "layer")

    def resolve(self, router: Router, device: torch.device) -> Execution:
        return self

    def __call__(self, bank: ExpertBank, view: PatchedMap, weights: torch.Tensor,
                 opt: ExecutionOptions) -> torch.Tensor:
        g, n = view.grid, view.grid.patch_size
        B, P, E = weights.shape
        Hp, Wp = g.padded_size

        def to_pixels(t: torch.Tensor) -> torch.Tensor:  # per patch [B, P] -> per pixel [B, 1, Hp, Wp]
            return t.reshape(B, g.grid_h, 1, g.grid_w, 1).expand(B, g.grid_h, n, g.grid_w, n).reshape(B, 1, Hp, Wp)

        routed = weights.detach() != 0
        keep = routed.any(-1)  # [B, P]: not dropped
        idx = routed.to(weights.dtype).argmax(-1)  # [B, P]: the patch's expert (0 when dropped)
        w = torch.where(keep, weights.gather(-1, idx.unsqueeze(-1)).squeeze(-1), torch.zeros_like(weights[..., 0]))
        inside = None
        if (Hp, Wp) != (g.height, g.width):  # the grid pads bottom / right: [1, 1, Hp, Wp]
            inside = ((torch.arange(Hp, device=weights.device) < g.height).view(-1, 1)
                      & (torch.arange(Wp, device=weights.device) < g.width).view(1, -1)).view(1, 1, Hp, Wp)
        x = view.map(opt.experts_see_position)
        keep_px = to_pixels(keep)
        sel = _StitchedMap(x, to_pixels(idx), keep_px, inside, E, opt.norm_stats)
        with bank.per_expert():
            y = bank.run(x, sel)
        out = torch.where(keep_px, y * to_pixels(w).to(y.dtype), torch.zeros((), dtype=y.dtype, device=y.device))
        return out[:, :, :g.height, :g.width]


class _StitchedMap:
    """The selection (:meth:`pce.moe.experts.ExpertBank.run`'s protocol) of :class:`StaticContextExecution`: tensors
    are whole stitched maps ``[B, C, Hp, Wp]``, each pixel holding its patch's expert's value. ``idx`` / ``keep``
    ``[B, 1, Hp, Wp]``: each pixel's expert and whether its patch is routed; ``inside`` ``[1, 1, Hp, Wp]``: the map
    without the grid's padding (``None``: no padding)."""

    def __init__(self, x: torch.Tensor, idx: torch.Tensor, keep: torch.Tensor, inside: Optional[torch.Tensor],
                 num_experts: int, norm_stats: str) -> None:
        self.input, self.idx, self.keep, self.E, self.norm_stats = x, idx, keep, num_experts, norm_stats
        self.inside = inside
        self.readable = keep if inside is None else keep & inside  # what later layers' k x k kernels read

    def _select(self, y: torch.Tensor) -> torch.Tensor:
        """Every expert's output ``[B, E * C, Hp, Wp]`` -> each pixel's expert's ``[B, C, Hp, Wp]``."""
        B, _, H, W = y.shape
        y = y.reshape(B, self.E, -1, H, W)
        return y.gather(1, self.idx.unsqueeze(2).expand(B, 1, y.shape[2], H, W)).squeeze(1)

    def _pixels(self, t: torch.Tensor) -> torch.Tensor:
        """Per-expert values ``[E * C]`` -> each pixel's expert's ``[B, C, Hp, Wp]``."""
        return t.reshape(self.E, -1)[self.idx.squeeze(1)].permute(0, 3, 1, 2)

    def conv(self, layer, x: torch.Tensor) -> torch.Tensor:
        if layer.kernel_size // 2:  # context: zeros outside the map (the input), and at dropped patches later
            mask = self.inside if x is self.input else self.readable
            if mask is not None:
                x = torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))
        return self._select(layer.forward_all(x))

    def norm(self, layer, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(layer, StackedBatchNorm2d):  # e.g. a folded batch norm: per expert, then selected
            ys = [layer.forward_one(x, e) for e in range(self.E)]
            return x if all(y is x for y in ys) else self._select(torch.cat(ys, 1))
        if not (layer.training or layer.running_mean is None):  # running statistics: per-pixel affine
            scale = torch.rsqrt(layer.running_var + layer.eps) * layer.weight
            return (x - self._pixels(layer.running_mean)) * self._pixels(scale) + self._pixels(layer.bias)
        return self._batch_norm(layer, x)

    def _batch_norm(self, layer: StackedBatchNorm2d, x: torch.Tensor) -> torch.Tensor:
        """Training-mode batch norm, each expert's statistics over its routed pixels (``"layer"``: over all routed
        pixels), then each pixel's expert's affine; running statistics updated as the eager path does."""
        E, C = self.E, layer.channels
        pooled = self.norm_stats == "layer"
        if pooled:
            m = self.keep.to(x.dtype)  # [B, 1, Hp, Wp]
            cnt = m.sum().reshape(1)
            mean = (x * m).sum((0, 2, 3)).unsqueeze(0) / cnt.clamp(min=1).unsqueeze(1)  # [1, C]
            d = x - mean.view(1, C, 1, 1)
            var = (d * d * m).sum((0, 2, 3)).unsqueeze(0) / cnt.clamp(min=1).unsqueeze(1)
            inv = torch.rsqrt(var + layer.eps).view(1, C, 1, 1)
        else:
            m = (self.idx == torch.arange(E, device=x.device).view(1, E, 1, 1)) & self.keep  # [B, E, Hp, Wp]
            m = m.to(x.dtype)
            cnt = m.sum((0, 2, 3))  # [E] pixels per expert
            mean = torch.einsum("bchw,behw->ec", x, m) / cnt.clamp(min=1).unsqueeze(1)  # [E, C]
            d = x - self._pixels(mean)
            var = torch.einsum("bchw,behw->ec", d * d, m) / cnt.clamp(min=1).unsqueeze(1)
            inv = self._pixels(torch.rsqrt(var + layer.eps))
        out = d * inv * self._pixels(layer.weight) + self._pixels(layer.bias)
        if layer.running_mean is not None:
            self._update_running(layer, mean.detach(), var.detach(), cnt, pooled)
        return out

    @staticmethod
    def _update_running(layer: StackedBatchNorm2d, mean: torch.Tensor, var: torch.Tensor, cnt: torch.Tensor,
                        pooled: bool) -> None:
        """``F.batch_norm``'s update (unbiased variance), for the experts that have pixels; ``pooled``: every
        expert tracks the joint statistics and ``num_batches_tracked`` counts the step (``normalize_pooled``)."""
        mom = layer.momentum if layer.momentum is not None else 0.1
        E, C = layer.num_experts, layer.channels
        with torch.no_grad():
            n = cnt.to(var.dtype).unsqueeze(1)
            unbiased = var * n / (n - 1).clamp(min=1)
            used = (cnt > 0).unsqueeze(1)
            if pooled:
                rm, rv = layer.running_mean[:C].view(1, C), layer.running_var[:C].view(1, C)
                new_m = torch.where(used, (1 - mom) * rm + mom * mean, rm).expand(E, C)
                new_v = torch.where(used, (1 - mom) * rv + mom * unbiased, rv).expand(E, C)
                if layer.num_batches_tracked is not None:
                    layer.num_batches_tracked.add_(used.sum().to(layer.num_batches_tracked.dtype))
            else:
                rm, rv = layer.running_mean.view(E, C), layer.running_var.view(E, C)
                new_m = torch.where(used, (1 - mom) * rm + mom * mean, rm)
                new_v = torch.where(used, (1 - mom) * rv + mom * unbiased, rv)
            layer.running_mean.copy_(new_m.reshape(-1))
            layer.running_var.copy_(new_v.reshape(-1))

    def identity(self, x: torch.Tensor, channels: int) -> torch.Tensor:
        return x
