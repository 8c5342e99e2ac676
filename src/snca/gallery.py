"""A gallery of labelled embeddings that lives apart from the training run.

The point of a non-parametric classifier: the network maps images to features, and the
*gallery* decides which classes exist. Adding a few labelled examples of a class the network
never saw makes it recognisable at once, with no retraining; removing examples forgets them.

On disk an index is a directory::

    features.safetensors   "features" (N, D) float32 L2-normalised, "labels" (N,) int64
    index.json             class names, ids, backend, kNN temperature, the embedding model
    faiss.index            (faiss backends only) the search structure, so large IVF/HNSW
                           indexes need not be rebuilt on every load

No pickle anywhere: loading an index cannot execute code.

Search backends: ``torch`` (exact, :func:`snca.knn.knn_search`, the default), and with faiss
installed ``faiss-flat`` (exact ``IndexFlatIP``), ``faiss-ivf`` (``IndexIVFFlat``, inner
product, approximate: probes ``nprobe`` of ``nlist`` cells) and ``faiss-hnsw``
(``IndexHNSWFlat``, inner product, approximate).

Galleries of a trained run (:func:`run_gallery`: its memory bank, or a split embedded by its
model) carry the run's class names: its base classes for a few-shot run, its coarse labels for
a coarse one. The commands are one call each: :func:`predict_images` (``snca predict``),
:func:`build_index`, :func:`add_images`, :func:`remove_images`, :func:`query_images` and
:func:`index_info` (``snca index ...``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from .checkpoint import TrainedRun, load_run
from .data import IMG_EXTENSIONS, RunData, build_transforms, run_datasets
from .errors import SncaError
from .features import embed_image_files, extract
from .files import atomic_write, atomic_write_text, check_writable
from .interop.reference import import_reference
from .knn import knn_search, vote

INDEX_FORMAT = "snca-index"
INDEX_VERSION = 1
BACKENDS = ("torch", "faiss-flat", "faiss-ivf", "faiss-hnsw")
DEFAULT_BACKEND_PARAMS: dict[str, Any] = {
    "nlist": None,  # IVF cells; None: about 4 * sqrt(N), at least 39 points per cell
    "nprobe": 16,  # IVF cells visited per query
    "hnsw_m": 32,  # HNSW graph degree
    "ef_construction": 80,
    "ef_search": 128,
}
_META_FILE = "index.json"
_TENSOR_FILE = "features.safetensors"
_FAISS_FILE = "faiss.index"


# ----------------------------------------------------------------------------- search backends
def require_faiss(backend: str = "faiss") -> Any:
    """Import faiss or raise a SncaError that says how to get it."""
    try:
        import faiss  # noqa: PLC0415 - optional dependency
    except ImportError as err:
        raise SncaError(
            f"backend '{backend}' needs faiss, which is not installed: pip install faiss-cpu "
            "(or pip install 'snca[faiss]'), or use --backend torch"
        ) from err
    return faiss


def default_nlist(num: int) -> int:
    """IVF cell count: ~4 sqrt(N), capped so each cell gets >= 39 training points (faiss's
    own minimum for a stable k-means)."""
    return max(1, min(int(4 * math.sqrt(max(num, 1))), num // 39))


class _Searcher:
    """Exact search with torch: nothing to build, always in sync."""

    def __init__(self, dim: int, params: dict[str, Any]) -> None:
        self.dim = dim
        self.params = params

    def reset(self) -> None:
        pass

    def add(self, features: Tensor) -> None:
        pass

    def search(self, gallery: Tensor, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        return knn_search(queries, gallery, k)


class _FaissSearcher(_Searcher):
    """A faiss index kept in step with the gallery: added rows are added incrementally;
    a removal marks it stale and it is rebuilt (and, for IVF, retrained) on the next query."""

    def __init__(self, kind: str, dim: int, params: dict[str, Any]) -> None:
        super().__init__(dim, params)
        self.kind = kind
        self.faiss = require_faiss(kind)
        self.index: Any = None  # None: stale, rebuild from the gallery before searching

    def reset(self) -> None:
        self.index = None

    def _build(self, gallery: Tensor) -> Any:
        faiss, d, n = self.faiss, self.dim, gallery.shape[0]
        x = gallery.detach().cpu().float().contiguous().numpy()
        if self.kind == "faiss-flat":
            index = faiss.IndexFlatIP(d)
        elif self.kind == "faiss-hnsw":
            index = faiss.IndexHNSWFlat(d, int(self.params["hnsw_m"]), faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = int(self.params["ef_construction"])
        else:
            nlist = self.params.get("nlist") or default_nlist(n)
            nlist = max(1, min(int(nlist), n))
            quantizer = faiss.IndexFlatIP(d)
            index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
            index.train(x)
        index.add(x)
        return index

    def _configure(self) -> None:
        if self.kind == "faiss-ivf":
            self.index.nprobe = int(self.params["nprobe"])
        elif self.kind == "faiss-hnsw":
            self.index.hnsw.efSearch = int(self.params["ef_search"])

    def add(self, features: Tensor) -> None:
        if self.index is not None:
            self.index.add(features.detach().cpu().float().contiguous().numpy())

    def ensure(self, gallery: Tensor) -> None:
        """Build (or rebuild, if stale) the faiss structure for ``gallery``."""
        if self.index is None or self.index.ntotal != gallery.shape[0]:
            self.index = self._build(gallery)

    def search(self, gallery: Tensor, queries: Tensor, k: int) -> tuple[Tensor, Tensor]:
        self.ensure(gallery)
        self._configure()
        k_eff = min(k, gallery.shape[0])
        sims, idx = self.index.search(queries.detach().cpu().float().contiguous().numpy(), k_eff)
        return torch.from_numpy(sims), torch.from_numpy(idx).long()

    def save(self, path: Path) -> bool:
        if self.index is None:
            return False
        self.faiss.write_index(self.index, str(path))
        return True

    def load(self, path: Path, num: int) -> None:
        index = self.faiss.read_index(str(path))
        self.index = index if index.ntotal == num and index.d == self.dim else None


def _make_searcher(backend: str, dim: int, params: dict[str, Any]) -> _Searcher:
    if backend not in BACKENDS:
        raise SncaError(f"unknown search backend '{backend}'; choose one of {', '.join(BACKENDS)}")
    return _Searcher(dim, params) if backend == "torch" else _FaissSearcher(backend, dim, params)


# ----------------------------------------------------------------------------- model identity
def model_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 of a model's weights (names, dtypes, shapes, bytes), independent of device."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if not isinstance(tensor, Tensor):
            continue
        t = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def model_record(run: TrainedRun) -> dict[str, Any]:
    """What an index remembers about the network that embeds its images."""
    return {
        "checkpoint": str(Path(run.path).resolve()),
        "weights_sha256": model_fingerprint(run.model),
        "arch": run.config.model.arch,
        "dataset": run.config.data.dataset,
        "in_chans": run.in_chans,
        "low_dim": run.config.model.low_dim,
    }


# ----------------------------------------------------------------------------- query result
@dataclass
class IndexQueryResult:
    """Neighbours and weighted-kNN votes for Q queries.

    ids[q] / similarities[q] / labels[q]: the k nearest gallery items of query q, most similar
    first. scores: (Q, C) class posterior (weighted vote, sums to 1 per query); predictions:
    (Q,) the best class; class_names: names of the C classes.
    """

    ids: list[list[str]]
    similarities: Tensor
    labels: Tensor
    scores: Tensor
    predictions: Tensor
    class_names: list[str] = field(default_factory=list)

    @property
    def predicted_names(self) -> list[str]:
        return [self.class_names[int(c)] for c in self.predictions]

    @property
    def predicted_scores(self) -> Tensor:
        return self.scores.gather(1, self.predictions[:, None]).squeeze(1)

    def as_dicts(self, top: int = 5) -> list[dict[str, Any]]:
        """JSON-ready summary of every query."""
        out = []
        for q in range(len(self.ids)):
            order = self.scores[q].argsort(descending=True)[: min(top, self.scores.shape[1])]
            out.append(
                {
                    "prediction": self.class_names[int(self.predictions[q])],
                    "score": float(self.scores[q, self.predictions[q]]),
                    "class_scores": {
                        self.class_names[int(c)]: float(self.scores[q, c]) for c in order if self.scores[q, c] > 0
                    },
                    "neighbors": [
                        {
                            "id": self.ids[q][j],
                            "similarity": float(self.similarities[q, j]),
                            "label": self.class_names[int(self.labels[q, j])],
                        }
                        for j in range(len(self.ids[q]))
                    ],
                }
            )
        return out


# ----------------------------------------------------------------------------- the index
class GalleryIndex:
    """Labelled, L2-normalised features with string ids, searchable by cosine similarity.

    Args:
        dim: feature dimension D.
        class_names: names of the classes, label i <-> class_names[i]; grows as classes are
            added by name.
        backend: one of :data:`BACKENDS`.
        sigma: kNN vote temperature (class score = sum over neighbours of exp(s / sigma));
            the training temperature is the natural choice.
        backend_params: overrides of :data:`DEFAULT_BACKEND_PARAMS` (nlist, nprobe, ...).
        model: what embeds the images (see :func:`model_record`); checked before adding.
    """

    def __init__(
        self,
        dim: int,
        class_names: Sequence[str] = (),
        backend: str = "torch",
        sigma: float = 0.05,
        backend_params: dict[str, Any] | None = None,
        model: dict[str, Any] | None = None,
    ) -> None:
        if dim < 1:
            raise SncaError(f"gallery feature dim must be >= 1, got {dim}")
        if not sigma > 0:
            raise SncaError(f"kNN temperature sigma must be > 0, got {sigma}")
        self.dim = int(dim)
        self.class_names: list[str] = [str(c) for c in class_names]
        if len(set(self.class_names)) != len(self.class_names):
            raise SncaError("class names must be unique")
        self.sigma = float(sigma)
        self.model = model
        self.features = torch.zeros(0, self.dim)
        self.labels = torch.zeros(0, dtype=torch.long)
        self.ids: list[str] = []
        self._id_set: set[str] = set()
        self.backend_params = {**DEFAULT_BACKEND_PARAMS, **(backend_params or {})}
        self.backend = backend
        self._searcher = _make_searcher(backend, self.dim, self.backend_params)

    # ------------------------------------------------------------------ basics
    def __len__(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        return (
            f"GalleryIndex(n={len(self)}, dim={self.dim}, classes={len(self.class_names)}, "
            f"backend={self.backend!r})"
        )

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def class_counts(self) -> dict[str, int]:
        counts = torch.bincount(self.labels, minlength=self.num_classes).tolist()
        return dict(zip(self.class_names, counts, strict=True))

    def set_backend(self, backend: str, **params: Any) -> None:
        """Switch search backend (and/or its parameters); the features are untouched."""
        self.backend_params.update(params)
        self._searcher = _make_searcher(backend, self.dim, self.backend_params)
        self.backend = backend

    def class_index(self, name: str, create: bool = True) -> int:
        """Label of class ``name``, appending it as a new class if ``create``."""
        name = str(name)
        if name in self.class_names:
            return self.class_names.index(name)
        if not create:
            raise SncaError(f"unknown class '{name}'; known: {', '.join(self.class_names[:20])}")
        self.class_names.append(name)
        return len(self.class_names) - 1

    # ------------------------------------------------------------------ edit
    def add(self, features: Tensor, labels: Tensor | Sequence[int] | Sequence[str], ids: Sequence[str]) -> None:
        """Add rows. ``labels`` are class indices or class *names*; unknown names become new
        classes, which is all it takes to make a new class recognisable. Features are
        L2-normalised here; ids must be new and unique."""
        features = torch.as_tensor(features).detach().float().cpu()
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise SncaError(f"gallery expects features of shape (n, {self.dim}), got {tuple(features.shape)}")
        n = features.shape[0]
        ids = [str(i) for i in ids]
        if len(ids) != n:
            raise SncaError(f"{n} features but {len(ids)} ids")
        labels_t = self._labels_tensor(labels, n)
        if len(set(ids)) != n:
            raise SncaError("ids must be unique within one add() call")
        clash = [i for i in ids if i in self._id_set]
        if clash:
            raise SncaError(f"id '{clash[0]}' is already in the gallery ({len(clash)} clashes); remove it first")
        if not bool(torch.isfinite(features).all()):
            raise SncaError("gallery features contain NaN or inf")
        features = F.normalize(features, dim=1)
        self.features = torch.cat([self.features, features])
        self.labels = torch.cat([self.labels, labels_t])
        self.ids.extend(ids)
        self._id_set.update(ids)
        self._searcher.add(features)

    def __contains__(self, item_id: object) -> bool:
        return str(item_id) in self._id_set

    def _labels_tensor(self, labels: Tensor | Sequence[int] | Sequence[str], n: int) -> Tensor:
        if isinstance(labels, Tensor):
            labels_t = labels.detach().cpu().long().flatten()
        else:
            labels = list(labels)
            if any(isinstance(x, str) for x in labels):
                labels_t = torch.tensor([self.class_index(x) for x in labels], dtype=torch.long)
            else:
                labels_t = torch.tensor([int(x) for x in labels], dtype=torch.long)
        if labels_t.numel() != n:
            raise SncaError(f"{n} features but {labels_t.numel()} labels")
        if n and (int(labels_t.min()) < 0 or int(labels_t.max()) >= self.num_classes):
            raise SncaError(
                f"label out of range [0, {self.num_classes}); pass class names to add new classes"
            )
        return labels_t

    def remove(self, ids: Sequence[str], missing_ok: bool = False) -> int:
        """Drop the rows with these ids; returns how many were removed. Unknown ids raise
        unless ``missing_ok``. Class names stay (a class may simply have no examples)."""
        wanted = {str(i) for i in ids}
        unknown = wanted - self._id_set
        if unknown and not missing_ok:
            raise SncaError(f"id '{sorted(unknown)[0]}' is not in the gallery ({len(unknown)} unknown ids)")
        keep = [j for j, i in enumerate(self.ids) if i not in wanted]
        removed = len(self.ids) - len(keep)
        if removed:
            keep_t = torch.tensor(keep, dtype=torch.long)
            self.features = self.features[keep_t]
            self.labels = self.labels[keep_t]
            self.ids = [self.ids[j] for j in keep]
            self._id_set = set(self.ids)
            self._searcher.reset()
        return removed

    # ------------------------------------------------------------------ search
    @torch.no_grad()
    def search(self, queries: Tensor, k: int = 20) -> tuple[Tensor, Tensor]:
        """Raw search: (similarities, row indices), each (Q, min(k, N)), best first. Rows an
        approximate backend could not fill have index -1 and similarity -inf."""
        if len(self) == 0:
            raise SncaError("the gallery is empty: add labelled examples (snca index add) before querying")
        if k < 1:
            raise SncaError(f"k must be >= 1, got {k}")
        queries = torch.as_tensor(queries).detach().float().cpu()
        if queries.ndim == 1:
            queries = queries[None]
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise SncaError(
                f"query features have shape {tuple(queries.shape)}, the gallery has dim {self.dim}: "
                "embed the queries with the gallery's model"
            )
        queries = F.normalize(queries, dim=1)
        sims, idx = self._searcher.search(self.features, queries, k)
        missing = idx < 0
        if bool(missing.any()):
            sims = sims.masked_fill(missing, -math.inf)
        return sims.float(), idx

    @torch.no_grad()
    def query(self, queries: Tensor, k: int = 20) -> IndexQueryResult:
        """The k nearest gallery items of every query and the weighted-kNN class vote
        (:func:`snca.knn.vote` with this index's sigma)."""
        sims, idx = self.search(queries, k)
        missing = idx < 0
        safe = idx.clamp_min(0)
        labels = self.labels[safe]
        # Neighbours an approximate backend could not fill vote with weight exp(-inf) = 0; a
        # query with no neighbour at all gets an all-zero score row.
        none_found = missing.all(dim=1, keepdim=True)
        vote_sims = sims.masked_fill(missing, -math.inf).masked_fill(none_found, 0.0)
        scores = vote(vote_sims, labels, self.num_classes, self.sigma).masked_fill(none_found, 0.0)
        predictions = scores.argmax(dim=1)
        ids = [[self.ids[j] for j in row if j >= 0] for row in idx.tolist()]
        return IndexQueryResult(ids, sims, labels, scores, predictions, list(self.class_names))

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | os.PathLike) -> Path:
        """Write the index to ``directory`` (created if needed). Each file is written to a
        temporary name and renamed, the JSON sidecar last, so a crash never leaves a
        half-written index that loads."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {"features": self.features.contiguous(), "labels": self.labels.contiguous()}
        atomic_write(directory / _TENSOR_FILE, lambda tmp: save_file(tensors, str(tmp)))
        faiss_file = None
        if isinstance(self._searcher, _FaissSearcher) and len(self):
            # Build it now: for IVF / HNSW on a large gallery this is the expensive part, and
            # saving it spares every later load the work.
            self._searcher.ensure(self.features)
            if self._searcher.index.ntotal == len(self):
                atomic_write(directory / _FAISS_FILE, self._searcher.save)
                faiss_file = _FAISS_FILE
        if faiss_file is None and (directory / _FAISS_FILE).exists():
            (directory / _FAISS_FILE).unlink()
        meta = {
            "format": INDEX_FORMAT,
            "version": INDEX_VERSION,
            "dim": self.dim,
            "size": len(self),
            "backend": self.backend,
            "backend_params": self.backend_params,
            "sigma": self.sigma,
            "model": self.model,
            "class_names": self.class_names,
            "faiss_file": faiss_file,
            "ids": self.ids,
        }
        atomic_write_text(directory / _META_FILE, json.dumps(meta))
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike, backend: str | None = None) -> GalleryIndex:
        """Read an index written by :meth:`save`; ``backend`` overrides the saved one."""
        directory = Path(directory)
        meta_path = directory / _META_FILE
        if not meta_path.is_file():
            raise SncaError(f"{directory} is not a gallery index (no {_META_FILE}); build one with `snca index build`")
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError) as err:
            raise SncaError(f"cannot read {meta_path}: {err}") from err
        if not isinstance(meta, dict) or meta.get("format") != INDEX_FORMAT:
            raise SncaError(f"{meta_path} is not an snca index description")
        if int(meta.get("version", 0)) > INDEX_VERSION:
            raise SncaError(f"index format version {meta['version']} is newer than this snca supports; upgrade snca")
        try:
            tensors = load_file(str(directory / _TENSOR_FILE))
        except (OSError, SafetensorError) as err:
            raise SncaError(f"cannot read {directory / _TENSOR_FILE}: {err}") from err
        features, labels = tensors.get("features"), tensors.get("labels")
        ids = [str(i) for i in meta.get("ids", [])]
        if features is None or labels is None or features.shape[0] != len(ids) or labels.shape[0] != len(ids):
            raise SncaError(f"index at {directory} is inconsistent (features, labels and ids differ in length)")
        index = cls(
            int(meta["dim"]),
            meta.get("class_names", []),
            backend=backend or meta.get("backend", "torch"),
            sigma=float(meta.get("sigma", 0.05)),
            backend_params=meta.get("backend_params"),
            model=meta.get("model"),
        )
        if len(ids) and (int(labels.min()) < 0 or int(labels.max()) >= index.num_classes):
            raise SncaError(f"index at {directory} has labels outside its class list")
        index.features = features.float()
        index.labels = labels.long()
        index.ids = ids
        index._id_set = set(ids)
        if len(index._id_set) != len(ids):
            raise SncaError(f"index at {directory} has duplicate ids")
        faiss_file = meta.get("faiss_file")
        if (
            faiss_file
            and isinstance(index._searcher, _FaissSearcher)
            and index.backend == meta.get("backend")
            and (directory / faiss_file).is_file()
        ):
            index._searcher.load(directory / faiss_file, len(ids))
        return index

    # ------------------------------------------------------------------ builders
    @classmethod
    def from_memory_bank(
        cls,
        bank: Any,
        class_names: Sequence[str] | None = None,
        ids: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> GalleryIndex:
        """The training memory as a gallery (slots in dataset-index order, with their labels)."""
        features = bank.features_by_index()
        names = list(class_names) if class_names is not None else [str(c) for c in range(bank.num_classes)]
        if len(names) < bank.num_classes:
            raise SncaError(f"memory has {bank.num_classes} classes but {len(names)} class names were given")
        index = cls(features.shape[1], names, **kwargs)
        index.add(features, bank.labels.cpu(), ids if ids is not None else [f"train:{i}" for i in range(len(features))])
        return index

    def check_model(self, record: dict[str, Any]) -> None:
        """Refuse a model whose weights differ from the one this index was built with."""
        if self.model is None:
            return
        mine, theirs = self.model.get("weights_sha256"), record.get("weights_sha256")
        if mine and theirs and mine != theirs:
            raise SncaError(
                f"this index was built with the model in {self.model.get('checkpoint')} (weights "
                f"{mine[:12]}), not {record.get('checkpoint')} (weights {theirs[:12]}); features from "
                "different models are not comparable: rebuild the index with this model"
            )


# ----------------------------------------------------------------------------- a run's data
_RUN_SPLITS = {"train": "gallery", "test": "test", "val": "test"}


def _run_split_name(split: str) -> str:
    """The :func:`snca.data.run_datasets` split behind a user's ``train`` / ``test`` (``val``)."""
    key = str(split).lower()
    if key not in _RUN_SPLITS:
        raise SncaError(f"unknown split {split!r}: use 'train' or 'test' (alias 'val')")
    return _RUN_SPLITS[key]


def run_split(run: TrainedRun, split: str = "train", data_dir: str | None = None, subset: int | None = None,
              run_subset: bool = True) -> tuple[Any, RunData]:
    """One split of a run's data under test transforms, with the run's label set and recorded
    class split (so labels and names are the run's): ``(dataset, run_data)``.

    ``split`` "train" is the training images (run_datasets' "gallery"), "test" (alias "val")
    the test images. ``subset``: a class-stratified sample of N images; without it the train
    split is the run's own training subset (the whole split if not ``run_subset``) and the test
    split is whole."""
    which = _run_split_name(split)
    data = run.config.data
    changes: dict[str, Any] = {"data_dir": data_dir} if data_dir is not None else {}
    if which == "gallery":
        changes["subset"] = subset if subset is not None else (data.subset if run_subset else None)
    else:
        changes["test_subset"] = subset
    cfg = dataclasses.replace(run.config, data=dataclasses.replace(data, **changes))
    loaded = run_datasets(cfg, (which,), run.facts)
    return loaded[which], loaded


def dataset_ids(dataset: Any, indices: Tensor | Sequence[int], name: str, split: str) -> list[str]:
    """Ids for dataset items: the file path when the dataset has one, else ``name:split:i`` with
    i the image's index in the full split. Subsets, class subsets (base classes) and coarse
    relabelling are seen through, so an image has the same id in every run of its dataset."""
    rows = torch.as_tensor(list(indices) if not isinstance(indices, Tensor) else indices).long().cpu()
    base = dataset
    # Wrappers (ClassSubset, CoarseLabels, torch Subset) hold the dataset they restrict; their
    # source_indices / indices address rows of that dataset, not of the full split.
    while isinstance(getattr(base, "__dict__", {}).get("dataset"), torch.utils.data.Dataset):
        inner = base.__dict__
        mapping = inner.get("source_indices", inner.get("indices"))
        if mapping is not None:
            rows = torch.as_tensor(mapping).long()[rows]
        base = inner["dataset"]
    paths = getattr(base, "paths", None)
    if paths is not None:
        return [str(paths[i]) for i in rows.tolist()]
    source = getattr(base, "source_indices", None)
    full = torch.as_tensor(source).long()[rows] if source is not None else rows
    return [f"{name}:{split}:{int(i)}" for i in full.tolist()]


def run_transform(run: TrainedRun) -> Any:
    """The test transform of a run's dataset at the run's image size (any image size in)."""
    return build_transforms(run.config.data.dataset, train=False, image_size=run.facts.get("image_size"))


def run_class_names(run: TrainedRun, data: RunData | None = None) -> list[str]:
    """The names of a run's labels (its base classes, or coarse labels, when it was trained on
    those): recorded in the checkpoint, else those of its data (``data``, or the test split
    opened here), else numbers."""
    if run.class_names:
        return list(run.class_names)
    if data is not None:
        return list(data.class_names)
    try:
        return list(run_datasets(run.config, ("test",), run.facts).class_names)
    except SncaError:
        count = run.memory.num_classes if run.memory is not None else 0
        return [str(c) for c in range(count)]


# ----------------------------------------------------------------------------- galleries of a run
def run_gallery(run: TrainedRun, source: str = "memory", split: str = "train", data_dir: str | None = None,
                subset: int | None = None, batch_size: int = 256, device: str | torch.device = "cpu",
                **options: Any) -> GalleryIndex:
    """A gallery from a trained run, with the run's class names (its base classes, or coarse
    labels, when it was trained on those) and ids of the images behind each row.

    source "memory": the run's memory bank (the training images' slots; ids from the training
    set when it can be opened, else slot ids; ``split`` and ``subset`` do not apply);
    "features": the images of ``split`` ("train" or "test") embedded by the run's model under
    test transforms (see :func:`run_split` for ``subset``). ``options``: backend,
    backend_params, sigma (default: the run's)."""
    options = {"sigma": run.config.sigma, "model": model_record(run), **options}
    if source == "memory":
        bank = run.memory
        if bank is None:
            raise SncaError(f"{run.path} holds no memory bank; use --source features (embed the --split images)")
        ids, data = None, None
        try:
            train, data = run_split(run, "train", data_dir=data_dir)
            if len(train) == bank.num_samples and torch.equal(torch.as_tensor(train.targets).long().cpu(), bank.labels.cpu()):
                ids = dataset_ids(train, range(len(train)), run.config.data.dataset, "train")
            else:
                warnings.warn(f"the training set ({len(train)} images) is not the one of the memory ({bank.num_samples} "
                              "slots); showing slot ids", stacklevel=2)
        except SncaError as err:
            warnings.warn(f"training set unavailable ({err}); showing slot ids", stacklevel=2)
        names = run_class_names(run, data)
        if len(names) < bank.num_classes:
            names = [str(c) for c in range(bank.num_classes)]
        return GalleryIndex.from_memory_bank(bank, names, ids, **options)
    if source != "features":
        raise SncaError(f"unknown gallery source {source!r}; use memory or features")
    dataset, data = run_split(run, split, data_dir=data_dir, subset=subset)
    feats, labels, indices = extract(run.model, dataset, "embedding", batch_size=batch_size, device=device)
    index = GalleryIndex(feats.shape[1], data.class_names, **options)
    index.add(feats, labels, dataset_ids(dataset, indices, run.config.data.dataset, split))
    return index


def load_index_model(index: GalleryIndex, checkpoint: str | os.PathLike | None = None,
                     device: str | torch.device = "cpu") -> TrainedRun:
    """The run whose model embeds ``index``'s images: ``checkpoint`` or the one the index
    recorded, refused unless its weights hash matches."""
    if checkpoint is None:
        if not index.model or not index.model.get("checkpoint"):
            raise SncaError("this index records no model; pass --checkpoint CKPT (the model that embedded its images)")
        checkpoint = index.model["checkpoint"]
        if not Path(checkpoint).exists():
            raise SncaError(f"the index's model {checkpoint} no longer exists; pass --checkpoint with its new location")
    run = load_run(checkpoint, device=device)
    check_run(index, run)
    return run


def check_run(index: GalleryIndex, run: TrainedRun) -> None:
    """Refuse a run whose model did not embed this index's images."""
    record = model_record(run)
    index.check_model(record)
    if int(record["low_dim"]) != index.dim:
        raise SncaError(f"the model embeds into {record['low_dim']} dims but the index holds {index.dim}-d features")


# ----------------------------------------------------------------------------- image files
def _is_image_file(p: Path) -> bool:
    return p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMG_EXTENSIONS


def image_paths(paths: Sequence[str | os.PathLike]) -> tuple[list[str], list[tuple[str, str]]]:
    """The files to classify: each path as given, a directory replaced by the image files
    directly in it (sorted by name). Returns (paths, failures): an existing directory without
    image files is a failure; anything else is left for the decoder to judge."""
    out: list[str] = []
    failures: list[tuple[str, str]] = []
    for p in paths:
        path = Path(p)
        if path.is_dir():
            found = sorted(str(f) for f in path.iterdir() if _is_image_file(f))
            if not found:
                failures.append((str(p), f"{p} is a directory without image files ({', '.join(IMG_EXTENSIONS)})"))
            out.extend(found)
        else:
            out.append(str(p))
    return out, failures


def folder_images(root: str | os.PathLike) -> tuple[list[str], list[str]]:
    """``ROOT/<class>/...`` -> (image paths, class name of each), classes and files sorted."""
    root = Path(root)
    if not root.is_dir():
        raise SncaError(f"--from-folder {root} is not a directory (expected ROOT/<class>/<images>)")
    paths, labels = [], []
    for d in sorted(x for x in root.iterdir() if x.is_dir() and not x.name.startswith(".")):
        for f in sorted(d.rglob("*")):
            if _is_image_file(f):
                paths.append(str(f))
                labels.append(d.name)
    if not paths:
        raise SncaError(f"{root} has no class folders with images ({', '.join(IMG_EXTENSIONS)})")
    return paths, labels


def _check_k(k: int) -> None:
    if k < 1:
        raise SncaError(f"--k must be >= 1, got {k}")


def classify_files(index: GalleryIndex, run: TrainedRun, paths: Sequence[str | os.PathLike], k: int = 20,
                   batch_size: int = 64, device: str | torch.device = "cpu") -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """Embed image files (a directory: the images in it) with the run's model and query the
    index: (answers, failures), each answer ``{"image": path, **IndexQueryResult.as_dicts()[i]}``."""
    _check_k(k)
    files, failures = image_paths(paths)
    embedded = embed_image_files(run.model, run_transform(run), run.in_chans, files, batch_size=batch_size, device=device)
    answers: list[dict[str, Any]] = []
    if embedded.paths:
        result = index.query(embedded.features, k=k)
        answers = [{"image": p, **summary} for p, summary in zip(embedded.paths, result.as_dicts(), strict=True)]
    return answers, failures + embedded.failures


def predict_images(checkpoint: str | os.PathLike, images: Sequence[str | os.PathLike], gallery: str | os.PathLike | None = None,
                   k: int = 20, data_dir: str | None = None, batch_size: int = 64,
                   device: str | torch.device = "cpu") -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """``snca predict``: classify image files (or directories of them) with a run, against an
    index built with that run's model (``gallery``) or by default the run's memory bank under
    the run's class names. Returns (answers, failures) as :func:`classify_files`."""
    _check_k(k)
    run = load_run(checkpoint, device=device)
    if gallery is not None:
        index = GalleryIndex.load(gallery)
        check_run(index, run)
    else:
        if run.memory is None:
            raise SncaError(f"{run.path} has no memory bank (a softmax run); pass --gallery INDEX_DIR built with `snca index build`")
        index = run_gallery(run, "memory", data_dir=data_dir)
    return classify_files(index, run, images, k=k, batch_size=batch_size, device=device)


# ----------------------------------------------------------------------------- editing an index on disk
@dataclass
class IndexEdit:
    """What an edit of an index directory did: the index as saved, how many images were added
    or removed, the classes the edit created, and the files that could not be read."""

    index: GalleryIndex
    count: int
    new_classes: list[str] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)


def build_index(out: str | os.PathLike, checkpoint: str | os.PathLike | None = None, *,
                from_reference: str | os.PathLike | None = None, arch: str | None = None, dataset: str | None = None,
                source: str | None = None, split: str = "train", subset: int | None = None, data_dir: str | None = None,
                empty: bool = False, backend: str = "torch", backend_params: dict[str, Any] | None = None,
                batch_size: int = 256, device: str | torch.device = "cpu",
                log: Callable[[str], None] | None = None) -> GalleryIndex:
    """``snca index build``: write a new index to ``out`` and return it.

    From a run (``checkpoint``): by default the run's ``split`` images embedded by its model
    (``source="features"``), or its memory bank (``source="memory"``); or, with
    ``from_reference``, a reference-implementation release converted to ``out/checkpoint.pt``
    first (``arch``, ``dataset`` (default folder), ``data_dir``; default source memory, an
    empty index when no training data is known). ``empty``: an index bound to the model with no
    images yet. Names are the run's class names. ``log`` hears of the conversion."""
    if backend not in BACKENDS:
        raise SncaError(f"unknown backend '{backend}'; choose one of {', '.join(BACKENDS)}")
    if backend != "torch":
        require_faiss(backend)
    out = Path(out)
    if (out / _META_FILE).exists():
        raise SncaError(f"{out} already holds an index; remove it or choose another --out")
    check_writable(out, "index directory", is_dir=True)
    if from_reference:
        if checkpoint:
            raise SncaError("give either a checkpoint or --from-reference, not both")
        checkpoint = import_reference(from_reference, out / "checkpoint.pt", arch=arch, dataset=dataset or "folder",
                                      data_dir=data_dir)
        if log is not None:
            log(f"imported {from_reference} -> {checkpoint}")
        source = source or "memory"
    elif not checkpoint:
        raise SncaError("snca index build needs a checkpoint (or --from-reference FILE)")
    run = load_run(checkpoint, device=device)
    options = {"backend": backend, "backend_params": backend_params}
    if empty or (from_reference and run.memory is None and data_dir is None):
        index = GalleryIndex(int(run.config.model.low_dim), sigma=run.config.sigma, model=model_record(run), **options)
    else:
        index = run_gallery(run, source or "features", split=split, data_dir=data_dir, subset=subset,
                            batch_size=batch_size, device=device, **options)
    index.save(out)
    return index


def add_images(index_dir: str | os.PathLike, images: Sequence[str | os.PathLike] | None = None, label: str | None = None,
               from_folder: str | os.PathLike | None = None, checkpoint: str | os.PathLike | None = None,
               batch_size: int = 64, device: str | torch.device = "cpu") -> IndexEdit:
    """``snca index add``: embed labelled image files with the index's model and add them
    (ids: the resolved paths); ``images`` all of class ``label``, or ``from_folder``
    ``ROOT/<class>/<images>``. A new class name adds a class. Unreadable files are reported in
    ``failures``; the index is saved when anything was added."""
    if bool(images) == bool(from_folder):
        raise SncaError("give either --images PATH... --label NAME or --from-folder ROOT")
    if images:
        if not label:
            raise SncaError("--images needs --label NAME (the class of these images)")
        paths, labels = [str(p) for p in images], [str(label)] * len(images)
    else:
        paths, labels = folder_images(from_folder)  # type: ignore[arg-type]
    index = GalleryIndex.load(index_dir)
    check_writable(index_dir, "index directory", is_dir=True)
    run = load_index_model(index, checkpoint, device=device)
    index.model = model_record(run)  # same weights; remember where the checkpoint is now
    embedded = embed_image_files(run.model, run_transform(run), run.in_chans, paths, batch_size=batch_size, device=device)
    label_of = dict(zip(paths, labels, strict=True))
    new_classes = sorted({label_of[p] for p in embedded.paths} - set(index.class_names))
    if embedded.paths:
        index.add(embedded.features, [label_of[p] for p in embedded.paths], [str(Path(p).resolve()) for p in embedded.paths])
        index.save(index_dir)
    return IndexEdit(index, len(embedded.paths), new_classes, embedded.failures)


def remove_images(index_dir: str | os.PathLike, ids: Sequence[str] = (), label: str | None = None) -> IndexEdit:
    """``snca index remove``: drop images by id (a file added by path may be named as typed or
    resolved) and/or every image of class ``label``; saves the index. Unknown ids raise."""
    if not ids and not label:
        raise SncaError("give --ids ID... or --label NAME")
    index = GalleryIndex.load(index_dir)
    check_writable(index_dir, "index directory", is_dir=True)
    wanted = []
    for i in (str(x) for x in ids):
        resolved = str(Path(i).resolve())
        wanted.append(resolved if i not in index and resolved in index else i)
    if label:
        c = index.class_index(label, create=False)
        wanted += [i for i, y in zip(index.ids, index.labels.tolist(), strict=True) if y == c]
    removed = index.remove(wanted)
    index.save(index_dir)
    return IndexEdit(index, removed)


def query_images(index_dir: str | os.PathLike, images: Sequence[str | os.PathLike], k: int = 20,
                 checkpoint: str | os.PathLike | None = None, batch_size: int = 64,
                 device: str | torch.device = "cpu") -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """``snca index query``: classify image files (or directories of them) against an index
    with its model. Returns (answers, failures) as :func:`classify_files`."""
    _check_k(k)
    index = GalleryIndex.load(index_dir)
    if len(index) == 0:
        raise SncaError(f"the index {index_dir} is empty: add labelled images with `snca index add` first")
    run = load_index_model(index, checkpoint, device=device)
    return classify_files(index, run, images, k=k, batch_size=batch_size, device=device)


def index_info(index_dir: str | os.PathLike) -> dict[str, Any]:
    """``snca index info``: size, dim, backend, sigma, images per class and model of an index."""
    index = GalleryIndex.load(index_dir)
    return {"size": len(index), "dim": index.dim, "backend": index.backend, "sigma": index.sigma,
            "classes": index.class_counts(), "model": index.model}
