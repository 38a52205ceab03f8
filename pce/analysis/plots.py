"""Matplotlib figures (Agg backend) of routing maps and routing statistics: PNG at :data:`DPI` dots per inch,
or PDF / SVG by the output path's suffix. The routing overlay itself is drawn by :mod:`pce.analysis.overlay`."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from pce.analysis.overlay import draw_layer_row, expert_palette  # noqa: E402

__all__ = ["expert_colors", "routing_figure", "usage_figure", "nmi_figure", "expert_class_figure",
           "expert_position_figure", "cluster_figure", "curves_figure", "DPI"]

DPI = 200  # every figure's resolution (paper quality: 150 or more)


def expert_colors(n: int) -> np.ndarray:
    """``[n, 4]`` RGBA colours of experts 0..n-1: Okabe-Ito (colour-blind safe) for up to 8 experts, else
    ``tab20`` with hatches (:func:`pce.analysis.overlay.expert_palette`)."""
    return expert_palette(n)


def short(layer: str) -> str:
    """``net.encoder.backbone.stages.3.layers.0`` -> ``stages.3.layers.0`` (titles)."""
    i = layer.find("stages.")
    return layer[i:] if i >= 0 else layer


def _save(fig, path, dpi: Optional[int] = None, tight: bool = True) -> Path:
    """Write ``fig`` to ``path`` at ``dpi`` (default :data:`DPI`; format by the suffix, PNG without one)
    atomically (a temp file ``.<stem>.<pid>.tmp<suffix>`` beside it, then ``os.replace``): a failed write leaves
    the previous file or none, never half a figure, removes the temp file and raises ``OSError`` naming ``path``.
    ``tight``: crop to the drawn content (else the whole ``figsize * dpi`` canvas, for constrained layouts).
    The figure is closed either way."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(tmp, dpi=dpi or DPI, bbox_inches="tight" if tight else None,
                    format=path.suffix.lstrip(".").lower() or "png")
        os.replace(tmp, path)
    except Exception as e:  # noqa: BLE001 - any writer error becomes one naming the file
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # pragma: no cover - the folder itself is gone or unreadable
            pass
        raise OSError(f"{path}: the figure could not be written ({type(e).__name__}: {e})") from e
    finally:
        plt.close(fig)
    return path


def _hwc(image: torch.Tensor) -> np.ndarray:
    """``[C, H, W]`` float in [0, 1] -> ``[H, W, 3]``."""
    img = image.detach().float().cpu().clamp(0, 1)
    if img.shape[0] == 1:
        img = img.expand(3, -1, -1)
    return img.permute(1, 2, 0).numpy()


def routing_figure(image: torch.Tensor, maps: Mapping[str, Any], index: int, path, title: str = "",
                   alpha: float = 0.45, true_label: Optional[str] = None, predicted: Optional[str] = None,
                   dpi: Optional[int] = None) -> Path:
    """One image (``[C, H, W]`` in [0, 1]) and its routing at every layer, one row per layer
    (:func:`pce.analysis.overlay.draw_layer_row`): the expert of each patch over the image at full resolution
    (nearest; patch borders, expert index per patch), the expert map alone, the routing entropy, and a legend of
    the experts present with their share of the patches (beside the panels, never over them). Colours:
    :func:`expert_colors`. ``true_label`` / ``predicted``: class names for the title. Saved at ``dpi`` (default
    :data:`DPI`) with the whole figure, ``figsize * dpi`` pixels; PNG, or PDF / SVG by the path's suffix."""
    names = list(maps)
    E = max((m.num_experts for m in maps.values()), default=1)
    colors = expert_colors(E)
    img = _hwc(image)
    H, W = img.shape[:2]
    side = 2.3
    ph = 0.88 * side * min(max(H / W, 0.4), 2.5)  # a panel's drawn height (its width less the colour bar's share)
    fig, axes = plt.subplots(max(len(names), 1), 4, figsize=(3 * side + 1.9, len(names) * (ph + 0.45) + 0.5),
                             squeeze=False, width_ratios=[1, 1, 1, 0.62], layout="constrained")
    for r, name in enumerate(names):
        im, _ = draw_layer_row(axes[r], img, maps[name], index, colors, alpha, short(name))
        fig.colorbar(im, ax=axes[r, 2], fraction=0.046, pad=0.02).ax.tick_params(labelsize=6)
    head = [t for t in (title, f"true: {true_label}" if true_label else "",
                        f"predicted: {predicted}" if predicted else "") if t]
    if head:
        fig.suptitle("   ".join(head), fontsize=9)
    return _save(fig, path, dpi=dpi, tight=False)


def usage_figure(stats: Mapping[str, Dict[str, Any]], path) -> Path:
    """Per layer: each expert's usage share and mean gate weight (bars); collapsed experts in red."""
    names = list(stats)
    fig, axes = plt.subplots(1, max(len(names), 1), figsize=(2.6 * max(len(names), 1), 2.6), squeeze=False)
    for ax, name in zip(axes[0], names):
        s = stats[name]
        E = s["num_experts"]
        x = np.arange(E)
        colors = ["tab:red" if e in s["collapsed_experts"] else "tab:blue" for e in range(E)]
        ax.bar(x - 0.2, s["usage_share"], 0.4, color=colors, label="usage share")
        ax.bar(x + 0.2, s["mean_weight"], 0.4, color="tab:orange", label="mean weight")
        ax.axhline(1.0 / E, color="grey", ls="--", lw=0.8)
        ax.set_xticks(x)
        ax.set_title(f"{short(name)}\nH={s['entropy']:.2f}/{s['max_entropy']:.2f} nats", fontsize=7)
        ax.tick_params(labelsize=6)
    axes[0, -1].legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, frameon=False)  # beside the bars, never over them
    return _save(fig, path)


def nmi_figure(stats: Mapping[str, Dict[str, Any]], path) -> Path:
    """Per layer: NMI of expert vs class and vs position, each next to its shuffled-label baseline."""
    names = list(stats)
    x = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(max(3.0, 1.3 * len(names) + 1), 2.8))
    for off, key, col in ((-0.3, "nmi_class", "tab:green"), (0.1, "nmi_position", "tab:purple")):
        vals = [(stats[n].get(key) or {}).get("nmi") or 0.0 for n in names]
        base = [(stats[n].get(key) or {}).get("baseline") or 0.0 for n in names]
        ax.bar(x + off, vals, 0.2, color=col, label=key.replace("nmi_", "expert vs "))
        ax.bar(x + off + 0.2, base, 0.2, color=col, alpha=0.35, hatch="//", label="shuffled baseline")
    ax.set_xticks(x)
    ax.set_xticklabels([short(n).replace(".layers", "") for n in names], fontsize=6, rotation=20)
    ax.set_ylabel("NMI", fontsize=7)
    ax.tick_params(labelsize=6)
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, frameon=False)
    return _save(fig, path)


def expert_class_figure(s: Dict[str, Any], name: str, path, class_names: Optional[Sequence[str]] = None) -> Path:
    """Heat-map of ``P(class | expert)`` (rows: experts) from ``s["expert_class"]`` counts."""
    cm = np.asarray(s["expert_class"], dtype=np.float64)
    rows = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(0.35 * cm.shape[1] + 1.8, 0.3 * cm.shape[0] + 1.4))
    im = ax.imshow(rows, cmap="magma", vmin=0, vmax=max(rows.max(), 1e-9), aspect="auto")
    ax.set_yticks(range(cm.shape[0]))
    ax.set_ylabel("expert", fontsize=7)
    K = cm.shape[1]
    labels = list(class_names) if class_names and len(class_names) == K else [str(k) for k in range(K)]
    ax.set_xticks(range(cm.shape[1]))
    ax.set_xticklabels(labels, rotation=60, fontsize=6)
    ax.tick_params(labelsize=6)
    nmi = (s.get("nmi_class") or {})
    ax.set_title(f"{short(name)}: P(class | expert)\nNMI {nmi.get('nmi', 0) or 0:.3f} "
                 f"(shuffled {nmi.get('baseline', 0) or 0:.3f})", fontsize=7)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04).ax.tick_params(labelsize=6)
    return _save(fig, path)


def expert_position_figure(s: Dict[str, Any], name: str, path) -> Path:
    """One small map per expert: the share of images whose patch at each grid cell goes to that expert."""
    pos = np.asarray(s["expert_position"], dtype=np.float64)  # [E, gh, gw]
    E = pos.shape[0]
    fig, axes = plt.subplots(1, E, figsize=(1.3 * E + 0.6, 1.7), squeeze=False)
    for e in range(E):
        ax = axes[0, e]
        im = ax.imshow(pos[e], vmin=0, vmax=1, cmap="Blues", interpolation="nearest")
        ax.set_title(f"e{e}", fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
    nmi = (s.get("nmi_position") or {})
    fig.suptitle(f"{short(name)}: expert share per grid cell, NMI {nmi.get('nmi', 0) or 0:.3f} "
                 f"(shuffled {nmi.get('baseline', 0) or 0:.3f})", fontsize=7)
    fig.colorbar(im, ax=list(axes[0]), fraction=0.02, pad=0.02).ax.tick_params(labelsize=6)
    return _save(fig, path)


def cluster_figure(images: List[List[torch.Tensor]], sizes: Sequence[int], path) -> Path:
    """Rows: route clusters (K-Means over per-image routing); columns: the images nearest each centre."""
    k = len(images)
    cols = max((len(r) for r in images), default=1) or 1
    fig, axes = plt.subplots(max(k, 1), cols, figsize=(1.1 * cols + 0.8, 1.1 * max(k, 1)), squeeze=False)
    for i in range(max(k, 1)):
        for j in range(cols):
            ax = axes[i, j]
            ax.axis("off")
            if i < k and j < len(images[i]):
                ax.imshow(_hwc(images[i][j]))
        if i < k:
            axes[i, 0].set_title(f"cluster {i} ({sizes[i]} images)", fontsize=6, loc="left")
    return _save(fig, path)


def curves_figure(train: List[Dict[str, Any]], val: List[Dict[str, Any]], path, metric: Optional[str] = None) -> Path:
    """Training loss per step and the validation metrics per epoch from ``metrics.jsonl`` records."""
    fig, axes = plt.subplots(1, 2, figsize=(7.5, 2.8))
    steps = [r.get("iter", i) for i, r in enumerate(train)]
    for key in ("loss", "loss_cls", "loss_router"):
        ys = [r.get(key) for r in train]
        if any(isinstance(y, (int, float)) for y in ys):
            axes[0].plot(steps, [y if isinstance(y, (int, float)) else np.nan for y in ys], label=key)
    axes[0].set_xlabel("step", fontsize=7)
    axes[0].set_title("training loss", fontsize=8)
    axes[0].legend(fontsize=6)
    keys = [metric] if metric else []
    keys += [k for k in ("top1", "mIoU", "AP50", "mAP") if k not in keys]
    for key in keys:
        pts = [(r.get("epoch"), r[key]) for r in val if isinstance(r.get(key), (int, float))]
        if pts:
            axes[1].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=key)
    axes[1].set_xlabel("epoch", fontsize=7)
    axes[1].set_title("validation", fontsize=8)
    axes[1].legend(fontsize=6)
    for ax in axes:
        ax.tick_params(labelsize=6)
    return _save(fig, path)


def routing_curves_figure(train: List[Dict[str, Any]], path) -> Path:
    """Routing entropy and collapsed experts per layer over the training steps (``routing`` of train records)."""
    fig, axes = plt.subplots(1, 2, figsize=(7.5, 2.6))
    layers = list(train[-1]["routing"])
    steps = [r.get("iter", i) for i, r in enumerate(train)]
    for layer in layers:
        for ax, key in zip(axes, ("entropy", "collapsed_experts")):
            ys = [(r["routing"].get(layer) or {}).get(key, np.nan) for r in train]
            ax.plot(steps, ys, label=short(layer).replace(".layers", ""))
    axes[0].set_title("routing entropy (nats)", fontsize=8)
    axes[1].set_title("collapsed experts", fontsize=8)
    for ax in axes:
        ax.set_xlabel("step", fontsize=7)
        ax.tick_params(labelsize=6)
    axes[1].legend(fontsize=5, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, frameon=False)
    return _save(fig, path)


def _safe(layer: str) -> str:
    return layer.replace("backbone.", "").replace(".", "_")


def stat_plots(stats: Mapping[str, Dict[str, Any]], clusters: Mapping[str, Any], out, image_of=None,
               class_names: Optional[Sequence[str]] = None) -> List[Path]:
    """Every statistics figure into folder ``out``: usage, NMI, per-layer expert x class and expert x position,
    and (with ``image_of(index) -> [C, H, W]``) the route clusters' example images."""
    out = Path(out)
    files = [usage_figure(stats, out / "usage.png"), nmi_figure(stats, out / "nmi.png")]
    for layer, s in stats.items():
        if "expert_class" in s:
            files.append(expert_class_figure(s, layer, out / f"expert_class_{_safe(layer)}.png", class_names))
        if "expert_position" in s:
            files.append(expert_position_figure(s, layer, out / f"expert_position_{_safe(layer)}.png"))
    if clusters.get("k") and image_of is not None:
        images = [[image_of(i) for i in ex] for ex in clusters["examples"]]
        files.append(cluster_figure(images, clusters["sizes"], out / "clusters.png"))
    return files
