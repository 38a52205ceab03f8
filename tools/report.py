#!/usr/bin/env python
"""One self-contained HTML page of a training run (no network: images inlined).

    python tools/report.py work_dirs/fmnist_cls_pce                  # -> work_dirs/fmnist_cls_pce/report.html
    python tools/report.py RUN_DIR --num 256 --images 4 --out report.html
    python tools/report.py OLD_RUN_DIR --config configs/fmnist_cls_pce.py   # a run without config.json

Reads RUN_DIR/config.json (plain data: a work dir's config.py is never executed; a run that predates config.json
needs ``--config CONFIG``), RUN_DIR/metrics.jsonl and RUN_DIR/best.pth (else latest.pth); shows the training curves
(loss, validation metric, routing entropy per layer), the final metrics with per-class tables (an evaluation of
the checkpoint on --split), routing maps of the first --images images and the routing statistics and plots of
tools/analyze_routing.py over the first --num samples of --split (through its evaluation transform: no
augmentation). The page is written atomically.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from pce.analysis import plots
from pce.analysis.maps import routing_maps
from pce.analysis.report import build_report, experts_section, metric_tables, read_metrics, routing_table
from pce.analysis.runner import cluster_routes, expert_analysis
from pce.engine.config import load_saved_config
from pce.engine.errors import PCEError, add_debug_flag, run_cli
from pce.tasks.routing_runs import collect_routing
from pce.tasks.tooling import batches, display, load_run, load_split, model_inputs, split_samples


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", help="a work dir of tools/train.py")
    ap.add_argument("--config", help="the run's config (default: RUN_DIR/config.json; a config given here is run "
                    "as Python, so pass only one you trust)")
    ap.add_argument("--checkpoint", help="default: RUN_DIR/best.pth, else RUN_DIR/latest.pth")
    ap.add_argument("--split", default="val", choices=["train", "val", "test"])
    ap.add_argument("--num", type=int, default=512, help="samples for the evaluation and the statistics")
    ap.add_argument("--images", type=int, default=4, help="routing maps of this many images")
    ap.add_argument("--device", default=None)
    ap.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE")
    ap.add_argument("--out", help="default: RUN_DIR/report.html")
    add_debug_flag(ap)
    return ap.parse_args(argv)


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    run = Path(args.run_dir)
    if not run.is_dir():
        raise PCEError(run, "not a folder", "a work dir written by tools/train.py")
    if args.config:  # given on the command line: the user's own choice to run it
        config = Path(args.config)
    else:
        config = run / "config.json"
        if not config.is_file():
            if (run / "config.py").is_file():
                raise PCEError(run / "config.py", "not read: a work dir's config.py is Python and is never executed "
                               "(the run predates config.json)", "pass the run's config explicitly: --config CONFIG")
            raise PCEError(config, "missing", "the config.json tools/train.py writes into its work dir, or "
                           "--config CONFIG")
        load_saved_config(config, args.cfg_options)  # plain data, validated: nothing of the work dir runs
    ckpt = Path(args.checkpoint) if args.checkpoint else next((run / n for n in ("best.pth", "latest.pth")
                                                               if (run / n).is_file()), run / "best.pth")
    args.config, args.checkpoint = str(config), str(ckpt)
    return args


def curves(run: Path, tmp: Path, metric: str) -> list:
    records = read_metrics(run / "metrics.jsonl")
    train = [r for r in records if r.get("type") == "train"]
    val = [r for r in records if r.get("type") == "val"]
    files = [plots.curves_figure(train, val, tmp / "curves.png", metric)] if train or val else []
    routed = [r for r in train if r.get("routing")]
    if routed:
        files.append(plots.routing_curves_figure(routed, tmp / "routing_curves.png"))
    return files


def experts(cfg, task, model, ds, device) -> tuple:
    """The "do the experts differ, does routing matter" section over 4 evaluation batches of ``ds``."""
    from pce.engine.evaluation import build_eval_loader

    images = [model_inputs(task, b) for b, _ in zip(build_eval_loader(cfg, task, ds, device), range(4))]
    return experts_section(expert_analysis(model, images))


def main(args: argparse.Namespace) -> int:
    from pce.engine.evaluation import evaluate_model, evaluation_config
    from pce.tasks.visualize import class_names_from_config

    args = resolve(args)
    cfg, task, model, _, device = load_run(args)
    cfg = evaluation_config(cfg, (args.split,))  # scored and drawn as evaluated: no augmentation
    run, out = Path(args.run_dir), Path(args.out) if args.out else Path(args.run_dir) / "report.html"
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        sections = [("Training", f"<p class='note'>{run}: config {args.config}, checkpoint {args.checkpoint}</p>",
                     curves(run, tmp, cfg.eval.metric))]
        ds = load_split(cfg, task, args.split, args.num)
        results = evaluate_model(model, task, cfg, ds, device)
        sections.append((f"Final metrics ({args.split}, {len(ds)} samples)", metric_tables(results), []))
        samples, names, transform = split_samples(cfg, task, args.split, args.images)
        maps_png = []
        for i, batch in batches(task, samples, 8):
            maps = routing_maps(model, batch, forward=lambda m, b: task.predict(m, b, device))
            for b in range(len(next(iter(maps.values())).expert)):
                maps_png.append(plots.routing_figure(display(samples[i + b][0], transform), maps, b,
                                                     tmp / f"map_{names[i + b]}.png", names[i + b], dpi=100))
        sections.append(("Routing maps", "<p class='note'>one row per layer: experts over the image, the "
                         "expert map, routing entropy (nats)</p>", maps_png))
        got = collect_routing(model, task, cfg, ds, device)
        stats = got.stats.compute()
        clusters = cluster_routes(got.vectors, 4, image_labels=got.image_labels)
        tf = getattr(getattr(ds, "dataset", ds), "transform", None)
        figs = plots.stat_plots(stats, clusters, tmp, lambda i: display(ds[i][0], tf), class_names_from_config(cfg))
        sections.append(("Routing statistics", "<p class='note'>NMI: normalised mutual information of the expert "
                         "with the label / the grid cell; shuffled: the same with the labels permuted "
                         "(chance).</p>" + routing_table(stats), figs))
        sections.append(experts(cfg, task, model, ds, device))
        tmp_page = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        try:
            build_report(tmp_page, f"PCE run report: {run.name}", sections)
            os.replace(tmp_page, out)
        finally:
            tmp_page.unlink(missing_ok=True)
    print(f"report written to {out}")
    return 0


if __name__ == "__main__":
    _args = parse_args()
    sys.exit(run_cli(lambda: main(_args), debug=_args.debug))
