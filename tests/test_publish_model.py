"""Issue #24, tools/publish_model.py: a pruned run's full checkpoint (EMA on) stripped to its weights, named by its
sha256, loads through every loader (eval's, model.pretrained, Predictor) with the expert structure and routing
phase kept, and gives the outputs of the source checkpoint's EMA weights loaded by hand."""
from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path

import pytest
import torch

from pce.engine import Trainer, evaluate_checkpoint, load_checkpoint
from pce.engine.evaluation import load_trained_weights
from pce.engine.weights import load_pretrained
from pce.moe.surgery import apply_structure, pce_layers
from pce.tasks import Predictor, get_task

from _faults_util import DEMO, error_line, load_tool, tiny_cfg, tiny_overrides

LAYER = "backbone.stages.0.layers.0"
DROPPED = {"optimizer", "scheduler", "scaler", "rng", "ema", "epoch_ckpts"}


def publish(*argv) -> int:
    return load_tool("publish_model").main([str(a) for a in argv])


def published(folder: Path, stem: str) -> Path:
    files = sorted(folder.glob(f"{stem}-*.pth"))
    assert len(files) == 1, files
    return files[0]


@pytest.fixture(scope="module")
def pruned_run(tmp_path_factory) -> Path:
    """A run started from a pruned checkpoint (expert 0 of LAYER removed), EMA on: latest.pth holds model, EMA,
    optimizer and the expert structure."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("publish")
    Trainer(tiny_cfg(root / "a", epochs=1, iters=2), get_task("classification")).train()
    prune = load_tool("prune_experts")
    args = prune.parse_args([str(DEMO), "--checkpoint", str(root / "a/latest.pth"), "--num", "32", "--remove",
                             f"{LAYER}:0", "--out", str(root / "pruned.pth"), "--cfg-options",
                             *[f"{k}={v!r}" for k, v in tiny_overrides(root / "a")]])
    assert prune.main(args) == 0
    wd = root / "b"
    Trainer(tiny_cfg(wd, ("model.pretrained", str(root / "pruned.pth")), ("runtime.ema", 0.9), epochs=2, iters=2),
            get_task("classification")).train()
    return wd


def _reference(cfg, full: dict) -> torch.nn.Module:
    """The source checkpoint's EMA weights loaded by hand: structure replayed, ``module.`` prefix stripped."""
    model = get_task("classification").build_model(cfg)
    apply_structure(model, full["expert_structure"])
    model.load_state_dict({k[len("module."):]: v for k, v in full["ema"].items() if k != "n_averaged"})
    return model.eval()


def test_published_checkpoint_loads_everywhere_with_the_same_outputs(pruned_run, tmp_path, caplog):
    src = pruned_run / "latest.pth"
    assert publish(src, tmp_path / "out" / "tiny.pth") == 0
    pub = published(tmp_path / "out", "tiny")
    assert pub.name == f"tiny-{hashlib.sha256(pub.read_bytes()).hexdigest()[:8]}.pth"
    assert [p.name for p in (tmp_path / "out").iterdir()] == [pub.name]  # no temp file left
    full, lean = load_checkpoint(src), load_checkpoint(pub)
    assert not DROPPED & set(lean) and lean["weights"] == "ema"
    assert lean["expert_structure"] == full["expert_structure"] == {LAYER: [[1, 2, 3]]}
    assert lean["phase"] == full["phase"] and lean["config"] == full["config"] and lean["epoch"] == 2
    assert all(v.dtype == torch.float32 for v in lean["model"].values() if v.is_floating_point())
    assert pub.stat().st_size * 2 < src.stat().st_size

    cfg = tiny_cfg(pruned_run)
    ref = _reference(cfg, full)
    x = torch.randn(6, 1, 8, 8)
    with torch.no_grad():
        want = ref(x)
        model = get_task("classification").build_model(cfg)
        load_trained_weights(model, cfg, pub)  # tools/eval.py, infer.py, export.py, the analysis tools
        assert pce_layers(model)[LAYER].num_experts == 3
        assert torch.equal(model.eval()(x), want)
        predictor = Predictor.from_checkpoint(DEMO, pub, device="cpu",
                                              cfg_options=[f"{k}={v!r}" for k, v in tiny_overrides(pruned_run)])
        assert torch.equal(predictor.model(x), want)
        fresh = get_task("classification").build_model(cfg)
        with caplog.at_level(logging.INFO, logger="pce"):
            report = load_pretrained(fresh, pub)  # model.pretrained
        assert report["matched"] == report["total"] and not report["missing"]
        assert torch.equal(fresh.eval()(x), want)
        # the routing phase comes from the file: a config that puts its epoch in the uniform-routing phase
        stabilise = [dict(name="stabilise", epochs=-1, router_override="uniform", keys_trainable=False)]
        other = tiny_cfg(pruned_run, phases=stabilise)
        with caplog.at_level(logging.WARNING, logger="pce"):
            load_trained_weights(model, other, pub)
        assert "evaluating in the checkpoint's phase 'route'" in caplog.text
        assert torch.equal(model.eval()(x), want)
    got = evaluate_checkpoint(cfg, get_task("classification"), pub, split="val")
    assert got["top1"] == evaluate_checkpoint(cfg, get_task("classification"), src, split="val")["top1"]


def test_no_ema_and_half(pruned_run, tmp_path):
    src = pruned_run / "latest.pth"
    full = load_checkpoint(src)
    assert publish(src, tmp_path / "raw", "--no-ema") == 0
    raw = load_checkpoint(published(tmp_path, "raw"))
    assert raw["weights"] == "model" and set(raw["model"]) == set(full["model"])
    assert all(torch.equal(v, full["model"][k]) for k, v in raw["model"].items())
    assert publish(src, tmp_path / "half.pth", "--half") == 0
    half_path = published(tmp_path, "half")
    half = load_checkpoint(half_path)
    assert {v.dtype for v in half["model"].values() if v.is_floating_point()} == {torch.float16}
    assert half_path.stat().st_size < 0.6 * published(tmp_path, "raw").stat().st_size
    cfg = tiny_cfg(pruned_run)
    model = get_task("classification").build_model(cfg)
    load_trained_weights(model, cfg, half_path)
    x = torch.randn(6, 1, 8, 8)
    with torch.no_grad():
        assert torch.allclose(model.eval()(x), _reference(cfg, full)(x), atol=5e-2, rtol=1e-2)
    # a weights-only best.pth publishes too (its EMA weights: --no-ema has no raw weights to keep, and says so)
    assert publish(pruned_run / "best.pth", tmp_path / "best", "--no-ema") == 0
    best = load_checkpoint(published(tmp_path, "best"))
    assert best["weights"] == "ema" and best["expert_structure"] == {LAYER: [[1, 2, 3]]}


def test_never_replaces_a_file_and_errors_are_one_line(pruned_run, tmp_path, capsys):
    src = pruned_run / "latest.pth"
    assert publish(src, tmp_path / "m.pth") == 0
    pub = published(tmp_path, "m")
    before = pub.read_bytes()
    capsys.readouterr()
    assert publish(src, tmp_path / "m.pth") == 1  # the same content, hence the same name
    line = error_line(capsys.readouterr().err)
    assert line.startswith(f"error: {pub}: already exists")
    assert pub.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == [pub.name]
    missing = tmp_path / "missing.pth"
    assert publish(missing, tmp_path / "x.pth") == 1
    assert error_line(capsys.readouterr().err).startswith(f"error: {missing}: checkpoint not found")
    assert publish(missing, tmp_path / "x.pth", "--debug") == 1
    assert "Traceback" in capsys.readouterr().err
    bad = tmp_path / "nan.pth"
    full = load_checkpoint(src)
    key = next(k for k in full["ema"] if k.endswith("running_mean"))
    full["ema"][key][0] = float("nan")
    torch.save(full, bad)
    assert publish(bad, tmp_path / "nan_out") == 1
    assert re.match(rf"error: {re.escape(str(bad))}: 1 non-finite tensor\(s\): {re.escape(key[7:])}",
                    error_line(capsys.readouterr().err))
    assert not list(tmp_path.glob("nan_out*"))
