"""Class splits: base / val / novel classes of a dataset (split files, novel-class lists) and
the wrapper that keeps a dataset's base classes only."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..errors import SncaError
from .datasets import stratified_subset

SECTION_ALIASES = {"base": "base", "train": "base", "val": "val", "novel": "novel", "test": "novel"}
# Attributes a dataset wrapper passes through to the dataset it wraps.
FORWARDED_ATTRIBUTES = frozenset({"name", "split", "in_chans", "transform", "label_set", "root"})
HOLDOUT_SEED = 20180908  # the validation split's draw (data.holdout): fixed, the same for every run


# --------------------------------------------------------------------------- class splits


@dataclass
class ClassSplit:
    """Class names (or integer ids as strings) per section, as written in a split file.

    An empty ``base`` means "every class not listed in val or novel".
    """

    base: list[str] = field(default_factory=list)
    val: list[str] = field(default_factory=list)
    novel: list[str] = field(default_factory=list)
    source: str = "the split"


@dataclass
class ResolvedSplit:
    """Dataset class ids per section, each sorted ascending."""

    base: list[int]
    val: list[int]
    novel: list[int]
    classes: list[str]

    def names(self, section: str) -> list[str]:
        return [self.classes[i] for i in getattr(self, section)]


def parse_split_text(text: str, source: str = "the split file") -> ClassSplit:
    """Parse split-file text: ``[base]`` / ``[val]`` / ``[novel]`` headers (``[train]`` and
    ``[test]`` are accepted as aliases), one class per line, ``#`` comments, blank lines."""
    split = ClassSplit(source=source)
    section: str | None = None
    seen: dict[str, str] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        header = re.fullmatch(r"\[\s*([A-Za-z]+)\s*\]", line)
        if header:
            name = header.group(1).lower()
            if name not in SECTION_ALIASES:
                raise SncaError(
                    f"{source} line {lineno}: unknown section [{header.group(1)}]; "
                    "use [base], [val] and [novel]"
                )
            section = SECTION_ALIASES[name]
            continue
        if section is None:
            raise SncaError(
                f"{source} line {lineno}: class {line!r} comes before any [base]/[val]/[novel] header"
            )
        if seen.get(line) == section:
            raise SncaError(f"{source}: class {line!r} is listed twice in [{section}]")
        if line in seen:
            raise SncaError(
                f"{source}: class {line!r} is listed in both [{seen[line]}] and [{section}]; "
                "each class belongs to one section"
            )
        seen[line] = section
        getattr(split, section).append(line)
    if not split.novel:
        raise SncaError(f"{source} lists no [novel] classes: add a [novel] section")
    return split


def read_split_file(path: str | Path) -> ClassSplit:
    """Read a class-split file (see ``parse_split_text`` for the format)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise SncaError(f"cannot read split file {path}: {err.strerror or err}") from None
    return parse_split_text(text, source=f"split file {path}")


def resolve_class(name: str | int, classes: Sequence[str], where: str = "") -> int:
    """Dataset class id of ``name``: an exact class name first, else an integer id in range."""
    if isinstance(name, str):
        if name in classes:
            return list(classes).index(name)
        text = name.strip()
    else:
        text = str(int(name))
    if re.fullmatch(r"-?\d+", text):
        value = int(text)
        if 0 <= value < len(classes):
            return value
    known = ", ".join(repr(c) for c in list(classes)[:12]) + (", ..." if len(classes) > 12 else "")
    raise SncaError(
        f"unknown class {name!r}{where}: not a class name or id (0..{len(classes) - 1}) of the "
        f"dataset (classes: {known})"
    )


def resolve_split(split: ClassSplit, classes: Sequence[str]) -> ResolvedSplit:
    """Map a split's names to dataset class ids and check that the sections are disjoint."""
    owner: dict[int, str] = {}
    resolved: dict[str, list[int]] = {}
    for section in ("novel", "val", "base"):
        ids = []
        for name in getattr(split, section):
            cid = resolve_class(name, classes, f" in [{section}] of {split.source}")
            if cid in owner:
                raise SncaError(
                    f"class {classes[cid]!r} is in both [{owner[cid]}] and [{section}] of "
                    f"{split.source}: a class must be base, val or novel, not two of them"
                )
            owner[cid] = section
            ids.append(cid)
        resolved[section] = sorted(ids)
    if not resolved["base"]:
        resolved["base"] = [c for c in range(len(classes)) if c not in owner]
    if not resolved["base"]:
        raise SncaError(f"{split.source} leaves no base class to train on")
    if not resolved["novel"]:
        raise SncaError(f"{split.source} has no novel class to test on")
    return ResolvedSplit(resolved["base"], resolved["val"], resolved["novel"], list(classes))


def split_from_novel(
    novel: Sequence[str | int], classes: Sequence[str], val: Sequence[str | int] = ()
) -> ResolvedSplit:
    """Split from a ``--novel-classes`` flag: the listed classes are novel, the rest base."""
    split = ClassSplit(
        val=[str(v) for v in val], novel=[str(v) for v in novel], source="--novel-classes"
    )
    if not split.novel:
        raise SncaError("--novel-classes needs at least one class")
    dup = [n for i, n in enumerate(split.novel) if n in split.novel[:i]]
    if dup:
        raise SncaError(f"class {dup[0]!r} is given twice in --novel-classes")
    return resolve_split(split, classes)


# ------------------------------------------------------------------ base-class training set


class ClassSubset(Dataset):
    """The samples of some classes of an indexed dataset, labels remapped to 0..B-1 (in order of
    the original class id) and indices renumbered 0..n-1, so a memory bank sized for the subset
    addresses it directly. Items are ``(image, remapped_label, new_index)``.

    ``source_indices[i]`` is the index of item i in the wrapped dataset.
    """

    def __init__(self, dataset: Any, classes: Sequence[str | int]):
        all_classes = list(dataset.classes)
        ids = sorted({resolve_class(c, all_classes) for c in classes})
        if not ids:
            raise SncaError("class_subset needs at least one class")
        targets = torch.as_tensor(dataset.targets).long()
        remap = torch.full((len(all_classes),), -1, dtype=torch.long)
        remap[torch.tensor(ids)] = torch.arange(len(ids))
        self.dataset = dataset
        self.class_ids = ids
        self.source_indices = torch.nonzero(remap[targets] >= 0).flatten()
        self.targets = remap[targets[self.source_indices]]
        self.classes = [all_classes[i] for i in ids]
        self.num_classes = len(ids)
        fine = torch.as_tensor(getattr(dataset, "fine_targets", targets)).long()
        if torch.equal(fine, targets):
            self.fine_targets = self.targets
            self.fine_classes = self.classes
        else:  # a coarse-labelled dataset: fine labels keep their own numbering
            self.fine_targets = fine[self.source_indices]
            self.fine_classes = list(getattr(dataset, "fine_classes", []))

    def __len__(self) -> int:
        return int(self.source_indices.numel())

    def __getitem__(self, i: int):
        image = self.dataset[int(self.source_indices[i])][0]
        return image, int(self.targets[i]), int(i)

    def raw_item(self, i: int):
        return self.dataset.raw_item(int(self.source_indices[i]))

    def __getattr__(self, name: str):
        # Per-dataset facts (name, transform, channels) come from the wrapped dataset; per-item
        # arrays (images, paths) do not, as their rows would not match this wrapper's. The
        # "dataset" guard keeps unpickling in DataLoader workers from recursing.
        inner = self.__dict__.get("dataset")
        if name in FORWARDED_ATTRIBUTES and inner is not None:
            return getattr(inner, name)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")


class RowSubset(ClassSubset):
    """Some rows of an indexed dataset (``rows``: indices into it), labels and classes kept,
    indices renumbered 0..n-1 (a validation split carved out of the training images)."""

    def __init__(self, dataset: Any, rows: Tensor):
        targets = torch.as_tensor(dataset.targets).long()
        self.dataset = dataset
        self.class_ids = list(range(len(dataset.classes)))
        self.source_indices = torch.as_tensor(rows).long()
        self.targets = targets[self.source_indices]
        self.classes = list(dataset.classes)
        self.num_classes = len(self.classes)
        fine = torch.as_tensor(getattr(dataset, "fine_targets", targets)).long()
        self.fine_targets = fine[self.source_indices]
        self.fine_classes = list(getattr(dataset, "fine_classes", self.classes))


def holdout_rows(targets: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """(kept, held out): a class-stratified split of ``targets`` holding out ``n`` rows, drawn
    with :data:`HOLDOUT_SEED` whatever the run's seed, so that runs of every seed (and both
    losses) are tuned on the same images."""
    held = stratified_subset(torch.as_tensor(targets).long(), n, HOLDOUT_SEED)
    mask = torch.ones(len(targets), dtype=torch.bool)
    mask[held] = False
    return mask.nonzero().flatten(), held


def class_subset(dataset: Any, classes: Sequence[str | int]) -> ClassSubset:
    """Restrict an indexed dataset to ``classes`` (names or ids), labels remapped to 0..B-1."""
    return ClassSubset(dataset, classes)


# ------------------------------------------------------------------------------ episodes


