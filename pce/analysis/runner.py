"""Load a trained run (config + checkpoint) the way the tools do, and collect routing over a split.

``load_model`` follows ``tools/eval.py``: build the task's model from the config, replay the expert edits
a pruned / reinforced checkpoint records (``expert_structure``, see :mod:`pce.analysis.surgery`), load the
weights (EMA when present), apply the routing of the phase the checkpoint was saved in.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from torch.utils.data import Subset

from pce.analysis.labels import patch_labels
from pce.analysis.maps import grid_of
from pce.analysis.stats import RoutingStats
from pce.engine.errors import PCEError
from pce.moe.recorder import record_routing

__all__ = ["load_model", "load_split", "collect_routing", "Collected", "batch_targets"]


def load_model(cfg: Any, task: Any, checkpoint: str, device: torch.device) -> Tuple[nn.Module, Dict[str, Any]]:
    """``(model in eval mode on device, checkpoint dict)`` of ``checkpoint`` for ``cfg``'s task."""
    from pce.engine.evaluation import load_trained_weights  # the one loading path of eval / infer / export

    model = task.build_model(cfg)
    ckpt = load_trained_weights(model, cfg, checkpoint)
    return model.to(device).eval(), ckpt


def load_split(cfg: Any, task: Any, split: str, num: Optional[int] = None) -> Any:
    """The ``split`` dataset of ``cfg`` (its first ``num`` samples when given)."""
    datasets = task.build_datasets(cfg, splits=(split,))
    if split not in datasets:
        raise PCEError(f"data.{split}", "the config defines no such dataset", "a configured split: train, val or test")
    ds = datasets[split]
    if num is not None and num < len(ds):
        ds = Subset(ds, list(range(int(num))))
    return ds


def batch_targets(task_name: str, batch: Any, out: Any) -> Tuple[Any, Optional[List[Tuple[int, int]]]]:
    """The targets of a batch (from ``task.predict``'s output) and, for detection, the image sizes."""
    targets = out[1] if isinstance(out, (list, tuple)) and len(out) > 1 else None
    sizes = [tuple(im.shape[-2:]) for im in batch[0]] if task_name == "detection" else None
    return targets, sizes


class Collected:
    """What :func:`collect_routing` gathered: ``stats`` (:class:`RoutingStats`), ``vectors`` (``[N, D]`` per-image
    routing vectors: every layer's weights ``[P * E]`` concatenated), ``image_labels`` (``[N]``, classification
    only, else ``None``) and ``indices`` (dataset index of each row)."""

    def __init__(self, stats: RoutingStats, vectors: np.ndarray, image_labels: Optional[np.ndarray],
                 indices: np.ndarray) -> None:
        self.stats, self.vectors, self.image_labels, self.indices = stats, vectors, image_labels, indices


def _vectors(by_layer: Dict[str, Any]) -> torch.Tensor:
    parts = [r.weights.detach().float().cpu().reshape(r.weights.shape[0], -1) for r in by_layer.values()]
    return torch.cat(parts, 1)


@torch.no_grad()
def collect_routing(model: nn.Module, task: Any, cfg: Any, dataset: Any, device: torch.device,
                    progress: bool = True, seed: int = 0) -> Collected:
    """Run ``task.predict`` over ``dataset`` with the routing recorded; statistics with patch labels."""
    from tqdm.auto import tqdm

    from pce.engine.trainer import build_eval_loader

    name = getattr(task, "name", cfg.task)
    stats = RoutingStats(num_classes=int(cfg.model.num_classes), seed=seed)
    vectors: List[torch.Tensor] = []
    labels: List[torch.Tensor] = []
    ignore = int(getattr(task, "ignore_index", 255))
    loader = build_eval_loader(cfg, task, dataset, device)
    for batch in tqdm(loader, desc="routing", disable=not progress, leave=False):
        with record_routing(model, detach=True) as rec:
            out = task.predict(model, batch, device)
        targets, sizes = batch_targets(name, batch, out)
        first: Dict[str, Any] = {}
        for layer, r in rec.records:
            first.setdefault(layer, r)
        lab = {}
        if targets is not None:
            for layer, r in first.items():
                lab[layer] = patch_labels(name, targets, grid_of(r), cfg.model.num_classes, sizes, ignore)
        stats.update(list(first.items()), lab)
        vectors.append(_vectors(first))
        if name == "classification" and targets is not None:
            labels.append(torch.as_tensor(targets).reshape(-1).cpu())
    if not vectors:
        raise PCEError("dataset", "no batches", "a non-empty split")
    same = len({v.shape[1] for v in vectors}) == 1
    vec = torch.cat(vectors).numpy() if same else np.zeros((sum(len(v) for v in vectors), 0), np.float32)
    image_labels = torch.cat(labels).numpy() if labels else None
    return Collected(stats, vec, image_labels, np.arange(len(vec)))


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
