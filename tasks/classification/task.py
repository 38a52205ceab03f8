"""The classification task adapter: PCE classifier, registered datasets + transforms, top-k evaluation."""
from __future__ import annotations

import inspect
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from pce.classifier import PCEClassifier, build_classifier
from pce.datasets import DATASETS, TRANSFORMS, build_dataset, build_transform
from pce.losses import router_loss

from ..registry import register_task
from .metrics import ClassificationEvaluator

__all__ = ["ClassificationTask"]

HEAD_OPTIONS = ("spp_levels", "spp_mode", "dropout")


def _plain(x: Any) -> Any:
    """CfgNode -> dict (recursively)."""
    if isinstance(x, Mapping):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_plain(v) for v in x]
    return x


def _accepts(fn: Any, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


@register_task("classification")
class ClassificationTask:
    """Adapter for :class:`pce.engine.Trainer` (protocol in :mod:`pce.tasks.registry`).

    Batches are ``(images [B, C, H, W], targets [B])``. Losses: ``loss_cls`` (cross-entropy with
    ``model.label_smoothing``) and ``loss_router`` (the weighted router regularisers of every PCE layer).
    """

    name = "classification"
    collate_fn = None

    def __init__(self) -> None:
        self.channels_last = False
        self.label_smoothing = 0.0
        self._train: Optional[Tuple[Any, Any, int]] = None  # (train dataset, its data.train config, seed)

    # ------------------------------------------------------------------------------------- model
    def build_model(self, cfg: Any) -> PCEClassifier:
        head = _plain(cfg.model.head)
        unknown = set(head) - set(HEAD_OPTIONS)
        if unknown:
            raise ValueError(f"model.head: unknown classification head option(s) {sorted(unknown)}; "
                             f"known: {list(HEAD_OPTIONS)}")
        if "spp_levels" in head:
            head["spp_levels"] = tuple(head["spp_levels"])
        overrides = _plain(cfg.model.backbone_overrides)
        self.channels_last = bool(cfg.runtime.channels_last)
        self.label_smoothing = float(cfg.model.label_smoothing)
        try:
            return build_classifier(cfg.model.backbone, cfg.model.num_classes,
                                    router_loss_weights=dict(cfg.model.router_loss_weights), **head, **overrides)
        except (KeyError, TypeError) as e:
            raise ValueError(f"model.backbone={cfg.model.backbone!r} / model.backbone_overrides: "
                             f"{e.args[0] if e.args else e}") from e

    # -------------------------------------------------------------------------------------- data
    def _transform(self, split_cfg: Any, extra: Optional[Dict[str, Any]] = None) -> Any:
        name = split_cfg.transform.name
        if not name:
            return None
        kwargs = _plain(split_cfg.transform.kwargs)
        kwargs.update(extra or {})
        return build_transform(name, **kwargs)

    def build_datasets(self, cfg: Any, splits: Sequence[str] = ("train", "val")) -> Dict[str, Any]:
        out = {}
        for split in splits:
            sc = cfg.data[split]
            if not sc.name:
                continue
            kwargs = _plain(sc.kwargs)
            if cfg.data.root and _accepts(DATASETS.get(sc.name), "root"):
                kwargs["root"] = cfg.data.root
            extra = {}
            if (split == "train" and sc.transform.name and "seed" not in sc.transform.kwargs
                    and _accepts(TRANSFORMS.get(sc.transform.name), "seed")):
                extra["seed"] = int(cfg.runtime.seed)
            transform = self._transform(sc, extra)
            try:
                ds = build_dataset(sc.name, transforms=transform, **kwargs)
            except FileNotFoundError as e:
                hint = cfg.data.obtain_hint or "point data.root (or the dataset's kwargs.root) at a copy of the data"
                raise FileNotFoundError(f"data.{split} ({sc.name}) is not available: {e}. How to obtain it: "
                                        f"{hint}") from e
            classes = getattr(ds, "classes", None)
            if classes is not None and len(classes) != cfg.model.num_classes:
                raise ValueError(f"data.{split} ({sc.name}) has {len(classes)} classes but model.num_classes is "
                                 f"{cfg.model.num_classes}")
            if split == "train" and "seed" in extra:
                self._train = (ds, sc, extra["seed"])
            out[split] = ds
        return out

    def set_epoch(self, epoch: int) -> None:
        """A fresh, epoch-seeded augmentation stream, so a resumed run augments like an uninterrupted one."""
        if self._train is None:
            return
        ds, sc, seed = self._train
        if hasattr(ds, "transforms"):
            ds.transforms = self._transform(sc, {"seed": seed * 1000003 + epoch})

    # -------------------------------------------------------------------------------- train / eval
    def _inputs(self, batch: Any, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        images, targets = batch[0], batch[1]
        images = images.to(device, non_blocking=True)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, torch.as_tensor(targets).to(device, non_blocking=True)

    def train_step(self, model: nn.Module, batch: Any, device: torch.device) -> Dict[str, torch.Tensor]:
        """``PCEClassifier.losses`` through ``model(...)`` so DDP's forward synchronises gradients."""
        images, targets = self._inputs(batch, device)
        logits, routing = model(images, return_routing=True)
        losses = {"loss_cls": F.cross_entropy(logits.float(), targets, label_smoothing=self.label_smoothing)}
        if routing:
            weights = getattr(getattr(model, "module", model), "router_loss_weights", None)
            losses["loss_router"] = router_loss(routing, weights).to(logits.device).float()
        return losses

    @torch.no_grad()
    def predict(self, model: nn.Module, batch: Any, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        images, targets = self._inputs(batch, device)
        return model(images).float(), targets

    def build_evaluator(self, cfg: Any, dataset: Any = None) -> ClassificationEvaluator:
        names = getattr(dataset, "classes", None)
        if names is not None and len(names) != cfg.model.num_classes:
            names = None
        return ClassificationEvaluator(cfg.model.num_classes, class_names=names, topk=tuple(cfg.eval.topk))

    def batch_images(self, batch: Any) -> torch.Tensor:
        return batch[0]

    def batch_size(self, batch: Any) -> int:
        return int(batch[0].shape[0])

    def dummy_inputs(self, cfg: Any, batch_size: int = 1) -> Tuple[torch.Tensor]:
        return (torch.zeros(batch_size, *[int(v) for v in cfg.model.input_shape]),)
