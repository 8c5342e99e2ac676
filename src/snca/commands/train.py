"""``snca train``: train an embedding with NCA and an augmented memory (or a softmax baseline).

The run directory (``runs/<dataset>-<arch>-<loss>`` by default) receives ``config.yaml`` (the
resolved config), ``metrics.jsonl`` (one JSON object per epoch, then a final one),
``last.pt`` (every epoch, atomically) and ``best.pt`` (best per-epoch validation accuracy),
``final.json`` and ``curves.png``.

Ctrl-C: ``last.pt`` always holds the last completed epoch and is what ``--resume`` continues
from; the state at the moment of the interrupt is written to ``interrupted.pt``, marked
``mid_epoch`` (usable with ``snca eval`` / ``snca extract``, refused by ``--resume``, which
only continues exactly from epoch boundaries).

Data-parallel: ``torchrun --nproc-per-node W -m snca train ...`` trains on W processes (one
per GPU; gloo on CPU) with the memory sharded over them (see docs/distributed.md). The global
batch stays ``--batch-size`` (each rank loads batch-size / W); rank 0 logs and writes the run
directory, every rank takes part in checkpointing (the memory shards are gathered) and in
evaluation (each embeds its share of the test set).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from ..errors import SncaError

# (flag, config key, type, help)
FLAGS: list[tuple[str, str, Any, str]] = [
    ("--dataset", "dataset", str, "fashion-mnist | mnist | mnist5k | cifar10 | cifar100 | folder"),
    ("--data-dir", "data_dir", str, "dataset root (folder: DIR/train/<class>/, DIR/val/<class>/)"),
    ("--label-set", "label_set", str, "fine | coarse"),
    ("--subset", "subset", int, "train on a class-stratified subset of N images"),
    ("--test-subset", "test_subset", int, "evaluate on a class-stratified subset of N test images"),
    ("--split-file", "split_file", str, "few-shot: train on the [base] classes of this class-split file only"),
    ("--arch", "arch", str, "small_cnn | cifar_resnet18 | resnet18 | resnet34 | resnet50 | timm:<name>"),
    ("--low-dim", "low_dim", int, "embedding dimension D (128)"),
    ("--loss", "loss", str, "nca (memory) | softmax (linear classifier baseline)"),
    ("--temperature", "temperature", float, "NCA temperature T (0.05); also the kNN sigma"),
    ("--epochs", "epochs", int, "number of epochs"),
    ("--batch-size", "batch_size", int, "images per forward pass"),
    ("--iter-size", "iter_size", int, "batches accumulated per optimizer step (effective batch = batch-size x iter-size)"),
    ("--lr", "lr", float, "base learning rate"),
    ("--weight-decay", "weight_decay", float, "SGD weight decay"),
    ("--amp", "amp", str, "mixed precision: none | bf16 | fp16"),
    ("--seed", "seed", int, "random seed"),
    ("--workers", "workers", int, "data-loader worker processes"),
    ("--device", "device", str, "auto | cpu | cuda | cuda:N | mps"),
    ("--threads", "threads", int, "torch CPU threads"),
    ("--out-dir", "out_dir", str, "parent of run directories (runs)"),
    ("--name", "name", str, "run name (default <dataset>-<arch>-<loss>)"),
]
SWITCHES: list[tuple[str, str, bool, str]] = [
    ("--channels-last", "channels_last", True, "channels-last memory format (faster convolutions on GPUs)"),
    ("--deterministic", "deterministic", True, "deterministic kernels and seeded loaders: a resumed run repeats an uninterrupted one bit for bit"),
    ("--tensorboard", "tensorboard", True, "also log to TensorBoard (needs the tensorboard package)"),
    ("--no-progress", "progress", "off", "no progress bar"),
    ("--no-plot", "plot", False, "do not draw curves.png"),
]


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train an embedding (NCA with a memory bank, or a softmax baseline)",
        description="Train an embedding with the NCA loss against an augmented memory, then report "
        "weighted-kNN accuracy. With no arguments: the Fashion-MNIST recipe. Every config key can be "
        "set with --set key=value (see --list-keys).",
    )
    p.add_argument("--config", "-c", metavar="RECIPE|FILE", help="recipe name (fashion-mnist, cifar10, cifar100, imagenet) or a YAML file")
    for flag, key, tp, help_text in FLAGS:
        p.add_argument(flag, dest=f"cfg_{key}", type=tp, default=argparse.SUPPRESS, metavar=key.upper(), help=help_text)
    for flag, key, value, help_text in SWITCHES:
        p.add_argument(flag, dest=f"cfg_{key}", action="store_const", const=value, default=argparse.SUPPRESS, help=help_text)
    p.add_argument("--novel-classes", dest="cfg_novel_classes", nargs="+", default=argparse.SUPPRESS, metavar="CLASS",
                   help="few-shot: hold these classes (names or ids) out of training; train on the rest (the base classes)")
    p.add_argument("--set", dest="set_items", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key (values parse as YAML, e.g. --set 'memory_momentum_schedule={0: 0.5, 80: 0.8}')")
    p.add_argument("--resume", metavar="PATH|auto", help="continue a run from a checkpoint (.pt or run directory), or 'auto': the latest run of this name, if any")
    p.add_argument("--run-dir", metavar="DIR", help="run directory (default <out-dir>/<name>, numbered if taken)")
    p.add_argument("--list-keys", action="store_true", help="list every config key with its type and default, and exit")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    p.set_defaults(func=run)


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Config values given explicitly on the command line (flags, then --set)."""
    from ..config import parse_set

    out = {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg_")}
    out.update(parse_set(args.set_items))
    return out


def list_keys() -> str:
    import dataclasses

    from ..config import _HINTS, TrainConfig, _type_name

    lines = []
    for f in dataclasses.fields(TrainConfig):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        lines.append(f"{f.name:26s} {_type_name(_HINTS[f.name]):22s} {default!r}")
    return "\n".join(lines)


# ---------------------------------------------------------------------- run directories
def _run_candidates(out_dir: Path, name: str) -> list[Path]:
    if not out_dir.is_dir():
        return []
    found = []
    for d in out_dir.iterdir():
        suffix = d.name[len(name):]
        if d.is_dir() and d.name.startswith(name) and (suffix == "" or (suffix[:1] == "-" and suffix[1:].isdigit())):
            found.append(d)
    return found


def choose_run_dir(out_dir: str, name: str) -> Path:
    """``out_dir/name``, or ``name-2``, ``name-3``... when that already holds a run."""
    base = Path(out_dir) / name
    candidate, n = base, 1
    while (candidate / "last.pt").exists() or (candidate / "config.yaml").exists():
        n += 1
        candidate = base.with_name(f"{name}-{n}")
    return candidate


def find_resume(resume: str, run_dir: str | None, out_dir: str, name: str) -> Path | None:
    """The checkpoint ``--resume`` points at (None: 'auto' found nothing, start fresh)."""
    if resume != "auto":
        path = Path(resume)
        if path.is_dir():
            path = path / "last.pt"
        if not path.is_file():
            raise SncaError(f"checkpoint {path} does not exist; pass a .pt file, a run directory, or --resume auto")
        return path
    if run_dir is not None:
        path = Path(run_dir) / "last.pt"
        return path if path.is_file() else None
    ckpts = [d / "last.pt" for d in _run_candidates(Path(out_dir), name) if (d / "last.pt").is_file()]
    return max(ckpts, key=lambda p: p.stat().st_mtime) if ckpts else None


# ---------------------------------------------------------------------- logging helpers
def _jsonable(record: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in record.items():
        if isinstance(v, float) and not math.isfinite(v):
            v = None
        out[k] = v
    return out


def write_metrics(path: Path, records: list[dict[str, Any]]) -> None:
    with open(path, "w") as fh:
        for r in records:
            fh.write(json.dumps(_jsonable({"kind": "epoch", **r})) + "\n")


def append_metrics(path: Path, record: dict[str, Any], kind: str = "epoch") -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(_jsonable({"kind": kind, **record})) + "\n")


def plot_curves(path: Path, records: list[dict[str, Any]], final: dict[str, Any] | None, title: str) -> None:
    """Train loss, validation accuracy and learning rate against epochs (matplotlib Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in records]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(epochs, [r.get("train_loss") for r in records], marker="o", ms=3)
    axes[0].set_title("train loss")
    val = [(r["epoch"], 100 * r["val_top1"]) for r in records if r.get("val_top1") is not None]
    if val:
        metric = next((r.get("val_metric") for r in records if r.get("val_metric")), "val")
        axes[1].plot(*zip(*val, strict=True), marker="o", ms=3, label=f"{metric} (per epoch)")
    if final and final.get("knn_top1") is not None:
        axes[1].axhline(100 * final["knn_top1"], color="C3", ls="--", label=f"final weighted kNN k={final.get('knn_k')}")
    axes[1].set_title("test top-1 (%)")
    if val or (final and final.get("knn_top1") is not None):
        axes[1].legend(fontsize=8)
    axes[2].plot(epochs, [r.get("lr") for r in records], marker="o", ms=3)
    axes[2].set_title("learning rate (epoch start)")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def _silent(*_args: Any, **_kwargs: Any) -> None:
    pass


def _fmt_pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def _progress_bar(cfg, total: int, desc: str, enabled: bool = True):
    from tqdm.auto import tqdm

    disable = {"on": False, "off": True, "auto": None}[cfg.progress] if enabled else True
    return tqdm(total=total, desc=desc, disable=disable, leave=False, dynamic_ncols=True, mininterval=0.5, file=sys.stderr)


# ---------------------------------------------------------------------- the command
def resolve(args: argparse.Namespace):
    """(config, checkpoint path to resume from or None, loaded checkpoint or None)."""
    from ..checkpoint import load_checkpoint
    from ..config import apply_overrides, config_from_dict, load_recipe

    overrides = overrides_from_args(args)
    cfg = apply_overrides(load_recipe(args.config or "fashion-mnist"), overrides, source="command line")
    ckpt_path, state = None, None
    if args.resume:
        ckpt_path = find_resume(args.resume, args.run_dir, cfg.out_dir, cfg.run_name)
        if ckpt_path is not None:
            if args.config:
                raise SncaError("--config cannot be combined with --resume: the checkpoint's config is used; change values with flags or --set")
            state = load_checkpoint(ckpt_path)
            cfg = apply_overrides(config_from_dict(state["config"]), overrides, source="command line")
    return cfg, ckpt_path, state


def run(args: argparse.Namespace) -> int:
    if args.list_keys:
        print(list_keys())
        return 0
    from ..config import dump_yaml

    cfg, ckpt_path, state = resolve(args)
    if args.print_config:
        print(dump_yaml(cfg), end="")
        return 0
    result = train(cfg, run_dir=args.run_dir, resume_path=ckpt_path, resume_state=state, resume_requested=bool(args.resume))
    return 0 if result is not None else 130


def train(cfg, run_dir: str | Path | None = None, resume_path: Path | None = None, resume_state: dict | None = None,
          resume_requested: bool = False, log=print) -> dict[str, Any] | None:
    """Train as ``snca train`` does; returns the final metrics (None when interrupted).

    Under torchrun (WORLD_SIZE > 1) every rank calls it: it joins the process group (NCCL on
    GPUs, gloo on CPU or with ``device: cpu``), trains data-parallel, and leaves the group.
    """
    from .. import distributed as sd

    joined_here = not sd.is_distributed()  # a caller's own process group is left to the caller
    info = sd.init_from_env(backend="gloo" if cfg.device == "cpu" else None)
    try:
        return _train(cfg, info, run_dir, resume_path, resume_state, resume_requested, log)
    finally:
        if joined_here:
            sd.cleanup()


def _train(cfg, info, run_dir: str | Path | None, resume_path: Path | None, resume_state: dict | None,
           resume_requested: bool, log) -> dict[str, Any] | None:
    import torch

    from .. import distributed as sd
    from ..checkpoint import link_checkpoint, save_checkpoint
    from ..config import dump_yaml
    from ..engine import (
        NonFiniteLossError,
        Trainer,
        build_datasets,
        class_split_of,
        record_class_split,
        resolve_config,
        resolve_device,
        seed_everything,
        set_deterministic,
        uses_class_split,
    )
    from ..models import build_model

    cfg = resolve_config(cfg)
    world, main = info.world_size, sd.is_main()
    device = info.device if world > 1 else resolve_device(cfg.device)
    if not main:
        log = _silent  # rank 0 speaks for the job
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    set_deterministic(cfg.deterministic)
    if cfg.amp == "fp16" and device.type == "cpu":
        log("note: fp16 autocast on CPU is slow and rarely useful; bf16 is the CPU choice")

    # Run directory.
    if resume_path is not None:
        run_path = Path(run_dir) if run_dir is not None else resume_path.parent
    elif run_dir is not None:
        run_path = Path(run_dir)
        if (run_path / "last.pt").exists():
            raise SncaError(f"run dir {run_path} already holds a run (last.pt); continue it with --resume auto, or pick another --run-dir")
    else:
        run_path = choose_run_dir(cfg.out_dir, cfg.run_name)
    # Every rank ran the checks above on the same files; rank 0's choice of name is the one used.
    run_path = Path(sd.broadcast_object(str(run_path)))
    if resume_requested and resume_path is None:
        log(f"no checkpoint to resume from for run {cfg.run_name!r}; starting a new run")

    # Per-rank seed: different augmentations on every rank (DDP copies rank 0's initial weights).
    seed_everything(cfg.seed + info.rank)
    if cfg.novel_classes or cfg.split_file:
        cfg = record_class_split(cfg, None)  # re-derived from them: a resume may change the split
    data = build_datasets(cfg)
    if uses_class_split(cfg):  # record the split (names and ids) in config.yaml and the checkpoints
        cfg = record_class_split(cfg, class_split_of(cfg, list(data["train"].dataset.classes)))
    model = build_model(cfg.arch, low_dim=cfg.low_dim, in_chans=cfg.in_chans, weights=cfg.weights)
    trainer = Trainer(cfg, model, data["train"], data["test"], data["train_eval"], device=device)
    if resume_state is not None:
        trainer.load_state_dict(resume_state, resume_path)

    metrics_path = run_path / "metrics.jsonl"
    last, best = run_path / "last.pt", run_path / "best.pt"
    if main:
        run_path.mkdir(parents=True, exist_ok=True)
        (run_path / "config.yaml").write_text(dump_yaml(cfg))
        write_metrics(metrics_path, trainer.metrics)  # a resumed run restarts its log at the checkpoint

    writer = None
    if cfg.tensorboard and main:
        try:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(run_path / "tensorboard"))
        except ImportError:
            log("note: --tensorboard needs the tensorboard package (pip install tensorboard); logging to metrics.jsonl only")

    what = f"{cfg.loss} on {cfg.dataset} ({len(data['train'])} train / {len(data['test'])} test images), {cfg.arch}, device {device}"
    if world > 1:
        what += f" x {world} ranks ({info.backend}, {cfg.batch_size // world} images per rank per step)"
    if cfg.class_split:
        what += (f"; base classes only ({len(cfg.class_split['base'])} of {len(data['train'].dataset.classes)}, "
                 f"novel: {', '.join(cfg.class_split['novel'])})")
    log(f"{'resuming' if resume_path else 'training'} {what}; run dir {run_path}"
        + (f" (from {resume_path}, epoch {trainer.epoch})" if resume_path else ""))
    wall_start = time.perf_counter()
    try:
        while trainer.epoch < cfg.epochs:
            e = trainer.epoch + 1
            bar = _progress_bar(cfg, trainer.steps_per_epoch, f"epoch {e}/{cfg.epochs}", enabled=main)

            def on_step(step: int, steps: int, loss: float, ips: float, bar=bar) -> None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{ips:.0f}", refresh=False)

            try:
                record = trainer.train_epoch(on_step)
            finally:
                bar.close()
            if cfg.val_every and (e % cfg.val_every == 0 or e == cfg.epochs):
                record.update(trainer.validate())
            is_best = trainer.end_epoch(record)
            state = trainer.state_dict()  # every rank: gathers the memory shards to rank 0
            if not main:
                continue
            save_checkpoint(last, state)
            del state
            (run_path / "interrupted.pt").unlink(missing_ok=True)  # superseded by a completed epoch
            if is_best or not best.exists():
                link_checkpoint(last, best)
            append_metrics(metrics_path, record)
            if writer is not None:
                for key in ("train_loss", "val_top1", "lr", "images_per_s", "memory_momentum"):
                    if record.get(key) is not None:
                        writer.add_scalar(key, record[key], e)
            val = f"  val top-1 {_fmt_pct(record['val_top1'])} ({record['val_metric']})" if "val_top1" in record else ""
            log(f"epoch {e}/{cfg.epochs}  loss {record['train_loss']:.4f}{val}  lr {record['lr']:.4g}  "
                f"{record['images_per_s']:.0f} img/s  {record['train_time_s']:.1f} s")
    except NonFiniteLossError as err:
        kept = f"the last good checkpoint is {last} (epoch {trainer.epoch})" if last.exists() else "no checkpoint was written"
        raise SncaError(f"{err}; {kept}") from None
    except KeyboardInterrupt:
        # Several ranks stop at different steps: no consistent mid-epoch state to gather.
        if trainer.step_in_epoch > 0 and world == 1:
            save_checkpoint(run_path / "interrupted.pt", trainer.state_dict(mid_epoch=True))
        resume_hint = f"resume with: snca train --resume {last}" if last.exists() else "no epoch completed yet"
        if main:
            print(f"snca: interrupted in epoch {trainer.epoch + 1} (step {trainer.step_in_epoch}/{trainer.steps_per_epoch}); "
                  f"{last} holds epoch {trainer.epoch}; {resume_hint}", file=sys.stderr)
        if writer is not None:
            writer.close()
        return None

    final = trainer.final_evaluation()  # every rank: each embeds its share of the test set
    final["wall_time_s"] = time.perf_counter() - wall_start
    final["epochs"] = trainer.epoch
    if not main:
        return final
    append_metrics(metrics_path, final, kind="final")
    (run_path / "final.json").write_text(json.dumps(_jsonable(final), indent=2) + "\n")
    if writer is not None:
        for key, value in final.items():
            if key.endswith(("_top1", "_top5")) and value is not None:
                writer.add_scalar(f"final/{key}", value, trainer.epoch)
        writer.close()
    if cfg.plot and trainer.metrics:
        plot_curves(run_path / "curves.png", trainer.metrics, final, f"{cfg.run_name}: {cfg.loss}, {cfg.arch}, {cfg.dataset}")
    k, sigma = final["knn_k"], final["knn_sigma"]
    if cfg.loss == "nca":
        line = f"weighted kNN (k={k}, sigma={sigma:g}), memory gallery: top-1 {_fmt_pct(final.get('knn_top1'))}, top-5 {_fmt_pct(final.get('knn_top5'))}"
        if "knn_recomputed_top1" in final:
            line += f"; recomputed gallery: top-1 {_fmt_pct(final['knn_recomputed_top1'])}"
    else:
        line = (f"classifier top-1 {_fmt_pct(final.get('classifier_top1'))}; weighted kNN (k={k}, sigma={sigma:g}), "
                f"embedding: top-1 {_fmt_pct(final.get('knn_top1'))}, penultimate: top-1 {_fmt_pct(final.get('knn_penultimate_top1'))}")
    log(line)
    log(f"done in {final['wall_time_s']:.0f} s; checkpoints {best} (best) and {last}; metrics {metrics_path}")
    return final
