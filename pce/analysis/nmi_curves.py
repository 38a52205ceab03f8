"""NMI of the routing over training, from runs' ``metrics.jsonl``: is a layer's routing positional, semantic or
chance, and since when?

The trainer's ``RoutingStatsHook`` (``pce.tasks.hooks``) adds to every logging step's ``train`` record
``routing = {layer: {"nmi_class", "nmi_class_baseline", "nmi_position", "nmi_position_baseline", ...}}``;
``phase`` records give the epoch each training phase starts. :func:`nmi_series` averages one run's values per
epoch, :func:`nmi_band` gathers several runs (seeds) into their mean, min and max per epoch, and
:func:`nmi_training_figure` draws them: one panel per layer, NMI with the class and with the patch position (with
their shuffled-label baselines, dotted), the min-max band over the runs, the phase boundaries as vertical lines.

>>> runs = [read_metrics(Path(d) / "metrics.jsonl") for d in ("work_dirs/a_s0", "work_dirs/a_s1")]
>>> band = nmi_band([nmi_series(r) for r in runs])
>>> band["layers"]["backbone.stages.2.layers.0"]["nmi_class"]["mean"]       # [epochs]
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from pce.analysis.plots import _save, short  # noqa: E402

__all__ = ["KEYS", "nmi_series", "nmi_band", "nmi_training_figure"]

KEYS = ("nmi_class", "nmi_position")
_STYLE = {"nmi_class": ("#0072B2", "o", "-", "expert vs class"),        # Okabe-Ito blue, solid, circles
          "nmi_position": ("#D55E00", "s", "--", "expert vs position")}  # Okabe-Ito vermillion, dashed, squares


def _num(v: Any) -> float:
    """A logged number, NaN for a missing / non-numeric one."""
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan


def _one_expert(usage: Any) -> bool:
    """Whether a logged ``usage`` puts every patch on one expert (its NMI with anything is 0: older logs say 1.0
    where the labels of the batch were constant too, scikit-learn's score of two constant labelings)."""
    return isinstance(usage, (list, tuple)) and len(usage) > 1 and sum(1 for u in usage if u) == 1


def nmi_series(records: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
    """One run's NMI per epoch from its ``metrics.jsonl`` records: ``{"epochs": [e, ...], "layers": {layer:
    {key: [value per epoch]}}, "phases": [(first epoch, name), ...]}`` for ``key`` in :data:`KEYS` and their
    ``*_baseline``; a value is the mean over the epoch's ``train`` records that log it (NaN when none does).
    Raises ``ValueError`` when no record has routing statistics."""
    per: Dict[int, Dict[str, Dict[str, List[float]]]] = {}
    layers: List[str] = []
    phases: List[Tuple[int, str]] = []
    for r in records:
        if r.get("type") == "phase" and isinstance(r.get("epoch"), int):
            phases.append((int(r["epoch"]), str(r.get("name", r.get("phase", "")))))
        if r.get("type") != "train" or not isinstance(r.get("routing"), Mapping) or "epoch" not in r:
            continue
        ep = per.setdefault(int(r["epoch"]), {})
        for layer, st in r["routing"].items():
            if layer not in layers:
                layers.append(layer)
            one_expert = _one_expert((st or {}).get("usage"))
            for key in KEYS + tuple(k + "_baseline" for k in KEYS):
                v = _num((st or {}).get(key))  # logs written before the fix in nmi_with_baseline scored a single
                ep.setdefault(layer, {}).setdefault(key, []).append(0.0 if one_expert and not math.isnan(v) else v)
    if not per:
        raise ValueError("no routing statistics (train records with 'routing': a run trained with "
                         "RoutingStatsHook, i.e. tools/train.py, on a routed model)")
    epochs = sorted(per)
    out = {layer: {key: [] for key in KEYS + tuple(k + "_baseline" for k in KEYS)} for layer in layers}
    for e in epochs:
        for layer in layers:
            for key, vals in out[layer].items():
                got = [v for v in per[e].get(layer, {}).get(key, []) if not math.isnan(v)]
                vals.append(float(np.mean(got)) if got else math.nan)
    seen = set()
    phases = [p for p in sorted(phases) if not (p in seen or seen.add(p))]
    return {"epochs": epochs, "layers": out, "phases": phases}


def nmi_band(series: Sequence[Mapping[str, Any]]) -> Dict[str, Any]:
    """Several runs' :func:`nmi_series` on the union of their epochs: ``{"epochs", "runs", "phases" (the first
    run's), "layers": {layer: {key: {"mean", "min", "max", "n"}}}}``, each a list per epoch over the runs that
    have a value there (NaN and ``n`` 0 where none has)."""
    if not series:
        raise ValueError("no runs")
    epochs = sorted({e for s in series for e in s["epochs"]})
    layers: List[str] = []
    for s in series:
        layers += [layer for layer in s["layers"] if layer not in layers]
    out: Dict[str, Dict[str, Dict[str, List[float]]]] = {}
    for layer in layers:
        out[layer] = {}
        for key in next(s["layers"][layer] for s in series if layer in s["layers"]):
            grid = np.full((len(series), len(epochs)), np.nan)
            for i, s in enumerate(series):
                vals = s["layers"].get(layer, {}).get(key)
                for e, v in zip(s["epochs"], vals or []):
                    grid[i, epochs.index(e)] = v
            n = (~np.isnan(grid)).sum(0)
            with warnings.catch_warnings():  # an epoch no run logged: NaN, not a warning
                warnings.simplefilter("ignore", RuntimeWarning)
                stats = {"mean": np.nanmean(grid, 0), "min": np.nanmin(grid, 0), "max": np.nanmax(grid, 0)}
            out[layer][key] = {k: [float(x) for x in v] for k, v in stats.items()}
            out[layer][key]["n"] = [int(x) for x in n]
    return {"epochs": epochs, "runs": len(series), "phases": list(series[0]["phases"]), "layers": out}


def _panel(ax: Any, band: Mapping[str, Any], layer: str) -> None:
    """One layer: mean lines, min-max bands (several runs), baselines (dotted), phase boundaries."""
    x = np.asarray(band["epochs"], dtype=float)
    for key in KEYS:
        color, marker, ls, label = _STYLE[key]
        d = band["layers"][layer].get(key)
        if d is None:
            continue
        ax.plot(x, d["mean"], color=color, marker=marker, ms=3, ls=ls, lw=1.2, label=label)
        if band["runs"] > 1:
            ax.fill_between(x, d["min"], d["max"], color=color, alpha=0.22, lw=0,
                            label=f"{label}: min-max of {band['runs']} runs")
        base = band["layers"][layer].get(key + "_baseline")
        if base is not None:
            ax.plot(x, base["mean"], color=color, ls=":", lw=0.9, label=f"{label}: shuffled baseline")
    for start, name in band["phases"]:
        if start > min(band["epochs"], default=start):
            ax.axvline(start - 0.5, color="0.35", ls="-.", lw=0.8)
        ax.annotate(name, (start - 0.5, 1.0), xycoords=("data", "axes fraction"), xytext=(2, -2),
                    textcoords="offset points", fontsize=6, va="top", color="0.25")
    ax.set_title(short(layer), fontsize=7)
    ax.set_xlabel("epoch", fontsize=7)
    ax.set_ylabel("NMI", fontsize=7)
    ax.set_ylim(bottom=0)
    ax.tick_params(labelsize=6)


def nmi_training_figure(series: Sequence[Mapping[str, Any]], path, title: str = "", dpi: Optional[int] = None
                        ) -> Path:
    """One panel per layer of the runs' NMI over the epochs (:func:`nmi_band` of their :func:`nmi_series`);
    the legend beside the panels. Saved at ``dpi`` (default ``plots.DPI``) as ``figsize * dpi`` pixels."""
    band = nmi_band(series)
    layers = list(band["layers"])
    cols = min(len(layers), 3)
    rows = math.ceil(len(layers) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols + 2.2, 2.4 * rows + 0.5), squeeze=False,
                             layout="constrained")
    for ax, layer in zip(axes.flat, layers):
        _panel(ax, band, layer)
    for ax in list(axes.flat)[len(layers):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=2, fontsize=6, frameon=False)
    fig.suptitle(title or f"routing NMI over training ({band['runs']} run{'s' if band['runs'] > 1 else ''}; "
                 "dash-dot: phase start)", fontsize=8)
    return _save(fig, path, dpi=dpi, tight=False)
