import json
from pathlib import Path

import pytest
from _faults_util import load_tool

ROOT = Path(__file__).resolve().parents[1]
tool = load_tool("summarize_runs")


def test_summary_picks_best_and_final(tmp_path, capsys):
    rows = [
        {"type": "train", "epoch": 1, "images_per_s": 10.0, "time": 100.0,
         "routing": {"l0": {"entropy": 0.5, "usage": [0.5, 0.5]}, "l1": {"entropy": 1.5, "usage": [1.0, 0.0]}}},
        {"type": "val", "epoch": 1, "top1": 0.8, "time": 160.0},
        {"type": "train", "epoch": 2, "images_per_s": 30.0, "time": 200.0},
        {"type": "val", "epoch": 2, "top1": 0.7, "time": 220.0},
    ]
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    s = tool.summarize(tmp_path / "run", "top1")
    assert (s["best"], s["best_epoch"], s["final"], s["epochs"]) == (0.8, 1, 0.7, 2)
    assert s["minutes"] == 2.0 and s["images_per_s"] == 20.0 and s["entropy"] == 1.0
    assert tool.main([str(tmp_path / "run")]) == 0
    assert "| run | 0.8000 (1) | 0.7000 |" in capsys.readouterr().out
    assert tool.main([str(tmp_path / "missing")]) == 1
    assert "no metrics.jsonl" in capsys.readouterr().err


def test_seed_groups_mean_and_std(tmp_path, capsys):
    for name, acc in [("pce_s0", 0.90), ("pce_s1", 0.92), ("pce_s2", 0.94), ("dense_seed0", 0.95), ("other", 0.5)]:
        (tmp_path / name).mkdir()
        rows = [{"type": "train", "epoch": 1, "images_per_s": 100.0, "time": 0.0},
                {"type": "val", "epoch": 1, "top1": acc, "time": 60.0}]
        (tmp_path / name / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    names = ["pce_s0", "pce_s1", "pce_s2", "dense_seed0", "other"]
    rows = [tool.summarize(tmp_path / n, "top1") for n in names]
    groups = tool.group_by_seed(rows)
    assert sorted(groups) == ["dense", "pce"] and len(groups["pce"]) == 3
    assert tool.main([str(tmp_path / n) for n in names]) == 0
    out = capsys.readouterr().out
    # mean 0.92, sample std 0.02 (statistics.stdev of 0.90, 0.92, 0.94)
    assert "| pce | 0,1,2 | 0.9200 ± 0.0200 | 0.9200 ± 0.0200 | 1.0 ± 0.0 | 100 ± 0 |" in out
    assert "| dense | 0 | 0.9500 |" in out


def test_welch_comparison_matches_scipy(tmp_path, capsys):
    from scipy import stats

    a, b = [0.910, 0.903, 0.906, 0.906, 0.909], [0.929, 0.917, 0.921, 0.910, 0.917]
    w = tool.welch(a, b)
    ref = stats.ttest_ind(a, b, equal_var=False)
    assert w["t"] == pytest.approx(ref.statistic) and w["p"] == pytest.approx(ref.pvalue)
    assert w["diff"] == pytest.approx(sum(a) / 5 - sum(b) / 5)
    ci = ref.confidence_interval(0.95)
    assert (w["low"], w["high"]) == (pytest.approx(ci.low), pytest.approx(ci.high))
    with pytest.raises(ValueError, match="at least 2 runs"):
        tool.welch([0.9], b)
    for group, values in (("dense", b), ("pce", a)):
        for seed, v in enumerate(values):
            (tmp_path / f"{group}_s{seed}").mkdir()
            rows = [{"type": "train", "epoch": 1, "images_per_s": 1.0, "time": 0.0},
                    {"type": "val", "epoch": 1, "top1": v, "time": 60.0}]
            (tmp_path / f"{group}_s{seed}" / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    dirs = [str(tmp_path / f"{g}_s{s}") for g in ("dense", "pce") for s in range(5)]
    assert tool.main(dirs) == 0
    out = capsys.readouterr().out
    assert "| runs vs dense |" in out
    assert f"| pce | {w['diff']:+.4f} [{w['low']:+.4f}, {w['high']:+.4f}], p={w['p']:.3f} |" in out


def test_minutes_leave_out_the_pause_of_a_resumed_run(tmp_path):
    """Trained 60 s + 90 s around a 5-hour pause (stopped, resumed the next session): 2.5 minutes, not 302.5."""
    rows = [{"type": "train", "epoch": 1, "images_per_s": 10.0, "time": 0.0},
            {"type": "val", "epoch": 1, "top1": 0.5, "time": 60.0},
            {"type": "phase", "epoch": 2, "time": 60.0 + 5 * 3600},
            {"type": "val", "epoch": 2, "top1": 0.6, "time": 150.0 + 5 * 3600}]
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert tool.summarize(tmp_path / "run", "top1")["minutes"] == pytest.approx(2.5)


def test_minutes_with_resume_records_leave_out_only_the_marked_pause(tmp_path):
    """With the trainer's resume record, the gap before it is the pause (even a short one, 10 min) and a long
    evaluation without one (45 min) is training time: 1 + 45 + 2 = 48 minutes, not 3 (the 30-min rule's) or 58."""
    rows = [{"type": "train", "epoch": 1, "images_per_s": 10.0, "time": 0.0},
            {"type": "val", "epoch": 1, "top1": 0.5, "time": 60.0},
            {"type": "val", "epoch": 1, "top1": 0.5, "time": 60.0 + 45 * 60},
            {"type": "resume", "epoch": 1, "iter": 3, "time": 60.0 + 55 * 60},
            {"type": "val", "epoch": 2, "top1": 0.6, "time": 180.0 + 55 * 60}]
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert tool.summarize(tmp_path / "run", "top1")["minutes"] == pytest.approx(48.0)


def test_a_p_below_one_in_a_thousand_prints_as_an_upper_bound_not_zero():
    """The Fashion-MNIST finals' pce_all vs CondConv (final top-1 over 5 seeds): scipy's Welch p is 0.00016, which
    three decimals would print as "p=0.000"; the summary tables say "p<0.001" and keep three decimals above it."""
    from scipy import stats

    a, b = [0.9350, 0.9358, 0.9346, 0.9351, 0.9361], [0.9393, 0.9378, 0.9399, 0.9390, 0.9380]
    ref = stats.ttest_ind(a, b, equal_var=False)
    assert ref.pvalue < 0.001
    cell = tool.welch_cell(tool.welch(a, b))
    assert cell.endswith(", p<0.001") and "p=0.000" not in cell
    assert cell.startswith(f"{sum(a) / 5 - sum(b) / 5:+.4f} [")
    assert tool.format_p(0.0049) == "p=0.005" and tool.format_p(0.001) == "p=0.001"
    assert tool.format_p(0.00099) == "p<0.001"
