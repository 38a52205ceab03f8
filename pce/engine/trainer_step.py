"""One optimizer step of the :class:`~pce.engine.trainer.Trainer` with gradient accumulation
(``optimizer.accumulate_steps = N``): the epoch's loader batches grouped into steps of N micro-batches, and the
step itself: every micro-batch's forward (the task's loss terms, router losses included) under autocast, the
NaN/inf guard, ``backward(loss / N)`` (DDP ``no_sync()`` on all but the last micro-batch, so gradients are
all-reduced once), then once per step gradient clipping, the optimizer / AMP scaler / lr scheduler / EMA steps
and the router-key synchronisation. N = 1 is the plain loop.

:class:`TrainerStep` is a mixin of the trainer; it reads ``cfg``, ``task``, ``device``, ``amp_dtype``,
``optimizer``, ``scaler``, ``scheduler``, ``ema``, ``model``, ``train_loader``, ``accumulate``,
``iters_per_epoch``, ``world_size``.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

from pce.engine.checkpoint import capture_rng_state, restore_rng_state
from pce.engine.distributed import all_reduce_max, sync_router_keys
from pce.engine.optim import clip_gradients
from pce.engine.runtime import autocast_context

__all__ = ["TrainerStep"]


class TrainerStep:
    """Micro-batch grouping and the accumulated optimizer step of :class:`~pce.engine.trainer.Trainer`."""

    def _epoch_steps(self, skip: int, stop: Callable[[], bool]) -> Iterator[Tuple[int, List[Any]]]:
        """``(i, micro-batches of optimizer step i)`` of this epoch's loader, from step ``skip`` on (the
        ``skip x N`` batches before are loaded, not trained, and leave the RNG as it was: exact resume). A step
        starts only while ``stop()`` is false and ``i < iters_per_epoch``; the epoch's last step may hold fewer
        than N micro-batches (the loader's remainder)."""
        n = self.accumulate
        first = skip * n
        rng = capture_rng_state() if first else None
        group: List[Any] = []
        for j, batch in enumerate(self.train_loader):
            if j < first:
                if j + 1 == first:
                    restore_rng_state(rng)
                continue
            if j % n == 0 and (j // n >= self.iters_per_epoch or stop()):
                return
            group.append(batch)
            if len(group) == n:
                yield j // n, group
                group = []
        if group:  # the loader ended inside a step
            yield j // n, group

    def _micro_forward(self, model: nn.Module, batch: Any, epoch: int, i: int) -> Tuple[Dict[str, float], Any]:
        """One micro-batch's forward: ``({name: value, ..., "loss": total}, total loss tensor)``; a non-finite
        loss on any rank stops training on every rank (before its backward)."""
        with autocast_context(self.amp_dtype, self.device):
            losses = self.task.train_step(model, batch, self.device)
        if not losses:
            raise ValueError(f"{type(self.task).__name__}.train_step returned no loss terms")
        names = list(losses)
        total = sum(losses.values())
        values = torch.stack([v.detach().float().reshape(()) for v in losses.values()]
                             + [total.detach().float().reshape(())]).tolist()
        bad = not all(math.isfinite(v) for v in values)
        if self.world_size > 1:
            bad = all_reduce_max(1.0 if bad else 0.0) > 0
        if bad:
            self._nonfinite(epoch, i, names, values)
        return dict(zip(names + ["loss"], values)), total

    def _train_step(self, model: nn.Module, batches: List[Any], epoch: int, i: int
                    ) -> Tuple[List[str], List[float], float, Optional[float]]:
        """One optimizer step over the micro-batches ``batches`` (each loss scaled by ``1 / len(batches)``).
        Returns ``(names, values, lr, grad_norm)``: the loss names, their values averaged over the micro-batches
        plus the total (floats)."""
        n = len(batches)
        self.optimizer.zero_grad(set_to_none=True)
        sums: Dict[str, float] = {}
        for k, batch in enumerate(batches):
            last = k == n - 1
            # DDP all-reduces gradients in the backward of the last micro-batch only
            sync = contextlib.nullcontext() if last or not hasattr(model, "no_sync") else model.no_sync()
            with sync:
                values, total = self._micro_forward(model, batch, epoch, i)
                self.scaler.scale(total / n if n > 1 else total).backward()
            for name, v in values.items():
                sums[name] = sums.get(name, 0.0) + v
        grad_norm = None
        if self.cfg.optimizer.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            grad_norm = clip_gradients(self.model.parameters(), self.cfg.optimizer.grad_clip)
        lr = self.optimizer.param_groups[0]["lr"]
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        sync_router_keys(self.model)
        names = [k for k in sums if k != "loss"]
        return names, [sums[k] / n for k in names + ["loss"]], lr, grad_norm
