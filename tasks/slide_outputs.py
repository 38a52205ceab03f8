"""What a whole-slide inference run writes: per slide ``<stem>_heatmap.png``, ``<stem>_prob.npy`` and
``<stem>_heatmap.json`` (atomically, the JSON last: :func:`write_outputs`), the check of a finished slide's outputs
for ``--skip-existing`` (:func:`finished_outputs`) and the slide AUC / FROC of ``slide_metrics.json``
(:func:`slide_metrics`). Used by ``tools/infer_slide.py``."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import cv2
import numpy as np

from pce.datasets.camelyon import open_slide, rasterize
from pce.datasets.camelyon.heatmap import overlay_heatmap
from pce.datasets.camelyon.metrics import camelyon_froc, slide_auc
from pce.datasets.camelyon.slide import is_grayscale, read_thumbnail
from pce.engine.errors import PCEError
from pce.tasks.atomic_io import atomic_save_npy, atomic_write_bytes, atomic_write_png, remove_stale_temps
from pce.tasks.slide_inputs import slide_label
from pce.tasks.tooling import json_ready

__all__ = ["META_KEYS", "METRICS_NAME", "output_paths", "write_outputs", "finished_outputs", "slide_metrics"]

# the keys of a finished slide's JSON (one without them is an unfinished slide's, redone by --skip-existing)
META_KEYS = ("slide", "settings", "shape", "downsample", "level", "tile_size", "stride", "num_tiles", "mpp",
              "mpp_source", "score")
METRICS_NAME = "slide_metrics.json"


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
    if not isinstance(meta, dict) or any(k not in meta for k in META_KEYS):
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
