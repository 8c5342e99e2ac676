"""snca: scalable Neighbourhood Component Analysis with an augmented memory (ECCV 2018).

The core is pure tensor code, usable from any training loop::

    from snca import MemoryBank, NCALoss, knn_classify
"""

from .errors import SncaError
from .knn import KNNResult, knn_classify, knn_search, topk_accuracy, vote
from .memory import MemoryBank, shard_range
from .nca import NCALoss, NCAStats, loss_and_grad, merge_stats, nca_loss, shard_stats

__version__ = "0.1.0"

__all__ = [
    "KNNResult",
    "MemoryBank",
    "NCALoss",
    "NCAStats",
    "SncaError",
    "knn_classify",
    "knn_search",
    "loss_and_grad",
    "merge_stats",
    "nca_loss",
    "shard_range",
    "shard_stats",
    "topk_accuracy",
    "vote",
]
