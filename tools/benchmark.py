#!/usr/bin/env python
"""PCE speed, FLOP, parameter and memory benchmark (CPU by default).

    python tools/benchmark.py --quick                      # reduced grid, < 1 min on 2 cores
    python tools/benchmark.py --full --json bench.json     # the whole grid (several minutes)
    python tools/benchmark.py --quick --threads 1 2        # model level with 1 and 2 threads
    python tools/benchmark.py --quick --profile            # + torch.profiler top ops of the PCE paths
    python tools/benchmark.py --quick --smoke --json b.json  # tiny shapes, every code path (tests)
    python tools/benchmark.py --quick --compile              # + torch.compile (inductor) on layer and model
    python tools/benchmark.py --quick --threads 1 --vs condconv --skip layer model flops memory conv  # issue #25 only
    python tools/benchmark.py --quick --strict               # exit status 1 when a target fails

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
5. ``conv`` (issue #21): ``PCEConv2d`` (top-1 / top-2, auto and sparse dispatch) against ``nn.Conv2d`` and timm's
   ``CondConv2d``, forward and training step, time ratios next to active-FLOP ratios; ``--layer-threads``.
6. ``--vs condconv`` (issue #25): ``pce_tiny`` / ``pce_small`` over their dense twins next to timm's
   ``efficientnet_cc_b0_4e`` over ``efficientnet_b0``, same process, interleaved; peak memory ratios.

Ratios are time ratios (candidate / reference, lower is better); ``images_per_s`` is ``batch / time``.
The issues' targets are printed next to the measurements with PASS/FAIL; the run exits with status 0 whatever
they say, unless ``--strict`` (then 1 when any target fails). Targets marked ``[CPU]`` are judged on the
process-CPU-time ratio, the others on the wall-clock one.

Modules (tools/benchmark_*.py): this file is the entry point (settings, CLI, running the sections, JSON);
``benchmark_timing`` (interleaved timing, medians, deadline, machine info), ``benchmark_layer``, ``benchmark_model``
(model level, FLOPs, model builders), ``benchmark_memory``, ``benchmark_conv``, ``benchmark_condconv``,
``benchmark_profile`` and ``benchmark_breakdown`` (``--profile``), ``benchmark_report`` (targets, text report),
``benchmark_compile`` (``--compile``; this module is its harness ``B``: ``bench_interleaved``, ``median``,
``NUM_CLASSES``, ``build_model``, ``make_train_step``, ``make_infer``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
ROOT = Path(__file__).resolve().parents[1]
TOOLS = Path(__file__).resolve().parent
for _p in (str(ROOT), str(TOOLS)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import warnings  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=DeprecationWarning)

import torch  # noqa: E402

import benchmark_compile  # noqa: E402
import benchmark_condconv as bcc  # noqa: E402
import benchmark_conv as bconv  # noqa: E402
from benchmark_layer import ROUTINGS, run_layer_level  # noqa: E402
from benchmark_memory import collect_memory, memory_worker, start_memory  # noqa: E402
from benchmark_model import (NUM_CLASSES, build_model, make_infer, make_train_step, model_names,  # noqa: E402
                             run_flops, run_model_level)
from benchmark_profile import run_profile  # noqa: E402
from benchmark_report import TARGETS, check_targets, format_report  # noqa: E402
from benchmark_timing import DEADLINE, bench_interleaved, loadavg, machine_info, median  # noqa: E402

__all__ = ["SETTINGS", "main", "parse_args",
           # the harness handed to benchmark_compile as ``B``
           "bench_interleaved", "median", "NUM_CLASSES", "build_model", "make_train_step", "make_infer"]


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


# -- command line ----------------------------------------------------------------------------------------------
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
    ap.add_argument("--skip", nargs="*", default=[], choices=["layer", "model", "flops", "memory", "conv",
                    "condconv_memory"], help="sections to leave out (conv: PCEConv2d vs nn.Conv2d vs CondConv2d, "
                    "issue #21; condconv_memory: the memory workers of --vs condconv)")
    ap.add_argument("--vs-points", nargs="+", type=bcc.parse_point, metavar="SIZExBATCH", help="grid points of --vs "
                    "condconv instead of the mode's (e.g. 224x8)")
    ap.add_argument("--vs", nargs="+", default=[], choices=["condconv", "floor"], help="also compare with other "
                    "networks: condconv = pce_tiny / pce_small over their dense twins next to timm's "
                    "efficientnet_cc_b0_4e over efficientnet_b0 (issue #25; threads: --threads, default 1 2; "
                    "minutes); floor (with condconv) = also the presets without routing, the least any exact "
                    "dispatch costs")
    ap.add_argument("--strict", action="store_true", help="exit with status 1 when any target fails (default: "
                    "print PASS/FAIL and exit 0)")
    ap.add_argument("--max-minutes", type=float, help="soft limit of the whole run: past it (less a reserve for "
                    "FLOPs and memory) every cell stops at its minimum repetitions (default: full 8, quick 2; "
                    "--vs condconv adds full 20, quick 4)")
    ap.add_argument("--profile", action="store_true", help="also print torch.profiler top ops of the PCE paths")
    ap.add_argument("--compile", action="store_true", help="also measure torch.compile on the layer and the "
                    "classifier (PCE and dense twin, eager and compiled; tools/benchmark_compile.py; minutes)")
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile backend of --compile "
                    "(default inductor; 'aot_eager' or 'eager' check the code paths quickly)")
    ap.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    ap.add_argument("--_memory-worker", dest="memory_worker", help=argparse.SUPPRESS)
    ap.add_argument("--_mem-input", dest="mem_input", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--_mem-batch", dest="mem_batch", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--_mem-threads", dest="mem_threads", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--_mem-steps", dest="mem_steps", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if "floor" in args.vs and "condconv" not in args.vs:
        ap.error("--vs floor: it is a row of the CondConv comparison (use --vs condconv floor)")
    return args


def _config(args: argparse.Namespace, mode: str, s: Dict[str, Any], threads: List[int],
            max_minutes: Any) -> Dict[str, Any]:
    """The run's ``config`` record (settings, machine, load at start)."""
    return {"mode": mode, "max_minutes": max_minutes, "preset": args.preset, "models": list(model_names(args.preset)),
            "num_classes": NUM_CLASSES, "threads": threads, "layer_threads": args.layer_threads,
            "layer": dict(s["layer"], router="cosine", expert="residual",
                          routing_kwargs={k: {kk: vv for kk, vv in v.items()} for k, v in ROUTINGS.items()}),
            "model": dict(s["model"], threads=threads, optimizer="SGD(lr=1e-3, momentum=0.9)",
                          train_step="zero_grad, forward, loss (+ router losses), backward, step"),
            "flops_input": s["flops_input"], "memory": dict(s["memory"], threads=max(threads)),
            "conv": dict(bconv.SETTINGS[mode], threads=args.layer_threads, experts=bconv.EXPERTS,
                         targets=bconv.CONV_TARGETS, judged_input=bconv.JUDGED_INPUT),
            "targets": TARGETS, "machine": machine_info(), "loadavg_start": loadavg(),
            "ratio": "time ratio candidate / reference (lower is better)",
            "flops_convention": "fvcore: one fused multiply-add = 1 FLOP; eval mode; batch 1"}


def _run_timed(args: argparse.Namespace, s: Dict[str, Any], mode: str, threads: List[int], result: Dict[str, Any],
               log: Callable[[str], None], done: Callable[[str], None]) -> None:
    """The timed sections, in order: layer, conv, model, vs condconv."""
    if "layer" not in args.skip:
        log("layer level ...")
        result["layer"] = run_layer_level(s["layer"], args.layer_threads, log)
        done("layer")
    if "conv" not in args.skip:
        log("PCEConv2d vs nn.Conv2d vs CondConv2d ...")
        result["conv"] = bconv.run_conv_level(bconv.SETTINGS[mode], args.layer_threads, log)
        done("conv")
    if "model" not in args.skip:
        log("model level ...")
        result["model"] = run_model_level(s["model"], args.preset, threads, log)
        done("model")
    if "condconv" in args.vs:
        cfg = dict(bcc.SETTINGS[mode], **({"points": tuple(args.vs_points)} if args.vs_points else {}))
        th = list(args.threads or cfg["threads"])
        pairs = bcc.PAIRS + (bcc.FLOOR_PAIRS if "floor" in args.vs else ())
        result["config"]["vs_condconv"] = dict(cfg, threads=th, pairs=pairs, check_points=bcc.CHECK_POINTS,
                                               slack=bcc.SLACK, memory_pairs=bcc.PAIRS)  # floors: timed only
        log(f"vs condconv (threads {th}) ...")
        result["vs_condconv"] = bcc.run_condconv(cfg, th, log, pairs)
        done("vs condconv")


def _run_sections(args: argparse.Namespace, s: Dict[str, Any], mode: str, threads: List[int],
                  result: Dict[str, Any], log: Callable[[str], None], done: Callable[[str], None]) -> None:
    """Every section not skipped, in order, into ``result``; ``done(name)`` records each one's time. The memory
    subprocesses run in the background while the FLOPs are counted."""
    _run_timed(args, s, mode, threads, result, log, done)
    procs = cc_procs = None
    if "memory" not in args.skip:
        log("memory (fresh subprocesses, in the background) ...")
        procs = start_memory(args.preset, s["memory"], max(threads))
    if "condconv" in args.vs and "condconv_memory" not in args.skip:
        log("vs condconv memory (fresh subprocesses, in the background) ...")
        cc_procs = bcc.start_condconv_memory(bcc.SETTINGS[mode])
    if "flops" not in args.skip:
        log("FLOPs ...")
        result["flops"] = run_flops(args.preset, s["flops_input"])
        done("flops")
    if procs is not None:
        result["memory"] = collect_memory(args.preset, procs)
        done("memory (after flops)")
    if cc_procs is not None:
        result["vs_condconv_memory"] = bcc.collect_condconv_memory(cc_procs)
        done("vs condconv memory")
    if args.compile:
        result["config"]["compile_backend"] = args.compile_backend
        result["compile"] = benchmark_compile.run_compile(s, args, threads, args.layer_threads,
                                                          sys.modules[__name__], log)
        done("compile")
    if args.profile:
        run_profile(s["layer"], args.preset, s["model"], args.layer_threads, log,
                    conv_shape=bconv.SETTINGS[mode]["shapes"][0])
        done("profile")


def _write_json(result: Dict[str, Any], path: str, log: Callable[[str], None]) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=float))
    log(f"wrote {out}")


def _set_deadline(args: argparse.Namespace, mode: str, t_start: float) -> Any:
    """``DEADLINE`` from ``--max-minutes`` (or the mode's default, longer with ``--vs``); returns the minutes."""
    max_minutes = args.max_minutes if args.max_minutes is not None else (
        {"full": 8.0, "quick": 2.0}.get(mode, 0.0) + ({"full": 20.0, "quick": 4.0}.get(mode, 0.0) if args.vs else 0.0))
    if max_minutes:
        reserve = 75.0 if mode == "full" else 25.0
        DEADLINE[0] = t_start + max(0.0, max_minutes * 60 - reserve)
    return max_minutes


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
    t_start = time.perf_counter()
    max_minutes = _set_deadline(args, mode, t_start)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    config = _config(args, mode, s, threads, max_minutes)
    log(f"PCE benchmark ({mode}), torch {torch.__version__}, {cores} CPU cores, threads {threads}, "
        f"load {config['loadavg_start']}")
    result: Dict[str, Any] = {"config": config, "layer": [], "conv": [], "model": [], "flops": {}, "memory": {}}
    sections: Dict[str, float] = {}
    config["section_s"] = sections
    mark = [time.perf_counter()]

    def done(name: str) -> None:
        now = time.perf_counter()
        sections[name] = round(now - mark[0], 1)
        mark[0] = now
    _run_sections(args, s, mode, threads, result, log, done)
    result["targets"] = (check_targets(result, args.preset) + bconv.check_conv_targets(result["conv"])
                         + bcc.check_condconv(result.get("vs_condconv", [])))
    config["loadavg_end"] = loadavg()
    config["wall_s"] = round(time.perf_counter() - t_start, 1)
    log(format_report(result, args.preset))
    if result.get("compile"):
        log(benchmark_compile.format_compile(result["compile"], args.compile_backend))
    log(f"\ntotal {config['wall_s']} s ({', '.join(f'{k} {v} s' for k, v in sections.items())}), "
        f"load average at end {config['loadavg_end']}")
    if args.json:
        _write_json(result, args.json, log)
    failed = [t["target"] for t in result["targets"] if not t["pass"]]
    if args.strict and failed:
        log(f"--strict: {len(failed)} target(s) failed, exit status 1")
        raise SystemExit(1)
    return result


if __name__ == "__main__":
    from pce.engine.errors import run_cli  # the one error handler of every tool: one line, --debug
    sys.exit(run_cli(lambda: main(sys.argv[1:]) and 0, debug="--debug" in sys.argv[1:]))
