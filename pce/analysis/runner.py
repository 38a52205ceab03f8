"""Pure parts of a routing run over a split: what was collected (:class:`Collected`), per-image routing vectors
and route clusters. Collecting it (the engine's evaluation loader, ``task.predict``) lives on the tasks floor:
:func:`pce.tasks.routing_runs.collect_routing`."""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence

import numpy as np
import torch
from torch import nn

from pce.analysis.stats import RoutingStats

__all__ = ["Collected", "routing_vectors", "cluster_routes", "expert_analysis"]


class Collected:
    """What a routing run gathered: ``stats`` (:class:`RoutingStats`), ``vectors`` (``[N, D]`` per-image
    routing vectors: every layer's weights ``[P * E]`` concatenated), ``image_labels`` (``[N]`` when the task has
    image-level labels, else ``None``) and ``indices`` (dataset index of each row)."""

    def __init__(self, stats: RoutingStats, vectors: np.ndarray, image_labels: Optional[np.ndarray],
                 indices: np.ndarray) -> None:
        self.stats, self.vectors, self.image_labels, self.indices = stats, vectors, image_labels, indices


def routing_vectors(by_layer: Dict[str, Any]) -> torch.Tensor:
    """``[B, D]``: the routing weights ``[B, P, E]`` of every layer of one forward, flattened and concatenated."""
    parts = [r.weights.detach().float().cpu().reshape(r.weights.shape[0], -1) for r in by_layer.values()]
    return torch.cat(parts, 1)


def cluster_routes(vectors: np.ndarray, k: int = 4, seed: int = 0, examples: int = 6,
                   image_labels: Optional[Sequence[int]] = None) -> Dict[str, Any]:
    """K-Means (scikit-learn) over per-image routing vectors ``[N, D]``: ``{"k", "assignment" [N], "sizes" [k],
    "examples" (per cluster, the indices of the images nearest its centre), "nmi_class" (cluster vs image label,
    with a shuffled baseline, when labels are given), "class_counts" [k][K]}``."""
    from sklearn.cluster import KMeans

    from pce.analysis.stats import nmi_with_baseline

    N = vectors.shape[0]
    if N < 2 or vectors.shape[1] == 0:
        return {"k": 0, "assignment": [], "sizes": [], "examples": []}
    k = max(1, min(int(k), len(np.unique(vectors.round(6), axis=0))))  # no more clusters than distinct routes
    km = KMeans(n_clusters=k, n_init=4, random_state=seed).fit(vectors.astype(np.float64))
    dist = km.transform(vectors.astype(np.float64))
    assign = km.labels_
    ex = []
    for c in range(k):
        members = np.nonzero(assign == c)[0]
        ex.append([int(i) for i in members[np.argsort(dist[members, c])][:examples]])
    out: Dict[str, Any] = {"k": k, "assignment": assign.tolist(), "sizes": np.bincount(assign, minlength=k).tolist(),
                           "examples": ex}
    if image_labels is not None:
        y = np.asarray(image_labels, dtype=np.int64)
        out["nmi_class"] = nmi_with_baseline(assign, y, seed=seed)
        counts = np.zeros((k, int(y.max()) + 1), dtype=np.int64)
        np.add.at(counts, (assign, y), 1)
        out["class_counts"] = counts.tolist()
    return out


def expert_analysis(model: nn.Module, batches: Sequence[Any],
                    forward: Optional[Callable[[nn.Module, Any], Any]] = None, seed: int = 0) -> Dict[str, Any]:
    """Do the experts differ, and does routing matter? ``{"diversity": {layer: ...}``
    (:func:`pce.analysis.diversity.expert_diversity`), ``"causal": [rows]`` (:func:`pce.analysis.causal.causal_table`),
    ``"summary"``: the flat numbers of both for a results row``}`` over ``batches`` with ``forward(model, batch)``
    (default: the batch, image tensors or lists of them, on the model's device)."""
    from pce.analysis.causal import causal_summary, causal_table
    from pce.analysis.diversity import diversity_summary, expert_diversity

    batches = list(batches)
    diversity = expert_diversity(model, batches, forward)
    causal = causal_table(model, batches, forward, seed=seed)
    return {"diversity": diversity, "causal": causal,
            "summary": {**diversity_summary(diversity), **causal_summary(causal)}}
