"""Where a PCE forward's time goes, for ``--profile`` of ``tools/benchmark.py``: torch.profiler with
``record_function`` labels put around the parts of one ``PCEConv2d`` (region pooling, router, plan, windows,
expert convolutions, dispatch, placing) or of every ``PCELayer`` of a classifier (router, execution, expert
convolutions and norms, projection), by wrapping those callables for the duration of the profile only (nothing in
``pce/`` is changed; a part that no longer exists is left out and its time lands in "other").
Module map: see ``benchmark_timing.py``.
"""
from __future__ import annotations

import contextlib
import functools
import statistics
import sys
import time
from typing import Any, Callable, Dict, Iterator, List, Sequence, Tuple

import torch
from torch import nn

_MISSING = object()
#: (object, attribute, label[, wrap_result]): ``obj.attr(...)`` runs under ``record_function(label)``; with
#: ``wrap_result`` the callable that ``obj.attr(...)`` returns does instead (e.g. ``strategy.resolve(...)``).
Part = Tuple[Any, ...]


#: CPU seconds per label of the current call (filled by the wrappers)
_ACC: Dict[str, float] = {}


def _wrap(fn: Callable, label: str, wrap_result: bool) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if wrap_result:
            return _wrap(fn(*args, **kwargs), label, False)
        c0 = time.process_time()
        try:
            with torch.autograd.profiler.record_function(label):
                return fn(*args, **kwargs)
        finally:
            _ACC[label] = _ACC.get(label, 0.0) + time.process_time() - c0
    return wrapper


@contextlib.contextmanager
def labelled(parts: Sequence[Part]) -> Iterator[None]:
    """Wrap ``obj.attr`` in ``record_function(label)`` for every part that exists; restore them afterwards."""
    saved = []
    try:
        for obj, attr, label, *rest in parts:
            if not callable(getattr(obj, attr, None)):
                continue
            own = vars(obj).get(attr, _MISSING) if hasattr(obj, "__dict__") else _MISSING
            setattr(obj, attr, _wrap(getattr(obj, attr), label, bool(rest and rest[0])))
            saved.append((obj, attr, own))
        yield
    finally:
        for obj, attr, own in reversed(saved):
            if own is _MISSING:
                delattr(obj, attr)
            else:
                setattr(obj, attr, own)


def profile_labels(fn: Callable[[], Any], parts: Sequence[Part], steps: int) -> Dict[str, float]:
    """Median over ``steps`` calls of ``fn`` of the process CPU ms spent in every label (inclusive; ``"total"``:
    the whole call). With one thread that is what each part cost, whatever else runs on the machine."""
    fn()
    per_call: Dict[str, List[float]] = {}
    with labelled(parts):
        fn()
        for _ in range(steps):
            _ACC.clear()
            c0 = time.process_time()
            fn()
            _ACC["total"] = time.process_time() - c0
            for k, v in _ACC.items():
                per_call.setdefault(k, []).append(v * 1e3)
    return {k: statistics.median(v + [0.0] * (steps - len(v))) for k, v in per_call.items()}


def top_ops(fn: Callable[[], Any], steps: int = 3, rows: int = 10) -> str:
    """torch.profiler's table of the operators with the most self CPU time over ``steps`` calls of ``fn``."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            fn()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=36)


WINDOWS, EXPERT_CONVS = "  windows (gather)", "  expert convolutions"
CONV_ORDER = ("router: region pooling", "router: route", "plan (host sync)", "pad", "dispatch (sparse)", WINDOWS,
              EXPERT_CONVS, "dispatch (dense map)", "place cells (scatter)")
LAYER_ORDER = ("layer", "  router", "  execution (dispatch + experts)", "    expert convolutions", "    expert norms",
               "  expert (dense)", "  projection")


def conv_parts(layer: nn.Module) -> List[Part]:
    """The parts of one ``PCEConv2d`` forward (instance and module-level callables of ``pce.models.pce_conv``)."""
    mod = sys.modules[type(layer).__module__]
    parts: List[Part] = [(mod, "region_view", "router: region pooling"), (layer.router, "route", "router: route"),
                         (layer, "_plan", "plan (host sync)"), (layer, "_pad", "pad"),
                         (mod, "dispatch_rows", "dispatch (sparse)"), (mod, "dispatch_map", "dispatch (dense map)"),
                         (layer, "_windows", WINDOWS), (layer.experts.conv, "forward_one", EXPERT_CONVS)]
    cells = getattr(mod, "CellGrid", None)
    if cells is not None:
        parts.append((cells, "place", "place cells (scatter)"))
    return parts


def layer_parts(model: nn.Module) -> List[Part]:
    """The parts of every ``PCELayer`` / ``DenseLayer`` forward of ``model``."""
    from pce.models.layer import DenseLayer, PCELayer
    from pce.moe import stacked

    parts: List[Part] = [(stacked.StackedConv2d, "forward_one", "    expert convolutions"),
                         (stacked.StackedBatchNorm2d, "forward_one", "    expert norms")]
    for m in model.modules():
        if isinstance(m, (PCELayer, DenseLayer)):
            parts += [(m, "forward", "layer"), (m.proj, "forward", "  projection")]
        if isinstance(m, PCELayer):
            parts += [(m.router, "route", "  router"),
                      (m.strategy, "resolve", "  execution (dispatch + experts)", True)]
        if isinstance(m, DenseLayer):
            parts += [(m.experts, "forward_one", "  expert (dense)")]
    return parts


def format_breakdown(title: str, ms: Dict[str, float], order: Sequence[str], ref: Dict[str, float]) -> str:
    """One line per label (indented labels run inside the unindented one above them), then what no top-level
    label covers."""
    total = ms.get("total", 0.0) or 1e-9
    lines = [f"\n-- breakdown: {title} (process CPU ms per call, median; indented = inside the line above) --"]
    seen = [label for label in order if label in ms]
    for label in seen:
        lines.append(f"  {label:<36} {ms[label]:8.2f} ms  {100 * ms[label] / total:5.1f} %")
    top = sum(ms[k] for k in seen if not k.startswith(" "))
    rest = total - top
    lines.append(f"  {'other (outside the parts above)':<36} {rest:8.2f} ms  {100 * rest / total:5.1f} %")
    lines.append(f"  {'total':<36} {total:8.2f} ms" + "".join(f"   {k} {v:.2f} ms" for k, v in ref.items()))
    return "\n".join(lines)


def run_conv_breakdown(shape: Sequence[int], threads: int, log, steps: int = 5) -> Dict[str, float]:
    """``PCEConv2d`` (defaults, top-1, auto dispatch) forward on ``shape`` (the ``cells`` input of the ``conv``
    section), next to ``nn.Conv2d``'s."""
    from benchmark_conv import build_candidates, make_input

    torch.set_num_threads(threads)
    models = build_candidates(shape[1])
    layer, conv = models["pce_top1_auto"].eval(), models["conv"].eval()
    x = make_input(tuple(shape), "cells")
    with torch.no_grad():
        parts = conv_parts(layer)
        ms = profile_labels(lambda: layer(x), parts, steps)
        ref = profile_labels(lambda: conv(x), [], steps)
        title = f"PCEConv2d top-1 auto forward {'x'.join(map(str, shape))}"
        log(format_breakdown(title, ms, CONV_ORDER, {"nn.Conv2d": ref.get("total", 0.0)}))
        log(f"\n-- profile: {title}, top operators by self CPU time (3 calls) --\n" + top_ops(lambda: layer(x)))
    return dict(ms, conv=ref.get("total", 0.0))


def run_layer_breakdown(names: Sequence[str], size: int, batch: int, threads: int, log,
                        steps: int = 3) -> Dict[str, Dict[str, float]]:
    """Inference of each classifier of ``names`` at ``size`` px, batch ``batch``, by layer parts."""
    from benchmark_model import build_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    x = torch.randn(batch, 3, size, size)
    out = {}
    for n in names:
        model = build_model(n).eval()
        parts = layer_parts(model)
        with torch.no_grad():
            out[n] = profile_labels(lambda: model(x), parts, steps)
        log(format_breakdown(f"{n} inference {size}px b={batch}", out[n], LAYER_ORDER, {}))
    return out
