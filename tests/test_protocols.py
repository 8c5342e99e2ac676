"""Generalisation protocols: sub-category kNN, few-shot episodes, retrieval, the report.

Each protocol is checked on small real data with a known answer (one-hot label embeddings
must be perfect), against an independent reference (scikit-learn's kNN on raw MNIST pixels,
a brute-force mAP@R, pytorch-metric-learning's AccuracyCalculator, a per-episode loop), and
for its failure modes (bad splits raise one-line SncaErrors).
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from snca.cli import main
from snca.data import (
    COARSE_GROUPS,
    DIGIT_COARSE_GROUPS,
    FASHION_MNIST_CLASSES,
    MNIST_CLASSES,
    CoarseLabels,
    build_dataset,
    class_subset,
    parse_split_text,
    read_split_file,
    resolve_split,
    split_from_novel,
)
from snca.errors import SncaError
from snca.features import extract
from snca.protocols import (
    confidence_interval,
    episode_accuracies,
    fewshot_evaluate,
    knn_accuracy,
    retrieval_metrics,
    sample_episodes,
    subcategory_accuracy,
)


def pixel_features(dataset):
    return extract(None, dataset, "pixels").features

# The protocol report driver is a script of the repository (experiments/report.py), not a module
# of the package: load it from its file.
_REPORT_SPEC = importlib.util.spec_from_file_location(
    "experiments_report", Path(__file__).resolve().parents[1] / "experiments" / "report.py"
)
report_driver = importlib.util.module_from_spec(_REPORT_SPEC)
sys.modules[_REPORT_SPEC.name] = report_driver  # its dataclasses look their module up
_REPORT_SPEC.loader.exec_module(report_driver)
DEFAULT_NOVEL, findings, render_markdown = (
    report_driver.DEFAULT_NOVEL, report_driver.findings, report_driver.render_markdown
)

ROOT = Path(__file__).resolve().parents[1]
SPLITS = ROOT / "splits"


def one_hot(labels: torch.Tensor, num: int | None = None) -> torch.Tensor:
    return F.normalize(F.one_hot(labels.long(), num or int(labels.max()) + 1).float(), dim=1)


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: these workloads are tiny, and the test machine's cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def mnist5k():
    return build_dataset("mnist5k", "train"), build_dataset("mnist5k", "test")


@pytest.fixture(scope="module")
def fashion_labels():
    """Real Fashion-MNIST labels (train subset, test subset) and the coarse mapping."""
    train = build_dataset("fashion-mnist", "train", subset=3000, label_set="coarse")
    test = build_dataset("fashion-mnist", "test", subset=1000, label_set="coarse")
    return train, test


# ------------------------------------------------------------------ known answers (one-hot)


def test_one_hot_embedding_is_perfect_on_every_protocol(mnist5k):
    train, test = mnist5k
    g, q = one_hot(train.targets, 10), one_hot(test.targets, 10)
    acc = knn_accuracy(g, train.targets, q, test.targets, k=30, sigma=0.05)
    assert acc.top1 == 1.0
    # Sub-category with fine = coarse is plain kNN: perfect too.
    sub = subcategory_accuracy(g, train.targets, q, test.targets, k=[1, 30], fine_to_coarse=list(range(10)))
    assert all(r.top1 == 1.0 and r.coarse_top1 == 1.0 and r.chance_within_coarse == 1.0 for r in sub.values())
    for method in ("knn", "ncm"):
        for shot in (1, 5):
            res = fewshot_evaluate(q, test.targets, DEFAULT_NOVEL["mnist5k"], 5, shot, 15, 200, 0, method)
            assert res.mean == 1.0 and res.ci95 == 0.0
    loo = retrieval_metrics(q, test.targets)
    assert loo.recall[1] == loo.map_at_r == loo.r_precision == loo.precision_at_1 == 1.0
    cross = retrieval_metrics(q, test.targets, g, train.targets)
    assert cross.recall[1] == cross.map_at_r == 1.0 and not cross.leave_one_out


def test_subcategory_fine_one_hot_on_fashion_groups(fashion_labels):
    """A feature that keeps every fine class apart recovers the fine labels exactly although
    the coarse labels were used for training; the chance level within the right coarse group is
    mean(1 / group size) = (4 * 1/4 + 2 * 1/2 + 3 * 1/3 + 1) / 10 = 0.4 with balanced classes."""
    train, test = fashion_labels
    assert train.classes == list(COARSE_GROUPS) and train.num_classes == 4
    mapping = train.coarse_of_fine
    res = subcategory_accuracy(
        one_hot(train.fine_targets, 10), train.fine_targets, one_hot(test.fine_targets, 10),
        test.fine_targets, k=30, fine_to_coarse=mapping,
    )
    assert res.top1 == 1.0 and res.coarse_top1 == 1.0
    assert res.chance_within_coarse == pytest.approx(0.4, abs=1e-9)
    # A feature that only knows the coarse class (one-hot coarse + noise) is right about the
    # coarse class and near chance about the fine one: far from perfect.
    gen = torch.Generator().manual_seed(0)
    noisy = lambda y: F.normalize(one_hot(y, 4) + 0.01 * torch.randn(len(y), 4, generator=gen), dim=1)  # noqa: E731
    coarse_only = subcategory_accuracy(
        noisy(train.targets), train.fine_targets, noisy(test.targets), test.fine_targets, k=30,
        fine_to_coarse=mapping,
    )
    assert coarse_only.coarse_top1 == 1.0
    assert coarse_only.top1 < 0.6


def test_raw_pixels_match_sklearn_cosine_knn_on_mnist5k(mnist5k):
    """Raw-pixel kNN on the 5k MNIST digits equals scikit-learn's brute-force cosine kNN (fed
    the unnormalised uint8 pixels straight from the dataset's array)."""
    from sklearn.neighbors import KNeighborsClassifier
    from threadpoolctl import threadpool_limits

    train, test = mnist5k
    ftr, fte = pixel_features(train), pixel_features(test)
    assert ftr.shape == (4000, 784) and fte.shape == (1000, 784)
    xtr = train.images.reshape(len(train), -1).numpy().astype(np.float64)
    xte = test.images.reshape(len(test), -1).numpy().astype(np.float64)
    ytr, yte = train.targets.numpy(), test.targets.numpy()
    sigma = 0.05
    ours_all = knn_accuracy(ftr, train.targets, fte, test.targets, k=[1, 30], sigma=sigma)
    for k in (1, 30):
        ours = ours_all[k].top1
        weights = "uniform" if k == 1 else (lambda d: np.exp((1.0 - d) / sigma))
        clf = KNeighborsClassifier(n_neighbors=k, algorithm="brute", metric="cosine", weights=weights)
        with threadpool_limits(1):  # as for torch: the shared cores punish oversubscription
            ref = float((clf.fit(xtr, ytr).predict(xte) == yte).mean())
        assert ours == pytest.approx(ref, abs=1e-6), k  # 1e-6 << one query (1e-3): same count
    assert 0.9 < ours < 1.0


# ------------------------------------------------------------------ retrieval


def brute_force_retrieval(q, ql, g, gl, loo, ks):
    """Per-query loops in numpy/float64: full sort of every gallery row, AP@R from its definition."""
    q, g = q.double().numpy(), g.double().numpy()
    ql, gl = ql.numpy(), gl.numpy()
    recalls = {k: [] for k in ks}
    aps, rps, p1 = [], [], []
    for i in range(len(q)):
        sims = g @ q[i]
        keep = np.ones(len(g), bool)
        if loo:
            keep[i] = False
        order = [j for j in np.argsort(-sims, kind="stable") if keep[j]]
        rel = np.array([gl[j] == ql[i] for j in order])
        r = int(rel.sum())
        if r == 0:
            continue
        for k in ks:
            recalls[k].append(rel[:k].any())
        p1.append(rel[0])
        hits, ap = 0, 0.0
        for rank in range(1, r + 1):
            if rel[rank - 1]:
                hits += 1
                ap += hits / rank
        aps.append(ap / r)
        rps.append(rel[:r].sum() / r)
    return {k: np.mean(v) for k, v in recalls.items()}, np.mean(p1), np.mean(rps), np.mean(aps), len(aps)


@pytest.mark.parametrize("loo", [True, False])
def test_map_at_r_matches_brute_force_on_random_data(loo):
    gen = torch.Generator().manual_seed(1)
    # Clustered random data (classes of very different sizes), so the metrics are far from 0 and 1.
    centers = torch.randn(6, 16, generator=gen)
    ql = torch.randint(0, 6, (160,), generator=gen)
    q = F.normalize(centers[ql] + 1.3 * torch.randn(160, 16, generator=gen), dim=1)
    if loo:
        g, gl = None, None
    else:
        gl = torch.cat([torch.full((n,), c) for c, n in enumerate([3, 40, 7, 90, 1])])  # class 5 absent
        g = F.normalize(centers[gl] + 1.3 * torch.randn(len(gl), 16, generator=gen), dim=1)
    ks = (1, 2, 4, 8)
    # A tiny neighbour budget forces one query per block: the blocking must not change anything.
    for budget in (8 << 20, 50):
        res = retrieval_metrics(q, ql, g, gl, ks=ks, neighbor_budget=budget)
        recall, p1, rp, ap, n = brute_force_retrieval(q, ql, q if loo else g, ql if loo else gl, loo, ks)
        assert res.num_queries == n
        assert res.num_without_match == len(q) - n
        for k in ks:
            assert res.recall[k] == pytest.approx(recall[k], abs=1e-12)
        assert res.precision_at_1 == pytest.approx(p1, abs=1e-12)
        assert res.r_precision == pytest.approx(rp, abs=1e-12)
        assert res.map_at_r == pytest.approx(ap, abs=1e-9)
        assert 0.05 < res.map_at_r < 0.95
    if not loo:
        assert res.num_without_match == int((ql == 5).sum()) > 0


def test_map_at_r_matches_pytorch_metric_learning():
    """The published reference implementation of mAP@R (Musgrave et al.) agrees."""
    from pytorch_metric_learning.distances import CosineSimilarity
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
    from pytorch_metric_learning.utils.inference import CustomKNN

    gen = torch.Generator().manual_seed(2)
    centers = torch.randn(5, 12, generator=gen)
    y = torch.randint(0, 5, (300,), generator=gen)
    x = F.normalize(centers[y] + 1.2 * torch.randn(300, 12, generator=gen), dim=1).double()
    calc = AccuracyCalculator(
        include=("mean_average_precision_at_r", "precision_at_1", "r_precision"),
        k="max_bin_count",
        knn_func=CustomKNN(CosineSimilarity()),
    )
    ref = calc.get_accuracy(x, y, x, y, ref_includes_query=True)
    ours = retrieval_metrics(x, y)
    assert ours.map_at_r == pytest.approx(ref["mean_average_precision_at_r"], abs=1e-6)
    assert ours.precision_at_1 == pytest.approx(ref["precision_at_1"], abs=1e-9)
    assert ours.r_precision == pytest.approx(ref["r_precision"], abs=1e-6)


def test_retrieval_rejects_bad_input():
    x = F.normalize(torch.randn(4, 3), dim=1)
    with pytest.raises(SncaError):
        retrieval_metrics(x, torch.arange(4))  # every class a singleton: nothing to retrieve
    with pytest.raises(SncaError):
        retrieval_metrics(x, torch.zeros(3))
    with pytest.raises(SncaError):
        retrieval_metrics(x, torch.zeros(4), ks=(0,))


# ------------------------------------------------------------------ episodes


def test_episodes_are_seeded_and_stratified():
    labels = torch.arange(8).repeat_interleave(torch.tensor([30, 25, 40, 22, 60, 21, 33, 50]))
    labels = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]
    novel = [1, 3, 4, 5, 6, 7]
    a = sample_episodes(labels, novel, n_way=5, n_shot=3, n_query=4, episodes=300, seed=7)
    b = sample_episodes(labels, novel, n_way=5, n_shot=3, n_query=4, episodes=300, seed=7)
    c = sample_episodes(labels, novel, n_way=5, n_shot=3, n_query=4, episodes=300, seed=8)
    assert torch.equal(a.support, b.support) and torch.equal(a.query, b.query) and torch.equal(a.classes, b.classes)
    assert not torch.equal(a.support, c.support)
    assert a.support.shape == (300, 5, 3) and a.query.shape == (300, 5, 4)
    for e in range(300):
        cls = a.classes[e]
        assert len(set(cls.tolist())) == 5 and set(cls.tolist()) <= set(novel)
        samples = torch.cat([a.support[e], a.query[e]], dim=1)  # (N, K + Q)
        assert samples.unique().numel() == 5 * 7  # all distinct: supports and queries disjoint
        assert torch.equal(labels[samples], cls[:, None].expand(5, 7))
    # Uniform over classes: each of the 6 novel classes is in 5/6 of the episodes.
    counts = torch.bincount(a.classes.flatten(), minlength=8)[novel].double()
    assert torch.all((counts / 300 - 5 / 6).abs() < 0.08)


def test_episode_sampling_is_fast():
    """1,000 episodes among Fashion-MNIST-sized classes (6,000 images each) in a second or two."""
    labels = torch.arange(10).repeat(6000)
    start = time.perf_counter()
    eps = sample_episodes(labels, [5, 6, 7, 8, 9], 5, 5, 15, 1000, seed=0)
    feats = F.normalize(torch.randn(len(labels), 64, generator=torch.Generator().manual_seed(0)), dim=1)
    acc = episode_accuracies(feats, eps, "knn")
    elapsed = time.perf_counter() - start
    assert acc.shape == (1000,)
    assert elapsed < 10, f"1,000 episodes took {elapsed:.1f} s"


def test_episode_accuracy_matches_a_per_episode_loop():
    gen = torch.Generator().manual_seed(3)
    labels = torch.arange(6).repeat_interleave(20)
    centers = torch.randn(6, 10, generator=gen)
    feats = F.normalize(centers[labels] + 1.5 * torch.randn(len(labels), 10, generator=gen), dim=1)
    eps = sample_episodes(labels, range(6), n_way=4, n_shot=3, n_query=5, episodes=12, seed=1)
    sigma = 0.1
    for method, k in (("knn", None), ("knn", 2), ("ncm", None)):
        got = episode_accuracies(feats, eps, method, k=k, sigma=sigma)
        for e in range(12):
            correct = 0
            for n in range(4):
                for qi in eps.query[e, n].tolist():
                    scores = []
                    for m in range(4):
                        sup = feats[eps.support[e, m]].double()
                        if method == "ncm":
                            mean = sup.mean(0)
                            scores.append(float(feats[qi].double() @ (mean / mean.norm())))
                    if method == "knn":
                        all_sup = feats[eps.support[e].flatten()].double()
                        sims = all_sup @ feats[qi].double()
                        owner = torch.arange(4).repeat_interleave(3)
                        top = torch.argsort(sims, descending=True)[: (k or 12)]
                        scores = [float(sum(math.exp(sims[t] / sigma) for t in top if owner[t] == m)) for m in range(4)]
                    correct += int(int(np.argmax(scores)) == n)
            assert got[e].item() == pytest.approx(correct / 20), (method, k, e)


def test_confidence_interval_formula():
    acc = torch.tensor([0.2, 0.4, 0.4, 0.6, 1.0, 0.8])
    mean, ci = confidence_interval(acc)
    assert mean == pytest.approx(0.5666666666666667)
    assert ci == pytest.approx(1.96 * np.std(acc.numpy().astype(np.float64)) / math.sqrt(6))
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(5).repeat(30)
    feats = F.normalize(torch.randn(150, 8, generator=gen), dim=1)
    res = fewshot_evaluate(feats, labels, range(5), 5, 1, 5, 500, seed=0)
    assert res.ci95 == pytest.approx(1.96 * float(res.accuracies.std(correction=0)) / math.sqrt(500))
    assert 0.1 < res.mean < 0.3  # random features: chance is 0.2


# ------------------------------------------------------------------ splits


def one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg and msg
    return msg


def test_bad_splits_raise_one_line_errors():
    classes = FASHION_MNIST_CLASSES
    with pytest.raises(SncaError) as err:
        resolve_split(parse_split_text("[base]\nBag\nCoat\n[novel]\nBag\nSandal\n"), classes)
    assert "'Bag'" in one_line(err) and "both" in one_line(err)
    with pytest.raises(SncaError) as err:  # the same, caught while parsing the file
        parse_split_text("[novel]\nBag\n[base]\nCoat\nBag\n")
    assert "both [novel] and [base]" in one_line(err)
    with pytest.raises(SncaError) as err:
        parse_split_text("[novel]\nBag\nBag\n")
    assert "twice" in one_line(err)
    with pytest.raises(SncaError) as err:  # a name and an id of the same class
        resolve_split(parse_split_text("[base]\n8\n[novel]\nBag\n"), classes)
    assert "'Bag'" in one_line(err) and "both" in one_line(err)
    with pytest.raises(SncaError) as err:
        resolve_split(parse_split_text("[base]\nCoat\n[novel]\nHat\n"), classes)
    assert "'Hat'" in one_line(err)
    with pytest.raises(SncaError) as err:
        split_from_novel(["Sandal", "12"], classes)
    assert "'12'" in one_line(err)
    with pytest.raises(SncaError) as err:
        parse_split_text("Coat\n[novel]\nBag\n")
    assert "before any" in one_line(err)
    with pytest.raises(SncaError) as err:
        parse_split_text("[bas]\nCoat\n[novel]\nBag\n")
    assert "unknown section" in one_line(err)
    with pytest.raises(SncaError) as err:
        parse_split_text("[base]\nCoat\n")
    assert "novel" in one_line(err)
    with pytest.raises(SncaError) as err:
        read_split_file("/nonexistent/split.txt")
    one_line(err)
    labels = torch.arange(6).repeat_interleave(torch.tensor([20, 20, 20, 20, 20, 7]))
    with pytest.raises(SncaError) as err:  # 7 samples < shot + query = 1 + 15 in class 5
        sample_episodes(labels, [1, 2, 3, 4, 5], 5, 1, 15)
    assert "class 5" in one_line(err) and "16" in one_line(err)
    with pytest.raises(SncaError) as err:  # 5-way needs 5 novel classes
        sample_episodes(labels, [1, 2, 3], 5, 1, 5)
    assert "5-way" in one_line(err)
    with pytest.raises(SncaError):
        episode_accuracies(torch.randn(120, 4), sample_episodes(labels, [0, 1], 2, 1, 2, 5), "svm")


def test_shipped_split_files():
    fm = resolve_split(read_split_file(SPLITS / "fashion-mnist-novel.txt"), FASHION_MNIST_CLASSES)
    assert fm.novel == DEFAULT_NOVEL["fashion-mnist"] and fm.base == [0, 1, 2, 3, 4] and fm.val == []
    mn = resolve_split(read_split_file(SPLITS / "mnist-novel.txt"), MNIST_CLASSES)
    assert mn.novel == DEFAULT_NOVEL["mnist5k"] == DEFAULT_NOVEL["mnist"]
    mini = read_split_file(SPLITS / "miniimagenet.txt")
    assert (len(mini.base), len(mini.val), len(mini.novel)) == (64, 16, 20)
    # Flag form: names or ids, the rest are base.
    flag = split_from_novel(["7", "Bag", 9], FASHION_MNIST_CLASSES)
    assert flag.novel == [7, 8, 9] and flag.base == list(range(7))


def _write_folder(root: Path, classes: list[str], per_class: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(d / f"{i}.png")


def test_miniimagenet_split_on_a_folder_dataset(tmp_path):
    """The 64/16/20 miniImageNet split file drives a folder dataset: base training subset and
    novel-class episodes (tiny random images; the point is the class bookkeeping)."""
    split_file = read_split_file(SPLITS / "miniimagenet.txt")
    classes = split_file.base + split_file.val + split_file.novel
    _write_folder(tmp_path, classes, per_class=3)
    train = build_dataset("folder", "train", data_dir=tmp_path)
    val = build_dataset("folder", "val", data_dir=tmp_path)
    split = resolve_split(split_file, train.classes)
    assert (len(split.base), len(split.val), len(split.novel)) == (64, 16, 20)
    base = class_subset(train, split.base)
    assert len(base) == 64 * 3 and base.num_classes == 64 and base.classes == sorted(split_file.base)
    assert base.targets.unique().tolist() == list(range(64))
    image, label, index = base[100]
    assert index == 100 and label == int(base.targets[100])
    assert train.classes[int(train.targets[base.source_indices[100]])] == base.classes[label]
    assert torch.equal(image, train[int(base.source_indices[100])][0])
    feats = pixel_features(val)
    res = fewshot_evaluate(feats, val.targets, split.novel, 5, 1, 2, 50, seed=0)
    assert 0.0 <= res.mean <= 1.0
    with pytest.raises(SncaError):  # 3 images per class < 1 + 15
        fewshot_evaluate(feats, val.targets, split.novel, 5, 1, 15, 50)


def test_class_subset_and_coarse_wrappers(mnist5k):
    """class_subset remaps labels to 0..B-1 and renumbers indices, so a memory bank sized for
    the subset addresses it (training through snca.engine on both wrappers is exercised by the
    report test below)."""
    train = mnist5k[0]
    base = class_subset(train, ["0", "1", 2, 3, 4])
    assert base.num_classes == 5 and len(base) == int((train.targets < 5).sum())
    assert torch.equal(base.targets, train.targets[base.source_indices])  # ids 0-4 stay 0-4
    assert [base[i][2] for i in range(0, len(base), 97)] == list(range(0, len(base), 97))
    assert base.name == "mnist5k" and base.transform is train.transform
    with pytest.raises(AttributeError):
        base.images  # noqa: B018 - per-item arrays of the wrapped dataset are not forwarded
    sub = class_subset(train, [7, 9])
    assert sub.targets.unique().tolist() == [0, 1] and sub.classes == ["7", "9"]
    assert torch.equal(sub.targets, (train.targets[sub.source_indices] == 9).long())
    image, label, index = sub[3]
    assert index == 3 and torch.equal(image, train[int(sub.source_indices[3])][0])
    coarse = CoarseLabels(train, DIGIT_COARSE_GROUPS)
    assert coarse.num_classes == 3 and torch.equal(coarse.fine_targets, train.targets)
    assert coarse[5][1] == int(coarse.fine_to_coarse[train.targets[5]])
    assert sorted(d for group in DIGIT_COARSE_GROUPS.values() for d in group) == [str(i) for i in range(10)]  # class names now


def _write_cifar100(root: Path, per_class: int = 2) -> None:
    """A tiny CIFAR-100 in the python pickle layout: 100 fine classes, superclass = fine // 5."""
    import pickle

    d = root / "cifar-100-python"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    fine = np.repeat(np.arange(100), per_class)
    for split in ("train", "test"):
        batch = {"data": rng.integers(0, 256, (len(fine), 3072), dtype=np.uint8),
                 "fine_labels": fine.tolist(), "coarse_labels": (fine // 5).tolist()}
        (d / split).write_bytes(pickle.dumps(batch))
    meta = {"fine_label_names": [f"f{i}" for i in range(100)], "coarse_label_names": [f"c{i}" for i in range(20)]}
    (d / "meta").write_bytes(pickle.dumps(meta))


def test_subcategory_command_on_cifar100_and_folder_coarse_labels(tmp_path, capsys):
    """CIFAR-100's 20 superclasses and a folder's fine-to-coarse mapping file reach the
    sub-category evaluation: the chance level within the right coarse class is exact."""
    _write_cifar100(tmp_path / "c100")
    code, out, _ = run_cli(capsys, "subcategory", "--features", "pixels", "--dataset", "cifar100",
                           "--data-dir", str(tmp_path / "c100"), "--k", "1", "--json")
    assert code == 0
    res = json.loads(out)
    assert res["fine_classes"] == 100 and res["num_gallery"] == res["num_queries"] == 200
    assert res["results"][0]["chance_within_coarse"] == pytest.approx(1 / 5)
    train = build_dataset("cifar100", "train", data_dir=tmp_path / "c100", label_set="coarse")
    assert train.num_classes == 20 and torch.equal(train.targets, train.fine_targets // 5)
    perfect = subcategory_accuracy(one_hot(train.fine_targets), train.fine_targets, one_hot(train.fine_targets),
                                   train.fine_targets, k=5, fine_to_coarse=train.coarse_of_fine)
    assert perfect.top1 == perfect.coarse_top1 == 1.0

    folder = tmp_path / "folder"
    _write_folder(folder, ["cat", "dog", "lion", "car", "bus"], per_class=3)
    (folder / "coarse.txt").write_text("cat animal\ndog animal\nlion animal\ncar vehicle\nbus vehicle\n")
    code, out, _ = run_cli(capsys, "subcategory", "--features", "pixels", "--dataset", "folder",
                           "--data-dir", str(folder), "--json")
    assert code == 0
    # 9 queries in a 3-class group, 6 in a 2-class group: mean(1/3 x 9, 1/2 x 6) = 0.4.
    assert json.loads(out)["results"][0]["chance_within_coarse"] == pytest.approx(0.4)


# ------------------------------------------------------------------ commands and report


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_protocol_commands_on_pixels(capsys, mnist5k):
    code, out, _ = run_cli(capsys, "fewshot", "--features", "pixels", "--dataset", "mnist5k",
                           "--novel-classes", "5", "6", "7", "8", "9", "--episodes", "100", "--json")
    assert code == 0
    res = json.loads(out)
    assert {(r["shot"], r["method"]) for r in res["results"]} == {(1, "knn"), (1, "ncm"), (5, "knn"), (5, "ncm")}
    assert all(0.2 < r["accuracy"] <= 1 for r in res["results"])
    code, out, _ = run_cli(capsys, "retrieval", "--features", "pixels", "--dataset", "mnist5k", "--json")
    res = json.loads(out)
    assert code == 0 and res["recall@1"] > 0.85 and 0.1 < res["map@r"] < res["recall@1"]
    code, out, _ = run_cli(capsys, "subcategory", "--features", "pixels", "--dataset", "mnist5k", "--k", "1", "30")
    assert code == 0 and "chance in coarse" in out
    code, _, err = run_cli(capsys, "fewshot", "--features", "pixels", "--dataset", "mnist5k",
                           "--novel-classes", "5", "6", "--way", "5")
    assert code == 2 and err.startswith("snca: error:") and err.count("\n") == 1
    code, _, err = run_cli(capsys, "fewshot", "--dataset", "mnist5k", "--novel-classes", "5")
    assert code == 2 and "checkpoint" in err


def test_protocol_commands_on_a_checkpoint(tmp_path, capsys):
    code, _, _ = run_cli(capsys, "train", "--dataset", "mnist5k", "--subset", "200", "--test-subset", "100",
                         "--epochs", "1", "--no-plot", "--no-progress", "--out-dir", str(tmp_path), "--name", "m")
    assert code == 0
    ckpt = str(tmp_path / "m")
    code, out, _ = run_cli(capsys, "retrieval", ckpt, "--gallery", "train", "--json")
    assert code == 0 and json.loads(out)["num_queries"] == 1000
    code, out, err = run_cli(capsys, "fewshot", ckpt, "--split-file", str(SPLITS / "mnist-novel.txt"),
                             "--episodes", "50", "--shot", "1", "--method", "ncm")
    assert code == 0 and "5-way 1-shot" in out and "not novel" in err  # trained on all 10 digits
    code, out, err = run_cli(capsys, "subcategory", ckpt, "--features", "penultimate")
    assert code == 0 and "not sub-category discovery" in err


def test_report_quick_end_to_end(tmp_path, capsys):
    # The driver refreshes only the results between its markers; the prose around them stays.
    doc = tmp_path / "p.md"
    doc.write_text(f"# Title\n\nProse.\n\n{report_driver.BEGIN}\nold results\n{report_driver.END}\n\n## After\n")
    code = report_driver.main(["--quick", "--datasets", "mnist5k", "--threads", "1",
                               "--out", str(doc), "--json", str(tmp_path / "p.json")])
    out = capsys.readouterr().out
    assert code == 0 and "wrote" in out
    md = doc.read_text()
    result = json.loads((tmp_path / "p.json").read_text())
    assert md.startswith("# Title\n\nProse.\n\n") and md.endswith(f"{report_driver.END}\n\n## After\n")
    assert "old results" not in md and md.count(report_driver.BEGIN) == 1
    assert ".venv/bin/python experiments/report.py --quick --datasets mnist5k" in md
    assert "These numbers come from `--quick`" in md.split("## mnist5k")[0]
    for label in ("NCA embedding", "softmax embedding", "softmax penultimate", "raw pixels"):
        assert f"| {label} |" in md
    ds = result["datasets"][0]
    assert ds["dataset"] == "mnist5k" and len(ds["runs"]) == 6
    assert {(r["loss"], r["labels"]) for r in ds["runs"]} == {
        (loss, labels) for loss in ("nca", "softmax") for labels in ("all classes", "coarse labels", "base classes")
    }
    assert [r["classes"] for r in ds["runs"][:3]] == [10, 3, 5]
    for name, m in ds["metrics"].items():
        assert 0 <= m["knn_top1"] <= 1 and 0 <= m["subcategory"]["top1"] <= 1, name
        assert set(m["fewshot"]) == {"1-shot knn", "1-shot ncm", "5-shot knn", "5-shot ncm"}
        assert m["fewshot"]["1-shot knn"]["episodes"] == 100
        assert 0 < m["retrieval"]["map@r"] <= 1
    # Raw pixels never see labels: sub-category kNN on pixels is plain pixel kNN.
    assert ds["metrics"]["pixels"]["subcategory"]["top1"] == ds["metrics"]["pixels"]["knn_top1"]


def test_findings_name_every_column_nca_loses():
    def fs(x):
        return {"accuracy": x, "ci95": 0.01}

    metrics = {
        "nca": {"knn_top1": 0.9, "subcategory": {"top1": 0.5}, "fewshot": {"1-shot knn": fs(0.6)}, "retrieval": {"recall@1": 0.8}},
        "softmax-embedding": {"knn_top1": 0.8, "subcategory": {"top1": 0.7}, "fewshot": {"1-shot knn": fs(0.595)}, "retrieval": {"recall@1": 0.8}},
        "pixels": {"knn_top1": 0.85, "subcategory": {"top1": 0.85}, "fewshot": {"1-shot knn": fs(0.3)}, "retrieval": {"recall@1": 0.9}},
    }
    text = findings({"metrics": metrics}, [1])
    assert any(t.startswith("kNN top-1: NCA is best") for t in text)
    assert any("sub-category top-1: **NCA loses** to raw pixels" in t for t in text)
    assert any(t.startswith("5-way 1-shot: NCA is best") and "overlap" in t and "do not" not in t for t in text)
    assert any("Recall@1: **NCA loses** to raw pixels" in t for t in text)
    result = {
        "settings": {"quick": False, "seed": 0, "arch": "small_cnn", "low_dim": 128, "k": 30, "sigma": 0.05,
                     "way": 5, "shots": [1], "query": 15, "episodes": 1000, "command": report_driver.COMMAND},
        "environment": {"python": "3", "torch": "2", "cpu_count": 2, "torch_threads": 2, "machine": "x"},
        "wall_s": 60.0,
        "datasets": [{"dataset": "d", "train_images": 10, "test_images": 5, "classes": [], "coarse_groups": {"a": ["x"]},
                      "base_classes": ["b"], "novel_classes": ["n"], "budget": {"epochs": 1}, "runs": [],
                      "metrics": metrics, "wall_s": 1.0}],
    }
    md = render_markdown(result)
    assert "| NCA embedding |" in md and "**NCA loses**" in md
    assert f"Generated by `{report_driver.COMMAND}`" in md.split("## d")[0] and "--quick" not in md
    result["settings"]["quick"] = True
    assert "These numbers come from `--quick`" in render_markdown(result).split("## d")[0]
    # A file without the markers becomes a standalone results file, refreshable in turn.
    alone = report_driver.refresh_results("no markers here\n", md)
    assert "no markers here" not in alone and md.strip() in alone
    assert report_driver.refresh_results(alone, "new\n").count("new") == 1


# ------------------------------------------------------------------ base-class training (snca train)


def test_train_on_base_classes_records_the_split_and_fewshot_uses_it(tmp_path, capsys):
    """``snca train --novel-classes`` trains on the base classes only and records the split;
    ``snca fewshot`` then defaults to that split and refuses novel classes the model saw."""
    from snca.checkpoint import load_checkpoint
    from snca.config import load_config
    from snca.data import run_datasets

    run = tmp_path / "fs"
    # Sneaker (7), Bag (8), Ankle boot (9): names and an id mixed, as a user may type them.
    code, out, err = run_cli(capsys, "train", "--dataset", "fashion-mnist", "--subset", "300", "--test-subset", "100",
                             "--epochs", "1", "--batch-size", "32", "--lr", "0.05", "--no-plot", "--no-progress",
                             "--run-dir", str(run), "--novel-classes", "Sneaker", "8", "Ankle boot")
    assert code == 0, err
    assert "base classes only (7 of 10" in out
    state = load_checkpoint(run / "last.pt")
    split = state["facts"]["class_split"]  # a derived fact, recorded beside the config
    names = list(FASHION_MNIST_CLASSES)
    assert {s: split[s] for s in ("base", "val", "novel")} == {"base": list(range(7)), "val": [], "novel": [7, 8, 9]}
    assert split["names"] == {"base": names[:7], "val": [], "novel": names[7:]}
    assert state["facts"]["class_names"] == names[:7]
    # The memory holds exactly the base-class images of the 300-image subset, labels 0..6.
    full = build_dataset("fashion-mnist", "train", subset=300, seed=0)
    base_targets = full.targets[full.targets < 7]
    assert torch.equal(state["memory"]["labels"], base_targets)
    assert state["facts"]["num_classes"] == 7 and state["num_train"] == base_targets.numel()
    # eval of this checkpoint runs on the base classes of the test set
    code, out, _ = run_cli(capsys, "eval", str(run), "--gallery", "memory", "--k", "5", "--json")
    test_full = build_dataset("fashion-mnist", "test", subset=100, seed=0)
    assert code == 0 and json.loads(out)["num_queries"] == int((test_full.targets < 7).sum())

    # fewshot: the recorded split is the default ...
    code, out, err = run_cli(capsys, "fewshot", str(run), "--way", "3", "--shot", "1", "--query", "5",
                             "--episodes", "20", "--method", "ncm", "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["novel_classes"] == names[7:] and 0 < res["results"][0]["accuracy"] <= 1
    assert "not novel" not in err
    # ... a requested novel class it was trained on is refused (flag or split file) ...
    code, _, err = run_cli(capsys, "fewshot", str(run), "--novel-classes", "Sandal", "8", "9", "--way", "3")
    assert code == 2 and err.count("\n") == 1 and "trained on Sandal" in err
    split_file = tmp_path / "split.txt"
    split_file.write_text("[base]\nT-shirt/top\n[novel]\nShirt\nSneaker\nBag\nAnkle boot\n")
    code, _, err = run_cli(capsys, "fewshot", str(run), "--split-file", str(split_file), "--way", "3")
    assert code == 2 and "trained on Shirt" in err
    # ... and novel classes that are really novel are accepted.
    code, _, err = run_cli(capsys, "fewshot", str(run), "--novel-classes", "9", "7", "Bag", "--way", "3",
                           "--shot", "1", "--query", "5", "--episodes", "10", "--method", "knn")
    assert code == 0, err

    # A split file gives the same kind of base-class datasets (val classes are held out too).
    split_file.write_text("[val]\nShirt\n[novel]\nSneaker\nBag\nAnkle boot\n")
    fs_cfg = load_config("fashion-mnist", {"split_file": str(split_file), "subset": 300, "test_subset": 100})
    data = run_datasets(fs_cfg, ("gallery", "test"))
    kept = [c for c in range(10) if c not in (6, 7, 8, 9)]
    assert data["gallery"].classes == [names[c] for c in kept]
    assert len(data["test"]) == sum(int((test_full.targets == c).sum()) for c in kept)
    assert sorted(set(data["test"].targets.tolist())) == list(range(len(kept)))
