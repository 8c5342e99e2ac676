"""The training config: nested dataclasses, merged and type-checked by OmegaConf.

A config is built once, in one order: the dataclass defaults (the Fashion-MNIST recipe), then
a recipe file (``snca/configs/<name>.yaml`` or any YAML path), then overrides (``--set
key=value`` and the flags derived from the fields). OmegaConf checks every key and type; then
:func:`validate` checks the values. Keys are dotted (``optim.lr``); a leaf name that occurs in
one group only may be given bare (``lr``), which is what the CLI flags use.

The config holds what the user chose, nothing derived: facts that follow from the data (channel
count, class names, the resolved class split) are recorded beside it in checkpoints (see
:mod:`snca.checkpoint`), so a saved config reloads into the same :class:`Config`.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .errors import SncaError

LOSSES = ("nca", "softmax")
AMP_MODES = ("none", "bf16", "fp16")
LR_SCHEDULES = ("step", "cosine", "constant")
MEMORY_DTYPES = ("float32", "float16", "bfloat16")
LABEL_SETS = ("fine", "coarse")
PROGRESS = ("auto", "on", "off")


def _f(default: Any = None, help: str = "", factory: Any = None) -> Any:  # noqa: A002 - help text
    """A config field with its help text (the CLI derives its flags from these)."""
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class DataConfig:
    dataset: str = _f("fashion-mnist", "fashion-mnist | mnist | mnist5k | cifar10 | cifar100 | folder")
    data_dir: str | None = _f(None, "dataset root (folder: DIR/train/<class>/, DIR/val/<class>/)")
    label_set: str = _f("fine", "fine | coarse (train on coarse labels: sub-category discovery)")
    subset: int | None = _f(None, "train on a class-stratified subset of N images")
    test_subset: int | None = _f(None, "evaluate on a class-stratified subset of N test images")
    holdout: int | None = _f(None, "validation: hold N training images out (class-stratified, the same for every seed) and "
                                   "evaluate on them instead of the test set; tune with it, never on the test set")
    image_size: int | None = _f(None, "input size (default: the dataset's)")
    novel_classes: list[str] | None = _f(None, "few-shot: hold these classes (names or ids) out of training")
    split_file: str | None = _f(None, "few-shot: train on the [base] classes of this class-split file only")
    coarse_map: str | None = _f(None, "folder datasets, coarse labels: file of 'fine_class coarse_class' lines (default DIR/coarse.txt)")
    workers: int = _f(0, "data-loader worker processes")
    download: bool = _f(False, "fashion-mnist, mnist: download into data_dir when the files are not there")


@dataclass
class ModelConfig:
    arch: str = _f("small_cnn", "small_cnn | cifar_resnet18 | resnet18 | resnet34 | resnet50 | timm:<name>")
    low_dim: int = _f(128, "embedding dimension D")
    weights: str | None = _f(None, "pretrained backbone weights (see snca.models.build_model)")
    sync_bn: bool = _f(False, "several ranks: batch-norm statistics over every rank's batch, not each rank's own")


@dataclass
class ObjectiveConfig:
    loss: str = _f("nca", "nca (memory) | softmax (linear classifier baseline)")
    temperature: float = _f(0.05, "NCA temperature T; also the kNN sigma unless knn_sigma is set")
    margin: float = _f(0.0, "NCA margin in cosine units")
    memory_momentum_schedule: dict[int, float] = _f(help="memory momentum from each epoch on, e.g. {0: 0.5, 80: 0.8}",
                                                    factory=lambda: {0: 0.5})
    memory_dtype: str = _f("float32", "float32 | float16 | bfloat16 slot storage")


@dataclass
class OptimConfig:
    epochs: int = _f(10, "number of epochs")
    batch_size: int = _f(128, "images per optimizer step (over all ranks)")
    iter_size: int = _f(1, "batches accumulated per optimizer step (effective batch = batch-size x iter-size)")
    lr: float = _f(0.1, "base learning rate")
    momentum: float = _f(0.9, "SGD momentum")
    nesterov: bool = _f(True, "Nesterov momentum")
    weight_decay: float = _f(5e-4, "SGD weight decay")
    lr_schedule: str = _f("cosine", "step | cosine | constant")
    lr_step_size: int = _f(40, "step: multiply by lr_gamma every lr_step_size epochs")
    lr_gamma: float = _f(0.1, "step: the factor")
    min_lr: float = _f(0.0, "cosine: the final learning rate")
    warmup_epochs: float = _f(0.0, "linear warm-up from ~0 over this many (fractional) epochs")


@dataclass
class EvalConfig:
    embed_batch_size: int = _f(512, "images per forward pass when embedding (evaluation, extraction)")
    val_every: int = _f(1, "per-epoch monitor every n epochs (0: never)")
    knn_k: int = _f(30, "neighbours of the final weighted kNN")
    knn_sigma: float | None = _f(None, "vote temperature (default: the training temperature)")
    recompute_gallery: bool = _f(True, "final kNN also against training images re-embedded under test transforms")


@dataclass
class RunConfig:
    recipe: str = _f("fashion-mnist", "the recipe this config started from")
    amp: str = _f("none", "mixed precision: none | bf16 | fp16")
    channels_last: bool = _f(False, "channels-last memory format (faster convolutions on GPUs)")
    seed: int = _f(0, "random seed")
    deterministic: bool = _f(False, "deterministic kernels: a resumed run repeats an uninterrupted one bit for bit")
    device: str = _f("auto", "auto | cpu | cuda | cuda:N | mps")
    threads: int | None = _f(None, "torch CPU threads (default: torch's)")
    out_dir: str = _f("runs", "parent of run directories")
    name: str | None = _f(None, "run name (default <dataset>-<arch>-<loss>)")
    tensorboard: bool = _f(False, "also log to TensorBoard")
    progress: str = _f("auto", "progress bar: auto (on a terminal) | on | off")
    plot: bool = _f(True, "draw curves.png")


@dataclass
class Config:
    """Everything a training run depends on. The defaults are the Fashion-MNIST recipe."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    run: RunConfig = field(default_factory=RunConfig)

    @property
    def sigma(self) -> float:
        """The kNN vote temperature: ``eval.knn_sigma``, else the training temperature."""
        return float(self.eval.knn_sigma if self.eval.knn_sigma is not None else self.objective.temperature)

    @property
    def run_name(self) -> str:
        return self.run.name or f"{self.data.dataset}-{self.model.arch.replace(':', '_').replace('/', '_')}-{self.objective.loss}"


GROUPS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(Config)}  # type: ignore[misc]
# Every leaf as "group.key" -> its dataclass field.
LEAVES: dict[str, dataclasses.Field] = {
    f"{group}.{f.name}": f for group, cls in GROUPS.items() for f in dataclasses.fields(cls)
}
_BARE: dict[str, list[str]] = {}
for _key in LEAVES:
    _BARE.setdefault(_key.split(".", 1)[1], []).append(_key)
# Leaf names that are unique across groups: usable without the group (and as CLI flags).
UNIQUE_LEAVES: dict[str, str] = {bare: keys[0] for bare, keys in _BARE.items() if len(keys) == 1}


def full_key(key: str) -> str:
    """``"lr"`` -> ``"optim.lr"``; dotted keys are checked. SncaError for unknown keys."""
    key = str(key).strip().replace("-", "_")
    if key in LEAVES:
        return key
    if key in UNIQUE_LEAVES:
        return UNIQUE_LEAVES[key]
    if key in _BARE:
        raise SncaError(f"config key {key!r} is ambiguous; use one of {', '.join(_BARE[key])}")
    close = difflib.get_close_matches(key, list(LEAVES) + list(UNIQUE_LEAVES), n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    raise SncaError(f"unknown config key {key!r}{hint}; see `snca train --list-keys`")


def recipe_names() -> list[str]:
    """Names of the recipes shipped in ``snca/configs``."""
    root = resources.files("snca") / "configs"
    return sorted(p.name[: -len(".yaml")] for p in root.iterdir() if p.name.endswith(".yaml"))


def _recipe_text(name_or_path: str) -> tuple[str, str]:
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
    return name_or_path, (resources.files("snca") / "configs" / f"{name_or_path}.yaml").read_text()


def _nest(values: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Flat or nested mapping -> {group: {key: value}}, every key resolved by :func:`full_key`."""
    out: dict[str, dict[str, Any]] = {}
    for key, value in values.items():
        if key in GROUPS and isinstance(value, Mapping):
            for sub, v in value.items():
                group, leaf = _split(f"{key}.{sub}", source)
                out.setdefault(group, {})[leaf] = v
            continue
        group, leaf = _split(str(key), source)
        out.setdefault(group, {})[leaf] = value
    return out


def _split(key: str, source: str) -> tuple[str, str]:
    try:
        group, leaf = full_key(key).split(".", 1)
    except SncaError as err:
        raise SncaError(f"{source}: {err}") from None
    return group, leaf


def _merge(layers: Iterable[tuple[dict[str, Any], str]]) -> Config:
    conf = OmegaConf.structured(Config)
    for values, source in layers:
        for group, leaves in values.items():
            for leaf, value in leaves.items():
                try:  # merge=False: a given value replaces the default (a schedule is not merged)
                    OmegaConf.update(conf, f"{group}.{leaf}", value, merge=False)
                except OmegaConfBaseException as err:
                    first = str(err).strip().splitlines()[0]
                    raise SncaError(f"{source}: config key '{group}.{leaf}': {first}") from None
    return validate(OmegaConf.to_object(conf))  # type: ignore[arg-type]


def load_config(recipe: str | None = "fashion-mnist", overrides: Mapping[str, Any] | None = None,
                base: Config | Mapping[str, Any] | None = None) -> Config:
    """Defaults, then ``base`` (a saved config: used instead of a recipe when resuming) or the
    ``recipe`` file, then ``overrides`` ({key: value}, keys bare or dotted); validated once."""
    layers: list[tuple[dict[str, Any], str]] = []
    if base is not None:
        layers.append((_nest(config_to_dict(base) if isinstance(base, Config) else base, "saved config"), "saved config"))
    elif recipe is not None:
        name, text = _recipe_text(recipe)
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            raise SncaError(f"config {recipe} is not valid YAML: {str(err).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise SncaError(f"config {recipe} must be a mapping of key: value")
        nested = _nest(data, f"config {recipe}")
        nested.setdefault("run", {}).setdefault("recipe", name)
        layers.append((nested, f"config {recipe}"))
    if overrides:
        layers.append((_nest(overrides, "override"), "override"))
    return _merge(layers)


def parse_set(items: Iterable[str] | None) -> dict[str, Any]:
    """``["key=value", ...]`` (the ``--set`` flag) -> {dotted key: value}; values parse as YAML
    (types are checked when the config is merged)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise SncaError(f"--set expects key=value, got {item!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        out[full_key(key)] = value
    return out


def validate(cfg: Config) -> Config:
    """Checks values (OmegaConf has checked keys and types); returns ``cfg``."""

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise SncaError(message)

    d, m, o, p, e, r = cfg.data, cfg.model, cfg.objective, cfg.optim, cfg.eval, cfg.run
    need(o.loss in LOSSES, f"loss must be one of {', '.join(LOSSES)}, got {o.loss!r}")
    need(r.amp in AMP_MODES, f"amp must be one of {', '.join(AMP_MODES)}, got {r.amp!r}")
    need(p.lr_schedule in LR_SCHEDULES, f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {p.lr_schedule!r}")
    need(o.memory_dtype in MEMORY_DTYPES, f"memory_dtype must be one of {', '.join(MEMORY_DTYPES)}")
    need(d.label_set in LABEL_SETS, f"label_set must be one of {', '.join(LABEL_SETS)}, got {d.label_set!r}")
    need(r.progress in PROGRESS, f"progress must be one of {', '.join(PROGRESS)}, got {r.progress!r}")
    need(p.epochs >= 1, f"epochs must be >= 1, got {p.epochs}")
    need(p.batch_size >= 1, f"batch_size must be >= 1, got {p.batch_size}")
    need(e.embed_batch_size >= 1, f"embed_batch_size must be >= 1, got {e.embed_batch_size}")
    need(p.iter_size >= 1, f"iter_size must be >= 1, got {p.iter_size}")
    need(m.low_dim >= 1, f"low_dim must be >= 1, got {m.low_dim}")
    need(p.lr > 0 and p.lr != float("inf"), f"lr must be a finite number > 0, got {p.lr}")
    need(p.min_lr >= 0, f"min_lr must be >= 0, got {p.min_lr}")
    need(p.weight_decay >= 0, f"weight_decay must be >= 0, got {p.weight_decay}")
    need(0 <= p.momentum < 1, f"momentum must be in [0, 1), got {p.momentum}")
    need(p.lr_step_size >= 1, f"lr_step_size must be >= 1, got {p.lr_step_size}")
    need(p.lr_gamma > 0, f"lr_gamma must be > 0, got {p.lr_gamma}")
    need(p.warmup_epochs >= 0, f"warmup_epochs must be >= 0, got {p.warmup_epochs}")
    need(o.temperature > 0, f"temperature must be > 0, got {o.temperature}")
    need(o.margin >= 0, f"margin must be >= 0, got {o.margin}")
    need(e.knn_k >= 1, f"knn_k must be >= 1, got {e.knn_k}")
    need(e.knn_sigma is None or e.knn_sigma > 0, f"knn_sigma must be > 0, got {e.knn_sigma}")
    need(d.workers >= 0, f"workers must be >= 0, got {d.workers}")
    need(e.val_every >= 0, f"val_every must be >= 0, got {e.val_every}")
    need(r.threads is None or r.threads >= 1, f"threads must be >= 1, got {r.threads}")
    need(d.subset is None or d.subset >= 2, f"subset must be >= 2, got {d.subset}")
    need(d.test_subset is None or d.test_subset >= 1, f"test_subset must be >= 1, got {d.test_subset}")
    need(d.holdout is None or d.holdout >= 1, f"holdout must be >= 1, got {d.holdout}")
    need(d.holdout is None or d.test_subset is None, "holdout replaces the test set: drop test_subset")
    need(d.image_size is None or d.image_size >= 1, f"image_size must be >= 1, got {d.image_size}")
    need(p.nesterov is False or p.momentum > 0, "nesterov needs momentum > 0; pass --set nesterov=false")
    need(not (d.novel_classes and d.split_file), "give either novel_classes or split_file, not both")
    need(d.novel_classes is None or len(d.novel_classes) > 0, "novel_classes needs at least one class")
    need(d.label_set == "fine" or not (d.novel_classes or d.split_file),
         "few-shot class splits (novel_classes / split_file) need label_set fine")
    schedule = o.memory_momentum_schedule
    need(bool(schedule), "memory_momentum_schedule must have at least one entry, e.g. {0: 0.5}")
    need(min(schedule) == 0, "memory_momentum_schedule must start at epoch 0, e.g. {0: 0.5, 80: 0.8}")
    for epoch, mu in schedule.items():
        need(epoch >= 0 and 0 <= mu < 1, f"memory_momentum_schedule entry {epoch}: {mu} needs epoch >= 0 and 0 <= momentum < 1")
    return cfg


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Nested plain builtins (YAML- and ``torch.load(weights_only=True)``-safe)."""
    values = dataclasses.asdict(cfg)
    schedule = cfg.objective.memory_momentum_schedule
    values["objective"]["memory_momentum_schedule"] = {int(k): float(v) for k, v in sorted(schedule.items())}
    return values


def config_from_dict(values: Mapping[str, Any]) -> Config:
    """Inverse of :func:`config_to_dict` (flat dicts of the version-1 checkpoints are read too:
    their derived entries are dropped); unknown keys are refused."""
    derived = {"in_chans", "class_split", "class_split_ids"}
    return load_config(recipe=None, base={k: v for k, v in values.items() if k not in derived})


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def momentum_at(schedule: Mapping[int, float], epoch: int) -> float:
    """Memory momentum in force at (0-based) ``epoch``: the entry with the largest start <= epoch."""
    start = max((e for e in schedule if e <= epoch), default=min(schedule))
    return float(schedule[start])


def list_keys() -> str:
    """Every config key with its default and help, one per line (``snca train --list-keys``)."""
    lines = []
    defaults = config_to_dict(Config())
    for key, f in LEAVES.items():
        group, leaf = key.split(".", 1)
        lines.append(f"{key:34s} {defaults[group][leaf]!r:18s} {f.metadata.get('help', '')}")
    return "\n".join(lines)
