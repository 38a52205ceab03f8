"""One training loop for every task, driven by a duck-typed task adapter.

Task adapter protocol (``pce.tasks.get_task(name)`` returns one; tools pass it to :class:`Trainer`; the engine
never imports ``pce.tasks`` or ``pce.datasets``)::

    class MyTask:
        name = "classification"
        collate_fn = None                                   # DataLoader collate_fn (None: default_collate)

        def build_model(self, cfg) -> nn.Module: ...
        def build_datasets(self, cfg, splits=("train", "val")) -> Dict[str, Dataset]:
            ...                                             # only the configured splits among `splits`
        def train_step(self, model, batch, device) -> Dict[str, Tensor]:
            ...                                             # loss terms; the total is their sum. `model` may be
                                                            # DDP-wrapped: call it (forward), not its methods
        def predict(self, model, batch, device) -> tuple:
            ...                                             # positional args of evaluator.update(...)
        def build_evaluator(self, cfg, dataset): ...        # update(*args) / compute() -> dict, and
                                                            # synchronize() or merge(other) + state_dict()
        # optional
        def batch_images(self, batch) -> Tensor: ...        # images of a batch (K-Means init); default batch[0]
        def batch_size(self, batch) -> int: ...             # default: len(batch[0])
        def set_epoch(self, epoch: int) -> None: ...        # called before each training epoch
        def dummy_inputs(self, cfg, batch_size=1) -> tuple: ...   # for FLOP counting

The loop: phases (:mod:`pce.engine.phases`: router override, key trainability, attention, lr multiplier,
K-Means init before the first learned-router phase), per-iteration lr schedule, AMP on CUDA, gradient
clipping, weights EMA, DDP, NaN/inf guard, logging (:mod:`pce.engine.logging`), evaluation every
``runtime.eval_interval`` epochs with ``best.pth`` by ``eval.metric``, ``latest.pth`` every
``runtime.checkpoint_interval`` epochs, and exact resume from ``latest.pth``.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, Subset

from pce.engine.checkpoint import (CheckpointManager, WorkDirLock, capture_rng_state, check_finite,
                                   checkpoint_is_finite, load_checkpoint, load_pretrained, nonfinite_tensors,
                                   remove_stale_temps, restore_rng_state, unwrap_model)
from pce.engine.errors import NonFiniteStateError, PCEError, WorkDirError
from pce.engine.config import dump_config, format_config
from pce.engine.distributed import (all_gather_object, all_reduce_max, all_reduce_mean, broadcast_parameters,
                                    get_rank, get_world_size, sync_router_keys)
from pce.engine.ema import build_ema
from pce.engine.logging import MetricWriter, ProgressBar, RoutingStatsCollector, scalar_metrics, setup_logger
from pce.engine.optim import build_lr_scheduler, build_optimizer, clip_gradients
from pce.engine.phases import PhaseController, build_phases
from pce.moe.routing import keyed_routers
from pce.engine.runtime import (NonFiniteLossError, _amp_dtype, _autocast, _batch_images, _batch_size,  # noqa: F401
                                _format_metrics, resolve_device, seed_everything, to_channels_last)
from pce.engine.evaluation import build_eval_loader, evaluate_checkpoint, evaluate_model  # noqa: F401

__all__ = ["Trainer", "NonFiniteLossError", "seed_everything", "resolve_device", "evaluate_model",
           "evaluate_checkpoint", "build_eval_loader", "to_channels_last"]

logger = logging.getLogger("pce")


class Trainer:
    """Train ``task``'s model as configured by ``cfg`` (a config from :func:`pce.engine.load_config`).

    Args:
        cfg: the merged config.
        task: a task adapter (see the module docstring).
        resume: ``True`` / ``"auto"`` (``work_dir/latest.pth``) or a checkpoint path.
        hooks: callables ``hook(trainer, event)`` with event ``"before_epoch"``, ``"after_step"``,
            ``"after_epoch"`` or ``"after_train"``.

    Call :meth:`train`; it returns ``{"best": {...}, "final": results of the test (or val) split}``. Use it
    under ``torchrun`` after :func:`pce.engine.distributed.init_distributed` for DDP.
    """

    def __init__(self, cfg: Any, task: Any, resume: Union[bool, str, os.PathLike, None] = None,
                 hooks: Sequence[Callable[["Trainer", str], None]] = (), force: bool = False) -> None:
        """``force``: start a fresh run in a work dir that holds checkpoints (they are replaced)."""
        self.lock = WorkDirLock(cfg.runtime.work_dir)  # held by rank 0 from here to the end of train()
        self.epoch_iter = 0     # iterations done in epoch `self.epoch` (a run stopped mid-epoch by max_iters)
        try:
            self._init(cfg, task, resume, hooks, force)
        except BaseException:
            self.lock.release()
            raise

    def _claim_work_dir(self, resume_path: Optional[Path], force: bool) -> None:
        """Rank 0: lock the work dir, refuse to overwrite a previous run's checkpoints, compare a resumed run's
        config with the saved one, and remove the temp files of interrupted saves."""
        self.lock.acquire()
        old = self.checkpoints.has_checkpoints()
        if resume_path is None and old and not force:
            raise WorkDirError(self.work_dir, f"holds the checkpoints of a previous run "
                               f"({', '.join(p.name for p in old)})", "--resume to continue it, --force to replace "
                               "them, or another --work-dir")
        if resume_path is None and old:
            logger.warning("--force: the checkpoints in %s (%s) will be replaced by this run", self.work_dir,
                           ", ".join(p.name for p in old))
        if resume_path is not None:
            self._check_resume_config(resume_path)
        for f in remove_stale_temps(self.work_dir):
            logger.info("removed %s (a temp file of an interrupted save)", f)

    def _check_resume_config(self, resume_path: Path) -> None:
        """The model config must be the saved run's (``config.py`` beside the checkpoint or in the work dir)."""
        from pce.engine.config import config_to_dict, load_config

        for saved in (self.work_dir / "config.py", Path(resume_path).parent / "config.py"):
            if saved.is_file():
                break
        else:
            return
        try:
            old = config_to_dict(load_config(saved))
        except Exception as e:  # noqa: BLE001 - a damaged config.py: the weights check still applies
            logger.warning("could not compare with %s: %s", saved, e)
            return
        new = config_to_dict(self.cfg)

        def flat(d: Any, prefix: str = "") -> Dict[str, Any]:
            if isinstance(d, dict):
                out: Dict[str, Any] = {}
                for k, v in d.items():
                    out.update(flat(v, f"{prefix}{k}."))
                return out
            return {prefix[:-1]: d}

        a, b = flat(old), flat(new)
        diff = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k) and k != "runtime.work_dir"]
        model = [k for k in diff if k.startswith("model.") and k != "model.pretrained"]
        if model:
            k = model[0]
            raise PCEError(saved, f"--resume with a different model config: {k} is {a.get(k)!r} in the saved run, "
                           f"{b.get(k)!r} now" + (f" (and {len(model) - 1} more model key(s))" if len(model) > 1
                                                  else ""), "the saved run's model config; config.py is kept")
        if diff:
            logger.warning("resuming with config changes against %s: %s", saved,
                           ", ".join(f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in diff[:8]))

    def _init(self, cfg: Any, task: Any, resume: Union[bool, str, os.PathLike, None],
              hooks: Sequence[Callable[["Trainer", str], None]], force: bool) -> None:
        self.cfg = cfg
        self.task = task
        self.hooks = list(hooks)
        self.rank, self.world_size = get_rank(), get_world_size()
        self.is_main = self.rank == 0
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0")) if self.world_size > 1 else 0
        self.device = resolve_device(cfg.runtime.device, self.local_rank)
        if cfg.runtime.num_threads > 0:
            torch.set_num_threads(cfg.runtime.num_threads)
        self.work_dir = Path(cfg.runtime.work_dir)
        setup_logger(None, self.rank)
        seed_everything(cfg.runtime.seed + self.rank, cfg.runtime.deterministic)
        self.amp_dtype = _amp_dtype(cfg.runtime.amp, self.device)
        self.checkpoints = CheckpointManager(self.work_dir, enabled=self.is_main)
        resume_path = self.checkpoints.find_resume(resume)  # fail before anything is written
        if cfg.model.pretrained and not Path(cfg.model.pretrained).is_file():
            raise FileNotFoundError(f"model.pretrained: checkpoint not found: {cfg.model.pretrained}")

        # data (first: a missing dataset fails before anything is written)
        self.datasets = task.build_datasets(cfg, splits=("train", "val", "test"))
        if "train" not in self.datasets:
            raise ValueError("the config defines no data.train dataset")
        if self.is_main:
            self._claim_work_dir(resume_path, force)  # after the data checks: a missing dataset writes nothing
            self.work_dir.mkdir(parents=True, exist_ok=True)
            if resume_path is None:  # a resumed run's config.py is replaced only once its checkpoint loaded
                dump_config(cfg, self.work_dir / "config.py")
            setup_logger(self.work_dir, self.rank)
        if cfg.runtime.amp != "none" and self.amp_dtype is None:
            logger.info("runtime.amp=%s needs CUDA: training in fp32 on %s", cfg.runtime.amp, self.device)
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
        self.iters_per_epoch = len(self.train_loader)
        if cfg.schedule.iters_per_epoch:
            self.iters_per_epoch = min(self.iters_per_epoch, cfg.schedule.iters_per_epoch)

        # model (same initial weights on every rank), optimisation
        torch.manual_seed(cfg.runtime.seed)
        self.model = task.build_model(cfg).to(self.device)
        torch.manual_seed(cfg.runtime.seed + self.rank)
        if cfg.runtime.channels_last:
            to_channels_last(self.model)
        if cfg.model.pretrained:
            load_pretrained(self.model, cfg.model.pretrained)  # reports missing / unexpected, fails on no match
        self.optimizer = build_optimizer(cfg.optimizer, self.model)
        self.phases = build_phases(cfg.phases, cfg.schedule.epochs)
        self.phase_ctl = PhaseController(self.phases, cfg.runtime.kmeans_init_batches, seed=cfg.runtime.seed)
        self.scheduler = build_lr_scheduler(self.optimizer, cfg.schedule, self.phase_ctl.phase_epochs,
                                            self.phase_ctl.lr_multipliers, self.iters_per_epoch)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.ema = build_ema(self.model, cfg.runtime.ema) if cfg.runtime.ema > 0 else None
        self.ddp_model: Optional[DDP] = None
        self.routing = RoutingStatsCollector(self.model)
        self.writer: Optional[MetricWriter] = None

        self.total_epochs = cfg.schedule.epochs
        self.epoch = 0          # completed epochs
        self.iteration = 0      # completed iterations
        self.best: Dict[str, Any] = {"metric": cfg.eval.metric, "value": None, "epoch": -1}
        self.loss_history: List[float] = []   # total loss of every iteration of this process (tests, debugging)
        self.last_val: Dict[str, Any] = {}
        if resume_path is not None:
            self.load_state(resume_path)
            if self.is_main:
                dump_config(cfg, self.work_dir / "config.py")

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

    def register_hook(self, hook: Callable[["Trainer", str], None]) -> None:
        self.hooks.append(hook)

    def _call_hooks(self, event: str) -> None:
        for h in self.hooks:
            h(self, event)

    # -------------------------------------------------------------------------------------- state
    def state_dict(self) -> Dict[str, Any]:
        """Everything :meth:`load_state` needs (tensors and primitive containers only)."""
        rng = all_gather_object(capture_rng_state())
        return {
            "model": unwrap_model(self.model).state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "phase": self.phase_ctl.state_dict(),
            "epoch": self.epoch,
            "epoch_iter": self.epoch_iter,
            "iteration": self.iteration,
            "rng": rng,
            "best": dict(self.best),
            "config": format_config(self.cfg),
            "meta": {"torch": str(torch.__version__), "world_size": self.world_size, "time": time.time()},
        }

    def load_state(self, path: Union[str, os.PathLike]) -> None:
        ckpt = load_checkpoint(path, map_location="cpu")
        try:
            unwrap_model(self.model).load_state_dict(ckpt["model"])
        except RuntimeError as e:
            from pce.engine.checkpoint import _mismatch_summary

            raise PCEError(path, f"--resume: the saved weights do not fit the model of the config "
                           f"({_mismatch_summary(self.model, ckpt['model'])})", "the saved run's model config") from e
        if self.ema is not None:
            if ckpt.get("ema"):
                self.ema.load_state_dict(ckpt["ema"])
            else:
                logger.warning("%s has no EMA weights: the EMA restarts from the current weights", path)
                self.ema = build_ema(self.model, self.cfg.runtime.ema)
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.phase_ctl.load_state_dict(ckpt.get("phase", {}))
        self.epoch = int(ckpt["epoch"])
        self.epoch_iter = int(ckpt.get("epoch_iter", 0) or 0)
        self.iteration = int(ckpt["iteration"])
        self.best = dict(ckpt.get("best") or self.best)
        problem = self.checkpoints.verify_best(self.best)
        if problem:
            kept = load_checkpoint(self.checkpoints.best) if self.checkpoints.best.is_file() else None
            if kept is not None and kept.get("best") and checkpoint_is_finite(self.checkpoints.best):
                self.best = dict(kept["best"])
                logger.warning("%s: the best is the one best.pth holds (%s %s, epoch %s)", problem,
                               self.best.get("metric"), self.best.get("value"), self.best.get("epoch"))
            else:
                self.best = {"metric": self.cfg.eval.metric, "value": None, "epoch": -1}
                logger.warning("%s: the best metric restarts at the next evaluation", problem)
        rng = ckpt.get("rng") or []
        if rng:
            if self.rank >= len(rng):
                logger.warning("checkpoint has RNG states of %d ranks; rank %d reuses rank 0's", len(rng), self.rank)
            restore_rng_state(rng[self.rank] if self.rank < len(rng) else rng[0])
        logger.info("resumed from %s: %d epoch(s), %d iteration(s) done", path, self.epoch, self.iteration)

    def save_checkpoint(self, save_latest: bool = True, save_best: bool = False) -> None:
        state = self.state_dict()  # collective (RNG of every rank): all ranks call it
        bad = nonfinite_tensors({"model": state["model"], "ema": state["ema"]})
        if self.world_size > 1:
            any_bad = all_reduce_max(1.0 if bad else 0.0) > 0  # every rank takes part
            bad = bad or (["(another rank's tensors)"] if any_bad else [])
        if bad:
            latest = self.checkpoints.latest
            kept = (f"; the last good checkpoint {latest} (epoch {load_checkpoint(latest).get('epoch')}) is kept"
                    if latest.is_file() and checkpoint_is_finite(latest) else "; no good checkpoint was written")
            msg = (f"not saved after epoch {self.epoch}: {len(bad)} non-finite parameter(s) / buffer(s): "
                   f"{', '.join(bad[:5])}{kept}")
            logger.error("%s", msg)
            raise NonFiniteStateError(self.work_dir, msg, "every parameter and buffer finite: lower optimizer.lr, "
                                      "set optimizer.grad_clip, or check the data")
        if not self.is_main:
            return
        if save_best:  # best.pth first: a crash before latest.pth is written loses no best weights
            self.checkpoints.save(state, "best.pth")
            if save_latest:
                self.checkpoints.copy(self.checkpoints.best, "latest.pth")
        elif save_latest:
            self.checkpoints.save(state, "latest.pth")

    # --------------------------------------------------------------------------------------- data
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
        batches = [_batch_images(self.task, b) for b in loader]
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

    # -------------------------------------------------------------------------------------- train
    def _nonfinite(self, epoch: int, i: int, names: List[str], values: List[float]) -> None:
        terms = ", ".join(f"{n}={v:.6g}" for n, v in zip(names + ["total"], values))
        latest = self.checkpoints.latest
        kept = (f"the last good checkpoint {latest} (epoch {load_checkpoint(latest).get('epoch')}) is kept"
                if latest.is_file() and checkpoint_is_finite(latest) else "no good checkpoint was written yet")
        msg = (f"non-finite loss at epoch {epoch + 1}, iteration {i + 1}/{self.iters_per_epoch} (global step "
               f"{self.iteration + 1}): {terms}. Training stopped; {kept}. Lower optimizer.lr, set "
               f"optimizer.grad_clip, or check the data.")
        logger.error(msg)
        raise NonFiniteLossError(msg)

    def _max_iters_reached(self) -> bool:
        m = self.cfg.schedule.max_iters
        return bool(m) and self.iteration >= m

    def train_one_epoch(self, epoch: int) -> Dict[str, float]:
        cfg = self.cfg
        model = self.train_model
        model.train()
        bar = ProgressBar(self.iters_per_epoch, f"epoch {epoch + 1}/{self.total_epochs}",
                          enabled=self.is_main and cfg.runtime.progress_bar)
        window: Dict[str, float] = {}
        count, images, t_window = 0, 0, time.perf_counter()
        epoch_sum, epoch_n = 0.0, 0
        phase = self.phase_ctl.phase_at(epoch)
        skip = self.epoch_iter if epoch == self.epoch else 0  # resumed inside this epoch: its first iterations ran
        if skip:
            logger.info("epoch %d: skipping the %d iteration(s) done before the resume", epoch + 1, skip)
            rng = capture_rng_state()  # loading the skipped batches must not move the RNG of the run
        self.epoch_iter = skip
        try:
            for i, batch in enumerate(self.train_loader):
                if i < skip:
                    if i + 1 == skip:
                        restore_rng_state(rng)
                    continue
                if i >= self.iters_per_epoch or self._max_iters_reached():
                    break
                log_now = (self.iteration + 1) % cfg.runtime.log_interval == 0 or i + 1 == self.iters_per_epoch
                self.routing.active = log_now and self.is_main
                if log_now and self.is_main:
                    self.routing.set_batch(self.task, batch)  # its labels give the class NMI
                with _autocast(self.amp_dtype):
                    losses = self.task.train_step(model, batch, self.device)
                self.routing.active = False
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
                self.optimizer.zero_grad(set_to_none=True)
                self.scaler.scale(total).backward()
                grad_norm = None
                if cfg.optimizer.grad_clip > 0:
                    self.scaler.unscale_(self.optimizer)
                    grad_norm = clip_gradients(self.model.parameters(), cfg.optimizer.grad_clip)
                lr = self.optimizer.param_groups[0]["lr"]
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.scheduler.step()
                if self.ema is not None:
                    self.ema.update_parameters(self.model)
                sync_router_keys(self.model)
                self.iteration += 1
                self.epoch_iter = i + 1
                self.loss_history.append(values[-1])
                n = _batch_size(self.task, batch)
                images += n
                count += 1
                epoch_sum += values[-1]
                epoch_n += 1
                for k, v in zip(names + ["loss"], values):
                    window[k] = window.get(k, 0.0) + v
                now = time.perf_counter()
                ips = images * self.world_size / max(now - t_window, 1e-9)
                bar.update(window["loss"] / count, lr, ips)
                if log_now:
                    means = all_reduce_mean({k: v / count for k, v in window.items()})
                    rec: Dict[str, Any] = {"type": "train", "epoch": epoch + 1, "iter": self.iteration, "lr": lr,
                                           **means, "images_per_s": ips, "phase": phase.name}
                    if grad_norm is not None:
                        rec["grad_norm"] = grad_norm
                    routing = self.routing.pop()
                    if routing:
                        rec["routing"] = routing
                    if self.writer is not None:
                        self.writer.write(rec, step=self.iteration)
                    logger.info("epoch %d/%d iter %d/%d (step %d) loss %.4f %s lr %.4g %.0f img/s", epoch + 1,
                                self.total_epochs, i + 1, self.iters_per_epoch, self.iteration, means["loss"],
                                " ".join(f"{k} {means[k]:.4f}" for k in names), lr, ips)
                    window, count, images, t_window = {}, 0, 0, time.perf_counter()
                self._call_hooks("after_step")
        finally:
            self.routing.active = False
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
        return evaluate_model(model, self.task, self.cfg, ds, self.device, self.amp_dtype)

    def _is_better(self, value: float) -> bool:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return False
        cur = self.best.get("value")
        if cur is None:
            return True
        return value > cur if self.cfg.eval.mode == "max" else value < cur

    def train(self) -> Dict[str, Any]:
        """Run the remaining epochs; returns ``{"best": ..., "final": test/val results, "epochs": n}``."""
        cfg = self.cfg
        self.writer = MetricWriter(self.work_dir, enabled=self.is_main, tensorboard=cfg.runtime.tensorboard)
        n_params = sum(p.numel() for p in self.model.parameters())
        logger.info("task %s | model %s (%.2fM params) | train %d, %s | %d iter/epoch x %d epochs | device %s x %d",
                    getattr(self.task, "name", type(self.task).__name__), cfg.model.backbone, n_params / 1e6,
                    len(self.datasets["train"]),
                    ", ".join(f"{k} {len(v)}" for k, v in self.datasets.items() if k != "train") or "no eval set",
                    self.iters_per_epoch, self.total_epochs, self.device, self.world_size)
        try:
            for epoch in range(self.epoch, self.total_epochs):
                if self._max_iters_reached():
                    break
                self._begin_epoch(epoch)
                self._call_hooks("before_epoch")
                stats = self.train_one_epoch(epoch)
                if self.epoch_iter >= self.iters_per_epoch:  # a max_iters stop inside the epoch leaves it undone
                    self.epoch, self.epoch_iter = epoch + 1, 0
                last = self.epoch == self.total_epochs or self._max_iters_reached()
                results: Dict[str, Any] = {}
                interval = cfg.runtime.eval_interval
                if "val" in self.datasets and ((interval and self.epoch % interval == 0) or last):
                    results = self.evaluate("val")
                    self.last_val = results
                    if self.writer is not None:
                        self.writer.write({"type": "val", "epoch": self.epoch, "iter": self.iteration,
                                           **scalar_metrics(results)}, step=self.iteration)
                    logger.info("epoch %d val: %s", self.epoch, _format_metrics(results))
                better = False
                if results:
                    if cfg.eval.metric not in results:
                        raise KeyError(f"eval.metric={cfg.eval.metric!r} is not among the evaluator's results: "
                                       f"{sorted(scalar_metrics(results))}")
                    value = float(results[cfg.eval.metric])
                    better = self._is_better(value)
                    if better:
                        self.best = {"metric": cfg.eval.metric, "value": value, "epoch": self.epoch}
                ci = cfg.runtime.checkpoint_interval
                save_latest = last or (ci > 0 and self.epoch % ci == 0)
                if save_latest or better:
                    self.save_checkpoint(save_latest=save_latest, save_best=better)
                logger.info("epoch %d/%d done: train loss %.4f%s", self.epoch, self.total_epochs, stats["loss"],
                            f", best {cfg.eval.metric} {self.best['value']:.4f} (epoch {self.best['epoch']})"
                            if self.best.get("value") is not None else "")
                self._call_hooks("after_epoch")
            # the settings of the last phase (also after resuming a finished run)
            self.phase_ctl.apply(self.phase_ctl.phase_at(self.epoch if self.epoch_iter else max(self.epoch - 1, 0)),
                                 self._models())
            final_split = "test" if "test" in self.datasets else "val"
            final = self.evaluate(final_split) if final_split in self.datasets else {}
            if final:
                final.setdefault("split", final_split)
                if self.writer is not None:
                    self.writer.write({"type": "test", "split": final_split, "epoch": self.epoch,
                                       "iter": self.iteration, **scalar_metrics(final)}, step=self.iteration)
            self._call_hooks("after_train")
            return {"best": dict(self.best), "final": final, "epochs": self.epoch, "iterations": self.iteration}
        finally:
            if self.writer is not None:
                self.writer.close()
                self.writer = None
            self.lock.release()
