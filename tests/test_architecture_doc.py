"""docs/ARCHITECTURE.md stays true: every Python block runs, and every file path it names exists."""
import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[1] / "docs" / "ARCHITECTURE.md"
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_snippet_runs(index):
    exec(compile(BLOCKS[index], f"ARCHITECTURE.md block {index}", "exec"), {"__name__": f"doc_block_{index}"})


def test_named_paths_exist():
    root = DOC.parents[1]
    paths = set(re.findall(r"`((?:pce|tasks|datasets|tools|configs)/[\w/]+(?:\.py)?/?)`", DOC.read_text()))
    missing = [p for p in sorted(paths) if not (root / p).exists()]
    assert len(paths) > 10 and not missing, missing


def test_has_blocks():
    assert len(BLOCKS) >= 6
