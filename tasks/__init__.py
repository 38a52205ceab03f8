"""PCE tasks (installed as ``pce.tasks``): per-task models, evaluators and the adapters that drive
:class:`pce.engine.Trainer` (``get_task(cfg.task)``)."""
from .registry import TASKS, get_task, list_tasks, register_task

__all__ = ["TASKS", "get_task", "list_tasks", "register_task"]
