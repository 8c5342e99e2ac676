"""``snca extract CKPT --split train|test --out FILE``: features, labels and ids of every image.

Images are embedded under test transforms (the training split too). ``ids`` are the dataset
indices (the memory's slot addresses). The output format follows the extension:

- ``FILE.npz``: one archive with arrays ``features`` (N, D) float32, ``labels`` (N,) int64,
  ``ids`` (N,) int64;
- ``FILE.safetensors``: the same three tensors;
- ``FILE.npy``: the features in FILE, plus ``<stem>_labels.npy`` and ``<stem>_ids.npy`` beside it.
"""

from __future__ import annotations

import argparse

from ..evaluate import extract_split
from .eval import add_data_args


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "extract",
        help="write the features, labels and ids of a split (.npz, .npy or .safetensors)",
        description="Embed every image of a split with a trained checkpoint (test transforms) and save "
        "features, labels and dataset ids.",
    )
    p.add_argument("checkpoint", help="a .pt checkpoint or a run directory (uses its last.pt)")
    p.add_argument("--split", choices=("train", "test"), default="test", help="which split to embed")
    p.add_argument("--out", required=True, help="output file: .npz, .npy (plus _labels/_ids.npy) or .safetensors")
    p.add_argument("--features", choices=("embedding", "penultimate"), default="embedding",
                   help="embedding: the L2-normalised low-dim output; penultimate: backbone features (L2-normalised)")
    p.add_argument("--subset", type=int, default=None, help="train split only: another class-stratified subset size")
    add_data_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    result = extract_split(args.checkpoint, args.out, split=args.split, features=args.features, subset=args.subset,
                           dataset=args.dataset, data_dir=args.data_dir, batch_size=args.batch_size,
                           workers=args.workers, device=args.device, amp=args.amp)
    print(f"wrote {result['rows']} x {result['dim']} {result['features']} features of the {result['split']} split "
          f"to {', '.join(result['files'])}")
    return 0
