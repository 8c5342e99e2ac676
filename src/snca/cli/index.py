"""``snca index``: build and edit a gallery index that lives apart from the training run.

    snca index build CKPT --out DIR [--split train] [--backend torch|faiss-flat|faiss-ivf|faiss-hnsw]
    snca index build --from-reference FILE --arch resnet18 --out DIR [--dataset folder --data-dir D]
    snca index add DIR --images A.png B.png --label NAME     (or --from-folder ROOT: one subfolder per class)
    snca index remove DIR --ids ID... | --label NAME
    snca index query DIR IMAGE... [--k 20] [--json]
    snca index info DIR

The index remembers the checkpoint that embeds its images (path and SHA-256 of the weights) and
refuses to add or query with a model whose weights differ. ``--from-reference`` converts a
reference-implementation release (see :mod:`snca.reference`) into ``DIR/checkpoint.pt`` first.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..errors import SncaError
from .predict import add_common_args, classify_files, memory_gallery, print_answers


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "index",
        help="build, extend, shrink and query a gallery index (new classes without retraining)",
        description="A gallery of labelled embeddings kept apart from the training run.",
    )
    sub = p.add_subparsers(dest="index_command", metavar="ACTION", title="actions")
    p.set_defaults(func=run, index_command=None, _index_parser=p)

    b = sub.add_parser("build", help="embed a dataset split with a checkpoint")
    b.add_argument("checkpoint", nargs="?", help="a .pt checkpoint or a run directory")
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
    q.add_argument("images", nargs="+", metavar="IMAGE")
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


def _backend_params(args: argparse.Namespace) -> dict:
    params = {"nlist": args.nlist, "nprobe": args.nprobe, "ef_search": args.ef_search}
    return {k: v for k, v in params.items() if v is not None}


def _build(args: argparse.Namespace) -> int:
    from ..checkpoint import load_trained
    from ..index import (
        BACKENDS,
        GalleryIndex,
        knn_sigma,
        model_record,
        require_faiss,
        resolve_checkpoint,
    )

    if args.backend not in BACKENDS:
        raise SncaError(f"unknown backend '{args.backend}'; choose one of {', '.join(BACKENDS)}")
    if args.backend != "torch":
        require_faiss(args.backend)
    out = Path(args.out)
    if (out / "index.json").exists():
        raise SncaError(f"{out} already holds an index; remove it or choose another --out")
    if args.from_reference:
        if args.checkpoint:
            raise SncaError("give either a checkpoint or --from-reference, not both")
        from ..interop.reference import import_reference

        ckpt = import_reference(
            args.from_reference, out / "checkpoint.pt", arch=args.arch,
            dataset=args.dataset or "folder", data_dir=args.data_dir,
        )
        print(f"imported {args.from_reference} -> {ckpt}")
        source = args.source or "memory"
    else:
        if not args.checkpoint:
            raise SncaError("snca index build needs a checkpoint (or --from-reference FILE)")
        ckpt = resolve_checkpoint(args.checkpoint)
        source = args.source or "features"
    model, config, bank = load_trained(ckpt, device=args.device)
    options = {"backend": args.backend, "backend_params": _backend_params(args)}
    record = model_record(ckpt, model, config)
    if args.empty or (args.from_reference and bank is None and args.data_dir is None):
        index = GalleryIndex(int(model.low_dim), sigma=knn_sigma(config), model=record, **options)
    elif source == "memory":
        if bank is None:
            raise SncaError(f"{ckpt} holds no memory bank; use --source features (embed the --split images)")
        index = memory_gallery(bank, config, args.data_dir, **options)
        index.model = record
    else:
        index = GalleryIndex.from_checkpoint(
            ckpt, split=args.split, data_dir=args.data_dir, subset=args.subset,
            batch_size=args.batch_size, device=args.device, **options,
        )
    index.save(out)
    print(f"wrote {out}: {len(index)} images, {index.num_classes} classes, {index.dim}-d, backend {index.backend}")
    return 0


def _folder_images(root: Path) -> tuple[list[str], list[str]]:
    from ..data import IMG_EXTENSIONS

    if not root.is_dir():
        raise SncaError(f"--from-folder {root} is not a directory (expected ROOT/<class>/<images>)")
    paths, labels = [], []
    for d in sorted(x for x in root.iterdir() if x.is_dir() and not x.name.startswith(".")):
        for f in sorted(d.rglob("*")):
            if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in IMG_EXTENSIONS:
                paths.append(str(f))
                labels.append(d.name)
    if not paths:
        raise SncaError(f"{root} has no class folders with images ({', '.join(IMG_EXTENSIONS)})")
    return paths, labels


def _add(args: argparse.Namespace) -> int:
    from ..index import GalleryIndex, embed_image_files, load_index_model

    if bool(args.images) == bool(args.from_folder):
        raise SncaError("give either --images PATH... --label NAME or --from-folder ROOT")
    if args.images:
        if not args.label:
            raise SncaError("--images needs --label NAME (the class of these images)")
        paths, labels = list(args.images), [args.label] * len(args.images)
    else:
        paths, labels = _folder_images(Path(args.from_folder))
    index = GalleryIndex.load(args.index)
    model, config, record = load_index_model(index, args.checkpoint, device=args.device)
    index.model = record  # same weights; remember where the checkpoint is now
    embedded = embed_image_files(model, config, paths, batch_size=args.batch_size, device=args.device)
    label_of = dict(zip(paths, labels, strict=True))
    ids = [str(Path(p).resolve()) for p in embedded.paths]
    new_classes = sorted({label_of[p] for p in embedded.paths} - set(index.class_names))
    if embedded.paths:
        index.add(embedded.features, [label_of[p] for p in embedded.paths], ids)
        index.save(args.index)
    for path, message in embedded.failures:
        print(f"snca: error: {message}" if path in message else f"snca: error: {path}: {message}", file=sys.stderr)
    print(
        f"added {len(embedded.paths)} images to {args.index}"
        + (f" (new classes: {', '.join(new_classes)})" if new_classes else "")
        + (f"; {len(embedded.failures)} failed" if embedded.failures else "")
        + f"; it now holds {len(index)} images of {index.num_classes} classes"
    )
    return 1 if embedded.failures else 0


def _remove(args: argparse.Namespace) -> int:
    from ..index import GalleryIndex

    if not args.ids and not args.label:
        raise SncaError("give --ids ID... or --label NAME")
    index = GalleryIndex.load(args.index)
    wanted = []
    for i in args.ids:
        # Ids of added files are absolute paths: accept the path as typed too.
        if i not in index._id_set and str(Path(i).resolve()) in index._id_set:
            i = str(Path(i).resolve())
        wanted.append(i)
    if args.label:
        label = index.class_index(args.label, create=False)
        wanted += [i for i, y in zip(index.ids, index.labels.tolist(), strict=True) if y == label]
    removed = index.remove(wanted)
    index.save(args.index)
    print(f"removed {removed} images from {args.index}; it now holds {len(index)}")
    return 0


def _query(args: argparse.Namespace) -> int:
    from ..index import GalleryIndex, load_index_model

    index = GalleryIndex.load(args.index)
    if len(index) == 0:
        raise SncaError(f"the index {args.index} is empty: add labelled images with `snca index add` first")
    model, config, _ = load_index_model(index, args.checkpoint, device=args.device)
    answers, failures = classify_files(index, model, config, list(args.images), args.k, args.batch_size, args.device)
    return print_answers(answers, failures, args.json)


def _info(args: argparse.Namespace) -> int:
    from ..index import GalleryIndex

    index = GalleryIndex.load(args.index)
    info = {
        "size": len(index), "dim": index.dim, "backend": index.backend, "sigma": index.sigma,
        "classes": index.class_counts(), "model": index.model,
    }
    if args.json:
        print(json.dumps(info, indent=1))
    else:
        print(f"{args.index}: {len(index)} images, {index.dim}-d, backend {index.backend}, sigma {index.sigma}")
        if index.model:
            print(f"model: {index.model.get('checkpoint')} (weights sha256 {str(index.model.get('weights_sha256'))[:16]})")
        for name, count in info["classes"].items():
            print(f"  {count:8d}  {name}")
    return 0
