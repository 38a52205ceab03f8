"""PCE tasks (installed as ``pce.tasks``): per-task models, evaluators and the adapters that drive
:class:`pce.engine.Trainer` (``get_task(cfg.task)``), and :class:`Predictor`, a trained model as a Python function
(``from pce.tasks import Predictor``)."""
from .predictor import Predictor, Result
from .registry import TASKS, get_task, list_tasks, register_task

__all__ = ["TASKS", "get_task", "list_tasks", "register_task", "Predictor", "Result"]
