"""Exact NCA loss against a memory bank, streamed in chunks (docs/design.md#loss).

For a query v_i with logits l_ik = v_i . m_k / T over every slot k except its own:

    p_i  = sum_{k in same class} e^{l_ik} / sum_k e^{l_ik}          loss_i = -log p_i
    dL_i/dv_i = (1/T) * ( sum_k p_ik m_k - sum_{k same} (p_ik / p_i) m_k )

Everything the loss and its gradient need is six per-query statistics, each a sum that can be
accumulated over any partition of the memory:

    max_other, sum_other = sum_{k other class} e^{l_ik - max_other},  vec_other = (same) * m_k
    max_same,  sum_same  = (same, over same-class k != own slot),     vec_same  = (same) * m_k

One streaming pass over the memory (similarities, then exp-weights times slots: the two
matrix products of the naive form) gives the ``*_other`` terms with an online max, same-class
logits masked out. Because the bank keeps slots grouped by class, each query's same-class
slots are one contiguous slice, so the ``*_same`` terms cost B * N / C * D instead of a third
full pass. Keeping the two sets disjoint means the denominator sum_other + w * sum_same never
subtracts (a margin w = exp(-delta / T) stays accurate at small T). Per-shard statistics merge
exactly (rescale to the larger max, then add), which is how the sharded bank combines ranks.

The forward pass computes the gradient too; backward only scales it. No B x N tensor exists:
working memory is O(B * chunk + B * D).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from .errors import SncaError
from .memory import MemoryBank

DEFAULT_CHUNK_BYTES = 8 << 20  # B x chunk fp32 logits: 8 MiB keeps the block cache-friendly on CPU
DEFAULT_CHUNK_BYTES_CUDA = 128 << 20  # on a GPU: a few large kernels per step, far below the bank
# Largest 1/T for which the other-class pass uses the fixed shift 1/T instead of a running max:
# with unit vectors every logit is in [-1/T, 1/T], so each exp(logit) is a normal float32 and
# exp(logit - 1/T) >= exp(-2/T) = exp(-80) stays normal too (T >= 0.025; the default 0.05 qualifies).
FIXED_SHIFT_MAX_INV_TEMP = 40.0
_LOG2_E = 1.0 / math.log(2.0)


@dataclass
class NCAStats:
    """Per-query partial sums over some set of memory slots (see module docstring)."""

    max_other: Tensor
    sum_other: Tensor
    vec_other: Tensor
    max_same: Tensor
    sum_same: Tensor
    vec_same: Tensor

    @classmethod
    def empty(cls, num_queries: int, dim: int, device: torch.device) -> NCAStats:
        def neg_inf() -> Tensor:
            return torch.full((num_queries,), -math.inf, device=device)

        zeros = torch.zeros
        return cls(
            neg_inf(), zeros(num_queries, device=device), zeros(num_queries, dim, device=device),
            neg_inf(), zeros(num_queries, device=device), zeros(num_queries, dim, device=device),
        )

    def tensors(self) -> list[Tensor]:
        return [getattr(self, f.name) for f in fields(self)]


def _rescale(max_old: Tensor, max_new: Tensor) -> Tensor:
    """exp(max_old - max_new), with 0 where max_old is -inf (nothing accumulated yet)."""
    scale = torch.exp(max_old - max_new)
    return torch.where(torch.isfinite(max_old), scale, torch.zeros_like(scale))


def rescale_stats(stats: NCAStats, max_other: Tensor, max_same: Tensor) -> NCAStats:
    """Express ``stats`` relative to new (larger or equal) maxima, so partial sums can be added."""
    a = _rescale(stats.max_other, max_other)
    s = _rescale(stats.max_same, max_same)
    return NCAStats(
        max_other, stats.sum_other * a, stats.vec_other * a[:, None],
        max_same, stats.sum_same * s, stats.vec_same * s[:, None],
    )


def merge_stats(first: NCAStats, second: NCAStats) -> NCAStats:
    """Exact combination of statistics computed over two disjoint sets of slots."""
    max_other = torch.maximum(first.max_other, second.max_other)
    max_same = torch.maximum(first.max_same, second.max_same)
    a, b = rescale_stats(first, max_other, max_same), rescale_stats(second, max_other, max_same)
    return NCAStats(
        max_other, a.sum_other + b.sum_other, a.vec_other + b.vec_other,
        max_same, a.sum_same + b.sum_same, a.vec_same + b.vec_same,
    )


def class_labels_of_positions(class_offsets: Tensor, start: int, length: int) -> Tensor:
    """Labels of class-sorted positions [start, start + length), rebuilt from the offsets."""
    positions = torch.arange(start, start + length, device=class_offsets.device)
    return torch.searchsorted(class_offsets, positions, right=True) - 1


def default_chunk_size(num_queries: int, device: torch.device | str | None = None) -> int:
    """Slots per chunk: a B x chunk float32 logits block of DEFAULT_CHUNK_BYTES on CPU,
    DEFAULT_CHUNK_BYTES_CUDA on a GPU (fewer, larger kernels; still far below the bank)."""
    is_cuda = device is not None and torch.device(device).type == "cuda"
    budget = DEFAULT_CHUNK_BYTES_CUDA if is_cuda else DEFAULT_CHUNK_BYTES
    return max(256, budget // (4 * max(num_queries, 1)))


def _class_ranges(
    query_labels: Tensor, class_offsets: Tensor, slot_start: int, n: int
) -> tuple[list[int], list[int], tuple[Tensor, ...]]:
    """For each class present among the queries (ascending): its local slot range [start, end)
    in this shard (empty when none of its slots live here) and the rows of its queries."""
    classes, query_class = torch.unique(query_labels, return_inverse=True)
    starts = (class_offsets[classes] - slot_start).clamp(0, n).tolist()
    ends = (class_offsets[classes + 1] - slot_start).clamp(0, n).tolist()
    order = torch.argsort(query_class, stable=True)
    counts = torch.bincount(query_class, minlength=classes.numel()).tolist()
    return starts, ends, torch.split(order, counts)


def _other_class_pass(
    queries: Tensor,
    inv_temp: float,
    slots: Tensor,
    starts: list[int],
    ends: list[int],
    members_by_class: tuple[Tensor, ...],
    chunk: int,
    fixed_shift: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(max_other, sum_other, vec_other) over all slots of other classes, streamed in chunks.

    ``fixed_shift``: every weight is exp(logit) * exp(-1/T), the exp taken unshifted (so no max
    pass and no rescaling) and the shift applied to each chunk's B-sized sums, which keeps the
    accumulators <= the number of slots. The logits are produced in base 2 (log2(e) folded into
    the queries with 1/T) because exp2 is about twice as fast as exp on CPU. Otherwise: a running
    max (any temperature).
    """
    num_q, dim = queries.shape
    device = queries.device
    n = slots.shape[0]
    # Logits come straight out of the matrix product: the temperature is folded into the queries.
    scaled_queries = queries * (inv_temp * _LOG2_E if fixed_shift else inv_temp)
    max_other = torch.full((num_q,), -math.inf, device=device)
    sum_other = torch.zeros(num_q, device=device)
    vec_other = torch.zeros(num_q, dim, device=device)
    shift_scale = math.exp(-inv_temp) if fixed_shift else 1.0
    # One logits buffer for every chunk: a fresh multi-MB tensor per chunk costs page faults
    # (the allocator hands large blocks back to the OS) that are as slow as the product itself.
    buffer = torch.empty(num_q * min(chunk, n), device=device)
    for a in range(0, n, chunk):
        b = min(a + chunk, n)
        block = slots[a:b]
        block = block if block.dtype == torch.float32 else block.float()
        logits = torch.mm(scaled_queries, block.t(), out=buffer[: num_q * (b - a)].view(num_q, b - a))
        # Same-class slots (the query's own slot among them) are one contiguous column range
        # per class present in the batch: fill those ranges, no B x chunk label comparison.
        i = bisect.bisect_right(ends, a)
        while i < len(starts) and starts[i] < b:
            lo, hi = max(starts[i], a), min(ends[i], b)
            if hi > lo:
                logits[:, lo - a : hi - a].index_fill_(0, members_by_class[i], -math.inf)
            i += 1
        if fixed_shift:
            logits.exp2_()
            sum_other.add_(logits.sum(dim=1), alpha=shift_scale)
            vec_other.addmm_(logits, block, alpha=shift_scale)
            continue
        new_max = torch.maximum(max_other, logits.amax(dim=1))
        scale = _rescale(max_other, new_max)
        # Rows with no other-class slot so far stay all -inf: subtract 0, not -inf (NaN).
        finite = torch.isfinite(new_max)
        logits.sub_(torch.where(finite, new_max, torch.zeros_like(new_max))[:, None]).exp_()
        sum_other = sum_other * scale + logits.sum(dim=1)
        vec_other = torch.addmm(vec_other * scale[:, None], logits, block)
        max_other = new_max
    if fixed_shift:
        max_other.fill_(inv_temp)
    return max_other, sum_other, vec_other


@torch.no_grad()
def shard_stats(
    queries: Tensor,
    query_labels: Tensor,
    query_positions: Tensor | None,
    slots: Tensor,
    slot_start: int,
    class_offsets: Tensor,
    inv_temp: float,
    chunk_size: int | None = None,
) -> NCAStats:
    """NCA statistics of ``queries`` against ``slots``: class-sorted global positions
    ``[slot_start, slot_start + len(slots))``.

    ``query_positions`` holds each query's own class-sorted position (its slot is excluded),
    or -1 / None for queries that have no slot in the memory.

    ``max_other`` / ``max_same`` are the shifts the sums are relative to (sum = sum of
    exp(logit - shift)): the running maximum, or 1/T for the other-class terms when every
    logit is known to lie within +-1/T <= FIXED_SHIFT_MAX_INV_TEMP (unit vectors, T >= 0.025).
    """
    num_q, dim = queries.shape
    device = queries.device
    n = slots.shape[0]
    if n == 0 or num_q == 0:
        return NCAStats.empty(num_q, dim, device)
    chunk = int(chunk_size or default_chunk_size(num_q, device))
    if query_positions is None:
        query_positions = torch.full((num_q,), -1, dtype=torch.long, device=device)
    # float32 arithmetic throughout, even when called inside an autocast region.
    with torch.autocast(device.type, enabled=False):
        return _shard_stats(queries, query_labels, query_positions, slots, slot_start, class_offsets, inv_temp, chunk)


def _shard_stats(
    queries: Tensor,
    query_labels: Tensor,
    query_positions: Tensor,
    slots: Tensor,
    slot_start: int,
    class_offsets: Tensor,
    inv_temp: float,
    chunk: int,
) -> NCAStats:
    num_q, dim = queries.shape
    device = queries.device
    n = slots.shape[0]
    local_pos = query_positions - slot_start
    queries = queries.float()
    scaled = queries * inv_temp
    starts, ends, members_by_class = _class_ranges(query_labels, class_offsets, slot_start, n)

    # Pass over all slots: other-class terms (similarities, then exp-weights times slots).
    fixed = inv_temp * float(queries.norm(dim=1).max()) <= FIXED_SHIFT_MAX_INV_TEMP
    args = (slots, starts, ends, members_by_class, chunk)
    other = _other_class_pass(queries, inv_temp, *args, fixed_shift=fixed)
    if fixed and not _fixed_shift_sums_ok(other[1], query_labels, starts, ends, n, inv_temp):
        # Slots far from unit norm: some weight overflowed or underflowed; use the running max.
        other = _other_class_pass(queries, inv_temp, *args, fixed_shift=False)
    max_other, sum_other, vec_other = other

    # Same-class terms: each class present in the batch is one contiguous slice of slots.
    stats = NCAStats.empty(num_q, dim, device)
    max_same, sum_same, vec_same = stats.max_same, stats.sum_same, stats.vec_same
    for members, lo, hi in zip(members_by_class, starts, ends, strict=True):
        if hi <= lo:
            continue
        block = slots[lo:hi]
        block = block if block.dtype == torch.float32 else block.float()
        logits = torch.mm(scaled[members], block.t())
        own_local = local_pos[members] - lo
        own = (own_local >= 0) & (own_local < hi - lo)
        if bool(own.any()):
            logits[torch.nonzero(own).flatten(), own_local[own]] = -math.inf
        row_max = logits.amax(dim=1)
        finite = torch.isfinite(row_max)
        logits.sub_(torch.where(finite, row_max, torch.zeros_like(row_max))[:, None]).exp_()
        max_same[members] = row_max
        sum_same[members] = logits.sum(dim=1)
        vec_same[members] = logits @ block
    return NCAStats(max_other, sum_other, vec_other, max_same, sum_same, vec_same)


def _fixed_shift_sums_ok(
    sum_other: Tensor, query_labels: Tensor, starts: list[int], ends: list[int], n: int, inv_temp: float
) -> bool:
    """Fixed-shift sums are trustworthy when finite and, for every query with at least one
    other-class slot, no smaller than the smallest possible term exp(-2/T) (unit vectors)."""
    if not bool(torch.isfinite(sum_other).all()):
        return False
    classes = torch.unique(query_labels)
    sizes = torch.tensor(ends, device=sum_other.device) - torch.tensor(starts, device=sum_other.device)
    same_here = sizes[torch.searchsorted(classes, query_labels)]
    has_other = same_here < n
    floor = math.exp(-2.0 * inv_temp) * (1 - 1e-3)
    return bool((sum_other[has_other] >= floor).all())


@torch.no_grad()
def loss_and_grad(stats: NCAStats, inv_temp: float, margin: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """Per-query loss -log p_i, its gradient w.r.t. v_i, and the mask of queries that have a
    same-class slot. Queries without one get loss 0 and gradient 0 (never NaN).

    With a margin delta, same-class terms are weighted by w = exp(-delta / T) in the numerator
    and the denominator, as in the reference implementation.
    """
    valid = stats.sum_same > 0
    safe = lambda x: torch.where(valid, x, torch.ones_like(x))  # noqa: E731
    # Log space throughout: a margin with delta / T beyond ~87 makes w underflow in float32,
    # and the denominator must stay exact when same-class terms dominate it.
    log_other = stats.max_other + torch.log(stats.sum_other)  # -inf when no other-class slot
    log_same = -margin * inv_temp + safe(stats.max_same) + torch.log(safe(stats.sum_same))
    log_den = torch.logaddexp(log_other, log_same)
    loss = torch.where(valid, log_den - log_same, torch.zeros_like(log_den))
    other_weight = torch.exp(stats.max_other - log_den).nan_to_num_(0.0)
    same_weight = torch.exp(log_same - log_den - torch.log(safe(stats.sum_same)))
    expected = other_weight[:, None] * stats.vec_other + same_weight[:, None] * stats.vec_same
    same_mean = stats.vec_same / safe(stats.sum_same)[:, None]
    grad = torch.where(valid[:, None], inv_temp * (expected - same_mean), torch.zeros_like(expected))
    return loss, grad, valid


class _WithExactGradient(torch.autograd.Function):
    """Returns precomputed per-sample losses; backward hands out the precomputed gradient."""

    @staticmethod
    def forward(ctx, features: Tensor, losses: Tensor, grads: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(grads)
        ctx.feature_dtype = features.dtype
        return losses.clone()

    @staticmethod
    def backward(ctx, grad_output: Tensor):  # type: ignore[override]
        (grads,) = ctx.saved_tensors
        return (grad_output[:, None] * grads).to(ctx.feature_dtype), None, None


StatsReducer = Callable[[NCAStats], NCAStats]


def check_normalized(features: Tensor, tolerance: float | None = None) -> None:
    """Refuse features that are not L2-normalised rows (a silent renormalisation would change
    the gradient the formula specifies)."""
    if features.ndim != 2:
        raise SncaError(f"features must be a (batch, dim) matrix, got shape {tuple(features.shape)}")
    if not bool(torch.isfinite(features).all()):
        raise SncaError("features contain NaN or Inf; check the learning rate and the input data")
    if tolerance is None:
        tolerance = 1e-3 if features.dtype in (torch.float32, torch.float64) else 2e-2
    deviation = float((features.detach().float().norm(dim=1) - 1).abs().max()) if features.numel() else 0.0
    if deviation > tolerance:
        raise SncaError(
            f"features must be L2-normalised along dim 1 (max |norm - 1| = {deviation:.3g}); "
            "apply torch.nn.functional.normalize(x, dim=1) first"
        )


def nca_loss(
    features: Tensor,
    indices: Tensor | None,
    bank: MemoryBank,
    temperature: float = 0.05,
    margin: float = 0.0,
    labels: Tensor | None = None,
    chunk_size: int | None = None,
    reduction: str = "mean",
    reducer: StatsReducer | None = None,
    gather: Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor, Tensor, slice]] | None = None,
) -> Tensor:
    """Exact NCA loss of L2-normalised ``features`` against ``bank`` (gradient to features only).

    Args:
        features: (B, D) L2-normalised batch features (any float dtype, e.g. from bf16 autocast;
            computed in float32). Unnormalised features are refused.
        indices: (B,) dataset indices of the batch: each sample's own slot is excluded and its
            label is read from the bank. ``None`` for queries that have no slot (then pass labels).
        temperature: T > 0.
        margin: delta >= 0 in cosine units; same-class terms are scaled by exp(-delta / T).
        reduction: "mean" (divide by B, samples without a same-class slot count as 0),
            "sum" or "none" (per-sample losses).
        reducer / gather: hooks used by :mod:`snca.distributed` to combine statistics across
            memory shards; leave them unset in a single process.

    Does not update the memory: call ``bank.update(features.detach(), indices)`` afterwards.
    """
    if not temperature > 0:
        raise SncaError(f"temperature must be > 0, got {temperature}")
    if margin < 0:
        raise SncaError(f"margin must be >= 0, got {margin}")
    if reduction not in ("mean", "sum", "none"):
        raise SncaError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    check_normalized(features)
    if features.shape[1] != bank.dim:
        raise SncaError(f"features have dim {features.shape[1]}, the memory bank has dim {bank.dim}")
    device = bank.device
    queries = features.detach().to(device, torch.float32)
    if indices is not None:
        indices = bank.check_indices(indices)
        if indices.numel() != queries.shape[0]:
            raise SncaError(f"got {queries.shape[0]} features but {indices.numel()} indices")
        query_labels = bank.labels[indices]
        if labels is not None and not torch.equal(torch.as_tensor(labels, device=device).long().flatten(), query_labels):
            raise SncaError("labels disagree with the memory bank's labels for these indices")
        positions = bank.position[indices]
    else:
        if labels is None:
            raise SncaError("nca_loss needs either the samples' dataset indices or their labels")
        query_labels = torch.as_tensor(labels, device=device).long().flatten()
        if query_labels.numel() != queries.shape[0]:
            raise SncaError(f"got {queries.shape[0]} features but {query_labels.numel()} labels")
        if query_labels.numel() and (int(query_labels.min()) < 0 or int(query_labels.max()) >= bank.num_classes):
            raise SncaError(f"labels must be in [0, {bank.num_classes})")
        positions = torch.full_like(query_labels, -1)

    own = slice(None)
    if gather is not None:  # sharded bank: every rank scores the whole global batch
        queries, query_labels, positions, own = gather(queries, query_labels, positions)
    inv_temp = 1.0 / temperature
    stats = shard_stats(
        queries, query_labels, positions, bank.slots, bank.shard_start, bank.class_offsets, inv_temp, chunk_size
    )
    if reducer is not None:
        stats = reducer(stats)
    losses, grads, _ = loss_and_grad(stats, inv_temp, margin)
    losses, grads = losses[own], grads[own]
    per_sample = _WithExactGradient.apply(features, losses.to(features.device), grads.to(features.device))
    if reduction == "none":
        return per_sample
    total = per_sample.sum()
    return total / max(features.shape[0], 1) if reduction == "mean" else total


class NCALoss(torch.nn.Module):
    """:func:`nca_loss` bound to a memory bank, optionally updating it after each call.

    >>> bank = MemoryBank(train_labels, dim=128)
    >>> criterion = NCALoss(bank, temperature=0.05)
    >>> loss = criterion(F.normalize(model(x), dim=1), idx)   # memory updated after the loss
    >>> loss.backward()
    """

    def __init__(
        self,
        bank: MemoryBank,
        temperature: float = 0.05,
        margin: float = 0.0,
        update_memory: bool = True,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        if not temperature > 0:
            raise SncaError(f"temperature must be > 0, got {temperature}")
        self.bank = bank
        self.temperature = float(temperature)
        self.margin = float(margin)
        self.update_memory = update_memory
        self.chunk_size = chunk_size

    def forward(self, features: Tensor, indices: Tensor) -> Tensor:
        loss = nca_loss(
            features, indices, self.bank, self.temperature, self.margin, chunk_size=self.chunk_size
        )
        if self.update_memory and self.training:
            self.bank.update(features.detach(), indices)
        return loss

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, margin={self.margin}, update_memory={self.update_memory}"
