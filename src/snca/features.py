"""Features of a dataset or of image files: the one place images become vectors.

Kinds (:data:`KINDS`):

- ``embedding``: the model's L2-normalised low-dimensional output (what NCA trains);
- ``penultimate``: the backbone's features before the embedding head, L2-normalised;
- ``projection``: the embedding head's output before normalisation (the softmax classifier's
  input);
- ``pixels``: no model at all, the baseline of the protocols: the stored image (``raw_item``, no
  normalisation, no augmentation) in the model's channels, brought to one size by shorter side
  + centre crop where images differ in size, box-filtered down to at most 32 x 32, flattened and
  L2-normalised. At the native size of the array datasets (28 x 28 digits and clothes, 32 x 32
  CIFAR) this is exactly the untouched pixel vector.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.numpy import save_file as save_numpy
from torch import Tensor, nn

from .data import load_image
from .errors import SncaError
from .files import atomic_write, check_writable
from .runtime import autocast, make_loader

KINDS = ("embedding", "penultimate", "projection", "pixels")
PIXEL_SIZE = 32  # largest side of a raw-pixel feature image


@dataclass
class Features:
    """Rows in dataset order: ``features`` (N, D) float32, ``labels`` and ``indices`` (N,) int64."""

    features: Tensor
    labels: Tensor
    indices: Tensor

    def __iter__(self):  # features, labels, indices = extract(...)
        return iter((self.features, self.labels, self.indices))


def _forward(model: nn.Module, x: Tensor, kind: str) -> Tensor:
    if kind == "embedding":
        return model(x)
    if kind == "penultimate":
        return F.normalize(model.forward_features(x).flatten(1).float(), dim=1)
    return model.project(x)


def _pixels(dataset: Any, on_batch: Callable[[int, int], None] | None) -> Features:
    n = len(dataset)
    if not hasattr(dataset, "raw_item"):
        raise SncaError("raw-pixel features need a dataset with raw_item (an snca.data dataset)")
    mode = "L" if int(getattr(dataset, "in_chans", 3)) == 1 else "RGB"
    first = dataset.raw_item(0)
    side = min(first.size)
    size = min(side, PIXEL_SIZE)
    rows = []
    for i in range(n):
        img = dataset.raw_item(i)
        img = img.convert(mode) if img.mode != mode else img
        if img.size != (size, size):
            w, h = img.size
            s = min(w, h)
            img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
            img = img.resize((size, size), Image.Resampling.BOX)
        rows.append(np.asarray(img, dtype=np.float32).reshape(-1))
        if on_batch is not None and (i + 1) % 1024 == 0:
            on_batch(i + 1, n)
    labels = torch.as_tensor(dataset.targets).long().cpu()
    return Features(F.normalize(torch.from_numpy(np.stack(rows)), dim=1), labels, torch.arange(n))


@torch.no_grad()
def extract(
    model: nn.Module | None,
    dataset: Any,
    kind: str = "embedding",
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    workers: int = 0,
    amp: str = "none",
    channels_last: bool = False,
    on_batch: Callable[[int, int], None] | None = None,
) -> Features:
    """Features of every item of ``dataset`` (which yields ``(image, label, index)``).

    Returns float32 features on ``device`` (pixels: CPU), labels and dataset indices (int64,
    CPU), in dataset order. The model is left in eval mode.
    """
    if kind not in KINDS:
        raise SncaError(f"unknown feature kind {kind!r}; use one of {', '.join(KINDS)}")
    if len(dataset) == 0:
        raise SncaError("cannot extract features of an empty dataset")
    if kind == "pixels":
        return _pixels(dataset, on_batch)
    if model is None:
        raise SncaError(f"{kind} features need a trained model (a checkpoint)")
    device = torch.device(device)
    loader = make_loader(dataset, batch_size, shuffle=False, workers=workers, device=device)
    model.eval()
    feats, labels, indices = [], [], []
    for step, (x, y, idx) in enumerate(loader):
        x = x.to(device, non_blocking=True)
        if channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp):
            f = _forward(model, x, kind)
        feats.append(f.float())
        labels.append(torch.as_tensor(y).long().cpu())
        indices.append(torch.as_tensor(idx).long().cpu())
        if on_batch is not None:
            on_batch(step + 1, len(loader))
    return Features(torch.cat(feats), torch.cat(labels), torch.cat(indices))


# ----------------------------------------------------------------------------- image files
@dataclass
class EmbeddedImages:
    """Features of the image files that could be read, and a message for each that could not."""

    features: Tensor  # (n_ok, D)
    paths: list[str]  # the files behind each feature row, in input order
    failures: list[tuple[str, str]]  # (path, one-line reason)


@torch.no_grad()
def embed_image_files(
    model: nn.Module,
    transform: Callable[[Any], Tensor],
    in_chans: int,
    paths: Sequence[str | os.PathLike],
    batch_size: int = 64,
    device: str | torch.device = "cpu",
) -> EmbeddedImages:
    """Embed image files with a model and its run's test transform.

    Each file is decoded with :func:`snca.data.load_image` (greyscale for 1-channel models, RGB
    otherwise); a missing, unreadable or non-image file is reported in ``failures`` and the
    others are still embedded.
    """
    mode = "L" if int(in_chans) == 1 else "RGB"
    tensors: list[Tensor] = []
    ok: list[str] = []
    failures: list[tuple[str, str]] = []
    for p in paths:
        p = str(p)
        try:
            x = transform(load_image(p, mode=mode))
        except SncaError as err:
            failures.append((p, str(err)))
            continue
        except Exception as err:  # noqa: BLE001 - a transform can fail in many ways on odd images
            failures.append((p, f"cannot convert image {p}: {type(err).__name__}: {' '.join(str(err).split())[:160]}"))
            continue
        tensors.append(x)
        ok.append(p)
    feats = []
    model.eval()
    for a in range(0, len(tensors), batch_size):
        feats.append(model(torch.stack(tensors[a : a + batch_size]).to(device)).float().cpu())
    dim = int(getattr(model, "low_dim", 0) or 0)
    return EmbeddedImages(torch.cat(feats) if feats else torch.zeros(0, dim), ok, failures)


# ----------------------------------------------------------------------------- feature files
FEATURE_FILE_SUFFIXES = (".npz", ".npy", ".safetensors")


def check_output_file(out: str | os.PathLike) -> Path:
    """Refuse a features file that cannot be written (suffix, directory, permissions), before
    anything is embedded."""
    path = Path(out)
    if path.suffix not in FEATURE_FILE_SUFFIXES:
        raise SncaError(f"--out must end in {', '.join(FEATURE_FILE_SUFFIXES)}, got {path.name}")
    if not path.parent.is_dir():
        raise SncaError(f"output directory {path.parent} does not exist; create it first")
    return check_writable(path, "features file")


def save_features(out: str | os.PathLike, features: np.ndarray, labels: np.ndarray, ids: np.ndarray) -> list[Path]:
    """Write features (N, D) float32, labels and ids (N,) int64 in the format ``out``'s suffix
    names, each file atomically: ``.npz`` (one archive), ``.safetensors`` (three tensors), or
    ``.npy`` (the features, plus ``<stem>_labels.npy`` and ``<stem>_ids.npy``). Returns the paths."""
    path = check_output_file(out)
    arrays = {"features": np.ascontiguousarray(features, np.float32), "labels": np.ascontiguousarray(labels, np.int64),
              "ids": np.ascontiguousarray(ids, np.int64)}
    if path.suffix == ".npz":
        def write_npz(tmp: Path) -> None:
            with open(tmp, "wb") as fh:
                np.savez(fh, **arrays)
        atomic_write(path, write_npz)
        return [path]
    if path.suffix == ".safetensors":
        atomic_write(path, lambda tmp: save_numpy(arrays, str(tmp), metadata={"format": "snca-features"}))
        return [path]
    written = []
    for name, arr in arrays.items():
        target = path if name == "features" else path.with_name(f"{path.stem}_{name}.npy")

        def write_npy(tmp: Path, arr: np.ndarray = arr) -> None:
            with open(tmp, "wb") as fh:
                np.save(fh, arr)
        atomic_write(target, write_npy)
        written.append(target)
    return written
