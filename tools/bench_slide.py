#!/usr/bin/env python
"""Whole-slide inference speed: tiles per second and seconds per slide of tools/infer_slide.py's path on one slide,
and the extrapolation to a Camelyon16 slide and to the 129 test slides.

    python tools/bench_slide.py configs/camelyon16_seg_pce.py ../shared/data/wsi/CMU-1-Small-Region.svs \\
        --batch-size 8 16 --workers 0 2 --out bench_slide.json

The tiles are those of the config's evaluation split (data.test, else data.val; ``--tile-mpp`` / ``--stride``
override them), tissue tiles only. Measured, each on its own: the tile index (tissue mask + grid, not cached),
the tile reads alone (:class:`TileBlocks` through a DataLoader: decode, resample, transform) and the whole path
(reads + model + heat-map) for every ``--batch-size`` x ``--workers``, after one warm-up batch. Without
``--checkpoint`` the model is the config's, freshly initialised (the speed of a trained one is the same but for
data-dependent routing). The extrapolation scales the best tiles/s to a slide of ``--slide-size`` level-0 pixels
at ``--slide-mpp`` with ``--tissue`` fractions of tissue tiles; the index time of such a slide is not measured
(it reads a ~32x level: a few seconds) and is left out.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))

from infer_slide import (_RESOLUTION_KEYS, _TILE_KEYS, check_split_options, eval_split, infer_slide,  # noqa: E402
                         load_model, slide_tile_mode)
from pce.datasets import build_transform  # noqa: E402
from pce.datasets.camelyon import CamelyonTiles, TileBlocks, open_slide  # noqa: E402
from pce.engine import load_config  # noqa: E402
from pce.engine.config import to_plain  # noqa: E402
from pce.engine.errors import PCEError, add_debug_flag, run_cli  # noqa: E402
from pce.tasks import get_task  # noqa: E402
from pce.tasks.atomic_io import atomic_write_bytes  # noqa: E402
from pce.tasks.tooling import json_ready  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config")
    ap.add_argument("slide", help="one whole-slide image")
    ap.add_argument("--checkpoint", default=None, help="a .pth (default: the config's model, freshly initialised)")
    ap.add_argument("--tile-mpp", type=float, default=None, help="tile microns per pixel (default: the config's)")
    ap.add_argument("--stride", type=int, default=None, help="tile step in tile pixels (default: the config's)")
    ap.add_argument("--mpp", type=float, default=None, help="level-0 mpp of a slide that records none")
    ap.add_argument("--batch-size", type=int, nargs="+", default=[16])
    ap.add_argument("--workers", type=int, nargs="+", default=[0])
    ap.add_argument("--block", type=int, default=8, help="TileBlocks block (0: tile by tile)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"])
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--repeat", type=int, default=1, help="runs of every setting (the median is reported)")
    ap.add_argument("--slide-size", type=int, nargs=2, default=[100000, 200000], metavar=("W", "H"),
                    help="level-0 size of the slide to extrapolate to (Camelyon16: ~100,000 x 200,000)")
    ap.add_argument("--slide-mpp", type=float, default=0.243, help="its level-0 microns per pixel")
    ap.add_argument("--tissue", type=float, nargs="+", default=[0.1, 0.2, 0.3],
                    help="fractions of its grid tiles that are tissue tiles")
    ap.add_argument("--num-slides", type=int, default=129, help="slides of the set (Camelyon16 test: 129)")
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    ap.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE")
    add_debug_flag(ap)
    args = ap.parse_args(argv)
    return run_cli(lambda: _bench(args), debug=args.debug)


def _median(values: List[float]) -> float:
    v = sorted(values)
    return v[len(v) // 2] if len(v) % 2 else (v[len(v) // 2 - 1] + v[len(v) // 2]) / 2


@torch.inference_mode()
def _model_pass(model: torch.nn.Module, x: torch.Tensor, amp: str) -> float:
    """Seconds of one forward of the batch ``x`` (already on its device), synchronised on CUDA."""
    from infer_slide import _autocast

    if x.device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    with _autocast(x.device, amp):
        model(x)
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def _read_pass(ds: CamelyonTiles, block: int, workers: int) -> float:
    t = time.perf_counter()
    n = 0
    for _, idx in DataLoader(TileBlocks(ds, block=block), batch_size=None, num_workers=workers):
        n += len(idx)
    assert n == len(ds.tiles)
    return time.perf_counter() - t


@dataclass
class _Setup:
    """What every measurement shares: the model, the tile settings of the evaluation split and the tile index."""
    slide: Path
    device: torch.device
    mode: str
    tile_kwargs: Dict[str, Any]
    transform: Optional[Callable]
    model: torch.nn.Module
    ds: Optional[CamelyonTiles] = None
    index_s: float = 0.0


def _tile_kwargs(args: argparse.Namespace, sc: Any) -> Dict[str, Any]:
    """The CamelyonTiles keyword arguments of the split config ``sc`` with ``--stride`` / ``--tile-mpp`` / ``--mpp``
    applied (no cache_dir: the index is timed in full)."""
    tile_kwargs = {k: v for k, v in to_plain(sc.kwargs).items() if k in _TILE_KEYS and k != "cache_dir"}
    if args.stride:
        tile_kwargs["stride"] = args.stride
    if args.tile_mpp:
        tile_kwargs = {k: v for k, v in tile_kwargs.items() if k not in _RESOLUTION_KEYS}
        tile_kwargs["mpp"] = args.tile_mpp
    if args.mpp:
        tile_kwargs.setdefault("level0_mpp", args.mpp)
    return tile_kwargs


def _setup(args: argparse.Namespace) -> _Setup:
    """Config, tile settings, model (``--checkpoint`` or freshly initialised with seed 0) and eval transform."""
    cfg = load_config(args.config, args.cfg_options)
    task = get_task(cfg.task)
    mode = slide_tile_mode(task)
    split, sc = eval_split(cfg)
    check_split_options(split, sc)
    tile_kwargs = _tile_kwargs(args, sc)
    slide = Path(args.slide)
    device = torch.device(args.device)
    if args.checkpoint:
        model = load_model(cfg, task, args.checkpoint, device)
    else:
        torch.manual_seed(0)
        model = task.build_model(cfg).to(device).eval()
    kw = {k: v for k, v in to_plain(sc.transform.kwargs).items() if k != "seed"}
    transform = build_transform(sc.transform.name, **dict(kw, train=False)) if sc.transform.name else None
    return _Setup(slide, device, mode, tile_kwargs, transform, model)


def _build_index(st: _Setup) -> None:
    """Index the slide's tissue tiles (uncached, timed: ``st.index_s`` in seconds) into ``st.ds``."""
    t = time.perf_counter()
    st.ds = CamelyonTiles([st.slide], mode=st.mode, transform=st.transform, **st.tile_kwargs)
    st.index_s = time.perf_counter() - t
    if not len(st.ds.tiles):
        raise PCEError(st.slide, "no tissue tile at these settings", "a slide with tissue, or a lower min_tissue")


def _grid(w: float, h: float, size: float, step: float) -> int:
    """Tiles of ``size`` px every ``step`` px that fit in a ``w`` x ``h`` px image (floor((w - size) / step) + 1
    per axis; all in the same pixel units)."""
    return (math.floor((w - size) / step) + 1) * (math.floor((h - size) / step) + 1)


def _slide_info(args: argparse.Namespace, st: _Setup) -> Dict[str, Any]:
    """The slide's figures (level-0 size in px, tile geometry, grid and tissue tiles, index seconds) and the run
    settings, with an empty ``runs`` list; prints the one-line summary."""
    ds, g = st.ds, st.ds.geometries[0]
    with open_slide(st.slide) as s:
        lw, lh = s.level_dimensions[g.level]
        w0, h0 = s.dimensions
    grid = _grid(lw, lh, ds.read_sizes[0], ds.stride * g.scale)  # level pixels: read size, stride scaled
    info = {"slide": str(st.slide), "level0_size": [w0, h0], "tile_mpp": g.mpp, "level": g.level, "scale": g.scale,
            "tile_size": ds.tile_size, "read_size": ds.read_sizes[0], "stride": ds.stride, "grid_tiles": grid,
            "tissue_tiles": len(ds.tiles), "tissue_fraction": len(ds.tiles) / max(grid, 1), "index_s": st.index_s,
            "device": str(st.device), "amp": args.amp, "threads": torch.get_num_threads(), "block": args.block,
            "checkpoint": args.checkpoint or "none (freshly initialised)", "runs": []}
    print(f"{st.slide.name}: {w0} x {h0} px at level 0; tiles {ds.tile_size} px at "
          f"{g.mpp if g.mpp is None else round(g.mpp, 4)} um/px (level {g.level}, {ds.read_sizes[0]} px read), "
          f"stride {ds.stride}: {len(ds.tiles)} tissue tiles of {grid} ({info['tissue_fraction']:.1%}); "
          f"index {st.index_s:.2f} s; {torch.get_num_threads()} torch threads on {st.device}")
    return info


def _warm_up(st: _Setup, batch_sizes: List[int]) -> None:
    """One batch (the largest batch size, at most all tiles) through the model."""
    with torch.inference_mode():
        x = torch.stack([st.ds[i][0] for i in range(min(len(st.ds.tiles), max(batch_sizes)))]).to(st.device)
        st.model(x)


def _read_runs(args: argparse.Namespace, st: _Setup, reps: int) -> List[Dict[str, Any]]:
    """Tile reads alone for every ``--workers``: median seconds of ``reps`` passes, tiles_per_s = tiles / seconds."""
    runs, n = [], len(st.ds.tiles)
    for workers in args.workers:
        read_s = _median([_read_pass(st.ds, args.block, workers) for _ in range(reps)])
        runs.append({"what": "read", "workers": workers, "seconds": read_s, "tiles_per_s": n / read_s})
        print(f"  reads only        workers {workers}: {n / read_s:8.1f} tiles/s ({read_s:.2f} s)")
    return runs


def _model_runs(args: argparse.Namespace, st: _Setup, reps: int) -> List[Dict[str, Any]]:
    """The model alone for every ``--batch-size``: median seconds of one forward, tiles_per_s = batch / seconds."""
    runs, n = [], len(st.ds.tiles)
    for bs in args.batch_size:
        x = torch.stack([st.ds[i % n][0] for i in range(bs)]).to(st.device)
        model_s = _median([_model_pass(st.model, x, args.amp) for _ in range(reps)])
        runs.append({"what": "model", "batch_size": bs, "seconds": model_s, "tiles_per_s": bs / model_s})
        print(f"  model only        batch {bs:3d}: {bs / model_s:8.1f} tiles/s ({model_s:.2f} s per batch)")
    return runs


def _infer_runs(args: argparse.Namespace, st: _Setup, reps: int) -> List[Dict[str, Any]]:
    """The whole infer_slide path for every batch size x workers: median wall seconds (index included) and
    infer_s; tiles_per_s = tiles / infer_s."""
    out = []
    for bs, workers in itertools.product(args.batch_size, args.workers):
        runs = []
        for _ in range(reps):
            t = time.perf_counter()
            res = infer_slide(st.model, st.mode, st.slide, st.tile_kwargs, st.transform, st.device, bs, workers,
                              amp=args.amp, block=args.block, progress=False)
            runs.append((time.perf_counter() - t, res["timing"]["infer_s"], res["timing"]["index_s"]))
        total, infer_s, index_1 = (_median([r[j] for r in runs]) for j in range(3))
        tps = res["num_tiles"] / infer_s
        out.append({"what": "infer", "batch_size": bs, "workers": workers, "seconds": total, "infer_s": infer_s,
                    "tiles_per_s": tps})
        print(f"  reads + model     batch {bs:3d}, workers {workers}: {tps:8.1f} tiles/s, {total:.2f} s for the "
              f"slide (index {index_1:.2f} s)")
    return out


def _extrapolate(args: argparse.Namespace, st: _Setup, best: float) -> Dict[str, Any]:
    """A ``--slide-size`` level-0 px slide at ``--slide-mpp`` at ``best`` tiles/s: grid tiles at the tile mpp and,
    per ``--tissue`` fraction f, tiles = f * grid, seconds_per_slide = tiles / best, hours_for_set =
    seconds_per_slide * num_slides / 3600 (index time left out)."""
    ds, g = st.ds, st.ds.geometries[0]
    target_mpp = st.tile_kwargs.get("mpp") or (g.mpp if g.mpp is not None else args.slide_mpp)
    w, h = (v * args.slide_mpp / target_mpp for v in args.slide_size)  # the extrapolated slide in tile pixels
    grid_big = _grid(w, h, ds.tile_size, ds.stride)
    extra = []
    print(f"extrapolated at {best:.1f} tiles/s to a {args.slide_size[0]} x {args.slide_size[1]} px slide at "
          f"{args.slide_mpp} um/px ({grid_big} grid tiles of {ds.tile_size} px at {target_mpp:.3f} um/px, stride "
          f"{ds.stride}; index time not included):")
    for f in args.tissue:
        n = f * grid_big
        sec = n / best
        extra.append({"tissue_fraction": f, "tiles": n, "seconds_per_slide": sec,
                      "hours_for_set": sec * args.num_slides / 3600})
        print(f"  tissue {f:4.0%}: {n:9.0f} tiles, {sec / 60:7.1f} min per slide, "
              f"{sec * args.num_slides / 3600:7.1f} h for {args.num_slides} slides")
    return {"slide_size": args.slide_size, "slide_mpp": args.slide_mpp, "grid_tiles": grid_big,
            "num_slides": args.num_slides, "by_tissue": extra}


def _bench(args: argparse.Namespace) -> int:
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    st = _setup(args)
    _build_index(st)
    _warm_up(st, args.batch_size)
    info = _slide_info(args, st)
    reps = max(int(args.repeat), 1)
    info["runs"] += _read_runs(args, st, reps)
    info["runs"] += _model_runs(args, st, reps)
    info["runs"] += _infer_runs(args, st, reps)
    best = max(r["tiles_per_s"] for r in info["runs"] if r["what"] == "infer")
    info.update(best_tiles_per_s=best, extrapolation=_extrapolate(args, st, best))
    if args.out:
        atomic_write_bytes(Path(args.out), json.dumps(json_ready(info), indent=1).encode())
        print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
