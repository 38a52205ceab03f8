"""VOC detection/segmentation readers, transforms and collate functions on hand-written VOC files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pce.datasets.collate import SegmentationCollate, detection_collate, segmentation_collate
from pce.datasets.registry import DATASETS, TRANSFORMS
from pce.datasets.voc import VOCDetection, VOCSegmentation
from pce.datasets.voc_format import VOC_CLASSES, VOC_PALETTE, parse_voc_xml
from pce.datasets.voc_transforms import DetectionTransform, SegmentationTransform


# ----------------------------------------------------------------------------------------------
# helpers writing VOC files by hand
# ----------------------------------------------------------------------------------------------
def obj_xml(name, box, difficult=0, truncated=0):
    x1, y1, x2, y2 = box
    return (f"<object><name>{name}</name><pose>Left</pose><truncated>{truncated}</truncated>"
            f"<difficult>{difficult}</difficult><bndbox><xmin>{x1}</xmin><ymin>{y1}</ymin>"
            f"<xmax>{x2}</xmax><ymax>{y2}</ymax></bndbox></object>")


def ann_xml(image_id, w, h, objects):
    return (f"<annotation><folder>VOC</folder><filename>{image_id}.jpg</filename>"
            f"<size><width>{w}</width><height>{h}</height><depth>3</depth></size><segmented>0</segmented>"
            + "".join(obj_xml(*o) for o in objects) + "</annotation>")


def write_image(path, w, h, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, quality=95)


def write_mask(path, arr, mode="P"):
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(arr.astype(np.uint8))
    if mode == "P":
        im.putpalette(VOC_PALETTE)
    elif mode == "RGB":
        im = im.convert("P")
        im.putpalette(VOC_PALETTE)
        im = im.convert("RGB")
    im.save(path)


def write_voc(root, year, items, split="trainval", split_dir="Main"):
    """items: {id: (w, h, [(name, (x1, y1, x2, y2), difficult, truncated), ...])}."""
    voc = root / "VOCdevkit" / f"VOC{year}"
    (voc / "Annotations").mkdir(parents=True, exist_ok=True)
    for i, (iid, (w, h, objs)) in enumerate(items.items()):
        (voc / "Annotations" / f"{iid}.xml").write_text(ann_xml(iid, w, h, objs))
        write_image(voc / "JPEGImages" / f"{iid}.jpg", w, h, seed=i)
    sd = voc / "ImageSets" / split_dir
    sd.mkdir(parents=True, exist_ok=True)
    (sd / f"{split}.txt").write_text("".join(f"{i}\n" for i in items))
    return voc


ITEMS_07 = {
    "000001": (40, 30, [("dog", (1, 1, 10, 20), 0, 0), ("person", (5, 6, 40, 30), 1, 0),
                        ("cat", (20, 3, 35, 12), 0, 1)]),
    "000002": (32, 24, []),
    "000003": (24, 36, [("tvmonitor", (2, 2, 24, 36), 0, 0)]),
}
ITEMS_12 = {
    "2008_000001": (28, 20, [("aeroplane", (3, 4, 20, 18), 0, 0)]),
    "2008_000002": (20, 28, [("bicycle", (1, 1, 5, 5), 1, 1), ("bird", (6, 7, 19, 27), 0, 0)]),
}


@pytest.fixture()
def voc_root(tmp_path):
    write_voc(tmp_path, "2007", ITEMS_07)
    write_voc(tmp_path, "2012", ITEMS_12)
    return tmp_path


# ----------------------------------------------------------------------------------------------
# basics
# ----------------------------------------------------------------------------------------------
def test_palette_and_classes():
    assert len(VOC_CLASSES) == 20 and VOC_CLASSES[0] == "aeroplane" and VOC_CLASSES[-1] == "tvmonitor"
    assert VOC_CLASSES.index("person") == 14
    assert len(VOC_PALETTE) == 768
    pal = np.array(VOC_PALETTE).reshape(256, 3)
    assert pal[0].tolist() == [0, 0, 0]
    assert pal[1].tolist() == [128, 0, 0]
    assert pal[15].tolist() == [192, 128, 128]
    assert pal[255].tolist() == [224, 224, 192]
    assert DATASETS.get("voc_detection") is VOCDetection
    assert DATASETS.get("voc_segmentation") is VOCSegmentation
    assert TRANSFORMS.get("voc_detection") is DetectionTransform
    assert TRANSFORMS.get("voc_segmentation") is SegmentationTransform


def test_parse_voc_xml(voc_root):
    a = parse_voc_xml(voc_root / "VOCdevkit/VOC2007/Annotations/000001.xml", VOC_CLASSES)
    assert a["filename"] == "000001.jpg" and a["size"] == (30, 40, 3)
    names = [o["name"] for o in a["objects"]]
    assert names == ["dog", "person", "cat"]
    assert [o["difficult"] for o in a["objects"]] == [False, True, False]
    assert [o["truncated"] for o in a["objects"]] == [False, False, True]
    assert a["objects"][0]["bndbox"] == (1.0, 1.0, 10.0, 20.0)
    assert a["objects"][0]["label"] == VOC_CLASSES.index("dog") + 1


def test_detection_item_and_box_convention(voc_root):
    ds = VOCDetection(voc_root, year="2007", image_set="trainval")
    assert len(ds) == 3 and ds.ids == ["000001", "000002", "000003"] and ds.classes == VOC_CLASSES
    assert ds.num_classes == 21
    img, t = ds[0]
    assert img.dtype == torch.float32 and img.shape == (3, 30, 40)
    assert 0.0 <= img.min() and img.max() <= 1.0
    assert t["boxes"].dtype == torch.float32 and t["boxes"].shape == (3, 4)
    # VOC 1-based inclusive (1,1,10,20) -> 0-based continuous (0,0,10,20)
    torch.testing.assert_close(t["boxes"][0], torch.tensor([0.0, 0.0, 10.0, 20.0]))
    torch.testing.assert_close(t["boxes"][1], torch.tensor([4.0, 5.0, 40.0, 30.0]))  # full width/height
    assert t["labels"].dtype == torch.int64
    assert t["labels"].tolist() == [VOC_CLASSES.index(n) + 1 for n in ("dog", "person", "cat")]
    assert t["difficult"].dtype == torch.bool and t["difficult"].tolist() == [False, True, False]
    assert t["image_id"] == 0
    assert t["orig_size"].dtype == torch.int64 and t["orig_size"].tolist() == [30, 40]
    # image with no objects
    img, t = ds[1]
    assert img.shape == (3, 24, 32)
    assert t["boxes"].shape == (0, 4) and t["boxes"].dtype == torch.float32
    assert t["labels"].shape == (0,) and t["labels"].dtype == torch.int64
    assert t["difficult"].shape == (0,)


def test_keep_difficult_false_and_get_annotation(voc_root):
    ds = VOCDetection(voc_root, year="2007", keep_difficult=False)
    _, t = ds[0]
    assert t["labels"].tolist() == [VOC_CLASSES.index("dog") + 1, VOC_CLASSES.index("cat") + 1]
    assert not t["difficult"].any() and t["boxes"].shape == (2, 4)
    # get_annotation keeps every object and does not need the image
    (voc_root / "VOCdevkit/VOC2007/JPEGImages/000001.jpg").unlink()
    ann = ds.get_annotation(0)
    assert ann["names"] == ["dog", "person", "cat"]
    assert ann["difficult"].tolist() == [False, True, False]
    assert ann["truncated"].tolist() == [False, False, True]
    np.testing.assert_allclose(ann["boxes"][1], [4, 5, 40, 30])
    assert ann["size"] == (30, 40) and ann["id"] == "000001" and ann["year"] == "2007"


def test_custom_classes(tmp_path):
    write_voc(tmp_path, "2007", {"a": (20, 20, [("dog", (1, 2, 10, 10), 0, 0), ("cat", (3, 3, 8, 9), 0, 0)])})
    ds = VOCDetection(tmp_path, year="2007", classes=("cat", "dog"))
    _, t = ds[0]
    assert t["labels"].tolist() == [2, 1] and ds.num_classes == 3


def test_concat_07_12(voc_root):
    ds = VOCDetection(voc_root, year=("2007", "2012"), image_set="trainval")
    assert len(ds) == 5
    assert ds.ids[3:] == ["2008_000001", "2008_000002"] and ds.years == ["2007"] * 3 + ["2012"] * 2
    img, t = ds[4]
    assert img.shape == (3, 28, 20) and t["image_id"] == 4
    assert t["labels"].tolist() == [VOC_CLASSES.index("bicycle") + 1, VOC_CLASSES.index("bird") + 1]
    torch.testing.assert_close(t["boxes"][1], torch.tensor([5.0, 6.0, 19.0, 27.0]))
    # per-year split names, and explicit (year, image_set) pairs; VOCdevkit itself as root
    (voc_root / "VOCdevkit/VOC2012/ImageSets/Main/val.txt").write_text("2008_000002\n")
    ds2 = VOCDetection(voc_root, year=["2007", "2012"], image_set=["trainval", "val"])
    assert len(ds2) == 4 and ds2.ids[-1] == "2008_000002"
    ds3 = VOCDetection(voc_root / "VOCdevkit", year=[("2007", "trainval"), ("2012", "val")])
    assert ds3.ids == ds2.ids
    with pytest.raises(ValueError):
        VOCDetection(voc_root, year=["2007", "2012"], image_set=["trainval"])


# ----------------------------------------------------------------------------------------------
# error messages name the file
# ----------------------------------------------------------------------------------------------
def test_malformed_xml(voc_root):
    p = voc_root / "VOCdevkit/VOC2007/Annotations/000001.xml"
    p.write_text("<annotation><object><name>dog</name>")
    ds = VOCDetection(voc_root)
    with pytest.raises(ValueError, match="000001.xml"):
        ds[0]


def test_missing_bndbox(voc_root):
    p = voc_root / "VOCdevkit/VOC2007/Annotations/000003.xml"
    p.write_text("<annotation><filename>x.jpg</filename><object><name>dog</name></object></annotation>")
    with pytest.raises(ValueError, match=r"000003\.xml.*bndbox"):
        VOCDetection(voc_root)[2]


def test_unknown_class(voc_root):
    with pytest.raises(ValueError, match=r"'person'.*000001\.xml"):
        VOCDetection(voc_root, classes=("cat", "dog"))[0]


def test_missing_image(voc_root):
    (voc_root / "VOCdevkit/VOC2007/JPEGImages/000003.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="000003.jpg"):
        VOCDetection(voc_root)[2]


def test_missing_split_and_root(voc_root):
    with pytest.raises(FileNotFoundError, match=r"Main[/\\]test\.txt"):
        VOCDetection(voc_root, image_set="test")
    with pytest.raises(FileNotFoundError, match="VOC2010"):
        VOCDetection(voc_root, year="2010")
    with pytest.raises(FileNotFoundError, match=r"Segmentation[/\\]train\.txt"):
        VOCSegmentation(voc_root, year="2007")


# ----------------------------------------------------------------------------------------------
# segmentation
# ----------------------------------------------------------------------------------------------
def make_seg_root(tmp_path, masks, sizes=None, use_aug=False):
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    for i, (iid, (arr, mode)) in enumerate(masks.items()):
        h, w = sizes[iid] if sizes and iid in sizes else arr.shape
        write_image(voc / "JPEGImages" / f"{iid}.jpg", w, h, seed=i)
        write_mask(voc / ("SegmentationClassAug" if use_aug else "SegmentationClass") / f"{iid}.png", arr, mode)
    sd = voc / "ImageSets" / "Segmentation"
    sd.mkdir(parents=True, exist_ok=True)
    (sd / ("aug.txt" if use_aug else "train.txt")).write_text("".join(f"{i}\n" for i in masks))
    return tmp_path


def _mask(h=12, w=16):
    m = np.zeros((h, w), np.uint8)
    m[2:8, 3:9] = 15
    m[2:8, 2] = 255
    m[9:, 10:] = 20
    return m


def test_segmentation_item(tmp_path):
    m = _mask()
    root = make_seg_root(tmp_path, {"a": (m, "P"), "b": (m, "L")})
    ds = VOCSegmentation(root, year="2012", image_set="train")
    assert len(ds) == 2 and ds.num_classes == 21
    for i in range(2):
        img, mask = ds[i]
        assert img.shape == (3, 12, 16) and img.dtype == torch.float32
        assert mask.shape == (12, 16) and mask.dtype == torch.int64
        assert torch.equal(mask, torch.from_numpy(m.astype(np.int64)))
    assert Image.open(ds.mask_path(0)).mode == "P"


def test_segmentation_use_aug(tmp_path):
    m = _mask()
    root = make_seg_root(tmp_path, {"a": (m, "P")}, use_aug=True)
    ds = VOCSegmentation(root, image_set="train", use_aug=True)
    assert ds.split_file.name == "aug.txt" and ds.mask_path(0).parent.name == "SegmentationClassAug"
    assert torch.equal(ds[0][1], torch.from_numpy(m.astype(np.int64)))
    (root / "VOCdevkit/VOC2012/ImageSets/Segmentation/train.txt").write_text("a\n")
    with pytest.raises(FileNotFoundError, match=r"SegmentationClass[/\\]a\.png"):
        VOCSegmentation(root, image_set="train")[0]


def test_segmentation_rgb_mask_error(tmp_path):
    root = make_seg_root(tmp_path, {"rgbmask": (_mask(), "RGB")})
    with pytest.raises(ValueError, match=r"rgbmask\.png.*palette"):
        VOCSegmentation(root)[0]


def test_segmentation_value_out_of_range(tmp_path):
    m = _mask()
    m[0, 0] = 77
    root = make_seg_root(tmp_path, {"badval": (m, "P")})
    with pytest.raises(ValueError, match=r"badval\.png.*77"):
        VOCSegmentation(root)[0]
    # a custom 2-class list makes 15 and 20 invalid as well
    m2 = _mask()
    root2 = make_seg_root(tmp_path / "r2", {"few": (m2, "P")})
    with pytest.raises(ValueError, match=r"few\.png"):
        VOCSegmentation(root2, classes=("cat", "dog"))[0]


def test_segmentation_size_mismatch(tmp_path):
    root = make_seg_root(tmp_path, {"mism": (_mask(), "P")}, sizes={"mism": (13, 16)})
    with pytest.raises(ValueError, match=r"mism\.jpg.*mism\.png"):
        VOCSegmentation(root)[0]


# ----------------------------------------------------------------------------------------------
# transforms
# ----------------------------------------------------------------------------------------------
def _det_sample(h=40, w=60):
    img = torch.rand(3, h, w)
    t = {
        "boxes": torch.tensor([[2.0, 3.0, 20.0, 30.0], [30.0, 5.0, 59.0, 39.0], [10.0, 10.0, 50.0, 20.0]]),
        "labels": torch.tensor([5, 9, 13]),
        "difficult": torch.tensor([False, True, False]),
        "image_id": 7,
        "orig_size": torch.tensor([h, w]),
    }
    return img, t


def test_detection_hflip_exact():
    img, t = _det_sample()
    tr = DetectionTransform(train=True, min_size=None, max_size=None, hflip=1.0, scale_range=(1.0, 1.0),
                            color_jitter=None, seed=0)
    out_img, out = tr(img, t)
    w = 60
    b = t["boxes"]
    expected = torch.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], dim=1)
    torch.testing.assert_close(out["boxes"], expected, atol=1e-3, rtol=0)
    assert torch.equal(out["labels"], t["labels"]) and out["labels"].dtype == torch.int64
    assert torch.equal(out["difficult"], t["difficult"])
    q = (img * 255).round() / 255
    torch.testing.assert_close(out_img, q.flip(-1), atol=1e-6, rtol=0)
    assert out["image_id"] == 7 and out["orig_size"].tolist() == [40, 60] and out["size"].tolist() == [40, 60]


def test_detection_resize_eval():
    img, t = _det_sample()
    tr = DetectionTransform(train=False, min_size=80, max_size=100)
    out_img, out = tr(img, t)
    # shorter side 40 -> 80 would give 160 > 100 on the long side, so scale = 100 / 60
    assert out_img.shape == (3, 67, 100)
    torch.testing.assert_close(out["boxes"][0], t["boxes"][0] * torch.tensor([100 / 60, 67 / 40, 100 / 60, 67 / 40]))
    tr2 = DetectionTransform(train=False, min_size=None, max_size=None, size_divisibility=32)
    out_img, out = tr2(img, t)
    assert out_img.shape == (3, 64, 64) and torch.equal(out["boxes"], t["boxes"])
    assert out_img[:, 40:, :].abs().sum() == 0 and out_img[:, :, 60:].abs().sum() == 0


def test_detection_scale_crop_keeps_alignment():
    pairs = {(5, False), (9, True), (13, False)}
    tr = DetectionTransform(train=True, min_size=40, max_size=200, hflip=0.5, scale_range=(0.7, 2.0),
                            color_jitter=0.3, black_patches=3, channel_shift=10, seed=1)
    n_dropped = 0
    for _ in range(40):
        img, t = _det_sample()
        out_img, out = tr(img, t)
        h, w = out_img.shape[-2:]
        assert out["size"].tolist() == [h, w]
        b = out["boxes"]
        assert b.dtype == torch.float32 and b.ndim == 2 and b.shape[1] == 4
        assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all() and (b[:, 2] <= w).all() and (b[:, 3] <= h).all()
        assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()
        assert out["labels"].dtype == torch.int64 and out["difficult"].dtype == torch.bool
        assert len(out["labels"]) == len(out["difficult"]) == len(b)
        assert {(int(lab), bool(d)) for lab, d in zip(out["labels"], out["difficult"])} <= pairs
        n_dropped += 3 - len(b)
        assert 0.0 <= out_img.min() and out_img.max() <= 1.0
    assert n_dropped > 0  # strong up-scaling + crop drops some boxes


def test_detection_transform_empty_and_dataset(voc_root):
    tr = DetectionTransform(train=True, min_size=32, max_size=64, seed=0)
    ds = VOCDetection(voc_root, transforms=tr)
    img, t = ds[1]
    assert t["boxes"].shape == (0, 4) and t["labels"].dtype == torch.int64
    img, t = ds[0]
    assert img.shape[0] == 3 and t["labels"].dtype == torch.int64
    imgs, targets = detection_collate([ds[0], ds[1], ds[2]])
    assert isinstance(imgs, list) and len(imgs) == 3 and len(targets) == 3 and targets[2]["image_id"] == 2


def test_segmentation_transform_pad_and_crop():
    img = torch.rand(3, 20, 30)
    mask = torch.randint(0, 21, (20, 30))
    tr = SegmentationTransform(train=True, crop_size=(32, 40), scale_range=(1.0, 1.0), hflip=0.0,
                               mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), seed=0)
    out_img, out_mask = tr(img, mask)
    assert out_img.shape == (3, 32, 40) and out_mask.shape == (32, 40) and out_mask.dtype == torch.int64
    assert torch.equal(out_mask[:20, :30], mask) and (out_mask[20:] == 255).all() and (out_mask[:, 30:] == 255).all()
    assert out_img[:, 20:].abs().max() == 0 and out_img[:, :, 30:].abs().max() == 0
    torch.testing.assert_close(out_img[:, :20, :30], (img * 255).round() / 255, atol=1e-5, rtol=0)
    # random scale + crop: always crop_size, mask values stay in the original set or 255
    tr = SegmentationTransform(train=True, crop_size=24, scale_range=(0.5, 2.0), color_jitter=0.2, seed=0)
    for _ in range(10):
        a, m = tr(img, mask)
        assert a.shape == (3, 24, 24) and m.shape == (24, 24)
        assert set(m.unique().tolist()) <= set(mask.unique().tolist()) | {255}


def test_segmentation_transform_eval_normalises():
    img = torch.rand(3, 10, 14)
    mask = torch.randint(0, 21, (10, 14))
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    out_img, out_mask = SegmentationTransform(train=False, mean=mean, std=std)(img, mask)
    q = (img * 255).round() / 255
    exp = (q - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    torch.testing.assert_close(out_img, exp, atol=1e-4, rtol=0)
    assert torch.equal(out_mask, mask)


def test_segmentation_collate():
    a = (torch.ones(3, 4, 5), torch.ones(4, 5, dtype=torch.int64))
    b = (torch.ones(3, 6, 3) * 2, torch.full((6, 3), 2, dtype=torch.int64))
    ims, ms = segmentation_collate([a, a])
    assert ims.shape == (2, 3, 4, 5) and ms.shape == (2, 4, 5)
    ims, ms = segmentation_collate([a, b])
    assert ims.shape == (2, 3, 6, 5) and ms.dtype == torch.int64
    assert (ims[0, :, 4:] == 0).all() and (ms[0, 4:] == 255).all() and (ms[1, :, 3:] == 255).all()
    assert (ims[1, :, :6, :3] == 2).all()
    ims, ms = SegmentationCollate(size_divisibility=8)([a, b])
    assert ims.shape == (2, 3, 8, 8) and (ms[:, 6:] == 255).all()


class _SameItemDataset(torch.utils.data.Dataset):
    """Every item is the same image; the output records the random scale the transform chose."""

    def __init__(self):
        self.tr = DetectionTransform(train=True, min_size=None, max_size=None, scale_range=(0.3, 1.0),
                                     color_jitter=None, seed=0)

    def __len__(self):
        return 8

    def __getitem__(self, i):
        img = torch.rand(3, 50, 50)
        t = {"boxes": torch.tensor([[0.0, 0.0, 4.0, 4.0]]), "labels": torch.tensor([1]),
             "difficult": torch.tensor([False])}
        out_img, _ = self.tr(img, t)
        return torch.tensor(out_img.shape[-2:])


def test_transform_workers_get_different_randomness():
    """Forked DataLoader workers must not replay the same augmentation stream."""
    torch.manual_seed(0)
    batches = list(torch.utils.data.DataLoader(_SameItemDataset(), batch_size=4, num_workers=2))
    # worker 0 produced batch 0 and worker 1 batch 1; identical streams would give identical sizes
    assert len(batches) == 2 and not torch.equal(batches[0], batches[1])
