"""``snca predict CKPT IMAGE...``: classify image files by weighted kNN over a gallery.

The gallery is an index built with ``snca index build`` (``--gallery DIR``; it must have been
built with the same model), or by default the checkpoint's own memory bank with the training
set's labels. Each image is converted like the dataset's test images (greyscale for
1-channel models, resized/centre-cropped to the model's size, normalised). A file that is
missing, unreadable or not an image gets a one-line message; the others are still answered.
Exit status: 0 if every image was classified, 1 if any failed, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..errors import SncaError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "predict",
        help="classify image files by weighted kNN (gallery: memory bank or an index)",
        description="Predicted class, its score and the k nearest gallery items of each image.",
    )
    p.add_argument("checkpoint", help="a .pt checkpoint or a run directory (uses its best.pt)")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (png, jpg, ...)")
    p.add_argument("--gallery", metavar="INDEX_DIR", help="an index built with `snca index build` (default: the checkpoint's memory bank)")
    p.add_argument("--k", type=int, default=20, help="neighbours that vote (default 20)")
    p.add_argument("--data-dir", help="dataset root, for the memory gallery's class names and ids (default: the run's)")
    add_common_args(p)
    p.set_defaults(func=run)


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")


def memory_gallery(bank: Any, config: dict, data_dir: str | None = None, **kwargs: Any) -> Any:
    """The checkpoint's memory bank as a GalleryIndex, with the training set's class names and
    ids (file paths for folder datasets) when the dataset can be opened, else numbered ones."""
    from ..index import GalleryIndex, build_eval_dataset, dataset_ids, knn_sigma

    sigma = knn_sigma(config)
    names = ids = None
    try:
        dataset = build_eval_dataset(config, "train", data_dir=data_dir)
        if len(dataset) == bank.num_samples:
            names = list(dataset.classes)
            ids = dataset_ids(dataset, range(len(dataset)), config.get("dataset", "data"), "train")
    except SncaError as err:
        print(f"snca: warning: training set unavailable ({err}); showing class numbers and slot ids", file=sys.stderr)
    if names is None or len(names) < bank.num_classes:
        names = [str(c) for c in range(bank.num_classes)]
    return GalleryIndex.from_memory_bank(bank, names, ids, sigma=sigma, **kwargs)


def print_answers(
    answers: list[dict[str, Any]], failures: list[tuple[str, str]], as_json: bool, out: Any = None
) -> int:
    """Print per-image answers (and failures, each on stderr); return the exit status."""
    out = out or sys.stdout
    for path, message in failures:
        print(f"snca: error: {message}" if path in message else f"snca: error: {path}: {message}", file=sys.stderr)
    if as_json:
        failed = [{"image": p, "error": m} for p, m in failures]
        json.dump({"results": answers, "failed": failed}, out, indent=1)
        out.write("\n")
    else:
        for a in answers:
            print(f"{a['image']}: {a['prediction']} (score {a['score']:.3f})", file=out)
            for rank, nb in enumerate(a["neighbors"], 1):
                print(f"  {rank:3d}. {nb['similarity']:.4f}  {nb['label']:<20s} {nb['id']}", file=out)
    return 1 if failures else 0


def classify_files(index: Any, model: Any, config: dict, paths: list[str], k: int, batch_size: int, device: str) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """Embed the files and query the index: (answers, failures)."""
    from ..index import embed_image_files

    if k < 1:
        raise SncaError(f"--k must be >= 1, got {k}")
    embedded = embed_image_files(model, config, paths, batch_size=batch_size, device=device)
    answers: list[dict[str, Any]] = []
    if embedded.paths:
        result = index.query(embedded.features, k=k)
        for path, summary in zip(embedded.paths, result.as_dicts(), strict=True):
            answers.append({"image": path, **summary})
    return answers, embedded.failures


def run(args: argparse.Namespace) -> int:
    from ..checkpoint import load_trained
    from ..index import GalleryIndex, model_record, resolve_checkpoint

    ckpt = resolve_checkpoint(args.checkpoint)
    model, config, bank = load_trained(ckpt, device=args.device)
    if args.gallery:
        index = GalleryIndex.load(args.gallery)
        index.check_model(model_record(ckpt, model, config))
        if index.dim != int(getattr(model, "low_dim", index.dim)):
            raise SncaError(f"the index holds {index.dim}-d features but the model embeds into {model.low_dim} dims")
    else:
        if bank is None:
            raise SncaError(
                f"{ckpt} has no memory bank (a softmax run); pass --gallery INDEX_DIR built with `snca index build`"
            )
        index = memory_gallery(bank, config, args.data_dir)
    answers, failures = classify_files(index, model, config, list(args.images), args.k, args.batch_size, args.device)
    return print_answers(answers, failures, args.json)
