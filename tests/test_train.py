"""Training pipeline: recipes/config, schedules, gradient accumulation, end-to-end runs on real
Fashion-MNIST / MNIST data, checkpoints and exact resume, NaN handling, softmax baseline."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from snca.checkpoint import load_checkpoint, load_run, save_checkpoint
from snca.config import (
    Config,
    config_from_dict,
    config_to_dict,
    load_config,
    momentum_at,
    parse_set,
    recipe_names,
)
from snca.data import run_datasets
from snca.errors import SncaError
from snca.features import extract
from snca.knn import knn_classify, topk_accuracy
from snca.train import Trainer, fit, lr_at


def train(cfg, run_dir=None, resume_path=None, log=print, **_unused):
    """The final metrics of a run (None when interrupted), as the tests below read them."""
    return fit(cfg, run_dir=run_dir, resume=resume_path, log=log).final

torch.set_num_threads(1)  # the test machine is shared: one thread avoids oversubscription

TINY = dict(
    dataset="fashion-mnist", subset=1000, test_subset=400, arch="small_cnn", epochs=3, batch_size=32,
    lr=0.05, lr_schedule="cosine", progress="off", plot=True, embed_batch_size=512, knn_k=30,
)


def tiny_config(**changes) -> Config:
    return load_config("fashion-mnist", {**TINY, **changes})


# ---------------------------------------------------------------------- config
def test_recipes_load_and_match_the_reference():
    assert {"fashion-mnist", "cifar10", "cifar100", "imagenet"} <= set(recipe_names())
    imnet = load_config("imagenet")
    assert (imnet.data.dataset, imnet.model.arch, imnet.optim.epochs, imnet.optim.batch_size) == ("folder", "resnet18", 130, 256)
    o = imnet.optim
    assert (o.lr, o.lr_schedule, o.lr_step_size, o.lr_gamma) == (0.1, "step", 40, 0.1)
    assert o.weight_decay == pytest.approx(1e-4) and o.nesterov and o.momentum == 0.9
    assert (imnet.objective.temperature, imnet.model.low_dim, imnet.data.image_size) == (0.05, 128, 224)
    schedule = imnet.objective.memory_momentum_schedule
    assert schedule == {0: 0.5, 80: 0.8, 120: 0.9}
    assert [momentum_at(schedule, e) for e in (0, 79, 80, 119, 120, 129)] == [0.5, 0.5, 0.8, 0.8, 0.9, 0.9]
    for name in ("cifar10", "cifar100"):
        c = load_config(name)
        assert (c.data.dataset, c.model.arch, c.optim.epochs, c.optim.batch_size, c.optim.lr_step_size) == (name, "cifar_resnet18", 200, 128, 50)
        assert c.optim.weight_decay == pytest.approx(5e-4)
    fm = load_config("fashion-mnist")
    assert fm == Config()  # the dataclass defaults are the default recipe
    assert (fm.model.arch, fm.objective.temperature, fm.model.low_dim) == ("small_cnn", 0.05, 128)


def test_overrides_are_type_checked():
    cfg = load_config("fashion-mnist", parse_set(["lr=0.2", "epochs=3", "weight_decay=1e-4", "data_dir=null",
                                                   "memory_momentum_schedule={0: 0.5, 2: 0.9}", "optim.nesterov=false"]))
    assert (cfg.optim.lr, cfg.optim.epochs, cfg.optim.weight_decay, cfg.data.data_dir, cfg.optim.nesterov) == (0.2, 3, 1e-4, None, False)
    assert cfg.objective.memory_momentum_schedule == {0: 0.5, 2: 0.9}  # replaced, not merged with the default
    with pytest.raises(SncaError, match="unknown config key 'lrate'"):
        parse_set(["lrate=0.1"])
    with pytest.raises(SncaError, match="optim.epochs.*could not be converted to Integer"):
        load_config("fashion-mnist", parse_set(["epochs=2.5"]))
    with pytest.raises(SncaError, match="run.deterministic.*not a valid bool"):
        load_config("fashion-mnist", parse_set(["deterministic=maybe"]))
    with pytest.raises(SncaError, match="loss must be one of"):
        load_config("fashion-mnist", {"loss": "triplet"})
    with pytest.raises(SncaError, match="start at epoch 0"):
        load_config("fashion-mnist", {"memory_momentum_schedule": {5: 0.5}})
    with pytest.raises(SncaError, match="lr must be a finite number"):
        load_config("fashion-mnist", {"lr": float("inf")})
    # the saved form round-trips
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_lr_schedules():
    step = load_config("fashion-mnist", {"lr_schedule": "step", "lr": 0.1, "lr_step_size": 40, "epochs": 130}).optim
    assert [lr_at(step, e) for e in (0, 39.9, 40, 80, 120)] == pytest.approx([0.1, 0.1, 0.01, 0.001, 0.0001])
    cos = load_config("fashion-mnist", {"lr_schedule": "cosine", "lr": 0.2, "epochs": 10, "min_lr": 0.0}).optim
    assert lr_at(cos, 0) == pytest.approx(0.2) and lr_at(cos, 5) == pytest.approx(0.1) and lr_at(cos, 10) == pytest.approx(0.0)
    warm = load_config("fashion-mnist", {"lr_schedule": "constant", "lr": 0.1, "warmup_epochs": 2}).optim
    assert lr_at(warm, 1) == pytest.approx(0.1 * 1.001 / 2) and lr_at(warm, 2) == 0.1


def test_the_scheduler_follows_the_schedule_per_step_and_resumes():
    """torch's LambdaLR drives the step's lr (epoch + step / steps), and its state_dict resumes it."""
    cfg = load_config("fashion-mnist", {"subset": 100, "batch_size": 25, "epochs": 4, "lr": 0.2, "lr_schedule": "cosine"})
    data = run_datasets(cfg, ("train",))
    trainer = Trainer(cfg, MLPNet(128), data["train"])
    seen = []
    for group in itertools.islice(trainer._groups(), 3):
        seen.append(trainer.lr)
        trainer.train_step(group)
    assert seen == pytest.approx([lr_at(cfg.optim, s / 4) for s in range(3)])
    other = Trainer(cfg, MLPNet(128), data["train"])
    other.scheduler.load_state_dict(trainer.scheduler.state_dict())
    assert other.scheduler.get_last_lr() == pytest.approx([lr_at(cfg.optim, 3 / 4)])


# ---------------------------------------------------------------------- gradient accumulation
class MLPNet(nn.Module):
    """An EmbeddingNet-shaped model without batch-norm, so micro-batching changes nothing."""

    def __init__(self, low_dim: int = 16) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 64), nn.ReLU())
        self.head = nn.Linear(64, low_dim)
        self.feat_dim, self.low_dim, self.arch = 64, low_dim, "mlp"

    def forward_features(self, x):
        return self.body(x)

    def project(self, x):
        return self.head(self.body(x))

    def forward(self, x):
        return F.normalize(self.project(x), dim=1)


def _trainer(loss: str, batch_size: int, iter_size: int, data) -> Trainer:
    cfg = load_config("fashion-mnist", dict(dataset="fashion-mnist", subset=100, low_dim=16, loss=loss, batch_size=batch_size,
                                            iter_size=iter_size, lr=0.5, lr_schedule="constant", weight_decay=1e-3, epochs=1))
    torch.manual_seed(0)
    return Trainer(cfg, MLPNet(16), data["train"])


@pytest.mark.parametrize("loss", ["nca", "softmax"])
def test_gradient_accumulation_matches_the_full_batch(loss):
    cfg = load_config("fashion-mnist", dict(dataset="fashion-mnist", subset=100, test_subset=100))
    data = run_datasets(cfg, ("train", "test"))
    full, split = _trainer(loss, 40, 1, data), _trainer(loss, 20, 2, data)
    # one step: the 40-sample batch vs two micro-batches of 20 -> the same gradient
    x, y, idx = next(iter(torch.utils.data.DataLoader(data["train"], batch_size=40)))
    full.train_step([(x, y, idx)])
    split.train_step([(x[:20], y[:20], idx[:20]), (x[20:], y[20:], idx[20:])])
    for a, b in zip(full.model.parameters(), split.model.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    if loss == "nca":
        torch.testing.assert_close(full.objective.memory.slots, split.objective.memory.slots, rtol=1e-5, atol=1e-6)
    # a whole epoch (100 samples: steps of 40, 40 and an uneven 20 = micro-batches 20+20, 20+20, 20)
    full, split = _trainer(loss, 40, 1, data), _trainer(loss, 20, 2, data)
    assert full.steps_per_epoch == split.steps_per_epoch == 3
    torch.manual_seed(1)  # the training transform draws from the global RNG
    r_full = full.train_epoch()
    torch.manual_seed(1)
    r_split = split.train_epoch()
    assert r_full["train_loss"] == pytest.approx(r_split["train_loss"], rel=1e-5)
    for a, b in zip(full.model.parameters(), split.model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    if loss == "nca":
        torch.testing.assert_close(full.objective.memory.slots, split.objective.memory.slots, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def nca_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "nca"
    final = train(tiny_config(), run_dir=run_dir, log=lambda *a: None)
    return run_dir, final


def test_tiny_fashion_mnist_run_learns_and_writes_its_files(nca_run):
    run_dir, final = nca_run
    for name in ("config.yaml", "metrics.jsonl", "last.pt", "best.pt", "final.json", "curves.png"):
        assert (run_dir / name).is_file(), name
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in lines] == ["epoch"] * 3 + ["final"]
    assert all(r["images_per_s"] > 0 and math.isfinite(r["train_loss"]) for r in lines[:3])
    assert lines[2]["train_loss"] < lines[0]["train_loss"] and lines[2]["val_top1"] > lines[0]["val_top1"]
    # chance is 10 %; three epochs over 1,000 images get to about 60-70 %
    assert final["knn_top1"] > 0.5 and final["knn_top5"] > final["knn_top1"]
    assert final["knn_recomputed_top1"] > 0.5
    assert lines[-1]["knn_top1"] == final["knn_top1"]
    cfg = config_from_dict(__import__("yaml").safe_load((run_dir / "config.yaml").read_text()))
    assert cfg == tiny_config()  # the config as chosen; derived facts are kept beside it
    assert load_checkpoint(run_dir / "last.pt")["facts"]["in_chans"] == 1


def test_final_knn_matches_an_independent_computation(nca_run):
    """The reported weighted-kNN accuracy equals a direct computation from the checkpoint:
    queries embedded here, the saved memory as gallery, knn_classify with k=30, sigma=T."""
    run_dir, final = nca_run
    run = load_run(run_dir)
    model, bank = run.model, run.memory
    test = run_datasets(run.config, ("test",), run.facts)["test"]
    feats, labels, ids = extract(model, test, batch_size=97)
    assert torch.equal(ids, torch.arange(len(test))) and torch.equal(labels, test.targets)
    assert torch.allclose(feats.norm(dim=1), torch.ones(len(test)), atol=1e-5)
    # gallery by hand: slots in class-sorted order, their labels sorted likewise
    slots = bank.slots.float()
    res = knn_classify(feats, slots, bank.labels[bank.index_of_position], k=30, sigma=0.05)
    acc = topk_accuracy(res.predictions, labels)
    assert acc[1] == pytest.approx(final["knn_top1"]) and acc[5] == pytest.approx(final["knn_top5"])


def test_checkpoint_layout_and_weights_only(nca_run):
    run_dir, _ = nca_run
    state = load_checkpoint(run_dir / "last.pt")
    assert state["format"] == "snca-checkpoint" and state["version"] == 2 and state["epoch"] == 3
    assert set(state) >= {"config", "facts", "model", "memory", "classifier", "optimizer", "scheduler", "epoch", "rng", "metrics"}
    assert state["classifier"] is None and state["memory"]["slots"].shape == (1000, 128)
    assert set(state["rng"]) >= {"python", "numpy", "torch", "loader"}
    assert len(state["metrics"]) == 3
    # the file loads under the strictest setting
    torch.load(run_dir / "last.pt", weights_only=True)


def test_softmax_baseline_runs_and_reports_both_feature_kinds(tmp_path):
    final = train(tiny_config(loss="softmax", plot=False), run_dir=tmp_path / "sm", log=lambda *a: None)
    assert final["classifier_top1"] > 0.5
    assert final["knn_top1"] > 0.5 and final["knn_penultimate_top1"] > 0.5
    state = load_checkpoint(tmp_path / "sm" / "last.pt")
    assert state["memory"] is None and state["classifier"]["weight"].shape == (10, 128)
    run = load_run(tmp_path / "sm" / "best.pt")
    assert run.memory is None and run.config.objective.loss == "softmax" and not run.model.training


def test_resume_is_bit_identical_in_deterministic_mode(tmp_path):
    cfg = tiny_config(subset=400, test_subset=200, epochs=2, batch_size=64, deterministic=True, plot=False, recompute_gallery=False,
                      lr_schedule="cosine", memory_momentum_schedule={0: 0.5, 1: 0.8})
    full = train(cfg, run_dir=tmp_path / "full", log=lambda *a: None)

    def interrupt_after_first_epoch(msg, *a):
        if str(msg).startswith("epoch 1/2"):
            raise KeyboardInterrupt

    assert train(cfg, run_dir=tmp_path / "cut", log=interrupt_after_first_epoch) is None
    assert load_checkpoint(tmp_path / "cut" / "last.pt")["epoch"] == 1
    resumed = train(cfg, run_dir=tmp_path / "cut", resume_path=tmp_path / "cut" / "last.pt", log=lambda *a: None)
    a, b = load_checkpoint(tmp_path / "full" / "last.pt"), load_checkpoint(tmp_path / "cut" / "last.pt")
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert torch.equal(a["memory"]["slots"], b["memory"]["slots"])
    for ra, rb in zip(a["metrics"], b["metrics"], strict=True):
        assert (ra["train_loss"], ra["val_top1"], ra["lr"], ra["memory_momentum"]) == (rb["train_loss"], rb["val_top1"], rb["lr"], rb["memory_momentum"])
    assert full["knn_top1"] == resumed["knn_top1"] and full["knn_top5"] == resumed["knn_top5"]


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    # epoch 1 at lr 0.05 is fine; epoch 2 at lr 5e7 blows up
    cfg = tiny_config(subset=300, test_subset=100, epochs=3, lr_schedule="step", lr_step_size=1, lr_gamma=1e9, plot=False)
    with pytest.raises(SncaError) as info:
        train(cfg, run_dir=tmp_path / "nan", log=lambda *a: None)
    msg = str(info.value)
    assert "\n" not in msg and ("NaN" in msg or "nan" in msg)
    assert "epoch 2" in msg and "lower learning rate" in msg and "last.pt (epoch 1)" in msg
    state = load_checkpoint(tmp_path / "nan" / "last.pt")
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_mismatched_resume_is_refused(nca_run, tmp_path):
    run_dir, _ = nca_run
    load_checkpoint(run_dir / "last.pt")  # readable
    with pytest.raises(SncaError, match="low_dim"):
        train(tiny_config(low_dim=64), run_dir=tmp_path / "x", resume_path=run_dir / "last.pt")
    with pytest.raises(SncaError, match="1000 images, this dataset has 600"):
        train(tiny_config(subset=600), run_dir=tmp_path / "y", resume_path=run_dir / "last.pt")


def test_save_checkpoint_is_atomic(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint(path, {"config": {}, "model": {"w": torch.ones(2)}, "epoch": 0})

    class Boom:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        save_checkpoint(path, {"config": {}, "model": {"w": torch.zeros(2)}, "epoch": 1, "bad": Boom()})
    assert torch.equal(load_checkpoint(path)["model"]["w"], torch.ones(2))  # old file intact
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temp file left behind


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_mixed_precision_trains(tmp_path, amp):
    """Autocast (and the GradScaler for fp16) run end to end and learn (fp32 reaches about 55 %
    on this budget; the memory gallery is still mostly random after one epoch)."""
    cfg = tiny_config(subset=300, test_subset=100, epochs=1, amp=amp, plot=False)
    final = train(cfg, run_dir=tmp_path / amp, log=lambda *a: None)
    assert final["knn_recomputed_top1"] > 0.4
    state = load_checkpoint(tmp_path / amp / "last.pt")
    assert (state["scaler"] is not None) == (amp == "fp16")
    assert all(v.dtype == torch.float32 for v in state["model"].values() if v.is_floating_point())
