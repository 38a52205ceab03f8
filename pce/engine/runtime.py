"""Run-time helpers of the trainer: seeding, device and AMP choice, channels-last, batch accessors."""
from __future__ import annotations

import contextlib
import logging
import os
import random
from typing import Any, Mapping, Optional

import numpy as np
import torch
from torch import nn

from pce.engine.logging import scalar_metrics

__all__ = ["NonFiniteLossError", "seed_everything", "resolve_device", "resolve_amp_dtype", "autocast_context",
           "to_channels_last", "format_metrics", "task_batch_images", "task_batch_size"]

logger = logging.getLogger("pce")


class NonFiniteLossError(FloatingPointError):
    """A loss became NaN or infinite; the message names the step and every loss term."""


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed python, numpy and torch; ``deterministic`` also asks torch for deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """``runtime.device`` as a device: ``"auto"`` / ``"cuda"`` -> CUDA device ``local_rank`` when available."""
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("runtime.device='cuda' but CUDA is not available; use 'auto' or 'cpu'")
    if name in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def resolve_amp_dtype(amp: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype of ``runtime.amp``: ``"bf16"`` on CUDA and on the CPU, ``"fp16"`` on CUDA only (on
    any other device it falls back to fp32 with a warning: CPU fp16 autocast is slow and has no loss scaling
    here); ``None`` (fp32) for ``"none"``."""
    if amp == "none":
        return None
    if device.type == "cuda" or (amp == "bf16" and device.type == "cpu"):
        return {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    logger.warning("runtime.amp=%s does not run on %s: falling back to fp32 (bf16: CUDA or CPU; fp16: CUDA only)",
                   amp, device)
    return None


def autocast_context(dtype: Optional[torch.dtype], device: Optional[Any] = None) -> Any:
    """``torch.autocast`` to ``dtype`` on ``device``'s type (a ``torch.device`` or ``"cuda"`` / ``"cpu"``;
    ``None``: CUDA when it is available, else the CPU), or a no-op context when ``dtype`` is ``None``."""
    if dtype is None:
        return contextlib.nullcontext()
    kind = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.autocast(kind, dtype=dtype)


def to_channels_last(model: nn.Module) -> nn.Module:
    """Channels-last layout for every 4-d parameter / buffer (``Module.to(memory_format=...)`` fails on the
    5-d stacked expert weights)."""
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.dim() == 4:
                t.data = t.data.contiguous(memory_format=torch.channels_last)
    return model


def format_metrics(results: Mapping[str, Any]) -> str:
    """``"top1 0.9123, loss 0.3000"``: the plain numbers of an evaluator's results for a log line."""
    return ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in scalar_metrics(results).items())


def task_batch_images(task: Any, batch: Any) -> torch.Tensor:
    """The images of ``batch`` (``task.batch_images`` when the task has it, else the batch's first item)."""
    if hasattr(task, "batch_images"):
        return task.batch_images(batch)
    return batch[0] if isinstance(batch, (list, tuple)) else batch


def task_batch_size(task: Any, batch: Any) -> int:
    """The number of images in ``batch`` (``task.batch_size`` when the task has it)."""
    if hasattr(task, "batch_size"):
        return int(task.batch_size(batch))
    first = batch[0] if isinstance(batch, (list, tuple)) else batch
    return int(first.shape[0]) if isinstance(first, torch.Tensor) else len(first)
