"""Multi-process training with the memory bank split across ranks (docs/design.md#sharding).

Every rank holds the contiguous range of class-sorted slots ``shard_range(N, rank, world)``
(about N / W slots), never the whole bank and never a B x N tensor. One training step:

1. all_gather the batch (features, labels, class-sorted positions) from every rank: each rank
   then knows the global batch of B_tot = sum_r B_r queries (ranks may differ in B_r).
2. each rank computes :func:`snca.nca.shard_stats` of the whole global batch against its own
   slots: per query a max and a sum for the other-class and the same-class terms, and the two
   exp-weighted sums of slots (the gradient's two vectors).
3. one combine step: all_reduce MAX of the two max vectors (2 B_tot numbers); every rank
   rescales its sums to the global maxima (:func:`snca.nca.rescale_stats`), then all_reduce SUM
   of one flat buffer of sums and vectors (B_tot x (2D + 2) numbers). This is the exact
   log-sum-exp merge of :func:`snca.nca.merge_stats`, done across ranks.
4. each rank keeps the loss and the gradient of its own samples (nca_loss's ``gather`` and
   ``reducer`` hooks: the math lives in :mod:`snca.nca` only) and applies the momentum update
   to the slots it owns, using the batch it already gathered.

The per-rank loss is the mean over that rank's own batch, so DDP's gradient averaging gives
the gradient of the global mean loss when every rank has the same batch size (DistributedSampler
makes them equal). kNN search and checkpoints follow the same pattern: see :func:`knn_sharded`,
:func:`gather_bank_state` and :func:`shard_bank_state`.

Backends: gloo on CPU, NCCL on GPU (tensors live on the bank's device). Collectives that fail
(a rank died, or did not reach the same call within the process-group timeout) raise
:class:`DistributedError`, a one-line :class:`~snca.errors.SncaError`.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as differentiable
from torch import Tensor
from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor, init_from_local_shards
from torch.nn.parallel import DistributedDataParallel

from .errors import SncaError
from .knn import KNNResult, knn_search, vote
from .memory import MemoryBank, shard_range
from .nca import NCALoss, NCAStats, nca_loss, rescale_stats

DEFAULT_TIMEOUT_S = 600.0  # a dead or stuck rank fails the job after 10 min instead of hanging
_CHECKPOINT_BLOCK_BYTES = 32 << 20  # rows per send/recv when gathering the bank to rank 0

__all__ = [
    "COMM",
    "CommCounter",
    "DistInfo",
    "DistributedError",
    "ShardedNCALoss",
    "all_gather_rows",
    "all_reduce_sum",
    "barrier",
    "broadcast_object",
    "cleanup",
    "data_parallel",
    "gather_bank_state",
    "init_from_env",
    "is_distributed",
    "is_main",
    "knn_sharded",
    "load_bank_state",
    "local_range",
    "nca_loss_sharded",
    "no_sync",
    "rank",
    "reduce_stats",
    "shard_bank_state",
    "sharded_bank",
    "sharded_slots",
    "update_sharded",
    "world_size",
]


class DistributedError(SncaError):
    """A collective failed: another rank exited, or did not reach the same step in time."""


@dataclass
class CommCounter:
    """Bytes this rank moved through snca's collectives (for benchmarks and tests).

    all_gather / all_to_all count the bytes received (padding included), all_reduce the size of
    the reduced buffer, p2p the bytes sent plus received by send/recv (checkpoint gathering).
    """

    gathered: int = 0
    reduced: int = 0
    p2p: int = 0
    calls: int = 0
    by_op: dict[str, int] = field(default_factory=dict)

    def add(self, kind: str, op: str, num_bytes: int) -> None:
        setattr(self, kind, getattr(self, kind) + int(num_bytes))
        self.calls += 1
        self.by_op[op] = self.by_op.get(op, 0) + int(num_bytes)

    @property
    def total(self) -> int:
        return self.gathered + self.reduced + self.p2p

    def reset(self) -> None:
        self.gathered = self.reduced = self.p2p = self.calls = 0
        self.by_op = {}

    def as_dict(self) -> dict:
        return {
            "gathered": self.gathered, "reduced": self.reduced, "p2p": self.p2p,
            "total": self.total, "calls": self.calls, "by_op": dict(self.by_op),
        }


COMM = CommCounter()
_timeout_s: float | None = None


# ---------------------------------------------------------------------------- rank helpers
@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: returned by :func:`init_from_env`."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None  # None: single process, no process group


def is_distributed() -> bool:
    """True when a torch.distributed process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def rank(group: dist.ProcessGroup | None = None) -> int:
    return dist.get_rank(group) if is_distributed() else 0


def world_size(group: dist.ProcessGroup | None = None) -> int:
    return dist.get_world_size(group) if is_distributed() else 1


def is_main() -> bool:
    """Rank 0 (or a single process): the one that logs and writes checkpoints."""
    return rank() == 0


def local_range(num_items: int, group: dist.ProcessGroup | None = None) -> range:
    """This rank's contiguous share of ``num_items`` (no padding, unlike DistributedSampler):
    use it to split an evaluation set so every item is scored exactly once."""
    start, end = shard_range(num_items, rank(group), world_size(group))
    return range(start, end)


def _env_int(name: str, default: int | None = None) -> int:
    value = os.environ.get(name)
    if value is None:
        if default is None:
            raise SncaError(f"environment variable {name} is not set: launch with torchrun (see docs/distributed.md)")
        return default
    try:
        return int(value)
    except ValueError:
        raise SncaError(f"environment variable {name}={value!r} is not an integer") from None


def init_from_env(backend: str | None = None, timeout_s: float | None = None) -> DistInfo:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
    MASTER_PORT). Without WORLD_SIZE, or with WORLD_SIZE=1, no group is created and everything
    in this module runs as a single process.

    backend: "nccl" when CUDA is available, else "gloo". With NCCL the CUDA device is set from
    LOCAL_RANK. timeout_s: how long a collective waits for the other ranks before the job fails
    (default 600 s, or $SNCA_DIST_TIMEOUT); raise it if rank-0-only work (a long evaluation,
    writing a large checkpoint) can keep the other ranks waiting longer.
    """
    global _timeout_s
    world = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    if timeout_s is None:
        timeout_s = float(os.environ.get("SNCA_DIST_TIMEOUT", DEFAULT_TIMEOUT_S))
    if not timeout_s > 0:
        raise SncaError(f"distributed timeout must be > 0 seconds, got {timeout_s}")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("nccl", "gloo"):
        raise SncaError(f"distributed backend must be 'nccl' or 'gloo', got {backend!r}")
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise SncaError("backend 'nccl' needs CUDA GPUs; use backend='gloo' on CPU")
        if local_rank >= torch.cuda.device_count():
            raise SncaError(
                f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA devices are visible: "
                "start at most one process per GPU (torchrun --nproc-per-node)"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")

    if is_distributed():  # already joined (e.g. by the caller): just describe it
        _timeout_s = _timeout_s or timeout_s
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device, dist.get_backend())
    if world <= 1:
        return DistInfo(0, 1, local_rank, device, None)
    global_rank = _env_int("RANK")
    if not os.environ.get("MASTER_ADDR"):
        raise SncaError("environment variable MASTER_ADDR is not set: launch with torchrun (see docs/distributed.md)")
    _env_int("MASTER_PORT")
    if not 0 <= global_rank < world:
        raise SncaError(f"RANK={global_rank} is outside [0, WORLD_SIZE={world})")
    kwargs: dict = {"backend": backend, "timeout": timedelta(seconds=timeout_s), "rank": global_rank, "world_size": world}
    if backend == "nccl":
        kwargs["device_id"] = device  # binds the communicator to this GPU up front
    try:
        dist.init_process_group(init_method="env://", **kwargs)
    except (RuntimeError, ValueError) as err:
        raise DistributedError(
            f"rank {global_rank} could not join the process group at "
            f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} ({_first_line(err)}); "
            "check that every rank was started with the same rendezvous settings"
        ) from err
    _timeout_s = timeout_s
    return DistInfo(global_rank, world, local_rank, device, backend)


def cleanup() -> None:
    """Leave the process group (call once at the end of training)."""
    global _timeout_s
    if is_distributed():
        dist.destroy_process_group()
    _timeout_s = None


def barrier(group: dist.ProcessGroup | None = None) -> None:
    if world_size(group) > 1:
        with _guard("barrier", group):
            dist.barrier(group=group)


def broadcast_object(obj: object, src: int = 0, group: dist.ProcessGroup | None = None) -> object:
    """Rank ``src``'s (picklable) ``obj`` on every rank, e.g. the run directory rank 0 chose."""
    if world_size(group) == 1:
        return obj
    box = [obj if rank(group) == src else None]
    with _guard("broadcast_object", group):
        dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def all_gather_object(obj: object, group: dist.ProcessGroup | None = None) -> list[object]:
    """Every rank's (picklable) ``obj``, in rank order, on every rank."""
    if world_size(group) == 1:
        return [obj]
    box: list[object] = [None] * world_size(group)
    with _guard("all_gather_object", group):
        dist.all_gather_object(box, obj, group=group)
    return box


# ---------------------------------------------------------------------------- data parallel
def data_parallel(module: torch.nn.Module, device: torch.device, group: dist.ProcessGroup | None = None) -> torch.nn.Module:
    """``module`` under DistributedDataParallel when several ranks train, else ``module``
    itself: the single-process path is the W = 1 case of the same code."""
    if world_size(group) == 1:
        return module
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(module, device_ids=ids, process_group=group)


class SyncBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    """Batch norm over the batch of every rank, for devices torch's own
    :class:`torch.nn.SyncBatchNorm` does not run on (CPU with gloo). The statistics are summed
    across ranks with the differentiable all-reduce of :mod:`torch.distributed.nn`, whose
    backward sums the gradient contributions alike, so each rank's result and gradient equal
    those of one batch norm over the union of the ranks' batches. Two passes (the mean, then
    the centred squares) keep the variance as exact as the local one. Same parameters and
    buffers as the batch norm it replaces: checkpoints load into a plain model."""

    def __init__(self, *args: Any, group: dist.ProcessGroup | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.group = group

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {x.dim()}-D")

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or world_size(self.group) == 1:
            return super().forward(x)
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        count = torch.full((1,), x.numel() / x.shape[1], dtype=x.dtype, device=x.device)
        with _guard("sync batch norm (all_reduce)", self.group):
            total = differentiable.all_reduce(torch.cat([x.sum(dims), count]), group=self.group or dist.group.WORLD)
            n = total[-1]
            mean = total[:-1] / n
            centred = x - mean.view(shape)
            var = differentiable.all_reduce((centred * centred).sum(dims), group=self.group or dist.group.WORLD) / n
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * (n / (n - 1).clamp_min(1)), alpha=m)
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def sync_batch_norm(module: torch.nn.Module, device: torch.device, group: dist.ProcessGroup | None = None) -> torch.nn.Module:
    """``module`` with every batch norm computing its statistics over all ranks' batches
    (``--sync-bn``): torch's :class:`torch.nn.SyncBatchNorm` on CUDA, :class:`SyncBatchNorm`
    elsewhere; unchanged in one process. Parameters and buffers are kept, not copied."""
    if world_size(group) == 1:
        return module
    if device.type == "cuda":
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(module, group)

    def convert(m: torch.nn.Module) -> torch.nn.Module:
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and not isinstance(m, SyncBatchNorm):
            new = SyncBatchNorm(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats, group=group)
            for name in ("weight", "bias"):
                if getattr(m, name, None) is not None:
                    setattr(new, name, getattr(m, name))
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                if getattr(m, name, None) is not None:
                    setattr(new, name, getattr(m, name))
            new.train(m.training)
            return new
        for name, child in m.named_children():
            m.add_module(name, convert(child))
        return m

    return convert(module)


def no_sync(module: torch.nn.Module, sync: bool) -> AbstractContextManager:
    """DDP's ``no_sync`` (skip the gradient all-reduce of this backward) unless ``sync``; a
    no-op for a plain module. Gradient accumulation syncs on its last micro-batch only."""
    if sync or not hasattr(module, "no_sync"):
        return nullcontext()
    return module.no_sync()


# ---------------------------------------------------------------------------- collectives
def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    # Drop the backend's "[path/to/source.cc:123] " prefix: it says nothing to the user.
    line = re.sub(r"^\[[^\]]*\]\s*", "", text[0]) if text else type(err).__name__
    return line if len(line) <= 240 else line[:237] + "..."


def _lost_rank(what: str, group: dist.ProcessGroup | None, err: BaseException) -> DistributedError:
    timeout = f"{_timeout_s:g} s" if _timeout_s else "the process-group timeout"
    return DistributedError(
        f"{what} failed on rank {rank(group)} of {world_size(group)}: another rank exited or did "
        f"not reach the same step within {timeout} ({_first_line(err)}); see the other ranks' logs"
    )


@contextmanager
def _guard(what: str, group: dist.ProcessGroup | None) -> Iterator[None]:
    """Turn a backend failure into one clear line saying which rank and which call."""
    try:
        yield
    except SncaError:
        raise
    except RuntimeError as err:  # DistBackendError, gloo timeouts and connection resets
        raise _lost_rank(what, group, err) from err


# What gloo and NCCL say when a peer is gone or late; DDP raises them as plain RuntimeErrors.
_BACKEND_FAILURE = re.compile(r"gloo|nccl|timed out|timeout|connection (reset|closed|refused)|broken pipe|by peer", re.I)


@contextmanager
def collectives(what: str, group: dist.ProcessGroup | None = None) -> Iterator[None]:
    """For code that runs collectives it does not call itself (DDP broadcasts buffers in the
    forward pass and all-reduces gradients in the backward pass): a backend failure inside the
    block becomes the same one-line :class:`DistributedError`, naming the rank and ``what``
    (e.g. the step); other errors pass unchanged. Nothing to guard in one process."""
    if world_size(group) == 1:
        yield
        return
    try:
        yield
    except SncaError:
        raise
    except RuntimeError as err:
        if not (isinstance(err, dist.DistError) or _BACKEND_FAILURE.search(str(err))):
            raise
        raise _lost_rank(what, group, err) from err


def _comm_device(group: dist.ProcessGroup | None) -> torch.device:
    """Device for small bookkeeping tensors: NCCL only moves CUDA tensors."""
    if is_distributed() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _as_bytes(t: Tensor) -> Tensor:
    """(n, ...) tensor -> (n, row_bytes) uint8 view: one buffer carries mixed dtypes bit-exactly."""
    t = t.contiguous()
    return t.reshape(t.shape[0], -1).view(torch.uint8) if t.numel() else torch.empty(
        t.shape[0], _row_bytes(t), dtype=torch.uint8, device=t.device
    )


def _row_bytes(t: Tensor) -> int:
    return math.prod(t.shape[1:]) * t.element_size()


def _from_bytes(buf: Tensor, like: Tensor) -> Tensor:
    rows = buf.shape[0]
    if rows == 0:
        return torch.empty((0, *like.shape[1:]), dtype=like.dtype, device=buf.device)
    return buf.contiguous().view(like.dtype).reshape(rows, *like.shape[1:])


def _pack(tensors: Sequence[Tensor]) -> tuple[Tensor, list[int]]:
    n = tensors[0].shape[0]
    if any(t.shape[0] != n for t in tensors):
        raise SncaError("tensors gathered together must have the same number of rows")
    device = tensors[0].device
    parts = [_as_bytes(t.to(device)) for t in tensors]
    return torch.cat(parts, 1), [p.shape[1] for p in parts]


def _unpack(buf: Tensor, widths: list[int], likes: Sequence[Tensor]) -> list[Tensor]:
    out, col = [], 0
    for width, like in zip(widths, likes, strict=True):
        out.append(_from_bytes(buf[:, col : col + width], like))
        col += width
    return out


def _gather_ints(values: Sequence[int], group: dist.ProcessGroup | None, what: str) -> list[list[int]]:
    """all_gather a few integers per rank."""
    device = _comm_device(group)
    local = torch.tensor(list(values), dtype=torch.long, device=device)
    world = world_size(group)
    if world == 1:
        return [local.tolist()]
    out = [torch.empty_like(local) for _ in range(world)]
    with _guard(what, group):
        dist.all_gather(out, local, group=group)
    COMM.add("gathered", what, world * local.numel() * 8)
    return [t.tolist() for t in out]


def all_gather_rows(
    tensors: Sequence[Tensor], group: dist.ProcessGroup | None = None, what: str = "all_gather_rows"
) -> tuple[list[Tensor], list[int]]:
    """Concatenate, over ranks in rank order, tensors whose row counts may differ per rank.

    All ``tensors`` on a rank share their number of rows; trailing shapes and dtypes must match
    across ranks. Sizes are gathered first, then one padded all_gather carries every tensor as
    raw bytes. Returns (the concatenated tensors, the row count of each rank).
    """
    world = world_size(group)
    n = tensors[0].shape[0]
    if world == 1:
        return [t for t in tensors], [n]
    sizes = [s[0] for s in _gather_ints([n], group, what)]
    buf, widths = _pack(tensors)
    longest = max(sizes)
    if buf.shape[0] < longest:
        buf = torch.cat([buf, buf.new_zeros(longest - buf.shape[0], buf.shape[1])])
    out = [torch.empty_like(buf) for _ in range(world)]
    with _guard(what, group):
        dist.all_gather(out, buf, group=group)
    COMM.add("gathered", what, world * buf.numel())
    full = torch.cat([o[:s] for o, s in zip(out, sizes, strict=True)])
    return _unpack(full, widths, tensors), sizes


def _all_to_all_rows(
    tensors: Sequence[Tensor], send_sizes: list[int], recv_rows: int, group: dist.ProcessGroup | None, what: str
) -> list[Tensor]:
    """Rows [off_r, off_r + send_sizes[r]) go to rank r; returns what every rank sent here,
    as (world * recv_rows, ...) in source-rank order (each source sends ``recv_rows`` rows)."""
    world = world_size(group)
    if world == 1:
        return list(tensors)
    buf, widths = _pack(tensors)
    out = buf.new_empty(world * recv_rows, buf.shape[1])
    with _guard(what, group):
        dist.all_to_all_single(out, buf, [recv_rows] * world, list(send_sizes), group=group)
    COMM.add("gathered", what, out.numel())
    return _unpack(out, widths, tensors)


def all_reduce_sum(value: Tensor | float | int, group: dist.ProcessGroup | None = None) -> Tensor:
    """Sum of a tensor (or number) over ranks, e.g. correct-prediction counts for accuracy."""
    t = torch.as_tensor(value).clone()
    if world_size(group) == 1:
        return t
    device = t.device if t.device.type != "cpu" else _comm_device(group)
    moved = t.to(device)
    with _guard("all_reduce_sum", group):
        dist.all_reduce(moved, op=dist.ReduceOp.SUM, group=group)
    COMM.add("reduced", "all_reduce_sum", moved.numel() * moved.element_size())
    return moved.to(t.device)


# ---------------------------------------------------------------------------- sharded bank
def _check_bank_group(bank: MemoryBank, group: dist.ProcessGroup | None) -> None:
    if (bank.rank, bank.world_size) != (rank(group), world_size(group)):
        raise SncaError(
            f"memory bank shard is {bank.rank} of {bank.world_size} but this process is rank "
            f"{rank(group)} of {world_size(group)}: build it with snca.distributed.sharded_bank"
        )


def sharded_bank(
    labels: Tensor | Sequence[int],
    dim: int = 128,
    momentum: float = 0.5,
    dtype: torch.dtype = torch.float32,
    generator: torch.Generator | None = None,
    num_classes: int | None = None,
    device: torch.device | str | None = None,
    group: dist.ProcessGroup | None = None,
) -> MemoryBank:
    """A :class:`MemoryBank` holding this rank's shard (about N / W slots).

    Every rank must pass the same labels (checked) and a CPU generator in the same state: the
    shard then equals the matching class-sorted rows of a single-process bank built with that
    generator. Without a generator, rank 0 draws a seed from the global RNG and shares it.
    ``device``: where the slots live; defaults to the current CUDA device under NCCL, else CPU.
    """
    labels = torch.as_tensor(labels, dtype=torch.long, device="cpu").flatten()
    world, me = world_size(group), rank(group)
    if world > 1:
        # A cheap fingerprint of the labels: ranks built from different datasets, subsets or
        # label sets would silently train on inconsistent shards.
        weights = torch.arange(labels.numel()) % 65521 + 1
        fingerprint = [labels.numel(), int(labels.sum()), int((labels * weights).sum())]
        seed = int(torch.randint(0, 2**62, (1,))) if (generator is None and me == 0) else 0
        gathered = _gather_ints([*fingerprint, seed], group, "sharded_bank")
        if any(g[:3] != gathered[0][:3] for g in gathered):
            raise SncaError(
                "ranks passed different training labels to sharded_bank: every rank must build the "
                "memory from the same full training set (not its DistributedSampler share)"
            )
        if generator is None:
            generator = torch.Generator().manual_seed(gathered[0][3])
    if device is None:
        device = _comm_device(group)
    return MemoryBank(
        labels, dim=dim, momentum=momentum, dtype=dtype, shard=(me, world),
        generator=generator, num_classes=num_classes, device=device,
    )


def reduce_stats(stats: NCAStats, group: dist.ProcessGroup | None = None) -> NCAStats:
    """Combine per-shard NCA statistics of the same queries into the statistics of the whole
    memory: all_reduce MAX of the maxima, rescale, all_reduce SUM of sums and vectors."""
    if world_size(group) == 1:
        return stats
    b = stats.max_other.shape[0]
    maxima = torch.cat([stats.max_other, stats.max_same])
    with _guard("nca_loss_sharded (all_reduce max)", group):
        dist.all_reduce(maxima, op=dist.ReduceOp.MAX, group=group)
    COMM.add("reduced", "nca_max", maxima.numel() * maxima.element_size())
    max_other, max_same = maxima[:b], maxima[b:]
    local = rescale_stats(stats, max_other, max_same)
    flat = torch.cat([local.sum_other[:, None], local.vec_other, local.sum_same[:, None], local.vec_same], 1)
    with _guard("nca_loss_sharded (all_reduce sum)", group):
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    COMM.add("reduced", "nca_sum", flat.numel() * flat.element_size())
    dim = stats.vec_other.shape[1]
    return NCAStats(
        max_other, flat[:, 0].contiguous(), flat[:, 1 : dim + 1].contiguous(),
        max_same, flat[:, dim + 1].contiguous(), flat[:, dim + 2 :].contiguous(),
    )


def nca_loss_sharded(
    features: Tensor,
    indices: Tensor | None,
    bank: MemoryBank,
    temperature: float = 0.05,
    margin: float = 0.0,
    group: dist.ProcessGroup | None = None,
    *,
    labels: Tensor | None = None,
    chunk_size: int | None = None,
    reduction: str = "mean",
    update_memory: bool = False,
    momentum: float | None = None,
) -> Tensor:
    """Exact NCA loss of this rank's batch against the memory sharded over all ranks.

    Same arguments and result as :func:`snca.nca_loss` on the whole (unsharded) memory; every
    rank must call it at the same step (batch sizes may differ, even be 0). ``reduction="mean"``
    divides by this rank's batch size. ``update_memory=True`` then applies the momentum update
    of the whole global batch to the slots this rank owns, reusing the gathered batch (no second
    all_gather; the same as calling :func:`update_sharded` afterwards).
    """
    _check_bank_group(bank, group)
    if update_memory and indices is None:
        raise SncaError("update_memory=True needs the samples' dataset indices")
    if world_size(group) == 1:
        loss = nca_loss(features, indices, bank, temperature, margin, labels=labels, chunk_size=chunk_size, reduction=reduction)
        if update_memory:
            bank.update(features.detach(), indices, momentum)
        return loss

    gathered: dict[str, Tensor] = {}

    def gather(queries: Tensor, query_labels: Tensor, positions: Tensor):
        (all_q, all_labels, all_pos), sizes = all_gather_rows(
            [queries, query_labels, positions], group, "nca_loss_sharded (all_gather batch)"
        )
        start = sum(sizes[: rank(group)])
        gathered["queries"], gathered["positions"] = all_q, all_pos
        return all_q, all_labels, all_pos, slice(start, start + queries.shape[0])

    loss = nca_loss(
        features, indices, bank, temperature, margin, labels=labels, chunk_size=chunk_size,
        reduction=reduction, reducer=lambda stats: reduce_stats(stats, group), gather=gather,
    )
    if update_memory:
        all_indices = bank.index_of_position[gathered["positions"]]
        bank.update(gathered["queries"], all_indices, momentum)
    return loss


@torch.no_grad()
def update_sharded(
    bank: MemoryBank,
    features: Tensor,
    indices: Tensor,
    momentum: float | None = None,
    group: dist.ProcessGroup | None = None,
) -> None:
    """Momentum update of the sharded memory with every rank's batch: each rank gathers all
    (features, indices) and updates the slots it owns. Duplicate indices (within or across
    ranks) are averaged, exactly as one process updating with the concatenated batch."""
    _check_bank_group(bank, group)
    indices = bank.check_indices(indices).to(bank.device)
    features = features.detach().to(bank.device, torch.float32)
    if features.ndim != 2 or features.shape != (indices.numel(), bank.dim):
        raise SncaError(
            f"memory update expects features of shape ({indices.numel()}, {bank.dim}), got {tuple(features.shape)}"
        )
    (all_f, all_i), _ = all_gather_rows([features, indices], group, "update_sharded")
    bank.update(all_f, all_i, momentum)


class ShardedNCALoss(NCALoss):
    """:class:`snca.NCALoss` for a sharded bank: loss, then (in training mode) the memory update,
    with one all_gather of the batch per step."""

    def __init__(
        self,
        bank: MemoryBank,
        temperature: float = 0.05,
        margin: float = 0.0,
        update_memory: bool = True,
        chunk_size: int | None = None,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__(bank, temperature, margin, update_memory, chunk_size)
        self.group = group

    def forward(self, features: Tensor, indices: Tensor) -> Tensor:
        return nca_loss_sharded(
            features, indices, self.bank, self.temperature, self.margin, self.group,
            chunk_size=self.chunk_size, update_memory=self.update_memory and self.training,
        )


# ---------------------------------------------------------------------------- kNN
@torch.no_grad()
def knn_sharded(
    queries: Tensor,
    gallery: MemoryBank | Tensor,
    gallery_labels: Tensor | None = None,
    gallery_ids: Tensor | None = None,
    k: int | Sequence[int] = 30,
    sigma: float = 0.05,
    num_classes: int | None = None,
    exclude: Tensor | None = None,
    query_block: int = 1024,
    group: dist.ProcessGroup | None = None,
) -> KNNResult | dict[int, KNNResult]:
    """Weighted kNN of this rank's queries against a gallery split across ranks.

    ``gallery`` is a sharded :class:`MemoryBank` (its slots, labels and dataset indices) or this
    rank's rows of a gallery matrix, with ``gallery_labels`` and optional global ``gallery_ids``
    (default: the row number in the rank-order concatenation of all shards). Queries of every
    rank are gathered block by block; each rank searches its shard (local top-k), the candidates
    go back to the rank that owns the query, which merges them into the global top-k and votes.
    ``exclude``: (Q,) gallery id to skip per query (its own id for leave-one-out), -1 for none.
    Returns what :func:`snca.knn_classify` returns for this rank's queries on the whole
    gallery, with ``indices`` holding gallery ids; ties may be broken differently.
    """
    ks = [k] if isinstance(k, int) else sorted(set(int(x) for x in k))
    if not ks or min(ks) < 1:
        raise SncaError(f"k must be >= 1, got {k}")
    if query_block < 1:
        raise SncaError(f"query_block must be >= 1, got {query_block}")
    if isinstance(gallery, MemoryBank):
        bank = gallery
        _check_bank_group(bank, group)
        rows = bank.slots
        g_labels = bank.sorted_labels[bank.shard_start : bank.shard_end]
        g_ids = bank.index_of_position[bank.shard_start : bank.shard_end]
        if num_classes is None:
            num_classes = bank.num_classes
    else:
        rows = gallery
        if gallery_labels is None:
            raise SncaError("knn_sharded needs gallery_labels for a gallery given as a tensor")
        g_labels = torch.as_tensor(gallery_labels, device=rows.device).long().flatten()
        if g_labels.numel() != rows.shape[0]:
            raise SncaError(f"gallery shard has {rows.shape[0]} rows but {g_labels.numel()} labels")
        g_ids = None if gallery_ids is None else torch.as_tensor(gallery_ids, device=rows.device).long().flatten()
        if g_ids is not None and g_ids.numel() != rows.shape[0]:
            raise SncaError(f"gallery shard has {rows.shape[0]} rows but {g_ids.numel()} ids")
    if queries.ndim != 2 or rows.ndim != 2 or queries.shape[1] != rows.shape[1]:
        raise SncaError(
            f"queries {tuple(queries.shape)} and gallery {tuple(rows.shape)} must be 2-D with the same dim"
        )
    device = rows.device
    queries = queries.detach().to(device, torch.float32)
    num_q = queries.shape[0]
    if exclude is None:
        excl = None
    else:
        excl = torch.as_tensor(exclude, device=device).long().flatten()
        if excl.numel() != num_q:
            raise SncaError(f"exclude has {excl.numel()} entries for {num_q} queries")

    local_max_label = int(g_labels.max()) if g_labels.numel() else -1
    facts = _gather_ints([rows.shape[0], local_max_label, num_q], group, "knn_sharded")
    shard_rows = [f[0] for f in facts]
    total = sum(shard_rows)
    if total == 0:
        raise SncaError("the gallery is empty: add labelled examples before searching")
    if num_classes is None:
        num_classes = max(f[1] for f in facts) + 1
    if g_ids is None:
        offset = sum(shard_rows[: rank(group)])
        g_ids = torch.arange(offset, offset + rows.shape[0], device=device)
    extra = 0 if excl is None else 1
    k_max = max(ks)
    k_eff = min(k_max, total - extra)
    if k_eff < 1:
        raise SncaError("the gallery has no row left once each query's own row is excluded")
    width = k_max + extra  # candidates per shard: one more when a query's own row may be among them
    k_local = min(width, rows.shape[0])
    rounds = math.ceil(max(f[2] for f in facts) / query_block)

    out_sims, out_ids, out_labels = [], [], []
    me, world = rank(group), world_size(group)
    for r in range(rounds):
        block = slice(r * query_block, (r + 1) * query_block)
        q = queries[block]
        e = excl[block] if excl is not None else torch.full((q.shape[0],), -1, dtype=torch.long, device=device)
        (all_q, all_e), sizes = all_gather_rows([q, e], group, "knn_sharded (all_gather queries)")
        n_all = all_q.shape[0]
        sims = torch.full((n_all, width), -math.inf, device=device)
        ids = torch.full((n_all, width), -1, dtype=torch.long, device=device)
        labs = torch.zeros((n_all, width), dtype=torch.long, device=device)
        if k_local > 0 and n_all > 0:
            s, local_rows = knn_search(all_q, rows, k_local)
            found = g_ids[local_rows]
            if excl is not None:
                s = s.masked_fill(found == all_e[:, None], -math.inf)
            sims[:, :k_local], ids[:, :k_local], labs[:, :k_local] = s.float(), found, g_labels[local_rows]
        # Candidates for rank r's queries go to rank r, which merges the W lists.
        n_own = sizes[me]
        sims, ids, labs = _all_to_all_rows([sims, ids, labs], sizes, n_own, group, "knn_sharded (all_to_all candidates)")
        cand = [t.reshape(world, n_own, width).permute(1, 0, 2).reshape(n_own, world * width) for t in (sims, ids, labs)]
        best, pick = cand[0].topk(k_eff, dim=1)
        out_sims.append(best)
        out_ids.append(cand[1].gather(1, pick))
        out_labels.append(cand[2].gather(1, pick))

    def cat(parts: list[Tensor], dtype: torch.dtype) -> Tensor:
        return torch.cat(parts) if parts else torch.empty(0, k_eff, dtype=dtype, device=device)

    sims, ids, labs = cat(out_sims, torch.float32), cat(out_ids, torch.long), cat(out_labels, torch.long)
    results = {}
    for kk in ks:
        kk_eff = min(kk, k_eff)
        scores = vote(sims[:, :kk_eff], labs[:, :kk_eff], num_classes, sigma)
        predictions = scores.topk(min(5, num_classes), dim=1).indices
        results[kk] = KNNResult(sims[:, :kk_eff], ids[:, :kk_eff], scores, predictions)
    return results[ks[0]] if isinstance(k, int) else results


# ---------------------------------------------------------------------------- checkpoints
def _full_extra_state(bank: MemoryBank) -> dict:
    extra = dict(bank.get_extra_state())
    extra["shard"] = [0, 1]
    return extra


def sharded_slots(bank: MemoryBank, group: dist.ProcessGroup | None = None) -> ShardedTensor:
    """This rank's slots as a ShardedTensor over all ranks (rows ``shard_range`` of the
    class-sorted bank): what torch.distributed.checkpoint saves, each rank writing its own rows,
    and reshards on load to any other world size. No rank holds more than its shard."""
    _check_bank_group(bank, group)
    n, world, me = bank.num_samples, world_size(group), rank(group)
    start, end = shard_range(n, me, world)
    placement = f"rank:{me}/{bank.slots.device}"
    meta = ShardMetadata(shard_offsets=[start, 0], shard_sizes=[end - start, bank.dim], placement=placement)
    return init_from_local_shards([Shard(bank.slots, meta)], [n, bank.dim], process_group=group)


def gather_bank_state(bank: MemoryBank, group: dist.ProcessGroup | None = None) -> dict | None:
    """The state_dict of the whole bank, exactly what an unsharded ``MemoryBank.state_dict()``
    holds (labels by dataset index, all slots in class-sorted order, on CPU), returned on rank 0;
    the other ranks get None. Every rank must call it. Rank 0 receives the shards block by block
    (point-to-point), so besides the result no rank holds more than one 32 MiB block extra."""
    _check_bank_group(bank, group)
    world, me = world_size(group), rank(group)
    if world == 1:
        return {"labels": bank.labels.cpu().clone(), "slots": bank.slots.cpu().clone(), "_extra_state": _full_extra_state(bank)}
    n, dim, dtype = bank.num_samples, bank.dim, bank.slots.dtype
    block = max(1, _CHECKPOINT_BLOCK_BYTES // (dim * bank.slots.element_size()))
    peer = lambda r: dist.get_global_rank(group, r) if group is not None else r  # noqa: E731
    full = torch.empty(n, dim, dtype=dtype) if me == 0 else None
    with _guard("gather_bank_state", group):
        for r in range(world):
            start, end = shard_range(n, r, world)
            if me == 0 and r == 0:
                full[start:end] = bank.slots.cpu()
                continue
            for a in range(start, end, block):
                b = min(end, a + block)
                if me == r:
                    payload = _as_bytes(bank.slots[a - start : b - start])
                    dist.send(payload, dst=peer(0), group=group)
                    COMM.add("p2p", "gather_bank_state", payload.numel())
                elif me == 0:
                    buf = torch.empty(b - a, dim, dtype=dtype, device=bank.device)
                    payload = _as_bytes(buf)
                    dist.recv(payload, src=peer(r), group=group)
                    COMM.add("p2p", "gather_bank_state", payload.numel())
                    full[a:b] = _from_bytes(payload, buf).cpu()
    if me != 0:
        return None
    return {"labels": bank.labels.cpu().clone(), "slots": full, "_extra_state": _full_extra_state(bank)}


def shard_bank_state(full_state: Mapping[str, object], rank: int, world_size: int) -> dict:
    """The state of shard ``rank`` of ``world_size`` cut from a full bank state (from
    :func:`gather_bank_state` or a single-process ``MemoryBank.state_dict()``): load it with
    ``bank.load_state_dict(...)`` into a bank built with ``shard=(rank, world_size)``. The
    checkpoint layout does not depend on the world size, so W ranks can resume from W' ranks."""
    try:
        labels, slots, extra = full_state["labels"], full_state["slots"], full_state["_extra_state"]
    except (KeyError, TypeError):
        raise SncaError("not a memory bank state: expected the keys 'labels', 'slots' and '_extra_state'") from None
    if not (isinstance(labels, Tensor) and isinstance(slots, Tensor) and isinstance(extra, Mapping)):
        raise SncaError("not a memory bank state: 'labels' and 'slots' must be tensors, '_extra_state' a dict")
    n = labels.numel()
    saved_shard = list(extra.get("shard", [0, 1]))
    if slots.ndim != 2 or slots.shape[0] != n or saved_shard[1] != 1:
        raise SncaError(
            f"memory state holds {slots.shape[0]} of {n} slots (shard {saved_shard[0]} of {saved_shard[1]}): "
            "save the whole bank with snca.distributed.gather_bank_state"
        )
    start, end = shard_range(n, rank, world_size)
    out_extra = dict(extra)
    out_extra["shard"] = [rank, world_size]
    # clone: the caller can drop the full state and keep only its shard.
    return {"labels": labels, "slots": slots[start:end].clone(), "_extra_state": out_extra}


def load_bank_state(bank: MemoryBank, full_state: Mapping[str, object]) -> None:
    """Load a full (world-size independent) bank state into this rank's shard."""
    bank.load_state_dict(shard_bank_state(full_state, bank.rank, bank.world_size))
