#!/usr/bin/env python
"""Run a trained model on image files and write pictures of its predictions.

    python tools/infer.py configs/demo_det_pce.py --checkpoint work_dirs/demo_det_pce/best.pth \\
        data/demo_voc/VOCdevkit/VOC2007/JPEGImages/000001.jpg --out vis/ --score-thr 0.5

IMAGES are files or folders (their .jpg / .jpeg / .png / .bmp files). Each image goes through the config's
evaluation transform (data.test, else data.val, else data.train with train=False) and the task's ``predict``;
the picture shows it as the model saw it (resized for detection):

* detection: boxes with "class score" captions (scores >= --score-thr);
* segmentation: the predicted classes as a colour overlay (VOC palette, --alpha);
* classification: the top-1 class and its probability.

Writes ``OUT/<image stem>.png`` per image and ``OUT/predictions.json`` (boxes / labels / scores, the class
histogram of the mask, or the top-5 classes). The model runs in the routing phase its checkpoint was saved in.
An unreadable image, or one larger than ``data.max_input_size`` (longest side) or smaller than the model's
largest stride, is reported on stderr and skipped (``OUT/skipped.json``: path -> reason); the exit
status is 1 when no image could be used. Classification images are resized to ``model.input_shape``. 16-bit
images are scaled by 65535.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List

import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch.utils.data import default_collate

from pce.datasets import build_transform
from pce.datasets.voc import image_to_array
from pce.engine import load_config
from pce.engine.evaluation import load_trained_weights
from pce.engine.errors import PCEError, add_debug_flag, one_line, run_cli
from pce.engine.phases import find_backbones
from pce.engine.trainer import resolve_device
from pce.tasks import get_task
from pce.tasks.visualize import class_names_from_config, display_image, render, save_png

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


def list_images(items: List[str]) -> List[Path]:
    out: List[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            out.extend(sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES))
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"image not found: {p}")
    if not out:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {items}")
    return out


def load_image(path: Path, channels: int) -> torch.Tensor:
    """``[C, H, W]`` float in [0, 1] (16-bit images scaled by 65535); ``PCEError`` naming an unreadable file."""
    try:
        with Image.open(path) as im:
            arr = image_to_array(im, channels)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise PCEError(path, f"not a readable image ({one_line(e)})", "a .jpg / .png / .bmp file") from None
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def min_input_side(model: torch.nn.Module) -> int:
    """The smallest image side the model takes: its deepest feature stride (at least 2 pixels)."""
    strides = [int(i.get("stride", 1)) for bb in find_backbones(model) for i in bb.feature_info]
    return max(strides + [2])


def check_size(path: Path, image: torch.Tensor, lo: int, hi: int) -> None:
    h, w = image.shape[-2:]
    if hi and max(h, w) > hi:
        raise PCEError(path, f"{w}x{h} pixels is larger than data.max_input_size={hi}",
                       "resize it, or raise data.max_input_size with --cfg-options")
    if min(h, w) < lo:
        raise PCEError(path, f"{w}x{h} pixels is smaller than the model's minimum side {lo}",
                       f"an image of at least {lo}x{lo}")


def eval_transform(cfg: Any) -> Any:
    for split in ("test", "val", "train"):
        sc = cfg.data[split]
        if sc.name:
            if not sc.transform.name:
                return None
            kwargs = {k: v for k, v in sc.transform.kwargs.items() if k != "seed"}
            kwargs["train"] = False
            return build_transform(sc.transform.name, **kwargs)
    return None


def dummy_target(task: str, image: torch.Tensor) -> Any:
    """What the transforms / collate need next to an image when there is no annotation."""
    if task == "detection":
        return {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
                "difficult": torch.zeros(0, dtype=torch.bool)}
    if task == "segmentation":
        return torch.zeros(image.shape[-2:], dtype=torch.int64)
    return 0


def apply_transform(task: str, transform: Any, image: torch.Tensor, target: Any):
    if transform is None:
        return image, target
    if task in ("detection", "segmentation"):
        return transform(image, target)
    return transform(image), target


def summarize(task: str, out: Any, names: Any, score_thr: float) -> Dict[str, Any]:
    if task == "detection":
        keep = out["scores"] >= score_thr
        labels = out["labels"][keep].tolist()
        return {"boxes": [[round(v, 2) for v in b] for b in out["boxes"][keep].tolist()], "labels": labels,
                "scores": [round(v, 4) for v in out["scores"][keep].tolist()],
                "names": [names[c - 1] if names and 1 <= c <= len(names) else str(c) for c in labels]}
    if task == "segmentation":
        ids, counts = torch.unique(out, return_counts=True)
        return {"class_pixels": {int(i): int(c) for i, c in zip(ids, counts)}}
    prob = out.float().softmax(-1)
    top = prob.topk(min(5, prob.numel()))
    return {"top5": [{"class": int(i), "name": names[int(i)] if names and int(i) < len(names) else str(int(i)),
                      "prob": float(p)} for p, i in zip(top.values, top.indices)]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config")
    ap.add_argument("--checkpoint", required=True, help="a .pth written by tools/train.py (best.pth, latest.pth)")
    ap.add_argument("images", nargs="+", help="image files or folders")
    ap.add_argument("--out", required=True, help="output folder for the PNGs and predictions.json")
    ap.add_argument("--score-thr", type=float, default=0.5, help="detection: smallest score drawn / listed")
    ap.add_argument("--alpha", type=float, default=0.5, help="segmentation: overlay opacity")
    ap.add_argument("--device", default=None, help="cpu | cuda | auto (default: runtime.device)")
    ap.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE")
    add_debug_flag(ap)
    args = ap.parse_args(argv)
    return run_cli(lambda: _run(args), debug=args.debug)


def _run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.cfg_options)
    task = get_task(cfg.task)
    device = resolve_device(args.device or cfg.runtime.device)
    if not Path(args.checkpoint).is_file():  # fail before building the model
        raise FileNotFoundError(f"checkpoint not found: {args.checkpoint}")
    paths = list_images(args.images)
    model = task.build_model(cfg)
    load_trained_weights(model, cfg, args.checkpoint)  # pruned structure, EMA weights, the saved phase
    model.to(device).eval()
    transform = eval_transform(cfg)
    names = class_names_from_config(cfg)
    collate = getattr(task, "collate_fn", None) or default_collate
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    channels = int(cfg.model.input_shape[0])
    lo, hi = min_input_side(model), int(cfg.data.max_input_size or 0)
    results: Dict[str, Any] = {}
    skipped: Dict[str, str] = {}
    for path in paths:
        try:
            image = load_image(path, channels)
            check_size(path, image, 1 if cfg.task == "classification" else lo, hi)
            img_t, tgt = apply_transform(cfg.task, transform, image, dummy_target(cfg.task, image))
            if cfg.task == "classification" and tuple(img_t.shape[-2:]) != tuple(cfg.model.input_shape[1:]):
                img_t = F.interpolate(img_t[None], size=tuple(int(v) for v in cfg.model.input_shape[1:]),
                                      mode="bilinear", align_corners=False, antialias=True)[0]
            with torch.no_grad():
                pred = task.predict(model, collate([(img_t, tgt)]), device)[0][0]
        except (PCEError, ValueError, OSError, RuntimeError) as e:
            msg = one_line(e)
            skipped[str(path)] = msg
            print(f"error: {msg if str(path) in msg else f'{path}: {msg}'} (skipped)", file=sys.stderr)
            continue
        if isinstance(pred, dict):
            pred = {k: v.detach().cpu() for k, v in pred.items()}
        else:
            pred = pred.detach().cpu()
        picture = render(cfg.task, display_image(img_t, transform), pred, names, score_thr=args.score_thr,
                         alpha=args.alpha)
        dst = save_png(picture, out_dir / f"{path.stem}.png")
        results[str(path)] = {"output": str(dst), **summarize(cfg.task, pred, names, args.score_thr)}
        print(f"{path} -> {dst}")
    if skipped:
        (out_dir / "skipped.json").write_text(json.dumps(skipped, indent=1))
    (out_dir / "predictions.json").write_text(json.dumps(results, indent=1))
    print(f"{len(paths) - len(skipped)} image(s), {len(skipped)} skipped; predictions in "
          f"{out_dir / 'predictions.json'}")
    return 0 if len(skipped) < len(paths) else 1


if __name__ == "__main__":
    sys.exit(main())
