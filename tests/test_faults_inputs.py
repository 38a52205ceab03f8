"""Issue #16, bad inputs (items 8, 9, 14-17): 16-bit images, VOC box cross-checks, safe CIFAR pickles, input-size
limits, one-line errors naming the culprit, tools/infer.py skipping unreadable files."""
from __future__ import annotations

import json
import os
import pickle
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pce.engine import atomic_save
from pce.tasks import get_task

from _faults_util import REPO, cli_options, demo_voc, error_line, load_tool, tiny_cfg


def _png16(path: Path, value: int, size=(12, 10)) -> Path:
    Image.fromarray(np.full(size, value, dtype=np.uint16)).save(path)
    assert Image.open(path).mode.startswith("I")
    return path


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    """8. A 16-bit PNG of value 30000 reads as 30000/65535, not as white."""
    from pce.datasets.voc_images import _load_rgb

    path = _png16(tmp_path / "a.png", 30000)
    assert np.all(_load_rgb(path) == round(30000 / 65535 * 255))
    img = load_tool("infer").load_image(path, 3)
    assert img.shape == (3, 12, 10) and torch.allclose(img, torch.full_like(img, 30000 / 65535))
    assert torch.allclose(load_tool("infer").load_image(path, 1), torch.full((1, 12, 10), 30000 / 65535))


def _edit_xml(path: Path, old: str, new: str, count: int = 1) -> None:
    text = path.read_text()
    assert old in text, (old, text)
    path.write_text(text.replace(old, new, count))


def test_voc_boxes_are_cross_checked(tmp_path):
    """9. <size> unlike the image, nan coordinates and boxes outside the image are errors naming the file and
    object; a box partly outside is clipped with a warning naming them."""
    from pce.datasets.demo_voc import DEMO_CLASSES
    from pce.datasets.voc import VOCDetection

    voc = demo_voc(tmp_path)
    ds = VOCDetection(tmp_path, year="2007", image_set="train", classes=DEMO_CLASSES)
    xml = [ds.annotation_path(i) for i in range(3)]
    _edit_xml(xml[0], "<width>32</width>", "<width>64</width>")
    with pytest.raises(ValueError, match=re.escape(f"{xml[0]}: <size> is 64x32 (WxH) but")):
        ds[0]
    _edit_xml(xml[1], "<xmin>", "<xmin>nan", 1)
    text = xml[1].read_text()
    xml[1].write_text(re.sub(r"<xmin>nan\d+", "<xmin>nan", text, count=1))
    with pytest.raises(ValueError, match=re.escape(f"{xml[1]}: object 0") + ".*non-finite"):
        ds[1]
    text = xml[2].read_text()
    xml[2].write_text(re.sub(r"<xmax>\d+</xmax>", "<xmax>40</xmax>", text, count=1))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        ds[2]
    assert any(f"{xml[2]}: object 0" in str(x.message) and "clipped" in str(x.message) for x in w)
    text = xml[2].read_text()
    text = re.sub(r"<xmin>\d+</xmin>", "<xmin>35</xmin>", text, count=1)
    xml[2].write_text(text)
    with pytest.raises(ValueError, match=re.escape(f"{xml[2]}: object 0") + ".*lies outside"):
        ds[2]


def test_cifar_pickle_cannot_run_code(tmp_path):
    """14. A batches.meta whose __reduce__ calls a function is refused before the call."""
    from pce.datasets.cifar import CIFAR10

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": Evil()}, protocol=2))
    with pytest.raises(ValueError, match=r"batches\.meta.*refused global (posix|os|nt)\.mkdir"):
        CIFAR10(tmp_path, split="test")
    assert not marker.exists()
    # the official format still loads (numpy arrays, bytes keys; pickle protocols 2 and 5)
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": [f"c{i}".encode() for i in range(10)]},
                                                        protocol=2))
    data = np.random.default_rng(0).integers(0, 256, (4, 3072), dtype=np.uint8)
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": data, b"labels": [0, 1, 2, 3]}, protocol=5))
    ds = CIFAR10(tmp_path, split="test")
    assert len(ds) == 4 and ds.classes[3] == "c3"


def _classifier_checkpoint(tmp_path: Path):
    cfg = tiny_cfg(tmp_path / "wd")
    cfg_path = tmp_path / "cfg.py"
    from pce.engine import dump_config

    dump_config(cfg, cfg_path)
    model = get_task("classification").build_model(cfg)
    atomic_save({"model": model.state_dict(), "epoch": 1}, tmp_path / "w.pth")
    return cfg_path, tmp_path / "w.pth"


def test_infer_input_size_limits(tmp_path, capsys):
    """15. An image over data.max_input_size is refused with a clear message; classification images are
    resized to model.input_shape; a 1x1 image for segmentation is refused by the minimum size."""
    cfg_path, ckpt = _classifier_checkpoint(tmp_path)
    Image.fromarray(np.zeros((300, 200), np.uint8)).save(tmp_path / "big.png")
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(tmp_path / "ok.png")
    infer = load_tool("infer")
    rc = infer.main([str(cfg_path), "--checkpoint", str(ckpt), str(tmp_path / "big.png"), str(tmp_path / "ok.png"),
                     "--out", str(tmp_path / "out"), "--cfg-options", "data.max_input_size=256"])
    assert rc == 0
    err = capsys.readouterr().err
    assert f"error: {tmp_path / 'big.png'}: 200x300 pixels is larger than data.max_input_size=256" in err
    preds = json.loads((tmp_path / "out/predictions.json").read_text())
    assert list(preds) == [str(tmp_path / "ok.png")]
    # segmentation: the minimum side is the model's deepest stride
    seg_cfg = REPO / "configs/demo_seg_pce.py"
    from pce.engine import load_config

    model = get_task("segmentation").build_model(load_config(seg_cfg))
    atomic_save({"model": model.state_dict(), "epoch": 1}, tmp_path / "seg.pth")
    Image.fromarray(np.zeros((1, 1, 3), np.uint8)).save(tmp_path / "tiny.png")
    rc = infer.main([str(seg_cfg), "--checkpoint", str(tmp_path / "seg.pth"), str(tmp_path / "tiny.png"),
                     "--out", str(tmp_path / "seg")])
    assert rc == 1
    err = capsys.readouterr().err
    assert f"error: {tmp_path / 'tiny.png'}: 1x1 pixels is smaller than the model's minimum side 32" in err


def test_errors_are_one_line_naming_the_culprit(tmp_path, capsys):
    """16. A typo in data.train.kwargs, a malformed XML inside a DataLoader worker and a broken first sample:
    one line naming the key or file, exit status 1; --debug shows the traceback."""
    train = load_tool("train")
    args = ["configs/demo_cls_digits.py", *cli_options(tmp_path / "wd"), "data.train.kwargs.sise=8"]
    assert train.main(args) == 1
    line = error_line(capsys.readouterr().err)
    assert line.startswith("error: data.train.kwargs.sise: not an argument of dataset 'digits'; did you mean 'size'")
    assert train.main(args + ["--debug"]) == 1
    assert "Traceback" in capsys.readouterr().err

    from pce.datasets.demo_voc import DEMO_CLASSES
    from pce.datasets.voc import VOCDetection

    voc = demo_voc(tmp_path / "data", num_train=4)
    ds = VOCDetection(tmp_path / "data", year="2007", image_set="train", classes=DEMO_CLASSES)
    common = ["configs/demo_det_pce.py", "--work-dir", str(tmp_path / "det"), "--cfg-options",
              f"data.root={str(tmp_path / 'data')!r}", "data.train.kwargs.demo=False", "data.val.kwargs.demo=False",
              f"data.train.kwargs.classes={list(DEMO_CLASSES)!r}", f"data.val.kwargs.classes={list(DEMO_CLASSES)!r}",
              "data.batch_size=2", "schedule.epochs=1", "schedule.iters_per_epoch=1", "runtime.progress_bar=False",
              "runtime.tensorboard=False", "phases=[]"]
    ds.annotation_path(1).write_text("<annotation><object><name>circle</name>")  # truncated XML, 2nd sample
    assert train.main(common + ["data.num_workers=1"]) == 1
    line = error_line(capsys.readouterr().err)
    assert line.startswith(f"error: Malformed VOC annotation XML {ds.annotation_path(1)}")
    ds.annotation_path(0).write_bytes(b"<annotation>\xff\xfe</annotation>")  # non-UTF-8, first sample
    assert train.main(common + ["data.num_workers=0"]) == 1
    line = error_line(capsys.readouterr().err)
    assert line.startswith("error: data.train (voc_detection) sample 0: ") and str(ds.annotation_path(0)) in line
    assert not list((tmp_path / "det").glob("*.pth"))


def test_infer_skips_unreadable_files(tmp_path, capsys):
    """17. tools/infer.py reports and skips unreadable files and writes predictions.json for the rest."""
    cfg_path, ckpt = _classifier_checkpoint(tmp_path)
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(folder / "a_good.png")
    (folder / "b_empty.jpg").write_bytes(b"")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(folder / "c_trunc.png")
    data = (folder / "c_trunc.png").read_bytes()
    (folder / "c_trunc.png").write_bytes(data[: len(data) // 2])
    _png16(folder / "d_16bit.png", 1000, (16, 16))
    rc = load_tool("infer").main([str(cfg_path), "--checkpoint", str(ckpt), str(folder), "--out",
                                  str(tmp_path / "out")])
    assert rc == 0
    err = capsys.readouterr().err
    assert f"error: {folder / 'b_empty.jpg'}: not a readable image" in err
    assert f"error: {folder / 'c_trunc.png'}: not a readable image" in err
    preds = json.loads((tmp_path / "out/predictions.json").read_text())
    assert sorted(preds) == [str(folder / "a_good.png"), str(folder / "d_16bit.png")]
    skipped = json.loads((tmp_path / "out/skipped.json").read_text())
    assert sorted(skipped) == [str(folder / "b_empty.jpg"), str(folder / "c_trunc.png")]
