"""Features the protocols compare: a trained network's embedding or penultimate layer, and raw
pixels (flattened, L2-normalised) as the no-learning baseline."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import SncaError

KINDS = ("embedding", "penultimate", "pixels")


def pixel_features(dataset: Any) -> Tensor:
    """(N, H*W*C) raw pixel values of every item, flattened and L2-normalised.

    Reads the untransformed images (``raw_item``), so no normalisation or augmentation changes
    the baseline.
    """
    n = len(dataset)
    if n == 0:
        raise SncaError("the dataset is empty: no pixels to compare")
    if not hasattr(dataset, "raw_item"):
        raise SncaError("raw-pixel features need a dataset with raw_item (an snca.data dataset)")
    rows = [np.asarray(dataset.raw_item(i), dtype=np.float32).reshape(-1) for i in range(n)]
    sizes = {r.size for r in rows}
    if len(sizes) != 1:
        raise SncaError(
            f"images of different sizes ({sorted(sizes)[:4]} values): raw-pixel features need one image size"
        )
    return F.normalize(torch.from_numpy(np.stack(rows)), dim=1)


def model_features(
    model: torch.nn.Module,
    dataset: Any,
    kind: str = "embedding",
    batch_size: int = 256,
    device: str = "cpu",
) -> Tensor:
    """(N, D) L2-normalised features of ``dataset`` under ``model`` (``snca.engine``'s
    extractor), rows in dataset order."""
    if kind not in ("embedding", "penultimate"):
        raise SncaError(f"unknown feature kind {kind!r}: use embedding or penultimate")
    from ..engine import extract_features

    feats, _, indices = extract_features(model, dataset, batch_size=batch_size, device=device, kind=kind)
    feats = torch.as_tensor(feats).float().cpu()
    order = torch.as_tensor(indices).long().cpu()
    if not torch.equal(order, torch.arange(len(order))):  # put rows back in dataset order
        out = torch.empty_like(feats)
        out[order] = feats
        feats = out
    return F.normalize(feats, dim=1)


def dataset_features(
    dataset: Any,
    kind: str,
    model: torch.nn.Module | None = None,
    batch_size: int = 256,
    device: str = "cpu",
) -> Tensor:
    """Features of one kind: "pixels" needs no model; "embedding" / "penultimate" do."""
    if kind == "pixels":
        return pixel_features(dataset)
    if model is None:
        raise SncaError(f"{kind} features need a trained model (a checkpoint)")
    return model_features(model, dataset, kind=kind, batch_size=batch_size, device=device)
