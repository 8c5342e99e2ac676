"""Importing the reference implementation's released checkpoints (snca.interop.reference).

The files are written here in the reference's layout: ``torch.save`` of a dict holding a
DataParallel ResNet-18 state_dict ('module.' prefixes, fc -> 128-d embedding) and the memory
as a pickled *module object* (``LinearAverage`` with 'memory' and 'params' buffers), in both
the zip format and the legacy format the 2018 release used; and the CIFAR layout of its
cifar.py ('net': a kuangliu-style CIFAR ResNet18 with 'shortcut' projections and a 'linear' head). The loader must recover every
tensor without ever importing or running the pickled classes, and refuse files that call
anything (e.g. os.system).
"""

from __future__ import annotations

import json
import math
import os
import pickle

import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch import nn
from torch.nn.backends import thnn

from snca import SncaError
from snca.interop.reference import (
    Placeholder,
    import_reference,
    load_reference,
    reference_memory_bank,
    reference_model,
    safe_load,
    snca_key,
)
from snca.models import build_model

UNPICKLED = []  # the stand-in class appends here if pickle ever restores a real instance of it


class LinearAverage(nn.Module):
    """Stand-in for the reference's memory module (lib/LinearAverage.py)."""

    def __init__(self, input_size: int, output_size: int, T: float = 0.05, momentum: float = 0.5) -> None:
        super().__init__()
        self.nLem = output_size
        self.register_buffer("params", torch.tensor([T, momentum]))
        stdv = 1.0 / math.sqrt(input_size / 3)
        self.register_buffer("memory", torch.rand(output_size, input_size).mul_(2 * stdv).add_(-stdv))

    def __setstate__(self, state):
        UNPICKLED.append(self)
        super().__setstate__(state)


def reference_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = torchvision.models.resnet18(weights=None)
    net.fc = nn.Linear(512, 128)
    return net.eval()


def write_release(path, net: nn.Module, memory_rows: int, legacy: bool, drop_bn_counters: bool = False) -> LinearAverage:
    torch.manual_seed(1)
    lem = LinearAverage(128, memory_rows, T=0.07, momentum=0.5)
    sd = {"module." + k: v for k, v in net.state_dict().items()}
    if drop_bn_counters:  # torch 0.4.0's BatchNorm had no num_batches_tracked buffer
        sd = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    state = {"epoch": 130, "arch": "resnet18", "state_dict": sd, "lemniscate": lem, "best_prec1": 70.59}
    torch.save(state, path, _use_new_zipfile_serialization=not legacy)
    return lem


@pytest.fixture(scope="module")
def net():
    return reference_net()


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_reads_release_without_running_pickled_classes(tmp_path, net, legacy):
    path = tmp_path / "ckpt.pth.tar"
    lem = write_release(path, net, 50, legacy, drop_bn_counters=legacy)
    UNPICKLED.clear()
    release = load_reference(path)
    assert UNPICKLED == []  # the module class in the file was never instantiated
    assert torch.equal(release.memory, lem.memory)
    assert release.temperature == pytest.approx(0.07) and release.momentum == pytest.approx(0.5)
    assert release.arch == "resnet18" and release.epoch == 130 and release.extra["best_prec1"] == pytest.approx(70.59)
    assert release.low_dim == 128 and release.feat_dim == 512 and release.in_chans == 3
    assert not any(k.startswith("module.") for k in release.state_dict)
    raw = safe_load(path)["lemniscate"]
    assert isinstance(raw, Placeholder) and raw.snca_class.endswith(".LinearAverage")
    # snca's EmbeddingNet with the imported weights computes the reference's embedding.
    model = reference_model(release)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(x), F.normalize(net(x), dim=1), atol=1e-5, rtol=0)
    bank = reference_memory_bank(release, torch.arange(50) % 5)
    torch.testing.assert_close(bank.features_by_index(), F.normalize(lem.memory, dim=1))
    with pytest.raises(SncaError, match="50 slots but the dataset has 49"):
        reference_memory_bank(release, torch.arange(49) % 5)
    with pytest.raises(SncaError, match="arch='resnet18' but --arch resnet50"):
        reference_model(release, "resnet50")


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_refuses_files_that_call_code(tmp_path, net, legacy):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    state = {"state_dict": {"module." + k: v for k, v in net.state_dict().items()}, "hook": _Evil(str(marker))}
    torch.save(state, path, _use_new_zipfile_serialization=not legacy)
    with pytest.raises(SncaError, match=r"refusing to load: the file calls posix\.system\(\.\.\.\)"):
        load_reference(path)
    assert not marker.exists()
    # A bare pickle that calls os.system right away is refused as well (legacy reader).
    (tmp_path / "bare.pkl").write_bytes(pickle.dumps(_Evil(str(marker)), protocol=0))
    with pytest.raises(SncaError, match="refusing to load"):
        safe_load(tmp_path / "bare.pkl")
    assert not marker.exists()


def test_not_a_reference_file(tmp_path):
    torch.save({"weights": torch.ones(3)}, tmp_path / "other.pt")
    with pytest.raises(SncaError, match="no 'state_dict' entry"):
        load_reference(tmp_path / "other.pt")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(SncaError, match="text.pt"):
        load_reference(tmp_path / "text.pt")
    with pytest.raises(SncaError, match="no such file"):
        load_reference(tmp_path / "missing.pt")


def _folder(root, counts=(3, 2, 4)):
    """ROOT/train/<class>/*.png (and a val/ split): a tiny image-folder dataset."""
    g = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for c, n in enumerate(counts):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(n if split == "train" else 1):
                a = (torch.rand(40, 40, 3, generator=g) * 80 + 60 * c).clamp(0, 255).to(torch.uint8).numpy()
                Image.fromarray(a).save(d / f"img{i}.png")
    return sum(counts)


def test_cli_build_index_from_reference(tmp_path, net, capsys):
    from snca.checkpoint import load_run
    from snca.cli import main

    n = _folder(tmp_path / "data")
    ref = tmp_path / "release.pth.tar"
    lem = write_release(ref, net, n, legacy=True)
    out = tmp_path / "idx"
    code = main(["index", "build", "--from-reference", str(ref), "--arch", "resnet18", "--out", str(out),
                 "--dataset", "folder", "--data-dir", str(tmp_path / "data")])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    # The converted checkpoint is an ordinary snca checkpoint, memory included.
    run = load_run(out / "checkpoint.pt")
    model, bank = run.model, run.memory
    assert run.config.model.arch == "resnet18" and run.config.objective.temperature == pytest.approx(0.07)
    torch.testing.assert_close(bank.features_by_index(), F.normalize(lem.memory, dim=1))
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), F.normalize(net(x), dim=1), atol=1e-5, rtol=0)
    # The index is the reference memory, ids are the training files, labels their folders.
    assert main(["index", "info", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["size"] == n and info["classes"] == {"class0": 3, "class1": 2, "class2": 4}
    # Querying with a training image's memory row: the images are embedded with the imported model.
    query = tmp_path / "data" / "val" / "class1" / "img0.png"
    assert main(["index", "query", str(out), str(query), "--k", "3", "--json"]) == 0
    answer = json.loads(capsys.readouterr().out)["results"][0]
    assert len(answer["neighbors"]) == 3 and answer["neighbors"][0]["id"].endswith(".png")


def test_cli_reference_without_data_gives_an_empty_index(tmp_path, net, capsys):
    from snca.cli import main

    ref = tmp_path / "release.pth.tar"
    write_release(ref, net, 7, legacy=False)
    out = tmp_path / "idx"
    assert main(["index", "build", "--from-reference", str(ref), "--out", str(out)]) == 0
    assert "0 images" in capsys.readouterr().out
    _folder(tmp_path / "data", counts=(2, 2))
    assert main(["index", "add", str(out), "--from-folder", str(tmp_path / "data" / "train")]) == 0
    capsys.readouterr()
    img = tmp_path / "data" / "train" / "class1" / "img0.png"
    assert main(["predict", str(out / "checkpoint.pt"), str(img), "--gallery", str(out), "--json", "--k", "1"]) == 0
    answer = json.loads(capsys.readouterr().out)["results"][0]
    assert answer["prediction"] == "class1" and answer["neighbors"][0]["similarity"] == pytest.approx(1.0, abs=1e-5)


# ----------------------------------------------------------------------------- CIFAR layout
class _ThnnBackend:
    """What torch < 1.x modules held as ``_backend``: pickled as a call of this function."""

    def __reduce__(self):
        return (thnn._get_thnn_function_backend, ())


def cifar_reference_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in the reference cifar.py's names (kuangliu ResNet18: 'shortcut.0/1',
    'linear'), made from snca's cifar_resnet18 by inverting the import's key mapping."""
    torch.manual_seed(seed)
    own = build_model("cifar_resnet18", low_dim=128).state_dict()
    ref = {}
    for k, v in own.items():
        name = "linear." + k[len("head."):] if k.startswith("head.") else k[len("backbone."):].replace(".downsample.", ".shortcut.")
        if k.endswith("running_var"):
            v = torch.rand_like(v) + 0.5
        elif v.is_floating_point():
            v = torch.randn_like(v) * (0.5 if k.endswith(("running_mean", "bias")) else 0.1)
        ref[name] = v.clone()
        assert snca_key(name, "cifar") == k  # the mapping is what the importer uses
    return ref


def cifar_reference_forward(sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The reference cifar.py ResNet18 forward (eval), written from its layer names alone."""

    def bn(t, p):
        return F.batch_norm(t, sd[p + ".running_mean"], sd[p + ".running_var"], sd[p + ".weight"], sd[p + ".bias"], False, 0.0, 1e-5)

    out = F.relu(bn(F.conv2d(x, sd["conv1.weight"], stride=1, padding=1), "bn1"))
    for layer in range(1, 5):
        for block in range(2):
            p = f"layer{layer}.{block}."
            stride = 2 if layer > 1 and block == 0 else 1
            o = F.relu(bn(F.conv2d(out, sd[p + "conv1.weight"], stride=stride, padding=1), p + "bn1"))
            o = bn(F.conv2d(o, sd[p + "conv2.weight"], stride=1, padding=1), p + "bn2")
            if p + "shortcut.0.weight" in sd:
                out = bn(F.conv2d(out, sd[p + "shortcut.0.weight"], stride=stride), p + "shortcut.1")
            out = F.relu(o + out)
    out = F.avg_pool2d(out, 4).flatten(1)
    return F.normalize(F.linear(out, sd["linear.weight"], sd["linear.bias"]), dim=1)


def write_cifar_release(path, sd, memory_rows: int, legacy: bool, data_parallel: bool) -> LinearAverage:
    torch.manual_seed(2)
    lem = LinearAverage(128, memory_rows, T=0.1, momentum=0.5)
    if legacy:  # a file of the torch 0.4 era: every module held a pickled _backend call
        lem._backend = _ThnnBackend()
    net = {("module." + k if data_parallel else k): v for k, v in sd.items()}
    torch.save({"net": net, "lemniscate": lem, "acc": 0.8123, "epoch": 199}, path, _use_new_zipfile_serialization=not legacy)
    return lem


@pytest.mark.parametrize(("legacy", "data_parallel"), [(False, True), (True, False), (True, True)],
                         ids=["zip-dp", "legacy", "legacy-dp"])
def test_cifar_layout(tmp_path, legacy, data_parallel):
    sd = cifar_reference_state()
    assert any(".shortcut.0." in k for k in sd) and "linear.weight" in sd and "fc.weight" not in sd
    path = tmp_path / "ckpt_cifar.t7"
    lem = write_cifar_release(path, sd, 60, legacy, data_parallel)
    UNPICKLED.clear()
    release = load_reference(path)
    assert UNPICKLED == []
    assert release.layout == "cifar" and release.arch is None
    assert release.low_dim == 128 and release.feat_dim == 512 and release.in_chans == 3
    assert release.epoch == 199 and release.completed_epochs == 200 and release.extra["acc"] == pytest.approx(0.8123)
    assert set(release.state_dict) == set(sd)
    assert torch.equal(release.memory, lem.memory)
    assert release.temperature == pytest.approx(0.1) and release.momentum == pytest.approx(0.5)
    model = reference_model(release)  # no arch in the file: the layout says cifar_resnet18
    assert model.arch == "cifar_resnet18"
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(x), cifar_reference_forward(sd, x), atol=1e-5, rtol=0)
    bank = reference_memory_bank(release, torch.arange(60) % 10)
    torch.testing.assert_close(bank.features_by_index(), F.normalize(lem.memory, dim=1))
    with pytest.raises(SncaError, match="imports as cifar_resnet18, not 'resnet18'"):
        reference_model(release, "resnet18")


def test_import_cifar_reference_writes_an_snca_checkpoint(tmp_path):
    from snca.checkpoint import bank_from_state, load_checkpoint

    sd = cifar_reference_state(seed=3)
    path = tmp_path / "ckpt_cifar.t7"
    lem = write_cifar_release(path, sd, 40, legacy=False, data_parallel=True)
    out = import_reference(path, tmp_path / "out" / "checkpoint.pt", labels=torch.arange(40) % 10)
    state = load_checkpoint(out)  # weights_only: the converted file holds no pickled classes
    cfg = state["config"]
    assert cfg["run"]["recipe"] == "reference-import" and cfg["data"]["dataset"] == "cifar10"
    assert cfg["model"]["arch"] == "cifar_resnet18" and cfg["model"]["low_dim"] == 128
    assert cfg["objective"]["loss"] == "nca" and cfg["objective"]["temperature"] == pytest.approx(0.1)
    assert state["facts"] == {"in_chans": 3, "image_size": 32, "num_classes": 10, "class_names": None,
                              "class_split": None, "num_train": 40}
    assert state["epoch"] == 200 and state["classifier"] is None
    assert state["source"]["layout"] == "cifar" and state["source"]["acc"] == pytest.approx(0.8123)
    model = build_model("cifar_resnet18", low_dim=128)
    model.load_state_dict(state["model"])
    model.eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(x), cifar_reference_forward(sd, x), atol=1e-5, rtol=0)
    bank = bank_from_state(state["memory"], out)
    torch.testing.assert_close(bank.features_by_index(), F.normalize(lem.memory, dim=1))
    assert torch.equal(bank.labels, torch.arange(40) % 10)
