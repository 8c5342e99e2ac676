"""What a model thinks is similar: the nearest training images of a few test images.

For some query images of a run (random ones, or chosen by index) the ``k`` nearest gallery
images (the training images under test transforms, by default) under the run's embedding and,
side by side, under other runs of the same data (``compare``, e.g. a softmax baseline) and raw
pixels (``raw_pixels``: :mod:`snca.features`' one raw-pixel definition). Queries and gallery
are the run's data (:func:`snca.gallery.run_split`): its label set and class split, so labels
are the run's class names (base classes, coarse labels).

:func:`write_neighbors` (``snca neighbors``) writes ``index.html`` (self-contained: images are
inline PNG data URIs), ``neighbors.png`` (the same grid as one image) and ``neighbors.json``
(ids, labels and similarities).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .checkpoint import TrainedRun, load_run
from .errors import SncaError
from .features import extract
from .files import atomic_write_text, check_writable
from .gallery import dataset_ids, run_split
from .knn import knn_search
from .viz import NeighborRow, Tile, precision, write_grid, write_html

DEFAULT_QUERIES = 8
RAW_PIXELS = "raw pixels"


class _Items(torch.utils.data.Dataset):
    """Chosen items of one or more indexed datasets as one dataset (``(image, label, j)``, with
    ``raw_item``, ``targets`` and ``in_chans``), as :func:`snca.features.extract` wants it."""

    def __init__(self, parts: Sequence[tuple[Any, Sequence[int]]]) -> None:
        self.items = [(ds, int(i)) for ds, rows in parts for i in rows]
        self.targets = torch.cat([torch.as_tensor(ds.targets).long()[torch.as_tensor(list(rows), dtype=torch.long)]
                                  for ds, rows in parts])
        self.in_chans = int(getattr(parts[0][0], "in_chans", 3))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, j: int) -> tuple[Tensor, int, int]:
        ds, i = self.items[j]
        return ds[i][0], int(self.targets[j]), j

    def raw_item(self, j: int) -> Any:
        ds, i = self.items[j]
        return ds.raw_item(i)


@dataclass
class FeatureSet:
    """One way of comparing images: features of the queries and of the gallery (rows in order)."""

    name: str
    queries: Tensor
    gallery: Tensor


@dataclass
class NeighborsPage:
    """The neighbours of the queries under every feature set, and the files written."""

    title: str
    meta: str
    rows: list[NeighborRow]
    record: list[dict[str, Any]]  # JSON-ready: per query its id, label and neighbours per feature set
    precision: dict[str, float]  # per feature set: the share of neighbours with the query's label
    files: dict[str, Path] = field(default_factory=dict)  # html, png, json


def choose_queries(n: int, count: int | None = None, ids: Sequence[int] | None = None, seed: int = 0,
                   split: str = "test") -> list[int]:
    """Query indices into a split of ``n`` images: ``ids`` as given (checked), else ``count``
    (default 8) drawn at random with ``seed``, sorted."""
    if ids:
        bad = [i for i in ids if not 0 <= i < n]
        if bad:
            raise SncaError(f"--query-ids {bad[0]} is out of range: the {split} split has {n} images (0..{n - 1})")
        return [int(i) for i in ids]
    count = DEFAULT_QUERIES if count is None else count
    if count < 1:
        raise SncaError(f"--queries must be >= 1, got {count}")
    g = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(n, generator=g)[: min(count, n)].tolist())


def method_name(run: TrainedRun, taken: set[str]) -> str:
    """``"<loss> (<run directory or checkpoint name>)"``, numbered if already ``taken``."""
    path = Path(run.path)
    base = f"{run.config.objective.loss} ({path.parent.name if path.name in ('best.pt', 'last.pt') else path.stem})"
    name, n = base, 2
    while name in taken:
        name, n = f"{base} #{n}", n + 1
    taken.add(name)
    return name


def _same_data(a: TrainedRun, b: TrainedRun) -> bool:
    """Whether two runs open the same images with the same labels and transforms."""
    def key(run: TrainedRun) -> tuple:
        facts = run.facts
        return (dataclasses.replace(run.config.data, workers=0), run.config.run.seed, facts.get("image_size"),
                facts.get("in_chans"), facts.get("class_split"))

    return key(a) == key(b)


def open_data(run: TrainedRun, split: str = "test", gallery_split: str = "train", gallery_subset: int | None = None,
              data_dir: str | None = None) -> tuple[Any, Any, Any]:
    """(queries dataset, gallery dataset, gallery RunData) of a run, under test transforms:
    queries from the whole ``split``, the gallery a ``gallery_subset`` of ``gallery_split`` (by
    default, for the training split, the run's own training subset)."""
    queries, _ = run_split(run, split, data_dir=data_dir, run_subset=False)
    gallery, data = run_split(run, gallery_split, data_dir=data_dir, subset=gallery_subset)
    return queries, gallery, data


def _model_features(run: TrainedRun, dataset: Any, batch_size: int, device: str | torch.device) -> Tensor:
    return extract(run.model, dataset, "embedding", batch_size=batch_size, device=device).features.float().cpu()


def feature_sets(runs: Sequence[TrainedRun], query_ds: Any, query_ids: Sequence[int], gallery_ds: Any,
                 raw_pixels: bool = False, split: str = "test", gallery_split: str = "train",
                 gallery_subset: int | None = None, data_dir: str | None = None, batch_size: int = 256,
                 device: str | torch.device = "cpu") -> list[FeatureSet]:
    """Features of the queries (rows ``query_ids`` of ``query_ds``) and of the gallery for each
    run, and, if ``raw_pixels``, for raw pixels. The datasets are the first run's (see
    :func:`open_data`); another run of other data settings (image size, ...) is given its own
    view of them, refused unless it holds the same images with the same labels."""
    main = runs[0]
    taken: set[str] = set()
    sets = []
    for run in runs:
        q_ds, g_ds = query_ds, gallery_ds
        if run is not main:
            if run.config.data.dataset != main.config.data.dataset:
                raise SncaError(f"--compare {run.path} was trained on {run.config.data.dataset}, not "
                                f"{main.config.data.dataset}; compare models of one dataset")
            if not _same_data(run, main):
                q_ds, g_ds, _ = open_data(run, split, gallery_split, gallery_subset, data_dir)
                if not (_same_labels(g_ds, gallery_ds) and _same_labels(q_ds, query_ds)):
                    raise SncaError(f"--compare {run.path} sees a different gallery (other subset or data); "
                                    "use checkpoints of the same data")
        sets.append(FeatureSet(method_name(run, taken), _model_features(run, _Items([(q_ds, query_ids)]), batch_size, device),
                               _model_features(run, g_ds, batch_size, device)))
    if raw_pixels:
        # One dataset for both, so queries and gallery are brought to the same pixel size.
        both = extract(None, _Items([(query_ds, query_ids), (gallery_ds, range(len(gallery_ds)))]), "pixels").features
        sets.append(FeatureSet(RAW_PIXELS, both[: len(query_ids)], both[len(query_ids):]))
    return sets


def _same_labels(a: Any, b: Any) -> bool:
    return len(a) == len(b) and torch.equal(torch.as_tensor(a.targets).long(), torch.as_tensor(b.targets).long())


def neighbor_rows(sets: Sequence[FeatureSet], query_ds: Any, query_ids: Sequence[int], gallery_ds: Any,
                  class_names: Sequence[str], gallery_ids: Sequence[str], k: int = 20,
                  split: str = "test") -> tuple[list[NeighborRow], list[dict[str, Any]]]:
    """The ``k`` nearest gallery images of each query under each feature set: the rows to draw
    and their JSON record."""
    q_labels = torch.as_tensor(query_ds.targets).long()[torch.as_tensor(list(query_ids), dtype=torch.long)].tolist()
    g_labels = torch.as_tensor(gallery_ds.targets).long().tolist()
    rows = [NeighborRow(Tile(query_ds.raw_item(i), class_names[y], id=f"{split}:{i}")) for i, y in zip(query_ids, q_labels, strict=True)]
    record: list[dict[str, Any]] = [{"query": f"{split}:{i}", "label": class_names[y], "neighbors": {}}
                                    for i, y in zip(query_ids, q_labels, strict=True)]
    for fs in sets:
        sims, idx = knn_search(fs.queries, fs.gallery, k)
        for r, row in enumerate(rows):
            tiles = []
            for s, j in zip(sims[r].tolist(), idx[r].tolist(), strict=True):
                y = g_labels[j]
                tiles.append(Tile(gallery_ds.raw_item(j), class_names[y], id=gallery_ids[j], similarity=s, match=y == q_labels[r]))
            row.panels.append((fs.name, tiles))
            record[r]["neighbors"][fs.name] = [{"id": t.id, "label": t.label, "similarity": t.similarity, "match": t.match}
                                               for t in tiles]
    return rows, record


def write_neighbors(checkpoint: str | os.PathLike, out: str | os.PathLike, *, queries: int | None = None,
                    query_ids: Sequence[int] | None = None, compare: Sequence[str | os.PathLike] = (),
                    raw_pixels: bool = False, k: int = 20, split: str = "test", gallery_split: str = "train",
                    gallery_subset: int | None = None, data_dir: str | None = None, seed: int = 0,
                    batch_size: int = 256, device: str | torch.device = "cpu", title: str | None = None) -> NeighborsPage:
    """``snca neighbors``: the nearest ``gallery_split`` images of ``queries`` random (or the
    ``query_ids``) ``split`` images under the run's embedding, each ``compare`` run's and, if
    ``raw_pixels``, raw pixels; written to ``out`` as index.html, neighbors.png and
    neighbors.json."""
    if k < 1:
        raise SncaError(f"--k must be >= 1, got {k}")
    check_writable(out, "neighbours page directory", is_dir=True)
    main = load_run(checkpoint, device=device)
    runs = [main, *(load_run(other, device=device) for other in compare)]
    query_ds, gallery_ds, data = open_data(main, split, gallery_split, gallery_subset, data_dir)
    ids = choose_queries(len(query_ds), queries, query_ids, seed, split)
    sets = feature_sets(runs, query_ds, ids, gallery_ds, raw_pixels, split, gallery_split, gallery_subset, data_dir,
                        batch_size, device)
    gallery_ids = dataset_ids(gallery_ds, range(len(gallery_ds)), main.config.data.dataset, gallery_split)
    rows, record = neighbor_rows(sets, query_ds, ids, gallery_ds, data.class_names, gallery_ids, k, split)
    title = title or f"Nearest neighbours: {Path(main.path).name} on {main.config.data.dataset}"
    meta = (f"{len(rows)} {split} queries, {k} nearest of {len(gallery_ds)} {gallery_split} images "
            "(test transforms, cosine similarity); green: same label as the query, red: different")
    summary = precision(rows)
    page = NeighborsPage(title, meta, rows, record, summary)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    page.files["html"] = write_html(rows, out / "index.html", title=title, meta=meta)
    page.files["png"] = write_grid(rows, out / "neighbors.png")
    page.files["json"] = out / "neighbors.json"
    atomic_write_text(page.files["json"], json.dumps({"title": title, "precision": summary, "queries": record}, indent=1))
    return page
