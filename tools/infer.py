#!/usr/bin/env python
"""Run a trained model on image files and write pictures of its predictions.

    python tools/infer.py configs/demo_det_pce.py --checkpoint work_dirs/demo_det_pce/best.pth \\
        data/demo_voc/VOCdevkit/VOC2007/JPEGImages/000001.jpg --out vis/ --score-thr 0.5

IMAGES are files or folders (their .jpg / .jpeg / .png / .bmp / .tif / .tiff files). Each image goes through the
config's evaluation transform (data.test, else data.val, else data.train with train=False) and the task's
``predict``; the prediction is brought back to the image's own coordinates (``task.to_input_frame``: boxes
scaled, label maps resized) and drawn on the original image:

* detection: boxes with "class score" captions (scores >= --score-thr);
* segmentation: the predicted classes as a colour overlay (VOC palette, --alpha);
* classification: the top-1 class and its probability.

Writes ``OUT/<name>.png`` per image, ``OUT/predictions.json`` (per input path: the picture, ``image_size`` and
``model_input_size`` as ``[height, width]``, and the boxes / labels / scores, the class histogram of the mask, or
the top-5 classes) and ``OUT/skipped.json`` (path -> reason, ``{}`` when none). ``<name>`` is the file stem;
inputs sharing a stem (``a/x.png``, ``b/x.png``) get ``x``, ``x_1``, ... in input order. Existing outputs are
never overwritten without ``--force``; every file is written atomically. The model runs in the routing phase its
checkpoint was saved in. What is drawn and listed, the smallest image side and the resizing are the task's
(``task.render``, ``task.summarize``, ``task.min_input_side``, ``task.prepare_image``). An unreadable image, one
with pixel values outside its format's range (a float image outside [0, 1], NaN pixels), one larger than
``data.max_input_size`` (longest side) or smaller than the model's largest stride, is reported on stderr and
skipped; the exit status is 1 when no image could be used. Classification images are resized to
``model.input_shape``. 16-bit images are scaled by 65535.

A thin user of the Python API, :class:`pce.tasks.Predictor` (loading, the transform, ``predict``, the input
frame, the summary and the picture are all its); this file adds the files, the outputs and the skipping.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict

from pce.engine.errors import PCEError, one_line, run_cli
from pce.tasks import Predictor
from pce.tasks.tooling import (add_force_flag, add_run_args, check_fraction, check_outputs, list_images,
                               load_image, output_names, write_json)
from pce.tasks.visualize import save_png

__all__ = ["main", "load_image"]  # load_image: the image reader infer uses, for callers of this module


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(ap)
    ap.add_argument("images", nargs="+", help="image files or folders")
    ap.add_argument("--out", required=True, help="output folder for the PNGs and predictions.json")
    ap.add_argument("--score-thr", type=float, default=0.5, help="detection: smallest score drawn / listed, in [0, 1]")
    ap.add_argument("--alpha", type=float, default=0.5, help="segmentation: overlay opacity, in [0, 1]")
    add_force_flag(ap)
    args = ap.parse_args(argv)
    return run_cli(lambda: _run(args), debug=args.debug)


def _run(args: argparse.Namespace) -> int:
    score_thr, alpha = check_fraction("--score-thr", args.score_thr), check_fraction("--alpha", args.alpha)
    paths = list_images(args.images)  # fail before building the model
    out_dir = Path(args.out)
    pictures = [out_dir / f"{name}.png" for name in output_names(paths)]
    check_outputs(pictures + [out_dir / "predictions.json", out_dir / "skipped.json"], args.force)
    predictor = Predictor.from_checkpoint(args.config, args.checkpoint, device=args.device,
                                          cfg_options=args.cfg_options, score_thr=score_thr)
    results: Dict[str, Any] = {}
    skipped: Dict[str, str] = {}
    for path, picture_path in zip(paths, pictures):
        try:
            res = predictor(path)
        except (PCEError, ValueError, OSError, RuntimeError) as e:
            msg = one_line(e)
            skipped[str(path)] = msg
            print(f"error: {msg if str(path) in msg else f'{path}: {msg}'} (skipped)", file=sys.stderr)
            continue
        dst = save_png(res.render(alpha=alpha), picture_path)
        results[str(path)] = {"output": str(dst), "image_size": list(res.image_size),
                              "model_input_size": list(res.model_input_size), **res.summary}
        print(f"{path} -> {dst}")
    write_json(skipped, out_dir / "skipped.json")
    write_json(results, out_dir / "predictions.json")
    print(f"{len(paths) - len(skipped)} image(s), {len(skipped)} skipped; predictions in "
          f"{out_dir / 'predictions.json'}")
    return 0 if len(skipped) < len(paths) else 1


if __name__ == "__main__":
    sys.exit(main())
