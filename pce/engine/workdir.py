"""The work-dir lock (one training per work dir, released when the run ends; flock: a dead process frees it) and
the earlier attempt's records set aside when a fresh run starts in a used work dir."""
from __future__ import annotations

import errno
import logging
import os
from pathlib import Path
from typing import Any, Optional, Union

from pce.engine.errors import WorkDirError

__all__ = ["WorkDirLock", "set_aside_records", "RECORDS", "PREVIOUS"]

logger = logging.getLogger("pce")

PathLike = Union[str, os.PathLike]

#: what a run records in its work dir and a fresh run must not append to: tools/summarize_runs.py, tools/run_study.py
#: and the reports read ``metrics.jsonl`` as ONE run's history (an earlier attempt's test record would make a run
#: that has just started look finished)
RECORDS = ("metrics.jsonl", "train.log", "tb")
PREVIOUS = "previous"


def set_aside_records(work_dir: PathLike) -> Optional[Path]:
    """Move the :data:`RECORDS` of an earlier attempt that exist in ``work_dir`` into ``work_dir/previous/<k>/``
    (``k`` = 1, 2, ...: the first free number), nothing deleted or overwritten. Called under the work-dir lock when
    a run starts fresh (no ``--resume``). Returns that folder, ``None`` when there was nothing to move."""
    work_dir = Path(work_dir)
    found = [work_dir / name for name in RECORDS if (work_dir / name).exists()]
    if not found:
        return None
    k = 1
    while (work_dir / PREVIOUS / str(k)).exists():
        k += 1
    dest = work_dir / PREVIOUS / str(k)
    dest.mkdir(parents=True)
    for path in found:
        os.replace(path, dest / path.name)  # same file system: a rename, never a copy
    return dest


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
