#!/usr/bin/env python
"""Draw which expert takes which patch, at every PCE layer, for some images.

    python tools/visualize_routing.py configs/fmnist_cls_pce.py --checkpoint work_dirs/fmnist_cls_pce/best.pth \\
        --split val --num 8 --out vis/routing
    python tools/visualize_routing.py configs/demo_seg_pce.py --checkpoint CKPT --images img1.jpg dir/ --out vis/

Writes ``OUT/<name>.png`` per image: all PCE layers side by side (expert colours over the image at each
layer's patch grid; below, the routing entropy in nats), with a legend of the expert colours; and
``OUT/routing_maps.json`` (input path, or ``<split>_<index>``, -> its picture). ``<name>`` is the file stem
(inputs sharing a stem get ``x``, ``x_1``, ... in input order) or ``<split>_<index>``. Images are read like
``tools/infer.py`` reads them (16-bit scaled by 65535, float images in [0, 1], ``data.max_input_size`` and the
model's smallest side enforced; a bad file stops the run with one line naming it). Existing outputs are never
overwritten without ``--force``; every file is written atomically.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pce.analysis.maps import routing_maps
from pce.analysis.plots import routing_figure
from pce.engine.errors import PCEError, run_cli
from pce.tasks.tooling import (add_force_flag, add_run_args, atomic_write, batches, check_outputs, display,
                               file_samples, list_images, load_run, output_names, split_samples, write_json)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(ap)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", nargs="+", help="image files or folders")
    src.add_argument("--split", choices=["train", "val", "test"], help="draw the first --num images of this split")
    ap.add_argument("--num", type=int, default=8, help="images of --split (default 8)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--out", required=True, help="output folder")
    add_force_flag(ap)
    return ap.parse_args(argv)


def main(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    if args.num < 1:
        raise PCEError("--num", f"{args.num}", "a positive number of images")
    if args.batch_size < 1:
        raise PCEError("--batch-size", f"{args.batch_size}", "a positive number of images")
    out = Path(args.out)
    index = out / "routing_maps.json"
    if args.images:  # fail before building the model
        files = list_images(args.images)
        check_outputs([out / f"{n}.png" for n in output_names(files)] + [index], args.force)
    cfg, task, model, _, device = load_run(args)
    if args.images:
        samples, names, transform = file_samples(cfg, task, args.images, model)
        sources = [str(f) for f in files]
    else:
        samples, names, transform = split_samples(cfg, task, args.split, args.num)
        sources = list(names)
    targets = [out / f"{n}.png" for n in names]
    check_outputs(targets + [index], args.force)
    written = {}
    for i, batch in tqdm(list(batches(task, samples, args.batch_size)), desc="routing maps", leave=False):
        maps = routing_maps(model, batch, forward=lambda m, b: task.predict(m, b, device))
        if not maps:
            raise PCEError(args.config, "the model has no PCE layer", "a config whose backbone routes")
        for b in range(len(maps[next(iter(maps))].expert)):
            image, title = display(samples[i + b][0], transform), names[i + b]
            dst = atomic_write(targets[i + b], lambda tmp, image=image, maps=maps, b=b, title=title:
                               routing_figure(image, maps, b, tmp, title=title))
            written[sources[i + b]] = str(dst)
    write_json(written, index)
    print(f"{len(written)} routing maps written to {out} (index: {index})")
    return 0


if __name__ == "__main__":
    _args = parse_args()
    sys.exit(run_cli(lambda: main(_args), debug=_args.debug))
