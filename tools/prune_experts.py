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

Nothing is overwritten without ``--force`` (an existing ``--out``), and the run's own ``latest.pth`` / ``best.pth``
(in the folder of ``--checkpoint``) are refused even where missing unless ``--force``: the edited checkpoint holds
no training state, so ``--resume`` could no longer continue the run. The checkpoint is written atomically. Numbers
out of their range (or NaN) are one-line errors naming the flag. The split is measured through its evaluation
transform (no augmentation, ``--split train`` included). A duplicate changes the outputs unless the router keeps
them (:func:`pce.moe.surgery.duplicate_changes_outputs`: e.g. top-1 routing without renormalisation); the tool
says so and the ``--json`` file records it under ``notes``.
"""
from __future__ import annotations

import argparse
import copy
import math
import sys
from pathlib import Path
from typing import Dict, List

import torch

from pce.engine import atomic_save
from pce.engine.errors import PCEError, run_cli
from pce.engine.evaluation import evaluate_model, evaluation_config
from pce.engine.logging import scalar_metrics
from pce.models.flops import active_params_per_token, count_flops, count_params
from pce.moe.surgery import duplicate_changes_outputs, duplicate_expert, pce_layers, prune_experts, structure
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
    ap.add_argument("--force", action="store_true", help="replace an existing --out (also the run's own "
                    "latest.pth / best.pth, which then hold no training state to --resume from)")
    return ap.parse_args(argv)


#: flag -> (lowest, highest, what it is); both ends included
RANGES = {
    "--usage-below": (0.0, 1.0, "a share of a layer's patches in [0, 1]"),
    "--entropy-above": (0.0, math.inf, "a routing entropy in nats, >= 0"),
    "--duplicate-above": (0.0, 1.0, "a usage share in [0, 1]"),
    "--jitter": (0.0, 1.0, "a relative key noise in [0, 1]"),
    "--num": (1, math.inf, "a number of samples >= 1"),
}


def check_args(args: argparse.Namespace) -> None:
    """Every numeric flag finite and in its range (``RANGES``), before anything is loaded."""
    for flag, (lo, hi, what) in RANGES.items():
        v = getattr(args, flag[2:].replace("-", "_"))
        if v is None:
            continue
        if not math.isfinite(v) or not lo <= v <= hi:
            raise PCEError(flag, f"{v!r} is out of range", what)


def check_out(args: argparse.Namespace) -> Path:
    """``--out``: never an existing file without ``--force``, never the run's own latest.pth / best.pth (the
    folder of ``--checkpoint``) without it, even where that file is missing."""
    out, src = Path(args.out), Path(args.checkpoint)
    if out.is_dir():
        raise PCEError(out, "is a folder", "the path of the new checkpoint file (.pth)")
    if args.force:
        return out
    own = out.name in ("latest.pth", "best.pth") and out.resolve().parent == src.resolve().parent
    if own:
        raise PCEError(out, f"is the run's own {out.name} (the run of --checkpoint {src})",
                       "another --out: an edited checkpoint holds no training state, so --resume of that run "
                       "would fail; --force to replace it anyway")
    if out.exists():
        raise PCEError(out, "exists", "another --out, or --force to replace it")
    return out


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
    check_args(args)
    out = check_out(args)
    cfg, task, model, ckpt, device = load_run(args)
    cfg = evaluation_config(cfg, (args.split,))  # measured as evaluated: no augmentation
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
    notes = []
    for layer, experts in plan["duplicate"].items():  # before pruning: indices refer to the original experts
        why = duplicate_changes_outputs(pce_layers(new)[layer])
        if why is not None:
            notes.append(f"{layer}: duplicating expert(s) {experts} changes the outputs: {why}")
        for e in experts:
            new = duplicate_expert(new, layer, e, jitter=args.jitter, inplace=True, warn=False)
    new = prune_experts(new, plan["remove"], inplace=True)
    after = measure(new, task, cfg, ds, device)
    check_out(args)  # again: nothing appeared there meanwhile
    atomic_save({"model": new.state_dict(), "expert_structure": structure(new), "epoch": ckpt.get("epoch"),
                 "phase": ckpt.get("phase"), "source_checkpoint": str(args.checkpoint), "plan": plan}, out)
    for name, r in (("before", before), ("after", after)):
        v = r["value"]
        print(f"{name:>6}: {r['metric']} {'-' if v is None else f'{v:.4f}'}  params {r['params'] / 1e6:.3f} M  "
              f"active/patch {r['active_params'] / 1e6:.3f} M  FLOPs {r['flops'] / 1e6:.2f} M  experts {r['experts']}")
    for note in notes:
        print(f"note: {note}")
    print(f"removed {plan['remove'] or 'none'}, duplicated {plan['duplicate'] or 'none'}; checkpoint written to {out}")
    if args.json:
        write_json({"plan": plan, "before": before, "after": after, "notes": notes}, Path(args.json))
    return 0


if __name__ == "__main__":
    _args = parse_args()
    sys.exit(run_cli(lambda: main(_args), debug=_args.debug))
