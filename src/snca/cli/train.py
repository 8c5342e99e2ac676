"""``snca train``: train an embedding with NCA and an augmented memory (or a softmax baseline).

The flags are derived from the config's fields (:mod:`snca.config`): every leaf whose name is
unique across the config groups is ``--<name>``; every key, dotted or bare, can be set with
``--set key=value``. What the run writes is described in :mod:`snca.train.run`.
"""

from __future__ import annotations

import argparse
from typing import Any

from ..config import LEAVES, UNIQUE_LEAVES, dump_yaml, list_keys, parse_set
from ..train import fit, resolve_config

# Flags that store a fixed value instead of taking one (the rest take one value each).
SWITCHES = {"channels_last": True, "deterministic": True, "tensorboard": True, "download": True, "sync_bn": True}
NEGATIONS = {"--no-progress": ("progress", "off"), "--no-plot": ("plot", False)}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train an embedding (NCA with a memory bank, or a softmax baseline)",
        description="Train an embedding with the NCA loss against an augmented memory, then report "
        "weighted-kNN accuracy. With no arguments: the Fashion-MNIST recipe. Every config key can be "
        "set with --set key=value (see --list-keys).",
    )
    p.add_argument("--config", "-c", metavar="RECIPE|FILE", help="recipe name (fashion-mnist, cifar10, cifar100, imagenet) or a YAML file")
    for bare, key in UNIQUE_LEAVES.items():
        if bare == "recipe":
            continue  # --config
        flag, help_text = f"--{bare.replace('_', '-')}", LEAVES[key].metadata.get("help", "")
        if bare in SWITCHES:
            p.add_argument(flag, dest=f"cfg:{key}", action="store_const", const=SWITCHES[bare], default=argparse.SUPPRESS, help=help_text)
        elif bare == "novel_classes":
            p.add_argument(flag, dest=f"cfg:{key}", nargs="+", metavar="CLASS", default=argparse.SUPPRESS, help=help_text)
        elif str(LEAVES[key].type) in ("bool", "<class 'bool'>"):
            continue  # booleans without a switch: --set key=true|false
        else:
            p.add_argument(flag, dest=f"cfg:{key}", metavar=bare.upper(), default=argparse.SUPPRESS, help=help_text)
    for flag, (bare, value) in NEGATIONS.items():
        p.add_argument(flag, dest=f"cfg:{UNIQUE_LEAVES[bare]}", action="store_const", const=value, default=argparse.SUPPRESS,
                       help=f"set {bare} to {value!r}")
    p.add_argument("--set", dest="set_items", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key (values parse as YAML, e.g. --set 'memory_momentum_schedule={0: 0.5, 80: 0.8}')")
    p.add_argument("--resume", metavar="PATH|auto", help="continue a run from a checkpoint (.pt or run directory), or 'auto': the latest run of this name, if any")
    p.add_argument("--run-dir", metavar="DIR", help="run directory (default <out-dir>/<name>, numbered if taken)")
    p.add_argument("--list-keys", action="store_true", help="list every config key with its default and help, and exit")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    p.set_defaults(func=run)


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Config values given explicitly on the command line (flags, then --set)."""
    out = {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg:")}
    out.update(parse_set(args.set_items))
    return out


def run(args: argparse.Namespace) -> int:
    if args.list_keys:
        print(list_keys())
        return 0
    overrides = overrides_from_args(args)
    if args.print_config:
        print(dump_yaml(resolve_config(args.config, overrides, args.resume, args.run_dir)[0]), end="")
        return 0
    result = fit(recipe=args.config, overrides=overrides, run_dir=args.run_dir, resume=args.resume)
    if result.interrupted:
        return 143 if result.stopped_by == "SIGTERM" else 130
    return 0
