"""``snca subcategory CKPT``: sub-category discovery. For a model trained on coarse labels
(``--label-set coarse``), weighted kNN of the test features against training features that
carry the FINE labels the network never saw."""

from __future__ import annotations

import argparse
import sys

from ..evaluate import subcategory_of
from ._protocols import add_source_args, emit, load_source


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "subcategory",
        help="sub-category discovery: kNN against fine labels for a model trained on coarse ones",
        description="Weighted kNN of the test set against the training set labelled with FINE "
        "classes, for a model trained on coarse labels (CIFAR-100 superclasses, Fashion-MNIST "
        "groups, a folder with a fine-to-coarse mapping file). Also reports the coarse accuracy "
        "of the fine predictions and the chance level within the right coarse class.",
    )
    add_source_args(p)
    p.add_argument("--k", type=int, nargs="+", default=[30], help="neighbours (one or more; 30)")
    p.add_argument("--sigma", type=float, default=None, help="vote temperature (default: the checkpoint's temperature, else 0.05)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    src = load_source(args)
    if src.kind != "pixels" and src.config.data.label_set != "coarse":
        print("note: this checkpoint was trained on fine labels, so this is plain kNN accuracy, not "
              "sub-category discovery (train with --label-set coarse)", file=sys.stderr)
    result = subcategory_of(src, args.k, args.sigma)
    lines = [
        f"sub-category kNN: {result['source']} on {result['dataset']}, {result['num_queries']} queries against "
        f"{result['num_gallery']} fine-labelled training images ({result['fine_classes']} fine classes)",
        f"{'k':>4} {'sigma':>7} {'fine top-1':>11} {'fine top-5':>11} {'coarse top-1':>13} {'chance in coarse':>17}",
    ]
    for r in result["results"]:
        coarse = f"{100 * r['coarse_top1']:.2f}" if "coarse_top1" in r else "n/a"
        chance = f"{100 * r['chance_within_coarse']:.2f}" if "chance_within_coarse" in r else "n/a"
        lines.append(f"{r['k']:>4} {r['sigma']:>7.3g} {100 * r['top1']:>11.2f} {100 * r['top5']:>11.2f} {coarse:>13} {chance:>17}")
    emit(result, args.json, lines)
    return 0
