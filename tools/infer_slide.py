#!/usr/bin/env python
"""Slide a trained tumour model over every tissue tile of whole slides; write tumour-probability heat-maps.

    python tools/infer_slide.py configs/demo_camelyon_seg_pce.py \\
        --checkpoint work_dirs/demo_camelyon_seg_pce/best.pth data/demo_camelyon/testing/images/test_001.tif --out out/
    python tools/infer_slide.py CONFIG --checkpoint CKPT data/camelyon16/testing/images/*.tif --out out/ \\
        --annotations data/camelyon16/testing/lesion_annotations       # + slide AUC and FROC

The tiles (level, tile size, minimum tissue) are those of the config's evaluation split (data.test, else data.val);
``--stride`` overlaps them (the map averages overlapping tiles). Segmentation models give a per-pixel tumour
probability (pooled to the map's cells), classification models one probability per tile (the task's
``slide_tile_mode``: "segment" or "classify"; a task without one, such as detection, cannot run on slides); the
checkpoint is loaded as tools/eval.py loads it (a pruned checkpoint's experts, EMA weights, its saved phase). For
each SLIDE:
``OUT/<stem>_heatmap.png`` (the map over the thumbnail), ``OUT/<stem>_prob.npy`` (float32 [h, w]; 0 where no tissue
tile) and ``OUT/<stem>_heatmap.json`` (level-0 pixels per map pixel, level, tile size, the slide score = max).
With ``--annotations DIR`` (``DIR/<stem>.xml``; a slide without one is normal), ``OUT/slide_metrics.json`` holds
the slide-level AUC (max probability per slide) and the Camelyon16 FROC (MONAI).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from pce.datasets import build_transform
from pce.datasets.camelyon import CamelyonTiles, open_slide, rasterize, read_asap_xml, slide_mpp
from pce.datasets.camelyon.heatmap import HeatmapAccumulator, heatmap_cell, overlay_heatmap
from pce.datasets.camelyon.metrics import camelyon_froc, slide_auc
from pce.engine import ConfigError, load_config
from pce.engine.errors import PCEError
from pce.engine.evaluation import load_trained_weights
from pce.tasks import get_task

_TILE_KEYS = ("level", "tile_size", "stride", "min_tissue", "mpp", "downsample", "label_map", "tissue_level",
              "cache_dir")


def eval_split(cfg: Any) -> Any:
    for split in ("test", "val"):
        if cfg.data[split].name:
            return cfg.data[split]
    raise ValueError("data.val: the config defines no evaluation split (expected data.test or data.val tiles)")


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
    if not Path(checkpoint).is_file():  # fail before building the model
        raise FileNotFoundError(f"{checkpoint}: checkpoint not found (expected a .pth written by tools/train.py)")
    model = task.build_model(cfg)
    load_trained_weights(model, cfg, checkpoint)
    return model.to(device).eval()


@torch.no_grad()
def infer_slide(model: torch.nn.Module, mode: str, slide: Path, tile_kwargs: Dict[str, Any], transform: Any,
                device: torch.device, batch_size: int, workers: int) -> Dict[str, Any]:
    """Tumour-probability map of one slide: ``{"prob", "covered", "downsample" (level-0 px per map px), ...}``.
    ``mode``: the task's ``slide_tile_mode`` (``"segment"``: logits ``[B, 2, s, s]``, a probability per pixel
    pooled to the map's cells; ``"classify"``: logits ``[B, 2]``, one probability per tile)."""
    ds = CamelyonTiles([slide], mode=mode, transform=transform, **tile_kwargs)
    per_pixel = mode == "segment"
    cell = heatmap_cell(ds.tile_size, ds.stride, per_pixel)
    with open_slide(slide) as s:
        level_size, mpp = s.level_dimensions[ds.level], slide_mpp(s)
    acc = HeatmapAccumulator(level_size, cell, ds.tile_size)
    loader = DataLoader(ds, batch_size=batch_size, num_workers=workers)
    d, k = ds.downsamples[0], 0
    for images, _ in tqdm(loader, desc=slide.name, unit="batch", file=sys.stderr):
        logits = model(images.to(device)).float()
        probs = logits.softmax(1)[:, 1]
        probs = F.avg_pool2d(probs[:, None], cell)[:, 0] if per_pixel else probs
        for p in probs.cpu().numpy():
            t = ds.tiles[k]
            acc.add(round(t["x"] / d), round(t["y"] / d), p)
            k += 1
    prob, covered = acc.result()
    return {"prob": prob, "covered": covered, "downsample": d * cell, "level": ds.level, "tile_size": ds.tile_size,
            "stride": ds.stride, "num_tiles": len(ds.tiles), "mpp": mpp,
            "score": float(prob.max()) if prob.size else 0.0}


def write_outputs(slide: Path, res: Dict[str, Any], out: Path, png_size: int) -> Path:
    with open_slide(slide) as s:
        w0, h0 = s.dimensions
        scale = png_size / max(w0, h0)
        size = (max(int(w0 * scale), 1), max(int(h0 * scale), 1))
        thumb = np.asarray(s.get_thumbnail(size).convert("RGB"))
    prob = cv2.resize(res["prob"], (thumb.shape[1], thumb.shape[0]), interpolation=cv2.INTER_LINEAR)
    cov = cv2.resize(res["covered"].astype(np.uint8), (thumb.shape[1], thumb.shape[0]),
                     interpolation=cv2.INTER_NEAREST) > 0
    png = out / f"{slide.stem}_heatmap.png"
    cv2.imwrite(str(png), overlay_heatmap(thumb, prob, cov)[..., ::-1], [cv2.IMWRITE_PNG_COMPRESSION, 9])
    np.save(out / f"{slide.stem}_prob.npy", res["prob"])
    meta = {k: res[k] for k in ("downsample", "level", "tile_size", "stride", "num_tiles", "mpp", "score")}
    (out / f"{slide.stem}_heatmap.json").write_text(json.dumps({"slide": str(slide), **meta}, indent=1))
    return png


def slide_metrics(slides: List[Path], results: List[Dict[str, Any]], xml_dir: Path) -> Dict[str, Any]:
    """Slide AUC and FROC against ``xml_dir/<stem>.xml`` (a slide without one is normal)."""
    if not xml_dir.is_dir():
        raise FileNotFoundError(f"{xml_dir}: annotation folder not found (expected <slide stem>.xml files)")
    labels, masks, ums = [], [], []
    for slide, r in zip(slides, results):
        xml = xml_dir / f"{slide.stem}.xml"
        h, w = r["prob"].shape
        mask = rasterize(read_asap_xml(xml), (0, 0), (w, h), r["downsample"]) == 1 if xml.is_file() else None
        labels.append(int(mask is not None and bool(mask.any())))
        masks.append(mask)
        ums.append((r["mpp"] or 0.243) * r["downsample"])  # Camelyon16's level-0 resolution when unknown
    froc = camelyon_froc([r["prob"] for r in results], masks, ums)
    return {"slide_AUC": slide_auc([r["score"] for r in results], labels), **froc,
            "slides": {str(s): {"label": lab, "score": r["score"]} for s, lab, r in zip(slides, labels, results)}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config")
    ap.add_argument("--checkpoint", required=True, help="a .pth written by tools/train.py (best.pth, latest.pth)")
    ap.add_argument("slides", nargs="+", help="whole-slide image files")
    ap.add_argument("--out", required=True, help="output folder")
    ap.add_argument("--stride", type=int, default=None, help="tile step in level pixels (default: the config's)")
    ap.add_argument("--annotations", default=None, help="folder of <slide stem>.xml: slide AUC and FROC")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--png-size", type=int, default=1024, help="longest side of the overlay PNG")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.cfg_options)
        task = get_task(cfg.task)
        mode = slide_tile_mode(task)
        sc = eval_split(cfg)
        tile_kwargs = {k: v for k, v in dict(sc.kwargs).items() if k in _TILE_KEYS}
        if args.stride:
            tile_kwargs["stride"] = args.stride
        slides = [Path(s) for s in args.slides]
        for s in slides:
            open_slide(s).close()  # fail before loading the model
        device = torch.device(args.device)
        model = load_model(cfg, task, args.checkpoint, device)
        kw = {k: v for k, v in dict(sc.transform.kwargs).items() if k != "seed"}
        transform = build_transform(sc.transform.name, **dict(kw, train=False)) if sc.transform.name else None
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        results = []
        for s in slides:
            results.append(infer_slide(model, mode, s, tile_kwargs, transform, device, args.batch_size,
                                       args.workers))
            png = write_outputs(s, results[-1], out, args.png_size)
            print(f"{s}: {results[-1]['num_tiles']} tiles at level {results[-1]['level']} "
                  f"({results[-1]['tile_size']} px), max tumour probability {results[-1]['score']:.3f} -> {png}")
        if args.annotations:
            metrics = slide_metrics(slides, results, Path(args.annotations))
            (out / "slide_metrics.json").write_text(json.dumps(metrics, indent=1))
            print(f"slide_AUC: {metrics['slide_AUC']:.4f}\nFROC: {metrics['FROC']:.4f} "
                  f"({metrics['num_lesions']} lesions) -> {out / 'slide_metrics.json'}")
    except (ConfigError, PCEError, FileNotFoundError, RuntimeError, ValueError, KeyError, FloatingPointError) as e:
        print(f"error: {e.args[0] if isinstance(e, KeyError) and e.args else e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
