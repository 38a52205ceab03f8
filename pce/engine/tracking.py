"""Experiment tracking with MLflow (optional dependency: ``pip install mlflow-skinny``), next to TensorBoard.

``runtime.mlflow.enable=True`` and :class:`MlflowHook` (``pce.tasks.hooks.default_hooks`` adds it) give one MLflow
run per training: on rank 0 only, every scalar :class:`pce.engine.logging.MetricWriter` writes to TensorBoard
(``train/loss``, ``val/top1``, ``routing/<layer>/usage/e<i>``, ...; same names, same steps), the flattened config
as params (``optimizer.lr``, ...), tags (task, config file, git commit, ``runtime.mlflow.tags``), the routing-map
pictures the writer is given (:meth:`~pce.engine.logging.MetricWriter.write_image`) and, at the end,
``config.json`` (and, with ``runtime.mlflow.log_checkpoint``, ``best.pth``). The default store is a local file
store, ``WORK_DIR/mlruns`` (``mlflow ui --backend-store-uri WORK_DIR/mlruns``); a resumed run continues its MLflow
run (``WORK_DIR/mlflow_run.json``).

MLflow is imported only when enabled. Missing while enabled: one line naming ``runtime.mlflow.enable``. A failed
MLflow write never stops training: the first is a warning, later ones are counted and reported at the end.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional

from pce.engine.checkpoint import _atomic_write
from pce.engine.errors import PCEError
from pce.engine.hooks import HookBase

__all__ = ["MlflowTracker", "MlflowHook", "require_mlflow", "flatten_config", "MLFLOW_HINT"]

logger = logging.getLogger("pce")

MLFLOW_HINT = "pip install mlflow-skinny, or pip install 'pce[mlflow]'; or runtime.mlflow.enable=False"
RUN_FILE = "mlflow_run.json"
_MAX_PARAM_LEN = 500      # the smallest limit of the MLflow versions (newer ones take 6000)
_PARAMS_PER_CALL = 100    # MLflow's log_batch limits
_METRICS_PER_CALL = 1000


def require_mlflow() -> Any:
    """The ``mlflow`` module, or a :class:`~pce.engine.errors.PCEError` naming ``runtime.mlflow.enable``."""
    try:
        import mlflow
        from mlflow.tracking import MlflowClient  # noqa: F401 - the part used
    except ImportError as e:
        raise PCEError("runtime.mlflow.enable", f"MLflow tracking is on but mlflow cannot be imported ({e})",
                       MLFLOW_HINT) from None
    return mlflow


def flatten_config(cfg: Mapping[str, Any], prefix: str = "") -> Dict[str, str]:
    """``{"optimizer.lr": "0.1", ...}``: every leaf of a nested config as a string (lists as their repr, long
    values cut to 500 characters: MLflow's param limit)."""
    out: Dict[str, str] = {}
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten_config(v, key + "."))
        else:
            out[key] = str(list(v) if isinstance(v, tuple) else v)[:_MAX_PARAM_LEN]
    return out


def git_commit(where: Path) -> Optional[str]:
    """The commit checked out at ``where`` (``None`` outside a git tree, without git, or after 5 s)."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def tracking_uri(cfg: Any, work_dir: Path) -> str:
    """``runtime.mlflow.tracking_uri``, or the file store ``WORK_DIR/mlruns`` (as a ``file://`` URI)."""
    return cfg.runtime.mlflow.tracking_uri or (Path(work_dir).resolve() / "mlruns").as_uri()


class MlflowTracker:
    """One MLflow run, written through ``MlflowClient`` (no global active run). A
    :class:`~pce.engine.logging.ScalarSink`: no method raises; a failed write is a warning the first time, counted
    after (:attr:`failures`)."""

    def __init__(self, client: Any, run_id: str, work_dir: Path) -> None:
        self.client, self.run_id, self.work_dir = client, run_id, Path(work_dir)
        self.failures = 0

    @classmethod
    def start(cls, cfg: Any, work_dir: Path, resume: bool = False, tags: Optional[Mapping[str, str]] = None
              ) -> "MlflowTracker":
        """Open the run of ``cfg`` (raises when the store cannot be reached): with ``resume``, the run recorded in
        ``WORK_DIR/mlflow_run.json`` when it is in the same store, else a new one (recorded there)."""
        require_mlflow()
        from mlflow.tracking import MlflowClient

        mcfg, uri = cfg.runtime.mlflow, tracking_uri(cfg, work_dir)
        if uri.startswith("file:") or "://" not in uri:
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3.x keeps the file store behind it
        client = MlflowClient(tracking_uri=uri)
        run_id = cls._previous_run(client, uri, Path(work_dir)) if resume else None
        if run_id is not None:
            client.update_run(run_id, status="RUNNING")
        else:
            name = mcfg.experiment or str(cfg.task)
            exp = client.get_experiment_by_name(name)
            exp_id = exp.experiment_id if exp is not None else client.create_experiment(name)
            run = client.create_run(exp_id, run_name=mcfg.run_name or Path(work_dir).resolve().name,
                                    tags=dict(tags or {}))
            run_id = run.info.run_id
            text = json.dumps({"tracking_uri": uri, "run_id": run_id}) + "\n"
            _atomic_write(Path(work_dir) / RUN_FILE, lambda tmp: tmp.write_text(text, encoding="utf-8"))
        return cls(client, run_id, work_dir)

    @staticmethod
    def _previous_run(client: Any, uri: str, work_dir: Path) -> Optional[str]:
        try:
            rec = json.loads((work_dir / RUN_FILE).read_text(encoding="utf-8"))
            if rec.get("tracking_uri") == uri:
                return client.get_run(rec["run_id"]).info.run_id
        except Exception:  # noqa: BLE001 - no file, another store, a deleted run: a new run
            pass
        return None

    def _guard(self, what: str, fn: Callable[[], Any]) -> None:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - the tracker never stops training
            self.failures += 1
            if self.failures == 1:
                logger.warning("mlflow: %s failed (%s: %s); training goes on, later MLflow failures are counted",
                               what, type(e).__name__, str(e).splitlines()[0] if str(e) else "")

    def log_scalars(self, scalars: Dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        ms = int(time.time() * 1000)
        metrics = [Metric(k, float(v), ms, int(step)) for k, v in scalars.items()]
        for i in range(0, len(metrics), _METRICS_PER_CALL):
            self._guard("logging metrics", lambda m=metrics[i:i + _METRICS_PER_CALL]:
                        self.client.log_batch(self.run_id, metrics=m))

    def log_params(self, params: Mapping[str, str]) -> None:
        """Params not yet in the run (a resumed run keeps the values it started with: MLflow params are fixed)."""
        from mlflow.entities import Param

        have: Dict[str, str] = {}
        self._guard("reading params", lambda: have.update(self.client.get_run(self.run_id).data.params))
        new = [Param(k, v) for k, v in params.items() if k not in have]
        for i in range(0, len(new), _PARAMS_PER_CALL):
            self._guard("logging params", lambda p=new[i:i + _PARAMS_PER_CALL]:
                        self.client.log_batch(self.run_id, params=p))

    def log_image(self, tag: str, path: Path, step: int) -> None:
        """The PNG at ``path`` as an artifact: under its folder relative to the work dir when inside it (e.g.
        ``routing_maps/epoch_0003/val_0000.png``), else under ``images/<tag>/step_<step>``."""
        path = Path(path)
        try:
            folder = path.resolve().parent.relative_to(self.work_dir.resolve()).as_posix()
        except ValueError:
            folder = f"images/{tag}/step_{int(step):07d}"
        self.log_artifact(path, folder)

    def log_artifact(self, path: Path, folder: Optional[str] = None) -> None:
        self._guard(f"uploading {path}", lambda: self.client.log_artifact(self.run_id, str(path), folder))

    def end(self, failed: bool = False) -> None:
        """Mark the run FINISHED (FAILED when training stopped with an error); report the failed writes."""
        self._guard("ending the run", lambda: self.client.set_terminated(self.run_id,
                                                                         "FAILED" if failed else "FINISHED"))
        if self.failures > 1:
            logger.warning("mlflow: %d MLflow writes failed in this run (the first is logged above)", self.failures)


class MlflowHook(HookBase):
    """Rank 0: opens the MLflow run before the first epoch (params, tags), feeds it every scalar and picture of the
    trainer's :class:`~pce.engine.logging.MetricWriter`, and at the end uploads ``config.json`` (and the best
    checkpoint with ``runtime.mlflow.log_checkpoint``) and ends the run. Checks that MLflow imports when built."""

    def __init__(self, cfg: Any, config_file: Optional[str] = None) -> None:
        self.enabled = bool(cfg.runtime.mlflow.enable)
        self.config_file = config_file
        self.tracker: Optional[MlflowTracker] = None
        if self.enabled:
            require_mlflow()  # before the run starts, on every rank

    def _tags(self) -> Dict[str, str]:
        trainer, cfg = self.trainer, self.trainer.cfg
        tags = {"task": str(getattr(trainer.task, "name", cfg.task)),
                "pce.work_dir": str(Path(trainer.work_dir).resolve())}
        if self.config_file:
            tags["pce.config_file"] = str(self.config_file)
        commit = git_commit(Path(self.config_file).resolve().parent if self.config_file else Path.cwd())
        if commit:
            tags["mlflow.source.git.commit"] = commit
        tags.update({str(k): str(v) for k, v in cfg.runtime.mlflow.tags.items()})
        return tags

    def before_train(self) -> None:
        trainer = self.trainer
        if not self.enabled or not trainer.is_main or trainer.writer is None:
            return
        from pce.engine.config import config_to_dict

        try:
            self.tracker = MlflowTracker.start(trainer.cfg, trainer.work_dir, resume=trainer.resume_path is not None,
                                               tags=self._tags())
        except Exception as e:  # noqa: BLE001 - an unreachable store: train without it
            logger.warning("mlflow: no run could be started at %s (%s: %s); training goes on without MLflow",
                           tracking_uri(trainer.cfg, trainer.work_dir), type(e).__name__, e)
            return
        self.tracker.log_params(flatten_config(config_to_dict(trainer.cfg)))
        trainer.writer.add_sink(self.tracker)
        logger.info("mlflow: run %s at %s", self.tracker.run_id, tracking_uri(trainer.cfg, trainer.work_dir))

    def after_train(self) -> None:
        tracker, trainer = self.tracker, self.trainer
        if tracker is None:
            return
        self.tracker = None
        if trainer.writer is not None:
            trainer.writer.remove_sink(tracker)
        work = Path(trainer.work_dir)
        names = ["config.json"]
        if trainer.cfg.runtime.mlflow.log_checkpoint:  # off by default: checkpoints are large
            names.append("best.pth" if (work / "best.pth").is_file() else "latest.pth")
        for name in names:
            if (work / name).is_file():
                tracker.log_artifact(work / name)
        tracker.end(failed=sys.exc_info()[0] is not None)  # after_train also runs while an exception propagates
