#!/usr/bin/env python
"""Routing statistics and expert specialisation of a trained model over a dataset split.

    python tools/analyze_routing.py configs/fmnist_cls_pce.py --checkpoint work_dirs/fmnist_cls_pce/best.pth \\
        --split val --out analysis/fmnist

Per PCE layer and expert: usage share, mean gate weight, dropped-patch rate, mean routing entropy, entropy of
the usage distribution, imbalance (max / min load), collapsed experts; specialisation as the normalised mutual
information between expert and class label (the image's label, the pixel label under the patch, or the class
of the ground-truth box the patch centre falls in) and between expert and patch position, each with a
shuffled-label baseline; route clusters (K-Means over per-image routing vectors) with example images.

Writes ``OUT/routing_stats.json`` (every number), ``OUT/usage.png``, ``OUT/nmi.png``, per layer
``OUT/expert_class_<layer>.png`` and ``OUT/expert_position_<layer>.png``, and ``OUT/clusters.png``. Existing
outputs are never overwritten without ``--force`` (checked before anything is written); every file is written
atomically, and a failed write (a full disk) is one line naming the file.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable, List, Tuple

from pce.analysis import plots
from pce.analysis.runner import cluster_routes
from pce.engine.errors import PCEError, run_cli
from pce.tasks.routing_runs import collect_routing
from pce.tasks.tooling import (add_force_flag, add_run_args, atomic_write, check_outputs, display, load_run,
                               load_split, write_json)

_FIXED = ("routing_stats.json", "usage.png", "nmi.png", "clusters.png")


def parse_args(argv=None) -> argparse.Namespace:
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


def main(args: argparse.Namespace) -> int:
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
