"""The shared plumbing of the command-line tools (``tools/infer.py``, ``tools/visualize_routing.py``,
``tools/analyze_routing.py``, ``tools/prune_experts.py``, ``tools/report.py``): the common arguments, loading a
trained run, a user's image files (read with their documented value range, size-checked before decoding),
samples from files or a configured split, batches, and the outputs: distinct names for clashing file stems,
``--force`` (never overwrite an output without it) and atomic writes whose failures name the file.

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
from typing import Any, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import nn
from torch.utils.data import Subset, default_collate

from pce.engine.errors import PCEError, add_debug_flag, one_line

from .atomic_io import atomic_write  # the one atomic writer (temp + fsync + os.replace; errors name the file)

__all__ = ["model_inputs", "IMAGE_SUFFIXES", "list_images", "output_names", "load_image", "eval_transform", "check_size",
           "check_fraction", "add_run_args", "add_force_flag", "load_run", "load_split", "file_samples",
           "split_samples", "batches", "display", "json_ready", "atomic_write", "check_outputs", "write_json"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


# ----------------------------------------------------------------------------------------------- image files
def list_images(items: Sequence[Union[str, os.PathLike]]) -> List[Path]:
    """The image files of ``items`` (files, or folders: their ``IMAGE_SUFFIXES`` files, sorted; hidden files,
    such as a tool's temp files or macOS ``._*`` files, left out), each file once (in its first place)."""
    out: List[Path] = []
    seen: set = set()
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES
                           and not f.name.startswith(".") and f.is_file())
        elif p.is_file():
            found = [p]
        else:
            raise PCEError(p, "image not found", "an image file or a folder of images")
        for f in found:
            key = f.resolve()
            if key not in seen:
                seen.add(key)
                out.append(f)
    if not out:
        raise PCEError(", ".join(str(i) for i in items), "no images", f"files ending in {', '.join(IMAGE_SUFFIXES)}")
    return out


def output_names(paths: Sequence[Union[str, os.PathLike]]) -> List[str]:
    """One distinct output stem per input, deterministic: the file's stem, and for a stem an earlier input
    already took (``a/x.png``, ``b/x.png``) the first free ``<stem>_1``, ``<stem>_2``, ... in input order, never
    another input's own stem. Compared case-insensitively (``X.png`` and ``x.png`` are one file on some disks)."""
    stems = [Path(p).stem for p in paths]
    reserved = {s.casefold() for s in stems}
    taken: set = set()
    out: List[str] = []
    for stem in stems:
        name, k = stem, 0
        while name.casefold() in taken or (k and name.casefold() in reserved):
            k += 1
            name = f"{stem}_{k}"
        taken.add(name.casefold())
        out.append(name)
    return out


def load_image(path: Union[str, os.PathLike], channels: int, max_side: int = 0) -> torch.Tensor:
    """``[C, H, W]`` float in [0, 1] (:func:`pce.datasets.voc_images.image_to_array`: 16-bit images scaled by
    65535, float images in [0, 1]). ``PCEError`` naming the file for an unreadable file, pixel values outside the
    format's range or NaN / infinite pixels, a longest side above ``max_side`` (0: no limit; checked from the
    header, before decoding) and an image over PIL's decompression-bomb limit (``Image.MAX_IMAGE_PIXELS``)."""
    from pce.datasets.voc_images import PixelValueError, image_to_array

    try:
        with Image.open(path) as im:
            w, h = im.size
            _check_dims(path, h, w, 0, max_side)
            arr = image_to_array(im, channels, where=path)
    except PCEError:
        raise
    except PixelValueError as e:
        raise PCEError(path, e.what, e.expected) from None
    except Image.DecompressionBombError as e:
        raise PCEError(path, f"too many pixels: {one_line(e)}",
                       "a smaller image; PIL.Image.MAX_IMAGE_PIXELS guards against decompression bombs") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise PCEError(path, f"not a readable image ({one_line(e)})",
                       f"a {' / '.join(IMAGE_SUFFIXES)} file") from None
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def check_size(path: Union[str, os.PathLike], image: torch.Tensor, lo: int, hi: int) -> None:
    """``PCEError`` naming ``path`` when ``image [C, H, W]`` has a side below ``lo`` or above ``hi`` (0: no limit)."""
    h, w = image.shape[-2:]
    _check_dims(path, int(h), int(w), lo, hi)


def _check_dims(path: Union[str, os.PathLike], h: int, w: int, lo: int, hi: int) -> None:
    if hi and max(h, w) > hi:
        raise PCEError(path, f"{w}x{h} pixels is larger than data.max_input_size={hi}",
                       "resize it, or raise data.max_input_size with --cfg-options")
    if min(h, w) < lo:
        raise PCEError(path, f"{w}x{h} pixels is smaller than the model's minimum side {lo}",
                       f"an image of at least {lo}x{lo}")


def check_fraction(flag: str, value: float) -> float:
    """``value`` when it is a number in [0, 1], else ``PCEError`` naming ``flag`` (NaN included)."""
    if not (isinstance(value, (int, float)) and math.isfinite(value) and 0.0 <= value <= 1.0):
        raise PCEError(flag, f"{value} is not a number in [0, 1]", "a value between 0 and 1")
    return float(value)


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


def add_force_flag(ap: argparse.ArgumentParser) -> None:
    """``--force``: replace the outputs of an earlier run (without it, a tool refuses to overwrite any file)."""
    ap.add_argument("--force", action="store_true", help="overwrite existing output files (refused without it)")


def load_run(args: argparse.Namespace) -> Tuple[Any, Any, nn.Module, dict, torch.device]:
    """``(cfg, task, model in eval mode on device, checkpoint dict, device)`` from the common arguments; the
    model is loaded by :func:`pce.engine.evaluation.load_trained_weights` (pruned expert structure, EMA weights,
    the routing of the phase the checkpoint was saved in)."""
    from pce.engine import load_config
    from pce.engine.evaluation import check_checkpoint_file, load_trained_model
    from pce.engine.runtime import resolve_device

    from .registry import get_task

    cfg = load_config(args.config, args.cfg_options)
    check_checkpoint_file(args.checkpoint)  # before the model is built
    task = get_task(cfg.task)
    device = resolve_device(args.device or cfg.runtime.device)
    torch.set_num_threads(max(1, int(getattr(cfg.runtime, "num_threads", 0) or torch.get_num_threads())))
    model, ckpt = load_trained_model(cfg, task, args.checkpoint, device)
    return cfg, task, model, ckpt, device


def load_split(cfg: Any, task: Any, split: str, num: Optional[int] = None) -> Any:
    """The ``split`` dataset of ``cfg`` (its first ``num`` samples when given)."""
    from pce.engine.evaluation import build_eval_datasets

    datasets = build_eval_datasets(cfg, task, (split,))  # as evaluated: no augmentation, --split train included
    if split not in datasets:
        raise PCEError(f"data.{split}", "the config defines no such dataset", "a configured split: train, val or test")
    ds = datasets[split]
    if num is not None and num < len(ds):
        ds = Subset(ds, list(range(int(num))))
    return ds


# ------------------------------------------------------------------------------------------------- samples
def file_samples(cfg: Any, task: Any, paths: Sequence[str], model: Optional[nn.Module] = None
                 ) -> Tuple[List[Any], List[str], Any]:
    """``(samples, names, transform)``: image files (or folders of them) as the task's model takes them
    (``task.prepare_image`` through the evaluation transform); names are distinct output stems
    (:func:`output_names`). Images over ``data.max_input_size`` (longest side) are refused before decoding,
    and, given the ``model``, images with a side below ``task.min_input_side`` (``PCEError`` naming the file)."""
    files = list_images(paths)
    transform, channels = eval_transform(cfg), int(cfg.model.input_shape[0])
    lo, hi = (task.min_input_side(cfg, model) if model is not None else 1), int(cfg.data.max_input_size or 0)
    samples = []
    for f in files:
        image = load_image(f, channels, max_side=hi)
        check_size(f, image, lo, hi)
        samples.append(task.prepare_image(cfg, image, transform))
    return samples, output_names(files), transform


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


def model_inputs(task: Any, batch: Any) -> Any:
    """What ``model(...)`` takes for a loader ``batch``: a detector's list of raw images (the model resizes and
    normalises them itself), otherwise the task's ``batch_images`` tensor ``[B, C, H, W]``."""
    images = batch[0] if isinstance(batch, (list, tuple)) and batch else None
    if isinstance(images, (list, tuple)) and all(isinstance(t, torch.Tensor) for t in images):
        return list(images)
    return task.batch_images(batch)


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


# --------------------------------------------------------------------------------------------------- outputs
def check_outputs(paths: Iterable[Union[str, os.PathLike]], force: bool) -> None:
    """Unless ``force``: ``PCEError`` naming the first of ``paths`` that exists (and how many more do), so a
    tool refuses before it writes anything rather than overwrite an earlier run's files."""
    if force:
        return
    existing = [Path(p) for p in paths if os.path.lexists(p)]
    if existing:
        more = f" (and {len(existing) - 1} more output file(s) of this run)" if len(existing) > 1 else ""
        raise PCEError(existing[0], f"already exists{more}", "--force to overwrite, or another --out folder")


def write_json(obj: Any, path: Union[str, os.PathLike]) -> Path:
    """Write ``json_ready(obj)`` (indent 1) to ``path`` atomically (:func:`pce.tasks.atomic_io.atomic_write`: a
    crash leaves the previous file or none, a failed write is a ``PCEError`` naming ``path``). Returns the path."""
    text = json.dumps(json_ready(obj), indent=1)
    return atomic_write(path, lambda tmp: tmp.write_text(text))
