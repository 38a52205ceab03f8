"""The layers of docs/ARCHITECTURE.md, checked by import-linter (contracts: ``[tool.importlinter]`` in pyproject.toml).

import-linter builds its graph with grimp, which names each module by its folder under the root package's
``__path__`` (``pce/`` here) and rejects a subpackage of a regular package as a root. ``pce.tasks`` and
``pce.datasets`` are installed from ``tasks/`` and ``datasets/`` (``package-dir``), so grimp would not see them, and
would silently drop every import of them. The check therefore runs in a *view*: a temporary folder with a copy of
pyproject.toml and a ``pce/`` holding a symlink to every entry of the real ``pce/`` plus ``tasks`` -> ``tasks/`` and
``datasets`` -> ``datasets/``. ``lint-imports`` puts its working folder first on ``sys.path`` (ahead of the editable
install's finder) and grimp follows symlinks (grimp >= 3.3), so the view is the package it checks. The layers
contract names ``pce.tasks`` and ``pce.datasets``: a view that failed to show them stops with "Missing layer"
instead of passing.

By hand: ``python tests/test_import_contracts.py`` (prints lint-imports' report on the repository).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"


def _pyproject() -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: import-linter depends on tomli there
        import tomli as tomllib
    return tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))


def _out_of_tree() -> dict[str, Path]:
    """``{"tasks": ROOT / "tasks", ...}``: the subpackages of pce installed from elsewhere (``package-dir``)."""
    package_dir = _pyproject()["tool"]["setuptools"]["package-dir"]
    return {name[len("pce."):]: ROOT / folder for name, folder in package_dir.items()
            if name.startswith("pce.") and (ROOT / folder).resolve() != (ROOT / "pce" / name[len("pce."):]).resolve()}


def _lint_imports_command() -> list[str]:
    """The environment's ``lint-imports`` console script (or the same click command through ``python -c``)."""
    script = Path(sysconfig.get_path("scripts")) / ("lint-imports.exe" if os.name == "nt" else "lint-imports")
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command as c; sys.exit(c())"]


def _lint_imports(cwd: Path, capture: bool = True) -> subprocess.CompletedProcess:
    """``lint-imports`` on the ``pce`` package and the ``pyproject.toml`` found in ``cwd``."""
    env = dict(os.environ, COLUMNS="250", NO_COLOR="1", TERM="dumb")  # rich: no wrapping, no colour codes
    return subprocess.run(_lint_imports_command() + ["--no-cache"], cwd=cwd, env=env, capture_output=capture,
                          text=True, timeout=300)


def _symlink(target: Path, link: Path) -> None:
    try:
        link.symlink_to(target, target_is_directory=target.is_dir())
    except OSError as e:  # e.g. Windows without the symlink privilege
        pytest.skip(f"cannot create symlinks here: {e}")


def make_view(dest: Path) -> Path:
    """``dest/pce`` = the installed package ``pce`` as a folder tree (symlinks), plus a copy of the config."""
    pkg = dest / "pce"
    pkg.mkdir(parents=True)
    out_of_tree = _out_of_tree()
    assert {"tasks", "datasets"} <= set(out_of_tree), out_of_tree
    for entry in sorted((ROOT / "pce").iterdir()):
        if entry.name != "__pycache__" and entry.name not in out_of_tree:
            _symlink(entry, pkg / entry.name)
    for name, folder in out_of_tree.items():
        _symlink(folder, pkg / name)
    shutil.copy(PYPROJECT, dest / "pyproject.toml")
    return dest


def _contracts() -> list[dict]:
    return _pyproject()["tool"]["importlinter"]["contracts"]


def test_repository_keeps_the_import_contracts(tmp_path):
    pytest.importorskip("importlinter", reason="import-linter is a dev extra: pip install -e .[dev]")
    res = _lint_imports(make_view(tmp_path))
    assert res.returncode == 0, f"lint-imports failed:\n{res.stdout}\n{res.stderr}"
    assert "Missing layer" not in res.stdout
    for contract in _contracts():
        assert f"{contract['name']} KEPT" in res.stdout


# A throwaway package ``pce`` with every module the contracts name. Its imports are all legal: importing the
# top-level ``pce`` (whose __init__ re-exports models, moe, layers and registry, like the real one) is fine from
# tasks, engine, analysis and models, so the first run proves those raise no false violation.
_LEGAL = {
    "pce/__init__.py": "from pce import models, moe, layers, registry\n",
    "pce/backbone/__init__.py": "import pce.models\n",
    "pce/tasks/ok.py": "import pce\nimport pce.engine\nimport pce.analysis\nimport pce.datasets\nimport pce.backbone\n",
    "pce/engine/ok.py": "import pce\nimport pce.models\nimport pce.registry\n",
    "pce/analysis/ok.py": "import pce\nfrom pce.models import ok\n",
    "pce/datasets/ok.py": "from pce.registry import ok\nimport numpy\n",
    "pce/models/ok.py": "import pce\nimport pce.moe\n",
    "pce/moe/ok.py": "from pce.layers import ok\n",
    "pce/layers/ok.py": "import pce.registry\n",
    "pce/registry/ok.py": "import os\n",
}
# Then one deliberate violation per rule, and what lint-imports must report for it, by contract id.
_ILLEGAL = {
    "pce/moe/upward.py": "import pce.tasks\n",                        # a lower layer imports a higher one
    "pce/engine/sibling.py": "from pce.analysis import ok\n",         # independent siblings
    "pce/analysis/data.py": "import pce.datasets\n",                  # analysis imports no datasets
    "pce/registry/up.py": "import pce.layers\n",                      # registry imports nothing of pce
    "pce/unlisted/__init__.py": "",                                   # a subpackage in no layer (exhaustive)
    "pce/datasets/via_root.py": "import pce\n",                       # pce/__init__ pulls in pce.models
    "pce/datasets/direct.py": "from pce.moe import ok\n",
    "pce/layers/script.py": "import tools.train\n",                   # tools/ are scripts: nothing imports them
}
_REPORTED = {
    "layers": ["pce.moe.upward -> pce.tasks", "pce.engine.sibling -> pce.analysis", "pce.analysis.data -> pce.datasets",
               "pce.registry.up -> pce.layers", "pce.unlisted"],
    "datasets": ["pce.datasets.via_root -> pce", "pce.datasets.direct -> pce.moe"],
    "no-tools": ["pce.layers.script -> tools"],
}


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_contracts_reject_illegal_imports(tmp_path):
    pytest.importorskip("importlinter", reason="import-linter is a dev extra: pip install -e .[dev]")
    contracts = _contracts()
    assert sorted(c["id"] for c in contracts) == sorted(_REPORTED), "give every contract a violation to catch here"
    modules = set()
    for c in contracts:
        for container in c.get("containers", []):
            for layer in c.get("layers", []) + c.get("exhaustive_ignores", []):
                modules.update(f"{container}.{m.strip(' ()')}" for m in layer.replace(":", "|").split("|"))
        modules.update(c.get("source_modules", []) + c.get("forbidden_modules", []))
    tree = {f"{m.replace('.', '/')}/__init__.py": "" for m in modules if m.startswith("pce.")}
    tree.update(_LEGAL)
    _write(tmp_path, tree)
    shutil.copy(PYPROJECT, tmp_path / "pyproject.toml")  # the repository's config, unchanged: it names `pce`

    legal = _lint_imports(tmp_path)
    assert legal.returncode == 0, f"false violations:\n{legal.stdout}\n{legal.stderr}"

    _write(tmp_path, _ILLEGAL)
    illegal = _lint_imports(tmp_path)
    assert illegal.returncode != 0
    out = illegal.stdout
    for c in contracts:
        assert f"{c['name']} BROKEN" in out, out
    # the report: one section per broken contract, headed by its name underlined with dashes
    headings = sorted((out.index(f"\n{c['name']}\n{'-' * len(c['name'])}\n"), c["id"]) for c in contracts)
    ends = [start for start, _ in headings[1:]] + [len(out)]
    sections = {cid: out[start:end] for (start, cid), end in zip(headings, ends)}
    for cid, expected in _REPORTED.items():
        for text in expected:
            assert text in sections[cid], f"contract {cid!r} does not report {text!r}:\n{out}"


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as tmp:
        sys.exit(_lint_imports(make_view(Path(tmp)), capture=False).returncode)
