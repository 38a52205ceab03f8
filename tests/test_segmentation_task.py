"""The segmentation task adapter on a tiny procedural VOC dataset (no download, CPU, seconds)."""
import math

import pytest
import torch
from torch.optim.swa_utils import AveragedModel

from pce.datasets import DEMO_CLASSES, make_demo_voc
from pce.engine import Trainer, load_config
from pce.tasks import get_task, list_tasks
from pce.tasks.segmentation import SegmentationModel, SegmentationTask



@pytest.fixture(scope="module")
def voc_root(tmp_path_factory):
    return make_demo_voc(tmp_path_factory.mktemp("demo_voc"), num_train=4, num_val=2, image_size=(56, 72))


CONFIG = """
task = "segmentation"
model = dict(backbone="pce_tiny", num_classes={num_classes}, input_shape=(3, 64, 64),
             backbone_overrides=dict(num_experts=2),
             head=dict(arch="FPN", decoder=dict(decoder_pyramid_channels=64, decoder_segmentation_channels=32),
                       dice_weight=0.5, inference="slide", slide_window=48, slide_stride=32))
_ds = dict(year="2007", classes={classes!r})
data = dict(
    root={root!r},
    train=dict(name="voc_segmentation", kwargs=dict(image_set="train", **_ds),
               transform=dict(name="voc_segmentation", kwargs=dict(train=True, crop_size=64, scale_range=(0.8, 1.2)))),
    val=dict(name="voc_segmentation", kwargs=dict(image_set="val", **_ds),
             transform=dict(name="voc_segmentation", kwargs=dict(train=False))),
    batch_size=2, num_workers=0)
optimizer = dict(type="adamw", lr=1e-3, weight_decay=0.0)
schedule = dict(epochs=1, max_iters=2, lr_scheduler=dict(type="constant"))
runtime = dict(work_dir={work!r}, kmeans_init_batches=0, tensorboard=False, progress_bar=False, log_interval=1)
eval = dict(metric="mIoU", mode="max")
"""


@pytest.fixture()
def cfg(voc_root, tmp_path):
    path = tmp_path / "seg_demo.py"
    path.write_text(CONFIG.format(num_classes=len(DEMO_CLASSES) + 1, classes=tuple(DEMO_CLASSES),
                                  root=str(voc_root), work=str(tmp_path / "work")))
    return load_config(path)


def test_registered():
    assert "segmentation" in list_tasks()
    assert isinstance(get_task("segmentation"), SegmentationTask)


def test_adapter_steps(cfg):
    task = get_task("segmentation")
    model = task.build_model(cfg)
    assert isinstance(model, SegmentationModel) and model.dice is not None
    assert {l.num_experts for l in model.backbone.pce_layers()} == {2}
    ds = task.build_datasets(cfg)
    assert set(ds) == {"train", "val"}
    batch = task.collate_fn([ds["train"][0], ds["train"][1]])
    assert batch[0].shape == (2, 3, 64, 64) and batch[1].shape == (2, 64, 64)
    losses = task.train_step(model, batch, torch.device("cpu"))
    assert set(losses) == {"loss_ce", "loss_dice", "loss_router"}
    sum(losses.values()).backward()
    val = task.collate_fn([ds["val"][0], ds["val"][1]])  # different sizes: padded with ignore
    ema = AveragedModel(model)  # wrappers with .module (EMA / DDP) are unwrapped
    labels, masks = task.predict(ema, val, torch.device("cpu"))
    assert labels.shape == masks.shape == val[1].shape
    ev = task.build_evaluator(cfg, ds["val"])
    assert ev.class_names == ["background", *DEMO_CLASSES]
    ev.update(labels, masks)
    assert 0.0 <= ev.compute()["mIoU"] <= 1.0
    assert task.dummy_inputs(cfg, 2)[0].shape == (2, 3, 64, 64)


def test_bad_head_option(cfg):
    cfg.defrost()
    cfg.model.head.nope = 1
    with pytest.raises(ValueError, match="nope"):
        get_task("segmentation").build_model(cfg)


def test_trainer_two_iterations(cfg):
    result = Trainer(cfg, get_task("segmentation")).train()
    final = result["final"]
    assert math.isfinite(final["mIoU"]) and 0.0 <= final["mIoU"] <= 1.0
