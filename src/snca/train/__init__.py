"""Training: objectives (what is optimised), the trainer (one step, one epoch, evaluation) and
:func:`fit` (a whole run: directory, checkpoints, logs, resume, interrupts)."""

from .objectives import NCAObjective, Objective, SoftmaxObjective, build_objective
from .run import Run, fit, resolve_config
from .trainer import NonFiniteLossError, Trainer, lr_at

__all__ = ["NCAObjective", "NonFiniteLossError", "Objective", "Run", "SoftmaxObjective", "Trainer", "build_objective",
           "fit", "lr_at", "resolve_config"]
