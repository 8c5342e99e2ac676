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
import os
import tempfile
from pathlib import Path

import numpy as np

from ..errors import SncaError
from .eval import add_data_args

SUFFIXES = (".npz", ".npy", ".safetensors")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "extract",
        help="write the features, labels and ids of a split (.npz, .npy or .safetensors)",
        description="Embed every image of a split with a trained checkpoint (test transforms) and save "
        "features, labels and dataset ids.",
    )
    p.add_argument("checkpoint", help="a .pt checkpoint or a run directory (uses its best.pt)")
    p.add_argument("--split", choices=("train", "test"), default="test", help="which split to embed")
    p.add_argument("--out", required=True, help="output file: .npz, .npy (plus _labels/_ids.npy) or .safetensors")
    p.add_argument("--features", choices=("embedding", "penultimate"), default="embedding",
                   help="embedding: the L2-normalised low-dim output; penultimate: backbone features (L2-normalised)")
    p.add_argument("--subset", type=int, default=None, help="train split only: another class-stratified subset size")
    add_data_args(p)
    p.set_defaults(func=run)


def _atomic(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_features(out: str | os.PathLike, features: np.ndarray, labels: np.ndarray, ids: np.ndarray) -> list[Path]:
    """Write the three arrays in the format the suffix of ``out`` names; returns the paths."""
    path = Path(out)
    if path.suffix not in SUFFIXES:
        raise SncaError(f"--out must end in {', '.join(SUFFIXES)}, got {path.name}")
    if not path.parent.is_dir():
        raise SncaError(f"output directory {path.parent} does not exist; create it first")
    arrays = {"features": np.ascontiguousarray(features, np.float32), "labels": np.ascontiguousarray(labels, np.int64),
              "ids": np.ascontiguousarray(ids, np.int64)}
    if path.suffix == ".npz":
        def write_npz(tmp: str) -> None:
            with open(tmp, "wb") as fh:
                np.savez(fh, **arrays)
        _atomic(path, write_npz)
        return [path]
    if path.suffix == ".safetensors":
        from safetensors.numpy import save_file

        _atomic(path, lambda tmp: save_file(arrays, tmp, metadata={"format": "snca-features"}))
        return [path]
    written = []
    for name, arr in arrays.items():
        target = path if name == "features" else path.with_name(f"{path.stem}_{name}.npy")

        def write_npy(tmp: str, arr=arr) -> None:
            with open(tmp, "wb") as fh:
                np.save(fh, arr)
        _atomic(target, write_npy)
        written.append(target)
    return written


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from ..checkpoint import check_dataset
    from ..engine import build_datasets, extract_features
    from .eval import load_for_eval

    if Path(args.out).suffix not in SUFFIXES:
        raise SncaError(f"--out must end in {', '.join(SUFFIXES)}, got {Path(args.out).name}")
    model, cfg, bank, device, path = load_for_eval(args)
    if args.subset is not None:
        cfg = dataclasses.replace(cfg, subset=args.subset)
    split = "train_eval" if args.split == "train" else "test"
    dataset = build_datasets(cfg, (split,))[split]
    if split == "train_eval" and bank is not None and args.subset is None and args.dataset is None:
        check_dataset(bank.labels, dataset.targets, str(path))
    feats, labels, ids = extract_features(model, dataset, cfg.eval_batch_size, device, args.features,
                                          cfg.workers, cfg.amp, cfg.channels_last)
    written = save_features(args.out, feats.cpu().numpy(), labels.numpy(), ids.numpy())
    print(f"wrote {feats.shape[0]} x {feats.shape[1]} {args.features} features of the {args.split} split "
          f"to {', '.join(str(p) for p in written)}")
    return 0
