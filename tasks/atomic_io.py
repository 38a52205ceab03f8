"""Atomic output files: a crash, a ``kill -9`` or a full disk leaves the previous file or none, never half a file.

Every writer goes through :func:`atomic_path`: the content is written to a temp file beside the target
(``.<stem>.<pid>.tmp<suffix>``: hidden, and with the target's suffix so that writers choosing the format from it,
such as ``cv2.imwrite``, still do), ``fsync``'ed, then ``os.replace``'d onto the target (atomic within one folder).
A failed write removes the temp file and raises :class:`~pce.engine.errors.PCEError` naming the target::

    with atomic_path(out / "x_heatmap.png") as tmp:
        ...write tmp...
    atomic_write_bytes(out / "x.bin", data)
    atomic_save_npy(out / "x_prob.npy", array)
    atomic_write_png(out / "x_heatmap.png", rgb)      # cv2's silent ``False`` becomes an error naming the file

A process killed between the write and the rename leaves its temp file; :func:`remove_stale_temps` removes the
temp files of given outputs whose process is gone.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, List, Union

import numpy as np

from pce.engine.errors import PCEError, one_line

__all__ = ["atomic_path", "atomic_write", "atomic_write_bytes", "atomic_save_npy", "atomic_write_png",
           "temp_name", "remove_stale_temps"]

PathLike = Union[str, os.PathLike]


def temp_name(path: PathLike, pid: int | None = None) -> Path:
    """The temp file of ``path`` for process ``pid`` (default: this one): ``.<stem>.<pid>.tmp<suffix>``."""
    path = Path(path)
    return path.with_name(f".{path.stem}.{os.getpid() if pid is None else int(pid)}.tmp{path.suffix}")


def _fail(path: Path, e: BaseException) -> PCEError:
    return PCEError(path, f"could not be written ({one_line(e)})", "free disk space and a writable output folder")


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield the temp path to write ``path``'s content to; on leaving the block it is flushed to disk and renamed
    onto ``path``. An exception in the block or a failed rename removes the temp file; ``OSError`` /
    ``ValueError`` (a full disk, a read-only folder, an encoder error) become a ``PCEError`` naming ``path``."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        if not tmp.is_file():
            raise OSError(f"the writer produced no file {tmp.name}")
        with open(tmp, "rb+") as f:  # on disk before the rename: a power cut leaves the old file, not an empty one
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except PCEError:
        tmp.unlink(missing_ok=True)
        raise
    except (OSError, ValueError, TypeError, RuntimeError, MemoryError) as e:
        tmp.unlink(missing_ok=True)
        raise _fail(path, e) from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write(path: PathLike, write: Callable[[Path], Any]) -> Path:
    """``write(tmp)`` inside :func:`atomic_path`; returns ``path``."""
    with atomic_path(path) as tmp:
        write(tmp)
    return Path(path)


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns ``path``."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(bytes(data)))


def atomic_save_npy(path: PathLike, array: np.ndarray) -> Path:
    """``np.save`` of ``array`` to ``path`` (a ``.npy`` file) atomically; returns ``path``."""
    buf = io.BytesIO()
    np.save(buf, np.asarray(array), allow_pickle=False)
    return atomic_write_bytes(path, buf.getbuffer())


def atomic_write_png(path: PathLike, rgb: np.ndarray, compression: int = 9) -> Path:
    """Encode ``rgb`` (``uint8 [h, w, 3]`` RGB, or ``[h, w]``) as PNG and write it to ``path`` atomically;
    an encoder failure (``cv2`` returns ``False`` without a word) is a ``PCEError`` naming ``path``."""
    import cv2

    img = np.ascontiguousarray(rgb[..., ::-1] if rgb.ndim == 3 else rgb)
    ok, buf = cv2.imencode(".png", img, [cv2.IMWRITE_PNG_COMPRESSION, int(compression)])
    if not ok:
        raise PCEError(path, f"PNG encoding of a {img.shape} {img.dtype} image failed", "a uint8 RGB image")
    return atomic_write_bytes(path, buf.tobytes())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_temps(paths: Iterable[PathLike]) -> List[Path]:
    """Remove the temp files of ``paths`` left by processes that no longer run (a ``kill -9`` between a write
    and its rename); returns the removed files."""
    by_folder: dict = {}
    for p in map(Path, paths):
        by_folder.setdefault(p.parent, []).append(p)
    removed = []
    for folder, outs in by_folder.items():
        if not folder.is_dir():
            continue
        pattern = re.compile("|".join(rf"^\.{re.escape(p.stem)}\.(\d+)\.tmp{re.escape(p.suffix)}$" for p in outs))
        for f in folder.iterdir():
            m = pattern.match(f.name) if f.name.startswith(".") else None
            pid = next((int(g) for g in m.groups() if g), None) if m else None
            if pid is not None and pid != os.getpid() and not _alive(pid):
                f.unlink(missing_ok=True)
                removed.append(f)
    return removed
