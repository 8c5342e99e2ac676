"""Evaluation during and after training, over one process or many with the same code.

Each rank embeds its contiguous share of an evaluation set (every item exactly once); kNN runs
through :func:`snca.distributed.knn_sharded` against the memory shards or this rank's gallery
rows, and accuracies are summed over ranks. At world size 1 every share is the whole set and
every collective returns its input.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .. import distributed as sd
from ..features import extract
from ..memory import MemoryBank

Gallery = MemoryBank | tuple[Tensor, Tensor, Tensor]  # the memory, or (features, labels, ids)


def prefixed(prefix: str, results: dict[int, dict[str, float]], ks: list[int]) -> dict[str, float]:
    """``{k: {"top1", "top5"}}`` -> ``{prefix_top1[_k<k>]: ...}`` (the suffix only for several k)."""
    out = {}
    for k, acc in results.items():
        suffix = "" if len(ks) == 1 else f"_k{k}"
        out[f"{prefix}_top1{suffix}"], out[f"{prefix}_top5{suffix}"] = acc["top1"], acc["top5"]
    return out


class Evaluator:
    """Embeds this rank's share of a dataset and scores kNN / classifier predictions."""

    def __init__(self, model: nn.Module, device: torch.device, num_classes: int, batch_size: int,
                 workers: int = 0, amp: str = "none", channels_last: bool = False) -> None:
        self.model, self.device, self.num_classes = model, device, num_classes
        self.options = {"batch_size": batch_size, "device": device, "workers": workers, "amp": amp, "channels_last": channels_last}

    def embed(self, dataset: Any, kind: str) -> tuple[Tensor, Tensor, Tensor]:
        """Features, labels and dataset ids of this rank's share of ``dataset``."""
        share = torch.utils.data.Subset(dataset, list(sd.local_range(len(dataset))))
        feats, labels, _ = extract(self.model, share, kind, **self.options)
        ids = torch.as_tensor(share.indices, dtype=torch.long)
        self.model.train()
        return feats, labels, ids

    def accuracy(self, predictions: Tensor, labels: Tensor, topk: tuple[int, ...]) -> dict[int, float]:
        """Top-k accuracy over the queries of every rank (each rank passes its own)."""
        hits = predictions == labels.to(predictions.device).long()[:, None]
        counts = [float(hits[:, :t].any(dim=1).sum()) for t in topk] + [float(labels.numel())]
        total = sd.all_reduce_sum(torch.tensor(counts, dtype=torch.float64)).tolist()
        return {t: total[i] / max(total[-1], 1.0) for i, t in enumerate(topk)}

    def knn(self, queries: Tensor, labels: Tensor, gallery: Gallery, ks: list[int], sigma: float) -> dict[int, dict[str, float]]:
        """Weighted-kNN top-1 / top-5 for each k (one search for all of them)."""
        if isinstance(gallery, MemoryBank):
            results = sd.knn_sharded(queries, gallery, k=list(ks), sigma=sigma, num_classes=self.num_classes)
        else:
            feats, g_labels, g_ids = gallery
            results = sd.knn_sharded(queries, feats, g_labels.to(feats.device), g_ids.to(feats.device), k=list(ks),
                                     sigma=sigma, num_classes=self.num_classes)
        out = {}
        for k, res in results.items():
            acc = self.accuracy(res.predictions, labels, (1, 5))
            out[k] = {"top1": acc[1], "top5": acc[5]}
        return out

    def sync_buffers(self) -> None:
        """Give every rank rank 0's buffers (batch-norm statistics) before evaluating: DDP
        broadcasts them at each training forward, after which every rank updates its own copy."""
        buffers = sd.broadcast_object({k: v.cpu() for k, v in self.model.named_buffers()})
        for name, buf in self.model.named_buffers():
            buf.copy_(buffers[name])
