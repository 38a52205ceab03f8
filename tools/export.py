#!/usr/bin/env python
"""Export a trained model to ONNX or torch.export (.pt2), then check the file against the eager model.

    python tools/export.py configs/demo_cls_digits.py --checkpoint work_dirs/demo_cls_digits/best.pth \\
        --format onnx --dynamic-batch                     # -> work_dirs/demo_cls_digits/best.onnx (+ .json)
    python tools/export.py configs/demo_seg_pce.py --checkpoint CKPT --format torch_export --what backbone

Steps: build the model of CONFIG, load CKPT (its EMA weights when it has them) in the routing phase it was
saved in, eval(), fold batch norms into the convolutions before them (exact in eval mode; ``--no-fuse`` keeps
them), capture with ``torch.export`` (ONNX: converted from that program with the dynamo exporter), then run the
file (ONNX: ``onnx.checker`` and onnxruntime on the CPU) on held-back random inputs, other than the capture
example (two of them, plus batch sizes 1 and 5 with ``--dynamic-batch``), and compare every output with the
unfused eager model: the max abs difference per output is printed, and above ``--atol`` (times
``max(1, max |eager|)``) the tool fails and writes nothing. Inputs are what the model takes after the config's
eval transform (images in [0, 1] normalised with its mean / std; detection: the detector's own preprocessing).

Written: ``--out`` (default: next to the checkpoint, ``<checkpoint stem>[_backbone].onnx|.pt2``) and
``<out>.json`` (input name / shape, mean / std, output names, max diffs, versions). An existing file is never
overwritten without ``--force``. ``--random-weights`` (instead of ``--checkpoint``, with ``--out``) exports an
untrained model, to check that a config exports before training it.

Routing stays input-dependent in the file: under capture, PCE layers run the static-shape ``capacity``
execution (equal to ``sparse`` when no token overflows); ``execution="context"`` runs its static form (every
expert on the whole map, each pixel kept from its patch's expert: exact, E x the cost). A context layer whose
router gives a patch several experts (top-k > 1) cannot run anywhere and is refused with the config key. Faster R-CNN as a whole stops in torchvision (data-dependent NMS shapes):
``--what model`` then exports the backbone + FPN (``model.backbone``: preprocessed batch -> FPN maps), and says so.
TorchScript (``torch.jit.script``) is not supported.

The task decides what is exported and how its inputs are made (``task.export_target``, built by
``pce.tasks.export_targets``); capturing, writing and checking the file: ``pce.tasks.export_check``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from pce.engine import load_config
from pce.engine.evaluation import check_checkpoint_file, load_trained_weights
from pce.engine.errors import PCEError, add_debug_flag, run_cli
from pce.models.fuse import capture_blockers
from pce.tasks import get_task
from pce.tasks.export_check import SUFFIX, export_and_check, held_back_inputs, versions

EXECUTION_KEY = "model.backbone_overrides.execution"


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="a .pth written by tools/train.py (best.pth, latest.pth)")
    src.add_argument("--random-weights", action="store_true", help="no checkpoint: an untrained model (needs --out)")
    ap.add_argument("--format", required=True, choices=sorted(SUFFIX))
    ap.add_argument("--what", default="model", choices=["model", "backbone"])
    ap.add_argument("--input-size", nargs=2, type=int, metavar=("H", "W"), help="default: model.input_shape")
    ap.add_argument("--batch-size", type=int, default=2, help="of the capture example (default 2)")
    ap.add_argument("--dynamic-batch", action="store_true", help="export with a dynamic batch dimension")
    ap.add_argument("--out", help="the file to write (default: next to the checkpoint)")
    ap.add_argument("--force", action="store_true", help="overwrite an existing --out file")
    ap.add_argument("--no-fuse", action="store_true", help="keep the batch norms (no folding)")
    ap.add_argument("--atol", type=float, default=1e-4, help="largest max |exported - eager| per output, times "
                                                               "max(1, max |eager|) (default 1e-4)")
    ap.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE")
    add_debug_flag(ap)
    return ap.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    return run_cli(lambda: run(args), debug=args.debug)


def output_paths(args: argparse.Namespace) -> Tuple[Path, Path]:
    """``(file, sidecar)``; ``PCEError`` when one exists (without ``--force``) or none can be derived."""
    if args.out:
        out = Path(args.out)
    elif args.checkpoint:
        ckpt = Path(args.checkpoint)
        out = ckpt.with_name(ckpt.stem + ("_backbone" if args.what == "backbone" else "") + SUFFIX[args.format])
    else:
        raise PCEError("--out", "missing", "--random-weights writes no file next to a checkpoint: name one")
    sidecar = out.with_name(out.name + ".json")
    for p in (out, sidecar):
        if p.exists() and not args.force:
            raise PCEError(p, "exists", "pass --force to overwrite it, or another --out")
    return out, sidecar


def load_model(cfg: Any, task: Any, args: argparse.Namespace) -> nn.Module:
    """The config's model with the checkpoint's weights in its routing phase (as tools/eval.py), eval mode;
    ``PCEError`` naming the config key when a layer's execution cannot be captured."""
    if args.checkpoint:
        check_checkpoint_file(args.checkpoint)  # before the model is built
    model = task.build_model(cfg)
    blockers = capture_blockers(model)
    if blockers:
        execs = sorted({getattr(m, "execution", "?") for n, m in model.named_modules()
                        if n in {b[0] for b in blockers}})
        raise PCEError(EXECUTION_KEY, f"execution={execs[0]!r} ({len(blockers)} layers, e.g. {blockers[0][0]}) "
                       f"cannot be exported: {blockers[0][1]}",
                       "one expert per patch with context execution (top_k=1), or an execution that captures: "
                       "capacity, sparse, auto, dense, fused or map")
    if args.checkpoint:
        load_trained_weights(model, cfg, args.checkpoint)  # pruned structure, EMA weights, the saved phase
    else:
        print("warning: --random-weights: the exported model is untrained")
    return model.eval()


def run(args: argparse.Namespace) -> int:
    out, sidecar = output_paths(args)
    cfg = load_config(args.config, args.cfg_options)
    task = get_task(cfg.task)
    model = load_model(cfg, task, args)
    size = tuple(args.input_size) if args.input_size else tuple(int(v) for v in cfg.model.input_shape[1:])
    module, make_input, info = task.export_target(model, cfg, args.what, size)
    if args.dynamic_batch and not isinstance(make_input(1, 0), torch.Tensor):
        raise PCEError("--dynamic-batch", f"{info['exported']} takes a list of images", "leave it out")
    example, checks = held_back_inputs(make_input, args.batch_size, args.dynamic_batch)
    result = export_and_check(module, example, checks, args.format, out, args.what, info["exported"],
                              fuse=not args.no_fuse, dynamic_batch=args.dynamic_batch, atol=args.atol)
    sidecar.write_text(json.dumps(sidecar_meta(args, out, info, result), indent=1))
    print(f"wrote {out} and {sidecar}")
    return 0


def sidecar_meta(args: argparse.Namespace, out: Path, info: Dict[str, Any], result: Dict[str, Any]
                 ) -> Dict[str, Any]:
    """The ``<out>.json`` written next to the file: its source, the target's ``info`` and the check's ``result``."""
    return {"format": args.format, "file": out.name, "config": str(args.config), "checkpoint": args.checkpoint,
            "weights": "checkpoint" if args.checkpoint else "random", "what": args.what, **info,
            "input_name": "images", "input_shape": result["input_shape"], "dynamic_batch": args.dynamic_batch,
            "output_names": result["output_names"], "max_abs_diff": result["max_abs_diff"],
            "max_abs_eager": result["max_abs_eager"], "atol": args.atol, "bn_folded": not args.no_fuse,
            "routing_under_capture": "capacity execution (equal to sparse when no token overflows); context layers: "
                                 "every expert on the map, each pixel from its patch's expert (exact)",
            "versions": versions(args.format)}


if __name__ == "__main__":
    sys.exit(main())
