"""``snca report``: train NCA and softmax models and tabulate every generalisation protocol
(kNN, sub-category, few-shot on novel classes, retrieval) against raw pixels, as Markdown."""

from __future__ import annotations

import argparse
import shlex
import sys

from ..errors import SncaError


def register(subparsers: argparse._SubParsersAction) -> None:
    from ..protocols.report import REPORT_DATASETS, SUPPORTED

    p = subparsers.add_parser(
        "report",
        help="train NCA and softmax models, run every protocol, write a Markdown results table",
        description="Trains, per dataset, NCA and softmax models on all classes, on coarse labels "
        "and on base classes only, then evaluates them and raw pixels with weighted kNN, "
        "sub-category kNN, N-way K-shot episodes on novel classes and retrieval; writes a "
        "Markdown table. The full run takes about 20-30 minutes on 2 CPU cores; --quick is a "
        "tiny version that checks the pipeline.",
    )
    p.add_argument("--out", default="docs/protocols.md", help="Markdown file to write (docs/protocols.md)")
    p.add_argument("--json", dest="json_out", default=None, help="also write every number as JSON here")
    p.add_argument("--quick", action="store_true", help="tiny budgets (500 images, 1 epoch, 100 episodes): a pipeline check, not a measurement")
    p.add_argument("--datasets", nargs="+", default=list(REPORT_DATASETS), choices=SUPPORTED, metavar="NAME",
                   help=f"datasets ({', '.join(SUPPORTED)}; default {' '.join(REPORT_DATASETS)})")
    p.add_argument("--seed", type=int, default=0, help="seed of training and of episode sampling (0)")
    p.add_argument("--epochs", nargs="+", default=[], metavar="DATASET=N",
                   help="override the epochs of a dataset, e.g. --epochs fashion-mnist=5 mnist5k=20")
    p.add_argument("--split-file", nargs="+", default=[], metavar="DATASET=FILE",
                   help="base/novel split of a dataset (default: the last five classes are novel, as in splits/)")
    p.add_argument("--episodes", type=int, default=None, help="few-shot episodes per setting (1000; 100 with --quick)")
    p.add_argument("--way", type=int, default=5, help="classes per episode (5)")
    p.add_argument("--shot", type=int, nargs="+", default=[1, 5], help="support images per class (1 5)")
    p.add_argument("--query", type=int, default=15, help="query images per class (15)")
    p.add_argument("--k", type=int, default=30, help="neighbours of the weighted kNN (30)")
    p.add_argument("--sigma", type=float, default=0.05, help="kNN vote temperature, also the NCA temperature (0.05)")
    p.add_argument("--arch", default="small_cnn", help="backbone of every trained model (small_cnn)")
    p.add_argument("--data-dir", default=None, help="dataset root (default: the offline copies)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.set_defaults(func=run)


def _pairs(items: list[str], flag: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise SncaError(f"{flag} expects DATASET=VALUE, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def _command(args: argparse.Namespace) -> str:
    """The command line that reproduces this report (options that differ from the defaults)."""
    from ..protocols.report import REPORT_DATASETS

    parts = ["python -m snca report"]
    if args.quick:
        parts.append("--quick")
    if list(args.datasets) != list(REPORT_DATASETS):
        parts.append("--datasets " + " ".join(args.datasets))
    simple = {"seed": 0, "episodes": None, "way": 5, "query": 15, "k": 30, "sigma": 0.05,
              "arch": "small_cnn", "data_dir": None, "device": "auto", "threads": None}
    for key, default in simple.items():
        value = getattr(args, key)
        if value != default:
            parts.append(f"--{key.replace('_', '-')} {shlex.quote(str(value))}")
    if list(args.shot) != [1, 5]:
        parts.append("--shot " + " ".join(str(x) for x in args.shot))
    for flag, items in (("--epochs", args.epochs), ("--split-file", args.split_file)):
        if items:
            parts.append(flag + " " + " ".join(shlex.quote(x) for x in items))
    parts.append(f"--out {shlex.quote(args.out)}")
    return " ".join(parts)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..protocols.report import ReportSettings, run_report, write_report

    epochs = {}
    for key, value in _pairs(args.epochs, "--epochs").items():
        if not value.isdigit() or int(value) < 1:
            raise SncaError(f"--epochs {key}={value}: the number of epochs must be a positive integer")
        epochs[key] = int(value)
    if args.threads is not None:
        if args.threads < 1:
            raise SncaError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    settings = ReportSettings(
        datasets=list(dict.fromkeys(args.datasets)),
        quick=args.quick,
        seed=args.seed,
        epochs=epochs,
        arch=args.arch,
        k=args.k,
        sigma=args.sigma,
        n_way=args.way,
        shots=tuple(args.shot),
        n_query=args.query,
        episodes=args.episodes,
        split_files=_pairs(args.split_file, "--split-file"),
        device=args.device,
        data_dir=args.data_dir,
        command=_command(args),
    )
    for key in list(settings.epochs) + list(settings.split_files):
        if key not in settings.datasets:
            raise SncaError(f"{key!r} is not among the report's datasets ({', '.join(settings.datasets)})")

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    result = run_report(settings, log)
    path = write_report(result, args.out, args.json_out)
    print(f"wrote {path} ({result['wall_s'] / 60:.1f} min)")
    return 0
