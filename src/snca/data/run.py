"""The datasets of a training run: the one place a config becomes datasets.

Applies, in this order, the dataset and its label set (fine or coarse), the class-stratified
subset, the validation holdout (``data.holdout``: N training images become the "test" split,
the rest train; the real test set is not opened), and the run's few-shot class split (base
classes only, labels renumbered 0..B-1); the training split gets the training transforms, the
gallery (the training images) and the test split the test transforms. Every command that reopens a run's data (eval, predict, index,
neighbors, the protocols) comes through here, so they all see the run's classes and names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import Config
from ..errors import SncaError
from .build import build_dataset
from .registry import dataset_info
from .splits import (
    ResolvedSplit,
    RowSubset,
    class_subset,
    holdout_rows,
    read_split_file,
    resolve_split,
    split_from_novel,
)
from .transforms import build_transforms

SPLITS = ("train", "gallery", "test")  # train: training transforms; gallery, test: test transforms


@dataclass
class RunData:
    """A run's datasets by split name, with the facts that follow from them."""

    datasets: dict[str, Any]
    class_names: list[str]  # the run's labels 0..C-1
    num_dataset_classes: int  # classes of the dataset before the class split
    class_split: dict[str, Any] | None  # base / val / novel dataset class ids, and "names"
    in_chans: int
    image_size: int | None

    def __getitem__(self, split: str) -> Any:
        return self.datasets[split]

    def __contains__(self, split: str) -> bool:
        return split in self.datasets

    def facts(self) -> dict[str, Any]:
        """What a checkpoint records beside the config (see snca.checkpoint)."""
        return {"in_chans": self.in_chans, "image_size": self.image_size, "num_classes": len(self.class_names),
                "class_names": list(self.class_names), "class_split": self.class_split}


def _split_record(split: ResolvedSplit) -> dict[str, Any]:
    sections = ("base", "val", "novel")
    return {**{s: [int(i) for i in getattr(split, s)] for s in sections}, "names": {s: split.names(s) for s in sections}}


def run_class_split(cfg: Config, classes: list[str], facts: dict[str, Any] | None = None) -> ResolvedSplit | None:
    """The run's few-shot class split over ``classes``: the one a checkpoint recorded (checked
    against these classes), else the one ``novel_classes`` / ``split_file`` describe; None when
    the run trains on every class."""
    recorded = (facts or {}).get("class_split")
    if recorded:
        ids = {s: sorted(int(i) for i in recorded.get(s, [])) for s in ("base", "val", "novel")}
        names = recorded.get("names") or {}
        for section, section_ids in ids.items():
            if any(not 0 <= i < len(classes) for i in section_ids) or (
                names.get(section) and [classes[i] for i in section_ids] != list(names[section])
            ):
                raise SncaError(f"the run's recorded class split ({section} classes {list(names.get(section, section_ids))}) "
                                "does not match this dataset's classes; use the dataset (and --data-dir) the run was trained on")
        if not ids["base"]:
            raise SncaError("the run's recorded class split has no base class")
        return ResolvedSplit(ids["base"], ids["val"], ids["novel"], list(classes))
    if cfg.data.split_file:
        return resolve_split(read_split_file(cfg.data.split_file), classes)
    if cfg.data.novel_classes:
        return split_from_novel(cfg.data.novel_classes, classes)
    return None


def run_datasets(cfg: Config, splits: tuple[str, ...] = SPLITS, facts: dict[str, Any] | None = None,
                 all_classes: bool = False) -> RunData:
    """The run's datasets for ``splits`` (names from :data:`SPLITS`). ``facts``: a checkpoint's
    record (its class split is then the one applied); ``all_classes``: skip the class split
    (the few-shot protocol draws its episodes from the novel classes)."""
    d = cfg.data
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:
        raise SncaError(f"unknown run split {unknown[0]!r}; use one of {', '.join(SPLITS)}")
    info = dataset_info(d.dataset, d.label_set)
    out: dict[str, Any] = {}
    split, classes = None, None
    for name in splits:
        from_train = name in ("train", "gallery") or d.holdout is not None
        dataset = build_dataset(
            d.dataset, "train" if from_train else "test", data_dir=d.data_dir,
            transform=build_transforms(d.dataset, train=name == "train", image_size=d.image_size),
            label_set=d.label_set, subset=d.subset if from_train else d.test_subset, seed=cfg.run.seed,
            coarse_map=d.coarse_map, download=d.download,
        )
        if d.holdout is not None:
            if d.holdout >= len(dataset):
                raise SncaError(f"holdout {d.holdout} leaves no training image (the training set has {len(dataset)})")
            kept, held = holdout_rows(dataset.targets, d.holdout)
            dataset = RowSubset(dataset, held if name == "test" else kept)
        classes = list(dataset.classes)
        if not all_classes:
            split = split or run_class_split(cfg, classes, facts)
            if split is not None:
                dataset = class_subset(dataset, split.base)
        out[name] = dataset
    if classes is None:
        raise SncaError("run_datasets needs at least one split")
    names = split.names("base") if split is not None else classes
    return RunData(out, list(names), len(classes), _split_record(split) if split is not None else None,
                   int(info.in_chans), d.image_size or info.image_size)
