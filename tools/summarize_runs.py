"""Summarise training runs (their metrics.jsonl) as a Markdown table: best and final metric, wall time,
throughput and the routers' entropy / expert usage at the end of training. Wall time leaves out the pauses of
a run stopped and resumed later (the gap before each ``resume`` record; gaps over 30 minutes in older records).
Runs whose names differ only by a seed suffix (``_s0``, ``_seed1``, ...) are also aggregated into a second
table: mean +- sample std over the seeds of the final and best metric, wall time and throughput. With two or more
seed groups of at least two runs, a third table compares every group with the first one: the difference of the
means with its 95% Welch confidence interval and two-sided p-value (unequal variances), so "within noise" is a
number, not a reading.

    python tools/summarize_runs.py work_dirs/demo_det_pce work_dirs/demo_det_dense --metric AP50
    python tools/summarize_runs.py work_dirs/fmnist_*_s[012] --metric top1

Errors (a missing ``metrics.jsonl``, a line that is not JSON, a metric never logged) are one line naming the file
(``--debug``: the traceback).
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Dict, List

from pce.engine.errors import PCEError, add_debug_flag, run_cli

_SEED = re.compile(r"^(?P<group>.+?)_(?:s|seed)(?P<seed>\d+)$")


def summarize(work_dir: Path, metric: str) -> dict:
    path = work_dir / "metrics.jsonl"
    if not path.is_file():
        raise PCEError(work_dir, f"no metrics.jsonl ({path} not found)", "a tools/train.py work dir")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as e:
            raise PCEError(f"{path}: line {n}", f"not JSON ({e.msg})", "one JSON record per line") from None
        if not isinstance(row, dict):
            raise PCEError(f"{path}: line {n}", f"a JSON {type(row).__name__}, not a record",
                           "one JSON object per line")
        rows.append(row)
    vals = [r for r in rows if r.get("type") == "val" and isinstance(r.get(metric), (int, float))]
    if not vals:
        raise PCEError(path, f"no validation rows with metric {metric!r}", "a metric tools/train.py logged: --metric")
    train = [r for r in rows if r.get("type") == "train"]
    best = max(vals, key=lambda r: r[metric])
    routing = next((r["routing"] for r in reversed(train) if r.get("routing")), None)
    out = {"run": work_dir.name, "best": best[metric], "best_epoch": best["epoch"], "final": vals[-1][metric],
           "epochs": vals[-1]["epoch"], "minutes": _active_minutes(rows),
           "images_per_s": statistics.median(r["images_per_s"] for r in train if "images_per_s" in r) if train else 0}
    if routing:
        out["entropy"] = statistics.mean(v["entropy"] for v in routing.values())
        out["usage"] = "; ".join("/".join(f"{u:.2f}" for u in v["usage"]) for v in routing.values())
    return out


def group_by_seed(rows: List[dict]) -> Dict[str, List[dict]]:
    """Runs named ``<group>_s<N>`` / ``<group>_seed<N>`` by group (groups of one run included)."""
    groups: Dict[str, List[dict]] = defaultdict(list)
    for r in rows:
        m = _SEED.match(r["run"])
        if m:
            groups[m.group("group")].append(r)
    return dict(groups)


PAUSE_S = 30 * 60  # without resume records: a gap this long between two records is a pause, not training time


def _active_minutes(rows: List[dict]) -> float:
    """Wall minutes between a run's first and last timed record, less the pauses of a run stopped and resumed
    later: the gap before each ``resume`` record (the trainer writes one when it resumes), or, in records written
    before the trainer did so (no ``resume`` record at all), every gap over :data:`PAUSE_S`. NaN without records."""
    timed = [r for r in rows if isinstance(r.get("time"), (int, float))]
    if not timed:
        return float("nan")
    marked = any(r.get("type") == "resume" for r in timed)
    total = 0.0
    for a, b in zip(timed, timed[1:]):
        gap = b["time"] - a["time"]
        paused = b.get("type") == "resume" if marked else gap > PAUSE_S
        total += 0.0 if paused else max(gap, 0.0)
    return total / 60


def welch(a: List[float], b: List[float], level: float = 0.95) -> dict:
    """Welch's two-sample comparison of ``mean(a) - mean(b)``: the difference, its ``level`` confidence
    interval, t, the Welch-Satterthwaite degrees of freedom and the two-sided p-value. Needs >= 2 values each."""
    from scipy import stats

    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"Welch's test needs at least 2 runs per group, got {len(a)} and {len(b)}")
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    diff = statistics.mean(a) - statistics.mean(b)
    se = (va + vb) ** 0.5
    if se == 0:
        return {"diff": diff, "low": diff, "high": diff, "t": float("inf") if diff else 0.0,
                "df": float(len(a) + len(b) - 2), "p": 0.0 if diff else 1.0}
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    half = stats.t.ppf(0.5 + level / 2, df) * se
    t = diff / se
    return {"diff": diff, "low": float(diff - half), "high": float(diff + half), "t": t, "df": df,
            "p": float(2 * stats.t.sf(abs(t), df))}


def format_p(p: float) -> str:
    """A p-value as the tables print it: three decimals, or ``p<0.001`` below that (never a bare ``p=0.000``)."""
    return "p<0.001" if p < 0.001 else f"p={p:.3f}"


def welch_cell(w: Dict[str, float]) -> str:
    """One table cell for :func:`welch`'s result: ``+0.0010 [-0.0005, +0.0025], p=0.171``."""
    return f"{w['diff']:+.4f} [{w['low']:+.4f}, {w['high']:+.4f}], {format_p(w['p'])}"


def _welch_cell(a: List[float], b: List[float]) -> str:
    return welch_cell(welch(a, b))


def _entropy(row: dict) -> str:
    return f"{row['entropy']:.3f}" if "entropy" in row else "-"


def _mean_std(values: List[float], digits: int) -> str:
    mean = statistics.mean(values)
    if len(values) < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("work_dirs", nargs="+", type=Path)
    ap.add_argument("--metric", default="top1")
    add_debug_flag(ap)
    args = ap.parse_args(argv)
    return run_cli(lambda: _run(args), debug=args.debug)


def _run(args: argparse.Namespace) -> int:
    rows = [summarize(d, args.metric) for d in args.work_dirs]
    print(f"| run | best {args.metric} (epoch) | final | epochs | wall min | median img/s | router entropy | expert usage per layer |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['run']} | {r['best']:.4f} ({r['best_epoch']}) | {r['final']:.4f} | {r['epochs']} | "
              f"{r['minutes']:.1f} | {r['images_per_s']:.0f} | {_entropy(r)} | {r.get('usage', '-')} |")
    groups = group_by_seed(rows)
    if any(len(g) > 1 for g in groups.values()):
        print()
        print(f"| runs | seeds | final {args.metric} (mean ± std) | best {args.metric} | wall min | img/s (run medians) |")
        print("| --- | --- | --- | --- | --- | --- |")
        for name, g in groups.items():
            seeds = ",".join(_SEED.match(r["run"]).group("seed") for r in g)
            print(f"| {name} | {seeds} | {_mean_std([r['final'] for r in g], 4)} | {_mean_std([r['best'] for r in g], 4)} | "
                  f"{_mean_std([r['minutes'] for r in g], 1)} | {_mean_std([r['images_per_s'] for r in g], 0)} |")
    multi = {name: g for name, g in groups.items() if len(g) > 1}
    if len(multi) > 1:
        (ref, base), *others = multi.items()
        print()
        print(f"| runs vs {ref} | final {args.metric}: difference of means [95% CI], Welch p | best {args.metric} |")
        print("| --- | --- | --- |")
        for name, g in others:
            print(f"| {name} | {_welch_cell([r['final'] for r in g], [r['final'] for r in base])} | "
                  f"{_welch_cell([r['best'] for r in g], [r['best'] for r in base])} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
