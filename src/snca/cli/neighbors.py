"""``snca neighbors CKPT --out DIR``: look at what a model thinks is similar.

For a few test images (random ``--queries N``, or ``--query-ids`` by dataset index) shows the
``--k`` nearest training images (test transforms) under the checkpoint's embedding and, side
by side, under other checkpoints (``--compare``, e.g. a softmax baseline of the same dataset)
and raw pixels (``--raw-pixels``). Writes ``DIR/index.html`` (self-contained: images are
inline PNG data URIs), ``DIR/neighbors.png`` (the same grid as one image) and
``DIR/neighbors.json`` (ids, labels and similarities).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import SncaError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "neighbors",
        help="HTML page and PNG grid of the nearest training images of test queries",
        description="Nearest gallery images of test queries, for one or several feature sets side by side.",
    )
    p.add_argument("checkpoint", help="a .pt checkpoint or a run directory (uses its best.pt)")
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


def _method_name(config: dict, path: Path, taken: set[str]) -> str:
    base = f"{config.get('loss', 'model')} ({path.parent.name if path.name in ('best.pt', 'last.pt') else path.stem})"
    name, n = base, 2
    while name in taken:
        name, n = f"{base} #{n}", n + 1
    taken.add(name)
    return name


@torch.no_grad()
def _raw_pixels(dataset: Any, indices: list[int] | None, batch_size: int) -> torch.Tensor:
    """Test-transformed pixels, flattened (downsampled to 32x32 above that) and normalised."""
    from torch.utils.data import DataLoader, Subset

    ds = dataset if indices is None else Subset(dataset, indices)
    chunks = []
    for x, _, _ in DataLoader(ds, batch_size=batch_size, shuffle=False):
        if x.shape[-1] > 32 or x.shape[-2] > 32:
            x = F.adaptive_avg_pool2d(x, 32)
        chunks.append(F.normalize(x.flatten(1).float(), dim=1))
    return torch.cat(chunks)


def _model_features(model: Any, dataset: Any, indices: list[int] | None, batch_size: int, device: str) -> torch.Tensor:
    from torch.utils.data import Subset

    from ..engine import extract_features

    ds = dataset if indices is None else Subset(dataset, indices)
    features, _, _ = extract_features(model, ds, batch_size=batch_size, device=device)
    return features.float().cpu()


def run(args: argparse.Namespace) -> int:
    from ..checkpoint import load_trained
    from ..index import build_eval_dataset, resolve_checkpoint
    from ..knn import knn_search
    from ..viz import NeighborRow, Tile, precision, write_grid, write_html

    if args.k < 1:
        raise SncaError(f"--k must be >= 1, got {args.k}")
    ckpt = resolve_checkpoint(args.checkpoint)
    model, config, _ = load_trained(ckpt, device=args.device)
    query_ds = build_eval_dataset(config, args.split, data_dir=args.data_dir, training_subset=False)
    gallery_ds = build_eval_dataset(config, args.gallery_split, data_dir=args.data_dir, subset=args.gallery_subset)
    n = len(query_ds)
    if args.query_ids:
        bad = [i for i in args.query_ids if not 0 <= i < n]
        if bad:
            raise SncaError(f"--query-ids {bad[0]} is out of range: the {args.split} split has {n} images (0..{n - 1})")
        query_ids = list(args.query_ids)
    else:
        count = 8 if args.queries is None else args.queries
        if count < 1:
            raise SncaError(f"--queries must be >= 1, got {count}")
        g = torch.Generator().manual_seed(args.seed)
        query_ids = sorted(torch.randperm(n, generator=g)[: min(count, n)].tolist())

    taken: set[str] = set()
    feature_sets: list[tuple[str, torch.Tensor, torch.Tensor]] = []  # (name, queries, gallery)
    models = [(ckpt, model, config)]
    for other in args.compare:
        path = resolve_checkpoint(other)
        m, c, _ = load_trained(path, device=args.device)
        if c.get("dataset") != config.get("dataset"):
            raise SncaError(f"--compare {path} was trained on {c.get('dataset')}, not {config.get('dataset')}; compare models of one dataset")
        models.append((path, m, c))
    for path, m, c in models:
        q_ds, g_ds = query_ds, gallery_ds
        if c is not config and (c.get("image_size"), c.get("in_chans")) != (config.get("image_size"), config.get("in_chans")):
            q_ds = build_eval_dataset(c, args.split, data_dir=args.data_dir, training_subset=False)
            g_ds = build_eval_dataset(c, args.gallery_split, data_dir=args.data_dir, subset=args.gallery_subset or len(gallery_ds))
        if len(g_ds) != len(gallery_ds) or not torch.equal(g_ds.targets, gallery_ds.targets):
            raise SncaError(f"--compare {path} sees a different gallery (other subset or data); use checkpoints of the same data")
        name = _method_name(c, Path(path), taken)
        feature_sets.append((name, _model_features(m, q_ds, query_ids, args.batch_size, args.device),
                             _model_features(m, g_ds, None, args.batch_size, args.device)))
    if args.raw_pixels:
        feature_sets.append(("raw pixels", _raw_pixels(query_ds, query_ids, args.batch_size), _raw_pixels(gallery_ds, None, args.batch_size)))

    classes = list(gallery_ds.classes)
    q_labels = query_ds.targets[query_ids].tolist()
    g_labels = gallery_ds.targets
    rows = [
        NeighborRow(Tile(query_ds.raw_item(i), classes[y], id=f"{args.split}:{i}"))
        for i, y in zip(query_ids, q_labels, strict=True)
    ]
    record: list[dict[str, Any]] = [{"query": f"{args.split}:{i}", "label": classes[y], "neighbors": {}} for i, y in zip(query_ids, q_labels, strict=True)]
    from ..index import dataset_ids

    gallery_ids = dataset_ids(gallery_ds, range(len(gallery_ds)), str(config.get("dataset")), args.gallery_split)
    for name, qf, gf in feature_sets:
        sims, idx = knn_search(qf, gf, args.k)
        for r, row in enumerate(rows):
            tiles = []
            for s, j in zip(sims[r].tolist(), idx[r].tolist(), strict=True):
                y = int(g_labels[j])
                tiles.append(Tile(gallery_ds.raw_item(j), classes[y], id=gallery_ids[j], similarity=s, match=y == q_labels[r]))
            row.panels.append((name, tiles))
            record[r]["neighbors"][name] = [{"id": t.id, "label": t.label, "similarity": t.similarity, "match": t.match} for t in tiles]

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    title = args.title or f"Nearest neighbours: {Path(ckpt).name} on {config.get('dataset')}"
    meta = (f"{len(rows)} {args.split} queries, {args.k} nearest of {len(gallery_ds)} {args.gallery_split} images "
            "(test transforms, cosine similarity); green: same label as the query, red: different")
    html_path = write_html(rows, out / "index.html", title=title, meta=meta)
    png_path = write_grid(rows, out / "neighbors.png")
    summary = precision(rows)
    (out / "neighbors.json").write_text(json.dumps({"title": title, "precision": summary, "queries": record}, indent=1))
    print(f"wrote {html_path} and {png_path}")
    for name, value in summary.items():
        print(f"  {name}: {100 * value:.1f}% of neighbours share the query's label")
    return 0
