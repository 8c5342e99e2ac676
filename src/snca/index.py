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
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .checkpoint import resolve_checkpoint
from .errors import SncaError
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


def model_record(checkpoint: str | os.PathLike, model: torch.nn.Module, config: dict) -> dict[str, Any]:
    """What an index remembers about the network that embeds its images."""
    return {
        "checkpoint": str(Path(checkpoint).resolve()),
        "weights_sha256": model_fingerprint(model),
        "arch": config.get("arch"),
        "dataset": config.get("dataset"),
        "in_chans": config.get("in_chans"),
        "low_dim": config.get("low_dim"),
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
        from safetensors.torch import save_file  # noqa: PLC0415 - keep import light

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / (_TENSOR_FILE + ".tmp")
        save_file({"features": self.features.contiguous(), "labels": self.labels.contiguous()}, str(tmp))
        os.replace(tmp, directory / _TENSOR_FILE)
        faiss_file = None
        if isinstance(self._searcher, _FaissSearcher) and len(self):
            # Build it now: for IVF / HNSW on a large gallery this is the expensive part, and
            # saving it spares every later load the work.
            self._searcher.ensure(self.features)
            if self._searcher.index.ntotal == len(self):
                tmp = directory / (_FAISS_FILE + ".tmp")
                self._searcher.save(tmp)
                os.replace(tmp, directory / _FAISS_FILE)
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
        tmp = directory / (_META_FILE + ".tmp")
        tmp.write_text(json.dumps(meta))
        os.replace(tmp, directory / _META_FILE)
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike, backend: str | None = None) -> GalleryIndex:
        """Read an index written by :meth:`save`; ``backend`` overrides the saved one."""
        from safetensors import SafetensorError  # noqa: PLC0415
        from safetensors.torch import load_file  # noqa: PLC0415

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

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: str | os.PathLike,
        split: str = "train",
        data_dir: str | None = None,
        backend: str = "torch",
        subset: int | None = None,
        batch_size: int = 256,
        device: str = "cpu",
        backend_params: dict[str, Any] | None = None,
    ) -> GalleryIndex:
        """Embed a dataset split with a trained checkpoint (test-time transforms)."""
        from .checkpoint import load_trained  # noqa: PLC0415 - heavy, optional at import
        from .engine import extract_features  # noqa: PLC0415

        checkpoint = resolve_checkpoint(checkpoint)
        model, config, _ = load_trained(checkpoint, device=device)
        dataset = build_eval_dataset(config, split, data_dir=data_dir, subset=subset)
        features, labels, indices = extract_features(model, dataset, batch_size=batch_size, device=device)
        index = cls(
            features.shape[1],
            list(dataset.classes),
            backend=backend,
            sigma=knn_sigma(config),
            backend_params=backend_params,
            model=model_record(checkpoint, model, config),
        )
        index.add(features, labels, dataset_ids(dataset, indices, config.get("dataset", "data"), split))
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


# ----------------------------------------------------------------------------- dataset helpers
def build_eval_dataset(
    config: dict, split: str, data_dir: str | None = None, subset: int | None = None, training_subset: bool = True
) -> Any:
    """The checkpoint's dataset split with test-time transforms. For the train split the run's
    own ``subset`` is used unless ``subset`` is given (so rows line up with its memory)."""
    from .data import build_dataset, build_transforms  # noqa: PLC0415

    name = config.get("dataset")
    if not name:
        raise SncaError("the checkpoint's config names no dataset; pass a gallery index instead")
    if subset is None and training_subset and split == "train":
        subset = config.get("subset")
    transform = build_transforms(name, train=False, image_size=config.get("image_size"))
    return build_dataset(
        name,
        split,
        data_dir=data_dir or config.get("data_dir"),
        transform=transform,
        label_set=config.get("label_set", "fine"),
        subset=subset,
        seed=int(config.get("seed", 0) or 0),
    )


def knn_sigma(config: dict) -> float:
    """The vote temperature of a run: its ``knn_sigma``, else its training temperature."""
    return float(config.get("knn_sigma") or config.get("temperature") or 0.05)


def dataset_ids(dataset: Any, indices: Tensor | Sequence[int], name: str, split: str) -> list[str]:
    """Ids for dataset items: the file path when the dataset has one, else ``name:split:i``."""
    paths = None
    for attr in ("paths", "files", "samples", "imgs"):
        value = getattr(dataset, attr, None)
        if value is not None:
            paths = value
            break
    # Subsets are renumbered 0..n-1; ids name the image's index in the full split instead.
    source = getattr(dataset, "source_indices", None)
    out = []
    for i in torch.as_tensor(list(indices) if not isinstance(indices, Tensor) else indices).tolist():
        if paths is not None:
            p = paths[i]
            out.append(str(p[0] if isinstance(p, (tuple, list)) else p))
        else:
            out.append(f"{name}:{split}:{int(source[i]) if source is not None else i}")
    return out


# ----------------------------------------------------------------------------- image files
@dataclass
class EmbeddedImages:
    """Features of the image files that could be read, and a message for each that could not."""

    features: Tensor  # (n_ok, D)
    paths: list[str]  # the files behind each feature row, in input order
    failures: list[tuple[str, str]]  # (path, one-line reason)


def image_transform(config: dict) -> Any:
    """The dataset's test transform for a checkpoint's config (resizes/crops any image size
    and converts to the model's channel count)."""
    from .data import build_transforms  # noqa: PLC0415

    name = config.get("dataset")
    if not name:
        raise SncaError("the checkpoint's config names no dataset, so its test transform is unknown")
    return build_transforms(name, train=False, image_size=config.get("image_size"))


@torch.no_grad()
def embed_image_files(
    model: torch.nn.Module,
    config: dict,
    paths: Sequence[str | os.PathLike],
    batch_size: int = 64,
    device: str | torch.device = "cpu",
) -> EmbeddedImages:
    """Embed image files with a checkpoint's model and test transform.

    Each file is decoded with :func:`snca.data.load_image` (greyscale for 1-channel models,
    RGB otherwise); a missing, unreadable or non-image file is reported in ``failures`` and
    the others are still embedded.
    """
    from .data import load_image  # noqa: PLC0415

    transform = image_transform(config)
    mode = "L" if int(config.get("in_chans") or 3) == 1 else "RGB"
    tensors: list[Tensor] = []
    ok: list[str] = []
    failures: list[tuple[str, str]] = []
    for p in paths:
        p = str(p)
        try:
            img = load_image(p, mode=mode)
            x = transform(img)
        except SncaError as err:
            failures.append((p, str(err)))
            continue
        except Exception as err:  # noqa: BLE001 - a transform can fail in many ways on odd images
            failures.append((p, f"cannot convert image {p}: {type(err).__name__}: {' '.join(str(err).split())[:160]}"))
            continue
        tensors.append(x)
        ok.append(p)
    feats = []
    model.eval()
    for a in range(0, len(tensors), batch_size):
        batch = torch.stack(tensors[a : a + batch_size]).to(device)
        feats.append(model(batch).float().cpu())
    dim = int(getattr(model, "low_dim", 0) or 0)
    features = torch.cat(feats) if feats else torch.zeros(0, dim)
    return EmbeddedImages(features, ok, failures)


def load_index_model(index: GalleryIndex, checkpoint: str | os.PathLike | None = None, device: str = "cpu") -> tuple[Any, dict, dict]:
    """The model that embeds ``index``'s images: ``checkpoint`` or the one the index recorded,
    refused unless its weights hash matches. Returns (model, config, record)."""
    from .checkpoint import load_trained  # noqa: PLC0415

    if checkpoint is None:
        if not index.model or not index.model.get("checkpoint"):
            raise SncaError("this index records no model; pass --checkpoint CKPT (the model that embedded its images)")
        checkpoint = index.model["checkpoint"]
        if not Path(checkpoint).exists():
            raise SncaError(f"the index's model {checkpoint} no longer exists; pass --checkpoint with its new location")
    checkpoint = resolve_checkpoint(checkpoint)
    model, config, _ = load_trained(checkpoint, device=device)
    record = model_record(checkpoint, model, config)
    index.check_model(record)
    if record["low_dim"] is not None and int(record["low_dim"]) != index.dim:
        raise SncaError(f"the model embeds into {record['low_dim']} dims but the index holds {index.dim}-d features")
    return model, config, record
