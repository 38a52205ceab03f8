"""PCE backbones as segmentation-models-pytorch (smp) encoders.

Importing this module (``import pce.tasks.segmentation`` does) registers every backbone preset whose maps
sit at strides 4, 8, 16, 32 (``pce_tiny`` / ``pce_small`` / ``pce_base`` and their ``dense_*`` twins) in
``smp.encoders.encoders`` under the preset's own name, so that::

    smp.create_model("FPN", encoder_name="pce_tiny", encoder_weights=None, classes=21)

builds an FPN (or Unet, DeepLabV3Plus, ...) on a PCE backbone. ``encoder_weights`` must be ``None``: PCE ships
no pretrained weights and asking for some (smp's default is ``"imagenet"``) raises
:class:`PretrainedWeightsError` before anything could be downloaded.

Features. smp decoders read ``depth + 1`` maps at strides 1, 2, 4, ... 2**depth. :class:`PCEEncoder` returns

* stride 1: the input itself (as smp's ResNet encoders do; Unet drops it, FPN / DeepLabV3Plus never read it);
* stride 2: the activation of the first stride-2 conv of the backbone's stem (``stem[0]``): free, no extra
  parameters (Unet uses it as its highest-resolution skip);
* strides 4 ... 32: ``stage1`` ... ``stage4`` of the backbone. FPN reads the last four, DeepLabV3Plus the
  stride-4 map and the deepest one.

``encoder_depth`` 3, 4 or 5 builds only the stages it returns (depth 3: stages 1-2).

Output stride (DeepLabV3Plus: ``encoder_output_stride`` 8 or 16). smp passes ``output_stride`` to the
encoder's constructor, so the backbone is *built* for it, no patching of a built model: every stage whose
nominal stride exceeds ``output_stride`` gets ``stride=1`` (its downsampling 3x3 conv keeps the resolution)
and its ``patch_size`` is multiplied by ``nominal_stride / output_stride``, so that each PCE layer keeps the
same patch grid in image pixels (e.g. ``pce_tiny`` at output stride 16: stage 4 runs at stride 16 with 4x4
patches instead of stride 32 with 2x2 patches; one patch still covers 64x64 input pixels).
``make_dilated`` (which smp calls afterwards) only checks that the requested stride is the one built.

Backbone overrides. smp's model constructors drop unknown keyword arguments for non-timm encoders, so
``smp.create_model(..., router="gate")`` cannot reach the backbone. Use :func:`create_smp_model` (or
:func:`~pce.tasks.segmentation.model.build_segmentation_model`)::

    create_smp_model("FPN", "pce_tiny", encoder_overrides={"router": "gate", "num_experts": 8}, classes=21)

or, around any smp constructor, the :func:`backbone_overrides` context (a ``ContextVar``, so thread- and
task-local; it is read only while an encoder is being constructed).

Routing. Every forward stores the per-layer :class:`~pce.moe.routing.RoutingResult` list of *that* forward in
``encoder.routing`` (replaced at each call; empty for dense twins), so the training loss can add
:func:`pce.moe.losses.router_loss`. (Under ``nn.DataParallel`` the attribute is set on the replicas and lost;
use DDP.)
"""
from __future__ import annotations

import contextlib
import contextvars
import copy
import inspect
from typing import Any, Dict, Iterator, List, Mapping, Optional

import torch
from torch import nn

import segmentation_models_pytorch as smp
from segmentation_models_pytorch.encoders._base import EncoderMixin

from pce.models.backbone import PCEBackbone, backbone_config, list_backbones
from pce.moe.routing import RoutingResult

__all__ = [
    "PCEEncoder", "PretrainedWeightsError", "backbone_overrides", "create_smp_model", "is_pce_encoder_name",
    "pce_encoder_names", "register_smp_encoders",
]

_OVERRIDES: contextvars.ContextVar[Dict[str, Any]] = contextvars.ContextVar("pce_smp_encoder_overrides", default={})
# Keys the encoder sets itself: the smp model decides the depth (stages built) and the input channels.
_RESERVED = {"out_indices": "use encoder_depth", "in_chans": "use in_channels of the smp model"}


class PretrainedWeightsError(KeyError, ValueError):
    """Raised when pretrained weights are requested for a PCE encoder (there are none; nothing is downloaded).
    A ``KeyError`` like smp's own "wrong pretrained weights" error, and a ``ValueError``."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class _NoPretrainedWeights(dict):
    """``pretrained_settings`` of a PCE encoder: empty, and asking it for any weights raises a clear error
    (smp checks ``weights in pretrained_settings`` before it downloads anything)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    def __contains__(self, weights: object) -> bool:
        raise PretrainedWeightsError(
            f"encoder {self.name!r}: PCE ships no pretrained weights (asked for encoder_weights={weights!r}); "
            f"pass encoder_weights=None (smp's default is 'imagenet'), or load a PCE checkpoint yourself")

    def __deepcopy__(self, memo: Dict[int, Any]) -> "_NoPretrainedWeights":
        return _NoPretrainedWeights(self.name)

    def __reduce__(self):
        return (_NoPretrainedWeights, (self.name,))


def _check_reserved(overrides: Mapping[str, Any]) -> None:
    for key in overrides:
        if key in _RESERVED:
            raise TypeError(f"backbone option {key!r} is set by the smp encoder: {_RESERVED[key]}")


@contextlib.contextmanager
def backbone_overrides(**overrides: Any) -> Iterator[None]:
    """Backbone overrides (``router=``, ``num_experts=``, ``top_k=``, any :class:`~pce.models.backbone.PCEBackbone`
    argument) for the PCE encoders constructed inside the block, e.g. by ``smp.create_model``. Nested blocks
    merge (inner keys win)."""
    _check_reserved(overrides)
    token = _OVERRIDES.set({**_OVERRIDES.get(), **copy.deepcopy(overrides)})
    try:
        yield
    finally:
        _OVERRIDES.reset(token)


def _encoder_config(preset: str, depth: int, output_stride: int, overrides: Mapping[str, Any]) -> Dict[str, Any]:
    """The :class:`PCEBackbone` kwargs of an encoder: the preset with overrides, truncated to ``depth - 1``
    stages, stages beyond ``output_stride`` kept at that stride with proportionally larger patches."""
    if depth not in (3, 4, 5):
        raise ValueError(f"PCE encoders support encoder_depth 3, 4 or 5 (maps at strides up to 2**depth), got {depth}")
    if output_stride not in (8, 16, 32):
        raise ValueError(f"PCE encoders support output_stride 8, 16 or 32, got {output_stride}")
    cfg = backbone_config(preset, **overrides)
    cfg.pop("out_indices", None)
    stages = [dict(s) for s in cfg["stages"]]
    if cfg.get("stem_stride", 4) != 4:
        raise ValueError(f"{preset!r}: an smp encoder needs a stride-4 stem (two stride-2 convs), "
                         f"got stem_stride={cfg.get('stem_stride')}")
    strides = [int(s.get("stride", 2)) for s in stages]
    if len(stages) < depth - 1 or strides[0] != 1 or any(s != 2 for s in strides[1:depth - 1]):
        raise ValueError(f"{preset!r}: an smp encoder of depth {depth} needs stages at strides "
                         f"{[4 * 2 ** i for i in range(depth - 1)]} (stage strides 1, 2, 2, ...), "
                         f"got stage strides {strides}")
    stages = stages[:depth - 1]
    previous = 4  # the stem's stride
    for i, s in enumerate(stages):
        nominal = 4 * 2 ** i
        actual = min(nominal, output_stride)
        s["stride"] = 2 if actual > previous else 1
        s["patch_size"] = int(s["patch_size"]) * (nominal // actual)
        previous = actual
    cfg["stages"] = stages
    return cfg


class PCEEncoder(EncoderMixin, nn.Module):
    """A :class:`~pce.models.backbone.PCEBackbone` preset as an smp encoder (see the module docstring).

    Args:
        preset: backbone preset name (stride-4 stem, stages at strides 4, 8, 16, 32).
        depth: 3, 4 or 5; ``forward`` returns ``depth + 1`` maps at strides 1, 2, 4, ... 2**depth.
        output_stride: 32, or 16 / 8 (stages beyond it are built at that stride).
        overrides: backbone overrides (merged over those of an active :func:`backbone_overrides` block).

    ``forward(x)`` -> list of maps; ``self.routing`` -> routing of the last forward.
    """

    _is_torch_scriptable = False  # RoutingResult dataclasses, routing attribute

    def __init__(self, preset: str, depth: int = 5, output_stride: int = 32, **overrides: Any) -> None:
        nn.Module.__init__(self)  # EncoderMixin.__init__ does not chain to nn.Module
        merged = {**_OVERRIDES.get(), **overrides}
        _check_reserved(merged)
        self.preset = preset
        self.overrides = copy.deepcopy(merged)
        cfg = _encoder_config(preset, depth, output_stride, merged)
        self.backbone = PCEBackbone(**cfg)
        if len(self.backbone.stem) != 2:  # pragma: no cover - guaranteed by stem_stride == 4
            raise ValueError("an smp encoder needs a two-block stem")
        self._depth = depth
        self._in_channels = self.backbone.in_chans
        self._output_stride = output_stride
        self._out_channels = ([self.backbone.in_chans, int(cfg.get("stem_channels", 32))]
                              + [int(s["channels"]) for s in cfg["stages"]])
        self.routing: List[RoutingResult] = []

    def __getstate__(self) -> Dict[str, Any]:
        # deepcopy (e.g. an EMA copy) / pickling: drop the last forward's routing (tensors in an autograd graph)
        state = dict(super().__getstate__())
        state["routing"] = []
        return state

    # -- smp encoder interface ---------------------------------------------------------------------------
    @property
    def size_divisibility(self) -> int:
        """Input sizes divisible by this give every map at exactly ``H / stride`` (see PCEBackbone)."""
        return self.backbone.size_divisibility

    @property
    def strides(self) -> List[int]:
        """Stride of each returned map (1, 2, then the stages')."""
        return [1, 2] + [f["stride"] for f in self.backbone.feature_info]

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        if x.dim() != 4 or x.shape[1] != self.backbone.in_chans:
            raise ValueError(f"encoder {self.preset!r} expects input [B, {self.backbone.in_chans}, H, W], "
                             f"got {tuple(x.shape)}")
        routing: List[RoutingResult] = []
        stem = self.backbone.stem
        s2 = stem[0](x)
        h = stem[1](s2)
        features = [x, s2]
        for stage in self.backbone.stages:
            h = stage(h, routing)
            features.append(h)
        self.routing = routing
        return features

    def get_stages(self) -> Dict[int, List[nn.Module]]:
        raise NotImplementedError("PCE encoders are built for their output stride (smp passes it to the "
                                  "constructor); there is nothing to dilate afterwards")

    def make_dilated(self, output_stride: int) -> None:
        if output_stride != self._output_stride:
            raise ValueError(f"encoder {self.preset!r} was built for output_stride={self._output_stride}; "
                             f"build a new one for {output_stride} (encoder_output_stride=... in smp)")

    def set_in_channels(self, in_channels: int, pretrained: bool = True) -> None:
        """Replace the first stem conv for ``in_channels`` inputs (freshly initialised)."""
        if in_channels == self.backbone.in_chans:
            return
        old: nn.Conv2d = self.backbone.stem[0][0]
        self.backbone.stem[0][0] = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride,
                                             old.padding, bias=old.bias is not None)
        self.backbone.in_chans = in_channels
        self._in_channels = in_channels
        self._out_channels = [in_channels] + list(self._out_channels[1:])

    # -- PCE controls (delegated) ---------------------------------------------------------------------------
    def set_router_override(self, name: Optional[str], **kwargs: Any) -> None:
        self.backbone.set_router_override(name, **kwargs)

    def set_keys_trainable(self, flag: bool) -> None:
        self.backbone.set_keys_trainable(flag)

    def set_attention_enabled(self, flag: bool) -> None:
        self.backbone.set_attention_enabled(flag)

    def extra_repr(self) -> str:
        return f"preset={self.preset!r}, depth={self._depth}, output_stride={self._output_stride}"


def _fits_smp(name: str) -> bool:
    try:
        _encoder_config(name, 5, 32, {})
    except (ValueError, KeyError, TypeError):
        return False
    return True


def pce_encoder_names() -> List[str]:
    """Backbone presets usable as smp encoders (stride-4 stem, stages at strides 4, 8, 16, 32)."""
    return [n for n in list_backbones() if _fits_smp(n)]


def register_smp_encoders() -> List[str]:
    """Add every fitting preset to ``smp.encoders.encoders`` (idempotent). Returns the names."""
    names = pce_encoder_names()
    for name in names:
        smp.encoders.encoders[name] = {
            "encoder": PCEEncoder,
            "pretrained_settings": _NoPretrainedWeights(name),
            "params": {"preset": name},
        }
    return names


def is_pce_encoder_name(name: str) -> bool:
    entry = smp.encoders.encoders.get(name)
    return entry is not None and entry["encoder"] is PCEEncoder


def create_smp_model(arch: str = "FPN", encoder: str = "pce_tiny",
                     encoder_overrides: Optional[Mapping[str, Any]] = None, **kwargs: Any) -> nn.Module:
    """``smp.create_model(arch, encoder_name=encoder, **kwargs)`` with ``encoder_weights=None`` by default and
    the backbone ``encoder_overrides`` applied (PCE encoders only).

    Unlike smp, which silently drops keyword arguments its architecture does not know (it forwards them to
    timm-universal encoders only), this raises ``TypeError`` naming them (e.g. ``decoder_channels`` for FPN,
    whose options are ``decoder_pyramid_channels`` / ``decoder_segmentation_channels``)."""
    kwargs.setdefault("encoder_weights", None)
    overrides = dict(encoder_overrides or {})
    if overrides and not is_pce_encoder_name(encoder):
        raise TypeError(f"encoder_overrides apply to PCE encoders ({', '.join(pce_encoder_names())}), "
                        f"not to {encoder!r}")
    cls = smp.MODEL_ARCHITECTURES_MAPPING.get(str(arch).lower())
    if cls is None:
        raise KeyError(f"unknown smp architecture {arch!r}; available: {sorted(smp.MODEL_ARCHITECTURES_MAPPING)}")
    if not str(encoder).startswith("tu-"):
        params = inspect.signature(cls.__init__).parameters
        known = {n for n, p in params.items() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)} - {"self"}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"{cls.__name__} has no option(s) {unknown} (smp would ignore them silently); "
                            f"its options: {sorted(known - {'encoder_name'})}")
    with backbone_overrides(**overrides):
        return smp.create_model(arch, encoder_name=encoder, **kwargs)


REGISTERED = register_smp_encoders()
