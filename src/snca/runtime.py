"""Where and how tensors run: device choice, seeding, deterministic kernels, autocast, loaders.

Shared by training, feature extraction and the commands, so that each is decided in one place.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from .errors import SncaError


class Terminated(KeyboardInterrupt):
    """SIGTERM (what SLURM, Kubernetes and torchrun send), raised where the program is so that
    it stops as Ctrl-C stops it: the interrupted state is saved, the last checkpoint kept."""


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block SIGTERM raises :class:`Terminated` (once: a second SIGTERM while the
    first is being handled is ignored, so the state being saved is not cut short). Outside the
    main thread signals cannot be handled; the block then changes nothing."""
    fired = False

    def handler(signum: int, _frame: Any) -> None:
        nonlocal fired
        if not fired:
            fired = True
            raise Terminated(f"terminated by {signal.Signals(signum).name}")

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


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


def rng_state(loader_generator: torch.Generator | None = None) -> dict[str, Any]:
    """Every RNG the training loop draws from, as tensors and builtins (checkpoint-safe)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
        "loader": loader_generator.get_state() if loader_generator is not None else None,
    }


def set_rng_state(state: dict[str, Any], loader_generator: torch.Generator | None = None) -> None:
    """Restore what :func:`rng_state` captured."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npst = state["numpy"]
    np.random.set_state((npst["kind"], npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"], npst["gauss"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if loader_generator is not None and state.get("loader") is not None:
        loader_generator.set_state(state["loader"])


def seed_worker(worker_id: int) -> None:
    """DataLoader worker init: seed python and numpy from the worker's torch seed (which the
    loader derives from its generator), so augmentations that use them are reproducible."""
    seed = torch.initial_seed() % (2**32)
    random.seed(seed)
    np.random.seed(seed)


def autocast(device: torch.device, amp: str) -> Any:
    if amp == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_loader(
    dataset: Any, batch_size: int, shuffle: bool = False, workers: int = 0, generator: torch.Generator | None = None,
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
