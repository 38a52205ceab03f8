#!/usr/bin/env python
"""Write pictures of a config's dataset samples with their annotations, after the configured transforms
(so the training split shows the augmentations), to check data and transforms by eye.

    python tools/browse_dataset.py configs/demo_det_pce.py --out vis/train --num 8
    python tools/browse_dataset.py configs/demo_seg_pce.py --split val --out vis/val --alpha 0.6

Detection: ground-truth boxes with class names; segmentation: the mask as a colour overlay (VOC palette;
void 255 in cream); classification: the class name. Writes ``OUT/<split>_<index>.png``, atomically; existing
pictures are never overwritten without ``--force``. Errors are one line naming the file or key (``--debug``: the
traceback).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pce.engine import load_config
from pce.engine.errors import PCEError, add_debug_flag, run_cli
from pce.tasks import get_task
from pce.tasks.tooling import add_force_flag, check_fraction, check_outputs
from pce.tasks.visualize import class_names_from_config, display_image, save_png


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--num", type=int, default=8, help="number of samples (from the start, or --start)")
    ap.add_argument("--start", type=int, default=0, help="index of the first sample")
    ap.add_argument("--split", default="train", choices=["train", "val", "test"])
    ap.add_argument("--alpha", type=float, default=0.5, help="segmentation: overlay opacity, in [0, 1]")
    ap.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE")
    add_force_flag(ap)
    add_debug_flag(ap)
    args = ap.parse_args(argv)
    return run_cli(lambda: _run(args), debug=args.debug)


def _run(args: argparse.Namespace) -> int:
    alpha = check_fraction("--alpha", args.alpha)
    if args.num < 0:
        raise PCEError("--num", f"{args.num}", "a number of samples >= 0")
    if args.start < 0:
        raise PCEError("--start", f"{args.start}", "a sample index >= 0")
    cfg = load_config(args.config, args.cfg_options)
    task = get_task(cfg.task)
    datasets = task.build_datasets(cfg, splits=(args.split,))
    if args.split not in datasets:
        raise PCEError(f"data.{args.split}", "the config defines no such dataset", "a configured split")
    ds = datasets[args.split]
    names = getattr(ds, "classes", None) or class_names_from_config(cfg)
    transform = getattr(ds, "transforms", None) or getattr(ds, "transform", None)
    out_dir = Path(args.out)
    end = min(len(ds), args.start + args.num)
    targets = {i: out_dir / f"{args.split}_{i:05d}.png" for i in range(args.start, end)}
    check_outputs(targets.values(), args.force)
    for i, dst in targets.items():
        image, target = ds[i]
        picture = task.render(display_image(image, transform), target, names, score_thr=0.0, alpha=alpha)
        print(save_png(picture, dst))
    print(f"{len(targets)} sample(s) of data.{args.split} ({len(ds)} in all) written to {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
