"""build_dataset: the entry point from a dataset name to an indexed dataset."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ..errors import SncaError
from .datasets import ImageFolderDataset, IndexedDataset, TensorImageDataset, stratified_subset
from .readers import _load_cifar, _load_folder, _load_idx_dataset, _load_mnist5k, _read_coarse_map
from .registry import (
    _INFO,
    COARSE_GROUPS,
    DIGIT_COARSE_GROUPS,
    FASHION_MNIST_CLASSES,
    MNIST_CLASSES,
    canonical_name,
)


def build_dataset(
    name: str = "fashion-mnist",
    split: str = "train",
    data_dir: str | os.PathLike | None = None,
    transform: Callable | None = None,
    label_set: str = "fine",
    subset: int | None = None,
    seed: int = 0,
    on_bad_image: str = "skip",
    coarse_map: str | os.PathLike | None = None,
    download: bool = False,
) -> IndexedDataset:
    """Build dataset ``name`` (see the module docstring) for ``split`` ("train" or "test"/"val").

    Args:
        transform: applied to each image; None means the dataset's test transform
            (:func:`build_transforms` with ``train=False``).
        label_set: "fine", or "coarse" (fashion-mnist :data:`COARSE_GROUPS`; cifar100's 20
            superclasses; folder: ``coarse_map`` or ``data_dir/coarse.txt`` with lines
            ``fine_class coarse_class``). ``fine_targets`` always keeps the fine labels.
        subset: keep a deterministic class-stratified sample of this many items (chosen with
            ``seed``), renumbered 0..subset-1; ``source_indices`` maps back.
        on_bad_image: folder datasets only. Every file is checked when the dataset is built
            (PIL header/``verify``, plus a full decode of JPEGs that look truncated), because a
            fixed index cannot drop a file later: "skip" drops bad files and warns once with
            their count (kept in ``num_bad_images``), "error" raises naming the first bad file,
            "trust" skips the check (fastest start on huge folders; a bad file then raises
            SncaError naming it when it is loaded).
        download: fashion-mnist and mnist only: when the files are not found, download them
            with torchvision into ``data_dir`` (created). Without it nothing is created or
            downloaded: the error says where the files were looked for.
    """
    key = canonical_name(name)
    split_in = str(split).lower()
    if split_in not in ("train", "test", "val"):
        raise SncaError(f"unknown split {split!r}: use 'train' or 'test' (alias 'val')")
    split_key = "train" if split_in == "train" else "test"
    if label_set not in ("fine", "coarse"):
        raise SncaError(f"unknown label_set {label_set!r}: use 'fine' or 'coarse'")
    if label_set == "coarse" and key not in ("fashion-mnist", "mnist", "mnist5k", "cifar100", "folder", "imagenet"):
        raise SncaError(f"dataset {key} has no coarse labels: coarse works with fashion-mnist, mnist, mnist5k, cifar100, folder")
    if on_bad_image not in ("skip", "error", "trust"):
        raise SncaError(f"unknown on_bad_image {on_bad_image!r}: use 'skip', 'error' or 'trust'")
    root = Path(data_dir).expanduser() if data_dir is not None else None
    info = _INFO[key]
    coarse_of_fine: list[int] | None = None
    coarse_classes: list[str] | None = None

    if key in ("folder", "imagenet"):
        paths, labels, classes, n_bad, split_dir = _load_folder(root, split_key, on_bad_image)
        if label_set == "coarse":
            cmap = Path(coarse_map) if coarse_map is not None else root / "coarse.txt"  # type: ignore[operator]
            coarse_of_fine, coarse_classes = _read_coarse_map(cmap, classes)
        fine = torch.tensor(labels, dtype=torch.long)
        source = None
        if subset is not None:
            source = stratified_subset(fine, subset, seed)
            paths = [paths[k] for k in source.tolist()]
            fine = fine[source]
        ds: IndexedDataset = ImageFolderDataset(
            paths,
            name=key,
            split=split_key,
            fine_targets=fine,
            fine_classes=classes,
            transform=transform,
            label_set=label_set,
            coarse_of_fine=coarse_of_fine,
            coarse_classes=coarse_classes,
            in_chans=3,
            source_indices=source,
        )
        ds.num_bad_images = n_bad  # type: ignore[attr-defined]
        ds.root = split_dir  # type: ignore[attr-defined]
        return ds

    if key in ("fashion-mnist", "mnist", "mnist5k"):
        if key == "mnist5k":
            images, labels = _load_mnist5k(split_key, root)
        else:
            images, labels = _load_idx_dataset(key, split_key, root, download)
        classes = FASHION_MNIST_CLASSES if key == "fashion-mnist" else MNIST_CLASSES
        if label_set == "coarse":  # one grouping per dataset, fixed in snca.data.registry
            groups = COARSE_GROUPS if key == "fashion-mnist" else DIGIT_COARSE_GROUPS
            coarse_classes = list(groups)
            of = {fine: k for k, members in enumerate(groups.values()) for fine in members}
            coarse_of_fine = [of[c] for c in classes]
    else:  # cifar10 / cifar100
        images, label_arrays, meta = _load_cifar(key, split_key, root)  # type: ignore[misc]
        if key == "cifar10":
            labels = label_arrays["labels"]
            classes = list(meta.get("label_names", [])) or [str(k) for k in range(10)]
        else:
            labels = label_arrays["fine_labels"]
            classes = list(meta.get("fine_label_names", [])) or [str(k) for k in range(100)]
            if label_set == "coarse":
                coarse = label_arrays["coarse_labels"]
                n_coarse = int(coarse.max()) + 1 if coarse.size else 0
                coarse_classes = list(meta.get("coarse_label_names", [])) or [str(k) for k in range(n_coarse)]
                # Unused fine classes keep 0: no target ever reads their entry.
                table = np.zeros(len(classes), dtype=np.int64)
                table[labels] = coarse
                # Every fine class present must map to exactly one coarse class.
                if (table[labels] != coarse).any():
                    raise SncaError(f"{key}: fine and coarse labels do not nest (a fine class has several or no superclass)")
                coarse_of_fine = table.tolist()
        if labels.size and (labels.min() < 0 or labels.max() >= len(classes)):
            raise SncaError(f"{key}: labels outside [0, {len(classes)}): the class-name metadata does not match")

    fine = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64))
    tensor_images = torch.from_numpy(images)
    source = None
    if subset is not None:
        source = stratified_subset(fine, subset, seed)
        tensor_images = tensor_images[source]
        fine = fine[source]
    return TensorImageDataset(
        tensor_images,
        name=key,
        split=split_key,
        fine_targets=fine,
        fine_classes=list(classes),
        transform=transform,
        label_set=label_set,
        coarse_of_fine=coarse_of_fine,
        coarse_classes=coarse_classes,
        in_chans=info.in_chans,
        source_indices=source,
    )

