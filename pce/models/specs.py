"""Frozen specs of PCE layers, stages and backbones, in the spirit of timm's ``ByoBlockCfg`` / ``ByoModelCfg``.

* :class:`LayerSpec`: how ONE routed layer cuts its map into patches, routes them and runs its experts (patch
  size, number of experts, router and its kwargs, ``top_k``, expert type, execution strategy, positional
  channels, halo, padding, ...). The routing fields live here and nowhere else: :class:`~pce.models.layer.PCELayer`
  reads all of them, :class:`~pce.models.layer.DenseLayer` the expert fields, and any other patch-routed module
  can take the same spec.
* :class:`StageSpec`: one backbone stage (channels, depth, stride, patch size, deformable attention) with
  optional per-stage ``kind`` (a :data:`~pce.registry.LAYERS` name) and ``num_experts``.
* :class:`BackboneSpec`: the stem, the stages, the layer kind and the :class:`LayerSpec` every stage starts from.

Overrides are :func:`dataclasses.replace` (``replace(spec, num_experts=8)``; :meth:`BackboneSpec.with_layer` for
every stage at once). :meth:`BackboneSpec.from_kwargs` / :meth:`BackboneSpec.to_kwargs` convert from and to the
keyword arguments of :class:`~pce.models.backbone.PCEBackbone` (what ``backbone_config`` and the configs'
``model.backbone_overrides`` hold: ``stages`` as dicts, ``layer="dense"``, ``num_experts=8``, ...).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field, fields, replace
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

from pce.moe.execution import ExecutionOptions

__all__ = ["LayerSpec", "StageSpec", "BackboneSpec", "layer_spec", "LAYER_FIELDS", "BACKBONE_KWARGS"]


def _check_experts(num_experts: Any, where: str = "") -> None:
    if not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"{where}num_experts must be an integer >= 1, got {num_experts!r}")


@dataclass(frozen=True)
class LayerSpec:
    """One routed layer: ``[B, C, H, W]`` cut into ``P`` patches ``[B, P, C, n, n]``, weights ``[B, P, E]``.

    ``top_k`` is the one place for the number of experts per patch: a ``"top_k"`` given in ``router_kwargs`` moves
    here (the ``top_k`` field wins when both are set); only ``router_kwargs={"top_k": None}`` with no ``top_k``
    field stays there, since ``None`` asks the router for soft routing over every expert, while an unset field
    keeps the router's own default. ``patch_stride`` other than ``patch_size``: overlapping
    patches. The other fields are those of :class:`~pce.models.layer.PCELayer`.
    """

    patch_size: Optional[int] = None
    num_experts: int = 4
    router: str = "cosine"
    router_kwargs: Optional[Dict[str, Any]] = None
    top_k: Optional[int] = None
    expert: str = "residual"
    expert_kwargs: Optional[Dict[str, Any]] = None
    pos_encoding: str = "coord"
    num_frequencies: int = 4
    experts_see_position: bool = False
    halo: int = 0
    patch_stride: Optional[int] = None
    padding: str = "fit"
    execution: str = "auto"
    norm_stats: str = "expert"

    def __post_init__(self) -> None:
        _check_experts(self.num_experts)
        rkw = dict(self.router_kwargs or {})
        top_k = rkw.get("top_k")
        if top_k is not None or self.top_k is not None:
            rkw.pop("top_k", None)  # an explicit ``top_k=None`` (soft routing, every expert) stays with the router
        object.__setattr__(self, "router_kwargs", rkw)
        object.__setattr__(self, "expert_kwargs", dict(self.expert_kwargs or {}))
        if self.top_k is None and top_k is not None:
            object.__setattr__(self, "top_k", top_k)

    def router_args(self) -> Dict[str, Any]:
        """The keyword arguments of :func:`pce.moe.routers.build_router`: ``router_kwargs`` plus ``top_k``."""
        rkw = dict(self.router_kwargs or {})
        if self.top_k is not None:
            rkw["top_k"] = self.top_k
        return rkw

    def execution_options(self) -> ExecutionOptions:
        """What the execution strategy reads (:class:`~pce.moe.execution.ExecutionOptions`)."""
        overlapping = self.patch_stride not in (None, self.patch_size)
        return ExecutionOptions(self.halo, self.experts_see_position, self.norm_stats, overlapping=overlapping)


#: the names of :class:`LayerSpec`'s fields (the layer options of PCELayer and of the backbone kwargs)
LAYER_FIELDS: Tuple[str, ...] = tuple(f.name for f in fields(LayerSpec))


def layer_spec(spec: Optional[LayerSpec] = None, **changes: Any) -> LayerSpec:
    """``spec`` with ``changes``, or a new :class:`LayerSpec` from them; ``TypeError`` naming the valid options
    for an unknown one."""
    unknown = sorted(set(changes) - set(LAYER_FIELDS))
    if unknown:
        raise TypeError(f"unknown PCE layer option(s) {unknown}; valid: {sorted(LAYER_FIELDS)}")
    return replace(spec, **changes) if spec is not None else LayerSpec(**changes)


@dataclass(frozen=True)
class StageSpec:
    """One stage: downsample by ``stride`` (1 or 2; a 3x3 conv) to ``channels``, then ``depth`` layers with
    ``patch_size`` patches, each followed by deformable attention when ``attention``. ``kind`` (a
    :data:`~pce.registry.LAYERS` name) and ``num_experts`` default to the backbone's."""

    channels: int
    patch_size: int
    depth: int = 1
    stride: int = 2
    attention: bool = False
    kind: Optional[str] = None
    num_experts: Optional[int] = None

    #: the stage-dict keys of the backbone kwargs for ``kind`` (``layer``); the others have the field's name
    DICT_KEYS = ("channels", "depth", "patch_size", "stride", "attention", "layer", "num_experts")

    @classmethod
    def from_dict(cls, i: int, d: Mapping[str, Any]) -> "StageSpec":
        """A stage dict of the backbone kwargs (``layer`` for ``kind``); ``ValueError`` naming stage ``i``."""
        unknown = set(d) - set(cls.DICT_KEYS)
        if unknown:
            raise ValueError(f"stage {i}: unknown key(s) {sorted(unknown)}")
        missing = {"channels", "patch_size"} - set(d)
        if missing:
            raise ValueError(f"stage {i}: missing key(s) {sorted(missing)}")
        kw = {("kind" if k == "layer" else k): v for k, v in d.items()}
        return cls(**kw)

    def to_dict(self) -> Dict[str, Any]:
        """The stage dict of the backbone kwargs (``layer`` / ``num_experts`` only when the stage sets them)."""
        d: Dict[str, Any] = dict(channels=self.channels, depth=self.depth, patch_size=self.patch_size,
                                 stride=self.stride, attention=self.attention)
        if self.kind is not None:
            d["layer"] = self.kind
        if self.num_experts is not None:
            d["num_experts"] = self.num_experts
        return d


StageLike = Union[StageSpec, Mapping[str, Any]]


@dataclass(frozen=True)
class BackboneSpec:
    """Stem (``stem_stride`` 1, 2 or 4: conv-BN-ReLU blocks to ``stem_channels``) + ``stages``; every stage's
    layers are ``kind`` (a :data:`~pce.registry.LAYERS` name) built from ``layer`` with the stage's
    ``patch_size`` (and ``num_experts`` / ``kind`` when the stage sets them). ``attention_kwargs``: for
    :class:`~pce.layers.attention.DeformableAttention`; ``out_indices``: the stages ``forward`` returns;
    ``drop_path_rate``: stochastic depth (timm's convention: the rate grows linearly over the layers of all stages,
    from 0 at the first to ``drop_path_rate`` at the last; 0 switches it off)."""

    stages: Tuple[StageSpec, ...]
    in_chans: int = 3
    stem_channels: int = 32
    stem_stride: int = 4
    kind: str = "pce"
    layer: LayerSpec = field(default_factory=LayerSpec)
    attention_kwargs: Optional[Dict[str, Any]] = None
    out_indices: Optional[Tuple[int, ...]] = None
    drop_path_rate: float = 0.0

    def __post_init__(self) -> None:
        rate = self.drop_path_rate
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= float(rate) <= 1.0:
            raise ValueError(f"drop_path_rate must be a number in [0, 1], got {self.drop_path_rate!r}")
        stages = tuple(s if isinstance(s, StageSpec) else StageSpec.from_dict(i, s) for i, s in enumerate(self.stages))
        object.__setattr__(self, "stages", stages)
        if self.out_indices is not None:
            object.__setattr__(self, "out_indices", tuple(self.out_indices))
        if self.stem_stride not in (1, 2, 4):
            raise ValueError(f"stem_stride must be 1, 2 or 4, got {self.stem_stride}")
        if not stages:
            raise ValueError("a backbone needs at least one stage")
        if self.layer.patch_size is not None or self.layer.patch_stride is not None:
            raise ValueError("the backbone's LayerSpec has no patch_size / patch_stride (each stage sets its own)")
        for i, s in enumerate(stages):
            if s.stride not in (1, 2):
                raise ValueError(f"stage {i}: stride must be 1 or 2, got {s.stride}")
            if s.num_experts is not None:
                _check_experts(s.num_experts, f"stage {i}: ")

    def stage_layer(self, i: int) -> Tuple[str, LayerSpec]:
        """Stage ``i``'s layer kind and :class:`LayerSpec` (the backbone's, with the stage's settings)."""
        s = self.stages[i]
        spec = replace(self.layer, patch_size=s.patch_size,
                       num_experts=self.layer.num_experts if s.num_experts is None else s.num_experts)
        return (self.kind if s.kind is None else s.kind), spec

    def with_layer(self, **changes: Any) -> "BackboneSpec":
        """This spec with ``changes`` to the layer spec of every stage (``with_layer(router="gate", top_k=2)``)."""
        return replace(self, layer=layer_spec(self.layer, **changes))

    # -- backbone kwargs ----------------------------------------------------------------------------------------
    @classmethod
    def from_kwargs(cls, stages: Sequence[StageLike], layer: str = "pce", **kwargs: Any) -> "BackboneSpec":
        """From :class:`~pce.models.backbone.PCEBackbone` keyword arguments: ``stages`` (dicts or StageSpecs),
        ``layer`` (the kind), stem / attention / out_indices options and the :class:`LayerSpec` fields."""
        unknown = sorted(set(kwargs) - set(BACKBONE_KWARGS))
        if unknown:
            raise TypeError(f"unknown backbone option(s) {unknown}; valid: {sorted(BACKBONE_KWARGS)}")
        own = {k: kwargs.pop(k) for k in list(kwargs) if k in _BACKBONE_FIELDS}
        return cls(tuple(stages), kind=layer, layer=layer_spec(**kwargs), **own)

    def to_kwargs(self) -> Dict[str, Any]:
        """The :class:`~pce.models.backbone.PCEBackbone` keyword arguments of this spec (fresh copies)."""
        out: Dict[str, Any] = {"stages": [s.to_dict() for s in self.stages]}
        out.update({k: getattr(self, k) for k in _BACKBONE_FIELDS})
        out["layer"] = self.kind
        out.update({f: getattr(self.layer, f) for f in _STAGE_LAYER_FIELDS})
        return copy.deepcopy(out)


_BACKBONE_FIELDS = ("in_chans", "stem_channels", "stem_stride", "attention_kwargs", "out_indices", "drop_path_rate")
_STAGE_LAYER_FIELDS = tuple(f for f in LAYER_FIELDS if f not in ("patch_size", "patch_stride"))  # set per stage
#: every keyword argument :class:`~pce.models.backbone.PCEBackbone` (and ``build_backbone``'s overrides) accepts
BACKBONE_KWARGS: Tuple[str, ...] = ("stages", "layer") + _BACKBONE_FIELDS + _STAGE_LAYER_FIELDS
