#!/usr/bin/env python
"""Draw which expert takes which patch, at every PCE layer, for some images.

    python tools/visualize_routing.py configs/fmnist_cls_pce.py --checkpoint work_dirs/fmnist_cls_pce/best.pth \\
        --split val --num 8 --out vis/routing
    python tools/visualize_routing.py configs/demo_seg_pce.py --checkpoint CKPT --images img1.jpg dir/ --out vis/

Writes ``OUT/<image>.png`` per image: all PCE layers side by side (expert colours over the image at each
layer's patch grid; below, the routing entropy in nats), with a legend of the expert colours.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pce.analysis.maps import routing_maps
from pce.analysis.plots import routing_figure
from pce.engine.errors import PCEError, run_cli
from pce.tasks.tooling import add_run_args, batches, display, file_samples, load_run, split_samples


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(ap)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", nargs="+", help="image files or folders")
    src.add_argument("--split", choices=["train", "val", "test"], help="draw the first --num images of this split")
    ap.add_argument("--num", type=int, default=8, help="images of --split (default 8)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--out", required=True, help="output folder")
    return ap.parse_args(argv)


def main(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    if args.num < 1:
        raise PCEError("--num", f"{args.num}", "a positive number of images")
    cfg, task, model, _, device = load_run(args)
    samples, names, transform = (file_samples(cfg, task, args.images) if args.images
                                 else split_samples(cfg, task, args.split, args.num))
    out = Path(args.out)
    written = []
    for i, batch in tqdm(list(batches(task, samples, args.batch_size)), desc="routing maps", leave=False):
        maps = routing_maps(model, batch, forward=lambda m, b: task.predict(m, b, device))
        if not maps:
            raise PCEError(args.config, "the model has no PCE layer", "a config whose backbone routes")
        for b in range(len(maps[next(iter(maps))].expert)):
            image = display(samples[i + b][0], transform)
            written.append(routing_figure(image, maps, b, out / f"{names[i + b]}.png", title=names[i + b]))
    print(f"{len(written)} routing maps written to {out}")
    return 0


if __name__ == "__main__":
    _args = parse_args()
    sys.exit(run_cli(lambda: main(_args), debug=_args.debug))
