"""Protocol report: train NCA and softmax models, run every protocol, write the Markdown results.

    .venv/bin/python experiments/report.py            # full report (about 20-30 min on 2 CPU cores)
    .venv/bin/python experiments/report.py --quick    # tiny budgets: a pipeline check, measures nothing

For each dataset (Fashion-MNIST and the 5k MNIST digits by default) the report trains, with the
same backbone, recipe, seed and budget, six models through :func:`snca.train.fit`:

- NCA and softmax on all classes (fine labels): weighted kNN top-1 and retrieval;
- NCA and softmax on coarse labels only (``label_set: coarse``): sub-category (fine) kNN;
- NCA and softmax on the base classes only (``novel_classes`` / ``split_file``): N-way K-shot
  accuracy on the novel classes;

and evaluates raw pixels through the same code. Softmax models are scored on both their 128-d
embedding (the layer feeding the classifier) and their penultimate (backbone) features.

What the protocols measure is explained in docs/protocols.md. This script writes only the
results: with ``--out`` a file holding the marker comments :data:`BEGIN` and :data:`END` (as
docs/protocols.md does, the default), the text between them is replaced and the rest of the
file kept; any other ``--out`` becomes a standalone results file (with the markers, so it can
be refreshed the same way).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from snca.config import load_config
from snca.data import ResolvedSplit, read_split_file, resolve_split, run_datasets
from snca.errors import SncaError
from snca.features import extract
from snca.protocols import fewshot_evaluate, knn_accuracy, retrieval_metrics
from snca.train import fit

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "docs" / "protocols.md"
COMMAND = ".venv/bin/python experiments/report.py"
BEGIN = "<!-- BEGIN results: written by experiments/report.py, edits between these markers are overwritten -->"
END = "<!-- END results -->"

REPORT_DATASETS = ("fashion-mnist", "mnist5k")
SUPPORTED = ("fashion-mnist", "mnist", "mnist5k")  # the datasets with coarse labels and a built-in split
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
LABELS = ("all classes", "coarse labels", "base classes")  # what each trained model sees

Log = Callable[[str], None]


@dataclass
class ReportSettings:
    """What the report trains and evaluates (see ``experiments/report.py --help``)."""

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
    command: str = COMMAND

    @property
    def num_episodes(self) -> int:
        return self.episodes if self.episodes is not None else (100 if self.quick else 1000)

    def budget(self, dataset: str) -> dict[str, Any]:
        out = dict((QUICK_BUDGET if self.quick else FULL_BUDGET)[dataset])
        if dataset in self.epochs:
            out["epochs"] = int(self.epochs[dataset])
        return out


# ------------------------------------------------------------------------------ configs


def report_split(dataset: str, classes: Sequence[str], split_file: str | None) -> ResolvedSplit:
    """The base/novel split of a dataset: a split file if given, else the built-in one."""
    if split_file:
        return resolve_split(read_split_file(split_file), classes)
    novel = DEFAULT_NOVEL[dataset]
    base = [c for c in range(len(classes)) if c not in novel]
    return ResolvedSplit(base, [], list(novel), list(classes))


def report_config(settings: ReportSettings, dataset: str, loss: str = "nca", labels: str = "all classes",
                  split: ResolvedSplit | None = None):
    """The ``fashion-mnist`` recipe with the report's choices; ``labels`` (one of :data:`LABELS`)
    picks the label set or the base-class training (``split``'s novel classes held out)."""
    budget = settings.budget(dataset)
    overrides: dict[str, Any] = {
        "dataset": dataset,
        "data_dir": settings.data_dir,
        "subset": budget["subset"],
        "test_subset": budget["test_subset"],
        "arch": settings.arch,
        "low_dim": settings.low_dim,
        "loss": loss,
        "epochs": budget["epochs"],
        "seed": settings.seed,
        "device": settings.device,
        "progress": "off",
        "plot": False,
        "val_every": 0,
        "recompute_gallery": False,  # the report embeds the gallery itself
        "temperature": settings.sigma,
    }
    if labels == "coarse labels":
        overrides["label_set"] = "coarse"
    elif labels == "base classes":
        if split is None:
            raise SncaError("base-class training needs the class split")
        if settings.split_files.get(dataset):
            overrides["split_file"] = settings.split_files[dataset]
        else:
            overrides["novel_classes"] = split.names("novel")
    elif labels != "all classes":
        raise SncaError(f"unknown labels {labels!r}; use one of {', '.join(LABELS)}")
    return load_config("fashion-mnist", overrides)


def train_model(cfg: Any, log: Log = print) -> tuple[Any, dict[str, Any]]:
    """Train through :func:`snca.train.fit` in memory (no run directory); returns the run and a
    record of it for the report's details table."""
    run = fit(config=cfg, write=False, log=lambda msg: log(f"    {msg}"))
    if run.final is None:
        raise SncaError("training was interrupted; no report written")
    last = run.metrics[-1] if run.metrics else {}
    info = {
        "loss": cfg.objective.loss,
        "train_images": len(run.data["train"]),
        "classes": len(run.data.class_names),
        "epochs": int(run.final.get("epochs", cfg.optim.epochs)),
        "seed": int(cfg.run.seed),
        "final_train_loss": float(last.get("train_loss", float("nan"))),
        "wall_s": float(run.final.get("wall_time_s", float("nan"))),
        "device": str(_device(run.model)),
    }
    return run, info


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


# ------------------------------------------------------------------------------ evaluation


def run_dataset(settings: ReportSettings, dataset: str, log: Log = print) -> dict[str, Any]:
    """Train the six models of one dataset and evaluate every feature set on every protocol."""
    if dataset not in SUPPORTED:
        raise SncaError(f"the report supports {', '.join(SUPPORTED)}; got {dataset!r}")
    budget = settings.budget(dataset)
    t0 = time.perf_counter()
    # Evaluation data: training images under test transforms (gallery) and the test set, every
    # class; the coarse pair carries the same images with fine_targets and coarse_of_fine.
    fine = run_datasets(report_config(settings, dataset), ("gallery", "test"), all_classes=True)
    coarse = run_datasets(report_config(settings, dataset, labels="coarse labels"), ("gallery", "test"), all_classes=True)
    classes = list(fine["gallery"].classes)
    split = report_split(dataset, classes, settings.split_files.get(dataset))
    fine_to_coarse = [int(c) for c in coarse["gallery"].coarse_of_fine.tolist()]
    gal_y, test_y = fine["gallery"].targets, fine["test"].targets
    num_fine = len(classes)
    log(
        f"{dataset}: {len(fine['gallery'])} train / {len(fine['test'])} test images; coarse classes "
        f"{coarse['gallery'].classes}; novel classes {split.names('novel')}"
    )

    metrics: dict[str, dict[str, Any]] = {name: {} for name in FEATURE_SETS}
    runs: list[dict[str, Any]] = []

    def features(model: torch.nn.Module | None, ds: Any, kind: str) -> torch.Tensor:
        if model is None:
            return extract(None, ds, kind).features
        return extract(model, ds, kind, device=_device(model)).features.cpu()

    def evaluate_full(name: str, model, kind: str) -> None:
        g = features(model, fine["gallery"], kind)
        q = features(model, fine["test"], kind)
        acc = knn_accuracy(g, gal_y, q, test_y, k=settings.k, sigma=settings.sigma, num_classes=num_fine)
        metrics[name]["dim"] = int(q.shape[1])
        metrics[name]["knn_top1"], metrics[name]["knn_top5"] = acc.top1, acc.top5
        metrics[name]["retrieval"] = retrieval_metrics(q, test_y).to_dict()

    def evaluate_coarse(name: str, model, kind: str) -> None:
        g = features(model, coarse["gallery"], kind)
        q = features(model, coarse["test"], kind)
        acc = knn_accuracy(
            g, coarse["gallery"].fine_targets, q, coarse["test"].fine_targets, k=settings.k,
            sigma=settings.sigma, num_classes=num_fine, fine_to_coarse=fine_to_coarse,
        )
        metrics[name]["subcategory"] = acc.to_dict()

    def evaluate_fewshot(name: str, model, kind: str) -> None:
        q = features(model, fine["test"], kind)
        out = {}
        for shot in settings.shots:
            for method in ("knn", "ncm"):
                res = fewshot_evaluate(
                    q, test_y, split.novel, settings.n_way, shot, settings.n_query,
                    settings.num_episodes, settings.seed, method, sigma=settings.sigma,
                )
                out[f"{shot}-shot {method}"] = res.to_dict()
        metrics[name]["fewshot"] = out

    log("  raw pixels")
    evaluate_full("pixels", None, "pixels")
    evaluate_coarse("pixels", None, "pixels")
    evaluate_fewshot("pixels", None, "pixels")

    evaluators = {"all classes": evaluate_full, "coarse labels": evaluate_coarse, "base classes": evaluate_fewshot}
    for loss in ("nca", "softmax"):
        for labels in LABELS:
            log(f"  {loss}, {labels}: training {budget['epochs']} epoch(s)")
            run, info = train_model(report_config(settings, dataset, loss, labels, split), log)
            if labels == "base classes" and run.data.class_split["novel"] != list(split.novel):
                raise SncaError(f"the base-class run held out {run.data.class_split['names']['novel']}, "
                                f"the report evaluates {split.names('novel')}")
            info["labels"] = labels
            runs.append(info)
            evaluate = evaluators[labels]
            if loss == "nca":
                evaluate("nca", run.model, "embedding")
            else:
                evaluate("softmax-embedding", run.model, "embedding")
                evaluate("softmax-penultimate", run.model, "penultimate")
            del run  # one trained model alive at a time
    return {
        "dataset": dataset,
        "train_images": len(fine["gallery"]),
        "test_images": len(fine["test"]),
        "classes": classes,
        "coarse_groups": {
            name: [classes[f] for f, c in enumerate(fine_to_coarse) if c == cid]
            for cid, name in enumerate(coarse["gallery"].classes)
        },
        "base_classes": split.names("base"),
        "novel_classes": split.names("novel"),
        "budget": budget,
        "runs": runs,
        "metrics": metrics,
        "wall_s": time.perf_counter() - t0,
    }


def run_report(settings: ReportSettings, log: Log = print) -> dict[str, Any]:
    """Every dataset of ``settings``; returns all numbers (rendered by :func:`render_markdown`)."""
    unknown = [d for d in settings.datasets if d not in SUPPORTED]
    if unknown:
        raise SncaError(f"the report supports {', '.join(SUPPORTED)}; got {unknown[0]!r}")
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


# ------------------------------------------------------------------------------ findings


def _pct(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}"


def _fs(entry: dict[str, Any] | None) -> str:
    if not entry:
        return "n/a"
    return f"{100 * entry['accuracy']:.2f} ± {100 * entry['ci95']:.2f}"


def _main_rows(ds: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(name, ds["metrics"][name]) for name in FEATURE_SETS if ds["metrics"].get(name)]


def _column_values(ds: dict[str, Any], shots: Sequence[int]) -> dict[str, dict[str, float]]:
    """{column: {feature set: value}} of the main table, for the findings."""
    cols: dict[str, dict[str, float]] = {}
    for name, m in _main_rows(ds):
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
    for name, m in _main_rows(ds):
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
        other = runner if best == "nca" else best
        if (col, "nca") in ci and (col, other) in ci:
            gap = abs(values["nca"] - values[other])
            overlap = gap <= ci[(col, "nca")] + ci[(col, other)]
            text += "; the 95 % intervals overlap" if overlap else "; the 95 % intervals do not overlap"
        out.append(text + ".")
    return out


# ------------------------------------------------------------------------------ rendering


def render_markdown(result: dict[str, Any]) -> str:
    """The results part of docs/protocols.md: how they were generated, then one section per
    dataset (main table, findings, details). The prose around it lives in the doc."""
    s = result["settings"]
    env = result["environment"]
    lines: list[str] = []
    if s["quick"]:
        lines += [
            "> **These numbers come from `--quick`** (500 training images, 1 epoch per model,",
            f"> {s['episodes']} episodes): they check the pipeline, they do not measure anything.",
            f"> Run `{COMMAND}` for the real table.",
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
    for name, m in _main_rows(ds):
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
    for name, m in _main_rows(ds):
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


# ------------------------------------------------------------------------------ writing


def refresh_results(text: str | None, results: str) -> str:
    """``text`` with the part between :data:`BEGIN` and :data:`END` replaced by ``results``; a
    standalone results file when ``text`` is None or lacks the markers."""
    block = f"{BEGIN}\n\n{results.strip()}\n\n{END}"
    if text is not None:
        a = text.find(BEGIN)
        b = text.find(END, a + len(BEGIN)) if a >= 0 else -1
        if a >= 0 and b >= 0:
            return text[:a] + block + text[b + len(END):]
    return (
        "# NCA vs softmax vs raw pixels: protocol results\n\n"
        "What each protocol measures: docs/protocols.md.\n\n" + block + "\n"
    )


def write_report(result: dict[str, Any], out: str | Path, json_out: str | Path | None = None) -> Path:
    """Write the results into ``out`` (see :func:`refresh_results`) and optionally every number
    as JSON, each atomically."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    old = out.read_text(encoding="utf-8") if out.is_file() else None
    _write_atomic(out, refresh_results(old, render_markdown(result)))
    if json_out is not None:
        json_out = Path(json_out)
        json_out.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(json_out, json.dumps(result, indent=2) + "\n")
    return out


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# ------------------------------------------------------------------------------ command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="experiments/report.py",
        description="Trains, per dataset, NCA and softmax models on all classes, on coarse labels "
        "and on base classes only, then evaluates them and raw pixels with weighted kNN, "
        "sub-category kNN, N-way K-shot episodes on novel classes and retrieval; writes the "
        "Markdown results. The full run takes about 20-30 minutes on 2 CPU cores; --quick is a "
        "tiny version that checks the pipeline.",
    )
    p.add_argument("--out", default=None,
                   help="Markdown file: its results between the marker comments are replaced (docs/protocols.md); "
                   "a file without them is written as a standalone results file")
    p.add_argument("--json", dest="json_out", default=None, help="also write every number as JSON here")
    p.add_argument("--quick", action="store_true", help="tiny budgets (500 images, 1 epoch, 100 episodes): a pipeline check, not a measurement")
    p.add_argument("--datasets", nargs="+", default=list(REPORT_DATASETS), choices=SUPPORTED, metavar="NAME",
                   help=f"datasets ({', '.join(SUPPORTED)}; default {' '.join(REPORT_DATASETS)})")
    p.add_argument("--seed", type=int, default=0, help="seed of training and of episode sampling (0)")
    p.add_argument("--epochs", nargs="+", default=[], metavar="DATASET=N",
                   help="override the epochs of a dataset, e.g. --epochs fashion-mnist=5 mnist5k=20")
    p.add_argument("--split-file", nargs="+", default=[], metavar="DATASET=FILE",
                   help="base/novel split of a dataset (default: the last five classes are novel, as in splits/)")
    p.add_argument("--episodes", type=int, default=None, help="few-shot episodes per setting (1000; 100 with --quick)")
    p.add_argument("--way", type=int, default=5, help="classes per episode (5)")
    p.add_argument("--shot", type=int, nargs="+", default=[1, 5], help="support images per class (1 5)")
    p.add_argument("--query", type=int, default=15, help="query images per class (15)")
    p.add_argument("--k", type=int, default=30, help="neighbours of the weighted kNN (30)")
    p.add_argument("--sigma", type=float, default=0.05, help="kNN vote temperature, also the NCA temperature (0.05)")
    p.add_argument("--arch", default="small_cnn", help="backbone of every trained model (small_cnn)")
    p.add_argument("--data-dir", default=None, help="dataset root (default: the offline copies)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return p


def _pairs(items: list[str], flag: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise SncaError(f"{flag} expects DATASET=VALUE, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def command_line(args: argparse.Namespace) -> str:
    """The command line that reproduces this report (options that differ from the defaults)."""
    parts = [COMMAND]
    if args.quick:
        parts.append("--quick")
    if list(args.datasets) != list(REPORT_DATASETS):
        parts.append("--datasets " + " ".join(args.datasets))
    simple = {"seed": 0, "episodes": None, "way": 5, "query": 15, "k": 30, "sigma": 0.05,
              "arch": "small_cnn", "data_dir": None, "device": "auto", "threads": None}
    for key, default in simple.items():
        value = getattr(args, key)
        if value != default:
            parts.append(f"--{key.replace('_', '-')} {shlex.quote(str(value))}")
    if list(args.shot) != [1, 5]:
        parts.append("--shot " + " ".join(str(x) for x in args.shot))
    for flag, items in (("--epochs", args.epochs), ("--split-file", args.split_file)):
        if items:
            parts.append(flag + " " + " ".join(shlex.quote(x) for x in items))
    if args.out is not None and Path(args.out).resolve() != DEFAULT_OUT:
        parts.append(f"--out {shlex.quote(args.out)}")
    return " ".join(parts)


def run(args: argparse.Namespace) -> int:
    epochs = {}
    for key, value in _pairs(args.epochs, "--epochs").items():
        if not value.isdigit() or int(value) < 1:
            raise SncaError(f"--epochs {key}={value}: the number of epochs must be a positive integer")
        epochs[key] = int(value)
    if args.threads is not None:
        if args.threads < 1:
            raise SncaError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    settings = ReportSettings(
        datasets=list(dict.fromkeys(args.datasets)),
        quick=args.quick,
        seed=args.seed,
        epochs=epochs,
        arch=args.arch,
        k=args.k,
        sigma=args.sigma,
        n_way=args.way,
        shots=tuple(args.shot),
        n_query=args.query,
        episodes=args.episodes,
        split_files=_pairs(args.split_file, "--split-file"),
        device=args.device,
        data_dir=args.data_dir,
        command=command_line(args),
    )
    for key in list(settings.epochs) + list(settings.split_files):
        if key not in settings.datasets:
            raise SncaError(f"{key!r} is not among the report's datasets ({', '.join(settings.datasets)})")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    result = run_report(settings, log)
    path = write_report(result, args.out if args.out is not None else DEFAULT_OUT, args.json_out)
    print(f"wrote {path} ({result['wall_s'] / 60:.1f} min)")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except SncaError as err:
        print(f"report.py: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
