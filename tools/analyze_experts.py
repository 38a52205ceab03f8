#!/usr/bin/env python
"""Do the experts of a trained model differ, and does its routing matter? (issue #26)

    python tools/analyze_experts.py configs/fmnist_cls_pce.py --checkpoint work_dirs/fmnist_cls_pce/best.pth \\
        --split val --num 256 --out analysis/fmnist_experts.json

Per routed layer (pce.analysis.diversity): the pairwise cosine of the experts' flattened convolution kernels, and
every expert run on the same patches (the layer's inputs over the first --num samples of --split) with the pairwise
mean cosine and relative L2 distance of their outputs. Causal tests (pce.analysis.causal): every patch forced to
expert e (each e, with the patch's routed weight) and the routing shuffled across the patches of each batch
(seeded by --seed), each against the routed model: relative change of the model's outputs, top-1 agreement, and
the config's eval.metric scored on the same samples under the intervention (--no-metric skips it). A model whose
experts are copies shows cosines of 1 and no change: it does not route, whatever its routing maps show.

Prints the two tables; with --out writes every number as JSON (atomically; an existing file needs --force),
including "summary": the flat numbers for one row of a study.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict, List

import torch

from pce.analysis.causal import routing_intervention
from pce.analysis.runner import expert_analysis
from pce.engine.errors import PCEError, run_cli
from pce.tasks.tooling import (add_force_flag, add_run_args, check_outputs, load_run, load_split, model_inputs,
                               write_json)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(ap)
    ap.add_argument("--split", default="val", choices=["train", "val", "test"])
    ap.add_argument("--num", type=int, default=256, help="the first NUM samples of the split (default 256)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the routing shuffle")
    ap.add_argument("--no-metric", dest="metric", action="store_false",
                    help="skip scoring eval.metric under every intervention")
    ap.add_argument("--out", default=None, help="a JSON file for every number (default: print only)")
    add_force_flag(ap)
    return ap.parse_args(argv)


def _intervention(label: str) -> Dict[str, Any]:
    """The :func:`routing_intervention` arguments of a causal-table row (``None``: the routed model)."""
    if label == "shuffled":
        return {"kind": "shuffle"}
    if label.startswith("expert "):
        return {"kind": "force", "expert": int(label.split()[1])}
    return {}


def score(model: torch.nn.Module, task: Any, cfg: Any, ds: Any, device: torch.device, rows: List[Dict[str, Any]],
          seed: int) -> str:
    """Add ``eval.metric`` under each row's intervention to the rows; returns the metric's name."""
    from pce.engine.evaluation import evaluate_model

    metric = str(cfg.eval.metric)
    for row in rows:
        how = _intervention(row["intervention"])
        if not how:
            row[metric] = evaluate_model(model, task, cfg, ds, device).get(metric)
            continue
        with routing_intervention(model, how["kind"], how.get("expert", 0), seed):
            row[metric] = evaluate_model(model, task, cfg, ds, device).get(metric)
    return metric


def analyze(args: argparse.Namespace) -> Dict[str, Any]:
    from pce.engine.evaluation import build_eval_loader

    if args.num < 1:
        raise PCEError("--num", f"{args.num}", "a positive number of samples")
    if args.out:
        check_outputs([Path(args.out)], args.force)  # before the model runs
    cfg, task, model, _, device = load_run(args)
    ds = load_split(cfg, task, args.split, args.num)
    images = [model_inputs(task, b) for b in build_eval_loader(cfg, task, ds, device)]  # tensors or image lists
    result = expert_analysis(model, images, seed=args.seed)
    if not result["diversity"]:
        raise PCEError(args.config, "the model has no routed layer", "a config whose backbone routes")
    if args.metric:
        metric = score(model, task, cfg, ds, device, result["causal"], args.seed)
        values = {r["intervention"]: r[metric] for r in result["causal"] if r[metric] is not None}
        forced = [v for k, v in values.items() if k.startswith("expert ")]
        result["summary"].update({f"{metric}_routed": values.get("routed"),
                                  f"{metric}_shuffled": values.get("shuffled"),
                                  f"{metric}_forced_min": min(forced) if forced else None,
                                  f"{metric}_forced_max": max(forced) if forced else None})
    result.update(config=str(args.config), checkpoint=str(args.checkpoint), split=args.split, num_samples=len(ds),
                  num_requested=args.num, seed=args.seed)
    if args.out:
        write_json(result, args.out)
    return result


def _fmt(v: Any) -> str:
    return "-" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))


def main(args: argparse.Namespace) -> int:
    result = analyze(args)
    print(f"{'layer':<34} {'E':>3} {'w-cos min':>9} {'w-cos mean':>10} {'out-cos min':>11} {'out-cos mean':>12} "
          f"{'out-L2 mean':>11}")
    for layer, d in result["diversity"].items():
        print(f"{layer:<34} {d['num_experts']:>3} {_fmt(d.get('weight_cosine_min')):>9} "
              f"{_fmt(d.get('weight_cosine_mean')):>10} {_fmt(d.get('output_cosine_min')):>11} "
              f"{_fmt(d.get('output_cosine_mean')):>12} {_fmt(d.get('output_rel_l2_mean')):>11}")
    extra = [k for k in result["causal"][0] if k not in ("intervention", "layers", "rel_change", "top1_agreement",
                                                         "max_abs_change")]
    print(f"\n{'intervention':<12} {'layers':>6} {'rel change':>10} {'top-1 agree':>11}"
          + "".join(f" {k:>10}" for k in extra))
    for r in result["causal"]:
        print(f"{r['intervention']:<12} {r['layers']:>6} {_fmt(r['rel_change']):>10} {_fmt(r['top1_agreement']):>11}"
              + "".join(f" {_fmt(r[k]):>10}" for k in extra))
    if args.out:
        print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    _args = parse_args()
    sys.exit(run_cli(lambda: main(_args), debug=_args.debug))
