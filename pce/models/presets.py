"""Backbone presets and their dense twins: ``build_backbone``, ``backbone_spec``, ``backbone_config``.

``build_backbone("pce_tiny", router="gate", num_experts=8)`` builds a preset with overrides;
``list_backbones()`` names the presets; ``patch_footprints(name)`` gives each stage's patch side in image pixels.
Every ``pce_X`` preset has a ``dense_X`` twin with the same stem,
stages and expert block but no routing (one expert on the whole map), for comparisons at equal active FLOPs.
A preset is a frozen :class:`~pce.models.specs.BackboneSpec`; a new one is one spec plus one
``BACKBONES.register`` line (a dict of :class:`PCEBackbone` keyword arguments is accepted too).
"""
from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

from pce.layers.patches import PatchExtractor
from pce.models.backbone import PCEBackbone
from pce.models.specs import BACKBONE_KWARGS, BackboneSpec, LayerSpec, StageSpec
from pce.registry import BACKBONES


def _preset(in_chans: int, stem_channels: int, stem_stride: int, num_experts: int, channels: Sequence[int],
            depths: Sequence[int], patches: Sequence[int], strides: Sequence[int]) -> BackboneSpec:
    stages = tuple(StageSpec(channels=c, depth=d, patch_size=p, stride=s)
                   for c, d, p, s in zip(channels, depths, patches, strides))
    return BackboneSpec(stages, in_chans=in_chans, stem_channels=stem_channels, stem_stride=stem_stride,
                        layer=LayerSpec(num_experts=num_experts, top_k=1))


_PRESETS: Dict[str, BackboneSpec] = {
    # 28x28 grey images (MNIST, Fashion-MNIST): maps 28 -> 14 -> 7 -> 4, four patches per map.
    "fmnist": _preset(1, 32, 1, 4, (48, 96, 192), (1, 1, 1), (7, 4, 2), (2, 2, 2)),
    # 32x32 colour images (CIFAR): 32 -> 16 -> 8 -> 4.
    "cifar": _preset(3, 32, 1, 4, (64, 128, 256), (1, 1, 1), (8, 4, 2), (2, 2, 2)),
    # 224-ish images: strides 4, 8, 16, 32; patches 16, 8, 4, 2 (a 4x4 grid at 256x256).
    "tiny": _preset(3, 32, 4, 4, (32, 64, 128, 256), (1, 1, 1, 1), (16, 8, 4, 2), (1, 2, 2, 2)),
    "small": _preset(3, 48, 4, 8, (64, 128, 256, 512), (1, 1, 2, 1), (16, 8, 4, 2), (1, 2, 2, 2)),
    "base": _preset(3, 64, 4, 8, (64, 128, 256, 512), (2, 2, 4, 2), (16, 8, 4, 2), (1, 2, 2, 2)),
}
# The footprint of a patch in image pixels (feature stride x patch side) shrinks with depth, as the PCE seed asks
# ("image portions that become progressively smaller as network depth increases"): 64, 32, 16, 8 px, where every
# other preset keeps one footprint per stage (pce_tiny: 64 px at every stage; see patch_footprints). The tiny
# strides (4, 8, 16, 32) cannot give it (stage 4 would need quarter-pixel patches), so stages 3-4 stay at stride 8
# and their channels are those that keep each stage's convolution FLOPs equal to pce_tiny's (C^2 * H * W: 128 ch
# at stride 16 -> 64 at stride 8, 256 at 32 -> 64 at 8): 0.92x pce_tiny's FLOPs at 128 px, 0.83x at 224 px
# (one active expert), 0.14x its parameters. Stage strides 1, 2, 1, 1: not an smp encoder (it needs 1, 2, 2, 2).
# With 2- and 1-pixel patches, isolated patches leave 3x3 experts almost nothing to read: give such configs
# execution="context" (experts read across patch borders), as the demo segmentation configs do.
_PRESETS["tiny_shrink"] = _preset(3, 32, 4, 4, (32, 64, 64, 64), (1, 1, 1, 1), (16, 4, 2, 1), (1, 2, 1, 1))
# For 28x28 images the same rule is a config's backbone_overrides of pce_fmnist (a preset would get timm's ImageNet
# defaults): stages=[dict(channels=48, patch_size=7, stride=2), dict(channels=48, patch_size=4, stride=1),
# dict(channels=48, patch_size=2, stride=1)]: maps 14, 14, 14, footprints 14, 8, 4 px (7 px really: 4-pixel patches
# pad the 14-pixel map to a 4x4 grid), 0.82x pce_fmnist's FLOPs.

for _name, _spec in _PRESETS.items():
    BACKBONES.register(f"pce_{_name}", obj=_spec)
    BACKBONES.register(f"dense_{_name}", obj=replace(_spec, kind="dense"))


def list_backbones(pattern: str = "") -> List[str]:
    """Names of the registered presets (containing ``pattern``)."""
    return [n for n in BACKBONES.names() if pattern in n]


def preset_spec(name: str) -> BackboneSpec:
    """The registered :class:`BackboneSpec` of preset ``name`` (``KeyError`` listing the presets)."""
    if name not in BACKBONES:
        raise KeyError(f"unknown backbone preset {name!r}; available: {', '.join(list_backbones())}")
    spec = BACKBONES.get(name)
    return spec if isinstance(spec, BackboneSpec) else BackboneSpec.from_kwargs(**copy.deepcopy(spec))


def patch_footprints(preset: Union[str, BackboneSpec], image_size: Optional[int] = None) -> List[Dict[str, Any]]:
    """Per stage of a preset (a name or a :class:`BackboneSpec`): ``stage`` (1-based), ``kind`` (``"pce"`` /
    ``"dense"``), ``stride`` (the stage's feature stride in image pixels: stem stride times the stage strides so far),
    ``patch_size`` (feature pixels) and ``footprint`` (``stride * patch_size``: the side of the image region one patch
    routes, in image pixels; nominal).

    With ``image_size`` (a square input side) also what a forward really routes: ``map`` (the stage's map side; every
    stride-2 3x3 convolution gives ``ceil(H / 2)``), ``grid`` (patches per side, from the layer's own patch grid,
    ``padding="fit"`` shrinking or padding patches that do not tile the map) and ``image_px`` (``image_size / grid``:
    image pixels per patch side)."""
    spec = preset_spec(preset) if isinstance(preset, str) else preset
    stride, rows = spec.stem_stride, []
    side = image_size
    if side is not None:
        for _ in range({1: 0, 2: 1, 4: 2}[spec.stem_stride]):
            side = -(-side // 2)
    for i, st in enumerate(spec.stages):
        stride *= st.stride
        row: Dict[str, Any] = {"stage": i + 1, "kind": st.kind or spec.kind, "stride": stride,
                               "patch_size": st.patch_size, "footprint": stride * st.patch_size}
        if side is not None:
            side = -(-side // 2) if st.stride == 2 else side
            grid = PatchExtractor(st.patch_size, padding=spec.layer.padding).grid(side, side)
            row.update(map=side, grid=grid.grid_h, image_px=image_size / grid.grid_h)
        rows.append(row)
    return rows


def backbone_config(name: str, **overrides: Any) -> Dict[str, Any]:
    """The keyword arguments of :class:`PCEBackbone` for a preset, with ``overrides`` applied (``TypeError``
    naming the valid options for an unknown one)."""
    spec = preset_spec(name)
    unknown = set(overrides) - set(BACKBONE_KWARGS)
    if unknown:
        raise TypeError(f"unknown backbone option(s) {sorted(unknown)} for {name!r}; valid: {sorted(BACKBONE_KWARGS)}")
    cfg = spec.to_kwargs()
    cfg.update(copy.deepcopy(overrides))
    return cfg


def backbone_spec(name: str, **overrides: Any) -> BackboneSpec:
    """The frozen :class:`BackboneSpec` of a preset with keyword ``overrides`` (as :func:`backbone_config`)."""
    if not overrides:
        return copy.deepcopy(preset_spec(name))
    return BackboneSpec.from_kwargs(**backbone_config(name, **overrides))


def apply_output_stride(cfg: Union[Mapping[str, Any], BackboneSpec],
                        output_stride: int) -> Union[Dict[str, Any], BackboneSpec]:
    """A copy of backbone kwargs ``cfg`` (or of a :class:`BackboneSpec`) whose deepest map sits at stride
    ``output_stride`` (8, 16, 32, ...).

    The backbone is *built* for the stride (no dilation of a built model): every stage whose nominal stride
    exceeds ``output_stride`` gets ``stride=1`` (its downsampling 3x3 conv keeps the resolution) and its
    ``patch_size`` is multiplied by ``nominal_stride / output_stride``, so each PCE layer keeps the same patch
    grid in image pixels (``pce_tiny`` at 16: stage 4 at stride 16 with 4x4 patches instead of stride 32 with
    2x2; one patch still covers 64x64 input pixels). Used by the smp encoder and the timm entry points."""
    if isinstance(cfg, BackboneSpec):
        return BackboneSpec.from_kwargs(**apply_output_stride(cfg.to_kwargs(), output_stride))
    cfg = copy.deepcopy(dict(cfg))
    stages = [s.to_dict() if isinstance(s, StageSpec) else dict(s) for s in cfg["stages"]]
    previous = int(cfg.get("stem_stride", 4))
    if not isinstance(output_stride, int) or output_stride < previous or output_stride & (output_stride - 1):
        raise ValueError(f"output_stride must be a power of two >= the stem stride ({previous}), got {output_stride!r}")
    nominal = previous
    for s in stages:
        nominal *= int(s.get("stride", 2))
        actual = min(nominal, output_stride)
        s["stride"] = 2 if actual > previous else 1
        s["patch_size"] = int(s["patch_size"]) * (nominal // actual)
        previous = actual
    cfg["stages"] = stages
    return cfg


def build_backbone(name: str, **overrides: Any) -> PCEBackbone:
    """Build a preset, e.g. ``build_backbone("pce_tiny", router="gate", num_experts=8, top_k=1)``."""
    return PCEBackbone.from_spec(backbone_spec(name, **overrides))
