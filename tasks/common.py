"""Helpers shared by the task adapters: config nodes to plain values, signature checks, model unwrapping,
and the dataset keyword arguments of a config split (``data.root``, the built-in ``demo`` data)."""
from __future__ import annotations

import inspect
from typing import Any, Dict, Mapping, Type

from torch import nn

from pce.datasets import DATASETS
from pce.datasets.demo_voc import DEMO_CLASSES, ensure_demo_voc


def to_plain(x: Any) -> Any:
    """CfgNode / tuples -> dicts and lists (recursively)."""
    if isinstance(x, Mapping):
        return {k: to_plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_plain(v) for v in x]
    return x


def accepts(fn: Any, name: str) -> bool:
    """Whether ``fn`` takes a keyword argument ``name``."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def unwrap(model: nn.Module, cls: Type[nn.Module]) -> nn.Module:
    """The ``cls`` model inside DDP / EMA (``AveragedModel``) wrappers."""
    while not isinstance(model, cls) and isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


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
    demo = kwargs.pop("demo", None)
    if demo:
        if "root" not in kwargs:
            raise ValueError(f"data.{split}.kwargs.demo needs a root (data.root or data.{split}.kwargs.root)")
        ensure_demo_voc(kwargs["root"], **(demo if isinstance(demo, Mapping) else {}))
        kwargs.setdefault("classes", DEMO_CLASSES)
    if isinstance(kwargs.get("classes"), list):
        kwargs["classes"] = tuple(kwargs["classes"])
    return kwargs
