"""The training pipeline: one epoch of NCA (or softmax) training, evaluation, feature extraction.

This module computes and returns; it never writes files or prints. The ``snca train``
command (``snca.commands.train``) owns the run directory, checkpoints, logs and plots, and
drives a :class:`Trainer` epoch by epoch, so the same loop serves a notebook or another tool.

Gradient accumulation (``iter_size``): one optimizer step consumes ``iter_size`` loader
batches. Each micro-batch's mean loss is weighted by its share of the step's samples
(``n_i / sum n``), so the accumulated gradient equals that of one batch holding all of them.
Every micro-batch's loss is computed against the memory as it was *before the step*; the
memory update for all of them happens once, after the step. That makes ``batch n x iter_size
k`` exactly the same computation as ``batch n*k`` (batch-norm statistics aside). The reference
implementation instead writes the memory after every forward, so its later micro-batches see
slots updated by earlier ones; the difference is one memory write per slot per epoch either way.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import random
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import distributed as sd
from .checkpoint import check_dataset, load_model_state, rng_state, set_rng_state
from .config import TrainConfig, config_to_dict, momentum_at
from .errors import SncaError
from .knn import knn_classify, topk_accuracy
from .memory import MemoryBank

StepCallback = Callable[[int, int, float, float], None]  # (step, steps, loss, images/s)


class NonFiniteLossError(SncaError):
    """The loss or the model went NaN/Inf; training cannot continue from this state."""

    def __init__(self, message: str, epoch: int, step: int, lr: float) -> None:
        super().__init__(message)
        self.epoch, self.step, self.lr = epoch, step, lr


# ---------------------------------------------------------------------- runtime
def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU; explicit names are checked to exist."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise SncaError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SncaError(f"device {name} requested but CUDA is not available; use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise SncaError(f"device {name} requested but MPS is not available; use --device cpu")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def set_deterministic(enabled: bool) -> None:
    """Deterministic kernels where they exist (warn, not fail, where a kernel has none)."""
    if enabled:
        # cuBLAS needs a fixed workspace to be deterministic; must be set before the first GEMM.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled, warn_only=True)
    torch.backends.cudnn.deterministic = enabled
    torch.backends.cudnn.benchmark = not enabled


def seed_worker(worker_id: int) -> None:
    """DataLoader worker init: seed python and numpy from the worker's torch seed (which the
    loader derives from its generator), so augmentations that use them are reproducible."""
    seed = torch.initial_seed() % (2**32)
    random.seed(seed)
    np.random.seed(seed)


def autocast(device: torch.device, amp: str):
    if amp == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_loader(
    dataset, batch_size: int, shuffle: bool, workers: int = 0, generator: torch.Generator | None = None,
    device: torch.device | None = None, drop_last: bool = False, sampler: torch.utils.data.Sampler | None = None,
) -> torch.utils.data.DataLoader:
    if generator is None:
        # Evaluation loaders get their own generator so they never draw from the global RNG
        # (which would make the training augmentations depend on how often we evaluate).
        generator = torch.Generator().manual_seed(0)
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else False,
        sampler=sampler,
        num_workers=workers,
        generator=generator,
        worker_init_fn=seed_worker if workers > 0 else None,
        pin_memory=device is not None and device.type == "cuda",
        drop_last=drop_last,
        persistent_workers=False,
    )


# ---------------------------------------------------------------------- schedules
class LRSchedule:
    """Learning rate as a function of (fractional) epoch: step / cosine / constant, with an
    optional linear warm-up. Stateless apart from its settings, so resuming is exact."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.base_lr = cfg.lr
        self.kind = cfg.lr_schedule
        self.epochs = cfg.epochs
        self.step_size = cfg.lr_step_size
        self.gamma = cfg.lr_gamma
        self.min_lr = cfg.min_lr
        self.warmup = cfg.warmup_epochs

    def lr_at(self, epoch: float) -> float:
        if self.kind == "step":
            lr = self.base_lr * self.gamma ** (int(epoch) // self.step_size)
        elif self.kind == "cosine":
            t = min(max(epoch / self.epochs, 0.0), 1.0)
            lr = self.min_lr + 0.5 * (self.base_lr - self.min_lr) * (1 + math.cos(math.pi * t))
        else:
            lr = self.base_lr
        if self.warmup > 0 and epoch < self.warmup:
            lr *= (epoch + 1e-3) / self.warmup
        return float(lr)

    def state_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass  # the schedule is a pure function of the (possibly overridden) config


# ---------------------------------------------------------------------- features
def _embed(model: nn.Module, x: Tensor, kind: str) -> Tensor:
    if kind == "embedding":
        return model(x)
    if kind == "penultimate":
        return F.normalize(model.forward_features(x).flatten(1).float(), dim=1)
    if kind == "projection":
        return model.project(x)
    raise SncaError(f"unknown feature kind {kind!r}; use embedding or penultimate")


@torch.no_grad()
def extract_features(
    model: nn.Module,
    dataset,
    batch_size: int = 256,
    device: str | torch.device = "cpu",
    kind: str = "embedding",
    num_workers: int = 0,
    amp: str = "none",
    channels_last: bool = False,
    on_batch: Callable[[int, int], None] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Features of every item of ``dataset`` (which yields ``(image, label, index)``).

    kind: "embedding" (the L2-normalised low-dimensional output) or "penultimate" (backbone
    features, L2-normalised here). Returns float32 (N, D) features on ``device``, labels and
    dataset indices (LongTensor, CPU), in dataset order. The model is left in eval mode.
    """
    device = torch.device(device)
    loader = make_loader(dataset, batch_size, shuffle=False, workers=num_workers, device=device)
    model.eval()
    feats, labels, indices = [], [], []
    for step, (x, y, idx) in enumerate(loader):
        x = x.to(device, non_blocking=True)
        if channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, amp):
            f = _embed(model, x, kind)
        feats.append(f.float())
        labels.append(torch.as_tensor(y).long().cpu())
        indices.append(torch.as_tensor(idx).long().cpu())
        if on_batch is not None:
            on_batch(step + 1, len(loader))
    if not feats:
        raise SncaError("cannot extract features of an empty dataset")
    return torch.cat(feats), torch.cat(labels), torch.cat(indices)


def knn_accuracy(
    queries: Tensor, query_labels: Tensor, gallery: Tensor, gallery_labels: Tensor,
    ks: list[int], sigma: float, num_classes: int,
) -> dict[int, dict[str, float]]:
    """Weighted-kNN top-1 / top-5 (fractions) for each k, one search for all of them."""
    results = knn_classify(queries, gallery, gallery_labels.to(gallery.device), k=list(ks), sigma=sigma, num_classes=num_classes)
    out = {}
    for k, res in results.items():
        acc = topk_accuracy(res.predictions, query_labels.to(res.predictions.device), (1, 5))
        out[k] = {"top1": acc[1], "top5": acc[5]}
    return out


# ---------------------------------------------------------------------- datasets
def resolve_config(cfg: TrainConfig) -> TrainConfig:
    """Fill the dataset-dependent defaults (channels, image size) the model needs."""
    import dataclasses

    from .data import dataset_info

    info = dataset_info(cfg.dataset)
    return dataclasses.replace(
        cfg,
        in_chans=cfg.in_chans if cfg.in_chans is not None else int(info.in_chans),
        image_size=cfg.image_size if cfg.image_size is not None else (int(info.image_size) if info.image_size else None),
    )


def uses_class_split(cfg: TrainConfig) -> bool:
    """True when the run trains on the base classes of a few-shot split only."""
    return bool(cfg.novel_classes or cfg.split_file or cfg.class_split_ids)


def class_split_of(cfg: TrainConfig, classes: list[str]):
    """The run's few-shot class split (a :class:`snca.protocols.fewshot.ResolvedSplit`) over a
    dataset's ``classes``: the one recorded in the config (``class_split_ids``, checked against
    the class names recorded with it), else the one ``novel_classes`` / ``split_file``
    describe; None when the run trains on every class."""
    from .protocols.fewshot import ResolvedSplit, read_split_file, resolve_split, split_from_novel

    if cfg.class_split_ids:
        ids = {s: sorted(int(i) for i in cfg.class_split_ids.get(s, [])) for s in ("base", "val", "novel")}
        names = cfg.class_split or {}
        for section, section_ids in ids.items():
            if any(not 0 <= i < len(classes) for i in section_ids) or (
                section in names and [classes[i] for i in section_ids] != list(names[section])
            ):
                raise SncaError(
                    f"the run's recorded class split ({section} classes {list(names.get(section, section_ids))}) does not "
                    "match this dataset's classes; use the dataset (and --data-dir) the run was trained on"
                )
        if not ids["base"]:
            raise SncaError("the run's recorded class split has no base class")
        return ResolvedSplit(ids["base"], ids["val"], ids["novel"], list(classes))
    if cfg.split_file:
        return resolve_split(read_split_file(cfg.split_file), classes)
    if cfg.novel_classes:
        return split_from_novel(cfg.novel_classes, classes)
    return None


def record_class_split(cfg: TrainConfig, split) -> TrainConfig:
    """``cfg`` with the resolved split written into ``class_split`` (names) and
    ``class_split_ids`` (dataset class ids), as saved in the run's config and checkpoints."""
    import dataclasses

    if split is None:
        return dataclasses.replace(cfg, class_split=None, class_split_ids=None)
    sections = ("base", "val", "novel")
    return dataclasses.replace(
        cfg,
        class_split={s: split.names(s) for s in sections},
        class_split_ids={s: [int(i) for i in getattr(split, s)] for s in sections},
    )


def build_datasets(cfg: TrainConfig, splits: tuple[str, ...] = ("train", "test", "train_eval")) -> dict[str, Any]:
    """Datasets of a run: "train" (training transforms), "test" and "train_eval" (the training
    images under test transforms, the gallery when features are recomputed).

    With a few-shot class split (``novel_classes``, ``split_file`` or a recorded
    ``class_split_ids``) every split keeps the base classes only, labels remapped to 0..B-1
    (:func:`snca.protocols.fewshot.class_subset`; ``subset`` is drawn before the split)."""
    from .data import build_dataset, build_transforms

    out: dict[str, Any] = {}
    class_split = None
    for split in splits:
        train_split = split in ("train", "train_eval")
        dataset = build_dataset(
            cfg.dataset,
            "train" if train_split else "test",
            data_dir=cfg.data_dir,
            transform=build_transforms(cfg.dataset, train=split == "train", image_size=cfg.image_size),
            label_set=cfg.label_set,
            subset=cfg.subset if train_split else cfg.test_subset,
            seed=cfg.seed,
        )
        if uses_class_split(cfg):
            from .protocols.fewshot import class_subset

            class_split = class_split or class_split_of(cfg, list(dataset.classes))
            dataset = class_subset(dataset, class_split.base)
        out[split] = dataset
    return out


# ---------------------------------------------------------------------- trainer
class _SoftmaxNet(nn.Module):
    """The softmax baseline's forward (classifier on the un-normalised projection) as one
    module, so that DistributedDataParallel sees every parameter the loss depends on."""

    def __init__(self, model: nn.Module, classifier: nn.Module) -> None:
        super().__init__()
        self.model, self.classifier = model, classifier

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.model.project(x))


class Trainer:
    """Owns the model, memory (or classifier), optimizer and RNG of one training run.

    ``train_epoch`` / ``validate`` / ``final_evaluation`` return metric dicts; ``state_dict``
    is the checkpoint (see :mod:`snca.checkpoint`). ``model`` must follow the EmbeddingNet
    interface: ``forward`` (L2-normalised), ``project``, ``forward_features``.

    Data-parallel (when a torch.distributed group is up, see :mod:`snca.distributed`): the
    network runs under DistributedDataParallel, each rank loads ``batch_size / W`` images per
    step from a DistributedSampler (the global batch stays the recipe's), the memory is sharded
    over the ranks, evaluation splits the test set over them. Every method is then a collective:
    all ranks must call it; ``state_dict`` returns the whole memory on rank 0 only.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        model: nn.Module,
        train_set,
        test_set=None,
        train_eval_set=None,
        device: str | torch.device = "cpu",
        num_classes: int | None = None,
    ) -> None:
        self.cfg = cfg
        self.device = torch.device(device)
        self.train_set, self.test_set, self.train_eval_set = train_set, test_set, train_eval_set
        targets = torch.as_tensor(train_set.targets).long()
        self.num_classes = int(num_classes or getattr(train_set, "num_classes", 0) or int(targets.max()) + 1)
        self.model = model.to(self.device)
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.rank, self.world = sd.rank(), sd.world_size()
        if cfg.batch_size % self.world:
            raise SncaError(
                f"batch_size {cfg.batch_size} is not divisible by the {self.world} ranks; "
                f"pick a multiple of {self.world} (each rank loads batch_size / {self.world} images per step)"
            )
        self.bank: MemoryBank | None = None
        self.classifier: nn.Module | None = None
        if cfg.loss == "nca":
            gen = torch.Generator().manual_seed(cfg.seed)
            dtype = getattr(torch, cfg.memory_dtype)
            # One process: a plain bank. Several: this rank's shard, the matching rows of that bank.
            self.bank = sd.sharded_bank(targets, dim=cfg.low_dim, momentum=momentum_at(cfg.memory_momentum_schedule, 0),
                                        dtype=dtype, generator=gen, num_classes=self.num_classes, device=self.device)
        else:
            self.classifier = nn.Linear(cfg.low_dim, self.num_classes).to(self.device)
        # self.model stays unwrapped (evaluation, state_dict); self.net is what the training
        # forward pass calls. The softmax head sits inside the DDP module so that its gradient,
        # and project()'s, are synchronised too.
        self.net: nn.Module | None = None
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            module = self.model if self.classifier is None else _SoftmaxNet(self.model, self.classifier)
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = DistributedDataParallel(module, device_ids=ids)
        params = list(self.model.parameters()) + (list(self.classifier.parameters()) if self.classifier else [])
        self.optimizer = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                                         nesterov=cfg.nesterov and cfg.momentum > 0, weight_decay=cfg.weight_decay)
        self.schedule = LRSchedule(cfg)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.amp == "fp16") if cfg.amp == "fp16" else None
        # Rank-dependent so that data-loader workers draw different augmentations on each rank.
        self.loader_generator = torch.Generator().manual_seed(cfg.seed + self.rank)
        self.sampler: torch.utils.data.DistributedSampler | None = None
        batch, per_rank = cfg.batch_size // self.world, len(train_set)
        if self.world > 1:
            # Same seed on every rank: the ranks must agree on one permutation to split it.
            self.sampler = torch.utils.data.DistributedSampler(
                train_set, num_replicas=self.world, rank=self.rank, shuffle=True, seed=cfg.seed
            )
            per_rank = len(self.sampler)
        # A last batch of one sample breaks batch-norm in training mode: drop it in that case only.
        self.train_loader = make_loader(
            train_set, batch, shuffle=True, workers=cfg.workers, generator=self.loader_generator,
            device=self.device, drop_last=per_rank % batch == 1, sampler=self.sampler,
        )
        self.epoch = 0  # completed epochs
        self.step_in_epoch = 0  # optimizer steps done in the current epoch
        self.metrics: list[dict[str, Any]] = []
        self.best_val: float | None = None

    # -------------------------------------------------------------- training
    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.train_loader) / self.cfg.iter_size)

    def _set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def _micro_batches(self) -> Iterator[list[tuple[Tensor, Tensor, Tensor]]]:
        it = iter(self.train_loader)
        while True:
            group = list(itertools.islice(it, self.cfg.iter_size))
            if not group:
                return
            yield group

    def _nonfinite(self, what: str, lr: float) -> NonFiniteLossError:
        e, s = self.epoch + 1, self.step_in_epoch + 1
        return NonFiniteLossError(
            f"{what} at epoch {e}, step {s}/{self.steps_per_epoch} (lr {lr:g}); training stopped: "
            f"try a lower learning rate (e.g. --lr {lr / 10:g}){' or --amp bf16/none' if self.cfg.amp == 'fp16' else ''}",
            e, s, lr,
        )

    def train_step(self, group: list[tuple[Tensor, Tensor, Tensor]], lr: float) -> tuple[float, int]:
        """One optimizer step over ``group`` (iter_size micro-batches). Returns (sum of
        per-sample losses, number of samples)."""
        cfg, device = self.cfg, self.device
        total = sum(len(b[0]) for b in group)
        self._set_lr(lr)
        self.optimizer.zero_grad(set_to_none=True)
        pending: list[tuple[Tensor, Tensor]] = []
        loss_sum = 0.0
        for i, (x, y, idx) in enumerate(group):
            x = x.to(device, non_blocking=True)
            if cfg.channels_last and x.ndim == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            y, idx = torch.as_tensor(y).long().to(device), torch.as_tensor(idx).long().to(device)
            # DDP: all-reduce the gradients once per step, on the last micro-batch's backward.
            sync = contextlib.nullcontext() if self.net is None or i == len(group) - 1 else self.net.no_sync()
            with sync:
                loss, out = self._micro_step(x, y, idx, total, lr)
            if self.bank is not None:
                pending.append((out.detach(), idx))
            loss_sum += float(loss.detach()) * len(x)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.bank is not None:
            # After the whole step: every micro-batch saw the same memory (see module docstring).
            feats = torch.cat([f for f, _ in pending]) if len(pending) > 1 else pending[0][0]
            idxs = torch.cat([i for _, i in pending]) if len(pending) > 1 else pending[0][1]
            # Several ranks: each updates the slots it owns with every rank's batch.
            sd.update_sharded(self.bank, feats, idxs)
        return loss_sum, total

    def _micro_step(self, x: Tensor, y: Tensor, idx: Tensor, total: int, lr: float) -> tuple[Tensor, Tensor]:
        """Forward and backward of one micro-batch; returns (its mean loss, the network output)."""
        cfg = self.cfg
        with autocast(self.device, cfg.amp):
            if self.net is not None:
                out = self.net(x)
            elif self.bank is not None:
                out = self.model(x)
            else:
                out = self.classifier(self.model.project(x))
        if not bool(torch.isfinite(out).all()):
            raise self._nonfinite("the model output became NaN/Inf", lr)
        # Overflowing activations normalise to zero vectors before they turn into NaN.
        if self.bank is not None and bool(((out.detach().float().norm(dim=1) - 1).abs() > 0.05).any()):
            raise self._nonfinite("the model output overflowed (embeddings are no longer unit vectors, NaN/Inf inside)", lr)
        if self.bank is not None:
            # Exact loss against the whole memory, whether it is sharded over ranks or not.
            loss = sd.nca_loss_sharded(out, idx, self.bank, cfg.temperature, cfg.margin)
        else:
            loss = F.cross_entropy(out.float(), y)
        value = float(loss.detach())
        if not math.isfinite(value):
            raise self._nonfinite(f"the loss became {value}", lr)
        scaled = loss * (len(x) / total)
        (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
        return loss, out

    def train_epoch(self, on_step: StepCallback | None = None) -> dict[str, Any]:
        """Train one epoch; returns its metrics (also appended to ``self.metrics`` by
        :meth:`end_epoch`). Raises NonFiniteLossError on NaN/Inf."""
        cfg = self.cfg
        epoch = self.epoch
        mu = momentum_at(cfg.memory_momentum_schedule, epoch)
        if self.bank is not None:
            self.bank.set_momentum(mu)
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)  # a new permutation each epoch, the same on every rank
        self.model.train()
        if self.classifier is not None:
            self.classifier.train()
        steps = self.steps_per_epoch
        start = time.perf_counter()
        loss_sum, seen = 0.0, 0
        self.step_in_epoch = 0
        lr0 = self.schedule.lr_at(epoch)
        for group in self._micro_batches():
            lr = self.schedule.lr_at(epoch + self.step_in_epoch / steps)
            batch_loss, n = self.train_step(group, lr)
            loss_sum += batch_loss
            seen += n
            self.step_in_epoch += 1
            if on_step is not None:
                elapsed = time.perf_counter() - start
                # images/s of all ranks (every rank loads the same number per step)
                on_step(self.step_in_epoch, steps, batch_loss / max(n, 1), self.world * seen / max(elapsed, 1e-9))
        for p in itertools.chain(self.model.parameters(), self.classifier.parameters() if self.classifier else []):
            if not bool(torch.isfinite(p).all()):
                raise self._nonfinite("the weights became NaN/Inf", lr0)
        if self.world > 1:  # the epoch's loss over every rank's samples
            loss_sum, seen = sd.all_reduce_sum(torch.tensor([loss_sum, float(seen)], dtype=torch.float64)).tolist()
        elapsed = time.perf_counter() - start
        return {
            "epoch": epoch + 1,
            "lr": lr0,
            "memory_momentum": mu if self.bank is not None else None,
            "train_loss": loss_sum / max(seen, 1),
            "images_per_s": seen / max(elapsed, 1e-9),
            "train_time_s": elapsed,
        }

    def end_epoch(self, record: dict[str, Any]) -> bool:
        """Record a finished epoch; returns True when its validation accuracy is the best so far."""
        self.epoch += 1
        self.step_in_epoch = 0
        self.metrics.append(record)
        val = record.get("val_top1")
        if val is not None and (self.best_val is None or val > self.best_val):
            self.best_val = val
            return True
        return False

    # -------------------------------------------------------------- evaluation
    def _extract(self, dataset, kind: str) -> tuple[Tensor, Tensor, Tensor]:
        return extract_features(self.model, dataset, self.cfg.eval_batch_size, self.device, kind,
                                 self.cfg.workers, self.cfg.amp, self.cfg.channels_last)

    def _sync_buffers(self) -> None:
        """Give every rank rank 0's buffers (batch-norm running statistics) before evaluating.

        DDP broadcasts rank 0's buffers at each training forward, after which every rank updates
        its copy with its own batch: without this, each rank would embed its share of the test
        set with slightly different statistics, none of them the ones the checkpoint saves."""
        if self.world == 1:
            return
        buffers = sd.broadcast_object({k: v.cpu() for k, v in self.model.named_buffers()})
        for name, buf in self.model.named_buffers():
            buf.copy_(buffers[name])

    def _part(self, dataset):
        """This rank's contiguous share of an evaluation set (the whole set in one process):
        every item is embedded exactly once, by one rank."""
        if self.world == 1:
            return dataset
        return torch.utils.data.Subset(dataset, list(sd.local_range(len(dataset))))

    def _topk(self, predictions: Tensor, labels: Tensor, topk: tuple[int, ...]) -> dict[int, float]:
        """topk_accuracy over the queries of every rank (each rank passes its own)."""
        if self.world == 1:
            return topk_accuracy(predictions, labels, topk)
        hits = predictions == labels.to(predictions.device).long()[:, None]
        counts = torch.tensor([float(hits[:, :t].any(dim=1).sum()) for t in topk] + [float(labels.numel())], dtype=torch.float64)
        counts = sd.all_reduce_sum(counts).tolist()
        return {t: counts[i] / max(counts[-1], 1.0) for i, t in enumerate(topk)}

    def _knn(self, queries: Tensor, labels: Tensor, gallery: MemoryBank | Tensor, gallery_labels: Tensor | None,
             gallery_ids: Tensor | None, ks: list[int], sigma: float) -> dict[int, dict[str, float]]:
        """knn_accuracy against the memory or a feature gallery; with several ranks, queries and
        gallery rows are this rank's share and the search runs over the shards of every rank."""
        if self.world == 1:
            if isinstance(gallery, MemoryBank):
                gallery, gallery_labels = gallery.features_by_index(), gallery.labels
            return knn_accuracy(queries, labels, gallery, gallery_labels, ks, sigma, self.num_classes)
        if not isinstance(gallery, MemoryBank):
            gallery_labels, gallery_ids = gallery_labels.to(gallery.device), gallery_ids.to(gallery.device)
        results = sd.knn_sharded(queries, gallery, gallery_labels, gallery_ids, k=list(ks), sigma=sigma,
                                 num_classes=self.num_classes)
        out = {}
        for k, res in results.items():
            acc = self._topk(res.predictions, labels, (1, 5))
            out[k] = {"top1": acc[1], "top5": acc[5]}
        return out

    @torch.no_grad()
    def validate(self) -> dict[str, Any]:
        """Cheap per-epoch monitor on the test set: 1-NN against the memory (NCA) or the
        classifier's accuracy (softmax, which has no memory)."""
        if self.test_set is None:
            return {}
        start = time.perf_counter()
        self._sync_buffers()
        if self.bank is not None:
            feats, labels, _ = self._extract(self._part(self.test_set), "embedding")
            acc = self._knn(feats, labels, self.bank, None, None, [1], 1.0)[1]["top1"]
            kind = "knn1_memory"
        else:
            logits, labels, _ = self._classify(self._part(self.test_set))
            acc = self._topk(logits.topk(min(5, logits.shape[1]), dim=1).indices, labels, (1,))[1]
            kind = "classifier"
        self.model.train()
        return {"val_top1": acc, "val_metric": kind, "val_time_s": time.perf_counter() - start}

    @torch.no_grad()
    def _classify(self, dataset) -> tuple[Tensor, Tensor, Tensor]:
        proj, labels, idx = self._extract(dataset, "projection")
        self.classifier.eval()
        logits = self.classifier(proj.to(self.device)).float()
        return logits, labels, idx

    @torch.no_grad()
    def final_evaluation(self, ks: list[int] | None = None) -> dict[str, Any]:
        """Weighted kNN (k = cfg.knn_k, sigma = cfg.sigma) on the test set: against the memory
        and/or a gallery recomputed under test transforms (NCA); against recomputed embedding
        and penultimate features plus the classifier's own accuracy (softmax)."""
        cfg = self.cfg
        ks = ks or [cfg.knn_k]
        out: dict[str, Any] = {"knn_k": ks if len(ks) > 1 else ks[0], "knn_sigma": cfg.sigma}
        if self.test_set is None:
            return out
        start = time.perf_counter()
        self._sync_buffers()
        test_part = self._part(self.test_set)
        test_f, test_y, _ = self._extract(test_part, "embedding")
        out["num_test"] = len(self.test_set)

        def put(prefix: str, res: dict[int, dict[str, float]]) -> None:
            for k, acc in res.items():
                suffix = "" if len(ks) == 1 else f"_k{k}"
                out[f"{prefix}_top1{suffix}"] = acc["top1"]
                out[f"{prefix}_top5{suffix}"] = acc["top5"]

        if self.bank is not None:
            put("knn", self._knn(test_f, test_y, self.bank, None, None, ks, cfg.sigma))
            if cfg.recompute_gallery and self.train_eval_set is not None:
                gal_part = self._part(self.train_eval_set)
                gal_f, gal_y, gal_i = self._extract(gal_part, "embedding")
                put("knn_recomputed", self._knn(test_f, test_y, gal_f, gal_y, gal_i, ks, cfg.sigma))
        else:
            logits, labels, _ = self._classify(test_part)
            acc = self._topk(logits.topk(min(5, logits.shape[1]), dim=1).indices, labels, (1, 5))
            out["classifier_top1"], out["classifier_top5"] = acc[1], acc[5]
            if self.train_eval_set is not None:
                gal_part = self._part(self.train_eval_set)
                gal_f, gal_y, gal_i = self._extract(gal_part, "embedding")
                put("knn", self._knn(test_f, test_y, gal_f, gal_y, gal_i, ks, cfg.sigma))
                test_p, _, _ = self._extract(test_part, "penultimate")
                gal_p, _, _ = self._extract(gal_part, "penultimate")
                put("knn_penultimate", self._knn(test_p, test_y, gal_p, gal_y, gal_i, ks, cfg.sigma))
        out["eval_time_s"] = time.perf_counter() - start
        return out

    # -------------------------------------------------------------- state
    def state_dict(self, mid_epoch: bool = False) -> dict[str, Any]:
        """The checkpoint dict (see :mod:`snca.checkpoint`). With several ranks every rank must
        call it (the memory shards are gathered); only rank 0's holds the memory."""
        if self.bank is None:
            memory = None
        elif self.world > 1:
            memory = sd.gather_bank_state(self.bank)  # the world-size independent full state
        else:
            memory = self.bank.state_dict()
        return {
            "config": config_to_dict(self.cfg),
            "model": self.model.state_dict(),
            "memory": memory,
            "classifier": self.classifier.state_dict() if self.classifier is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "epoch": self.epoch,
            "mid_epoch": self.step_in_epoch if mid_epoch else False,
            "rng": rng_state(self.loader_generator),
            "metrics": [dict(m) for m in self.metrics],
            "best_val": self.best_val,
            "num_train": len(self.train_set),
            "num_classes": self.num_classes,
        }

    def load_state_dict(self, state: dict[str, Any], path: Any = "checkpoint") -> None:
        """Continue from a checkpoint written at an epoch boundary (weights, memory, optimizer,
        RNG): in deterministic mode the rest of the run is bit-identical to an uninterrupted one."""
        if state.get("mid_epoch"):
            raise SncaError(
                f"{path} was written mid-epoch (Ctrl-C after {state['mid_epoch']} steps of epoch {state['epoch'] + 1}) and cannot be resumed "
                "exactly; resume from last.pt (the last completed epoch) instead"
            )
        saved = state["config"]
        for key in ("arch", "low_dim", "loss", "dataset", "label_set"):
            if key in saved and saved[key] != getattr(self.cfg, key):
                raise SncaError(
                    f"{path} was trained with {key}={saved[key]!r}, this run has {key}={getattr(self.cfg, key)!r}; "
                    f"drop the --{key.replace('_', '-')} override or start a new run"
                )
        if "num_train" in state and int(state["num_train"]) != len(self.train_set):
            raise SncaError(
                f"{path} was trained on {state['num_train']} images, this dataset has {len(self.train_set)}; "
                "use the dataset (and --data-dir / --subset) the checkpoint was trained on"
            )
        load_model_state(self.model, state["model"], path)
        if self.bank is not None:
            if state.get("memory") is None:
                raise SncaError(f"{path} holds no memory bank (a softmax run); it cannot resume an NCA run")
            check_dataset(state["memory"]["labels"], self.bank.labels, str(path))
            if self.world > 1:  # this rank's rows of the full state, whatever W wrote it
                sd.load_bank_state(self.bank, state["memory"])
            else:
                self.bank.load_state_dict(state["memory"])
        if self.classifier is not None:
            if state.get("classifier") is None:
                raise SncaError(f"{path} holds no classifier (an NCA run); it cannot resume a softmax run")
            load_model_state(self.classifier, state["classifier"], path)
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError) as err:
            raise SncaError(f"{path}: optimizer state does not match this model ({err}); start a new run") from None
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.epoch = int(state["epoch"])
        self.metrics = [dict(m) for m in state.get("metrics", [])]
        self.best_val = state.get("best_val")
        if self.world > 1:
            # The checkpoint holds rank 0's RNG only: give each rank its own deterministic stream
            # (a resumed multi-rank run is reproducible, not bit-identical to an uninterrupted one).
            seed = self.cfg.seed + 1_000_003 * self.epoch + self.rank
            seed_everything(seed)
            self.loader_generator.manual_seed(seed)
        elif state.get("rng") is not None:
            set_rng_state(state["rng"], self.loader_generator)
        else:
            warnings.warn(f"{path} has no RNG state; the resumed run will not repeat an uninterrupted one", stacklevel=2)
