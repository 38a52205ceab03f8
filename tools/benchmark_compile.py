"""The ``--compile`` section of ``tools/benchmark.py``: ``torch.compile`` on the PCE layer and classifier.

Candidates of every cell, timed interleaved after warm-up (``benchmark.bench_interleaved``):

* ``pce_eager``: the PCE model as it runs eagerly (top-1 cosine routing, sparse dispatch);
* ``pce_compiled``: ``torch.compile(pce)``. Under capture a routed layer runs the static-shape ``capacity``
  execution (:class:`pce.moe.execution.CapacityExecution`): the cosine router has no capacity factor, so every
  expert runs on every token with zero weights masking the unrouted ones (masked dense, E x one expert);
* ``pce_cap_compiled`` (layer level only): a gate router with ``capacity_factor=1.25`` compiled, so each expert's
  buffer holds ``ceil(1.25 N / E)`` tokens (what a capacity factor buys under capture; its eager run,
  ``pce_cap_eager``, drops the same tokens);
* ``dense_eager`` / ``dense_compiled``: the dense twin, eager and compiled.

Compile time (the first call, tracing plus code generation) is reported apart, and so is the largest
difference of each compiled output from its eager model (eval mode). Ratios are time ratios (lower is better).
"""
from __future__ import annotations

import time
from typing import Any, Callable, Dict, List

import torch
from torch import nn

CAPACITY_ROUTER = dict(router="gate", top_k=1, router_kwargs=dict(capacity_factor=1.25))


def _compile(model: nn.Module, backend: str) -> nn.Module:
    """``torch.compile`` with static shapes: with automatic dynamic shapes (the default after a recompile, e.g.
    the train-mode graph after the eval one) inductor 2.14 fails on the classifier's SPP
    (``cannot determine truth value of Relational: 64*s0**2 < 64*s0``)."""
    return torch.compile(model, backend=backend, dynamic=False)


def _first_call(fn: Callable[[], Any]) -> float:
    """Seconds of the first call (compilation happens there)."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


@torch.no_grad()
def _max_diff(compiled: nn.Module, eager: nn.Module, x: torch.Tensor) -> float:
    compiled.eval(), eager.eval()
    return float((compiled(x) - eager(x)).abs().max())


def _cell(fns: Dict[str, Callable[[], Any]], cfg: Dict[str, Any], B: Any) -> Dict[str, Dict[str, float]]:
    """Time one cell; ``B`` is the benchmark module (``bench_interleaved``, ``median``)."""
    compile_s = {n: _first_call(f) for n, f in fns.items() if n.endswith("compiled")}
    t = B.bench_interleaved(fns, cfg["warmup"], cfg["reps"], cfg["min_reps"], cfg["budget_s"])
    return {n: {"ms": B.median(v["wall"]), "cpu_ms": B.median(v["cpu"]), "reps": len(v["wall"]),
                "compile_s": compile_s.get(n)} for n, v in t.items()}


def _rows(kind: str, cell: Dict[str, Dict[str, float]], extra: Dict[str, Any]) -> List[Dict[str, Any]]:
    de, dc = cell["dense_eager"]["ms"], cell["dense_compiled"]["ms"]
    pe = cell["pce_eager"]["ms"]
    return [dict(extra, level=kind, candidate=n, **v, ratio_vs_dense_eager=v["ms"] / de,
                 ratio_vs_dense_compiled=v["ms"] / dc, ratio_vs_pce_eager=v["ms"] / pe) for n, v in cell.items()]


def run_compile_layer(cfg: Dict[str, Any], threads: int, backend: str, B: Any, log) -> List[Dict[str, Any]]:
    """Layer level, for every E of the grid: ``PCELayer`` (top-1 cosine), the capacity-factor gate layer and
    the dense twin, eager and compiled; forward (eval, no_grad) and forward + backward (train).
    Input ``[batch, channels, size, size]`` of ``cfg``; ``B``: the benchmark module."""
    from pce.models.layer import DenseLayer, PCELayer

    torch.set_num_threads(threads)
    x = torch.randn(cfg["batch"], cfg["channels"], cfg["size"], cfg["size"])
    rows: List[Dict[str, Any]] = []
    for E in cfg["experts"]:
        torch._dynamo.reset()  # fresh caches: past dynamo's recompile limit a compiled module silently runs eagerly
        torch.manual_seed(0)
        models = {"pce": PCELayer(cfg["channels"], cfg["patch"], num_experts=E, router="cosine", top_k=1),
                  "pce_cap": PCELayer(cfg["channels"], cfg["patch"], num_experts=E, **CAPACITY_ROUTER),
                  "dense": DenseLayer(cfg["channels"])}
        compiled = {n: _compile(m, backend) for n, m in models.items()}
        cells = {}
        for mode in ("fwd", "train"):
            fns = {f"{n}_{k}": _step(m, x, mode) for n in models for k, m in
                   (("eager", models[n]), ("compiled", compiled[n]))}
            cells[mode] = cell = _cell(fns, cfg, B)
            log(f"  compile layer E={E:<2} {mode:<5} " + "  ".join(f"{n} {v['ms']:7.2f}" for n, v in cell.items())
                + " ms")
        diffs = {n: _max_diff(compiled[n], models[n], x) for n in models}  # the eval graphs exist already
        for mode, cell in cells.items():
            rows += _rows("layer", cell, {"experts": E, "mode": mode, "threads": threads, "max_abs_diff": diffs})
    return rows


def _step(m: nn.Module, x: torch.Tensor, mode: str) -> Callable[[], Any]:
    if mode == "fwd":
        def fwd():
            m.eval()
            with torch.no_grad():
                return m(x)
        return fwd
    grad = torch.randn_like(x)

    def train():
        m.train()
        m.zero_grad(set_to_none=True)
        m(x).backward(grad)
    return train


def run_compile_model(cfg: Dict[str, Any], preset: str, threads: int, backend: str, B: Any,
                      log) -> List[Dict[str, Any]]:
    """Model level: the PCE classifier preset and its dense twin, eager and compiled, on the first input size
    and batch of ``cfg``: inference and one training step (forward, cross-entropy, backward, SGD step; the
    optimizer step itself is not compiled). ``B``: the benchmark module."""
    torch.set_num_threads(threads)
    size, batch = cfg["inputs"][0], cfg["batches"][0]
    torch.manual_seed(0)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, B.NUM_CLASSES, (batch,))
    rows: List[Dict[str, Any]] = []
    torch._dynamo.reset()
    eager = {"pce": B.build_model(f"pce_{preset}"), "dense": B.build_model(f"dense_{preset}")}
    compiled = {n: _compile(m, backend) for n, m in eager.items()}
    cells = {}
    for mode in ("infer", "train"):
        fns = {}
        for n in eager:
            for k, m in (("eager", eager[n]), ("compiled", compiled[n])):
                m.train(mode == "train")
                fns[f"{n}_{k}"] = B.make_train_step(m, x, y) if mode == "train" else B.make_infer(m, x)
        cells[mode] = cell = _cell(fns, cfg, B)
        log(f"  compile model {size}px b={batch} {mode:<5} " + "  ".join(f"{n} {v['ms']:7.1f}"
                                                                      for n, v in cell.items()) + " ms")
    diffs = {n: _max_diff(compiled[n], eager[n], x) for n in eager}  # the eval graphs exist already
    for mode, cell in cells.items():
        rows += _rows("model", cell, {"input": size, "batch": batch, "mode": mode, "threads": threads,
                                      "max_abs_diff": diffs})
    return rows


def format_compile(rows: List[Dict[str, Any]], backend: str) -> str:
    lines = [f"\n== torch.compile (backend {backend}; ms = median wall time; first call = compile) =="]
    lines.append(f"{'level':<6} {'cell':<16} {'candidate':<17} {'ms':>9} {'compile s':>9} {'vs dense eager':>14} "
                 f"{'vs dense comp.':>14} {'vs PCE eager':>12}")
    for r in rows:
        cell = (f"E={r['experts']} {r['mode']}" if r["level"] == "layer"
                else f"{r['input']}px b={r['batch']} {r['mode']}")
        cs = f"{r['compile_s']:9.1f}" if r["compile_s"] is not None else " " * 9
        lines.append(f"{r['level']:<6} {cell:<16} {r['candidate']:<17} {r['ms']:9.2f} {cs} "
                     f"{r['ratio_vs_dense_eager']:14.2f} {r['ratio_vs_dense_compiled']:14.2f} "
                     f"{r['ratio_vs_pce_eager']:12.2f}")
    seen = set()
    for r in rows:
        key = (r["level"], r.get("experts"))
        if key not in seen:
            seen.add(key)
            d = ", ".join(f"{n} {v:.1e}" for n, v in r["max_abs_diff"].items())
            lines.append(f"max |compiled - eager| ({r['level']}{'' if r.get('experts') is None else ' E=%d' % r['experts']}"
                         f", eval): {d}")
    return "\n".join(lines)


def run_compile(s: Dict[str, Any], args: Any, threads: List[int], layer_threads: int, B: Any,
                log) -> List[Dict[str, Any]]:
    """The ``--compile`` section of ``tools/benchmark.py`` (its module is the harness ``B``): layer level with
    ``layer_threads``, model level with the largest thread count."""
    log(f"torch.compile ({args.compile_backend}) ...")
    rows = []
    if "layer" not in args.skip:
        rows += run_compile_layer(s["layer"], layer_threads, args.compile_backend, B, log)
    if "model" not in args.skip:
        rows += run_compile_model(s["model"], args.preset, max(threads), args.compile_backend, B, log)
    return rows
