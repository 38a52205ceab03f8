"""Classification dataset adapters and transforms, on tiny real-format files written to tmp_path."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pce.datasets import (
    CIFAR10,
    CIFAR100,
    DATASETS,
    MNIST,
    TRANSFORMS,
    ClassificationTransform,
    Digits,
    FashionMNIST,
    RaiseOneChannel,
    Registry,
    TinyImageNet,
    build_dataset,
    build_transform,
    read_idx,
)

# --------------------------------------------------------------------------------------------- helpers

IDX_CODES = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C, np.float32: 0x0D, np.float64: 0x0E}


def idx_bytes(arr: np.ndarray, code: int | None = None) -> bytes:
    code = IDX_CODES[arr.dtype.type] if code is None else code
    header = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()


def write_idx(path: Path, arr: np.ndarray, gz: bool = False) -> Path:
    data = idx_bytes(arr)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def write_mnist(folder: Path, n_train: int = 5, n_test: int = 3, gz_train: bool = True, seed: int = 0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, prefix, n, gz in (("train", "train", n_train, gz_train), ("test", "t10k", n_test, not gz_train)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        sfx = ".gz" if gz else ""
        write_idx(folder / f"{prefix}-images-idx3-ubyte{sfx}", images, gz)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{sfx}", labels, gz)
        out[split] = (images, labels)
    return out


def write_cifar10(folder: Path, per_batch: int = 2, n_test: int = 3):
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": names, b"num_cases_per_batch": per_batch, b"num_vis": 3072}, f)
    batches = {}
    for fname, n in [(f"data_batch_{i}", per_batch) for i in range(1, 6)] + [("test_batch", n_test)]:
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=n)]
        with open(folder / fname, "wb") as f:
            pickle.dump({b"batch_label": fname.encode(), b"labels": labels, b"data": data,
                         b"filenames": [b"x.png"] * n}, f)
        batches[fname] = (data, labels)
    return batches


def write_cifar100(folder: Path):
    rng = np.random.default_rng(2)
    folder.mkdir(parents=True)
    with open(folder / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
                     b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)]}, f)
    out = {}
    for split, n in (("train", 4), ("test", 2)):
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        fine = [int(v) for v in rng.integers(0, 100, size=n)]
        coarse = [int(v) for v in rng.integers(0, 20, size=n)]
        with open(folder / split, "wb") as f:
            pickle.dump({b"filenames": [b"x.png"] * n, b"batch_label": b"x", b"fine_labels": fine,
                         b"coarse_labels": coarse, b"data": data}, f)
        out[split] = (data, fine, coarse)
    return out


WNIDS = ["n01443537", "n01629819"]


def write_tiny_imagenet(root: Path) -> Path:
    rng = np.random.default_rng(3)
    root.mkdir(parents=True)
    (root / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    (root / "words.txt").write_text("n01443537\tgoldfish, Carassius auratus\nn01629819\tEuropean fire salamander\n"
                                    "n99999999\tunused\n")
    for wnid in WNIDS:
        d = root / "train" / wnid / "images"
        d.mkdir(parents=True)
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
        for i in range(3):
            arr = rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
            Image.fromarray(arr).save(d / f"{wnid}_{i}.JPEG", quality=95)
    # one grayscale JPEG in the first class
    Image.fromarray(rng.integers(0, 256, size=(64, 64), dtype=np.uint8), mode="L").save(
        root / "train" / WNIDS[0] / "images" / f"{WNIDS[0]}_gray.JPEG")
    (root / "val" / "images").mkdir(parents=True)
    lines = []
    for i, wnid in enumerate([WNIDS[1], WNIDS[0], WNIDS[1]]):
        Image.fromarray(rng.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)).save(root / "val" / "images" / f"val_{i}.JPEG")
        lines.append(f"val_{i}.JPEG\t{wnid}\t0\t1\t40\t50")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return root


# --------------------------------------------------------------------------------------------- registry

def test_registry_basics():
    reg = Registry("thing")

    @reg.register("a")
    def make_a(x=1):
        return ("a", x)

    reg.register("b", dict)
    assert "a" in reg and "b" in reg and "c" not in reg
    assert reg.names() == ["a", "b"] and len(reg) == 2
    assert reg.get("a") is make_a and reg.build("a", x=3) == ("a", 3)
    with pytest.raises(KeyError, match="known thing names: a, b"):
        reg.get("c")
    with pytest.raises(ValueError, match="already taken"):
        reg.register("a", list)


def test_everything_registered():
    for name in ("mnist", "fashion_mnist", "cifar10", "cifar100", "tiny_imagenet", "digits"):
        assert name in DATASETS
    assert DATASETS.get("cifar10") is CIFAR10 and DATASETS.get("digits") is Digits
    assert TRANSFORMS.get("classification") is ClassificationTransform
    ds = build_dataset("digits", split="test", size=8)
    assert isinstance(ds, Digits) and ds[0][0].shape == (1, 8, 8)
    assert isinstance(build_transform("classification", train=False), ClassificationTransform)
    with pytest.raises(KeyError, match="cifar10"):
        build_dataset("nope")


# --------------------------------------------------------------------------------------------- IDX

@pytest.mark.parametrize("dtype", list(IDX_CODES))
@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_roundtrip_all_dtypes(tmp_path, dtype, gz):
    rng = np.random.default_rng(0)
    arr = (rng.standard_normal((3, 4, 5)) * 100).astype(dtype) if np.dtype(dtype).kind == "f" else \
        rng.integers(np.iinfo(dtype).min, np.iinfo(dtype).max, size=(3, 4, 5), dtype=dtype)
    out = read_idx(write_idx(tmp_path / "a.idx", arr, gz))
    assert out.dtype == np.dtype(dtype) and out.dtype.isnative and out.shape == (3, 4, 5)
    np.testing.assert_array_equal(out, arr)


def test_read_idx_gzip_detected_by_magic_not_extension(tmp_path):
    arr = np.arange(12, dtype=np.uint8).reshape(3, 4)
    (tmp_path / "gz_without_suffix").write_bytes(gzip.compress(idx_bytes(arr)))
    (tmp_path / "raw_with_suffix.gz").write_bytes(idx_bytes(arr))
    np.testing.assert_array_equal(read_idx(tmp_path / "gz_without_suffix"), arr)
    np.testing.assert_array_equal(read_idx(tmp_path / "raw_with_suffix.gz"), arr)
    assert read_idx(write_idx(tmp_path / "v", np.arange(7, dtype=np.int32))).shape == (7,)


def test_read_idx_errors_name_the_file(tmp_path):
    good = idx_bytes(np.zeros((2, 28, 28), np.uint8))
    cases = {
        "truncated": (good[:-10], "truncated"),
        "trailing": (good + b"\0", "trailing"),
        "badmagic": (b"\x08\x03" + good[2:], "bad IDX magic"),
        "badcode": (good[:2] + b"\x07" + good[3:], "unknown IDX dtype code 0x07"),
        "shortheader": (good[:9], "truncated IDX header"),
        "tiny": (b"\0\0", "too short"),
    }
    for name, (data, msg) in cases.items():
        p = tmp_path / name
        p.write_bytes(data)
        with pytest.raises(ValueError, match=msg) as e:
            read_idx(p)
        assert str(p) in str(e.value)
    p = tmp_path / "truncated.gz"
    p.write_bytes(gzip.compress(good)[:-20])
    with pytest.raises(ValueError, match="gzip") as e:
        read_idx(p)
    assert str(p) in str(e.value)
    (tmp_path / "t.gz").write_bytes(gzip.compress(good[:-1]))  # truncated data inside a valid gzip stream
    with pytest.raises(ValueError, match="truncated") as e:
        read_idx(tmp_path / "t.gz")
    assert str(tmp_path / "t.gz") in str(e.value)
    with pytest.raises(FileNotFoundError, match="missing.idx"):
        read_idx(tmp_path / "missing.idx")


# --------------------------------------------------------------------------------------------- MNIST

def test_mnist_reads_gz_and_raw(tmp_path):
    written = write_mnist(tmp_path, n_train=5, n_test=3, gz_train=True)
    for split, n in (("train", 5), ("test", 3)):
        ds = MNIST(tmp_path, split=split)
        images, labels = written[split]
        assert len(ds) == n and ds.classes == [str(i) for i in range(10)]
        assert ds.targets.dtype == np.int64
        np.testing.assert_array_equal(ds.targets, labels)
        for i in range(n):
            x, y = ds[i]
            assert x.shape == (1, 28, 28) and x.dtype == torch.float32
            assert isinstance(y, int) and y == labels[i]
            torch.testing.assert_close(x[0], torch.from_numpy(images[i].astype(np.float32) / 255), rtol=0, atol=0)
            assert 0.0 <= x.min() and x.max() <= 1.0
    assert MNIST(tmp_path, "train").image_file.name.endswith(".gz")
    assert MNIST(tmp_path, "test").image_file.name == "t10k-images-idx3-ubyte"


def test_fashion_mnist_torchvision_layout_and_transforms(tmp_path):
    written = write_mnist(tmp_path / "FashionMNIST" / "raw", n_train=4, n_test=2)
    ds = FashionMNIST(tmp_path, split="test", transforms=lambda x: x * 2)
    assert len(ds) == 2 and ds.classes[0] == "T-shirt/top" and ds.classes[9] == "Ankle boot"
    x, y = ds[1]
    torch.testing.assert_close(x[0], torch.from_numpy(written["test"][0][1].astype(np.float32) / 255) * 2)
    assert y == written["test"][1][1]
    assert FashionMNIST.DEFAULT_ROOT == "/usr/share/datasets/fashion-mnist"
    with pytest.raises(FileNotFoundError):  # the MNIST/raw folder is not a FashionMNIST folder
        MNIST(tmp_path)


def test_mnist_errors(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        MNIST(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(e.value) and "train-images-idx3-ubyte" in str(e.value)
    write_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError) as e:
        MNIST(tmp_path, split="test")
    assert str(tmp_path / "t10k-labels-idx1-ubyte") in str(e.value)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(7, np.uint8))  # 3 images vs 7 labels
    with pytest.raises(ValueError, match="3 images .* 7 labels"):
        MNIST(tmp_path, split="test")
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.array([0, 1, 10], np.uint8))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 10\)"):
        MNIST(tmp_path, split="test")
    with pytest.raises(ValueError, match="split"):
        MNIST(tmp_path, split="val")
    with pytest.raises(ValueError, match="root is required"):
        MNIST()


REAL_FASHION = Path(FashionMNIST.DEFAULT_ROOT)


@pytest.mark.skipif(not REAL_FASHION.is_dir(), reason=f"{REAL_FASHION} not installed (Debian dataset-fashion-mnist)")
def test_real_fashion_mnist_test_split():
    ds = FashionMNIST(split="test")
    assert len(ds) == 10000 and len(ds.classes) == 10
    assert sorted(np.unique(ds.targets).tolist()) == list(range(10))
    x, y = ds[0]
    assert x.shape == (1, 28, 28) and 0 <= y < 10


# --------------------------------------------------------------------------------------------- CIFAR

def test_cifar10_both_root_forms(tmp_path):
    batches = write_cifar10(tmp_path / "cifar-10-batches-py")
    for root in (tmp_path, tmp_path / "cifar-10-batches-py"):
        train = CIFAR10(root, split="train")
        test = CIFAR10(root, split="test")
        assert len(train) == 10 and len(test) == 3
        assert train.classes[0] == "airplane" and len(train.classes) == 10
    data = np.concatenate([batches[f"data_batch_{i}"][0] for i in range(1, 6)])
    labels = sum((batches[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    np.testing.assert_array_equal(train.targets, labels)
    assert train.targets.dtype == np.int64
    for i in (0, 3, 9):
        x, y = train[i]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == labels[i]
        expected = data[i].reshape(3, 32, 32).astype(np.float32) / 255
        torch.testing.assert_close(x, torch.from_numpy(expected), rtol=0, atol=0)
    # channel-first layout: first 1024 bytes are the red plane, row-major
    assert train[0][0][0, 0, 1] == data[0][1] / 255 and train[0][0][1, 0, 0] == data[0][1024] / 255
    x, y = test[2]
    torch.testing.assert_close(x.flatten() * 255, torch.from_numpy(batches["test_batch"][0][2].astype(np.float32)))


def test_cifar100_fine_and_coarse(tmp_path):
    written = write_cifar100(tmp_path / "cifar-100-python")
    fine = CIFAR100(tmp_path, split="train")
    coarse = CIFAR100(tmp_path / "cifar-100-python", split="test", label="coarse")
    assert len(fine) == 4 and len(coarse) == 2
    assert len(fine.classes) == 100 and fine.classes[5] == "fine5"
    assert len(coarse.classes) == 20 and coarse.classes[3] == "coarse3"
    np.testing.assert_array_equal(fine.targets, written["train"][1])
    np.testing.assert_array_equal(coarse.targets, written["test"][2])
    x, y = coarse[1]
    assert x.shape == (3, 32, 32) and y == written["test"][2][1]
    torch.testing.assert_close(x.reshape(-1) * 255, torch.from_numpy(written["test"][0][1].astype(np.float32)))
    with pytest.raises(ValueError, match="label"):
        CIFAR100(tmp_path, label="medium")


def test_cifar_errors(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        CIFAR10(tmp_path)
    assert str(tmp_path / "cifar-10-batches-py") in str(e.value)
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar10(folder)
    (folder / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError) as e:
        CIFAR10(tmp_path, split="train")
    assert str(folder / "data_batch_3") in str(e.value)
    CIFAR10(tmp_path, split="test")  # test split still readable
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": [0, 1]}, f)
    with pytest.raises(ValueError, match="missing key b'labels'") as e:
        CIFAR10(tmp_path, split="test")
    assert str(folder / "test_batch") in str(e.value)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 1000), np.uint8), b"labels": [0, 1]}, f)
    with pytest.raises(ValueError, match=r"\[N, 3072\]"):
        CIFAR10(tmp_path, split="test")
    (folder / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="not a readable CIFAR pickle") as e:
        CIFAR10(tmp_path, split="test")
    assert str(folder / "test_batch") in str(e.value)


# --------------------------------------------------------------------------------------------- Tiny ImageNet

def test_tiny_imagenet_train_and_val(tmp_path):
    root = write_tiny_imagenet(tmp_path / "tiny-imagenet-200")
    train = TinyImageNet(root, split="train")
    val = TinyImageNet(root, split="val")
    assert train.wnids == WNIDS
    assert train.classes == ["goldfish, Carassius auratus", "European fire salamander"]
    assert len(train) == 7 and len(val) == 3
    np.testing.assert_array_equal(np.bincount(train.targets), [4, 3])
    np.testing.assert_array_equal(val.targets, [1, 0, 1])
    assert val.targets.dtype == np.int64
    for ds in (train, val):
        for i in range(len(ds)):
            x, y = ds[i]
            assert x.shape == (3, 64, 64) and x.dtype == torch.float32 and isinstance(y, int)
            path = ds.samples[i][0]
            with Image.open(path) as im:
                expected = np.asarray(im.convert("RGB"), dtype=np.float32) / 255
            torch.testing.assert_close(x, torch.from_numpy(expected).permute(2, 0, 1), rtol=0, atol=0)
    gray = [i for i, (p, _) in enumerate(train.samples) if p.name.endswith("_gray.JPEG")]
    assert len(gray) == 1
    x, y = train[gray[0]]
    assert y == 0 and torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
    (root / "words.txt").unlink()
    assert TinyImageNet(root, split="val").classes == WNIDS


def test_tiny_imagenet_errors(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        TinyImageNet(tmp_path)
    assert str(tmp_path / "wnids.txt") in str(e.value)
    root = write_tiny_imagenet(tmp_path / "t")
    ann = root / "val" / "val_annotations.txt"
    ann.write_text("val_0.JPEG\tn00000000\t0\t0\t1\t1\n")
    with pytest.raises(ValueError, match="n00000000") as e:
        TinyImageNet(root, split="val")
    assert str(ann) in str(e.value)
    ann.write_text(f"missing.JPEG\t{WNIDS[0]}\t0\t0\t1\t1\n")
    with pytest.raises(FileNotFoundError) as e:
        TinyImageNet(root, split="val")
    assert str(root / "val" / "images" / "missing.JPEG") in str(e.value)
    (root / "wnids.txt").write_text("\n".join(WNIDS + ["n07777777"]))
    with pytest.raises(FileNotFoundError) as e:
        TinyImageNet(root, split="train")
    assert str(root / "train" / "n07777777" / "images") in str(e.value)
    with pytest.raises(ValueError, match="split"):
        TinyImageNet(root, split="test")


# --------------------------------------------------------------------------------------------- Digits

def test_digits_split_sizes_stratified_deterministic():
    from sklearn.datasets import load_digits

    raw = load_digits()
    train, test = Digits("train"), Digits("test")
    assert len(train) + len(test) == 1797 and len(test) == 450
    assert set(train.indices).isdisjoint(test.indices)
    assert sorted(np.concatenate([train.indices, test.indices]).tolist()) == list(range(1797))
    overall = np.bincount(raw.target, minlength=10)
    np.testing.assert_allclose(np.bincount(test.targets, minlength=10), overall * 450 / 1797, atol=1)
    np.testing.assert_array_equal(train.targets, raw.target[train.indices])
    np.testing.assert_array_equal(Digits("test").indices, test.indices)
    assert not np.array_equal(Digits("test", seed=1).indices, test.indices)
    assert len(Digits("test", test_fraction=0.5)) == 899
    x, y = test[0]
    assert x.shape == (1, 16, 16) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert y == raw.target[test.indices[0]] and test.classes[y] == str(y)
    small = Digits("test", size=8)
    torch.testing.assert_close(small[0][0][0], torch.from_numpy(raw.images[test.indices[0]] / 16).float())
    expected = F.interpolate(small[0][0][None], size=(16, 16), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(x, expected)
    with pytest.raises(ValueError, match="test_fraction"):
        Digits(test_fraction=1.0)


# --------------------------------------------------------------------------------------------- transforms

def test_eval_transform_normalises_and_is_deterministic():
    x = torch.rand(3, 10, 12)
    mean, std = (0.5, 0.25, 0.1), (0.5, 0.25, 0.2)
    t = ClassificationTransform(train=False, mean=mean, std=std, hflip=True, pad_crop=4,
                                black_patches={"p": 1.0}, channel_shift={"p": 1.0})
    out = t(x)
    expected = (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    torch.testing.assert_close(out, expected)
    assert out[0, 0, 0] == pytest.approx((x[0, 0, 0].item() - 0.5) / 0.5)
    assert torch.equal(t(x), out)  # no randomness in eval
    resized = ClassificationTransform(train=False, size=(20, 24), mean=0.5, std=0.5)
    a = resized(x)
    assert a.shape == (3, 20, 24) and a.dtype == torch.float32 and torch.equal(resized(x), a)
    ones = ClassificationTransform(train=False, size=16, mean=(0.5,), std=(0.5,))(torch.ones(1, 8, 8))
    torch.testing.assert_close(ones, torch.ones(1, 16, 16))  # (1 - 0.5) / 0.5
    with pytest.raises(ValueError, match="mean has 3 values for a 1-channel"):
        t(torch.rand(1, 8, 8))
    with pytest.raises(ValueError, match="float tensor"):
        t(torch.zeros(3, 8, 8, dtype=torch.uint8))


def test_black_patches_zero_pixels():
    t = ClassificationTransform(train=True, black_patches={"num_holes_range": (2, 2), "hole_height_range": (4, 4),
                                                           "hole_width_range": (4, 4), "p": 1.0}, seed=0)
    x = torch.full((3, 16, 16), 0.8)
    for _ in range(5):
        out = t(x)
        zero = out == 0
        assert zero.any(dim=0).equal(zero.all(dim=0))  # holes are black in every channel
        assert 16 <= int(zero[0].sum()) <= 32  # two 4x4 holes (possibly overlapping)
        assert torch.allclose(out[~zero], torch.tensor(0.8))
    # normalisation happens after the holes: black becomes -mean/std
    out = ClassificationTransform(train=True, mean=0.5, std=0.25, black_patches={"p": 1.0}, seed=0)(x)
    assert (out == -2.0).any()
    with pytest.raises(ValueError, match="max_holes"):  # albumentations 1.x names are rejected, not ignored
        ClassificationTransform(train=True, black_patches={"max_holes": 3})
    assert torch.equal(ClassificationTransform(train=True, black_patches={"p": 0.0})(x), x)


def test_channel_shift_raises_exactly_one_channel():
    t = ClassificationTransform(train=True, channel_shift={"shift_range": (0.2, 0.2), "p": 1.0}, seed=0)
    x = torch.full((3, 8, 8), 0.5)
    seen = set()
    for _ in range(30):
        out = t(x)
        raised = [c for c in range(3) if torch.allclose(out[c], torch.full((8, 8), 0.7))]
        kept = [c for c in range(3) if torch.equal(out[c], x[c])]
        assert len(raised) == 1 and len(kept) == 2
        seen.add(raised[0])
    assert seen == {0, 1, 2}
    clipped = ClassificationTransform(train=True, channel_shift={"shift_range": (0.5, 0.5), "p": 1.0})(torch.ones(3, 4, 4))
    assert clipped.max() == 1.0
    gray = torch.rand(1, 8, 8)
    assert torch.equal(ClassificationTransform(train=True, channel_shift={"p": 1.0})(gray), gray)  # no-op on 1 channel
    with pytest.raises(ValueError, match="shift_range"):
        RaiseOneChannel(shift_range=(-0.1, 0.2))
    with pytest.raises(ValueError, match="unknown option"):
        ClassificationTransform(train=True, channel_shift={"r_shift_limit": 0.2})


def test_pad_crop_and_flip_are_translations_and_mirrors():
    x = torch.rand(3, 8, 8)
    p = 2
    padded = F.pad(x, (p, p, p, p))
    candidates = [padded[:, dy:dy + 8, dx:dx + 8] for dy in range(2 * p + 1) for dx in range(2 * p + 1)]
    candidates += [c.flip(-1) for c in candidates]
    t = ClassificationTransform(train=True, pad_crop=p, hflip=True, seed=1)
    outs = [t(x) for _ in range(12)]
    for out in outs:
        assert out.shape == x.shape and any(torch.equal(out, c) for c in candidates)
    assert len({o.sum().item() for o in outs}) > 1  # actually random
    flips = ClassificationTransform(train=True, hflip=True, seed=0)
    results = [flips(x) for _ in range(20)]
    assert all(torch.equal(r, x) or torch.equal(r, x.flip(-1)) for r in results)
    assert any(torch.equal(r, x.flip(-1)) for r in results) and any(torch.equal(r, x) for r in results)
    rrc = ClassificationTransform(train=True, size=12, scale=(0.5, 1.0), seed=0)
    assert rrc(torch.rand(3, 16, 16)).shape == (3, 12, 12)


def test_seeded_train_transform_is_reproducible_and_composes_with_datasets():
    kwargs = dict(train=True, size=24, mean=(0.5,), std=(0.5,), pad_crop=2, black_patches={"p": 0.5}, seed=7)
    ds = Digits("test", transforms=ClassificationTransform(**kwargs))
    again = Digits("test", transforms=ClassificationTransform(**kwargs))
    for i in range(5):
        a, ya = ds[i]
        b, yb = again[i]
        assert a.shape == (1, 24, 24) and ya == yb and torch.equal(a, b)


class _Same(torch.utils.data.Dataset):
    def __init__(self, transform):
        self.transform = transform

    def __len__(self):
        return 4

    def __getitem__(self, i):
        return self.transform(torch.full((3, 4, 4), 0.5))


def test_dataloader_workers_get_different_streams():
    t = ClassificationTransform(train=True, channel_shift={"shift_range": (0.0, 0.5), "p": 1.0}, seed=0)
    loader = torch.utils.data.DataLoader(_Same(t), batch_size=1, num_workers=2, multiprocessing_context="fork")
    batches = [b[0] for b in loader]  # items 0, 2 from worker 0; 1, 3 from worker 1
    assert not torch.equal(batches[0], batches[1])
