#!/usr/bin/env python
"""PCE speed, FLOP, parameter and memory benchmark (CPU by default).

    python tools/benchmark.py --quick                      # reduced grid, < 1 min on 2 cores
    python tools/benchmark.py --full --json bench.json     # the whole grid (several minutes)
    python tools/benchmark.py --quick --threads 1 2        # model level with 1 and 2 threads
    python tools/benchmark.py --quick --profile            # + torch.profiler top ops of the PCE paths
    python tools/benchmark.py --quick --smoke --json b.json  # tiny shapes, every code path (tests)
    python tools/benchmark.py --quick --compile              # + torch.compile (inductor) on layer and model

What it measures, in one process, candidates interleaved (A B C, C B A, ...) after warm-up, medians of wall
time (the ratios and targets) and of process CPU time (``*_cpu*`` keys: with one thread, what the computation
cost even when other jobs share the cores):

1. layer level: ``PCELayer`` (E = 4, 8, 16; cosine router with top-1, top-2 or soft routing, where soft is
   ``router_kwargs={"threshold": False}`` and no top-k) against ``DenseLayer`` (same expert, width and input):
   forward (eval, ``torch.no_grad``) and forward + backward (train mode); ``--layer-threads`` (default 1).
2. model level: the PCE classifier preset (top-1) against its dense twin (same stem, stages and expert, equal
   active FLOPs up to the router and padding to the patch grid) and ``torchvision.models.resnet18``:
   inference latency and training-step time (forward, loss, backward, SGD step) per batch size, input size
   and thread count.
3. FLOPs (fvcore, :mod:`pce.models.flops`, fused multiply-adds) and parameters, total and active per token.
4. peak resident memory of one training step, each model in a fresh subprocess: peak RSS minus the RSS after
   model construction and a warm-up step.

Ratios are time ratios (candidate / reference, lower is better); ``images_per_s`` is ``batch / time``.
The issue's targets are printed next to the measurements with PASS/FAIL.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import warnings  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=DeprecationWarning)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

# -- settings ------------------------------------------------------------------------------------------
#: Per mode: the layer-level and model-level grids, repetitions and per-group time budgets (seconds).
#: A group (the interleaved candidates of one cell) runs ``warmup`` untimed rounds, then timed rounds until
#: ``reps`` rounds or, once ``min_reps`` rounds are done, until ``budget_s`` is spent.
SETTINGS: Dict[str, Dict[str, Any]] = {
    "full": dict(
        layer=dict(batch=8, channels=64, size=32, patch=8, experts=(4, 8, 16), routings=("top1", "top2", "soft"),
                   warmup=2, reps=9, min_reps=3, budget_s=6.0),
        model=dict(inputs=(64, 224), batches=(8, 64), threads=(1, 2), warmup=1, reps=7, min_reps=2, budget_s=5.0),
        flops_input=224, memory=dict(input=224, batch=32, steps=2)),
    "quick": dict(
        layer=dict(batch=8, channels=64, size=32, patch=8, experts=(4, 8, 16), routings=("top1", "top2", "soft"),
                   warmup=1, reps=3, min_reps=2, budget_s=1.0),
        model=dict(inputs=(64,), batches=(8,), threads=(2,), warmup=1, reps=3, min_reps=2, budget_s=1.5),
        flops_input=64, memory=dict(input=64, batch=8, steps=1)),
    # --smoke (with --quick): the smallest run that exercises every code path (used by the tests).
    "smoke": dict(
        layer=dict(batch=2, channels=16, size=16, patch=8, experts=(4,), routings=("top1", "top2", "soft"),
                   warmup=1, reps=2, min_reps=1, budget_s=0.2),
        model=dict(inputs=(32,), batches=(2,), threads=(1,), warmup=1, reps=2, min_reps=1, budget_s=0.3),
        flops_input=32, memory=dict(input=32, batch=2, steps=1)),
}
NUM_CLASSES = 10
TARGETS = {
    "layer_top1_train_ratio_max": 1.3,
    "layer_soft_ratio_max_per_expert": 1.1,
    "model_train_images_per_s_min_vs_dense": 0.7,
    "model_infer_latency_max_vs_dense": 1.3,
    "memory_max_vs_dense": 1.5,
}
ROUTINGS = {"top1": dict(top_k=1), "top2": dict(top_k=2), "soft": dict(router_kwargs={"threshold": False})}


# -- timing ----------------------------------------------------------------------------------------------
#: Wall-clock time (perf_counter) after which every group stops at ``min_reps`` (set by ``--max-minutes``).
DEADLINE = [math.inf]


def bench_interleaved(fns: Dict[str, Callable[[], Any]], warmup: int, reps: int, min_reps: int,
                      budget_s: float) -> Dict[str, Dict[str, List[float]]]:
    """Run the candidates interleaved (order reversed every round, so drift hits all of them alike) and
    return per candidate the wall times (``"wall"``) and process CPU times (``"cpu"``) in milliseconds.
    With one thread the CPU time is what the computation cost, whatever else runs on the machine."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    times: Dict[str, Dict[str, List[float]]] = {n: {"wall": [], "cpu": []} for n in names}
    start = time.perf_counter()
    for r in range(reps):
        order = names if r % 2 == 0 else names[::-1]
        for n in order:
            c0, t0 = time.process_time(), time.perf_counter()
            fns[n]()
            t1, c1 = time.perf_counter(), time.process_time()
            times[n]["wall"].append((t1 - t0) * 1e3)
            times[n]["cpu"].append((c1 - c0) * 1e3)
        now = time.perf_counter()
        if r + 1 >= min_reps and (now - start > budget_s or now > DEADLINE[0]):
            break
    return times


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


# -- layer level -----------------------------------------------------------------------------------------
def build_layers(cfg: Dict[str, Any], E: int, routing: str):
    from pce.models.layer import DenseLayer, PCELayer

    torch.manual_seed(0)
    pce = PCELayer(cfg["channels"], cfg["patch"], num_experts=E, router="cosine", **ROUTINGS[routing])
    dense = DenseLayer(cfg["channels"])
    return pce, dense


def layer_fns(pce: nn.Module, dense: nn.Module, x: torch.Tensor, mode: str) -> Dict[str, Callable[[], Any]]:
    if mode == "fwd":
        pce.eval(), dense.eval()

        def fwd(m):
            def run():
                with torch.no_grad():
                    return m(x)
            return run
        return {"pce": fwd(pce), "dense": fwd(dense)}
    pce.train(), dense.train()
    grad = torch.randn_like(x)

    def train(m):
        def run():
            m.zero_grad(set_to_none=True)
            m(x).backward(grad)
        return run
    return {"pce": train(pce), "dense": train(dense)}


def run_layer_level(cfg: Dict[str, Any], threads: int, log) -> List[Dict[str, Any]]:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    x = torch.randn(cfg["batch"], cfg["channels"], cfg["size"], cfg["size"])
    rows = []
    for E in cfg["experts"]:
        for routing in cfg["routings"]:
            pce, dense = build_layers(cfg, E, routing)
            for mode in ("fwd", "train"):
                t = bench_interleaved(layer_fns(pce, dense, x, mode), cfg["warmup"], cfg["reps"], cfg["min_reps"],
                                      cfg["budget_s"])
                p, d = median(t["pce"]["wall"]), median(t["dense"]["wall"])
                pc, dc = median(t["pce"]["cpu"]), median(t["dense"]["cpu"])
                row = {"experts": E, "routing": routing, "mode": mode, "pce_ms": p, "dense_ms": d, "ratio": p / d,
                       "pce_cpu_ms": pc, "dense_cpu_ms": dc, "ratio_cpu": pc / dc, "reps": len(t["pce"]["wall"]),
                       "execution": pce.strategy.resolve(pce.router, x.device).name}
                rows.append(row)
                log(f"  layer E={E:<2} {routing:<4} {mode:<5} pce {p:8.2f} ms  dense {d:8.2f} ms  "
                    f"ratio {p / d:6.2f} (CPU time {pc / dc:5.2f})  {row['reps']} reps, {row['execution']}")
    return rows


# -- model level -----------------------------------------------------------------------------------------
def build_model(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "resnet18":
        import torchvision

        return torchvision.models.resnet18(num_classes=NUM_CLASSES)
    from pce.models.classifier import build_classifier

    return build_classifier(name, NUM_CLASSES)


def make_train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], Any]:
    """One training step: zero grads, forward, loss (plus router losses for PCE classifiers), backward, SGD."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    has_losses = hasattr(model, "losses")

    def step():
        opt.zero_grad(set_to_none=True)
        if has_losses:
            losses, _ = model.losses(x, y)
            loss = sum(losses.values())
        else:
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    return step


def make_infer(model: nn.Module, x: torch.Tensor) -> Callable[[], Any]:
    def infer():
        with torch.no_grad():
            return model(x)
    return infer


def model_names(preset: str) -> Tuple[str, str, str]:
    return f"pce_{preset}", f"dense_{preset}", "resnet18"


def run_model_level(cfg: Dict[str, Any], preset: str, threads: Sequence[int], log) -> List[Dict[str, Any]]:
    names = model_names(preset)
    models = {n: build_model(n) for n in names}
    rows = []
    for size in cfg["inputs"]:
        for batch in cfg["batches"]:
            torch.manual_seed(0)
            x = torch.randn(batch, 3, size, size)
            y = torch.randint(0, NUM_CLASSES, (batch,))
            for th in threads:
                torch.set_num_threads(th)
                for mode in ("infer", "train"):
                    fns = {}
                    for n, m in models.items():
                        m.train(mode == "train")
                        fns[n] = make_train_step(m, x, y) if mode == "train" else make_infer(m, x)
                    t = bench_interleaved(fns, cfg["warmup"], cfg["reps"], cfg["min_reps"], cfg["budget_s"])
                    ms = {n: median(v["wall"]) for n, v in t.items()}
                    cpu = {n: median(v["cpu"]) for n, v in t.items()}
                    for n in names:
                        rows.append({"name": n, "input": size, "batch": batch, "threads": th, "mode": mode,
                                     "ms": ms[n], "images_per_s": batch / ms[n] * 1e3,
                                     "ratio_vs_dense": ms[n] / ms[names[1]],
                                     "ratio_vs_resnet18": ms[n] / ms[names[2]], "cpu_ms": cpu[n],
                                     "ratio_cpu_vs_dense": cpu[n] / cpu[names[1]], "reps": len(t[n]["wall"])})
                    log(f"  model {size}x{size} b={batch:<3} threads={th} {mode:<5} " + "  ".join(
                        f"{n} {ms[n]:8.1f} ms" for n in names) + f"  ({len(t[names[0]]['wall'])} reps)")
    return rows


# -- FLOPs and parameters -----------------------------------------------------------------------------------
def run_flops(preset: str, size: int) -> Dict[str, Dict[str, Any]]:
    from pce.models.flops import active_params_per_token, count_flops

    out = {}
    for n in model_names(preset):
        m = build_model(n).eval()
        r = count_flops(m, torch.randn(1, 3, size, size))
        out[n] = {"gflops": r["gflops"], "params": r["params"], "active_params_per_token": active_params_per_token(m),
                  "input": size, "by_operator": r["by_operator"], "unsupported_ops": r["unsupported"]}
    return out


# -- memory ------------------------------------------------------------------------------------------------------
def _rss_mb() -> float:
    """Current resident set size (Linux /proc; elsewhere the peak so far, from getrusage)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    except OSError:
        return _maxrss_mb()


def _peak_rss_mb() -> float:
    """Peak resident set size of this process: VmHWM on Linux (per address space, so neither the parent's
    peak inherited through fork/exec nor anything before :func:`_reset_peak` counts), else getrusage."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return _maxrss_mb()


def _maxrss_mb() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2 ** 20 if sys.platform == "darwin" else r / 1024  # bytes on macOS, KiB on Linux


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (Linux >= 4.0); getrusage and VmHWM then report peaks from now on."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def memory_worker(name: str, size: int, batch: int, threads: int, steps: int) -> Dict[str, Any]:
    """In a fresh process: build the model, run one warm-up training step, then measure ``steps`` more.

    ``peak_rss_mb``: peak RSS during the measured steps minus the RSS after construction and warm-up
    (activations, gradients and temporaries of one step; parameters and optimizer state are in the baseline).
    ``total_training_mb``: the same peak minus the RSS before the model was built (after the imports), i.e.
    everything the model's training costs, parameters, momentum and gradients included."""
    torch.set_num_threads(threads)
    if name == "resnet18":
        import torchvision  # noqa: F401
    else:
        import pce.models.classifier  # noqa: F401
    _trim()
    before = _rss_mb()
    model = build_model(name).train()
    torch.manual_seed(0)
    x = torch.randn(batch, 3, size, size)
    y = torch.randint(0, NUM_CLASSES, (batch,))
    step = make_train_step(model, x, y)
    step()
    _trim()
    base = _rss_mb()
    reset = _reset_peak()
    for _ in range(steps):
        step()
    peak = _peak_rss_mb()
    return {"peak_rss_mb": peak - base, "abs_peak_rss_mb": peak, "baseline_rss_mb": base,
            "total_training_mb": peak - before, "rss_before_model_mb": before,
            "peak_reset": reset, "input": size, "batch": batch, "threads": threads, "steps": steps}


def start_memory(preset: str, cfg: Dict[str, Any], threads: int) -> Dict[str, subprocess.Popen]:
    """Start one fresh subprocess per model (side by side: resident memory is per process; they start after
    the timed sections, so they disturb no timing)."""
    env = dict(os.environ)
    # A fixed mmap threshold turns off glibc's dynamic threshold, so freed activations go back to the OS and
    # the RSS after the warm-up step is a clean baseline.
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")
    env.setdefault("MALLOC_TRIM_THRESHOLD_", "131072")
    procs = {}
    for n in model_names(preset):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--_memory-worker", n, "--_mem-input", str(cfg["input"]),
               "--_mem-batch", str(cfg["batch"]), "--_mem-threads", str(threads), "--_mem-steps", str(cfg["steps"])]
        procs[n] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    return procs


def collect_memory(preset: str, procs: Dict[str, subprocess.Popen]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for n, p in procs.items():
        stdout, stderr = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"memory worker for {n} failed:\n{stderr[-2000:]}")
        out[n] = json.loads(stdout.strip().splitlines()[-1])
    pce_name, dense_name, _ = model_names(preset)
    out["ratio_pce_vs_dense"] = out[pce_name]["peak_rss_mb"] / max(out[dense_name]["peak_rss_mb"], 1e-6)
    out["ratio_total_pce_vs_dense"] = (out[pce_name]["total_training_mb"]
                                       / max(out[dense_name]["total_training_mb"], 1e-6))
    return out


# -- profiling ---------------------------------------------------------------------------------------------------
def run_profile(layer_cfg: Dict[str, Any], preset: str, model_cfg: Dict[str, Any], threads: int, log) -> None:
    """torch.profiler top operators (self CPU time) of the PCE top-1 training step, layer and model level."""
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(threads)
    E = max(layer_cfg["experts"])
    pce, dense = build_layers(layer_cfg, E, "top1")
    x = torch.randn(layer_cfg["batch"], layer_cfg["channels"], layer_cfg["size"], layer_cfg["size"])
    size, batch = model_cfg["inputs"][0], model_cfg["batches"][0]
    xm, ym = torch.randn(batch, 3, size, size), torch.randint(0, NUM_CLASSES, (batch,))
    jobs = [(f"layer E={E} top1 train (PCE)", layer_fns(pce, dense, x, "train")["pce"]),
            (f"layer E={E} top1 train (dense)", layer_fns(pce, dense, x, "train")["dense"])]
    for n in model_names(preset)[:2]:
        jobs.append((f"{n} train {size}x{size} b={batch}", make_train_step(build_model(n).train(), xm, ym)))
    for title, fn in jobs:
        fn(), fn()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                fn()
        log(f"\n-- profile: {title} (3 steps) --")
        log(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=40))


# -- torch.compile -------------------------------------------------------------------------------------------------
def _compile_module():
    tools = str(Path(__file__).resolve().parent)
    if tools not in sys.path:
        sys.path.insert(0, tools)
    import benchmark_compile  # noqa: E402  (tools/benchmark_compile.py)

    return benchmark_compile


def run_compile(s: Dict[str, Any], args: argparse.Namespace, threads: Sequence[int], layer_threads: int,
                log) -> List[Dict[str, Any]]:
    """The ``--compile`` section (:mod:`benchmark_compile`): layer level with ``layer_threads``, model level
    with the largest thread count."""
    bc, me = _compile_module(), sys.modules[__name__]
    log(f"torch.compile ({args.compile_backend}) ...")
    rows = []
    if "layer" not in args.skip:
        rows += bc.run_compile_layer(s["layer"], layer_threads, args.compile_backend, me, log)
    if "model" not in args.skip:
        rows += bc.run_compile_model(s["model"], args.preset, max(threads), args.compile_backend, me, log)
    return rows


# -- report ------------------------------------------------------------------------------------------------------
def check_targets(result: Dict[str, Any], preset: str) -> List[Dict[str, Any]]:
    """The issue's targets, judged on the wall-clock medians; ``value_cpu`` is the same ratio from CPU time."""
    checks = []

    def add(target, limit, value, value_cpu, ok):
        checks.append({"target": target, "limit": limit, "value": value, "value_cpu": value_cpu, "pass": bool(ok)})

    for row in result["layer"]:
        if row["routing"] == "top1" and row["mode"] == "train":
            lim = TARGETS["layer_top1_train_ratio_max"]
            add(f"layer top-1 train ratio E={row['experts']}", f"<= {lim:.2f}", row["ratio"], row["ratio_cpu"],
                row["ratio"] <= lim)
        if row["routing"] == "soft":
            lim = TARGETS["layer_soft_ratio_max_per_expert"] * row["experts"]
            add(f"layer soft {row['mode']} ratio E={row['experts']}", f"<= {lim:.2f}", row["ratio"], row["ratio_cpu"],
                row["ratio"] <= lim)
    pce_name = model_names(preset)[0]
    for row in result["model"]:
        if row["name"] != pce_name:
            continue
        cell = f"{row['input']}px b={row['batch']} t={row['threads']}"
        if row["mode"] == "train":
            lim = TARGETS["model_train_images_per_s_min_vs_dense"]
            v = 1.0 / row["ratio_vs_dense"]
            add(f"model train images/s vs dense, {cell}", f">= {lim:.2f}", v, 1.0 / row["ratio_cpu_vs_dense"], v >= lim)
        else:
            lim = TARGETS["model_infer_latency_max_vs_dense"]
            add(f"model infer latency vs dense, {cell}", f"<= {lim:.2f}", row["ratio_vs_dense"],
                row["ratio_cpu_vs_dense"], row["ratio_vs_dense"] <= lim)
    mem = result.get("memory")
    if mem:
        lim = TARGETS["memory_max_vs_dense"]
        add("peak training memory vs dense", f"<= {lim:.2f}", mem["ratio_pce_vs_dense"], None,
            mem["ratio_pce_vs_dense"] <= lim)
    return checks


def format_report(result: Dict[str, Any], preset: str) -> str:
    lines: List[str] = []
    c = result["config"]
    if result["layer"]:
        lc = c["layer"]
        lines.append(f"\n== Layer level: B={lc['batch']} C={lc['channels']} {lc['size']}x{lc['size']} patch {lc['patch']}, "
                     f"{c['layer_threads']} thread(s) (ratio = PCE / dense time; CPU ratio from CPU time) ==")
        lines.append(f"{'E':>3} {'routing':<7} {'mode':<5} {'PCE ms':>9} {'dense ms':>9} {'ratio':>7} {'CPU ratio':>9}  exec")
        for r in result["layer"]:
            lines.append(f"{r['experts']:>3} {r['routing']:<7} {r['mode']:<5} {r['pce_ms']:9.2f} {r['dense_ms']:9.2f} "
                         f"{r['ratio']:7.2f} {r['ratio_cpu']:9.2f}  {r['execution']}")
    if result["model"]:
        lines.append("\n== Model level (ms per batch; ratios are time ratios, lower is better) ==")
        lines.append(f"{'model':<11} {'input':>5} {'batch':>5} {'thr':>3} {'mode':<5} {'ms':>9} {'img/s':>8} "
                     f"{'vs dense':>8} {'vs r18':>7} {'CPU vs dense':>12}")
        for r in result["model"]:
            lines.append(f"{r['name']:<11} {r['input']:>5} {r['batch']:>5} {r['threads']:>3} {r['mode']:<5} "
                         f"{r['ms']:9.1f} {r['images_per_s']:8.1f} {r['ratio_vs_dense']:8.2f} "
                         f"{r['ratio_vs_resnet18']:7.2f} {r['ratio_cpu_vs_dense']:12.2f}")
    if result["flops"]:
        lines.append(f"\n== FLOPs (fvcore, multiply-adds, {c['flops_input']}x{c['flops_input']}, one image) "
                     "and parameters ==")
        lines.append(f"{'model':<11} {'GFLOPs':>8} {'params':>11} {'active/token':>13}")
        for n, f in result["flops"].items():
            lines.append(f"{n:<11} {f['gflops']:8.3f} {f['params']:>11,} {f['active_params_per_token']:>13,}")
    mem = result.get("memory")
    if mem:
        mc = c["memory"]
        lines.append(f"\n== Peak training-step memory (RSS over post-warm-up baseline; {mc['input']}x{mc['input']}, "
                     f"batch {mc['batch']}, fresh process each) ==")
        for n in model_names(preset):
            m = mem[n]
            lines.append(f"{n:<11} step {m['peak_rss_mb']:8.1f} MB   with parameters, momentum and gradients "
                         f"{m['total_training_mb']:8.1f} MB   (absolute peak {m['abs_peak_rss_mb']:.0f} MB)")
        lines.append(f"ratio PCE / dense: step {mem['ratio_pce_vs_dense']:.2f}, "
                     f"with model state {mem['ratio_total_pce_vs_dense']:.2f}")
    if result["targets"]:
        lines.append("\n== Targets (judged on wall-clock medians; CPU = the same ratio from CPU time) ==")
        for t in result["targets"]:
            cpu = f"CPU {t['value_cpu']:6.2f}" if t["value_cpu"] is not None else " " * 10
            lines.append(f"{'PASS' if t['pass'] else 'FAIL'}  {t['target']:<48} {t['value']:7.2f}  {cpu}  "
                         f"(target {t['limit']})")
        n_pass = sum(t["pass"] for t in result["targets"])
        lines.append(f"{n_pass}/{len(result['targets'])} targets pass")
    return "\n".join(lines)


def machine_info() -> Dict[str, Any]:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu": cpu, "cpu_count": os.cpu_count(), "device": "cpu"}
    try:
        import torchvision

        info["torchvision"] = torchvision.__version__
    except ImportError:  # pragma: no cover
        pass
    return info


def loadavg() -> Optional[List[float]]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:  # pragma: no cover
        return None


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="reduced grid and repetitions (default)")
    g.add_argument("--full", action="store_true", help="the whole grid (several minutes on 2 cores)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, for tests (implies --quick)")
    ap.add_argument("--json", metavar="PATH", help="write the results as JSON")
    ap.add_argument("--threads", type=int, nargs="+", help="thread counts of the model level (default: quick 2, "
                    "full 1 2); the layer level uses the largest")
    ap.add_argument("--layer-threads", type=int, default=1,
                    help="threads of the layer level (default 1: per-operator overheads without scheduling noise; "
                         "its CPU-time ratios are then exact even on a busy machine)")
    ap.add_argument("--preset", default="tiny", help="PCE preset X: compare pce_X, dense_X and resnet18 (default tiny)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["layer", "model", "flops", "memory"],
                    help="sections to leave out")
    ap.add_argument("--max-minutes", type=float, help="soft limit of the whole run: past it (less a reserve for "
                    "FLOPs and memory) every cell stops at its minimum repetitions (default: full 8, quick 1)")
    ap.add_argument("--profile", action="store_true", help="also print torch.profiler top ops of the PCE paths")
    ap.add_argument("--compile", action="store_true", help="also measure torch.compile on the layer and the "
                    "classifier (PCE and dense twin, eager and compiled; tools/benchmark_compile.py; minutes)")
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile backend of --compile "
                    "(default inductor; 'aot_eager' or 'eager' check the code paths quickly)")
    ap.add_argument("--_memory-worker", dest="memory_worker", help=argparse.SUPPRESS)
    ap.add_argument("--_mem-input", dest="mem_input", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--_mem-batch", dest="mem_batch", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--_mem-threads", dest="mem_threads", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--_mem-steps", dest="mem_steps", type=int, default=1, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv=None) -> Dict[str, Any]:
    args = parse_args(argv)
    if args.memory_worker:
        print(json.dumps(memory_worker(args.memory_worker, args.mem_input, args.mem_batch, args.mem_threads,
                                       args.mem_steps)))
        return {}
    mode = "smoke" if args.smoke else "full" if args.full else "quick"
    s = SETTINGS[mode]
    cores = os.cpu_count() or 1
    threads = list(args.threads or (s["model"]["threads"] if mode != "quick" else (min(2, cores),)))
    if any(t < 1 for t in threads) or args.layer_threads < 1:
        raise SystemExit("--threads must be positive")
    layer_threads = args.layer_threads
    t_start = time.perf_counter()
    max_minutes = args.max_minutes if args.max_minutes is not None else {"full": 8.0, "quick": 1.0}.get(mode)
    if max_minutes:
        reserve = 75.0 if mode == "full" else 25.0
        DEADLINE[0] = t_start + max(0.0, max_minutes * 60 - reserve)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    config = {"mode": mode, "max_minutes": max_minutes, "preset": args.preset, "models": list(model_names(args.preset)),
              "num_classes": NUM_CLASSES, "threads": threads, "layer_threads": layer_threads,
              "layer": dict(s["layer"], router="cosine", expert="residual",
                            routing_kwargs={k: {kk: vv for kk, vv in v.items()} for k, v in ROUTINGS.items()}),
              "model": dict(s["model"], threads=threads, optimizer="SGD(lr=1e-3, momentum=0.9)",
                            train_step="zero_grad, forward, loss (+ router losses), backward, step"),
              "flops_input": s["flops_input"], "memory": dict(s["memory"], threads=max(threads)),
              "targets": TARGETS, "machine": machine_info(), "loadavg_start": loadavg(),
              "ratio": "time ratio candidate / reference (lower is better)",
              "flops_convention": "fvcore: one fused multiply-add = 1 FLOP; eval mode; batch 1"}
    log(f"PCE benchmark ({mode}), torch {torch.__version__}, {cores} CPU cores, threads {threads}, "
        f"load {config['loadavg_start']}")
    result: Dict[str, Any] = {"config": config, "layer": [], "model": [], "flops": {}, "memory": {}}
    sections: Dict[str, float] = {}
    config["section_s"] = sections
    mark = [time.perf_counter()]

    def done(name: str) -> None:
        now = time.perf_counter()
        sections[name] = round(now - mark[0], 1)
        mark[0] = now
    if "layer" not in args.skip:
        log("layer level ...")
        result["layer"] = run_layer_level(s["layer"], layer_threads, log)
        done("layer")
    if "model" not in args.skip:
        log("model level ...")
        result["model"] = run_model_level(s["model"], args.preset, threads, log)
        done("model")
    procs = None
    if "memory" not in args.skip:
        log("memory (fresh subprocesses, in the background) ...")
        procs = start_memory(args.preset, s["memory"], max(threads))
    if "flops" not in args.skip:
        log("FLOPs ...")
        result["flops"] = run_flops(args.preset, s["flops_input"])
        done("flops")
    if procs is not None:
        result["memory"] = collect_memory(args.preset, procs)
        done("memory (after flops)")
    if args.compile:
        config["compile_backend"] = args.compile_backend
        result["compile"] = run_compile(s, args, threads, layer_threads, log)
        done("compile")
    if args.profile:
        run_profile(s["layer"], args.preset, s["model"], layer_threads, log)
        done("profile")
    result["targets"] = check_targets(result, args.preset)
    config["loadavg_end"] = loadavg()
    config["wall_s"] = round(time.perf_counter() - t_start, 1)
    log(format_report(result, args.preset))
    if result.get("compile"):
        log(_compile_module().format_compile(result["compile"], args.compile_backend))
    log(f"\ntotal {config['wall_s']} s ({', '.join(f'{k} {v} s' for k, v in sections.items())}), "
        f"load average at end {config['loadavg_end']}")
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2, default=float))
        log(f"wrote {path}")
    return result


if __name__ == "__main__":
    main()
