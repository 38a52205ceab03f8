#!/usr/bin/env python
"""Write pictures of a config's dataset samples with their annotations, after the configured transforms
(so the training split shows the augmentations), to check data and transforms by eye.

    python tools/browse_dataset.py configs/demo_det_pce.py --out vis/train --num 8
    python tools/browse_dataset.py configs/demo_seg_pce.py --split val --out vis/val --alpha 0.6

Detection: ground-truth boxes with class names; segmentation: the mask as a colour overlay (VOC palette;
void 255 in cream); classification: the class name. Writes ``OUT/<split>_<index>.png``.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pce.engine import ConfigError, load_config
from pce.tasks import get_task
from pce.tasks.visualize import class_names_from_config, display_image, save_png


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--num", type=int, default=8, help="number of samples (from the start, or --start)")
    ap.add_argument("--start", type=int, default=0, help="index of the first sample")
    ap.add_argument("--split", default="train", choices=["train", "val", "test"])
    ap.add_argument("--alpha", type=float, default=0.5, help="segmentation: overlay opacity")
    ap.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.cfg_options)
        task = get_task(cfg.task)
        datasets = task.build_datasets(cfg, splits=(args.split,))
        if args.split not in datasets:
            raise ValueError(f"the config defines no data.{args.split} dataset")
    except (ConfigError, FileNotFoundError, RuntimeError, ValueError, KeyError) as e:
        print(f"error: {e.args[0] if isinstance(e, KeyError) and e.args else e}", file=sys.stderr)
        return 1
    ds = datasets[args.split]
    names = getattr(ds, "classes", None) or class_names_from_config(cfg)
    transform = getattr(ds, "transforms", None) or getattr(ds, "transform", None)
    out_dir = Path(args.out)
    end = min(len(ds), args.start + max(args.num, 0))
    for i in range(args.start, end):
        image, target = ds[i]
        picture = task.render(display_image(image, transform), target, names, score_thr=0.0, alpha=args.alpha)
        dst = save_png(picture, out_dir / f"{args.split}_{i:05d}.png")
        print(dst)
    print(f"{max(end - args.start, 0)} sample(s) of data.{args.split} ({len(ds)} in all) written to {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
