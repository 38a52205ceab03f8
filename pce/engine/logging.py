"""Training logs: text log, JSON-lines metrics, TensorBoard events, tqdm progress, router statistics.

Only rank 0 writes files. ``metrics.jsonl`` holds one JSON object per line with a ``type`` (``train``,
``val``, ``phase``, ``test``) plus ``epoch`` / ``iter`` and the values; TensorBoard gets the same scalars
(``train/loss``, ``train/lr``, ``val/top1``, ``routing/<layer>/entropy``, ``routing/<layer>/usage/e<i>``, ...).
"""
from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any, Dict, Mapping, Optional

import torch
from torch import nn

__all__ = ["setup_logger", "MetricWriter", "RoutingStatsCollector", "ProgressBar", "scalar_metrics"]

LOGGER_NAME = "pce"


def setup_logger(work_dir: Optional[Path] = None, rank: int = 0, level: int = logging.INFO) -> logging.Logger:
    """The ``pce`` logger: INFO to stdout (and ``work_dir/train.log``) on rank 0, warnings elsewhere."""
    log = logging.getLogger(LOGGER_NAME)
    log.setLevel(level if rank == 0 else logging.WARNING)
    log.propagate = False
    for h in list(log.handlers):
        if getattr(h, "_pce", False):
            log.removeHandler(h)
            h.close()
    fmt = logging.Formatter("[%(asctime)s %(levelname)s] %(message)s", "%H:%M:%S")
    sh = logging.StreamHandler(sys.stdout)
    sh.setFormatter(fmt)
    sh._pce = True  # type: ignore[attr-defined]
    log.addHandler(sh)
    if work_dir is not None and rank == 0:
        Path(work_dir).mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(Path(work_dir) / "train.log", encoding="utf-8")
        fh.setFormatter(fmt)
        fh._pce = True  # type: ignore[attr-defined]
        log.addHandler(fh)
    return log


def _json_safe(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        return x.item() if x.numel() == 1 else x.tolist()
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, Mapping):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def scalar_metrics(results: Mapping[str, Any]) -> Dict[str, Any]:
    """The plain numbers of an evaluator's results (drops tables and matrices; ints stay ints)."""
    out: Dict[str, Any] = {}
    for k, v in results.items():
        if isinstance(v, bool):
            continue
        if isinstance(v, (int, float)):
            out[k] = v
        elif isinstance(v, torch.Tensor) and v.numel() == 1:
            out[k] = v.item()
    return out


class MetricWriter:
    """``metrics.jsonl`` + TensorBoard (``work_dir/tb``); a no-op when ``enabled`` is False."""

    def __init__(self, work_dir: Path, enabled: bool = True, tensorboard: bool = True) -> None:
        self.enabled = enabled
        self.path = Path(work_dir) / "metrics.jsonl"
        self._f = None
        self.tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # pragma: no cover - tensorboard is a dependency
                logging.getLogger(LOGGER_NAME).warning("tensorboard is not installed: no event files")
            else:
                self.tb = SummaryWriter(log_dir=str(Path(work_dir) / "tb"))

    def write(self, record: Dict[str, Any], step: Optional[int] = None, prefix: Optional[str] = None) -> None:
        """Append ``record`` to metrics.jsonl; its numbers (and nested ``routing``) go to TensorBoard under
        ``prefix`` (default: the record's ``type``)."""
        if not self.enabled:
            return
        rec = dict(record)
        rec.setdefault("time", round(time.time(), 3))
        self._f.write(json.dumps(_json_safe(rec)) + "\n")
        self._f.flush()
        if self.tb is None or step is None:
            return
        prefix = prefix or str(rec.get("type", "misc"))
        for k, v in rec.items():
            if k in ("type", "time", "epoch", "iter") or isinstance(v, bool):
                continue
            if isinstance(v, (int, float)) and math.isfinite(float(v)):
                self.tb.add_scalar(f"{prefix}/{k}", float(v), step)
        for layer, stats in (rec.get("routing") or {}).items():
            for name, v in stats.items():
                if isinstance(v, (list, tuple)):
                    for e, u in enumerate(v):
                        self.tb.add_scalar(f"routing/{layer}/{name}/e{e}", float(u), step)
                elif isinstance(v, (int, float)) and math.isfinite(float(v)):
                    self.tb.add_scalar(f"routing/{layer}/{name}", float(v), step)

    def flush(self) -> None:
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None


class RoutingStatsCollector:
    """Per-layer routing statistics of the forwards run while :attr:`active` is True, through
    :func:`pce.record_routing` (the recorder is attached only while active, so an inactive collector costs nothing).

    ``pop()`` -> ``{layer: stats}`` (layer names as the recorder gives them, e.g. ``backbone.stages.2.layers.0``)
    with ``entropy`` (mean routing
    entropy, nats), ``usage [E]`` (fraction of patches using each expert), ``mean_weight [E]``,
    ``dropped_fraction``, ``collapsed_experts`` (how many have usage < 1%), ``usage_entropy``, ``imbalance``
    (max / min load; ``inf`` with an unused expert), ``nmi_position`` / ``nmi_position_baseline`` (expert vs grid
    cell, and with shuffled cells) and, after :meth:`set_batch`, ``nmi_class`` / ``nmi_class_baseline`` (expert vs
    the batch's labels under each patch; see :mod:`pce.analysis.labels`).
    """

    def __init__(self, model: nn.Module) -> None:
        from pce.moe.recorder import routing_sources

        self.model = model
        self._layers = [n for n, _ in routing_sources(model)]
        self._rec = None
        self._records: list = []
        self._targets = None

    def __len__(self) -> int:
        return len(self._layers)

    @property
    def active(self) -> bool:
        return self._rec is not None

    @active.setter
    def active(self, flag: bool) -> None:
        from pce.moe.recorder import RoutingRecorder

        if flag and self._rec is None:
            self._rec = RoutingRecorder(self.model, detach=True).__enter__()
        elif not flag and self._rec is not None:
            self._rec.__exit__(None, None, None)
            self._records.extend(self._rec.records)
            self._rec = None

    def set_batch(self, task: Any, batch: Any) -> None:
        """The batch of the next recorded forward: its targets give the class NMI (``task.name`` says how)."""
        name = getattr(task, "name", str(task))
        if not isinstance(batch, (list, tuple)) or len(batch) < 2:
            return
        sizes = [tuple(im.shape[-2:]) for im in batch[0]] if name == "detection" else None
        self._targets = (name, batch[1], sizes, getattr(task, "ignore_index", 255))

    def _layer_stats(self, result: Any) -> Dict[str, Any]:
        from pce.analysis import stats as S
        from pce.analysis.labels import patch_labels, position_labels
        from pce.analysis.maps import grid_of

        w = result.weights.detach().float().cpu()
        B, E = w.shape[0], w.shape[-1]
        use = S.usage(w)
        load = (w.reshape(-1, E) > 0).float().sum(0)
        experts = S.assigned_experts(w).reshape(-1).numpy()
        grid = grid_of(result)
        pos = S.nmi_with_baseline(experts, position_labels(B, grid).reshape(-1).numpy(), shuffles=1)
        rec = {"entropy": S.mean_entropy(result.probs), "usage": use.tolist(), "mean_weight": S.mean_weight(w).tolist(),
               "dropped_fraction": S.dropped_rate(w), "collapsed_experts": float(len(S.collapsed_experts(use))),
               "usage_entropy": S.usage_entropy(load), "imbalance": S.imbalance(load),
               "nmi_position": pos["nmi"], "nmi_position_baseline": pos["baseline"]}
        if self._targets is not None:
            task, targets, sizes, ignore = self._targets
            try:
                lab = patch_labels(task, targets, grid, None, sizes, ignore)
            except (ValueError, TypeError, KeyError, RuntimeError):
                lab = None
            if lab is not None and lab.numel() == experts.size:
                cls = S.nmi_with_baseline(experts, lab.reshape(-1).numpy(), shuffles=1)
                rec["nmi_class"], rec["nmi_class_baseline"] = cls["nmi"], cls["baseline"]
        return {k: v for k, v in rec.items() if v is not None}

    def pop(self) -> Dict[str, Dict[str, Any]]:
        """The statistics of the first recorded forward of every layer since the last ``pop``; clears them."""
        if self._rec is not None:
            self._records.extend(self._rec.records)
            self._rec.clear()
        out: Dict[str, Dict[str, Any]] = {}
        for name, result in self._records:
            if name not in out:
                out[name] = self._layer_stats(result)
        self._records, self._targets = [], None
        return out

    def remove(self) -> None:
        self.active = False
        self._records = []


class ProgressBar:
    """tqdm over the iterations of one epoch with loss, lr and images/s (a no-op when disabled)."""

    def __init__(self, total: int, desc: str, enabled: bool = True) -> None:
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            # disable=None: tqdm switches itself off when stderr is not a terminal (logs, CI)
            self.bar = tqdm(total=total, desc=desc, dynamic_ncols=True, leave=False, disable=None)

    def update(self, loss: float, lr: float, images_per_s: float) -> None:
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.3g}", img_s=f"{images_per_s:.0f}", refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
