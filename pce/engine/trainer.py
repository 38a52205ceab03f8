"""One training loop for every task, driven by a task adapter (the contract: :class:`pce.engine.task.Task`;
``pce.tasks.get_task(name)`` returns one, tools pass it to :class:`Trainer`; the engine never imports
``pce.tasks`` or ``pce.datasets``).

The loop: phases (:mod:`pce.engine.phases`: router override, key trainability, attention, lr multiplier,
K-Means init before the first learned-router phase), per-iteration lr schedule, AMP (bf16 / fp16 on CUDA, bf16
on the CPU), gradient accumulation (:mod:`pce.engine.trainer_step`: an iteration is one optimizer step of
``optimizer.accumulate_steps`` micro-batches), gradient clipping, weights EMA, DDP (optionally with
SyncBatchNorm, the lr scaled by the total batch: ``docs/DISTRIBUTED.md``), NaN/inf guard, logging
(:mod:`pce.engine.logging`), evaluation every ``runtime.eval_interval`` epochs with ``best.pth`` by
``eval.metric``, ``latest.pth`` every ``runtime.checkpoint_interval`` epochs, exact resume from ``latest.pth``,
and hooks (:mod:`pce.engine.hooks`) for everything else, e.g. the routing statistics of ``pce.tasks.hooks``.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Union

import torch
from torch import nn

from pce.engine.checkpoint import CheckpointManager, check_finite, load_checkpoint
from pce.engine.distributed import (all_reduce_max, all_reduce_mean, broadcast_parameters, get_rank, get_world_size,
                                    max_rank_difference)
from pce.engine.evaluation import evaluate_model
from pce.engine.hooks import HookBase, as_hook
from pce.engine.logging import MetricWriter, ProgressBar, scalar_metrics, setup_logger
from pce.engine.runtime import resolve_amp_dtype, resolve_device, seed_everything, task_batch_size
from pce.engine.trainer_setup import TrainerSetup
from pce.engine.trainer_state import TrainerState
from pce.engine.trainer_step import TrainerStep
from pce.engine.workdir import WorkDirLock

__all__ = ["Trainer"]

Hook = Union[HookBase, Callable[[Any, str], None]]

logger = logging.getLogger("pce")


class Trainer(TrainerSetup, TrainerState, TrainerStep):
    """Train ``task``'s model as configured by ``cfg`` (a config from :func:`pce.engine.load_config`).

    Args:
        cfg: the merged config.
        task: a task adapter (:class:`pce.engine.task.Task`).
        resume: ``True`` / ``"auto"`` (``work_dir/latest.pth``) or a checkpoint path.
        hooks: :class:`~pce.engine.hooks.HookBase` instances or functions ``fn(trainer, event)``, run in order at
            the events of :mod:`pce.engine.hooks` (more with :meth:`register_hooks`).

    Call :meth:`train`; it returns ``{"best": {...}, "final": results of the test (or val) split}``. Use it
    under ``torchrun`` after :func:`pce.engine.distributed.init_distributed` for DDP.

    ``iteration``, ``epoch_iter``, ``iters_per_epoch``, ``schedule.max_iters`` / ``iters_per_epoch`` and the lr
    schedule count optimizer steps; with ``optimizer.accumulate_steps = N`` one step reads N loader batches, and
    hooks see the step's first micro-batch as ``trainer.batch``.
    """

    def __init__(self, cfg: Any, task: Any, resume: Union[bool, str, os.PathLike, None] = None,
                 hooks: Iterable[Hook] = (), force: bool = False) -> None:
        """``force``: start a fresh run in a work dir that holds checkpoints (they are replaced)."""
        self.lock = WorkDirLock(cfg.runtime.work_dir)  # held by rank 0 from here to the end of train()
        self.epoch_iter = 0     # iterations done in epoch `self.epoch` (a run stopped mid-epoch by max_iters)
        try:
            self._init(cfg, task, resume, hooks, force)
        except BaseException:
            self.lock.release()
            raise

    def _init(self, cfg: Any, task: Any, resume: Union[bool, str, os.PathLike, None],
              hooks: Iterable[Hook], force: bool) -> None:
        self.cfg = cfg
        self.task = task
        self.hooks: List[HookBase] = []
        self.register_hooks(hooks)
        self.batch: Any = None          # the batch of the step being run (for hooks)
        self.logging_step = False       # whether that step writes a `train` record
        self.rank, self.world_size = get_rank(), get_world_size()
        self.is_main = self.rank == 0
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0")) if self.world_size > 1 else 0
        self.device = resolve_device(cfg.runtime.device, self.local_rank)
        if cfg.runtime.num_threads > 0:
            torch.set_num_threads(cfg.runtime.num_threads)
        self.work_dir = Path(cfg.runtime.work_dir)
        setup_logger(None, self.rank)
        seed_everything(cfg.runtime.seed + self.rank, cfg.runtime.deterministic)
        self.amp_dtype = resolve_amp_dtype(cfg.runtime.amp, self.device)
        self.checkpoints = CheckpointManager(self.work_dir, enabled=self.is_main)
        resume_path = self.checkpoints.find_resume(resume)  # fail before anything is written
        if cfg.model.pretrained and not Path(cfg.model.pretrained).is_file():
            raise FileNotFoundError(f"model.pretrained: checkpoint not found: {cfg.model.pretrained}")

        self.resume_path = resume_path
        self._build_data(cfg, task, resume_path, force)
        resume_ckpt = load_checkpoint(resume_path, map_location="cpu") if resume_path is not None else None
        self._build_training(cfg, task, resume_ckpt)

        self.total_epochs = cfg.schedule.epochs
        self.epoch = 0          # completed epochs
        self.iteration = 0      # completed iterations
        self.best: Dict[str, Any] = {"metric": cfg.eval.metric, "value": None, "epoch": -1}
        self.loss_history: List[float] = []   # total loss of every iteration of this process (tests, debugging)
        self.last_val: Dict[str, Any] = {}
        self._last_eval: Optional[tuple] = None  # (Trainer._eval_key, results) of this process's last evaluation
        if resume_path is not None:
            self.load_state(resume_path, resume_ckpt)
            del resume_ckpt
            if self.is_main:
                self._save_config()
            saved_lr = self.scheduler.base_lrs[0] if self.scheduler.base_lrs else self.base_lr
            if abs(saved_lr - self.base_lr) > 1e-9 * max(abs(self.base_lr), 1e-12):
                logger.warning("the checkpoint's base lr %.6g is kept; this run's config gives %.6g (a different "
                               "optimizer.lr, or total batch with optimizer.auto_scale_lr)", saved_lr, self.base_lr)

    # ---------------------------------------------------------------------------------- properties
    @property
    def eval_model(self) -> nn.Module:
        return self.ema.module if self.ema is not None else self.model

    @property
    def train_model(self) -> nn.Module:
        return self.ddp_model if self.ddp_model is not None else self.model

    def _models(self) -> List[nn.Module]:
        """The trained model and its EMA copy: both get the phase settings."""
        return [self.model] + ([self.ema.module] if self.ema is not None else [])

    # -------------------------------------------------------------------------------------- hooks
    def register_hooks(self, hooks: Iterable[Hook]) -> None:
        """Append ``hooks`` (:class:`~pce.engine.hooks.HookBase` or ``fn(trainer, event)``); they run in order."""
        for hook in hooks:
            hook = as_hook(hook)
            hook.trainer = self
            self.hooks.append(hook)

    def register_hook(self, hook: Hook) -> None:
        self.register_hooks([hook])

    def _call_hooks(self, event: str) -> None:
        for hook in self.hooks:
            getattr(hook, event)()

    def _hook_metrics(self) -> Dict[str, Any]:
        """What the hooks add to the ``train`` record being written."""
        out: Dict[str, Any] = {}
        for hook in self.hooks:
            out.update(hook.log_metrics())
        return out

    # -------------------------------------------------------------------------------------- train
    def _max_iters_reached(self) -> bool:
        m = self.cfg.schedule.max_iters
        return bool(m) and self.iteration >= m

    def _log_train(self, epoch: int, i: int, names: List[str], means: Dict[str, float], lr: float, ips: float,
                   grad_norm: Optional[float]) -> None:
        """One ``train`` record (metrics.jsonl / TensorBoard, with what the hooks add) and its log line."""
        rec: Dict[str, Any] = {"type": "train", "epoch": epoch + 1, "iter": self.iteration, "lr": lr,
                               **means, "images_per_s": ips, "phase": self.phase_ctl.phase_at(epoch).name}
        if grad_norm is not None:
            rec["grad_norm"] = grad_norm
        rec.update(self._hook_metrics())
        if self.writer is not None:
            self.writer.write(rec, step=self.iteration)
        logger.info("epoch %d/%d iter %d/%d (step %d) loss %.4f %s lr %.4g %.0f img/s", epoch + 1,
                    self.total_epochs, i + 1, self.iters_per_epoch, self.iteration, means["loss"],
                    " ".join(f"{k} {means[k]:.4f}" for k in names), lr, ips)

    def train_one_epoch(self, epoch: int) -> Dict[str, float]:
        """Train one epoch (or what is left of it after a resume); returns ``{"loss": mean total loss}``."""
        model = self.train_model
        model.train()
        bar = ProgressBar(self.iters_per_epoch, f"epoch {epoch + 1}/{self.total_epochs}",
                          enabled=self.is_main and self.cfg.runtime.progress_bar)
        window: Dict[str, float] = {}
        count, images, t_window = 0, 0, time.perf_counter()
        epoch_sum, epoch_n = 0.0, 0
        skip = self._resume_skip(epoch)  # optimizer steps of this epoch done before a resume
        try:
            for i, batches in self._epoch_steps(skip, self._max_iters_reached):
                log_now = (self.iteration + 1) % self.cfg.runtime.log_interval == 0 or i + 1 == self.iters_per_epoch
                self.batch, self.logging_step = batches[0], log_now
                self._call_hooks("before_step")
                names, values, lr, grad_norm = self._train_step(model, batches, epoch, i)
                self.iteration += 1
                self.epoch_iter = i + 1
                self.loss_history.append(values[-1])
                images += sum(task_batch_size(self.task, b) for b in batches)
                count += 1
                epoch_sum += values[-1]
                epoch_n += 1
                for k, v in zip(names + ["loss"], values):
                    window[k] = window.get(k, 0.0) + v
                ips = images * self.world_size / max(time.perf_counter() - t_window, 1e-9)
                bar.update(window["loss"] / count, lr, ips)
                if log_now:
                    means = all_reduce_mean({k: v / count for k, v in window.items()})
                    self._log_train(epoch, i, names, means, lr, ips, grad_norm)
                    window, count, images, t_window = {}, 0, 0, time.perf_counter()
                self._call_hooks("after_step")
        finally:
            self.batch, self.logging_step = None, False
            bar.close()
        return {"loss": epoch_sum / max(epoch_n, 1)}

    def evaluate(self, split: str = "val", model: Optional[nn.Module] = None) -> Dict[str, Any]:
        """Evaluate ``split`` with the EMA model (when enabled) or the trained one; ``{}`` without that split."""
        ds = self.datasets.get(split)
        if ds is None:
            return {}
        model = model or self.eval_model
        if self.world_size > 1:
            # every rank evaluates a shard with rank 0's model: DDP keeps parameters equal, but each rank's last
            # forward updated its own BatchNorm statistics (and the EMA averages its own buffers)
            broadcast_parameters(list(model.buffers()))
        check_finite(model, f"the model after epoch {self.epoch}", f" before evaluating data.{split}")
        # progress=None: a bar on rank 0 with runtime.progress_bar when stderr is a terminal, as the epoch's bar
        results = evaluate_model(model, self.task, self.cfg, ds, self.device, self.amp_dtype, desc=f"eval {split}")
        self._last_eval = (self._eval_key(split, model), results)
        return results

    def _eval_key(self, split: str, model: nn.Module, phase: Optional[int] = None) -> tuple:
        """What an evaluation's results depend on in this process: the split, the model evaluated (EMA or not),
        the phase whose settings are applied (``phase``, default: the current one) and every parameter and buffer
        (identity and in-place version: an optimizer / EMA step, a load or a BatchNorm update changes it)."""
        tensors = list(model.parameters()) + list(model.buffers())
        return (split, id(model), self.phase_ctl.current if phase is None else phase,
                tuple((id(t), t._version) for t in tensors))

    def _final_evaluation(self) -> Dict[str, Any]:
        """The last phase's settings (also after resuming a finished run), then the test (or val) split; the
        last epoch's results of that split when they were computed in this process on the same weights in the
        same phase (no evaluation repeated), else a new evaluation."""
        index = self.phase_ctl.phase_index(self.epoch if self.epoch_iter else max(self.epoch - 1, 0))
        self.phase_ctl.apply(self.phase_ctl.phases[index], self._models())
        final_split = "test" if "test" in self.datasets else "val"
        final: Dict[str, Any] = {}
        last = self._last_eval
        if final_split in self.datasets:
            reuse = last is not None and last[0] == self._eval_key(final_split, self.eval_model, index)
            if self.world_size > 1:  # every rank takes the same path (an evaluation gathers over all ranks)
                reuse = all_reduce_max(0.0 if reuse else 1.0) == 0
            if reuse:
                logger.info("final %s: the results of epoch %d's evaluation (same weights, same phase)",
                            final_split, self.epoch)
                final = dict(last[1])
            else:
                logger.info("final %s: evaluating the weights of epoch %d", final_split, self.epoch)
                final = self.evaluate(final_split)
        if final:
            final.setdefault("split", final_split)
            if self.writer is not None:
                self.writer.write({"type": "test", "split": final_split, "epoch": self.epoch,
                                   "iter": self.iteration, **scalar_metrics(final)}, step=self.iteration)
        return final

    def train(self) -> Dict[str, Any]:
        """Run the remaining epochs; returns ``{"best": ..., "final": test/val results, "epochs": n}``."""
        cfg = self.cfg
        self.writer = MetricWriter(self.work_dir, enabled=self.is_main, tensorboard=cfg.runtime.tensorboard)
        self._write_resume_record()
        n_params = sum(p.numel() for p in self.model.parameters())
        logger.info("task %s | model %s (%.2fM params) | train %d, %s | %d iter/epoch x %d epochs | device %s x %d"
                    " | batch %d x %d process(es) x %d accumulate_steps = %d per step, base lr %.6g",
                    getattr(self.task, "name", type(self.task).__name__), cfg.model.backbone, n_params / 1e6,
                    len(self.datasets["train"]),
                    ", ".join(f"{k} {len(v)}" for k, v in self.datasets.items() if k != "train") or "no eval set",
                    self.iters_per_epoch, self.total_epochs, self.device, self.world_size, cfg.data.batch_size,
                    self.world_size, self.accumulate, cfg.data.batch_size * self.world_size * self.accumulate,
                    self.base_lr)
        try:
            self._call_hooks("before_train")
            for epoch in range(self.epoch, self.total_epochs):
                if self._max_iters_reached():
                    break
                self._begin_epoch(epoch)
                self._call_hooks("before_epoch")
                stats = self.train_one_epoch(epoch)
                if self.epoch_iter >= self.iters_per_epoch:  # a max_iters stop inside the epoch leaves it undone
                    self.epoch, self.epoch_iter = epoch + 1, 0
                self._end_epoch(stats)
                self._call_hooks("after_epoch")
            if self.world_size > 1:  # DDP keeps the parameters equal: say so (or warn)
                diff = max_rank_difference(list(self.model.parameters()))
                (logger.info if diff == 0 else logger.warning)(
                    "DDP check: parameters %s on the %d ranks (max difference %.3g)",
                    "identical" if diff == 0 else "DIFFER", self.world_size, diff)
            final = self._final_evaluation()
            return {"best": dict(self.best), "final": final, "epochs": self.epoch, "iterations": self.iteration}
        finally:
            try:
                self._call_hooks("after_train")  # also after an exception: hooks release what they hold
            finally:
                if self.writer is not None:
                    self.writer.close()
                    self.writer = None
                self.lock.release()
