"""Change a trained model's experts: prune (remove) them, or duplicate (reinforce) one.

>>> small = prune_experts(model, {"backbone.stages.2.layers.0": [1, 3]})     # a copy with 2 experts fewer there
>>> big = duplicate_expert(model, "backbone.stages.3.layers.0", expert=0)    # a copy with expert 0 twice

Both rebuild the layer's expert bank from a list of source experts (every stacked convolution's per-expert
kernels and biases, every stacked batch norm's affine parameters and running statistics), adjust the router
(cosine / Gumbel keys ``[E, D]``, the gate MLP's output rows, ``top_k``, and the capacity factor so each expert's
capacity stays the same) and set the layer's ``num_experts``. :func:`structure` / :func:`apply_structure` record
and replay the edits, so a checkpoint of an edited model loads into a model built from the original config.

Duplicating keeps a layer's outputs exactly only where the copy cannot change the weights the other experts and
the original get (:func:`duplicate_changes_outputs` says where not): top-1 routing with renormalised weights
(``renormalize=True`` or ``"straight_through"``: the chosen expert's weight is 1, whichever copy wins), and soft
routing (``top_k=None``) by a gate router, whose two copies' logits are lowered by ``log 2``. Elsewhere the
copy's probability joins the softmax normaliser: top-1 routing without renormalisation (the demo configs' cosine
router) keeps the choice of expert but scales every patch's weight by ``1 / (1 + p)`` (``p``: the duplicated
expert's probability on the patch; a static logit shift cannot help: the pair's probabilities must sum to the
original's for the other experts' weights to stay, while the winning copy alone would need all of it).
"""
from __future__ import annotations

import copy
import logging
import math
from typing import Dict, List, Mapping, Optional, Sequence

import torch
from torch import nn

from pce.moe.experts import ExpertBank, StackedBatchNorm2d, StackedConv2d
from pce.moe.recorder import routing_sources, strip_wrapper_prefix

__all__ = ["prune_experts", "duplicate_expert", "duplicate_changes_outputs", "select_experts", "pce_layers",
           "structure", "apply_structure"]

logger = logging.getLogger("pce")


def pce_layers(model: nn.Module) -> Dict[str, nn.Module]:
    """``{layer name (as the recorder names it): PCE layer}`` of every routing layer with an expert bank."""
    return {strip_wrapper_prefix(n): m for n, m in routing_sources(model)
            if isinstance(getattr(m, "experts", None), ExpertBank)}


def _layer(model: nn.Module, name: str) -> nn.Module:
    layers = pce_layers(model)
    if name not in layers:
        raise KeyError(f"{name}: no PCE layer of that name (layers: {', '.join(layers) or 'none'})")
    return layers[name]


@torch.no_grad()
def _select_conv(conv: StackedConv2d, index: Sequence[int]) -> None:
    conv.weights = nn.ParameterList([nn.Parameter(conv.weights[i].detach().clone()) for i in index])
    if conv.biases is not None:
        conv.biases = nn.ParameterList([nn.Parameter(conv.biases[i].detach().clone()) for i in index])
    conv.num_experts = len(index)


@torch.no_grad()
def _select_bn(bn: StackedBatchNorm2d, index: Sequence[int]) -> None:
    c = bn.channels
    rows = torch.cat([torch.arange(i * c, (i + 1) * c) for i in index])
    for pname in ("weight", "bias"):
        p = getattr(bn, pname)
        if p is not None:
            setattr(bn, pname, nn.Parameter(p.detach()[rows].clone(), requires_grad=p.requires_grad))
    for bname in ("running_mean", "running_var"):
        b = getattr(bn, bname)
        if b is not None:
            setattr(bn, bname, b[rows].clone())
    bn.num_features, bn.num_experts, bn._split = len(index) * c, len(index), None


def _select_bank(bank: ExpertBank, index: Sequence[int]) -> None:
    for m in bank.modules():
        if isinstance(m, StackedConv2d):
            _select_conv(m, index)
        elif isinstance(m, StackedBatchNorm2d):
            _select_bn(m, index)
        elif m is not bank and getattr(m, "num_experts", None) is not None:
            raise TypeError(f"{type(m).__name__} inside the expert bank: only stacked convolutions and batch norms "
                            "can be pruned (prune before pce.models.fuse)")
    bank.num_experts = len(index)


def _scale_capacity(router: nn.Module, ratio: float) -> None:
    for attr in ("capacity_factor", "choice_capacity_factor"):
        if getattr(router, attr, None) is not None:
            setattr(router, attr, float(getattr(router, attr)) * ratio)


@torch.no_grad()
def _select_router(router: nn.Module, index: Sequence[int], logit_shift: Mapping[int, float]) -> None:
    """Keys / gate rows follow ``index``; ``logit_shift[j]`` is added to the gate bias of new expert ``j``."""
    old, new = int(router.num_experts), len(index)
    keys = getattr(router, "keys", None)
    if isinstance(keys, torch.Tensor) and keys.dim() == 2 and keys.shape[0] == old:
        router.keys = nn.Parameter(keys.detach()[list(index)].clone(), requires_grad=keys.requires_grad)
    scorer = getattr(router, "scorer", None)
    head = _gate_head(router)
    if head is not None and head.out_features == old:
        w = head.weight.detach()[list(index)].clone()
        b = head.bias.detach()[list(index)].clone() if head.bias is not None else None
        if b is not None:
            for j, shift in logit_shift.items():
                b[j] += shift
        lin = nn.Linear(head.in_features, new, bias=b is not None).to(w.device, w.dtype)
        lin.weight.copy_(w)
        if b is not None:
            lin.bias.copy_(b)
        scorer.mlp[-1] = lin
    router.num_experts = new
    if getattr(router, "top_k", None) is not None:
        router.top_k = min(int(router.top_k), new)
    if getattr(router, "subset", None) is not None:
        router.subset = min(int(router.subset), new)
    _scale_capacity(router, new / old)


def select_experts(layer: nn.Module, index: Sequence[int], logit_shift: Optional[Mapping[int, float]] = None) -> None:
    """Rebuild ``layer`` (in place) with experts ``index`` (source expert of each new expert; repeats copy)."""
    E = int(layer.num_experts)
    index = [int(i) for i in index]
    if not index or any(not 0 <= i < E for i in index):
        raise ValueError(f"expert indices must be in [0, {E}) and leave at least one expert, got {index}")
    _select_bank(layer.experts, index)
    _select_router(layer.router, index, logit_shift or {})
    if getattr(layer, "router_override", None) is not None:
        _select_router(layer.router_override, index, {})
    layer.num_experts = len(index)
    edits = layer.__dict__.setdefault("_expert_edits", [])
    edits.append(list(index))


def prune_experts(model: nn.Module, experts: Mapping[str, Sequence[int]], inplace: bool = False) -> nn.Module:
    """A model without the given experts: ``experts = {layer name: [expert indices to remove]}`` (names as
    :func:`pce.record_routing` gives them). Remaining experts keep their order. Returns the model (a deep copy
    unless ``inplace``)."""
    model = model if inplace else copy.deepcopy(model)
    for name, remove in experts.items():
        layer = _layer(model, name)
        E, drop = int(layer.num_experts), {int(i) for i in remove}
        bad = [i for i in drop if not 0 <= i < E]
        if bad:
            raise ValueError(f"{name}: expert indices {bad} out of range [0, {E})")
        keep = [e for e in range(E) if e not in drop]
        if not keep:
            raise ValueError(f"{name}: cannot remove all {E} experts")
        if drop:
            select_experts(layer, keep)
    return model


def _gate_head(router: nn.Module) -> Optional[nn.Linear]:
    """The output layer of a gate router's MLP (the logits, one row per expert), or ``None``."""
    scorer = getattr(router, "scorer", None)
    head = scorer.mlp[-1] if scorer is not None and isinstance(getattr(scorer, "mlp", None), nn.Sequential) else None
    return head if isinstance(head, nn.Linear) else None


def duplicate_changes_outputs(layer: nn.Module) -> Optional[str]:
    """Why duplicating one of ``layer``'s experts changes its outputs (evaluation mode), or ``None`` when
    :func:`duplicate_expert` keeps them exactly (for a capacity factor: while no expert overflows its capacity).
    Judged on the router the layer routes with now (a phase's ``router_override`` when one is set)."""
    router = layer.current_router() if hasattr(layer, "current_router") else layer.router
    name = type(router).__name__
    if getattr(router, "choice_capacity_factor", None) is not None:
        return f"{name} (expert choice): the copy picks the same patches as the original, which then run it twice"
    if getattr(router, "parameter_free", False) and not getattr(router, "uses_keys", False):
        return (f"{name} (parameter-free: the phase's router_override): the duplicated expert counts twice among "
                "the E + 1 experts")
    top_k, renorm = getattr(router, "top_k", None), getattr(router, "renormalize", False)
    if top_k is None:
        head = _gate_head(router)
        if head is not None and head.bias is not None:
            return None  # both copies' logits lowered by log 2: the same probabilities, split in two
        return (f"{name} with soft routing (top_k=None) has no per-expert logit bias to split the duplicated "
                "expert's probability: the copy joins the softmax normaliser, every patch's weights shrink by "
                "1 / (1 + p) (p: the duplicated expert's probability on the patch)")
    if int(top_k) == 1:
        if renorm:
            return None  # the chosen expert's weight is 1 whichever copy wins: the same output
        return (f"{name} routes top-1 without renormalisation (renormalize=False): the kept weight is a softmax "
                "probability, now over E + 1 experts, so every patch's weight shrinks by 1 / (1 + p) (p: the "
                "duplicated expert's probability on the patch; the chosen expert stays the same); exact with "
                "renormalize=True or 'straight_through'")
    return (f"{name} routes top-{int(top_k)}: the copy ties with the original and takes another expert's place "
            f"among the {int(top_k)} kept")


def duplicate_expert(model: nn.Module, layer_name: str, expert: int, jitter: float = 0.0,
                     inplace: bool = False, exact: bool = False, warn: bool = True) -> nn.Module:
    """A model whose layer ``layer_name`` has a copy of ``expert`` appended (index ``E``): same weights, same
    batch-norm statistics, same router key / gate row. Under soft routing (``top_k=None``) a gate router's
    logits of both copies are lowered by ``log 2``, so their summed probability equals the original's and the
    load is split exactly. ``jitter > 0`` moves the two copies' keys (keyed routers) apart by ``+-jitter * |k|``
    along a random direction orthogonal to the key, so under top-1 routing they share the expert's patches (and
    diverge in training).

    The outputs stay exactly the same for top-1 routing with renormalised weights (either copy gives the same
    output with weight 1, jitter or not) and for soft gate routing; otherwise the copy changes them
    (:func:`duplicate_changes_outputs` says how, e.g. top-1 routing without renormalisation scales every patch's
    weight by ``1 / (1 + p)``): a warning on the ``pce`` logger (``warn``), or a ``ValueError`` with
    ``exact=True``."""
    model = model if inplace else copy.deepcopy(model)
    layer = _layer(model, layer_name)
    E = int(layer.num_experts)
    if not 0 <= int(expert) < E:
        raise ValueError(f"{layer_name}: expert {expert} out of range [0, {E})")
    why = duplicate_changes_outputs(layer)
    if why is not None:
        msg = f"{layer_name}: duplicating expert {int(expert)} changes the outputs: {why}"
        if exact:
            raise ValueError(msg)
        if warn:
            logger.warning("%s", msg)
    soft = getattr(layer.router, "top_k", None) is None  # under top-k a lowered logit would change the choice
    half = -math.log(2.0)
    select_experts(layer, list(range(E)) + [int(expert)], {int(expert): half, E: half} if soft else {})
    keys = getattr(layer.router, "keys", None)
    if jitter > 0 and isinstance(keys, torch.Tensor):
        with torch.no_grad():  # antithetic: the two copies move apart symmetrically, patches split by side
            k = keys[E].clone()
            d = torch.randn_like(k)
            d = d - (d @ k) / (k @ k).clamp_min(1e-12) * k  # orthogonal to the key: both copies stay equally close
            d = jitter * k.norm() * d / d.norm().clamp_min(1e-12)
            keys[int(expert)], keys[E] = k + d, k - d
    return model


def structure(model: nn.Module) -> Dict[str, List[List[int]]]:
    """The expert edits applied to ``model``'s layers: ``{layer name: [index list of each select_experts]}``."""
    return {n: [list(e) for e in m.__dict__.get("_expert_edits", [])]
            for n, m in pce_layers(model).items() if m.__dict__.get("_expert_edits")}


def apply_structure(model: nn.Module, edits: Mapping[str, Sequence[Sequence[int]]]) -> nn.Module:
    """Replay :func:`structure` on a freshly built model (in place) so an edited checkpoint's weights fit it."""
    for name, steps in edits.items():
        layer = _layer(model, name)
        for index in steps:
            select_experts(layer, index)
    return model
