"""Shared argument/file checks for dataset adapters (messages always name the path)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence


def check_split(split: str, allowed: Sequence[str], dataset: str) -> str:
    """Return ``split`` if it is one of ``allowed``, else raise ValueError."""
    if split not in allowed:
        raise ValueError(f"{dataset}: split must be one of {list(allowed)}, got {split!r}")
    return split


def require_file(path: str | os.PathLike, what: str) -> Path:
    """Return ``path`` as a Path if it is a regular file, else raise FileNotFoundError naming it."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} not found: expected a file at {p}")
    return p
