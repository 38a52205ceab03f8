"""Collect the routing of a trained model over a dataset split (``tools/analyze_routing.py``,
``tools/prune_experts.py``, ``tools/report.py``): the engine's evaluation loader, ``task.predict`` under
:func:`pce.record_routing`, and the task's own patch / image labels for the statistics. The pure parts (the
statistics, route clusters) are in :mod:`pce.analysis`."""
from __future__ import annotations

from typing import Any, Dict, List

import numpy as np
import torch
from torch import nn

from pce.analysis.maps import grid_of
from pce.analysis.runner import Collected, routing_vectors
from pce.analysis.stats import RoutingStats
from pce.engine.errors import PCEError
from pce.moe.recorder import record_routing

__all__ = ["collect_routing"]


def _patch_labels(task: Any, batch: Any, first: Dict[str, Any], num_classes: int) -> Dict[str, torch.Tensor]:
    """``{layer: int64 [B, P]}`` class labels under every patch of every layer's grid (empty: no targets)."""
    out = {}
    for layer, r in first.items():
        labels = task.patch_labels(batch, grid_of(r), num_classes)
        if labels is None:
            return {}
        out[layer] = labels
    return out


@torch.no_grad()
def collect_routing(model: nn.Module, task: Any, cfg: Any, dataset: Any, device: torch.device,
                    progress: bool = True, seed: int = 0) -> Collected:
    """Run ``task.predict`` over ``dataset`` with the routing recorded (each layer's first forward per batch):
    :class:`RoutingStats` with the task's patch labels, per-image routing vectors ``[N, D]`` and the task's
    image labels ``[N]`` (``None`` when it has none)."""
    from tqdm.auto import tqdm

    from pce.engine.evaluation import build_eval_loader

    stats = RoutingStats(num_classes=int(cfg.model.num_classes), seed=seed)
    vectors: List[torch.Tensor] = []
    labels: List[torch.Tensor] = []
    loader = build_eval_loader(cfg, task, dataset, device)
    for batch in tqdm(loader, desc="routing", disable=not progress, leave=False):
        with record_routing(model, detach=True) as rec:
            task.predict(model, batch, device)
        first: Dict[str, Any] = {}
        for layer, r in rec.records:
            first.setdefault(layer, r)
        stats.update(list(first.items()), _patch_labels(task, batch, first, cfg.model.num_classes))
        vectors.append(routing_vectors(first))
        image_labels = task.image_labels(batch)
        if image_labels is not None:
            labels.append(torch.as_tensor(image_labels).reshape(-1).cpu())
    if not vectors:
        raise PCEError("dataset", "no batches", "a non-empty split")
    same = len({v.shape[1] for v in vectors}) == 1
    vec = torch.cat(vectors).numpy() if same else np.zeros((sum(len(v) for v in vectors), 0), np.float32)
    image_labels = torch.cat(labels).numpy() if labels else None
    return Collected(stats, vec, image_labels, np.arange(len(vec)))
