"""Exact weighted kNN over a gallery of L2-normalised features, in bounded memory.

Search streams queries and gallery in blocks (working memory O(query_block * gallery_block)),
keeping a running top-k per query. Classification follows the reference: among the k nearest
gallery items, class c scores sum_{neighbours of class c} exp(s / sigma).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import SncaError

DEFAULT_BLOCK_BYTES = 16 << 20  # fp32 similarity block per (query block x gallery block): ~L3-sized
DEFAULT_BLOCK_BYTES_CUDA = 256 << 20  # on a GPU: fewer, larger kernels (and host syncs) per query block
SUB_BLOCK = 64  # columns per run when screening a similarity block against the running k-th best


@dataclass
class KNNResult:
    """Neighbours and votes for a set of queries.

    similarities / indices: (Q, k) sorted by decreasing similarity; indices point into the
    gallery (or through ``gallery_ids`` when given). scores: (Q, C) weighted class votes of
    the largest k searched. predictions: (Q, min(5, C)) classes by decreasing score.
    """

    similarities: Tensor
    indices: Tensor
    scores: Tensor
    predictions: Tensor


def _check_pair(queries: Tensor, gallery: Tensor) -> None:
    if queries.ndim != 2 or gallery.ndim != 2:
        raise SncaError("queries and gallery must be 2-D (num, dim) feature matrices")
    if queries.shape[1] != gallery.shape[1]:
        raise SncaError(f"queries have dim {queries.shape[1]}, gallery has dim {gallery.shape[1]}")


@torch.no_grad()
def knn_search(
    queries: Tensor,
    gallery: Tensor,
    k: int,
    exclude: Tensor | None = None,
    query_block: int = 1024,
    gallery_block: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Exact top-k inner-product search (cosine for normalised rows).

    Args:
        exclude: optional (Q,) gallery row to skip for each query (-1 for none), e.g. the
            query's own row when the queries are the gallery itself (leave-one-out).

    Returns (similarities, indices), each (Q, k'), k' = min(k, number of usable gallery rows),
    sorted by decreasing similarity. Raises if k < 1 or the gallery is empty.
    """
    _check_pair(queries, gallery)
    if k < 1:
        raise SncaError(f"k must be >= 1, got {k}")
    num_g = gallery.shape[0]
    if num_g == 0:
        raise SncaError("the gallery is empty: add labelled examples before searching")
    k_eff = min(k, num_g - (1 if exclude is not None else 0))
    if k_eff < 1:
        raise SncaError("the gallery has no row left once each query's own row is excluded")
    device = gallery.device
    queries = queries.to(device)
    dtype = torch.float32 if gallery.dtype not in (torch.float32, torch.float64) else gallery.dtype
    if gallery_block is None:
        budget = DEFAULT_BLOCK_BYTES_CUDA if device.type == "cuda" else DEFAULT_BLOCK_BYTES
        gallery_block = max(4096, budget // (4 * min(query_block, max(len(queries), 1))))
        gallery_block -= gallery_block % SUB_BLOCK  # whole runs: the fast screening path
    out_sims = torch.empty(len(queries), k_eff, dtype=dtype, device=device)
    out_idx = torch.empty(len(queries), k_eff, dtype=torch.long, device=device)
    # Exact products in the gallery's precision even inside an autocast region.
    with torch.autocast(device.type, enabled=False):
        for qa in range(0, len(queries), query_block):
            q = queries[qa : qa + query_block].to(dtype)
            excl = None if exclude is None else exclude[qa : qa + query_block].to(device)
            best_s, best_i = _search_block(q, gallery, k_eff, excl, gallery_block, dtype)
            out_sims[qa : qa + len(q)] = best_s
            out_idx[qa : qa + len(q)] = best_i
    return out_sims, out_idx


def _search_block(
    q: Tensor, gallery: Tensor, k: int, excl: Tensor | None, gallery_block: int, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """Running top-k of one query block over the whole gallery, sorted by decreasing similarity.

    Once k candidates are held, a gallery block only matters where it beats a query's current
    k-th similarity, which after the first blocks is a handful of entries: those are gathered
    with one comparison and merged, instead of a top-k over every block.
    """
    num_g = gallery.shape[0]
    best_s: Tensor | None = None
    best_i: Tensor | None = None
    # One similarity buffer for all blocks (a fresh multi-MB tensor per block costs page faults).
    buffer = torch.empty(q.shape[0] * min(gallery_block, num_g), dtype=dtype, device=q.device)
    for ga in range(0, num_g, gallery_block):
        g = gallery[ga : ga + gallery_block].to(dtype)
        sims = torch.mm(q, g.t(), out=buffer[: q.shape[0] * g.shape[0]].view(q.shape[0], g.shape[0]))
        if excl is not None:
            local = excl - ga
            hit = (local >= 0) & (local < g.shape[0])
            if bool(hit.any()):
                sims[torch.nonzero(hit).flatten(), local[hit]] = -torch.inf
        if best_s is None or best_i is None or best_s.shape[1] < k:
            # Fewer than k held so far: plain top-k of the block, merged with what is held.
            kk = min(k, sims.shape[1])
            s, i = sims.max(dim=1, keepdim=True) if kk == 1 else sims.topk(kk, dim=1)
            i = i + ga
            if best_s is None or best_i is None:
                best_s, best_i = s, i
            else:
                best_s, best_i = _merge(best_s, best_i, s, i, k)
            continue
        rows, cols, values = _beating(sims, best_s[:, -1:])
        if rows.numel() == 0:
            continue
        # Lay the candidates out as a (queries with candidates x most candidates of any query)
        # matrix, padded with -inf, and merge it with those queries' held top-k.
        counts = torch.bincount(rows, minlength=q.shape[0])
        width = int(counts.max())
        rank = torch.arange(rows.numel(), device=rows.device) - (torch.cumsum(counts, 0) - counts)[rows]
        hit_rows = torch.nonzero(counts).flatten()
        slot = torch.cumsum(counts > 0, 0) - 1  # row -> its place among hit_rows
        cand_s = torch.full((hit_rows.numel(), width), -torch.inf, dtype=sims.dtype, device=sims.device)
        cand_i = torch.zeros((hit_rows.numel(), width), dtype=torch.long, device=sims.device)
        cand_s[slot[rows], rank] = values
        cand_i[slot[rows], rank] = cols + ga
        merged_s, merged_i = _merge(best_s[hit_rows], best_i[hit_rows], cand_s, cand_i, k)
        best_s[hit_rows], best_i[hit_rows] = merged_s, merged_i
    assert best_s is not None and best_i is not None
    return best_s, best_i


def _beating(sims: Tensor, threshold: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(rows, columns, values) of the entries of ``sims`` above each row's ``threshold``,
    rows ascending. Runs of SUB_BLOCK columns are screened by their maxima first (one read of
    the block, no B x block mask); only the few runs that beat the threshold are searched."""
    num_q, width = sims.shape
    if width % SUB_BLOCK:
        rows, cols = torch.nonzero(sims > threshold, as_tuple=True)
        return rows, cols, sims[rows, cols]
    runs_per_row = width // SUB_BLOCK
    run_max = sims.view(num_q, runs_per_row, SUB_BLOCK).amax(dim=2)
    flat_runs = torch.nonzero((run_max > threshold).view(-1)).flatten()
    # Whole runs are copied as rows (index_select), far cheaper than an element-wise gather.
    values = sims.view(-1, SUB_BLOCK).index_select(0, flat_runs)
    run_rows = torch.div(flat_runs, runs_per_row, rounding_mode="floor")
    hit_run, hit_lane = torch.nonzero(values > threshold[run_rows], as_tuple=True)
    cols = (flat_runs[hit_run] - run_rows[hit_run] * runs_per_row) * SUB_BLOCK + hit_lane
    return run_rows[hit_run], cols, values[hit_run, hit_lane]


def _merge(best_s: Tensor, best_i: Tensor, s: Tensor, i: Tensor, k: int) -> tuple[Tensor, Tensor]:
    cat_s, cat_i = torch.cat([best_s, s], 1), torch.cat([best_i, i], 1)
    top_s, pick = cat_s.topk(min(k, cat_s.shape[1]), dim=1)
    return top_s, cat_i.gather(1, pick)


def vote(
    similarities: Tensor, neighbor_labels: Tensor, num_classes: int, sigma: float
) -> Tensor:
    """Weighted class scores (Q, C): sum of exp(s / sigma) over the neighbours of each class,
    normalised per query to sum to 1 (a class posterior).

    Weights are computed as exp((s - s_max) / sigma): the same ranking as exp(s / sigma), with
    every term in (0, 1], so no sigma underflows or overflows.
    """
    if not sigma > 0:
        raise SncaError(f"sigma (kNN temperature) must be > 0, got {sigma}")
    sims = similarities.float()
    weights = torch.exp((sims - sims.amax(dim=1, keepdim=True)) / sigma)
    scores = torch.zeros(similarities.shape[0], num_classes, device=similarities.device)
    scores.scatter_add_(1, neighbor_labels.long(), weights)
    return scores / scores.sum(dim=1, keepdim=True).clamp_min(torch.finfo(scores.dtype).tiny)


@torch.no_grad()
def knn_classify(
    queries: Tensor,
    gallery: Tensor,
    gallery_labels: Tensor,
    k: int | Sequence[int] = 30,
    sigma: float = 0.05,
    num_classes: int | None = None,
    exclude: Tensor | None = None,
    gallery_ids: Tensor | None = None,
    query_block: int = 1024,
) -> KNNResult | dict[int, KNNResult]:
    """Weighted kNN classification. With a sequence of k, one search serves them all and a
    dict {k: KNNResult} is returned."""
    ks = [k] if isinstance(k, int) else sorted(set(int(x) for x in k))
    if not ks or min(ks) < 1:
        raise SncaError(f"k must be >= 1, got {k}")
    gallery_labels = torch.as_tensor(gallery_labels, device=gallery.device).long().flatten()
    if gallery_labels.numel() != gallery.shape[0]:
        raise SncaError(f"gallery has {gallery.shape[0]} rows but {gallery_labels.numel()} labels")
    if num_classes is None:
        num_classes = int(gallery_labels.max()) + 1 if gallery_labels.numel() else 0
    elif gallery_labels.numel() and int(gallery_labels.max()) >= num_classes:
        raise SncaError(
            f"gallery label {int(gallery_labels.max())} >= num_classes={num_classes}; "
            "pass num_classes covering every gallery class (or leave it unset)"
        )
    if gallery_labels.numel() and int(gallery_labels.min()) < 0:
        raise SncaError("gallery labels must be >= 0")
    sims, idx = knn_search(queries, gallery, max(ks), exclude=exclude, query_block=query_block)
    neighbor_labels = gallery_labels[idx]
    ids = idx if gallery_ids is None else torch.as_tensor(gallery_ids, device=idx.device)[idx]
    results = {}
    for kk in ks:
        kk_eff = min(kk, sims.shape[1])
        scores = vote(sims[:, :kk_eff], neighbor_labels[:, :kk_eff], num_classes, sigma)
        predictions = scores.topk(min(5, num_classes), dim=1).indices
        results[kk] = KNNResult(sims[:, :kk_eff], ids[:, :kk_eff], scores, predictions)
    return results[ks[0]] if isinstance(k, int) else results


def topk_accuracy(predictions: Tensor, targets: Tensor, topk: Sequence[int] = (1, 5)) -> dict[int, float]:
    """Fraction of queries whose target is among the first t predictions, for each t."""
    targets = torch.as_tensor(targets, device=predictions.device).long().flatten()
    if predictions.shape[0] != targets.numel():
        raise SncaError(f"{predictions.shape[0]} predictions but {targets.numel()} targets")
    hits = predictions == targets[:, None]
    return {t: float(hits[:, :t].any(dim=1).float().mean()) if targets.numel() else 0.0 for t in topk}
