"""Parameter and FLOP counts per module with fvcore (``tools/analyze_model.py``).

fvcore counts one FLOP per multiply-add. Extra handles cover ops it does not know:
``aten::scaled_dot_product_attention`` (QK^T and attention x V), ``aten::grid_sampler`` (bilinear: 4 taps per
output value), ``aten::_convolution_mode`` / ``aten::conv2d`` variants are handled by fvcore itself. Ops that
move or select data (unfold, topk, softmax, ...) are not counted; they are listed in ``uncounted_ops`` instead
of one warning each.
"""
from __future__ import annotations

import contextlib
import logging
import warnings
from collections import Counter
from math import prod
from typing import Any, Dict, Sequence, Tuple

import torch
from torch import nn

__all__ = ["analyze_model", "EXTRA_FLOP_HANDLES"]


def _shape(v: Any):
    from fvcore.nn.jit_handles import get_shape

    return get_shape(v)


def sdpa_flop_jit(inputs: Sequence[Any], outputs: Sequence[Any]) -> int:
    """``softmax(Q K^T) V`` with Q ``[..., L, d]``, K ``[..., S, d]``, V ``[..., S, dv]``: L*S*d + L*S*dv MACs."""
    q, k, v = (_shape(x) for x in inputs[:3])
    batch = prod(q[:-2])
    L, d = q[-2], q[-1]
    S, dv = k[-2], v[-1]
    return int(batch * L * S * (d + dv))


def grid_sampler_flop_jit(inputs: Sequence[Any], outputs: Sequence[Any]) -> int:
    """Bilinear sampling: 4 taps (multiply-add) per output value ``[N, C, Hout, Wout]``."""
    out = _shape(outputs[0])
    return int(4 * prod(out))


EXTRA_FLOP_HANDLES = {
    "aten::scaled_dot_product_attention": sdpa_flop_jit,
    "aten::grid_sampler": grid_sampler_flop_jit,
    "aten::grid_sampler_2d": grid_sampler_flop_jit,
}


@contextlib.contextmanager
def _traceable_bool_scatter():
    """``t.scatter_(dim, index, True)`` (a bool scalar, used by the top-k masks of the routers) has no
    TorchScript schema, so ``torch.jit`` tracing fails on it. While tracing, send bool scalars as a tensor
    source (same result)."""
    orig = torch.Tensor.scatter_

    def scatter_(self, *args, **kwargs):
        if len(args) >= 3 and isinstance(args[2], bool) and isinstance(args[1], torch.Tensor):
            make = torch.ones_like if args[2] else torch.zeros_like
            args = (args[0], args[1], make(args[1], dtype=self.dtype)) + tuple(args[3:])
        return orig(self, *args, **kwargs)

    torch.Tensor.scatter_ = scatter_
    try:
        yield
    finally:
        torch.Tensor.scatter_ = orig


def analyze_model(model: nn.Module, inputs: Tuple[torch.Tensor, ...], max_depth: int = 4) -> Dict[str, Any]:
    """Trace ``model(*inputs)`` in eval mode; returns ``{"table": str (flop_count_table), "total_flops": int,
    "total_params": int, "flops_by_module": {name: flops}, "uncounted_ops": {op: calls}}``."""
    with warnings.catch_warnings():  # fvcore's import scripts a function (deprecation warning)
        warnings.simplefilter("ignore")
        from fvcore.nn import FlopCountAnalysis, flop_count_table, parameter_count

    was_training = model.training
    model.eval()
    try:
        flops = FlopCountAnalysis(model, inputs).set_op_handle(**EXTRA_FLOP_HANDLES)
        flops.unsupported_ops_warnings(False)
        flops.uncalled_modules_warnings(False)
        flops.tracer_warnings("none")
        fv_logger = logging.getLogger("fvcore")
        level = fv_logger.level
        fv_logger.setLevel(logging.ERROR)
        try:
            with warnings.catch_warnings(), _traceable_bool_scatter():
                warnings.simplefilter("ignore")
                total = flops.total()
                by_module = dict(flops.by_module())
                uncounted = Counter(flops.unsupported_ops())
                table = flop_count_table(flops, max_depth=max_depth)
        finally:
            fv_logger.setLevel(level)
        params = parameter_count(model)
    finally:
        model.train(was_training)
    return {"table": table, "total_flops": int(total), "total_params": int(params.get("", 0)),
            "flops_by_module": {k: int(v) for k, v in by_module.items()}, "uncounted_ops": dict(uncounted)}
