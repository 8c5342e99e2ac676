"""Dataset names, their static facts (channels, size, classes, normalisation) and class names."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import SncaError

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


# Coarse digit labels (the order of the keys is the coarse class index): grouped by shape.
DIGIT_COARSE_GROUPS: dict[str, list[str]] = {
    "loops": ["0", "6", "8", "9"],
    "strokes": ["1", "4", "7"],
    "curves": ["2", "3", "5"],
}

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

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
_COARSE_NUM_CLASSES = {"fashion-mnist": len(COARSE_GROUPS), "mnist": len(DIGIT_COARSE_GROUPS), "mnist5k": len(DIGIT_COARSE_GROUPS), "cifar100": 20}

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

