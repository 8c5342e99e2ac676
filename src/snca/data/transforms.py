"""Image transforms: fast uint8 -> normalised tensor paths for the array datasets, torchvision v2 pipelines otherwise."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ..errors import SncaError
from .registry import _INFO, canonical_name


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


