"""tools/benchmark.py (a --smoke run, JSON schema) and pce/flops.py (FLOPs against hand formulas)."""
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pce.models.flops import active_params_per_token, count_flops, count_params
from pce.models.layer import DenseLayer, PCELayer

ROOT = Path(__file__).resolve().parents[1]


def _positive_finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.mark.slow
def test_benchmark_smoke_json(tmp_path):
    out = tmp_path / "bench.json"
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "benchmark.py"), "--quick", "--smoke", "--json", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    elapsed = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Targets" in proc.stdout and ("PASS" in proc.stdout or "FAIL" in proc.stdout)
    r = json.loads(out.read_text())
    assert {"config", "layer", "conv", "model", "flops", "memory"} <= set(r)
    assert {row["candidate"] for row in r["conv"]} >= {"conv", "condconv", "pce_top1_auto", "pce_top2_sparse"}
    cfg = r["config"]
    assert cfg["mode"] == "smoke" and {"batch", "channels", "size", "patch"} <= set(cfg["layer"])
    pce_name, dense_name, resnet = cfg["models"]

    assert r["layer"], "no layer rows"
    for row in r["layer"]:
        assert {"experts", "routing", "mode", "pce_ms", "dense_ms", "ratio"} <= set(row)
        assert row["mode"] in ("fwd", "train") and row["routing"] in ("top1", "top2", "soft")
        for k in ("pce_ms", "dense_ms", "ratio"):
            assert _positive_finite(row[k]), (k, row)
    assert {(row["routing"], row["mode"]) for row in r["layer"]} == {
        (a, b) for a in ("top1", "top2", "soft") for b in ("fwd", "train")}

    assert r["model"], "no model rows"
    for row in r["model"]:
        assert {"name", "input", "batch", "threads", "mode", "ms", "images_per_s", "ratio_vs_dense",
                "ratio_vs_resnet18"} <= set(row)
        assert row["mode"] in ("infer", "train") and row["name"] in cfg["models"]
        for k in ("ms", "images_per_s", "ratio_vs_dense", "ratio_vs_resnet18"):
            assert _positive_finite(row[k]), (k, row)
        if row["name"] == dense_name:
            assert row["ratio_vs_dense"] == pytest.approx(1.0)
        if row["name"] == resnet:
            assert row["ratio_vs_resnet18"] == pytest.approx(1.0)
        assert row["images_per_s"] == pytest.approx(row["batch"] / row["ms"] * 1e3)

    assert set(r["flops"]) == set(cfg["models"])
    for name, f in r["flops"].items():
        assert {"gflops", "params", "active_params_per_token"} <= set(f)
        assert _positive_finite(f["gflops"]) and f["params"] > 0
        assert 0 < f["active_params_per_token"] <= f["params"]
    assert r["flops"][pce_name]["active_params_per_token"] < r["flops"][pce_name]["params"]
    assert r["flops"][dense_name]["active_params_per_token"] == r["flops"][dense_name]["params"]

    for name in cfg["models"]:
        assert _positive_finite(r["memory"][name]["peak_rss_mb"]), r["memory"][name]
    assert _positive_finite(r["memory"]["ratio_pce_vs_dense"])
    assert r["targets"] and all(isinstance(t["pass"], bool) for t in r["targets"])
    print(f"benchmark --quick --smoke: {elapsed:.1f} s wall (benchmark's own timer {cfg['wall_s']} s)")


@pytest.mark.parametrize("cin,cout,k,stride,pad,groups,bias,size", [
    (3, 16, 3, 1, 1, 1, False, 32),
    (3, 16, 3, 2, 1, 1, True, 33),
    (16, 32, 5, 1, 2, 4, False, 20),
    (8, 8, 1, 1, 0, 1, True, 7),
])
def test_conv_flops_hand_formula(cin, cout, k, stride, pad, groups, bias, size):
    conv = nn.Conv2d(cin, cout, k, stride, pad, groups=groups, bias=bias)
    B = 2
    out = (size + 2 * pad - k) // stride + 1
    expected = B * cout * out * out * (cin // groups) * k * k  # multiply-adds, bias not counted (fvcore)
    r = count_flops(conv, torch.randn(B, cin, size, size))
    assert r["total"] == expected
    assert r["by_operator"] == {"conv": expected}
    assert r["gflops"] == pytest.approx(expected / 1e9)
    assert r["params"] == count_params(conv) and r["unsupported"] == {}
    assert "#flops" in r["table"]


def test_sdpa_and_index_add_handles():
    class Attn(nn.Module):
        def forward(self, q, k, v, src):
            out = F.scaled_dot_product_attention(q, k, v)
            acc = torch.zeros(5, 3).index_add(0, torch.tensor([0, 2, 2, 4]), src)
            return out, acc

    q, k, v = torch.randn(2, 4, 10, 8), torch.randn(2, 4, 6, 8), torch.randn(2, 4, 6, 12)
    r = count_flops(Attn(), (q, k, v, torch.randn(4, 3)))
    assert r["by_operator"]["scaled_dot_product_attention"] == 2 * 4 * 10 * 6 * (8 + 12)
    assert r["by_operator"]["index_add"] == 4 * 3


def test_pce_layer_top1_flops_are_active_flops():
    """Top-1 sparse dispatch is traced as executed: every pixel goes through exactly one expert, so the
    expert convolutions cost what one dense expert costs (plus the router's 1x1 projection and the layer's)."""
    torch.manual_seed(0)
    B, C, H, n, E = 2, 16, 16, 8, 4
    layer = PCELayer(C, n, num_experts=E, router="cosine", top_k=1).eval()
    dense = DenseLayer(C).eval()
    x = torch.randn(B, C, H, H)
    pixels = B * H * H
    expert = 2 * pixels * C * C * 9  # two 3x3 convolutions
    proj = pixels * C * C
    # the router projects the content map per image and the positional map once: W_x x + (W_pos pos + b)
    router = (pixels * C + H * H * layer.pos.num_channels) * layer.router.proj.out_channels
    router += B * (H // n) ** 2 * layer.router.embed_dim * E  # cosine similarity to the keys
    def conv_like(model):  # 1x1 convolutions may run as matrix products (pce.layers.pointwise)
        ops = count_flops(model, x)["by_operator"]
        return ops["conv"] + ops.get("matmul", 0) + ops.get("linear", 0)

    assert conv_like(layer) == expert + proj + router
    assert conv_like(dense) == expert + proj
    soft = PCELayer(C, n, num_experts=E, router="cosine", router_kwargs={"threshold": False}).eval()
    assert conv_like(soft) == E * expert + proj + router


def test_active_params_per_token():
    C, E = 16, 4
    top1 = PCELayer(C, 8, num_experts=E, top_k=1)
    top2 = PCELayer(C, 8, num_experts=E, top_k=2)
    soft = PCELayer(C, 8, num_experts=E, router_kwargs={"threshold": False})
    expert_params = count_params(top1.experts)
    total = count_params(top1)
    assert active_params_per_token(top1) == total - expert_params * (E - 1) // E
    assert active_params_per_token(top2) == total - expert_params * (E - 2) // E
    assert active_params_per_token(soft) == count_params(soft)
    dense = DenseLayer(C)
    assert active_params_per_token(dense) == count_params(dense)
    # one expert's share equals the dense twin's expert
    assert expert_params // E == count_params(dense.experts)


def test_count_flops_backbone_mapping_output():
    from pce.models.presets import build_backbone

    bb = build_backbone("pce_tiny").eval()
    r = count_flops(bb, torch.randn(1, 3, 64, 64))
    assert r["total"] > 0 and r["unsupported"] == {}
    assert "stages.0" in r["by_module"] and r["by_module"][""] == r["total"]


def test_benchmark_compile_section_rows():
    """``--compile``'s layer cells (dynamo's ``eager`` backend: the capture path without code generation):
    every candidate timed, ratios consistent with the times, compiled outputs equal to eager ones."""
    sys.path.insert(0, str(ROOT / "tools"))
    import benchmark
    import benchmark_compile

    cfg = dict(batch=2, channels=8, size=16, patch=8, experts=(2,), warmup=0, reps=1, min_reps=1, budget_s=0.0)
    rows = benchmark_compile.run_compile_layer(cfg, 1, "eager", benchmark, lambda msg: None)
    names = {"pce_eager", "pce_compiled", "pce_cap_eager", "pce_cap_compiled", "dense_eager", "dense_compiled"}
    assert {(r["candidate"], r["mode"]) for r in rows} == {(n, m) for n in names for m in ("fwd", "train")}
    for mode in ("fwd", "train"):
        cell = {r["candidate"]: r for r in rows if r["mode"] == mode}
        for r in cell.values():
            assert _positive_finite(r["ms"])
            assert r["ratio_vs_dense_eager"] == pytest.approx(r["ms"] / cell["dense_eager"]["ms"])
            assert r["ratio_vs_pce_eager"] == pytest.approx(r["ms"] / cell["pce_eager"]["ms"])
            assert (r["compile_s"] is not None) == r["candidate"].endswith("compiled")
    assert max(rows[0]["max_abs_diff"].values()) < 1e-5
    assert "torch.compile (backend eager" in benchmark_compile.format_compile(rows, "eager")


# -- issue #21 (section conv) and issue #25 (--vs condconv) -------------------------------------------------------
def _tools():
    if str(ROOT / "tools") not in sys.path:
        sys.path.insert(0, str(ROOT / "tools"))


def _median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def test_benchmark_conv_rows_ratios_and_flops():
    """The conv section on a tiny shape: every candidate x mode row, ratios recomputed by hand from the raw
    timings, MACs against hand formulas, targets judged on the CPU ratio of the ``cells`` rows."""
    _tools()
    import benchmark_conv as bc

    B, C, H, W = 2, 8, 12, 12
    cfg = dict(shapes=((B, C, H, W),), inputs=("cells", "noise"), warmup=0, reps=2, min_reps=2, budget_s=0.0)
    rows = json.loads(json.dumps(bc.run_conv_level(cfg, 1, lambda msg: None)))  # what --json writes
    names = {"conv", "condconv"} | set(bc.PCE_VARIANTS)
    assert {(r["candidate"], r["input"], r["mode"]) for r in rows} == {
        (n, i, m) for n in names for i in ("cells", "noise") for m in ("fwd", "train")}
    conv_macs = B * C * H * W * C * 9
    for r in rows:
        ref = next(x for x in rows if x["candidate"] == "conv" and x["input"] == r["input"] and x["mode"] == r["mode"])
        assert r["ms"] == pytest.approx(_median(r["wall_runs"]))
        assert r["cpu_ms"] == pytest.approx(_median(r["cpu_runs"]))
        assert r["ratio"] == pytest.approx(_median(r["wall_runs"]) / _median(ref["wall_runs"]))
        assert r["ratio_cpu"] == pytest.approx(_median(r["cpu_runs"]) / _median(ref["cpu_runs"]))
        assert r["flop_ratio"] == pytest.approx(r["macs"] / conv_macs)
        assert r["ratio_cpu_per_flop"] == pytest.approx(r["ratio_cpu"] / r["flop_ratio"])
        if r["candidate"] == "conv":
            assert r["macs"] == conv_macs
        if r["candidate"] == "condconv":  # conv + routing linear + kernel mixing [B, E] @ [E, C C 9]
            assert r["macs"] == conv_macs + B * C * bc.EXPERTS + B * bc.EXPERTS * C * C * 9
        if r["top_k"] is not None:
            assert sum(r["tokens_per_expert"]) == r["top_k"] * B * 9  # grid 3: 9 cells per image
            assert r["router_macs"] is not None and r["macs"] >= r["router_macs"] + r["top_k"] * conv_macs
            assert r["executed"] in ("sparse", "dense") and (r["dispatch"] != "sparse" or r["executed"] == "sparse")
    checks = bc.check_conv_targets(rows)
    judged = [r for r in rows if r["input"] == "cells" and r["top_k"] is not None]
    assert len(checks) == len(judged) == 8
    for t, r in zip(checks, judged):
        assert t["value_cpu"] == r["ratio_cpu"] and t["pass"] == (r["ratio_cpu"] <= bc.CONV_TARGETS[r["top_k"]])
    assert "PCEConv2d vs nn.Conv2d vs CondConv2d" in bc.format_conv(rows, 1)


def test_benchmark_condconv_rows_and_check():
    """--vs condconv's timing rows (ratios from the raw timings), the issue's check and the memory ratios."""
    _tools()
    import benchmark_condconv as bcc

    pairs = (("pce_tiny", "dense_tiny"), (bcc.CONDCONV, bcc.DENSE_CC))
    cfg = dict(points=((32, 2),), warmup=0, reps=2, min_reps=2, budget_s=0.0)
    rows = json.loads(json.dumps(bcc.run_condconv(cfg, [1], lambda msg: None, pairs)))
    cells = {(r["input"], r["batch"], r["threads"], r["mode"]) for r in rows}
    assert cells == {(32, 2, 1, m) for m in ("infer", "train")}
    for r in rows:
        assert set(r["models"]) == {n for p in pairs for n in p} and set(r["ratios"]) == {p[0] for p in pairs}
        for c, d in pairs:
            assert r["ratios"][c]["wall"] == pytest.approx(_median(r["models"][c]["wall_runs"])
                                                           / _median(r["models"][d]["wall_runs"]))
            assert r["ratios"][c]["cpu"] == pytest.approx(_median(r["models"][c]["cpu_runs"])
                                                          / _median(r["models"][d]["cpu_runs"]))
    assert bcc.check_condconv(rows) == []  # 32 px is not a check point

    def point(size, batch, threads, tiny, cc):
        times = {"pce_tiny": {"wall": [tiny], "cpu": [tiny]}, "dense_tiny": {"wall": [1.0], "cpu": [1.0]},
                 bcc.CONDCONV: {"wall": [cc], "cpu": [cc]}, bcc.DENSE_CC: {"wall": [2.0], "cpu": [2.0]}}
        return bcc.point_row(size, batch, threads, "infer", times, pairs)
    # CondConv 2.6 / 2.0 = 1.30: PCE passes up to 1.35
    checks = bcc.check_condconv([point(224, 8, 1, 1.34, 2.6), point(128, 32, 1, 1.36, 2.6), point(224, 8, 2, 9.0, 2.6)])
    assert [c["pass"] for c in checks] == [True, False] and checks[0]["limit"] == "<= 1.35"
    mem = {n: {"peak_rss_mb": v, "total_training_mb": 2 * v} for n, v in
           {"pce_tiny": 30.0, "dense_tiny": 20.0, bcc.CONDCONV: 50.0, bcc.DENSE_CC: 40.0}.items()}
    ratios = bcc.memory_ratios(mem, pairs)
    assert ratios["pce_tiny"]["step"] == pytest.approx(1.5) and ratios[bcc.CONDCONV]["total"] == pytest.approx(1.25)


def test_benchmark_vs_points_and_condconv_memory_skip(monkeypatch):
    """``--vs-points`` replaces the grid of ``--vs condconv`` (SIZExBATCH, a one-line error otherwise) and
    ``--skip condconv_memory`` leaves its memory workers out."""
    _tools()
    import benchmark
    import benchmark_condconv as bcc

    args = benchmark.parse_args(["--vs", "condconv", "--vs-points", "224x8", "64x2", "--skip", "condconv_memory"])
    assert args.vs_points == [(224, 8), (64, 2)] and "condconv_memory" in args.skip
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--vs-points", "224"])
    seen = {}
    monkeypatch.setattr(bcc, "run_condconv",
                        lambda cfg, th, log, pairs: seen.update(points=cfg["points"], pairs=pairs) or [])
    monkeypatch.setattr(bcc, "start_condconv_memory", lambda cfg: seen.setdefault("memory", True))
    args.skip += ["layer", "model", "flops", "memory", "conv"]
    result = {"config": {}}
    benchmark._run_sections(args, benchmark.SETTINGS["quick"], "quick", [1], result, lambda m: None, lambda n: None)
    assert seen == {"points": ((224, 8), (64, 2)), "pairs": bcc.PAIRS}
    args.vs = ["condconv", "floor"]  # the floor rows join the same run
    benchmark._run_sections(args, benchmark.SETTINGS["quick"], "quick", [1], result, lambda m: None, lambda n: None)
    assert seen["pairs"] == bcc.PAIRS + bcc.FLOOR_PAIRS and result["config"]["vs_condconv"]["pairs"] == seen["pairs"]


def test_benchmark_floor_rows_and_flop_ratios():
    """``--vs condconv floor``: the presets with every patch on expert 0 (a bound, never judged), and each row's
    FLOPs over the twin, checked by hand at 224 px: stages 3-4 of ``pce_tiny`` compute their experts on 16 and 8 px
    grids for 14 and 7 px maps (``(16 / 14) ** 2`` and ``(8 / 7) ** 2`` the dense twin's expert FLOPs)."""
    _tools()
    import benchmark
    import benchmark_condconv as bcc
    from benchmark_model import build_model
    from pce.models.flops import count_flops
    from pce.models.routed import routed_layers

    with pytest.raises(SystemExit):
        benchmark.parse_args(["--vs", "floor"])
    assert benchmark.parse_args(["--vs", "condconv", "floor"]).vs == ["condconv", "floor"]
    with pytest.raises(ValueError, match="pce_tiny:ceiling"):
        build_model("pce_tiny:ceiling")
    floor = build_model("pce_tiny:floor")
    assert [type(m.router_override).__name__ for _, m in routed_layers(floor)] == ["SharedRouter"] * 4
    dense = build_model("dense_tiny").eval()
    by = count_flops(dense, torch.randn(1, 3, 224, 224), max_depth=6)["by_module"]
    expert = {s: by[f"backbone.stages.{s}.layers.0"] - by[f"backbone.stages.{s}.layers.0.proj"] for s in (2, 3)}
    extra = expert[2] * ((16 / 14) ** 2 - 1) + expert[3] * ((8 / 7) ** 2 - 1)
    ratios = bcc.flop_ratios({"pce_tiny:floor": floor, "dense_tiny": dense}, 224, (("pce_tiny:floor", "dense_tiny"),))
    assert ratios["pce_tiny:floor"] == pytest.approx((by[""] + extra) / by[""], rel=1e-6)
    pairs = bcc.PAIRS[:1] + (bcc.PAIRS[2],) + bcc.FLOOR_PAIRS[:1]
    times = {n: {"wall": [v], "cpu": [v]} for n, v in {"pce_tiny": 1.0, "dense_tiny": 1.0, bcc.CONDCONV: 2.0,
                                                       bcc.DENSE_CC: 2.0, "pce_tiny:floor": 9.0}.items()}
    checks = bcc.check_condconv([bcc.point_row(224, 8, 1, "train", times, pairs)])
    assert [c["target"].split("/")[0] for c in checks] == ["pce_tiny"] and checks[0]["pass"]
    assert "PRESET:floor" in bcc.format_condconv({"vs_condconv": [dict(bcc.point_row(224, 8, 1, "train", times, pairs),
                                                                       flops_ratio=ratios)], "config": {}})


@pytest.mark.slow
def test_benchmark_strict_exit_code(tmp_path):
    """Without --strict a failed target exits 0; with it, 1 (the conv section alone, tiny shapes)."""
    base = [sys.executable, str(ROOT / "tools" / "benchmark.py"), "--quick", "--smoke", "--skip", "layer", "model",
            "flops", "memory"]
    out = tmp_path / "b.json"
    lax = subprocess.run(base + ["--json", str(out)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert lax.returncode == 0, lax.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["conv"] and r["targets"] and not r["layer"] and not r["model"]
    strict = subprocess.run(base + ["--strict"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    failed = "FAIL " in strict.stdout
    assert strict.returncode == (1 if failed else 0), strict.stderr[-3000:]
    assert failed  # PCEConv2d on a 2x8x12x12 map is router-bound: top-1 is far above 1.2x nn.Conv2d
    assert "--strict" in subprocess.run(base[:2] + ["--help"], capture_output=True, text=True, cwd=ROOT).stdout
