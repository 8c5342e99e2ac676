"""``snca eval CKPT``: weighted-kNN accuracy of a trained checkpoint on the test set.

Galleries: for an NCA checkpoint, both the momentum memory saved in the checkpoint
(``memory``: the training protocol's gallery, no extra pass) and, by default, the training
images re-embedded under test transforms (``recomputed``: one pass over the training set;
skip it with ``--gallery memory``). A softmax checkpoint has no memory: only ``recomputed``.
Several k are evaluated from one search (``--k 1 10 30``); sigma defaults to the checkpoint's
temperature. Prints a table, or JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..errors import SncaError


def add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", help="dataset root, if it moved since training")
    p.add_argument("--dataset", help="evaluate on another dataset of the same kind (channels, classes)")
    p.add_argument("--batch-size", type=int, default=None, help="images per forward pass")
    p.add_argument("--workers", type=int, default=None, help="data-loader worker processes")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--amp", choices=("none", "bf16", "fp16"), default=None, help="autocast while extracting")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "eval",
        help="weighted-kNN accuracy of a checkpoint (memory and recomputed galleries)",
        description="Weighted kNN (k nearest gallery items vote with exp(s / sigma)) on the test set.",
    )
    p.add_argument("checkpoint", help="a .pt checkpoint or a run directory (uses its best.pt)")
    p.add_argument("--k", type=int, nargs="+", default=None, help="one or more k (default: the run's knn_k, 30)")
    p.add_argument("--sigma", type=float, default=None, help="vote temperature (default: the run's temperature)")
    p.add_argument("--gallery", choices=("both", "memory", "recomputed"), default="both",
                   help="memory: the checkpoint's momentum memory; recomputed: train images under test transforms")
    p.add_argument("--features", choices=("embedding", "penultimate", "both"), default="embedding",
                   help="which features to compare (penultimate needs a recomputed gallery)")
    p.add_argument("--test-subset", type=int, default=None, help="evaluate on a class-stratified subset of N test images")
    add_data_args(p)
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(func=run)


def load_for_eval(args: argparse.Namespace):
    """(model, resolved TrainConfig, bank or None, device, checkpoint path) for eval/extract."""
    import dataclasses

    from ..checkpoint import load_trained, resolve_checkpoint
    from ..config import config_from_dict
    from ..data import dataset_info
    from ..engine import resolve_device

    path = resolve_checkpoint(args.checkpoint)
    device = resolve_device(args.device)
    model, config, bank = load_trained(path, device)
    cfg = config_from_dict(config)
    changes: dict[str, Any] = {}
    if args.data_dir is not None:
        changes["data_dir"] = args.data_dir
    if args.dataset is not None:
        changes["dataset"] = args.dataset
    if args.batch_size is not None:
        changes["eval_batch_size"] = args.batch_size
    if args.workers is not None:
        changes["workers"] = args.workers
    if args.amp is not None:
        changes["amp"] = args.amp
    if getattr(args, "test_subset", None) is not None:
        changes["test_subset"] = args.test_subset
    cfg = dataclasses.replace(cfg, **changes)
    if args.dataset is not None and args.dataset != config["dataset"]:
        info = dataset_info(cfg.dataset, cfg.label_set)
        if info.in_chans != cfg.in_chans:
            raise SncaError(
                f"{path} was trained on {config['dataset']} ({cfg.in_chans}-channel images); "
                f"{cfg.dataset} has {info.in_chans}-channel images"
            )
    return model, cfg, bank, device, path


def evaluate(args: argparse.Namespace) -> dict[str, Any]:
    from ..checkpoint import check_dataset
    from ..engine import build_datasets, extract_features, knn_accuracy

    model, cfg, bank, device, path = load_for_eval(args)
    if bank is None and args.gallery == "memory":
        raise SncaError(f"{path} is a {cfg.loss} checkpoint without a memory bank; use --gallery recomputed")
    galleries = ["memory", "recomputed"] if args.gallery == "both" else [args.gallery]
    if bank is None:
        galleries = ["recomputed"]
    kinds = ["embedding", "penultimate"] if args.features == "both" else [args.features]
    ks = sorted(set(args.k or [cfg.knn_k]))
    if min(ks) < 1:
        raise SncaError(f"k must be >= 1, got {min(ks)}")
    sigma = args.sigma if args.sigma is not None else cfg.sigma
    if sigma <= 0:
        raise SncaError(f"sigma must be > 0, got {sigma}")

    data = build_datasets(cfg, ("test",) + (("train_eval",) if "recomputed" in galleries else ()))
    test_set = data["test"]
    num_classes = int(getattr(test_set, "num_classes", 0) or 0)
    if bank is not None:
        if "train_eval" in data:
            check_dataset(bank.labels, data["train_eval"].targets, str(path))
        if num_classes and num_classes != bank.num_classes:
            raise SncaError(f"{path} was trained on {bank.num_classes} classes, this test set has {num_classes}; use the dataset it was trained on")
        num_classes = bank.num_classes
    num_classes = max(num_classes, int(test_set.targets.max()) + 1)

    def extract(ds, kind):
        return extract_features(model, ds, cfg.eval_batch_size, device, kind, cfg.workers, cfg.amp, cfg.channels_last)

    rows = []
    for kind in kinds:
        test_f, test_y, _ = extract(test_set, kind)
        for gallery in galleries:
            if gallery == "memory":
                if kind != "embedding":
                    continue  # the memory holds embeddings only
                gal_f, gal_y = bank.features_by_index(), bank.labels
            else:
                gal_f, gal_y, _ = extract(data["train_eval"], kind)
            res = knn_accuracy(test_f, test_y, gal_f, gal_y, ks, sigma, num_classes)
            for k in ks:
                rows.append({"gallery": gallery, "features": kind, "k": k, "sigma": sigma,
                             "top1": res[k]["top1"], "top5": res[k]["top5"]})
    return {
        "checkpoint": str(path),
        "dataset": cfg.dataset,
        "arch": cfg.arch,
        "loss": cfg.loss,
        "num_queries": len(test_set),
        "num_gallery": {"memory": bank.num_samples if bank is not None else None,
                        "recomputed": len(data["train_eval"]) if "train_eval" in data else None},
        "results": rows,
    }


def format_table(result: dict[str, Any]) -> str:
    lines = [
        f"{result['checkpoint']}: {result['loss']} {result['arch']} on {result['dataset']}, "
        f"{result['num_queries']} test queries",
        f"{'gallery':<11} {'features':<12} {'k':>4} {'sigma':>7} {'top-1':>7} {'top-5':>7}",
    ]
    for r in result["results"]:
        lines.append(f"{r['gallery']:<11} {r['features']:<12} {r['k']:>4} {r['sigma']:>7.3g} "
                     f"{100 * r['top1']:>7.2f} {100 * r['top5']:>7.2f}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    result = evaluate(args)
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0
