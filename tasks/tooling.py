"""The shared plumbing of the command-line tools (``tools/infer.py``, ``tools/visualize_routing.py``,
``tools/analyze_routing.py``, ``tools/prune_experts.py``, ``tools/report.py``): the common arguments, loading a
trained run, a user's image files, samples from files or a configured split, batches, JSON output.

Nothing here knows a task by name: what differs between tasks (a user's image through the transform, the
smallest image side, the empty target) is asked of the task adapter (:class:`pce.engine.task.Task`).
Shapes: an image ``[C, H, W]`` float in [0, 1]; a sample ``(model input [C, H', W'], target)``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
from typing import Any, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import nn
from torch.utils.data import Subset, default_collate

from pce.engine.errors import PCEError, add_debug_flag, one_line

__all__ = ["IMAGE_SUFFIXES", "list_images", "load_image", "eval_transform", "check_size", "add_run_args",
           "load_run", "load_split", "file_samples", "split_samples", "batches", "display", "json_ready",
           "write_json"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


# ----------------------------------------------------------------------------------------------- image files
def list_images(items: Sequence[Union[str, os.PathLike]]) -> List[Path]:
    """The image files of ``items`` (files, or folders: their ``IMAGE_SUFFIXES`` files, sorted)."""
    out: List[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            out.extend(sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES))
        elif p.is_file():
            out.append(p)
        else:
            raise PCEError(p, "image not found", "an image file or a folder of images")
    if not out:
        raise PCEError(", ".join(str(i) for i in items), "no images", f"files ending in {', '.join(IMAGE_SUFFIXES)}")
    return out


def load_image(path: Union[str, os.PathLike], channels: int) -> torch.Tensor:
    """``[C, H, W]`` float in [0, 1] (16-bit images scaled by 65535); ``PCEError`` naming an unreadable file."""
    from pce.datasets.voc_images import image_to_array

    try:
        with Image.open(path) as im:
            arr = image_to_array(im, channels)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise PCEError(path, f"not a readable image ({one_line(e)})", "a .jpg / .png / .bmp file") from None
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def check_size(path: Union[str, os.PathLike], image: torch.Tensor, lo: int, hi: int) -> None:
    """``PCEError`` naming ``path`` when ``image [C, H, W]`` has a side below ``lo`` or above ``hi`` (0: no limit)."""
    h, w = image.shape[-2:]
    if hi and max(h, w) > hi:
        raise PCEError(path, f"{w}x{h} pixels is larger than data.max_input_size={hi}",
                       "resize it, or raise data.max_input_size with --cfg-options")
    if min(h, w) < lo:
        raise PCEError(path, f"{w}x{h} pixels is smaller than the model's minimum side {lo}",
                       f"an image of at least {lo}x{lo}")


def eval_transform(cfg: Any) -> Any:
    """The evaluation transform of the config: that of data.test, else data.val, else data.train with
    ``train=False`` (``None`` when the first configured split has none)."""
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


# --------------------------------------------------------------------------------------------- a trained run
def add_run_args(ap: argparse.ArgumentParser) -> None:
    """``config``, ``--checkpoint``, ``--device``, ``--cfg-options`` and ``--debug``."""
    ap.add_argument("config", help="the run's config file (.py or .yaml)")
    ap.add_argument("--checkpoint", required=True, help="a .pth written by tools/train.py or tools/prune_experts.py")
    ap.add_argument("--device", default=None, help="cpu | cuda | auto (default: runtime.device)")
    ap.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE")
    add_debug_flag(ap)


def load_run(args: argparse.Namespace) -> Tuple[Any, Any, nn.Module, dict, torch.device]:
    """``(cfg, task, model in eval mode on device, checkpoint dict, device)`` from the common arguments; the
    model is loaded by :func:`pce.engine.evaluation.load_trained_weights` (pruned expert structure, EMA weights,
    the routing of the phase the checkpoint was saved in)."""
    from pce.engine import load_config
    from pce.engine.evaluation import load_trained_weights
    from pce.engine.runtime import resolve_device

    from .registry import get_task

    cfg = load_config(args.config, args.cfg_options)
    if not Path(args.checkpoint).is_file():  # fail before building the model
        raise PCEError(args.checkpoint, "checkpoint not found", "a .pth file written by tools/train.py")
    task = get_task(cfg.task)
    device = resolve_device(args.device or cfg.runtime.device)
    torch.set_num_threads(max(1, int(getattr(cfg.runtime, "num_threads", 0) or torch.get_num_threads())))
    model = task.build_model(cfg)
    ckpt = load_trained_weights(model, cfg, args.checkpoint)
    return cfg, task, model.to(device).eval(), ckpt, device


def load_split(cfg: Any, task: Any, split: str, num: Optional[int] = None) -> Any:
    """The ``split`` dataset of ``cfg`` (its first ``num`` samples when given)."""
    datasets = task.build_datasets(cfg, splits=(split,))
    if split not in datasets:
        raise PCEError(f"data.{split}", "the config defines no such dataset", "a configured split: train, val or test")
    ds = datasets[split]
    if num is not None and num < len(ds):
        ds = Subset(ds, list(range(int(num))))
    return ds


# ------------------------------------------------------------------------------------------------- samples
def file_samples(cfg: Any, task: Any, paths: Sequence[str]) -> Tuple[List[Any], List[str], Any]:
    """``(samples, names, transform)``: image files (or folders of them) as the task's model takes them
    (``task.prepare_image`` through the evaluation transform); names are the file stems."""
    files = list_images(paths)
    transform, channels = eval_transform(cfg), int(cfg.model.input_shape[0])
    samples = [task.prepare_image(cfg, load_image(f, channels), transform) for f in files]
    return samples, [f.stem for f in files], transform


def split_samples(cfg: Any, task: Any, split: str, num: int) -> Tuple[List[Any], List[str], Any]:
    """The first ``num`` samples of a configured split, their names (``<split>_0000``, ...) and its transform."""
    ds = load_split(cfg, task, split, num)
    samples = [ds[i] for i in range(len(ds))]
    base = getattr(ds, "dataset", ds)
    return samples, [f"{split}_{i:04d}" for i in range(len(samples))], getattr(base, "transform", None)


def batches(task: Any, samples: List[Any], size: int) -> Iterator[Tuple[int, Any]]:
    """``(offset, collated batch)`` of ``samples`` in chunks of ``size`` (the task's collate function)."""
    collate = getattr(task, "collate_fn", None) or default_collate
    for i in range(0, len(samples), size):
        yield i, collate(samples[i:i + size])


def display(sample_image: torch.Tensor, transform: Any) -> torch.Tensor:
    """The viewable ``[C, H, W]`` image in [0, 1] of a transformed sample (normalisation undone)."""
    from .visualize import display_image

    return display_image(sample_image, transform).float().clamp(0, 1)


# ---------------------------------------------------------------------------------------------------- JSON
def json_ready(x: Any) -> Any:
    """JSON-safe copy: non-finite floats -> ``None``, tensors and arrays -> lists, keys -> strings."""
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


def write_json(obj: Any, path: Union[str, os.PathLike]) -> Path:
    """Write ``json_ready(obj)`` (indent 1) to ``path`` atomically: a temp file in the same folder, then
    ``os.replace`` (a crash leaves the previous file or none, never half a file). Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(json_ready(obj), indent=1))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
