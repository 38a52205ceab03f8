"""A study's records (issue #26; ``tools/run_study.py`` runs it): the state of one run's work dir, the stop-at-half
decision from ``metrics.jsonl``, and the ``summary.md`` of a stage (per-run rows, seed groups with Welch's
comparison through ``tools/summarize_runs.py``, the ranking)."""
from __future__ import annotations

import importlib.util
import json
import math
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional

from pce.engine.errors import PCEError
from study_experts import analysed_num, expert_cells, markdown_cells, verdict_counts

if TYPE_CHECKING:
    from pce.analysis.study_figure import StudyRow

ROOT = Path(__file__).resolve().parent.parent
STOP_FILE = "study_stop.json"


def _summarize_runs():
    spec = importlib.util.spec_from_file_location("pce_tool_summarize_runs", ROOT / "tools" / "summarize_runs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_metrics(work_dir: Path) -> List[dict]:
    """The records of ``work_dir/metrics.jsonl`` ([] without one; a half-written last line is ignored)."""
    path = Path(work_dir) / "metrics.jsonl"
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict):
                rows.append(row)
    return rows


def run_state(work_dir: Path) -> str:
    """``finished`` (a test record), ``stopped`` (study_stop.json), ``partial`` (a checkpoint) or ``new``."""
    work_dir = Path(work_dir)
    if any(r.get("type") == "test" for r in read_metrics(work_dir)):
        return "finished"
    if (work_dir / STOP_FILE).is_file():
        return "stopped"
    if (work_dir / "latest.pth").is_file() or (work_dir / "best.pth").is_file():
        return "partial"
    return "new"


def read_stop(work_dir: Path) -> Dict[str, Any]:
    """The stop decision ``work_dir/study_stop.json`` (``{epoch, value, reference, stop}``); a malformed one is a
    :class:`PCEError` naming the file."""
    path = Path(work_dir) / STOP_FILE
    try:
        stop = json.loads(path.read_text())
        if not all(isinstance(stop.get(k), (int, float)) for k in ("epoch", "value", "reference")):
            raise ValueError("missing or non-numeric epoch / value / reference")
    except (OSError, ValueError, AttributeError) as e:
        raise PCEError(path, f"not a stop decision ({e})",
                       '{"epoch": E, "value": V, "reference": R, "stop": true} as tools/run_study.py writes it; '
                       "delete it to run the variant again") from None
    return stop


def _best(rows: List[dict], metric: str, mode: str, upto: int) -> Optional[float]:
    vals = [r[metric] for r in rows if r.get("type") == "val" and r.get("epoch", 0) <= upto
            and isinstance(r.get(metric), (int, float))]
    return (max if mode == "max" else min)(vals) if vals else None


def half_check(run_dir: Path, ref_dir: Path, epochs: int, metric: str, mode: str, margin: float) -> Optional[dict]:
    """The stop-at-half decision: ``None`` while undecided (no validation at or after ``ceil(epochs / 2)`` yet, in
    the run or the reference), else ``{"epoch", "value", "reference", "stop"}``: the run's and the reference's best
    ``metric`` up to the run's first validation epoch at or after half, ``stop`` when the run is behind by more than
    ``margin``."""
    half = math.ceil(epochs / 2)
    rows, ref = read_metrics(run_dir), read_metrics(ref_dir)
    at = [r["epoch"] for r in rows if r.get("type") == "val" and r.get("epoch", 0) >= half and metric in r]
    if not at:
        return None
    epoch = min(at)
    ref_reached = any(r.get("type") == "val" and r.get("epoch", 0) >= epoch for r in ref)
    value, reference = _best(rows, metric, mode, epoch), _best(ref, metric, mode, epoch)
    if not ref_reached or reference is None:
        return None
    behind = reference - value if mode == "max" else value - reference
    return {"epoch": epoch, "value": value, "reference": reference, "stop": behind > margin}



def _fmt(values: List[float]) -> str:
    import statistics

    mean = statistics.mean(values)
    return f"{mean:.4f}" + (f" ± {statistics.stdev(values):.4f}" if len(values) > 1 else "")


def summary_markdown(plan: Dict[str, Any], stage: str, runs: List[tuple], root: Path,
                     commands: Dict[tuple, List[str]]) -> str:
    """The study's summary: one row per run (state, best / final metric, its experts' diversity from
    ``experts.json``: tools/study_experts.py, the command that reproduces it), the seed groups of the finished
    runs (mean ± std, the experts' verdicts) with Welch's comparison against the reference, and the ranking
    of the variants by best metric with the two best non-baseline variants named (the candidates for ``final``)."""
    sr, metric, mode = _summarize_runs(), plan["metric"], plan.get("mode", "max")
    nums = sorted({n for n in (analysed_num(root / f"{r[0]}_s{r[1]}") for r in runs) if n is not None})
    analysed = (f" Expert columns: `tools/analyze_experts.py` on (up to) the first {' / '.join(map(str, nums))} "
                f"validation samples of each run (the plan's `experts_num`, or `--experts-num`)." if nums else "")
    lines = [f"# {plan['study']}: {stage}", "", f"Metric: {metric} ({mode}). Reference: {plan['reference']}.{analysed}",
             "",
             f"| run | state | best {metric} (epoch) | final | epochs | wall min | kernel cos min | output cos min "
             f"| forced Δ max | shuffled Δ | experts | command |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    done: Dict[str, List[dict]] = {}
    bests: Dict[str, List[float]] = {}
    for name, seed in runs:
        wd = root / f"{name}_s{seed}"
        state = run_state(wd)
        if state == "stopped":
            stop = read_stop(wd)
            state = f"stopped at half: {stop['value']:.4f} vs {stop['reference']:.4f} (epoch {stop['epoch']})"
        try:
            row = sr.summarize(wd, metric)
        except PCEError:
            row = None
        cells = (f"{row['best']:.4f} ({row['best_epoch']}) | {row['final']:.4f} | {row['epochs']} | "
                 f"{row['minutes']:.1f}") if row else "- | - | - | -"
        experts = expert_cells(wd, metric)
        lines.append(f"| {wd.name} | {state} | {cells} | {markdown_cells(experts)} | "
                     f"`{shlex.join(commands[(name, seed)])}` |")
        if row:
            bests.setdefault(name, []).append(row["best"])
            if state == "finished":
                done.setdefault(name, []).append({**row, "experts": experts})
    lines += _group_tables(sr, plan, done)
    ranked = sorted(bests, key=lambda n: sum(bests[n]) / len(bests[n]), reverse=mode == "max")
    picks = [n for n in ranked if n not in plan.get("baselines", [])][:2]
    lines += ["", f"Ranking by best {metric} (mean over seeds, stopped runs included): "
              + ", ".join(f"{n} {_fmt(bests[n])}" for n in ranked) + ".",
              f"Best two non-baseline variants: {', '.join(picks) or '-'}.", ""]
    return "\n".join(lines)


def _group_tables(sr, plan: Dict[str, Any], done: Dict[str, List[dict]]) -> List[str]:
    metric, ref = plan["metric"], plan["reference"]
    lines = ["", f"| variant | finished seeds | final {metric} (mean ± std) | best {metric} | experts |",
             "| --- | --- | --- | --- | --- |"]
    for name, rows in done.items():
        lines.append(f"| {name} | {len(rows)} | {_fmt([r['final'] for r in rows])} | {_fmt([r['best'] for r in rows])} "
                     f"| {verdict_counts([r.get('experts') for r in rows])} |")
    for against in [ref] + [b for b in plan.get("baselines", []) if b != ref]:   # the dense twin, then CondConv
        base = done.get(against, [])
        others = [(n, rows) for n, rows in done.items() if n != against and len(rows) > 1]
        if len(base) < 2 or not others:
            continue
        lines += ["", f"| variant vs {against} | final {metric}: difference of means [95% CI], Welch p "
                      f"| best {metric} |", "| --- | --- | --- |"]
        for name, rows in others:
            cells = []
            for key in ("final", "best"):
                cells.append(sr.welch_cell(sr.welch([r[key] for r in rows], [r[key] for r in base])))
            lines.append(f"| {name} | {cells[0]} | {cells[1]} |")
    return lines


def figure_rows(plan: Dict[str, Any], stage: str, runs: List[tuple], root: Path) -> List["StudyRow"]:
    """The rows of ``summary.png`` (:func:`pce.analysis.study_figure.study_figure`): every variant but the reference
    against the reference. ``final``: the last epoch's metric of the finished runs, Welch's difference and 95%
    interval where both have >= 2 finished seeds; otherwise (``screen``, or too few seeds) each run minus the same
    seed's reference (the reference's mean when that seed has none), averaged over the variant's runs, no interval,
    on the best metric in ``screen``. A screening run stopped at half counts as its stop decision's difference (its
    best minus the reference's best up to the same epoch, ``study_stop.json``) and is drawn hollow."""
    from pce.analysis.study_figure import StudyRow

    sr, metric, ref, key = _summarize_runs(), plan["metric"], plan["reference"], "final" if stage == "final" else "best"
    value: Dict[tuple, float] = {}       # (variant, seed) -> the metric of a finished run
    stop_diff: Dict[tuple, float] = {}   # (variant, seed) -> the stop decision's difference of a stopped run
    cells: Dict[str, list] = {}
    for name, seed in runs:
        wd = root / f"{name}_s{seed}"
        state = run_state(wd)
        if state == "stopped" and key == "best" and name != ref:
            stop = read_stop(wd)
            stop_diff[(name, seed)] = stop["value"] - stop["reference"]
        elif state == "finished":
            try:
                value[(name, seed)] = sr.summarize(wd, metric)[key]
            except PCEError:
                continue
        else:
            continue
        cells.setdefault(name, []).append(expert_cells(wd, metric))
    base = [v for (n, _), v in value.items() if n == ref]
    out = []
    for name in cells:
        if name == ref or not base:
            continue
        vals = [v for (n, _), v in value.items() if n == name]
        stopped = any(n == name for n, _ in stop_diff)
        if key == "final" and len(vals) > 1 and len(base) > 1:
            w = sr.welch(vals, base)
            out.append(StudyRow(name, w["diff"], w["low"], w["high"], verdict_counts(cells[name]), False, len(vals)))
            continue
        diffs = [d for (n, _), d in stop_diff.items() if n == name]
        diffs += [v - value.get((ref, seed), sum(base) / len(base)) for (n, seed), v in value.items() if n == name]
        out.append(StudyRow(name, sum(diffs) / len(diffs), None, None, verdict_counts(cells[name]), stopped,
                            len(diffs)))
    return out
