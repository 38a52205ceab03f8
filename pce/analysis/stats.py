"""Routing statistics over a dataset (or one batch), per layer and expert.

Functions on fixed tensors (each tested against a hand computation) and :class:`RoutingStats`, which
accumulates them batch by batch. Conventions: ``weights [N, E]`` are the mixing weights of ``N`` patches (a row of
zeros = a dropped patch); an expert is *used* by a patch when its weight is non-zero; the patch's expert is the
argmax of its weights. Entropies are in nats.

Specialisation: the normalised mutual information (scikit-learn's ``normalized_mutual_info_score``, arithmetic
normalisation) between the patch's expert and a label of the patch (its image's class, the pixel label under
it, the class of the box it falls in, or its grid position), next to the same NMI with the labels shuffled
(``baseline``: what chance gives with these label and expert frequencies).
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import torch

from pce.analysis.maps import grid_of
from pce.moe.metrics import COLLAPSE_TAU, entropy
from pce.moe.routing import RoutingResult

__all__ = ["usage", "usage_share", "mean_weight", "dropped_rate", "mean_entropy", "usage_entropy", "imbalance",
           "collapsed_experts", "nmi_with_baseline", "assigned_experts", "RoutingStats", "COLLAPSE_TAU"]

def _flat(weights: torch.Tensor) -> torch.Tensor:
    return weights.detach().float().reshape(-1, weights.shape[-1]).cpu()


def usage(weights: torch.Tensor) -> torch.Tensor:
    """``[E]`` fraction of the patches whose weight on each expert is non-zero (``weights [..., E]``)."""
    return (_flat(weights) > 0).float().mean(0)


def usage_share(weights: torch.Tensor) -> torch.Tensor:
    """``[E]`` each expert's share of all (patch, expert) assignments; sums to 1 (zeros when all dropped)."""
    count = (_flat(weights) > 0).float().sum(0)
    return count / count.sum().clamp_min(1)


def mean_weight(weights: torch.Tensor) -> torch.Tensor:
    """``[E]`` mean gate weight of each expert over all patches (dropped ones count as 0)."""
    return _flat(weights).mean(0)


def dropped_rate(weights: torch.Tensor) -> float:
    """Fraction of the patches with no expert (all-zero weights)."""
    return float((_flat(weights).sum(-1) == 0).float().mean())


def mean_entropy(probs: torch.Tensor) -> float:
    """Mean over patches of the routing entropy of ``probs [..., E]`` (nats)."""
    return float(entropy(_flat(probs)).mean())


def usage_entropy(share: torch.Tensor) -> float:
    """Entropy (nats) of a usage distribution ``share [E]`` (normalised first); ``log E`` = perfectly balanced."""
    p = share.float() / share.float().sum().clamp_min(1e-12)
    return float(entropy(p))


def imbalance(load: torch.Tensor) -> float:
    """``max / min`` of the per-expert load ``[E]``; ``inf`` when an expert gets nothing; 1 = balanced."""
    lo, hi = float(load.min()), float(load.max())
    return hi / lo if lo > 0 else (math.inf if hi > 0 else 1.0)


def collapsed_experts(use: torch.Tensor, tau: float = COLLAPSE_TAU) -> List[int]:
    """Indices of the experts whose usage ``[E]`` is below ``tau``."""
    return [int(i) for i in torch.nonzero(use < tau).flatten()]


def assigned_experts(weights: torch.Tensor) -> torch.Tensor:
    """``int64 [...]``: the argmax expert of every patch of ``weights [..., E]``, ``-1`` where dropped."""
    w = weights.detach().float().cpu()
    return torch.where(w.sum(-1) > 0, w.argmax(-1), torch.full(w.shape[:-1], -1, dtype=torch.int64))


def nmi_with_baseline(experts: Sequence[int], labels: Sequence[int], shuffles: int = 3, seed: int = 0,
                      max_samples: int = 200_000) -> Dict[str, Any]:
    """NMI between ``experts [N]`` and ``labels [N]`` (pairs with expert or label < 0 are left out) and the mean /
    std of the NMI with the labels shuffled ``shuffles`` times. ``{"nmi", "baseline", "baseline_std", "n"}``
    (``nmi`` is ``None`` with fewer than 2 pairs)."""
    from sklearn.metrics import normalized_mutual_info_score as nmi

    e, y = np.asarray(experts, dtype=np.int64), np.asarray(labels, dtype=np.int64)
    keep = (e >= 0) & (y >= 0)
    e, y = e[keep], y[keep]
    rng = np.random.default_rng(seed)
    if e.size > max_samples:
        idx = rng.choice(e.size, max_samples, replace=False)
        e, y = e[idx], y[idx]
    if e.size < 2:
        return {"nmi": None, "baseline": None, "baseline_std": None, "n": int(e.size)}
    if np.unique(e).size < 2 or np.unique(y).size < 2:  # one expert, or one label: no information shared. (scikit-
        # learn scores two constant labelings 1.0, "identical partitions": a shared phase seen on an all-background
        # batch would read as perfect specialisation)
        return {"nmi": 0.0, "baseline": 0.0, "baseline_std": 0.0, "n": int(e.size)}
    base = [nmi(rng.permutation(y), e) for _ in range(max(shuffles, 1))]
    return {"nmi": float(nmi(y, e)), "baseline": float(np.mean(base)), "baseline_std": float(np.std(base)),
            "n": int(e.size)}


class _LayerAccumulator:
    """Running sums of one layer (see :class:`RoutingStats`)."""

    def __init__(self, num_experts: int, grid) -> None:
        E = num_experts
        self.E, self.grid = E, tuple(grid)
        self.count = torch.zeros(E, dtype=torch.float64)
        self.weight_sum = torch.zeros(E, dtype=torch.float64)
        self.patches = 0
        self.dropped = 0
        self.entropy_sum = 0.0
        self.expert_entropy_sum = torch.zeros(E, dtype=torch.float64)
        self.experts: List[np.ndarray] = []
        self.labels: List[np.ndarray] = []
        self.positions: List[np.ndarray] = []
        self.position_sum = torch.zeros(E, int(grid[0]) * int(grid[1]), dtype=torch.float64)
        self.position_images = 0

    def update(self, result: RoutingResult, labels: Optional[torch.Tensor]) -> None:
        w = result.weights.detach().float().cpu()
        B, P, E = w.shape
        if E != self.E:
            raise ValueError(f"a layer's expert count changed between batches ({self.E} -> {E})")
        flat = w.reshape(-1, E)
        self.count += (flat > 0).double().sum(0)
        self.weight_sum += flat.double().sum(0)
        self.patches += B * P
        self.dropped += int((flat.sum(-1) == 0).sum())
        ent = entropy(result.probs.detach().float().cpu().reshape(-1, E)).double()
        self.entropy_sum += float(ent.sum())
        experts = assigned_experts(w)  # [B, P]
        flat_e = experts.reshape(-1)
        self.expert_entropy_sum.index_add_(0, flat_e[flat_e >= 0], ent[flat_e >= 0])
        self.experts.append(experts.reshape(-1).numpy().astype(np.int16 if E < 32000 else np.int64))
        grid = grid_of(result)
        gid = hash(grid) % 1000 if grid != self.grid else 0
        pos = np.tile(np.arange(P, dtype=np.int64) + gid * 1_000_000, B)
        self.positions.append(pos)
        lab = (np.full(B * P, -1, dtype=np.int64) if labels is None
               else labels.reshape(-1).cpu().numpy().astype(np.int64))
        if lab.size != B * P:
            raise ValueError(f"patch labels have {lab.size} entries for {B} x {P} patches")
        self.labels.append(lab)
        if grid == self.grid:
            one_hot = torch.nn.functional.one_hot(experts.clamp_min(0), E).double() * (experts >= 0).unsqueeze(-1)
            self.position_sum += one_hot.sum(0).t()
            self.position_images += B

    def _expert_entropy(self, experts: np.ndarray) -> torch.Tensor:
        """``[E]`` mean routing entropy of the patches whose argmax is each expert (0 for an unused one)."""
        n = torch.from_numpy(np.bincount(experts[experts >= 0].astype(np.int64), minlength=self.E)).double()
        return (self.expert_entropy_sum / n.clamp_min(1)).float()

    def compute(self, num_classes: Optional[int], tau: float, shuffles: int, seed: int) -> Dict[str, Any]:
        n = max(self.patches, 1)
        use = (self.count / n).float()
        share = (self.count / self.count.sum().clamp_min(1)).float()
        experts, labels = np.concatenate(self.experts), np.concatenate(self.labels)
        out: Dict[str, Any] = {
            "num_experts": self.E, "grid": list(self.grid), "num_patches": self.patches,
            "usage": use.tolist(), "usage_share": share.tolist(), "mean_weight": (self.weight_sum / n).float().tolist(),
            "dropped_rate": self.dropped / n, "entropy": self.entropy_sum / n, "usage_entropy": usage_entropy(share),
            "max_entropy": math.log(self.E), "imbalance": imbalance(self.count),
            "expert_entropy": self._expert_entropy(experts).tolist(),
            "collapsed_experts": collapsed_experts(use, tau),
            "nmi_position": nmi_with_baseline(experts, np.concatenate(self.positions), shuffles, seed),
        }
        if (labels >= 0).any():
            out["nmi_class"] = nmi_with_baseline(experts, labels, shuffles, seed)
            K = int(num_classes or labels.max() + 1)
            keep = (experts >= 0) & (labels >= 0) & (labels < K)
            cm = np.zeros((self.E, K), dtype=np.int64)
            np.add.at(cm, (experts[keep].astype(np.int64), labels[keep]), 1)
            out["expert_class"] = cm.tolist()
        if self.position_images:
            pc = self.position_sum / float(self.position_images)
            out["expert_position"] = pc.reshape(self.E, *self.grid).float().tolist()
        return out


class RoutingStats:
    """Accumulate per-layer routing statistics over batches; :meth:`compute` returns plain numbers.

    >>> stats = RoutingStats(num_classes=10)
    >>> with pce.record_routing(model, detach=True) as rec:
    ...     model(images)
    >>> stats.update(rec.records, labels={name: patch_labels [B, P]})   # labels optional (-1 = none)
    >>> stats.compute()["backbone.stages.2.layers.0"]["nmi_class"]        # {"nmi", "baseline", ...}

    Per layer: ``usage [E]`` (fraction of patches using each expert), ``usage_share [E]`` (sums to 1),
    ``mean_weight [E]``, ``dropped_rate``, ``entropy`` (mean routing entropy), ``expert_entropy [E]`` (mean
    routing entropy of the patches each expert takes), ``usage_entropy`` (of
    ``usage_share``; ``max_entropy = log E``), ``imbalance`` (max / min load), ``collapsed_experts`` (indices with
    usage < ``tau``), ``nmi_position`` and, with labels, ``nmi_class`` (each ``{"nmi", "baseline",
    "baseline_std", "n"}``), ``expert_class [E][K]`` counts and ``expert_position [E][gh][gw]`` (share of the
    images whose patch at that cell goes to the expert).
    """

    def __init__(self, num_classes: Optional[int] = None, tau: float = COLLAPSE_TAU, shuffles: int = 3,
                 seed: int = 0) -> None:
        self.num_classes, self.tau, self.shuffles, self.seed = num_classes, tau, shuffles, seed
        self.layers: Dict[str, _LayerAccumulator] = {}

    def update(self, records, labels: Optional[Dict[str, torch.Tensor]] = None) -> None:
        """``records``: ``[(layer name, RoutingResult)]`` (a recorder's ``records``); ``labels``: optional
        ``{layer name: int [B, P]}`` patch labels (``-1``: no label). A layer recorded twice counts twice."""
        for name, result in records:
            acc = self.layers.get(name)
            if acc is None:
                acc = self.layers[name] = _LayerAccumulator(result.num_experts, grid_of(result))
            acc.update(result, (labels or {}).get(name))

    def compute(self) -> Dict[str, Dict[str, Any]]:
        """``{layer name: statistics}`` in the order the layers were first seen."""
        return {name: acc.compute(self.num_classes, self.tau, self.shuffles, self.seed)
                for name, acc in self.layers.items()}
