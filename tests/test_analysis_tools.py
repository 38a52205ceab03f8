"""The analysis tools end to end on a digits checkpoint trained here (a few iterations)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from _faults_util import load_tool
from pce.engine import Trainer, load_config
from pce.tasks import get_task
from pce.tasks.hooks import default_hooks

REPO = Path(__file__).resolve().parents[1]
DEMO = str(REPO / "configs/demo_cls_digits.py")


def run(name: str, *argv: str) -> int:
    from pce.engine.errors import run_cli

    tool = load_tool(name)
    args = tool.parse_args(list(argv))
    return run_cli(lambda: tool.main(args), debug=False)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    wd = tmp_path_factory.mktemp("digits_run")
    cfg = load_config(DEMO, [("runtime.work_dir", str(wd)), ("schedule.epochs", 2), ("schedule.iters_per_epoch", 3),
                             ("phases.0.epochs", 1), ("phases.1.epochs", 1), ("runtime.kmeans_init_batches", 2),
                             ("runtime.log_interval", 1), ("runtime.tensorboard", False),
                             ("runtime.progress_bar", False)])
    task = get_task("classification")
    Trainer(cfg, task, hooks=default_hooks(cfg, task)).train()  # the hooks tools/train.py registers
    torch.set_num_threads(1)
    return wd


def test_training_logs_routing_statistics(run_dir: Path):
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    routed = [r for r in recs if r.get("type") == "train" and r.get("routing")]
    assert routed, "no routing statistics in metrics.jsonl"
    layer = next(iter(routed[-1]["routing"].values()))
    assert {"entropy", "usage", "collapsed_experts", "usage_entropy", "imbalance", "nmi_position"} <= set(layer)
    assert len(layer["usage"]) == 4 and 0.0 <= layer["entropy"] <= torch.log(torch.tensor(4.0)).item() + 1e-6
    assert layer["collapsed_experts"] == sum(u < 0.01 for u in layer["usage"])


def test_visualize_analyze_prune(run_dir: Path, tmp_path: Path):
    ckpt = str(run_dir / "latest.pth")
    assert run("visualize_routing", DEMO, "--checkpoint", ckpt, "--split", "val", "--num", "3",
               "--out", str(tmp_path / "vis")) == 0
    assert sorted(p.name for p in (tmp_path / "vis").glob("*.png")) == [f"val_{i:04d}.png" for i in range(3)]
    from PIL import Image

    with Image.open(tmp_path / "vis" / "val_0000.png") as im:  # paper resolution by default
        assert im.info["dpi"] == pytest.approx((200, 200), abs=0.03)

    assert run("analyze_routing", DEMO, "--checkpoint", ckpt, "--split", "val", "--num", "64",
               "--out", str(tmp_path / "an")) == 0
    s = json.loads((tmp_path / "an" / "routing_stats.json").read_text())
    assert s["num_samples"] == 64 and len(s["layers"]) == 3
    for layer in s["layers"].values():
        assert abs(sum(layer["usage_share"]) - 1) < 1e-5 and layer["nmi_class"]["n"] > 0
        kept = layer["num_patches"] - round(layer["dropped_rate"] * layer["num_patches"])
        assert sum(map(sum, layer["expert_class"])) == kept  # every routed patch counted once
    assert {"usage.png", "nmi.png", "clusters.png"} <= {p.name for p in (tmp_path / "an").iterdir()}
    assert sum(s["clusters"]["sizes"]) == 64

    out = tmp_path / "pruned.pth"
    first = next(iter(s["layers"]))
    assert run("prune_experts", DEMO, "--checkpoint", ckpt, "--num", "64", "--remove", f"{first}:0,1",
               "--out", str(out), "--json", str(tmp_path / "prune.json")) == 0
    r = json.loads((tmp_path / "prune.json").read_text())
    assert r["after"]["experts"][first] == 2 and r["before"]["experts"][first] == 4
    assert r["after"]["params"] < r["before"]["params"]
    # the pruned checkpoint loads with the original config, and the analysis sees 2 experts there
    assert run("analyze_routing", DEMO, "--checkpoint", str(out), "--num", "16", "--out", str(tmp_path / "an2")) == 0
    s2 = json.loads((tmp_path / "an2" / "routing_stats.json").read_text())
    assert s2["layers"][first]["num_experts"] == 2
    # tools/eval.py's path (evaluate_checkpoint) replays the pruned structure too
    from pce.engine import evaluate_checkpoint

    cfg = load_config(DEMO)
    res = evaluate_checkpoint(cfg, get_task("classification"), str(out), split="val")
    assert 0.0 <= res[cfg.eval.metric] <= 1.0 and res["split"] == "val"


def test_nmi_over_training_of_a_real_run(run_dir: Path, tmp_path: Path):
    """The records RoutingStatsHook wrote, averaged per epoch by hand; the same run twice: a band of zero width."""
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    out = tmp_path / "nmi.png"
    assert run("analyze_routing", "--runs", str(run_dir), str(run_dir), "--nmi-plot", str(out)) == 0
    got = json.loads(out.with_suffix(".json").read_text())
    routed = [r for r in recs if r.get("type") == "train" and r.get("routing")]
    epochs = sorted({r["epoch"] for r in routed})
    assert got["epochs"] == epochs and got["phases"] == [[r["epoch"], r["name"]] for r in recs
                                                          if r.get("type") == "phase"]
    assert list(got["layers"]) == list(routed[0]["routing"])
    for layer, d in got["layers"].items():
        hand = [sum(r["routing"][layer]["nmi_position"] for r in routed if r["epoch"] == e)
                / sum(r["epoch"] == e for r in routed) for e in epochs]
        assert d["nmi_position"]["mean"] == pytest.approx(hand)
        assert d["nmi_position"]["min"] == pytest.approx(hand) == d["nmi_position"]["max"]
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_tools_report_bad_input(run_dir: Path, tmp_path: Path, capsys):
    assert run("analyze_routing", DEMO, "--checkpoint", str(tmp_path / "nope.pth"), "--out", str(tmp_path)) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "nope.pth" in err and "Traceback" not in err
    assert run("prune_experts", DEMO, "--checkpoint", str(run_dir / "latest.pth"), "--remove", "no.such:1",
               "--out", str(tmp_path / "x.pth")) == 1
    assert "--remove no.such:1" in capsys.readouterr().err
    assert run("report", str(tmp_path / "missing")) == 1
    assert "not a folder" in capsys.readouterr().err
