"""Metrics for the claim that NCA features generalise beyond their labels: pure tensor code on
features and labels (the data wrappers they are used with live in :mod:`snca.data`).

- ``subcategory``: weighted kNN against fine labels (and their coarse grouping).
- ``fewshot``: N-way K-shot episodes on novel classes (kNN or nearest class mean), with CIs.
- ``retrieval``: Recall@K, precision@1, R-precision, mAP@R.
"""

from .fewshot import (
    Episodes,
    FewShotResult,
    confidence_interval,
    episode_accuracies,
    fewshot_evaluate,
    sample_episodes,
)
from .retrieval import RetrievalResult, average_precision_at_r, retrieval_metrics
from .subcategory import KNNAccuracy, knn_accuracy, subcategory_accuracy

__all__ = [
    "Episodes",
    "FewShotResult",
    "KNNAccuracy",
    "RetrievalResult",
    "average_precision_at_r",
    "confidence_interval",
    "episode_accuracies",
    "fewshot_evaluate",
    "knn_accuracy",
    "retrieval_metrics",
    "sample_episodes",
    "subcategory_accuracy",
]
