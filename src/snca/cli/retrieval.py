"""``snca retrieval CKPT``: Recall@K, precision@1, R-precision and mAP@R of a checkpoint's
features (or raw pixels), leave-one-out within a split or queries against a gallery."""

from __future__ import annotations

import argparse

from ..evaluate import retrieval_of
from ._protocols import add_source_args, emit, load_source


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "retrieval",
        help="Recall@K, precision@1 and mAP@R (leave-one-out, or queries against a gallery)",
        description="Retrieval metrics (Musgrave et al., 'A Metric Learning Reality Check'). By "
        "default the test set is searched leave-one-out; --gallery train searches the test "
        "queries against the training images.",
    )
    add_source_args(p)
    p.add_argument("--queries", choices=("test", "train"), default="test", help="query split (test)")
    p.add_argument("--gallery", choices=("none", "train", "test"), default="none",
                   help="none: leave-one-out within the queries (default); else the gallery split")
    p.add_argument("--recall-k", type=int, nargs="+", default=[1, 2, 4, 8], help="K of Recall@K (1 2 4 8)")
    p.add_argument("--no-map", action="store_true", help="skip R-precision and mAP@R (a search R deep)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    result = retrieval_of(load_source(args), args.queries, args.gallery, args.recall_k, map_at_r=not args.no_map)
    lines = [f"retrieval: {result['source']} on {result['dataset']}, {result['setting']}"]
    for key, value in result.items():
        if isinstance(value, float):
            lines.append(f"  {key:<14} {100 * value:6.2f}")
    lines.append(f"  queries scored {result['num_queries_scored']}, without a same-label item {result['num_without_match']}")
    emit(result, args.json, lines)
    return 0
