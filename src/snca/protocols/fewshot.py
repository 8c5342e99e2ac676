"""Few-shot recognition of classes the network never saw.

Train on the *base* classes only (``class_subset``), then run N-way K-shot episodes on the
held-out *novel* classes: sample N novel classes, K support and Q query examples per class,
and classify every query from the supports alone, by weighted kNN or by nearest class mean
(cosine to the L2-normalised mean of each class's supports). The score is the mean episode
accuracy with a 95 % confidence interval, 1.96 * std / sqrt(episodes).

Class splits come from a flag (``split_from_novel``) or a split file (``read_split_file``)::

    # miniImageNet-style: one class name per line under each header
    [base]
    n01532829
    ...
    [val]
    ...
    [novel]
    ...

Episode sampling is seeded and vectorised: all episodes are drawn with a few tensor ops
(Gumbel-style top-k of random keys per class), so 1,000 episodes take milliseconds.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from ..errors import SncaError

SECTION_ALIASES = {"base": "base", "train": "base", "val": "val", "novel": "novel", "test": "novel"}
_BLOCK_ELEMENTS = 16 << 20  # bound on the elements of one episode block's largest tensor
# Attributes a dataset wrapper passes through to the dataset it wraps.
FORWARDED_ATTRIBUTES = frozenset({"name", "split", "in_chans", "transform", "label_set", "root"})


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


def class_subset(dataset: Any, classes: Sequence[str | int]) -> ClassSubset:
    """Restrict an indexed dataset to ``classes`` (names or ids), labels remapped to 0..B-1."""
    return ClassSubset(dataset, classes)


# ------------------------------------------------------------------------------ episodes


@dataclass
class Episodes:
    """Sample indices of E episodes. ``classes`` (E, N): the dataset class of each episode slot
    (episode-local label n is ``classes[e, n]``); ``support`` (E, N, K) and ``query`` (E, N, Q)
    index the feature rows."""

    classes: Tensor
    support: Tensor
    query: Tensor
    seed: int

    @property
    def num_episodes(self) -> int:
        return int(self.classes.shape[0])


def sample_episodes(
    labels: Tensor,
    classes: Sequence[int],
    n_way: int = 5,
    n_shot: int = 1,
    n_query: int = 15,
    episodes: int = 1000,
    seed: int = 0,
) -> Episodes:
    """Draw stratified N-way K-shot episodes among ``classes`` (dataset class ids).

    Each episode picks N distinct classes uniformly, then K + Q distinct samples per class
    uniformly without replacement (first K support, last Q query). Same seed, same episodes.
    """
    labels = torch.as_tensor(labels).long().flatten().cpu()
    classes = [int(c) for c in classes]
    if n_way < 1 or n_shot < 1 or n_query < 1 or episodes < 1:
        raise SncaError(
            f"way, shot, query and episodes must all be >= 1 (got {n_way}, {n_shot}, {n_query}, {episodes})"
        )
    if len(set(classes)) != len(classes):
        raise SncaError("the novel classes contain duplicates")
    if n_way > len(classes):
        raise SncaError(
            f"{n_way}-way episodes need at least {n_way} novel classes, the split has {len(classes)}"
        )
    per_class = n_shot + n_query
    members = [torch.nonzero(labels == c).flatten() for c in classes]
    for c, m in zip(classes, members, strict=True):
        if m.numel() < per_class:
            raise SncaError(
                f"novel class {c} has {m.numel()} samples, fewer than shot + query = {per_class}; "
                "lower --shot/--query or use a split with more samples"
            )
    counts = torch.tensor([m.numel() for m in members])
    width = int(counts.max())
    table = torch.full((len(classes), width), -1, dtype=torch.long)
    for row, m in enumerate(members):
        table[row, : m.numel()] = m
    class_ids = torch.tensor(classes)

    gen = torch.Generator().manual_seed(int(seed))
    chosen = torch.rand(episodes, len(classes), generator=gen).argsort(dim=1)[:, :n_way]
    block = max(1, _BLOCK_ELEMENTS // (n_way * width))
    picks = []
    arange = torch.arange(width)
    for start in range(0, episodes, block):
        rows = chosen[start : start + block]  # (e, N)
        keys = torch.rand(rows.shape[0], n_way, width, generator=gen)
        keys.masked_fill_(arange >= counts[rows][..., None], -1.0)  # padding never wins
        pos = keys.topk(per_class, dim=2).indices  # distinct, uniformly random members
        picks.append(table[rows[..., None], pos])
    samples = torch.cat(picks)
    return Episodes(
        classes=class_ids[chosen],
        support=samples[..., :n_shot].contiguous(),
        query=samples[..., n_shot:].contiguous(),
        seed=int(seed),
    )


def episode_accuracies(
    features: Tensor,
    episodes: Episodes,
    method: str = "knn",
    k: int | None = None,
    sigma: float = 0.05,
) -> Tensor:
    """Per-episode query accuracy (E,), float64.

    method "knn": weighted vote of the k most similar supports (default k = all N*K supports),
    each weighing exp(s / sigma); "ncm": nearest class mean, cosine to the L2-normalised mean
    of each class's support features.
    """
    if method not in ("knn", "ncm"):
        raise SncaError(f"unknown few-shot classifier {method!r}: use 'knn' or 'ncm'")
    if not sigma > 0:
        raise SncaError(f"sigma must be > 0, got {sigma}")
    features = torch.as_tensor(features)
    if features.ndim != 2:
        raise SncaError("features must be a 2-D (num, dim) matrix")
    feats = F.normalize(features.float(), dim=1)
    device = feats.device
    num_e, n_way, n_shot = episodes.support.shape
    n_query = episodes.query.shape[2]
    support_labels = torch.arange(n_way, device=device).repeat_interleave(n_shot)
    query_labels = torch.arange(n_way, device=device).repeat_interleave(n_query)
    k_eff = n_way * n_shot if k is None else min(int(k), n_way * n_shot)
    if k_eff < 1:
        raise SncaError(f"k must be >= 1, got {k}")
    per_episode = n_way * (n_shot + n_query) * feats.shape[1]
    block = max(1, _BLOCK_ELEMENTS // per_episode)
    out = []
    for start in range(0, num_e, block):
        sup = feats[episodes.support[start : start + block].reshape(-1).to(device)]
        qry = feats[episodes.query[start : start + block].reshape(-1).to(device)]
        e = sup.shape[0] // (n_way * n_shot)
        sup = sup.view(e, n_way * n_shot, -1)
        qry = qry.view(e, n_way * n_query, -1)
        if method == "ncm":
            means = F.normalize(sup.view(e, n_way, n_shot, -1).mean(dim=2), dim=2)
            pred = torch.bmm(qry, means.transpose(1, 2)).argmax(dim=2)
        else:
            sims = torch.bmm(qry, sup.transpose(1, 2))  # (e, NQ, NK)
            top_s, top_i = sims.topk(k_eff, dim=2)
            weights = torch.exp((top_s - top_s[..., :1]) / sigma)  # in (0, 1]: no overflow
            scores = torch.zeros(e, n_way * n_query, n_way, device=device)
            scores.scatter_add_(2, support_labels[top_i], weights)
            pred = scores.argmax(dim=2)
        out.append((pred == query_labels).double().mean(dim=1).cpu())
    return torch.cat(out)


def confidence_interval(accuracies: Sequence[float] | Tensor) -> tuple[float, float]:
    """(mean, 95 % half-width) = (mean, 1.96 * std / sqrt(n)), std with ddof 0 as in the
    usual few-shot evaluation code."""
    acc = torch.as_tensor(accuracies, dtype=torch.float64).flatten()
    if acc.numel() == 0:
        raise SncaError("no episode accuracies to summarise")
    std = float(acc.std(correction=0))
    return float(acc.mean()), 1.96 * std / math.sqrt(acc.numel())


@dataclass
class FewShotResult:
    """Mean accuracy and 95 % CI half-width (fractions in [0, 1]) of one episode setting."""

    n_way: int
    n_shot: int
    n_query: int
    episodes: int
    method: str
    seed: int
    mean: float
    ci95: float
    accuracies: Tensor

    def to_dict(self) -> dict[str, Any]:
        return {
            "way": self.n_way,
            "shot": self.n_shot,
            "query": self.n_query,
            "episodes": self.episodes,
            "method": self.method,
            "seed": self.seed,
            "accuracy": self.mean,
            "ci95": self.ci95,
        }


def fewshot_evaluate(
    features: Tensor,
    labels: Tensor,
    novel_classes: Sequence[int],
    n_way: int = 5,
    n_shot: int = 1,
    n_query: int = 15,
    episodes: int = 1000,
    seed: int = 0,
    method: str = "knn",
    k: int | None = None,
    sigma: float = 0.05,
) -> FewShotResult:
    """Sample episodes among ``novel_classes`` and score ``features`` on them."""
    labels = torch.as_tensor(labels).long().flatten()
    if features.shape[0] != labels.numel():
        raise SncaError(f"{features.shape[0]} feature rows but {labels.numel()} labels")
    eps = sample_episodes(labels, novel_classes, n_way, n_shot, n_query, episodes, seed)
    acc = episode_accuracies(features, eps, method=method, k=k, sigma=sigma)
    mean, ci = confidence_interval(acc)
    return FewShotResult(n_way, n_shot, n_query, episodes, method, seed, mean, ci, acc)
