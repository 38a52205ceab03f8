"""Is a model's routing positional, semantic or chance? The routing statistics of several seeds, with their spread.

One run's NMI says little: a seed's NMI of expert vs class or vs patch position (each next to its shuffled-label
baseline, :func:`pce.analysis.stats.nmi_with_baseline`) varies from seed to seed. :func:`summarize_seeds` takes
the ``routing_stats.json`` of several seeds (``tools/analyze_routing.py``) and gives, per routed layer, the mean,
sample std (``ddof=1``), min, max and ``n`` of the NMI, of its baseline and of the *excess* ``nmi - baseline``,
with a one-sided Student-t lower confidence bound of the mean excess, and a verdict:

* a signal *passes* when the lower bound of its mean excess is above :data:`MIN_EXCESS` (needs 2 seeds or more);
* ``"chance"``: neither passes; ``"positional"`` / ``"semantic"``: only position / only class passes, or both pass
  and its lower bound is above the other's mean excess; ``"both"``: both pass and neither dominates that way;
  ``"undetermined"``: fewer than 2 seeds (no spread, no bound).

When the ``tools/analyze_experts.py`` JSON of a seed shows the layer's experts are copies (lowest pairwise kernel
cosine >= :data:`COPY_COSINE`: the layer's ``diversity[layer]["weight_cosine_min"]``, else the run's
``summary["expert_weight_cos_min"]``; and, when the layer's row has it, lowest pairwise output cosine
``output_cosine_min`` >= :data:`COPY_COSINE` too), the verdict says so: whatever the routing, such a layer computes
the same function.

>>> summary = summarize_seeds([json.load(open(f"s{i}/routing_stats.json")) for i in range(3)])
>>> print(format_seeds_table(summary))
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

__all__ = ["SeedsError", "MIN_EXCESS", "CONFIDENCE", "COPY_COSINE", "aggregate", "lower_bound", "verdict", "summarize_seeds",
           "format_seeds_table"]

MIN_EXCESS = 0.02   # NMI above the shuffled baseline that counts as a signal (lower bound of the mean over seeds)
CONFIDENCE = 0.95   # one-sided confidence of that lower bound (Student t, n - 1 degrees of freedom)
COPY_COSINE = 0.99  # experts whose lowest pairwise kernel cosine reaches this are copies of each other
_KINDS = (("nmi_class", "class"), ("nmi_position", "position"))


class SeedsError(ValueError):
    """Bad per-seed statistics: ``SeedsError(where, what, expected)`` reads ``<where>: <what> (<expected>)``, as the
    tools' one-line errors do (pce.analysis sits beside pce.engine, so it cannot raise the engine's PCEError;
    tools/analyze_routing.py turns this into one)."""

    def __init__(self, where: Any, what: str, expected: Optional[str] = None) -> None:
        self.where, self.what, self.expected = str(where), str(what), expected
        super().__init__(f"{where}: {what}" + (f" ({expected})" if expected else ""))


def aggregate(values: Sequence[float]) -> Dict[str, Optional[float]]:
    """``{"mean", "std" (sample, ddof=1; None below 2 values), "min", "max", "n"}`` of ``values`` (all None when
    empty)."""
    v = np.asarray(list(values), dtype=np.float64)
    if v.size == 0:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else None,
            "min": float(v.min()), "max": float(v.max()), "n": int(v.size)}


def lower_bound(values: Sequence[float], confidence: float = CONFIDENCE) -> Optional[float]:
    """One-sided lower confidence bound of the mean of ``values``: ``mean - t_{confidence, n-1} * std / sqrt(n)``
    (``None`` below 2 values)."""
    from scipy.stats import t

    v = np.asarray(list(values), dtype=np.float64)
    if v.size < 2:
        return None
    return float(v.mean() - t.ppf(confidence, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size))


def _passes(excess: Optional[Dict[str, Any]], min_excess: float) -> bool:
    return bool(excess) and excess.get("lower_95") is not None and excess["lower_95"] > min_excess


def verdict(class_excess: Optional[Dict[str, Any]], position_excess: Optional[Dict[str, Any]],
            min_excess: float = MIN_EXCESS) -> str:
    """``"positional"``, ``"semantic"``, ``"both"``, ``"chance"`` or ``"undetermined"`` from the excess summaries
    (``{"mean", "lower_95", "n", ...}``; ``class_excess`` None when the layer has no class labels); the rule is in
    the module docstring."""
    got = [e for e in (class_excess, position_excess) if e and e.get("n")]
    if not got or max(e["n"] for e in got) < 2:
        return "undetermined"
    cls, pos = _passes(class_excess, min_excess), _passes(position_excess, min_excess)
    if not cls and not pos:
        return "chance"
    if pos and not cls:
        return "positional"
    if cls and not pos:
        return "semantic"
    if position_excess["lower_95"] > class_excess["mean"]:
        return "positional"
    if class_excess["lower_95"] > position_excess["mean"]:
        return "semantic"
    return "both"


def _copies(experts: Optional[Dict[str, Any]], layer: str, threshold: float) -> Optional[bool]:
    """Whether an analyze_experts JSON says ``layer``'s experts are copies (None: it does not say): near-identical
    kernels and, when the JSON has them, near-identical outputs on the same patches (per-expert batch norms can make
    copies of one kernel compute different things)."""
    if not experts:
        return None
    row = (experts.get("diversity") or {}).get(layer) or {}
    cos = row.get("weight_cosine_min")
    if cos is None:
        cos = (experts.get("summary") or {}).get("expert_weight_cos_min")
    if cos is None:
        return None
    out = row.get("output_cosine_min")
    return bool(cos >= threshold and (out is None or out >= threshold))


def _check_layers(stats: Sequence[Dict[str, Any]], names: Sequence[str]) -> List[str]:
    layers = None
    for s, name in zip(stats, names):
        if not isinstance(s, dict) or not isinstance(s.get("layers"), dict) or not s["layers"]:
            raise SeedsError(name, "no 'layers' in the routing statistics", "a routing_stats.json of "
                           "tools/analyze_routing.py with at least one routed layer")
        if layers is None:
            layers = list(s["layers"])
        elif set(s["layers"]) != set(layers):
            raise SeedsError(f"{name}: layers", f"{sorted(s['layers'])}", f"the layers of {names[0]}: {sorted(layers)}"
                           " (every seed of the same model)")
        for layer in layers:
            row = s["layers"][layer]
            if not isinstance(row, dict) or not isinstance(row.get("nmi_position"), dict):
                raise SeedsError(f"{name}: layers.{layer}.nmi_position", "missing", "{'nmi', 'baseline', ...}")
            for key, _ in _KINDS:
                for field in ("nmi", "baseline"):
                    v = row.get(key, {}).get(field) if isinstance(row.get(key), dict) else None
                    if v is not None and not _is_number(v):
                        raise SeedsError(f"{name}: layers.{layer}.{key}.{field}", f"{v!r}", "a number or null")
    return layers or []


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _check_experts(experts: Sequence[Optional[Dict[str, Any]]], names: Sequence[str]) -> None:
    """Each analyze_experts JSON: a dict whose ``diversity`` rows and ``summary`` hold numbers where read."""
    for e, name in zip(experts, names):
        if e is None:
            continue
        where = f"experts of {name}"
        if not isinstance(e, dict) or not isinstance(e.get("diversity", {}), dict) \
                or not isinstance(e.get("summary", {}), dict):
            raise SeedsError(where, "not a JSON object with 'diversity' and 'summary' objects",
                             "a JSON written by tools/analyze_experts.py --out")
        rows = [(f"diversity.{k}", r) for k, r in e.get("diversity", {}).items()] + [("summary", e.get("summary", {}))]
        for key, row in rows:
            if not isinstance(row, dict):
                raise SeedsError(f"{where}: {key}", f"{type(row).__name__}", "an object")
            for field in ("weight_cosine_min", "output_cosine_min", "expert_weight_cos_min"):
                if row.get(field) is not None and not _is_number(row[field]):
                    raise SeedsError(f"{where}: {key}.{field}", f"{row[field]!r}", "a number or null")


def _layer_summary(rows: Sequence[Dict[str, Any]], min_excess: float, confidence: float) -> Dict[str, Any]:
    """One layer over the seeds (``rows``: its per-seed statistics)."""
    out: Dict[str, Any] = {"n_seeds": len(rows)}
    for key, _ in _KINDS:
        pairs = [(r[key]["nmi"], r[key]["baseline"]) for r in rows
                 if isinstance(r.get(key), dict) and r[key].get("nmi") is not None
                 and r[key].get("baseline") is not None]
        if not pairs:
            out[key] = None
            continue
        nmi, base = [p[0] for p in pairs], [p[1] for p in pairs]
        excess = [a - b for a, b in pairs]
        out[key] = {"nmi": aggregate(nmi), "baseline": aggregate(base),
                    "excess": {**aggregate(excess), "lower_95": lower_bound(excess, confidence)}}
    out["label"] = verdict((out["nmi_class"] or {}).get("excess"), (out["nmi_position"] or {}).get("excess"),
                           min_excess)
    return out


def summarize_seeds(stats: Sequence[Dict[str, Any]], experts: Optional[Sequence[Optional[Dict[str, Any]]]] = None,
                    names: Optional[Sequence[str]] = None, min_excess: float = MIN_EXCESS,
                    confidence: float = CONFIDENCE, copy_cosine: float = COPY_COSINE) -> Dict[str, Any]:
    """Per layer over the seeds: see the module docstring. ``stats``: one ``routing_stats.json`` dict per seed;
    ``experts``: ``None`` or one analyze_experts JSON dict (or ``None``) per seed; ``names``: the seeds' sources,
    for error messages. Returns ``{"seeds", "thresholds", "layers": {layer: {"n_seeds", "nmi_class",
    "nmi_position" (each None or {"nmi", "baseline", "excess"}: aggregates, ``excess`` with ``lower_95``),
    "label", "copies", "copies_known", "verdict"}}}``."""
    stats = list(stats)
    names = list(names) if names is not None else [f"seed {i}" for i in range(len(stats))]
    if not stats:
        raise SeedsError("seeds", "no routing statistics", "the routing_stats.json of one or more seeds")
    experts = list(experts) if experts is not None else [None] * len(stats)
    _check_experts(experts, names[:len(experts)])
    if len(experts) != len(stats) or len(names) != len(stats):
        raise SeedsError("experts", f"{len(experts)} experts file(s) and {len(names)} name(s) for {len(stats)} seeds",
                       "one per seed, in the same order")
    layers = _check_layers(stats, names)
    out: Dict[str, Any] = {}
    for layer in layers:
        row = _layer_summary([s["layers"][layer] for s in stats], min_excess, confidence)
        flags = [c for c in (_copies(e, layer, copy_cosine) for e in experts) if c is not None]
        row["copies"], row["copies_known"] = sum(flags), len(flags)
        row["verdict"] = row["label"] + (f"; experts are copies in {sum(flags)}/{len(flags)} seeds: the routing "
                                         "changes nothing" if sum(flags) else "")
        out[layer] = row
    return {"seeds": len(stats), "thresholds": {"min_excess": min_excess, "confidence": confidence,
                                                "copy_cosine": copy_cosine}, "layers": out}


def _cell(s: Optional[Dict[str, Any]]) -> str:
    if not s:
        return "-"
    std = s["nmi"]["std"]
    return f"{s['nmi']['mean']:.3f} ± {'-' if std is None else f'{std:.3f}'} ({s['baseline']['mean']:.4f})"


def format_seeds_table(summary: Dict[str, Any]) -> str:
    """Markdown table of :func:`summarize_seeds`: layer, seeds, NMI class and position (mean ± std over the seeds,
    the shuffled baseline's mean in brackets), verdict."""
    lines = ["| layer | seeds | NMI class mean ± std (shuffled) | NMI position mean ± std (shuffled) | verdict |",
             "| --- | --- | --- | --- | --- |"]
    for layer, r in summary["layers"].items():
        lines.append(f"| `{layer}` | {r['n_seeds']} | {_cell(r['nmi_class'])} | {_cell(r['nmi_position'])} "
                     f"| {r['verdict']} |")
    return "\n".join(lines)
