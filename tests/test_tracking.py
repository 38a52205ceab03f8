"""MLflow tracking and routing-map pictures (issue #24): a tiny training logged into a temporary MLflow file store,
read back with an independent reader (``MlflowClient``) and compared with ``metrics.jsonl`` (flattened here by
hand) and the TensorBoard event file (tensorboard's own ``EventAccumulator``); the pictures against a re-drawing
of the trained model's routing; the one-line error when MLflow is missing; a failing tracker never stops training."""
from __future__ import annotations

import io
import json
import importlib
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pce.analysis.maps import routing_maps
from pce.analysis.plots import routing_figure
from pce.engine import Trainer
from pce.engine.errors import PCEError
from pce.engine.logging import MetricWriter
from pce.tasks import get_task
from pce.tasks.hooks import RoutingStatsHook, SplitRecordHook, default_hooks
from pce.tasks.tooling import display

from _faults_util import DEMO, cli_options, error_line, load_tool, tiny_cfg

mlflow = pytest.importorskip("mlflow")
from mlflow.tracking import MlflowClient  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

SKIP = ("type", "time", "epoch", "iter")


def expected_from_jsonl(path: Path) -> dict:
    """``{name: [(step, value)]}`` from metrics.jsonl: ``<type>/<key>`` for finite numbers, per-expert lists of the
    ``routing`` entry as ``routing/<layer>/<stat>/e<i>`` (the names TensorBoard has always had)."""
    out: dict = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if "iter" not in rec:  # written without a step: no tracker gets it
            continue
        flat = {f"{rec['type']}/{k}": v for k, v in rec.items() if k not in SKIP and k != "routing"}
        for layer, stats in rec.get("routing", {}).items():
            for stat, v in stats.items():
                if isinstance(v, list):
                    flat.update({f"routing/{layer}/{stat}/e{e}": u for e, u in enumerate(v)})
                else:
                    flat[f"routing/{layer}/{stat}"] = v
        for name, v in flat.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                out.setdefault(name, []).append((rec["iter"], float(v)))
    return out


@pytest.fixture
def file_store(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3.x: the file store is opt-in
    return tmp_path / "mlruns"


def test_mlflow_run_mirrors_metrics_params_and_routing_pictures(tmp_path: Path, file_store: Path):
    work = tmp_path / "run"
    cfg = tiny_cfg(work, ("runtime.mlflow.enable", True), ("runtime.mlflow.tracking_uri", file_store.as_uri()),
                   ("runtime.mlflow.experiment", "pce-test"), ("runtime.tensorboard", True),
                   ("runtime.routing_maps.interval", 1), ("runtime.routing_maps.num_images", 2), epochs=2, iters=2)
    task = get_task("classification")
    trainer = Trainer(cfg, task, hooks=default_hooks(cfg, task, config_file=str(DEMO)))
    trainer.train()

    client = MlflowClient(tracking_uri=file_store.as_uri())
    (run,) = client.search_runs([client.get_experiment_by_name("pce-test").experiment_id])
    rid = run.info.run_id
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    # every scalar of metrics.jsonl, same names and steps, exact values
    expected = expected_from_jsonl(work / "metrics.jsonl")
    assert {"train/loss", "train/lr", "val/top1", "routing/backbone.stages.1.layers.0/usage/e0"} <= set(expected)
    assert set(run.data.metrics) == set(expected)
    for name, hist in expected.items():
        assert [(m.step, m.value) for m in client.get_metric_history(rid, name)] == hist, name
    # ... and what TensorBoard got, name for name
    events = EventAccumulator(str(work / "tb"), size_guidance={"scalars": 0, "images": 0}).Reload()
    assert set(events.Tags()["scalars"]) == set(expected)
    for name in expected:
        tb = [(e.step, e.value) for e in events.Scalars(name)]
        assert [s for s, _ in tb] == [s for s, _ in expected[name]]
        assert np.allclose([v for _, v in tb], [v for _, v in expected[name]], rtol=1e-6)
    # params: the flattened config; tags
    assert run.data.params["optimizer.lr"] == str(cfg.optimizer.lr)
    assert run.data.params["schedule.epochs"] == "2" and run.data.params["runtime.mlflow.enable"] == "True"
    assert run.data.tags["task"] == "classification" and run.data.tags["pce.config_file"] == str(DEMO)
    # artifacts: config.json (as in the work dir), no checkpoint, the routing maps of both epochs
    arts = {a.path for a in client.list_artifacts(rid)}
    assert arts == {"config.json", "routing_maps"}
    got = Path(client.download_artifacts(rid, "config.json", str(tmp_path / "dl")))
    assert json.loads(got.read_text()) == json.loads((work / "config.json").read_text())
    for epoch in (1, 2):
        assert {a.path for a in client.list_artifacts(rid, f"routing_maps/epoch_{epoch:04d}")} == {
            f"routing_maps/epoch_{epoch:04d}/val_{i:04d}.png" for i in range(2)}
    # the last pictures are the trained model's routing of the first validation images, drawn again here
    ds = trainer.datasets["val"]
    batch = torch.stack([ds[i][0] for i in range(2)])
    maps = routing_maps(trainer.eval_model, batch)
    for i in range(2):
        ref = routing_figure(display(ds[i][0], getattr(ds, "transform", None)), maps, i, tmp_path / f"ref{i}.png",
                             title=f"val_{i:04d} (epoch 2)")
        dl = client.download_artifacts(rid, f"routing_maps/epoch_0002/val_{i:04d}.png", str(tmp_path / "dl"))
        with Image.open(dl) as im:
            assert im.format == "PNG"
            logged = np.asarray(im.convert("RGB"))
        with Image.open(ref) as im:
            assert logged.shape == (im.height, im.width, 3) and logged.shape[0] > 100
            assert np.array_equal(logged, np.asarray(im.convert("RGB")))
        # TensorBoard got the same picture at each epoch's last step
        tb_images = events.Images(f"routing_maps/val_{i:04d}")
        assert [e.step for e in tb_images] == [2, 4]
        with Image.open(io.BytesIO(tb_images[-1].encoded_image_string)) as im:
            assert np.array_equal(np.asarray(im.convert("RGB")), logged)


def test_missing_mlflow_is_one_line_naming_the_key(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` raises ImportError
    cfg = tiny_cfg(tmp_path, ("runtime.mlflow.enable", True))
    with pytest.raises(PCEError, match=r"^runtime\.mlflow\.enable: .*pip install mlflow-skinny"):
        default_hooks(cfg, get_task("classification"))
    train = load_tool("train")
    assert train.main([str(DEMO)] + cli_options(tmp_path / "cli")
                      + ["runtime.mlflow.enable=True"]) == 1
    line = error_line(capsys.readouterr().err)
    assert line.startswith("error: runtime.mlflow.enable: ") and "pip install mlflow-skinny" in line
    # disabled: the hooks are the usual two; the modules import without MLflow and a run never imports it
    # (every `import mlflow` raises while it is blocked)
    cfg = tiny_cfg(tmp_path / "off", epochs=1, iters=1)
    assert [type(h) for h in default_hooks(cfg, get_task("classification"))] == [RoutingStatsHook, SplitRecordHook]
    importlib.reload(importlib.import_module("pce.engine.tracking"))
    importlib.reload(importlib.import_module("pce.tasks.tracking_hooks"))
    cfg = tiny_cfg(tmp_path / "off", ("runtime.routing_maps.interval", 1), epochs=1, iters=1)
    Trainer(cfg, get_task("classification"), hooks=default_hooks(cfg, get_task("classification"))).train()
    assert len(list((tmp_path / "off" / "routing_maps" / "epoch_0001").glob("val_*.png"))) == 4


def test_a_failing_tracker_never_stops_training(tmp_path: Path, file_store: Path, monkeypatch, capsys):
    calls = []

    def broken(self, *args, **kwargs):
        calls.append(kwargs)
        raise OSError("disk full")

    monkeypatch.setattr(MlflowClient, "log_batch", broken)
    cfg = tiny_cfg(tmp_path / "run", ("runtime.mlflow.enable", True),
                   ("runtime.mlflow.tracking_uri", file_store.as_uri()), epochs=1, iters=2)
    task = get_task("classification")
    out = Trainer(cfg, task, hooks=default_hooks(cfg, task)).train()
    assert out["epochs"] == 1 and (tmp_path / "run" / "best.pth").is_file()
    text = capsys.readouterr().out
    assert text.count("mlflow: logging params failed (OSError: disk full)") == 1
    assert text.count("failed (") == 1                              # warned once ...
    assert f"mlflow: {len(calls)} MLflow writes failed" in text and len(calls) > 3   # ... counted after
    (run,) = MlflowClient(tracking_uri=file_store.as_uri()).search_runs(
        [MlflowClient(tracking_uri=file_store.as_uri()).get_experiment_by_name("classification").experiment_id])
    assert run.info.status == "FINISHED"


def test_resume_continues_the_run_and_other_ranks_log_nothing(tmp_path: Path, file_store: Path):
    work, uri = tmp_path / "run", file_store.as_uri()
    opts = [("runtime.mlflow.enable", True), ("runtime.mlflow.tracking_uri", uri)]
    task = get_task("classification")
    cfg = tiny_cfg(work, *opts, epochs=1, iters=2)
    Trainer(cfg, task, hooks=default_hooks(cfg, task)).train()
    cfg = tiny_cfg(work, *opts, epochs=2, iters=2)
    Trainer(cfg, task, resume=True, hooks=default_hooks(cfg, task)).train()
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("classification").experiment_id])
    assert json.loads((work / "mlflow_run.json").read_text())["run_id"] == run.info.run_id
    assert run.info.status == "FINISHED" and run.data.params["schedule.epochs"] == "1"  # params are fixed
    expected = expected_from_jsonl(work / "metrics.jsonl")
    assert [s for s, _ in expected["train/loss"]] == [1, 2, 3, 4]
    for name, hist in expected.items():
        assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, name)] == hist, name

    class OtherRank:  # what the hook reads of a trainer on rank 1
        pass

    rank1 = OtherRank()
    rank1.is_main, rank1.cfg, rank1.task, rank1.work_dir, rank1.resume_path = False, cfg, task, tmp_path / "r1", None
    rank1.writer = MetricWriter(tmp_path / "r1", enabled=False)   # as Trainer.train() makes it off rank 0
    hook = default_hooks(cfg, task)[-1]
    hook.trainer = rank1
    hook.before_train()
    hook.after_train()
    assert hook.tracker is None and not (tmp_path / "r1").exists()
