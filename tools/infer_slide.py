#!/usr/bin/env python
"""Slide a trained tumour model over every tissue tile of whole slides; write tumour-probability heat-maps.

    python tools/infer_slide.py configs/demo_camelyon_seg_pce.py \\
        --checkpoint work_dirs/demo_camelyon_seg_pce/best.pth data/demo_camelyon/testing/images/test_001.tif --out out/
    python tools/infer_slide.py CONFIG --checkpoint CKPT data/camelyon16/testing/images/*.tif --out out/ \\
        --annotations data/camelyon16/testing/lesion_annotations       # + slide AUC and FROC
    python tools/infer_slide.py CONFIG --checkpoint CKPT slides/*.tif --out out/ --skip-existing   # resume a folder
    python tools/infer_slide.py CONFIG --checkpoint CKPT slide.svs --out out/ --tile-mpp 1.0 --device cuda --workers 8

The tiles (resolution: ``mpp`` or ``level``, tile size, minimum tissue) are those of the config's evaluation split
(data.test, else data.val; its ``kwargs`` are checked against the dataset's arguments as tools/eval.py checks them,
so a typo is named); ``--tile-mpp`` sets their microns per pixel instead (each slide is read from its closest
finer-or-equal level and resampled: the same tiles as training and tools/eval.py read at that mpp), ``--stride``
overlaps them (the map averages overlapping tiles). Only tissue tiles are read (the slide's tile index, cached under
the split's ``cache_dir``), in blocks of ``--block`` x ``--block`` grid positions, so that overlapping tiles are cut
from one read instead of being read again, by ``--workers`` DataLoader processes; ``--device cuda`` runs the model
and the batches on the GPU (pinned memory, non-blocking copies; ``--amp bf16`` / ``fp16`` autocast). Segmentation
models give a per-pixel tumour probability (pooled to the map's cells), classification models one probability per
tile (the task's ``slide_tile_mode``: "segment" or "classify"; a task without one, such as detection, cannot run on
slides); the checkpoint is loaded as tools/eval.py loads it (a pruned checkpoint's experts, EMA weights, its saved
phase). For each SLIDE: ``OUT/<stem>_heatmap.png`` (the map over the thumbnail), ``OUT/<stem>_prob.npy`` (float32
[h, w]; 0 where no tissue tile) and ``OUT/<stem>_heatmap.json`` (level-0 pixels per map pixel, level, tile size,
read size, the microns per pixel of the tiles, the number of tissue tiles, the time taken and tiles per second, the
slide score = max, the level-0 microns per pixel and where they came from, the checkpoint and tile settings).
Slides must have distinct file stems (their outputs and ``<stem>.xml`` are named by it): two slides with one stem
are an error listing both.

Outputs are written atomically (a temp file in OUT, then renamed; the JSON last, so a slide with all three files and
a complete JSON is finished): a crash or a full disk leaves the previous files or none, never half a file. An
existing output is never overwritten without ``--force``; ``--skip-existing`` skips finished slides (with a note) and
redoes unfinished ones, so an interrupted run over a folder of slides resumes where it stopped.

With ``--annotations DIR`` (``DIR/<stem>.xml``; a slide without one is normal; DIR must hold the XML of at least one
slide, and every annotation must lie inside its slide), ``OUT/slide_metrics.json`` holds the slide-level AUC (max
probability per slide) and the Camelyon16 FROC (MONAI), with each slide's label, score and microns per pixel. The
FROC measures lesions in microns: a slide whose file records no resolution needs ``--mpp``. With ``--labels CSV``
(``slide,label`` rows, e.g. Camelyon17's ``stages.csv``: ``negative`` is normal, ``itc`` / ``micro`` / ``macro``
tumour) the slide AUC uses those labels (without ``--annotations``: the slide AUC only). A slide without any
tissue tile (a blank or unreadable scan) gets an empty map and ``num_tiles: 0`` and is left out of the metrics, with a
message (``excluded`` in the JSON). Errors are one line (``--debug`` shows the traceback).

This file is the command line (arguments, the run over the slides); the heat-map of a slide lives in
``tasks/slide_inference.py``, the checks of the inputs in ``tasks/slide_inputs.py``, the outputs and the slide
metrics in ``tasks/slide_outputs.py`` (``pce.tasks.slide_*``).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from tqdm import tqdm

from pce.datasets import build_transform
from pce.engine import load_config
from pce.engine.config import to_plain
from pce.engine.errors import PCEError, add_debug_flag, run_cli
from pce.tasks import get_task
from pce.tasks.atomic_io import atomic_write_bytes
# the reusable parts, importable from here too (tests and tools/bench_slide.py use these names)
from pce.tasks.slide_inference import (RESOLUTION_KEYS as _RESOLUTION_KEYS, TILE_KEYS as _TILE_KEYS,  # noqa: F401
                                       autocast as _autocast, check_split_options, eval_split, infer_slide,
                                       load_model, slide_tile_mode, tile_dataset)
from pce.tasks.slide_inputs import (check_stems, load_annotations, read_labels, slide_infos,  # noqa: F401
                                    slide_label)
from pce.tasks.slide_outputs import (META_KEYS as _META_KEYS, METRICS_NAME, finished_outputs,  # noqa: F401
                                     output_paths, slide_metrics, write_outputs)
from pce.tasks.tooling import json_ready


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _positive(name: str, value: Optional[float]) -> None:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise PCEError(name, f"{value} is not a positive number", f"{name} > 0")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config")
    ap.add_argument("--checkpoint", required=True, help="a .pth written by tools/train.py (best.pth, latest.pth)")
    ap.add_argument("slides", nargs="+", help="whole-slide image files (with distinct file stems)")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--force", action="store_true", help="replace existing outputs (refused without it)")
    ap.add_argument("--skip-existing", action="store_true",
                    help="skip slides whose outputs are finished (resume a folder); redo unfinished ones")
    ap.add_argument("--stride", type=int, default=None, help="tile step in tile pixels (default: the config's)")
    ap.add_argument("--tile-mpp", type=float, default=None,
                    help="microns per pixel of the tiles (instead of the config's level / mpp): each slide is read "
                         "from its closest finer-or-equal level and resampled")
    ap.add_argument("--annotations", default=None, help="folder of <slide stem>.xml: slide AUC and FROC")
    ap.add_argument("--labels", default=None,
                    help="CSV of slide,label rows (Camelyon17's stages.csv): the slide AUC's labels")
    ap.add_argument("--mpp", type=float, default=None,
                    help="level-0 microns per pixel of slides whose file records none (the FROC and --tile-mpp / "
                         "mpp tiles need it)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--workers", type=int, default=0, help="DataLoader processes reading tiles")
    ap.add_argument("--block", type=int, default=8,
                    help="read tiles in blocks of BLOCK x BLOCK grid positions (one read per block when its tiles "
                         "cover most of it: overlapping tiles are read once); 0: tile by tile")
    ap.add_argument("--png-size", type=int, default=1024, help="longest side of the overlay PNG")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (the model and batches go there)")
    ap.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"], help="autocast on CUDA")
    ap.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE")
    add_debug_flag(ap)
    args = ap.parse_args(argv)
    return run_cli(lambda: _run(args), debug=args.debug)


def _run(args: argparse.Namespace) -> int:
    with warnings.catch_warnings():
        warnings.showwarning = _warning_line
        return _infer(args)


def _tile_kwargs(args: argparse.Namespace, sc: Any) -> Dict[str, Any]:
    """The evaluation split's tile options, with ``--stride``, ``--tile-mpp`` and ``--mpp`` applied."""
    tile_kwargs = {k: v for k, v in to_plain(sc.kwargs).items() if k in _TILE_KEYS}
    if args.stride:
        tile_kwargs["stride"] = args.stride
    if args.tile_mpp:
        tile_kwargs = {k: v for k, v in tile_kwargs.items() if k not in _RESOLUTION_KEYS}
        tile_kwargs["mpp"] = args.tile_mpp
    if args.mpp and "level0_mpp" not in tile_kwargs:
        tile_kwargs["level0_mpp"] = args.mpp
    return tile_kwargs


def _settings(ckpt: Path, mode: str, tile_kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """What makes a slide's outputs (the checkpoint file and the tiles), recorded in its JSON."""
    if not ckpt.is_file():
        raise PCEError(ckpt, "checkpoint not found", "a .pth written by tools/train.py")
    st = ckpt.stat()
    return json_ready({"checkpoint": str(ckpt.resolve()), "checkpoint_bytes": st.st_size,
                       "checkpoint_mtime_ns": st.st_mtime_ns, "mode": mode,
                       "tiles": {k: v for k, v in tile_kwargs.items() if k != "cache_dir"}})


def _finished_slides(args: argparse.Namespace, slides: List[Path], out: Path, settings: Dict[str, Any],
                     scoring: bool) -> Dict[Path, Dict[str, Any]]:
    """Every slide's fate, decided before anything is written: the finished ones (``--skip-existing``) by slide;
    an existing output without ``--force`` / ``--skip-existing`` is an error."""
    done: Dict[Path, Dict[str, Any]] = {}
    for s in slides:
        paths = output_paths(out, s)
        if args.skip_existing:
            finished = finished_outputs(paths, settings, args.force)
            if finished is not None:
                done[s] = finished
                continue
        elif not args.force:
            existing = [p for p in paths if p.exists()]
            if existing:
                raise PCEError(existing[0], "exists: the output of an earlier run",
                               "--force to replace it, --skip-existing to keep finished slides, or another --out")
    metrics_path = out / METRICS_NAME
    if scoring and metrics_path.exists() and not (args.force or args.skip_existing):
        raise PCEError(metrics_path, "exists: the output of an earlier run",
                       "--force to replace it, --skip-existing to resume, or another --out")
    return done


def _report_slide(s: Path, res: Dict[str, Any], info: Dict[str, Any], paths: List[Path],
                  tile_kwargs: Dict[str, Any], scoring: bool) -> None:
    """The warnings (grayscale, no tissue) and the summary line of one processed slide."""
    if info["grayscale"] and res["num_tiles"]:
        print(f"warning: {s}: a grayscale scan: the model sees grey tiles, its probabilities may not hold for "
              f"stained (colour) slides", file=sys.stderr)
    if res["num_tiles"] == 0:
        print(f"warning: {s}: no tissue tile (min_tissue={tile_kwargs.get('min_tissue', 0.5)}, level "
              f"{res['level']}): an empty map, num_tiles 0" + (", excluded from the slide AUC and FROC"
                                                               if scoring else ""),
              file=sys.stderr)
    t = res["timing"]
    mpp = f"{res['tile_mpp']:.3f} um/px, " if res["tile_mpp"] is not None else ""
    speed = f", {t['tiles_per_s']:.1f} tiles/s" if t["tiles_per_s"] else ""
    print(f"{s}: {res['num_tiles']} tiles at level {res['level']} ({mpp}{res['tile_size']} px from "
          f"{res['read_size']} px), max tumour probability {res['score']:.3f}, {t['infer_s']:.1f} s{speed} "
          f"-> {paths[0]}")


def _write_metrics(slides: List[Path], results: List[Dict[str, Any]], annotations: Any, infos: Dict[Path, Any],
                   label_map: Any, labels: Any, metrics_path: Path) -> None:
    metrics = slide_metrics(slides, results, annotations, infos, label_map, labels)
    atomic_write_bytes(metrics_path, json.dumps(json_ready(metrics), indent=1).encode())
    froc = (f"\nFROC: {metrics['FROC']:.4f} ({metrics['num_lesions']} lesions)" if "FROC" in metrics else "")
    excluded = f", {len(metrics['excluded'])} excluded" if metrics["excluded"] else ""
    print(f"slide_AUC: {metrics['slide_AUC']:.4f} ({len(metrics['slides'])} slides{excluded}){froc} "
          f"-> {metrics_path}")


def _infer(args: argparse.Namespace) -> int:
    for name in ("--stride", "--mpp", "--tile-mpp", "--batch-size", "--png-size"):
        _positive(name, getattr(args, name[2:].replace("-", "_")))
    cfg = load_config(args.config, args.cfg_options)
    if cfg.runtime.num_threads > 0:  # as tools/train.py, tools/eval.py and tools/infer.py apply it
        torch.set_num_threads(cfg.runtime.num_threads)
    task = get_task(cfg.task)
    mode = slide_tile_mode(task)
    split, sc = eval_split(cfg)
    check_split_options(split, sc)
    tile_kwargs = _tile_kwargs(args, sc)
    label_map = tile_kwargs.get("label_map")
    slides = [Path(s) for s in args.slides]
    check_stems(slides)
    infos = slide_infos(slides, args.mpp, need_mpp=bool(args.annotations))
    annotations = load_annotations(Path(args.annotations), slides, infos, label_map) if args.annotations else None
    labels = read_labels(Path(args.labels), slides) if args.labels else None
    scoring = annotations is not None or labels is not None

    out = Path(args.out)
    settings = _settings(Path(args.checkpoint), mode, tile_kwargs)
    done = _finished_slides(args, slides, out, settings, scoring)

    results: List[Dict[str, Any]] = []
    model = device = transform = None
    if len(done) < len(slides):
        device = torch.device(args.device)
        model = load_model(cfg, task, args.checkpoint, device)
        kw = {k: v for k, v in to_plain(sc.transform.kwargs).items() if k != "seed"}
        transform = build_transform(sc.transform.name, **dict(kw, train=False)) if sc.transform.name else None
        out.mkdir(parents=True, exist_ok=True)
    todo = [s for s in slides if s not in done]
    bar = tqdm(todo, desc="slides", unit="slide", file=sys.stderr, disable=None) if len(todo) > 1 else None
    for s in slides:
        if s in done:
            results.append(done[s])
            print(f"{s}: finished outputs in {out}: skipped (--skip-existing)")
            continue
        paths = output_paths(out, s)
        if args.skip_existing and any(p.exists() for p in paths):
            print(f"note: {s}: unfinished outputs in {out}: redoing them", file=sys.stderr)
        res = infer_slide(model, mode, s, tile_kwargs, transform, device, args.batch_size, args.workers,
                          amp=args.amp, block=args.block)
        meta = {"settings": settings, "mpp": infos[s]["mpp"], "mpp_source": infos[s]["mpp_source"]}
        info = write_outputs(s, res, paths, args.png_size, meta)
        results.append(res)
        if bar is not None:
            bar.update(1)
        _report_slide(s, res, info, paths, tile_kwargs, scoring)
    if bar is not None:
        bar.close()
    if scoring:
        _write_metrics(slides, results, annotations, infos, label_map, labels, out / METRICS_NAME)
    return 0


if __name__ == "__main__":
    sys.exit(main())
