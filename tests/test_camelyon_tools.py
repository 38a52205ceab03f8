"""End to end on generated slides: a short tools/train.py run, tools/eval.py (mIoU, per-class IoU, pixel accuracy,
level and tile size), tools/infer_slide.py (heat-map PNG + .npy, slide AUC, FROC) and the missing-data errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pce.datasets.camelyon import make_demo_camelyon
from _faults_util import load_tool

REPO = Path(__file__).resolve().parents[1]
CONFIG = "configs/demo_camelyon_seg_pce.py"


def run_tool(*args: str, timeout: int = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore::FutureWarning")
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _options(root: Path, cache: Path) -> list:
    tiles = "level=1 tile_size=64 stride=64 min_tissue=0.5".split()
    opts = [f"data.root={root}", "data.batch_size=4", "data.num_workers=0", "schedule.epochs=2",
            "runtime.kmeans_init_batches=2", "runtime.tensorboard=False", "runtime.progress_bar=False",
            "model.input_shape=[3,64,64]", "data.train.kwargs.epoch_size=16", "data.train.kwargs.generate=False",
            "data.val.kwargs.generate=False", "data.test.kwargs.generate=False",
            "phases=[{'name':'shared','epochs':1,'router_override':'shared','keys_trainable':False},"
            "{'name':'route','epochs':-1,'upcycle':True}]"]
    for split in ("train", "val", "test"):
        opts += [f"data.{split}.kwargs.{t}" for t in tiles] + [f"data.{split}.kwargs.cache_dir={cache}"]
    return opts


@pytest.mark.slow
def test_train_eval_and_infer_slide_on_generated_slides(tmp_path: Path):
    root = make_demo_camelyon(tmp_path / "demo", num_tumour=2, num_normal=1, num_test_tumour=1, num_test_normal=1,
                              size=(768, 512), seed=5)
    opts = _options(root, tmp_path / "cache")
    wd = tmp_path / "wd"
    r = run_tool("tools/train.py", CONFIG, "--work-dir", str(wd), "--cfg-options", *opts)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "upcycled the experts" in r.stdout + r.stderr and (wd / "best.pth").is_file()

    out = tmp_path / "metrics.json"
    r = run_tool("tools/eval.py", CONFIG, "--checkpoint", str(wd / "latest.pth"), "--out", str(out),
                 "--cfg-options", *opts)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = r.stdout.splitlines()
    assert any(ln.startswith("mIoU: ") for ln in lines) and "level: 1" in lines and "tile_size: 64" in lines
    m = json.loads(out.read_text())
    cm = np.array(m["confusion_matrix"], np.float64)  # recomputed from the confusion matrix
    iou = np.diag(cm) / (cm.sum(0) + cm.sum(1) - np.diag(cm))
    assert m["IoU_background"] == pytest.approx(iou[0]) and m["IoU_tumour"] == pytest.approx(iou[1])
    assert m["mIoU"] == pytest.approx(iou.mean()) and m["pixel_acc"] == pytest.approx(np.trace(cm) / cm.sum())
    assert cm.sum() % (64 * 64) == 0 and cm[1].sum() > 0 and 0.0 <= m["tile_AUC"] <= 1.0

    slides = sorted((root / "testing" / "images").glob("*.tif"))
    heat = tmp_path / "heat"
    rc = load_tool("infer_slide").main([CONFIG, "--checkpoint", str(wd / "latest.pth"), *map(str, slides),
                                        "--out", str(heat), "--annotations", str(root / "testing/lesion_annotations"),
                                        "--png-size", "256", "--cfg-options", *opts])
    assert rc == 0
    prob = np.load(heat / "test_001_prob.npy")
    meta = json.loads((heat / "test_001_heatmap.json").read_text())
    assert prob.dtype == np.float32 and prob.shape == (256 // 4, 384 // 4)  # level 1, cells of 4 level pixels
    assert meta["downsample"] == 8.0 and meta["score"] == pytest.approx(float(prob.max()))
    assert 0.0 <= prob.min() and prob.max() <= 1.0 and (heat / "test_001_heatmap.png").stat().st_size > 1000
    sm = json.loads((heat / "slide_metrics.json").read_text())
    assert [v["label"] for v in sm["slides"].values()] == [1, 0] and sm["num_lesions"] >= 1
    assert 0.0 <= sm["FROC"] <= 1.0 and sm["slide_AUC"] in (0.0, 0.5, 1.0)


def test_real_configs_without_data_name_the_layout(tmp_path: Path, capsys):
    infer = load_tool("infer_slide")
    rc = infer.main(["configs/camelyon16_seg_pce.py", "--checkpoint", str(tmp_path / "none.pth"),
                     str(tmp_path / "slide.tif"), "--out", str(tmp_path / "o")])
    assert rc == 1 and "error: " in capsys.readouterr().err
    from pce.engine import load_config
    from pce.tasks import get_task

    for cfg_path in ("configs/camelyon16_seg_pce.py", "configs/camelyon16_cls_dense.py"):
        cfg = load_config(cfg_path, [f"data.root={tmp_path / 'absent'}"])
        with pytest.raises(FileNotFoundError) as e:
            get_task(cfg.task).build_datasets(cfg, splits=("train",))
        msg = str(e.value)
        assert "absent: Camelyon16 root not found" in msg and "training/tumor/tumor_*.tif" in msg
        assert "lesion_annotations" in msg and "How to obtain it" in msg
    cls = load_config("configs/camelyon16_cls_pce.py")
    assert cls.data.train.kwargs.mode == "classify" and cls.data.val.kwargs.tile_size == 96
    assert cls.task == "classification" and cls.eval.metric == "AUC"


def test_infer_slide_loads_a_pruned_checkpoint_as_evaluation_does(tmp_path: Path):
    """A pruned checkpoint (``expert_structure``, as tools/prune_experts.py writes it) loads in infer_slide, and its
    heat-map equals the tile probabilities of the model that ``load_trained_weights`` (eval's path) makes of it."""
    import torch

    from pce.analysis import pce_layers, prune_experts, structure
    from pce.datasets import build_transform
    from pce.datasets.camelyon import CamelyonTiles
    from pce.datasets.camelyon.synthetic import make_synthetic_slide
    from pce.engine import atomic_save, load_config
    from pce.engine.evaluation import load_trained_weights
    from pce.tasks import get_task

    slide = tmp_path / "slide_001.tif"
    make_synthetic_slide(slide, tmp_path / "slide_001.xml", size=(512, 384), tumour=True, seed=3)
    tiles = dict(level=1, tile_size=64, stride=64, min_tissue=0.5, cache_dir=str(tmp_path / "cache"))
    opts = ["model.input_shape=[3,64,64]"] + [f"data.test.kwargs.{k}={v}" for k, v in tiles.items()]
    cfg = load_config(CONFIG, opts)
    task = get_task(cfg.task)
    torch.manual_seed(0)
    model = task.build_model(cfg).eval()
    layers = list(pce_layers(model))
    pruned = prune_experts(model, {name: [0, 2] for name in layers})  # 4 -> 2 experts per layer
    ckpt = tmp_path / "pruned.pth"
    atomic_save({"model": pruned.state_dict(), "expert_structure": structure(pruned),
                 "epoch": cfg.schedule.epochs}, ckpt)

    heat = tmp_path / "heat"
    rc = load_tool("infer_slide").main([CONFIG, "--checkpoint", str(ckpt), str(slide), "--out", str(heat),
                                        "--png-size", "128", "--cfg-options", *opts])
    assert rc == 0
    prob = np.load(heat / "slide_001_prob.npy")

    ref = task.build_model(cfg)  # independently: eval's loading path, run tile by tile
    load_trained_weights(ref, cfg, ckpt)
    ref.eval()
    assert [pce_layers(ref)[n].num_experts for n in layers] == [2] * len(layers)
    sc = cfg.data.test
    kw = {k: v for k, v in dict(sc.transform.kwargs).items() if k != "seed"}
    ds = CamelyonTiles([slide], mode="segment", transform=build_transform(sc.transform.name, **dict(kw, train=False)),
                       **tiles)
    assert len(ds) > 0
    cell, d = 4, ds.downsamples[0]  # map cells of 4 x 4 level pixels (tile 64 / 16)
    for i in range(len(ds)):
        with torch.no_grad():
            p = ref(ds[i][0][None]).softmax(1)[0, 1]  # [64, 64]
        want = p.reshape(16, cell, 16, cell).mean((1, 3)).numpy()
        x, y = round(ds.tiles[i]["x"] / d) // cell, round(ds.tiles[i]["y"] / d) // cell
        np.testing.assert_allclose(prob[y:y + 16, x:x + 16], want, atol=1e-5)


def test_infer_slide_refuses_a_task_without_slide_tiles(tmp_path: Path, capsys):
    rc = load_tool("infer_slide").main(["configs/demo_det_pce.py", "--checkpoint", str(tmp_path / "none.pth"),
                                        str(tmp_path / "slide.tif"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert rc == 1 and err == ('error: task: detection cannot run on slides (a task whose slide_tile_mode is '
                               '"classify" or "segment")\n')


@pytest.mark.parametrize("sizes,batch", [([3, 5, 1, 7], 4), ([3, 5, 2], 4), ([2, 2], 4), ([9], 4), ([], 3), ([4, 4], 4)])
def test_rebatch_regroups_blocks_into_fixed_batches_in_order(sizes, batch):
    import torch
    from pce.tasks.slide_inference import rebatch

    start = np.cumsum([0] + sizes)
    blocks = [(torch.arange(a, b, dtype=torch.float32)[:, None, None, None].expand(-1, 3, 2, 2).clone(),
               torch.arange(a, b)) for a, b in zip(start[:-1], start[1:])]
    out = list(rebatch(blocks, batch))
    total = int(sum(sizes))
    expected = [batch] * (total // batch) + ([total % batch] if total % batch else [])  # by hand
    assert [len(ids) for _, ids in out] == expected
    ids = torch.cat([i for _, i in out]) if out else torch.zeros(0, dtype=torch.long)
    assert ids.tolist() == list(range(total))  # every tile once, in order
    for imgs, i in out:  # each image still travels with its own index
        assert imgs.shape[1:] == (3, 2, 2) and torch.equal(imgs[:, 0, 0, 0].long(), i)
