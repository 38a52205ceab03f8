"""Helpers shared by the task adapters: config nodes to plain values, signature checks,
the dataset keyword arguments of a config split (``data.root``, the built-in ``demo`` data),
:func:`apply_model_convert` (re-exported from :mod:`pce.tasks.model_convert`: the last step of every adapter's
``build_model``), :func:`refuse_mixup`,
:class:`SplitDatasetsMixin` (``build_datasets`` / ``set_epoch`` / ``dummy_inputs`` of every adapter),
:class:`RouterLossMixin` (``train_step``). The default members of the rest of the task contract are in
:mod:`pce.tasks.contract_defaults`."""
from __future__ import annotations

import inspect
import logging
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from pce.datasets import DATASETS, TRANSFORMS, build_dataset, build_transform
from pce.datasets.demo_voc import DEMO_CLASSES, ensure_demo_voc
from pce.engine.config import to_plain
from pce.moe.losses import RouterLossWeights, router_loss
from pce.moe.recorder import record_routing

__all__ = ["to_plain", "accepts", "head_options", "dataset_kwargs", "image_batch_to", "SplitDatasetsMixin",
           "RouterLossMixin", "check_kwargs", "check_split_dataset", "apply_model_convert"]

logger = logging.getLogger("pce")

from .model_convert import apply_model_convert  # noqa: E402  (re-exported: the adapters import it from here)


def accepts(fn: Any, name: str) -> bool:
    """Whether ``fn`` takes a keyword argument ``name``."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def head_options(cfg: Any, known: Sequence[str], task: str) -> Dict[str, Any]:
    """``model.head`` as a plain dict; ``ValueError`` naming the options not in ``known``."""
    head = to_plain(cfg.model.head)
    unknown = set(head) - set(known)
    if unknown:
        raise ValueError(f"model.head: unknown {task} head option(s) {sorted(unknown)}; known: {list(known)}")
    return head


def dataset_kwargs(cfg: Any, split: str) -> Dict[str, Any]:
    """Keyword arguments for ``data.<split>``'s dataset.

    ``data.root`` (when set) becomes ``root``. ``demo`` (``True`` or a dict of
    :func:`~pce.datasets.demo_voc.make_demo_voc` options) generates the procedural VOC-format demo data under
    ``root`` when it is missing and makes :data:`~pce.datasets.demo_voc.DEMO_CLASSES` the default ``classes``.
    """
    sc = cfg.data[split]
    kwargs = to_plain(sc.kwargs)
    if cfg.data.root and accepts(DATASETS.get(sc.name), "root"):
        kwargs["root"] = cfg.data.root
    if getattr(DATASETS.get(sc.name), "uses_runtime_seed", False) and "seed" not in kwargs:
        kwargs["seed"] = int(cfg.runtime.seed)  # e.g. the Camelyon validation holdout, drawn with the run's seed
    demo = kwargs.pop("demo", None)
    if demo:
        _check_demo_options(cfg, split, kwargs.get("root"), demo)
        if "root" not in kwargs:
            raise ValueError(f"data.{split}.kwargs.demo needs a root (data.root or data.{split}.kwargs.root)")
        ensure_demo_voc(kwargs["root"], **(demo if isinstance(demo, Mapping) else {}))
        kwargs.setdefault("classes", DEMO_CLASSES)
    if isinstance(kwargs.get("classes"), list):
        kwargs["classes"] = tuple(kwargs["classes"])
    return kwargs


def check_kwargs(fn: Any, kwargs: Mapping[str, Any], key: str, what: str) -> None:
    """``PCEError`` naming ``key.<name>`` for a keyword ``fn`` does not take (a typo in a config's kwargs)."""
    from pce.engine.errors import PCEError

    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    names = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n != "self"]
    for k in kwargs:
        if k not in names:
            import difflib

            close = difflib.get_close_matches(k, names, n=1)
            raise PCEError(f"{key}.{k}", f"not an argument of {what}" + (f"; did you mean {close[0]!r}?" if close
                                                                          else ""), f"one of {names}")


def check_split_dataset(split: str, name: str, dataset: Any) -> None:
    """Before any model is built: the split holds samples and its first sample loads (errors name the split)."""
    from pce.engine.errors import PCEError

    try:
        n = len(dataset)
    except TypeError:
        return
    if n == 0:
        raise PCEError(f"data.{split} ({name})", "the split holds no samples",
                       "at least one: check its image_set / split file / root")
    try:
        dataset[0]
    except PCEError:
        raise
    except (ValueError, OSError, KeyError, IndexError, TypeError, RuntimeError) as e:
        from pce.engine.errors import one_line

        raise PCEError(f"data.{split} ({name}) sample 0", one_line(e), "a readable sample") from e


def _check_demo_options(cfg: Any, split: str, root: Any, demo: Any) -> None:
    """Every split that generates the demo data into one root must ask for the same demo set (otherwise each
    split would regenerate the other's)."""
    from pce.engine.errors import PCEError

    from pce.datasets.demo_voc import _DEFAULTS

    def norm(d: Any) -> Dict[str, Any]:
        d = to_plain(d)
        return {**_DEFAULTS, **(dict(d) if isinstance(d, Mapping) else {})}

    for other in ("train", "val", "test"):
        sc = cfg.data[other]
        if other == split or not sc.name:
            continue
        ok = to_plain(sc.kwargs)
        o_demo = ok.get("demo")
        o_root = cfg.data.root if cfg.data.root and accepts(DATASETS.get(sc.name), "root") else ok.get("root")
        if o_demo and str(o_root) == str(root) and norm(o_demo) != norm(demo):
            raise PCEError(f"data.{split}.kwargs.demo", f"{to_plain(demo)!r} differs from data.{other}.kwargs.demo "
                           f"{to_plain(o_demo)!r} for the same root {root}", "the same demo options in every split")


def refuse_mixup(cfg: Any, task: str) -> None:
    """``data.mixup`` mixes classification batches only: on another task it would have no effect, which is an error
    naming the key (docs/RELIABILITY.md, "no flag without effect")."""
    mix = getattr(cfg.data, "mixup", None)
    if mix is not None and (float(mix.mixup_alpha) > 0 or float(mix.cutmix_alpha) > 0 or mix.cutmix_minmax):
        from pce.engine.errors import PCEError

        raise PCEError("data.mixup", f"Mixup / CutMix is a classification recipe and has no effect in the {task} "
                       f"task (mixup_alpha=0, cutmix_alpha=0 and cutmix_minmax=None here)")


def image_batch_to(images: torch.Tensor, device: torch.device, channels_last: bool = False) -> torch.Tensor:
    """A ``[B, C, H, W]`` image batch on ``device`` (``channels_last`` memory format when asked)."""
    images = images.to(device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images


class SplitDatasetsMixin:
    """``build_datasets`` / ``set_epoch`` / ``dummy_inputs`` shared by the task adapters.

    ``data.<split>``: a registered dataset (keyword arguments from :func:`dataset_kwargs`) with its registered
    transform; the train transform gets ``seed=runtime.seed`` when it takes one and the config does not set it,
    and :meth:`set_epoch` re-seeds it every epoch. A missing dataset raises ``FileNotFoundError`` naming the split,
    the dataset and ``data.obtain_hint``. Subclasses check the class count in :meth:`_check_classes` and may add
    transform options in :meth:`_build_transform`.
    """

    _train: Optional[Tuple[Any, Any, int]] = None  # (train dataset, its data.train config, seed)

    def _build_transform(self, split: str, split_cfg: Any, extra: Optional[Dict[str, Any]] = None) -> Any:
        name = split_cfg.transform.name
        if not name:
            return None
        kwargs = to_plain(split_cfg.transform.kwargs)
        kwargs.update(extra or {})
        return build_transform(name, **kwargs)

    def _check_classes(self, cfg: Any, split: str, name: str, dataset: Any) -> None:
        """Raise ``ValueError`` when ``dataset``'s classes do not fit ``model.num_classes``."""

    @staticmethod
    def _transform_extra(cfg: Any, split: str, sc: Any, evaluate: bool) -> Dict[str, Any]:
        """Transform options the split's config does not set: the augmentation seed of the train split, or, to
        evaluate, ``train=False`` (no augmentation, whatever the split and the transform's defaults)."""
        name = sc.transform.name
        if not name:
            return {}
        if evaluate:
            return {"train": False} if accepts(TRANSFORMS.get(name), "train") else {}
        if split == "train" and "seed" not in sc.transform.kwargs and accepts(TRANSFORMS.get(name), "seed"):
            return {"seed": int(cfg.runtime.seed)}
        return {}

    def build_datasets(self, cfg: Any, splits: Sequence[str] = ("train", "val"),
                       evaluate: bool = False) -> Dict[str, Any]:
        """The configured ones of ``splits`` (a split without ``data.<split>.name`` is left out). ``evaluate``:
        every split as the model is evaluated on it (``tools/eval.py --split train``, the routing tools): its
        transform without augmentation."""
        out = {}
        for split in splits:
            sc = cfg.data[split]
            if not sc.name:
                continue
            kwargs = dataset_kwargs(cfg, split)
            extra = self._transform_extra(cfg, split, sc, evaluate)
            check_kwargs(DATASETS.get(sc.name), kwargs, f"data.{split}.kwargs", f"dataset {sc.name!r}")
            if sc.transform.name:
                check_kwargs(TRANSFORMS.get(sc.transform.name), {**to_plain(sc.transform.kwargs), **extra},
                             f"data.{split}.transform.kwargs", f"transform {sc.transform.name!r}")
            transform = self._build_transform(split, sc, extra)
            try:
                ds = build_dataset(sc.name, transforms=transform, **kwargs)
            except FileNotFoundError as e:
                hint = cfg.data.obtain_hint or "point data.root (or the dataset's kwargs.root) at a copy of the data"
                raise FileNotFoundError(f"data.{split} ({sc.name}) is not available: {e}. How to obtain it: "
                                        f"{hint}") from e
            self._check_classes(cfg, split, sc.name, ds)
            check_split_dataset(split, sc.name, ds)
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
            ds.transforms = self._build_transform("train", sc, {"seed": seed * 1000003 + epoch})

    def dummy_inputs(self, cfg: Any, batch_size: int = 1) -> Tuple[torch.Tensor]:
        """A zero ``[B, C, H, W]`` batch of ``model.input_shape`` (FLOP counting, tracing)."""
        return (torch.zeros(batch_size, *[int(v) for v in cfg.model.input_shape]),)


class RouterLossMixin:
    """The one loss site of the router regularisers, shared by every task adapter.

    :meth:`train_step` records the routing of the task's forward (:func:`pce.record_routing`, through any DDP /
    EMA wrapper) and adds ``loss_router`` = :func:`pce.router_loss` of it, weighted by
    ``model.router_loss_weights`` of the config (a zero scalar for dense twins). Tasks implement
    :meth:`task_losses` (their own terms, from ``model(...)`` so that DDP synchronises gradients) and call
    :meth:`configure_router_loss` in ``build_model``.
    """

    router_loss_weights: RouterLossWeights = RouterLossWeights()

    def configure_router_loss(self, cfg: Any) -> None:
        self.router_loss_weights = RouterLossWeights.coerce(to_plain(cfg.model.router_loss_weights))

    def task_losses(self, model: nn.Module, batch: Any, device: torch.device) -> Dict[str, torch.Tensor]:
        raise NotImplementedError

    def train_step(self, model: nn.Module, batch: Any, device: torch.device) -> Dict[str, torch.Tensor]:
        """``task_losses`` plus ``loss_router``; the total loss is the sum of the values."""
        with record_routing(model) as rec:
            losses = self.task_losses(model, batch, device)
        losses["loss_router"] = router_loss(rec.results, self.router_loss_weights, device=device).float()
        return losses
