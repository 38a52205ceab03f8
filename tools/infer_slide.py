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
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from pce.datasets import DATASETS, TRANSFORMS, build_transform
from pce.datasets.camelyon import (CamelyonTiles, TileBlocks, annotation_labels, open_slide, rasterize, read_asap_xml,
                                   read_slide_labels, slide_mpp)
from pce.datasets.camelyon.heatmap import HeatmapAccumulator, heatmap_cell, overlay_heatmap
from pce.datasets.camelyon.index import check_inside
from pce.datasets.camelyon.metrics import camelyon_froc, slide_auc
from pce.datasets.camelyon.slide import is_grayscale, read_thumbnail
from pce.engine import load_config
from pce.engine.config import to_plain
from pce.engine.errors import PCEError, add_debug_flag, run_cli
from pce.engine.evaluation import load_trained_weights
from pce.tasks import get_task
from pce.tasks.atomic_io import atomic_save_npy, atomic_write_bytes, atomic_write_png, remove_stale_temps
from pce.tasks.common import check_kwargs
from pce.tasks.tooling import json_ready

_TILE_KEYS = ("level", "tile_size", "stride", "min_tissue", "mpp", "downsample", "label_map", "tissue_level",
              "cache_dir", "level0_mpp")
_RESOLUTION_KEYS = ("level", "mpp", "downsample")
# the keys of a finished slide's JSON (one without them is an unfinished slide's, redone by --skip-existing)
_META_KEYS = ("slide", "settings", "shape", "downsample", "level", "tile_size", "stride", "num_tiles", "mpp",
              "mpp_source", "score")
METRICS_NAME = "slide_metrics.json"


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


def check_stems(slides: Sequence[Path]) -> None:
    """``PCEError`` listing the slides that share a file stem (their outputs and ``<stem>.xml`` would be one)."""
    seen: Dict[str, List[Path]] = {}
    for s in slides:
        seen.setdefault(s.stem.casefold(), []).append(s)
    for same in seen.values():
        if len(same) > 1:
            raise PCEError(", ".join(map(str, same)),
                           f"{len(same)} slides share the file stem {same[0].stem!r}: their outputs "
                           f"({same[0].stem}_heatmap.png, ...) and annotations ({same[0].stem}.xml) would be the "
                           f"same files", "slides with distinct file stems: rename one, or run each into its own --out")


def slide_infos(slides: Sequence[Path], mpp_flag: Optional[float], need_mpp: bool) -> Dict[Path, Dict[str, Any]]:
    """Level-0 size and microns per pixel of every slide (opened here, so an unreadable one fails before the model
    is loaded): the slide's own mpp tags, else ``--mpp``; none while the FROC needs it is an error naming the slide."""
    out = {}
    for s in slides:
        with open_slide(s) as sl:
            dims, own = tuple(sl.dimensions), slide_mpp(sl)
        if own is None and mpp_flag is None and need_mpp:
            raise PCEError(s, "the slide records no microns per pixel (openslide.mpp-x / mpp-y), which the FROC "
                              "needs to measure lesions", "--mpp X: the level-0 microns per pixel of its scanner, "
                                                          "e.g. --mpp 0.243 for Camelyon16's")
        if own is not None and mpp_flag is not None and abs(own - mpp_flag) > 0.01 * own:
            print(f"note: {s}: the slide records {own:g} um/px; --mpp {mpp_flag:g} applies only to slides that record "
                  f"none", file=sys.stderr)
        out[s] = {"dims": dims, "mpp": own if own is not None else mpp_flag,
                  "mpp_source": "slide" if own is not None else ("--mpp" if mpp_flag is not None else None)}
    return out


def load_annotations(xml_dir: Path, slides: Sequence[Path], infos: Dict[Path, Dict[str, Any]],
                     label_map: Optional[Dict[str, int]]) -> Dict[Path, Optional[list]]:
    """Every slide's annotations (``xml_dir/<stem>.xml``, None for a slide without one), read and checked before
    any slide is processed: the folder must hold the XML of at least one slide, every group must be in the label
    map and every coordinate inside its slide (errors name the XML)."""
    if not xml_dir.is_dir():
        raise PCEError(xml_dir, "annotation folder not found", "a folder of ASAP XML files named <slide stem>.xml")
    xmls = {s: xml_dir / f"{s.stem}.xml" for s in slides}
    if not any(x.is_file() for x in xmls.values()):
        names = [x.name for x in xmls.values()]
        shown = ", ".join(names[:6]) + (f", ... ({len(names)} in all)" if len(names) > 6 else "")
        raise PCEError(xml_dir, f"holds the annotations of none of the slides (looked for {shown})",
                       "the ASAP XML of each tumour slide, named <slide stem>.xml; a slide without one is normal")
    out: Dict[Path, Optional[list]] = {}
    for s, xml in xmls.items():
        if not xml.is_file():
            out[s] = None
            continue
        anns = read_asap_xml(xml)
        annotation_labels(anns, label_map, source=str(xml))
        check_inside(anns, infos[s]["dims"], str(xml))
        out[s] = anns
    return out


def slide_label(anns: Optional[list], label_map: Optional[Dict[str, int]]) -> int:
    """1 when the slide's annotations hold a tumour polygon (however small), else 0."""
    if not anns:
        return 0
    return int(any(lab > 0 and a.kind == "polygon" for a, lab in zip(anns, annotation_labels(anns, label_map))))


def load_model(cfg: Any, task: Any, checkpoint: str, device: torch.device) -> torch.nn.Module:
    """The task's model of ``cfg`` made the trained one of ``checkpoint`` through the one loading path of eval /
    infer / export (pruned expert structure replayed, EMA weights, the phase it was saved in), eval mode."""
    if not Path(checkpoint).is_file():  # fail before building the model
        raise PCEError(checkpoint, "checkpoint not found", "a .pth written by tools/train.py")
    model = task.build_model(cfg)
    load_trained_weights(model, cfg, checkpoint)
    return model.to(device).eval()


def _autocast(device: torch.device, amp: str):
    """``torch.autocast`` for ``amp`` ("bf16" / "fp16") on CUDA; nothing on a CPU or with ``"none"``."""
    if amp == "none" or device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def tile_dataset(slide: Path, mode: str, tile_kwargs: Dict[str, Any], transform: Any) -> CamelyonTiles:
    """The tissue tiles of one slide (the cached index when there is one)."""
    return CamelyonTiles([slide], mode=mode, transform=transform, **tile_kwargs)


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
        with _autocast(device, amp):
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
        pending: List[Tuple[torch.Tensor, torch.Tensor]] = []
        held = 0
        for images, idx in loader:
            pending.append((images, idx))
            held += len(idx)
            while held >= batch_size:
                imgs, ids = torch.cat([p[0] for p in pending]), torch.cat([p[1] for p in pending])
                run(imgs[:batch_size], ids[:batch_size])
                bar.update(batch_size)
                held -= batch_size
                pending = [(imgs[batch_size:], ids[batch_size:])] if held else []
        if held:
            run(torch.cat([p[0] for p in pending]), torch.cat([p[1] for p in pending]))
            bar.update(held)
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


def output_paths(out: Path, slide: Path) -> List[Path]:
    """``[heat-map PNG, probability .npy, JSON]`` of ``slide`` in ``out`` (the JSON, written last, marks it done)."""
    return [out / f"{slide.stem}_heatmap.png", out / f"{slide.stem}_prob.npy", out / f"{slide.stem}_heatmap.json"]


def write_outputs(slide: Path, res: Dict[str, Any], paths: Sequence[Path], png_size: int,
                  meta: Dict[str, Any]) -> Dict[str, Any]:
    """Write the PNG, the .npy and the JSON of one slide, each atomically, the JSON last; returns the JSON."""
    png, npy, js = paths
    with open_slide(slide) as s:
        w0, h0 = s.dimensions
        scale = png_size / max(w0, h0)
        thumb = read_thumbnail(s, (max(int(w0 * scale), 1), max(int(h0 * scale), 1)))
    prob = cv2.resize(res["prob"], (thumb.shape[1], thumb.shape[0]), interpolation=cv2.INTER_LINEAR)
    cov = cv2.resize(res["covered"].astype(np.uint8), (thumb.shape[1], thumb.shape[0]),
                     interpolation=cv2.INTER_NEAREST) > 0
    remove_stale_temps(paths)
    atomic_write_png(png, overlay_heatmap(thumb, prob, cov))
    atomic_save_npy(npy, res["prob"])
    info = {"slide": str(slide), **meta, "shape": list(res["prob"].shape), "grayscale": is_grayscale(thumb),
            **{k: res[k] for k in ("downsample", "level", "tile_size", "stride", "num_tiles", "tile_mpp", "scale",
                                   "read_size", "score", "timing")}}
    atomic_write_bytes(js, json.dumps(json_ready(info), indent=1).encode())
    return info


def finished_outputs(paths: Sequence[Path], settings: Dict[str, Any], force: bool) -> Optional[Dict[str, Any]]:
    """The result of a finished slide (its three files present, the JSON complete and made with ``settings``),
    else ``None``. A finished slide of other settings (checkpoint, tiles) is an error unless ``force``."""
    png, npy, js = paths
    if not all(p.is_file() for p in paths):
        return None
    try:
        meta = json.loads(js.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or any(k not in meta for k in _META_KEYS):
        return None
    if meta["settings"] != settings:
        if force:
            return None
        old = meta["settings"] if isinstance(meta["settings"], dict) else {}
        key = next((k for k in settings if old.get(k) != settings[k]), "settings")
        raise PCEError(js, f"the finished output of another run ({key}: {old.get(key)!r} there, {settings[key]!r} "
                           f"now)", "--force to replace it, or another --out folder")
    try:
        prob = np.load(npy, allow_pickle=False)
    except (OSError, ValueError):
        return None
    if list(prob.shape) != list(meta["shape"]):
        return None
    return {**meta, "prob": prob}


def read_labels(path: Path, slides: Sequence[Path]) -> Dict[Path, int]:
    """Every slide's label (1: tumour) from a CSV of ``slide,label`` rows (Camelyon17's ``stages.csv``:
    ``negative`` -> 0, ``itc`` / ``micro`` / ``macro`` -> 1; Camelyon16's reference: ``Normal`` / ``Tumor``); a slide
    missing from it is an error naming it."""
    try:
        table = read_slide_labels(path)[0]
    except (OSError, ValueError) as e:
        raise PCEError(path, str(e).split(": ", 1)[-1], "a CSV of slide,label rows") from None
    missing = [s for s in slides if s.stem.lower() not in table]
    if missing:
        raise PCEError(path, f"has no label for {len(missing)} slide(s) ({', '.join(m.name for m in missing[:4])}"
                             f"{', ...' if len(missing) > 4 else ''})", "a slide,label row for every slide")
    return {s: int(table[s.stem.lower()] not in ("negative", "normal", "0", "false")) for s in slides}


def slide_metrics(slides: Sequence[Path], results: Sequence[Dict[str, Any]],
                  annotations: Optional[Dict[Path, Optional[list]]], infos: Dict[Path, Dict[str, Any]],
                  label_map: Optional[Dict[str, int]], labels: Optional[Dict[Path, int]] = None) -> Dict[str, Any]:
    """Slide AUC (slide labels from ``labels``, else from the annotations) and, with ``annotations``, the FROC,
    over the slides with tissue tiles (a slide without one is ``excluded``)."""
    used, excluded = [], {}
    for s, r in zip(slides, results):
        if r["num_tiles"] == 0:
            excluded[str(s)] = "no tissue tile: an empty map"
        else:
            used.append((s, r))
    if not used:
        raise PCEError(", ".join(excluded), "no slide has a tissue tile: there is nothing to score",
                       "slides with tissue (or a lower data.<split>.kwargs.min_tissue)")
    slide_labels, masks, ums = [], [], []
    for s, r in used:
        anns = annotations[s] if annotations is not None else None
        h, w = r["prob"].shape
        mask = rasterize(anns, (0, 0), (w, h), r["downsample"], label_map) == 1 if anns else None
        slide_labels.append(labels[s] if labels is not None else slide_label(anns, label_map))
        masks.append(mask)
        ums.append(infos[s]["mpp"] * r["downsample"] if infos[s]["mpp"] is not None else None)
    froc = camelyon_froc([r["prob"] for _, r in used], masks, ums) if annotations is not None else {}
    return {"slide_AUC": slide_auc([r["score"] for _, r in used], slide_labels), **froc,
            "slides": {str(s): {"label": lab, "score": r["score"], "num_tiles": r["num_tiles"],
                                "mpp": infos[s]["mpp"], "mpp_source": infos[s]["mpp_source"],
                                "tile_mpp": r.get("tile_mpp")}
                       for (s, r), lab in zip(used, slide_labels)},
            "excluded": excluded}


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


def _infer(args: argparse.Namespace) -> int:
    for name in ("--stride", "--mpp", "--tile-mpp", "--batch-size", "--png-size"):
        _positive(name, getattr(args, name[2:].replace("-", "_")))
    cfg = load_config(args.config, args.cfg_options)
    task = get_task(cfg.task)
    mode = slide_tile_mode(task)
    split, sc = eval_split(cfg)
    check_split_options(split, sc)
    tile_kwargs = {k: v for k, v in to_plain(sc.kwargs).items() if k in _TILE_KEYS}
    if args.stride:
        tile_kwargs["stride"] = args.stride
    if args.tile_mpp:
        tile_kwargs = {k: v for k, v in tile_kwargs.items() if k not in _RESOLUTION_KEYS}
        tile_kwargs["mpp"] = args.tile_mpp
    if args.mpp and "level0_mpp" not in tile_kwargs:
        tile_kwargs["level0_mpp"] = args.mpp
    label_map = tile_kwargs.get("label_map")
    slides = [Path(s) for s in args.slides]
    check_stems(slides)
    infos = slide_infos(slides, args.mpp, need_mpp=bool(args.annotations))
    annotations = load_annotations(Path(args.annotations), slides, infos, label_map) if args.annotations else None
    labels = read_labels(Path(args.labels), slides) if args.labels else None
    scoring = annotations is not None or labels is not None

    out = Path(args.out)
    ckpt = Path(args.checkpoint)
    if not ckpt.is_file():
        raise PCEError(ckpt, "checkpoint not found", "a .pth written by tools/train.py")
    st = ckpt.stat()
    settings = json_ready({"checkpoint": str(ckpt.resolve()), "checkpoint_bytes": st.st_size,
                           "checkpoint_mtime_ns": st.st_mtime_ns, "mode": mode,
                           "tiles": {k: v for k, v in tile_kwargs.items() if k != "cache_dir"}})
    done: Dict[Path, Dict[str, Any]] = {}
    for s in slides:  # decide every slide's fate before writing anything
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
    if bar is not None:
        bar.close()
    if scoring:
        metrics = slide_metrics(slides, results, annotations, infos, label_map, labels)
        atomic_write_bytes(metrics_path, json.dumps(json_ready(metrics), indent=1).encode())
        froc = (f"\nFROC: {metrics['FROC']:.4f} ({metrics['num_lesions']} lesions)" if "FROC" in metrics else "")
        excluded = f", {len(metrics['excluded'])} excluded" if metrics["excluded"] else ""
        print(f"slide_AUC: {metrics['slide_AUC']:.4f} ({len(metrics['slides'])} slides{excluded}){froc} "
              f"-> {metrics_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
