"""Training logs: text log, JSON-lines metrics, TensorBoard events, tqdm progress.

Only rank 0 writes files. ``metrics.jsonl`` holds one JSON object per line with a ``type`` (``train``,
``val``, ``phase``, ``test``) plus ``epoch`` / ``iter`` and the values; TensorBoard gets the same scalars
(``train/loss``, ``train/lr``, ``val/top1``, and for a nested ``routing`` entry, which trainer hooks such as
``pce.tasks.hooks.RoutingStatsHook`` add, ``routing/<layer>/entropy``, ``routing/<layer>/usage/e<i>``, ...).
Trackers added with :meth:`MetricWriter.add_sink` (:class:`ScalarSink`, e.g. :class:`pce.engine.tracking.MlflowTracker`)
get exactly the TensorBoard scalars (same names, same steps) and the pictures of :meth:`MetricWriter.write_image`.
"""
from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Protocol, Union

import torch

__all__ = ["setup_logger", "MetricWriter", "ProgressBar", "ScalarSink", "scalar_metrics", "tracked_scalars"]

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


def tracked_scalars(record: Mapping[str, Any], prefix: str) -> Dict[str, float]:
    """The scalars of one record as the trackers name them: ``<prefix>/<key>`` for its finite numbers (not ``type``,
    ``time``, ``epoch``, ``iter``, nor booleans), ``routing/<layer>/<name>`` and ``routing/<layer>/<name>/e<i>``
    for a nested ``routing`` entry (lists: one scalar per expert). Non-finite values are left out."""
    out: Dict[str, float] = {}
    for k, v in record.items():
        if k in ("type", "time", "epoch", "iter") or isinstance(v, bool):
            continue
        if isinstance(v, (int, float)) and math.isfinite(float(v)):
            out[f"{prefix}/{k}"] = float(v)
    for layer, stats in (record.get("routing") or {}).items():
        for name, v in stats.items():
            if isinstance(v, (list, tuple)):
                for e, u in enumerate(v):
                    if math.isfinite(float(u)):
                        out[f"routing/{layer}/{name}/e{e}"] = float(u)
            elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)):
                out[f"routing/{layer}/{name}"] = float(v)
    return out


class ScalarSink(Protocol):
    """A tracker fed by :class:`MetricWriter` (rank 0): it must never raise (a failed write is its own warning)."""

    def log_scalars(self, scalars: Dict[str, float], step: int) -> None: ...

    def log_image(self, tag: str, path: Path, step: int) -> None: ...


class MetricWriter:
    """``metrics.jsonl`` + TensorBoard (``work_dir/tb``) + the trackers of :meth:`add_sink`; a no-op when
    ``enabled`` is False."""

    def __init__(self, work_dir: Path, enabled: bool = True, tensorboard: bool = True) -> None:
        self.enabled = enabled
        self.path = Path(work_dir) / "metrics.jsonl"
        self._f = None
        self.tb = None
        self.sinks: List[ScalarSink] = []
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

    def add_sink(self, sink: ScalarSink) -> None:
        """Send every later record's scalars (:func:`tracked_scalars`) and picture to ``sink`` too."""
        if self.enabled:
            self.sinks.append(sink)

    def remove_sink(self, sink: ScalarSink) -> None:
        self.sinks = [s for s in self.sinks if s is not sink]

    def write(self, record: Dict[str, Any], step: Optional[int] = None, prefix: Optional[str] = None) -> None:
        """Append ``record`` to metrics.jsonl; its numbers (and nested ``routing``) go to TensorBoard and the sinks
        under ``prefix`` (default: the record's ``type``) at ``step`` (none without a step)."""
        if not self.enabled:
            return
        rec = dict(record)
        rec.setdefault("time", round(time.time(), 3))
        self._f.write(json.dumps(_json_safe(rec)) + "\n")
        self._f.flush()
        if step is None or (self.tb is None and not self.sinks):
            return
        scalars = tracked_scalars(rec, prefix or str(rec.get("type", "misc")))
        if self.tb is not None:
            for tag, v in scalars.items():
                self.tb.add_scalar(tag, v, step)
        for sink in self.sinks:
            sink.log_scalars(scalars, step)

    def write_image(self, tag: str, path: Union[str, Path], step: int) -> None:
        """The PNG at ``path`` to TensorBoard (``add_image``, ``[H, W, 3]``) and the sinks, under ``tag``."""
        if not self.enabled:
            return
        if self.tb is not None:
            import numpy as np
            from PIL import Image

            with Image.open(path) as im:
                self.tb.add_image(tag, np.asarray(im.convert("RGB")), step, dataformats="HWC")
        for sink in self.sinks:
            sink.log_image(tag, Path(path), step)

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
        self.sinks = []  # their owners (hooks) end their runs


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
