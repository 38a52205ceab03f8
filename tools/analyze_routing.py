#!/usr/bin/env python
"""Routing statistics and expert specialisation of a trained model over a dataset split.

    python tools/analyze_routing.py configs/fmnist_cls_pce.py --checkpoint work_dirs/fmnist_cls_pce/best.pth \\
        --split val --out analysis/fmnist
    python tools/analyze_routing.py --runs work_dirs/fmnist_cls_pce_s0 work_dirs/fmnist_cls_pce_s1 \\
        --nmi-plot analysis/nmi_over_training.png
    python tools/analyze_routing.py --seeds analysis/seg_s0 analysis/seg_s1 analysis/seg_s2 \\
        --experts analysis/seg_s0_experts.json analysis/seg_s1_experts.json analysis/seg_s2_experts.json \\
        --out analysis/seg_seeds.json

Per PCE layer and expert: usage share, mean gate weight, dropped-patch rate, mean routing entropy, entropy of
the usage distribution, imbalance (max / min load), collapsed experts; specialisation as the normalised mutual
information between expert and class label (the image's label, the pixel label under the patch, or the class
of the ground-truth box the patch centre falls in) and between expert and patch position, each with a
shuffled-label baseline; route clusters (K-Means over per-image routing vectors) with example images.

Writes ``OUT/routing_stats.json`` (every number), ``OUT/usage.png``, ``OUT/nmi.png``, per layer
``OUT/expert_class_<layer>.png`` and ``OUT/expert_position_<layer>.png``, and ``OUT/clusters.png``. Existing
outputs are never overwritten without ``--force`` (checked before anything is written); every file is written
atomically, and a failed write (a full disk) is one line naming the file.

With ``--runs DIR [DIR ...] --nmi-plot OUT.png`` (no config, no model): the NMI of expert vs class and vs
position per layer over the training epochs, read from each run's ``metrics.jsonl`` (the routing statistics
of the logging steps, averaged per epoch), mean over the runs (seeds) with their min-max band and the
shuffled-label baselines, phase boundaries marked (:mod:`pce.analysis.nmi_curves`); ``OUT.json`` beside the
figure holds the plotted numbers. PNG, or PDF / SVG by the suffix.

With ``--seeds DIR [DIR ...] --out FILE.json`` (no config, no model): is the routing positional, semantic or
chance over seeds? Each DIR is an output folder of this tool (its ``routing_stats.json``; one per seed of the same
model); ``--experts FILE [FILE ...]`` (optional, one ``tools/analyze_experts.py`` JSON per DIR, same order) flags
layers whose experts are copies. Per layer: mean, std, min, max of the NMI, of its shuffled baseline and of the
excess over it, a one-sided 95 % t lower bound of the excess and a verdict (:mod:`pce.analysis.seeds`, thresholds
in docs/INTERPRETABILITY.md); prints a markdown table and writes every number to FILE.json.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable, List, Tuple

from pce.analysis import plots
from pce.analysis.runner import cluster_routes
from pce.engine.errors import PCEError, add_debug_flag, run_cli
from pce.tasks.routing_runs import collect_routing
from pce.tasks.tooling import (add_force_flag, add_run_args, atomic_write, check_outputs, display, load_run,
                               load_split, write_json)

_FIXED = ("routing_stats.json", "usage.png", "nmi.png", "clusters.png")


def parse_runs_args(argv: List[str]) -> argparse.Namespace:
    """The arguments of the ``--runs`` mode (NMI over training; no model)."""
    ap = argparse.ArgumentParser(description="NMI of the routing over training, from runs' metrics.jsonl")
    ap.add_argument("--runs", nargs="+", required=True, metavar="DIR", help="run folders (one per seed)")
    ap.add_argument("--nmi-plot", required=True, metavar="OUT", help="figure file (.png, .pdf or .svg)")
    ap.add_argument("--title", default="", help="figure title (default: the runs and the phases)")
    add_force_flag(ap)
    add_debug_flag(ap)
    return ap.parse_args(argv)


def parse_seeds_args(argv: List[str]) -> argparse.Namespace:
    """The arguments of the ``--seeds`` mode (routing over seeds; no model)."""
    ap = argparse.ArgumentParser(description="Positional, semantic or chance? Routing statistics over seeds")
    ap.add_argument("--seeds", nargs="+", required=True, metavar="DIR",
                    help="output folders of tools/analyze_routing.py (each with routing_stats.json), one per seed")
    ap.add_argument("--experts", nargs="+", default=None, metavar="FILE",
                    help="tools/analyze_experts.py JSON files, one per DIR in the same order (flags expert copies)")
    ap.add_argument("--out", required=True, metavar="FILE.json", help="summary JSON")
    add_force_flag(ap)
    add_debug_flag(ap)
    return ap.parse_args(argv)


def _has(argv: List[str], flag: str) -> bool:
    """``flag`` given as ``--flag X`` or ``--flag=X``."""
    return any(a == flag or a.startswith(flag + "=") for a in argv)


def parse_args(argv=None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    if _has(argv, "--runs"):
        return parse_runs_args(argv)
    if _has(argv, "--seeds"):
        return parse_seeds_args(argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(ap)
    ap.add_argument("--split", default="val", choices=["train", "val", "test"])
    ap.add_argument("--num", type=int, default=None, help="only the first NUM samples of the split")
    ap.add_argument("--clusters", type=int, default=4, help="route clusters (K-Means k, default 4)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the shuffled baselines and K-Means")
    ap.add_argument("--out", required=True, help="output folder")
    add_force_flag(ap)
    return ap.parse_args(argv)


def figure_jobs(stats: dict, clusters: dict, image_of: Callable[[int], Any], class_names: Any
                ) -> List[Tuple[str, Callable[[Path], Any]]]:
    """``(file name, draw(path))`` of every figure (the figures of :func:`pce.analysis.plots.stat_plots`, one
    by one, so that each is written atomically and a failed write names its file)."""
    jobs: List[Tuple[str, Callable[[Path], Any]]] = [("usage.png", lambda p: plots.usage_figure(stats, p)),
                                                      ("nmi.png", lambda p: plots.nmi_figure(stats, p))]
    for layer, s in stats.items():
        safe = layer.replace("backbone.", "").replace(".", "_")
        if "expert_class" in s:
            jobs.append((f"expert_class_{safe}.png",
                         lambda p, s=s, layer=layer: plots.expert_class_figure(s, layer, p, class_names)))
        if "expert_position" in s:
            jobs.append((f"expert_position_{safe}.png",
                         lambda p, s=s, layer=layer: plots.expert_position_figure(s, layer, p)))
    if clusters.get("k"):
        jobs.append(("clusters.png", lambda p: plots.cluster_figure(
            [[image_of(i) for i in ex] for ex in clusters["examples"]], clusters["sizes"], p)))
    return jobs


def analyze(args: argparse.Namespace) -> dict:
    from pce.tasks.visualize import class_names_from_config

    if args.num is not None and args.num < 1:
        raise PCEError("--num", f"{args.num}", "a positive number of samples")
    if args.clusters < 1:
        raise PCEError("--clusters", f"{args.clusters}", "a positive number of route clusters")
    out = Path(args.out)
    check_outputs([out / name for name in _FIXED], args.force)  # before the model runs
    cfg, task, model, _, device = load_run(args)
    ds = load_split(cfg, task, args.split, args.num)
    got = collect_routing(model, task, cfg, ds, device, seed=args.seed)
    stats = got.stats.compute()
    if not stats:
        raise PCEError(args.config, "the model has no PCE layer", "a config whose backbone routes")
    clusters = cluster_routes(got.vectors, args.clusters, args.seed, image_labels=got.image_labels)
    summary = {"config": str(args.config), "checkpoint": str(args.checkpoint), "split": args.split,
               "num_samples": len(ds), "task": cfg.task, "layers": stats,
               "clusters": {k: v for k, v in clusters.items() if k != "assignment"}}
    transform = getattr(getattr(ds, "dataset", ds), "transform", None)
    jobs = figure_jobs(stats, clusters, lambda i: display(ds[i][0], transform), class_names_from_config(cfg))
    check_outputs([out / "routing_stats.json"] + [out / name for name, _ in jobs], args.force)
    write_json(summary, out / "routing_stats.json")
    for name, draw in jobs:
        atomic_write(out / name, draw)
    return summary


def nmi_over_training(args: argparse.Namespace) -> Path:
    """``--runs``: read every run's ``metrics.jsonl``, draw the NMI over training, write the numbers beside it."""
    from pce.analysis.nmi_curves import nmi_band, nmi_series, nmi_training_figure
    from pce.analysis.report import read_metrics

    out = Path(args.nmi_plot)
    if out.suffix.lower() not in (".png", ".pdf", ".svg"):
        raise PCEError("--nmi-plot", f"{out}: unsupported suffix {out.suffix or '(none)'!r}", ".png, .pdf or .svg")
    check_outputs([out, out.with_suffix(".json")], args.force)
    series = []
    for run in args.runs:
        metrics = Path(run) / "metrics.jsonl"
        if not metrics.is_file():
            raise PCEError(metrics, "no such file", "a run folder written by tools/train.py")
        try:
            series.append(nmi_series(read_metrics(metrics)))
        except ValueError as e:
            raise PCEError(metrics, str(e).split(" (")[0], "train records with 'routing': a run of a routed "
                           "model trained by tools/train.py") from None
    write_json({**nmi_band(series), "runs": [str(r) for r in args.runs]}, out.with_suffix(".json"))
    atomic_write(out, lambda p: nmi_training_figure(series, p, title=args.title))
    return out


def _read_json(path: Path, expected: str) -> dict:
    if not path.is_file():
        raise PCEError(path, "no such file", expected)
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PCEError(path, f"unreadable JSON ({e})", expected) from None


def over_seeds(args: argparse.Namespace) -> dict:
    """``--seeds``: read every folder's ``routing_stats.json`` (and ``--experts``), summarise, write ``--out``."""
    from pce.analysis.seeds import SeedsError, summarize_seeds

    out = Path(args.out)
    if out.suffix.lower() != ".json":
        raise PCEError("--out", f"{out}: suffix {out.suffix or '(none)'!r}", "a .json file in the --seeds mode")
    experts_files = args.experts or []
    if args.experts is not None and len(experts_files) != len(args.seeds):
        raise PCEError("--experts", f"{len(experts_files)} file(s) for {len(args.seeds)} --seeds folder(s)",
                       "one tools/analyze_experts.py JSON per folder, in the same order")
    check_outputs([out], args.force)
    files = [Path(d) if Path(d).is_file() else Path(d) / "routing_stats.json" for d in args.seeds]
    seen = set()
    for f in files:
        if f.resolve() in seen:
            raise PCEError("--seeds", f"{f} given twice", "one folder per seed: a repeated seed would narrow the spread")
        seen.add(f.resolve())
    stats = [_read_json(f, "an output folder of tools/analyze_routing.py CONFIG --checkpoint CKPT --out DIR")
             for f in files]
    experts = [_read_json(Path(f), "a JSON written by tools/analyze_experts.py --out") for f in experts_files]
    try:
        summary = summarize_seeds(stats, experts or None, names=[str(f) for f in files])
    except SeedsError as e:
        raise PCEError(e.where, e.what, e.expected) from None
    summary["sources"] = {"routing_stats": [str(f) for f in files], "experts": [str(f) for f in experts_files]}
    write_json(summary, out)
    return summary


def main(args: argparse.Namespace) -> int:
    if getattr(args, "runs", None):
        print(f"NMI over training of {len(args.runs)} run(s) written to {nmi_over_training(args)}")
        return 0
    if getattr(args, "seeds", None):
        from pce.analysis.seeds import format_seeds_table

        summary = over_seeds(args)
        print(format_seeds_table(summary))
        print(f"summary of {summary['seeds']} seed(s) written to {args.out}")
        return 0
    summary = analyze(args)
    print(f"{'layer':<34} {'entropy':>7} {'collapsed':>9} {'NMI class (shuffled)':>22} {'NMI position (shuffled)':>24}")
    for layer, s in summary["layers"].items():
        c, p = s.get("nmi_class") or {}, s["nmi_position"]
        fmt = lambda d: "-" if d.get("nmi") is None else f"{d['nmi']:.3f} ({d['baseline']:.3f})"  # noqa: E731
        print(f"{layer:<34} {s['entropy']:7.3f} {len(s['collapsed_experts']):9d} {fmt(c):>22} {fmt(p):>24}")
    print(f"statistics and plots written to {args.out}")
    return 0


if __name__ == "__main__":
    _args = parse_args()
    sys.exit(run_cli(lambda: main(_args), debug=_args.debug))
