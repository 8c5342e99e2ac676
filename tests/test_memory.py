"""MemoryBank: class-sorted layout, initialisation, momentum update, sharding, state_dict."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import memory_update_reference

from snca import MemoryBank, SncaError, nca_loss, shard_range

SETTINGS = settings(max_examples=30, deadline=None)
pytestmark = pytest.mark.usefixtures("one_thread")


def random_labels(seed: int, n: int, c: int) -> torch.Tensor:
    return torch.randint(0, c, (n,), generator=torch.Generator().manual_seed(seed))


def random_unit(seed: int, n: int, d: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


# --------------------------------------------------------------------------- layout and init
@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 300), c=st.integers(1, 8))
def test_class_sorted_layout(seed, n, c):
    labels = random_labels(seed, n, c)
    bank = MemoryBank(labels, dim=3, num_classes=c)
    assert torch.equal(bank.labels, labels)
    # position and index_of_position are inverse permutations.
    assert torch.equal(bank.position[bank.index_of_position], torch.arange(n))
    assert torch.equal(bank.index_of_position[bank.position], torch.arange(n))
    # Slots grouped by class, in dataset-index order within a class (stable sort).
    assert torch.equal(bank.sorted_labels, labels[bank.index_of_position])
    assert bool((bank.sorted_labels[1:] >= bank.sorted_labels[:-1]).all())
    for k in range(c):
        lo, hi = int(bank.class_offsets[k]), int(bank.class_offsets[k + 1])
        assert hi - lo == int((labels == k).sum())
        assert torch.equal(bank.index_of_position[lo:hi], torch.nonzero(labels == k).flatten())
    assert int(bank.class_offsets[-1]) == n


def test_initial_slots_are_unit_uniform_draws_in_index_order():
    """Uniform in +-1/sqrt(D/3) (the reference's init), drawn in dataset-index order, then
    normalised."""
    labels = random_labels(0, 257, 5)
    d = 12
    bank = MemoryBank(labels, dim=d, generator=torch.Generator().manual_seed(42))
    stdv = 1.0 / math.sqrt(d / 3)
    raw = torch.rand(257, d, generator=torch.Generator().manual_seed(42)) * 2 * stdv - stdv
    torch.testing.assert_close(bank.features_by_index(), F.normalize(raw, dim=1))
    torch.testing.assert_close(bank.slots.norm(dim=1), torch.ones(257))
    again = MemoryBank(labels, dim=d, generator=torch.Generator().manual_seed(42))
    assert torch.equal(again.slots, bank.slots)


@SETTINGS
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(1, 300),
    c=st.integers(1, 8),
    world=st.integers(1, 6),
    d=st.integers(1, 16),
)
def test_sharded_banks_start_equal_to_rows_of_the_full_bank(seed, n, c, world, d):
    labels = random_labels(seed, n, c)
    full = MemoryBank(labels, dim=d, generator=torch.Generator().manual_seed(seed))
    pieces = []
    for r in range(world):
        shard = MemoryBank(labels, dim=d, shard=(r, world), generator=torch.Generator().manual_seed(seed))
        assert (shard.shard_start, shard.shard_end) == shard_range(n, r, world)
        assert torch.equal(shard.slots, full.slots[shard.shard_start : shard.shard_end])
        pieces.append(shard.slots)
    assert torch.equal(torch.cat(pieces), full.slots)


def test_sharded_init_across_the_draw_block_boundary():
    """More samples than one 65,536-row random block: shards still match the full bank."""
    n = 70_001
    labels = random_labels(1, n, 7)
    full = MemoryBank(labels, dim=2, generator=torch.Generator().manual_seed(3))
    for r in range(3):
        shard = MemoryBank(labels, dim=2, shard=(r, 3), generator=torch.Generator().manual_seed(3))
        assert torch.equal(shard.slots, full.slots[shard.shard_start : shard.shard_end])


@SETTINGS
@given(n=st.integers(0, 1000), world=st.integers(1, 9))
def test_shard_ranges_partition_positions(n, world):
    ranges = [shard_range(n, r, world) for r in range(world)]
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    for (_, a1), (b0, _) in zip(ranges, ranges[1:], strict=False):
        assert a1 == b0
    sizes = [b - a for a, b in ranges]
    assert max(sizes) - min(sizes) <= 1


# --------------------------------------------------------------------------- update
@SETTINGS
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(1, 300),
    d=st.integers(2, 16),  # d = 1: duplicates +1 and -1 average to 0, normalise(0) is undefined
    b=st.integers(1, 32),
    momentum=st.floats(0.0, 0.999),
    few_indices=st.booleans(),
)
def test_update_matches_reference(seed, n, d, b, momentum, few_indices):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (n,), generator=g)
    bank = MemoryBank(labels, dim=d, momentum=momentum, generator=g)
    before = bank.features_by_index().clone()
    # few_indices draws from a handful of slots, so duplicates are common.
    idx = torch.randint(0, min(n, 3) if few_indices else n, (b,), generator=g)
    feats = F.normalize(torch.randn(b, d, generator=g), dim=1)
    bank.update(feats, idx)
    expected = memory_update_reference(before, feats, idx, momentum)
    torch.testing.assert_close(bank.features_by_index().double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bank.slots.norm(dim=1), torch.ones(n))


def test_duplicate_indices_enter_once_with_their_mean():
    bank = MemoryBank(torch.tensor([0, 1, 0]), dim=2, momentum=0.5)
    bank.overwrite(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]), torch.arange(3))
    a, b = torch.tensor([0.0, 1.0]), F.normalize(torch.tensor([-1.0, 1.0]), dim=0)
    bank.update(torch.stack([a, b, a]), torch.tensor([2, 2, 2]))
    mean = (2 * a + b) / 3
    expected = F.normalize(0.5 * torch.tensor([1.0, 0.0]) + 0.5 * mean, dim=0)
    torch.testing.assert_close(bank.features_by_index()[2], expected)
    # Order of the duplicates does not matter.
    other = MemoryBank(torch.tensor([0, 1, 0]), dim=2, momentum=0.5)
    other.overwrite(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]), torch.arange(3))
    other.update(torch.stack([b, a, a]), torch.tensor([2, 2, 2]))
    torch.testing.assert_close(other.slots, bank.slots)


def test_momentum_schedule_and_override():
    labels = random_labels(2, 50, 3)
    feats = random_unit(3, 10, 8)
    idx = torch.arange(0, 50, 5)
    bank = MemoryBank(labels, dim=8, momentum=0.5, generator=torch.Generator().manual_seed(0))
    m0 = bank.features_by_index().clone()
    bank.update(feats, idx)
    m1 = bank.features_by_index().clone()
    torch.testing.assert_close(m1.double(), memory_update_reference(m0, feats, idx, 0.5))
    bank.set_momentum(0.8)  # epoch 80 of the ImageNet recipe
    assert bank.momentum == 0.8
    bank.update(feats, idx)
    m2 = bank.features_by_index().clone()
    torch.testing.assert_close(m2.double(), memory_update_reference(m1, feats, idx, 0.8))
    bank.update(feats, idx, momentum=0.0)  # a one-off override leaves the schedule alone
    torch.testing.assert_close(bank.features_by_index()[idx], feats)
    assert bank.momentum == 0.8


@pytest.mark.parametrize("momentum", [-0.1, 1.0, 1.5, float("nan")])
def test_momentum_outside_unit_interval_refused(momentum):
    with pytest.raises(SncaError, match="momentum"):
        MemoryBank([0, 1], dim=2, momentum=momentum)
    bank = MemoryBank([0, 1], dim=2)
    with pytest.raises(SncaError, match="momentum"):
        bank.set_momentum(momentum)
    assert bank.momentum == 0.5


def test_overwrite_normalises_and_round_trips():
    labels = random_labels(4, 40, 4)
    bank = MemoryBank(labels, dim=6)
    raw = torch.randn(40, 6, generator=torch.Generator().manual_seed(5)) * 3
    bank.overwrite(raw, torch.arange(40))
    torch.testing.assert_close(bank.features_by_index(), F.normalize(raw, dim=1))
    idx = torch.tensor([7, 0, 39, 7])
    torch.testing.assert_close(bank.get(idx), F.normalize(raw, dim=1)[idx])
    # Partial overwrite in a permuted order only touches those slots.
    perm = torch.tensor([30, 2, 11])
    new = random_unit(6, 3, 6)
    bank.overwrite(new, perm)
    expected = F.normalize(raw, dim=1)
    expected[perm] = new
    torch.testing.assert_close(bank.features_by_index(), expected)


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(4, 200), world=st.integers(2, 5), b=st.integers(1, 32))
def test_sharded_update_equals_full_update(seed, n, world, b):
    """Every rank applies the whole (gathered) batch; it keeps only its own slots."""
    labels = random_labels(seed, n, 5)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n, (b,), generator=g)
    feats = F.normalize(torch.randn(b, 8, generator=g), dim=1)
    full = MemoryBank(labels, dim=8, generator=torch.Generator().manual_seed(seed))
    full.update(feats, idx)
    for r in range(world):
        shard = MemoryBank(labels, dim=8, shard=(r, world), generator=torch.Generator().manual_seed(seed))
        shard.update(feats, idx)
        torch.testing.assert_close(shard.slots, full.slots[shard.shard_start : shard.shard_end])
        own = idx[(full.position[idx] >= shard.shard_start) & (full.position[idx] < shard.shard_end)]
        torch.testing.assert_close(shard.get(own), full.get(own))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_storage_update_close_to_fp32(dtype):
    labels = random_labels(7, 100, 4)
    bank32 = MemoryBank(labels, dim=16, generator=torch.Generator().manual_seed(0))
    half = MemoryBank(labels, dim=16, dtype=dtype, generator=torch.Generator().manual_seed(0))
    assert half.slots.dtype == dtype
    tol = 2e-3 if dtype == torch.float16 else 1.6e-2
    torch.testing.assert_close(half.features_by_index(), bank32.features_by_index(), rtol=tol, atol=tol)
    for step in range(5):
        feats = random_unit(10 + step, 20, 16)
        idx = torch.randint(0, 100, (20,), generator=torch.Generator().manual_seed(step))
        bank32.update(feats, idx)
        half.update(feats, idx)
    out = half.features_by_index()
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, bank32.features_by_index(), rtol=3 * tol, atol=3 * tol)


# --------------------------------------------------------------------------- state_dict
def _trained_bank(dtype=torch.float32, momentum=0.8):
    labels = random_labels(8, 64, 5)
    bank = MemoryBank(labels, dim=10, momentum=momentum, dtype=dtype, generator=torch.Generator().manual_seed(1))
    bank.update(random_unit(9, 16, 10), torch.arange(16))
    return bank, labels


def test_state_dict_round_trip_through_torch_save():
    bank, labels = _trained_bank()
    buf = io.BytesIO()
    torch.save(bank.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)  # how snca.checkpoint loads it
    fresh = MemoryBank(labels, dim=10, generator=torch.Generator().manual_seed(99))
    assert fresh.momentum == 0.5
    fresh.load_state_dict(state)
    assert torch.equal(fresh.slots, bank.slots)
    assert torch.equal(fresh.features_by_index(), bank.features_by_index())
    assert fresh.momentum == 0.8
    feats = random_unit(10, 4, 10)
    assert nca_loss(feats, torch.arange(4), fresh, 0.05).item() == nca_loss(feats, torch.arange(4), bank, 0.05).item()


@pytest.mark.parametrize(
    "src,dst",
    [(torch.float32, torch.float16), (torch.float32, torch.bfloat16), (torch.float16, torch.float32)],
)
def test_state_dict_into_a_bank_of_another_storage_dtype(src, dst):
    bank, labels = _trained_bank(dtype=src)
    other = MemoryBank(labels, dim=10, dtype=dst)
    other.load_state_dict(bank.state_dict())
    assert other.slots.dtype == dst
    assert torch.equal(other.slots, bank.slots.to(dst))
    assert other.momentum == bank.momentum


def test_state_dict_for_other_labels_or_shapes_refused():
    bank, labels = _trained_bank()
    state = bank.state_dict()
    shuffled = labels.clone()
    shuffled[0], shuffled[1] = (labels[0] + 1) % 5, labels[0]
    with pytest.raises(SncaError, match="different training set"):
        MemoryBank(shuffled, dim=10).load_state_dict(state)
    with pytest.raises(SncaError, match="different training set"):
        MemoryBank(labels[:-1], dim=10).load_state_dict(state)
    with pytest.raises(SncaError):
        MemoryBank(labels, dim=12).load_state_dict(state)
    with pytest.raises(SncaError, match="num_classes"):
        MemoryBank(labels, dim=10, num_classes=7).load_state_dict(state)
    with pytest.raises(SncaError, match="shard"):
        MemoryBank(labels, dim=10, shard=(0, 2)).load_state_dict(state)


def test_sharded_state_dict_round_trip():
    bank, labels = _trained_bank()
    for r in range(2):
        shard = MemoryBank(labels, dim=10, momentum=0.8, shard=(r, 2))
        shard.overwrite(bank.features_by_index(), torch.arange(64))
        other = MemoryBank(labels, dim=10, shard=(r, 2))
        other.load_state_dict(shard.state_dict())
        assert torch.equal(other.slots, shard.slots)
        assert other.momentum == 0.8
        # overwrite renormalises in fp32: equal to the full bank's rows up to rounding.
        torch.testing.assert_close(other.slots, bank.slots[other.shard_start : other.shard_end])


# --------------------------------------------------------------------------- errors
def test_constructor_errors():
    with pytest.raises(SncaError, match="at least one sample"):
        MemoryBank(torch.zeros(0, dtype=torch.long), dim=4)
    with pytest.raises(SncaError, match=">= 0"):
        MemoryBank([0, -1, 2], dim=4)
    with pytest.raises(SncaError, match="dim"):
        MemoryBank([0, 1], dim=0)
    with pytest.raises(SncaError, match="dtype"):
        MemoryBank([0, 1], dim=4, dtype=torch.float64)
    with pytest.raises(SncaError, match="num_classes"):
        MemoryBank([0, 3], dim=4, num_classes=3)
    with pytest.raises(SncaError, match="shard"):
        MemoryBank([0, 1], dim=4, shard=(2, 2))
    with pytest.raises(SncaError, match="shard"):
        MemoryBank([0, 1], dim=4, shard=(0, 0))


def test_update_errors():
    bank = MemoryBank(random_labels(11, 20, 3), dim=4)
    before = bank.slots.clone()
    with pytest.raises(SncaError, match="out of range"):
        bank.update(random_unit(0, 2, 4), torch.tensor([3, 20]))
    with pytest.raises(SncaError, match="out of range"):
        bank.update(random_unit(0, 2, 4), torch.tensor([-1, 3]))
    with pytest.raises(SncaError, match="shape"):
        bank.update(random_unit(0, 2, 5), torch.tensor([1, 3]))
    with pytest.raises(SncaError, match="shape"):
        bank.update(random_unit(0, 3, 4), torch.tensor([1, 3]))
    with pytest.raises(SncaError, match="out of range"):
        bank.get(torch.tensor([20]))
    assert torch.equal(bank.slots, before)  # a refused update leaves the memory untouched


def test_non_finite_update_refused():
    """A NaN feature written into the memory silently poisons every later loss (all logits
    of every query see that slot). The loss refuses NaN features; the update must too."""
    bank = MemoryBank(random_labels(12, 20, 3), dim=4)
    before = bank.slots.clone()
    feats = random_unit(0, 2, 4)
    feats[1, 0] = float("nan")
    with pytest.raises(SncaError, match="NaN"):
        bank.update(feats, torch.tensor([1, 3]))
    assert torch.equal(bank.slots, before)


def test_sharded_bank_access_errors():
    labels = random_labels(13, 30, 3)
    shard = MemoryBank(labels, dim=4, shard=(0, 2))
    with pytest.raises(SncaError, match="gather"):
        shard.features_by_index()
    elsewhere = shard.index_of_position[shard.shard_end]  # first slot of rank 1
    with pytest.raises(SncaError, match="another shard"):
        shard.get(elsewhere[None])
    mine = shard.index_of_position[shard.shard_start : shard.shard_end]
    assert shard.get(mine).shape == (len(mine), 4)
    assert shard.is_sharded and "shard=[0, 15) of 30" in repr(shard)
