"""``snca report``: train NCA and softmax models, run every protocol, write a Markdown table.

For each dataset (Fashion-MNIST and the 5k MNIST digits by default) the report trains, with
the same backbone, recipe, seed and budget, six models through :class:`snca.engine.Trainer`:

- NCA and softmax on all classes (fine labels): weighted kNN top-1 and retrieval;
- NCA and softmax on coarse labels only: sub-category (fine) kNN accuracy;
- NCA and softmax on the base classes only: N-way K-shot accuracy on the novel classes;

and evaluates raw pixels through the same code. Softmax models are scored on both their
128-d embedding (the layer feeding the classifier) and their penultimate (backbone) features.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import SncaError
from .features import model_features, pixel_features
from .fewshot import ResolvedSplit, class_subset, fewshot_evaluate, read_split_file, resolve_split
from .retrieval import retrieval_metrics
from .subcategory import DIGIT_COARSE_GROUPS, CoarseLabels, knn_accuracy

REPORT_DATASETS = ("fashion-mnist", "mnist5k")
SUPPORTED = ("fashion-mnist", "mnist", "mnist5k")
# Novel classes of the built-in splits (the same as splits/<dataset>-novel.txt): the last five.
DEFAULT_NOVEL = {"fashion-mnist": [5, 6, 7, 8, 9], "mnist": [5, 6, 7, 8, 9], "mnist5k": [5, 6, 7, 8, 9]}
# Training budgets sized for a 2-core CPU (full report about 20-30 minutes there).
FULL_BUDGET = {
    "fashion-mnist": {"epochs": 3, "subset": None, "test_subset": None},
    "mnist": {"epochs": 2, "subset": 20000, "test_subset": None},
    "mnist5k": {"epochs": 15, "subset": None, "test_subset": None},
}
QUICK_BUDGET = {  # a pipeline check: trains far too little to measure anything
    "fashion-mnist": {"epochs": 1, "subset": 500, "test_subset": 300},
    "mnist": {"epochs": 1, "subset": 500, "test_subset": 300},
    "mnist5k": {"epochs": 1, "subset": 500, "test_subset": 300},
}
FEATURE_SETS = ("nca", "softmax-embedding", "softmax-penultimate", "pixels")
FEATURE_LABELS = {
    "nca": "NCA embedding",
    "softmax-embedding": "softmax embedding",
    "softmax-penultimate": "softmax penultimate",
    "pixels": "raw pixels",
}


@dataclass
class ReportSettings:
    """What the report trains and evaluates (see ``snca report --help``)."""

    datasets: list[str] = field(default_factory=lambda: list(REPORT_DATASETS))
    quick: bool = False
    seed: int = 0
    epochs: dict[str, int] = field(default_factory=dict)  # per-dataset override
    arch: str = "small_cnn"
    low_dim: int = 128
    k: int = 30
    sigma: float = 0.05
    n_way: int = 5
    shots: tuple[int, ...] = (1, 5)
    n_query: int = 15
    episodes: int | None = None  # None: 1000 (100 with quick)
    split_files: dict[str, str] = field(default_factory=dict)
    device: str = "auto"
    data_dir: str | None = None
    command: str = "python -m snca report"

    @property
    def num_episodes(self) -> int:
        return self.episodes if self.episodes is not None else (100 if self.quick else 1000)

    def budget(self, dataset: str) -> dict[str, Any]:
        out = dict((QUICK_BUDGET if self.quick else FULL_BUDGET)[dataset])
        if dataset in self.epochs:
            out["epochs"] = int(self.epochs[dataset])
        return out


# ------------------------------------------------------------------------------ datasets


def _build(name: str, split: str, train_tf: bool, subset: int | None, seed: int, data_dir: str | None,
           label_set: str = "fine"):
    from ..data import build_dataset, build_transforms

    return build_dataset(
        name,
        split,
        data_dir=data_dir,
        transform=build_transforms(name, train=train_tf),
        label_set=label_set,
        subset=subset,
        seed=seed,
    )


def _coarse(name: str, split: str, train_tf: bool, subset: int | None, seed: int, data_dir: str | None):
    """A coarse-labelled dataset: snca.data's built-in grouping where it has one, else the
    digit grouping of ``DIGIT_COARSE_GROUPS``."""
    if name == "fashion-mnist":
        return _build(name, split, train_tf, subset, seed, data_dir, label_set="coarse")
    return CoarseLabels(_build(name, split, train_tf, subset, seed, data_dir), DIGIT_COARSE_GROUPS)


def report_split(dataset: str, classes: Sequence[str], split_file: str | None) -> ResolvedSplit:
    """The base/novel split of a dataset: a split file if given, else the built-in one."""
    if split_file:
        return resolve_split(read_split_file(split_file), classes)
    novel = DEFAULT_NOVEL[dataset]
    base = [c for c in range(len(classes)) if c not in novel]
    return ResolvedSplit(base, [], list(novel), list(classes))


# ------------------------------------------------------------------------------ training


def train_model(cfg: Any, train_set: Any, log: Callable[[str], None] = print) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Train ``cfg.epochs`` epochs through :class:`snca.engine.Trainer` (no checkpoints, no
    per-epoch validation); returns the model in eval mode and a record of the run."""
    from ..engine import Trainer, resolve_config, resolve_device, seed_everything
    from ..models import build_model

    cfg = resolve_config(cfg)
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    model = build_model(cfg.arch, low_dim=cfg.low_dim, in_chans=cfg.in_chans)
    trainer = Trainer(cfg, model, train_set, device=device)
    start = time.perf_counter()
    record: dict[str, Any] = {}
    for _ in range(cfg.epochs):
        record = trainer.train_epoch()
        trainer.end_epoch(record)
        log(
            f"    epoch {trainer.epoch}/{cfg.epochs}: loss {record['train_loss']:.4f}, "
            f"{record['images_per_s']:.0f} img/s"
        )
    wall = time.perf_counter() - start
    info = {
        "loss": cfg.loss,
        "train_images": len(train_set),
        "classes": int(trainer.num_classes),
        "epochs": int(cfg.epochs),
        "seed": int(cfg.seed),
        "final_train_loss": float(record.get("train_loss", float("nan"))),
        "wall_s": wall,
        "device": str(device),
    }
    trainer.model.eval()
    return trainer.model, info


def _config(settings: ReportSettings, dataset: str, loss: str, epochs: int):
    from ..config import apply_overrides, load_recipe

    return apply_overrides(
        load_recipe("fashion-mnist"),
        {
            "dataset": dataset,
            "data_dir": settings.data_dir,
            "arch": settings.arch,
            "low_dim": settings.low_dim,
            "loss": loss,
            "epochs": epochs,
            "seed": settings.seed,
            "device": settings.device,
            "progress": "off",
            "plot": False,
            "val_every": 0,
            "temperature": settings.sigma,
        },
        source="report",
    )


# ------------------------------------------------------------------------------ evaluation


def _features(model: torch.nn.Module | None, dataset: Any, kind: str, device: str) -> torch.Tensor:
    if kind == "pixels":
        return pixel_features(dataset)
    from ..engine import resolve_device

    return model_features(model, dataset, kind=kind, device=str(resolve_device(device)))


def run_dataset(settings: ReportSettings, dataset: str, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train the six models of one dataset and evaluate every feature set on every protocol."""
    if dataset not in SUPPORTED:
        raise SncaError(f"snca report supports {', '.join(SUPPORTED)}; got {dataset!r}")
    budget = settings.budget(dataset)
    seed, data_dir = settings.seed, settings.data_dir
    subset, test_subset, epochs = budget["subset"], budget["test_subset"], budget["epochs"]
    t0 = time.perf_counter()
    fine = {
        "train": _build(dataset, "train", True, subset, seed, data_dir),
        "gallery": _build(dataset, "train", False, subset, seed, data_dir),
        "test": _build(dataset, "test", False, test_subset, seed, data_dir),
    }
    coarse = {
        "train": _coarse(dataset, "train", True, subset, seed, data_dir),
        "gallery": _coarse(dataset, "train", False, subset, seed, data_dir),
        "test": _coarse(dataset, "test", False, test_subset, seed, data_dir),
    }
    split = report_split(dataset, fine["train"].classes, settings.split_files.get(dataset))
    base_train = class_subset(fine["train"], split.base)
    fine_to_coarse = _fine_to_coarse(coarse["gallery"])
    gal_y, test_y = fine["gallery"].targets, fine["test"].targets
    num_fine = len(fine["train"].classes)
    log(
        f"{dataset}: {len(fine['train'])} train / {len(fine['test'])} test images; coarse classes "
        f"{coarse['train'].classes}; novel classes {split.names('novel')}"
    )

    metrics: dict[str, dict[str, Any]] = {name: {} for name in FEATURE_SETS}
    runs: list[dict[str, Any]] = []

    def evaluate_full(name: str, model, kind: str) -> None:
        g = _features(model, fine["gallery"], kind, settings.device)
        q = _features(model, fine["test"], kind, settings.device)
        acc = knn_accuracy(g, gal_y, q, test_y, k=settings.k, sigma=settings.sigma, num_classes=num_fine)
        metrics[name]["dim"] = int(q.shape[1])
        metrics[name]["knn_top1"], metrics[name]["knn_top5"] = acc.top1, acc.top5
        metrics[name]["retrieval"] = retrieval_metrics(q, test_y).to_dict()

    def evaluate_coarse(name: str, model, kind: str) -> None:
        g = _features(model, coarse["gallery"], kind, settings.device)
        q = _features(model, coarse["test"], kind, settings.device)
        acc = knn_accuracy(
            g, coarse["gallery"].fine_targets, q, coarse["test"].fine_targets, k=settings.k,
            sigma=settings.sigma, num_classes=num_fine, fine_to_coarse=fine_to_coarse,
        )
        metrics[name]["subcategory"] = acc.to_dict()

    def evaluate_fewshot(name: str, model, kind: str) -> None:
        q = _features(model, fine["test"], kind, settings.device)
        out = {}
        for shot in settings.shots:
            for method in ("knn", "ncm"):
                res = fewshot_evaluate(
                    q, test_y, split.novel, settings.n_way, shot, settings.n_query,
                    settings.num_episodes, seed, method, sigma=settings.sigma,
                )
                out[f"{shot}-shot {method}"] = res.to_dict()
        metrics[name]["fewshot"] = out

    log("  raw pixels")
    evaluate_full("pixels", None, "pixels")
    evaluate_coarse("pixels", None, "pixels")
    evaluate_fewshot("pixels", None, "pixels")

    stages = (
        ("all classes", fine["train"], evaluate_full),
        ("coarse labels", coarse["train"], evaluate_coarse),
        ("base classes", base_train, evaluate_fewshot),
    )
    for loss in ("nca", "softmax"):
        for labels, train_set, evaluate in stages:
            log(f"  {loss}, {labels}: training {epochs} epoch(s) on {len(train_set)} images")
            model, info = train_model(_config(settings, dataset, loss, epochs), train_set, log)
            info["labels"] = labels
            runs.append(info)
            if loss == "nca":
                evaluate("nca", model, "embedding")
            else:
                evaluate("softmax-embedding", model, "embedding")
                evaluate("softmax-penultimate", model, "penultimate")
            del model  # one trained model alive at a time
    return {
        "dataset": dataset,
        "train_images": len(fine["train"]),
        "test_images": len(fine["test"]),
        "classes": list(fine["train"].classes),
        "coarse_groups": _groups(coarse["train"], fine["train"].classes, fine_to_coarse),
        "base_classes": split.names("base"),
        "novel_classes": split.names("novel"),
        "budget": budget,
        "runs": runs,
        "metrics": metrics,
        "wall_s": time.perf_counter() - t0,
    }


def _fine_to_coarse(coarse_ds: Any) -> list[int]:
    mapping = getattr(coarse_ds, "coarse_of_fine", None)
    if mapping is None:
        mapping = getattr(coarse_ds, "fine_to_coarse", None)
    if mapping is None:
        from .subcategory import fine_to_coarse_from_labels

        mapping = fine_to_coarse_from_labels(coarse_ds.fine_targets, coarse_ds.targets)
    return [int(c) for c in torch.as_tensor(mapping).tolist()]


def _groups(coarse_ds: Any, fine_classes: Sequence[str], mapping: Sequence[int]) -> dict[str, list[str]]:
    return {
        name: [fine_classes[f] for f, c in enumerate(mapping) if c == cid]
        for cid, name in enumerate(coarse_ds.classes)
    }


def run_report(settings: ReportSettings, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every dataset of ``settings``; returns all numbers (rendered by ``render_markdown``)."""
    unknown = [d for d in settings.datasets if d not in SUPPORTED]
    if unknown:
        raise SncaError(f"snca report supports {', '.join(SUPPORTED)}; got {unknown[0]!r}")
    if settings.n_way < 2:
        raise SncaError(f"--way must be >= 2, got {settings.n_way}")
    start = time.perf_counter()
    results = [run_dataset(settings, d, log) for d in settings.datasets]
    return {
        "settings": {
            "quick": settings.quick,
            "seed": settings.seed,
            "arch": settings.arch,
            "low_dim": settings.low_dim,
            "k": settings.k,
            "sigma": settings.sigma,
            "way": settings.n_way,
            "shots": list(settings.shots),
            "query": settings.n_query,
            "episodes": settings.num_episodes,
            "command": settings.command,
        },
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "machine": platform.machine(),
        },
        "datasets": results,
        "wall_s": time.perf_counter() - start,
    }


# ------------------------------------------------------------------------------ rendering


def _pct(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}"


def _fs(entry: dict[str, Any] | None) -> str:
    if not entry:
        return "n/a"
    return f"{100 * entry['accuracy']:.2f} ± {100 * entry['ci95']:.2f}"


def _main_rows(ds: dict[str, Any], shots: Sequence[int]) -> list[tuple[str, dict[str, Any]]]:
    return [(name, ds["metrics"][name]) for name in FEATURE_SETS if ds["metrics"].get(name)]


def _column_values(ds: dict[str, Any], shots: Sequence[int]) -> dict[str, dict[str, float]]:
    """{column: {feature set: value}} of the main table, for the findings."""
    cols: dict[str, dict[str, float]] = {}
    for name, m in _main_rows(ds, shots):
        cols.setdefault("kNN top-1", {})[name] = m.get("knn_top1")
        cols.setdefault("sub-category top-1", {})[name] = (m.get("subcategory") or {}).get("top1")
        for shot in shots:
            entry = (m.get("fewshot") or {}).get(f"{shot}-shot knn")
            cols.setdefault(f"5-way {shot}-shot", {})[name] = entry["accuracy"] if entry else None
        cols.setdefault("Recall@1", {})[name] = (m.get("retrieval") or {}).get("recall@1")
    return cols


def findings(ds: dict[str, Any], shots: Sequence[int]) -> list[str]:
    """Plain statements of who wins each column; every column NCA does not win is named."""
    out = []
    ci = {}
    for name, m in _main_rows(ds, shots):
        for shot in shots:
            entry = (m.get("fewshot") or {}).get(f"{shot}-shot knn")
            if entry:
                ci[(f"5-way {shot}-shot", name)] = entry["ci95"]
    for col, values in _column_values(ds, shots).items():
        values = {k: v for k, v in values.items() if v is not None}
        if "nca" not in values or len(values) < 2:
            continue
        best = max(values, key=lambda k: values[k])
        others = {k: v for k, v in values.items() if k != "nca"}
        runner = max(others, key=lambda k: others[k])
        diff = 100 * (values["nca"] - others[runner])
        if best == "nca":
            text = f"{col}: NCA is best ({_pct(values['nca'])} vs {_pct(others[runner])} for {FEATURE_LABELS[runner]}, +{diff:.2f} points)"
        else:
            text = (
                f"{col}: **NCA loses** to {FEATURE_LABELS[best]} ({_pct(values['nca'])} vs {_pct(values[best])}, "
                f"{100 * (values['nca'] - values[best]):.2f} points)"
            )
        if (col, "nca") in ci and (col, runner if best == "nca" else best) in ci:
            other = runner if best == "nca" else best
            gap = abs(values["nca"] - values[other])
            overlap = gap <= ci[(col, "nca")] + ci[(col, other)]
            text += "; the 95 % intervals overlap" if overlap else "; the 95 % intervals do not overlap"
        out.append(text + ".")
    return out


PROTOCOLS_TEXT = """\
## Protocols

All features are L2-normalised and compared by cosine similarity; every feature set (NCA,
softmax, raw pixels) goes through exactly the same code.

- **kNN top-1**: weighted kNN (`snca.knn.knn_classify`, k = {k}, sigma = {sigma}): each of the
  k most similar training images votes for its class with weight exp(s / sigma). Gallery: the
  training images under test transforms; queries: the test set.
- **Sub-category top-1** (`snca.protocols.subcategory`): the network is trained on *coarse*
  labels only; the gallery then carries the *fine* labels the network never saw, and the same
  weighted kNN must recover the fine class of each test image. Chance within the right coarse
  class is given in the details. Fashion-MNIST groups: `snca.data.COARSE_GROUPS`; digits:
  `snca.protocols.subcategory.DIGIT_COARSE_GROUPS`.
- **5-way K-shot** (`snca.protocols.fewshot`): the network is trained on the *base* classes
  only; episodes sample {way} *novel* classes, K support and {query} query test images per
  class; queries are classified by a weighted vote of all supports (sigma = {sigma}; "knn")
  or by cosine to the normalised class mean ("ncm", in the details). Mean accuracy over
  {episodes} seeded episodes ± 1.96 * std / sqrt(episodes).
- **Recall@1** (`snca.protocols.retrieval`): leave-one-out retrieval within the test set: a
  query counts if its nearest other test image has its label. The details add Recall@2/4/8 and
  mAP@R (Musgrave et al. 2020: R = number of other test images of the query's class).
- **Features**: "NCA embedding" is the 128-d L2-normalised output trained with the NCA loss and
  its memory; "softmax embedding" is the 128-d layer the softmax classifier reads (same
  network, same recipe, cross-entropy instead of NCA); "softmax penultimate" is the backbone's
  pooled features before that layer; "raw pixels" are the flattened images.

## Running the protocols on your own models

Each protocol is a command on any checkpoint (`--features penultimate` for the backbone,
`--features pixels --dataset NAME` for raw pixels, `--json` for machine-readable output):

```
snca train --label-set coarse --name coarse          # coarse labels only (fashion-mnist, cifar100, folder + coarse.txt)
snca subcategory runs/coarse                         # kNN against the fine labels it never saw
snca train --novel-classes 5 6 7 8 9 --name base     # base classes only (or --split-file FILE); the split is saved in the checkpoint
snca fewshot runs/base                               # episodes on its recorded novel classes (refuses classes it was trained on)
snca fewshot CKPT --novel-classes 5 6 7 8 9          # or --split-file splits/fashion-mnist-novel.txt
snca fewshot CKPT --dataset folder --data-dir DIR --split-file splits/miniimagenet.txt --episode-split val
snca retrieval CKPT                                  # Recall@1/2/4/8, R-precision, mAP@R (leave-one-out on test)
snca retrieval CKPT --gallery train                  # test queries against the training images
```

Split files (`splits/`) list one class name (or id) per line under `[base]`, `[val]` and
`[novel]` headers; `splits/miniimagenet.txt` is the 64/16/20 split of Ravi & Larochelle for a
folder dataset whose class folders are the ImageNet synset ids. A class in two sections, an
unknown class, fewer than K + Q images in a novel class or N larger than the number of novel
classes are refused with a one-line error.

From Python, every protocol is a pure function of features and labels:

```python
from snca.protocols import class_subset, fewshot_evaluate, retrieval_metrics, subcategory_accuracy

base_train = class_subset(train_set, split.base)      # labels 0..B-1, indices 0..n-1: train on it
res = fewshot_evaluate(test_feats, test_labels, split.novel, n_way=5, n_shot=1, episodes=1000, seed=0)
print(res.mean, res.ci95)                             # mean accuracy, 95 % CI half-width
sub = subcategory_accuracy(train_feats, train_fine, test_feats, test_fine, k=30, sigma=0.05)
ret = retrieval_metrics(test_feats, test_labels)      # leave-one-out; pass a gallery to search it
```
"""


def render_markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    env = result["environment"]
    lines = [
        "# Does NCA generalise beyond its labels? Protocol results",
        "",
        "Full report (trains 6 small CNNs per dataset on CPU, about 20-30 minutes on 2 cores):",
        "",
        "```",
        "python -m snca report --out docs/protocols.md",
        "```",
        "",
        "A tiny version for checking the pipeline: `python -m snca report --quick --out /tmp/protocols.md`.",
        "",
        "The claim under test (Wu, Efros, Yu, ECCV 2018): features trained with NCA generalise better "
        "than softmax features to what training never labelled: fine classes inside coarse labels, "
        "and classes never seen at all. Per dataset the report trains six models with the same "
        "backbone, recipe (the `fashion-mnist` recipe: SGD, lr 0.1 cosine, batch 128, weight decay "
        "5e-4), seed and budget: NCA and softmax, each on all classes, on coarse labels only and on "
        "the base classes only; raw pixels are the no-learning baseline. The full budgets are short "
        f"(Fashion-MNIST {FULL_BUDGET['fashion-mnist']['epochs']} epochs, mnist5k "
        f"{FULL_BUDGET['mnist5k']['epochs']} epochs per model) so that everything fits a 2-core CPU; "
        "NCA's memory holds random vectors until every image has been seen once, so short budgets "
        "do not favour NCA.",
        "",
    ]
    if s["quick"]:
        lines += [
            "> **These numbers come from `--quick`** (500 training images, 1 epoch per model,",
            f"> {s['episodes']} episodes): they check the pipeline, they do not measure anything.",
            "> Run the full command above for the real table.",
            "",
        ]
    lines += [
        f"Generated by `{s['command']}` in {result['wall_s'] / 60:.1f} min "
        f"(python {env['python']}, torch {env['torch']}, {env['cpu_count']} CPUs, {env['torch_threads']} torch threads). "
        f"Backbone `{s['arch']}`, embedding {s['low_dim']}-d, seed {s['seed']}, weighted kNN k = {s['k']}, "
        f"sigma = {s['sigma']}, few-shot {s['way']}-way with {s['query']} queries per class over {s['episodes']} episodes.",
        "",
    ]
    for ds in result["datasets"]:
        lines += _render_dataset(ds, s)
    lines += [
        PROTOCOLS_TEXT.format(
            k=s["k"], sigma=s["sigma"], way=s["way"], query=s["query"], episodes=s["episodes"]
        )
    ]
    return "\n".join(lines).rstrip() + "\n"


def _render_dataset(ds: dict[str, Any], s: dict[str, Any]) -> list[str]:
    shots = s["shots"]
    b = ds["budget"]
    lines = [
        f"## {ds['dataset']}",
        "",
        f"{ds['train_images']} training / {ds['test_images']} test images; "
        f"{b['epochs']} epoch(s) per model; wall time {ds['wall_s'] / 60:.1f} min (training and evaluation).",
        "Coarse groups: " + "; ".join(f"{k} = {{{', '.join(v)}}}" for k, v in ds["coarse_groups"].items()) + ".",
        f"Base classes: {', '.join(ds['base_classes'])}. Novel classes: {', '.join(ds['novel_classes'])}.",
        "",
        "| features | dim | kNN top-1 | sub-category top-1 | "
        + " | ".join(f"{s['way']}-way {shot}-shot" for shot in shots)
        + " | Recall@1 |",
        "|---|---:|---:|---:|" + "---:|" * len(shots) + "---:|",
    ]
    for name, m in _main_rows(ds, shots):
        fs = m.get("fewshot") or {}
        lines.append(
            f"| {FEATURE_LABELS[name]} | {m.get('dim', 'n/a')} | {_pct(m.get('knn_top1'))} | "
            f"{_pct((m.get('subcategory') or {}).get('top1'))} | "
            + " | ".join(_fs(fs.get(f"{shot}-shot knn")) for shot in shots)
            + f" | {_pct((m.get('retrieval') or {}).get('recall@1'))} |"
        )
    lines += ["", "Accuracies in %; few-shot: mean ± 95 % CI half-width.", ""]
    found = findings(ds, shots)
    if found:
        lines += ["What the table says:", ""] + [f"- {f}" for f in found] + [""]
    lines += [
        "<details><summary>Details: training runs, retrieval, NCM few-shot, coarse accuracy</summary>",
        "",
        "| model | labels | classes | train images | epochs | seed | final loss | wall time (s) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in ds["runs"]:
        lines.append(
            f"| {r['loss']} | {r['labels']} | {r['classes']} | {r['train_images']} | {r['epochs']} | "
            f"{r['seed']} | {r['final_train_loss']:.4f} | {r['wall_s']:.1f} |"
        )
    lines += [
        "",
        "| features | kNN top-5 | R@1 | R@2 | R@4 | R@8 | mAP@R | sub-cat. top-5 | coarse top-1 (sub-cat. model) | chance within coarse | "
        + " | ".join(f"{shot}-shot NCM" for shot in shots)
        + " |",
        "|---|" + "---:|" * (9 + len(shots)),
    ]
    for name, m in _main_rows(ds, shots):
        r = m.get("retrieval") or {}
        sc = m.get("subcategory") or {}
        fs = m.get("fewshot") or {}
        lines.append(
            f"| {FEATURE_LABELS[name]} | {_pct(m.get('knn_top5'))} | {_pct(r.get('recall@1'))} | {_pct(r.get('recall@2'))} | "
            f"{_pct(r.get('recall@4'))} | {_pct(r.get('recall@8'))} | {_pct(r.get('map@r'))} | "
            f"{_pct(sc.get('top5'))} | {_pct(sc.get('coarse_top1'))} | {_pct(sc.get('chance_within_coarse'))} | "
            + " | ".join(_fs(fs.get(f"{shot}-shot ncm")) for shot in shots)
            + " |"
        )
    lines += ["", "</details>", ""]
    return lines


def write_report(result: dict[str, Any], out: str | Path, json_out: str | Path | None = None) -> Path:
    """Write the Markdown (and optionally the raw numbers as JSON), atomically."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(render_markdown(result), encoding="utf-8")
    os.replace(tmp, out)
    if json_out is not None:
        json_out = Path(json_out)
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return out
