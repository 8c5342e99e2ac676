"""Few-shot recognition of classes the network never saw.

Train on the *base* classes only (``class_subset``), then run N-way K-shot episodes on the
held-out *novel* classes: sample N novel classes, K support and Q query examples per class,
and classify every query from the supports alone, by weighted kNN or by nearest class mean
(cosine to the L2-normalised mean of each class's supports). The score is the mean episode
accuracy with a 95 % confidence interval, 1.96 * std / sqrt(episodes).

Class splits come from a flag (``split_from_novel``) or a split file (``read_split_file``)::

    # miniImageNet-style: one class name per line under each header
    [base]
    n01532829
    ...
    [val]
    ...
    [novel]
    ...

Episode sampling is seeded and vectorised: all episodes are drawn with a few tensor ops
(Gumbel-style top-k of random keys per class), so 1,000 episodes take milliseconds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import SncaError

_BLOCK_ELEMENTS = 16 << 20  # bound on the elements of one episode block's largest tensor


@dataclass
class Episodes:
    """Sample indices of E episodes. ``classes`` (E, N): the dataset class of each episode slot
    (episode-local label n is ``classes[e, n]``); ``support`` (E, N, K) and ``query`` (E, N, Q)
    index the feature rows."""

    classes: Tensor
    support: Tensor
    query: Tensor
    seed: int

    @property
    def num_episodes(self) -> int:
        return int(self.classes.shape[0])


def sample_episodes(
    labels: Tensor,
    classes: Sequence[int],
    n_way: int = 5,
    n_shot: int = 1,
    n_query: int = 15,
    episodes: int = 1000,
    seed: int = 0,
) -> Episodes:
    """Draw stratified N-way K-shot episodes among ``classes`` (dataset class ids).

    Each episode picks N distinct classes uniformly, then K + Q distinct samples per class
    uniformly without replacement (first K support, last Q query). Same seed, same episodes.
    """
    labels = torch.as_tensor(labels).long().flatten().cpu()
    classes = [int(c) for c in classes]
    if n_way < 1 or n_shot < 1 or n_query < 1 or episodes < 1:
        raise SncaError(
            f"way, shot, query and episodes must all be >= 1 (got {n_way}, {n_shot}, {n_query}, {episodes})"
        )
    if len(set(classes)) != len(classes):
        raise SncaError("the novel classes contain duplicates")
    if n_way > len(classes):
        raise SncaError(
            f"{n_way}-way episodes need at least {n_way} novel classes, the split has {len(classes)}"
        )
    per_class = n_shot + n_query
    members = [torch.nonzero(labels == c).flatten() for c in classes]
    for c, m in zip(classes, members, strict=True):
        if m.numel() < per_class:
            raise SncaError(
                f"novel class {c} has {m.numel()} samples, fewer than shot + query = {per_class}; "
                "lower --shot/--query or use a split with more samples"
            )
    counts = torch.tensor([m.numel() for m in members])
    width = int(counts.max())
    table = torch.full((len(classes), width), -1, dtype=torch.long)
    for row, m in enumerate(members):
        table[row, : m.numel()] = m
    class_ids = torch.tensor(classes)

    gen = torch.Generator().manual_seed(int(seed))
    chosen = torch.rand(episodes, len(classes), generator=gen).argsort(dim=1)[:, :n_way]
    block = max(1, _BLOCK_ELEMENTS // (n_way * width))
    picks = []
    arange = torch.arange(width)
    for start in range(0, episodes, block):
        rows = chosen[start : start + block]  # (e, N)
        keys = torch.rand(rows.shape[0], n_way, width, generator=gen)
        keys.masked_fill_(arange >= counts[rows][..., None], -1.0)  # padding never wins
        pos = keys.topk(per_class, dim=2).indices  # distinct, uniformly random members
        picks.append(table[rows[..., None], pos])
    samples = torch.cat(picks)
    return Episodes(
        classes=class_ids[chosen],
        support=samples[..., :n_shot].contiguous(),
        query=samples[..., n_shot:].contiguous(),
        seed=int(seed),
    )


def episode_accuracies(
    features: Tensor,
    episodes: Episodes,
    method: str = "knn",
    k: int | None = None,
    sigma: float = 0.05,
) -> Tensor:
    """Per-episode query accuracy (E,), float64.

    method "knn": weighted vote of the k most similar supports (default k = all N*K supports),
    each weighing exp(s / sigma); "ncm": nearest class mean, cosine to the L2-normalised mean
    of each class's support features.
    """
    if method not in ("knn", "ncm"):
        raise SncaError(f"unknown few-shot classifier {method!r}: use 'knn' or 'ncm'")
    if not sigma > 0:
        raise SncaError(f"sigma must be > 0, got {sigma}")
    features = torch.as_tensor(features)
    if features.ndim != 2:
        raise SncaError("features must be a 2-D (num, dim) matrix")
    feats = F.normalize(features.float(), dim=1)
    device = feats.device
    num_e, n_way, n_shot = episodes.support.shape
    n_query = episodes.query.shape[2]
    support_labels = torch.arange(n_way, device=device).repeat_interleave(n_shot)
    query_labels = torch.arange(n_way, device=device).repeat_interleave(n_query)
    k_eff = n_way * n_shot if k is None else min(int(k), n_way * n_shot)
    if k_eff < 1:
        raise SncaError(f"k must be >= 1, got {k}")
    per_episode = n_way * (n_shot + n_query) * feats.shape[1]
    block = max(1, _BLOCK_ELEMENTS // per_episode)
    out = []
    for start in range(0, num_e, block):
        sup = feats[episodes.support[start : start + block].reshape(-1).to(device)]
        qry = feats[episodes.query[start : start + block].reshape(-1).to(device)]
        e = sup.shape[0] // (n_way * n_shot)
        sup = sup.view(e, n_way * n_shot, -1)
        qry = qry.view(e, n_way * n_query, -1)
        if method == "ncm":
            means = F.normalize(sup.view(e, n_way, n_shot, -1).mean(dim=2), dim=2)
            pred = torch.bmm(qry, means.transpose(1, 2)).argmax(dim=2)
        else:
            sims = torch.bmm(qry, sup.transpose(1, 2))  # (e, NQ, NK)
            top_s, top_i = sims.topk(k_eff, dim=2)
            weights = torch.exp((top_s - top_s[..., :1]) / sigma)  # in (0, 1]: no overflow
            scores = torch.zeros(e, n_way * n_query, n_way, device=device)
            scores.scatter_add_(2, support_labels[top_i], weights)
            pred = scores.argmax(dim=2)
        out.append((pred == query_labels).double().mean(dim=1).cpu())
    return torch.cat(out)


def confidence_interval(accuracies: Sequence[float] | Tensor) -> tuple[float, float]:
    """(mean, 95 % half-width) = (mean, 1.96 * std / sqrt(n)), std with ddof 0 as in the
    usual few-shot evaluation code."""
    acc = torch.as_tensor(accuracies, dtype=torch.float64).flatten()
    if acc.numel() == 0:
        raise SncaError("no episode accuracies to summarise")
    std = float(acc.std(correction=0))
    return float(acc.mean()), 1.96 * std / math.sqrt(acc.numel())


@dataclass
class FewShotResult:
    """Mean accuracy and 95 % CI half-width (fractions in [0, 1]) of one episode setting."""

    n_way: int
    n_shot: int
    n_query: int
    episodes: int
    method: str
    seed: int
    mean: float
    ci95: float
    accuracies: Tensor

    def to_dict(self) -> dict[str, Any]:
        return {
            "way": self.n_way,
            "shot": self.n_shot,
            "query": self.n_query,
            "episodes": self.episodes,
            "method": self.method,
            "seed": self.seed,
            "accuracy": self.mean,
            "ci95": self.ci95,
        }


def fewshot_evaluate(
    features: Tensor,
    labels: Tensor,
    novel_classes: Sequence[int],
    n_way: int = 5,
    n_shot: int = 1,
    n_query: int = 15,
    episodes: int = 1000,
    seed: int = 0,
    method: str = "knn",
    k: int | None = None,
    sigma: float = 0.05,
) -> FewShotResult:
    """Sample episodes among ``novel_classes`` and score ``features`` on them."""
    labels = torch.as_tensor(labels).long().flatten()
    if features.shape[0] != labels.numel():
        raise SncaError(f"{features.shape[0]} feature rows but {labels.numel()} labels")
    eps = sample_episodes(labels, novel_classes, n_way, n_shot, n_query, episodes, seed)
    acc = episode_accuracies(features, eps, method=method, k=k, sigma=sigma)
    mean, ci = confidence_interval(acc)
    return FewShotResult(n_way, n_shot, n_query, episodes, method, seed, mean, ci, acc)
