"""Checkpoints: atomic writes, RNG capture, ``weights_only`` loading.

A checkpoint is a dict of tensors and primitive containers only (no pickled objects), so it loads with
``torch.load(..., weights_only=True)``: model / EMA / optimizer / scheduler / AMP-scaler state dicts, the phase
controller state, ``epoch`` (completed epochs), ``iteration``, the RNG states of every rank (python, numpy
as a tensor, torch, cuda), the best metric so far and the merged config as Python text.

Writes go to a temporary file in the same directory, are flushed and fsync'ed, then ``os.replace``'d over the
target, so a crash while saving never leaves a truncated ``latest.pth``.
"""
from __future__ import annotations

import errno
import logging
import math
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple, Union

import numpy as np
import torch

from pce.engine.errors import NonFiniteStateError, PCEError, WorkDirError

__all__ = ["atomic_save", "atomic_copy", "load_checkpoint", "capture_rng_state", "restore_rng_state",
           "CheckpointManager", "unwrap_model", "load_model_weights", "load_pretrained", "nonfinite_tensors",
           "check_finite", "checkpoint_phase", "remove_stale_temps", "WorkDirLock"]

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
def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP / DataParallel / AveragedModel wrappers."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def load_model_weights(model: torch.nn.Module, path: PathLike, strict: bool = True, prefer_ema: bool = False
                       ) -> Dict[str, Any]:
    """Load the model weights of a training checkpoint (or a bare state dict) into ``model``.
    ``prefer_ema``: use the EMA weights when the checkpoint has them. Returns the checkpoint dict."""
    ckpt = load_checkpoint(path)
    state = _model_state(ckpt, prefer_ema)
    check_finite(state, path, " in the saved weights")
    try:
        unwrap_model(model).load_state_dict(state, strict=strict)
    except RuntimeError as e:
        raise PCEError(path, f"the weights do not fit the model built from the config ({_mismatch_summary(model, state)})",
                       "a checkpoint of the same model config") from e
    return ckpt


def _model_state(ckpt: Mapping[str, Any], prefer_ema: bool = False) -> Mapping[str, Any]:
    if prefer_ema and ckpt.get("ema"):
        return {k[len("module."):]: v for k, v in ckpt["ema"].items() if k.startswith("module.")}
    if "model" in ckpt and isinstance(ckpt["model"], Mapping):
        return ckpt["model"]
    if "state_dict" in ckpt and isinstance(ckpt["state_dict"], Mapping):
        return ckpt["state_dict"]
    return ckpt


def _mismatch_summary(model: torch.nn.Module, state: Mapping[str, Any]) -> str:
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


def load_pretrained(model: torch.nn.Module, path: PathLike, key: str = "model.pretrained") -> Dict[str, Any]:
    """Load the tensors of ``path`` whose names and shapes match ``model``; report the missing, unexpected and
    shape-mismatched ones. Raises :class:`PCEError` naming ``key`` when nothing matched. Returns
    ``{"matched", "total", "missing", "unexpected", "mismatched"}``."""
    ckpt = load_checkpoint(path)
    state = _model_state(ckpt)
    check_finite(state, f"{key}={path}", " in the pretrained weights")
    own = unwrap_model(model).state_dict()
    matched = {k: v for k, v in state.items()
               if k in own and isinstance(v, torch.Tensor) and v.shape == own[k].shape}
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
    msg = f"loaded pretrained weights from {path}: {len(matched)} of {len(own)} model tensors matched"
    if missing or unexpected or mismatched:
        details = [f"{len(v)} {n} ({', '.join(v[:3])}{', ...' if len(v) > 3 else ''})"
                   for n, v in (("missing", missing), ("unexpected", unexpected), ("shape-mismatched", mismatched))
                   if v]
        logger.warning("%s; %s", msg, "; ".join(details))
    else:
        logger.info(msg)
    return report


def checkpoint_phase(ckpt: Mapping[str, Any], phases_cfg: Any, total_epochs: int) -> Any:
    """The :class:`~pce.engine.phases.Phase` a checkpoint was saved in (its ``phase`` entry), falling back to the
    config's phase of its epoch for checkpoints without one. A config that disagrees is a warning naming both."""
    from pce.engine.phases import Phase, PhaseController, build_phases

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
        logger.warning("the checkpoint was saved in phase '%s' (%s) but the config puts its epoch %d in phase '%s' "
                       "(%s): evaluating in the checkpoint's phase '%s'", phase.name, phase.describe(), epoch,
                       from_cfg.name, from_cfg.describe(), phase.name)
    return phase


# ------------------------------------------------------------------------------------------- work dir
class WorkDirLock:
    """An exclusive ``fcntl.flock`` on ``work_dir/.lock`` for the lifetime of a run. The kernel drops it when the
    process dies, so a stale lock file never blocks; :meth:`release` removes the file (an acquirer checks that
    the file it locked is still the one at the path, so removal cannot let two runs in)."""

    NAME = ".lock"

    def __init__(self, work_dir: PathLike) -> None:
        self.dir = Path(work_dir)
        self.path = self.dir / self.NAME
        self._fd: Optional[int] = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "WorkDirLock":
        if self._fd is not None:
            return self
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: no lock
            return self
        self.dir.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(str(self.path), os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                try:
                    other = os.read(fd, 64).decode(errors="replace").strip() or "?"
                except OSError:  # pragma: no cover
                    other = "?"
                os.close(fd)
                if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise WorkDirError(self.dir, f"in use by another training (pid {other}, lock {self.path})",
                                       "one run per work dir: wait for it or pass another --work-dir") from None
                raise
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # the holder released and removed it meanwhile: lock the current file
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            import fcntl

            try:
                self.path.unlink()  # while still holding the lock
            except OSError:
                pass
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        finally:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "WorkDirLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.release()
        except Exception:
            pass


class CheckpointManager:
    """``latest.pth`` / ``best.pth`` (and optional ``epoch_N.pth``) in ``work_dir``; writes only when
    ``enabled`` (rank 0)."""

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
        """``True`` / ``"auto"`` -> ``latest.pth`` of the work dir; a path -> that file."""
        if not resume:
            return None
        if resume is True or str(resume) == "auto":
            if not self.latest.is_file():
                raise FileNotFoundError(f"--resume: no checkpoint to resume from: {self.latest} does not exist")
            return self.latest
        p = Path(resume)
        if p.is_dir():
            p = p / "latest.pth"
        if not p.is_file():
            raise FileNotFoundError(f"--resume: checkpoint not found: {p}")
        return p

