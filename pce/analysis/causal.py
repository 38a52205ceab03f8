"""Causal tests of routing: does the model's output depend on which expert takes which patch?

Two interventions on every routed layer (or the named ones), each compared with the routed model's own output:

* **force** expert ``e``: every patch goes to expert ``e`` alone, with the total weight the router gave the patch
  (so a dropped patch stays dropped and a model whose experts are copies computes exactly what it computed);
  layers with ``e`` or fewer experts keep their routing;
* **shuffle**: the routed patches of a batch exchange their expert distributions (a seeded permutation over the
  ``B * P`` patches of each layer and forward), each rescaled to the patch's own total weight; dropped patches
  stay dropped.

The intervention wraps the router each layer uses (the learned one, or a phase override) and is put in place as
the layer's ``router_override`` for the duration of a ``with routing_intervention(...)`` block, then restored; the
wrapper holds no parameters, so nothing enters a ``state_dict``. A model whose experts are copies shows no change
under either: whatever its routing maps show, it does not route.

>>> table = causal_table(model, [images])        # [{"intervention": "routed" / "expert 0" / ... / "shuffled", ...}]
>>> with routing_intervention(model, "force", expert=1):
...     results = evaluate(model)                 # a task metric under the intervention (tools/analyze_experts.py)
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence

import torch
from torch import nn

from pce.analysis.diversity import default_forward
from pce.models.routed import routed_layers
from pce.moe.routing import Router, RoutingResult

__all__ = ["routing_intervention", "causal_table", "causal_summary", "output_change"]


class _Intervention(Router):
    """A router that asks ``inner`` (kept out of the module tree: no parameters, no ``state_dict`` entries) and
    changes its result. ``kind``: ``"force"`` (to ``expert``) or ``"shuffle"`` (with ``generator``)."""

    def __init__(self, inner: Router, kind: str, expert: int = 0,
                 generator: Optional[torch.Generator] = None) -> None:
        super().__init__(inner.num_experts)
        self._inner = (inner,)
        self.kind, self.expert, self.generator = kind, expert, generator
        self.top_k = 1 if kind == "force" else inner.top_k
        # forced: every routed patch goes to one expert, so the capacity of a load-balanced expert (a share of the
        # patches) would drop most of them; the routed mass already carries the inner router's own drops
        self.renormalize = inner.renormalize
        self.capacity_factor = None if kind == "force" else inner.capacity_factor
        self.train(inner.training)

    @property
    def is_sparse(self) -> bool:
        return self.num_experts > 1 if self.kind == "force" else self._inner[0].is_sparse

    @property
    def active_fraction(self) -> float:
        return 1.0 / self.num_experts if self.kind == "force" else self._inner[0].active_fraction

    def route(self, view: Any) -> RoutingResult:
        return self.change(self._inner[0].route(view))

    def forward(self, patches: torch.Tensor, positions: torch.Tensor) -> RoutingResult:
        return self.change(self._inner[0](patches, positions))

    def change(self, r: RoutingResult) -> RoutingResult:
        """``weights [B, P, E]`` forced to one expert, or shuffled across the routed patches of the batch."""
        w = r.weights
        mass = w.sum(-1, keepdim=True)                                        # [B, P, 1]
        if self.kind == "force":
            onehot = torch.zeros_like(w)
            onehot[..., self.expert] = 1.0
            return RoutingResult(weights=onehot * mass, probs=onehot, logits=None)
        flat_w, flat_m = w.reshape(-1, w.shape[-1]), mass.reshape(-1)
        routed = (flat_m > 0).nonzero().flatten()
        perm = torch.randperm(routed.numel(), generator=self.generator).to(routed.device)
        src = torch.arange(flat_m.numel(), device=w.device)
        src[routed] = routed[perm]                                            # patch i takes patch src[i]'s choice
        unit = flat_w / flat_m.clamp_min(1e-30)[:, None]
        new_w = (unit[src] * flat_m[:, None]).reshape(w.shape)
        take = lambda t: None if t is None else t.reshape(-1, t.shape[-1])[src].reshape(t.shape)  # noqa: E731
        return RoutingResult(weights=new_w, probs=take(r.probs), logits=take(r.logits))


@contextmanager
def routing_intervention(model: nn.Module, kind: str, expert: int = 0, seed: int = 0,
                         layers: Optional[Sequence[str]] = None) -> Iterator[List[str]]:
    """Within the block every routed layer of ``model`` (or those named in ``layers``) routes under intervention
    ``kind``: ``"force"`` (every patch to ``expert``, with the patch's routed weight; layers with at most
    ``expert`` experts are left alone) or ``"shuffle"`` (seeded by ``seed``: the permutations are those of
    ``torch.randperm`` with a generator seeded once for the block, so the same batches give the same shuffles).
    Yields the names of the layers changed; their previous ``router_override`` is restored on exit."""
    if kind not in ("force", "shuffle"):
        raise ValueError(f"intervention must be 'force' or 'shuffle', got {kind!r}")
    chosen = [(n, layer) for n, layer in routed_layers(model) if layers is None or n in layers]
    if layers is not None and len(chosen) != len(set(layers)):
        missing = sorted(set(layers) - {n for n, _ in chosen})
        raise ValueError(f"no routed layer named {missing}; routed layers: {[n for n, _ in routed_layers(model)]}")
    gen = torch.Generator().manual_seed(int(seed))
    saved, names = [], []
    try:
        for name, layer in chosen:
            if kind == "force" and expert >= layer.num_experts:
                continue
            saved.append((layer, layer.router_override))
            layer.router_override = _Intervention(layer.current_router(), kind, expert, gen)
            names.append(name)
        yield names
    finally:
        for layer, previous in reversed(saved):
            layer.router_override = previous


def _tensors(out: Any) -> List[torch.Tensor]:
    """The floating-point tensors of a model output (a tensor, or dicts / lists / tuples of them), in order."""
    if isinstance(out, torch.Tensor):
        return [out.detach().float()] if out.is_floating_point() else []
    if isinstance(out, dict):
        return [t for v in out.values() for t in _tensors(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _tensors(v)]
    return []


def output_change(reference: Any, changed: Any) -> Dict[str, Optional[float]]:
    """``rel_change``: ``||y' - y|| / ||y||`` over every floating tensor of the outputs whose shapes agree;
    ``top1_agreement``: the fraction of rows (``[B, K]`` logits) or pixels (``[B, K, H, W]`` maps) whose arg-max over
    dimension 1 is unchanged, for outputs that are a tensor or a list / tuple of tensors (not the dicts of a
    detector, whose boxes are no scores; ``None`` when no output qualifies); ``max_abs_change``."""
    pairs = [(a, b) for a, b in zip(_tensors(reference), _tensors(changed)) if a.shape == b.shape]
    if not pairs:
        return {"rel_change": None, "top1_agreement": None, "max_abs_change": None}
    num = sum(float((b - a).double().square().sum()) for a, b in pairs)
    den = sum(float(a.double().square().sum()) for a, _ in pairs)
    plain = isinstance(reference, torch.Tensor) or (
        isinstance(reference, (list, tuple)) and all(isinstance(t, torch.Tensor) for t in reference))
    same = [(a.argmax(1) == b.argmax(1)).flatten() for a, b in pairs
            if plain and a.dim() >= 2 and a.shape[1] > 1]
    agree = float(torch.cat(same).float().mean()) if same else None
    return {"rel_change": (num ** 0.5) / max(den ** 0.5, 1e-30), "top1_agreement": agree,
            "max_abs_change": max(float((b - a).abs().max()) if a.numel() else 0.0 for a, b in pairs)}


def _batch_size(batch: Any) -> int:
    """Images in a batch: a tensor's first dimension, that of the first entry of an ``(images, ...)`` tuple, or the
    length of a list of images."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    if isinstance(batch, (tuple, list)) and batch:
        first = batch[0]
        if isinstance(first, torch.Tensor) and isinstance(batch, tuple):
            return int(first.shape[0])
        return _batch_size(first) if isinstance(first, (tuple, list)) else len(batch)
    return 1


def _merge(rows: List[Dict[str, Optional[float]]], sizes: List[int]) -> Dict[str, Optional[float]]:
    """Batch results averaged with weights ``sizes`` (the maximum for ``max_abs_change``)."""
    out: Dict[str, Optional[float]] = {}
    for key in ("rel_change", "top1_agreement"):
        vals = [(r[key], s) for r, s in zip(rows, sizes) if r[key] is not None]
        out[key] = sum(v * s for v, s in vals) / sum(s for _, s in vals) if vals else None
    vals = [r["max_abs_change"] for r in rows if r["max_abs_change"] is not None]
    out["max_abs_change"] = max(vals) if vals else None
    return out


@torch.no_grad()
def causal_table(model: nn.Module, batches: Iterable[Any],
                 forward: Optional[Callable[[nn.Module, Any], Any]] = None, seed: int = 0,
                 layers: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
    """One row per intervention (``"routed"``, ``"expert 0"`` ... ``"expert E-1"`` for the largest E, ``"shuffled"``):
    ``intervention``, ``layers`` (how many changed), ``rel_change``, ``top1_agreement`` and ``max_abs_change`` of
    ``forward(model, batch)`` (default ``model(batch)``) against the routed output, averaged over ``batches`` (weighted
    by batch size), in eval mode."""
    forward = forward or default_forward
    data = list(batches)
    if not data:
        raise ValueError("causal_table needs at least one batch")
    num_experts = max((layer.num_experts for n, layer in routed_layers(model) if layers is None or n in layers),
                      default=0)
    was_training = model.training
    model.eval()
    try:
        reference = [forward(model, b) for b in data]
        sizes = [_batch_size(b) for b in data]
        rows: List[Dict[str, Any]] = [{"intervention": "routed", "layers": 0, "rel_change": 0.0,
                                       "top1_agreement": 1.0, "max_abs_change": 0.0}]
        plans = [("force", e, f"expert {e}") for e in range(num_experts)] + [("shuffle", 0, "shuffled")]
        for kind, e, label in plans:
            with routing_intervention(model, kind, e, seed, layers) as changed:
                got = [output_change(r, forward(model, b)) for r, b in zip(reference, data)]
            rows.append({"intervention": label, "layers": len(changed), **_merge(got, sizes)})
    finally:
        model.train(was_training)
    return rows


def causal_summary(table: Sequence[Dict[str, Any]]) -> Dict[str, Optional[float]]:
    """Flat numbers for a results row: the smallest and largest relative output change over the forced experts
    (``forced_change_min``: 0 when some expert alone reproduces the routed model, ``forced_change_max``: 0 for a
    model of copies), the lowest top-1 agreement of a forced expert, and the shuffle's change and agreement."""
    forced = [r for r in table if str(r["intervention"]).startswith("expert ")]
    shuffled = next((r for r in table if r["intervention"] == "shuffled"), {})
    changes = [r["rel_change"] for r in forced if r["rel_change"] is not None]
    agree = [r["top1_agreement"] for r in forced if r["top1_agreement"] is not None]
    return {"forced_change_min": min(changes) if changes else None,
            "forced_change_max": max(changes) if changes else None,
            "forced_top1_agreement_min": min(agree) if agree else None,
            "shuffled_change": shuffled.get("rel_change"), "shuffled_top1_agreement": shuffled.get("top1_agreement")}
