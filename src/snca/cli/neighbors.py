"""``snca neighbors CKPT --out DIR``: look at what a model thinks is similar.

For a few test images (random ``--queries N``, or ``--query-ids`` by dataset index) shows the
``--k`` nearest training images (test transforms) under the checkpoint's embedding and, side
by side, under other checkpoints (``--compare``, e.g. a softmax baseline of the same dataset)
and raw pixels (``--raw-pixels``). Labels are the run's class names. Writes ``DIR/index.html``
(self-contained: images are inline PNG data URIs), ``DIR/neighbors.png`` (the same grid as one
image) and ``DIR/neighbors.json`` (ids, labels and similarities). The work is done by
:func:`snca.neighbors.write_neighbors`.
"""

from __future__ import annotations

import argparse

from ..neighbors import write_neighbors


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "neighbors",
        help="HTML page and PNG grid of the nearest training images of test queries",
        description="Nearest gallery images of test queries, for one or several feature sets side by side.",
    )
    p.add_argument("checkpoint", help="a .pt checkpoint or a run directory (uses its last.pt)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--queries", type=int, default=None, help="number of random test queries (default 8)")
    which.add_argument("--query-ids", type=int, nargs="+", metavar="I", help="dataset indices of the queries (in --split)")
    p.add_argument("--compare", nargs="+", default=[], metavar="CKPT", help="other checkpoints of the same dataset to show side by side")
    p.add_argument("--raw-pixels", action="store_true", help="also show neighbours by raw-pixel cosine similarity")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--k", type=int, default=20, help="neighbours per query (default 20)")
    p.add_argument("--split", default="test", help="split the queries come from (default test)")
    p.add_argument("--gallery-split", default="train", help="split searched (default train)")
    p.add_argument("--gallery-subset", type=int, default=None, help="search a class-stratified subset of N gallery images")
    p.add_argument("--data-dir", help="dataset root (default: the run's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random query choice")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--title", default=None, help="page title")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    page = write_neighbors(
        args.checkpoint, args.out, queries=args.queries, query_ids=args.query_ids, compare=args.compare,
        raw_pixels=args.raw_pixels, k=args.k, split=args.split, gallery_split=args.gallery_split,
        gallery_subset=args.gallery_subset, data_dir=args.data_dir, seed=args.seed, batch_size=args.batch_size,
        device=args.device, title=args.title,
    )
    print(f"wrote {page.files['html']} and {page.files['png']}")
    for name, value in page.precision.items():
        print(f"  {name}: {100 * value:.1f}% of neighbours share the query's label")
    return 0
