"""Training logs: text log, JSON-lines metrics, TensorBoard events, tqdm progress.

Only rank 0 writes files. ``metrics.jsonl`` holds one JSON object per line with a ``type`` (``train``,
``val``, ``phase``, ``test``) plus ``epoch`` / ``iter`` and the values; TensorBoard gets the same scalars
(``train/loss``, ``train/lr``, ``val/top1``, and for a nested ``routing`` entry, which trainer hooks such as
``pce.tasks.hooks.RoutingStatsHook`` add, ``routing/<layer>/entropy``, ``routing/<layer>/usage/e<i>``, ...).
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

__all__ = ["setup_logger", "MetricWriter", "ProgressBar", "scalar_metrics"]

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
