"""Checkpoints: atomic writes, RNG capture, ``weights_only`` loading.

A checkpoint is a dict of tensors and primitive containers only (no pickled objects), so it loads with
``torch.load(..., weights_only=True)``: model / EMA / optimizer / scheduler / AMP-scaler state dicts, the phase
controller state, ``epoch`` (completed epochs), ``iteration``, the RNG states of every rank (python, numpy
as a tensor, torch, cuda), the best metric so far and the merged config as Python text. ``best.pth`` holds weights
only by default (:func:`pce.engine.weights.lean_checkpoint`: no optimizer, scheduler, RNG; the EMA weights as
``model``) with the metadata loaders read (``expert_structure``, ``phase``, ``epoch``, ``best``, ``config``).

Writes go to a temporary file in the same directory, are flushed and fsync'ed, then ``os.replace``'d over the
target, so a crash while saving never leaves a truncated ``latest.pth``.
"""
from __future__ import annotations

import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple, Union

import numpy as np
import torch

from pce.engine.errors import NonFiniteStateError, PCEError

__all__ = ["atomic_save", "atomic_copy", "load_checkpoint", "capture_rng_state", "restore_rng_state",
           "CheckpointManager", "nonfinite_tensors", "check_finite", "checkpoint_is_finite", "remove_stale_temps",
           "is_training_state", "TRAINING_STATE_KEYS"]

logger = logging.getLogger("pce")

PathLike = Union[str, os.PathLike]


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _atomic_write(path: Path, write: Callable[[Path], None]) -> Path:
    """Run ``write(tmp)`` on a temp file beside ``path``, fsync it, then ``os.replace`` it onto ``path``;
    on any failure the temp file is removed and ``path`` keeps its previous content."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


_TMP_RE = re.compile(r"^\..+\.(\d+)\.tmp$")
_EPOCH_RE = re.compile(r"^epoch_(\d+)\.pth$")


def remove_stale_temps(directory: PathLike) -> List[Path]:
    """Remove the ``.<name>.<pid>.tmp`` files of interrupted saves in ``directory`` (call it while holding the
    work-dir lock: no other writer is active). Returns the removed paths."""
    removed = []
    d = Path(directory)
    if not d.is_dir():
        return removed
    for f in d.iterdir():
        if f.is_file() and _TMP_RE.match(f.name):
            try:
                f.unlink()
                removed.append(f)
            except OSError:  # pragma: no cover
                pass
    return removed


def atomic_save(obj: Any, path: PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (temp file in the same dir + fsync + ``os.replace``)."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            torch.save(obj, f)

    return _atomic_write(Path(path), write)


def atomic_copy(src: PathLike, dst: PathLike) -> Path:
    """Copy ``src`` to ``dst`` atomically."""
    return _atomic_write(Path(dst), lambda tmp: shutil.copyfile(src, tmp))


def load_checkpoint(path: PathLike, map_location: Any = "cpu") -> Dict[str, Any]:
    """``torch.load(path, weights_only=True)`` with errors that name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise RuntimeError(f"could not load checkpoint {path} ({type(e).__name__}: {e})") from e
    if not isinstance(ckpt, dict):
        raise RuntimeError(f"checkpoint {path} holds a {type(ckpt).__name__}, expected a dict")
    return ckpt


# ------------------------------------------------------------------------------------------ finiteness
def _tensors(obj: Any, prefix: str = "") -> Iterator[Tuple[str, torch.Tensor]]:
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, Mapping):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}.{i}" if prefix else str(i))


def nonfinite_tensors(obj: Any) -> List[str]:
    """Names of the floating-point tensors in ``obj`` (a module, a state dict, nested containers) holding a NaN
    or an infinity."""
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    return [name for name, t in _tensors(obj)
            if (t.is_floating_point() or t.is_complex()) and t.numel() and not bool(torch.isfinite(t).all())]


def check_finite(obj: Any, where: Any, action: str = "") -> None:
    """Raise :class:`NonFiniteStateError` naming ``where`` and the first non-finite tensors of ``obj``."""
    bad = nonfinite_tensors(obj)
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        raise NonFiniteStateError(where, f"{len(bad)} non-finite tensor(s): {shown}{action}",
                                  "every parameter and buffer finite")


def checkpoint_is_finite(path: PathLike) -> bool:
    try:
        ckpt = load_checkpoint(path)
    except (FileNotFoundError, RuntimeError):
        return False
    return not nonfinite_tensors({"model": ckpt.get("model"), "ema": ckpt.get("ema")})


# ------------------------------------------------------------------------------------------- RNG
def capture_rng_state() -> Dict[str, Any]:
    """RNG states of python, numpy, torch (and CUDA) as tensors / primitive containers."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: Dict[str, Any] = {
        "python": [int(version), list(internal), gauss],
        "numpy": {"name": str(name), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(v) for v in internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), int(n["pos"]), int(n["has_gauss"]),
                         float(n["cached_gaussian"])))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        cuda = list(state["cuda"])[: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all([s.cpu() for s in cuda])


# ------------------------------------------------------------------------------------------ models
class CheckpointManager:
    """``latest.pth`` / ``best.pth`` (and optional ``epoch_N.pth``, the oldest deleted beyond
    ``runtime.max_keep_ckpts``) in ``work_dir``; writes only when ``enabled`` (rank 0)."""

    def __init__(self, work_dir: PathLike, enabled: bool = True) -> None:
        self.dir = Path(work_dir)
        self.enabled = enabled

    @property
    def latest(self) -> Path:
        return self.dir / "latest.pth"

    @property
    def best(self) -> Path:
        return self.dir / "best.pth"

    def save(self, state: Dict[str, Any], name: str = "latest.pth") -> Optional[Path]:
        if not self.enabled:
            return None
        return atomic_save(state, self.dir / name)

    def copy(self, src: PathLike, name: str) -> Optional[Path]:
        if not self.enabled:
            return None
        return atomic_copy(src, self.dir / name)

    def remove_old_epochs(self, names: List[str], max_keep: int) -> List[str]:
        """Delete the oldest of ``names`` (the ``epoch_N.pth`` this run wrote, recorded in its checkpoints) beyond
        ``max_keep`` (<= 0: keep all); call it after the newest was written. Only regular files named
        ``epoch_<N>.pth`` in the work dir are touched (never ``best.pth`` / ``latest.pth`` / a user's file).
        Returns the names kept, oldest first."""
        names = sorted({n for n in names if _EPOCH_RE.match(n)}, key=lambda n: int(_EPOCH_RE.match(n).group(1)))
        if max_keep <= 0 or len(names) <= max_keep:
            return names
        for name in names[:-max_keep]:
            p = self.dir / name
            if self.enabled and p.is_file() and not p.is_symlink():
                p.unlink()
                logger.info("removed %s (runtime.max_keep_ckpts=%d)", p, max_keep)
        return names[-max_keep:]

    def has_checkpoints(self) -> List[Path]:
        """The checkpoints of a previous run in the work dir."""
        if not self.dir.is_dir():
            return []
        return sorted(p for p in self.dir.glob("*.pth") if p.is_file())

    def verify_best(self, best: Mapping[str, Any]) -> Optional[str]:
        """``None`` when ``best.pth`` holds the best recorded in ``best`` (``{"metric", "value", "epoch"}``),
        else what is wrong with it."""
        if best.get("value") is None:
            return None
        if not self.best.is_file():
            return f"{self.best} is missing"
        try:
            ckpt = load_checkpoint(self.best)
        except RuntimeError as e:
            return str(e)
        saved = ckpt.get("best") or {}
        if int(ckpt.get("epoch", -1)) != int(best.get("epoch", -2)) or saved.get("value") != best.get("value"):
            return (f"{self.best} holds epoch {ckpt.get('epoch')} ({saved.get('metric')} {saved.get('value')}), "
                    f"the resumed checkpoint records the best at epoch {best.get('epoch')} ({best.get('value')})")
        return None

    def find_resume(self, resume: Union[bool, PathLike, None]) -> Optional[Path]:
        """``True`` / ``"auto"`` -> ``latest.pth`` of the work dir; a folder -> its ``latest.pth``; a path -> that
        file. Where ``latest.pth`` is missing but ``best.pth`` beside it holds a full training state (a kill
        after the first ``best.pth``, before ``latest.pth``), the run resumes from ``best.pth`` with a warning;
        a ``best.pth`` of weights only is named in the error, with what to do."""
        if not resume:
            return None
        if resume is True or str(resume) == "auto":
            return self._latest_or_best(self.latest)
        p = Path(resume)
        if p.is_dir():
            return self._latest_or_best(p / "latest.pth")
        if not p.is_file():
            raise PCEError(p, "--resume: checkpoint not found", "a latest.pth / best.pth of tools/train.py")
        return p

    @staticmethod
    def _latest_or_best(latest: Path) -> Path:
        if latest.is_file():
            return latest
        best = latest.with_name("best.pth")
        if not best.is_file():
            raise PCEError(latest, "does not exist: no checkpoint to resume from",
                           "a work dir where tools/train.py saved a checkpoint, or --resume CHECKPOINT")
        try:
            ckpt = load_checkpoint(best)
        except RuntimeError as e:
            raise PCEError(latest, f"does not exist, and {best} is not readable ({e})",
                           "a complete checkpoint to resume from") from None
        if is_training_state(ckpt):
            logger.warning("--resume: %s does not exist (a run stopped during its first save?): resuming from %s, "
                           "a complete training state (epoch %s)", latest, best, ckpt.get("epoch"))
            return best
        raise PCEError(latest, f"does not exist; {best} holds weights only (runtime.best_weights_only), not a "
                       f"training state (no {', '.join(k for k in TRAINING_STATE_KEYS if k not in ckpt)})",
                       f"start a new run from its weights: --cfg-options model.pretrained={best} with another "
                       "--work-dir (or --force)")


#: what a checkpoint needs for ``--resume`` (besides the RNG states, phase and best, which have defaults)
TRAINING_STATE_KEYS = ("model", "optimizer", "scheduler", "epoch", "iteration")


def is_training_state(ckpt: Mapping[str, Any]) -> bool:
    """Whether ``ckpt`` is a full training state :meth:`Trainer.load_state` resumes from (``latest.pth``,
    ``epoch_N.pth``, and ``best.pth`` with ``runtime.best_weights_only=False``), not weights only (``best.pth`` by
    default, ``tools/prune_experts.py``, ``tools/publish_model.py``)."""
    return all(k in ckpt for k in TRAINING_STATE_KEYS) and isinstance(ckpt.get("optimizer"), Mapping)
