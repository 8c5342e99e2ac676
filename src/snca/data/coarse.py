"""Coarse labels: groupings of fine classes, and a wrapper that relabels a dataset with them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from ..errors import SncaError
from .splits import FORWARDED_ATTRIBUTES


def fine_to_coarse_from_labels(fine: Tensor, coarse: Tensor) -> Tensor:
    """The coarse class of each fine class, read from paired labels; raises if a fine class
    appears under two coarse classes."""
    fine = torch.as_tensor(fine).long().flatten()
    coarse = torch.as_tensor(coarse).long().flatten()
    num_fine = int(fine.max()) + 1
    mapping = torch.full((num_fine,), -1, dtype=torch.long)
    mapping[fine] = coarse
    if not torch.equal(mapping[fine], coarse):
        raise SncaError("a fine class appears under two coarse classes: the mapping is not a grouping")
    return mapping


def groups_to_mapping(
    groups: Mapping[str, Sequence[int | str]], fine_classes: Sequence[str]
) -> tuple[list[int], list[str]]:
    """(coarse id of each fine class, coarse names) from {coarse name: [fine ids or names]}."""
    names = list(groups)
    mapping = [-1] * len(fine_classes)
    for cid, name in enumerate(names):
        for member in groups[name]:
            if isinstance(member, str) and member in fine_classes:
                fid = list(fine_classes).index(member)
            elif str(member).lstrip("-").isdigit() and 0 <= int(member) < len(fine_classes):
                fid = int(member)
            else:
                raise SncaError(f"coarse group {name!r} names unknown class {member!r}")
            if mapping[fid] != -1:
                raise SncaError(f"class {fine_classes[fid]!r} is in two coarse groups")
            mapping[fid] = cid
    missing = [fine_classes[i] for i, c in enumerate(mapping) if c == -1]
    if missing:
        raise SncaError(f"class {missing[0]!r} belongs to no coarse group: every class needs one")
    return mapping, names


class CoarseLabels(Dataset):
    """An indexed dataset relabelled to coarse classes: items ``(image, coarse, index)``,
    ``targets`` coarse, ``fine_targets`` / ``fine_classes`` the original labels. For datasets
    without a built-in coarse label set (e.g. the digits, with ``DIGIT_COARSE_GROUPS``)."""

    def __init__(self, dataset: Any, groups: Mapping[str, Sequence[int | str]]):
        mapping, names = groups_to_mapping(groups, list(dataset.classes))
        self.dataset = dataset
        self.fine_to_coarse = torch.tensor(mapping)
        self.fine_targets = torch.as_tensor(dataset.targets).long()
        self.fine_classes = list(dataset.classes)
        self.targets = self.fine_to_coarse[self.fine_targets]
        self.classes = names
        self.num_classes = len(names)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        image = self.dataset[i][0]
        return image, int(self.targets[i]), int(i)

    def raw_item(self, i: int):
        return self.dataset.raw_item(i)

    def __getattr__(self, name: str):
        # Per-dataset facts (name, transform, channels) come from the wrapped dataset; per-item
        # arrays (images, paths) do not, as their rows would not match this wrapper's. The
        # "dataset" guard keeps unpickling in DataLoader workers from recursing.
        inner = self.__dict__.get("dataset")
        if name in FORWARDED_ATTRIBUTES and inner is not None:
            return getattr(inner, name)
        raise AttributeError(f"{type(self).__name__} has no attribute {name!r}")
