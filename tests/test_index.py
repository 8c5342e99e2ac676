"""GalleryIndex: add / remove / query / save / load, search backends, and the point of it all:
a class the network never trained on becomes recognisable by adding a few of its examples."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from snca import MemoryBank, NCALoss, SncaError
from snca.gallery import BACKENDS, GalleryIndex, dataset_ids

torch.set_num_threads(1)  # the test machine is shared: one thread avoids oversubscription


def clustered(n: int, dim: int, classes: int, seed: int = 0, spread: float = 0.35) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit vectors around ``classes`` random centres, with their class labels."""
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(classes, dim, generator=g), dim=1)
    labels = torch.randint(0, classes, (n,), generator=g)
    x = centres[labels] + spread * torch.randn(n, dim, generator=g) / dim**0.5
    return F.normalize(x, dim=1), labels


def brute_force(queries: np.ndarray, gallery: np.ndarray, labels: np.ndarray, k: int, sigma: float, classes: int):
    """Independent NumPy (float64) top-k cosine search and exp(s / sigma) class vote."""
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    g = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    sims = q @ g.T
    idx = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    top = np.take_along_axis(sims, idx, 1)
    scores = np.zeros((len(q), classes))
    for r in range(len(q)):
        for s, j in zip(top[r], idx[r], strict=True):
            scores[r, labels[j]] += np.exp(s / sigma)
    return top, idx, scores / scores.sum(1, keepdims=True)


# ----------------------------------------------------------------------------- semantics
def test_query_matches_numpy_reference():
    x, y = clustered(600, 16, 5, seed=1)
    q, _ = clustered(25, 16, 5, seed=2)
    index = GalleryIndex(16, [f"c{i}" for i in range(5)], sigma=0.1)
    index.add(x, y, [f"g{i}" for i in range(600)])
    res = index.query(q, k=12)
    top, idx, scores = brute_force(q.double().numpy(), x.double().numpy(), y.numpy(), 12, 0.1, 5)
    assert [[f"g{j}" for j in row] for row in idx] == res.ids
    np.testing.assert_allclose(res.similarities.numpy(), top, atol=1e-5)
    np.testing.assert_allclose(res.scores.numpy(), scores, atol=1e-4)
    assert res.predictions.tolist() == scores.argmax(1).tolist()
    assert res.predicted_names == [f"c{c}" for c in scores.argmax(1)]
    np.testing.assert_allclose(res.predicted_scores.numpy(), scores.max(1), atol=1e-4)
    assert res.labels.tolist() == y.numpy()[idx].tolist()
    summary = res.as_dicts()[0]
    assert summary["prediction"] == f"c{scores[0].argmax()}" and len(summary["neighbors"]) == 12
    json.dumps(summary)  # JSON-ready


def test_add_by_name_new_class_remove_and_ids():
    x, y = clustered(200, 8, 3, seed=3)
    index = GalleryIndex(8, ["a", "b", "c"])
    index.add(x, y, [f"x{i}" for i in range(200)])
    assert index.class_counts() == {n: int((y == i).sum()) for i, n in enumerate("abc")}
    # A brand-new class, added by name: its own examples are now its nearest neighbours.
    new = F.normalize(torch.randn(4, 8, generator=torch.Generator().manual_seed(9)), dim=1)
    index.add(new, ["zebra"] * 4, ["z0", "z1", "z2", "z3"])
    assert index.class_names == ["a", "b", "c", "zebra"] and len(index) == 204
    res = index.query(new, k=1)
    assert res.predicted_names == ["zebra"] * 4 and [r[0] for r in res.ids] == ["z0", "z1", "z2", "z3"]
    assert torch.allclose(res.similarities[:, 0], torch.ones(4), atol=1e-5)
    # Mixed: existing class by index, unnormalised input is normalised on the way in.
    index.add(3 * x[:2], torch.tensor([0, 1]), ["dup-a", "dup-b"])
    assert torch.allclose(index.features[-2:].norm(dim=1), torch.ones(2))
    assert index.remove(["z0", "x5"]) == 2 and len(index) == 204
    assert "z0" not in index.ids and "x5" not in index.ids
    assert "z0" not in index and "z1" in index and "x6" in index
    assert index.query(new[:1], k=3).ids[0][0] != "z0"
    assert index.remove(["nope"], missing_ok=True) == 0
    with pytest.raises(SncaError, match="not in the gallery"):
        index.remove(["nope"])
    with pytest.raises(SncaError, match="already in the gallery"):
        index.add(x[:1], [0], ["x1"])
    with pytest.raises(SncaError, match="unique"):
        index.add(x[:2], [0, 0], ["q", "q"])
    with pytest.raises(SncaError, match="out of range"):
        index.add(x[:1], [7], ["q"])
    with pytest.raises(SncaError, match=r"shape \(n, 8\)"):
        index.add(torch.ones(1, 5), [0], ["q"])
    with pytest.raises(SncaError, match="labels"):
        index.add(x[:2], [0], ["q", "r"])
    with pytest.raises(SncaError, match="NaN"):
        index.add(torch.full((1, 8), float("nan")), [0], ["q"])
    with pytest.raises(SncaError, match="dim 8"):
        index.query(torch.ones(2, 5))
    with pytest.raises(SncaError, match="unknown class"):
        index.class_index("nope", create=False)


def test_empty_gallery_is_a_clear_error():
    index = GalleryIndex(4, ["a"])
    with pytest.raises(SncaError, match="gallery is empty"):
        index.query(torch.ones(1, 4))
    x, y = clustered(3, 4, 1)
    index.add(x, y, ["a", "b", "c"])
    index.remove(["a", "b", "c"])
    with pytest.raises(SncaError, match="gallery is empty"):
        index.query(torch.ones(1, 4))


def test_save_load_roundtrip_without_pickle(tmp_path):
    from safetensors.torch import load_file

    x, y = clustered(300, 12, 4, seed=5)
    index = GalleryIndex(12, ["w", "x", "y", "z"], sigma=0.07, model={"checkpoint": "/m.pt", "weights_sha256": "ab"})
    index.add(x, y, [f"img/{i}.png" for i in range(300)])
    index.add(x[:3] + 0.01, ["new one"] * 3, ["n1", "n2", "n3"])
    index.remove(["img/7.png"])
    index.save(tmp_path / "idx")
    files = sorted(p.name for p in (tmp_path / "idx").iterdir())
    assert files == ["features.safetensors", "index.json"]
    meta = json.loads((tmp_path / "idx" / "index.json").read_text())
    assert meta["class_names"][-1] == "new one" and meta["size"] == 302 and meta["sigma"] == 0.07
    tensors = load_file(str(tmp_path / "idx" / "features.safetensors"))
    assert tensors["features"].dtype == torch.float32 and tensors["labels"].dtype == torch.int64
    loaded = GalleryIndex.load(tmp_path / "idx")
    assert loaded.ids == index.ids and loaded.class_names == index.class_names and loaded.model == index.model
    assert torch.equal(loaded.features, index.features) and torch.equal(loaded.labels, index.labels)
    a, b = index.query(x[:20], k=7), loaded.query(x[:20], k=7)
    assert a.ids == b.ids and torch.equal(a.scores, b.scores)
    # Broken or foreign directories fail with one clear line.
    with pytest.raises(SncaError, match="not a gallery index"):
        GalleryIndex.load(tmp_path)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "index.json").write_text("{not json")
    with pytest.raises(SncaError, match="cannot read"):
        GalleryIndex.load(tmp_path / "bad")


def test_from_memory_bank():
    labels = torch.tensor([2, 0, 1, 0, 2, 1])
    bank = MemoryBank(labels, dim=8, generator=torch.Generator().manual_seed(0))
    index = GalleryIndex.from_memory_bank(bank, ["p", "q", "r"])
    assert torch.allclose(index.features, bank.features_by_index()) and torch.equal(index.labels, labels)
    assert index.ids == [f"train:{i}" for i in range(6)]
    res = index.query(bank.features_by_index()[4:5], k=1)
    assert res.ids == [["train:4"]] and res.predicted_names == ["r"]


def test_dataset_ids_see_through_subsets_and_class_subsets(tmp_path):
    """An image has one id whatever subset or class subset it is seen through: its index in the
    full split (array datasets) or its file path (folders)."""
    from PIL import Image

    from snca.data import build_dataset, class_subset

    full = build_dataset("mnist5k", "train")
    sub = build_dataset("mnist5k", "train", subset=300, seed=0)
    base = class_subset(sub, ["5", "6", "7", "8", "9"])
    ids = dataset_ids(base, range(len(base)), "mnist5k", "train")
    assert len(ids) == len(base) and all(int(full.targets[int(i.rsplit(":", 1)[1])]) >= 5 for i in ids)
    expect = [f"mnist5k:train:{int(sub.source_indices[int(j)])}" for j in base.source_indices]
    assert ids == expect
    for c in ("a", "b"):
        (tmp_path / "train" / c).mkdir(parents=True)
        for j in range(2):
            Image.new("RGB", (8, 8), (40 * j, 90, 0)).save(tmp_path / "train" / c / f"{j}.png")
    folder = build_dataset("folder", "train", data_dir=tmp_path)
    only_b = class_subset(folder, ["b"])
    assert dataset_ids(only_b, range(2), "folder", "train") == [str(tmp_path / "train" / "b" / f"{j}.png") for j in range(2)]


# ----------------------------------------------------------------------------- backends
def test_faiss_backends_agree_with_exact_search(tmp_path):
    x, y = clustered(4000, 32, 40, seed=7)
    q, _ = clustered(200, 32, 40, seed=8)
    exact = GalleryIndex(32, [str(i) for i in range(40)])
    exact.add(x, y, [str(i) for i in range(4000)])
    ref = exact.query(q, k=10)
    for backend in ("faiss-flat", "faiss-ivf", "faiss-hnsw"):
        index = GalleryIndex(32, [str(i) for i in range(40)], backend=backend, backend_params={"nprobe": 8})
        index.add(x, y, [str(i) for i in range(4000)])
        res = index.query(q, k=10)
        recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(res.ids, ref.ids, strict=True)])
        if backend == "faiss-flat":  # exact: same neighbours (order may differ only on float ties)
            assert recall == 1.0
            assert torch.allclose(res.similarities, ref.similarities, atol=1e-5)
        else:
            assert recall >= 0.9, (backend, recall)
        assert (res.predictions == ref.predictions).float().mean() >= 0.95
        # Incremental add (no rebuild) finds the new rows; removal triggers a rebuild.
        index.add(q[:5], ["fresh"] * 5, [f"q{i}" for i in range(5)])
        assert [r[0] for r in index.query(q[:5], k=1).ids] == [f"q{i}" for i in range(5)]
        index.remove(["q0", "q1"])
        top = index.query(q[:2], k=3).ids
        assert all(i not in ("q0", "q1") for row in top for i in row)
        # The faiss structure is saved and reloaded with the index.
        index.save(tmp_path / backend)
        assert (tmp_path / backend / "faiss.index").is_file()
        loaded = GalleryIndex.load(tmp_path / backend)
        assert loaded._searcher.index is not None and loaded._searcher.index.ntotal == len(index)
        assert loaded.query(q[:20], k=5).ids == index.query(q[:20], k=5).ids
    # Switching backend keeps the data.
    exact.set_backend("faiss-flat")
    assert [set(r) for r in exact.query(q, k=10).ids] == [set(r) for r in ref.ids]


def test_missing_faiss_and_unknown_backend(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` now raises ImportError
    for backend in BACKENDS[1:]:
        with pytest.raises(SncaError, match="pip install faiss-cpu"):
            GalleryIndex(4, backend=backend)
    with pytest.raises(SncaError, match="unknown search backend"):
        GalleryIndex(4, backend="annoy")
    GalleryIndex(4, backend="torch")  # needs nothing


# ----------------------------------------------------------------------------- new classes
@pytest.fixture(scope="module")
def mnist():
    from snca.data import build_dataset

    def flat(split):
        ds = build_dataset("mnist5k", split)
        return ds.images.float().flatten(1) / 255.0, ds.targets

    return flat("train"), flat("test")


def test_unseen_class_becomes_recognisable_by_adding_examples(mnist):
    """Train an embedding (small MLP, snca's NCALoss + MemoryBank) on digits 0-7 only; digits 8
    and 9 are never seen in training. Adding 5 examples of each to the gallery makes them
    recognisable, with no retraining."""
    (xtr, ytr), (xte, yte) = mnist
    seen = ytr < 8
    xs, ys = xtr[seen], ytr[seen]
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 64))
    bank = MemoryBank(ys, dim=64, generator=torch.Generator().manual_seed(0))
    criterion = NCALoss(bank, temperature=0.05)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        perm = torch.randperm(len(xs), generator=g)
        for a in range(0, len(xs), 128):
            idx = perm[a : a + 128]
            loss = criterion(F.normalize(net(xs[idx]), dim=1), idx)
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()

    def embed(x):
        with torch.no_grad():
            return F.normalize(net(x), dim=1)

    novel = yte >= 8
    names = [str(d) for d in range(8)]
    shots = {d: torch.nonzero(ytr == d).flatten()[:5] for d in range(10)}

    # (1) The whole training set of 0-7 as gallery: seen digits are classified well, and an
    # 8 or a 9 cannot be: the gallery has no such class.
    full = GalleryIndex(64, names)
    full.add(embed(xs), ys, [f"train:{i}" for i in torch.nonzero(seen).flatten().tolist()])
    seen_acc = (full.query(embed(xte[~novel]), k=20).predictions == yte[~novel]).float().mean()
    assert seen_acc > 0.9
    before = full.query(embed(xte[novel]), k=20)
    assert set(before.predicted_names) <= set(names)

    # (2) A few-shot gallery, 5 examples per class. Before: 8/9 queries are never right.
    gallery = GalleryIndex(64, names)
    for d in range(8):
        gallery.add(embed(xtr[shots[d]]), [str(d)] * 5, [f"train:{i}" for i in shots[d].tolist()])
    assert not any(n in ("8", "9") for n in gallery.query(embed(xte[novel]), k=20).predicted_names)
    # After adding 5 examples each of 8 and 9 (new class names, no retraining):
    for d in (8, 9):
        gallery.add(embed(xtr[shots[d]]), [str(d)] * 5, [f"train:{i}" for i in shots[d].tolist()])
    after = gallery.query(embed(xte[novel]), k=20)
    truth = [str(int(t)) for t in yte[novel]]
    acc_novel = np.mean([p == t for p, t in zip(after.predicted_names, truth, strict=True)])
    assert acc_novel > 0.3, acc_novel  # 10-way: chance is 0.1 (measured: about 0.45)
    # Told that a query is new, the 5 examples separate 8 from 9 almost perfectly (chance 0.5).
    eight, nine = gallery.class_index("8"), gallery.class_index("9")
    pick = torch.where(after.scores[:, eight] >= after.scores[:, nine], 8, 9)
    assert (pick == yte[novel]).float().mean() > 0.8
    # And the full gallery with the 10 new examples added now does predict 8s and 9s.
    for d in (8, 9):
        full.add(embed(xtr[shots[d]]), [str(d)] * 5, [f"new:{i}" for i in shots[d].tolist()])
    res = full.query(embed(xte[novel]), k=1)
    assert sum(p == t for p, t in zip(res.predicted_names, truth, strict=True)) > 0
