"""Evaluation protocols for the claim that NCA features generalise beyond their labels.

- ``subcategory``: train on coarse labels, weighted kNN against fine labels.
- ``fewshot``: train on base classes, N-way K-shot episodes on novel classes (kNN or NCM).
- ``retrieval``: Recall@K, precision@1, R-precision, mAP@R.
- ``features``: embedding / penultimate / raw-pixel features of a dataset.
- ``report``: trains NCA and softmax models and tabulates all of the above (``snca report``).

Everything except ``report`` and ``features.model_features`` is pure tensor code on
features and labels.
"""

from .fewshot import (
    ClassSplit,
    ClassSubset,
    Episodes,
    FewShotResult,
    ResolvedSplit,
    class_subset,
    confidence_interval,
    episode_accuracies,
    fewshot_evaluate,
    parse_split_text,
    read_split_file,
    resolve_split,
    sample_episodes,
    split_from_novel,
)
from .retrieval import RetrievalResult, average_precision_at_r, retrieval_metrics
from .subcategory import (
    DIGIT_COARSE_GROUPS,
    CoarseLabels,
    KNNAccuracy,
    fine_to_coarse_from_labels,
    knn_accuracy,
    subcategory_accuracy,
)

__all__ = [
    "DIGIT_COARSE_GROUPS",
    "ClassSplit",
    "ClassSubset",
    "CoarseLabels",
    "Episodes",
    "FewShotResult",
    "KNNAccuracy",
    "ResolvedSplit",
    "RetrievalResult",
    "average_precision_at_r",
    "class_subset",
    "confidence_interval",
    "episode_accuracies",
    "fewshot_evaluate",
    "fine_to_coarse_from_labels",
    "knn_accuracy",
    "parse_split_text",
    "read_split_file",
    "resolve_split",
    "retrieval_metrics",
    "sample_episodes",
    "split_from_novel",
    "subcategory_accuracy",
]
