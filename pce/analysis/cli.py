"""Shared command-line plumbing of the analysis tools: arguments, loading a run, samples from files or a split."""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any, Iterator, List, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import default_collate

from pce.engine.errors import PCEError, add_debug_flag

__all__ = ["add_run_args", "load_run", "file_samples", "split_samples", "batches", "display", "write_json",
           "json_ready", "IMAGE_SUFFIXES"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


def add_run_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("config", help="the run's config file (.py or .yaml)")
    ap.add_argument("--checkpoint", required=True, help="a .pth written by tools/train.py or tools/prune_experts.py")
    ap.add_argument("--device", default=None, help="cpu | cuda | auto (default: runtime.device)")
    ap.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE")
    add_debug_flag(ap)


def load_run(args: argparse.Namespace) -> Tuple[Any, Any, torch.nn.Module, dict, torch.device]:
    """``(cfg, task, model, checkpoint dict, device)`` from the common arguments."""
    from pce.analysis.runner import load_model
    from pce.engine import load_config
    from pce.engine.trainer import resolve_device
    from pce.tasks import get_task

    cfg = load_config(args.config, args.cfg_options)
    if not Path(args.checkpoint).is_file():
        raise PCEError(args.checkpoint, "checkpoint not found", "a .pth file written by tools/train.py")
    task = get_task(cfg.task)
    device = resolve_device(args.device or cfg.runtime.device)
    torch.set_num_threads(max(1, int(getattr(cfg.runtime, "num_threads", 0) or torch.get_num_threads())))
    model, ckpt = load_model(cfg, task, args.checkpoint, device)
    return cfg, task, model, ckpt, device


def _eval_transform(cfg: Any) -> Any:
    from pce.datasets import build_transform

    for split in ("test", "val", "train"):
        sc = cfg.data[split]
        if sc.name:
            if not sc.transform.name:
                return None
            kwargs = {k: v for k, v in sc.transform.kwargs.items() if k != "seed"}
            kwargs["train"] = False
            return build_transform(sc.transform.name, **kwargs)
    return None


def _dummy_target(task: str, image: torch.Tensor) -> Any:
    if task == "detection":
        return {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64),
                "difficult": torch.zeros(0, dtype=torch.bool)}
    if task == "segmentation":
        return torch.zeros(image.shape[-2:], dtype=torch.int64)
    return 0


def file_samples(cfg: Any, paths: Sequence[str]) -> Tuple[List[Any], List[str], Any]:
    """``(samples, names, transform)``: image files (or folders of them) through the eval transform."""
    files: List[Path] = []
    for item in paths:
        p = Path(item)
        if p.is_dir():
            files.extend(sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES))
        elif p.is_file():
            files.append(p)
        else:
            raise PCEError(p, "image not found", "an image file or a folder of images")
    if not files:
        raise PCEError(", ".join(paths), "no images", f"files ending in {', '.join(IMAGE_SUFFIXES)}")
    transform, channels, samples = _eval_transform(cfg), int(cfg.model.input_shape[0]), []
    for f in files:
        try:
            with Image.open(f) as im:
                arr = np.asarray(im.convert("L" if channels == 1 else "RGB"), dtype=np.float32) / 255.0
        except OSError as e:
            raise PCEError(f, f"not a readable image ({e})", "a .jpg / .png / .bmp image") from e
        t = torch.from_numpy(arr)
        t = t.unsqueeze(0) if t.dim() == 2 else t.permute(2, 0, 1).contiguous()
        target = _dummy_target(cfg.task, t)
        if transform is not None:
            t, target = transform(t, target) if cfg.task in ("detection", "segmentation") else (transform(t), target)
        samples.append((t, target))
    return samples, [f.stem for f in files], transform


def split_samples(cfg: Any, task: Any, split: str, num: int) -> Tuple[List[Any], List[str], Any]:
    """The first ``num`` samples of a configured split, their names and the split's transform."""
    from pce.analysis.runner import load_split

    ds = load_split(cfg, task, split, num)
    samples = [ds[i] for i in range(len(ds))]
    base = getattr(ds, "dataset", ds)
    return samples, [f"{split}_{i:04d}" for i in range(len(samples))], getattr(base, "transform", None)


def batches(task: Any, samples: List[Any], size: int) -> Iterator[Tuple[int, Any]]:
    """``(offset, collated batch)`` of ``samples`` in chunks of ``size``."""
    collate = getattr(task, "collate_fn", None) or default_collate
    for i in range(0, len(samples), size):
        yield i, collate(samples[i:i + size])


def display(sample_image: torch.Tensor, transform: Any) -> torch.Tensor:
    """The viewable ``[C, H, W]`` image in [0, 1] of a transformed sample."""
    from pce.tasks.visualize import display_image

    return display_image(sample_image, transform).float().clamp(0, 1)


def json_ready(x: Any) -> Any:
    """JSON-safe copy: non-finite floats -> ``None``, tensors and arrays -> lists."""
    if isinstance(x, (torch.Tensor, np.ndarray)):
        return json_ready(x.tolist())
    if isinstance(x, (np.floating, np.integer)):
        return json_ready(x.item())
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {str(k): json_ready(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_ready(v) for v in x]
    return x


def write_json(obj: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(json_ready(obj), indent=1))
    return path
