"""Shared plumbing of the protocol commands (``snca subcategory``, ``fewshot``, ``retrieval``):
where the features come from (a checkpoint, or raw pixels) and on which data."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..evaluate import FeatureSource, feature_source


def add_source_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", nargs="?", help="a .pt checkpoint or run directory (omit with --features pixels)")
    p.add_argument("--features", choices=("embedding", "penultimate", "pixels"), default="embedding",
                   help="the checkpoint's L2-normalised embedding (default), its backbone's penultimate "
                   "features, or raw pixels (no checkpoint needed)")
    p.add_argument("--dataset", help="dataset (default: the checkpoint's; fashion-mnist for pixels)")
    p.add_argument("--data-dir", help="dataset root (default: the checkpoint's)")
    p.add_argument("--subset", type=int, default=None, help="class-stratified subset of N training images (default: the checkpoint's)")
    p.add_argument("--test-subset", type=int, default=None, help="class-stratified subset of N test images")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass (256)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")


def load_source(args: argparse.Namespace) -> FeatureSource:
    if args.features == "pixels" and args.checkpoint:
        print("note: --features pixels ignores the checkpoint's network (only its dataset is used)", file=sys.stderr)
    return feature_source(args.checkpoint, args.features, dataset=args.dataset, data_dir=args.data_dir,
                          subset=args.subset, test_subset=args.test_subset, device=args.device, batch_size=args.batch_size)


def emit(result: dict[str, Any], as_json: bool, lines: list[str]) -> None:
    print(json.dumps(result, indent=2) if as_json else "\n".join(lines))
