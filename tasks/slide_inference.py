"""Heat-maps over whole slides (the reusable part of ``tools/infer_slide.py``): the config's evaluation split and
its tile options, the task's slide tile mode, the trained model, and :func:`infer_slide`, a tumour-probability map
of one slide from its tissue tiles read in blocks.

Slide inputs (stems, microns per pixel, annotations, labels): :mod:`pce.tasks.slide_inputs`; the outputs written
per slide and the slide metrics: :mod:`pce.tasks.slide_outputs`.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Tuple

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from pce.datasets import DATASETS, TRANSFORMS
from pce.datasets.camelyon import CamelyonTiles, TileBlocks, open_slide
from pce.datasets.camelyon.heatmap import HeatmapAccumulator, heatmap_cell
from pce.engine.config import to_plain
from pce.engine.errors import PCEError
from pce.engine.evaluation import load_trained_model
from pce.engine.runtime import autocast_context, resolve_amp_dtype
from pce.tasks.common import check_kwargs

__all__ = ["TILE_KEYS", "RESOLUTION_KEYS", "eval_split", "check_split_options", "slide_tile_mode", "load_model",
           "autocast", "tile_dataset", "infer_slide"]

# the dataset options of the evaluation split that make the tiles of a slide
TILE_KEYS = ("level", "tile_size", "stride", "min_tissue", "mpp", "downsample", "label_map", "tissue_level",
              "cache_dir", "level0_mpp")
RESOLUTION_KEYS = ("level", "mpp", "downsample")


def eval_split(cfg: Any) -> Tuple[str, Any]:
    """``(name, config)`` of the evaluation split: data.test, else data.val."""
    for split in ("test", "val"):
        if cfg.data[split].name:
            return split, cfg.data[split]
    raise PCEError("data.val", "the config defines no evaluation split", "data.test or data.val tiles")


def check_split_options(split: str, sc: Any) -> None:
    """The split's dataset and transform options are arguments of the dataset / transform (what tools/eval.py
    checks when it builds the split): a typo such as ``data.val.kwargs.tile_sise`` is named, not ignored."""
    check_kwargs(DATASETS.get(sc.name), to_plain(sc.kwargs), f"data.{split}.kwargs", f"dataset {sc.name!r}")
    if sc.transform.name:
        check_kwargs(TRANSFORMS.get(sc.transform.name), to_plain(sc.transform.kwargs),
                     f"data.{split}.transform.kwargs", f"transform {sc.transform.name!r}")


def slide_tile_mode(task: Any) -> str:
    """How ``task`` tiles a slide (``"classify"`` or ``"segment"``); ``PCEError`` for a task that cannot."""
    mode = task.slide_tile_mode
    if mode not in ("classify", "segment"):
        raise PCEError("task", f"{task.name} cannot run on slides",
                       'a task whose slide_tile_mode is "classify" or "segment"')
    return mode

def load_model(cfg: Any, task: Any, checkpoint: str, device: torch.device) -> torch.nn.Module:
    """The task's model of ``cfg`` made the trained one of ``checkpoint`` through the one loading path of eval /
    infer / export (pruned expert structure replayed, EMA weights, the phase it was saved in), eval mode."""
    return load_trained_model(cfg, task, checkpoint, device)[0]


def autocast(device: torch.device, amp: str):
    """``torch.autocast`` for ``amp`` ("bf16" / "fp16") on CUDA; nothing on a CPU or with ``"none"``."""
    return autocast_context(resolve_amp_dtype(amp, device))


def tile_dataset(slide: Path, mode: str, tile_kwargs: Dict[str, Any], transform: Any) -> CamelyonTiles:
    """The tissue tiles of one slide (the cached index when there is one)."""
    return CamelyonTiles([slide], mode=mode, transform=transform, **tile_kwargs)


def rebatch(blocks: Iterable[Tuple[torch.Tensor, torch.Tensor]],
            batch_size: int) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
    """Regroup ``(images [n, C, s, s], idx [n])`` blocks of any size ``n`` into batches of exactly ``batch_size``
    tiles, in order, and a last, smaller one with what is left (none when nothing is)."""
    pending: List[Tuple[torch.Tensor, torch.Tensor]] = []
    held = 0
    for images, idx in blocks:
        pending.append((images, idx))
        held += len(idx)
        while held >= batch_size:
            imgs, ids = torch.cat([p[0] for p in pending]), torch.cat([p[1] for p in pending])
            yield imgs[:batch_size], ids[:batch_size]
            held -= batch_size
            pending = [(imgs[batch_size:], ids[batch_size:])] if held else []
    if held:
        yield torch.cat([p[0] for p in pending]), torch.cat([p[1] for p in pending])


@torch.inference_mode()
def infer_slide(model: torch.nn.Module, mode: str, slide: Path, tile_kwargs: Dict[str, Any], transform: Any,
                device: torch.device, batch_size: int, workers: int, amp: str = "none", block: int = 8,
                progress: bool = True) -> Dict[str, Any]:
    """Tumour-probability map of one slide: ``{"prob", "covered", "downsample" (level-0 px per map px), ...}``.
    ``mode``: the task's ``slide_tile_mode`` (``"segment"``: logits ``[B, 2, s, s]``, a probability per pixel
    pooled to the map's cells; ``"classify"``: logits ``[B, 2]``, one probability per tile).

    Only tissue tiles are read (the slide's tile index, cached under ``cache_dir``), in blocks of ``block`` x
    ``block`` grid positions (:class:`TileBlocks`: overlapping tiles are cut from one read of their block) by
    ``workers`` DataLoader processes; batches of ``batch_size`` tiles go to ``device`` (pinned memory and
    non-blocking copies on CUDA, ``amp`` autocast)."""
    t0 = time.perf_counter()
    ds = tile_dataset(slide, mode, tile_kwargs, transform)
    t_index = time.perf_counter() - t0
    per_pixel = mode == "segment"
    g = ds.geometries[0]
    cell = heatmap_cell(ds.tile_size, ds.stride, per_pixel)
    with open_slide(slide) as s:
        lw, lh = s.level_dimensions[g.level]
    grid_size = (int(lw / g.scale), int(lh / g.scale))  # the level in tile pixels
    acc = HeatmapAccumulator(grid_size, cell, ds.tile_size)
    cols, rows = ds.tiles.columns["col"], ds.tiles.columns["row"]

    def run(images: torch.Tensor, idx: torch.Tensor) -> None:
        with autocast(device, amp):
            logits = model(images.to(device, non_blocking=True)).float()
        probs = logits.softmax(1)[:, 1]
        probs = F.avg_pool2d(probs[:, None], cell)[:, 0] if per_pixel else probs
        for p, i in zip(probs.cpu().numpy(), idx.tolist()):
            acc.add(int(cols[i]) * ds.stride, int(rows[i]) * ds.stride, p)

    t1 = time.perf_counter()
    if len(ds.tiles):
        blocks = TileBlocks(ds, block=block)
        loader = DataLoader(blocks, batch_size=None, num_workers=workers, pin_memory=device.type == "cuda",
                            persistent_workers=False)
        bar = tqdm(total=len(ds.tiles), desc=slide.name, unit="tile", file=sys.stderr, disable=not progress or None,
                   leave=False)
        for imgs, ids in rebatch(loader, batch_size):
            run(imgs, ids)
            bar.update(len(ids))
        bar.close()
    ds.close()
    t_infer = time.perf_counter() - t1
    prob, covered = acc.result()
    n = len(ds.tiles)
    return {"prob": prob, "covered": covered, "downsample": g.downsample * g.scale * cell, "level": g.level,
            "tile_size": ds.tile_size, "stride": ds.stride, "num_tiles": n, "tile_mpp": g.mpp, "scale": g.scale,
            "read_size": ds.read_sizes[0], "score": float(prob.max()) if prob.size else 0.0,
            "timing": {"index_s": round(t_index, 3), "infer_s": round(t_infer, 3),
                       "tiles_per_s": round(n / t_infer, 2) if n and t_infer > 0 else None}}

