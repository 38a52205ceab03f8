"""User-facing errors and the one command-line error handler of the tools.

Every tool (``tools/train.py``, ``tools/eval.py``, ``tools/infer.py``, the analysis and image tools, ...) runs its
work through :func:`run_cli` (with :func:`add_debug_flag`):
an error of the user's input (config, data, checkpoint, work dir) is printed as one line::

    error: <file or key>: <what is wrong> (<what was expected>)

with a non-zero exit status; ``--debug`` shows the traceback instead. :class:`PCEError` builds such a line;
other exceptions (``ValueError`` from a dataset adapter, ``OSError`` of an unreadable image, a DataLoader worker's
re-raised exception, ...) are reduced to their last meaningful line.
"""
from __future__ import annotations

import argparse
import logging
import sys
import traceback
from typing import Any, Callable, Optional

__all__ = ["PCEError", "WorkDirError", "NonFiniteStateError", "one_line", "add_debug_flag", "run_cli"]


class PCEError(Exception):
    """An error of the user's input: ``PCEError(where, what, expected)`` reads
    ``<where>: <what> (<expected>)``."""

    def __init__(self, where: Any, what: str, expected: Optional[str] = None) -> None:
        self.where, self.what, self.expected = str(where), str(what), expected
        super().__init__(f"{where}: {what}" + (f" ({expected})" if expected else ""))


class WorkDirError(PCEError):
    """The work dir is in use by another run, or holds a finished run that would be overwritten."""


class NonFiniteStateError(PCEError, FloatingPointError):
    """A parameter or buffer of a model (or a checkpoint) is NaN or infinite."""


_MAX_LEN = 4000


def one_line(e: BaseException) -> str:
    """The message of ``e`` as one line (a DataLoader worker's wrapped exception: its original message)."""
    msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    msg = str(msg)
    if "Original Traceback" in msg:  # torch.utils.data re-raises worker exceptions with the remote traceback
        lines = [ln.strip() for ln in msg.splitlines() if ln.strip()]
        last = lines[-1] if lines else msg
        name, sep, rest = last.partition(": ")
        msg = rest if sep and name.replace(".", "").replace("_", "").isalnum() else last
    lines = [ln.strip() for ln in msg.splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    msg = "; ".join(lines)
    if isinstance(e, (MemoryError,)) or "out of memory" in msg.lower() or "can't allocate memory" in msg.lower():
        msg = f"out of memory: {msg} (a smaller input: data.max_input_size, data.batch_size or the image itself)"
    if len(msg) > _MAX_LEN:
        msg = msg[: _MAX_LEN - 3] + "..."
    return msg


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")


def run_cli(main: Callable[[], int], debug: bool = False) -> int:
    """Run ``main()``; any exception becomes one ``error: ...`` line on stderr and exit status 1 (2 for an
    unexpected internal error), or its traceback with ``debug``."""
    try:
        return int(main() or 0)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except SystemExit:
        raise
    except BaseException as e:  # noqa: BLE001 - the one place every error of a tool arrives
        if debug:
            traceback.print_exc()
        logging.getLogger("pce").debug("error", exc_info=True)
        internal = not isinstance(e, (PCEError, ValueError, KeyError, OSError, FloatingPointError, RuntimeError,
                                      TypeError, IndexError, MemoryError))
        prefix = f"{type(e).__name__}: " if internal else ""
        print(f"error: {prefix}{one_line(e)}" + ("" if debug else "  [--debug shows the traceback]"
                                                 if internal else ""), file=sys.stderr)
        return 2 if internal else 1
