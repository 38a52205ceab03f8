"""timm's classification recipe (issue #24): Mixup / CutMix, soft-target and label-smoothing losses, timm's
auto-augment policies and random erasing in the seeded transform, stochastic depth, and a 2-iteration training
of the recipe config through the real Trainer. Every value is checked against a hand computation or timm itself."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data.auto_augment import rand_augment_transform
from timm.loss import LabelSmoothingCrossEntropy

from pce.datasets.timm_augment import TimmAutoAugment
from pce.datasets.transforms import ClassificationTransform
from pce.engine import get_default_config, load_config
from pce.engine.errors import PCEError
from pce.models.backbone import PCEBackbone, Stage
from pce.models.layer import DenseLayer
from pce.tasks.classification.recipe import ClassificationLoss, build_mixup
from pce.tasks.registry import get_task

REPO = Path(__file__).resolve().parents[1]


def mixup_cfg(num_classes: int = 4, smoothing: float = 0.1, **mixup):
    cfg = get_default_config()
    cfg.model.num_classes, cfg.model.label_smoothing = num_classes, smoothing
    for k, v in mixup.items():
        cfg.data.mixup[k] = v
    return cfg


def smooth_one_hot(y: torch.Tensor, k: int, s: float) -> torch.Tensor:
    out = torch.full((len(y), k), s / k)
    out[torch.arange(len(y)), y] = 1 - s + s / k
    return out


def test_mixup_batch_is_the_lam_mix_timm_draws():
    crit = ClassificationLoss(build_mixup(mixup_cfg(mixup_alpha=1.0)), 0.1)
    x, y = torch.randn(4, 1, 6, 6), torch.tensor([0, 1, 2, 3])
    x0 = x.clone()
    np.random.seed(5)
    mixed, soft = crit.mix(x, y)
    np.random.seed(5)  # timm's draws for one batch: "mix at all?" (prob), then Beta(1, 1)
    np.random.rand()
    lam = float(np.random.beta(1.0, 1.0))
    assert 0.0 < lam < 1.0
    torch.testing.assert_close(mixed, lam * x0 + (1 - lam) * x0.flip(0))
    torch.testing.assert_close(soft, lam * smooth_one_hot(y, 4, 0.1) + (1 - lam) * smooth_one_hot(y.flip(0), 4, 0.1))
    assert torch.equal(x, x0)  # the loader's batch is left alone


def test_cutmix_box_matches_the_lam_of_the_soft_targets():
    crit = ClassificationLoss(build_mixup(mixup_cfg(smoothing=0.0, cutmix_alpha=1.0)), 0.0)
    x, y = torch.rand(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    torch.manual_seed(0)
    np.random.seed(0)  # Beta(1, 1) draws 0.56: a box of about 44% of the image
    mixed, soft = crit.mix(x, y)
    lam = float(soft[0, 0])  # no smoothing: the weight of the image's own class
    assert 0.2 < lam < 0.8
    pasted = (mixed == x.flip(0)) & (mixed != x)
    box = pasted[0, 0]
    rows, cols = box.any(1).nonzero().flatten(), box.any(0).nonzero().flatten()
    assert box.sum() > 0 and box[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()  # one rectangle
    assert abs((1 - lam) - box.float().mean().item()) < 1e-6  # correct_lam: lambda from the box area
    assert torch.equal(pasted.any(1), box.expand(4, -1, -1))  # the same box in every image and channel
    torch.testing.assert_close(soft[:, :4], lam * torch.eye(4) + (1 - lam) * torch.eye(4).flip(0))


def test_odd_batch_is_trained_unmixed_and_mixup_off_by_default():
    assert build_mixup(get_default_config()) is None
    crit = ClassificationLoss(build_mixup(mixup_cfg(mixup_alpha=1.0)), 0.1)
    x = torch.randn(3, 1, 4, 4)
    out, soft = crit.mix(x, torch.tensor([0, 1, 2]))
    assert soft is None and torch.equal(out, x)


@pytest.mark.parametrize("key,value", [("prob", 1.5), ("mixup_alpha", -1.0), ("switch_prob", float("nan")),
                                       ("cutmix_minmax", [0.5, 0.2])])
def test_bad_mixup_options_name_the_key(key, value):
    cfg = mixup_cfg(mixup_alpha=1.0)
    cfg.data.mixup[key] = value
    with pytest.raises(PCEError, match=rf"^data\.mixup\.{key}: "):
        build_mixup(cfg)


def test_soft_target_and_label_smoothing_losses_equal_the_hand_formulas():
    torch.manual_seed(0)
    logits, y = torch.randn(5, 4, dtype=torch.float64), torch.tensor([0, 3, 1, 1, 2])
    logp = logits - torch.log(torch.exp(logits).sum(1, keepdim=True))  # log-softmax by hand
    soft = torch.rand(5, 4, dtype=torch.float64)
    soft = soft / soft.sum(1, keepdim=True)
    crit = ClassificationLoss(None, 0.2)
    torch.testing.assert_close(crit.loss(logits, y, soft), -(soft * logp).sum(1).mean())
    hand = (0.8 * -logp[torch.arange(5), y] + 0.2 * -logp.mean(1)).mean()
    torch.testing.assert_close(crit.loss(logits, y), hand)
    torch.testing.assert_close(crit.loss(logits, y), LabelSmoothingCrossEntropy(0.2)(logits, y))


def test_task_loss_scores_the_mixed_batch():
    cfg = mixup_cfg(num_classes=10, smoothing=0.1, mixup_alpha=0.4)
    cfg.model.backbone_overrides.stem_channels = 8
    cfg.model.backbone_overrides.stages = [dict(channels=8, depth=1, patch_size=2, stride=2)]
    cfg.model.input_shape = [1, 8, 8]
    task = get_task("classification")
    model = task.build_model(cfg).eval()
    with torch.no_grad():
        model.fc.weight.mul_(100.0)  # logits that differ from image to image, so a wrong target shows
    x, y = torch.rand(4, 1, 8, 8), torch.tensor([1, 2, 3, 4])
    np.random.seed(3)
    loss = task.task_losses(model, (x, y), torch.device("cpu"))["loss_cls"]
    np.random.seed(3)
    np.random.rand()
    lam = float(np.random.beta(0.4, 0.4))
    target = lam * smooth_one_hot(y, 10, 0.1) + (1 - lam) * smooth_one_hot(y.flip(0), 10, 0.1)
    logp = torch.log_softmax(model(lam * x + (1 - lam) * x.flip(0)), 1)
    torch.testing.assert_close(loss, -(target * logp).sum(1).mean())


def test_auto_augment_is_timms_op_on_gray_images_and_leaves_global_rngs_alone():
    img = np.random.RandomState(0).rand(28, 28, 1).astype(np.float32)
    aug = TimmAutoAugment("rand-m9-mstd0.5", img_size=28, fill=(0.286,))
    state = (random.getstate(), np.random.get_state()[1].copy())
    out = aug.apply(img, op_seed=123)
    assert random.getstate() == state[0] and np.array_equal(np.random.get_state()[1], state[1])
    op = rand_augment_transform("rand-m9-mstd0.5", dict(translate_const=12, img_mean=(73, 73, 73)))
    random.seed(123)
    np.random.seed(123)
    u8 = np.clip(np.rint(img[..., 0] * 255), 0, 255).astype(np.uint8)
    ref = np.asarray(op(Image.fromarray(u8, "L").convert("RGB")).convert("L"), np.float32) / 255
    assert out.shape == img.shape and np.array_equal(out[..., 0], ref)
    with pytest.raises(ValueError, match="auto_augment: 'rand-q5' is not a timm auto-augment config"):
        ClassificationTransform(train=True, auto_augment="rand-q5")


def test_auto_augment_and_erasing_change_images_and_follow_the_seed():
    x = torch.rand(1, 28, 28)
    kw = dict(train=True, mean=0.286, std=0.353)
    base = [ClassificationTransform(**kw, seed=0)(x) for _ in range(2)]
    assert torch.equal(*base)
    for extra in (dict(auto_augment="rand-m9-mstd0.5"), dict(auto_augment="original"),
                  dict(random_erasing=dict(probability=1.0, mode="const")),
                  dict(random_erasing=dict(probability=1.0, mode="pixel"))):
        torch_state = torch.get_rng_state()
        t1, t2 = ClassificationTransform(**kw, **extra, seed=0), ClassificationTransform(**kw, **extra, seed=0)
        a = torch.stack([t1(x) for _ in range(4)])
        b = torch.stack([t2(x) for _ in range(4)])
        other = ClassificationTransform(**kw, **extra, seed=1)
        c = torch.stack([other(x) for _ in range(4)])
        assert torch.equal(a, b), extra                                   # same seed, same images
        assert torch.equal(torch.get_rng_state(), torch_state)            # the global torch stream untouched
        assert not torch.equal(a, c), extra                               # another seed, other images
        changed = (a - base[0]).abs().amax(dim=(1, 2, 3)) > 0.05           # timm applies each op with p 0.5
        assert changed.sum() >= 2, extra
        assert a.shape == (4, 1, 28, 28)
    erased = ClassificationTransform(**kw, random_erasing=dict(probability=1.0, mode="const"), seed=0)(x)
    changed = erased != base[0]
    assert changed.any() and torch.all(erased[changed] == 0)  # "const": zeros of the normalised image


def test_drop_path_rates_grow_linearly_and_eval_is_the_plain_model():
    stages = [dict(channels=8, depth=2, patch_size=2, stride=1), dict(channels=8, depth=2, patch_size=2, stride=2)]
    torch.manual_seed(0)
    plain = PCEBackbone(stages, in_chans=1, stem_channels=8, num_experts=2)
    deep = PCEBackbone(stages, in_chans=1, stem_channels=8, num_experts=2, drop_path_rate=0.3)
    deep.load_state_dict(plain.state_dict())
    rates = [[dp.drop_prob for dp in (s.drop_path or [])] for s in deep.stages]
    assert sum(rates, []) == pytest.approx([0.0, 0.1, 0.2, 0.3])  # linspace(0, rate, number of layers)
    assert deep.spec.drop_path_rate == 0.3 and plain.stages[0].drop_path is None
    x = torch.randn(2, 1, 16, 16)
    for a, b in zip(plain.eval()(x).values(), deep.eval()(x).values()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="drop_path_rate"):
        PCEBackbone(stages, in_chans=1, drop_path_rate=1.5)


def test_drop_path_in_training_drops_whole_residual_branches():
    torch.manual_seed(0)
    stage = Stage(4, 8, 2, 1, lambda: DenseLayer(8), drop_path_rates=[1.0]).train()
    x = torch.randn(6, 4, 8, 8)
    torch.testing.assert_close(stage(x), stage.down(x))  # rate 1: every layer is the identity
    stage.drop_path[0].drop_prob = 0.5
    torch.manual_seed(1)
    out = stage(x)
    h = stage.down(x)
    full = h + (stage.layers[0](h) - h) / 0.5  # a kept branch is scaled by 1 / keep
    kept = [torch.allclose(out[i], full[i], atol=1e-5) for i in range(6)]
    dropped = [torch.allclose(out[i], h[i]) for i in range(6)]
    assert all(k != d for k, d in zip(kept, dropped)) and any(kept) and any(dropped)


def recipe_cfg(tmp_path: Path, work_dir: Path, epochs: int = 1):
    """configs/fmnist_cls_pce_timm_recipe.py on the bundled 8x8 digits with a tiny backbone, 1 iteration an epoch."""
    cfg_file = tmp_path / "recipe_digits.py"
    cfg_file.write_text(
        f"_base_ = [{str(REPO / 'configs/fmnist_cls_pce_timm_recipe.py')!r}]\n"
        "data = dict(train=dict(name='digits', kwargs=dict(_delete_=True, split='train', size=8)),\n"
        "            val=dict(name='digits', kwargs=dict(_delete_=True, split='test', size=8)))\n")
    stages = [dict(channels=8, depth=1, patch_size=2, stride=1), dict(channels=8, depth=1, patch_size=2, stride=2)]
    return load_config(cfg_file, [
        ("runtime.work_dir", str(work_dir)), ("model.backbone_overrides.stem_channels", 8),
        ("model.backbone_overrides.stages", stages), ("model.input_shape", [1, 8, 8]),
        ("data.batch_size", 8), ("data.eval_batch_size", 512), ("data.num_workers", 0), ("data.test.name", ""),
        ("schedule.epochs", epochs), ("schedule.iters_per_epoch", 1), ("phases", []),
        ("runtime.kmeans_init_batches", 0), ("runtime.tensorboard", False), ("runtime.progress_bar", False),
        ("runtime.log_interval", 1), ("runtime.ema", 0.0), ("runtime.final_test", False)])


def test_recipe_trains_through_the_trainer_and_resumes_exactly(tmp_path, monkeypatch):
    """The recipe config trains (every batch mixed by timm, RandAugment in the transform, DropPath in the model);
    Mixup's numpy draws, the augmentation streams and DropPath's torch draws continue after --resume as in the
    uninterrupted run: the same losses and weights."""
    from timm.data import Mixup

    from pce.engine import Trainer

    class Stop(Exception):
        pass

    def stop_after_first_epoch(trainer, event):
        if event == "after_epoch" and trainer.epoch == 1:
            raise Stop()

    calls = []
    real_call = Mixup.__call__
    monkeypatch.setattr(Mixup, "__call__", lambda self, x, t: calls.append(len(x)) or real_call(self, x, t))
    cfg = recipe_cfg(tmp_path, tmp_path / "full", epochs=2)
    assert cfg.data.mixup.cutmix_alpha > 0 and cfg.data.train.transform.kwargs.auto_augment
    full = Trainer(cfg, get_task("classification"))
    full.train()
    assert calls == [8] * 2
    backbone = full.model.backbone
    assert [s.drop_path[0].drop_prob if s.drop_path else 0.0 for s in backbone.stages] == pytest.approx([0, 0.1])
    assert full.train_loader.dataset.transforms.auto_augment == "rand-m9-mstd0.5"
    records = [json.loads(ln) for ln in (tmp_path / "full/metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r.get("type") == "train"]
    assert len(train) == 2 and all(np.isfinite(r["loss_cls"]) for r in train)

    cfg = recipe_cfg(tmp_path, tmp_path / "split", epochs=2)
    first = Trainer(cfg, get_task("classification"), hooks=[stop_after_first_epoch])
    with pytest.raises(Stop):
        first.train()
    resumed = Trainer(cfg, get_task("classification"), resume=True)
    resumed.train()
    assert len(full.loss_history) == 2 and first.loss_history + resumed.loss_history == full.loss_history
    for (k, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("config", ["configs/demo_seg_dense.py", "configs/demo_det_dense.py"])
def test_mixup_outside_classification_is_a_flag_without_effect(config):
    """data.mixup mixes classification batches only: a detection / segmentation config that sets it is refused."""
    from pce.engine import load_config
    from pce.engine.errors import PCEError
    from pce.tasks import get_task

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / config, [("data.mixup.mixup_alpha", 0.2)])
    with pytest.raises(PCEError, match="data.mixup.*no effect in the (segmentation|detection) task"):
        get_task(cfg.task).build_model(cfg)
    get_task(cfg.task).build_model(load_config(root / config))  # off by default: builds
