"""Backbones and the embedding head: ``x -> backbone -> Linear(feat_dim, low_dim) -> L2 norm``.

Architectures: torchvision ``resnet18/34/50`` (ImageNet stem), ``cifar_resnet18`` (3x3
stride-1 stem, no max-pool, for 32x32 inputs), ``small_cnn`` (three conv blocks for 28x28
images on a CPU) and ``timm:<name>`` (any timm model, without its classifier). Nothing is
ever downloaded: ``weights`` is a local file whose state_dict is loaded into the backbone.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import SncaError

__all__ = ["ARCHS", "EmbeddingNet", "SmallCNN", "build_backbone", "build_model", "load_backbone_weights"]

ARCHS = ("resnet18", "resnet34", "resnet50", "cifar_resnet18", "small_cnn", "timm:<name>")


class SmallCNN(nn.Module):
    """Three conv blocks (16, 32, 64 channels) and a 256-d fully connected layer, for 28x28 inputs.

    Each block is conv3x3 -> maxpool -> BN -> ReLU: pooling first runs BN and ReLU on a quarter
    of the activations, which is most of the non-conv time on a CPU (28 -> 14 -> 7 -> 3). The
    widths keep the forward pass near 2 M multiply-accumulates per image, so a 2-core CPU
    trains at the ~1,500 images/s the design asks for. An adaptive pool to 3x3 lets other input sizes
    (>= 8 pixels) through with the same parameters.
    """

    def __init__(
        self, in_chans: int = 1, feat_dim: int = 256, widths: tuple[int, ...] = (16, 32, 64)
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = in_chans
        for w in widths:
            layers += [
                nn.Conv2d(c, w, 3, padding=1, bias=False),
                nn.MaxPool2d(2),
                nn.BatchNorm2d(w),
                nn.ReLU(inplace=True),
            ]
            c = w
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(3)
        self.fc = nn.Linear(c * 9, feat_dim)
        self.relu = nn.ReLU(inplace=True)
        self.num_features = feat_dim

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(self.features(x))
        return self.relu(self.fc(torch.flatten(x, 1)))


def _torchvision_resnet(arch: str, in_chans: int) -> tuple[nn.Module, int]:
    from torchvision import models as tvm

    depth = "resnet18" if arch == "cifar_resnet18" else arch
    net = getattr(tvm, depth)(weights=None)
    feat_dim = net.fc.in_features
    net.fc = nn.Identity()
    if arch == "cifar_resnet18":
        # The CIFAR stem: a 3x3 stride-1 conv and no max-pool keep 32x32 inputs at 32x32.
        net.conv1 = nn.Conv2d(in_chans, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    elif in_chans != 3:
        net.conv1 = nn.Conv2d(in_chans, 64, kernel_size=7, stride=2, padding=3, bias=False)
    # torchvision initialises conv weights in the constructor; re-init the replaced stem alike.
    nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    return net, feat_dim


def _timm_model(name: str, in_chans: int) -> tuple[nn.Module, int]:
    try:
        import timm
    except ImportError:
        raise SncaError(f"arch 'timm:{name}' needs timm: pip install timm") from None
    if not name:
        raise SncaError("arch 'timm:' needs a model name, e.g. timm:resnet18 (see timm.list_models())")
    try:
        net = timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_chans)
    except RuntimeError as e:
        if "Unknown model" in str(e) or not timm.is_model(name):
            raise SncaError(f"timm has no model {name!r}: see timm.list_models('*pattern*')") from None
        raise SncaError(f"timm could not build {name!r}: {' '.join(str(e).split())[:200]}") from None
    return net, int(net.num_features)


def build_backbone(arch: str, in_chans: int = 3) -> tuple[nn.Module, int]:
    """A backbone returning pooled features ``(B, feat_dim)``, and ``feat_dim``."""
    if not isinstance(in_chans, int) or in_chans < 1:
        raise SncaError(f"in_chans must be a positive integer, got {in_chans!r}")
    if arch.startswith("timm:"):
        return _timm_model(arch[len("timm:") :].strip(), in_chans)
    if arch in ("resnet18", "resnet34", "resnet50", "cifar_resnet18"):
        return _torchvision_resnet(arch, in_chans)
    if arch == "small_cnn":
        net = SmallCNN(in_chans)
        return net, net.num_features
    raise SncaError(f"unknown arch {arch!r}: choose one of {', '.join(ARCHS)}")


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise SncaError(f"weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickle/zip/safetensors raise many types
        msg = " ".join(str(e).split())[:160]
        raise SncaError(f"cannot load weights from {path}: {type(e).__name__}: {msg}") from None
    # Unwrap the usual containers: {"state_dict": ...}, {"model": ...}, an snca checkpoint.
    for _ in range(3):
        if isinstance(obj, Mapping) and not any(isinstance(v, Tensor) for v in obj.values()):
            inner = next((obj[k] for k in ("state_dict", "model", "model_state_dict", "backbone") if k in obj), None)
            if isinstance(inner, Mapping):
                obj = inner
                continue
        break
    if not isinstance(obj, Mapping) or not any(isinstance(v, Tensor) for v in obj.values()):
        raise SncaError(f"{path} holds no state_dict (expected a dict of tensors, optionally under 'state_dict')")
    return {k: v for k, v in obj.items() if isinstance(v, Tensor)}


def _strip_prefixes(sd: dict[str, Tensor], own: set[str]) -> dict[str, Tensor]:
    """Remove wrapper prefixes ('module.' from DataParallel/DDP, 'backbone.' from EmbeddingNet)."""
    changed = True
    while changed:
        changed = False
        for prefix in ("module.", "backbone.", "_orig_mod."):
            if not (set(sd) & own) and any(k.startswith(prefix) for k in sd):
                sd = {(k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in sd.items()}
                changed = True
    return sd


# Classifier/embedding layers of a source checkpoint that a backbone does not have.
_HEAD_PREFIXES = ("fc.", "head.", "classifier.", "last_linear.")


def load_backbone_weights(backbone: nn.Module, path: str | os.PathLike) -> None:
    """Load a local state_dict into ``backbone`` (strict, except a source classifier is dropped)."""
    p = Path(path).expanduser()
    own = backbone.state_dict()
    sd = _strip_prefixes(_read_state_dict(p), set(own))
    unexpected = [k for k in sd if k not in own]
    # A classifier in the file is expected (e.g. torchvision's ImageNet fc): the backbone has none.
    unexpected = [k for k in unexpected if not k.startswith(_HEAD_PREFIXES)]
    missing = [k for k in own if k not in sd]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        raise SncaError(f"weights in {p} do not fit this backbone: {'; '.join(parts)} keys; check --arch")
    wrong = [(k, tuple(sd[k].shape), tuple(v.shape)) for k, v in own.items() if sd[k].shape != v.shape]
    if wrong:
        k, got, want = wrong[0]
        raise SncaError(
            f"weights in {p} do not fit this backbone: {k} has shape {got}, model needs {want}"
            f" ({len(wrong)} mismatched tensor(s)); check --arch and --in-chans"
        )
    backbone.load_state_dict({k: sd[k] for k in own}, strict=True)


class EmbeddingNet(nn.Module):
    """``forward(x)`` -> L2-normalised ``(B, low_dim)`` float32 embeddings.

    ``forward_features`` gives the backbone's pooled features ``(B, feat_dim)``; ``project`` the
    un-normalised ``(B, low_dim)`` head output. The normalisation runs in float32 even under
    autocast: similarities are divided by a temperature of ~0.05, which would amplify bf16
    rounding (3 significant digits) twentyfold.
    """

    def __init__(self, backbone: nn.Module, feat_dim: int, low_dim: int = 128, arch: str = "custom") -> None:
        super().__init__()
        if not isinstance(low_dim, int) or low_dim < 1:
            raise SncaError(f"low_dim must be a positive integer, got {low_dim!r}")
        self.backbone = backbone
        self.head = nn.Linear(feat_dim, low_dim)
        self.feat_dim = int(feat_dim)
        self.low_dim = int(low_dim)
        self.arch = arch

    def forward_features(self, x: Tensor) -> Tensor:
        return torch.flatten(self.backbone(x), 1)

    def project(self, x: Tensor) -> Tensor:
        return self.head(self.forward_features(x))

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.project(x).float(), dim=1)

    def extra_repr(self) -> str:
        return f"arch={self.arch!r}, feat_dim={self.feat_dim}, low_dim={self.low_dim}"


def build_model(
    arch: str, low_dim: int = 128, in_chans: int = 3, weights: str | os.PathLike | None = None
) -> EmbeddingNet:
    """Build an :class:`EmbeddingNet`; ``weights`` is a local backbone state_dict file (no downloads).

    The file may be a plain state_dict, a dict holding one under 'state_dict' or 'model', with
    'module.' prefixes (DataParallel/DDP) or 'backbone.' ones (an snca checkpoint's model); a
    classifier in it ('fc.', 'head.', 'classifier.') is ignored. Anything else that does not
    match raises SncaError.
    """
    arch = str(arch).strip()
    backbone, feat_dim = build_backbone(arch, in_chans)
    if weights is not None:
        load_backbone_weights(backbone, weights)
    return EmbeddingNet(backbone, feat_dim, low_dim, arch)
