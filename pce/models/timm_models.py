"""Register the backbone presets with timm, with timm's model API.

``timm.create_model("pce_tiny", num_classes=10)`` gives a :class:`~pce.models.classifier.PCEClassifier` built
through timm's ``build_model_with_cfg``, so ``pretrained_cfg`` / ``default_cfg``, ``in_chans``, ``drop_rate``,
``num_classes=0`` (pooled features), ``global_pool`` (``"avg"``, ``"max"``, ``""``), ``output_stride`` and
backbone overrides (``router="gate"``) behave as for timm's own models.

``timm.create_model("pce_tiny", features_only=True, out_indices=(1, 2, 3))`` returns a module giving the chosen
stage maps, with timm's ``feature_info`` (``.channels()``, ``.reduction()``); ``feature_cls`` picks the
wrapper: ``None`` / ``"list"`` (a list), ``"dict"`` (keyed by ``out_map`` or the index as a string), or timm's
``"getter"`` (``forward_intermediates``), ``"hook"`` (forward hooks) and ``"fx"`` (an FX graph; PCE layers are
FX leaves, see :mod:`pce.models.fx`). The stages after the deepest one asked for are removed (timm's pruning).

There are no pretrained weights: every cfg has no ``url`` / ``hf_hub_id`` / ``file`` and ``pretrained=True``
raises instead of downloading anything (load your own checkpoint with ``checkpoint_path=...``).
"""
from __future__ import annotations

from functools import partial
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import FeatureHookNet, FeatureInfo
from timm.models._features_fx import FeatureGraphNet
from torch import nn

from pce.models.backbone import PCEBackbone, stage_indices
from pce.models.classifier import PCEClassifier
from pce.models.presets import apply_output_stride, backbone_config, backbone_spec, list_backbones

__all__ = ["PCEFeatureListNet", "PCEFeatureDictNet", "default_cfgs", "create_timm_model", "pool_size"]

_DATA: Dict[str, Dict[str, Any]] = {
    # the datasets the small presets are made for (the same statistics as configs/_base_/datasets/*)
    "fmnist": dict(input_size=(1, 28, 28), mean=(0.2860,), std=(0.3530,), num_classes=10, crop_pct=1.0),
    "cifar": dict(input_size=(3, 32, 32), mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616),
                  num_classes=10, crop_pct=1.0),
}
# The 224-class presets (tiny, small, base) default to 256x256, not 224x224: their stages sit at strides
# 4, 8, 16, 32 with patches of 16, 8, 4, 2, so at 256 every stage's map (64, 32, 16, 8) divides into its patches
# (a 4x4 grid each); at 224 the stride-4 map (56) does not divide by 16 and every layer would pad ("fit").
_IMAGENET = dict(input_size=(3, 256, 256), mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
                 num_classes=1000, crop_pct=0.875)


def pool_size(cfg: Dict[str, Any], hw: Tuple[int, int]) -> Tuple[int, int]:
    """Spatial size of the deepest map for backbone kwargs ``cfg`` at input ``hw``: every stride-2 3x3 conv
    (padding 1) maps ``n -> (n - 1) // 2 + 1``; PCE / dense layers keep the size."""
    stem = int(cfg.get("stem_stride", 4))
    strides = [2] * {1: 0, 2: 1, 4: 2}[stem] + [int(s.get("stride", 2)) for s in cfg["stages"]]
    h, w = hw
    for s in strides:
        h, w = (h - 1) // s + 1, (w - 1) // s + 1
    return h, w


def _cfg(name: str) -> Dict[str, Any]:
    data = dict(_DATA.get(name.split("_", 1)[-1], _IMAGENET))
    kind = "dense twin (no routing)" if name.startswith("dense_") else "positional convolution experts"
    return dict(data, pool_size=pool_size(backbone_config(name), data["input_size"][1:]),
                interpolation="bilinear", first_conv="backbone.stem.0.0", classifier="fc", fixed_input_size=False,
                description=f"PCE preset {name!r}: {kind}, SPP (1, 2, 4) + FC head",
                notes=("no pretrained weights: random initialisation only, nothing is downloaded",))


default_cfgs = generate_default_cfgs({name: _cfg(name) for name in list_backbones()})


class PCEFeatureListNet(nn.Module):
    """``features_only`` wrapper: ``[B, C, H, W] -> [[B, C_i, H / s_i, W / s_i] for i in out_indices]``
    (stage order), with timm's :class:`FeatureInfo`. Holds the (pruned) backbone: state-dict keys
    ``backbone.*`` as in the classifier."""

    return_dict = False

    def __init__(self, model: PCEClassifier, out_indices: Union[int, Sequence[int], None] = None,
                 out_map: Optional[Sequence[Union[int, str]]] = None, output_fmt: str = "NCHW") -> None:
        super().__init__()
        if output_fmt != "NCHW":
            raise ValueError(f"PCE maps are NCHW only, got output_fmt={output_fmt!r}")
        self.out_indices = tuple(model.prune_intermediate_layers(out_indices))
        if out_map is not None and len(out_map) != len(self.out_indices):
            raise ValueError(f"out_map needs one name per out index {self.out_indices}, got {list(out_map)}")
        self.feature_info = FeatureInfo([dict(f) for f in model.feature_info], self.out_indices)
        self.out_names = [str(k) for k in (out_map if out_map is not None else self.out_indices)]
        self.backbone = model.backbone

    def _maps(self, x: torch.Tensor) -> List[torch.Tensor]:
        return self.backbone.forward_intermediates(x, list(self.out_indices), intermediates_only=True)

    def forward(self, x: torch.Tensor) -> Union[List[torch.Tensor], Dict[str, torch.Tensor]]:
        maps = self._maps(x)
        return dict(zip(self.out_names, maps)) if self.return_dict else maps


class PCEFeatureDictNet(PCEFeatureListNet):
    """As :class:`PCEFeatureListNet`, returning ``{name: map}`` (``out_map`` names, else ``str(index)``, as
    timm's ``FeatureDictNet``)."""

    return_dict = True


_FEATURE_CLS = {"list": PCEFeatureListNet, "dict": PCEFeatureDictNet, "getter": "getter",
                "hook": FeatureHookNet, "fx": FeatureGraphNet}


def _feature_cls(value: Any) -> Any:
    """timm's ``feature_cls`` value -> what ``build_model_with_cfg`` gets (list / dict: the PCE wrappers, whose
    model layout timm's FeatureListNet / FeatureDictNet cannot rebuild)."""
    if value is None:
        return PCEFeatureListNet
    if isinstance(value, str):
        key = value.lower()
        if key not in _FEATURE_CLS:
            raise ValueError(f"unknown feature_cls {value!r}; PCE supports {sorted(_FEATURE_CLS)} or a class")
        return _FEATURE_CLS[key]
    return value


def _build_classifier(variant: str, num_classes: int = 1000, drop_rate: float = 0.0,
                      drop_path_rate: Optional[float] = None, output_stride: Optional[int] = None,
                      global_pool: Optional[str] = None, spp_levels: Sequence[int] = (1, 2, 4),
                      spp_mode: str = "avg", device: Any = None, dtype: Optional[torch.dtype] = None,
                      **overrides: Any) -> PCEClassifier:
    """The model ``build_model_with_cfg`` instantiates: preset ``variant`` with backbone ``overrides``, built
    for ``output_stride`` (:func:`~pce.models.presets.apply_output_stride`), and the SPP + FC head."""
    if drop_path_rate:  # stochastic depth on every layer's residual branch (BackboneSpec.drop_path_rate)
        overrides["drop_path_rate"] = float(drop_path_rate)
    PCEClassifier._check_head(num_classes, spp_mode if global_pool is None else global_pool)  # before the build
    spec = backbone_spec(variant, **overrides)
    if output_stride is not None:
        spec = apply_output_stride(spec, output_stride)
    model = PCEClassifier(PCEBackbone.from_spec(spec), num_classes, spp_levels=spp_levels, spp_mode=spp_mode,
                          dropout=drop_rate, global_pool=global_pool)
    return model.to(device=device, dtype=dtype) if (device is not None or dtype is not None) else model


def create_timm_model(variant: str, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """What the registered entry points (``timm.create_model(variant, ...)``) run."""
    if pretrained:
        raise ValueError(f"{variant}: PCE ships no pretrained weights (nothing is ever downloaded); use "
                         "pretrained=False, and checkpoint_path=... to load weights you trained")
    num_stages = len(kwargs.get("stages") or backbone_config(variant)["stages"])
    if kwargs.get("features_only"):
        kwargs["feature_cls"] = _feature_cls(kwargs.get("feature_cls"))
        if kwargs.get("out_indices") is not None:
            stage_indices(num_stages, kwargs["out_indices"])  # ValueError before the (slow) build
        kwargs.setdefault("num_classes", 0)  # the head is pruned anyway: don't build a 1000-class layer
    return build_model_with_cfg(partial(_build_classifier, variant), variant, pretrained=False,
                                feature_cfg=dict(out_indices=tuple(range(num_stages))), **kwargs)


def _make_entry(name: str):
    def entry(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        return create_timm_model(name, pretrained=pretrained, **kwargs)

    entry.__name__ = name
    entry.__qualname__ = name
    entry.__module__ = __name__
    entry.__doc__ = f"PCE preset {name!r} (see pce.models.presets): timm's model API, no pretrained weights."
    return entry


for _name in list_backbones():
    globals()[_name] = register_model(_make_entry(_name))
