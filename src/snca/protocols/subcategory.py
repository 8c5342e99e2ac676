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

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..errors import SncaError
from ..knn import knn_classify, topk_accuracy


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
