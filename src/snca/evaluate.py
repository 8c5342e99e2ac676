"""Assessing a trained run: kNN accuracy, feature files, and the generalisation protocols.

Each function takes a checkpoint (or run directory) and options, reopens the run's data through
:func:`snca.data.run_datasets` (so every command sees the run's classes), embeds through
:func:`snca.features.extract`, scores with :mod:`snca.protocols`, and returns a JSON-ready dict.
The CLI only prints it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .checkpoint import TrainedRun, check_dataset, load_checkpoint, load_run, resolve_checkpoint
from .config import Config, config_from_dict
from .data import (
    RunData,
    dataset_info,
    read_split_file,
    resolve_split,
    run_class_split,
    run_datasets,
    split_from_novel,
)
from .errors import SncaError
from .features import check_output_file, extract, save_features
from .protocols import fewshot_evaluate, knn_accuracy, retrieval_metrics
from .runtime import resolve_device
from .train.evaluation import Evaluator


def with_data(cfg: Config, **changes: Any) -> Config:
    """``cfg`` with the data settings in ``changes`` replaced (None values are ignored)."""
    changes = {k: v for k, v in changes.items() if v is not None}
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **changes)) if changes else cfg


def _check_channels(run: TrainedRun, cfg: Config) -> None:
    if cfg.data.dataset != run.config.data.dataset:
        info = dataset_info(cfg.data.dataset, cfg.data.label_set)
        if info.in_chans != run.in_chans:
            raise SncaError(f"{run.path} was trained on {run.config.data.dataset} ({run.in_chans}-channel images); "
                            f"{cfg.data.dataset} has {info.in_chans}-channel images")


# ---------------------------------------------------------------------- snca eval / extract
def evaluate_run(checkpoint: str | Path, ks: Sequence[int] | None = None, sigma: float | None = None,
                 gallery: str = "both", features: str = "embedding", dataset: str | None = None,
                 data_dir: str | None = None, test_subset: int | None = None, batch_size: int | None = None,
                 workers: int | None = None, device: str = "auto", amp: str | None = None) -> dict[str, Any]:
    """Weighted-kNN accuracy of a run on its test set, against the memory and/or the training
    images re-embedded under test transforms ("recomputed"), for several k from one search."""
    run = load_run(checkpoint, resolve_device(device))
    cfg = with_data(run.config, dataset=dataset, data_dir=data_dir, test_subset=test_subset)
    _check_channels(run, cfg)
    if run.memory is None and gallery == "memory":
        raise SncaError(f"{run.path} is a {cfg.objective.loss} checkpoint without a memory bank; use --gallery recomputed")
    galleries = ["recomputed"] if run.memory is None else (["memory", "recomputed"] if gallery == "both" else [gallery])
    kinds = ["embedding", "penultimate"] if features == "both" else [features]
    ks = sorted(set(ks or [cfg.eval.knn_k]))
    if min(ks) < 1:
        raise SncaError(f"k must be >= 1, got {min(ks)}")
    sigma = cfg.sigma if sigma is None else sigma
    if not sigma > 0:
        raise SncaError(f"sigma must be > 0, got {sigma}")
    data = run_datasets(cfg, ("test",) + (("gallery",) if "recomputed" in galleries else ()), run.facts)
    num_classes = len(data.class_names)
    if run.memory is not None:
        if "gallery" in data:
            check_dataset(run.memory.labels, data["gallery"].targets, str(run.path))
        if num_classes != run.memory.num_classes:
            raise SncaError(f"{run.path} was trained on {run.memory.num_classes} classes, this test set has {num_classes}; "
                            "use the dataset it was trained on")
    ev = Evaluator(run.model, resolve_device(device), num_classes, batch_size or cfg.eval.embed_batch_size,
                   cfg.data.workers if workers is None else workers, amp or cfg.run.amp, cfg.run.channels_last)
    rows, notes = [], []
    sizes = {"memory": run.memory.num_samples if run.memory is not None else 0,
             "recomputed": len(data["gallery"]) if "gallery" in data else 0}
    for name in galleries:
        if max(ks) > sizes[name]:  # a kNN vote cannot use more neighbours than the gallery holds
            over = ", ".join(str(k) for k in ks if k > sizes[name])
            notes.append(f"k {over} exceeds the {sizes[name]} images of the {name} gallery: capped to {sizes[name]}")
    for kind in kinds:
        test_f, test_y, _ = ev.embed(data["test"], kind)
        for name in galleries:
            if name == "memory" and kind != "embedding":
                continue  # the memory holds embeddings only
            source = run.memory if name == "memory" else ev.embed(data["gallery"], kind)
            capped = {k: min(k, sizes[name]) for k in ks}
            accs = ev.knn(test_f, test_y, source, sorted(set(capped.values())), sigma)
            for k in ks:
                row = {"gallery": name, "features": kind, "k": capped[k], "sigma": sigma, **accs[capped[k]]}
                rows.append(row if capped[k] == k else {**row, "k_requested": k})
    return {
        "checkpoint": str(run.path), "dataset": cfg.data.dataset, "arch": cfg.model.arch, "loss": cfg.objective.loss,
        "num_queries": len(data["test"]),
        "num_gallery": {"memory": run.memory.num_samples if run.memory is not None else None,
                        "recomputed": len(data["gallery"]) if "gallery" in data else None},
        "results": rows,
        "notes": notes,
    }


def extract_split(checkpoint: str | Path, out: str | Path, split: str = "test", features: str = "embedding",
                  subset: int | None = None, dataset: str | None = None, data_dir: str | None = None,
                  batch_size: int | None = None, workers: int | None = None, device: str = "auto",
                  amp: str | None = None) -> dict[str, Any]:
    """Embed every image of a split (test transforms) and write features, labels and ids."""
    if split not in ("train", "test"):
        raise SncaError(f"unknown split {split!r}; use train or test")
    if subset is not None and split != "train":
        raise SncaError("--subset applies to the train split; the test split is embedded whole (use --test-subset with eval)")
    check_output_file(out)
    device_t = resolve_device(device)
    run = load_run(checkpoint, device_t)
    cfg = with_data(run.config, dataset=dataset, data_dir=data_dir, subset=subset)
    _check_channels(run, cfg)
    which = "gallery" if split == "train" else "test"
    data = run_datasets(cfg, (which,), run.facts)
    if which == "gallery" and run.memory is not None and subset is None and dataset is None:
        check_dataset(run.memory.labels, data[which].targets, str(run.path))
    feats, labels, ids = extract(run.model, data[which], features, batch_size or cfg.eval.embed_batch_size, device_t,
                                 cfg.data.workers if workers is None else workers, amp or cfg.run.amp, cfg.run.channels_last)
    written = save_features(out, feats.cpu().numpy(), labels.numpy(), ids.numpy())
    return {"rows": int(feats.shape[0]), "dim": int(feats.shape[1]), "features": features, "split": split,
            "files": [str(p) for p in written]}


# ---------------------------------------------------------------------- protocols
@dataclass
class FeatureSource:
    """Where protocol features come from: a run's model (embedding / penultimate), or raw pixels
    (no model); and the data settings (the run's, or the given dataset)."""

    run: TrainedRun | None
    kind: str
    config: Config
    device: torch.device
    batch_size: int
    what: str

    def data(self, splits: tuple[str, ...], label_set: str | None = None) -> RunData:
        """The splits with every class (the protocols score classes the run never saw)."""
        cfg = with_data(self.config, label_set=label_set)
        return run_datasets(cfg, splits, all_classes=True)

    def features(self, dataset: Any) -> Tensor:
        model = self.run.model if self.run is not None else None
        return extract(model, dataset, self.kind, self.batch_size, self.device).features.cpu()


def feature_source(checkpoint: str | Path | None, kind: str = "embedding", dataset: str | None = None,
                   data_dir: str | None = None, subset: int | None = None, test_subset: int | None = None,
                   device: str = "auto", batch_size: int = 256) -> FeatureSource:
    if batch_size < 1:
        raise SncaError(f"--batch-size must be >= 1, got {batch_size}")
    run = None
    if kind == "pixels":
        cfg = config_from_dict(load_checkpoint(resolve_checkpoint(checkpoint))["config"]) if checkpoint else Config()
        what, device_t = "raw pixels", torch.device("cpu")
    else:
        if not checkpoint:
            raise SncaError(f"{kind} features need a checkpoint: pass CKPT, or use --features pixels")
        device_t = resolve_device(device)
        run = load_run(checkpoint, device_t)
        cfg = run.config
        what = f"{cfg.objective.loss} {cfg.model.arch} {kind} ({run.path})"
    cfg = with_data(cfg, dataset=dataset, data_dir=data_dir, subset=subset)
    # The protocols score the whole test split unless asked otherwise (not the run's monitor subset).
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, test_subset=test_subset))
    return FeatureSource(run, kind, cfg, device_t, batch_size, what)


def subcategory_of(src: FeatureSource, ks: Sequence[int] = (30,), sigma: float | None = None) -> dict[str, Any]:
    """Weighted kNN of the test images against the training images labelled with FINE classes
    (for a run trained on coarse labels: sub-category discovery)."""
    sigma = src.config.objective.temperature if sigma is None else sigma
    if min(ks) < 1:
        raise SncaError(f"k must be >= 1, got {min(ks)}")
    try:
        data = src.data(("gallery", "test"), label_set="coarse")
        mapping = [int(c) for c in data["gallery"].coarse_of_fine.tolist()]
    except SncaError:  # a dataset without coarse labels: fine accuracy only
        data, mapping = src.data(("gallery", "test"), label_set="fine"), None
    gallery, test = data["gallery"], data["test"]
    res = knn_accuracy(src.features(gallery), gallery.fine_targets, src.features(test), test.fine_targets, k=list(ks),
                       sigma=sigma, num_classes=len(gallery.fine_classes), fine_to_coarse=mapping)
    return {"source": src.what, "dataset": src.config.data.dataset, "num_gallery": len(gallery), "num_queries": len(test),
            "fine_classes": len(gallery.fine_classes), "results": [r.to_dict() for r in res.values()]}


def fewshot_of(src: FeatureSource, novel_classes: Sequence[str] | None = None, split_file: str | None = None,
               way: int = 5, shots: Sequence[int] = (1, 5), query: int = 15, episodes: int = 1000, seed: int = 0,
               methods: Sequence[str] = ("knn", "ncm"), k: int | None = None, sigma: float | None = None,
               episode_split: str = "test") -> dict[str, Any]:
    """N-way K-shot episodes among the novel classes, each query classified from the supports."""
    sigma = src.config.objective.temperature if sigma is None else sigma
    data = src.data(("gallery",) if episode_split == "train" else ("test",))
    dataset = data["gallery" if episode_split == "train" else "test"]
    classes = list(dataset.fine_classes)
    facts = src.run.facts if src.run is not None else None
    recorded = (facts or {}).get("class_split")
    if split_file:
        split = resolve_split(read_split_file(split_file), classes)
    elif novel_classes:
        split = split_from_novel(list(novel_classes), classes)
    elif recorded:
        split = run_class_split(src.config, classes, facts)
    else:
        why = "this checkpoint records no class split (it was trained on every class)" if src.run else "there is no checkpoint split to use"
        raise SncaError(f"pass --novel-classes or --split-file: {why}")
    if recorded and src.run is not None and src.config.data.dataset == src.run.config.data.dataset:
        seen = [name for name in split.names("novel") if name in set(recorded["names"]["base"])]
        if seen:
            raise SncaError(f"this checkpoint was trained on {', '.join(seen)} (base classes of its split), so they are not novel "
                            f"to it; its novel classes are {', '.join(recorded['names']['novel'])}: omit --novel-classes/--split-file to use them")
    note = None
    if not recorded and src.run is not None and src.run.config.data.label_set != "coarse" and src.run.config.data.dataset == src.config.data.dataset:
        note = (f"this checkpoint was trained on {len(src.run.class_names or classes)} classes, all of the dataset's: "
                "the 'novel' classes are not novel to it")
    if way > len(split.novel):
        raise SncaError(f"{way}-way episodes need at least {way} novel classes, the split has {len(split.novel)}")
    feats = src.features(dataset)
    rows = [fewshot_evaluate(feats, dataset.fine_targets, split.novel, way, shot, query, episodes, seed, method,
                             k=k, sigma=sigma).to_dict() for shot in shots for method in methods]
    return {"source": src.what, "dataset": src.config.data.dataset, "split": episode_split,
            "novel_classes": split.names("novel"), "results": rows, **({"note": note} if note else {})}


def retrieval_of(src: FeatureSource, queries: str = "test", gallery: str = "none", recall_k: Sequence[int] = (1, 2, 4, 8),
                 map_at_r: bool = True) -> dict[str, Any]:
    """Recall@K, precision@1, R-precision and mAP@R, leave-one-out or queries against a gallery."""
    name = {"train": "gallery", "test": "test"}
    data = src.data(tuple(dict.fromkeys([name[queries]] + ([name[gallery]] if gallery != "none" else []))))
    q_ds = data[name[queries]]
    q = src.features(q_ds)
    if gallery in ("none", queries):
        res = retrieval_metrics(q, q_ds.fine_targets, ks=recall_k, map_at_r=map_at_r)
        where = f"leave-one-out within {len(q_ds)} {queries} images"
    else:
        g_ds = data[name[gallery]]
        res = retrieval_metrics(q, q_ds.fine_targets, src.features(g_ds), g_ds.fine_targets, ks=recall_k, map_at_r=map_at_r)
        where = f"{len(q_ds)} {queries} queries against {len(g_ds)} {gallery} images"
    return {"source": src.what, "dataset": src.config.data.dataset, "setting": where, **res.to_dict(),
            "num_queries_scored": res.num_queries, "num_without_match": res.num_without_match}
