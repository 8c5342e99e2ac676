"""What a training run optimises, as objects with one interface the trainer calls.

- :class:`NCAObjective`: the exact NCA loss against the augmented memory (the public
  :class:`snca.distributed.ShardedNCALoss`, which at world size 1 is :class:`snca.NCALoss`),
  the memory written once per optimizer step (docs/design.md#reference-differences), the
  memory as the evaluation gallery.
- :class:`SoftmaxObjective`: a linear classifier on the un-normalised embedding (the baseline),
  evaluated by its own accuracy and by kNN on its embedding and penultimate features.

Both are world-size agnostic: the sharded helpers of :mod:`snca.distributed` are the
single-process path at W = 1.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import distributed as sd
from ..config import Config, momentum_at
from ..errors import SncaError
from ..memory import MemoryBank
from .evaluation import Evaluator, prefixed


class Objective(nn.Module):
    """The interface: ``network`` (what the training forward runs), ``loss``, ``after_step``,
    ``start_epoch``, ``monitor`` / ``final`` (evaluation) and the checkpoint entries."""

    name = "objective"

    def network(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError

    def output_problem(self, output: Tensor) -> str | None:
        """Why ``output`` cannot be trained on (None when it can)."""
        return None if bool(torch.isfinite(output).all()) else "the model output became NaN/Inf"

    def loss(self, output: Tensor, labels: Tensor, indices: Tensor) -> Tensor:
        raise NotImplementedError

    def start_epoch(self, epoch: int) -> dict[str, Any]:
        return {}

    def after_step(self, outputs: Tensor, indices: Tensor) -> None:
        pass

    def monitor(self, ev: Evaluator, test_set: Any) -> dict[str, Any]:
        raise NotImplementedError

    def final(self, ev: Evaluator, test_set: Any, gallery_set: Any | None, ks: list[int], sigma: float) -> dict[str, Any]:
        raise NotImplementedError

    def checkpoint_state(self) -> dict[str, Any]:
        """The checkpoint's ``memory`` and ``classifier`` entries."""
        raise NotImplementedError

    def load_checkpoint_state(self, state: dict[str, Any], path: Any) -> None:
        raise NotImplementedError


class NCAObjective(Objective):
    name = "nca"

    def __init__(self, cfg: Config, train_labels: Tensor, num_classes: int, device: torch.device) -> None:
        super().__init__()
        o = cfg.objective
        self.schedule = dict(o.memory_momentum_schedule)
        # This rank's shard of a bank seeded like the single-process one (the whole bank at W=1).
        self.memory: MemoryBank = sd.sharded_bank(
            train_labels, dim=cfg.model.low_dim, momentum=momentum_at(self.schedule, 0),
            dtype=getattr(torch, o.memory_dtype), generator=torch.Generator().manual_seed(cfg.run.seed),
            num_classes=num_classes, device=device,
        )
        # Written after the whole step (after_step), not per micro-batch.
        self.criterion = sd.ShardedNCALoss(self.memory, o.temperature, o.margin, update_memory=False)
        self.recompute_gallery = cfg.eval.recompute_gallery

    def network(self, model: nn.Module) -> nn.Module:
        return model

    def output_problem(self, output: Tensor) -> str | None:
        problem = super().output_problem(output)
        # Overflowing activations normalise to zero vectors before they turn into NaN.
        if problem is None and bool(((output.detach().float().norm(dim=1) - 1).abs() > 0.05).any()):
            return "the model output overflowed (embeddings are no longer unit vectors, NaN/Inf inside)"
        return problem

    def loss(self, output: Tensor, labels: Tensor, indices: Tensor) -> Tensor:
        return self.criterion(output, indices)

    def start_epoch(self, epoch: int) -> dict[str, Any]:
        mu = momentum_at(self.schedule, epoch)
        self.memory.set_momentum(mu)
        return {"memory_momentum": mu}

    @torch.no_grad()
    def after_step(self, outputs: Tensor, indices: Tensor) -> None:
        sd.update_sharded(self.memory, outputs, indices)  # each rank writes the slots it owns

    def monitor(self, ev: Evaluator, test_set: Any) -> dict[str, Any]:
        feats, labels, _ = ev.embed(test_set, "embedding")
        return {"val_top1": ev.knn(feats, labels, self.memory, [1], 1.0)[1]["top1"], "val_metric": "knn1_memory"}

    def final(self, ev: Evaluator, test_set: Any, gallery_set: Any | None, ks: list[int], sigma: float) -> dict[str, Any]:
        test_f, test_y, _ = ev.embed(test_set, "embedding")
        out = prefixed("knn", ev.knn(test_f, test_y, self.memory, ks, sigma), ks)
        if gallery_set is not None and self.recompute_gallery:
            out.update(prefixed("knn_recomputed", ev.knn(test_f, test_y, ev.embed(gallery_set, "embedding"), ks, sigma), ks))
        return out

    def checkpoint_state(self) -> dict[str, Any]:
        return {"memory": self.memory.state_dict(), "classifier": None}

    def load_checkpoint_state(self, state: dict[str, Any], path: Any) -> None:
        memory = state.get("memory")
        if memory is None:
            raise SncaError(f"{path} holds no memory bank (a softmax run); it cannot resume an NCA run")
        self.memory.load_state_dict(memory)


class _ClassifierNet(nn.Module):
    """Classifier on the un-normalised projection, as one module so that data parallelism sees
    every parameter the loss depends on."""

    def __init__(self, model: nn.Module, classifier: nn.Module) -> None:
        super().__init__()
        self.model, self.classifier = model, classifier

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.model.project(x))


class SoftmaxObjective(Objective):
    name = "softmax"

    def __init__(self, cfg: Config, train_labels: Tensor, num_classes: int, device: torch.device) -> None:
        super().__init__()
        self.classifier = nn.Linear(cfg.model.low_dim, num_classes).to(device)

    def network(self, model: nn.Module) -> nn.Module:
        return _ClassifierNet(model, self.classifier)

    def loss(self, output: Tensor, labels: Tensor, indices: Tensor) -> Tensor:
        return F.cross_entropy(output.float(), labels)

    @torch.no_grad()
    def _predictions(self, ev: Evaluator, dataset: Any) -> tuple[Tensor, Tensor]:
        proj, labels, _ = ev.embed(dataset, "projection")
        self.classifier.eval()
        logits = self.classifier(proj).float()
        self.classifier.train()
        return logits.topk(min(5, logits.shape[1]), dim=1).indices, labels

    def monitor(self, ev: Evaluator, test_set: Any) -> dict[str, Any]:
        predictions, labels = self._predictions(ev, test_set)
        return {"val_top1": ev.accuracy(predictions, labels, (1,))[1], "val_metric": "classifier"}

    def final(self, ev: Evaluator, test_set: Any, gallery_set: Any | None, ks: list[int], sigma: float) -> dict[str, Any]:
        predictions, labels = self._predictions(ev, test_set)
        acc = ev.accuracy(predictions, labels, (1, 5))
        out: dict[str, Any] = {"classifier_top1": acc[1], "classifier_top5": acc[5]}
        if gallery_set is not None:
            for prefix, kind in (("knn", "embedding"), ("knn_penultimate", "penultimate")):
                test_f, test_y, _ = ev.embed(test_set, kind)
                out.update(prefixed(prefix, ev.knn(test_f, test_y, ev.embed(gallery_set, kind), ks, sigma), ks))
        return out

    def checkpoint_state(self) -> dict[str, Any]:
        return {"memory": None, "classifier": self.classifier.state_dict()}

    def load_checkpoint_state(self, state: dict[str, Any], path: Any) -> None:
        weights = state.get("classifier")
        if weights is None:
            raise SncaError(f"{path} holds no classifier (an NCA run); it cannot resume a softmax run")
        self.classifier.load_state_dict(weights)


OBJECTIVES: dict[str, type[Objective]] = {"nca": NCAObjective, "softmax": SoftmaxObjective}


def build_objective(cfg: Config, train_labels: Tensor, num_classes: int, device: torch.device) -> Objective:
    return OBJECTIVES[cfg.objective.loss](cfg, torch.as_tensor(train_labels).long(), num_classes, device)
