"""``snca index``: build and edit a gallery index that lives apart from the training run.

    snca index build CKPT --out DIR [--split train] [--backend torch|faiss-flat|faiss-ivf|faiss-hnsw]
    snca index build --from-reference FILE --arch resnet18 --out DIR [--dataset folder --data-dir D]
    snca index add DIR --images A.png B.png --label NAME     (or --from-folder ROOT: one subfolder per class)
    snca index remove DIR --ids ID... | --label NAME
    snca index query DIR IMAGE... [--k 20] [--json]
    snca index info DIR

The index remembers the checkpoint that embeds its images (path and SHA-256 of the weights) and
refuses to add or query with a model whose weights differ. Built from a run, it has the run's
class names (base classes, or coarse labels). ``--from-reference`` converts a
reference-implementation release (see :mod:`snca.interop.reference`) into ``DIR/checkpoint.pt``
first. The work is done by :mod:`snca.gallery`.
"""

from __future__ import annotations

import argparse
import json
import sys

from ..gallery import add_images, build_index, index_info, query_images, remove_images
from .predict import add_common_args, print_answers, print_failures


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "index",
        help="build, extend, shrink and query a gallery index (new classes without retraining)",
        description="A gallery of labelled embeddings kept apart from the training run.",
    )
    sub = p.add_subparsers(dest="index_command", metavar="ACTION", title="actions")
    p.set_defaults(func=run, index_command=None, _index_parser=p)

    b = sub.add_parser("build", help="embed a dataset split with a checkpoint")
    b.add_argument("checkpoint", nargs="?", help="a .pt checkpoint or a run directory (uses its last.pt)")
    b.add_argument("--out", required=True, help="index directory to write")
    b.add_argument("--split", default="train", help="dataset split to embed (train or test)")
    b.add_argument("--subset", type=int, default=None, help="embed a class-stratified subset of N images")
    b.add_argument("--data-dir", help="dataset root (default: the run's)")
    b.add_argument("--dataset", help="with --from-reference: dataset whose train split gives the gallery (e.g. folder)")
    b.add_argument("--backend", default="torch", help="torch (exact) | faiss-flat | faiss-ivf | faiss-hnsw")
    b.add_argument("--nlist", type=int, default=None, help="faiss-ivf: number of cells (default ~4 sqrt(N))")
    b.add_argument("--nprobe", type=int, default=None, help="faiss-ivf: cells searched per query (default 16)")
    b.add_argument("--ef-search", type=int, default=None, help="faiss-hnsw: search breadth (default 128)")
    b.add_argument("--source", choices=("features", "memory"), default=None,
                   help="features: embed the --split images with test transforms (default); memory: the "
                   "checkpoint's memory bank as is (no pass over the data; default with --from-reference)")
    b.add_argument("--empty", action="store_true", help="an empty index bound to the model; fill it with `snca index add`")
    b.add_argument("--from-reference", metavar="FILE", help="a reference-implementation checkpoint to import")
    b.add_argument("--arch", help="with --from-reference: resnet18 | resnet34 | resnet50")
    b.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    b.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")

    a = sub.add_parser("add", help="add labelled images (new classes welcome)")
    a.add_argument("index", metavar="DIR")
    a.add_argument("--images", nargs="+", metavar="PATH", help="image files, all of class --label")
    a.add_argument("--label", help="class name of --images (a new name adds a class)")
    a.add_argument("--from-folder", metavar="ROOT", help="ROOT/<class name>/<images>: add every image with its folder's class")
    a.add_argument("--checkpoint", help="the index's model, if it moved (must have the same weights)")
    a.add_argument("--batch-size", type=int, default=64)
    a.add_argument("--device", default="cpu")

    r = sub.add_parser("remove", help="remove images by id, or a whole class")
    r.add_argument("index", metavar="DIR")
    r.add_argument("--ids", nargs="+", default=[], metavar="ID", help="ids (file paths or dataset ids) to remove")
    r.add_argument("--label", help="remove every image of this class")

    q = sub.add_parser("query", help="classify image files against the index")
    q.add_argument("index", metavar="DIR")
    q.add_argument("images", nargs="+", metavar="IMAGE", help="image files or directories of them")
    q.add_argument("--k", type=int, default=20)
    q.add_argument("--checkpoint", help="the index's model, if it moved (must have the same weights)")
    add_common_args(q)

    i = sub.add_parser("info", help="size, classes, backend and model of an index")
    i.add_argument("index", metavar="DIR")
    i.add_argument("--json", action="store_true")


def run(args: argparse.Namespace) -> int:
    action = {"build": _build, "add": _add, "remove": _remove, "query": _query, "info": _info}.get(args.index_command)
    if action is None:
        args._index_parser.print_help(sys.stderr)
        return 2
    return action(args)


def _build(args: argparse.Namespace) -> int:
    params = {"nlist": args.nlist, "nprobe": args.nprobe, "ef_search": args.ef_search}
    index = build_index(
        args.out, args.checkpoint, from_reference=args.from_reference, arch=args.arch, dataset=args.dataset,
        source=args.source, split=args.split, subset=args.subset, data_dir=args.data_dir, empty=args.empty,
        backend=args.backend, backend_params={k: v for k, v in params.items() if v is not None},
        batch_size=args.batch_size, device=args.device, log=print,
    )
    print(f"wrote {args.out}: {len(index)} images, {index.num_classes} classes, {index.dim}-d, backend {index.backend}")
    return 0


def _add(args: argparse.Namespace) -> int:
    edit = add_images(args.index, images=args.images, label=args.label, from_folder=args.from_folder,
                      checkpoint=args.checkpoint, batch_size=args.batch_size, device=args.device)
    print_failures(edit.failures)
    print(
        f"added {edit.count} images to {args.index}"
        + (f" (new classes: {', '.join(edit.new_classes)})" if edit.new_classes else "")
        + (f"; {len(edit.failures)} failed" if edit.failures else "")
        + f"; it now holds {len(edit.index)} images of {edit.index.num_classes} classes"
    )
    return 1 if edit.failures else 0


def _remove(args: argparse.Namespace) -> int:
    edit = remove_images(args.index, ids=args.ids, label=args.label)
    print(f"removed {edit.count} images from {args.index}; it now holds {len(edit.index)}")
    return 0


def _query(args: argparse.Namespace) -> int:
    answers, failures = query_images(args.index, args.images, k=args.k, checkpoint=args.checkpoint,
                                     batch_size=args.batch_size, device=args.device)
    return print_answers(answers, failures, args.json)


def _info(args: argparse.Namespace) -> int:
    info = index_info(args.index)
    if args.json:
        print(json.dumps(info, indent=1))
        return 0
    print(f"{args.index}: {info['size']} images, {info['dim']}-d, backend {info['backend']}, sigma {info['sigma']}")
    model = info["model"]
    if model:
        print(f"model: {model.get('checkpoint')} (weights sha256 {str(model.get('weights_sha256'))[:16]})")
    for name, count in info["classes"].items():
        print(f"  {count:8d}  {name}")
    return 0
