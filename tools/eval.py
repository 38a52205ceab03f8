#!/usr/bin/env python
"""Evaluate a checkpoint on the test split (the val split when the config has no test split).

    python tools/eval.py configs/demo_cls_digits.py --checkpoint work_dirs/demo_cls_digits/best.pth --out metrics.json

Classification writes top1 / top5 (fractions), per_class_acc, mean_class_acc, confusion_matrix and num_samples.
Whole-slide configs (Camelyon): ``data.test`` is the test slides, scored on all their tissue tiles, and is used by
this tool (and tools/infer_slide.py) only: training chooses best.pth on ``data.val``, a holdout of the training
slides (``--split val`` scores it, on its fixed tile subset); the tile resolution (``level`` or ``mpp``) and
``tile_size`` are reported with the metrics.
Every split, ``--split train`` included, is scored through its evaluation transform (no augmentation); ``--out``
is written atomically.
Works under torchrun too (each rank evaluates a shard; rank 0 writes). ``runtime.num_threads`` (> 0) sets the
torch CPU threads. A work dir's ``config.json`` (written by tools/train.py) is a valid config here: it holds the
run's schedule and phases as trained.
"""
from __future__ import annotations

import argparse
import sys

import torch

from pce.engine import cleanup_distributed, evaluate_checkpoint, init_distributed, is_main_process, load_config
from pce.engine.errors import add_debug_flag, run_cli
from pce.tasks import get_task
from pce.tasks.tooling import write_json


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config")
    ap.add_argument("--checkpoint", required=True, help="a .pth written by tools/train.py (best.pth, latest.pth)")
    ap.add_argument("--split", default="test", choices=["test", "val", "train"])
    ap.add_argument("--out", help="write the metrics as JSON here (NaN -> null)")
    ap.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE")
    add_debug_flag(ap)
    args = ap.parse_args(argv)
    return run_cli(lambda: _run(args), debug=args.debug)


def _run(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config, args.cfg_options)
        if cfg.runtime.num_threads > 0:  # as tools/train.py (the Trainer) and tools/infer.py apply it
            torch.set_num_threads(cfg.runtime.num_threads)
        init_distributed(device=cfg.runtime.device)
        # the routing phase the checkpoint was saved in; non-finite weights are refused
        results = evaluate_checkpoint(cfg, get_task(cfg.task), args.checkpoint, split=args.split)
        tiles = cfg.data[results.get("split", args.split)].kwargs  # whole-slide tiles: at which resolution and size
        results.update({k: tiles[k] for k in ("level", "mpp", "tile_size") if tiles.get(k) is not None})
        main_process = is_main_process()  # before the process group goes away
    finally:
        cleanup_distributed()
    if not main_process:
        return 0
    for k, v in results.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            print(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}")
    if args.out:
        out = write_json(results, args.out)  # atomic; non-finite numbers as null
        print(f"metrics written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
