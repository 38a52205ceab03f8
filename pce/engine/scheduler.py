"""The per-phase learning-rate scheduler of phased PCE training (the seed's ``PCEScheduler``)."""
from __future__ import annotations

import bisect
import logging
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import torch
from torch.optim.lr_scheduler import LRScheduler

__all__ = ["PCEScheduler"]

logger = logging.getLogger("pce.engine")


class PCEScheduler(LRScheduler):
    """Learning rate per phase: phase ``i`` runs from epoch ``sum(phase_epochs[:i])`` with
    ``lr = base_lr * phase_multipliers[i]`` (times ``param_scheduler(progress)`` when given).

    Args:
        optimizer: the optimizer.
        phase_epochs: epochs of each phase.
        base_lr: one base lr for every param group (default: each group's initial lr).
        phase_multipliers: lr multiplier of each phase (default 1).
        param_scheduler: optional fvcore ``ParamScheduler`` of a multiplier over training progress in [0, 1)
            (warmup, cosine, ...).
        iters_per_epoch: ``step()`` calls per epoch. 1 (default): step once per epoch, like
            ``PCEScheduler(opt, [2, 5, 3], 0.1, [1, 1, 0.1])`` in the seed; the trainer steps per iteration.

    Only primitives are saved by :meth:`state_dict` (checkpoints load with ``weights_only=True``).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, phase_epochs: Sequence[int], base_lr: Optional[float] = None,
                 phase_multipliers: Optional[Sequence[float]] = None, param_scheduler: Optional[Callable] = None,
                 iters_per_epoch: int = 1, last_epoch: int = -1) -> None:
        self.phase_epochs = [int(e) for e in phase_epochs]
        if not self.phase_epochs or any(e < 0 for e in self.phase_epochs) or sum(self.phase_epochs) < 1:
            raise ValueError(f"phase_epochs must be non-negative with a positive sum, got {list(phase_epochs)}")
        mults = [1.0] * len(self.phase_epochs) if phase_multipliers is None else [float(m) for m in phase_multipliers]
        if len(mults) != len(self.phase_epochs):
            raise ValueError(f"{len(mults)} phase_multipliers for {len(self.phase_epochs)} phases")
        if int(iters_per_epoch) < 1:
            raise ValueError(f"iters_per_epoch must be >= 1, got {iters_per_epoch}")
        self.phase_multipliers = mults
        self.iters_per_epoch = int(iters_per_epoch)
        self.param_scheduler = param_scheduler
        self._ends = []
        total = 0
        for e in self.phase_epochs:
            total += e
            self._ends.append(total)
        self.total_epochs = total
        if base_lr is not None:
            for g in optimizer.param_groups:
                g["lr"] = float(base_lr)
                g["initial_lr"] = float(base_lr)
        super().__init__(optimizer, last_epoch)

    def phase_index(self, epoch: int) -> int:
        """Index of the phase that epoch ``epoch`` (0-based) belongs to (the last one past the end)."""
        return min(bisect.bisect_right(self._ends, epoch), len(self._ends) - 1)

    def multiplier(self, step: int) -> float:
        epoch = step // self.iters_per_epoch
        m = self.phase_multipliers[self.phase_index(epoch)]
        if self.param_scheduler is not None:
            where = step / float(self.total_epochs * self.iters_per_epoch)
            m *= float(self.param_scheduler(min(max(where, 0.0), 1.0 - 1e-9)))
        return m

    def get_lr(self) -> List[float]:
        m = self.multiplier(max(self.last_epoch, 0))
        return [base * m for base in self.base_lrs]

    def _get_closed_form_lr(self) -> List[float]:
        return self.get_lr()

    def state_dict(self) -> Dict[str, Any]:
        return {"last_epoch": self.last_epoch, "base_lrs": list(self.base_lrs), "_last_lr": list(self._last_lr),
                "_step_count": self._step_count, "phase_epochs": list(self.phase_epochs),
                "phase_multipliers": list(self.phase_multipliers), "iters_per_epoch": self.iters_per_epoch}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        if list(state_dict.get("phase_epochs", self.phase_epochs)) != self.phase_epochs:
            logger.warning("resuming with different phase epochs: checkpoint %s, config %s",
                           state_dict.get("phase_epochs"), self.phase_epochs)
        if int(state_dict.get("iters_per_epoch", self.iters_per_epoch)) != self.iters_per_epoch:
            logger.warning("resuming with %d iterations per epoch (checkpoint: %s): the lr schedule shifts",
                           self.iters_per_epoch, state_dict.get("iters_per_epoch"))
        self.last_epoch = int(state_dict["last_epoch"])
        self.base_lrs = [float(v) for v in state_dict["base_lrs"]]
        self._step_count = int(state_dict.get("_step_count", self.last_epoch + 1))
        self._last_lr = self.get_lr()
        for g, lr in zip(self.optimizer.param_groups, self._last_lr):
            g["lr"] = lr
