#!/usr/bin/env python
"""Draw which expert takes which patch, at every PCE layer, for some images.

    python tools/visualize_routing.py configs/fmnist_cls_pce.py --checkpoint work_dirs/fmnist_cls_pce/best.pth \\
        --split val --num 8 --out vis/routing
    python tools/visualize_routing.py configs/demo_seg_pce.py --checkpoint CKPT --images img1.jpg dir/ --out vis/

Writes ``OUT/<name>.png`` per image (:func:`pce.analysis.plots.routing_figure`): one row per PCE layer, the
expert of every patch over the image at full resolution (patch borders, expert index per patch), the expert map
alone (colour-blind-safe Okabe-Ito colours, ``tab20`` with hatches beyond 8 experts), the routing entropy in
nats, and a legend of the experts present with their share of the patches; the title names the image's true
class(es) (``--split``) and the predicted one(s). ``--dpi`` (default 200); ``--format pdf`` / ``svg`` writes
vector figures instead of PNG. Also
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
from typing import Any, List, Optional, Sequence, Tuple

import torch

from pce.analysis.maps import routing_maps
from pce.analysis.plots import routing_figure
from pce.engine.errors import PCEError, run_cli
from pce.tasks.visualize import class_names_from_config
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
    ap.add_argument("--dpi", type=int, default=200, help="figure resolution (default 200)")
    ap.add_argument("--format", choices=["png", "pdf", "svg"], default="png", help="figure format (default png)")
    add_force_flag(ap)
    return ap.parse_args(argv)


def _name(i: int, names: Optional[Sequence[str]]) -> str:
    return names[i] if names and 0 <= i < len(names) else str(i)


def class_captions(output: Any, target: Any, class_names: Optional[Sequence[str]], truth: bool, task: Any,
                   ignore_index: int = 255,
                   map_names: Optional[Sequence[str]] = None) -> Tuple[Optional[str], Optional[str]]:
    """``(true, predicted)`` class names of one image for its title: the top class (and probability) of logits
    ``[K]``, the classes of a label map ``[H, W]`` (most pixels first, at most 4) or of detections; the true
    ones from an image label, a mask or a target's ``labels`` (``truth`` False: a user's image, no label).
    Detection labels count from 1 (0 is the background), their names from ``class_names[0]``; label-map ids name
    ``map_names[id]`` (default ``class_names``: see :func:`label_map_names`)."""
    map_names = map_names if map_names is not None else class_names
    s = task.summarize(output, class_names)
    if "top5" in s:
        pred = f"{s['top5'][0]['name']} ({s['top5'][0]['prob']:.2f})"
    elif "class_pixels" in s:
        pred = ", ".join(_name(i, map_names) for i, _ in sorted(s["class_pixels"].items(), key=lambda x: -x[1])[:4])
    else:
        pred = ", ".join(dict.fromkeys(s.get("names", []))) or "nothing"
    if not truth:
        return None, pred
    if isinstance(target, dict):
        true = ", ".join(dict.fromkeys(_name(int(c) - 1, class_names) for c in target.get("labels", []))) or "none"
    elif torch.as_tensor(target).dim() >= 2:
        ids, counts = torch.unique(torch.as_tensor(target), return_counts=True)
        kept = [int(i) for i, _ in sorted(zip(ids.tolist(), counts.tolist()), key=lambda x: -x[1]) if i != ignore_index]
        true = ", ".join(_name(i, map_names) for i in kept[:4])
    else:
        true = _name(int(target), class_names)
    return true, pred


def label_map_names(cfg: Any, names: Optional[List[str]]) -> Optional[List[str]]:
    """The names of label-map ids: ``background`` first when the data names one class fewer than the model
    (id 0 is the background), else the names as they are."""
    k = int(getattr(cfg.model, "num_classes", 0) or 0)
    return ["background"] + names if names and len(names) == k - 1 else names


def main(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    if args.num < 1:
        raise PCEError("--num", f"{args.num}", "a positive number of images")
    if args.dpi < 50:
        raise PCEError("--dpi", f"{args.dpi}", "at least 50 dots per inch; 150 or more for a paper")
    if args.batch_size < 1:
        raise PCEError("--batch-size", f"{args.batch_size}", "a positive number of images")
    out = Path(args.out)
    index = out / "routing_maps.json"
    if args.images:  # fail before building the model
        files = list_images(args.images)
        check_outputs([out / f"{n}.{args.format}" for n in output_names(files)] + [index], args.force)
    cfg, task, model, _, device = load_run(args)
    if args.images:
        samples, names, transform = file_samples(cfg, task, args.images, model)
        sources = [str(f) for f in files]
    else:
        samples, names, transform = split_samples(cfg, task, args.split, args.num)
        sources = list(names)
    targets = [out / f"{n}.{args.format}" for n in names]
    check_outputs(targets + [index], args.force)
    written = {}
    class_names = class_names_from_config(cfg)
    map_names = label_map_names(cfg, class_names)
    for i, batch in tqdm(list(batches(task, samples, args.batch_size)), desc="routing maps", leave=False):
        got: list = []
        maps = routing_maps(model, batch, forward=lambda m, b, got=got: got.append(task.predict(m, b, device)))
        if not maps:
            raise PCEError(args.config, "the model has no PCE layer", "a config whose backbone routes")
        outputs, truths = got[0]
        for b in range(len(maps[next(iter(maps))].expert)):
            image, title = display(samples[i + b][0], transform), names[i + b]
            true, pred = class_captions(outputs[b], truths[b], class_names, not args.images, task,
                                        map_names=map_names)
            dst = atomic_write(targets[i + b], lambda tmp, image=image, maps=maps, b=b, title=title, t=true, p=pred:
                               routing_figure(image, maps, b, tmp, title=title, true_label=t, predicted=p,
                                              dpi=args.dpi))
            written[sources[i + b]] = str(dst)
    write_json(written, index)
    print(f"{len(written)} routing maps written to {out} (index: {index})")
    return 0


if __name__ == "__main__":
    _args = parse_args()
    sys.exit(run_cli(lambda: main(_args), debug=_args.debug))
