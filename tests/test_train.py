"""Training pipeline: recipes/config, schedules, gradient accumulation, end-to-end runs on real
Fashion-MNIST / MNIST data, checkpoints and exact resume, NaN handling, softmax baseline."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from snca.checkpoint import load_checkpoint, load_trained, save_checkpoint
from snca.commands.train import train
from snca.config import (
    TrainConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    load_recipe,
    momentum_at,
    parse_set,
    recipe_names,
)
from snca.engine import LRSchedule, Trainer, build_datasets, extract_features
from snca.errors import SncaError
from snca.knn import knn_classify, topk_accuracy

torch.set_num_threads(1)  # the test machine is shared: one thread avoids oversubscription

TINY = dict(
    dataset="fashion-mnist", subset=1000, test_subset=400, arch="small_cnn", epochs=3, batch_size=32,
    lr=0.05, lr_schedule="cosine", progress="off", plot=True, eval_batch_size=512, knn_k=30,
)


def tiny_config(**changes) -> TrainConfig:
    return apply_overrides(load_recipe("fashion-mnist"), {**TINY, **changes})


# ---------------------------------------------------------------------- config
def test_recipes_load_and_match_the_reference():
    assert {"fashion-mnist", "cifar10", "cifar100", "imagenet"} <= set(recipe_names())
    imnet = load_recipe("imagenet")
    assert (imnet.dataset, imnet.arch, imnet.epochs, imnet.batch_size) == ("folder", "resnet18", 130, 256)
    assert (imnet.lr, imnet.lr_schedule, imnet.lr_step_size, imnet.lr_gamma) == (0.1, "step", 40, 0.1)
    assert imnet.weight_decay == pytest.approx(1e-4) and imnet.nesterov and imnet.momentum == 0.9
    assert (imnet.temperature, imnet.low_dim, imnet.image_size) == (0.05, 128, 224)
    assert imnet.memory_momentum_schedule == {0: 0.5, 80: 0.8, 120: 0.9}
    assert [momentum_at(imnet.memory_momentum_schedule, e) for e in (0, 79, 80, 119, 120, 129)] == [0.5, 0.5, 0.8, 0.8, 0.9, 0.9]
    for name in ("cifar10", "cifar100"):
        c = load_recipe(name)
        assert (c.dataset, c.arch, c.epochs, c.batch_size, c.lr_step_size) == (name, "cifar_resnet18", 200, 128, 50)
        assert c.weight_decay == pytest.approx(5e-4)
    fm = load_recipe("fashion-mnist")
    assert fm == TrainConfig()  # the dataclass defaults are the default recipe
    assert (fm.arch, fm.temperature, fm.low_dim) == ("small_cnn", 0.05, 128)


def test_overrides_are_type_checked():
    cfg = apply_overrides(TrainConfig(), parse_set(["lr=0.2", "epochs=3", "weight_decay=1e-4", "data_dir=null",
                                                    "memory_momentum_schedule={0: 0.5, 2: 0.9}", "nesterov=false"]))
    assert (cfg.lr, cfg.epochs, cfg.weight_decay, cfg.data_dir, cfg.nesterov) == (0.2, 3, 1e-4, None, False)
    assert cfg.memory_momentum_schedule == {0: 0.5, 2: 0.9}
    with pytest.raises(SncaError, match="unknown config key 'lrate'"):
        parse_set(["lrate=0.1"])
    with pytest.raises(SncaError, match="expects int"):
        parse_set(["epochs=2.5"])
    with pytest.raises(SncaError, match="expects bool"):
        parse_set(["deterministic=maybe"])
    with pytest.raises(SncaError, match="loss must be one of"):
        apply_overrides(TrainConfig(), {"loss": "triplet"})
    with pytest.raises(SncaError, match="start at epoch 0"):
        apply_overrides(TrainConfig(), {"memory_momentum_schedule": {5: 0.5}})
    # the saved form round-trips
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_lr_schedules():
    step = LRSchedule(apply_overrides(TrainConfig(), {"lr_schedule": "step", "lr": 0.1, "lr_step_size": 40, "epochs": 130}))
    assert [step.lr_at(e) for e in (0, 39.9, 40, 80, 120)] == pytest.approx([0.1, 0.1, 0.01, 0.001, 0.0001])
    cos = LRSchedule(apply_overrides(TrainConfig(), {"lr_schedule": "cosine", "lr": 0.2, "epochs": 10, "min_lr": 0.0}))
    assert cos.lr_at(0) == pytest.approx(0.2) and cos.lr_at(5) == pytest.approx(0.1) and cos.lr_at(10) == pytest.approx(0.0)
    warm = LRSchedule(apply_overrides(TrainConfig(), {"lr_schedule": "constant", "lr": 0.1, "warmup_epochs": 2}))
    assert warm.lr_at(1) == pytest.approx(0.1 * 1.001 / 2) and warm.lr_at(2) == 0.1


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
    cfg = apply_overrides(TrainConfig(), dict(dataset="fashion-mnist", subset=100, low_dim=16, loss=loss, batch_size=batch_size,
                                              iter_size=iter_size, lr=0.5, lr_schedule="constant", weight_decay=1e-3, epochs=1))
    torch.manual_seed(0)
    return Trainer(cfg, MLPNet(16), data["train"], data["test"])


@pytest.mark.parametrize("loss", ["nca", "softmax"])
def test_gradient_accumulation_matches_the_full_batch(loss):
    cfg = apply_overrides(TrainConfig(), dict(dataset="fashion-mnist", subset=100, test_subset=100))
    data = build_datasets(cfg, ("train", "test"))
    full, split = _trainer(loss, 40, 1, data), _trainer(loss, 20, 2, data)
    # one step: the 40-sample batch vs two micro-batches of 20 -> the same gradient
    x, y, idx = next(iter(torch.utils.data.DataLoader(data["train"], batch_size=40)))
    full.train_step([(x, y, idx)], lr=0.5)
    split.train_step([(x[:20], y[:20], idx[:20]), (x[20:], y[20:], idx[20:])], lr=0.5)
    for a, b in zip(full.model.parameters(), split.model.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    if loss == "nca":
        torch.testing.assert_close(full.bank.slots, split.bank.slots, rtol=1e-5, atol=1e-6)
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
        torch.testing.assert_close(full.bank.slots, split.bank.slots, rtol=1e-4, atol=1e-5)


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
    assert cfg.subset == 1000 and cfg.in_chans == 1


def test_final_knn_matches_an_independent_computation(nca_run):
    """The reported weighted-kNN accuracy equals a direct computation from the checkpoint:
    queries embedded here, the saved memory as gallery, knn_classify with k=30, sigma=T."""
    run_dir, final = nca_run
    model, config, bank = load_trained(run_dir / "last.pt")
    cfg = config_from_dict(config)
    test = build_datasets(cfg, ("test",))["test"]
    feats, labels, ids = extract_features(model, test, batch_size=97)
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
    assert state["format"] == "snca-checkpoint" and state["version"] == 1 and state["epoch"] == 3
    assert set(state) >= {"config", "model", "memory", "classifier", "optimizer", "scheduler", "epoch", "rng", "metrics"}
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
    model, config, bank = load_trained(tmp_path / "sm" / "best.pt")
    assert bank is None and config["loss"] == "softmax" and not model.training


def test_resume_is_bit_identical_in_deterministic_mode(tmp_path):
    cfg = tiny_config(subset=400, test_subset=200, epochs=2, batch_size=64, deterministic=True, plot=False, recompute_gallery=False,
                      lr_schedule="cosine", memory_momentum_schedule={0: 0.5, 1: 0.8})
    full = train(cfg, run_dir=tmp_path / "full", log=lambda *a: None)

    def interrupt_after_first_epoch(msg, *a):
        if str(msg).startswith("epoch 1/2"):
            raise KeyboardInterrupt

    assert train(cfg, run_dir=tmp_path / "cut", log=interrupt_after_first_epoch) is None
    assert load_checkpoint(tmp_path / "cut" / "last.pt")["epoch"] == 1
    resumed = train(cfg, run_dir=tmp_path / "cut", resume_path=tmp_path / "cut" / "last.pt",
                    resume_state=load_checkpoint(tmp_path / "cut" / "last.pt"), log=lambda *a: None)
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
    state = load_checkpoint(run_dir / "last.pt")
    with pytest.raises(SncaError, match="low_dim"):
        train(tiny_config(low_dim=64), run_dir=tmp_path / "x", resume_path=run_dir / "last.pt", resume_state=state)
    with pytest.raises(SncaError, match="1000 images, this dataset has 600"):
        train(tiny_config(subset=600), run_dir=tmp_path / "y", resume_path=run_dir / "last.pt", resume_state=state)


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
