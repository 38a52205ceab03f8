"""Loading weights into a model: checkpoints (model or EMA weights), pretrained partial loads with a report,
the expert structure of a surgically edited checkpoint (pruned / duplicated experts) replayed before loading,
the phase a checkpoint was saved in, and the weights-only form of a checkpoint (``best.pth``,
``tools/publish_model.py``: :func:`lean_checkpoint`). A ``model.pretrained`` of the model *before* its
``model.convert`` / ``model.condconv`` entries (the dense twin's run) is loaded before they upcycle its convolutions
(:func:`pretrained_before_conversion`, :func:`load_before_conversion`)."""
from __future__ import annotations

import contextlib
import copy
import logging
import os
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Union

import torch

from pce.engine.checkpoint import check_finite, load_checkpoint
from pce.engine.errors import PCEError
from pce.engine.phase import Phase, build_phases
from pce.engine.phases import PhaseController
from pce.moe.recorder import unwrap_model
from pce.moe.surgery import apply_structure, structure

__all__ = ["load_model_weights", "model_state", "mismatch_summary", "load_pretrained", "checkpoint_phase",
           "saved_structure", "replay_structure", "lean_checkpoint", "TRAINING_ONLY_KEYS", "EarlyPretrained",
           "pretrained_before_conversion", "load_before_conversion"]

logger = logging.getLogger("pce")

PathLike = Union[str, os.PathLike]


def load_model_weights(model: torch.nn.Module, path: PathLike, strict: bool = True, prefer_ema: bool = False,
                       ckpt: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """Load the model weights of a training checkpoint (or a bare state dict) into ``model``.
    ``prefer_ema``: use the EMA weights when the checkpoint has them; ``ckpt``: the checkpoint already read
    from ``path`` (not read again). Returns the checkpoint dict."""
    ckpt = load_checkpoint(path) if ckpt is None else ckpt
    state = model_state(ckpt, prefer_ema)
    check_finite(state, path, " in the saved weights")
    try:
        unwrap_model(model).load_state_dict(state, strict=strict)
    except RuntimeError as e:
        raise PCEError(path, "the weights do not fit the model built from the config "
                       f"({mismatch_summary(model, state)})", "a checkpoint of the same model config") from e
    return ckpt


def model_state(ckpt: Mapping[str, Any], prefer_ema: bool = False) -> Mapping[str, Any]:
    """The model state dict of a training checkpoint (its EMA weights when ``prefer_ema`` and saved), of a
    ``{"state_dict": ...}`` file, or ``ckpt`` itself (a bare state dict)."""
    if prefer_ema and ckpt.get("ema"):
        return {k[len("module."):]: v for k, v in ckpt["ema"].items() if k.startswith("module.")}
    if "model" in ckpt and isinstance(ckpt["model"], Mapping):
        return ckpt["model"]
    if "state_dict" in ckpt and isinstance(ckpt["state_dict"], Mapping):
        return ckpt["state_dict"]
    return ckpt


#: what a weights-only checkpoint leaves out: the state only ``--resume`` needs (the EMA copy becomes ``model``)
TRAINING_ONLY_KEYS = ("optimizer", "scheduler", "scaler", "rng", "ema", "epoch_ckpts")


def lean_checkpoint(ckpt: Mapping[str, Any], prefer_ema: bool = True, dtype: Optional[torch.dtype] = None
                    ) -> Dict[str, Any]:
    """The weights-only form of a checkpoint (full or already lean, or a bare state dict): ``model`` holds its
    EMA weights when ``prefer_ema`` and it has them (``weights``: ``"ema"``), else its model weights; the
    metadata every loader reads is kept (``expert_structure``, ``phase``, ``epoch``, ``best``, ``config``, ...);
    :data:`TRAINING_ONLY_KEYS` (optimizer, scheduler, AMP scaler, RNG, the EMA copy) are dropped. ``dtype``:
    floating-point tensors are cast to it (integer buffers such as ``num_batches_tracked`` are kept)."""
    state = model_state(ckpt, prefer_ema)
    bare = state is ckpt  # a bare state dict: no metadata
    if dtype is not None:
        state = {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                 for k, v in state.items()}
    if bare:
        return {"model": dict(state), "weights": "model"}
    meta = {k: v for k, v in ckpt.items() if k not in TRAINING_ONLY_KEYS + ("model", "state_dict")}
    used_ema = prefer_ema and bool(ckpt.get("ema"))
    return {"model": dict(state), **meta, "weights": "ema" if used_ema else meta.get("weights", "model")}


def mismatch_summary(model: torch.nn.Module, state: Mapping[str, Any]) -> str:
    """One line naming the missing, unexpected and shape-mismatched keys of ``state`` against ``model``."""
    own = unwrap_model(model).state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shape = [k for k in own if k in state and isinstance(state[k], torch.Tensor) and state[k].shape != own[k].shape]
    parts = []
    for name, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shape)):
        if keys:
            parts.append(f"{len(keys)} {name}: {', '.join(keys[:3])}" + (", ..." if len(keys) > 3 else ""))
    if shape:
        k = shape[0]
        parts.append(f"{k}: saved {tuple(state[k].shape)}, model {tuple(own[k].shape)}")
    return "; ".join(parts) or "load_state_dict failed"


def saved_structure(ckpt: Mapping[str, Any]) -> Dict[str, List[List[int]]]:
    """The expert edits a checkpoint records (``expert_structure``: ``tools/prune_experts.py``, and the training
    checkpoints of a run started from such a checkpoint), as ``{layer: [[source expert, ...], ...]}``."""
    saved = ckpt.get("expert_structure") if isinstance(ckpt, Mapping) else None
    return {str(k): [[int(i) for i in step] for step in v] for k, v in (saved or {}).items() if v}


def replay_structure(model: torch.nn.Module, ckpt: Mapping[str, Any], where: Any) -> bool:
    """Give ``model`` the expert structure ``ckpt`` records (:func:`pce.moe.surgery.apply_structure`), so its
    weights fit. Nothing to do when the model already has it; a model with other edits is a :class:`PCEError`
    naming ``where``. Returns whether edits were replayed."""
    saved = saved_structure(ckpt)
    current = structure(unwrap_model(model))
    if current == saved:
        return False
    if current:
        raise PCEError(where, f"its expert structure {saved or '(none)'} differs from the model's {current}",
                       "a checkpoint of the same pruned / duplicated model")
    try:
        apply_structure(unwrap_model(model), saved)
    except (KeyError, ValueError) as e:
        raise PCEError(where, f"its expert structure does not fit the model of the config ({e})",
                       "a checkpoint of the same model config") from e
    logger.info("%s: replayed its expert structure (%s)", where,
                ", ".join(f"{n}: {len(steps[-1])} experts" for n, steps in saved.items()))
    return True


def load_pretrained(model: torch.nn.Module, path: PathLike, key: str = "model.pretrained",
                    ckpt: Optional[Mapping[str, Any]] = None, before: str = "") -> Dict[str, Any]:
    """Load the tensors of ``path`` whose names and shapes match ``model``; report the missing, unexpected and
    shape-mismatched ones. The expert structure of a pruned / duplicated checkpoint (``expert_structure``) is
    replayed on ``model`` first, so its tensors fit. Raises :class:`PCEError` naming ``key`` when nothing
    matched. ``ckpt``: the checkpoint already read from ``path``; ``before``: the conversion the load comes
    before (``"model.convert"``, :func:`load_before_conversion`), named in the report.
    Returns ``{"matched", "total", "missing", "unexpected", "mismatched"}``."""
    ckpt = load_checkpoint(path) if ckpt is None else ckpt
    replay_structure(model, ckpt, f"{key}={path}")
    state = model_state(ckpt)
    check_finite(state, f"{key}={path}", " in the pretrained weights")
    own = unwrap_model(model).state_dict()
    matched = _matching(own, state)
    missing = [k for k in own if k not in matched]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in state if k in own and k not in matched]
    if not matched:
        raise PCEError(f"{key}={path}", f"none of its {len(state)} tensors matches the model's {len(own)} "
                       f"(e.g. {', '.join(list(state)[:2]) or 'no tensors'} vs {', '.join(list(own)[:2])})",
                       "a checkpoint of the same architecture")
    unwrap_model(model).load_state_dict(matched, strict=False)
    report = {"matched": len(matched), "total": len(own), "missing": missing, "unexpected": unexpected,
              "mismatched": mismatched}
    if before:
        msg = (f"{key}: loaded {len(matched)} of {len(own)} tensors into the model before {before} (upcycling the "
               f"trained convolutions) from {path}")
    else:
        msg = f"loaded pretrained weights from {path}: {len(matched)} of {len(own)} model tensors matched"
    if missing or unexpected or mismatched:
        details = [f"{len(v)} {n} ({', '.join(v[:3])}{', ...' if len(v) > 3 else ''})"
                   for n, v in (("missing", missing), ("unexpected", unexpected), ("shape-mismatched", mismatched))
                   if v]
        logger.warning("%s; %s", msg, "; ".join(details))
    else:
        logger.info(msg)
    return report


def _matching(own: Mapping[str, Any], state: Mapping[str, Any]) -> Dict[str, torch.Tensor]:
    """The tensors of ``state`` whose names and shapes are in ``own`` (a model's state dict)."""
    return {k: v for k, v in state.items()
            if k in own and isinstance(v, torch.Tensor) and v.shape == own[k].shape}


@dataclass
class EarlyPretrained:
    """A ``model.pretrained`` waiting for the model builder (:func:`pretrained_before_conversion`); ``report``:
    :func:`load_pretrained`'s, once it was loaded before the conversions (``None``: the caller loads it after the
    build, passing ``ckpt``, the checkpoint already read when the builder compared it, when set)."""

    path: str
    key: str = "model.pretrained"
    report: Optional[Dict[str, Any]] = None
    ckpt: Optional[Mapping[str, Any]] = None


_EARLY: ContextVar[Optional[EarlyPretrained]] = ContextVar("pce_early_pretrained", default=None)


@contextlib.contextmanager
def pretrained_before_conversion(path: Optional[PathLike], key: str = "model.pretrained"
                                 ) -> Iterator[EarlyPretrained]:
    """While the model is built (``task.build_model`` in the trainer's setup), offer ``path`` to
    :func:`load_before_conversion`, which the builder calls right before its ``model.convert`` /
    ``model.condconv`` entries. Yields the :class:`EarlyPretrained`: its ``report`` is set when the checkpoint
    was loaded there, and the caller then must not load it again."""
    early = EarlyPretrained(str(path or ""), key)
    token = _EARLY.set(early if path else None)
    try:
        yield early
    finally:
        _EARLY.reset(token)


def _fit(model: torch.nn.Module, ckpt: Mapping[str, Any]) -> int:
    """How many tensors of ``ckpt`` would load into ``model`` (names and shapes, its expert structure replayed on
    a copy; 0 when that structure does not fit ``model``)."""
    saved = saved_structure(ckpt)
    if saved and saved != structure(unwrap_model(model)):
        model = copy.deepcopy(unwrap_model(model))
        try:
            apply_structure(model, saved)
        except (KeyError, ValueError):
            return 0
    return len(_matching(unwrap_model(model).state_dict(), model_state(ckpt)))


def load_before_conversion(model: torch.nn.Module, convert: Callable[[torch.nn.Module], torch.nn.Module],
                           what: str = "model.convert") -> Optional[Dict[str, Any]]:
    """Inside :func:`pretrained_before_conversion`: load its checkpoint into the freshly built, not yet converted
    ``model`` when more of its tensors fit ``model`` than ``convert(copy of model)`` (a checkpoint of the model
    before the conversions ``what``, e.g. the dense twin's ``best.pth``), so that the conversions upcycle the
    trained convolutions; returns :func:`load_pretrained`'s report. ``None`` (nothing loaded) outside the
    context, or for a checkpoint of the converted model (loaded after the build, as any ``model.pretrained``).
    The trial conversion draws no random numbers from the caller's stream."""
    early = _EARLY.get()
    if early is None or early.report is not None:
        return None
    ckpt = load_checkpoint(early.path)
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.is_cuda})
    with torch.random.fork_rng(devices=devices):
        before = _fit(model, ckpt)
        after = _fit(convert(copy.deepcopy(model)), ckpt) if before else 0
    if before <= after:
        early.ckpt = ckpt  # the caller's load after the build reads it from here
        return None
    early.report = load_pretrained(model, early.path, early.key, ckpt=ckpt, before=what)
    return early.report


def checkpoint_phase(ckpt: Mapping[str, Any], phases_cfg: Any, total_epochs: int) -> Phase:
    """The :class:`~pce.engine.phase.Phase` a checkpoint was saved in (its ``phase`` entry), falling back to the
    config's phase of its epoch for checkpoints without one. A config that disagrees is a warning naming both."""
    ctl = PhaseController(build_phases(phases_cfg, total_epochs), kmeans_init_batches=0)
    epoch = int(ckpt.get("epoch", total_epochs))
    done_in_epoch = int(ckpt.get("epoch_iter", 0) or 0)
    from_cfg = ctl.phase_at(epoch if done_in_epoch else max(epoch - 1, 0))
    saved = ckpt.get("phase") or {}
    cur, phases = int(saved.get("current", -1)), saved.get("phases") or []
    if not 0 <= cur < len(phases):
        return from_cfg
    fields = {k: phases[cur].get(k) for k in ("name", "epochs", "router_override", "keys_trainable", "attention",
                                               "lr_mult", "upcycle", "start_epoch") if k in phases[cur]}
    phase = Phase(**fields)
    keys = ("router_override", "keys_trainable", "attention")
    if phase.name != from_cfg.name or any(getattr(phase, k) != getattr(from_cfg, k) for k in keys):
        logger.warning("evaluating in the checkpoint's phase '%s' (the config's schedule puts epoch %d in phase "
                       "'%s')%s", phase.name, epoch, from_cfg.name, _phase_differences(phase, from_cfg))
    return phase


def _phase_differences(saved: Phase, config: Phase) -> str:
    """``": keys_trainable True here, False in the config, ..."``: the routing settings of the two phases that
    differ (``""`` when none does)."""
    keys = ("router_override", "router_override_kwargs", "keys_trainable", "attention")
    diffs = [f"{k} {getattr(saved, k)!r} here, {getattr(config, k)!r} in the config"
             for k in keys if getattr(saved, k) != getattr(config, k)]
    return (": " + "; ".join(diffs)) if diffs else ""
