#!/usr/bin/env python
"""Run a study (issue #26) from its plan: every (variant, seed) of a stage as one ``tools/train.py`` subprocess after
the other, then ``WORK_ROOT/<study>/<stage>/summary.md`` with the Welch tables. The plan format, the skip / resume
rules and the stop-at-half rule: docs/STUDY.md (and configs/study/plan_seg.py).

    python tools/run_study.py configs/study/plan_seg.py --stage screen --dry-run   # the commands, one per line
    python tools/run_study.py configs/study/plan_seg.py --stage screen --threads 2
    python tools/run_study.py configs/study/plan_seg.py --stage final --only dense pce_head
    python tools/run_study.py configs/study/plan_seg.py --stage screen --summary-only   # train nothing

Work dirs: ``<stage folder>/<variant>_s<seed>``; finished runs (a ``"type": "test"`` record) are skipped, runs with
a checkpoint resumed, screening runs behind the reference by more than ``stop_margin`` at half their epochs stopped
(``study_stop.json``); ``kill`` (SIGTERM) of this tool ends its running training too. Then every finished run's
experts are analysed once into ``<run>/experts.json`` on the plan's ``experts_num`` validation samples
(``tools/analyze_experts.py``, tools/study_experts.py; ``--no-experts`` skips it) and ``summary.md`` written with
their verdicts. Errors are one line naming the plan or the run (``--debug``: the traceback).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import runpy
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

TOOLS = str(Path(__file__).resolve().parent)
if TOOLS not in sys.path:
    sys.path.insert(0, TOOLS)

from pce.engine.errors import PCEError, add_debug_flag, run_cli  # noqa: E402
from study_experts import ensure_all  # noqa: E402
from study_records import (STOP_FILE, _summarize_runs, half_check, read_metrics, run_state,  # noqa: E402,F401
                           figure_rows, summary_markdown)

ROOT = Path(__file__).resolve().parent.parent
_PLAN_KEYS = ("study", "metric", "reference", "variants")


def load_plan(path: Path) -> Dict[str, Any]:
    """The plan file's top-level names (checked: the keys every plan needs, known variants per stage)."""
    if not Path(path).is_file():
        raise PCEError(path, "plan not found", "a configs/study/plan_*.py file")
    plan = {k: v for k, v in runpy.run_path(str(path)).items() if not k.startswith("_")}
    for key in _PLAN_KEYS:
        if key not in plan:
            raise PCEError(f"{path}: {key}", "missing", "study, metric, reference and variants")
    plan.setdefault("mode", "max")
    plan.setdefault("baselines", [plan["reference"]])
    for name, v in plan["variants"].items():
        if not isinstance(v, dict) or "config" not in v:
            raise PCEError(f"{path}: variants.{name}", "no config", "dict(config=..., options=[...])")
        if not isinstance(v.get("stop", True), bool):
            raise PCEError(f"{path}: variants.{name}.stop", f"{v['stop']!r}", "True or False (never stopped at half)")
    num = plan.setdefault("experts_num", 64)
    if not isinstance(num, int) or isinstance(num, bool) or num < 1:
        raise PCEError(f"{path}: experts_num", f"{num!r}", "a positive number of validation samples")
    for stage in ("screen", "final"):
        for name in plan.get(stage, {}).get("variants", []):
            if name not in plan["variants"]:
                raise PCEError(f"{path}: {stage}.variants", f"unknown variant {name!r}", "a key of variants")
    return plan


def stage_runs(plan: Dict[str, Any], stage: str, seeds: Optional[List[int]] = None,
               only: Optional[List[str]] = None) -> List[tuple]:
    """``(variant, seed)`` pairs of a stage in run order: seed-major, the reference first in each seed."""
    cfg = plan.get(stage, {})
    names = list(cfg.get("variants") or plan["variants"])
    for name in only or []:
        if name not in plan["variants"]:
            raise PCEError(f"--only {name}", "not a variant of the plan", ", ".join(plan["variants"]))
    names = [n for n in names if not only or n in only]
    names.sort(key=lambda n: n != plan["reference"])
    return [(n, s) for s in (seeds if seeds is not None else cfg.get("seeds", [0])) for n in names]


def stage_dir(plan: Dict[str, Any], stage: str, work_root: Path) -> Path:
    return Path(work_root) / plan["study"] / stage


def schedule_options(config: str, scale: float) -> List[str]:
    """--cfg-options scaling ``schedule.epochs`` and every phase's positive ``epochs`` by ``scale`` (rounded up)."""
    if scale == 1:
        return []
    from pce.engine import load_config

    cfg = load_config(ROOT / config)
    out = [f"schedule.epochs={math.ceil(cfg.schedule.epochs * scale)}"]
    for i, phase in enumerate(cfg.phases or []):
        if phase.get("epochs", -1) > 0:
            out.append(f"phases.{i}.epochs={math.ceil(phase['epochs'] * scale)}")
    return out


def run_command(plan: Dict[str, Any], stage: str, name: str, seed: int, work_root: Path,
                threads: Optional[int] = None, resume: bool = False) -> List[str]:
    """The ``tools/train.py`` argv of one run (``python`` standing for this interpreter)."""
    variant, root = plan["variants"][name], stage_dir(plan, stage, work_root)
    options = schedule_options(variant["config"], plan.get(stage, {}).get("epoch_scale", 1))
    options += [o.replace("{root}", str(root)).replace("{seed}", str(seed)) for o in variant.get("options", [])]
    if threads:
        options.append(f"runtime.num_threads={threads}")
    cmd = ["python", "tools/train.py", variant["config"], "--seed", str(seed), "--work-dir",
           str(root / f"{name}_s{seed}")]
    cmd += ["--cfg-options", *options] if options else []
    return cmd + (["--resume"] if resume else [])


def recorded_threads(work_dir: Path) -> Optional[int]:
    """``runtime.num_threads`` a run was started with (its ``config.json``; 0 = torch's default, which
    :func:`run_command` leaves out), or ``None`` without a readable one."""
    try:
        threads = json.loads((Path(work_dir) / "config.json").read_text())["runtime"]["num_threads"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return threads if isinstance(threads, int) and not isinstance(threads, bool) and threads >= 0 else None


def _write_text(path: Path, text: str) -> None:
    from pce.tasks.atomic_io import atomic_write

    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _stop(proc: subprocess.Popen) -> None:
    """End the training subprocess (its own process group: DataLoader workers included)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def execute(cmd: List[str], work_dir: Path, check=None, poll_s: float = 2.0) -> Optional[dict]:
    """Run ``cmd`` (``python`` -> this interpreter) in the repository root; with ``check`` (a function of nothing
    returning :func:`half_check`'s answer) stop it as soon as that says ``stop``. Returns the stop decision or
    ``None``; a failed run is an error naming its work dir."""
    argv = [sys.executable, *cmd[1:]]
    proc = subprocess.Popen(argv, cwd=ROOT, start_new_session=True)
    decided = None
    try:
        while proc.poll() is None:
            time.sleep(poll_s)
            if check is not None and decided is None:
                decided = check()
                if decided is not None and decided["stop"]:
                    _stop(proc)
                    _write_text(Path(work_dir) / STOP_FILE, json.dumps(decided) + "\n")
                    return decided
    except BaseException:
        _stop(proc)
        raise
    if proc.returncode != 0:
        raise PCEError(work_dir, f"tools/train.py exited with status {proc.returncode}",
                       "a run that finishes; rerun this command to resume it: " + shlex.join(cmd))
    return None


def _one_run(plan, stage, name, seed, args, root) -> str:
    wd = root / f"{name}_s{seed}"
    state = run_state(wd)
    if state in ("finished", "stopped"):
        return f"skipped ({state})"
    margin = plan.get(stage, {}).get("stop_margin")
    check = None
    if margin is not None and name != plan["reference"] and plan["variants"][name].get("stop", True):
        from pce.engine import load_config

        opts = schedule_options(plan["variants"][name]["config"], plan.get(stage, {}).get("epoch_scale", 1))
        epochs = load_config(ROOT / plan["variants"][name]["config"], opts).schedule.epochs
        ref_dir = root / f"{plan['reference']}_s{seed}"
        check = lambda: half_check(wd, ref_dir, epochs, plan["metric"], plan.get("mode", "max"), margin)  # noqa: E731
        decided = check()
        if decided is not None and decided["stop"]:
            _write_text(wd / STOP_FILE, json.dumps(decided) + "\n")
            return "stopped at half (from its metrics.jsonl)"
    cmd = run_command(plan, stage, name, seed, args.work_root, args.threads, resume=state == "partial")
    stop = execute(cmd, wd, check, args.poll)
    return "stopped at half" if stop else ("resumed, finished" if state == "partial" else "finished")


def _raise_on_sigterm() -> None:
    """``kill`` (SIGTERM) becomes ``SystemExit(143)`` so :func:`execute` ends its training on the way out (by
    default SIGTERM ends this process at once and leaves the training, in its own session, running)."""
    def handler(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("plan", type=Path)
    ap.add_argument("--stage", choices=["screen", "final"], default="screen")
    ap.add_argument("--seeds", type=int, nargs="+", help="instead of the stage's seeds")
    ap.add_argument("--only", nargs="+", metavar="NAME", help="only these variants")
    ap.add_argument("--dry-run", action="store_true", help="print the commands, one per line, and run nothing")
    ap.add_argument("--threads", type=int, help="runtime.num_threads (and OMP_NUM_THREADS) of every run")
    ap.add_argument("--work-root", type=Path, default=Path("work_dirs"), help="where <study>/<stage>/ goes")
    ap.add_argument("--poll", type=float, default=5.0, help="seconds between looks at a running run's metrics")
    ap.add_argument("--summary-only", action="store_true",
                    help="train nothing: analyse the finished runs' experts (unless --no-experts), write summary.md")
    ap.add_argument("--no-experts", dest="experts", action="store_false",
                    help="skip the experts analysis (summary.md shows what experts.json files exist)")
    ap.add_argument("--experts-num", type=int, metavar="N",
                    help="validation samples of each experts analysis (default: the plan's experts_num, else 64); "
                         "an analysis of another number is redone")
    add_debug_flag(ap)
    args = ap.parse_args(argv)
    _raise_on_sigterm()
    return run_cli(lambda: _run(args), debug=args.debug)


def _run(args: argparse.Namespace) -> int:
    plan = load_plan(args.plan)
    runs = stage_runs(plan, args.stage, args.seeds, args.only)
    root = stage_dir(plan, args.stage, args.work_root)
    commands = {r: run_command(plan, args.stage, *r, args.work_root, args.threads) for r in runs}
    if args.dry_run:
        print("\n".join(shlex.join(commands[r]) for r in runs))
        return 0
    # summary.md: a run that exists is reproduced with the threads it ran with (BLAS sums differ with them)
    recorded = {r: recorded_threads(root / f"{r[0]}_s{r[1]}") for r in runs}
    commands.update({r: run_command(plan, args.stage, *r, args.work_root, recorded[r])
                     for r in runs if recorded[r] is not None})
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)
    if args.experts_num is not None:
        if args.experts_num < 1:
            raise PCEError("--experts-num", f"{args.experts_num}", "a positive number of samples")
        plan["experts_num"] = args.experts_num
    if args.summary_only and not root.is_dir():
        raise PCEError(root, "no such stage folder", "the folder of a stage that has runs (--work-root?)")
    from tqdm import tqdm

    if not args.summary_only:
        bar = tqdm(runs, desc=f"{plan['study']} {args.stage}", unit="run", file=sys.stderr, disable=None)
        for i, (name, seed) in enumerate(bar, 1):
            print(f"[{i}/{len(runs)}] {name}_s{seed}: {_one_run(plan, args.stage, name, seed, args, root)}",
                  flush=True)
    if args.experts:
        ensure_all([root / f"{name}_s{seed}" for name, seed in runs], plan["experts_num"], args.threads)
    _write_text(root / "summary.md", summary_markdown(plan, args.stage, runs, root, commands))
    print(f"summary: {root / 'summary.md'}")
    rows = figure_rows(plan, args.stage, runs, root)
    if rows:
        from pce.analysis.study_figure import study_figure

        what = "final" if args.stage == "final" else "best"
        study_figure(rows, root / "summary.png", metric=f"{what} {plan['metric']}", reference=plan["reference"],
                     title=f"{plan['study']}: {args.stage} ({len(rows)} variants; colour: the experts' verdict)")
        print(f"figure: {root / 'summary.png'}")
    else:  # no variant to compare yet (the reference has no finished run): no figure, and no stale one
        (root / "summary.png").unlink(missing_ok=True)
        print(f"figure: none (no finished {plan['reference']} run to compare with)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
