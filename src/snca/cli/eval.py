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
import sys
from typing import Any

from ..evaluate import evaluate_run


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
    p.add_argument("checkpoint", help="a .pt checkpoint or a run directory (uses its last.pt)")
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
    result = evaluate_run(args.checkpoint, ks=args.k, sigma=args.sigma, gallery=args.gallery, features=args.features,
                          dataset=args.dataset, data_dir=args.data_dir, test_subset=args.test_subset,
                          batch_size=args.batch_size, workers=args.workers, device=args.device, amp=args.amp)
    for note in result["notes"]:
        print(f"snca: note: {note}", file=sys.stderr)
    print(json.dumps(result, indent=2) if args.json else format_table(result))
    return 0
