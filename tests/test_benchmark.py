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
    assert {"config", "layer", "model", "flops", "memory"} <= set(r)
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
