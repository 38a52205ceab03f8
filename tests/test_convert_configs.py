"""``model.convert`` end to end (issue #21, PCE anywhere): the shipped ``*_patchmoe`` configs build their dense
twin with ``pce.PCEConv2d`` where they say, the demo trains (a few iterations on a tiny generated set), its
checkpoint reloads into the same converted structure, the routing tools and ``tools/export.py`` run on it, the
training phases drive converted layers of a model without a PCE backbone, config errors are one line, and
routing figures draw uneven cells where they are."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

import pce
from pce.engine import Trainer, load_config
from pce.engine.evaluation import load_trained_weights
from pce.models.routed import routed_layers
from pce.tasks import get_task
from pce.tasks.hooks import default_hooks
from _faults_util import DEMO, cli_options, error_line, load_tool

REPO = Path(__file__).resolve().parents[1]
SEG = "configs/demo_seg_patchmoe.py"
HEAD = "net.segmentation_head.0"
# config -> (its dense twin, the converted layers, a small input for building it)
CONFIGS = {
    "demo_seg_patchmoe": ("demo_seg_dense", [HEAD], 64),
    "demo_camelyon_seg_patchmoe": ("demo_camelyon_seg_dense", [HEAD], 64),
    "voc_seg_patchmoe": ("voc_seg_dense", [HEAD], 64),
    "fmnist_cls_patchmoe": ("fmnist_cls_dense", ["backbone.stages.2.down.0"], 28),
}


def _tiny_seg_options(root: Path, wd: Path) -> list:
    """The demo seg config on a 4 + 2 image demo set of 64 px: 2 epochs of 2 iterations, shared then routed."""
    return [("runtime.work_dir", str(wd)), ("data.root", str(root)), ("model.input_shape", [3, 64, 64]),
            ("data.train.kwargs.demo", {"num_train": 4, "num_val": 2, "image_size": 64}),
            ("data.val.kwargs.demo", {"num_train": 4, "num_val": 2, "image_size": 64}),
            ("data.train.transform.kwargs.crop_size", 64), ("data.batch_size", 2), ("data.num_workers", 0),
            ("schedule.epochs", 2), ("schedule.iters_per_epoch", 2),
            ("phases", [dict(name="shared", epochs=1, router_override="shared"),
                        dict(name="route", epochs=-1, upcycle=True)]),
            ("runtime.tensorboard", False), ("runtime.progress_bar", False), ("runtime.log_interval", 1),
            ("runtime.num_threads", 1), ("runtime.device", "cpu")]


def _cli(options: list) -> list:
    return ["--cfg-options"] + [f"{k}={v!r}" for k, v in options]


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory):
    """The converted demo trained for 4 iterations in process (tools/train.py's Trainer and hooks)."""
    tmp = tmp_path_factory.mktemp("patchmoe")
    opts = _tiny_seg_options(tmp / "demo_voc", tmp / "wd")
    cfg = load_config(REPO / SEG, opts)
    task = get_task(cfg.task)
    trainer = Trainer(cfg, task, hooks=default_hooks(cfg, task))
    result = trainer.train()
    return {"cfg": cfg, "task": task, "trainer": trainer, "result": result, "opts": opts, "tmp": tmp,
            "wd": tmp / "wd"}


# ------------------------------------------------------------------------------------------- the configs
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_patchmoe_configs_are_their_dense_twin_plus_convert(name: str):
    twin, layers, side = CONFIGS[name]
    cfg = load_config(REPO / "configs" / f"{name}.py")
    dense = load_config(REPO / "configs" / f"{twin}.py")
    assert cfg.model.convert and not dense.model.convert
    # the dense-twin rule of tests/test_faults_results.py: the same model and data but for model.convert
    assert {**cfg.model, "convert": []} == dict(dense.model) and cfg.data == dense.data
    shape = [int(cfg.model.input_shape[0]), side, side]
    cfg = load_config(REPO / "configs" / f"{name}.py", [("model.input_shape", shape)])
    task = get_task(cfg.task)
    torch.manual_seed(0)
    model = task.build_model(cfg)
    torch.manual_seed(0)
    ref = task.build_model(load_config(REPO / "configs" / f"{twin}.py", [("model.input_shape", shape)]))
    assert [n for n, _ in routed_layers(model)] == layers and not list(routed_layers(ref))
    for n in layers:
        conv = model.get_submodule(n)
        assert isinstance(conv, pce.PCEConv2d) and conv.num_experts == 4 and conv.top_k == 2
        assert conv.router_name == "gap_conv" and conv.execution == "context"
    # every other weight is the dense twin's; the converted convolution's kernel is every expert's
    sd = model.state_dict()
    for k, v in ref.state_dict().items():
        if not any(k.startswith(n + ".") for n in layers):
            assert torch.equal(sd[k], v), k
    for n in layers:
        bank, conv = model.get_submodule(n).experts, ref.get_submodule(n)
        assert torch.equal(bank.weight, conv.weight.expand(4, *conv.weight.shape))
    # upcycled: the same function as the twin at conversion; one training step reaches the gate
    x = torch.randn(2, *shape)
    model.eval(), ref.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x), rtol=1e-4, atol=1e-4)
    model.train()
    target = torch.randint(0, int(cfg.model.num_classes), (2,) + ((side, side) if cfg.task == "segmentation" else ()))
    losses = task.train_step(model, (x, target), torch.device("cpu"))
    assert losses["loss_router"].item() > 0
    sum(losses.values()).backward()
    gate = model.get_submodule(layers[0]).router
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in gate.parameters())


# ------------------------------------------------------------------------------------ train, reload, tools
def test_converted_demo_trains_and_reloads(seg_run):
    trainer, cfg, task, wd = seg_run["trainer"], seg_run["cfg"], seg_run["task"], seg_run["wd"]
    records = [json.loads(line) for line in (wd / "metrics.jsonl").read_text().splitlines()]
    phases = [r for r in records if r.get("type") == "phase"]
    assert [p["name"] for p in phases] == ["shared", "route"] and phases[1]["upcycled_layers"] == 1
    train = [r for r in records if r.get("type") == "train"]
    assert len(train) == 4 and all(HEAD in r["routing"] for r in train)
    assert train[0]["routing"][HEAD]["usage"][0] == 1.0          # the shared phase: every patch to expert 0
    assert train[-1]["routing"][HEAD]["usage"][0] < 1.0           # learned top-2 routing afterwards
    assert seg_run["result"]["final"].get("mIoU") is not None
    # the checkpoint reloads into a freshly built, converted model: equal outputs
    model = trainer.model.eval()
    fresh = task.build_model(cfg)
    assert isinstance(fresh.get_submodule(HEAD), pce.PCEConv2d)
    load_trained_weights(fresh, cfg, wd / "latest.pth")
    fresh.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x))
    assert fresh.get_submodule(HEAD).router_override is None


def test_routing_tools_run_on_the_converted_demo(seg_run, capsys):
    wd, tmp = seg_run["wd"], seg_run["tmp"]
    run = [SEG, "--checkpoint", str(wd / "latest.pth"), "--device", "cpu", "--split", "val"]
    vis = load_tool("visualize_routing")
    assert vis.main(vis.parse_args(run + ["--num", "2", "--out", str(tmp / "vis"), *_cli(seg_run["opts"])])) == 0
    written = json.loads((tmp / "vis/routing_maps.json").read_text())
    assert len(written) == 2 and all(Path(p).is_file() for p in written.values())
    ana = load_tool("analyze_routing")
    assert ana.main(ana.parse_args(run + ["--clusters", "2", "--out", str(tmp / "ana"), *_cli(seg_run["opts"])])) == 0
    stats = json.loads((tmp / "ana/routing_stats.json").read_text())
    assert HEAD in json.dumps(stats) and (tmp / "ana/usage.png").is_file()
    capsys.readouterr()


def test_export_keeps_converted_routing_input_dependent(seg_run, capsys):
    from pce.engine.checkpoint import atomic_save, load_checkpoint

    wd, tmp = seg_run["wd"], seg_run["tmp"]
    # a decided gate (4 training iterations leave its logits close to its bias on noise inputs): the gate's
    # linear layer scaled up and unbiased, so the held-back random inputs route differently in the eager model
    ckpt = load_checkpoint(wd / "latest.pth")
    head = f"{HEAD}.router.scorer.mlp.0"
    ckpt["model"][f"{head}.weight"] = ckpt["model"][f"{head}.weight"] * 100
    ckpt["model"][f"{head}.bias"] = torch.zeros_like(ckpt["model"][f"{head}.bias"])
    atomic_save(ckpt, tmp / "decided.pth")
    rc = load_tool("export").main([SEG, "--checkpoint", str(tmp / "decided.pth"), "--format", "torch_export",
                                   "--input-size", "64", "64", "--out", str(tmp / "seg.pt2"), *_cli(seg_run["opts"])])
    out = capsys.readouterr()
    assert rc == 0, out.err[-3000:]
    assert "routing differs between two of them in 1 of 1" in out.out, out.out
    assert (tmp / "seg.pt2").is_file()


# ----------------------------------------------------------------------------------------------- phases
def _converted(router: str = "cosine") -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                        nn.Conv2d(8, 8, 3, padding=1))
    model, _ = pce.convert(net, ["2", "4"], num_experts=3, top_k=1, grid=2, router=router)
    return model


def test_phases_drive_converted_layers_without_a_backbone(caplog):
    from pce.engine import PhaseController, build_phases
    from pce.models.routed import key_routers

    model = _converted()
    ema = copy.deepcopy(model)
    assert not list(pce.iter_backbones(model))
    layers = [m for _, m in routed_layers(model)]
    phases = [dict(name="stabilise", epochs=1, router_override="uniform", keys_trainable=False),
              dict(name="shared", epochs=1, router_override="shared"),
              dict(name="route", epochs=1, upcycle=True, keys_trainable=True)]
    ctl = PhaseController(build_phases(phases, 3), kmeans_init_batches=1, seed=0)
    batches = [torch.randn(4, 3, 16, 16)]
    with caplog.at_level("WARNING"):
        info = ctl.on_epoch_start(0, [model, ema], lambda: batches)
    assert "has no effect" not in caplog.text                        # the converted layers are routed layers
    assert info["kmeans_routers"] == 0
    for m in (model, ema):
        assert all(type(l.router_override).__name__ == "UniformRouter" for _, l in routed_layers(m))
        assert all(not r.keys.requires_grad for r in key_routers(m))
    before = [r.keys.detach().clone() for r in key_routers(model)]
    ctl.on_epoch_start(1, [model, ema], lambda: batches)
    assert all(type(l.router_override).__name__ == "SharedRouter" for l in layers)
    with torch.no_grad():
        layers[0].experts.conv.weights[1] += 1.0                      # an expert that differs from expert 0
    info = ctl.on_epoch_start(2, [model, ema], lambda: batches)
    assert info["upcycled_layers"] == 2 and info["kmeans_routers"] == 2
    assert torch.equal(layers[0].experts.weight[1], layers[0].experts.weight[0])
    assert all(l.router_override is None for l in layers)
    assert all(r.keys.requires_grad for m in (model, ema) for r in key_routers(m))
    after = list(key_routers(model))
    assert not any(torch.equal(a, b.keys) for a, b in zip(before, after))   # K-Means on the cells' embeddings
    for a, b in zip(after, key_routers(ema)):
        assert torch.equal(a.keys, b.keys)                                   # the EMA copy gets the same keys


# ------------------------------------------------------------------------------------------ config errors
@pytest.mark.parametrize("entry, key, words", [
    ({"target": "backbone.stages.2.*", "topk": 2}, "model.convert.0.topk", "did you mean 'top_k'"),
    ({"target": "backbone.stages.2.*", "execution": "fused"}, "model.convert.0.execution", "context"),
    ({"target": "backbone.stagez.9.conv"}, "model.convert.0.target", "no module of that name"),
])
def test_convert_config_errors_are_one_line(tmp_path, capsys, entry, key, words):
    args = [str(DEMO), *cli_options(tmp_path / "wd"), f"model.convert=[{entry!r}]"]
    assert load_tool("train").main(args) == 1
    line = error_line(capsys.readouterr().err)
    assert key in line and words in line, line
    assert not (tmp_path / "wd" / "latest.pth").exists()


def test_convert_schema_defaults():
    cfg = load_config(DEMO, [("model.router_loss_weights.batch_entropy", 0.5)])
    assert list(cfg.model.convert) == [] and cfg.model.router_loss_weights.batch_entropy == 0.5
    task = get_task(cfg.task)
    task.configure_router_loss(cfg)
    assert task.router_loss_weights.batch_entropy == 0.5


# ------------------------------------------------------------------------------------------------ figures
def test_routing_figure_draws_uneven_cells_where_they_are(tmp_path, monkeypatch):
    import matplotlib.axes

    from pce.analysis import plots
    from pce.analysis.maps import routing_maps

    torch.manual_seed(0)
    model, _ = pce.convert(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1)), "0", num_experts=2, top_k=1, grid=3)
    maps = routing_maps(model, torch.rand(1, 3, 17, 10))                        # 17 rows in 3 cells: 6, 5, 6
    m = maps["0"]
    assert m.image_borders() == ((0, 6, 11, 17), (0, 3, 7, 10))
    lines = {"h": [], "v": []}
    monkeypatch.setattr(matplotlib.axes.Axes, "axhline", lambda self, y=0, **kw: lines["h"].append(y))
    monkeypatch.setattr(matplotlib.axes.Axes, "axvline", lambda self, x=0, **kw: lines["v"].append(x))
    shown = []
    real_imshow = matplotlib.axes.Axes.imshow
    monkeypatch.setattr(matplotlib.axes.Axes, "imshow",
                        lambda self, a, *args, **kw: shown.append(a) or real_imshow(self, a, *args, **kw))
    out = plots.routing_figure(torch.rand(3, 17, 10), maps, 0, tmp_path / "r.png")
    assert out.is_file() and lines == {"h": [6, 11], "v": [3, 7]}
    expert = [a for a in shown if getattr(a, "ndim", 0) == 3 and a.shape[-1] == 4][0]
    assert expert.shape[:2] == (17, 10)                                          # one colour per image pixel
    colors = plots.expert_colors(2)
    px = m.pixels()[0]
    assert (expert[..., :3] == colors[px.numpy()][..., :3]).all()


def test_figures_are_written_atomically(tmp_path, monkeypatch):
    import matplotlib.figure

    from pce.analysis import plots

    stats = {"l": {"num_experts": 2, "collapsed_experts": [], "usage_share": [0.5, 0.5], "mean_weight": [1, 1],
                   "entropy": 0.1, "max_entropy": 0.7}}
    path = plots.usage_figure(stats, tmp_path / "usage.png")
    good = path.read_bytes()
    assert good[:4] == b"\x89PNG" and [p.name for p in tmp_path.iterdir()] == ["usage.png"]

    def broken(self, fname, **kw):
        Path(fname).write_bytes(b"half a")
        raise OSError("No space left on device")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", broken)
    with pytest.raises(OSError, match=r"usage\.png: the figure could not be written .*No space left"):
        plots.usage_figure(stats, tmp_path / "usage.png")
    assert path.read_bytes() == good and [p.name for p in tmp_path.iterdir()] == ["usage.png"]
