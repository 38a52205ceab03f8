"""FLOP and parameter counting for PCE (and any other) models, for tools and reports.

* :func:`count_flops` runs fvcore's :class:`~fvcore.nn.FlopCountAnalysis` (a ``torch.jit`` trace of one
  forward pass) with extra handles for operators fvcore does not count (:data:`EXTRA_HANDLES`, e.g.
  ``aten::scaled_dot_product_attention``, ``aten::index_add``, every ``aten::upsample_*`` variant) and
  returns the total, the per-operator and per-module counts and fvcore's per-module table.
* :func:`active_params_per_token` counts the parameters one patch actually uses in a PCE model: every
  non-expert parameter plus ``k / E`` of each routed layer's expert parameters (``top_k = k``; all of them for
  soft routing; :class:`~pce.models.layer.PCELayer` and :class:`pce.PCEConv2d` alike). Dense models use all
  their parameters.
* :func:`active_flops`: :func:`count_flops` where every :class:`pce.PCEConv2d` counts ``k`` of its ``E``
  convolutions plus its router (:func:`pce.models.convert.pce_conv_flops`, what :func:`pce.convert`'s report
  says), not the windows and halos its sparse implementation happened to execute.

Conventions (fvcore's): one fused multiply-add is one FLOP, so a convolution costs
``N * C_out * H_out * W_out * (C_in / groups) * k_h * k_w`` and a linear layer ``N * in * out``; bias
additions, activations and most elementwise operators count zero. Routed models are traced with the input
given, so data-dependent sparse dispatch (top-k) is counted as executed: an expert's convolutions count only
the patches routed to it, i.e. the FLOPs are *active* FLOPs.
"""
from __future__ import annotations

import logging
import math
import warnings
from collections import Counter
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from pce.models.flops_trace import TraceableOutputs, TraceableScatter
from pce.moe.execution import eager_routing
from pce.moe.recorder import strip_wrapper_prefix

Handle = Callable[[List[Any], List[Any]], Union[int, float, Counter]]

__all__ = ["count_flops", "active_params_per_token", "active_flops", "count_params", "EXTRA_HANDLES",
           "ZERO_FLOP_OPS"]


def _shape(val: Any) -> Optional[List[int]]:
    """Shape of a traced ``torch._C.Value`` (``None`` when unknown or not a tensor)."""
    try:
        if val.isCompleteTensor():
            return list(val.type().sizes())
    except RuntimeError:  # pragma: no cover - non-tensor values
        return None
    return None


def _numel(val: Any) -> int:
    s = _shape(val)
    return math.prod(s) if s is not None else 0


def sdpa_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """``aten::scaled_dot_product_attention(q [..., L, d], k [..., S, d], v [..., S, dv])``:
    ``Q K^T`` (``L * S * d`` per batch entry) plus ``softmax(.) V`` (``L * S * dv``); softmax not counted."""
    q, k, v = _shape(inputs[0]), _shape(inputs[1]), _shape(inputs[2])
    if q is None or k is None or v is None:
        return 0
    batch = math.prod(q[:-2])
    L, d, S, dv = q[-2], q[-1], k[-2], v[-1]
    return batch * L * S * (d + dv)


def index_add_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """``aten::index_add(self, dim, index, source[, alpha])``: one addition per source element."""
    return _numel(inputs[3])


def elementwise_output(scale: float) -> Handle:
    """``scale`` FLOPs per output element (interpolation: taps per output pixel)."""

    def handle(inputs: List[Any], outputs: List[Any]) -> int:
        return int(scale * _numel(outputs[0]))

    return handle


def elementwise_input(scale: float) -> Handle:
    """``scale`` FLOPs per input element (pooling)."""

    def handle(inputs: List[Any], outputs: List[Any]) -> int:
        return int(scale * _numel(inputs[0]))

    return handle


def einsum_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """Fallback ``aten::einsum`` counter (used only if fvcore lacks one): the multiply-adds of a direct
    contraction, ``prod`` of the sizes of every index letter."""
    equation = inputs[0].toIValue()
    operands = inputs[1].node().inputs() if inputs[1].node().kind() == "prim::ListConstruct" else []
    shapes = [_shape(v) for v in operands]
    if not shapes or any(s is None for s in shapes):
        return 0
    lhs = equation.replace(" ", "").split("->")[0].split(",")
    sizes: Dict[str, int] = {}
    for term, shape in zip(lhs, shapes):
        for letter, dim in zip(term.replace("...", ""), shape[len(shape) - len(term.replace("...", "")):]):
            sizes[letter] = max(sizes.get(letter, 1), dim)
    return math.prod(sizes.values())


def matmul_flop_jit(inputs: List[Any], outputs: List[Any]) -> int:
    """``aten::matmul`` with broadcasting (fvcore's counter assumes plain 2-d / equal-rank operands):
    one multiply-add per output element per reduced index, ``numel(out) * K``."""
    a = _shape(inputs[0])
    if not a:
        return 0
    return _numel(outputs[0]) * a[-1]


#: Handles added to fvcore's defaults (fvcore's own handle wins where it has one, see ``_FALLBACKS``).
EXTRA_HANDLES: Dict[str, Handle] = {
    "aten::scaled_dot_product_attention": sdpa_flop_jit,
    "aten::matmul": matmul_flop_jit,
    "aten::index_add": index_add_flop_jit,
    "aten::index_add_": index_add_flop_jit,
    "aten::upsample_nearest1d": elementwise_output(0),
    "aten::upsample_nearest2d": elementwise_output(0),
    "aten::upsample_nearest3d": elementwise_output(0),
    "aten::_upsample_nearest_exact1d": elementwise_output(0),
    "aten::_upsample_nearest_exact2d": elementwise_output(0),
    "aten::_upsample_nearest_exact3d": elementwise_output(0),
    "aten::upsample_linear1d": elementwise_output(2),
    "aten::upsample_bilinear2d": elementwise_output(4),
    "aten::_upsample_bilinear2d_aa": elementwise_output(4),
    "aten::upsample_trilinear3d": elementwise_output(8),
    "aten::upsample_bicubic2d": elementwise_output(16),
    "aten::_upsample_bicubic2d_aa": elementwise_output(16),
    "aten::grid_sampler": elementwise_output(4),
    "aten::grid_sampler_2d": elementwise_output(4),
    "aten::adaptive_max_pool2d": elementwise_input(1),
    "aten::avg_pool2d": elementwise_input(1),
    "aten::max_pool2d": elementwise_input(1),
    # pce.moe.dispatch's row permutation (an autograd.Function): data movement only, like aten::index_select
    "prim::PythonOp._PermuteRows": lambda inputs, outputs: 0,
}

#: Counters used only when fvcore has none for the operator.
_FALLBACKS: Dict[str, Handle] = {"aten::einsum": einsum_flop_jit}

#: Operators counted as zero FLOPs under fvcore's convention (indexing, sorting, comparisons, copies,
#: elementwise arithmetic, activations, reductions): skipped silently instead of being reported as unsupported.
ZERO_FLOP_OPS: Tuple[str, ...] = (
    "aten::index_select", "aten::bincount", "aten::topk", "aten::sort", "aten::argsort", "aten::argmax",
    "aten::scatter", "aten::scatter_", "aten::ne", "aten::lt", "aten::le", "aten::where", "aten::zeros_like",
    "aten::ones_like", "aten::repeat", "aten::repeat_interleave", "aten::expand_as", "aten::linspace",
    "aten::meshgrid", "aten::one_hot", "aten::new_ones", "aten::new_tensor", "aten::tensor", "aten::pad",
    "aten::unfold", "aten::col2im", "aten::im2col", "aten::fill_", "aten::zero_", "aten::clone",
    "aten::masked_select", "aten::empty_like", "aten::lift_fresh", "aten::alias", "aten::sum", "aten::mean",
    "aten::add", "aten::add_", "aten::sub", "aten::mul", "aten::mul_", "aten::div", "aten::div_", "aten::rsub",
    "aten::neg", "aten::pow", "aten::sqrt", "aten::exp", "aten::log", "aten::softmax", "aten::log_softmax",
    "aten::sigmoid", "aten::tanh", "aten::gelu", "aten::silu", "aten::hardtanh", "aten::leaky_relu",
    "aten::clamp_min", "aten::clamp_max", "aten::norm", "aten::linalg_vector_norm", "aten::frobenius_norm",
    "aten::logsumexp", "aten::abs", "aten::min", "aten::amax", "aten::amin", "aten::all", "aten::any",
    "aten::numel", "aten::unflatten", "aten::movedim", "aten::view_as", "aten::reshape_as",
    "aten::feature_dropout", "aten::dropout_", "aten::bitwise_and", "aten::logical_and", "aten::logical_or",
    "aten::__or__", "aten::__iand__", "aten::__ior__", "aten::item", "aten::tolist", "aten::_shape_as_tensor",
    "aten::detach_", "aten::requires_grad_", "aten::sin", "aten::cos",
)


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (shared ones once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def active_params_per_token(model: nn.Module) -> int:
    """Parameters one patch (token) uses: all parameters, minus ``(1 - k/E)`` of every routed layer's expert
    parameters (``k / E`` = the router's :attr:`~pce.moe.routing.Router.active_fraction`; PCE layers and
    :class:`pce.PCEConv2d` alike). For a model without routed layers this is :func:`count_params`.
    Routers, positional projections, the 1x1 output projection, stems, heads and dense layers count fully.
    Under a parameter-free router override (``set_router_override``) the override's sparsity is used."""
    from pce.models.routed import routed_layers  # local: keeps this module importable without the package graph

    inactive = sum(count_params(layer.experts) * (1.0 - layer.current_router().active_fraction)
                   for _, layer in routed_layers(model))
    return int(round(count_params(model) - inactive))


def active_flops(model: nn.Module, inputs: Union[torch.Tensor, Sequence[torch.Tensor]], **kwargs: Any
                 ) -> Dict[str, Any]:
    """FLOPs of ``model(*inputs)`` (:func:`count_flops`, ``kwargs`` for it) with every :class:`pce.PCEConv2d`
    counted by :func:`pce.models.convert.pce_conv_flops` (``k`` of ``E`` kernels plus the router, per call) instead
    of the windows, halos or whole-map experts its implementation executed. Returns ``{"total", "gflops",
    "executed" (the traced total), "layers" ({name: active FLOPs of that layer, all calls})}``. Call
    ``model.eval()`` first."""
    from pce.models.convert import call_shapes, pce_conv_flops
    from pce.models.pce_conv import PCEConv2d

    named = {n: m for n, m in model.named_modules() if isinstance(m, PCEConv2d)}
    traced = count_flops(model, inputs, **kwargs)
    calls = call_shapes(model, list(named), _as_tuple(inputs))
    layers = {strip_wrapper_prefix(n): sum(pce_conv_flops(m, i, o) for i, o in calls[n]) for n, m in named.items()}
    total = traced["total"] - sum(traced["by_module"].get(n, 0) for n in named) + sum(layers.values())
    return {"total": total, "gflops": total / 1e9, "executed": traced["total"], "layers": layers}


def _as_tuple(inputs: Union[torch.Tensor, Sequence[torch.Tensor]]) -> Tuple[torch.Tensor, ...]:
    return (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)


def count_flops(model: nn.Module, inputs: Union[torch.Tensor, Sequence[torch.Tensor]], *,
                max_depth: int = 3, extra_handles: Optional[Dict[str, Optional[Handle]]] = None,
                warn_unsupported: bool = False) -> Dict[str, Any]:
    """Count the FLOPs (fused multiply-adds) of ``model(*inputs)`` with fvcore.

    The model is traced as it is (call ``model.eval()`` first for inference FLOPs: in training mode batch norm
    counts its statistics and routers may sample). Gradients are off during the trace.

    Returns a dict with
        ``total`` (int), ``gflops`` (``total / 1e9``), ``by_operator`` ({op: flops}),
        ``by_module`` ({module name: flops}, ``""`` is the whole model, only modules with FLOPs),
        ``unsupported`` ({op: number of calls} of operators counted as zero and not known to be free),
        ``params`` (int), ``table`` (fvcore's per-module table, ``max_depth`` levels, as a string).
    """
    from fvcore.nn import FlopCountAnalysis, flop_count_table

    args = _as_tuple(inputs)
    wrapped = isinstance(model, nn.Module) and not _returns_tensor(model)
    target = TraceableOutputs(model) if wrapped else model
    analysis = FlopCountAnalysis(target, args)
    handles: Dict[str, Optional[Handle]] = {}
    fvcore_ops = set(analysis._op_handles)  # noqa: SLF001 - fvcore keeps its defaults here
    for name, h in _FALLBACKS.items():
        if name not in fvcore_ops:
            handles[name] = h
    handles.update(EXTRA_HANDLES)
    handles.update(extra_handles or {})
    analysis.set_op_handle(**{k: v for k, v in handles.items() if v is not None})
    analysis._ignored_ops.update(ZERO_FLOP_OPS)  # noqa: SLF001
    analysis._ignored_ops.update(k for k, v in (extra_handles or {}).items() if v is None)  # noqa: SLF001
    analysis.unsupported_ops_warnings(warn_unsupported).uncalled_modules_warnings(False)
    analysis.tracer_warnings("none")
    fv_logger = logging.getLogger("fvcore")
    level = fv_logger.level
    fv_logger.setLevel(logging.ERROR)
    try:
        with torch.no_grad(), warnings.catch_warnings(), TraceableScatter(), eager_routing():
            warnings.simplefilter("ignore")
            total = int(analysis.total())
            by_module_raw = analysis.by_module()
            by_operator = {k: int(v) for k, v in analysis.by_operator().items()}
            unsupported = dict(analysis.unsupported_ops())
            table = flop_count_table(analysis, max_depth=max_depth)
    finally:
        fv_logger.setLevel(level)
    prefix = "model." if wrapped else ""
    by_module: Dict[str, int] = {}
    for name, v in by_module_raw.items():
        if not v:
            continue
        if wrapped:
            if name == "":
                continue
            name = "" if name == "model" else name[len(prefix):] if name.startswith(prefix) else name
        by_module[name] = int(v)
    return {"total": total, "gflops": total / 1e9, "by_operator": by_operator, "by_module": by_module,
            "unsupported": unsupported, "params": count_params(model), "table": table}


def _returns_tensor(model: nn.Module) -> bool:
    """Backbones (``PCEBackbone``) return an ordered dict of maps; everything else is assumed to return
    tensors or tuples of tensors, which ``torch.jit`` traces directly."""
    from pce.models.backbone import PCEBackbone

    return not isinstance(model, PCEBackbone)


def flops_per_image(model: nn.Module, input_size: Iterable[int], batch: int = 1) -> float:
    """GFLOPs of one ``[batch, *input_size]`` forward pass divided by ``batch`` (eval mode, random input)."""
    was_training = model.training
    model.eval()
    try:
        p = next(model.parameters())
        x = torch.randn(batch, *input_size, device=p.device, dtype=p.dtype)
        return count_flops(model, x)["gflops"] / batch
    finally:
        model.train(was_training)
