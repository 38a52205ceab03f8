"""``pce.convert``: put PCE into any model by replacing chosen ``nn.Conv2d`` modules with upcycled
:class:`~pce.models.pce_conv.PCEConv2d` layers.

>>> model = timm.create_model("resnet18")
>>> model, report = pce.convert(model, "layer4.*.conv2", input_size=(3, 224, 224), num_experts=4, top_k=2, grid=3)
>>> print(report)                                  # per layer: shapes, parameters and active FLOPs before / after

Targets: exact module paths (``"segmentation_head.0"``), ``fnmatch`` patterns on dotted paths (``"decoder.*"``,
``"layer4.*.conv2"``; ``*`` also matches dots) or predicates ``(name, module) -> bool``, alone or in a list.
Patterns and predicates select among the plain ``nn.Conv2d`` modules (not subclasses with their own forward,
e.g. timm's ``Conv2dSame``, listed in ``report.skipped``; never the routers' own convolutions); an exact path
must name a plain ``nn.Conv2d``. A target that selects nothing raises ``ValueError`` with one line,
``<target>: <what is wrong> (<what was expected>); closest: a, b, c``, before the model is changed.
"""
from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from pce.layers.positional import patch_centers
from pce.models.flops import count_flops
from pce.models.pce_conv import PCEConv2d
from pce.moe.recorder import RoutingSource

__all__ = ["convert", "ConversionReport", "ConvertedLayer", "conv_flops", "router_flops", "pce_conv_flops",
           "call_shapes"]

Target = Union[str, Callable[[str, nn.Module], bool]]


@dataclass
class ConvertedLayer:
    """One replaced convolution: shapes of its first call and totals over every call of one forward at the
    report's input (``None`` without one). FLOPs are fused multiply-adds (fvcore's convention); ``flops_after``
    is *active* (:func:`pce_conv_flops`): ``k x`` the convolution (``k = top_k``, ``E`` for soft routing) plus the
    router's own FLOPs on its pooled patches (the region pooling's additions are not counted);
    :func:`pce.models.flops.active_flops` counts a whole model the same way."""

    name: str
    params_before: int
    params_after: int
    in_shape: Optional[Tuple[int, ...]] = None
    out_shape: Optional[Tuple[int, ...]] = None
    calls: int = 0
    flops_before: Optional[int] = None
    flops_after: Optional[int] = None


@dataclass
class ConversionReport:
    layers: List[ConvertedLayer] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)
    input_size: Optional[Tuple[int, ...]] = None

    @property
    def names(self) -> List[str]:
        return [layer.name for layer in self.layers]

    def total(self, attr: str) -> Optional[int]:
        values = [getattr(layer, attr) for layer in self.layers]
        return None if any(v is None for v in values) else sum(values)

    def __str__(self) -> str:
        rows = [f"{'layer':<32} {'calls':>5} {'in':>16} {'out':>16} {'params':>15} {'active FLOPs':>15}"]
        for c in self.layers:
            rows.append(f"{c.name:<32} {c.calls:>5} {_shape(c.in_shape):>16} {_shape(c.out_shape):>16} "
                        f"{_num(c.params_before):>7}>{_num(c.params_after):>7} {_num(c.flops_before):>7}>"
                        f"{_num(c.flops_after):>7}")
        rows.append(f"{'total':<72} {_num(self.total('params_before')):>7}>{_num(self.total('params_after')):>7} "
                    f"{_num(self.total('flops_before')):>7}>{_num(self.total('flops_after')):>7}")
        if self.skipped:
            rows.append(f"skipped (nn.Conv2d subclasses): {', '.join(self.skipped)}")
        return "\n".join(rows)


def _num(v: Optional[int]) -> str:
    if v is None:
        return "-"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(v) >= scale:
            return f"{v / scale:.2f}{unit}"
    return str(v)


def _shape(s: Optional[Tuple[int, ...]]) -> str:
    return "-" if s is None else "x".join(map(str, s))


def conv_flops(conv: nn.Module, out_shape: Sequence[int]) -> int:
    """One convolution's multiply-adds (``nn.Conv2d`` or :class:`pce.PCEConv2d`, one expert) for an output
    ``[B, C_out, H, W]``: ``B H W C_out (C_in / g) kh kw``."""
    B, C, H, W = out_shape
    kh, kw = conv.kernel_size
    return B * H * W * C * (conv.in_channels // conv.groups) * kh * kw


def router_flops(layer: nn.Module, in_shape: Sequence[int]) -> int:
    """FLOPs of a :class:`pce.PCEConv2d`'s current router on its pooled patches for an input ``[B, C_in, H, W]``
    (fvcore, eval mode; 0 for a router without parameters)."""
    router = layer.current_router()
    params = list(router.parameters())
    if not params:
        return 0
    B, _, H, W = in_shape
    g = layer.geometry(H, W)
    p = torch.zeros(B, g.cells.num_patches, layer.router_in_channels, g.pool, g.pool, device=params[0].device,
                    dtype=params[0].dtype)
    pos = patch_centers(g.cells.grid_h, g.cells.grid_w, p.device)

    class _Weights(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.router = router

        def forward(self, patches: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
            return self.router(patches, positions).weights

    was = router.training
    router.eval()
    try:
        return int(count_flops(_Weights(), (p, pos))["total"])
    finally:
        router.train(was)


def pce_conv_flops(layer: nn.Module, in_shape: Sequence[int], out_shape: Sequence[int]) -> int:
    """Active FLOPs of one call of a :class:`pce.PCEConv2d`: ``k = active_fraction * E`` times its convolution
    (``k = top_k``; ``E`` under soft routing) plus its router (:func:`router_flops`; the region pooling's additions
    are not counted)."""
    k = layer.current_router().active_fraction * layer.num_experts
    return int(round(k * conv_flops(layer, out_shape))) + router_flops(layer, in_shape)


def _closest(target: str, names: Sequence[str]) -> str:
    return ", ".join(difflib.get_close_matches(target, names, n=3, cutoff=0.0)) or "(no nn.Conv2d in the model)"


def _resolve(model: nn.Module, target: Target, convs: Dict[str, nn.Conv2d], skipped: List[str]) -> List[str]:
    """The module paths ``target`` selects (at least one, else ``ValueError``)."""
    plain = [n for n, m in convs.items() if type(m) is nn.Conv2d]
    if callable(target):
        label = getattr(target, "__name__", repr(target))
        found = [n for n in plain if target(n, convs[n])]
        if not found:
            raise ValueError(f"{label}: the predicate selects no module (expected it to be true for some plain "
                             f"nn.Conv2d); closest: {', '.join(plain[:3]) or '(no nn.Conv2d in the model)'}")
        return found
    if not isinstance(target, str):
        raise TypeError(f"convert targets are module paths, glob patterns or predicates, got {target!r}")
    if any(ch in target for ch in "*?["):
        found = [n for n in plain if fnmatch.fnmatchcase(n, target)]
        skipped += [n for n in convs if n not in plain and fnmatch.fnmatchcase(n, target) and n not in skipped]
        if not found:
            others = sorted({type(m).__name__ for n, m in model.named_modules()
                             if n and fnmatch.fnmatchcase(n, target)})
            what = f"matches only {', '.join(others)} modules" if others else "matches no module"
            raise ValueError(f"{target}: {what} (expected a pattern matching plain nn.Conv2d paths); "
                             f"closest: {_closest(target, plain)}")
        return found
    modules = dict(model.named_modules())
    if target not in modules or target == "":
        raise ValueError(f"{target}: no module of that name (expected the path of an nn.Conv2d); "
                         f"closest: {_closest(target, plain)}")
    m = modules[target]
    if type(m) is not nn.Conv2d:
        what = (f"is a {type(m).__name__}, an nn.Conv2d subclass with its own forward" if isinstance(m, nn.Conv2d)
                else f"is a {type(m).__name__}")
        raise ValueError(f"{target}: {what} (expected a plain nn.Conv2d); closest: {_closest(target, plain)}")
    return [target]


def _candidates(model: nn.Module) -> Dict[str, nn.Conv2d]:
    """Every ``nn.Conv2d`` (subclasses too) outside routing layers (a router's convolutions are not targets)."""
    inside = [n + "." for n, m in model.named_modules() if isinstance(m, RoutingSource) and n]
    return {n: m for n, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and not any(n.startswith(p) for p in inside)}


@torch.no_grad()
def call_shapes(model: nn.Module, names: Sequence[str], args: Tuple[Any, ...]) -> Dict[str, List[Tuple[tuple, tuple]]]:
    """``{name: [(input shape, output shape) per call]}`` of the modules ``names`` over one eval-mode forward
    ``model(*args)`` (the model's mode is restored)."""
    calls: Dict[str, List[Tuple[tuple, tuple]]] = {n: [] for n in names}
    hooks = [model.get_submodule(n).register_forward_hook(
        lambda m, i, o, n=n: calls[n].append((tuple(i[0].shape), tuple(o.shape)))) for n in names]
    was = model.training
    model.eval()
    try:
        model(*args)
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    return calls


def convert(model: nn.Module, targets: Union[Target, Sequence[Target]], *,
            input_size: Optional[Sequence[int]] = None, example_input: Any = None,
            **pce_options: Any) -> Tuple[nn.Module, ConversionReport]:
    """Replace the ``targets`` (see the module docstring) of ``model`` in place by
    ``PCEConv2d.from_conv(conv, **pce_options)`` (``num_experts``, ``top_k``, ``grid`` / ``patch_size``, ``router``,
    ``noise``, ``execution``, ``layer_options``, router keyword arguments) and return ``(model, report)``.
    Every other module and parameter is left as it is. Shapes and FLOPs are measured by one eval-mode forward
    of ``model(torch.randn(1, *input_size))`` or ``model(example_input)`` (e.g. a list of images for a detector),
    before and after the conversion; without either they are ``None``."""
    targets = [targets] if isinstance(targets, str) or callable(targets) else list(targets)
    convs, skipped = _candidates(model), []
    names: List[str] = []
    for t in targets:
        names += [n for n in _resolve(model, t, convs, skipped) if n not in names]
    p = next(model.parameters(), None)
    if example_input is None and input_size is not None:
        example_input = torch.randn(1, *input_size, device=None if p is None else p.device,
                                    dtype=None if p is None else p.dtype)
    shapes = call_shapes(model, names, (example_input,)) if example_input is not None else {}
    report = ConversionReport(skipped=skipped, input_size=None if input_size is None else tuple(input_size))
    for name in names:
        conv = model.get_submodule(name)
        layer = PCEConv2d.from_conv(conv, **pce_options)
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent), leaf, layer)
        entry = ConvertedLayer(name, sum(q.numel() for q in conv.parameters()),
                               sum(q.numel() for q in layer.parameters()))
        calls = shapes.get(name) or []
        if calls:
            entry.in_shape, entry.out_shape, entry.calls = calls[0][0], calls[0][1], len(calls)
            entry.flops_before = sum(conv_flops(conv, out) for _, out in calls)
            entry.flops_after = sum(pce_conv_flops(layer, inp, out) for inp, out in calls)
        report.layers.append(entry)
    return model, report
