"""The work-dir lock: one training per work dir, released when the run ends (flock: a dead process frees it)."""
from __future__ import annotations

import errno
import logging
import os
from pathlib import Path
from typing import Any, Optional, Union

from pce.engine.errors import WorkDirError

__all__ = ["WorkDirLock"]

logger = logging.getLogger("pce")

PathLike = Union[str, os.PathLike]


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
