"""Checkpoints: one dict of tensors and builtins, written atomically, read with weights_only.

Layout (``format: "snca-checkpoint"``, ``version: 1``)::

    config      resolved training config (plain dict; see snca.config.config_to_dict)
    model       EmbeddingNet state_dict
    memory      MemoryBank state_dict, or None (softmax baseline)
    classifier  softmax head state_dict, or None (NCA)
    optimizer, scheduler, scaler   optimizer / LR schedule / fp16 GradScaler state
    epoch       number of completed epochs
    mid_epoch   False, or the number of optimizer steps done in an interrupted epoch
    rng         python, numpy, torch (and cuda) global RNG states, and the train loader's generator
    metrics     list of per-epoch metric dicts so far

Only builtins and tensors are stored, so :func:`load_checkpoint` can (and does) use
``torch.load(weights_only=True)``: loading a checkpoint never runs code from the file.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .errors import SncaError

FORMAT = "snca-checkpoint"
VERSION = 1
# torch.save's pre-1.6 (non-zip) format starts with this pickle of its magic number.
_LEGACY_MAGIC = b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19"


def _is_torch_file(path: Path) -> bool:
    """A zip archive (torch.save's format) or a legacy torch file, judged by its first bytes."""
    if zipfile.is_zipfile(path):
        return True
    with open(path, "rb") as fh:
        return fh.read(len(_LEGACY_MAGIC)) == _LEGACY_MAGIC


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically: a temp file in the same directory, then
    ``os.replace``, so a crash or Ctrl-C never leaves a half-written checkpoint behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"format": FORMAT, "version": VERSION, **state}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def link_checkpoint(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Make ``dst`` hold the same bytes as ``src`` (hard link, else copy), atomically.

    ``last.pt`` is always replaced by a new file, so a hard link keeps ``best.pt`` intact
    without writing a large checkpoint twice.
    """
    src, dst = Path(src), Path(dst)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (``weights_only=True``).

    Raises a one-line SncaError when the file is missing, unreadable, corrupt, or not an
    snca checkpoint.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "last.pt"
    if not path.is_file():
        raise SncaError(f"checkpoint {path} does not exist; pass the .pt file or run directory of a training run")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises many types for truncated / foreign files
        # The weights_only unpickler reports any byte soup (a text file, a cut-off pickle) as
        # "Weights only load failed", and a text starting with "c" even as an "Unsupported
        # global": only a well-formed torch file can really hold objects it refuses to load.
        if not _is_torch_file(path):
            raise SncaError(
                f"checkpoint {path} is not a readable checkpoint (corrupt, truncated, or not a torch file); "
                "use another checkpoint, e.g. best.pt or last.pt of the run"
            ) from None
        if "Unsupported global" in str(err):
            raise SncaError(f"checkpoint {path} holds objects that cannot be loaded safely (weights_only); it was not written by snca") from None
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise SncaError(f"checkpoint {path} is corrupt ({type(err).__name__}: {first}); use another checkpoint, e.g. best.pt or last.pt of the run") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise SncaError(f"{path} is not an snca checkpoint (no 'format: {FORMAT}' entry)")
    if int(state.get("version", 0)) > VERSION:
        raise SncaError(f"checkpoint {path} has format version {state.get('version')}; this snca reads up to {VERSION}: upgrade snca")
    for key in ("config", "model", "epoch"):
        if key not in state:
            raise SncaError(f"checkpoint {path} lacks its {key!r} entry; it is incomplete")
    return state


# ---------------------------------------------------------------------- RNG state
def rng_state(loader_generator: torch.Generator | None = None) -> dict[str, Any]:
    """Every RNG the training loop draws from, as tensors and builtins."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
        "loader": loader_generator.get_state() if loader_generator is not None else None,
    }
    return state


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


# ---------------------------------------------------------------------- trained models
def load_trained(path: str | os.PathLike, device: str | torch.device = "cpu"):
    """Model (eval mode), config dict and memory bank (None for softmax runs) of a checkpoint.

    >>> model, config, bank = load_trained("runs/fashion-mnist-small_cnn-nca/best.pt")
    """
    from .models import build_model

    state = load_checkpoint(path)
    config = dict(state["config"])
    try:
        model = build_model(config["arch"], low_dim=int(config["low_dim"]), in_chans=int(config["in_chans"]), weights=None)
    except KeyError as err:
        raise SncaError(f"checkpoint {path} has an incomplete config (missing {err}); it was not written by snca train") from None
    load_model_state(model, state["model"], path)
    model.to(device).eval()
    bank = None
    if state.get("memory") is not None:
        bank = bank_from_state(state["memory"], path, device)
    return model, config, bank


def load_model_state(model: torch.nn.Module, weights: dict[str, Any], path: Any = "checkpoint") -> None:
    """``model.load_state_dict`` with a one-line SncaError when the shapes or keys differ."""
    try:
        model.load_state_dict(weights)
    except (RuntimeError, KeyError, ValueError) as err:
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        detail = lines[1] if len(lines) > 1 else (lines[0] if lines else type(err).__name__)
        raise SncaError(f"{path} does not match this model ({detail[:200]}); use the arch/low_dim the checkpoint was trained with") from None


def bank_from_state(memory_state: dict[str, Any], path: Any = "checkpoint", device: str | torch.device = "cpu"):
    """A MemoryBank rebuilt from its saved state (labels, slots, momentum)."""
    from .memory import MemoryBank

    try:
        extra = memory_state["_extra_state"]
        labels = memory_state["labels"]
        slots = memory_state["slots"]
    except KeyError as err:
        raise SncaError(f"{path}: the memory entry lacks {err}; the checkpoint is incomplete") from None
    bank = MemoryBank(labels, dim=int(extra["dim"]), momentum=float(extra["momentum"]), dtype=slots.dtype, num_classes=int(extra["num_classes"]))
    bank.load_state_dict(memory_state)
    return bank.to(device)


def check_dataset(bank_labels: torch.Tensor, targets: torch.Tensor, what: str = "checkpoint") -> None:
    """Refuse a dataset other than the one the memory was built for (one-line SncaError)."""
    targets = torch.as_tensor(targets).long().cpu()
    labels = bank_labels.long().cpu()
    if labels.numel() != targets.numel():
        raise SncaError(
            f"{what} was trained on {labels.numel()} images, this dataset has {targets.numel()}; "
            "use the dataset (and --data-dir / subset) the checkpoint was trained on"
        )
    if not torch.equal(labels, targets):
        raise SncaError(
            f"{what} was trained on a dataset with other labels (same size, {int((labels != targets).sum())} labels differ); "
            "use the dataset the checkpoint was trained on"
        )


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint file, or a run directory's best.pt (else last.pt)."""
    p = Path(path)
    if p.is_dir():
        for name in ("best.pt", "last.pt"):
            if (p / name).is_file():
                return p / name
        raise SncaError(f"run directory {p} holds no best.pt or last.pt")
    if not p.is_file():
        raise SncaError(f"checkpoint {p} does not exist; pass a .pt file or a run directory")
    return p
