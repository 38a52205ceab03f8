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
* stride 2: the output of the backbone stem's first stride-2 block
  (``forward_intermediates(..., stem_outputs=True)``): free, no extra parameters (Unet's highest-resolution skip);
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
``smp.create_model(..., router="gate")`` cannot reach the backbone. Register a named variant, usable by any
smp constructor, or let :func:`create_smp_model` (and
:func:`~pce.tasks.segmentation.model.build_segmentation_model`) do it::

    name = register_smp_encoder("pce_tiny_gate8", "pce_tiny", router="gate", num_experts=8)
    smp.create_model("Unet", encoder_name=name, encoder_weights=None, classes=21)
    create_smp_model("FPN", "pce_tiny", encoder_overrides={"router": "gate", "num_experts": 8}, classes=21)

Capability flags (what smp's own tests and encoder tables read, on the instance): ``_is_torch_scriptable`` is
False (PCE backbones, PCE and dense layers and expert banks refuse ``torch.jit.script`` with a
``RuntimeError``); ``_is_torch_compilable`` / ``_is_torch_exportable`` are True
exactly when every PCE layer's execution can be captured in a graph: under capture the data-dependent strategies
run the static ``"capacity"`` execution (equal to ``"sparse"`` when no token overflows) and ``"context"`` its
static whole-map form (equal to eager context execution, E x its FLOPs); only ``"context"`` with a router that
gives a patch several experts (refused in eager runs too) blocks them (:func:`pce.models.fuse.capture_blockers`,
:class:`pce.moe.execution_static.StaticContextExecution`). On the encoder they are properties, so they follow
the layers; :func:`create_smp_model` also sets them on the smp model it returns (``smp.create_model`` itself
leaves the model's class defaults, True).

Routing leaves the model through :func:`pce.record_routing`, as for every PCE model.
"""
from __future__ import annotations

import copy
import hashlib
import inspect
import json
from typing import Any, Dict, List, Mapping, Optional

import torch
from torch import nn

import segmentation_models_pytorch as smp
from segmentation_models_pytorch.encoders._base import EncoderMixin

from pce.models.backbone import PCEBackbone
from pce.models.fuse import capture_blockers
from pce.models.presets import apply_output_stride, backbone_config, list_backbones

__all__ = [
    "PCEEncoder", "PretrainedWeightsError", "create_smp_model", "is_pce_encoder_name",
    "pce_encoder_names", "register_smp_encoder", "register_smp_encoders",
]

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
    cfg["stages"] = stages[:depth - 1]
    return apply_output_stride(cfg, output_stride)


class PCEEncoder(EncoderMixin, nn.Module):
    """A :class:`~pce.models.backbone.PCEBackbone` preset as an smp encoder (see the module docstring).

    Args:
        preset: backbone preset name (stride-4 stem, stages at strides 4, 8, 16, 32).
        depth: 3, 4 or 5; ``forward`` returns ``depth + 1`` maps at strides 1, 2, 4, ... 2**depth.
        output_stride: 32, or 16 / 8 (stages beyond it are built at that stride).
        overrides: backbone overrides (``router``, ``num_experts``, ... ; see :func:`register_smp_encoder`).

    ``forward(x)`` -> list of ``depth + 1`` maps.
    """

    _is_torch_scriptable = False  # PCE and dense layers refuse torch.jit.script with a RuntimeError

    @property
    def _is_torch_compilable(self) -> bool:  # type: ignore[override]
        """``torch.compile(fullgraph=True)`` works: no layer has an execution that cannot be captured."""
        return not capture_blockers(self)

    @property
    def _is_torch_exportable(self) -> bool:  # type: ignore[override]
        """``torch.export`` / ONNX (dynamo) work: no layer has an execution that cannot be captured."""
        return not capture_blockers(self)

    def __init__(self, preset: str, depth: int = 5, output_stride: int = 32, **overrides: Any) -> None:
        nn.Module.__init__(self)  # EncoderMixin.__init__ does not chain to nn.Module
        _check_reserved(overrides)
        self.preset = preset
        self.overrides = copy.deepcopy(overrides)
        cfg = _encoder_config(preset, depth, output_stride, overrides)
        self.backbone = PCEBackbone(**cfg)
        self._depth = depth
        self._in_channels = self.backbone.in_chans
        self._output_stride = output_stride
        self._out_channels = ([self.backbone.in_chans, int(cfg.get("stem_channels", 32))]
                              + [int(s["channels"]) for s in cfg["stages"]])

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
        maps = self.backbone.forward_intermediates(x, indices=range(len(self.backbone.stages)),
                                                   intermediates_only=True, stem_outputs=True)
        return [x, maps[0]] + maps[len(self.backbone.stem):]

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
        register_smp_encoder(name, name)
    return names


def register_smp_encoder(name: str, preset: str, **overrides: Any) -> str:
    """Register ``preset`` with backbone ``overrides`` as the smp encoder ``name`` (any smp constructor can then
    build it: ``smp.create_model("FPN", encoder_name=name, encoder_weights=None)``). Returns ``name``;
    re-registering a name with other settings raises ``ValueError``."""
    _check_reserved(overrides)
    _encoder_config(preset, min(5, len(backbone_config(preset, **overrides)["stages"]) + 1), 32, overrides)
    params = {"preset": preset, **copy.deepcopy(overrides)}
    old = smp.encoders.encoders.get(name)
    if old is not None and (old["encoder"] is not PCEEncoder or old["params"] != params):
        raise ValueError(f"smp encoder {name!r} is already registered with other settings")
    smp.encoders.encoders[name] = {"encoder": PCEEncoder, "pretrained_settings": _NoPretrainedWeights(name),
                                   "params": params}
    return name


def _variant_name(preset: str, overrides: Mapping[str, Any]) -> str:
    digest = hashlib.sha1(json.dumps(overrides, sort_keys=True, default=repr).encode()).hexdigest()[:10]
    return f"{preset}[{digest}]"


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
    if overrides:  # a named variant of the (possibly already customised) encoder
        base = dict(smp.encoders.encoders[encoder]["params"])
        preset = base.pop("preset")
        merged = {**base, **overrides}
        encoder = register_smp_encoder(_variant_name(preset, merged), preset, **merged)
    model = smp.create_model(arch, encoder_name=encoder, **kwargs)
    if isinstance(model.encoder, PCEEncoder):  # the model's class flags, and what its PCE encoder can do
        for flag in ("_is_torch_compilable", "_is_torch_exportable", "_is_torch_scriptable"):
            setattr(model, flag, bool(getattr(type(model), flag, True) and getattr(model.encoder, flag)))
    return model


REGISTERED = register_smp_encoders()
