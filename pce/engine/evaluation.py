"""Evaluation: the sharded evaluation loader, a model over a split, a checkpoint in its own phase, and the
evaluation form of a config (every split through its non-augmenting transform, ``train=False``)."""
from __future__ import annotations

import inspect
import logging
import os
import sys
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from pce.engine.checkpoint import load_checkpoint
from pce.engine.distributed import InferenceShardSampler, all_gather_object, get_rank, get_world_size
from pce.engine.errors import PCEError
from pce.engine.phase import build_phases
from pce.engine.phases import PhaseController
from pce.engine.runtime import autocast_context, resolve_amp_dtype, resolve_device, to_channels_last
from pce.engine.weights import checkpoint_phase, load_model_weights, replay_structure

__all__ = ["build_eval_loader", "evaluate_model", "evaluate_checkpoint", "load_trained_weights", "load_trained_model",
           "check_checkpoint_file", "evaluation_config",
           "build_eval_datasets"]

logger = logging.getLogger("pce")


def build_eval_loader(cfg: Any, task: Any, dataset: Dataset, device: torch.device) -> DataLoader:
    """Sequential loader over this rank's shard of ``dataset`` (every sample once over all ranks)."""
    bs = cfg.data.eval_batch_size or 2 * cfg.data.batch_size
    return DataLoader(dataset, batch_size=bs, sampler=InferenceShardSampler(len(dataset)),
                      num_workers=cfg.data.num_workers, collate_fn=getattr(task, "collate_fn", None),
                      pin_memory=cfg.data.pin_memory and device.type == "cuda",
                      generator=torch.Generator().manual_seed(cfg.runtime.seed))


def _synchronize(evaluator: Any) -> None:
    if get_world_size() == 1:
        return
    if hasattr(evaluator, "synchronize"):
        evaluator.synchronize()
        return
    if not (hasattr(evaluator, "state_dict") and hasattr(evaluator, "merge") and hasattr(evaluator, "reset")):
        raise TypeError(f"{type(evaluator).__name__} needs synchronize() or state_dict()/merge()/reset() for DDP")
    states = all_gather_object(evaluator.state_dict())
    evaluator.reset()
    for s in states:
        evaluator.merge(s)


def _progress_bar(total: int, desc: str, cfg: Any, progress: Optional[bool]) -> Any:
    """A tqdm bar over ``total`` batches on stderr, rank 0 only: ``progress=None`` follows
    ``runtime.progress_bar`` and shows it only when stderr is a terminal (tqdm's ``disable=None``: off in logs,
    CI and tests); ``True`` forces it on, ``False`` off. ``None`` when off."""
    if progress is False or get_rank() != 0 or (progress is None and not cfg.runtime.progress_bar):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="batch", dynamic_ncols=True, leave=False, file=sys.stderr,
                disable=False if progress else None)


@torch.no_grad()
def evaluate_model(model: nn.Module, task: Any, cfg: Any, dataset: Dataset, device: torch.device,
                   amp_dtype: Optional[torch.dtype] = None, loader: Optional[DataLoader] = None,
                   progress: Optional[bool] = None, desc: str = "eval") -> Dict[str, Any]:
    """Run ``task.predict`` over ``dataset`` (sharded over ranks), feed the task's evaluator, merge across
    ranks and return ``evaluator.compute()``. ``progress``: a tqdm bar of the batches (``desc``) on rank 0,
    see :func:`_progress_bar` (default: ``runtime.progress_bar``, interactive terminals only)."""
    loader = loader or build_eval_loader(cfg, task, dataset, device)
    was_training = model.training
    model.eval()
    evaluator = task.build_evaluator(cfg, dataset)
    bar = _progress_bar(len(loader), desc, cfg, progress)
    try:
        for batch in loader:
            with autocast_context(amp_dtype, device):
                out = task.predict(model, batch, device)
            evaluator.update(*out)
            if bar is not None:
                bar.update(1)
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    _synchronize(evaluator)
    return evaluator.compute()


def evaluation_config(cfg: Any, splits: Sequence[str] = ("train", "val", "test")) -> Any:
    """``cfg`` with the transform of each of ``splits`` in evaluation mode: ``train=False`` where its
    ``data.<split>.transform.kwargs`` set ``train`` (every registered transform takes it: augmentation off), and
    no augmentation ``seed``. Scoring, measuring or drawing a split (``--split train`` included) must see its
    images as the model is evaluated on them, not augmented. ``cfg`` itself is not changed (a copy, frozen like
    ``cfg``, when a transform changes; else ``cfg``)."""
    changes = [s for s in splits if s in cfg.data and cfg.data[s].name and cfg.data[s].transform.name
               and ("seed" in cfg.data[s].transform.kwargs or cfg.data[s].transform.kwargs.get("train", False))]
    if not changes:
        return cfg
    out = cfg.clone()
    frozen = out.is_frozen()
    out.defrost()
    for s in changes:
        kwargs = out.data[s].transform.kwargs
        if "train" in kwargs:
            kwargs.train = False
        kwargs.pop("seed", None)
    if frozen:
        out.freeze()
    return out


def build_eval_datasets(cfg: Any, task: Any, splits: Sequence[str]) -> Dict[str, Any]:
    """``task.build_datasets`` of ``splits`` for evaluation: through :func:`evaluation_config`, and with
    ``evaluate=True`` for an adapter whose ``build_datasets`` takes it (it then leaves augmentation out itself,
    whatever the transform's defaults)."""
    kwargs = {"evaluate": True} if _accepts(task.build_datasets, "evaluate") else {}
    return task.build_datasets(evaluation_config(cfg, splits), splits=tuple(splits), **kwargs)


def _accepts(fn: Any, name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def load_trained_weights(model: nn.Module, cfg: Any, checkpoint: Union[str, os.PathLike]) -> Dict[str, Any]:
    """Make ``model`` (freshly built from ``cfg``) the trained one of ``checkpoint``, for evaluation, inference
    and export: the expert structure of a pruned checkpoint (``expert_structure``, from
    ``tools/prune_experts.py``) replayed, the weights loaded (EMA weights when saved; non-finite ones refused; a
    weights-only ``best.pth`` / published checkpoint holds them as ``model``, see ``weights``), the routing of the
    phase it was saved in applied. Returns the checkpoint dict."""
    ckpt = load_checkpoint(checkpoint)
    replay_structure(model, ckpt, checkpoint)
    ckpt = load_model_weights(model, checkpoint, prefer_ema=True, ckpt=ckpt)
    ctl = PhaseController(build_phases(cfg.phases, cfg.schedule.epochs), kmeans_init_batches=0)
    ctl.apply(checkpoint_phase(ckpt, cfg.phases, cfg.schedule.epochs), [model])
    return ckpt


def check_checkpoint_file(checkpoint: Union[str, os.PathLike]) -> None:
    """``PCEError`` naming ``checkpoint`` when it is not a file: checked before any data or model is built."""
    if not Path(checkpoint).is_file():
        raise PCEError(checkpoint, "checkpoint not found", "a .pth file written by tools/train.py")


def load_trained_model(cfg: Any, task: Any, checkpoint: Union[str, os.PathLike], device: torch.device
                       ) -> Tuple[nn.Module, Dict[str, Any]]:
    """``(model in eval mode on device, checkpoint dict)``: the task's model of ``cfg`` made the trained one of
    ``checkpoint`` by :func:`load_trained_weights` (the one loading path of eval / infer / infer_slide / analysis)."""
    check_checkpoint_file(checkpoint)
    model = task.build_model(cfg)
    ckpt = load_trained_weights(model, cfg, checkpoint)
    return model.to(device).eval(), ckpt


def evaluate_checkpoint(cfg: Any, task: Any, checkpoint: Union[str, os.PathLike], split: str = "test",
                        device: Optional[torch.device] = None, progress: Optional[bool] = None) -> Dict[str, Any]:
    """Build the model of ``cfg``, load ``checkpoint`` (its EMA weights when it has them), apply the routing of
    the phase it was saved in and evaluate ``split`` (``test`` falls back to ``val`` when not configured) through
    its evaluation transform (:func:`evaluation_config`: ``--split train`` is scored without augmentation).
    ``progress``: the batches' progress bar, as in :func:`evaluate_model`."""
    check_checkpoint_file(checkpoint)  # before the data and the model are built
    device = device or resolve_device(cfg.runtime.device, int(os.environ.get("LOCAL_RANK", "0")))
    if split == "test" and not cfg.data.test.name:
        split = "val"
    datasets = build_eval_datasets(cfg, task, (split,))
    if split not in datasets:
        raise ValueError(f"the config defines no data.{split} dataset")
    model = task.build_model(cfg)
    load_trained_weights(model, cfg, checkpoint)
    model.to(device)
    if cfg.runtime.channels_last:
        to_channels_last(model)
    results = evaluate_model(model, task, cfg, datasets[split], device, resolve_amp_dtype(cfg.runtime.amp, device),
                             progress=progress, desc=f"eval {split}")
    results.setdefault("split", split)
    return results
