"""Routing maps: which expert takes which patch, per routed layer, placed on the input image.

>>> maps = routing_maps(model, images)              # images [B, C, H, W]
>>> m = maps["backbone.stages.2.layers.0"]
>>> m.expert.shape, m.entropy.shape, m.weights.shape   # [B, gh, gw], [B, gh, gw], [B, gh, gw, E]
>>> m.pixels().shape                                 # [B, H, W]: each image pixel's expert (cells as they are)

Everything comes through :func:`pce.record_routing` (the one channel by which routing leaves a model), so any
model with routed layers works: a backbone, a classifier, Faster R-CNN, an smp model, a :func:`pce.convert`-ed
model (whose :class:`pce.PCEConv2d` cells may differ in size by a pixel), a DDP / EMA wrapper.

Where a layer's cells lie on the image: its cell borders in its map's pixels (``RoutingResult.cell_rows`` /
``cell_cols``, or the square patches of a PCE layer) times the layer's scale, image pixels per map pixel. The scale
comes from the shapes, the image size over the map size, when they divide evenly (one integer stride for both
sides); else from the feature stride of the backbone stage holding the layer; else the ratio per side.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from pce.moe.metrics import entropy
from pce.moe.recorder import record_routing, strip_wrapper_prefix
from pce.moe.routing import RoutingResult

__all__ = ["LayerMap", "routing_maps", "layer_map", "feature_strides", "cell_borders", "layer_scale"]

Borders = Tuple[int, ...]


@dataclass
class LayerMap:
    """One layer's routing of a batch, on its patch grid.

    Attributes:
        expert: ``int64 [B, gh, gw]`` argmax expert per patch (of the mixing weights), ``-1`` for a dropped patch.
        entropy: ``[B, gh, gw]`` routing entropy of the router's probabilities (nats).
        weights: ``[B, gh, gw, E]`` mixing weights.
        grid: ``(gh, gw)``.
        patch_size / stride: patch side and step in *input-image* pixels when the layer's feature stride is known
            (``feature_stride``), else in the layer's map pixels; ``None`` for cells of uneven sides.
        map_patch_size / map_stride: the same in the layer's map pixels; ``feature_stride``: map -> image scale
            when it is one integer (``None`` when unknown).
        map_size: ``(H, W)`` of the layer's map; ``cell_rows`` / ``cell_cols``: the cells' borders in its pixels
            (``gh + 1`` / ``gw + 1`` from 0 to ``H`` / ``W``; ``None`` for overlapping patches).
        scale: ``(rows, cols)`` image pixels per map pixel (``None`` when unknown); ``image_size``: ``(H, W)`` of
            the image (``None``: the map's size times the scale).
    """

    expert: torch.Tensor
    entropy: torch.Tensor
    weights: torch.Tensor
    grid: Tuple[int, int]
    patch_size: Optional[int]
    stride: Optional[int]
    map_patch_size: Optional[int] = None
    map_stride: Optional[int] = None
    feature_stride: Optional[int] = None
    map_size: Optional[Tuple[int, int]] = None
    cell_rows: Optional[Borders] = None
    cell_cols: Optional[Borders] = None
    scale: Optional[Tuple[float, float]] = None
    image_size: Optional[Tuple[int, int]] = None

    @property
    def num_experts(self) -> int:
        return int(self.weights.shape[-1])

    def image_borders(self) -> Optional[Tuple[Borders, Borders]]:
        """The cells' borders in image pixels (map borders times the scale, rounded, clipped to the image; the
        last one is the image side), or ``None`` without cell borders or a scale."""
        if self.cell_rows is None or self.cell_cols is None or self.scale is None:
            return None
        size = self.image_size or (round(self.cell_rows[-1] * self.scale[0]),
                                   round(self.cell_cols[-1] * self.scale[1]))
        out = []
        for bounds, s, side in zip((self.cell_rows, self.cell_cols), self.scale, size):
            out.append(tuple(min(int(round(b * s)), side) for b in bounds[:-1]) + (side,))
        return out[0], out[1]

    def pixels(self, values: Optional[torch.Tensor] = None, on_image: bool = True) -> torch.Tensor:
        """Per-cell ``values [B, gh, gw, ...]`` (default :attr:`expert`) repeated over each cell's pixels:
        ``[B, H, W, ...]`` on the image (``on_image``; needs a scale) or on the layer's map."""
        values = self.expert if values is None else values
        borders = self.image_borders() if on_image else (
            None if self.cell_rows is None or self.cell_cols is None else (self.cell_rows, self.cell_cols))
        if borders is None:
            raise ValueError("this layer map has no cell borders on the " + ("image (no scale known)" if on_image
                             and self.cell_rows is not None else "map (overlapping patches)"))
        rows, cols = (torch.tensor([b - a for a, b in zip(x, x[1:])]) for x in borders)
        return values.repeat_interleave(rows.to(values.device), 1).repeat_interleave(cols.to(values.device), 2)


def feature_strides(model: nn.Module) -> Dict[str, int]:
    """``{module path prefix of a stage: feature stride}`` for every PCE backbone inside ``model``
    (e.g. ``{"backbone.stages.2": 8}``), from ``backbone.feature_info``."""
    from pce.models.backbone import PCEBackbone

    out: Dict[str, int] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, PCEBackbone):
            prefix = strip_wrapper_prefix(name)
            for info in getattr(mod, "feature_info", []) or []:
                if "module" in info and "stride" in info:
                    out[(prefix + "." if prefix else "") + str(info["module"])] = int(info["stride"])
    return out


def stride_of(layer: str, strides: Dict[str, int]) -> Optional[int]:
    """The feature stride of the stage that holds ``layer`` (longest matching prefix), or ``None``."""
    best = None
    for prefix, s in strides.items():
        if (layer == prefix or layer.startswith(prefix + ".")) and (best is None or len(prefix) > len(best[0])):
            best = (prefix, s)
    return best[1] if best else None


def grid_of(result: RoutingResult) -> Tuple[int, int]:
    """``(gh, gw)`` of a result; a square grid is assumed when the layer did not set one."""
    if result.grid is not None:
        return int(result.grid[0]), int(result.grid[1])
    P = result.weights.shape[1]
    side = int(round(P ** 0.5))
    if side * side != P:
        raise ValueError(f"routing result without a grid and a non-square patch count {P}")
    return side, side


def cell_borders(result: RoutingResult) -> Optional[Tuple[Borders, Borders]]:
    """The borders of a result's cells in its map pixels: the layer's own (``cell_rows`` / ``cell_cols``), else
    those of square non-overlapping patches (``i * patch_size``, clipped to ``map_size``: a padded last patch
    ends at the map's edge); ``None`` for overlapping patches or a result without its map size."""
    if result.cell_rows is not None and result.cell_cols is not None:
        return tuple(result.cell_rows), tuple(result.cell_cols)
    n, st, size = result.patch_size, result.patch_stride, result.map_size
    if n is None or size is None or (st is not None and st != n):
        return None
    gh, gw = grid_of(result)
    return (tuple(min(i * n, size[0]) for i in range(gh)) + (size[0],),
            tuple(min(j * n, size[1]) for j in range(gw)) + (size[1],))


def layer_scale(result: RoutingResult, image_size: Optional[Sequence[int]],
                feature_stride: Optional[int] = None) -> Tuple[Optional[Tuple[float, float]], Optional[int]]:
    """``(scale, integer stride)``: image pixels per map pixel of a layer, from the image size over its map size
    when that is one integer for both sides, else ``feature_stride`` (its backbone stage's), else the ratio per
    side (stride ``None``); ``(None, None)`` when neither is known."""
    size = result.map_size
    if image_size is not None and size is not None:
        (H, W), (h, w) = image_size, size
        if H % h == 0 and W % w == 0 and H // h == W // w:
            return (float(H // h), float(W // w)), H // h
        if feature_stride is None:
            return (H / h, W / w), None
    if feature_stride is not None:
        return (float(feature_stride), float(feature_stride)), int(feature_stride)
    return None, None


def layer_map(result: RoutingResult, feature_stride: Optional[int] = None,
              image_size: Optional[Sequence[int]] = None) -> LayerMap:
    """A :class:`LayerMap` of one :class:`RoutingResult` (``weights [B, P, E]`` -> ``[B, gh, gw, ...]``), placed on
    an image of ``image_size`` (``(H, W)``; optional) with the scale of :func:`layer_scale`."""
    w = result.weights.detach().float().cpu()
    B, P, E = w.shape
    gh, gw = grid_of(result)
    expert = torch.where(w.sum(-1) > 0, w.argmax(-1), torch.full((B, P), -1, dtype=torch.int64))
    ent = entropy(result.probs.detach().float().cpu())
    scale, stride = layer_scale(result, image_size, feature_stride)
    ps, st = result.patch_size, result.patch_stride
    k = stride or 1
    borders = cell_borders(result)
    return LayerMap(expert=expert.reshape(B, gh, gw), entropy=ent.reshape(B, gh, gw), weights=w.reshape(B, gh, gw, E),
                    grid=(gh, gw), patch_size=None if ps is None else ps * k, stride=None if st is None else st * k,
                    map_patch_size=ps, map_stride=st, feature_stride=stride, map_size=result.map_size,
                    cell_rows=borders[0] if borders else None, cell_cols=borders[1] if borders else None,
                    scale=scale, image_size=None if image_size is None else (int(image_size[0]), int(image_size[1])))


def _default_forward(model: nn.Module, images: Any) -> Any:
    return model(images)


def _image_size(images: Any) -> Optional[Tuple[int, int]]:
    """``(H, W)`` of a ``[B, C, H, W]`` batch (or one ``[C, H, W]`` image); ``None`` for anything else."""
    if isinstance(images, torch.Tensor) and images.dim() in (3, 4):
        return int(images.shape[-2]), int(images.shape[-1])
    return None


@torch.no_grad()
def routing_maps(model: nn.Module, images: Any, forward: Optional[Callable[[nn.Module, Any], Any]] = None,
                 image_size: Optional[Sequence[int]] = None) -> Dict[str, LayerMap]:
    """``{layer name: LayerMap}`` in forward order for one batch ``images`` (``[B, C, H, W]``, or what
    ``forward(model, images)`` takes, e.g. a list of images for a detector). Runs in eval mode without
    gradients (the model's mode is restored). A layer that runs several times per forward keeps its first run.
    ``image_size``: ``(H, W)`` the maps are placed on (default: that of a tensor batch), each layer at its own
    scale (:func:`layer_scale`): ``maps[name].pixels()`` is the expert of every image pixel."""
    forward = forward or _default_forward
    was_training = model.training
    model.eval()
    try:
        with record_routing(model, detach=True) as rec:
            forward(model, images)
    finally:
        model.train(was_training)
    strides = feature_strides(model)
    size = image_size if image_size is not None else _image_size(images)
    out: Dict[str, LayerMap] = {}
    for name, results in rec.by_layer().items():
        out[name] = layer_map(results[0], stride_of(name, strides), size)
    return out


def records_by_layer(records: List[Tuple[str, RoutingResult]]) -> Dict[str, RoutingResult]:
    """The first result of every layer name of ``records`` (forward order)."""
    out: Dict[str, RoutingResult] = {}
    for name, r in records:
        out.setdefault(name, r)
    return out
