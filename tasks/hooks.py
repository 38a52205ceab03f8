"""Trainer hooks of the application: the routing statistics of training, and the hooks every tool registers.

>>> trainer = Trainer(cfg, task, hooks=default_hooks(cfg, task))

:class:`RoutingStatsHook` records the routing of the logging steps' forwards (rank 0 only, through
:func:`pce.record_routing`; nothing is attached on other steps) and adds to their ``train`` record
``routing = {layer: statistics}`` (layer names as the recorder gives them, e.g. ``backbone.stages.2.layers.0``),
which :class:`pce.engine.logging.MetricWriter` writes to ``metrics.jsonl`` and TensorBoard
(``routing/<layer>/<name>``); see :func:`routing_log_stats` for the statistics.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch

from pce.analysis import stats as S
from pce.analysis.labels import position_labels
from pce.analysis.maps import grid_of
from pce.engine.hooks import HookBase
from pce.moe.recorder import RoutingRecorder
from pce.moe.routing import RoutingResult

__all__ = ["RoutingStatsHook", "SplitRecordHook", "routing_log_stats", "default_hooks"]


def routing_log_stats(result: RoutingResult, class_labels: Optional[torch.Tensor] = None) -> Dict[str, Any]:
    """The logged statistics of one layer's routing (:mod:`pce.analysis.stats`): ``entropy`` (mean routing
    entropy, nats), ``usage [E]`` (fraction of patches using each expert), ``mean_weight [E]``,
    ``dropped_fraction``, ``collapsed_experts`` (how many have usage < 1%), ``usage_entropy``, ``imbalance``
    (max / min load; ``inf`` with an unused expert), ``nmi_position`` / ``nmi_position_baseline`` (expert vs grid
    cell, and with shuffled cells) and, with ``class_labels`` (``int64 [B, gh * gw]``, ``-1``: none),
    ``nmi_class`` / ``nmi_class_baseline``. Entries that cannot be computed are left out."""
    w = result.weights.detach().float().cpu()
    B, E = w.shape[0], w.shape[-1]
    use = S.usage(w)
    load = (w.reshape(-1, E) > 0).float().sum(0)
    experts = S.assigned_experts(w).reshape(-1).numpy()
    pos = S.nmi_with_baseline(experts, position_labels(B, grid_of(result)).reshape(-1).numpy(), shuffles=1)
    rec = {"entropy": S.mean_entropy(result.probs), "usage": use.tolist(), "mean_weight": S.mean_weight(w).tolist(),
           "dropped_fraction": S.dropped_rate(w), "collapsed_experts": float(len(S.collapsed_experts(use))),
           "usage_entropy": S.usage_entropy(load), "imbalance": S.imbalance(load),
           "nmi_position": pos["nmi"], "nmi_position_baseline": pos["baseline"]}
    if class_labels is not None and class_labels.numel() == experts.size:
        cls = S.nmi_with_baseline(experts, class_labels.reshape(-1).cpu().numpy(), shuffles=1)
        rec["nmi_class"], rec["nmi_class_baseline"] = cls["nmi"], cls["baseline"]
    return {k: v for k, v in rec.items() if v is not None}


def _class_labels(task: Any, batch: Any, grid: Tuple[int, int]) -> Optional[torch.Tensor]:
    """``task.patch_labels`` of the batch on ``grid``; ``None`` when the task gives none or cannot (the class NMI
    is then left out of the log: a statistic never stops training)."""
    labels_of = getattr(task, "patch_labels", None)
    if labels_of is None or batch is None:
        return None
    try:
        return labels_of(batch, grid, None)
    except (ValueError, TypeError, KeyError, RuntimeError):
        return None


class RoutingStatsHook(HookBase):
    """Per-layer routing statistics of every logging step, added to its ``train`` record as ``routing``."""

    def __init__(self) -> None:
        self._recorder: Optional[RoutingRecorder] = None
        self._records: List[Tuple[str, RoutingResult]] = []
        self._batch: Any = None

    def _stop(self) -> None:
        if self._recorder is not None:
            self._recorder.__exit__(None, None, None)
            self._records.extend(self._recorder.records)
            self._recorder = None

    def before_step(self) -> None:
        trainer = self.trainer
        if trainer.logging_step and trainer.is_main:
            self._recorder = RoutingRecorder(trainer.model, detach=True).__enter__()
            self._batch = trainer.batch  # its targets give the class NMI

    def log_metrics(self) -> Dict[str, Any]:
        """``{"routing": {layer: routing_log_stats(first forward of the layer)}}`` of this step, or ``{}``."""
        self._stop()
        out: Dict[str, Dict[str, Any]] = {}
        for name, result in self._records:
            if name not in out:
                out[name] = routing_log_stats(result, _class_labels(self.trainer.task, self._batch, grid_of(result)))
        self._records, self._batch = [], None
        return {"routing": out} if out else {}

    def after_step(self) -> None:
        self._stop()
        self._records, self._batch = [], None

    def after_train(self) -> None:
        self.after_step()


class SplitRecordHook(HookBase):
    """Before the first epoch (rank 0): the split records of the run's datasets (a dataset's ``split_record``,
    e.g. the Camelyon training slides held out for validation) written to the work dir
    (``camelyon_split.json``), so a run says which slides it trained and selected on."""

    def before_train(self) -> None:
        from pce.datasets.camelyon import write_split_records

        trainer = self.trainer
        if getattr(trainer, "is_main", True):
            write_split_records(trainer.work_dir, trainer.datasets)


def default_hooks(cfg: Any, task: Any, config_file: Optional[str] = None) -> List[HookBase]:
    """The hooks of a training run of ``cfg`` / ``task`` from the tools: :class:`RoutingStatsHook` and
    :class:`SplitRecordHook`; with ``runtime.mlflow.enable`` :class:`pce.engine.tracking.MlflowHook` (its run tagged
    with ``config_file``; raises naming the key when MLflow is missing), with ``runtime.routing_maps.interval`` N > 0
    :class:`pce.tasks.tracking_hooks.RoutingMapHook` (pictures to TensorBoard and MLflow)."""
    hooks: List[HookBase] = [RoutingStatsHook(), SplitRecordHook()]
    if cfg.runtime.mlflow.enable:
        from pce.engine.tracking import MlflowHook  # its constructor imports MLflow: only when enabled

        hooks.append(MlflowHook(cfg, config_file))
    if cfg.runtime.routing_maps.interval:  # a negative one is an error naming the key
        from .tracking_hooks import RoutingMapHook

        hooks.append(RoutingMapHook(cfg.runtime.routing_maps.interval, cfg.runtime.routing_maps.num_images))
    return hooks
