#!/usr/bin/env python
"""Generate the procedural VOC-format demo dataset.

Usage (from the repo root, package installed)::

    python tools/make_demo_data.py --root data/demo_voc --num-train 400 --num-val 100 --image-size 128

Errors are one line naming the file or flag (``--debug``: the traceback); a folder holding other files than the
generator's own is never deleted (see ``pce.datasets.demo_voc``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from pce.datasets.demo_voc import DEMO_CLASSES, make_demo_voc
from pce.engine.errors import PCEError, add_debug_flag, run_cli


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Write a small procedural dataset in PASCAL VOC2007 format.")
    ap.add_argument("--root", default="data/demo_voc", help="output folder (VOCdevkit/VOC2007 is created inside)")
    ap.add_argument("--num-train", type=int, default=400)
    ap.add_argument("--num-val", type=int, default=100)
    ap.add_argument("--num-test", type=int, default=0, help="extra test images (0: test.txt lists the val images)")
    ap.add_argument("--image-size", type=int, nargs="+", default=[128],
                    help="square side, or two numbers LO HI for random height/width per image")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--overwrite", action="store_true", help="regenerate even if a complete dataset exists")
    add_debug_flag(ap)
    args = ap.parse_args(argv)
    return run_cli(lambda: _run(args), debug=args.debug)


def _run(args: argparse.Namespace) -> int:
    if len(args.image_size) not in (1, 2):
        raise PCEError("--image-size", " ".join(map(str, args.image_size)), "one value (square) or two (LO HI)")
    if min(args.image_size) < 1:
        raise PCEError("--image-size", " ".join(map(str, args.image_size)), "positive pixel sizes")
    for flag, value in (("--num-train", args.num_train), ("--num-val", args.num_val), ("--num-test", args.num_test)):
        if value < 0:
            raise PCEError(flag, str(value), "a number of images >= 0")
    root = Path(args.root)
    if root.exists() and not root.is_dir():
        raise PCEError(root, "is a file, not a folder", "a folder for the dataset (created when missing)")
    size = args.image_size[0] if len(args.image_size) == 1 else tuple(args.image_size)

    t0 = time.time()
    root = make_demo_voc(args.root, num_train=args.num_train, num_val=args.num_val, image_size=size,
                         seed=args.seed, overwrite=args.overwrite, num_test=args.num_test)
    voc = Path(root) / "VOCdevkit" / "VOC2007"
    counts = json.loads((voc / ".complete").read_text())["counts"]
    print(f"demo VOC dataset: {root}  (pass this as root; data in {voc})")
    print(f"classes: {', '.join(DEMO_CLASSES)}")
    print("counts: " + ", ".join(f"{k}={v}" for k, v in sorted(counts.items())))
    print(f"done in {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
