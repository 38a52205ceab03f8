"""tools/run_study.py: the commands of a plan (hand-written), skip / resume / stop-at-half on hand-written work dirs,
the summary's Welch table against scipy's own Welch test, and one real run of a tiny plan through the tool."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from scipy import stats

from _faults_util import load_tool, tiny_overrides

REPO = Path(__file__).resolve().parents[1]
rs = load_tool("run_study")

PLAN = """
study = "s26"
metric = "top1"
reference = "dense"
baselines = ["dense"]
variants = dict(
    pce=dict(config="configs/demo_cls_digits.py"),
    dense=dict(config="configs/demo_cls_digits.py", options=["model.backbone='dense_fmnist'"]),
    up=dict(config="configs/demo_cls_digits.py", options=["model.pretrained={root}/dense_s{seed}/best.pth"]),
)
screen = dict(seeds=[0], epoch_scale=0.5, stop_margin=0.05)
final = dict(seeds=[0, 1], variants=["dense", "pce"])
"""


def write_plan(tmp_path: Path, text: str = PLAN) -> Path:
    path = tmp_path / "plan.py"
    path.write_text(text)
    return path


def write_metrics(wd: Path, rows) -> None:
    wd.mkdir(parents=True, exist_ok=True)
    (wd / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def vals(*pairs, test=None):
    rows = [{"type": "val", "epoch": e, "top1": v, "time": 100.0 * e} for e, v in pairs]
    return rows + ([{"type": "test", "epoch": pairs[-1][0], "top1": test}] if test is not None else [])


def test_dry_run_prints_the_commands(tmp_path, capsys):
    plan = write_plan(tmp_path)
    # demo_cls_digits: 8 epochs, phases of 1, 3 and the rest -> x0.5 rounded up: 4, 1, 2; the reference first
    assert rs.main([str(plan), "--dry-run", "--work-root", "wd", "--threads", "1"]) == 0
    sched = "schedule.epochs=4 phases.0.epochs=1 phases.1.epochs=2"
    assert capsys.readouterr().out.splitlines() == [
        "python tools/train.py configs/demo_cls_digits.py --seed 0 --work-dir wd/s26/screen/dense_s0 "
        f"--cfg-options {sched} 'model.backbone='\"'\"'dense_fmnist'\"'\"'' runtime.num_threads=1",
        f"python tools/train.py configs/demo_cls_digits.py --seed 0 --work-dir wd/s26/screen/pce_s0 --cfg-options {sched} "
        "runtime.num_threads=1",
        f"python tools/train.py configs/demo_cls_digits.py --seed 0 --work-dir wd/s26/screen/up_s0 --cfg-options {sched} "
        "model.pretrained=wd/s26/screen/dense_s0/best.pth runtime.num_threads=1",
    ]
    assert rs.main([str(plan), "--stage", "final", "--dry-run", "--work-root", "wd", "--only", "pce"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"python tools/train.py configs/demo_cls_digits.py --seed {s} --work-dir wd/s26/final/pce_s{s}" for s in (0, 1)]
    assert rs.main([str(plan), "--dry-run", "--only", "nope"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --only nope: not a variant of the plan (pce, dense, up)") and "\n" not in err


def test_bad_plans_are_one_line_errors(tmp_path, capsys):
    assert rs.main([str(tmp_path / "missing.py"), "--dry-run"]) == 1
    assert capsys.readouterr().err.strip() == f"error: {tmp_path / 'missing.py'}: plan not found (a configs/study/plan_*.py file)"
    plan = write_plan(tmp_path, PLAN.replace('final = dict(seeds=[0, 1], variants=["dense", "pce"])',
                                             'final = dict(variants=["dense", "pcee"])'))
    assert rs.main([str(plan), "--dry-run"]) == 1
    assert "final.variants: unknown variant 'pcee'" in capsys.readouterr().err
    plan = write_plan(tmp_path, PLAN.replace('pce=dict(config="configs/demo_cls_digits.py")',
                                             'pce=dict(config="configs/demo_cls_digits.py", stop="no")'))
    assert rs.main([str(plan), "--dry-run"]) == 1
    assert "variants.pce.stop: 'no' (True or False" in capsys.readouterr().err
    plan = write_plan(tmp_path, PLAN + "experts_num = 0\n")
    assert rs.main([str(plan), "--dry-run"]) == 1
    assert capsys.readouterr().err.strip() == (f"error: {plan}: experts_num: 0 (a positive number of validation "
                                               "samples)")


def test_run_state_skip_and_resume(tmp_path):
    finished, stopped, partial, new = (tmp_path / n for n in ("a", "b", "c", "d"))
    write_metrics(finished, vals((1, 0.5), test=0.6))
    write_metrics(stopped, vals((1, 0.5)))
    (stopped / rs.STOP_FILE).write_text("{}")
    write_metrics(partial, vals((1, 0.5)))
    (partial / "latest.pth").write_bytes(b"x")
    write_metrics(new, vals((1, 0.5)))
    assert [rs.run_state(d) for d in (finished, stopped, partial, new)] == ["finished", "stopped", "partial", "new"]
    # a half-written last line (a run killed while logging) is not a record
    (partial / "metrics.jsonl").write_text(json.dumps({"type": "val", "epoch": 1, "top1": 0.5}) + '\n{"type": "te')
    assert rs.run_state(partial) == "partial" and len(rs.read_metrics(partial)) == 1


def test_half_check(tmp_path):
    run, ref = tmp_path / "run", tmp_path / "ref"
    write_metrics(run, vals((2, 0.50), (3, 0.61), (4, 0.55), (6, 0.70)))
    # 7 epochs: half = 4 (rounded up); the reference has not reached epoch 4 yet -> undecided
    write_metrics(ref, vals((2, 0.60), (3, 0.70)))
    assert rs.half_check(run, ref, 7, "top1", "max", 0.05) is None
    write_metrics(ref, vals((2, 0.60), (3, 0.70), (4, 0.69), (5, 0.9)))
    # bests up to epoch 4: run max(0.50, 0.61, 0.55) = 0.61, reference 0.70 -> behind by 0.09
    assert rs.half_check(run, ref, 7, "top1", "max", 0.05) == {"epoch": 4, "value": 0.61, "reference": 0.70,
                                                               "stop": True}
    assert rs.half_check(run, ref, 7, "top1", "max", 0.1)["stop"] is False
    # a loss (mode min): lower is better, the run's 0.50 is ahead of the reference's 0.60
    assert rs.half_check(run, ref, 7, "top1", "min", 0.05) == {"epoch": 4, "value": 0.50, "reference": 0.60,
                                                               "stop": False}
    write_metrics(run, vals((2, 0.50), (3, 0.61)))
    assert rs.half_check(run, ref, 7, "top1", "max", 0.05) is None  # the run is not at half yet


def test_skips_finished_stops_behind_and_writes_welch_summary(tmp_path, monkeypatch, capsys):
    plan = write_plan(tmp_path)
    root = tmp_path / "wd/s26/final"
    finals = {"dense": [0.80, 0.82], "pce": [0.70, 0.75]}
    for name, values in finals.items():
        for s, v in enumerate(values):
            write_metrics(root / f"{name}_s{s}", vals((1, v - 0.1), (8, v), test=v))
    launched = []
    monkeypatch.setattr(rs, "execute", lambda cmd, *a, **k: launched.append(cmd))
    assert rs.main([str(plan), "--stage", "final", "--work-root", str(tmp_path / "wd")]) == 0
    assert launched == []                                   # all finished: nothing trained
    text = (root / "summary.md").read_text()
    ref = stats.ttest_ind(finals["pce"], finals["dense"], equal_var=False)
    ci = ref.confidence_interval(0.95)  # scipy's Welch interval of mean(pce) - mean(dense) = 0.725 - 0.81
    assert f"| pce | -0.0850 [{ci.low:+.4f}, {ci.high:+.4f}], p={ref.pvalue:.3f} |" in text and "| pce | 2 | 0.7250 ± 0.0354 |" in text
    assert "| pce_s1 | finished | 0.7500 (8) |" in text and "Best two non-baseline variants: pce." in text
    # screening: `pce` is behind the reference by 0.2 at half (epoch 4 of 4 -> 2) -> stopped from its metrics,
    # without training; `up` has a checkpoint and no decision yet -> resumed
    screen = tmp_path / "wd/s26/screen"
    write_metrics(screen / "dense_s0", vals((2, 0.8), (4, 0.85), test=0.85))
    write_metrics(screen / "pce_s0", vals((2, 0.6)))
    (screen / "up_s0").mkdir()
    (screen / "up_s0/latest.pth").write_bytes(b"x")
    assert rs.main([str(plan), "--work-root", str(tmp_path / "wd")]) == 0
    assert [c[-1] for c in launched] == ["--resume"] and "up_s0" in launched[0][6]
    assert json.loads((screen / "pce_s0" / rs.STOP_FILE).read_text()) == {
        "epoch": 2, "value": 0.6, "reference": 0.8, "stop": True}
    assert "| pce_s0 | stopped at half: 0.6000 vs 0.8000 (epoch 2) |" in (screen / "summary.md").read_text()
    # the same metrics under stop=False (a phased recipe still in its first phase at half): trained on, not stopped
    (screen / "pce_s0" / rs.STOP_FILE).unlink()
    launched.clear()
    plan = write_plan(tmp_path, PLAN.replace('pce=dict(config="configs/demo_cls_digits.py")',
                                             'pce=dict(config="configs/demo_cls_digits.py", stop=False)'))
    assert rs.main([str(plan), "--work-root", str(tmp_path / "wd"), "--only", "pce", "--no-experts"]) == 0
    assert len(launched) == 1 and "pce_s0" in launched[0][6] and not (screen / "pce_s0" / rs.STOP_FILE).exists()


def test_execute_stops_a_running_process(tmp_path):
    """A real subprocess that logs a behind validation and then sleeps is ended by the stop rule."""
    wd = tmp_path / "run"
    wd.mkdir()
    script = ("import json,os,time,sys; open(sys.argv[2],'w').write(str(os.getpid())); "
              "open(sys.argv[1],'w').write(json.dumps({'type':'val','epoch':2,'top1':0.1})+'\\n'); time.sleep(60)")
    check = lambda: rs.half_check(wd, ref, 4, "top1", "max", 0.05)  # noqa: E731
    ref = tmp_path / "ref"
    write_metrics(ref, vals((2, 0.5)))
    t0 = time.time()
    stop = rs.execute(["python", "-c", script, str(wd / "metrics.jsonl"), str(tmp_path / "pid")], wd, check,
                      poll_s=0.2)
    assert stop["stop"] and time.time() - t0 < 30 and (wd / rs.STOP_FILE).is_file()
    with pytest.raises(ProcessLookupError):  # ended and reaped
        os.kill(int((tmp_path / "pid").read_text()), 0)
    with pytest.raises(rs.PCEError, match="exited with status 3"):
        rs.execute(["python", "-c", "raise SystemExit(3)"], wd, None, poll_s=0.1)


def test_tiny_plan_end_to_end(tmp_path):
    """Two variants of the digits demo, 1 epoch of 2 iterations, 1 seed, through the real tool and train.py."""
    options = [f"{k}={v!r}" for k, v in tiny_overrides(tmp_path, epochs=1, iters=2)[1:]]
    plan = write_plan(tmp_path, f"""
study = "tiny"
metric = "top1"
reference = "a"
variants = dict(a=dict(config="configs/demo_cls_digits.py", options={options!r}),
                b=dict(config="configs/demo_cls_digits.py", options={options!r}))
screen = dict(seeds=[0], stop_margin=1.0)
""")
    out = subprocess.run([sys.executable, "tools/run_study.py", str(plan), "--work-root", str(tmp_path / "wd"),
                          "--poll", "0.5", "--experts-num", "8"], cwd=REPO, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "[1/2] a_s0: finished" in out.stdout and "[2/2] b_s0: finished" in out.stdout
    root = tmp_path / "wd/tiny/screen"
    assert all(rs.run_state(root / f"{n}_s0") == "finished" for n in "ab")
    # the real analysis of both runs: its summary keys are the ones the table reads
    assert "[experts 2/2] b_s0: analysed" in out.stdout, out.stdout + out.stderr[-2000:]
    text = (root / "summary.md").read_text()
    cells = row_cells(text, "b_s0")
    assert cells[1] == "finished" and cells[10] in se.VERDICTS and "-" not in cells[6:10], cells
    analysis = json.loads((root / "b_s0/experts.json").read_text())
    assert analysis["num_samples"] == analysis["num_requested"] == 8
    assert float(cells[6]) == round(analysis["summary"]["expert_weight_cos_min"], 4)
    assert "on (up to) the first 8 validation samples" in text
    again = subprocess.run([sys.executable, "tools/run_study.py", str(plan), "--work-root", str(tmp_path / "wd"),
                            "--experts-num", "8"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert "[1/2] a_s0: skipped (finished)" in again.stdout and "[2/2] b_s0: skipped (finished)" in again.stdout
    assert "[experts" not in again.stdout  # the same number of samples: not analysed again


def test_study_plans_load_and_use_every_study_config():
    """The three issue-#26 plans load, every variant's config loads with its screening options, and every
    configs/study/ variant config is in a plan (none left behind)."""
    from pce.engine import load_config

    used = set()
    for plan_path in sorted((REPO / "configs/study").glob("plan_*.py")):
        plan = rs.load_plan(plan_path)
        assert plan["reference"] in plan["variants"] and set(plan["baselines"]) <= set(plan["final"]["variants"])
        assert len(plan["final"]["seeds"]) == 5 and len(plan["screen"]["seeds"]) == 1
        for name, variant in plan["variants"].items():
            cfg = load_config(REPO / variant["config"], rs.schedule_options(variant["config"], 0.5))
            assert cfg.schedule.epochs >= 1, name
            used.add(variant["config"])
    configs = {f"configs/study/{p.name}" for p in (REPO / "configs/study").glob("*.py")
               if not p.name.startswith("plan_")}
    assert configs and configs <= used, sorted(configs - used)


# ---- the experts' diversity columns (issue #26: every study row says whether its experts differ) ----------------
se = sys.modules["study_experts"]  # the module tools/run_study.py imported (tools/ on sys.path)


def experts_json(kernel_min, out_mins, routed, shuffled, forced_min, forced_max, metric="top1"):
    """An analyze_experts JSON with the given numbers (the per-layer output cosines: one entry per layer)."""
    layers = {f"layer{i}": {"num_experts": 4, "weight_cosine_min": kernel_min, "output_cosine_min": v}
              for i, v in enumerate(out_mins)}
    summary = {"expert_weight_cos_min": kernel_min, "expert_weight_cos_mean": 0.5, "expert_output_cos_mean": 0.5,
               "forced_change_max": 0.3, f"{metric}_routed": routed, f"{metric}_shuffled": shuffled,
               f"{metric}_forced_min": forced_min, f"{metric}_forced_max": forced_max}
    return {"diversity": layers, "causal": [], "summary": summary}


def put(wd: Path, data) -> None:
    wd.mkdir(parents=True, exist_ok=True)
    (wd / "experts.json").write_text(json.dumps(data))


def row_cells(text: str, run: str):
    """The cells of the table row whose first cell is ``run``."""
    line = next(ln for ln in text.splitlines() if ln.startswith(f"| {run} |"))
    return [c.strip() for c in line.strip().strip("|").split(" | ")]


def test_verdict_thresholds():
    assert (se.COPIES_KERNEL_COS, se.COPIES_OUTPUT_COS, se.COPIES_METRIC_DELTA) == (0.99, 0.99, 0.005)
    assert se.verdict(0.99, 0.99, 0.0049) == "copies" and se.verdict(1.0, 1.0, 0.0) == "copies"
    assert se.verdict(0.999, 0.999, 0.005) == "differ" and se.verdict(0.5, 0.5, 0.2) == "differ"
    # different kernels, or one kernel with different outputs (per-expert batch norms), the metric unmoved
    assert se.verdict(0.9899, 0.999, 0.0) == "differ, metric unchanged"
    assert se.verdict(0.9993, 0.75, 0.0) == "differ, metric unchanged"
    assert se.verdict(None, 0.999, 0.001) == "?" and se.verdict(0.995, 0.995, None) == "?"
    assert se.verdict(0.995, None, 0.001) == "?" and se.verdict(0.5, None, None) == "?"
    assert se.verdict(None, None, 0.2) == "differ"


def test_summary_experts_columns_and_verdicts(tmp_path, monkeypatch):
    plan = write_plan(tmp_path)
    root = tmp_path / "wd/s26/final"
    for name in ("dense", "pce"):
        for s in (0, 1):
            write_metrics(root / f"{name}_s{s}", vals((1, 0.7), (8, 0.8), test=0.8))
    put(root / "dense_s0", {"routed": False})
    put(root / "dense_s1", {"routed": False})
    # pce_s0: kernels differ; output cos min over the layers min(0.30, 0.12); a 1-expert layer does not count;
    # forced delta max(|0.83 - 0.80|, |0.60 - 0.80|) = 0.20; shuffled 0.71 - 0.80 = -0.09
    data = experts_json(0.25, [0.30, 0.12], 0.80, 0.71, 0.60, 0.83)
    data["diversity"]["single"] = {"num_experts": 1, "output_cosine_min": 0.01}
    put(root / "pce_s0", data)
    # pce_s1: copies: kernel cos 0.995 >= 0.99 and forced delta max(0.002, 0.003) = 0.003 < 0.005; shuffled +0.001
    put(root / "pce_s1", experts_json(0.995, [0.999], 0.75, 0.751, 0.748, 0.753))
    monkeypatch.setattr(rs, "execute", lambda *a, **k: pytest.fail("--summary-only trained"))
    assert rs.main([str(plan), "--stage", "final", "--work-root", str(tmp_path / "wd"), "--summary-only"]) == 0
    text = (root / "summary.md").read_text()
    assert "| kernel cos min | output cos min | forced Δ max | shuffled Δ | experts | command |" in text
    assert row_cells(text, "pce_s0")[6:11] == ["0.2500", "0.1200", "0.2000", "-0.0900", "differ"]
    assert row_cells(text, "pce_s1")[6:11] == ["0.9950", "0.9990", "0.0030", "+0.0010", "copies"]
    assert row_cells(text, "dense_s0")[6:11] == ["-"] * 5
    # the seed groups: the verdicts counted over the finished seeds
    assert row_cells(text, "pce")[1] == "2" and row_cells(text, "pce")[4] == "copies 1/2, differ 1/2"
    assert row_cells(text, "dense")[4] == "-"
    put(root / "pce_s0", experts_json(0.99, [0.995], 0.80, 0.80, 0.7951, 0.8049))  # |delta| 0.0049 -> copies
    assert rs.main([str(plan), "--stage", "final", "--work-root", str(tmp_path / "wd"), "--summary-only"]) == 0
    text = (root / "summary.md").read_text()
    assert row_cells(text, "pce_s0")[10] == "copies" and row_cells(text, "pce")[4] == "copies 2/2"
    put(root / "pce_s0", experts_json(0.99, [0.98], 0.80, 0.80, 0.7951, 0.8049))  # outputs differ: 0.98 < 0.99
    assert rs.main([str(plan), "--stage", "final", "--work-root", str(tmp_path / "wd"), "--summary-only"]) == 0
    text = (root / "summary.md").read_text()
    assert row_cells(text, "pce_s0")[10] == "differ, metric unchanged"
    assert row_cells(text, "pce")[4] == "copies 1/2, differ, metric unchanged 1/2"


def test_summary_only_analyses_finished_runs_once(tmp_path, monkeypatch, capsys):
    plan = write_plan(tmp_path, PLAN.replace("final = dict(seeds=[0, 1]", "final = dict(seeds=[0, 1, 2]"))
    root = tmp_path / "wd/s26/final"
    for name in ("dense", "pce"):
        for s in (0, 1, 2):
            write_metrics(root / f"{name}_s{s}", vals((1, 0.7), (8, 0.8), test=0.8))
            (root / f"{name}_s{s}/best.pth").write_bytes(b"x")
    (root / "dense_s2/best.pth").unlink()                         # finished without a checkpoint: not analysed
    put(root / "dense_s1", {"routed": False})                     # already analysed: not again
    write_metrics(root / "pce_s2", vals((1, 0.7)))                # partial: not analysed
    (root / "pce_s2/latest.pth").write_bytes(b"x")
    calls = []

    def fake(argv, env):
        calls.append((argv, env.get("OMP_NUM_THREADS")))
        run = Path(argv[2]).parent.name
        if run.startswith("dense"):
            return subprocess.CompletedProcess(argv, 1, "", f"error: {argv[2]}: the model has no routed layer "
                                                            "(a config whose backbone routes)\n")
        if run == "pce_s0":
            out = Path(argv[argv.index("--out") + 1])
            assert out.parent.name == "pce_s0"
            out.write_text(json.dumps(experts_json(0.5, [0.4], 0.8, 0.7, 0.6, 0.8)))
            return subprocess.CompletedProcess(argv, 0, "written\n", "")
        return subprocess.CompletedProcess(argv, 1, "", "some warning\nerror: CUDA out of memory\n")

    monkeypatch.setattr(se, "run_analysis", fake)
    monkeypatch.setattr(rs, "execute", lambda *a, **k: pytest.fail("--summary-only trained"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # --threads sets it in this process: restored afterwards
    argv = [str(plan), "--stage", "final", "--work-root", str(tmp_path / "wd"), "--summary-only", "--threads", "3",
            "--experts-num", "16"]
    assert rs.main(argv) == 0
    wd = root / "dense_s0"
    assert calls[0] == ([sys.executable, "tools/analyze_experts.py", str(wd / "config.json"), "--checkpoint",
                         str(wd / "best.pth"), "--split", "val", "--num", "16", "--out", str(wd / "experts.json")], "3")
    assert [Path(a[2]).parent.name for a, _ in calls] == ["dense_s0", "pce_s0", "pce_s1"]
    out = capsys.readouterr().out
    assert "[experts 1/3] dense_s0: not routed" in out and "[experts 2/3] pce_s0: analysed" in out
    assert "[experts 3/3] pce_s1: failed (exit 1): error: CUDA out of memory" in out
    assert json.loads((wd / "experts.json").read_text())["routed"] is False   # cached
    assert not (root / "pce_s1/experts.json").exists()                         # a failure is retried next time
    text = (root / "summary.md").read_text()                                   # written despite the failure
    assert row_cells(text, "dense_s0")[6:11] == ["-"] * 5
    assert row_cells(text, "pce_s0")[6:11] == ["0.5000", "0.4000", "0.2000", "-0.1000", "differ"]
    assert row_cells(text, "pce_s1")[10] == "not analysed"
    assert row_cells(text, "pce")[4] == "differ 1/2"                          # pce_s2 is not finished
    calls.clear()
    assert rs.main(argv) == 0
    assert [Path(a[2]).parent.name for a, _ in calls] == ["pce_s1"]
    assert rs.main(argv + ["--no-experts"]) == 0 and len(calls) == 1
    # pce_s0 trained again (a newer best.pth): its analysis is stale, redone with --force; a malformed file reads
    # as "not analysed" instead of breaking the summary
    calls.clear()
    os.utime(root / "pce_s0/best.pth", (time.time() + 60, time.time() + 60))
    os.utime(root / "pce_s0/experts.json", (1000.0, 1000.0))
    (root / "pce_s1/experts.json").write_text(json.dumps({"summary": [1], "diversity": {"a": 3}}))
    assert rs.main(argv) == 0
    assert [(Path(a[2]).parent.name, a[-1]) for a, _ in calls] == [("pce_s0", "--force")]
    assert (root / "pce_s0/experts.json").stat().st_mtime > 1000.0  # written again
    assert row_cells((root / "summary.md").read_text(), "pce_s1")[10] == "not analysed"
    assert rs.main([str(plan), "--work-root", str(tmp_path / "nowhere"), "--summary-only"]) == 1
    assert "no such stage folder" in capsys.readouterr().err


def test_summary_commands_use_the_threads_each_run_ran_with(tmp_path, monkeypatch):
    """A run started with 1 thread is reproduced with 1 thread even when the summary is written with --threads 2;
    a run without a readable config.json takes the invocation's threads."""
    plan = write_plan(tmp_path)
    root = tmp_path / "wd/s26/final"
    for name in ("dense", "pce"):
        for s in (0, 1):
            write_metrics(root / f"{name}_s{s}", vals((1, 0.7), (8, 0.8), test=0.8))
    (root / "pce_s0/config.json").write_text(json.dumps({"runtime": {"num_threads": 1}}))
    (root / "pce_s1/config.json").write_text("{not json")
    (root / "dense_s1/config.json").write_text(json.dumps({"runtime": {"num_threads": 0}}))  # torch's default
    monkeypatch.setattr(rs, "execute", lambda *a, **k: pytest.fail("--summary-only trained"))
    argv = [str(plan), "--stage", "final", "--work-root", str(tmp_path / "wd"), "--summary-only", "--no-experts",
            "--threads", "2"]
    assert rs.main(argv) == 0
    text = (root / "summary.md").read_text()
    assert row_cells(text, "pce_s0")[-1].endswith("runtime.num_threads=1`")
    assert row_cells(text, "pce_s1")[-1].endswith("runtime.num_threads=2`")
    assert row_cells(text, "dense_s0")[-1].endswith("runtime.num_threads=2`")
    assert "num_threads" not in row_cells(text, "dense_s1")[-1]      # started without a thread count: none given


def test_summary_compares_with_every_baseline(tmp_path, monkeypatch):
    """The issue asks for Welch against the dense twin AND against CondConv: one table per baseline."""
    plan = write_plan(tmp_path, PLAN.replace('baselines = ["dense"]', 'baselines = ["dense", "up"]')
                      .replace('variants=["dense", "pce"]', 'variants=["dense", "pce", "up"]'))
    root = tmp_path / "wd/s26/final"
    finals = {"dense": [0.80, 0.82], "pce": [0.70, 0.75], "up": [0.84, 0.83]}
    for name, values in finals.items():
        for s, v in enumerate(values):
            write_metrics(root / f"{name}_s{s}", vals((1, v - 0.1), (8, v), test=v))
    monkeypatch.setattr(rs, "execute", lambda *a, **k: pytest.fail("--summary-only trained"))
    assert rs.main([str(plan), "--stage", "final", "--work-root", str(tmp_path / "wd"), "--summary-only",
                    "--no-experts"]) == 0
    text = (root / "summary.md").read_text()
    assert "| variant vs dense |" in text and "| variant vs up |" in text
    vs_up = text[text.index("| variant vs up |"):]
    ref = stats.ttest_ind(finals["pce"], finals["up"], equal_var=False)
    ci = ref.confidence_interval(0.95)
    assert row_cells(vs_up, "pce")[1] == f"{0.725 - 0.835:+.4f} [{ci.low:+.4f}, {ci.high:+.4f}], p={ref.pvalue:.3f}"


def test_malformed_stop_file_is_one_line_naming_it(tmp_path, capsys):
    plan = write_plan(tmp_path)
    screen = tmp_path / "wd/s26/screen"
    write_metrics(screen / "dense_s0", vals((2, 0.8), (4, 0.85), test=0.85))
    write_metrics(screen / "pce_s0", vals((2, 0.6)))
    (screen / "pce_s0" / rs.STOP_FILE).write_text('{"epoch": 2}')
    assert rs.main([str(plan), "--work-root", str(tmp_path / "wd"), "--summary-only", "--no-experts"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {screen / 'pce_s0' / rs.STOP_FILE}: not a stop decision")


def test_sigterm_to_the_study_ends_its_training(tmp_path):
    """`kill <run_study>` (SIGTERM) must not leave the training it started running (it has its own session)."""
    child = ("import os,sys,time; open(sys.argv[1],'w').write(str(os.getpid())); time.sleep(120)")
    driver = (f"import sys; sys.path.insert(0, {str(REPO / 'tools')!r}); sys.path.insert(0, {str(REPO / 'tests')!r})\n"
              "from _faults_util import load_tool\n"
              "rs = load_tool('run_study'); rs._raise_on_sigterm()\n"
              f"rs.execute(['python', '-c', {child!r}, {str(tmp_path / 'pid')!r}], {str(tmp_path)!r}, None, 0.1)\n")
    proc = subprocess.Popen([sys.executable, "-c", driver], cwd=REPO)
    deadline = time.time() + 60
    while not (tmp_path / "pid").is_file() and time.time() < deadline:
        time.sleep(0.1)
    pid = int((tmp_path / "pid").read_text())
    proc.terminate()
    assert proc.wait(timeout=60) == 143
    time.sleep(0.5)
    with pytest.raises(ProcessLookupError):  # the training ended with it and was reaped
        os.kill(pid, 0)


def test_experts_analysed_on_another_number_of_samples_are_analysed_again(tmp_path, monkeypatch, capsys):
    """The plan's experts_num decides the samples; an experts.json that answered another number (its num_requested,
    else an older file's num_samples) is analysed again with --force, --experts-num overrides the plan, and
    summary.md says how many samples its expert columns used."""
    plan = write_plan(tmp_path, PLAN + "experts_num = 32\n")
    root = tmp_path / "wd/s26/final"
    for s in (0, 1):
        write_metrics(root / f"pce_s{s}", vals((1, 0.7), (8, 0.8), test=0.8))
        (root / f"pce_s{s}/best.pth").write_bytes(b"x")
    put(root / "pce_s0", {**experts_json(0.5, [0.4], 0.8, 0.7, 0.6, 0.8), "num_samples": 16, "num_requested": 16})
    put(root / "pce_s1", {**experts_json(0.5, [0.4], 0.8, 0.7, 0.6, 0.8), "num_samples": 32})  # older file: no request
    calls = []

    def fake(argv, env):
        num = int(argv[argv.index("--num") + 1])
        calls.append((Path(argv[2]).parent.name, num, argv[-1]))
        Path(argv[argv.index("--out") + 1]).write_text(json.dumps(
            {**experts_json(0.5, [0.4], 0.8, 0.7, 0.6, 0.8), "num_samples": min(num, 20), "num_requested": num}))
        return subprocess.CompletedProcess(argv, 0, "", "")

    monkeypatch.setattr(se, "run_analysis", fake)
    argv = [str(plan), "--stage", "final", "--work-root", str(tmp_path / "wd"), "--summary-only", "--only", "pce"]
    assert rs.main(argv) == 0
    assert calls == [("pce_s0", 32, "--force")]                     # 16 asked before; pce_s1's 32 samples stand
    assert "on (up to) the first 32 validation samples" in (root / "summary.md").read_text()
    calls.clear()
    assert rs.main(argv) == 0 and calls == []                       # 20 samples of 32 asked: the split's end, kept
    assert rs.main(argv + ["--experts-num", "8"]) == 0
    assert calls == [("pce_s0", 8, "--force"), ("pce_s1", 8, "--force")]
    assert "on (up to) the first 8 validation samples" in (root / "summary.md").read_text()
