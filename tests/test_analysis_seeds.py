"""Routing statistics over seeds (pce.analysis.seeds, tools/analyze_routing.py --seeds) on hand-made stats."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pytest
from scipy.stats import t as student_t

from _faults_util import error_line, load_tool
from pce.analysis.seeds import MIN_EXCESS, SeedsError, format_seeds_table, summarize_seeds
from pce.engine.errors import run_cli

L1, L2 = "backbone.stages.0.layers.0", "backbone.stages.1.layers.0"
Pair = Tuple[float, float]  # (nmi, shuffled baseline)


def seed_stats(layers: Dict[str, Tuple[Optional[Pair], Pair]]) -> dict:
    """A routing_stats.json of one seed: ``{layer: ((class nmi, baseline) or None, (position nmi, baseline))}``."""
    out = {}
    for name, (cls, pos) in layers.items():
        row = {"num_experts": 4, "nmi_position": {"nmi": pos[0], "baseline": pos[1], "baseline_std": 0.001, "n": 900}}
        if cls is not None:
            row["nmi_class"] = {"nmi": cls[0], "baseline": cls[1], "baseline_std": 0.001, "n": 900}
        out[name] = row
    return {"config": "c.py", "checkpoint": "best.pth", "split": "val", "layers": out}


def one_layer(cls: Sequence[Optional[Pair]], pos: Sequence[Pair]) -> List[dict]:
    return [seed_stats({L1: (c, p)}) for c, p in zip(cls, pos)]


CLS = [(0.10, 0.010), (0.13, 0.012), (0.07, 0.008), (0.12, 0.011)]
POS = [(0.40, 0.004), (0.35, 0.006), (0.47, 0.005), (0.38, 0.003)]


def test_aggregates_and_lower_bound_match_an_independent_computation():
    stats = [seed_stats({L1: (c, p), L2: (None, (p[0] / 2, p[1]))}) for c, p in zip(CLS, POS)]
    s = summarize_seeds(stats)["layers"]
    for key, pairs in (("nmi_class", CLS), ("nmi_position", POS)):
        nmi, base = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
        exc = nmi - base
        for part, v in (("nmi", nmi), ("baseline", base), ("excess", exc)):
            got = s[L1][key][part]
            assert got["n"] == 4
            assert got["mean"] == pytest.approx(np.mean(v), abs=1e-12)
            assert got["std"] == pytest.approx(np.std(v, ddof=1), abs=1e-12)
            assert (got["min"], got["max"]) == pytest.approx((v.min(), v.max()))
        hand = exc.mean() - student_t.ppf(0.95, 3) * np.std(exc, ddof=1) / math.sqrt(4)
        assert s[L1][key]["excess"]["lower_95"] == pytest.approx(hand, abs=1e-12)
    assert s[L2]["nmi_class"] is None  # no class labels in that layer
    assert s[L2]["nmi_position"]["nmi"]["mean"] == pytest.approx(np.mean([p[0] / 2 for p in POS]))
    assert s[L1]["label"] == "positional" and s[L2]["label"] == "positional"


def _jitter(excess: float, spread: float, n: int = 4) -> List[Pair]:
    base = [0.005, 0.006, 0.004, 0.005, 0.007][:n]
    return [(b + excess + spread * d, b) for b, d in zip(base, (-1.0, 0.5, 1.0, -0.5, 0.0)[:n])]


@pytest.mark.parametrize("cls_excess, cls_spread, pos_excess, pos_spread, expected", [
    (0.001, 0.001, 0.30, 0.02, "positional"),   # only position passes
    (0.20, 0.02, 0.002, 0.001, "semantic"),     # only class passes
    (0.10, 0.03, 0.11, 0.03, "both"),           # both pass, neither bound above the other's mean
    (0.05, 0.005, 0.30, 0.01, "positional"),    # both pass, position's bound above the class mean
    (0.30, 0.01, 0.05, 0.005, "semantic"),      # both pass, class's bound above the position mean
    (0.005, 0.002, 0.01, 0.003, "chance"),      # neither passes
    (0.001, 0.001, 0.10, 0.20, "chance"),       # position mean 0.1, but its spread puts the bound below MIN_EXCESS
])
def test_verdict_branches(cls_excess, cls_spread, pos_excess, pos_spread, expected):
    s = summarize_seeds(one_layer(_jitter(cls_excess, cls_spread), _jitter(pos_excess, pos_spread)))
    row = s["layers"][L1]
    assert row["label"] == expected and row["verdict"] == expected
    exc = np.array([a - b for a, b in _jitter(pos_excess, pos_spread)])  # the bound by hand, against MIN_EXCESS
    hand = exc.mean() - student_t.ppf(0.95, exc.size - 1) * exc.std(ddof=1) / math.sqrt(exc.size)
    assert row["nmi_position"]["excess"]["lower_95"] == pytest.approx(hand)
    assert (hand > MIN_EXCESS) == (expected in ("positional", "both") or (expected == "semantic" and pos_excess > 0.02))


def test_one_seed_is_undetermined_and_no_class_labels_uses_position():
    s = summarize_seeds(one_layer([CLS[0]], [POS[0]]))["layers"][L1]
    assert s["label"] == "undetermined" and s["nmi_position"]["nmi"]["std"] is None
    assert s["nmi_position"]["excess"]["lower_95"] is None
    s = summarize_seeds(one_layer([None] * 4, _jitter(0.2, 0.01)))["layers"][L1]
    assert s["nmi_class"] is None and s["label"] == "positional"


def test_copies_note_from_layer_diversity_or_run_summary():
    stats = one_layer(_jitter(0.001, 0.001, 3), _jitter(0.3, 0.01, 3))
    experts = [{"diversity": {L1: {"weight_cosine_min": 0.995}}, "summary": {"expert_weight_cos_min": 0.2}},
               {"summary": {"expert_weight_cos_min": 0.999}},      # no per-layer row: the run's summary
               {"diversity": {L1: {"weight_cosine_min": 0.5}}, "summary": {"expert_weight_cos_min": 0.5}}]
    row = summarize_seeds(stats, experts)["layers"][L1]
    assert (row["copies"], row["copies_known"]) == (2, 3)
    assert row["verdict"] == "positional; experts are copies in 2/3 seeds: the routing changes nothing"
    row = summarize_seeds(stats, [None, experts[2], None])["layers"][L1]
    assert (row["copies"], row["copies_known"], row["verdict"]) == (0, 1, "positional")
    # one kernel, different outputs (per-expert batch norms: the Camelyon demo's deep experts): not copies
    experts[0]["diversity"][L1]["output_cosine_min"] = 0.75
    experts[1]["diversity"] = {L1: {"output_cosine_min": 0.999}}  # the summary's kernel cosine, outputs alike
    row = summarize_seeds(stats, experts)["layers"][L1]
    assert (row["copies"], row["copies_known"]) == (1, 3)


def test_layers_that_differ_between_seeds_are_refused():
    stats = [seed_stats({L1: (CLS[0], POS[0])}), seed_stats({L2: (CLS[1], POS[1])})]
    with pytest.raises(SeedsError, match=r"^b/routing_stats.json: layers: .*\(the layers of a/routing_stats.json"):
        summarize_seeds(stats, names=["a/routing_stats.json", "b/routing_stats.json"])


def test_table():
    s = summarize_seeds(one_layer(CLS, POS))
    table = format_seeds_table(s).splitlines()
    assert table[0].startswith("| layer | seeds | NMI class mean ± std (shuffled)") and len(table) == 3
    c, p = np.array(CLS), np.array(POS)
    assert table[2] == (f"| `{L1}` | 4 | {c[:, 0].mean():.3f} ± {c[:, 0].std(ddof=1):.3f} ({c[:, 1].mean():.4f}) | "
                        f"{p[:, 0].mean():.3f} ± {p[:, 0].std(ddof=1):.3f} ({p[:, 1].mean():.4f}) | positional |")


def run(*argv: str) -> int:
    tool = load_tool("analyze_routing")
    args = tool.parse_args(list(argv))
    return run_cli(lambda: tool.main(args), debug=False)


def _write_seeds(tmp: Path, stats: List[dict]) -> List[str]:
    dirs = []
    for i, s in enumerate(stats):
        d = tmp / f"s{i}"
        d.mkdir()
        (d / "routing_stats.json").write_text(json.dumps(s))
        dirs.append(str(d))
    return dirs


def test_cli_seeds_mode_end_to_end(tmp_path: Path, capsys):
    stats = [seed_stats({L1: (c, p)}) for c, p in zip(CLS, POS)]
    dirs = _write_seeds(tmp_path, stats)
    experts = []
    for i, cos in enumerate((0.999, 0.3, 0.999, 0.2)):
        f = tmp_path / f"experts{i}.json"
        f.write_text(json.dumps({"summary": {"expert_weight_cos_min": cos}}))
        experts.append(str(f))
    out = tmp_path / "seeds.json"
    assert run("--seeds", *dirs, "--experts", *experts, "--out", str(out)) == 0
    printed = capsys.readouterr().out
    assert format_seeds_table(summarize_seeds(stats, [{"summary": {"expert_weight_cos_min": c}}
                                                      for c in (0.999, 0.3, 0.999, 0.2)])) in printed
    got = json.loads(out.read_text())
    assert got["layers"][L1]["nmi_position"]["nmi"]["mean"] == pytest.approx(np.mean([p[0] for p in POS]))
    assert got["layers"][L1]["verdict"].endswith("experts are copies in 2/4 seeds: the routing changes nothing")
    assert got["sources"]["routing_stats"][0].endswith("s0/routing_stats.json")
    # no overwrite without --force
    before = out.read_text()
    assert run("--seeds", *dirs[:2], "--out", str(out)) == 1
    assert "already exists" in error_line(capsys.readouterr().err) and out.read_text() == before
    assert run("--seeds", *dirs[:2], "--out", str(out), "--force") == 0
    assert json.loads(out.read_text())["seeds"] == 2


def test_cli_seeds_mode_bad_input(tmp_path: Path, capsys):
    dirs = _write_seeds(tmp_path, [seed_stats({L1: (CLS[0], POS[0])}), seed_stats({L1: (CLS[1], POS[1])})])
    missing = tmp_path / "nope"
    assert run("--seeds", dirs[0], str(missing), "--out", str(tmp_path / "a.json")) == 1
    line = error_line(capsys.readouterr().err)
    assert line.startswith(f"error: {missing / 'routing_stats.json'}: no such file (") and "analyze_routing" in line
    assert run("--seeds", *dirs, "--experts", str(tmp_path / "e.json"), "--out", str(tmp_path / "b.json")) == 1
    assert error_line(capsys.readouterr().err) == ("error: --experts: 1 file(s) for 2 --seeds folder(s) (one "
                                                   "tools/analyze_experts.py JSON per folder, in the same order)")
    (Path(dirs[1]) / "routing_stats.json").write_text(json.dumps(seed_stats({L2: (CLS[0], POS[0])})))
    assert run("--seeds", *dirs, "--out", str(tmp_path / "c.json")) == 1
    line = error_line(capsys.readouterr().err)
    assert f"{dirs[1]}/routing_stats.json: layers" in line and L1 in line and L2 in line
    assert not any((tmp_path / n).exists() for n in ("a.json", "b.json", "c.json"))
    # the same seed twice would narrow the spread; malformed experts files and numbers are one line each
    (Path(dirs[1]) / "routing_stats.json").write_text(json.dumps(seed_stats({L1: (CLS[1], POS[1])})))
    assert run(f"--seeds={dirs[0]}", "--seeds", dirs[0], dirs[1], dirs[0], "--out", str(tmp_path / "d.json")) == 1
    assert error_line(capsys.readouterr().err).startswith(f"error: --seeds: {dirs[0]}/routing_stats.json given twice (")
    bad = tmp_path / "bad.json"
    for content, where in (([1, 2], "experts of"), ({"diversity": {L1: [0.5]}}, f"diversity.{L1}"),
                           ({"summary": {"expert_weight_cos_min": "high"}}, "summary.expert_weight_cos_min: 'high'")):
        bad.write_text(json.dumps(content))
        assert run("--seeds", *dirs, "--experts", str(bad), str(bad), "--out", str(tmp_path / "e.json")) == 1
        line = error_line(capsys.readouterr().err)
        assert line.startswith("error: experts of ") and where in line and "Error" not in line, line
    stats = seed_stats({L1: (CLS[1], POS[1])})
    stats["layers"][L1]["nmi_class"]["nmi"] = "x"
    (Path(dirs[1]) / "routing_stats.json").write_text(json.dumps(stats))
    assert run("--seeds", *dirs, "--out", str(tmp_path / "f.json")) == 1
    assert error_line(capsys.readouterr().err) == (f"error: {dirs[1]}/routing_stats.json: layers.{L1}.nmi_class.nmi: "
                                                   "'x' (a number or null)")
