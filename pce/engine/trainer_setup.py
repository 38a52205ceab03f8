"""How the :class:`~pce.engine.trainer.Trainer` is set up and how each epoch starts: datasets, loader, work
dir, gradient-accumulation steps, model (SyncBatchNorm under DDP on CUDA with ``runtime.sync_bn``), optimizer
(lr scaled by the total batch with ``optimizer.auto_scale_lr``), phases, schedule, EMA (:class:`TrainerSetup`, a
mixin), then per epoch the sampler and augmentation seeds, the phase switch (K-Means key initialisation with a
fixed data subset, router override, upcycling), the DDP key broadcast and the DDP re-wrap when trainable
parameters changed.
"""
from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path
from typing import Any, List, Optional

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, Subset

from pce.engine.distributed import broadcast_parameters, convert_sync_batchnorm
from pce.engine.ema import build_ema
from pce.engine.logging import MetricWriter, setup_logger
from pce.engine.optim import accumulate_steps, build_lr_scheduler, build_optimizer, scaled_lr
from pce.engine.phase import build_phases
from pce.engine.phases import PhaseController
from pce.engine.runtime import task_batch_images, to_channels_last
from pce.engine.weights import load_pretrained, pretrained_before_conversion, replay_structure
from pce.moe.routing import keyed_routers

__all__ = ["TrainerSetup"]

logger = logging.getLogger("pce")


class TrainerSetup:
    """Construction steps and the start of every epoch for :class:`~pce.engine.trainer.Trainer`."""

    def _build_data(self, cfg: Any, task: Any, resume_path: Optional[Path], force: bool) -> None:
        """Datasets and the training loader (first: a missing dataset fails before anything is written), then
        the work dir (rank 0)."""
        splits = ("train", "val", "test") if cfg.runtime.final_test else ("train", "val")
        self.datasets = task.build_datasets(cfg, splits=splits)
        self.accumulate = accumulate_steps(cfg.optimizer)  # config errors before anything is written
        self.base_lr = scaled_lr(cfg.optimizer, cfg.data.batch_size, self.world_size)
        if "train" not in self.datasets:
            raise ValueError("the config defines no data.train dataset")
        if self.is_main:
            self._claim_work_dir(resume_path, force)  # after the data checks: a missing dataset writes nothing
            self.work_dir.mkdir(parents=True, exist_ok=True)
            if resume_path is None:  # a resumed run's config is replaced only once its checkpoint loaded
                self._save_config()
            setup_logger(self.work_dir, self.rank)
        self.train_sampler = DistributedSampler(self.datasets["train"], num_replicas=self.world_size, rank=self.rank,
                                                shuffle=True, seed=cfg.runtime.seed)
        self._loader_gen = torch.Generator()
        self.train_loader = DataLoader(
            self.datasets["train"], batch_size=cfg.data.batch_size, sampler=self.train_sampler,
            num_workers=cfg.data.num_workers, collate_fn=getattr(task, "collate_fn", None),
            pin_memory=cfg.data.pin_memory and self.device.type == "cuda", drop_last=cfg.data.drop_last,
            generator=self._loader_gen)
        if len(self.train_loader) == 0:
            raise ValueError(f"the training set ({len(self.datasets['train'])} samples on this rank's share) gives no "
                             f"batch of data.batch_size={cfg.data.batch_size} with drop_last={cfg.data.drop_last}")
        # iterations are optimizer steps of `accumulate` loader batches (the epoch's last may hold fewer)
        self.iters_per_epoch = math.ceil(len(self.train_loader) / self.accumulate)
        if cfg.schedule.iters_per_epoch:
            self.iters_per_epoch = min(self.iters_per_epoch, cfg.schedule.iters_per_epoch)

    def _build_training(self, cfg: Any, task: Any, resume_ckpt: Optional[dict] = None) -> None:
        """Model (same initial weights on every rank; the expert structure of a pruned / duplicated
        ``model.pretrained`` or resumed checkpoint replayed; a ``model.pretrained`` of the model before its
        ``model.convert`` / ``model.condconv`` entries loaded before they upcycle its convolutions), optimizer,
        phases, lr schedule, AMP scaler, EMA."""
        torch.manual_seed(cfg.runtime.seed)
        with pretrained_before_conversion(cfg.model.pretrained) as early:  # a dense twin's weights, upcycled
            self.model = task.build_model(cfg).to(self.device)
        torch.manual_seed(cfg.runtime.seed + self.rank)
        if cfg.runtime.channels_last:
            to_channels_last(self.model)
        self._sync_batchnorm()
        if cfg.model.pretrained and early.report is None:  # not already loaded before model.convert; reports
            load_pretrained(self.model, cfg.model.pretrained, ckpt=early.ckpt)  # missing / unexpected, fails on none
        if resume_ckpt is not None:  # before the optimizer and the EMA copy see the parameters
            replay_structure(self.model, resume_ckpt, self.resume_path)
        if (cfg.optimizer.get("auto_scale_lr") or {}).get("enable", False):
            logger.info("auto_scale_lr: lr %.6g = optimizer.lr %.6g x total batch %d (data.batch_size %d x %d "
                        "process(es) x %d accumulate_steps) / base_batch_size %d", self.base_lr, cfg.optimizer.lr,
                        cfg.data.batch_size * self.world_size * self.accumulate, cfg.data.batch_size,
                        self.world_size, self.accumulate, cfg.optimizer.auto_scale_lr.base_batch_size)
        self.optimizer = build_optimizer(cfg.optimizer, self.model, lr=self.base_lr)
        self.phases = build_phases(cfg.phases, cfg.schedule.epochs)
        self.phase_ctl = PhaseController(self.phases, cfg.runtime.kmeans_init_batches, seed=cfg.runtime.seed)
        self.scheduler = build_lr_scheduler(self.optimizer, cfg.schedule, self.phase_ctl.phase_epochs,
                                            self.phase_ctl.lr_multipliers, self.iters_per_epoch)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.ema = build_ema(self.model, cfg.runtime.ema) if cfg.runtime.ema > 0 else None
        self.ddp_model: Optional[DDP] = None
        self.writer: Optional[MetricWriter] = None

    def _sync_batchnorm(self) -> None:
        """``runtime.sync_bn``: plain BatchNorm layers become ``SyncBatchNorm`` under DDP on CUDA (torch's
        SyncBatchNorm raises on CPU tensors in training: on the CPU every rank keeps its own statistics)."""
        if not self.cfg.runtime.sync_bn:
            return
        if self.world_size == 1:
            logger.info("runtime.sync_bn: one process, plain BatchNorm kept")
        elif self.device.type != "cuda":
            logger.warning("runtime.sync_bn: SyncBatchNorm runs on CUDA only (torch); on %s each of the %d ranks "
                           "keeps its own BatchNorm statistics", self.device, self.world_size)
        else:
            n = convert_sync_batchnorm(self.model)
            logger.info("runtime.sync_bn: %d BatchNorm layer(s) -> SyncBatchNorm over %d ranks (the experts' own "
                        "stacked BatchNorm stays per rank)", n, self.world_size)

    def _thread_limit(self):
        """Limit the OpenMP / BLAS pools of scikit-learn's K-Means to runtime.num_threads."""
        n = self.cfg.runtime.num_threads
        if n > 0:
            try:
                from threadpoolctl import threadpool_limits
            except ImportError:  # pragma: no cover - a scikit-learn dependency
                return contextlib.nullcontext()
            return threadpool_limits(limits=n)
        return contextlib.nullcontext()

    def _kmeans_batches(self) -> List[torch.Tensor]:
        n = self.cfg.runtime.kmeans_init_batches
        ds = self.datasets["train"]
        bs = self.cfg.data.batch_size
        # a fixed random subset (datasets are often sorted by class)
        g = torch.Generator().manual_seed(self.cfg.runtime.seed)
        sub = Subset(ds, torch.randperm(len(ds), generator=g)[: n * bs].tolist())
        loader = DataLoader(sub, batch_size=bs, shuffle=False, num_workers=self.cfg.data.num_workers,
                            collate_fn=getattr(self.task, "collate_fn", None),
                            generator=torch.Generator().manual_seed(self.cfg.runtime.seed))
        batches = [task_batch_images(self.task, b) for b in loader]
        if self.cfg.runtime.channels_last:
            batches = [b.contiguous(memory_format=torch.channels_last) for b in batches]
        return batches

    def _wrap_ddp(self) -> None:
        if self.world_size == 1:
            return
        self.ddp_model = DDP(self.model, device_ids=[self.local_rank] if self.device.type == "cuda" else None,
                             find_unused_parameters=self.cfg.runtime.find_unused_parameters)

    def _begin_epoch(self, epoch: int) -> None:
        self.train_sampler.set_epoch(epoch)
        self._loader_gen.manual_seed(self.cfg.runtime.seed * 100003 + epoch * 1009 + self.rank)
        if hasattr(self.task, "set_epoch"):
            self.task.set_epoch(epoch)
        with self._thread_limit():
            info = self.phase_ctl.on_epoch_start(epoch, self._models(), self._kmeans_batches, self.optimizer)
        if info["kmeans_routers"] and hasattr(self.task, "set_epoch"):
            self.task.set_epoch(epoch)  # the epoch's augmentation stream starts fresh after the K-Means batches,
            #                             as in a run resumed inside this epoch (which skips K-Means)
        if info["kmeans_routers"] and self.world_size > 1:
            keys = [r.keys for mod in self._models() for r in keyed_routers(mod)]
            broadcast_parameters(keys)
        if info["started"] and self.writer is not None:
            ph = info["phase"]
            self.writer.write({"type": "phase", "epoch": epoch + 1, "iter": self.iteration, "phase": info["index"],
                               "name": ph.name, "router_override": ph.router_override,
                               "keys_trainable": ph.keys_trainable, "attention": ph.attention, "lr_mult": ph.lr_mult,
                               "upcycle": ph.upcycle, "upcycled_layers": info["upcycled_layers"],
                               "kmeans_routers": info["kmeans_routers"]}, step=self.iteration, prefix="phase")
        if self.world_size > 1 and (self.ddp_model is None or info["requires_grad_changed"]):
            self._wrap_ddp()
