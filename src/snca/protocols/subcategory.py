"""Sub-category discovery: train with coarse labels, evaluate against fine labels.

The network only ever saw coarse labels (CIFAR-100's 20 superclasses, Fashion-MNIST's
``snca.data.COARSE_GROUPS``, an image folder with a fine-to-coarse mapping file). The
gallery (training features) then carries the *fine* labels, and a weighted kNN vote among the
test features' neighbours must recover the fine class. A feature that kept the structure
inside each coarse class scores well; one that collapsed each coarse class to a point scores
about 1 / (fine classes per coarse class).

``knn_accuracy`` is the same evaluation with whatever labels are given: the plain kNN top-1
when the gallery labels are the training labels.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..errors import SncaError
from ..knn import knn_classify, topk_accuracy
from .fewshot import FORWARDED_ATTRIBUTES

# A coarse grouping of the ten digits by stroke shape, for sub-category discovery on MNIST
# (the digit datasets have no natural superclasses; these mirror Fashion-MNIST's groups in size).
DIGIT_COARSE_GROUPS: dict[str, list[int]] = {
    "loops": [0, 6, 8, 9],
    "strokes": [1, 4, 7],
    "curves": [2, 3, 5],
}


@dataclass
class KNNAccuracy:
    """Weighted-kNN accuracy (fractions) of queries against a labelled gallery."""

    k: int
    sigma: float
    top1: float
    top5: float
    coarse_top1: float | None = None  # fine prediction mapped to its coarse class
    chance_within_coarse: float | None = None  # 1 / (fine classes in the query's coarse group)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def knn_accuracy(
    gallery_features: Tensor,
    gallery_labels: Tensor,
    query_features: Tensor,
    query_labels: Tensor,
    k: int | Sequence[int] = 30,
    sigma: float = 0.05,
    num_classes: int | None = None,
    fine_to_coarse: Sequence[int] | Tensor | None = None,
) -> KNNAccuracy | dict[int, KNNAccuracy]:
    """Weighted kNN (``snca.knn.knn_classify``) of queries against the gallery, top-1 / top-5.

    With ``fine_to_coarse`` (coarse id of each label), also the coarse accuracy of the
    predictions and the chance level of guessing the fine class within the right coarse class.
    A sequence of k gives {k: KNNAccuracy} from one search.
    """
    gallery_labels = torch.as_tensor(gallery_labels).long().flatten()
    query_labels = torch.as_tensor(query_labels).long().flatten()
    if query_features.shape[0] != query_labels.numel():
        raise SncaError(f"{query_features.shape[0]} query rows but {query_labels.numel()} labels")
    if num_classes is None:
        num_classes = int(max(gallery_labels.max(), query_labels.max())) + 1
    mapping = None
    if fine_to_coarse is not None:
        mapping = torch.as_tensor(fine_to_coarse).long().flatten()
        if mapping.numel() < num_classes:
            raise SncaError(
                f"the fine-to-coarse mapping covers {mapping.numel()} classes, the labels {num_classes}"
            )
    results = knn_classify(
        query_features, gallery_features, gallery_labels, k=k, sigma=sigma, num_classes=num_classes
    )
    single = not isinstance(results, dict)
    if single:
        results = {int(k): results}  # type: ignore[arg-type]
    out = {}
    for kk, res in results.items():
        acc = topk_accuracy(res.predictions.cpu(), query_labels, (1, 5))
        item = KNNAccuracy(kk, float(sigma), acc[1], acc[5])
        if mapping is not None:
            pred = res.predictions[:, 0].cpu()
            item.coarse_top1 = float((mapping[pred] == mapping[query_labels]).float().mean())
            group_size = torch.bincount(mapping[:num_classes])[mapping[query_labels]]
            item.chance_within_coarse = float((1.0 / group_size.double()).mean())
        out[kk] = item
    return out[next(iter(out))] if single else out


def subcategory_accuracy(
    train_features: Tensor,
    train_fine_labels: Tensor,
    test_features: Tensor,
    test_fine_labels: Tensor,
    k: int | Sequence[int] = 30,
    sigma: float = 0.05,
    fine_to_coarse: Sequence[int] | Tensor | None = None,
    num_fine: int | None = None,
) -> KNNAccuracy | dict[int, KNNAccuracy]:
    """Sub-category accuracy: weighted kNN of test features against training features that
    carry FINE labels, for features trained on coarse labels only."""
    return knn_accuracy(
        train_features,
        train_fine_labels,
        test_features,
        test_fine_labels,
        k=k,
        sigma=sigma,
        num_classes=num_fine,
        fine_to_coarse=fine_to_coarse,
    )


def fine_to_coarse_from_labels(fine: Tensor, coarse: Tensor) -> Tensor:
    """The coarse class of each fine class, read from paired labels; raises if a fine class
    appears under two coarse classes."""
    fine = torch.as_tensor(fine).long().flatten()
    coarse = torch.as_tensor(coarse).long().flatten()
    num_fine = int(fine.max()) + 1
    mapping = torch.full((num_fine,), -1, dtype=torch.long)
    mapping[fine] = coarse
    if not torch.equal(mapping[fine], coarse):
        raise SncaError("a fine class appears under two coarse classes: the mapping is not a grouping")
    return mapping


def groups_to_mapping(
    groups: Mapping[str, Sequence[int | str]], fine_classes: Sequence[str]
) -> tuple[list[int], list[str]]:
    """(coarse id of each fine class, coarse names) from {coarse name: [fine ids or names]}."""
    names = list(groups)
    mapping = [-1] * len(fine_classes)
    for cid, name in enumerate(names):
        for member in groups[name]:
            if isinstance(member, str) and member in fine_classes:
                fid = list(fine_classes).index(member)
            elif str(member).lstrip("-").isdigit() and 0 <= int(member) < len(fine_classes):
                fid = int(member)
            else:
                raise SncaError(f"coarse group {name!r} names unknown class {member!r}")
            if mapping[fid] != -1:
                raise SncaError(f"class {fine_classes[fid]!r} is in two coarse groups")
            mapping[fid] = cid
    missing = [fine_classes[i] for i, c in enumerate(mapping) if c == -1]
    if missing:
        raise SncaError(f"class {missing[0]!r} belongs to no coarse group: every class needs one")
    return mapping, names


class CoarseLabels(Dataset):
    """An indexed dataset relabelled to coarse classes: items ``(image, coarse, index)``,
    ``targets`` coarse, ``fine_targets`` / ``fine_classes`` the original labels. For datasets
    without a built-in coarse label set (e.g. the digits, with ``DIGIT_COARSE_GROUPS``)."""

    def __init__(self, dataset: Any, groups: Mapping[str, Sequence[int | str]]):
        mapping, names = groups_to_mapping(groups, list(dataset.classes))
        self.dataset = dataset
        self.fine_to_coarse = torch.tensor(mapping)
        self.fine_targets = torch.as_tensor(dataset.targets).long()
        self.fine_classes = list(dataset.classes)
        self.targets = self.fine_to_coarse[self.fine_targets]
        self.classes = names
        self.num_classes = len(names)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        image = self.dataset[i][0]
        return image, int(self.targets[i]), int(i)

    def raw_item(self, i: int):
        return self.dataset.raw_item(i)

    def __getattr__(self, name: str):
        # Per-dataset facts (name, transform, channels) come from the wrapped dataset; per-item
        # arrays (images, paths) do not, as their rows would not match this wrapper's. The
        # "dataset" guard keeps unpickling in DataLoader workers from recursing.
        inner = self.__dict__.get("dataset")
        if name in FORWARDED_ATTRIBUTES and inner is not None:
            return getattr(inner, name)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")
