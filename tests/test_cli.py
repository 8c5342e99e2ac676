"""The ``snca`` command line: discovery, one-line errors, eval / extract round trips, resume,
and every dataset kind (CIFAR pickle layout and an image folder written here) through train."""

from __future__ import annotations

import argparse
import json
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from snca.checkpoint import load_checkpoint, load_run, save_checkpoint
from snca.cli import main
from snca.data import build_dataset, run_datasets
from snca.errors import SncaError
from snca.features import extract
from snca.knn import knn_classify, topk_accuracy

torch.set_num_threads(1)  # the test machine is shared: one thread avoids oversubscription

TINY = ["--subset", "600", "--test-subset", "200", "--batch-size", "32", "--lr", "0.05", "--no-progress", "--no-plot"]


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("snca: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny NCA run (1 epoch, 600 Fashion-MNIST images) shared by the tests below."""
    run_dir = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", *TINY, "--epochs", "1", "--run-dir", str(run_dir)]) == 0
    return run_dir


# ---------------------------------------------------------------------- discovery
def test_help_lists_subcommands_and_python_m_works():
    proc = subprocess.run([sys.executable, "-m", "snca", "--help"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0
    for command in ("train", "eval", "extract"):
        assert command in proc.stdout


def test_no_command_prints_usage(capsys):
    code, _, err = run_cli(capsys)
    assert code == 2 and "usage: snca" in err


# ---------------------------------------------------------------------- bad inputs
def test_unknown_set_key(capsys):
    assert_one_line_error(*run_cli(capsys, "train", "--set", "learning_rate=0.1")[::2], "unknown config key 'learning_rate'")
    assert_one_line_error(*run_cli(capsys, "train", "--set", "epochs=many")[::2], "'optim.epochs'", "could not be converted to Integer")
    assert_one_line_error(*run_cli(capsys, "train", "--config", "nonexistent-recipe")[::2], "unknown recipe")


@pytest.mark.parametrize("dataset", ["cifar10", "folder"])
def test_nonexistent_data_dir(capsys, tmp_path, dataset):
    code, _, err = run_cli(capsys, "train", "--dataset", dataset, "--data-dir", tmp_path / "missing", "--run-dir", tmp_path / "r")
    assert_one_line_error(code, err, "does not exist")


def test_corrupt_and_missing_checkpoints(capsys, tmp_path, trained):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all" * 100)
    assert_one_line_error(*run_cli(capsys, "eval", garbage)[::2], "corrupt")
    truncated = tmp_path / "truncated.pt"
    data = (trained / "last.pt").read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    assert_one_line_error(*run_cli(capsys, "eval", truncated)[::2], "corrupt")
    assert_one_line_error(*run_cli(capsys, "extract", tmp_path / "nope.pt", "--out", tmp_path / "f.npz")[::2], "does not exist")
    assert_one_line_error(*run_cli(capsys, "train", "--resume", tmp_path / "nope.pt")[::2], "does not exist")
    # a torch file that is not an snca checkpoint
    torch.save({"weights": torch.ones(3)}, tmp_path / "foreign.pt")
    assert_one_line_error(*run_cli(capsys, "eval", tmp_path / "foreign.pt")[::2], "not an snca checkpoint")


def test_mismatched_checkpoints(capsys, tmp_path, trained):
    ckpt = trained / "last.pt"
    # resuming with another architecture / another training set
    assert_one_line_error(*run_cli(capsys, "train", "--resume", ckpt, "--arch", "cifar_resnet18", "--run-dir", tmp_path / "a")[::2], "arch")
    assert_one_line_error(*run_cli(capsys, "train", "--resume", ckpt, "--subset", "500", "--run-dir", tmp_path / "b")[::2],
                          "600 images, this dataset has 500")
    # weights that do not fit the architecture the config names
    state = load_checkpoint(ckpt)
    state["config"]["model"]["low_dim"] = 64
    save_checkpoint(tmp_path / "tampered.pt", {k: v for k, v in state.items() if k not in ("format", "version")})
    assert_one_line_error(*run_cli(capsys, "eval", tmp_path / "tampered.pt")[::2], "differs from the config's model.low_dim")
    del state["memory"]  # without the memory, the weights themselves are refused
    save_checkpoint(tmp_path / "tampered.pt", {k: v for k, v in state.items() if k not in ("format", "version", "digest")})
    assert_one_line_error(*run_cli(capsys, "eval", tmp_path / "tampered.pt")[::2], "does not match this model")
    # evaluating on a dataset of another kind (3-channel CIFAR layout vs a 1-channel model)
    cifar = write_cifar(tmp_path / "cifar", 10)
    assert_one_line_error(*run_cli(capsys, "eval", ckpt, "--dataset", "cifar10", "--data-dir", cifar)[::2], "channel")


def test_nan_loss_is_one_line(capsys, tmp_path):
    code, _, err = run_cli(capsys, "train", *TINY, "--subset", "200", "--epochs", "1", "--lr", "1e12", "--run-dir", tmp_path / "nan")
    assert_one_line_error(code, err, "NaN", "lower learning rate", "no checkpoint was written")


# ---------------------------------------------------------------------- eval / extract
def test_eval_reports_both_galleries_and_matches_the_training_run(capsys, trained):
    code, out, _ = run_cli(capsys, "eval", trained / "last.pt", "--k", "1", "10", "30", "--json")
    assert code == 0
    result = json.loads(out)
    rows = {(r["gallery"], r["k"]): r for r in result["results"]}
    assert set(rows) == {(g, k) for g in ("memory", "recomputed") for k in (1, 10, 30)}
    final = json.loads((trained / "final.json").read_text())
    assert rows["memory", 30]["top1"] == pytest.approx(final["knn_top1"])
    assert rows["recomputed", 30]["top1"] == pytest.approx(final["knn_recomputed_top1"])
    assert result["num_queries"] == 200 and all(r["sigma"] == 0.05 for r in result["results"])
    assert all(r["top5"] >= r["top1"] for r in result["results"])
    code, out, _ = run_cli(capsys, "eval", trained, "--gallery", "memory", "--sigma", "0.1")  # run dir -> last.pt
    assert code == 0 and "memory" in out and "recomputed" not in out and "top-1" in out


@pytest.mark.parametrize("suffix", [".npz", ".npy", ".safetensors"])
def test_extract_round_trip(capsys, tmp_path, trained, suffix):
    out = tmp_path / f"feats{suffix}"
    code, text, _ = run_cli(capsys, "extract", trained / "last.pt", "--split", "test", "--out", out)
    assert code == 0 and "200 x 128" in text
    if suffix == ".npz":
        with np.load(out) as z:
            feats, labels, ids = z["features"], z["labels"], z["ids"]
    elif suffix == ".npy":
        feats = np.load(out)
        labels, ids = np.load(tmp_path / "feats_labels.npy"), np.load(tmp_path / "feats_ids.npy")
    else:
        from safetensors.numpy import load_file

        z = load_file(out)
        feats, labels, ids = z["features"], z["labels"], z["ids"]
    run = load_run(trained / "last.pt")
    test = run_datasets(run.config, ("test",), run.facts)["test"]
    ref, ref_labels, ref_ids = extract(run.model, test, batch_size=64)
    assert feats.dtype == np.float32 and feats.shape == (200, 128)
    np.testing.assert_allclose(feats, ref.numpy(), atol=1e-5)
    np.testing.assert_array_equal(labels, ref_labels.numpy())
    np.testing.assert_array_equal(ids, np.arange(200))


def test_extracted_features_reproduce_eval(capsys, tmp_path, trained):
    """kNN over the extracted train/test features = eval's recomputed-gallery numbers."""
    assert main(["extract", str(trained / "last.pt"), "--split", "train", "--out", str(tmp_path / "train.npz")]) == 0
    assert main(["extract", str(trained / "last.pt"), "--split", "test", "--out", str(tmp_path / "test.npz")]) == 0
    capsys.readouterr()
    tr, te = np.load(tmp_path / "train.npz"), np.load(tmp_path / "test.npz")
    assert tr["features"].shape == (600, 128)
    res = knn_classify(torch.from_numpy(te["features"]), torch.from_numpy(tr["features"]), torch.from_numpy(tr["labels"]), k=10, sigma=0.05, num_classes=10)
    top1 = topk_accuracy(res.predictions, torch.from_numpy(te["labels"]))[1]
    code, out, _ = run_cli(capsys, "eval", trained / "last.pt", "--gallery", "recomputed", "--k", "10", "--json")
    assert json.loads(out)["results"][0]["top1"] == pytest.approx(top1)


def test_extract_rejects_unknown_suffix(capsys, tmp_path, trained):
    assert_one_line_error(*run_cli(capsys, "extract", trained / "last.pt", "--out", tmp_path / "f.csv")[::2], ".npz")


# ---------------------------------------------------------------------- resume through the CLI
def test_resume_auto_continues_and_new_runs_get_numbered(capsys, tmp_path):
    out_dir = tmp_path / "runs"
    common = [*TINY, "--subset", "200", "--test-subset", "100", "--out-dir", out_dir, "--name", "demo"]
    assert run_cli(capsys, "train", *common, "--epochs", "1", "--tensorboard")[0] == 0
    assert any((out_dir / "demo" / "tensorboard").iterdir())
    code, out, _ = run_cli(capsys, "train", *common, "--epochs", "2", "--resume", "auto")
    assert code == 0 and "resuming" in out and "epoch 2/2" in out and "epoch 1/2" not in out
    state = load_checkpoint(out_dir / "demo" / "last.pt")
    assert state["epoch"] == 2 and state["config"]["optim"]["epochs"] == 2
    lines = (out_dir / "demo" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["kind"] for x in lines] == ["epoch", "epoch", "final"]
    # a fresh run with the same name does not overwrite the first one
    assert run_cli(capsys, "train", *common, "--epochs", "1")[0] == 0
    assert (out_dir / "demo-2" / "last.pt").is_file()


# ---------------------------------------------------------------------- dataset kinds
def _fmnist_images(n: int, size: int, chans: int) -> tuple[np.ndarray, np.ndarray]:
    """Real Fashion-MNIST images, padded to ``size`` and repeated to ``chans`` channels."""
    ds = build_dataset("fashion-mnist", "train", subset=n, seed=1)
    images = ds.images.numpy() if hasattr(ds, "images") else np.stack([np.asarray(ds.raw_item(i)) for i in range(n)])[:, None]
    images = images.reshape(n, 1, 28, 28)
    pad = (size - 28) // 2
    images = np.pad(images, ((0, 0), (0, 0), (pad, size - 28 - pad), (pad, size - 28 - pad)))
    return np.repeat(images, chans, axis=1).astype(np.uint8), ds.targets.numpy()


def write_cifar(root, num_classes: int, per_batch: int = 40):
    """The CIFAR python-pickle layout (cifar-10-batches-py / cifar-100-python)."""
    images, labels = _fmnist_images(6 * per_batch, 32, 3)
    if num_classes == 100:
        labels = (labels * 10 + np.arange(len(labels)) % 10) % 100  # spread over 100 fine classes
    folder = root / ("cifar-10-batches-py" if num_classes == 10 else "cifar-100-python")
    folder.mkdir(parents=True)
    flat = images.reshape(len(images), -1)

    def dump(name, sl):
        if num_classes == 10:
            obj = {"data": flat[sl], "labels": labels[sl].tolist()}
        else:
            obj = {"data": flat[sl], "fine_labels": labels[sl].tolist(), "coarse_labels": (labels[sl] // 5).tolist()}
        with open(folder / name, "wb") as fh:
            pickle.dump(obj, fh)

    if num_classes == 10:
        for b in range(5):
            dump(f"data_batch_{b + 1}", slice(b * per_batch, (b + 1) * per_batch))
        dump("test_batch", slice(5 * per_batch, 6 * per_batch))
        with open(folder / "batches.meta", "wb") as fh:
            pickle.dump({"label_names": [f"c{k}" for k in range(10)]}, fh)
    else:
        dump("train", slice(0, 5 * per_batch))
        dump("test", slice(5 * per_batch, 6 * per_batch))
        with open(folder / "meta", "wb") as fh:
            pickle.dump({"fine_label_names": [f"f{k}" for k in range(100)], "coarse_label_names": [f"g{k}" for k in range(20)]}, fh)
    return root


def write_folder(root, per_class_train: int = 12, per_class_val: int = 4):
    images, labels = _fmnist_images(400, 32, 3)
    for split, count in (("train", per_class_train), ("val", per_class_val)):
        for c in range(3):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            picks = np.flatnonzero(labels == c)[: count] if split == "train" else np.flatnonzero(labels == c)[-count:]
            for j, i in enumerate(picks):
                Image.fromarray(images[i].transpose(1, 2, 0)).save(d / f"{j}.png")
    return root


@pytest.mark.parametrize("kind", ["cifar10", "cifar100", "folder"])
def test_each_dataset_kind_trains_one_epoch(capsys, tmp_path, kind):
    if kind == "folder":
        data = write_folder(tmp_path / "data")
        extra = ["--set", "image_size=32"]
    else:
        data = write_cifar(tmp_path / "data", 10 if kind == "cifar10" else 100)
        extra = []
    run = tmp_path / "run"
    code, out, err = run_cli(capsys, "train", "--dataset", kind, "--data-dir", data, "--arch", "small_cnn", "--epochs", "1",
                             "--batch-size", "16", "--no-progress", "--no-plot", "--run-dir", run, *extra)
    assert code == 0, err
    final = json.loads((run / "final.json").read_text())
    assert 0.0 <= final["knn_top1"] <= 1.0 and final["num_test"] > 0
    assert load_checkpoint(run / "last.pt")["facts"]["in_chans"] == 3
    code, out, _ = run_cli(capsys, "eval", run / "last.pt", "--k", "1", "5", "--json")
    assert code == 0 and len(json.loads(out)["results"]) == 4


# ---------------------------------------------------------------------- unreadable checkpoint files
@pytest.mark.parametrize("text", ["not a checkpoint at all\n", "config:\n  lr: 0.1\n", "hello world\n"])
def test_text_and_truncated_files_are_not_reported_as_unsafe(capsys, tmp_path, text):
    """The weights_only unpickler calls byte soup "Weights only load failed" (and a text that
    starts with "c" an "Unsupported global"): those files are unreadable, not unsafe."""
    text_file = tmp_path / "notes.pt"
    text_file.write_text(text * 40)
    with pytest.raises(SncaError, match="not a readable checkpoint") as err:
        load_checkpoint(text_file)
    assert "safely" not in str(err.value)
    good = save_checkpoint(tmp_path / "good.pt", {"config": {}, "model": {"w": torch.randn(2000)}, "epoch": 0})
    data = good.read_bytes()
    for cut in (len(data) // 2, len(data) - 10, 100):
        truncated = tmp_path / f"cut{cut}.pt"
        truncated.write_bytes(data[:cut])
        with pytest.raises(SncaError, match="not a readable checkpoint .*truncated") as err:
            load_checkpoint(truncated)
        assert "safely" not in str(err.value)
    assert_one_line_error(*run_cli(capsys, "eval", text_file)[::2], "not a readable checkpoint")
    # a well-formed torch file holding an object weights_only refuses is still called unsafe
    torch.save({"format": "snca-checkpoint", "obj": argparse.Namespace(a=1)}, tmp_path / "unsafe.pt")
    with pytest.raises(SncaError, match="cannot be loaded safely"):
        load_checkpoint(tmp_path / "unsafe.pt")
