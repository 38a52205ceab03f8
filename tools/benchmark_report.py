"""The issue's targets (PASS/FAIL) and the text report of ``tools/benchmark.py``.
Module map: see ``benchmark_timing.py``."""
from __future__ import annotations

from typing import Any, Dict, List

from benchmark_condconv import format_condconv
from benchmark_conv import format_conv
from benchmark_model import model_names

TARGETS = {
    "layer_top1_train_ratio_max": 1.3,
    "layer_soft_ratio_max_per_expert": 1.1,
    "model_train_images_per_s_min_vs_dense": 0.7,
    "model_infer_latency_max_vs_dense": 1.3,
    "memory_max_vs_dense": 1.5,
}


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


def _format_layer(result: Dict[str, Any]) -> List[str]:
    c = result["config"]
    lc = c["layer"]
    lines = [f"\n== Layer level: B={lc['batch']} C={lc['channels']} {lc['size']}x{lc['size']} patch {lc['patch']}, "
             f"{c['layer_threads']} thread(s) (ratio = PCE / dense time; CPU ratio from CPU time) =="]
    lines.append(f"{'E':>3} {'routing':<7} {'mode':<5} {'PCE ms':>9} {'dense ms':>9} {'ratio':>7} {'CPU ratio':>9}  exec")
    for r in result["layer"]:
        lines.append(f"{r['experts']:>3} {r['routing']:<7} {r['mode']:<5} {r['pce_ms']:9.2f} {r['dense_ms']:9.2f} "
                     f"{r['ratio']:7.2f} {r['ratio_cpu']:9.2f}  {r['execution']}")
    return lines


def _format_model(result: Dict[str, Any]) -> List[str]:
    lines = ["\n== Model level (ms per batch; ratios are time ratios, lower is better) =="]
    lines.append(f"{'model':<11} {'input':>5} {'batch':>5} {'thr':>3} {'mode':<5} {'ms':>9} {'img/s':>8} "
                 f"{'vs dense':>8} {'vs r18':>7} {'CPU vs dense':>12}")
    for r in result["model"]:
        lines.append(f"{r['name']:<11} {r['input']:>5} {r['batch']:>5} {r['threads']:>3} {r['mode']:<5} "
                     f"{r['ms']:9.1f} {r['images_per_s']:8.1f} {r['ratio_vs_dense']:8.2f} "
                     f"{r['ratio_vs_resnet18']:7.2f} {r['ratio_cpu_vs_dense']:12.2f}")
    return lines


def _format_flops(result: Dict[str, Any]) -> List[str]:
    c = result["config"]
    lines = [f"\n== FLOPs (fvcore, multiply-adds, {c['flops_input']}x{c['flops_input']}, one image) "
             "and parameters =="]
    lines.append(f"{'model':<11} {'GFLOPs':>8} {'params':>11} {'active/token':>13}")
    for n, f in result["flops"].items():
        lines.append(f"{n:<11} {f['gflops']:8.3f} {f['params']:>11,} {f['active_params_per_token']:>13,}")
    return lines


def _format_memory(result: Dict[str, Any], preset: str) -> List[str]:
    mem, mc = result["memory"], result["config"]["memory"]
    lines = [f"\n== Peak training-step memory (RSS over post-warm-up baseline; {mc['input']}x{mc['input']}, "
             f"batch {mc['batch']}, fresh process each) =="]
    for n in model_names(preset):
        m = mem[n]
        lines.append(f"{n:<11} step {m['peak_rss_mb']:8.1f} MB   with parameters, momentum and gradients "
                     f"{m['total_training_mb']:8.1f} MB   (absolute peak {m['abs_peak_rss_mb']:.0f} MB)")
    lines.append(f"ratio PCE / dense: step {mem['ratio_pce_vs_dense']:.2f}, "
                 f"with model state {mem['ratio_total_pce_vs_dense']:.2f}")
    return lines


def _format_targets(result: Dict[str, Any]) -> List[str]:
    lines = ["\n== Targets (judged on wall-clock medians, those marked [CPU] on CPU-time medians; CPU = the ratio "
             "from CPU time) =="]
    for t in result["targets"]:
        cpu = f"CPU {t['value_cpu']:6.2f}" if t["value_cpu"] is not None else " " * 10
        lines.append(f"{'PASS' if t['pass'] else 'FAIL'}  {t['target']:<56} {t['value']:7.2f}  {cpu}  "
                     f"(target {t['limit']})")
    n_pass = sum(t["pass"] for t in result["targets"])
    lines.append(f"{n_pass}/{len(result['targets'])} targets pass")
    return lines


def format_report(result: Dict[str, Any], preset: str) -> str:
    """The text report: one table per section that has results, then the targets."""
    lines: List[str] = []
    if result["layer"]:
        lines += _format_layer(result)
    if result.get("conv"):
        lines.append(format_conv(result["conv"], result["config"]["layer_threads"]))
    if result["model"]:
        lines += _format_model(result)
    if result.get("vs_condconv"):
        lines.append(format_condconv(result))
    if result["flops"]:
        lines += _format_flops(result)
    if result.get("memory"):
        lines += _format_memory(result, preset)
    if result["targets"]:
        lines += _format_targets(result)
    return "\n".join(lines)
