"""Expert diversity: do the experts of a routed layer differ at all?

A layer whose experts are copies (after sparse upcycling and a short schedule) computes the same function whatever
its router decides, so its routing maps say nothing. Two measures per routed layer (any model: a backbone, a
classifier, an smp / timm model with :class:`pce.PCEConv2d`):

* **weights**: the pairwise cosine ``[E, E]`` of the experts' flattened convolution kernels (every stacked
  convolution of the expert bank, in module order; batch-norm affine parameters are left out: initialised to
  ones, they would make unrelated experts look alike);
* **outputs**: every expert run on the same inputs, the layer's own inputs captured by a forward pre-hook while
  ``forward(model, batch)`` runs over a few batches (eval mode): pairwise mean cosine ``[E, E]`` over tokens and
  relative L2 distance ``||Y_i - Y_j|| / max(||Y_i||, ||Y_j||)`` over all tokens. A token is a patch of a
  :class:`~pce.models.layer.PCELayer` (its extractor's patches, positional channels when the experts see them) or
  an output pixel of a :class:`pce.PCEConv2d` (its kernels on the padded map). Patches are isolated (no halo, no
  neighbours) whatever the layer's execution: what is compared is the experts' functions on the same inputs.

>>> div = expert_diversity(model, [images])          # {layer: {"weight_cosine": [[...]], "output_cosine": ...}}
>>> diversity_summary(div)                           # flat numbers for a results row

Identical experts give cosines of 1 and distances of 0. Two all-zero output vectors count as identical (cosine 1),
one all-zero and one not as cosine 0 (ReLU experts can output zeros on a whole patch).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from pce.layers.patched_map import PatchedMap
from pce.models.routed import routed_layers
from pce.moe.experts import ExpertBank
from pce.moe.stacked import StackedConv2d

__all__ = ["expert_weight_vectors", "weight_cosine", "pairwise_output_similarity", "layer_expert_outputs",
           "expert_diversity", "diversity_summary", "default_forward"]


def expert_weight_vectors(bank: ExpertBank) -> torch.Tensor:
    """``[E, D]``: each expert's convolution kernels (every :class:`StackedConv2d` of ``bank``), flattened."""
    convs = [m for m in bank.modules() if isinstance(m, StackedConv2d)]
    if not convs:
        raise ValueError(f"{type(bank).__name__} holds no stacked convolution")
    rows = [torch.cat([c.weights[e].detach().reshape(-1) for c in convs]) for e in range(bank.num_experts)]
    return torch.stack(rows).double()


def weight_cosine(bank: ExpertBank) -> torch.Tensor:
    """``[E, E]`` pairwise cosine similarity of the experts' flattened kernels."""
    v = F.normalize(expert_weight_vectors(bank), dim=1)
    return v @ v.T


class _OutputPairs:
    """Running sums over tokens of outputs ``[N, E, D]``: cosines, squared distances, squared norms."""

    def __init__(self, num_experts: int) -> None:
        E = num_experts
        self.cos_sum = torch.zeros(E, E, dtype=torch.float64)
        self.dist2 = torch.zeros(E, E, dtype=torch.float64)
        self.norm2 = torch.zeros(E, dtype=torch.float64)
        self.tokens = 0

    def update(self, y: torch.Tensor) -> None:
        y = y.detach().double().cpu()                       # [N, E, D]
        norms = y.norm(dim=-1)                              # [N, E]
        dots = torch.einsum("nid,njd->nij", y, y)          # [N, E, E]
        denom = norms[:, :, None] * norms[:, None, :]
        zero_i, zero_j = (norms == 0)[:, :, None], (norms == 0)[:, None, :]
        cos = torch.where(denom > 0, dots / denom.clamp_min(1e-300), (zero_i & zero_j).double())
        self.cos_sum += cos.sum(0)
        sq = norms.square()
        self.dist2 += (sq[:, :, None] + sq[:, None, :] - 2 * dots).clamp_min(0).sum(0)
        self.norm2 += sq.sum(0)
        self.tokens += y.shape[0]

    def result(self) -> Dict[str, torch.Tensor]:
        n = self.norm2.sqrt()
        scale = torch.maximum(n[:, None], n[None, :])
        rel = torch.where(scale > 0, self.dist2.sqrt() / scale.clamp_min(1e-300), torch.zeros_like(scale))
        return {"cosine": self.cos_sum / max(self.tokens, 1), "rel_l2": rel}


def pairwise_output_similarity(outputs: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Outputs ``[N, E, D]`` of E experts on the same N tokens -> ``{"cosine": [E, E] mean over tokens,
    "rel_l2": [E, E] ||Y_i - Y_j|| / max(||Y_i||, ||Y_j||)}``."""
    acc = _OutputPairs(outputs.shape[1])
    acc.update(outputs)
    return acc.result()


@torch.no_grad()
def layer_expert_outputs(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Every expert of routed ``layer`` on the tokens of its input ``x [B, C, H, W]`` -> ``[N, E, D]``: the
    patches of a PCE layer (``N = B * P``, ``D = C n n``) or the output pixels of a :class:`pce.PCEConv2d`
    (``N = B H_out W_out``, ``D = C_out``)."""
    bank: ExpertBank = layer.experts
    if hasattr(layer, "extractor"):  # a PCE layer: its patches, as its isolated execution cuts them
        view = PatchedMap(x, layer.extractor, layer.pos)
        tokens = view.patches(bool(getattr(layer, "experts_see_position", False)))
        y = bank.forward_all(tokens.flatten(0, 1))               # [B * P, E, C, n, n]
        return y.flatten(2)
    y = bank.forward_all(layer._pad(x))                          # [B, E, C_out, H_out, W_out]
    return y.permute(0, 3, 4, 1, 2).reshape(-1, bank.num_experts, y.shape[2])


def _off_diagonal(m: torch.Tensor) -> torch.Tensor:
    E = m.shape[0]
    return m[~torch.eye(E, dtype=torch.bool)]


def _stats(prefix: str, m: torch.Tensor, lowest: bool) -> Dict[str, Any]:
    off = _off_diagonal(m)
    out: Dict[str, Any] = {prefix: m.tolist()}
    if off.numel():
        out[f"{prefix}_min" if lowest else f"{prefix}_max"] = float(off.min() if lowest else off.max())
        out[f"{prefix}_mean"] = float(off.mean())
    return out


def default_forward(model: nn.Module, batch: Any) -> Any:
    """``model(batch)`` with the batch on the model's device: an image tensor ``[B, C, H, W]`` or a list of image
    tensors (detection)."""
    device = next(model.parameters()).device
    if isinstance(batch, torch.Tensor):
        return model(batch.to(device))
    if isinstance(batch, list) and all(isinstance(t, torch.Tensor) for t in batch):
        return model([t.to(device) for t in batch])
    return model(batch)


@torch.no_grad()
def expert_diversity(model: nn.Module, batches: Iterable[Any] = (),
                     forward: Optional[Callable[[nn.Module, Any], Any]] = None) -> Dict[str, Dict[str, Any]]:
    """Per routed layer of ``model`` (names as :func:`pce.record_routing` gives them): ``num_experts``,
    ``weight_cosine`` ``[E][E]`` with ``weight_cosine_min`` / ``_mean`` (off the diagonal), and, when ``batches``
    are given, ``output_cosine`` (``_min`` / ``_mean``), ``output_rel_l2`` (``_max`` / ``_mean``) and ``tokens``:
    every expert on the layer's inputs captured during ``forward(model, batch)`` (default ``model(batch)``) of each
    batch (image tensors, or lists of them, moved to the model's device), in eval mode. A layer with one expert
    has no pairs (matrices ``[[1.0]]`` / ``[[0.0]]`` only)."""
    forward = forward or default_forward
    layers = list(routed_layers(model))
    acc = {name: _OutputPairs(layer.num_experts) for name, layer in layers}
    hooks = []
    for name, layer in layers:
        def hook(module: nn.Module, args: tuple, name: str = name) -> None:
            acc[name].update(layer_expert_outputs(module, args[0]))
        hooks.append(layer.register_forward_pre_hook(hook))
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            forward(model, batch)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    out: Dict[str, Dict[str, Any]] = {}
    for name, layer in layers:
        row: Dict[str, Any] = {"num_experts": layer.num_experts}
        row.update(_stats("weight_cosine", weight_cosine(layer.experts), lowest=True))
        if acc[name].tokens:
            sim = acc[name].result()
            row.update(_stats("output_cosine", sim["cosine"], lowest=True))
            row.update(_stats("output_rel_l2", sim["rel_l2"], lowest=False))
            row["tokens"] = acc[name].tokens
        out[name] = row
    return out


def diversity_summary(diversity: Dict[str, Dict[str, Any]]) -> Dict[str, Optional[float]]:
    """Flat numbers for a results row, over every layer with at least two experts: the lowest pairwise weight
    cosine of any layer (``expert_weight_cos_min``: near 1 means every pair is a near-copy), the mean of the
    layers' mean off-diagonal weight and output cosines, and the smallest mean relative output distance of any layer
    (``expert_output_rel_l2_min``: 0 for a layer of copies)."""
    rows = [r for r in diversity.values() if r["num_experts"] > 1]

    def pick(key: str, how: Callable[[List[float]], float]) -> Optional[float]:
        vals = [r[key] for r in rows if key in r]
        return how(vals) if vals else None

    return {"expert_weight_cos_min": pick("weight_cosine_min", min),
            "expert_weight_cos_mean": pick("weight_cosine_mean", lambda v: sum(v) / len(v)),
            "expert_output_cos_mean": pick("output_cosine_mean", lambda v: sum(v) / len(v)),
            "expert_output_rel_l2_min": pick("output_rel_l2_mean", min)}
