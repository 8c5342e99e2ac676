"""Checkpoints: written atomically, read without running code, and one way back to a model.

A checkpoint is one dict (``format: "snca-checkpoint"``, ``version: 2``)::

    config      the run's config as the user chose it (nested dict, snca.config.config_to_dict)
    facts       what follows from the data: in_chans, image_size, num_classes, class_names,
                class_split (base / val / novel class ids and names, or None), num_train
    model       EmbeddingNet state_dict
    memory      MemoryBank state_dict, or None (softmax)     classifier  the softmax head, or None
    optimizer, scheduler, scaler, epoch, mid_epoch, rng, metrics, best_val, num_train

Two layouts, chosen by the number of ranks that wrote it:

- one process: a single file that ``torch.load(path, weights_only=True)`` reads;
- W ranks: a directory ``<name>.pt/`` written through :mod:`torch.distributed.checkpoint`:
  each rank writes its own rows of the memory (a ShardedTensor), rank 0 writes ``state.pt``
  with everything else (and every rank's RNG state). Loading at any other world size reshards:
  each rank reads only the rows it will own, no rank gathers the whole bank. A single process
  (``snca eval`` on such a run) reads the whole memory.

Both are written to a temporary name and renamed into place, so a crash never leaves a
half-written checkpoint under the final name.

**The directory rule**: a run directory stands for its ``last.pt``, the model at the end of the
last completed epoch, whose numbers ``final.json`` reports. (``best.pt``, the epoch with the best
per-epoch monitor, is kept beside it; name it explicitly to use it.)
"""

from __future__ import annotations

import hashlib
import os
import shutil
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharded_tensor import Shard, init_from_local_shards

from . import distributed as sd
from .config import Config, config_from_dict
from .errors import SncaError
from .files import OutputError, atomic_path, is_write_failure, replace_path, write_error
from .memory import MemoryBank, shard_range
from .models import build_model

FORMAT = "snca-checkpoint"
VERSION = 2
STATE_FILE = "state.pt"  # inside a sharded checkpoint directory
# torch.save's pre-1.6 (non-zip) format starts with this pickle of its magic number.
_LEGACY_MAGIC = b"\x80\x02\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19"


def _is_torch_file(path: Path) -> bool:
    """A zip archive (torch.save's format) or a legacy torch file, judged by its first bytes."""
    if zipfile.is_zipfile(path):
        return True
    with open(path, "rb") as fh:
        return fh.read(len(_LEGACY_MAGIC)) == _LEGACY_MAGIC


# ---------------------------------------------------------------------- integrity
def tensor_digest(state: Any) -> str:
    """A BLAKE2b digest of every tensor in ``state`` (key path, dtype, shape, bytes) and of its
    plain values, walked in a fixed order; the ``digest`` entry itself is left out. Written with
    each checkpoint file and checked on load: a flipped bit in weights or memory is found even
    where the values still look plausible."""
    h = hashlib.blake2b(digest_size=20)

    def walk(key: str, value: Any) -> None:
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().data if t.numel() else b"")
        elif isinstance(value, dict):
            for k in sorted(value, key=str):
                if not (key == "" and k == "digest"):
                    walk(f"{key}/{k}", value[k])
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(f"{key}[{i}]", v)
        else:
            h.update(f"{key}={value!r}".encode())

    walk("", state)
    return h.hexdigest()


# Slots are unit vectors; float16/bfloat16 storage rounds their norms by up to ~1e-2.
_NORM_TOLERANCE = {torch.float32: 1e-3, torch.float64: 1e-6, torch.float16: 5e-3, torch.bfloat16: 2e-2}


def validate_state(state: dict[str, Any], path: Any = "checkpoint") -> None:
    """Refuse a checkpoint whose content cannot be a trained run (one-line SncaError naming what
    is wrong): non-finite weights, memory slots that are not finite unit vectors, labels outside
    the classes, or shapes that disagree with its config. Checks this rank's memory shard."""
    def bad(what: str) -> SncaError:
        return SncaError(f"checkpoint {path} is corrupt: {what}; use another checkpoint, e.g. best.pt or an earlier run")

    for entry in ("model", "classifier"):
        for name, t in (state.get(entry) or {}).items():
            if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise bad(f"{entry} weight {name!r} holds {int((~torch.isfinite(t)).sum())} NaN/Inf values")
    memory = state.get("memory")
    if memory is None:
        return
    slots, labels, extra = memory.get("slots"), memory.get("labels"), memory.get("_extra_state") or {}
    if slots is None or labels is None:
        raise bad("the memory entry lacks its slots or labels")
    num_classes, dim = int(extra.get("num_classes", 0)), int(extra.get("dim", -1))
    if slots.ndim != 2 or slots.shape[1] != dim:
        raise bad(f"memory slots have shape {tuple(slots.shape)}, its header says dim {dim}")
    low_dim = (state.get("config") or {}).get("model", {}).get("low_dim") if isinstance(state.get("config"), dict) else None
    if low_dim is not None and int(low_dim) != dim:
        raise bad(f"memory dim {dim} differs from the config's model.low_dim {low_dim}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise bad(f"memory labels span {int(labels.min())}..{int(labels.max())}, outside its {num_classes} classes")
    names = (state.get("facts") or {}).get("class_names")
    if names and len(names) != num_classes:
        raise bad(f"the memory has {num_classes} classes, its facts name {len(names)}")
    if not slots.numel():
        return
    values = slots.float()
    finite = torch.isfinite(values).all(dim=1)
    if not bool(finite.all()):
        raise bad(f"{int((~finite).sum())} of {len(values)} memory slots hold NaN/Inf values")
    norms = values.norm(dim=1)
    off = (norms - 1).abs() > _NORM_TOLERANCE.get(slots.dtype, 1e-3)
    if bool(off.any()):
        k = int(off.nonzero()[0])
        raise bad(f"{int(off.sum())} of {len(values)} memory slots are not unit vectors (e.g. slot {k} has norm {float(norms[k]):.4g})")


# ---------------------------------------------------------------------- writing
def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write ``state`` to the single file ``path`` atomically (temp file, fsync, rename), with a
    digest of its tensors that loading checks. A failed write (a full disk) raises a one-line
    :class:`~snca.files.OutputError` and leaves the previous ``path`` as it was."""
    state = {"format": FORMAT, "version": VERSION, **state}
    state["digest"] = tensor_digest(state)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            torch.save(state, fh)
    return Path(path)


def save_run_checkpoint(path: str | os.PathLike, state: dict[str, Any], memory: MemoryBank | None) -> Path:
    """Write a training checkpoint: a single file in one process; with several ranks (every
    rank calls it) a sharded directory, each rank writing its own memory rows."""
    path = Path(path)
    if sd.world_size() == 1:
        return save_checkpoint(path, state)
    rngs = sd.all_gather_object(state["rng"])
    tmp = Path(sd.broadcast_object(str(path.with_name(f".{path.name}.{os.getpid()}.tmp"))))
    if sd.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    sd.barrier()
    failed = ""
    try:
        if memory is not None:
            dcp.save({"memory.slots": sd.sharded_slots(memory)}, checkpoint_id=str(tmp))
        if sd.is_main():
            rest = dict(state, rng=rngs, world_size=sd.world_size())
            if memory is not None:
                rest["memory"] = {k: v for k, v in state["memory"].items() if k != "slots"}
            save_checkpoint(tmp / STATE_FILE, rest)
    except Exception as err:  # DCP wraps a rank's failed write in its own error type
        if not (is_write_failure(err) or is_write_failure(err.__cause__ or err)) and "No space" not in str(err):
            raise
        failed = str(write_error(path, err, kept=path.exists() or None))
    # Every rank learns whether any rank failed: the directory is put in place only if none did.
    failed = next((f for f in sd.all_gather_object(failed) if f), "")
    if failed:
        if sd.is_main():
            shutil.rmtree(tmp, ignore_errors=True)
        raise OutputError(failed)
    if sd.is_main():
        replace_path(tmp, path)
    sd.barrier()
    return path


def link_checkpoint(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Make ``dst`` hold the same bytes as ``src`` (hard links, else copies), atomically.

    ``last.pt`` is always replaced by a new file, so hard links keep ``best.pt`` intact without
    writing a large checkpoint twice."""
    src, dst = Path(src), Path(dst)
    tmp = dst.with_name(f".{dst.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)

    def link(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copyfile(a, b)

    if src.is_dir():
        shutil.copytree(src, tmp, copy_function=link)
    else:
        link(str(src), str(tmp))
    replace_path(tmp, dst)


# ---------------------------------------------------------------------- reading
def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint (file or sharded directory) from itself or its run directory (the directory
    rule: the run's ``last.pt``)."""
    p = Path(path)
    if p.is_dir() and not (p / STATE_FILE).is_file():
        if (p / "last.pt").exists():
            return p / "last.pt"
        raise SncaError(f"run directory {p} holds no last.pt; pass a checkpoint file or the directory of a training run")
    if not p.exists():
        raise SncaError(f"checkpoint {p} does not exist; pass a .pt file or the directory of a training run")
    return p


def _read_file(path: Path) -> dict[str, Any]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for truncated / foreign files
        # The weights_only unpickler reports any byte soup as "Weights only load failed", and a
        # text starting with "c" even as an "Unsupported global": only a well-formed torch file
        # can really hold objects it refuses to load.
        if not _is_torch_file(path):
            raise SncaError(f"checkpoint {path} is not a readable checkpoint (corrupt, truncated, or not a torch file); "
                            "use another checkpoint, e.g. best.pt or last.pt of the run") from None
        if "Unsupported global" in str(err):
            raise SncaError(f"checkpoint {path} holds objects that cannot be loaded safely (weights_only); it was not written by snca") from None
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise SncaError(f"checkpoint {path} is corrupt ({type(err).__name__}: {first}); use another checkpoint, "
                        "e.g. best.pt or last.pt of the run") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise SncaError(f"{path} is not an snca checkpoint (no 'format: {FORMAT}' entry)")
    if int(state.get("version", 0)) > VERSION:
        raise SncaError(f"checkpoint {path} has format version {state.get('version')}; this snca reads up to {VERSION}: upgrade snca")
    for key in ("config", "model", "epoch"):
        if key not in state:
            raise SncaError(f"checkpoint {path} lacks its {key!r} entry; it is incomplete")
    if "digest" in state and tensor_digest(state) != state["digest"]:
        raise SncaError(f"checkpoint {path} is corrupt: its content does not match the digest written with it (the file "
                        "was damaged or modified after it was saved); use another checkpoint, e.g. best.pt or an earlier run")
    return state


def _read_sharded_slots(path: Path, memory: dict[str, Any], rank: int, world: int) -> torch.Tensor:
    """Rows ``shard_range`` of the saved memory for shard ``rank`` of ``world`` (all rows when
    world is 1), read from the distributed checkpoint without loading anyone else's rows."""
    extra = memory["_extra_state"]
    n, dim = int(memory["labels"].numel()), int(extra["dim"])
    dtype = getattr(torch, str(extra.get("dtype", "float32")).replace("torch.", ""))
    start, end = shard_range(n, rank, world)
    local = torch.empty(end - start, dim, dtype=dtype)
    if world == 1:
        target: Any = local
    else:
        meta = ShardMetadata(shard_offsets=[start, 0], shard_sizes=[end - start, dim], placement=f"rank:{rank}/cpu")
        target = init_from_local_shards([Shard(local, meta)], [n, dim])
    try:
        with warnings.catch_warnings():  # DCP warns that it reads in one process: that is the intent at world size 1
            warnings.simplefilter("ignore", UserWarning)
            dcp.load({"memory.slots": target}, checkpoint_id=str(path), no_dist=world == 1)
    except Exception as err:  # noqa: BLE001 - DCP wraps reader errors of any kind
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise SncaError(f"checkpoint {path}: cannot read the memory shards ({first}); the checkpoint is incomplete") from None
    return local


def load_checkpoint(path: str | os.PathLike, shard: tuple[int, int] = (0, 1)) -> dict[str, Any]:
    """Read a checkpoint (either layout) for shard ``(rank, world_size)`` of a run: its ``memory``
    holds that shard's state (the whole bank for ``(0, 1)``) and ``rng`` that rank's RNG state
    (None when it was written by another number of ranks). One-line SncaError when the file is
    missing, unreadable, corrupt, or not an snca checkpoint."""
    path = resolve_checkpoint(path)
    rank, world = shard
    if path.is_dir():
        state = _read_file(path / STATE_FILE)
        rngs = state.get("rng") or []
        state["rng"] = rngs[rank] if int(state.get("world_size", 0)) == world and rank < len(rngs) else None
        if state.get("memory") is not None:
            memory = dict(state["memory"])
            memory["slots"] = _read_sharded_slots(path, memory, rank, world)
            memory["_extra_state"] = dict(memory["_extra_state"], shard=[rank, world])
            state["memory"] = memory
        validate_state(state, path)
        return state
    state = _read_file(path)
    validate_state(state, path)
    if world > 1:
        state["rng"] = state.get("rng") if rank == 0 and int(state.get("world_size", 1)) == world else None
        if state.get("memory") is not None:
            state["memory"] = sd.shard_bank_state(state["memory"], rank, world)
    return state


def load_model_state(model: torch.nn.Module, weights: dict[str, Any], path: Any = "checkpoint") -> None:
    """``model.load_state_dict`` with a one-line SncaError when the shapes or keys differ."""
    try:
        model.load_state_dict(weights)
    except (RuntimeError, KeyError, ValueError) as err:
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        detail = lines[1] if len(lines) > 1 else (lines[0] if lines else type(err).__name__)
        raise SncaError(f"{path} does not match this model ({detail[:200]}); use the arch/low_dim the checkpoint was trained with") from None


def bank_from_state(memory_state: dict[str, Any], path: Any = "checkpoint", device: str | torch.device = "cpu") -> MemoryBank:
    """A MemoryBank rebuilt from its saved (whole) state."""
    try:
        extra, labels, slots = memory_state["_extra_state"], memory_state["labels"], memory_state["slots"]
    except KeyError as err:
        raise SncaError(f"{path}: the memory entry lacks {err}; the checkpoint is incomplete") from None
    bank = MemoryBank(labels, dim=int(extra["dim"]), momentum=float(extra["momentum"]), dtype=slots.dtype,
                      num_classes=int(extra["num_classes"]))
    bank.load_state_dict(memory_state)
    return bank.to(device)


def check_dataset(bank_labels: torch.Tensor, targets: torch.Tensor, what: str = "checkpoint") -> None:
    """Refuse a dataset other than the one the memory was built for (one-line SncaError)."""
    targets = torch.as_tensor(targets).long().cpu()
    labels = bank_labels.long().cpu()
    if labels.numel() != targets.numel():
        raise SncaError(f"{what} was trained on {labels.numel()} images, this dataset has {targets.numel()}; "
                        "use the dataset (and --data-dir / subset) the checkpoint was trained on")
    if not torch.equal(labels, targets):
        raise SncaError(f"{what} was trained on a dataset with other labels (same size, {int((labels != targets).sum())} "
                        "labels differ); use the dataset the checkpoint was trained on")


# ---------------------------------------------------------------------- trained runs
@dataclass
class TrainedRun:
    """A trained model and what belongs with it (see :func:`load_run`)."""

    path: Path
    model: torch.nn.Module
    config: Config
    memory: MemoryBank | None
    class_names: list[str] | None  # None: not recorded (then the dataset's names apply)
    facts: dict[str, Any]
    state: dict[str, Any]

    @property
    def in_chans(self) -> int:
        return int(self.facts["in_chans"])


def _facts_of_version_1(config: dict[str, Any]) -> dict[str, Any]:
    """Version-1 checkpoints kept the derived values inside a flat config."""
    ids, names = config.get("class_split_ids"), config.get("class_split")
    split = None
    if ids:
        split = {s: [int(i) for i in ids.get(s, [])] for s in ("base", "val", "novel")}
        split["names"] = {s: list((names or {}).get(s, [])) for s in ("base", "val", "novel")}
    return {"in_chans": config.get("in_chans"), "image_size": config.get("image_size"), "class_names": None,
            "class_split": split}


def load_run(path: str | os.PathLike, device: str | torch.device = "cpu") -> TrainedRun:
    """Model (eval mode), typed config, memory (None for softmax runs), class names and facts of
    a checkpoint or run directory.

    >>> run = load_run("runs/fashion-mnist-small_cnn-nca")
    """
    path = resolve_checkpoint(path)
    state = load_checkpoint(path)
    raw = dict(state["config"])
    facts = dict(state.get("facts") or _facts_of_version_1(raw))
    try:
        config = config_from_dict(raw)
    except SncaError as err:
        raise SncaError(f"checkpoint {path} has a config this snca cannot read ({err})") from None
    if facts.get("in_chans") is None:
        raise SncaError(f"checkpoint {path} does not record its input channels; it was not written by snca train")
    model = build_model(config.model.arch, low_dim=config.model.low_dim, in_chans=int(facts["in_chans"]), weights=None)
    load_model_state(model, state["model"], path)
    model.to(device).eval()
    memory = bank_from_state(state["memory"], path, device) if state.get("memory") is not None else None
    names = facts.get("class_names")
    return TrainedRun(path, model, config, memory, list(names) if names else None, facts, state)
