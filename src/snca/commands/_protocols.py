"""Shared plumbing of the protocol commands (``snca subcategory``, ``fewshot``, ``retrieval``):
where the features come from (a checkpoint, or raw pixels) and on which data."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from typing import Any

from ..errors import SncaError


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


@dataclass
class Source:
    """Where features come from: a model (None for pixels) and the data settings."""

    model: Any
    kind: str
    dataset: str
    data_dir: str | None
    subset: int | None
    test_subset: int | None
    seed: int
    device: str
    batch_size: int
    config: dict[str, Any]
    bank: Any
    what: str

    def build(self, split: str, label_set: str = "fine", coarse_map: str | None = None) -> Any:
        """The split under test transforms (the gallery is never augmented)."""
        from ..data import build_dataset

        kwargs: dict[str, Any] = {}
        if coarse_map is not None:
            kwargs["coarse_map"] = coarse_map
        return build_dataset(
            self.dataset,
            split,
            data_dir=self.data_dir,
            label_set=label_set,
            subset=self.subset if split == "train" else self.test_subset,
            seed=self.seed,
            **kwargs,
        )

    def features(self, dataset: Any):
        from ..protocols.features import dataset_features

        return dataset_features(dataset, self.kind, self.model, batch_size=self.batch_size, device=self.device)


def load_source(args: argparse.Namespace) -> Source:
    if args.batch_size < 1:
        raise SncaError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.features == "pixels":
        if args.checkpoint:
            print("note: --features pixels ignores the checkpoint's network (only its dataset is used)", file=sys.stderr)
        config: dict[str, Any] = {}
        if args.checkpoint:
            from ..checkpoint import load_checkpoint, resolve_checkpoint

            config = dict(load_checkpoint(resolve_checkpoint(args.checkpoint))["config"])
        model, bank, device = None, None, "cpu"
        what = "raw pixels"
    else:
        if not args.checkpoint:
            raise SncaError(f"{args.features} features need a checkpoint: pass CKPT, or use --features pixels")
        from ..checkpoint import load_trained, resolve_checkpoint
        from ..engine import resolve_device

        device = str(resolve_device(args.device))
        path = resolve_checkpoint(args.checkpoint)
        model, config, bank = load_trained(path, device)
        what = f"{config.get('loss', '?')} {config.get('arch', '?')} {args.features} ({path})"
    return Source(
        model=model,
        kind=args.features,
        dataset=args.dataset or config.get("dataset") or "fashion-mnist",
        data_dir=args.data_dir if args.data_dir is not None else config.get("data_dir"),
        subset=args.subset if args.subset is not None else config.get("subset"),
        test_subset=args.test_subset,
        seed=int(config.get("seed", 0)),
        device=device,
        batch_size=args.batch_size,
        config=config,
        bank=bank,
        what=what,
    )


def emit(result: dict[str, Any], as_json: bool, lines: list[str]) -> None:
    print(json.dumps(result, indent=2) if as_json else "\n".join(lines))
