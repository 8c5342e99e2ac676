"""A training run from a config: :func:`fit`, the one entry point the CLI, the tests and the
experiments call.

The run directory (``runs/<dataset>-<arch>-<loss>`` by default, numbered when taken) receives
``config.yaml`` (the config as chosen), ``metrics.jsonl`` (one JSON object per epoch, then a
final one), ``last.pt`` (every epoch, atomically; see :mod:`snca.checkpoint` for the layouts),
``best.pt`` (best per-epoch monitor), ``final.json`` and ``curves.png``.

Interrupts (Ctrl-C): ``last.pt`` keeps the last completed epoch and is what a resume continues
from; the state at the interrupt goes to ``interrupted.pt``, marked ``mid_epoch`` (usable by
``snca eval``, refused by resume, which continues exactly from epoch boundaries only).

Under torchrun (WORLD_SIZE > 1) every rank calls :func:`fit`: it joins the process group (NCCL
on GPUs, gloo on CPU), trains data-parallel with the memory sharded, and leaves the group; rank
0 logs and writes the run directory, every rank writes its memory shard.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .. import distributed as sd
from ..checkpoint import (
    link_checkpoint,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
    save_run_checkpoint,
)
from ..config import Config, config_from_dict, dump_yaml, load_config
from ..data import RunData, run_datasets
from ..errors import SncaError
from ..files import atomic_write, atomic_write_text, check_writable, write_error
from ..models import build_model
from ..runtime import Terminated, resolve_device, seed_everything, set_deterministic
from .trainer import NonFiniteLossError, Trainer

Log = Callable[[str], None]


@dataclass
class Run:
    """What :func:`fit` returns: the trained model and memory, the metrics, where they were written."""

    config: Config
    run_dir: Path | None
    trainer: Trainer
    data: RunData
    final: dict[str, Any] | None  # None when interrupted
    metrics: list[dict[str, Any]] = field(default_factory=list)
    stopped_by: str | None = None  # "interrupt" (Ctrl-C) or "SIGTERM" when the run was stopped

    @property
    def model(self) -> torch.nn.Module:
        return self.trainer.model

    @property
    def memory(self) -> Any:
        return getattr(self.trainer.objective, "memory", None)

    @property
    def interrupted(self) -> bool:
        return self.final is None


# ---------------------------------------------------------------------- run directories
def _run_candidates(out_dir: Path, name: str) -> list[Path]:
    if not out_dir.is_dir():
        return []
    return [d for d in out_dir.iterdir() if d.is_dir() and d.name.startswith(name)
            and (d.name == name or (d.name[len(name):][:1] == "-" and d.name[len(name) + 1:].isdigit()))]


def choose_run_dir(out_dir: str, name: str) -> Path:
    """``out_dir/name``, or ``name-2``, ``name-3``... when that already holds a run."""
    base = Path(out_dir) / name
    candidate, n = base, 1
    while (candidate / "last.pt").exists() or (candidate / "config.yaml").exists():
        n += 1
        candidate = base.with_name(f"{name}-{n}")
    return candidate


def find_resume(resume: str | Path, run_dir: str | Path | None, out_dir: str, name: str) -> Path | None:
    """The checkpoint a resume continues (None: 'auto' found nothing, start fresh)."""
    if str(resume) != "auto":
        return resolve_checkpoint(resume)
    if run_dir is not None:
        path = Path(run_dir) / "last.pt"
        return path if path.exists() else None
    ckpts = [d / "last.pt" for d in _run_candidates(Path(out_dir), name) if (d / "last.pt").exists()]
    return max(ckpts, key=lambda p: p.stat().st_mtime) if ckpts else None


def resolve_config(recipe: str | None, overrides: Mapping[str, Any] | None, resume: str | Path | None,
                   run_dir: str | Path | None) -> tuple[Config, Path | None]:
    """The run's config and the checkpoint to resume (or None): a fresh run's config is the
    recipe then the overrides; a resumed run's is the checkpoint's, then the overrides."""
    cfg = load_config(recipe or "fashion-mnist", overrides)
    if not resume:
        return cfg, None
    path = find_resume(resume, run_dir, cfg.run.out_dir, cfg.run_name)
    if path is None:
        return cfg, None
    if recipe:
        raise SncaError("--config cannot be combined with --resume: the checkpoint's config is used; change values with flags or --set")
    saved = load_checkpoint(path)["config"]
    return load_config(recipe=None, base=config_from_dict(saved), overrides=overrides), path


# ---------------------------------------------------------------------- logging
def _jsonable(record: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}


def _append(path: Path, record: dict[str, Any], kind: str = "epoch") -> None:
    try:
        with open(path, "a") as fh:
            fh.write(json.dumps(_jsonable({"kind": kind, **record})) + "\n")
    except OSError as err:  # the checkpoints are written before the log: they are intact
        raise write_error(path, err) from None


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
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def summary_line(cfg: Config, final: dict[str, Any]) -> str:
    """The one-line result of a run, as ``snca train`` prints it."""
    k, sigma = final["knn_k"], final["knn_sigma"]
    if "classifier_top1" in final:
        return (f"classifier top-1 {_pct(final.get('classifier_top1'))}; weighted kNN (k={k}, sigma={sigma:g}), "
                f"embedding: top-1 {_pct(final.get('knn_top1'))}, penultimate: top-1 {_pct(final.get('knn_penultimate_top1'))}")
    line = f"weighted kNN (k={k}, sigma={sigma:g}), memory gallery: top-1 {_pct(final.get('knn_top1'))}, top-5 {_pct(final.get('knn_top5'))}"
    if "knn_recomputed_top1" in final:
        line += f"; recomputed gallery: top-1 {_pct(final['knn_recomputed_top1'])}"
    return line


# ---------------------------------------------------------------------- the run
def fit(config: Config | None = None, *, recipe: str | None = None, overrides: Mapping[str, Any] | None = None,
        run_dir: str | Path | None = None, resume: str | Path | None = None, write: bool = True,
        log: Log = print) -> Run:
    """Train as ``snca train`` does and return the :class:`Run` (``run.final`` is None when
    interrupted). Give a ``config``, or a ``recipe`` and ``overrides`` (resolved with
    :func:`resolve_config`, ``resume`` a checkpoint, run directory or "auto"). ``write=False``
    trains in memory only (no run directory, no checkpoints), as the experiments do."""
    if config is None:
        config, resume_path = resolve_config(recipe, overrides, resume, run_dir)
    else:
        resume_path = find_resume(resume, run_dir, config.run.out_dir, config.run_name) if resume else None
    joined_here = not sd.is_distributed()  # a caller's own process group is left to the caller
    info = sd.init_from_env(backend="gloo" if config.run.device == "cpu" else None)
    try:
        return _fit(config, info, run_dir, resume_path, bool(resume), write, log)
    finally:
        if joined_here:
            sd.cleanup()


def _fit(cfg: Config, info: sd.DistInfo, run_dir: str | Path | None, resume_path: Path | None, resume_requested: bool,
         write: bool, log: Log) -> Run:
    main = sd.is_main()
    device = info.device if info.world_size > 1 else resolve_device(cfg.run.device)
    if not main:
        log = _silent  # rank 0 speaks for the job
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    set_deterministic(cfg.run.deterministic)
    if cfg.run.amp == "fp16" and device.type == "cpu":
        log("note: fp16 autocast on CPU is slow and rarely useful; bf16 is the CPU choice")
    # Every rank decides on the same files; rank 0's choice of name is the one used. Every rank
    # writes there (its memory shard), so every rank checks it can, before any work.
    run_path = Path(sd.broadcast_object(str(_run_path(cfg, run_dir, resume_path)))) if write else None
    if run_path is not None:
        check_writable(run_path, "run directory", is_dir=True)
    state = load_checkpoint(resume_path, (info.rank, info.world_size)) if resume_path is not None else None
    if resume_requested and resume_path is None:
        log(f"no checkpoint to resume from for run {cfg.run_name!r}; starting a new run")

    seed_everything(cfg.run.seed + info.rank)  # other augmentations on every rank; DDP copies rank 0's weights
    data = run_datasets(cfg, ("train", "test", "gallery"))
    model = build_model(cfg.model.arch, low_dim=cfg.model.low_dim, in_chans=data.in_chans, weights=cfg.model.weights)
    trainer = Trainer(cfg, model, data["train"], device=device, num_classes=len(data.class_names))
    if state is not None:
        trainer.load_state_dict(state, resume_path)
        del state
    writer = _Outputs(run_path, cfg, trainer.metrics, log) if write and main else None

    evaluated = "held-out validation" if cfg.data.holdout else "test"
    what = (f"{cfg.objective.loss} on {cfg.data.dataset} ({len(data['train'])} train / {len(data['test'])} {evaluated} images), "
            f"{cfg.model.arch}, device {device}")
    if info.world_size > 1:
        what += f" x {info.world_size} ranks ({info.backend}, {cfg.optim.batch_size // info.world_size} images per rank per step)"
    if data.class_split:
        what += f"; base classes only ({len(data.class_names)} of {data.num_dataset_classes}, novel: {', '.join(data.class_split['names']['novel'])})"
    log(f"{'resuming' if resume_path else 'training'} {what}" + (f"; run dir {run_path}" if run_path else "")
        + (f" (from {resume_path}, epoch {trainer.epoch})" if resume_path else ""))
    last = run_path / "last.pt" if run_path else None
    wall_start = time.perf_counter()
    try:
        while trainer.epoch < cfg.optim.epochs:
            record = _epoch(trainer, cfg, data, main)
            is_best = trainer.end_epoch(record)
            if write:
                save_run_checkpoint(last, {**trainer.state_dict(), "facts": data.facts()}, getattr(trainer.objective, "memory", None))
            if writer is not None:
                writer.epoch_done(record, is_best)
            val = f"  val top-1 {_pct(record['val_top1'])} ({record['val_metric']})" if "val_top1" in record else ""
            log(f"epoch {record['epoch']}/{cfg.optim.epochs}  loss {record['train_loss']:.4f}{val}  lr {record['lr']:.4g}  "
                f"{record['images_per_s']:.0f} img/s  {record['train_time_s']:.1f} s")
    except NonFiniteLossError as err:
        kept = f"the last good checkpoint is {last} (epoch {trainer.epoch})" if last and last.exists() else "no checkpoint was written"
        raise SncaError(f"{err}; {kept}") from None
    except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM under sigterm_as_interrupt (the CLI)
        stopped_by = "SIGTERM" if isinstance(err, Terminated) else "interrupt"
        # Several ranks stop at different steps: no consistent mid-epoch state to save.
        saved = ""
        if write and trainer.step_in_epoch > 0 and info.world_size == 1:
            save_checkpoint(run_path / "interrupted.pt", {**trainer.state_dict(mid_epoch=True), "facts": data.facts()})
            saved = f"; the state at the interrupt is in {run_path / 'interrupted.pt'} (for eval, not resume)"
        if main:
            held = (f"{last} holds epoch {trainer.epoch}; resume with: snca train --resume {last}"
                    if last and last.exists() and trainer.epoch > 0 else "no epoch completed yet, nothing to resume")
            what = "terminated (SIGTERM)" if stopped_by == "SIGTERM" else "interrupted"
            print(f"snca: {what} in epoch {trainer.epoch + 1} (step {trainer.step_in_epoch}/{trainer.steps_per_epoch}); "
                  f"{held}{saved}", file=sys.stderr)
        if writer is not None:
            writer.close()
        return Run(cfg, run_path, trainer, data, None, trainer.metrics, stopped_by)

    final = trainer.final_evaluation(data["test"], data["gallery"])  # every rank: each embeds its share
    final["wall_time_s"] = time.perf_counter() - wall_start
    final["epochs"] = trainer.epoch
    if writer is not None:
        writer.finish(final, trainer.metrics)
        log(summary_line(cfg, final))
        log(f"done in {final['wall_time_s']:.0f} s; checkpoints {last} (last) and {run_path / 'best.pt'} (best monitor); "
            f"metrics {run_path / 'metrics.jsonl'}")
    return Run(cfg, run_path, trainer, data, final, trainer.metrics)


def _silent(*_args: Any, **_kwargs: Any) -> None:
    pass


def _run_path(cfg: Config, run_dir: str | Path | None, resume_path: Path | None) -> Path:
    if resume_path is not None:
        return Path(run_dir) if run_dir is not None else resume_path.parent
    if run_dir is not None:
        if (Path(run_dir) / "last.pt").exists():
            raise SncaError(f"run dir {run_dir} already holds a run (last.pt); continue it with --resume auto, or pick another --run-dir")
        return Path(run_dir)
    return choose_run_dir(cfg.run.out_dir, cfg.run_name)


def _epoch(trainer: Trainer, cfg: Config, data: RunData, main: bool) -> dict[str, Any]:
    """Train one epoch with a progress bar, then the monitor when it is due."""
    e = trainer.epoch + 1
    disable = {"on": False, "off": True, "auto": None}[cfg.run.progress] if main else True
    with tqdm(total=trainer.steps_per_epoch, desc=f"epoch {e}/{cfg.optim.epochs}", disable=disable, leave=False,
              dynamic_ncols=True, mininterval=0.5, file=sys.stderr) as bar:

        def on_step(step: int, steps: int, loss: float, ips: float) -> None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{ips:.0f}", refresh=False)

        record = trainer.train_epoch(on_step)
    if cfg.eval.val_every and (e % cfg.eval.val_every == 0 or e == cfg.optim.epochs):
        record.update(trainer.validate(data["test"]))
    return record


class _Outputs:
    """Rank 0's files in the run directory besides the checkpoints: config, metrics, TensorBoard, plot."""

    def __init__(self, run_path: Path, cfg: Config, metrics: list[dict[str, Any]], log: Log) -> None:
        self.path, self.cfg = run_path, cfg
        run_path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_path / "config.yaml", dump_yaml(cfg))
        self.metrics_path = run_path / "metrics.jsonl"
        # A resumed run restarts its log at the checkpoint.
        self.metrics_path.write_text("".join(json.dumps(_jsonable({"kind": "epoch", **r})) + "\n" for r in metrics))
        self.tb = None
        if cfg.run.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_path / "tensorboard"))
            except ImportError:
                log("note: --tensorboard needs the tensorboard package (pip install tensorboard); logging to metrics.jsonl only")

    def epoch_done(self, record: dict[str, Any], is_best: bool) -> None:
        last, best = self.path / "last.pt", self.path / "best.pt"
        (self.path / "interrupted.pt").unlink(missing_ok=True)  # superseded by a completed epoch
        if is_best or not best.exists():
            link_checkpoint(last, best)
        _append(self.metrics_path, record)
        if self.tb is not None:
            for key in ("train_loss", "val_top1", "lr", "images_per_s", "memory_momentum"):
                if record.get(key) is not None:
                    self.tb.add_scalar(key, record[key], record["epoch"])

    def finish(self, final: dict[str, Any], metrics: list[dict[str, Any]]) -> None:
        _append(self.metrics_path, final, kind="final")
        atomic_write_text(self.path / "final.json", json.dumps(_jsonable(final), indent=2) + "\n")
        if self.tb is not None:
            for key, value in final.items():
                if key.endswith(("_top1", "_top5")) and value is not None:
                    self.tb.add_scalar(f"final/{key}", value, final["epochs"])
        self.close()
        if self.cfg.run.plot and metrics:
            cfg = self.cfg
            plot_curves(self.path / "curves.png", metrics, final,
                        f"{cfg.run_name}: {cfg.objective.loss}, {cfg.model.arch}, {cfg.data.dataset}")

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
