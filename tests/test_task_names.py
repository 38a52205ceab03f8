"""No code outside a task's own folder switches on a task's name: each task says what it does (its adapter in
``tasks/<name>/``, reached through ``pce.tasks.get_task(cfg.task)``), nobody asks "which task is this?".

Flagged, in ``pce/``, ``tasks/``, ``datasets/`` and ``tools/``: a task name (a package ``tasks/<name>/`` with a
``task.py``: classification, detection, segmentation, ...) as a string constant that is

* an operand of a comparison: ``task == "detection"``, ``cfg.task in ("detection", "segmentation")``, or a
  module-level tuple / list / set of names used that way (``if task in DENSE_TASKS``);
* a ``case`` pattern of a ``match`` statement;
* a key of a dict literal (or a keyword of ``dict(...)``): a per-task dispatch table.

Allow-list (everything else):

* ``tasks/<name>/`` may use its own name (``name = "detection"`` and comparisons of it);
* call arguments and assignments are not switches: registering or looking up one registered thing
  (``@register_task("detection")``, ``@TRANSFORMS.register("classification")`` in datasets/transforms.py, a
  transform named like a task; ``get_task("segmentation")``) and defaults (``_C.task = "classification"``);
* docstrings, comments and messages.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("pce", "tasks", "datasets", "tools")


def task_names(root: Path = ROOT) -> set[str]:
    return {p.parent.name for p in (root / "tasks").glob("*/task.py")}


def _named(node: ast.AST, names: set[str], consts: dict[str, set[str]]) -> set[str]:
    """The task names a comparison operand stands for: a literal, a literal collection, or a module constant."""
    if isinstance(node, ast.Constant):
        return {node.value} & names if isinstance(node.value, str) else set()
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return set().union(*(_named(e, names, consts) for e in node.elts))
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in {
            "frozenset", "set", "tuple", "list"} and len(node.args) == 1:
        return _named(node.args[0], names, consts)
    if isinstance(node, ast.Name):
        return consts.get(node.id, set())
    return set()


def task_switches(path: Path, names: set[str]) -> list[tuple[int, str, set[str]]]:
    """``(line, construct, names)`` for every switch on a task name in one file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    consts: dict[str, set[str]] = {}
    for stmt in tree.body:  # module-level names of task names: DENSE_TASKS = ("detection", "segmentation")
        if isinstance(stmt, (ast.Assign, ast.AnnAssign)) and stmt.value is not None:
            found = _named(stmt.value, names, {})
            targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
            consts.update({t.id: found for t in targets if isinstance(t, ast.Name) and found})
    hits = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            found = set().union(*(_named(op, names, consts) for op in [node.left, *node.comparators]))
            if found:
                hits.append((node.lineno, "comparison", found))
        elif isinstance(node, ast.match_case):
            found = {n.value for n in ast.walk(node.pattern) if isinstance(n, ast.Constant) and n.value in names}
            if found:
                hits.append((node.pattern.lineno, "match case", found))
        elif isinstance(node, ast.Dict):
            found = set().union(*(_named(k, names, {}) for k in node.keys if isinstance(k, ast.Constant)))
            if found:
                hits.append((node.lineno, "dict key", found))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict":
            found = {kw.arg for kw in node.keywords if kw.arg in names}
            if found:
                hits.append((node.lineno, "dict key", found))
    return sorted(hits, key=lambda h: h[0])


def find_task_switches(root: Path = ROOT) -> list[str]:
    names = task_names(root)
    out = []
    for top in SCANNED:
        for path in sorted((root / top).rglob("*.py")):
            rel = path.relative_to(root)
            own = {rel.parts[1]} if top == "tasks" and len(rel.parts) > 2 else set()
            lines = path.read_text(encoding="utf-8").splitlines()
            for line, what, found in task_switches(path, names):
                if found - own:
                    out.append(f"{rel.as_posix()}:{line}: {what} on {sorted(found - own)}: {lines[line - 1].strip()}")
    return out


def test_task_names_are_found():
    assert {"classification", "detection", "segmentation"} <= task_names()


def test_the_checker_flags_switches(tmp_path):
    src = tmp_path / "tasks" / "detection"
    src.mkdir(parents=True)
    (src / "task.py").write_text('name = "detection"\nok = name == "detection"\n')
    (tmp_path / "tasks" / "classification").mkdir()
    (tmp_path / "tasks" / "classification" / "task.py").write_text("")
    (tmp_path / "tools").mkdir()
    (tmp_path / "tools" / "t.py").write_text(
        'DENSE = ("detection",)\n'
        'def f(task, cfg):\n'
        '    """Handles "classification" and "detection"."""\n'
        '    get_task("detection"); cfg.task = "classification"\n'
        '    if task == "detection": pass\n'
        '    if cfg.task in ("classification", "x"): pass\n'
        '    if task in DENSE: pass\n'
        '    fn = {"classification": 1}[task]\n'
        '    match task:\n'
        '        case "classification" | "y": pass\n'
        '    raise ValueError(f"no {task!r}; known: detection")\n')
    flagged = [h.split(": ")[0] for h in find_task_switches(tmp_path)]
    assert flagged == [f"tools/t.py:{n}" for n in (5, 6, 7, 8, 10)], flagged


def test_no_code_switches_on_a_task_name():
    hits = find_task_switches()
    assert not hits, ("switch on a task name outside its tasks/<name>/ (ask the task adapter instead):\n"
                      + "\n".join(hits))
