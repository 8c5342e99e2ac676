"""The dataset classes (items are (image, label, index)), image decoding and stratified subsets."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ..errors import SncaError
from .transforms import build_transforms


def load_image(path: str | os.PathLike, mode: str | None = "RGB") -> Image.Image:
    """Open and fully decode an image file (converted to ``mode`` unless None)."""
    p = Path(path)
    if not p.is_file():
        raise SncaError(f"no such image file: {p}")
    try:
        with Image.open(p) as im:
            im.load()
            return im.convert(mode) if mode is not None and im.mode != mode else im.copy()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise SncaError(f"cannot read image {p}: {_one_line(e)}") from None


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__



def stratified_subset(targets: Tensor, n: int, seed: int = 0) -> Tensor:
    """Sorted indices of a deterministic class-stratified sample of ``n`` of ``targets``.

    Each class gets ``n * count / N`` samples, rounded by largest remainder (ties to the lower
    class id); which samples is a seeded random choice within the class.
    """
    targets = torch.as_tensor(targets, dtype=torch.long)
    total = targets.numel()
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or not 0 < n <= total:
        raise SncaError(f"subset must be an integer in [1, {total}] (the split's size), got {n!r}")
    classes, counts = torch.unique(targets, return_counts=True)
    exact = counts.double() * n / total
    quota = exact.floor().long()
    remainder = exact - quota
    short = n - int(quota.sum())
    if short:
        order = sorted(range(len(classes)), key=lambda k: (-float(remainder[k]), k))
        for k in order[:short]:
            quota[k] += 1
    g = torch.Generator().manual_seed(int(seed))
    chosen = []
    for c, q in zip(classes.tolist(), quota.tolist(), strict=True):
        members = torch.nonzero(targets == c).flatten()
        chosen.append(members[torch.randperm(members.numel(), generator=g)[:q]])
    return torch.cat(chosen).sort().values


class IndexedDataset(torch.utils.data.Dataset):
    """Base: item ``i`` is ``(transform(image_i), label_i, i)``.

    Attributes: ``name``, ``split``, ``label_set``, ``targets`` (LongTensor N, the training
    labels: coarse ones when ``label_set="coarse"``), ``classes``, ``num_classes``,
    ``fine_targets``/``fine_classes`` (always the fine labels), ``in_chans``, ``transform``,
    ``source_indices`` (position in the full split of each item, for subsets).
    """

    def __init__(
        self,
        *,
        name: str,
        split: str,
        fine_targets: Tensor,
        fine_classes: list[str],
        transform: Callable | None,
        label_set: str = "fine",
        coarse_of_fine: Sequence[int] | None = None,
        coarse_classes: list[str] | None = None,
        in_chans: int = 3,
        source_indices: Tensor | None = None,
    ) -> None:
        self.name = name
        self.split = split
        self.label_set = label_set
        self.in_chans = in_chans
        self.fine_targets = torch.as_tensor(fine_targets, dtype=torch.long)
        self.fine_classes = list(fine_classes)
        if label_set == "coarse":
            assert coarse_of_fine is not None and coarse_classes is not None
            self.coarse_of_fine = torch.as_tensor(list(coarse_of_fine), dtype=torch.long)
            self.targets = self.coarse_of_fine[self.fine_targets]
            self.classes = list(coarse_classes)
        else:
            self.coarse_of_fine = None
            self.targets = self.fine_targets
            self.classes = list(self.fine_classes)
        self.num_classes = len(self.classes)
        n = self.targets.numel()
        self.source_indices = torch.arange(n) if source_indices is None else source_indices
        self.transform = transform if transform is not None else build_transforms(name, train=False)
        self._labels = self.targets.tolist()  # python ints: the cheapest thing to return per item

    def __len__(self) -> int:
        return len(self._labels)

    def _check_index(self, i: int) -> int:
        n = len(self._labels)
        if not -n <= i < n:
            raise IndexError(f"index {i} out of range for a dataset of {n}")
        return i % n

    def raw_item(self, i: int) -> Image.Image:
        """The untransformed image ``i`` as a PIL image (mode "L" or "RGB")."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, split={self.split!r}, n={len(self)}, "
            f"classes={self.num_classes}, label_set={self.label_set!r})"
        )


class TensorImageDataset(IndexedDataset):
    """Images held in memory as a uint8 tensor ``(N, C, H, W)``."""

    def __init__(self, images: Tensor, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[0] != len(self._labels):
            raise SncaError(f"images must be a uint8 (N, C, H, W) tensor matching the labels, got {images.dtype} {tuple(images.shape)}")
        self.images = images
        self._np = images.numpy()  # a view: indexing numpy is ~10x cheaper than a tensor

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("_np")  # a view of `images`: pickling it too would double a worker's copy
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._np = self.images.numpy()

    def raw_item(self, i: int) -> Image.Image:
        a = self._np[self._check_index(i)]
        return Image.fromarray(a[0], mode="L") if a.shape[0] == 1 else Image.fromarray(a.transpose(1, 2, 0), mode="RGB")

    def __getitem__(self, i: int) -> tuple[Tensor, int, int]:
        i = self._check_index(int(i))
        t = self.transform
        if getattr(t, "accepts_uint8_array", False):
            img: Any = self._np[i]
        elif getattr(t, "accepts_uint8_tensor", False):
            img = torch.from_numpy(self._np[i])
        else:
            img = self.raw_item(i)
        return t(img), self._labels[i], i


class ImageFolderDataset(IndexedDataset):
    """Images read from files (``root/<split>/<class>/...``) with PIL at every access."""

    def __init__(self, paths: list[Path], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.paths = list(paths)
        self.num_bad_images = 0

    def raw_item(self, i: int) -> Image.Image:
        return load_image(self.paths[self._check_index(i)])

    def __getitem__(self, i: int) -> tuple[Tensor, int, int]:
        i = self._check_index(int(i))
        return self.transform(self.raw_item(i)), self._labels[i], i


