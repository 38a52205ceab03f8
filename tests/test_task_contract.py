"""The task contract (:class:`pce.engine.task.Task`) for every registered task, in the style of smp's base testers
and timm's registry-parametrised tests: each test runs over ``pce.tasks.list_tasks()`` on a tiny config and
checks real behaviour against hand computations (patch labels of hand-built masks / boxes / labels, summaries
of hand-built predictions, the pixels a picture changes). A task without a spec below fails: write one.
``test_every_member_is_exercised`` fails when the contract gains a member no test runs."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Dict, List, Set

import pytest
import torch

from pce.engine import load_config
from pce.engine.task import Evaluator, Task
from pce.tasks import get_task, list_tasks
from pce.tasks.tooling import eval_transform

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
MEMBERS = {n for n, v in vars(Task).items() if not n.startswith("_") and callable(v)} | set(Task.__annotations__)
COVERED: Set[str] = set()
VOC = {1: (128, 0, 0), 2: (0, 128, 0), 3: (128, 128, 0), 5: (128, 0, 128)}  # the VOC colour map


def covers(*members: str) -> Callable:
    COVERED.update(members)
    return lambda fn: fn


def demo_voc(tmp: Path, size: int = 64) -> List[Any]:
    """Overrides of a demo-VOC config: 2 + 2 generated images of ``size`` px under ``tmp``."""
    demo = dict(num_train=2, num_val=2, image_size=size, seed=0)
    return [("data.root", str(tmp / "voc")), ("data.train.kwargs.demo", demo), ("data.val.kwargs.demo", demo)]


COMMON = [("data.batch_size", 2), ("data.num_workers", 0), ("runtime.kmeans_init_batches", 0),
          ("runtime.tensorboard", False), ("runtime.progress_bar", False)]


# --------------------------------------------------------------------------------------- one spec per task
class ClassificationSpec:
    config = "demo_cls_digits.py"
    overrides = staticmethod(lambda tmp: [])
    names = [f"digit{i}" for i in range(10)]

    batch = (torch.rand(2, 1, 16, 16), torch.tensor([3, 7]))
    grid, patch_labels, image_labels = (2, 3), [[3] * 6, [7] * 6], [3, 7]
    probs = torch.tensor([.02, .03, .5, .05, .2, .1, .04, .03, .02, .01])
    output = probs.log()
    summary = {"top5": [{"class": c, "name": f"digit{c}", "prob": p} for c, p in
                        [(2, .5), (4, .2), (5, .1), (3, .05), (6, .04)]]}

    @staticmethod
    def check_empty(target: Any, image: torch.Tensor) -> None:
        assert target == 0

    @staticmethod
    def check_input_frame(task: Any) -> None:
        """Logits belong to the whole image: unchanged by any size."""
        out = task.to_input_frame(ClassificationSpec.output, (16, 16), (427, 640))
        assert torch.equal(out, ClassificationSpec.output)

    @staticmethod
    def check_render(task: Any) -> None:
        image = torch.full((3, 64, 64), 0.5)
        for output, colour in ((ClassificationSpec.output, VOC[3]), (torch.tensor(4), VOC[5])):  # label k: colour k+1
            pic = task.render(image, output, ClassificationSpec.names)
            assert pic.dtype == torch.uint8 and pic.shape == (3, 64, 64)
            assert tuple(pic[:, 63, 32].tolist()) == colour and tuple(pic[:, 32, 63].tolist()) == colour  # the frame
            assert tuple(pic[:, 32, 32].tolist()) == (128, 128, 128)                                     # inside


class DetectionSpec:
    config = "demo_det_pce.py"
    names = ["circle", "square", "triangle", "star"]
    overrides = staticmethod(lambda tmp: demo_voc(tmp) + [
        ("model.input_shape", [3, 64, 64]), ("model.head.min_size", 64), ("model.head.max_size", 64),
        ("model.head.fpn_channels", 16), ("model.head.representation_size", 32),
        ("data.train.transform.kwargs.min_size", 64), ("data.train.transform.kwargs.max_size", 64),
        ("data.val.transform.kwargs.min_size", 64), ("data.val.transform.kwargs.max_size", 64)])

    # image 0 (8x8): the centre (2, 2) lies in both boxes -> the smaller (2); image 1 (16 high, 8 wide): a box
    # over its bottom half -> its class on the bottom row of the grid (the image's own size must be used)
    batch = ([torch.rand(3, 8, 8), torch.rand(3, 16, 8)],
             [{"boxes": torch.tensor([[0.0, 0.0, 8.0, 8.0], [0.0, 0.0, 4.0, 4.0]]), "labels": torch.tensor([1, 2])},
              {"boxes": torch.tensor([[0.0, 8.0, 8.0, 16.0]]), "labels": torch.tensor([3])}])
    grid, patch_labels, image_labels = (2, 2), [[2, 1, 1, 1], [0, 0, 3, 3]], None
    output = {"boxes": torch.tensor([[10.0, 10.0, 40.0, 40.0], [45.0, 45.0, 60.0, 60.0]]),
              "scores": torch.tensor([0.9, 0.3]), "labels": torch.tensor([2, 1])}
    summary = {"boxes": [[10.0, 10.0, 40.0, 40.0]], "labels": [2], "scores": [0.9], "names": ["square"]}

    @staticmethod
    def check_empty(target: Any, image: torch.Tensor) -> None:
        assert target["boxes"].shape == (0, 4) and target["labels"].numel() == 0

    @staticmethod
    def check_input_frame(task: Any) -> None:
        """Model frame 64 high x 64 wide, image 128 high x 96 wide: x * 96 / 64 = 1.5, y * 128 / 64 = 2."""
        out = task.to_input_frame(DetectionSpec.output, (64, 64), (128, 96))
        assert out["boxes"].tolist() == [[15.0, 20.0, 60.0, 80.0], [67.5, 90.0, 90.0, 120.0]]
        assert torch.equal(out["scores"], DetectionSpec.output["scores"])
        assert torch.equal(out["labels"], DetectionSpec.output["labels"])
        assert DetectionSpec.output["boxes"][0].tolist() == [10.0, 10.0, 40.0, 40.0]  # input untouched

    @staticmethod
    def check_render(task: Any) -> None:
        pic = task.render(torch.zeros(3, 64, 64), DetectionSpec.output, DetectionSpec.names, score_thr=0.5)
        assert pic.dtype == torch.uint8 and pic.shape == (3, 64, 64)
        assert tuple(pic[:, 30, 10].tolist()) == VOC[2]        # left edge of the kept box, in label 2's colour
        assert pic[:, 25, 25].sum() == 0                        # inside it
        assert pic[:, 52, 45].sum() == 0 and pic[:, 45:61, 45:61].sum() == 0  # the box scoring 0.3 is left out


class SegmentationSpec:
    config = "demo_seg_pce.py"
    names = ["background", "circle", "square", "triangle", "star"]
    overrides = staticmethod(lambda tmp: demo_voc(tmp) + [
        ("model.input_shape", [3, 64, 64]), ("data.train.transform.kwargs.crop_size", 64)])

    _mask = torch.zeros(1, 4, 4, dtype=torch.long)
    _mask[0, :2, 2:] = 3
    _mask[0, 2:, :2] = 255  # ignored: that patch has no label
    _mask[0, 3, 3] = 1      # a minority pixel
    batch = (torch.rand(1, 3, 4, 4), _mask)
    grid, patch_labels, image_labels = (2, 2), [[0, 3, -1, 0]], None
    output = torch.tensor([[0, 0, 2, 2], [0, 0, 2, 2], [4, 4, 4, 0], [0, 0, 0, 0]])
    summary = {"class_pixels": {0: 9, 2: 4, 4: 3}}

    @staticmethod
    def check_empty(target: Any, image: torch.Tensor) -> None:
        assert torch.equal(target, torch.zeros(image.shape[-2:], dtype=torch.int64))

    @staticmethod
    def check_input_frame(task: Any) -> None:
        """A 4x4 label map to an 8x12 image: every label covers a 2x3 block (nearest, no new classes); the same
        size: unchanged."""
        out = task.to_input_frame(SegmentationSpec.output, (4, 4), (8, 12))
        want = SegmentationSpec.output.repeat_interleave(2, 0).repeat_interleave(3, 1)
        assert out.dtype == SegmentationSpec.output.dtype and torch.equal(out, want)
        assert torch.equal(task.to_input_frame(SegmentationSpec.output, (4, 4), (4, 4)), SegmentationSpec.output)

    @staticmethod
    def check_render(task: Any) -> None:
        image = torch.full((3, 4, 4), 0.2)
        pic = task.render(image, SegmentationSpec.output, SegmentationSpec.names, alpha=0.5)
        assert pic.dtype == torch.uint8 and pic.shape == (3, 4, 4) and torch.equal(image, torch.full((3, 4, 4), 0.2))
        grey = round(0.2 * 255)
        for y, x in ((0, 0), (3, 3), (1, 1)):   # background: the image
            assert pic[:, y, x].tolist() == [grey] * 3
        assert pic[:, 0, 2].tolist() == [round(0.5 * grey + 0.5 * c) for c in VOC[2]]


SPECS = {"ClassificationTask": ClassificationSpec, "DetectionTask": DetectionSpec,
         "SegmentationTask": SegmentationSpec}


def spec_of(task: Any) -> Any:
    spec = SPECS.get(type(task).__name__)
    assert spec is not None, f"task {task.name!r} ({type(task).__name__}) has no spec in {__file__}: write one"
    return spec


@pytest.fixture(scope="module", params=list_tasks())
def built(request, tmp_path_factory) -> Dict[str, Any]:
    """``{"name", "task", "spec", "cfg", "model", "datasets"}`` of one registered task on its tiny config."""
    task = get_task(request.param)
    spec = spec_of(task)
    tmp = tmp_path_factory.mktemp(f"contract_{request.param}")
    cfg = load_config(REPO / "configs" / spec.config,
                      COMMON + [("runtime.work_dir", str(tmp / "work"))] + spec.overrides(tmp))
    torch.manual_seed(0)
    model = task.build_model(cfg)
    return {"name": request.param, "task": task, "spec": spec, "cfg": cfg, "model": model.eval(),
            "datasets": task.build_datasets(cfg, splits=("train", "val"))}


def collate(task: Any, samples: List[Any]) -> Any:
    from torch.utils.data import default_collate

    return (task.collate_fn or default_collate)(samples)


def assert_close(got: Any, want: Any, where: str = "summary") -> None:
    """``got == want`` with floats compared to 1e-6 (nested dicts and lists)."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), (where, got, want)
        for k in want:
            assert_close(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), (where, got, want)
        for i, (g, w) in enumerate(zip(got, want)):
            assert_close(g, w, f"{where}[{i}]")
    elif isinstance(want, float):
        assert got == pytest.approx(want, abs=1e-6), (where, got, want)
    else:
        assert got == want, (where, got, want)


# ------------------------------------------------------------------------------------------------ the tests
@covers("name", "collate_fn", "slide_tile_mode")
@pytest.mark.parametrize("name", list_tasks())
def test_registered_and_typed(name: str):
    task = get_task(name)
    assert isinstance(task, Task) and task.name == name
    assert task.collate_fn is None or callable(task.collate_fn)
    assert task.slide_tile_mode in (None, "classify", "segment")
    spec_of(task)


@covers("build_model", "build_datasets", "set_epoch", "dummy_inputs", "train_step", "predict", "build_evaluator",
        "batch_images", "batch_size")
def test_train_and_evaluate(built):
    task, cfg, model, ds = built["task"], built["cfg"], built["model"], built["datasets"]
    assert set(ds) == {"train", "val"} and len(ds["train"]) >= 2
    task.set_epoch(3)
    first = ds["train"][0]
    task.set_epoch(3)  # the same epoch augments the same way
    assert torch.equal(first[0], ds["train"][0][0])
    batch = collate(task, [ds["train"][0], ds["train"][1]])
    assert task.batch_size(batch) == 2
    images = task.batch_images(batch)
    assert images.dim() == 4 and images.shape[0] == 2
    model.train()
    losses = task.train_step(model, batch, CPU)
    assert "loss_router" in losses and all(math.isfinite(float(v.detach())) for v in losses.values())
    sum(losses.values()).backward()
    model.eval()
    evaluator = task.build_evaluator(cfg, ds["val"])
    assert isinstance(evaluator, Evaluator)
    evaluator.update(*task.predict(model, collate(task, [ds["val"][0], ds["val"][1]]), CPU))
    assert cfg.eval.metric in evaluator.compute()
    inputs = task.dummy_inputs(cfg, 2)
    assert tuple(inputs[0].shape) == (2, *cfg.model.input_shape)
    with torch.no_grad():
        model(*inputs)


@covers("empty_target", "prepare_image", "min_input_side")
def test_user_images(built):
    task, cfg, model, spec = built["task"], built["cfg"], built["model"], built["spec"]
    channels = int(cfg.model.input_shape[0])
    lo = task.min_input_side(cfg, model)
    assert isinstance(lo, int) and lo >= 1
    # any size, down to (nearly) the smallest side: at exactly the deepest stride, smp's FPN decoder gets a 1x1 map
    # and its GroupNorm refuses it (min_input_side is the stride, as tools/infer.py has always checked)
    for h, w in ((40, 56), (lo + 1, lo + 1)):
        image = torch.rand(channels, h, w)
        spec.check_empty(task.empty_target(image), image)
        x, target = task.prepare_image(cfg, image, eval_transform(cfg))
        assert x.dim() == 3 and x.shape[0] == channels
        pred = task.predict(model, collate(task, [(x, target)]), CPU)[0][0]
        json.dumps(task.summarize(pred, spec.names))  # JSON-ready as it is


@covers("summarize")
def test_summarize_handbuilt(built):
    task, spec = built["task"], built["spec"]
    got = json.loads(json.dumps(task.summarize(spec.output, spec.names, score_thr=0.5)))  # JSON-ready as it is
    assert_close(got, json.loads(json.dumps(spec.summary)))


@covers("render")
def test_render_handbuilt(built):
    built["spec"].check_render(built["task"])


@covers("to_input_frame")
def test_to_input_frame_handbuilt(built):
    """A prediction in the model's frame back in the user's image's own frame (hand-computed scales)."""
    built["spec"].check_input_frame(built["task"])


@covers("to_input_frame")
def test_infer_frame_round_trip(built):
    """``prepare_image`` then ``to_input_frame``: a prediction of the model input's size comes back at the size of
    the user's image (40 x 56), whatever the task resized."""
    task, cfg, model, spec = built["task"], built["cfg"], built["model"], built["spec"]
    image = torch.rand(int(cfg.model.input_shape[0]), 40, 56)
    x, target = task.prepare_image(cfg, image, eval_transform(cfg))
    pred = task.predict(model, collate(task, [(x, target)]), CPU)[0][0]
    back = task.to_input_frame(pred, tuple(x.shape[-2:]), (40, 56))
    pic = task.render(image, back, spec.names)
    assert pic.shape == (3, 40, 56)
    if isinstance(back, torch.Tensor) and back.dim() == 2:
        assert back.shape == (40, 56)
    if isinstance(back, dict):
        boxes = back["boxes"]
        assert boxes.numel() == 0 or (boxes[:, 0::2].max() <= 56 + 1e-3 and boxes[:, 1::2].max() <= 40 + 1e-3)


@covers("patch_labels", "image_labels")
def test_labels_handbuilt(built):
    task, spec = built["task"], built["spec"]
    got = task.patch_labels(spec.batch, spec.grid, 4)
    assert got.dtype == torch.int64 and got.tolist() == spec.patch_labels
    assert task.patch_labels((spec.batch[0],), spec.grid, 4) is None  # no targets in the batch
    labels = task.image_labels(spec.batch)
    assert (labels is None) if spec.image_labels is None else labels.tolist() == spec.image_labels


@covers("export_target")
def test_export_target(built):
    task, cfg, model = built["task"], built["cfg"], built["model"]
    for what in ("model", "backbone"):
        module, make_input, info = task.export_target(model, cfg, what, (64, 64))
        assert isinstance(module, torch.nn.Module) and {"mean", "std", "input", "preprocess", "exported"} <= set(info)
        a, b = make_input(2, 1), make_input(2, 1)
        assert _equal(a, b) and not _equal(a, make_input(2, 2))  # seeded, and seeds differ
        with torch.no_grad():
            out = module(a)
        leaves = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        assert leaves and all(torch.isfinite(t.float()).all() for t in leaves)


def test_build_datasets_for_evaluation_does_not_augment(built):
    """``build_datasets(..., evaluate=True)``: the train split as evaluated (``tools/eval.py --split train``), so
    its samples do not depend on the augmentation seed or the epoch; without it they do (when the config
    augments at all)."""
    task, cfg = built["task"], built["cfg"]

    def images(seed: int, evaluate: bool) -> List[torch.Tensor]:
        c = cfg.clone()
        c.defrost()
        c.runtime.seed = seed
        t = get_task(built["name"])
        ds = t.build_datasets(c, splits=("train",), evaluate=evaluate)["train"]
        t.set_epoch(seed)
        return [ds[i][0] for i in range(min(4, len(ds)))]

    plain = all(torch.equal(a, b) for a, b in zip(images(1, True), images(2, True)))
    assert plain, f"{task.name}: evaluation datasets still augment"
    augmented = images(1, False), images(2, False)
    if all(torch.equal(a, b) for a, b in zip(*augmented)):
        pytest.skip(f"{task.name}'s tiny config does not augment: nothing to compare")


def _equal(a: Any, b: Any) -> bool:
    """Equal example inputs (a tensor, or a list of images)."""
    a, b = torch.utils._pytree.tree_leaves(a), torch.utils._pytree.tree_leaves(b)
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def test_every_member_is_exercised():
    assert MEMBERS - COVERED == set(), f"contract members no test runs: {sorted(MEMBERS - COVERED)}"
