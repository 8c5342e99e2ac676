"""Retrieval metrics on features + labels: Recall@K, precision@1, R-precision and mAP@R.

Queries are searched against a gallery, or, with no gallery, leave-one-out within one set
(each query's own row is excluded). Definitions follow Musgrave, Belongie, Lim, "A Metric
Learning Reality Check" (ECCV 2020):

- Recall@K: fraction of queries with at least one of their K nearest of the query's label.
- precision@1: fraction whose nearest neighbour has the query's label (= Recall@1).
- R = number of gallery items with the query's label (the query itself excluded).
- R-precision: fraction of the R nearest with the query's label.
- mAP@R = (1/R) * sum_{i <= R, item i relevant} precision@i.

Queries whose label has no item in the gallery (R = 0) have no defined answer: they are left
out of every metric and counted in ``num_without_match``.

The search is exact (``snca.knn.knn_search``) and runs over blocks of queries sorted by R, so
the neighbour lists alive at once stay under a fixed budget: 10k queries against 60k works in
bounded memory.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..errors import SncaError
from ..knn import knn_search

_NEIGHBOR_BUDGET = 8 << 20  # query rows x neighbours kept per block
_SIMILARITY_BUDGET = 16 << 20  # query rows x gallery rows of one similarity block


@dataclass
class RetrievalResult:
    """Retrieval metrics, fractions in [0, 1]."""

    recall: dict[int, float]
    precision_at_1: float
    r_precision: float | None
    map_at_r: float | None
    num_queries: int
    num_without_match: int
    leave_one_out: bool

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {f"recall@{k}": v for k, v in self.recall.items()}
        out.update(
            {
                "precision@1": self.precision_at_1,
                "r_precision": self.r_precision,
                "map@r": self.map_at_r,
                "num_queries": self.num_queries,
                "num_without_match": self.num_without_match,
                "leave_one_out": self.leave_one_out,
            }
        )
        return out


def average_precision_at_r(relevant: Tensor, r: Tensor) -> Tensor:
    """AP@R per row of a (Q, L) relevance matrix sorted by rank, with R per query (L >= R)."""
    ranks = torch.arange(1, relevant.shape[1] + 1, device=relevant.device)
    within = ranks[None, :] <= r[:, None]
    hits = (relevant & within).double()
    precision = hits.cumsum(dim=1) / ranks
    return (precision * hits).sum(dim=1) / r.clamp_min(1).double()


@torch.no_grad()
def retrieval_metrics(
    queries: Tensor,
    query_labels: Tensor,
    gallery: Tensor | None = None,
    gallery_labels: Tensor | None = None,
    ks: Sequence[int] = (1, 2, 4, 8),
    map_at_r: bool = True,
    neighbor_budget: int = _NEIGHBOR_BUDGET,
) -> RetrievalResult:
    """Recall@K for each K in ``ks``, precision@1 and (optionally) R-precision and mAP@R.

    With ``gallery=None`` the queries are their own gallery, leave-one-out.
    """
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise SncaError(f"Recall@K needs K >= 1, got {list(ks)}")
    query_labels = torch.as_tensor(query_labels).long().flatten()
    if queries.ndim != 2 or queries.shape[0] != query_labels.numel():
        raise SncaError(f"{queries.shape[0]} query rows but {query_labels.numel()} query labels")
    leave_one_out = gallery is None
    if leave_one_out:
        if gallery_labels is not None:
            raise SncaError("gallery_labels given without a gallery")
        gallery, gallery_labels = queries, query_labels
    elif gallery_labels is None:
        raise SncaError("a gallery needs gallery_labels")
    gallery_labels = torch.as_tensor(gallery_labels).long().flatten()
    if gallery.shape[0] != gallery_labels.numel():
        raise SncaError(f"{gallery.shape[0]} gallery rows but {gallery_labels.numel()} labels")
    if queries.shape[0] == 0:
        raise SncaError("no queries to evaluate")
    device = gallery.device
    query_labels, gallery_labels = query_labels.to(device), gallery_labels.to(device)

    num_labels = int(max(query_labels.max(), gallery_labels.max())) + 1
    counts = torch.bincount(gallery_labels, minlength=num_labels)
    r_all = counts[query_labels] - int(leave_one_out)
    valid = torch.nonzero(r_all > 0).flatten()
    # Sorting by R keeps each block's neighbour list as short as its own largest class.
    valid = valid[torch.argsort(r_all[valid], stable=True)]
    usable = gallery.shape[0] - int(leave_one_out)

    recall_hits = {k: 0 for k in ks}
    p1 = rp_sum = ap_sum = 0.0
    start = 0
    while start < valid.numel():
        r_last = int(r_all[valid[min(start + 1024, valid.numel()) - 1]])
        depth = min(usable, max(ks[-1], r_last if map_at_r else 0))
        block = max(1, min(1024, neighbor_budget // max(depth, 1)))
        rows = valid[start : start + block]
        start += rows.numel()
        depth = min(usable, max(ks[-1], int(r_all[rows].max()) if map_at_r else 0))
        exclude = rows if leave_one_out else None
        # Whole gallery rows per search block: one top-k per query instead of a merge per
        # gallery block, which dominates when the depth (R) is in the thousands.
        q_block = max(1, min(rows.numel(), _SIMILARITY_BUDGET // gallery.shape[0]))
        _, idx = knn_search(
            queries[rows].to(device),
            gallery,
            depth,
            exclude=exclude,
            query_block=q_block,
            gallery_block=gallery.shape[0] if gallery.shape[0] <= _SIMILARITY_BUDGET else None,
        )
        relevant = gallery_labels[idx] == query_labels[rows][:, None]
        for k in ks:
            recall_hits[k] += int(relevant[:, :k].any(dim=1).sum())
        p1 += float(relevant[:, 0].double().sum())
        if map_at_r:
            r = r_all[rows]
            ranks = torch.arange(1, relevant.shape[1] + 1, device=device)
            rp_sum += float(((relevant & (ranks <= r[:, None])).sum(1).double() / r).sum())
            ap_sum += float(average_precision_at_r(relevant, r).sum())
    n = int(valid.numel())
    if n == 0:
        raise SncaError("no query has a same-label item in the gallery: retrieval is undefined")
    return RetrievalResult(
        recall={k: recall_hits[k] / n for k in ks},
        precision_at_1=p1 / n,
        r_precision=rp_sum / n if map_at_r else None,
        map_at_r=ap_sum / n if map_at_r else None,
        num_queries=n,
        num_without_match=int(query_labels.numel()) - n,
        leave_one_out=leave_one_out,
    )
