"""``model.pretrained`` of a dense twin's run in a ``model.convert`` / ``model.condconv`` config (issue #26: upcycled
from a trained dense model): the trainer loads it into the freshly built dense model, then the entries upcycle the
*trained* convolutions. Checked against independent computations on the demo segmentation configs (64 px): every
expert equals the saved kernel, every other tensor the saved one, the converted model computes the dense model's
function, the routers' random init is the one of a run without ``model.pretrained``; a checkpoint of the converted
model itself (also pruned) keeps the load after the build."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from pce.engine import Trainer, atomic_save, load_config
from pce.engine.errors import PCEError
from pce.engine.weights import lean_checkpoint
from pce.moe.surgery import pce_layers, select_experts, structure
from pce.tasks import get_task

from _faults_util import tiny_cfg

REPO = Path(__file__).resolve().parents[1]
HEAD = "net.segmentation_head.0"
DEMO = {"num_train": 2, "num_val": 1, "image_size": 64}
EARLY = "model.pretrained: loaded {m} of {n} tensors into the model before {what} (upcycling the trained convolutions)"


def _cfg(name: str, root: Path, wd: Path, *extra):
    """``configs/<name>.py`` on a 2 + 1 image demo set of 64 px, one iteration, CPU."""
    return load_config(REPO / "configs" / f"{name}.py", [
        ("runtime.work_dir", str(wd)), ("data.root", str(root)), ("model.input_shape", [3, 64, 64]),
        ("data.train.kwargs.demo", DEMO), ("data.val.kwargs.demo", DEMO), ("data.train.transform.kwargs.crop_size", 64),
        ("data.batch_size", 2), ("data.num_workers", 0), ("schedule.epochs", 1), ("schedule.iters_per_epoch", 1),
        ("phases", [dict(name="route", epochs=-1)]), ("runtime.tensorboard", False), ("runtime.progress_bar", False),
        ("runtime.num_threads", 1), ("runtime.device", "cpu"), *extra])


def _perturbed(model: torch.nn.Module, seed: int) -> dict:
    """``model``'s state dict moved away from its init, deterministically (positive running variances)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in model.state_dict().items():
        if not v.is_floating_point():
            out[k] = v + 3
        elif k.endswith("running_var"):
            out[k] = v * (0.5 + torch.rand(v.shape, generator=g))
        else:
            out[k] = v + 0.1 * torch.randn(v.shape, generator=g)
    return out


def _trainer(cfg, caplog) -> Trainer:
    """A Trainer of ``cfg`` set up (nothing trained), the ``pce`` logger's records in ``caplog`` (the trainer
    stops that logger propagating to the root logger)."""
    log = logging.getLogger("pce")
    caplog.clear()
    caplog.handler.setLevel(logging.INFO)
    old = log.level
    log.setLevel(logging.INFO)
    log.addHandler(caplog.handler)
    try:
        trainer = Trainer(cfg, get_task(cfg.task))
    finally:
        log.removeHandler(caplog.handler)
        log.setLevel(old)
    trainer.lock.release()
    return trainer


def _outputs(model: torch.nn.Module) -> torch.Tensor:
    """``[2, 5, 64, 64]`` eval-mode logits of a fixed input."""
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        return model.eval()(x)


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    """The dense twin (configs/demo_seg_dense.py) with trained-looking weights, saved as a lean ``best.pth``."""
    tmp = tmp_path_factory.mktemp("upcycle")
    cfg = _cfg("demo_seg_dense", tmp / "voc", tmp / "dense")
    model = get_task("segmentation").build_model(cfg)
    state = _perturbed(model, 0)
    model.load_state_dict(state)
    path = tmp / "dense" / "best.pth"
    path.parent.mkdir()
    atomic_save(lean_checkpoint({"model": state, "epoch": 4, "best": {"metric": "mIoU", "value": 0.5, "epoch": 4},
                                 "optimizer": {}, "scheduler": {}}), path)
    return {"tmp": tmp, "state": state, "model": model, "path": path}


def test_dense_checkpoint_is_loaded_before_convert(dense, caplog):
    tmp, saved = dense["tmp"], dense["state"]
    cfg = _cfg("demo_seg_patchmoe", tmp / "voc", tmp / "moe", ("model.pretrained", str(dense["path"])))
    trainer = _trainer(cfg, caplog)
    assert EARLY.format(m=len(saved), n=len(saved), what="model.convert") in caplog.text
    assert "model tensors matched" not in caplog.text and "missing" not in caplog.text  # not loaded again
    own = trainer.model.state_dict()
    experts = [k for k in own if k.startswith(f"{HEAD}.experts.conv.")]
    assert len(experts) == 8  # 4 kernels, 4 biases
    for e in range(4):  # every expert is the saved (trained) kernel, not the random init
        assert torch.equal(own[f"{HEAD}.experts.conv.weights.{e}"], saved[f"{HEAD}.weight"])
        assert torch.equal(own[f"{HEAD}.experts.conv.biases.{e}"], saved[f"{HEAD}.bias"])
    rest = [k for k in saved if not k.startswith(f"{HEAD}.")]
    assert len(rest) == len(saved) - 2 and all(torch.equal(own[k], saved[k]) for k in rest)
    # upcycling keeps the function: the converted model computes the trained dense model (noise=0, top-2 renormalised)
    torch.testing.assert_close(_outputs(trainer.model), _outputs(dense["model"]), atol=1e-5, rtol=1e-5)
    # the trial conversion drew no random numbers: the routers start as in a run without model.pretrained
    torch.manual_seed(cfg.runtime.seed)
    fresh = get_task("segmentation").build_model(_cfg("demo_seg_patchmoe", tmp / "voc", tmp / "x")).state_dict()
    router = [k for k in own if k.startswith(f"{HEAD}.router.")]
    assert router and all(torch.equal(own[k], fresh[k]) for k in router)
    # outside the trainer (eval, infer, export: they load --checkpoint) model.pretrained is not read while building
    built = get_task("segmentation").build_model(cfg).state_dict()
    assert not torch.equal(built[f"{HEAD}.experts.conv.weights.0"], saved[f"{HEAD}.weight"])


def test_condconv_upcycles_the_trained_kernel(dense, caplog):
    tmp, saved = dense["tmp"], dense["state"]
    cfg = _cfg("demo_seg_condconv", tmp / "voc", tmp / "cc", ("model.pretrained", str(dense["path"])),
               ("model.condconv", [dict(target=HEAD, num_experts=4, init_std=0.0)]))
    trainer = _trainer(cfg, caplog)
    assert EARLY.format(m=len(saved), n=len(saved), what="model.condconv") in caplog.text
    assert "model tensors matched" not in caplog.text
    own = trainer.model.state_dict()
    kernel, bias = saved[f"{HEAD}.weight"].reshape(1, -1), saved[f"{HEAD}.bias"].reshape(1, -1)
    torch.testing.assert_close(own[f"{HEAD}.conv.weight"], (2 / 4 * kernel).expand(4, -1), atol=0, rtol=0)
    torch.testing.assert_close(own[f"{HEAD}.conv.bias"], (2 / 4 * bias).expand(4, -1), atol=0, rtol=0)
    assert all(torch.equal(own[k], saved[k]) for k in saved if not k.startswith(f"{HEAD}."))
    # zero routing weights: sigmoid(0) = 1/2 per expert, so the mixed kernel is the trained one
    torch.testing.assert_close(_outputs(trainer.model), _outputs(dense["model"]), atol=1e-5, rtol=1e-5)


def test_partial_and_unmatched_dense_checkpoints_are_reported(dense, caplog):
    tmp, saved = dense["tmp"], dense["state"]
    dropped = next(k for k in saved if not k.startswith(f"{HEAD}."))
    partial = {k: v for k, v in saved.items() if k != dropped}
    atomic_save({"model": {**partial, "extra.weight": torch.zeros(1)}}, tmp / "partial.pth")
    cfg = _cfg("demo_seg_patchmoe", tmp / "voc", tmp / "partial", ("model.pretrained", str(tmp / "partial.pth")))
    trainer = _trainer(cfg, caplog)
    line = EARLY.format(m=len(saved) - 1, n=len(saved), what="model.convert")
    assert line in caplog.text and f"1 missing ({dropped})" in caplog.text and "1 unexpected (extra.weight)" in \
        caplog.text
    assert torch.equal(trainer.model.state_dict()[f"{HEAD}.experts.conv.weights.3"], saved[f"{HEAD}.weight"])
    atomic_save({"model": {"encoder.conv.weight": torch.randn(3, 3)}}, tmp / "other.pth")
    cfg = _cfg("demo_seg_patchmoe", tmp / "voc", tmp / "other", ("model.pretrained", str(tmp / "other.pth")))
    with pytest.raises(PCEError, match="none of its 1 tensors matches") as e:
        Trainer(cfg, get_task("segmentation"))
    assert str(e.value).startswith(f"model.pretrained={tmp / 'other.pth'}")


def test_converted_checkpoints_load_after_the_build(dense, caplog):
    """A checkpoint of the converted model (fine-tuning a PCE run), full or pruned, loads as before: every tensor."""
    tmp = dense["tmp"]
    cfg = _cfg("demo_seg_patchmoe", tmp / "voc", tmp / "run")
    torch.manual_seed(1)
    model = get_task("segmentation").build_model(cfg)
    state = _perturbed(model, 1)
    atomic_save({"model": state, "optimizer": {}, "epoch": 2}, tmp / "moe.pth")
    model.load_state_dict(state)
    select_experts(pce_layers(model)[HEAD], [1, 2, 3])
    pruned = model.state_dict()
    atomic_save({"model": pruned, "expert_structure": structure(model), "epoch": 2}, tmp / "pruned.pth")
    for name, saved, experts in (("moe.pth", state, 4), ("pruned.pth", pruned, 3)):
        ft = _cfg("demo_seg_patchmoe", tmp / "voc", tmp / f"ft_{name}", ("model.pretrained", str(tmp / name)))
        trainer = _trainer(ft, caplog)
        own = trainer.model.state_dict()
        assert f"{len(own)} of {len(own)} model tensors matched" in caplog.text, name
        assert "before model.convert" not in caplog.text, name
        assert pce_layers(trainer.model)[HEAD].num_experts == experts
        assert set(own) == set(saved) and all(torch.equal(own[k], saved[k]) for k in own), name


def test_pruned_model_before_convert(tmp_path, caplog):
    """A checkpoint of the unconverted model with pruned experts (the digits demo's PCE backbone): its expert
    structure is replayed on the model before the conversion, then every tensor loads and the plain convolution
    backbone.stages.1.down.0 is upcycled from its saved kernel."""
    layer, target = "backbone.stages.0.layers.0", "backbone.stages.1.down.0"
    model = get_task("classification").build_model(tiny_cfg(tmp_path / "dense"))
    select_experts(pce_layers(model)[layer], [1, 2, 2])
    saved = _perturbed(model, 2)
    model.load_state_dict(saved)
    atomic_save({"model": saved, "expert_structure": structure(model), "epoch": 1}, tmp_path / "pruned.pth")
    convert = [dict(target=target, num_experts=2, top_k=2, grid=2, noise=0.0)]
    cfg = tiny_cfg(tmp_path / "moe", ("model.convert", convert), ("model.pretrained", str(tmp_path / "pruned.pth")))
    trainer = _trainer(cfg, caplog)
    assert EARLY.format(m=len(saved), n=len(saved), what="model.convert") in caplog.text
    assert structure(trainer.model) == {layer: [[1, 2, 2]]} and "model tensors matched" not in caplog.text
    own = trainer.model.state_dict()
    assert all(torch.equal(own[f"{target}.experts.conv.weights.{e}"], saved[f"{target}.weight"]) for e in range(2))
    assert all(torch.equal(own[k], saved[k]) for k in saved if not k.startswith(f"{target}."))
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(trainer.model.eval()(x), model.eval()(x), atol=1e-5, rtol=1e-5)


def test_upcycled_demo_config():
    """configs/demo_seg_patchmoe_upcycled.py: demo_seg_patchmoe.py started from the dense twin's best.pth."""
    upcycled = load_config(REPO / "configs/demo_seg_patchmoe_upcycled.py")
    moe = load_config(REPO / "configs/demo_seg_patchmoe.py")
    assert upcycled.model.pretrained == "work_dirs/demo_seg_dense/best.pth"
    assert {**upcycled.model, "pretrained": ""} == dict(moe.model) and upcycled.data == moe.data
    assert upcycled.schedule.epochs < moe.schedule.epochs
