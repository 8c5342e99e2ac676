"""Backbones + embedding head: shapes, normalisation, stems, local weights, timm, autocast."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torchvision import models as tvm

from snca.errors import SncaError
from snca.models import ARCHS, EmbeddingNet, build_model


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    yield


# arch -> (input size used here, feat_dim)
CASES = {
    "small_cnn": (28, 256),
    "cifar_resnet18": (32, 512),
    "resnet18": (32, 512),
    "resnet34": (32, 512),
    "resnet50": (32, 2048),
    "timm:test_resnet": (32, None),
}


@pytest.mark.parametrize("arch", list(CASES))
@pytest.mark.parametrize("in_chans", [1, 3])
def test_every_arch_outputs_normalised_embeddings(arch, in_chans):
    torch.manual_seed(0)
    size, feat_dim = CASES[arch]
    model = build_model(arch, low_dim=128, in_chans=in_chans).eval()
    assert isinstance(model, EmbeddingNet) and model.arch == arch and model.low_dim == 128
    if feat_dim is not None:
        assert model.feat_dim == feat_dim
    x = torch.randn(3, in_chans, size, size)
    with torch.no_grad():
        out = model(x)
        feats = model.forward_features(x)
        proj = model.project(x)
    assert out.shape == (3, 128) and out.dtype == torch.float32
    torch.testing.assert_close(out.norm(dim=1), torch.ones(3))
    assert feats.shape == (3, model.feat_dim)
    assert proj.shape == (3, 128) and not torch.allclose(proj.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(out, F.normalize(proj, dim=1))
    with pytest.raises(RuntimeError):  # the stem really takes in_chans channels
        model(torch.randn(1, in_chans + 1, size, size))


def test_low_dim_and_gradients_reach_every_parameter():
    model = build_model("small_cnn", low_dim=64, in_chans=1)
    out = model(torch.randn(8, 1, 28, 28))
    assert out.shape == (8, 64)
    (out[:, 0] * torch.arange(8.0)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_stems():
    cifar = build_model("cifar_resnet18")
    assert cifar.backbone.conv1.kernel_size == (3, 3) and cifar.backbone.conv1.stride == (1, 1)
    assert isinstance(cifar.backbone.maxpool, torch.nn.Identity)
    seen = {}

    def hook(module, inputs, output):
        seen["l1"] = output.shape  # returns None: the output is left alone

    cifar.backbone.layer1.register_forward_hook(hook)
    cifar.eval()(torch.randn(1, 3, 32, 32))
    assert seen["l1"][-2:] == (32, 32)  # no down-sampling in the CIFAR stem
    imnet = build_model("resnet18", in_chans=1)
    assert imnet.backbone.conv1.kernel_size == (7, 7) and imnet.backbone.conv1.in_channels == 1
    # small_cnn also takes other sizes (adaptive pool)
    assert build_model("small_cnn", in_chans=3)(torch.randn(2, 3, 32, 32)).shape == (2, 128)


def test_resnet_backbone_equals_torchvision_with_its_weights(tmp_path):
    """A torchvision state_dict (with its ImageNet fc) loads; features equal torchvision's."""
    torch.manual_seed(1)
    ref = tvm.resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(ref.state_dict(), path)
    model = build_model("resnet18", weights=path).eval()
    ref.fc = torch.nn.Identity()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(x), ref.eval()(x))


@pytest.mark.parametrize("wrap", ["plain", "state_dict_module", "safetensors", "snca_model"])
def test_weights_round_trip(tmp_path, wrap):
    torch.manual_seed(2)
    src = build_model("small_cnn", in_chans=1)
    sd = src.backbone.state_dict()
    if wrap == "plain":
        path = tmp_path / "w.pt"
        torch.save(sd, path)
    elif wrap == "state_dict_module":
        path = tmp_path / "w.pth"
        torch.save({"epoch": 3, "state_dict": {"module." + k: v for k, v in sd.items()}}, path)
    elif wrap == "safetensors":
        path = tmp_path / "w.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:  # a whole EmbeddingNet state_dict, as an snca checkpoint stores under "model"
        path = tmp_path / "ckpt.pt"
        torch.save({"format": "snca-checkpoint", "model": src.state_dict()}, path)
    torch.manual_seed(3)
    dst = build_model("small_cnn", in_chans=1, weights=path)
    for k, v in sd.items():
        assert torch.equal(dst.backbone.state_dict()[k], v), k
    fresh = build_model("small_cnn", in_chans=1)
    assert not torch.equal(fresh.backbone.fc.weight, sd["fc.weight"])


def test_weights_errors(tmp_path):
    with pytest.raises(SncaError, match="not found"):
        build_model("small_cnn", in_chans=1, weights=tmp_path / "none.pt")
    r18 = tmp_path / "r18.pt"
    torch.save(tvm.resnet18(weights=None).state_dict(), r18)
    with pytest.raises(SncaError) as err:
        build_model("resnet34", weights=r18)
    msg = str(err.value)
    assert "\n" not in msg and "missing" in msg and "layer1.2" in msg
    with pytest.raises(SncaError, match=r"conv1.weight has shape \(64, 3, 7, 7\)"):
        build_model("resnet18", in_chans=1, weights=r18)
    with pytest.raises(SncaError, match="shape"):
        build_model("cifar_resnet18", weights=r18)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"definitely not a checkpoint")
    with pytest.raises(SncaError, match="cannot load weights"):
        build_model("resnet18", weights=junk)
    empty = tmp_path / "empty.pt"
    torch.save({"epoch": 1}, empty)
    with pytest.raises(SncaError, match="no state_dict"):
        build_model("resnet18", weights=empty)


def test_timm_models(tmp_path, monkeypatch):
    model = build_model("timm:test_convnext", in_chans=1, low_dim=32)
    assert model(torch.randn(2, 1, 64, 64)).shape == (2, 32)
    # round trip through a file: timm backbones load like the others
    path = tmp_path / "t.pt"
    torch.save(model.backbone.state_dict(), path)
    again = build_model("timm:test_convnext", in_chans=1, low_dim=32, weights=path)
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(again.backbone.state_dict()[k], v)
    with pytest.raises(SncaError, match="no model 'no_such_net'"):
        build_model("timm:no_such_net")
    with pytest.raises(SncaError, match="needs a model name"):
        build_model("timm:")
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm -> ImportError
    with pytest.raises(SncaError, match="pip install timm"):
        build_model("timm:test_resnet")


def test_unknown_arch_and_bad_arguments():
    with pytest.raises(SncaError) as err:
        build_model("vgg16")
    msg = str(err.value)
    assert all(a in msg for a in ARCHS)
    with pytest.raises(SncaError, match="in_chans"):
        build_model("small_cnn", in_chans=0)
    with pytest.raises(SncaError, match="low_dim"):
        build_model("small_cnn", low_dim=0)


@pytest.mark.parametrize("arch,size", [("small_cnn", 28), ("cifar_resnet18", 12)])
def test_autocast_bf16_and_channels_last(arch, size):
    torch.manual_seed(4)
    model = build_model(arch, in_chans=3).eval()
    x = torch.randn(4, 3, size, size)  # small: bf16 convolutions are slow on CPUs without AMX
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x)
        cl_model = model.to(memory_format=torch.channels_last)
        cl = cl_model(x.to(memory_format=torch.channels_last))
    assert low.dtype == torch.float32  # normalised in float32 even under autocast
    torch.testing.assert_close(low.norm(dim=1), torch.ones(4))
    assert (low * ref).sum(1).min() > 0.98  # bf16 rounding only
    torch.testing.assert_close(cl, ref, rtol=1e-4, atol=1e-5)
    # training step under autocast + channels_last runs and gives finite gradients
    cl_model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = cl_model(x.to(memory_format=torch.channels_last))
    out[:, 0].sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in cl_model.parameters() if p.grad is not None)
