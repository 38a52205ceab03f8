"""Optimizer, learning-rate schedule (fvcore param schedulers), gradient clipping, gradient accumulation steps and
the lr scaled by the total batch size (``optimizer.auto_scale_lr``, as MMEngine's)."""
from __future__ import annotations

from typing import Any, List, Mapping, Optional, Sequence

import torch
from fvcore.common.param_scheduler import (CompositeParamScheduler, ConstantParamScheduler, CosineParamScheduler,
                                           LinearParamScheduler, MultiStepParamScheduler, ParamScheduler)
from torch import nn

from pce.engine.errors import PCEError
from pce.engine.scheduler import PCEScheduler

__all__ = ["build_optimizer", "build_param_scheduler", "build_lr_scheduler", "clip_gradients", "param_groups",
           "accumulate_steps", "scaled_lr"]


def param_groups(model: nn.Module, weight_decay: float, norm_bias_decay: bool = False) -> List[dict]:
    """Two groups: weights (decayed) and 1-d parameters (norms, biases, layer scales: not decayed unless
    ``norm_bias_decay``). Every parameter is included, also those that do not require gradients yet (router
    keys become trainable in a later phase; optimizers skip parameters without gradients)."""
    decay, no_decay = [], []
    seen = set()
    for _, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        (no_decay if p.ndim <= 1 and not norm_bias_decay else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def accumulate_steps(cfg: Mapping[str, Any]) -> int:
    """``optimizer.accumulate_steps`` of the ``optimizer`` section ``cfg``: micro-batches per optimizer step."""
    n = cfg.get("accumulate_steps", 1)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise PCEError("optimizer.accumulate_steps", f"is {n!r}", "an int >= 1: micro-batches per optimizer step")
    return n


def scaled_lr(cfg: Mapping[str, Any], batch_size: int, world_size: int) -> float:
    """The base lr of the ``optimizer`` section ``cfg``: ``lr x total / auto_scale_lr.base_batch_size`` with
    ``total = batch_size x world_size x accumulate_steps`` when ``auto_scale_lr.enable``, else ``lr`` (the
    linear scaling rule of Goyal et al. 2017, MMEngine's ``auto_scale_lr``)."""
    lr = float(cfg["lr"])
    auto = cfg.get("auto_scale_lr") or {}
    if not auto.get("enable", False):
        return lr
    base = auto.get("base_batch_size", 0)
    if isinstance(base, bool) or not isinstance(base, int) or base < 1:
        raise PCEError("optimizer.auto_scale_lr.base_batch_size", f"is {base!r} with auto_scale_lr.enable=True",
                       "the total batch size optimizer.lr was tuned for, an int >= 1")
    return lr * int(batch_size) * int(world_size) * accumulate_steps(cfg) / base


def build_optimizer(cfg: Mapping[str, Any], model: nn.Module, lr: Optional[float] = None) -> torch.optim.Optimizer:
    """``cfg``: the ``optimizer`` section (type sgd | adamw | adam, lr, weight_decay, momentum, ...); ``lr``:
    the base lr to use instead of ``cfg["lr"]`` (e.g. :func:`scaled_lr`)."""
    groups = param_groups(model, float(cfg["weight_decay"]), bool(cfg.get("norm_bias_decay", False)))
    kind, lr = cfg["type"], float(cfg["lr"] if lr is None else lr)
    if kind == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=float(cfg.get("momentum", 0.9)),
                               nesterov=bool(cfg.get("nesterov", False)) and float(cfg.get("momentum", 0.9)) > 0)
    if kind in ("adamw", "adam"):
        cls = torch.optim.AdamW if kind == "adamw" else torch.optim.Adam
        return cls(groups, lr=lr, betas=tuple(float(b) for b in cfg.get("betas", (0.9, 0.999))),
                   eps=float(cfg.get("eps", 1e-8)))
    raise ValueError(f"unknown optimizer type {kind!r}; use sgd, adamw or adam")


def build_param_scheduler(cfg: Mapping[str, Any], total_epochs: int) -> ParamScheduler:
    """An fvcore multiplier schedule over training progress ``where`` in [0, 1): linear warmup
    (``warmup_epochs``, from ``warmup_factor``) then ``cosine`` / ``linear`` (to ``min_lr_factor``), ``multistep``
    (x ``gamma`` at each of ``milestones`` epochs) or ``constant`` (detectron2's WarmupParamScheduler layout)."""
    kind = cfg["type"]
    end = float(cfg.get("min_lr_factor", 0.0))
    if kind == "cosine":
        main: ParamScheduler = CosineParamScheduler(1.0, end)
    elif kind == "linear":
        main = LinearParamScheduler(1.0, end)
    elif kind == "constant":
        main = ConstantParamScheduler(1.0)
    elif kind == "multistep":
        milestones = [int(m) for m in cfg.get("milestones", [])]
        if any(not 0 < m < total_epochs for m in milestones) or milestones != sorted(set(milestones)):
            raise ValueError(f"schedule.lr_scheduler.milestones must be increasing epochs in (0, {total_epochs}), "
                             f"got {milestones}")
        gamma = float(cfg.get("gamma", 0.1))
        main = MultiStepParamScheduler([gamma ** i for i in range(len(milestones) + 1)], num_updates=total_epochs,
                                       milestones=milestones) if milestones else ConstantParamScheduler(1.0)
    else:
        raise ValueError(f"unknown lr scheduler type {kind!r}; use cosine, linear, multistep or constant")
    warm = float(cfg.get("warmup_epochs", 0.0)) / max(total_epochs, 1)
    if warm <= 0:
        return main
    warm = min(warm, 0.999)
    warmup = LinearParamScheduler(float(cfg.get("warmup_factor", 0.001)) * main(0.0), main(warm))
    return CompositeParamScheduler([warmup, main], lengths=[warm, 1.0 - warm], interval_scaling=["rescaled", "fixed"])


def build_lr_scheduler(optimizer: torch.optim.Optimizer, schedule_cfg: Mapping[str, Any], phase_epochs: Sequence[int],
                       phase_multipliers: Sequence[float], iters_per_epoch: int) -> PCEScheduler:
    """The per-iteration scheduler: base lr x phase multiplier x fvcore schedule."""
    total = sum(phase_epochs)
    return PCEScheduler(optimizer, phase_epochs, phase_multipliers=phase_multipliers,
                        param_scheduler=build_param_scheduler(schedule_cfg["lr_scheduler"], total),
                        iters_per_epoch=iters_per_epoch)


def clip_gradients(parameters, max_norm: float) -> Optional[float]:
    """Clip the global gradient norm to ``max_norm`` (no-op for 0); returns the norm before clipping."""
    if not max_norm:
        return None
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return 0.0
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
