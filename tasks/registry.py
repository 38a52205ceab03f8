"""Task adapters: the objects that tell the training engine how to build, train and evaluate one task.

``get_task("classification")`` returns a fresh adapter; ``tools/train.py`` passes it to
:class:`pce.engine.Trainer`. The engine never imports this package.

Adding a task (detection and segmentation follow classification's layout): write ``tasks/<name>/task.py`` with ::

    from ..registry import register_task

    @register_task("detection")
    class DetectionTask:
        name = "detection"
        collate_fn = staticmethod(detection_collate)        # DataLoader collate_fn (None: default)

        def build_model(self, cfg) -> nn.Module: ...
        def build_datasets(self, cfg, splits=("train", "val")) -> dict: ...   # configured splits only
        def train_step(self, model, batch, device) -> Dict[str, Tensor]: ...  # loss terms, total = sum;
                                                                              # call model(...) (maybe DDP)
        def predict(self, model, batch, device) -> tuple: ...                 # args of evaluator.update(*args)
        def build_evaluator(self, cfg, dataset): ...        # update / compute, synchronize or merge+state_dict
        # optional: batch_images(batch), batch_size(batch), set_epoch(epoch), dummy_inputs(cfg, batch_size)

``get_task`` imports ``pce.tasks.<name>.task`` on first use, so a new task needs no edit here nor in the
engine's config schema (``task`` is any registered name).
"""
from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from typing import Any, List

from pce.registry import Registry

__all__ = ["TASKS", "register_task", "get_task", "list_tasks"]

TASKS = Registry("task")


def register_task(name: str):
    """Class decorator: ``@register_task("classification")``."""
    return TASKS.register(name)


def _autoload(name: str) -> None:
    if name in TASKS or not name.isidentifier():
        return
    module = f"{__package__}.{name}.task"
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name not in (module, f"{__package__}.{name}"):
            raise


def _task_packages() -> List[str]:
    """The sub-packages of ``pce.tasks`` (each may register a task in its ``task`` module)."""
    return sorted(m.name for m in pkgutil.iter_modules([str(Path(__file__).parent)]) if m.ispkg)


def list_tasks() -> List[str]:
    """Names of every registered task (every task package is imported first)."""
    for pkg in _task_packages():
        _autoload(pkg)
    return TASKS.names()


def get_task(name: str, **kwargs: Any) -> Any:
    """A new adapter for task ``name`` (``cfg.task``); KeyError names the known tasks."""
    _autoload(name)
    if name not in TASKS:
        raise KeyError(f"no task adapter registered as {name!r} (expected in pce.tasks.{name}.task); "
                       f"available: {', '.join(list_tasks()) or '(none)'}")
    return TASKS.build(name, **kwargs)
