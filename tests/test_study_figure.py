"""pce.analysis.study_figure and the ``summary.png`` of tools/run_study.py: the drawn intervals are scipy's Welch
intervals (final) or the hand-computed difference of best metrics (screen), coloured by the expert verdict."""
from __future__ import annotations

import json
from pathlib import Path

import matplotlib.colors as mcolors
import pytest
from PIL import Image
from scipy import stats

from _faults_util import load_tool
from pce.analysis import study_figure as sf

rs = load_tool("run_study")

PLAN = """
study = "s26"
metric = "top1"
reference = "dense"
baselines = ["dense"]
variants = dict(dense=dict(config="configs/demo_cls_digits.py"), pce=dict(config="configs/demo_cls_digits.py"),
                cc=dict(config="configs/demo_cls_digits.py"))
screen = dict(seeds=[0], epoch_scale=0.5, stop_margin=0.05)
final = dict(seeds=[0, 1, 2], variants=["dense", "pce", "cc"])
"""


def _run(wd: Path, best: float, final: float, experts=None) -> None:
    wd.mkdir(parents=True)
    rows = [{"type": "val", "epoch": 1, "top1": best, "time": 60.0}, {"type": "val", "epoch": 2, "top1": final,
            "time": 120.0}, {"type": "test", "epoch": 2, "top1": final}]
    (wd / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if experts is not None:
        (wd / "experts.json").write_text(json.dumps(experts))


def _capture(monkeypatch):
    """Keep the figure study_figure draws instead of writing it."""
    figs = []
    monkeypatch.setattr(sf, "_save", lambda fig, path, dpi=None: figs.append(fig) or Path(path))
    return figs


def _drawn(fig):
    """{y: (x data of every line at that y)} of the figure's only axes, and the y tick labels."""
    ax = fig.axes[0]
    out = {}
    for line in ax.get_lines():
        ys = set(float(y) for y in line.get_ydata())
        if len(ys) == 1:
            out.setdefault(ys.pop(), []).append((tuple(float(x) for x in line.get_xdata()), line.get_color(),
                                                 line.get_markerfacecolor()))
    return out, [t.get_text() for t in ax.get_yticklabels()]


def test_verdict_classes():
    assert sf.verdict_class("copies 5/5") == "copies"
    assert sf.verdict_class("differ 5/5") == "differ"
    assert sf.verdict_class("differ, metric unchanged") == "inert"
    assert sf.verdict_class("differ, metric unchanged 2/2") == "inert"
    assert sf.verdict_class("differ 1/2, differ, metric unchanged 1/2") == "mixed"
    assert sf.verdict_class("copies 1/2, differ, metric unchanged 1/2") == "mixed"
    assert sf.verdict_class("copies 2/5, differ 3/5") == "mixed"
    assert sf.verdict_class("-") == "not routed"
    assert sf.verdict_class("not analysed") == "not analysed"


def test_rows_sorted_with_intervals_and_colours(monkeypatch):
    figs = _capture(monkeypatch)
    rows = [sf.StudyRow("a", -0.01, -0.02, 0.0, "differ 5/5", seeds=5), sf.StudyRow("b", 0.02, verdict="copies"),
            sf.StudyRow("c", 0.005, verdict="-", stopped=True)]
    sf.study_figure(rows, "x.png", metric="top1", reference="dense")
    drawn, labels = _drawn(figs[0])
    assert labels == ["a", "c", "b"]                          # best at the top: y 0 is the bottom row
    assert (( -0.02, 0.0), mcolors.to_hex(sf.VERDICT_COLORS["differ"])) == (
        drawn[0.0][0][0], mcolors.to_hex(drawn[0.0][0][1]))  # the interval of "a"
    assert drawn[1.0][0][0] == (0.005,) and drawn[1.0][0][2] == "white"   # stopped: hollow, no interval
    assert drawn[2.0][0][0] == (0.02,) and mcolors.to_hex(drawn[2.0][0][1]) == sf.VERDICT_COLORS["copies"].lower()
    with pytest.raises(ValueError):
        sf.study_figure([], "x.png", metric="top1", reference="dense")


def test_run_study_writes_the_figure_of_a_final_stage(tmp_path, monkeypatch):
    plan = tmp_path / "plan.py"
    plan.write_text(PLAN)
    root = tmp_path / "wd/s26/final"
    dense, pce = [0.80, 0.82, 0.81], [0.83, 0.86, 0.84]
    for s in range(3):
        _run(root / f"dense_s{s}", 0.9, dense[s])
        _run(root / f"pce_s{s}", 0.9, pce[s])
    _run(root / "cc_s0", 0.9, 0.79)                           # one seed: a dot at the difference of the means
    figs = _capture(monkeypatch)
    assert rs.main([str(plan), "--stage", "final", "--work-root", str(tmp_path / "wd"), "--summary-only",
                    "--no-experts"]) == 0
    drawn, labels = _drawn(figs[0])
    ci = stats.ttest_ind(pce, dense, equal_var=False).confidence_interval(0.95)
    y_pce, y_cc = float(labels.index("pce")), float(labels.index("cc"))
    assert drawn[y_pce][0][0] == pytest.approx((ci.low, ci.high))
    assert drawn[y_pce][1][0] == pytest.approx((sum(pce) / 3 - sum(dense) / 3,))
    assert drawn[y_cc][0][0] == pytest.approx((0.79 - dense[0],))   # the same seed's reference
    assert "dense" not in labels


def test_run_study_screen_figure_is_a_png(tmp_path):
    plan = tmp_path / "plan.py"
    plan.write_text(PLAN)
    root = tmp_path / "wd/s26/screen"
    _run(root / "dense_s0", 0.80, 0.78)
    _run(root / "pce_s0", 0.83, 0.70, experts={"routed": False})
    assert rs.main([str(plan), "--work-root", str(tmp_path / "wd"), "--summary-only", "--no-experts"]) == 0
    with Image.open(root / "summary.png") as im:
        assert im.format == "PNG" and im.size[0] >= 1000          # 8 inches at the package's 150+ dpi


def test_screen_figure_draws_the_best_metric_difference(tmp_path, monkeypatch):
    plan = tmp_path / "plan.py"
    plan.write_text(PLAN)
    root = tmp_path / "wd/s26/screen"
    _run(root / "dense_s0", 0.80, 0.78)
    _run(root / "pce_s0", 0.83, 0.70)                         # best 0.83 - 0.80, not final 0.70 - 0.78
    # stopped at half: its stop decision's own difference (0.70 - 0.72 at epoch 1), not its best - the final best
    (root / "cc_s0").mkdir()
    (root / "cc_s0/metrics.jsonl").write_text(json.dumps({"type": "val", "epoch": 1, "top1": 0.70}) + "\n")
    (root / "cc_s0" / rs.STOP_FILE).write_text(json.dumps({"epoch": 1, "value": 0.70, "reference": 0.72, "stop": True}))
    figs = _capture(monkeypatch)
    assert rs.main([str(plan), "--work-root", str(tmp_path / "wd"), "--summary-only", "--no-experts"]) == 0
    drawn, labels = _drawn(figs[0])
    assert labels == ["cc", "pce"] and drawn[1.0][0][0] == pytest.approx((0.03,))
    assert drawn[0.0][0][0] == pytest.approx((-0.02,)) and drawn[0.0][0][2] == "white"


def test_no_finished_reference_no_figure_and_no_stale_one(tmp_path, capsys):
    plan = tmp_path / "plan.py"
    plan.write_text(PLAN)
    root = tmp_path / "wd/s26/screen"
    _run(root / "pce_s0", 0.83, 0.70)
    (root / "summary.png").write_bytes(b"an old figure")
    assert rs.main([str(plan), "--work-root", str(tmp_path / "wd"), "--summary-only", "--no-experts"]) == 0
    assert not (root / "summary.png").exists() and "figure: none" in capsys.readouterr().out


def test_a_stopped_outlier_does_not_squash_the_axis(monkeypatch):
    """One run stopped at -0.26 beside differences of +-0.007: the axis keeps the others' span (+50%), the outlier
    is an arrow head inside the left edge, and its true value is still printed."""
    figs = _capture(monkeypatch)
    rows = [sf.StudyRow("a", 0.002, verdict="differ"), sf.StudyRow("b", -0.007, verdict="differ"),
            sf.StudyRow("out", -0.26, verdict="differ", stopped=True)]
    sf.study_figure(rows, "x.png", metric="top1", reference="dense")
    ax = figs[0].axes[0]
    lo, hi = ax.get_xlim()
    # kept span [-0.007, 0.002] (0 included), width 0.009: [-0.0115, 0.002], padded by 8% of 0.0135 = 0.00108
    assert lo == pytest.approx(-0.01258) and hi == pytest.approx(0.00308)
    arrow = [ln for ln in ax.get_lines() if ln.get_marker() == "<"]
    assert len(arrow) == 1 and lo < arrow[0].get_xdata()[0] < -0.007
    assert any(t.get_text().startswith("-0.2600") for t in ax.texts)
    assert sf.x_range(rows[:2])[0] < -0.007 and sf.x_range(rows) == (lo, hi)
