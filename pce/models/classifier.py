"""Image classifier: PCE (or dense) backbone -> SPP on the last map -> fully connected head (seeds 000/001).

The model follows timm's model API (``timm.create_model("pce_tiny")`` builds it, see
:mod:`pce.models.timm_models`): ``num_features`` (channels of :meth:`PCEClassifier.forward_features`' map),
``head_hidden_size`` (the pooled, pre-logits width), ``forward_head(x, pre_logits=...)``,
``reset_classifier(num_classes, global_pool)``, ``forward_intermediates``, ``prune_intermediate_layers`` and
``feature_info`` (one dict per stage, module paths relative to the classifier).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from pce.layers.spp import SpatialPyramidPooling
from pce.models.backbone import PCEBackbone, stage_indices
from pce.models.presets import build_backbone

#: ``global_pool`` values: SPP with average or max pooling at every level, or ``""`` (no pooling: the map)
POOL_TYPES = ("avg", "max", "")


class PCEClassifier(nn.Module):
    """``[B, C, H, W] -> logits [B, num_classes]``.

    Args:
        backbone: a :class:`~pce.models.backbone.PCEBackbone` or a preset name (``overrides`` then go to the preset).
        num_classes: number of classes; ``0`` gives no classifier (``forward`` returns the pooled features
            ``[B, head_hidden_size]``, or the map ``[B, num_features, h, w]`` with ``global_pool=""``).
        spp_levels: pyramid levels of the head's SPP (the seeds use 1, 2, 4).
        spp_mode: ``"avg"`` or ``"max"`` pooling at every SPP level.
        dropout: dropout before the FC layer.
        global_pool: timm's name for the pooling: ``None`` (``spp_mode``), ``"avg"``/``"max"`` (SPP in that mode)
            or ``""`` (no pooling; only with ``num_classes=0``).

    Routing: ``with pce.record_routing(model) as rec`` around the forward (the task adds the router loss).
    """

    def __init__(self, backbone: Union[PCEBackbone, str], num_classes: int, spp_levels: Sequence[int] = (1, 2, 4),
                 spp_mode: str = "avg", dropout: float = 0.0, global_pool: Optional[str] = None,
                 **overrides: Any) -> None:
        super().__init__()
        self._check_head(num_classes, spp_mode if global_pool is None else global_pool)  # before the build
        if isinstance(backbone, str):
            backbone = build_backbone(backbone, **overrides)
        elif overrides:
            raise TypeError(f"backbone overrides {sorted(overrides)} need a preset name, not a built backbone")
        self.backbone = backbone
        if backbone.out_indices[-1] != len(backbone.stages) - 1:
            raise ValueError("the classifier head reads the deepest stage: include it in out_indices")
        self.in_chans = backbone.in_chans
        self.spp_levels = tuple(spp_levels)
        self.drop_rate = float(dropout)
        self.feature_info = self._stage_info()
        self.num_features = self.feature_info[-1]["num_chs"]
        self.drop = nn.Dropout(dropout)
        self._set_head(num_classes, spp_mode if global_pool is None else global_pool)

    def _stage_info(self) -> List[Dict[str, Any]]:
        """timm's ``feature_info``: one dict per stage, ``module`` the path inside this model."""
        return [dict(f, module=f"backbone.{f['module']}") for f in self.backbone._all_info]

    @staticmethod
    def _check_head(num_classes: int, global_pool: str) -> None:
        """``ValueError`` saying what to pass when ``num_classes`` / ``global_pool`` cannot make a head."""
        if not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be an integer >= 0 (0: no classifier), got {num_classes!r}")
        if global_pool not in POOL_TYPES:
            raise ValueError(f"global_pool must be one of {POOL_TYPES} (SPP avg / max, or '' for no pooling), "
                             f"got {global_pool!r}")
        if global_pool == "" and num_classes > 0:
            raise ValueError("global_pool='' (no pooling) leaves a map the FC layer cannot read: use num_classes=0 "
                             "for a feature extractor, or global_pool='avg' / 'max' to keep a classifier")

    def _set_head(self, num_classes: int, global_pool: str) -> None:
        self._check_head(num_classes, global_pool)
        if global_pool:
            self.spp: nn.Module = SpatialPyramidPooling(self.spp_levels, global_pool)
            self.head_hidden_size = self.spp.output_dim(self.num_features)
        else:
            self.spp = nn.Identity()
            self.head_hidden_size = self.num_features
        self.global_pool = global_pool
        ref = next(self.backbone.parameters(), None)
        fc = nn.Linear(self.head_hidden_size, num_classes) if num_classes > 0 else nn.Identity()
        self.fc = fc.to(ref.device, ref.dtype) if ref is not None else fc
        self.num_classes = num_classes

    # -- forward ------------------------------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` -> the deepest map ``[B, num_features, H / s, W / s]`` (unpooled)."""
        return self.backbone.forward_intermediates(x, indices=[len(self.backbone.stages) - 1],
                                                   intermediates_only=True)[-1]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """The deepest map ``[B, num_features, h, w]`` -> logits ``[B, num_classes]`` (SPP, dropout, FC);
        ``pre_logits=True``: the pooled features ``[B, head_hidden_size]`` (after dropout, as in timm)."""
        x = self.drop(self.spp(x))
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, H, W]`` -> ``[B, num_classes]`` (``num_classes=0``: ``[B, head_hidden_size]``, or the map
        ``[B, num_features, h, w]`` without pooling)."""
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: torch.Tensor, indices: Union[int, Sequence[int], None] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                              intermediates_only: bool = False
                              ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """timm's interface: stage maps ``[B, C_i, H / s_i, W / s_i]`` for ``indices`` (``None``: every stage;
        an int ``n``: the last ``n``; negative from the end), in stage order.

        Returns ``(final, intermediates)`` with ``final`` equal to :meth:`forward_features` (every stage runs),
        or only the list with ``intermediates_only`` (no stage past the last asked for runs when ``stop_early``).
        ``norm`` is accepted and changes nothing: PCE has no final norm layer. Only ``output_fmt="NCHW"``."""
        if output_fmt != "NCHW":
            raise ValueError(f"PCE maps are NCHW only, got output_fmt={output_fmt!r}")
        wanted = stage_indices(len(self.backbone.stages), indices)
        return self.backbone.forward_intermediates(x, wanted, intermediates_only=intermediates_only,
                                                   stop_early=stop_early)

    # -- timm model API -----------------------------------------------------------------------------------
    def prune_intermediate_layers(self, indices: Union[int, Sequence[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Remove the stages after the deepest of ``indices`` (their parameters go) and, with ``prune_head``,
        the classifier and pooling (``reset_classifier(0, "")``). Returns the absolute indices kept, for
        :meth:`forward_intermediates`. ``prune_norm`` changes nothing (no final norm)."""
        wanted = stage_indices(len(self.backbone.stages), indices)
        keep = max(wanted) + 1
        if keep < len(self.backbone.stages):
            if not prune_head:
                raise ValueError(f"pruning to {keep} stages changes the map the head reads: pass prune_head=True "
                                 "(the head is removed) or keep the deepest stage in indices")
            self.backbone.truncate_stages(keep)
            self.feature_info = self._stage_info()
            self.num_features = self.feature_info[-1]["num_chs"]
        if prune_head:
            self.reset_classifier(0, "")
        return wanted

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """A new (randomly initialised) FC layer for ``num_classes`` (``0``: none); ``global_pool`` switches
        the pooling (``"avg"``, ``"max"`` or ``""`` for none; ``None`` keeps it)."""
        self._set_head(num_classes, self.global_pool if global_pool is None else global_pool)

    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        """timm's parameter groups (e.g. layer-wise LR decay): the stem, then one group per stage; the head
        falls into the last group."""
        return dict(stem=r"^backbone\.stem", blocks=r"^backbone\.stages\.(\d+)")

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        if enable:
            raise NotImplementedError("PCE models have no gradient checkpointing: train without it")


def build_classifier(name: str, num_classes: int, **kwargs: Any) -> PCEClassifier:
    """``build_classifier("pce_fmnist", 10, router="gate")``: a backbone preset with an SPP + FC head.
    Head options (``spp_levels``, ``spp_mode``, ``dropout``, ``global_pool``) are taken from ``kwargs``; the rest
    are backbone overrides."""
    head_keys = {"spp_levels", "spp_mode", "dropout", "global_pool"}
    head = {k: kwargs.pop(k) for k in list(kwargs) if k in head_keys}
    return PCEClassifier(name, num_classes, **head, **kwargs)
