"""``snca predict CKPT IMAGE...``: classify image files by weighted kNN over a gallery.

The gallery is an index built with ``snca index build`` (``--gallery DIR``; it must have been
built with the same model), or by default the checkpoint's own memory bank with the run's
class names (its base classes, or coarse labels, when it was trained on those). An IMAGE that
is a directory stands for the image files in it (sorted by name). Each image is converted like
the dataset's test images (greyscale for 1-channel models, resized/centre-cropped to the
model's size, normalised). A file that is missing, unreadable or not an image gets a one-line
message; the others are still answered.
Exit status: 0 if every image was classified, 1 if any failed, 2 on a usage error.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..gallery import predict_images


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "predict",
        help="classify image files by weighted kNN (gallery: memory bank or an index)",
        description="Predicted class, its score and the k nearest gallery items of each image.",
    )
    p.add_argument("checkpoint", help="a .pt checkpoint or a run directory (uses its last.pt)")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (png, jpg, ...) or directories of them")
    p.add_argument("--gallery", metavar="INDEX_DIR", help="an index built with `snca index build` (default: the checkpoint's memory bank)")
    p.add_argument("--k", type=int, default=20, help="neighbours that vote (default 20)")
    p.add_argument("--data-dir", help="dataset root, for the memory gallery's ids (default: the run's)")
    add_common_args(p)
    p.set_defaults(func=run)


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")


def print_failures(failures: list[tuple[str, str]]) -> None:
    """One ``snca: error:`` line per file that could not be used, on stderr."""
    for path, message in failures:
        print(f"snca: error: {message}" if path in message else f"snca: error: {path}: {message}", file=sys.stderr)


def print_answers(
    answers: list[dict[str, Any]], failures: list[tuple[str, str]], as_json: bool, out: Any = None
) -> int:
    """Print per-image answers (and failures, each on stderr); return the exit status."""
    out = out or sys.stdout
    print_failures(failures)
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


def run(args: argparse.Namespace) -> int:
    answers, failures = predict_images(args.checkpoint, args.images, gallery=args.gallery, k=args.k, data_dir=args.data_dir,
                                       batch_size=args.batch_size, device=args.device)
    return print_answers(answers, failures, args.json)
