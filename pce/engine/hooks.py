"""Trainer hooks: code run at fixed points of :meth:`pce.engine.trainer.Trainer.train`, registered with
``Trainer(..., hooks=[...])`` or :meth:`~pce.engine.trainer.Trainer.register_hooks`.

A hook subclasses :class:`HookBase` and overrides the events it needs; ``self.trainer`` is the trainer that runs
it (set at registration). In the order a run calls them:

* ``before_train``: once, before the first epoch (the metric writer is open);
* ``before_epoch``: the epoch's phase settings applied (``trainer.epoch``: epochs done, i.e. this epoch's index);
* ``before_step``: before the forward of one training step; ``trainer.batch`` is its batch and
  ``trainer.logging_step`` says whether the step writes a ``train`` record;
* :meth:`HookBase.log_metrics`: while the ``train`` record of a logging step is written (after the optimizer step):
  the returned entries join the record (``metrics.jsonl`` and TensorBoard);
* ``after_step``: after the step and its record (``trainer.iteration`` counts it);
* ``after_epoch``: after the epoch's validation and checkpoints;
* ``after_train``: once at the end of :meth:`~pce.engine.trainer.Trainer.train`, after the final evaluation, and
  also when training stops with an exception (release what ``before_*`` took).

A plain function ``fn(trainer, event)`` is a hook too (:class:`CallbackHook`): it is called at every event with
the event's name.
"""
from __future__ import annotations

import weakref
from typing import Any, Callable, Dict, Optional, Union

__all__ = ["HookBase", "CallbackHook", "as_hook", "HOOK_EVENTS"]

HOOK_EVENTS = ("before_train", "before_epoch", "before_step", "after_step", "after_epoch", "after_train")


class HookBase:
    """A trainer hook: override any of the events (each a no-op here) and :meth:`log_metrics`."""

    _trainer_ref: Optional[weakref.ReferenceType] = None

    @property
    def trainer(self) -> Any:
        """The trainer this hook is registered with (``None`` before registration)."""
        return self._trainer_ref() if self._trainer_ref is not None else None

    @trainer.setter
    def trainer(self, trainer: Any) -> None:
        # a weak reference: the trainer holds its hooks, a hook does not keep its trainer (and its work-dir lock) alive
        self._trainer_ref = weakref.ref(trainer) if trainer is not None else None

    def before_train(self) -> None:
        """Once, before the first epoch."""

    def after_train(self) -> None:
        """Once at the end of training, also when it stopped with an exception."""

    def before_epoch(self) -> None:
        """At the start of an epoch, after its phase settings are applied."""

    def after_epoch(self) -> None:
        """At the end of an epoch, after its validation and checkpoints."""

    def before_step(self) -> None:
        """Before a training step (``trainer.batch``, ``trainer.logging_step``)."""

    def after_step(self) -> None:
        """After a training step and its log record."""

    def log_metrics(self) -> Dict[str, Any]:
        """Entries for the ``train`` record being written (called on every rank on logging steps only; numbers,
        lists or a nested ``routing`` mapping, as :class:`pce.engine.logging.MetricWriter` takes them)."""
        return {}


class CallbackHook(HookBase):
    """A function ``fn(trainer, event)`` called at every event with the event's name (e.g. ``"after_epoch"``)."""

    def __init__(self, fn: Callable[[Any, str], None]) -> None:
        self.fn = fn

    def _call(self, event: str) -> None:
        self.fn(self.trainer, event)

    def before_train(self) -> None:
        self._call("before_train")

    def after_train(self) -> None:
        self._call("after_train")

    def before_epoch(self) -> None:
        self._call("before_epoch")

    def after_epoch(self) -> None:
        self._call("after_epoch")

    def before_step(self) -> None:
        self._call("before_step")

    def after_step(self) -> None:
        self._call("after_step")


def as_hook(hook: Union[HookBase, Callable[[Any, str], None]]) -> HookBase:
    """``hook`` itself when it is a :class:`HookBase`, a :class:`CallbackHook` of a function ``fn(trainer, event)``."""
    if isinstance(hook, HookBase):
        return hook
    if callable(hook):
        return CallbackHook(hook)
    raise TypeError(f"a trainer hook is a HookBase or a function fn(trainer, event), got {type(hook).__name__}")
