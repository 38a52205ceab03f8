#!/usr/bin/env python
"""Remove rarely used (or undecided) experts, or reinforce overloaded ones, and evaluate the result.

    python tools/prune_experts.py configs/fmnist_cls_pce.py --checkpoint work_dirs/fmnist_cls_pce/best.pth \\
        --usage-below 0.05 --out work_dirs/fmnist_cls_pce/pruned.pth
    python tools/prune_experts.py CONFIG --checkpoint CKPT --remove backbone.stages.2.layers.0:1,3 --out NEW.pth
    python tools/prune_experts.py CONFIG --checkpoint CKPT --duplicate-above 0.5 --out NEW.pth

Expert usage (share of a layer's patches) and the mean routing entropy of each expert's patches are measured
on ``--split`` (``--num`` samples); experts with usage below ``--usage-below`` or entropy above
``--entropy-above`` are removed (a layer keeps at least its most used expert), experts whose usage share is
above ``--duplicate-above`` are duplicated (:func:`pce.moe.surgery.duplicate_expert`). The new checkpoint records
the edits (``expert_structure``), so the analysis tools load it with the original config. Prints the task
metric, parameters, active parameters per patch and FLOPs before and after; ``--json`` writes them.
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Dict, List

import torch

from pce.engine import atomic_save
from pce.engine.errors import PCEError, run_cli
from pce.engine.evaluation import evaluate_model
from pce.engine.logging import scalar_metrics
from pce.models.flops import active_params_per_token, count_flops, count_params
from pce.moe.surgery import duplicate_expert, pce_layers, prune_experts, structure
from pce.tasks.routing_runs import collect_routing
from pce.tasks.tooling import add_run_args, load_run, load_split, write_json


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(ap)
    ap.add_argument("--out", required=True, help="the new checkpoint (.pth)")
    ap.add_argument("--split", default="val", choices=["train", "val", "test"], help="measure usage and evaluate here")
    ap.add_argument("--num", type=int, default=None, help="only the first NUM samples of the split")
    ap.add_argument("--usage-below", type=float, default=None, help="remove experts with usage below this")
    ap.add_argument("--entropy-above", type=float, default=None, help="remove experts whose patches' routing "
                    "entropy (nats) is above this")
    ap.add_argument("--remove", nargs="+", default=[], metavar="LAYER:I,J", help="remove these experts")
    ap.add_argument("--duplicate-above", type=float, default=None, help="duplicate experts with usage share above this")
    ap.add_argument("--jitter", type=float, default=0.01, help="relative noise on a duplicate's key (load split)")
    ap.add_argument("--json", help="write the before / after numbers here")
    return ap.parse_args(argv)


def parse_remove(items: List[str], layers) -> Dict[str, List[int]]:
    out: Dict[str, List[int]] = {}
    for item in items:
        name, sep, idx = item.rpartition(":")
        try:
            experts = [int(i) for i in idx.split(",") if i.strip()]
        except ValueError:
            experts = []
        if not sep or name not in layers or not experts:
            raise PCEError(f"--remove {item}", "not LAYER:I,J with a PCE layer name",
                           f"one of {', '.join(layers)} followed by expert indices")
        out.setdefault(name, []).extend(experts)
    return out


def choose(stats: dict, args: argparse.Namespace) -> Dict[str, Dict[str, List[int]]]:
    """``{"remove": {layer: [experts]}, "duplicate": {layer: [experts]}}`` from the measured statistics."""
    remove: Dict[str, List[int]] = {}
    dup: Dict[str, List[int]] = {}
    for layer, s in stats.items():
        E = s["num_experts"]
        bad = {e for e in range(E) if args.usage_below is not None and s["usage"][e] < args.usage_below}
        bad |= {e for e in range(E) if args.entropy_above is not None and s["expert_entropy"][e] > args.entropy_above}
        bad.discard(max(range(E), key=lambda e: s["usage"][e]))  # keep the most used expert
        if bad:
            remove[layer] = sorted(bad)
        if args.duplicate_above is not None:
            hot = [e for e in range(E) if s["usage_share"][e] > args.duplicate_above and e not in bad]
            if hot:
                dup[layer] = hot
    return {"remove": remove, "duplicate": dup}


def measure(model, task, cfg, ds, device) -> dict:
    metrics = scalar_metrics(evaluate_model(model, task, cfg, ds, device))
    inputs = (tuple(task.dummy_inputs(cfg, 1)) if hasattr(task, "dummy_inputs")
              else (torch.randn(1, *cfg.model.input_shape),))
    torch.manual_seed(0)
    inputs = tuple(torch.rand_like(x).to(device) if x.is_floating_point() else x.to(device) for x in inputs)
    flops = count_flops(model.eval(), inputs)["total"]
    return {"metric": cfg.eval.metric, "value": metrics.get(cfg.eval.metric), "metrics": metrics,
            "params": count_params(model), "active_params": active_params_per_token(model), "flops": flops,
            "experts": {n: int(m.num_experts) for n, m in pce_layers(model).items()}}


def main(args: argparse.Namespace) -> int:
    cfg, task, model, ckpt, device = load_run(args)
    ds = load_split(cfg, task, args.split, args.num)
    plan = {"remove": parse_remove(args.remove, pce_layers(model)), "duplicate": {}}
    if args.usage_below is not None or args.entropy_above is not None or args.duplicate_above is not None:
        picked = choose(collect_routing(model, task, cfg, ds, device).stats.compute(), args)
        for layer, experts in picked["remove"].items():
            plan["remove"][layer] = sorted(set(plan["remove"].get(layer, [])) | set(experts))
        plan["duplicate"] = picked["duplicate"]
    if not plan["remove"] and not plan["duplicate"]:
        raise PCEError("--usage-below / --entropy-above / --remove / --duplicate-above", "no expert selected",
                       "a threshold some expert passes, or explicit --remove LAYER:I")
    before = measure(model, task, cfg, ds, device)
    new = copy.deepcopy(model)
    for layer, experts in plan["duplicate"].items():  # before pruning: indices refer to the original experts
        for e in experts:
            new = duplicate_expert(new, layer, e, jitter=args.jitter, inplace=True)
    new = prune_experts(new, plan["remove"], inplace=True)
    after = measure(new, task, cfg, ds, device)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_save({"model": new.state_dict(), "expert_structure": structure(new), "epoch": ckpt.get("epoch"),
                 "phase": ckpt.get("phase"), "source_checkpoint": str(args.checkpoint), "plan": plan}, out)
    for name, r in (("before", before), ("after", after)):
        v = r["value"]
        print(f"{name:>6}: {r['metric']} {'-' if v is None else f'{v:.4f}'}  params {r['params'] / 1e6:.3f} M  "
              f"active/patch {r['active_params'] / 1e6:.3f} M  FLOPs {r['flops'] / 1e6:.2f} M  experts {r['experts']}")
    print(f"removed {plan['remove'] or 'none'}, duplicated {plan['duplicate'] or 'none'}; checkpoint written to {out}")
    if args.json:
        write_json({"plan": plan, "before": before, "after": after}, Path(args.json))
    return 0


if __name__ == "__main__":
    _args = parse_args()
    sys.exit(run_cli(lambda: main(_args), debug=_args.debug))
