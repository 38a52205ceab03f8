"""Issue #25's model rows of ``tools/benchmark.py`` (``--vs condconv``): PCE and CondConv, each over its own dense
network, timed in the same process. Module map: see ``benchmark_timing.py``.

Pairs (candidate over its dense twin): ``pce_tiny`` / ``dense_tiny``, ``pce_small`` / ``dense_small`` (the PCE
classifiers of the model level, top-1) and timm's ``efficientnet_cc_b0_4e`` / ``efficientnet_b0`` (CondConv,
4 experts, ``pretrained=False``); all with 10 classes. ``--vs condconv floor`` adds :data:`FLOOR_PAIRS` (the presets
without routing: a lower bound, not judged). Every row also carries each candidate's FLOPs over its twin's. Every grid point (input size, batch, threads, mode) times
the six models interleaved (A B C ..., ... C B A) after warm-up: ``infer`` = eval + ``no_grad`` forward, ``train``
= one SGD step (zero_grad, forward, loss - plus router losses for PCE -, backward, step), wall and process CPU time.
Ratios: candidate / its dense twin, from the medians (lower is better); raw times are kept in the JSON rows.

The issue's check, per PCE preset and mode: PCE's ratio <= CondConv's + 0.05 at 224 px batch 8 and 128 px batch
32, one thread, CPU time. Peak training-step memory (``benchmark_memory``: fresh subprocesses, peak RSS over the
post-warm-up baseline) of each model; its ratio over the twin, PCE next to CondConv (reported, not a target).
"""
from __future__ import annotations

import argparse
from typing import Any, Dict, List, Sequence, Tuple

import torch

from benchmark_memory import collect_workers, start_memory_for
from benchmark_model import NUM_CLASSES, build_model, time_models
from benchmark_timing import median

CONDCONV, DENSE_CC = "efficientnet_cc_b0_4e", "efficientnet_b0"
#: (candidate, its dense twin)
PAIRS = (("pce_tiny", "dense_tiny"), ("pce_small", "dense_small"), (CONDCONV, DENSE_CC))
#: ``--vs condconv floor``: each PCE preset with no routing at all (``benchmark_model.FLOOR``), over the same twin:
#: what any exact dispatch of the preset's grid costs at least. Reported next to the check, never judged by it.
FLOOR_PAIRS = (("pce_tiny:floor", "dense_tiny"), ("pce_small:floor", "dense_small"))
CHECK_POINTS = ((224, 8), (128, 32))
SLACK = 0.05
SETTINGS: Dict[str, Dict[str, Any]] = {
    "full": dict(points=tuple((s, b) for s in (64, 128, 224) for b in (8, 32)), threads=(1, 2), warmup=1, reps=5,
                 min_reps=2, budget_s=8.0, memory=dict(input=224, batch=32, steps=1)),
    "quick": dict(points=((224, 8), (128, 32)), threads=(1, 2), warmup=1, reps=5, min_reps=3, budget_s=4.0,
                  memory=dict(input=224, batch=8, steps=1)),
    "smoke": dict(points=((32, 2),), threads=(1,), warmup=1, reps=2, min_reps=1, budget_s=0.2,
                  memory=dict(input=32, batch=2, steps=1)),
}


def parse_point(text: str) -> Tuple[int, int]:
    """``"224x8"`` -> ``(224, 8)`` (``--vs-points``; ``argparse.ArgumentTypeError`` otherwise)."""
    size, _, batch = text.partition("x")
    if not (size.isdigit() and batch.isdigit()):
        raise argparse.ArgumentTypeError(f"{text!r} is not SIZExBATCH (e.g. 224x8)")
    return int(size), int(batch)


def model_list(pairs: Sequence[Sequence[str]] = PAIRS) -> List[str]:
    return [n for pair in pairs for n in pair]


def flop_ratios(models: Dict[str, torch.nn.Module], size: int, pairs: Sequence[Sequence[str]] = PAIRS
                ) -> Dict[str, float]:
    """Per candidate: its FLOPs over its twin's (fvcore, eval mode, one ``size`` px image): the work each model
    defines, before any overhead (``pce_tiny`` pads 14 and 7 px maps to its 16 and 8 px grids at 224 px)."""
    from pce.models.flops import count_flops

    flops = {}
    for n in {m for pair in pairs for m in pair}:
        was = models[n].training
        flops[n] = count_flops(models[n].eval(), torch.randn(1, 3, size, size))["total"]
        models[n].train(was)
    return {c: flops[c] / flops[d] for c, d in pairs}


def point_row(size: int, batch: int, threads: int, mode: str, times: Dict[str, Dict[str, List[float]]],
              pairs: Sequence[Sequence[str]] = PAIRS) -> Dict[str, Any]:
    """One grid point: per model the raw and median times, per candidate its ratios over its twin."""
    models = {n: {"ms": median(t["wall"]), "cpu_ms": median(t["cpu"]), "reps": len(t["wall"]),
                  "wall_runs": list(t["wall"]), "cpu_runs": list(t["cpu"])} for n, t in times.items()}
    ratios = {c: {"twin": d, "wall": models[c]["ms"] / models[d]["ms"],
                  "cpu": models[c]["cpu_ms"] / models[d]["cpu_ms"]} for c, d in pairs}
    return {"input": size, "batch": batch, "threads": threads, "mode": mode, "models": models, "ratios": ratios}


def run_condconv(cfg: Dict[str, Any], threads: Sequence[int], log,
                 pairs: Sequence[Sequence[str]] = PAIRS) -> List[Dict[str, Any]]:
    """Every point x thread count x mode of ``cfg`` (a :data:`SETTINGS` entry), the models of ``pairs``."""
    names = model_list(pairs)
    models = {n: build_model(n) for n in names}
    rows, flops = [], {}
    for size, batch in cfg["points"]:
        torch.manual_seed(0)
        x = torch.randn(batch, 3, size, size)
        y = torch.randint(0, NUM_CLASSES, (batch,))
        if size not in flops:
            flops[size] = flop_ratios(models, size, pairs)
        for th in threads:
            torch.set_num_threads(th)
            for mode in ("infer", "train"):
                t = time_models(models, x, y, mode, cfg)
                row = dict(point_row(size, batch, th, mode, t, pairs), flops_ratio=flops[size])
                rows.append(row)
                log(f"  vs condconv {size}px b={batch:<3} t={th} {mode:<5} " + "  ".join(
                    f"{c} {r['cpu']:.2f}" for c, r in row["ratios"].items())
                    + f"  (CPU ratio over twin; {row['models'][names[0]]['reps']} reps)")
    return rows


def check_condconv(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Issue #25: PCE's ratio <= CondConv's + 0.05 at the check points, one thread, CPU time."""
    checks = []
    for r in rows:
        if r["threads"] != 1 or (r["input"], r["batch"]) not in CHECK_POINTS or CONDCONV not in r["ratios"]:
            continue
        cc = r["ratios"][CONDCONV]
        for c, v in r["ratios"].items():
            if c == CONDCONV or ":" in c:  # a floor row is a bound, not a candidate
                continue
            lim = cc["cpu"] + SLACK
            checks.append({"target": f"{c}/{v['twin']} <= CondConv/b0 + {SLACK}, {r['input']}px b={r['batch']} t=1 "
                                     f"{r['mode']} [CPU]", "limit": f"<= {lim:.2f}", "value": v["wall"],
                           "value_cpu": v["cpu"], "pass": bool(v["cpu"] <= lim), "judged_on": "cpu"})
    return checks


def start_condconv_memory(cfg: Dict[str, Any], pairs: Sequence[Sequence[str]] = PAIRS):
    """The memory workers of every model (one thread each), started side by side."""
    return start_memory_for(model_list(pairs), cfg["memory"], 1)


def memory_ratios(mem: Dict[str, Any], pairs: Sequence[Sequence[str]] = PAIRS) -> Dict[str, Dict[str, Any]]:
    """Per candidate: peak step memory (and with model state) over its twin's."""
    return {c: {"twin": d, "step": mem[c]["peak_rss_mb"] / max(mem[d]["peak_rss_mb"], 1e-6),
                "total": mem[c]["total_training_mb"] / max(mem[d]["total_training_mb"], 1e-6)} for c, d in pairs}


def collect_condconv_memory(procs, pairs: Sequence[Sequence[str]] = PAIRS) -> Dict[str, Any]:
    mem = collect_workers(procs)
    return {"models": mem, "ratios": memory_ratios(mem, pairs)}


def format_condconv(result: Dict[str, Any]) -> str:
    rows, mem = result.get("vs_condconv", []), result.get("vs_condconv_memory")
    lines = ["\n== PCE vs CondConv over their dense networks (model; ratio = model / its dense twin, "
             "wall (CPU time)) =="]
    if rows:
        cands = list(rows[0]["ratios"])
        lines.append(f"{'input':>5} {'batch':>5} {'thr':>3} {'mode':<5} " + " ".join(f"{c:>24}" for c in cands)
                     + "  ms: " + " ".join(rows[0]["models"]))
    for r in rows:
        ratios = " ".join(f"{v['wall']:>12.2f} ({v['cpu']:5.2f})   " for v in r["ratios"].values())
        ms = " ".join(f"{v['ms']:.1f}" for v in r["models"].values())
        lines.append(f"{r['input']:>5} {r['batch']:>5} {r['threads']:>3} {r['mode']:<5} {ratios}  {ms}")
    for size, fr in {r["input"]: r["flops_ratio"] for r in rows if "flops_ratio" in r}.items():
        lines.append(f"FLOPs over the twin at {size} px (fvcore, one image): "
                     + ", ".join(f"{c} {v:.3f}" for c, v in fr.items()))
    if any(":" in c for r in rows for c in r["ratios"]):
        lines.append("PRESET:floor = the preset with every patch on expert 0 (no router, no gather, one expert call): "
                     "the least any exact dispatch of its grid costs over the twin; not judged")
    if mem:
        mc = result["config"].get("vs_condconv", {}).get("memory", {})
        lines.append(f"peak training-step memory over the twin ({mc.get('input')} px, batch {mc.get('batch')}, "
                     "1 thread, fresh process each): " + ", ".join(
                         f"{c} {v['step']:.2f} (with model state {v['total']:.2f})" for c, v in mem["ratios"].items()))
    return "\n".join(lines)
