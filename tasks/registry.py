"""Task adapters: the objects that tell the engine and the tools everything about one task.

``get_task(cfg.task)`` returns a fresh adapter; ``tools/train.py`` passes it to :class:`pce.engine.Trainer`, the
other tools ask it how to read, draw, summarise, label and export (the engine never imports this package).

Adding a task: write ``tasks/<name>/task.py`` with a class registered by ``@register_task("<name>")`` that
implements every member of :class:`pce.engine.task.Task` (model and data, ``train_step`` / ``predict`` /
``build_evaluator``, a user's images, routing labels, export); the mixins of :mod:`pce.tasks.common` give the
shared ones. ``tests/test_task_contract.py`` runs every member for every registered task.

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
    """Class decorator: ``@register_task(name)`` on a :class:`pce.engine.task.Task` implementation."""
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
