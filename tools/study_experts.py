"""Do a study run's experts differ? (issue #26: "a variant whose experts are copies cannot be said to route")

``tools/run_study.py`` makes sure every finished run with a ``best.pth`` has ``<run>/experts.json``, the JSON of
``tools/analyze_experts.py <run>/config.json --checkpoint <run>/best.pth --split val --num N``; a model without a
routed layer (the dense twin, CondConv-only variants) gets ``{"routed": false}`` there instead, so it is not asked
again. ``summary.md`` shows per run the cells of :func:`expert_cells` and per variant :func:`verdict_counts`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from pce.analysis.seeds import COPY_COSINE  # one threshold for "copies", here and in analyze_routing --seeds

ROOT = Path(__file__).resolve().parent.parent
EXPERTS_FILE = "experts.json"
NOT_ROUTED = "the model has no routed layer"  # analyze_experts' error for a model without routed layers
# The verdicts. "copies": the experts of every routed layer are near-identical kernels (lowest pairwise cosine of the
# flattened kernels, over all layers, at least COPIES_KERNEL_COS) computing near-identical outputs on the same
# patches (lowest pairwise output cosine at least COPIES_OUTPUT_COS: per-expert batch norms can make copies of one
# kernel compute different things) AND forcing any single expert on every patch moves the config's eval metric by
# less than COPIES_METRIC_DELTA (absolute, in the metric's units) from the routed model's. "differ": some forced
# expert moves the metric by COPIES_METRIC_DELTA or more. "differ, metric unchanged": the experts compute different
# things but no forced expert moves the metric (the routing does not matter for it, on the analysed samples).
# "?" when the numbers needed to decide are missing.
COPIES_KERNEL_COS = COPY_COSINE
COPIES_OUTPUT_COS = COPY_COSINE
COPIES_METRIC_DELTA = 0.005
VERDICTS = ("copies", "differ", "differ, metric unchanged", "?")


def analysis_command(run_dir: Path, num: int) -> List[str]:
    """The ``tools/analyze_experts.py`` argv of one run (this interpreter, relative to the repository root);
    ``--force`` replaces a stale ``experts.json`` (only runs that :func:`needs_analysis` are analysed)."""
    run_dir = Path(run_dir)
    argv = [sys.executable, "tools/analyze_experts.py", str(run_dir / "config.json"), "--checkpoint",
            str(run_dir / "best.pth"), "--split", "val", "--num", str(num), "--out", str(run_dir / EXPERTS_FILE)]
    return argv + (["--force"] if (run_dir / EXPERTS_FILE).is_file() else [])


def run_analysis(argv: List[str], env: Dict[str, str]) -> subprocess.CompletedProcess:
    """Run one analysis in the repository root, its output captured (replaced by the tests)."""
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True)


def _write_json(path: Path, data: Dict[str, Any]) -> None:
    from pce.tasks.atomic_io import atomic_write

    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=1) + "\n"))


def analysed_num(run_dir: Path) -> Optional[int]:
    """The ``--num`` a run's ``experts.json`` answered: its ``num_requested`` (written by tools/analyze_experts.py),
    else its ``num_samples`` (older files); ``None`` for a model without routed layers or a file without either."""
    try:
        data = json.loads((Path(run_dir) / EXPERTS_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    num = data.get("num_requested", data.get("num_samples"))
    return num if isinstance(num, int) and not isinstance(num, bool) else None


def needs_analysis(run_dir: Path, num: Optional[int] = None) -> bool:
    """A finished run (a test record) with ``best.pth`` and no ``experts.json`` yet, one older than ``best.pth``,
    or (given ``num``) one that analysed another number of samples: asking for more samples analyses again."""
    from study_records import run_state

    run_dir = Path(run_dir)
    best, done = run_dir / "best.pth", run_dir / EXPERTS_FILE
    if run_state(run_dir) != "finished" or not best.is_file():
        return False
    # an analysis older than the checkpoint (the run trained again) is stale
    if not done.is_file() or done.stat().st_mtime < best.stat().st_mtime:
        return True
    return num is not None and analysed_num(run_dir) not in (None, num)


def ensure_experts(run_dir: Path, num: int, threads: Optional[int] = None) -> str:
    """Analyse one run into ``experts.json``; returns what happened (``analysed``, ``not routed`` — cached as
    ``{"routed": false}`` — or ``failed: <the tool's last error line>``, nothing written)."""
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    try:
        proc = run_analysis(analysis_command(run_dir, num), env)
    except (OSError, subprocess.SubprocessError) as e:  # the interpreter could not be started: say so, go on
        return f"failed: {type(e).__name__}: {e}"
    if proc.returncode == 0 and (Path(run_dir) / EXPERTS_FILE).is_file():
        return "analysed"
    err = (proc.stderr or "") + (proc.stdout or "")
    if NOT_ROUTED in err:
        _write_json(Path(run_dir) / EXPERTS_FILE, {"routed": False, "reason": NOT_ROUTED})
        return "not routed"
    lines = [ln.strip() for ln in err.splitlines() if ln.strip()]
    last = next((ln for ln in reversed(lines) if ln.startswith("error:")), lines[-1] if lines else "no output")
    return f"failed (exit {proc.returncode}): {last}"


def ensure_all(run_dirs: Sequence[Path], num: int, threads: Optional[int] = None) -> Dict[str, str]:
    """:func:`ensure_experts` for every run of ``run_dirs`` that :func:`needs_analysis` on ``num`` samples, one
    printed line each (a failure names the run and the study goes on). Returns ``{run name: outcome}``."""
    from tqdm import tqdm

    todo = [Path(d) for d in run_dirs if needs_analysis(d, num)]
    out: Dict[str, str] = {}
    for i, run_dir in enumerate(tqdm(todo, desc="experts", unit="run", file=sys.stderr, disable=None), 1):
        out[run_dir.name] = ensure_experts(run_dir, num, threads)
        print(f"[experts {i}/{len(todo)}] {run_dir.name}: {out[run_dir.name]}", flush=True)
    return out


def _metric_values(summary: Dict[str, Any], metric: str) -> Dict[str, Optional[float]]:
    """``routed``, ``shuffled``, ``forced_min``, ``forced_max`` of the metric (the plan's, else the one metric the
    analysis scored: its keys are named after the config's eval.metric)."""
    if f"{metric}_routed" not in summary:
        scored = [k[: -len("_routed")] for k in summary if k.endswith("_routed")]
        metric = scored[0] if len(scored) == 1 else metric
    return {k: summary.get(f"{metric}_{k}") for k in ("routed", "shuffled", "forced_min", "forced_max")}


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def expert_cells(run_dir: Path, metric: str) -> Optional[Dict[str, Any]]:
    """The numbers of a run's ``experts.json``: ``kernel_cos_min`` (lowest pairwise kernel cosine of any layer),
    ``output_cos_min`` (lowest pairwise output cosine of any layer with two or more experts), ``forced_delta``
    (max |metric forced - metric routed| over the experts), ``shuffled_delta`` (metric shuffled - routed) and
    ``verdict``; ``{"routed": False}`` for a model without routed layers; ``None`` without a (readable) file."""
    path = Path(run_dir) / EXPERTS_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    if data.get("routed") is False:
        return {"routed": False}
    summary, diversity = data.get("summary") or {}, data.get("diversity") or {}
    if not isinstance(summary, dict) or not isinstance(diversity, dict):
        return None  # not what analyze_experts writes: shown as "not analysed"
    outs = [d["output_cosine_min"] for d in diversity.values() if isinstance(d, dict)
            and _number(d.get("num_experts", 0)) and d.get("num_experts", 0) > 1 and _number(d.get("output_cosine_min"))]
    summary = {k: v for k, v in summary.items() if _number(v)}  # a malformed value reads as missing ("?")
    m = _metric_values(summary, metric)
    forced = None
    if m["routed"] is not None and m["forced_min"] is not None and m["forced_max"] is not None:
        forced = max(abs(m["forced_max"] - m["routed"]), abs(m["forced_min"] - m["routed"]))
    shuffled = m["shuffled"] - m["routed"] if m["shuffled"] is not None and m["routed"] is not None else None
    kernel = summary.get("expert_weight_cos_min")
    return {"routed": True, "kernel_cos_min": kernel, "output_cos_min": min(outs) if outs else None,
            "forced_delta": forced, "shuffled_delta": shuffled,
            "verdict": verdict(kernel, min(outs) if outs else None, forced)}


def verdict(kernel_cos_min: Optional[float], output_cos_min: Optional[float], forced_delta: Optional[float]) -> str:
    """One of :data:`VERDICTS` (see the constants above)."""
    if forced_delta is not None and forced_delta >= COPIES_METRIC_DELTA:
        return "differ"
    if any(v is not None and v < lim for v, lim in ((kernel_cos_min, COPIES_KERNEL_COS),
                                                   (output_cos_min, COPIES_OUTPUT_COS))):
        return "differ, metric unchanged" if forced_delta is not None else "?"
    if kernel_cos_min is None or output_cos_min is None or forced_delta is None:
        return "?"
    return "copies"


def _num(v: Optional[float], signed: bool = False) -> str:
    return "-" if v is None else (f"{v:+.4f}" if signed else f"{v:.4f}")


def markdown_cells(cells: Optional[Dict[str, Any]]) -> str:
    """The five table cells (kernel cos min | output cos min | forced Δ max | shuffled Δ | experts) of a run."""
    if cells is None:
        return "- | - | - | - | not analysed"
    if not cells["routed"]:
        return "- | - | - | - | -"
    return (f"{_num(cells['kernel_cos_min'])} | {_num(cells['output_cos_min'])} | {_num(cells['forced_delta'])} | "
            f"{_num(cells['shuffled_delta'], signed=True)} | {cells['verdict']}")


def verdict_counts(cells: List[Optional[Dict[str, Any]]]) -> str:
    """A variant's verdicts over its finished runs, e.g. ``copies 5/5`` or ``copies 2/5, differ 3/5``; ``-`` when
    none of them routes, ``not analysed`` when none has an ``experts.json``."""
    n = len(cells)
    got = [c["verdict"] for c in cells if c is not None and c.get("routed")]
    if not got:
        return "-" if any(c is not None for c in cells) else "not analysed"
    return ", ".join(f"{v} {got.count(v)}/{n}" for v in VERDICTS if got.count(v))
