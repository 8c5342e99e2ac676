"""One training run's state and its steps: the model, an objective, the optimizer and the RNG.

The trainer computes and returns; it never writes files or prints (that is :mod:`.run`). It has
no loss- and no world-size-specific code: the objective (:mod:`.objectives`) supplies the loss,
the memory update and the evaluation; :mod:`snca.distributed` supplies data parallelism, which
at world size 1 is the module itself.

Gradient accumulation (``iter_size``): one optimizer step consumes ``iter_size`` loader
batches, each micro-batch's mean loss weighted by its share of the step's samples, so the
gradient is that of one batch holding all of them; every micro-batch sees the memory as it was
before the step, and the memory is written once, after it (docs/design.md#reference-differences).
"""

from __future__ import annotations

import itertools
import math
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from .. import distributed as sd
from ..checkpoint import load_model_state
from ..config import Config, config_to_dict
from ..errors import SncaError
from ..runtime import autocast, make_loader, rng_state, seed_everything, set_rng_state
from .evaluation import Evaluator
from .objectives import build_objective

StepCallback = Callable[[int, int, float, float], None]  # (step, steps, loss, images/s)


class NonFiniteLossError(SncaError):
    """The loss or the model went NaN/Inf; training cannot continue from this state."""


def lr_at(optim: Any, epoch: float) -> float:
    """Learning rate at a (fractional) epoch: step / cosine / constant, then linear warm-up."""
    if optim.lr_schedule == "step":
        lr = optim.lr * optim.lr_gamma ** (int(epoch) // optim.lr_step_size)
    elif optim.lr_schedule == "cosine":
        t = min(max(epoch / optim.epochs, 0.0), 1.0)
        lr = optim.min_lr + 0.5 * (optim.lr - optim.min_lr) * (1 + math.cos(math.pi * t))
    else:
        lr = optim.lr
    if optim.warmup_epochs > 0 and epoch < optim.warmup_epochs:
        lr *= (epoch + 1e-3) / optim.warmup_epochs
    return float(lr)


def check_training_labels(targets: Tensor, class_names: list[str] | None = None) -> None:
    """Refuse a training set with nothing to learn: fewer than two classes, or no class with
    two images (NCA pulls an image towards the other images of its class); warn when some
    classes hold a single image (it has no neighbour to be pulled to)."""
    counts = torch.bincount(torch.as_tensor(targets).long().flatten())
    present = counts.nonzero().flatten()

    def name(c: int) -> str:
        return repr(class_names[c]) if class_names and c < len(class_names) else str(c)

    if len(present) < 2:
        only = f" (class {name(int(present[0]))}, {int(counts[present[0]])} images)" if len(present) else ""
        raise SncaError(f"the training set has {len(present)} class{'es' if len(present) != 1 else ''}{only}: there is nothing "
                        "to tell apart; train on at least two classes (check --data-dir, --subset, the class split)")
    if int(counts.max()) < 2:
        raise SncaError(f"no class of the training set has two images ({int(counts.sum())} images, {len(present)} classes): "
                        "NCA learns from same-class neighbours; use a larger --subset (at least two images per class)")
    single = (counts == 1).nonzero().flatten().tolist()
    if single:
        shown = ", ".join(name(c) for c in single[:5]) + (", ..." if len(single) > 5 else "")
        warnings.warn(f"{len(single)} class(es) of the training set hold a single image ({shown}): those images have no "
                      "same-class neighbour to learn from", stacklevel=2)


class Trainer:
    """``train_epoch`` / ``validate`` / ``final_evaluation`` return metric dicts; ``state_dict``
    is the checkpoint's content. With several ranks every method is a collective."""

    def __init__(self, cfg: Config, model: nn.Module, train_set: Any, device: str | torch.device = "cpu",
                 num_classes: int | None = None) -> None:
        self.cfg, self.device, self.train_set = cfg, torch.device(device), train_set
        targets = torch.as_tensor(train_set.targets).long()
        check_training_labels(targets, list(getattr(train_set, "classes", None) or []))
        self.num_classes = int(num_classes or getattr(train_set, "num_classes", 0) or int(targets.max()) + 1)
        self.model = model.to(self.device)
        if cfg.run.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.rank, self.world = sd.rank(), sd.world_size()
        batch, rest = divmod(cfg.optim.batch_size, self.world)
        if rest:
            raise SncaError(f"batch_size {cfg.optim.batch_size} is not divisible by the {self.world} ranks; pick a multiple "
                            f"of {self.world} (each rank loads batch_size / {self.world} images per step)")
        if cfg.model.sync_bn:
            self.model = sd.sync_batch_norm(self.model, self.device)
        self.objective = build_objective(cfg, targets, self.num_classes, self.device)
        self.net = sd.data_parallel(self.objective.network(self.model), self.device)
        o = cfg.optim
        params = list(self.model.parameters()) + list(self.objective.parameters())
        self.optimizer = torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov and o.momentum > 0,
                                         weight_decay=o.weight_decay)
        self.scaler = torch.amp.GradScaler(self.device.type) if cfg.run.amp == "fp16" else None
        # The same permutation on every rank (seed), each rank taking its share of it.
        self.sampler = torch.utils.data.DistributedSampler(train_set, self.world, self.rank, shuffle=True, seed=cfg.run.seed)
        # Rank-dependent: data-loader workers draw different augmentations on each rank.
        self.loader_generator = torch.Generator().manual_seed(cfg.run.seed + self.rank)
        # A last batch of one sample breaks batch-norm in training mode: drop it in that case only.
        self.train_loader = make_loader(train_set, batch, workers=cfg.data.workers, generator=self.loader_generator,
                                        device=self.device, drop_last=len(self.sampler) % batch == 1, sampler=self.sampler)
        steps = self.steps_per_epoch
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_at(self.cfg.optim, s / steps) / self.cfg.optim.lr)
        self.evaluator = Evaluator(self.model, self.device, self.num_classes, cfg.eval.embed_batch_size, cfg.data.workers,
                                   cfg.run.amp, cfg.run.channels_last)
        self.epoch = 0  # completed epochs
        self.step_in_epoch = 0  # optimizer steps done in the current epoch
        self.metrics: list[dict[str, Any]] = []
        self.best_val: float | None = None

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.train_loader) / self.cfg.optim.iter_size)

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def _nonfinite(self, what: str) -> NonFiniteLossError:
        lr, fp16 = self.lr, " or --amp bf16/none" if self.cfg.run.amp == "fp16" else ""
        return NonFiniteLossError(f"{what} at epoch {self.epoch + 1}, step {self.step_in_epoch + 1}/{self.steps_per_epoch} "
                                  f"(lr {lr:g}); training stopped: try a lower learning rate (e.g. --lr {lr / 10:g}){fp16}")

    def _groups(self) -> Iterator[list[tuple[Tensor, Tensor, Tensor]]]:
        it = iter(self.train_loader)
        while group := list(itertools.islice(it, self.cfg.optim.iter_size)):
            yield group

    def train_step(self, group: list[tuple[Tensor, Tensor, Tensor]]) -> tuple[float, int]:
        """One optimizer step over ``group`` (iter_size micro-batches): (sum of per-sample losses, samples)."""
        total = sum(len(b[0]) for b in group)
        self.optimizer.zero_grad(set_to_none=True)
        outputs, indices, loss_sum = [], [], 0.0
        for i, (x, y, idx) in enumerate(group):
            x = x.to(self.device, non_blocking=True)
            if self.cfg.run.channels_last and x.ndim == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            y, idx = torch.as_tensor(y).long().to(self.device), torch.as_tensor(idx).long().to(self.device)
            with sd.no_sync(self.net, sync=i == len(group) - 1):  # all-reduce gradients once per step
                with autocast(self.device, self.cfg.run.amp):
                    out = self.net(x)
                problem = self.objective.output_problem(out)
                if problem is not None:
                    raise self._nonfinite(problem)
                loss = self.objective.loss(out, y, idx)
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise self._nonfinite(f"the loss became {value}")
                scaled = loss * (len(x) / total)
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            outputs.append(out.detach())
            indices.append(idx)
            loss_sum += value * len(x)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.objective.after_step(torch.cat(outputs), torch.cat(indices))
        return loss_sum, total

    def train_epoch(self, on_step: StepCallback | None = None) -> dict[str, Any]:
        """Train one epoch; returns its metrics. Raises NonFiniteLossError on NaN/Inf."""
        record: dict[str, Any] = {"epoch": self.epoch + 1, "lr": self.lr, **self.objective.start_epoch(self.epoch)}
        self.sampler.set_epoch(self.epoch)  # a new permutation each epoch, the same on every rank
        self.net.train()
        start, loss_sum, seen = time.perf_counter(), 0.0, 0
        self.step_in_epoch = 0
        for group in self._groups():
            with sd.collectives(f"training step {self.step_in_epoch + 1}/{self.steps_per_epoch} of epoch {self.epoch + 1}"):
                batch_loss, n = self.train_step(group)
            loss_sum, seen = loss_sum + batch_loss, seen + n
            self.step_in_epoch += 1
            if on_step is not None:  # images/s of all ranks (each loads the same number per step)
                on_step(self.step_in_epoch, self.steps_per_epoch, batch_loss / max(n, 1),
                        self.world * seen / max(time.perf_counter() - start, 1e-9))
        if not all(bool(torch.isfinite(p).all()) for p in self.optimizer.param_groups[0]["params"]):
            raise self._nonfinite("the weights became NaN/Inf")
        loss_sum, seen = sd.all_reduce_sum(torch.tensor([loss_sum, float(seen)], dtype=torch.float64)).tolist()
        elapsed = time.perf_counter() - start
        return {**record, "train_loss": loss_sum / max(seen, 1), "images_per_s": seen / max(elapsed, 1e-9),
                "train_time_s": elapsed}

    def end_epoch(self, record: dict[str, Any]) -> bool:
        """Record a finished epoch; True when its validation accuracy is the best so far."""
        self.epoch, self.step_in_epoch = self.epoch + 1, 0
        self.metrics.append(record)
        val = record.get("val_top1")
        if val is not None and (self.best_val is None or val > self.best_val):
            self.best_val = val
            return True
        return False

    @torch.no_grad()
    def validate(self, test_set: Any) -> dict[str, Any]:
        """The cheap per-epoch monitor (the objective's: 1-NN against the memory, or the classifier)."""
        start = time.perf_counter()
        self.evaluator.sync_buffers()
        out = self.objective.monitor(self.evaluator, test_set)
        self.net.train()
        return {**out, "val_time_s": time.perf_counter() - start}

    @torch.no_grad()
    def final_evaluation(self, test_set: Any, gallery_set: Any | None, ks: list[int] | None = None) -> dict[str, Any]:
        """Weighted kNN (k = eval.knn_k, sigma = the config's) and the objective's own metrics."""
        ks = ks or [self.cfg.eval.knn_k]
        start = time.perf_counter()
        self.evaluator.sync_buffers()
        out = {"knn_k": ks if len(ks) > 1 else ks[0], "knn_sigma": self.cfg.sigma, "num_test": len(test_set)}
        out.update(self.objective.final(self.evaluator, test_set, gallery_set, ks, self.cfg.sigma))
        self.model.eval()
        return {**out, "eval_time_s": time.perf_counter() - start}

    # -------------------------------------------------------------- state
    def state_dict(self, mid_epoch: bool = False) -> dict[str, Any]:
        """What a checkpoint holds besides the run's facts (see :mod:`snca.checkpoint`); the
        memory entry holds this rank's shard."""
        return {
            "config": config_to_dict(self.cfg),
            "model": self.model.state_dict(),
            **self.objective.checkpoint_state(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "epoch": self.epoch,
            "mid_epoch": self.step_in_epoch if mid_epoch else False,
            "rng": rng_state(self.loader_generator),
            "metrics": [dict(m) for m in self.metrics],
            "best_val": self.best_val,
            "num_train": len(self.train_set),
        }

    def load_state_dict(self, state: dict[str, Any], path: Any = "checkpoint") -> None:
        """Continue from a checkpoint written at an epoch boundary, as :func:`snca.checkpoint.
        load_checkpoint` reads it for this rank (its memory shard, its RNG): in deterministic mode
        the rest of the run is bit-identical to an uninterrupted one."""
        if state.get("mid_epoch"):
            raise SncaError(f"{path} was written mid-epoch (interrupted after {state['mid_epoch']} steps of epoch "
                            f"{state['epoch'] + 1}) and cannot be resumed exactly; resume from last.pt (the last completed epoch) instead")
        if int(state.get("num_train", len(self.train_set))) != len(self.train_set):
            raise SncaError(f"{path} was trained on {state['num_train']} images, this dataset has {len(self.train_set)}; "
                            "use the dataset (and --data-dir / --subset) the checkpoint was trained on")
        load_model_state(self.model, state["model"], path)
        self.objective.load_checkpoint_state(state, path)
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError) as err:
            raise SncaError(f"{path}: optimizer state does not match this model ({err}); start a new run") from None
        if state.get("scheduler"):
            self.scheduler.load_state_dict(state["scheduler"])
            self.scheduler.base_lrs = [self.cfg.optim.lr for _ in self.scheduler.base_lrs]  # a resume may change lr
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.epoch = int(state["epoch"])
        self.metrics = [dict(m) for m in state.get("metrics", [])]
        self.best_val = state.get("best_val")
        # The step's lr from the (possibly overridden) schedule, as an uninterrupted run has it.
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.cfg.optim, self.epoch)
        if state.get("rng") is None:  # e.g. resumed on another number of ranks
            warnings.warn(f"{path} has no RNG state for rank {self.rank}; the resumed run will not repeat an "
                          "uninterrupted one exactly", stacklevel=2)
            seed = self.cfg.run.seed + 1_000_003 * self.epoch + self.rank
            seed_everything(seed)
            self.loader_generator.manual_seed(seed)
        else:
            set_rng_state(state["rng"], self.loader_generator)
