"""The augmented memory: one L2-normalised slot per training sample, addressed by dataset index.

Slots are stored *grouped by class* (a stable sort of the labels), so the same-class slots of
any query are one contiguous slice. That is what lets the NCA loss compute its same-class
sums without a third pass over the whole memory. The layout is a deterministic function of
the labels, so a state_dict saved on one machine (or one shard layout) loads on another.

Sharding: a bank built with ``shard=(rank, world_size)`` stores only the contiguous range of
class-sorted positions ``[shard_start, shard_end)``; the index maps (a few int64 per sample)
stay global so any rank can locate any sample.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import SncaError

_STORAGE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def shard_range(num_positions: int, rank: int, world_size: int) -> tuple[int, int]:
    """Even split of ``num_positions`` class-sorted positions; rank r gets [start, end)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise SncaError(f"invalid shard rank={rank} world_size={world_size}: need 0 <= rank < world_size")
    base, extra = divmod(num_positions, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


class MemoryBank(torch.nn.Module):
    """Momentum memory of L2-normalised features, one slot per training sample.

    Args:
        labels: class label of every training sample, by dataset index (length N, values in
            [0, num_classes)).
        dim: feature dimension D.
        momentum: mu in ``m <- normalise(mu * m + (1 - mu) * v)``; change it at any time with
            :meth:`set_momentum` (e.g. 0.5 -> 0.8 -> 0.9 in the ImageNet recipe).
        dtype: slot storage dtype; float32 by default, float16/bfloat16 halve a very large bank.
            Arithmetic always happens in float32.
        shard: ``(rank, world_size)`` to store only this rank's share of the slots.
        generator: RNG for the initial slots (uniform in +-1/sqrt(D/3), as in the reference,
            then normalised so every slot is a unit vector from the start).
        num_classes: defaults to ``max(labels) + 1``.
    """

    slots: Tensor
    labels: Tensor
    position: Tensor
    sorted_labels: Tensor
    index_of_position: Tensor
    class_offsets: Tensor

    def __init__(
        self,
        labels: Tensor | Sequence[int],
        dim: int = 128,
        momentum: float = 0.5,
        dtype: torch.dtype = torch.float32,
        shard: tuple[int, int] = (0, 1),
        generator: torch.Generator | None = None,
        num_classes: int | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        labels = torch.as_tensor(labels, dtype=torch.long, device="cpu").flatten()
        if labels.numel() == 0:
            raise SncaError("MemoryBank needs at least one sample; the training set is empty")
        if int(labels.min()) < 0:
            raise SncaError("MemoryBank labels must be >= 0; remap or drop unlabelled samples first")
        if dim < 1:
            raise SncaError(f"MemoryBank dim must be >= 1, got {dim}")
        if dtype not in _STORAGE_DTYPES:
            raise SncaError(f"MemoryBank dtype must be one of {_STORAGE_DTYPES}, got {dtype}")
        self.num_samples = labels.numel()
        self.dim = dim
        self.num_classes = int(num_classes if num_classes is not None else int(labels.max()) + 1)
        if int(labels.max()) >= self.num_classes:
            raise SncaError(f"label {int(labels.max())} >= num_classes={self.num_classes}")
        self.set_momentum(momentum)
        self.rank, self.world_size = shard
        self.shard_start, self.shard_end = shard_range(self.num_samples, *shard)

        order = torch.argsort(labels, stable=True)
        position = torch.empty_like(order)
        position[order] = torch.arange(self.num_samples)
        counts = torch.bincount(labels, minlength=self.num_classes)
        offsets = torch.zeros(self.num_classes + 1, dtype=torch.long)
        offsets[1:] = torch.cumsum(counts, 0)

        self.register_buffer("labels", labels)
        # Derived from labels: not saved, rebuilt identically on load.
        self.register_buffer("position", position, persistent=False)
        self.register_buffer("index_of_position", order, persistent=False)
        self.register_buffer("sorted_labels", labels[order], persistent=False)
        self.register_buffer("class_offsets", offsets, persistent=False)

        # Drawn in index order in fixed blocks, keeping only this shard's rows: a sharded bank
        # starts equal to the matching rows of a single-process bank with the same generator,
        # and no rank ever allocates the whole bank.
        stdv = 1.0 / math.sqrt(dim / 3)
        init = torch.empty(self.shard_end - self.shard_start, dim)
        block = 1 << 16
        for a in range(0, self.num_samples, block):
            rows = torch.rand(min(block, self.num_samples - a), dim, generator=generator)
            local = position[a : a + block] - self.shard_start
            keep = (local >= 0) & (local < init.shape[0])
            init[local[keep]] = rows[keep].mul_(2 * stdv).sub_(stdv)
        init.div_(init.norm(dim=1, keepdim=True).clamp_min_(1e-12))  # in place: no second bank-sized copy
        self.register_buffer("slots", init.to(dtype))
        if device is not None:
            self.to(device)

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return self.slots.device

    @property
    def is_sharded(self) -> bool:
        return self.world_size > 1

    def set_momentum(self, momentum: float) -> None:
        if not 0.0 <= momentum < 1.0:
            raise SncaError(f"memory momentum must be in [0, 1), got {momentum}")
        self.momentum = float(momentum)

    def extra_repr(self) -> str:
        return (
            f"num_samples={self.num_samples}, dim={self.dim}, num_classes={self.num_classes}, "
            f"momentum={self.momentum}, dtype={self.slots.dtype}, "
            f"shard=[{self.shard_start}, {self.shard_end}) of {self.num_samples}"
        )

    # ------------------------------------------------------------------ access
    def check_indices(self, indices: Tensor) -> Tensor:
        indices = torch.as_tensor(indices, device=self.labels.device).long().flatten()
        if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= self.num_samples):
            raise SncaError(
                f"sample index out of range [0, {self.num_samples}): the dataset must return its "
                "own index and match the one the memory was built for"
            )
        return indices

    def get(self, indices: Tensor) -> Tensor:
        """Float32 slots of the given dataset indices (all must live in this shard)."""
        indices = self.check_indices(indices)
        local = self.position[indices] - self.shard_start
        if local.numel() and (int(local.min()) < 0 or int(local.max()) >= self.slots.shape[0]):
            raise SncaError("requested slots live on another shard; gather them with snca.distributed")
        return self.slots[local].float()

    def features_by_index(self) -> Tensor:
        """The whole (unsharded) bank as an N x D float32 tensor in dataset-index order."""
        if self.is_sharded:
            raise SncaError("features_by_index needs the whole bank; gather the shards first")
        return self.slots.float()[self.position]

    # ------------------------------------------------------------------ updates
    @torch.no_grad()
    def update(self, features: Tensor, indices: Tensor, momentum: float | None = None) -> None:
        """``m_idx <- normalise(mu * m_idx + (1 - mu) * v)`` for the slots this shard owns.

        Call it after the loss was computed against the old memory. Duplicate indices in one
        batch are averaged first (their mean feature enters the update once), so the result
        does not depend on write order.
        """
        mu = self.momentum if momentum is None else float(momentum)
        self._write(features, indices, lambda old, new: old.mul_(mu).add_(new, alpha=1.0 - mu))

    @torch.no_grad()
    def overwrite(self, features: Tensor, indices: Tensor) -> None:
        """Set slots to (normalised) features, e.g. a gallery recomputed with test transforms."""
        self._write(features, indices, lambda old, new: new)

    def _write(self, features: Tensor, indices: Tensor, combine) -> None:
        indices = self.check_indices(indices).to(self.device)
        features = features.detach().to(self.device, torch.float32)
        if features.ndim != 2 or features.shape != (indices.numel(), self.dim):
            raise SncaError(
                f"memory update expects features of shape ({indices.numel()}, {self.dim}), "
                f"got {tuple(features.shape)}"
            )
        if not bool(torch.isfinite(features).all()):
            raise SncaError("memory update got NaN or Inf features; check the learning rate and the input data")
        unique, inverse = torch.unique(indices, return_inverse=True)
        if unique.numel() != indices.numel():
            summed = torch.zeros(unique.numel(), self.dim, device=self.device)
            summed.index_add_(0, inverse, features)
            counts = torch.bincount(inverse, minlength=unique.numel()).clamp_min_(1)
            features, indices = summed / counts[:, None].float(), unique
        local = self.position[indices] - self.shard_start
        mine = (local >= 0) & (local < self.slots.shape[0])
        if not bool(mine.all()):
            local, features = local[mine], features[mine]
        old = self.slots[local].float()
        self.slots[local] = F.normalize(combine(old, features), dim=1).to(self.slots.dtype)

    # ------------------------------------------------------------------ state
    def get_extra_state(self) -> dict:
        return {
            "momentum": self.momentum,
            "dim": self.dim,
            "num_classes": self.num_classes,
            "shard": [self.rank, self.world_size],
            "dtype": str(self.slots.dtype).removeprefix("torch."),
        }

    def set_extra_state(self, state: dict) -> None:
        if int(state["dim"]) != self.dim or int(state["num_classes"]) != self.num_classes:
            raise SncaError(
                f"memory checkpoint has dim={state['dim']}, num_classes={state['num_classes']}; "
                f"this bank has dim={self.dim}, num_classes={self.num_classes}"
            )
        self.set_momentum(float(state["momentum"]))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        labels = state_dict.get(prefix + "labels")
        if labels is not None and (labels.shape != self.labels.shape or not torch.equal(labels.cpu(), self.labels.cpu())):
            raise SncaError(
                "memory checkpoint was built for a different training set (sample labels differ); "
                "use the dataset the checkpoint was trained on"
            )
        slots = state_dict.get(prefix + "slots")
        if slots is not None and tuple(slots.shape) != tuple(self.slots.shape):
            raise SncaError(
                f"memory checkpoint holds slots of shape {tuple(slots.shape)}, this bank expects "
                f"{tuple(self.slots.shape)}; re-shard it with snca.distributed if the world size changed"
            )
        if slots is not None and slots.dtype != self.slots.dtype:
            state_dict[prefix + "slots"] = slots.to(self.slots.dtype)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)
