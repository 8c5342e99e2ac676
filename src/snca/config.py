"""Training recipes: a typed config, YAML recipe files, and type-checked overrides.

A recipe is a YAML file whose keys are fields of :class:`TrainConfig`; the shipped ones live
in ``snca/configs/`` (``fashion-mnist`` is the default). Every key can be overridden, from the
command line with ``--set key=value`` (values are parsed as YAML, then checked against the
field's type) or from Python with :func:`apply_overrides`. Unknown keys and values of the
wrong type are one-line :class:`~snca.errors.SncaError` s. The resolved config is a plain dict
of builtins (:func:`config_to_dict`), saved as ``config.yaml`` in the run directory and inside
every checkpoint.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from .errors import SncaError

LOSSES = ("nca", "softmax")
AMP_MODES = ("none", "bf16", "fp16")
LR_SCHEDULES = ("step", "cosine", "constant")
MEMORY_DTYPES = ("float32", "float16", "bfloat16")
LABEL_SETS = ("fine", "coarse")
PROGRESS = ("auto", "on", "off")


@dataclass
class TrainConfig:
    """Everything a training run depends on. Defaults are the Fashion-MNIST recipe's."""

    recipe: str = "fashion-mnist"
    # data
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    label_set: str = "fine"
    subset: int | None = None  # use a class-stratified random subset of the training set
    test_subset: int | None = None  # same for the test set (faster monitoring)
    image_size: int | None = None  # None: the dataset's default
    # few-shot: train on the base classes only (see snca.protocols.fewshot)
    novel_classes: list[str] | None = None  # classes (names or ids) held out of training
    split_file: str | None = None  # or a [base] / [val] / [novel] class-split file
    class_split: dict[str, list[str]] | None = None  # recorded by training: base / val / novel class names
    class_split_ids: dict[str, list[int]] | None = None  # the same as dataset class ids
    in_chans: int | None = None  # None: the dataset's channel count
    # model
    arch: str = "small_cnn"
    low_dim: int = 128
    weights: str | None = None  # pretrained backbone weights (see snca.models.build_model)
    # objective
    loss: str = "nca"
    temperature: float = 0.05
    margin: float = 0.0
    memory_momentum_schedule: dict[int, float] = field(default_factory=lambda: {0: 0.5})
    memory_dtype: str = "float32"
    # optimisation
    epochs: int = 10
    batch_size: int = 128
    iter_size: int = 1  # gradient accumulation: one optimizer step per iter_size batches
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    lr_schedule: str = "cosine"
    lr_step_size: int = 40  # "step": multiply by lr_gamma every lr_step_size epochs
    lr_gamma: float = 0.1
    min_lr: float = 0.0  # "cosine": final learning rate
    warmup_epochs: float = 0.0  # linear warm-up from ~0 (fractional epochs allowed)
    # execution
    amp: str = "none"
    channels_last: bool = False
    seed: int = 0
    deterministic: bool = False
    workers: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    threads: int | None = None  # torch intra-op threads; None leaves torch's default
    # evaluation
    eval_batch_size: int = 512
    val_every: int = 1  # per-epoch 1-NN monitor every n epochs (0: never)
    knn_k: int = 30
    knn_sigma: float | None = None  # None: the temperature
    recompute_gallery: bool = True  # final kNN also against train features under test transforms
    # output
    out_dir: str = "runs"
    name: str | None = None  # run name; default <dataset>-<arch>-<loss>
    tensorboard: bool = False
    progress: str = "auto"  # progress bar: auto (only on a terminal) | on | off
    plot: bool = True

    @property
    def sigma(self) -> float:
        return float(self.knn_sigma if self.knn_sigma is not None else self.temperature)

    @property
    def run_name(self) -> str:
        return self.name or f"{self.dataset}-{self.arch.replace(':', '_').replace('/', '_')}-{self.loss}"


FIELDS: dict[str, dataclasses.Field] = {f.name: f for f in dataclasses.fields(TrainConfig)}
_HINTS = typing.get_type_hints(TrainConfig)


def recipe_names() -> list[str]:
    """Names of the recipes shipped in ``snca/configs``."""
    root = resources.files("snca") / "configs"
    return sorted(p.name[: -len(".yaml")] for p in root.iterdir() if p.name.endswith(".yaml"))


def _recipe_text(name_or_path: str) -> tuple[str, str]:
    """(recipe name, YAML text) of a shipped recipe name or a path to a YAML file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise SncaError(f"config file {name_or_path} does not exist; pass a recipe name ({', '.join(recipe_names())}) or a YAML path")
        return path.stem, path.read_text()
    names = recipe_names()
    if name_or_path not in names:
        close = difflib.get_close_matches(name_or_path, names, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise SncaError(f"unknown recipe {name_or_path!r}{hint}; choose one of {', '.join(names)} or pass a YAML file")
    text = (resources.files("snca") / "configs" / f"{name_or_path}.yaml").read_text()
    return name_or_path, text


def load_recipe(name_or_path: str = "fashion-mnist") -> TrainConfig:
    """The config of a shipped recipe (by name) or of a YAML file (by path)."""
    name, text = _recipe_text(name_or_path)
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise SncaError(f"config {name_or_path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise SncaError(f"config {name_or_path} must be a mapping of key: value")
    data.setdefault("recipe", name)
    return apply_overrides(TrainConfig(), data, source=f"config {name_or_path}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce(key: str, value: Any, tp: Any = None) -> Any:
    """``value`` converted to the type of config field ``key``; SncaError when it does not fit."""
    if key not in FIELDS:
        close = difflib.get_close_matches(key, FIELDS, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise SncaError(f"unknown config key {key!r}{hint}; see `snca train --list-keys`")
    tp = _HINTS[key] if tp is None else tp

    def fail() -> SncaError:
        return SncaError(f"config key {key!r} expects {_type_name(tp)}, got {value!r}")

    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "~")):
            if type(None) in args:
                return None
            raise fail()
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(key, value, arg)
            except SncaError:
                continue
        raise fail()
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            return value.lower() in ("true", "yes", "on", "1")
        raise fail()
    if tp is int:
        if isinstance(value, bool):
            raise fail()
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                raise fail() from None
        raise fail()
    if tp is float:
        if isinstance(value, bool):
            raise fail()
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string
            try:
                return float(value)
            except ValueError:
                raise fail() from None
        raise fail()
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise fail()
    if origin is dict:
        ktp, vtp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise fail()
        return {coerce(key, k, ktp): coerce(key, v, vtp) for k, v in value.items()}
    if origin is list:
        (etp,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise fail()
        return [coerce(key, v, etp) for v in value]
    raise fail()


def parse_set(items: list[str] | None) -> dict[str, Any]:
    """``["key=value", ...]`` (the ``--set`` flag) -> {key: typed value}; values parse as YAML."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise SncaError(f"--set expects key=value, got {item!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        out[key] = coerce(key, value)
    return out


def apply_overrides(cfg: TrainConfig, overrides: dict[str, Any], source: str = "override") -> TrainConfig:
    """A copy of ``cfg`` with ``overrides`` applied (keys and types checked)."""
    values = dataclasses.asdict(cfg)
    for key, value in overrides.items():
        key = str(key).replace("-", "_")
        try:
            values[key] = coerce(key, value)
        except SncaError as err:
            raise SncaError(f"{source}: {err}") from None
    return validate(TrainConfig(**values))


def validate(cfg: TrainConfig) -> TrainConfig:
    """Checks values (not just types); returns ``cfg``."""

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise SncaError(message)

    need(cfg.loss in LOSSES, f"loss must be one of {', '.join(LOSSES)}, got {cfg.loss!r}")
    need(cfg.amp in AMP_MODES, f"amp must be one of {', '.join(AMP_MODES)}, got {cfg.amp!r}")
    need(cfg.lr_schedule in LR_SCHEDULES, f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {cfg.lr_schedule!r}")
    need(cfg.memory_dtype in MEMORY_DTYPES, f"memory_dtype must be one of {', '.join(MEMORY_DTYPES)}")
    need(cfg.label_set in LABEL_SETS, f"label_set must be one of {', '.join(LABEL_SETS)}, got {cfg.label_set!r}")
    need(cfg.progress in PROGRESS, f"progress must be one of {', '.join(PROGRESS)}, got {cfg.progress!r}")
    need(cfg.epochs >= 1, f"epochs must be >= 1, got {cfg.epochs}")
    need(cfg.batch_size >= 1, f"batch_size must be >= 1, got {cfg.batch_size}")
    need(cfg.eval_batch_size >= 1, f"eval_batch_size must be >= 1, got {cfg.eval_batch_size}")
    need(cfg.iter_size >= 1, f"iter_size must be >= 1, got {cfg.iter_size}")
    need(cfg.low_dim >= 1, f"low_dim must be >= 1, got {cfg.low_dim}")
    need(cfg.lr > 0, f"lr must be > 0, got {cfg.lr}")
    need(cfg.min_lr >= 0, f"min_lr must be >= 0, got {cfg.min_lr}")
    need(cfg.weight_decay >= 0, f"weight_decay must be >= 0, got {cfg.weight_decay}")
    need(0 <= cfg.momentum < 1, f"momentum must be in [0, 1), got {cfg.momentum}")
    need(cfg.lr_step_size >= 1, f"lr_step_size must be >= 1, got {cfg.lr_step_size}")
    need(cfg.lr_gamma > 0, f"lr_gamma must be > 0, got {cfg.lr_gamma}")
    need(cfg.warmup_epochs >= 0, f"warmup_epochs must be >= 0, got {cfg.warmup_epochs}")
    need(cfg.temperature > 0, f"temperature must be > 0, got {cfg.temperature}")
    need(cfg.margin >= 0, f"margin must be >= 0, got {cfg.margin}")
    need(cfg.knn_k >= 1, f"knn_k must be >= 1, got {cfg.knn_k}")
    need(cfg.knn_sigma is None or cfg.knn_sigma > 0, f"knn_sigma must be > 0, got {cfg.knn_sigma}")
    need(cfg.workers >= 0, f"workers must be >= 0, got {cfg.workers}")
    need(cfg.val_every >= 0, f"val_every must be >= 0, got {cfg.val_every}")
    need(cfg.threads is None or cfg.threads >= 1, f"threads must be >= 1, got {cfg.threads}")
    need(cfg.subset is None or cfg.subset >= 2, f"subset must be >= 2, got {cfg.subset}")
    need(cfg.test_subset is None or cfg.test_subset >= 1, f"test_subset must be >= 1, got {cfg.test_subset}")
    need(cfg.nesterov is False or cfg.momentum > 0, "nesterov needs momentum > 0; pass --set nesterov=false")
    need(not (cfg.novel_classes and cfg.split_file), "give either novel_classes or split_file, not both")
    need(cfg.novel_classes is None or len(cfg.novel_classes) > 0, "novel_classes needs at least one class")
    need(cfg.label_set == "fine" or not (cfg.novel_classes or cfg.split_file or cfg.class_split_ids),
         "few-shot class splits (novel_classes / split_file) need label_set fine")
    schedule = cfg.memory_momentum_schedule
    need(bool(schedule), "memory_momentum_schedule must have at least one entry, e.g. {0: 0.5}")
    need(min(schedule) == 0, "memory_momentum_schedule must start at epoch 0, e.g. {0: 0.5, 80: 0.8}")
    for epoch, mu in schedule.items():
        need(epoch >= 0 and 0 <= mu < 1, f"memory_momentum_schedule entry {epoch}: {mu} needs epoch >= 0 and 0 <= momentum < 1")
    return cfg


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """Plain builtins (YAML- and ``torch.load(weights_only=True)``-safe)."""
    values = dataclasses.asdict(cfg)
    values["memory_momentum_schedule"] = {int(k): float(v) for k, v in sorted(cfg.memory_momentum_schedule.items())}
    return values


def config_from_dict(values: dict[str, Any]) -> TrainConfig:
    """Inverse of :func:`config_to_dict`; keys unknown to this version are refused."""
    return apply_overrides(TrainConfig(), values, source="saved config")


def dump_yaml(cfg: TrainConfig) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def momentum_at(schedule: dict[int, float], epoch: int) -> float:
    """Memory momentum in force at (0-based) ``epoch``: the entry with the largest start <= epoch."""
    start = max((e for e in schedule if e <= epoch), default=min(schedule))
    return float(schedule[start])
