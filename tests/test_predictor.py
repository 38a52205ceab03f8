"""Issue #24, the Python inference API ``pce.tasks.Predictor``: every input kind gives the path's result, computed
here independently (the model loaded by ``load_trained_weights`` and run by hand on ``task.prepare_image`` of the
image through the evaluation transform); detections and label maps in the input image's own frame; per-image
routing; batching equal to one image at a time; bad inputs as one-line errors naming the item."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import default_collate

from pce.engine import atomic_save, dump_config, load_config
from pce.engine.errors import PCEError
from pce.engine.evaluation import load_trained_weights
from pce.tasks import Predictor, get_task
from pce.tasks.tooling import eval_transform

from _faults_util import REPO, tiny_cfg


# ------------------------------------------------------------------------------------------------- helpers
def _checkpoint(cfg, path: Path, epoch: int) -> Path:
    torch.manual_seed(0)
    atomic_save({"model": get_task(cfg.task).build_model(cfg).state_dict(), "epoch": epoch}, path)
    return path


def _by_hand(cfg_path, ckpt):
    """``(cfg, task, model)``: the trained model as the tools load it, without the Predictor."""
    cfg = load_config(cfg_path)
    task = get_task(cfg.task)
    model = task.build_model(cfg)
    load_trained_weights(model, cfg, str(ckpt))
    return cfg, task, model.eval()


def _predict_by_hand(cfg, task, model, image: torch.Tensor):
    """``(prediction in the model input's frame, model input)`` of one ``[C, H, W]`` image in [0, 1]."""
    x, tgt = task.prepare_image(cfg, image, eval_transform(cfg))
    collate = task.collate_fn or default_collate
    with torch.no_grad():
        return task.predict(model, collate([(x, tgt)]), torch.device("cpu"))[0][0], x


@pytest.fixture(scope="module")
def cls_run(tmp_path_factory):
    """A tiny digits classifier (1 channel, 8x8 inputs), random weights saved after its first epoch."""
    tmp = tmp_path_factory.mktemp("pred_cls")
    cfg = tiny_cfg(tmp / "wd")
    dump_config(cfg, tmp / "cfg.py")
    return tmp / "cfg.py", _checkpoint(cfg, tmp / "w.pth", 1)


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory):
    """The demo segmentation model (3 channels, top-1 routing renormalised to 1), saved at its last epoch."""
    tmp = tmp_path_factory.mktemp("pred_seg")
    cfg_path = REPO / "configs/demo_seg_pce.py"
    cfg = load_config(cfg_path)
    return cfg_path, _checkpoint(cfg, tmp / "seg.pth", int(cfg.schedule.epochs))


def _gray(seed: int, h: int = 11, w: int = 13) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w), dtype=np.uint8)


def _rgb(seed: int, h: int = 40, w: int = 56) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# --------------------------------------------------------------------------------------------- input kinds
def test_every_input_kind_gives_the_paths_result_classification(cls_run, tmp_path):
    """A grayscale image as a path, a PIL image, uint8 [H, W] / [H, W, 1], float [H, W] in [0, 1] and a tensor
    [1, H, W]: the same logits as the model run by hand on the file's pixels; top-k classes and scores."""
    cfg_path, ckpt = cls_run
    pixels = _gray(0)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    cfg, task, model = _by_hand(cfg_path, ckpt)
    image = torch.from_numpy(np.asarray(Image.open(tmp_path / "a.png"), dtype=np.float32) / 255)[None]
    want, _ = _predict_by_hand(cfg, task, model, image)
    prob = want.softmax(-1)

    predictor = Predictor.from_checkpoint(cfg_path, ckpt, device="cpu", topk=3)
    inputs = {"path": tmp_path / "a.png", "str": str(tmp_path / "a.png"), "pil": Image.fromarray(pixels),
              "u8 HW": pixels, "u8 HW1": pixels[..., None], "float HW": pixels.astype(np.float32) / 255,
              "tensor": torch.from_numpy(pixels).float()[None] / 255, "tensor u8": torch.from_numpy(pixels)[None]}
    for kind, item in inputs.items():
        res = predictor(item)
        assert torch.allclose(res.logits, want, atol=1e-5), kind
        assert res.classes.tolist() == prob.topk(3).indices.tolist(), kind
        assert torch.allclose(res.scores, prob.topk(3).values, atol=1e-5), kind
        assert len(res.names) == 3 and res.summary == task.summarize(want, predictor.class_names), kind
        assert res.image_size == (11, 13) and res.model_input_size == (8, 8), kind
        assert tuple(res.render().shape) == (3, 11, 13) and res.render().dtype == torch.uint8, kind
    assert isinstance(predictor([inputs["pil"]]), list) and len(predictor([inputs["pil"]])) == 1

    # an RGB image for a grayscale model: as the same pixels read from a file (PIL's luma)
    rgb = _rgb(12, 11, 13)
    Image.fromarray(rgb).save(tmp_path / "c.png")
    image = torch.from_numpy(np.asarray(Image.open(tmp_path / "c.png").convert("L"), dtype=np.float32) / 255)[None]
    want, _ = _predict_by_hand(cfg, task, model, image)
    for item in (tmp_path / "c.png", Image.fromarray(rgb), rgb):
        assert torch.allclose(predictor(item).logits, want, atol=1e-5)
    as_float = predictor(torch.from_numpy(rgb).permute(2, 0, 1) / 255).logits  # float luma, not rounded to 8 bits
    assert torch.allclose(as_float, want, atol=0.05)


def test_every_input_kind_gives_the_paths_result_rgb(seg_run, tmp_path):
    """An RGB image as a path, a PIL image, uint8 [H, W, 3] / RGBA, float [H, W, 3] and a tensor [3, H, W]: the
    same label map as the segmentation model run by hand, at the input's size."""
    cfg_path, ckpt = seg_run
    pixels = _rgb(1)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    cfg, task, model = _by_hand(cfg_path, ckpt)
    image = torch.from_numpy(np.asarray(Image.open(tmp_path / "a.png"), dtype=np.float32) / 255).permute(2, 0, 1)
    want, _ = _predict_by_hand(cfg, task, model, image)
    assert want.shape == (40, 56)

    predictor = Predictor.from_checkpoint(cfg_path, ckpt)
    rgba = np.concatenate([pixels, np.full((40, 56, 1), 7, np.uint8)], -1)
    inputs = {"path": tmp_path / "a.png", "pil": Image.fromarray(pixels), "u8": pixels, "rgba": rgba,
              "float": pixels.astype(np.float32) / 255, "tensor": torch.from_numpy(pixels).permute(2, 0, 1) / 255}
    for kind, item in inputs.items():
        res = predictor(item)
        assert torch.equal(res.label_map, want), kind
        assert res.summary == task.summarize(want, None), kind

    # a grayscale image for an RGB model: its one channel repeated, whatever the input kind
    gray = _gray(11, 40, 56)
    Image.fromarray(gray).save(tmp_path / "g.png")
    image = torch.from_numpy(gray).float().div(255)[None].repeat(3, 1, 1)
    want, _ = _predict_by_hand(cfg, task, model, image)
    inputs = {"path": tmp_path / "g.png", "pil": Image.fromarray(gray), "u8": gray, "u8 HW1": gray[..., None],
              "float": gray.astype(np.float32) / 255, "tensor": torch.from_numpy(gray)[None] / 255}
    for kind, item in inputs.items():
        assert torch.equal(predictor(item).label_map, want), kind


# ----------------------------------------------------------------------------------- the input image's frame
def test_detection_boxes_in_the_input_images_frame(tmp_path):
    """A 150x100 (W x H) image: the model saw 128x85; the boxes are the model's own boxes scaled by hand by
    150/128 and 100/85, labels and scores as they are, names from the demo classes; the picture is 150x100."""
    cfg_path = REPO / "configs/demo_det_pce.py"
    ckpt = _checkpoint(load_config(cfg_path), tmp_path / "det.pth", int(load_config(cfg_path).schedule.epochs))
    pixels = _rgb(2, 100, 150)
    cfg, task, model = _by_hand(cfg_path, ckpt)
    image = torch.from_numpy(pixels).permute(2, 0, 1).float() / 255
    x, _ = eval_transform(cfg)(image, task.empty_target(image))
    assert tuple(x.shape[-2:]) == (85, 128)
    with torch.no_grad():
        det = model([x])[0]
    assert len(det["boxes"]) > 0

    predictor = Predictor.from_checkpoint(cfg_path, ckpt, score_thr=0.0)
    res = predictor(pixels)
    assert res.model_input_size == (85, 128) and res.image_size == (100, 150)
    want = det["boxes"] * torch.tensor([150 / 128, 100 / 85, 150 / 128, 100 / 85])
    assert res.boxes.shape == want.shape and torch.allclose(res.boxes, want, atol=1e-3)
    assert torch.equal(res.labels, det["labels"]) and torch.allclose(res.scores, det["scores"])
    assert res.names == [predictor.class_names[int(c) - 1] for c in det["labels"]]
    assert tuple(res.render().shape) == (3, 100, 150)
    # score_thr keeps the instances scoring at least it, in every field
    strict = Predictor(predictor.cfg, predictor.task, predictor.model, predictor.device,
                       score_thr=float(det["scores"].median()))(pixels)
    keep = det["scores"] >= float(det["scores"].median())
    assert len(strict.boxes) == len(strict.labels) == len(strict.names) == int(keep.sum())


def test_segmentation_label_map_at_the_input_size(seg_run):
    """A transform that halves the image: the model's 25x35 label map comes back at 50x70, resized by hand
    (nearest, pixel centres aligned); without resizing, the map is the input's size as it is."""
    cfg_path, ckpt = seg_run
    predictor = Predictor.from_checkpoint(cfg_path, ckpt)
    base = predictor.transform

    def halve(image, target):
        x, t = base(image, target)
        return (F.interpolate(x[None], scale_factor=0.5, mode="bilinear", align_corners=False)[0],
                F.interpolate(t[None, None].float(), scale_factor=0.5, mode="nearest")[0, 0].long())

    predictor.transform = halve
    pixels = _rgb(3, 50, 70)
    image = torch.from_numpy(pixels).permute(2, 0, 1).float() / 255
    cfg, task, model = _by_hand(cfg_path, ckpt)
    x, tgt = task.prepare_image(cfg, image, halve)
    with torch.no_grad():
        small = task.predict(model, task.collate_fn([(x, tgt)]), torch.device("cpu"))[0][0]
    assert small.shape == (25, 35)
    want = F.interpolate(small[None, None].float(), size=(50, 70), mode="nearest-exact")[0, 0].long()
    res = predictor(pixels)
    assert res.model_input_size == (25, 35) and res.label_map.shape == (50, 70)
    assert torch.equal(res.label_map, want)
    assert tuple(res.render().shape) == (3, 50, 70)


# ------------------------------------------------------------------------------------------------ routing
def test_routing_per_image_and_layer(seg_run, cls_run):
    """routing=True: one entry per routed layer of the model, each that image's weights [P, E] (the batch's
    recorded weights of that image); top-1 routing renormalised: every row one weight of exactly 1. Without
    routing=True: None."""
    from pce.moe.recorder import record_routing, routing_sources

    cfg_path, ckpt = seg_run
    predictor = Predictor.from_checkpoint(cfg_path, ckpt)
    images = [_rgb(4, 32, 48), _rgb(5, 32, 48)]
    results = predictor(images, batch_size=2, routing=True)
    names = [n for n, _ in routing_sources(predictor.model)]
    assert names and all(list(r.routing) == names for r in results)

    cfg, task, model = _by_hand(cfg_path, ckpt)
    batch = task.collate_fn([task.prepare_image(cfg, torch.from_numpy(p).permute(2, 0, 1).float() / 255,
                                                eval_transform(cfg)) for p in images])
    with torch.no_grad(), record_routing(model, detach=True) as rec:
        task.predict(model, batch, torch.device("cpu"))
    by_hand = dict(zip(rec.names, rec.results))
    for i, res in enumerate(results):
        for name, w in res.routing.items():
            assert w.dim() == 2 and w.shape == by_hand[name].weights.shape[1:], name
            assert torch.equal(w, by_hand[name].weights[i]), name
            assert torch.allclose(w.sum(-1), torch.ones(w.shape[0])), name
            assert torch.equal((w > 0).sum(-1), torch.ones(w.shape[0], dtype=torch.long)), name
    assert predictor(images[0]).routing is None

    # a router without renormalisation promises weights >= 0 summing to at most 1
    cls_cfg, cls_ckpt = cls_run
    res = Predictor.from_checkpoint(cls_cfg, cls_ckpt)(_gray(6), routing=True)
    assert res.routing
    for w in res.routing.values():
        assert w.dim() == 2 and (w >= 0).all() and (w.sum(-1) <= 1 + 1e-5).all()


# ----------------------------------------------------------------------------------------------- batching
def test_batching_equals_one_at_a_time(cls_run):
    """batch_size=2 with 3 images (one batch of 2, one of 1): the logits and the routing of each image equal
    those of that image alone, in input order."""
    cfg_path, ckpt = cls_run
    predictor = Predictor.from_checkpoint(cfg_path, ckpt)
    images = [_gray(7), _gray(8, 20, 9), _gray(9)]
    batched = predictor(images, batch_size=2, routing=True)
    assert len(batched) == 3
    for image, res in zip(images, batched):
        alone = predictor(image, routing=True)
        assert torch.allclose(res.logits, alone.logits, atol=1e-5)
        assert res.image_size == alone.image_size
        assert all(torch.allclose(res.routing[k], alone.routing[k], atol=1e-6) for k in alone.routing)
    assert not torch.allclose(batched[0].logits, batched[2].logits)  # distinct images: order matters


# ------------------------------------------------------------------------------------------------- errors
def test_bad_inputs_are_one_line_errors_naming_the_item(cls_run, tmp_path):
    """A dict, a 4-D tensor, float pixels outside [0, 1], NaN pixels, a missing file, an image above
    data.max_input_size, a bad batch_size: one line naming the item (images[i] in a list, or the path)."""
    cfg_path, ckpt = cls_run
    predictor = Predictor.from_checkpoint(cfg_path, ckpt, cfg_options=["data.max_input_size=64"])
    ok = _gray(10)
    nan = ok.astype(np.float32) / 255
    nan[0, 0] = np.nan
    cases = [({"a": 1}, "images[1]: a dict is not an image"),
             (torch.zeros(1, 1, 8, 8), "images[1]: a tensor of shape [1, 1, 8, 8] is not an image"),
             (np.full((8, 8), 2.0, np.float32), "images[1]: float pixel values span [2, 2], outside [0, 1]"),
             (nan, "images[1]: 1 NaN / infinite pixel value(s)"),
             (np.zeros((8, 8, 2), np.uint8), "images[1]: an array of shape [8, 8, 2] is not an image"),
             (tmp_path / "missing.png", f"{tmp_path / 'missing.png'}: image not found"),
             (np.zeros((80, 8), np.uint8), "images[1]: 8x80 pixels is larger than data.max_input_size=64")]
    for item, start in cases:
        with pytest.raises(PCEError) as e:
            predictor([ok, item])
        assert str(e.value).startswith(start) and "\n" not in str(e.value), str(e.value)
    with pytest.raises(PCEError, match=r"^a builtins\.int: a int is not an image"):
        predictor(3)
    with pytest.raises(PCEError, match=r"^batch_size: 0 is not a positive integer"):
        predictor([ok], batch_size=0)


def test_loading_eval_mode_threads(cls_run, tmp_path):
    """The model is in eval mode, runtime.num_threads is applied, a missing checkpoint is one line naming it."""
    cfg_path, ckpt = cls_run
    before = torch.get_num_threads()
    try:
        predictor = Predictor.from_checkpoint(cfg_path, ckpt, cfg_options=["runtime.num_threads=1"])
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert not predictor.model.training and not any(m.training for m in predictor.model.modules())
    # no autograd graph, even for a task whose predict does not turn it off itself
    task = predictor.task

    class OwnGrad:
        def __getattr__(self, name):
            return getattr(task, name)

        def predict(self, model, batch, device):
            return type(task).predict.__wrapped__(task, model, batch, device)  # without its @torch.no_grad()

    grad = []
    predictor.model.register_forward_pre_hook(lambda m, a: grad.append(torch.is_grad_enabled()))
    Predictor(predictor.cfg, OwnGrad(), predictor.model, predictor.device)(_gray(13))
    assert grad == [False]
    with pytest.raises(PCEError, match=f"^{tmp_path / 'nope.pth'}: checkpoint not found"):
        Predictor.from_checkpoint(cfg_path, tmp_path / "nope.pth")
