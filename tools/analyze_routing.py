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
``OUT/expert_class_<layer>.png`` and ``OUT/expert_position_<layer>.png``, and ``OUT/clusters.png``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pce.analysis import plots
from pce.analysis.runner import cluster_routes
from pce.engine.errors import PCEError, run_cli
from pce.tasks.routing_runs import collect_routing
from pce.tasks.tooling import add_run_args, display, load_run, load_split, write_json


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(ap)
    ap.add_argument("--split", default="val", choices=["train", "val", "test"])
    ap.add_argument("--num", type=int, default=None, help="only the first NUM samples of the split")
    ap.add_argument("--clusters", type=int, default=4, help="route clusters (K-Means k, default 4)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the shuffled baselines and K-Means")
    ap.add_argument("--out", required=True, help="output folder")
    return ap.parse_args(argv)


def analyze(args: argparse.Namespace) -> dict:
    from pce.tasks.visualize import class_names_from_config

    cfg, task, model, _, device = load_run(args)
    if args.num is not None and args.num < 1:
        raise PCEError("--num", f"{args.num}", "a positive number of samples")
    ds = load_split(cfg, task, args.split, args.num)
    got = collect_routing(model, task, cfg, ds, device, seed=args.seed)
    stats = got.stats.compute()
    if not stats:
        raise PCEError(args.config, "the model has no PCE layer", "a config whose backbone routes")
    clusters = cluster_routes(got.vectors, args.clusters, args.seed, image_labels=got.image_labels)
    out = Path(args.out)
    summary = {"config": str(args.config), "checkpoint": str(args.checkpoint), "split": args.split,
               "num_samples": len(ds), "task": cfg.task, "layers": stats,
               "clusters": {k: v for k, v in clusters.items() if k != "assignment"}}
    write_json(summary, out / "routing_stats.json")
    transform = getattr(getattr(ds, "dataset", ds), "transform", None)
    plots.stat_plots(stats, clusters, out, lambda i: display(ds[i][0], transform), class_names_from_config(cfg))
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
