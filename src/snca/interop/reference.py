"""Import the reference implementation's released checkpoints without running pickled code.

The reference (Wu, Efros, Yu; PyTorch, 2018) saved ``torch.save(dict)`` files in two layouts:

- ImageNet (``main.py``): ``state_dict``, a ``DataParallel`` torchvision ResNet whose final ``fc``
  maps to the 128-d embedding (keys ``module.conv1.weight`` ... ``module.fc.weight`` of shape
  (128, 512|2048)), plus ``epoch`` (completed epochs), ``arch``, ``best_prec1``, ``optimizer``;
- CIFAR (``cifar.py``): ``net``, the state_dict of its CIFAR ResNet18 (kuangliu-style: 3x3 stem
  ``conv1``/``bn1``, ``layer1..4`` whose blocks name the projection ``shortcut.0`` (conv) /
  ``shortcut.1`` (bn), and ``linear`` as the 128-d head; ``module.``-prefixed when trained on
  GPUs), plus ``acc`` and ``epoch`` (the 0-based index of the last finished epoch). It maps
  onto snca's ``cifar_resnet18``: ``shortcut`` -> ``downsample``, ``linear`` -> ``head``.

The layout is told from the keys (``linear.weight`` vs ``fc.weight``). Both hold ``lemniscate``:
the memory, pickled as a *module object* (``LinearAverage``) whose buffers are ``memory`` (N x
128, dataset-index order) and ``params`` ([temperature, momentum]).

Plain ``torch.load`` would import and instantiate the pickled module class (arbitrary code).
``torch.load(weights_only=True)`` with stand-in classes allow-listed through
``torch.serialization.safe_globals`` cannot replace the loader below (checked with torch 2.14):
it does read a *zip* file whose module object is pickled as ``GLOBAL <module>.LinearAverage`` +
NEWOBJ + BUILD once a stub is registered under that exact dotted name (NEWOBJ calls only
``stub.__new__``, BUILD the stub's ``__setstate__``), but (1) the 2018 release is in the
*legacy* format, where ``torch.save`` writes every ``nn.Module`` class as a persistent id
``('module', cls, source_file, source)``, and the weights_only unpickler refuses every
persistent id whose tag is not ``'storage'`` ("Only persistent_load of storage is allowed")
before any allow-list is consulted, so no stub can make the memory loadable; (2) allow-listing
is by exact ``module.name``, and the module the reference's classes were pickled from is not
known in advance, while the tool that lists a file's globals
(``get_unsafe_globals_in_checkpoint``) accepts zip files only; (3) that unpickler implements
only part of protocol 2 (no BINSTRING, the opcode of Python 2 ``str`` longer than 255 bytes).
So :func:`safe_load` reads both formats with its own :class:`RestrictedUnpickler`, whose
``find_class`` resolves only tensor-rebuild functions, storage and dtype names and a few plain
containers. Any other class name becomes an inert placeholder: instances created from it
(pickle's NEWOBJ, the way module objects are stored) just record their state, which is how the
memory buffer is recovered. *Calling* such a name (pickle's REDUCE, e.g. ``os.system('...')``)
refuses the whole file with a SncaError before anything is called: no module of the file is
ever imported. The one call that modules pickled by torch < 1.x always hold, their ``_backend``
(``torch.nn.backends.thnn._get_thnn_function_backend()``), is answered with None without
calling anything.

Both container formats are read: the zip archive of torch >= 1.6 and the older "legacy"
stream (magic number, pickles, then raw storage bytes), which the 2018 release used.
"""

from __future__ import annotations

import _compat_pickle
import io
import os
import pickle
import struct
import tarfile
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..checkpoint import load_model_state, save_checkpoint
from ..config import Config, config_to_dict
from ..data import build_dataset
from ..errors import SncaError
from ..memory import MemoryBank
from ..models import build_model

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001

_STORAGE_DTYPES: dict[str, torch.dtype] = {
    "DoubleStorage": torch.float64,
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
    "UntypedStorage": torch.uint8,
}
_DTYPE_NAMES = {
    "float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool",
    "double", "float", "half", "long", "int", "short",
}


class UnsafePickleError(SncaError):
    """The file asks to call something that is not a tensor-rebuild function."""


@dataclass(frozen=True)
class _StorageKind:
    dtype: torch.dtype


# ----------------------------------------------------------------------------- placeholders
class Placeholder:
    """Inert stand-in for an object of a class this loader does not import.

    ``snca_class`` is ``"module.Name"`` as named in the file, ``snca_args`` the constructor
    arguments recorded by pickle, ``snca_state`` whatever state pickle restored (for a
    ``torch.nn.Module``: its ``__dict__``, with ``_buffers`` and ``_parameters``).
    """

    snca_class = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> Placeholder:
        obj = object.__new__(cls)
        obj.__dict__["snca_args"] = args
        obj.__dict__["snca_state"] = None
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # pickle only runs __init__ when it *calls* the global (REDUCE), i.e. for functions and
        # factories: exactly what must never run. Creating instances (NEWOBJ) skips __init__.
        raise UnsafePickleError(
            f"refusing to load: the file calls {self.snca_class}(...), which could run arbitrary code; "
            "only tensors, plain containers and module state are read from reference checkpoints"
        )

    def __setstate__(self, state: Any) -> None:
        self.__dict__["snca_state"] = state

    def __repr__(self) -> str:
        return f"<placeholder {self.snca_class}>"

    def buffers(self) -> dict[str, Tensor]:
        """Tensors in the ``_buffers`` / ``_parameters`` of a pickled module (else {})."""
        state = self.snca_state
        if isinstance(state, tuple) and state and isinstance(state[0], dict):
            state = state[0]
        out: dict[str, Tensor] = {}
        if isinstance(state, dict):
            for key in ("_parameters", "_buffers"):
                for name, value in (state.get(key) or {}).items():
                    if isinstance(value, Tensor):
                        out[name] = value
        return out


_PLACEHOLDERS: dict[tuple[str, str], type] = {}


def _placeholder(module: str, name: str) -> type:
    key = (module, name)
    if key not in _PLACEHOLDERS:
        _PLACEHOLDERS[key] = type(name, (Placeholder,), {"snca_class": f"{module}.{name}", "__module__": __name__})
    return _PLACEHOLDERS[key]


# ----------------------------------------------------------------------------- rebuild functions
def _as_view(storage: Tensor, offset: int, size: Any, stride: Any) -> Tensor:
    if not isinstance(storage, Tensor):
        raise UnsafePickleError("refusing to load: a tensor refers to something that is not a storage")
    try:
        return storage.as_strided(tuple(int(s) for s in size), tuple(int(s) for s in stride), int(offset))
    except (RuntimeError, TypeError, ValueError) as err:
        raise SncaError(f"corrupt tensor in checkpoint ({' '.join(str(err).split())[:120]})") from None


def _rebuild_tensor_v2(storage: Tensor, offset: int, size: Any, stride: Any, *unused: Any) -> Tensor:
    return _as_view(storage, offset, size, stride)


def _rebuild_tensor(storage: Tensor, offset: int, size: Any, stride: Any) -> Tensor:
    return _as_view(storage, offset, size, stride)


def _rebuild_parameter(data: Tensor, *unused: Any) -> Tensor:
    return data


def _reconstructor(cls: Any, base: Any, state: Any = None) -> Any:
    """Protocol 0/1 instance creation (copyreg._reconstructor), allowed for placeholders only."""
    if isinstance(cls, type) and issubclass(cls, Placeholder) and base is object:
        return cls.__new__(cls)
    raise UnsafePickleError(
        f"refusing to load: the file reconstructs {getattr(cls, 'snca_class', cls)!r} from {base!r}, "
        "which could run code"
    )


def _thnn_backend() -> None:
    """``nn.Module._backend`` of torch < 1.x pickled as this call; its value is never used."""
    return None


def _numpy_scalar(dtype: Any, data: Any = None) -> Any:
    import numpy as np  # noqa: PLC0415

    if not isinstance(dtype, np.dtype) or dtype.hasobject or not isinstance(data, bytes):
        raise UnsafePickleError("refusing to load: unsupported numpy scalar in checkpoint")
    return np.frombuffer(data, dtype=dtype)[0]


def _numpy_dtype(name: Any, align: Any = False, copy: Any = False) -> Any:
    import numpy as np  # noqa: PLC0415

    if not isinstance(name, str):
        raise UnsafePickleError("refusing to load: unsupported numpy dtype in checkpoint")
    return np.dtype(name)


_ALLOWED: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch.nn.backends.thnn", "_get_thnn_function_backend"): _thnn_backend,
    ("collections", "OrderedDict"): OrderedDict,
    ("copyreg", "_reconstructor"): _reconstructor,
    ("builtins", "object"): object,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "complex"): complex,
    ("torch", "Size"): torch.Size,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("numpy", "dtype"): _numpy_dtype,
}


class RestrictedUnpickler(pickle.Unpickler):
    """``find_class`` resolves only the names in ``_ALLOWED``, storage types and dtypes; every
    other name becomes a :class:`Placeholder` subclass (inert; calling it refuses the file).
    ``persistent_load`` hands storage ids to ``storage_loader``."""

    def __init__(self, file: Any, storage_loader: Any = None) -> None:
        super().__init__(file, encoding="latin1")  # legacy (Python 2 era) pickles hold str as bytes
        self._storage_loader = storage_loader

    def find_class(self, module: str, name: str) -> Any:
        # Protocol <= 2 pickles name Python 2 modules (__builtin__, copy_reg): map them as
        # pickle's own find_class would, without importing anything.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module in ("torch", "torch.storage") and name in _STORAGE_DTYPES:
            return _StorageKind(_STORAGE_DTYPES[name])
        if module == "torch" and name in _DTYPE_NAMES:
            return getattr(torch, name)
        return _placeholder(module, name)

    def persistent_load(self, pid: Any) -> Any:
        if self._storage_loader is None:
            raise pickle.UnpicklingError("unexpected persistent id in a plain pickle")
        return self._storage_loader(pid)


def _kind_dtype(kind: Any) -> torch.dtype:
    if isinstance(kind, _StorageKind):
        return kind.dtype
    if isinstance(kind, torch.dtype):
        return kind
    raise UnsafePickleError(f"refusing to load: unknown storage type {kind!r}")


# ----------------------------------------------------------------------------- file formats
def _load_zip(path: Path) -> Any:
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        pkl = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if not pkl:
            raise SncaError(f"{path} is a zip file but not a torch checkpoint (no data.pkl)")
        prefix = pkl[0][: -len("data.pkl")]
        byteorder = prefix + "byteorder"
        if byteorder in names and zf.read(byteorder).strip() not in (b"little", b""):
            raise SncaError(f"{path} was written on a big-endian machine; convert it there first")
        cache: dict[str, Tensor] = {}

        def load_storage(pid: Any) -> Tensor:
            if not isinstance(pid, tuple) or not pid or pid[0] != "storage" or len(pid) < 3:
                raise UnsafePickleError(f"refusing to load: unsupported persistent id {str(pid)[:60]}")
            dtype, key = _kind_dtype(pid[1]), str(pid[2])
            if key not in cache:
                member = f"{prefix}data/{key}"
                if member not in names:
                    raise SncaError(f"{path} is incomplete: storage {key} is missing")
                raw = bytearray(zf.read(member))
                item = torch.empty(0, dtype=dtype).element_size()
                if len(raw) % item:
                    raise SncaError(f"{path} is corrupt: storage {key} has a partial element")
                cache[key] = torch.frombuffer(raw, dtype=dtype) if raw else torch.empty(0, dtype=dtype)
            return cache[key]

        return RestrictedUnpickler(io.BytesIO(zf.read(pkl[0])), load_storage).load()


def _load_legacy(path: Path) -> Any:
    size_limit = path.stat().st_size
    with open(path, "rb") as fh:
        plain = RestrictedUnpickler(fh)
        if plain.load() != _LEGACY_MAGIC:
            raise SncaError(f"{path} is not a torch checkpoint (neither a zip archive nor the legacy format)")
        if RestrictedUnpickler(fh).load() != _LEGACY_PROTOCOL:
            raise SncaError(f"{path} uses an unknown legacy torch protocol version")
        RestrictedUnpickler(fh).load()  # sys_info: endianness and type sizes
        roots: dict[str, Tensor] = {}

        def load_storage(pid: Any) -> Any:
            if not isinstance(pid, tuple) or not pid:
                raise UnsafePickleError(f"refusing to load: unsupported persistent id {str(pid)[:60]}")
            if pid[0] == "module":  # ('module', class, source_file, source): the class is a placeholder
                return pid[1]
            if pid[0] != "storage" or len(pid) < 5:
                raise UnsafePickleError(f"refusing to load: unsupported persistent id {str(pid)[:60]}")
            _, kind, root_key, _location, numel = pid[:5]
            view = pid[5] if len(pid) > 5 else None
            dtype = _kind_dtype(kind)
            key = str(root_key)
            if key not in roots:
                nbytes = int(numel) * torch.empty(0, dtype=dtype).element_size()
                if not 0 <= nbytes <= size_limit:
                    raise SncaError(f"{path} is corrupt: a storage claims {nbytes} bytes")
                roots[key] = torch.empty(int(numel), dtype=dtype)
            root = roots[key]
            if view is not None:
                _view_key, offset, view_size = view
                return root[int(offset) : int(offset) + int(view_size)]
            return root

        result = RestrictedUnpickler(fh, load_storage).load()
        keys = RestrictedUnpickler(fh).load()
        if not isinstance(keys, list):
            raise SncaError(f"{path} is corrupt: no storage key list after the data")
        for key in keys:
            header = fh.read(8)
            if len(header) != 8:
                raise SncaError(f"{path} is truncated (storage {key} missing)")
            (numel,) = struct.unpack("<q", header)
            root = roots.get(str(key))
            if root is None or numel != root.numel():
                raise SncaError(f"{path} is corrupt: storage {key} does not match its description")
            nbytes = numel * root.element_size()
            raw = bytearray(fh.read(nbytes))
            if len(raw) != nbytes:
                raise SncaError(f"{path} is truncated (storage {key} is short)")
            if nbytes:
                root.copy_(torch.frombuffer(raw, dtype=root.dtype))
    return result


def safe_load(path: str | os.PathLike) -> Any:
    """Read a ``torch.save`` file (zip or legacy format) without importing or calling anything
    but tensor-rebuild functions. Unknown classes come back as :class:`Placeholder` objects."""
    path = Path(path)
    if not path.is_file():
        raise SncaError(f"no such file: {path}")
    try:
        if zipfile.is_zipfile(path):
            return _load_zip(path)
        if tarfile_like(path):
            raise SncaError(f"{path} uses torch's pre-0.4 tar format, which is not supported; re-save it with torch >= 0.4")
        return _load_legacy(path)
    except SncaError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError,
            RuntimeError, struct.error, zipfile.BadZipFile, OSError) as err:
        raise SncaError(f"cannot read {path}: {type(err).__name__}: {' '.join(str(err).split())[:160]}") from None


def tarfile_like(path: Path) -> bool:
    try:
        return tarfile.is_tarfile(path)
    except OSError:
        return False


# ----------------------------------------------------------------------------- the release
IMAGENET, CIFAR = "imagenet", "cifar"
_HEAD = {IMAGENET: "fc", CIFAR: "linear"}
_ARCHS = {IMAGENET: ("resnet18", "resnet34", "resnet50"), CIFAR: ("cifar_resnet18",)}


@dataclass
class ReferenceRelease:
    """What a reference checkpoint holds, as plain tensors.

    state_dict: network weights in the reference's own names, any ``module.`` prefix removed
    (``fc.*`` / ``linear.*`` = the embedding). layout: ``"imagenet"`` (torchvision ResNet,
    ``main.py``) or ``"cifar"`` (CIFAR ResNet18, ``cifar.py``). memory: (N, D) memory in
    dataset-index order, or None. epoch: as saved (ImageNet: completed epochs; CIFAR: the index
    of the last finished epoch). temperature / momentum: from the memory's ``params`` buffer.
    """

    state_dict: dict[str, Tensor]
    memory: Tensor | None
    arch: str | None
    epoch: int | None
    temperature: float | None = None
    momentum: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    layout: str = IMAGENET

    @property
    def head_weight(self) -> Tensor:
        return self.state_dict[f"{_HEAD[self.layout]}.weight"]

    @property
    def low_dim(self) -> int:
        return int(self.head_weight.shape[0])

    @property
    def feat_dim(self) -> int:
        return int(self.head_weight.shape[1])

    @property
    def in_chans(self) -> int:
        return int(self.state_dict["conv1.weight"].shape[1])

    @property
    def image_size(self) -> int:
        return 32 if self.layout == CIFAR else 224

    @property
    def completed_epochs(self) -> int:
        if self.epoch is None:
            return 0
        return self.epoch + 1 if self.layout == CIFAR else self.epoch


def _strip_module(sd: dict[str, Any]) -> dict[str, Tensor]:
    out = {}
    for k, v in sd.items():
        if isinstance(v, Tensor):
            k = str(k)
            out[k[len("module.") :] if k.startswith("module.") else k] = v
    return out


def detect_layout(sd: dict[str, Tensor]) -> str | None:
    """``"imagenet"`` (``fc`` head), ``"cifar"`` (``linear`` head), or None (neither)."""
    if "conv1.weight" not in sd:
        return None
    if "fc.weight" in sd:
        return IMAGENET
    if "linear.weight" in sd:
        return CIFAR
    return None


def snca_key(key: str, layout: str) -> str:
    """The name in snca's EmbeddingNet of a reference weight (see the module docstring)."""
    head = _HEAD[layout] + "."
    if key.startswith(head):
        return "head." + key[len(head) :]
    if layout == CIFAR:
        key = key.replace(".shortcut.", ".downsample.")
    return "backbone." + key


def load_reference(path: str | os.PathLike) -> ReferenceRelease:
    """Read a reference release checkpoint (see the module docstring) safely."""
    obj = safe_load(path)
    if not isinstance(obj, dict):
        raise SncaError(f"{path} holds a {type(obj).__name__}, not the reference's checkpoint dict")
    weights = next((obj[k] for k in ("state_dict", "net", "model") if isinstance(obj.get(k), dict)), None)
    if weights is None:
        raise SncaError(f"{path} has no 'state_dict' entry; is it a reference release checkpoint?")
    sd = _strip_module(weights)
    layout = detect_layout(sd)
    if layout is None:
        raise SncaError(
            f"{path}: the weights are neither a torchvision-style ResNet with an fc embedding layer "
            "nor the reference's CIFAR ResNet18 with a linear one (no conv1.weight / fc.weight / "
            "linear.weight); only the reference's ImageNet ResNets and CIFAR ResNet18 are supported"
        )
    low_dim = int(sd[f"{_HEAD[layout]}.weight"].shape[0])
    memory = temperature = momentum = None
    lem = obj.get("lemniscate")
    buffers: dict[str, Tensor] = {}
    if isinstance(lem, Placeholder):
        buffers = lem.buffers()
    elif isinstance(lem, dict):  # someone saved lemniscate.state_dict() instead of the module
        buffers = {str(k): v for k, v in lem.items() if isinstance(v, Tensor)}
    if "memory" in buffers:
        memory = buffers["memory"].float().contiguous()
        if memory.ndim != 2 or memory.shape[1] != low_dim:
            raise SncaError(f"{path}: memory of shape {tuple(memory.shape)} does not match the {low_dim}-d embedding")
    params = buffers.get("params")
    if params is not None and params.numel() >= 2:
        temperature, momentum = float(params[0]), float(params[1])
    epoch = obj.get("epoch")
    extra = {k: obj[k] for k in ("best_prec1", "acc") if isinstance(obj.get(k), (int, float))}
    arch = obj.get("arch")
    return ReferenceRelease(
        sd, memory, str(arch) if isinstance(arch, str) else None,
        int(epoch) if isinstance(epoch, int) else None, temperature, momentum, extra, layout,
    )


def reference_model(release: ReferenceRelease, arch: str | None = None) -> torch.nn.Module:
    """snca's EmbeddingNet holding the reference weights (backbone <- ResNet, head <- fc/linear)."""
    choices = _ARCHS[release.layout]
    arch = arch or release.arch or (choices[0] if release.layout == CIFAR else None)
    if not arch:
        raise SncaError("the checkpoint does not name its architecture; pass --arch (resnet18, resnet34 or resnet50)")
    if arch not in choices:
        if release.layout == CIFAR:
            raise SncaError(f"this is the reference's CIFAR ResNet18 (a 'linear' head); it imports as cifar_resnet18, not {arch!r}")
        raise SncaError(f"reference checkpoints are torchvision ResNets; arch {arch!r} is not supported (use resnet18/34/50)")
    if release.arch and release.arch != arch:
        raise SncaError(f"the checkpoint says arch={release.arch!r} but --arch {arch} was given")
    model = build_model(arch, low_dim=release.low_dim, in_chans=release.in_chans)
    own = model.state_dict()
    mapped = {snca_key(k, release.layout): v for k, v in release.state_dict.items()}
    # BatchNorm of torch 0.4.0 had no num_batches_tracked counter; it only matters for training.
    for k, v in own.items():
        if k.endswith("num_batches_tracked") and k not in mapped:
            mapped[k] = torch.zeros_like(v)
    load_model_state(model, mapped, f"reference checkpoint ({arch})")
    return model.eval()


def reference_memory_bank(release: ReferenceRelease, labels: Tensor) -> MemoryBank:
    """The reference memory as an snca MemoryBank (needs the training labels, in dataset order,
    which the reference never saved: take them from the training set it was trained on)."""
    if release.memory is None:
        raise SncaError("this reference checkpoint holds no memory ('lemniscate')")
    labels = torch.as_tensor(labels).long().flatten()
    if labels.numel() != release.memory.shape[0]:
        raise SncaError(
            f"the reference memory has {release.memory.shape[0]} slots but the dataset has {labels.numel()} "
            "images; use the exact training set (same folders and files) the reference was trained on"
        )
    bank = MemoryBank(labels, dim=release.memory.shape[1], momentum=release.momentum or 0.5)
    bank.overwrite(release.memory, torch.arange(labels.numel()))
    return bank


def import_reference(
    path: str | os.PathLike,
    out: str | os.PathLike,
    arch: str | None = None,
    dataset: str | None = None,
    data_dir: str | None = None,
    labels: Tensor | None = None,
) -> Path:
    """Convert a reference release into an snca checkpoint at ``out``.

    ``dataset`` defaults to "cifar10" for the CIFAR layout, "imagenet" otherwise. The memory is
    kept when the training labels are known (``labels``, or the ``dataset`` / ``data_dir`` train
    split when its size matches); otherwise the checkpoint has no memory and galleries are built
    by extracting features (``snca index build``).
    """
    release = load_reference(path)
    model = reference_model(release, arch)
    dataset = dataset or ("cifar10" if release.layout == CIFAR else "imagenet")
    temperature = release.temperature or 0.05
    num_classes = None
    if labels is None and release.memory is not None and data_dir is not None:
        train = build_dataset(dataset, "train", data_dir=data_dir, on_bad_image="trust")
        labels, num_classes = train.targets, int(train.num_classes)
    bank = reference_memory_bank(release, labels) if labels is not None and release.memory is not None else None
    if bank is not None:
        num_classes = num_classes or int(bank.num_classes)
    cfg = Config()
    cfg.run.recipe = "reference-import"
    cfg.data.dataset = dataset
    cfg.data.data_dir = data_dir
    cfg.model.arch = str(model.arch)
    cfg.model.low_dim = release.low_dim
    cfg.objective.loss = "nca"
    cfg.objective.temperature = float(temperature)
    if release.momentum is not None and 0 <= release.momentum < 1:
        cfg.objective.memory_momentum_schedule = {0: float(release.momentum)}
    facts = {
        "in_chans": release.in_chans,
        "image_size": release.image_size,
        "num_classes": num_classes,
        "class_names": None,
        "class_split": None,
        "num_train": int(bank.num_samples) if bank is not None else None,
    }
    source = {
        "reference": str(Path(path).resolve()),
        "layout": release.layout,
        **{k: float(v) for k, v in release.extra.items()},
    }
    state = {
        "config": config_to_dict(cfg),
        "facts": facts,
        "model": model.state_dict(),
        "memory": bank.state_dict() if bank is not None else None,
        "classifier": None,
        "epoch": release.completed_epochs,
        "source": source,
    }
    return save_checkpoint(out, state)
