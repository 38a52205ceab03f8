"""The trainer's persistent state: claiming the work dir, resume checks, ``state_dict`` / ``load_state``, the
end of an epoch (validation when due, the best ``eval.metric``) and checkpoint saving (``best.pth``, weights only
unless ``runtime.best_weights_only=False``, before ``latest.pth``, then ``epoch_N.pth`` and the removal of the oldest
beyond ``runtime.max_keep_ckpts``; never a non-finite model), the non-finite-loss stop and the iterations a
mid-epoch resume skips.

:class:`TrainerState` is a mixin of :class:`pce.engine.trainer.Trainer`; it reads the attributes the trainer
sets up (``cfg``, ``model``, ``ema``, ``optimizer``, ``scheduler``, ``scaler``, ``phase_ctl``, ``checkpoints``,
``lock``, ``work_dir``, ``rank``, ``world_size``, ``is_main``, ``epoch``, ``epoch_iter``, ``iteration``, ``best``).
"""
from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

import torch

from pce.engine.checkpoint import (TRAINING_STATE_KEYS, capture_rng_state, checkpoint_is_finite, is_training_state,
                                   load_checkpoint, nonfinite_tensors, remove_stale_temps, restore_rng_state)
from pce.engine.config import config_to_dict, dump_config, format_config, to_plain
from pce.engine.distributed import all_gather_object, all_reduce_max
from pce.engine.ema import build_ema
from pce.engine.errors import NonFiniteStateError, PCEError, WorkDirError
from pce.engine.logging import scalar_metrics
from pce.engine.runtime import NonFiniteLossError, format_metrics
from pce.engine.weights import lean_checkpoint, mismatch_summary, saved_structure
from pce.engine.workdir import set_aside_records
from pce.moe.recorder import unwrap_model
from pce.moe.surgery import structure

__all__ = ["TrainerState"]

logger = logging.getLogger("pce")


def _flatten(d: Any, prefix: str = "") -> Dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    if isinstance(d, dict):
        out: Dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


class TrainerState:
    """Work-dir claiming, resume checks and checkpoint state of the :class:`~pce.engine.trainer.Trainer`."""

    #: the ``epoch_N.pth`` this run wrote and kept, oldest first (recorded in its checkpoints, restored on resume);
    #: only these are ever deleted (``runtime.max_keep_ckpts``). Replaced, never mutated.
    epoch_ckpts: Tuple[str, ...] = ()

    def _claim_work_dir(self, resume_path: Optional[Path], force: bool) -> None:
        """Rank 0: lock the work dir, refuse to overwrite a previous run's checkpoints, compare a resumed run's
        config with the saved one (a fresh run sets an earlier attempt's records aside: ``previous/<k>/``), and
        remove the temp files of interrupted saves."""
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
        elif (moved := set_aside_records(self.work_dir)) is not None:  # a fresh record, the old one kept
            logger.warning("a fresh run: the records of an earlier attempt in %s moved to %s", self.work_dir, moved)
        for f in remove_stale_temps(self.work_dir):
            logger.info("removed %s (a temp file of an interrupted save)", f)
        rt = self.cfg.runtime
        if rt.max_keep_ckpts > 0 and not rt.save_epoch_ckpts:
            logger.warning("runtime.max_keep_ckpts=%d has no effect without runtime.save_epoch_ckpts=True (it limits "
                           "the epoch_N.pth files; best.pth and latest.pth are always kept)", rt.max_keep_ckpts)

    def _check_resume_config(self, resume_path: Path) -> None:
        """The model config must be the saved run's. The saved config is read from ``config.json`` (plain data,
        in the work dir or beside the checkpoint); a work dir's ``config.py`` is never executed: a work dir is
        data (someone may have sent it), and only the config given on the command line runs. An old work dir
        with ``config.py`` only: a warning, and the weights check of :meth:`load_state` still applies."""
        from pce.engine.config import load_saved_config

        dirs = list(dict.fromkeys([self.work_dir, Path(resume_path).parent]))
        saved = next((d / "config.json" for d in dirs if (d / "config.json").is_file()), None)
        if saved is None:
            legacy = next((d / "config.py" for d in dirs if (d / "config.py").is_file()), None)
            if legacy is not None:
                logger.warning("the saved config could not be read safely: %s is Python and is not executed (the run "
                               "predates config.json); resuming with the config given on the command line, the "
                               "checkpoint's weights must fit its model", legacy)
            return
        try:
            old = to_plain(config_to_dict(load_saved_config(saved)))
        except Exception as e:  # noqa: BLE001 - a damaged config.json: the weights check still applies
            logger.warning("could not compare with %s: %s", saved, e)
            return
        new = to_plain(config_to_dict(self.cfg))

        a, b = _flatten(old), _flatten(new)
        diff = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k) and k != "runtime.work_dir"]
        model = [k for k in diff if k.startswith("model.") and k != "model.pretrained"]
        if model:
            k = model[0]
            raise PCEError(saved, f"--resume with a different model config: {k} is {a.get(k)!r} in the saved run, "
                           f"{b.get(k)!r} now" + (f" (and {len(model) - 1} more model key(s))" if len(model) > 1
                                                  else ""), "the saved run's model config; config.py and "
                           "config.json are kept")
        if diff:
            logger.warning("resuming with config changes against %s: %s", saved,
                           ", ".join(f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in diff[:8]))

    def _save_config(self) -> None:
        """Rank 0: the merged config into the work dir, as ``config.json`` (plain data, what ``--resume`` and
        ``tools/report.py`` read) and ``config.py`` (to read, or to run again with ``tools/train.py``)."""
        dump_config(self.cfg, self.work_dir / "config.json")
        dump_config(self.cfg, self.work_dir / "config.py")

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
            "expert_structure": structure(unwrap_model(self.model)),  # pruned / duplicated experts, replayed on load
            "epoch_ckpts": list(self.epoch_ckpts),
            "config": format_config(self.cfg),
            "meta": {"torch": str(torch.__version__), "world_size": self.world_size, "time": time.time()},
        }

    def load_state(self, path: Union[str, os.PathLike], ckpt: Optional[Dict[str, Any]] = None) -> None:
        """Restore the state of the checkpoint ``path`` (``ckpt``: its contents, already read). The model must
        have the checkpoint's expert structure (replayed by the trainer before the optimizer is built)."""
        ckpt = load_checkpoint(path, map_location="cpu") if ckpt is None else ckpt
        if not is_training_state(ckpt):
            raise PCEError(path, f"--resume: holds weights only, not a training state (no "
                           f"{', '.join(k for k in TRAINING_STATE_KEYS if k not in ckpt) or 'optimizer state'})",
                           f"latest.pth or an epoch_N.pth of the run; to start a new run from these weights: "
                           f"--cfg-options model.pretrained={path}")
        saved, current = saved_structure(ckpt), structure(unwrap_model(self.model))
        if saved != current:
            raise PCEError(path, f"--resume: its expert structure {saved or '(none)'} differs from the model's "
                           f"{current or '(none)'}", "a checkpoint of this run")
        try:
            unwrap_model(self.model).load_state_dict(ckpt["model"])
        except RuntimeError as e:
            raise PCEError(path, f"--resume: the saved weights do not fit the model of the config "
                           f"({mismatch_summary(self.model, ckpt['model'])})", "the saved run's model config") from e
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
        self.epoch_ckpts = tuple(str(n) for n in ckpt.get("epoch_ckpts") or ())
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

    def _write_resume_record(self) -> None:
        """A resumed run's ``resume`` record in metrics.jsonl, where it goes on: tools/summarize_runs.py leaves the
        pause before it out of the run's minutes."""
        if self.resume_path is not None and self.writer is not None:
            self.writer.write({"type": "resume", "epoch": self.epoch, "iter": self.iteration,
                               "checkpoint": str(self.resume_path)})

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
        if self.is_main:
            self._write_checkpoints(state, save_latest, save_best)

    def _write_checkpoints(self, state: Dict[str, Any], save_latest: bool, save_best: bool) -> None:
        """Rank 0: ``best.pth`` first (a crash before ``latest.pth`` is written loses no best weights; weights only
        unless ``runtime.best_weights_only=False``), then ``latest.pth``, then ``epoch_N.pth`` (a copy of it, whole
        epochs only) and, once that is written, the removal of the oldest beyond ``runtime.max_keep_ckpts``."""
        rt, ckpts = self.cfg.runtime, self.checkpoints
        epoch_file = f"epoch_{self.epoch}.pth" if save_latest and rt.save_epoch_ckpts and not self.epoch_iter else None
        state["epoch_ckpts"] = list(dict.fromkeys(list(self.epoch_ckpts) + ([epoch_file] if epoch_file else [])))
        if save_best:
            ckpts.save(lean_checkpoint(state) if rt.best_weights_only else state, "best.pth")
        if save_latest and save_best and not rt.best_weights_only:
            ckpts.copy(ckpts.best, "latest.pth")  # the same full state
        elif save_latest:
            ckpts.save(state, "latest.pth")
        if epoch_file:
            ckpts.copy(ckpts.latest, epoch_file)
            self.epoch_ckpts = tuple(ckpts.remove_old_epochs(state["epoch_ckpts"], rt.max_keep_ckpts))

    # ------------------------------------------------------------------------------- best / save
    def _is_better(self, value: float) -> bool:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return False
        cur = self.best.get("value")
        if cur is None:
            return True
        return value > cur if self.cfg.eval.mode == "max" else value < cur

    def _end_epoch(self, stats: Dict[str, float]) -> None:
        """Validate when due, track the best ``eval.metric``, save ``best.pth`` / ``latest.pth`` as configured."""
        cfg = self.cfg
        last = self.epoch == self.total_epochs or self._max_iters_reached()
        results: Dict[str, Any] = {}
        interval = cfg.runtime.eval_interval
        if "val" in self.datasets and ((interval and self.epoch % interval == 0) or last):
            results = self.evaluate("val")
            self.last_val = results
            if self.writer is not None:
                self.writer.write({"type": "val", "epoch": self.epoch, "iter": self.iteration,
                                   **scalar_metrics(results)}, step=self.iteration)
            logger.info("epoch %d val: %s", self.epoch, format_metrics(results))
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

    def _resume_skip(self, epoch: int) -> int:
        """Iterations of ``epoch`` done before a resume inside it (their batches are loaded, not trained)."""
        skip = self.epoch_iter if epoch == self.epoch else 0
        if skip:
            logger.info("epoch %d: skipping the %d iteration(s) done before the resume", epoch + 1, skip)
        self.epoch_iter = skip
        return skip
