"""``snca fewshot CKPT``: N-way K-shot episodes on novel classes (classes the model was not
trained on), classified by weighted kNN or nearest class mean; mean accuracy with a 95 % CI.

A checkpoint of ``snca train --novel-classes ...`` / ``--split-file ...`` records its class
split: its novel classes are the default, and novel classes it was trained on are refused."""

from __future__ import annotations

import argparse
import sys

from ..evaluate import fewshot_of
from ._protocols import add_source_args, emit, load_source


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "fewshot",
        help="N-way K-shot accuracy on novel classes (weighted kNN or nearest class mean)",
        description="Samples seeded, stratified episodes among the novel classes (N classes, K "
        "support and Q query images each) and classifies each query from the supports alone. "
        "Reports the mean accuracy and 1.96 * std / sqrt(episodes). The model should have been "
        "trained on the base classes only.",
    )
    add_source_args(p)
    group = p.add_mutually_exclusive_group()
    group.add_argument("--novel-classes", nargs="+", metavar="CLASS",
                       help="novel class names or ids (the rest are base); default: the split the checkpoint was trained with")
    group.add_argument("--split-file", help="file with [base] / [val] / [novel] sections, one class per line")
    p.add_argument("--way", type=int, default=5, help="classes per episode, N (5)")
    p.add_argument("--shot", type=int, nargs="+", default=[1, 5], help="support images per class, K (1 5)")
    p.add_argument("--query", type=int, default=15, help="query images per class, Q (15)")
    p.add_argument("--episodes", type=int, default=1000, help="episodes per setting (1000)")
    p.add_argument("--seed", type=int, default=0, help="episode sampling seed (0)")
    p.add_argument("--method", nargs="+", choices=("knn", "ncm"), default=["knn", "ncm"],
                   help="knn: weighted vote of the supports; ncm: cosine to the normalised class mean")
    p.add_argument("--k", type=int, default=None, help="supports voting in knn (default: all N*K)")
    p.add_argument("--sigma", type=float, default=None, help="knn vote temperature (default: the checkpoint's, else 0.05)")
    p.add_argument("--episode-split", choices=("test", "train", "val"), default="test",
                   help="split the episodes' images come from (test; folder datasets: val = test)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    result = fewshot_of(load_source(args), args.novel_classes, args.split_file, args.way, args.shot, args.query,
                        args.episodes, args.seed, args.method, args.k, args.sigma, args.episode_split)
    if "note" in result:
        print(f"note: {result['note']}", file=sys.stderr)
    lines = [
        f"few-shot: {result['source']} on {result['dataset']} ({result['split']} split), novel classes: "
        + ", ".join(result["novel_classes"]),
        f"{'setting':<22} {'method':<6} {'episodes':>8} {'accuracy':>9} {'95% CI':>8}",
    ]
    for r in result["results"]:
        setting = f"{r['way']}-way {r['shot']}-shot ({r['query']}q)"
        lines.append(f"{setting:<22} {r['method']:<6} {r['episodes']:>8} {100 * r['accuracy']:>9.2f} {100 * r['ci95']:>8.2f}")
    emit(result, args.json, lines)
    return 0
