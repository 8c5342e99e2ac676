"""snca.distributed on CPU: real gloo process groups of 2 and 3 processes on 127.0.0.1.

Every result of the sharded code (loss, gradients, the memory after several momentum updates,
kNN) is compared with the same computation in one process on an unsharded bank built with the
same generator (snca.nca_loss, MemoryBank.update, snca.knn_classify). The ranks are
processes forked from the test with torchrun's environment variables; they save what they
computed and the test process compares.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import snca.distributed as sd
from snca import MemoryBank, knn_classify, nca_loss
from snca.errors import SncaError

D, T, SEED = 16, 0.05, 123
CLASS_SIZES = (150, 120, 100, 90, 80, 59, 1)  # uneven, and one class with a single sample
N = sum(CLASS_SIZES)
TOL = 1e-5

# Per step: the batch size of each rank, the margin, and which API the workers use.
MAIN_PLAN = [
    {"sizes": (32, 32), "margin": 0.0, "api": "loss+update", "ddp": True},
    {"sizes": (24, 24), "margin": 0.1, "api": "loss, then update_sharded", "dup": True},
    {"sizes": (20, 7), "margin": 0.0, "api": "ShardedNCALoss"},  # uneven last batch
]
CONT_PLAN = [{"sizes": (5, 9, 0), "margin": 0.0, "api": "loss+update"}]  # 3 ranks, one empty
KNN_QUERIES = {2: (13, 9), 3: (4, 0, 6)}
KS = [1, 5, 30]
GALLERY_SPLIT = 35  # tensor gallery of 50 rows: rank 0 holds 35, rank 1 holds 15 (< k = 30)


# ---------------------------------------------------------------------------- shared problem
def labels_of_problem() -> torch.Tensor:
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(CLASS_SIZES)])
    return labels[torch.randperm(N, generator=torch.Generator().manual_seed(7))]


def bank_generator() -> torch.Generator:
    return torch.Generator().manual_seed(SEED)


def initial_full_bank() -> MemoryBank:
    """The single-process bank a 1-rank run would checkpoint: generator init + one update."""
    bank = MemoryBank(labels_of_problem(), dim=D, momentum=0.5, generator=bank_generator())
    g = torch.Generator().manual_seed(11)
    idx = torch.randperm(N, generator=g)[:100]
    bank.update(F.normalize(torch.randn(100, D, generator=g), dim=1), idx)
    return bank


def step_batch(step: int, plan: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Global batch of a step (rank 0's rows first): unit features, indices, model inputs."""
    total = sum(plan["sizes"])
    g = torch.Generator().manual_seed(1000 + step)
    idx = torch.randperm(N, generator=g)[:total]
    if step == 0:  # the class with one sample: no same-class slot, loss 0
        idx[3] = int(torch.nonzero(labels_of_problem() == len(CLASS_SIZES) - 1)[0])
    if plan.get("dup"):
        idx[-1] = idx[0]  # duplicate across ranks
        idx[2] = idx[1]  # and within rank 0
    feats = F.normalize(torch.randn(total, D, generator=g), dim=1)
    inputs = torch.randn(total, 10, generator=g)
    return feats, idx, inputs


def make_model() -> torch.nn.Linear:
    torch.manual_seed(5)
    return torch.nn.Linear(10, D)


def own_slice(sizes, r) -> slice:
    start = sum(sizes[:r])
    return slice(start, start + sizes[r])


def knn_queries(world: int) -> list[torch.Tensor]:
    sizes = KNN_QUERIES[world]
    q = F.normalize(torch.randn(sum(sizes), D, generator=torch.Generator().manual_seed(300 + world)), dim=1)
    return [q[own_slice(sizes, r)] for r in range(world)]


def tensor_gallery() -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(400)
    gallery = F.normalize(torch.randn(50, D, generator=g), dim=1)
    labels = torch.randint(0, 4, (50,), generator=g)
    rows = [torch.arange(0, 10), torch.arange(40, 48)]  # leave-one-out queries of each rank
    return gallery, labels, rows


def loo_query(gallery: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    noise = torch.randn(len(rows), D, generator=torch.Generator().manual_seed(int(rows[0]))) * 0.05
    return F.normalize(gallery[rows] + noise, dim=1)


# ---------------------------------------------------------------------------- workers
def run_steps(plan: list[dict], bank: MemoryBank, first_step: int, record: dict) -> None:
    me = sd.rank()
    for s, spec in enumerate(plan):
        step = first_step + s
        own = own_slice(spec["sizes"], me)
        feats, idx, inputs = step_batch(step, spec)
        idx = idx[own]
        sd.COMM.reset()
        if spec.get("ddp"):
            model = make_model()
            x = F.normalize(model(inputs[own]), dim=1)
            x.retain_grad()
        else:
            x = feats[own].clone().requires_grad_()
        if spec["api"] == "loss+update":
            loss = sd.nca_loss_sharded(x, idx, bank, T, spec["margin"], update_memory=True)
        elif spec["api"] == "loss, then update_sharded":
            loss = sd.nca_loss_sharded(x, idx, bank, T, spec["margin"])
            sd.update_sharded(bank, x.detach(), idx)
        else:
            loss = sd.ShardedNCALoss(bank, T, spec["margin"])(x, idx)
        comm = sd.COMM.as_dict()
        loss.backward()
        out = {"loss": float(loss.detach()), "grad": x.grad.clone(), "comm": comm}
        if spec.get("ddp"):
            # What DistributedDataParallel does to gradients: all_reduce SUM, divide by W. (DDP
            # itself is not constructed: its first use imports torch._dynamo, ~10 s per rank here.)
            out["param_grads"] = [sd.all_reduce_sum(p.grad) / sd.world_size() for p in model.parameters()]
        record[f"step{step}"] = out


def worker_main(scenario: str, outdir: Path) -> None:
    info = sd.init_from_env(timeout_s=float(os.environ.get("TEST_DIST_TIMEOUT", "30")))
    me, world = info.rank, info.world_size
    record: dict = {}
    labels = labels_of_problem()
    bank = sd.sharded_bank(labels, dim=D, momentum=0.5, generator=bank_generator())
    record["initial_slots"] = bank.slots.clone()

    if scenario == "main":
        record["broadcast"] = sd.broadcast_object({"run_dir": f"runs/from-rank-{me}"})
        sd.load_bank_state(bank, torch.load(outdir / "state_1rank.pt", weights_only=True))  # 1 -> 2
        record["loaded_slots"] = bank.slots.clone()
        run_steps(MAIN_PLAN, bank, 0, record)
        q = knn_queries(world)[me]
        record["knn_bank"] = sd.knn_sharded(q, bank, k=KS, sigma=T, query_block=4)
        gallery, g_labels, rows = tensor_gallery()
        part = slice(0, GALLERY_SPLIT) if me == 0 else slice(GALLERY_SPLIT, None)
        queries = loo_query(gallery, rows[me])
        record["knn_ids"] = sd.knn_sharded(
            queries, gallery[part], g_labels[part], gallery_ids=torch.arange(50)[part] + 1000,
            k=KS, sigma=T, exclude=rows[me] + 1000, query_block=3,
        )
        record["knn_rows"] = sd.knn_sharded(
            queries, gallery[part], g_labels[part], k=7, sigma=T, exclude=rows[me]
        )
        state = sd.gather_bank_state(bank)  # 2 -> 1 (and 2 -> 3 below)
        if me == 0:
            torch.save(state, outdir / "state_2ranks.pt")
    elif scenario == "reshard3":
        sd.load_bank_state(bank, torch.load(outdir / "state_2ranks.pt", weights_only=True))
        record["loaded_slots"] = bank.slots.clone()
        run_steps(CONT_PLAN, bank, len(MAIN_PLAN), record)
        record["knn_bank"] = sd.knn_sharded(knn_queries(world)[me], bank, k=KS, sigma=T, query_block=2)
        state = sd.gather_bank_state(bank)
        if me == 0:
            torch.save(state, outdir / "state_3ranks.pt")
    elif scenario in ("die", "stuck"):
        x = F.normalize(torch.randn(8, D), dim=1)
        idx = torch.arange(8) + 8 * me
        sd.nca_loss_sharded(x, idx, bank, T, update_memory=True)  # one good step
        if me == 1:
            if scenario == "die":
                os._exit(3)  # dies mid-step, without leaving the group
            time.sleep(600)  # alive but never reaches the next collective
        sd.nca_loss_sharded(x, idx, bank, T, update_memory=True)
    elif scenario == "syncbn":
        x_all, upstream, bn = sync_bn_problem()
        share = slice(me * len(x_all) // world, (me + 1) * len(x_all) // world)
        net = sd.sync_batch_norm(torch.nn.Sequential(bn), torch.device("cpu"))
        record["converted"] = type(net[0]).__name__
        for _ in range(2):  # two steps: the running statistics accumulate
            x = x_all[share].clone().requires_grad_()
            (net(x) * upstream[share]).sum().backward()
        record.update(y=net(x_all[share]).detach(), x_grad=x.grad, weight_grad=bn.weight.grad / 2, bias_grad=bn.bias.grad / 2,
                      running_mean=bn.running_mean.clone(), running_var=bn.running_var.clone())
    torch.save(record, outdir / f"{scenario}_rank{me}.pt")
    sd.cleanup()


def sync_bn_problem() -> tuple[torch.Tensor, torch.Tensor, torch.nn.BatchNorm2d]:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(12, 3, 4, 4, generator=g) * 3 + 1
    upstream = torch.randn(12, 3, 4, 4, generator=g)
    bn = torch.nn.BatchNorm2d(3)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(3, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(3, generator=g))
    return x, upstream, bn


# ---------------------------------------------------------------------------- launching
# Ranks are forked from the test process: torch is already imported there, so a rank starts in
# milliseconds instead of the seconds a fresh interpreter needs on a busy 2-core machine. Each
# child uses one thread, joins the group through torchrun's environment variables, and leaves
# with os._exit so pytest's own exit handlers never run twice.
_FORK = multiprocessing.get_context("fork")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(scenario: str, rank: int, world: int, port: int, outdir: Path, timeout_s: float) -> None:
    code = 0
    try:
        torch.set_num_threads(1)
        os.environ.update(
            RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TEST_DIST_TIMEOUT=str(timeout_s),
        )
        if Path("/sys/class/net/lo").exists():
            os.environ["GLOO_SOCKET_IFNAME"] = "lo"
        worker_main(scenario, outdir)
    except SncaError as err:
        (outdir / f"{scenario}_rank{rank}.err").write_text(f"snca: error: {type(err).__name__}: {err}\n")
        code = 2
    except BaseException:
        (outdir / f"{scenario}_rank{rank}.err").write_text(traceback.format_exc())
        code = 1
    os._exit(code)


def start(scenario: str, world: int, outdir: Path, timeout_s: float = 30) -> list:
    port = free_port()
    procs = [
        _FORK.Process(target=_child, args=(scenario, r, world, port, outdir, timeout_s), daemon=True)
        for r in range(world)
    ]
    for p in procs:
        p.start()
    return procs


def finish(procs: list, outdir: Path, scenario: str, timeout: float) -> list[tuple[int | None, str]]:
    """Wait for every rank (killing any still running at the deadline): [(exit code, error text)]."""
    deadline = time.monotonic() + timeout
    results = []
    for r, p in enumerate(procs):
        p.join(max(0.1, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join()
            code = None
        else:
            code = p.exitcode
        err = outdir / f"{scenario}_rank{r}.err"
        results.append((code, err.read_text() if err.exists() else ""))
    return results


def launch(scenario: str, world: int, outdir: Path) -> list[dict]:
    results = finish(start(scenario, world, outdir), outdir, scenario, timeout=120)
    for r, (code, err) in enumerate(results):
        assert code == 0, f"rank {r} of {scenario} exited with {code}:\n{err[-3000:]}"
    return [torch.load(outdir / f"{scenario}_rank{r}.pt", weights_only=False) for r in range(world)]


# ---------------------------------------------------------------------------- single-process reference
def reference_steps(plan: list[dict], bank: MemoryBank, first_step: int) -> dict:
    out = {}
    for s, spec in enumerate(plan):
        step = first_step + s
        sizes = spec["sizes"]
        feats, idx, inputs = step_batch(step, spec)
        model = None
        if spec.get("ddp"):
            model = make_model()
            x = F.normalize(model(inputs), dim=1)
        else:
            x = feats.clone().requires_grad_()
        per_sample = nca_loss(x, idx, bank, T, spec["margin"], reduction="none")
        step_out = {"losses": [], "grads": []}
        for r in range(len(sizes)):
            own = own_slice(sizes, r)
            loss_r = per_sample[own].sum() / max(sizes[r], 1)
            grad = torch.autograd.grad(loss_r, x, retain_graph=True)[0][own]
            step_out["losses"].append(float(loss_r.detach()))
            step_out["grads"].append(grad)
        if model is not None:  # DDP averages per-rank means: the global mean for equal sizes
            global_mean = per_sample.sum() / per_sample.numel()
            step_out["param_grads"] = torch.autograd.grad(global_mean, list(model.parameters()))
        bank.update(x.detach(), idx)
        out[f"step{step}"] = step_out
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    outdir = tmp_path_factory.mktemp("dist")
    ref_bank = initial_full_bank()
    torch.save(ref_bank.state_dict(), outdir / "state_1rank.pt")
    state_1rank = {k: v.clone() if torch.is_tensor(v) else v for k, v in ref_bank.state_dict().items()}
    ref_main = reference_steps(MAIN_PLAN, ref_bank, 0)
    ref_after_main = MemoryBank(labels_of_problem(), dim=D)
    ref_after_main.load_state_dict(ref_bank.state_dict())
    main = launch("main", 2, outdir)
    reshard3 = launch("reshard3", 3, outdir)
    ref_cont = reference_steps(CONT_PLAN, ref_bank, len(MAIN_PLAN))
    return {
        "outdir": outdir, "state_1rank": state_1rank, "main": main, "reshard3": reshard3,
        "ref_main": ref_main, "ref_cont": ref_cont, "ref_after_main": ref_after_main, "ref_final": ref_bank,
    }


def assert_close(actual, expected, what: str) -> None:
    torch.testing.assert_close(actual, expected, atol=TOL, rtol=TOL, msg=lambda m: f"{what}: {m}")


# ---------------------------------------------------------------------------- tests
def test_sharded_bank_starts_as_the_single_process_bank(runs):
    full = MemoryBank(labels_of_problem(), dim=D, generator=bank_generator()).slots
    for world in (2, 3):
        records = runs["main" if world == 2 else "reshard3"]
        for r, rec in enumerate(records):
            start, end = sd.shard_range(N, r, world)
            assert rec["initial_slots"].shape[0] == end - start  # about N / W slots per rank
            assert torch.equal(rec["initial_slots"], full[start:end])


@pytest.mark.parametrize("step", range(len(MAIN_PLAN) + len(CONT_PLAN)))
def test_loss_and_gradient_match_single_process(runs, step):
    key = f"step{step}"
    if step < len(MAIN_PLAN):
        records, ref = runs["main"], runs["ref_main"][key]
    else:
        records, ref = runs["reshard3"], runs["ref_cont"][key]
    for r, rec in enumerate(records):
        assert abs(rec[key]["loss"] - ref["losses"][r]) < TOL, (step, r, rec[key]["loss"], ref["losses"][r])
        assert_close(rec[key]["grad"], ref["grads"][r], f"step {step} rank {r} gradient")
    assert any(ref_loss > 0 for ref_loss in ref["losses"])


def test_broadcast_object_sends_rank_0s_value(runs):
    assert [rec["broadcast"] for rec in runs["main"]] == [{"run_dir": "runs/from-rank-0"}] * 2


def test_ddp_gradient_averaging_gives_the_global_mean(runs):
    ref = runs["ref_main"]["step0"]["param_grads"]
    for r, rec in enumerate(runs["main"]):
        for got, want in zip(rec["step0"]["param_grads"], ref, strict=True):
            assert_close(got, want, f"rank {r} DDP parameter gradient")


def test_memory_after_updates_matches_single_process(runs):
    # 2 ranks -> checkpoint -> 1 process: the gathered state is a plain MemoryBank state_dict.
    saved = torch.load(runs["outdir"] / "state_2ranks.pt", weights_only=True)
    expected = runs["ref_after_main"].state_dict()
    assert set(saved) == set(expected)
    assert saved["_extra_state"] == expected["_extra_state"]
    assert torch.equal(saved["labels"], expected["labels"])
    assert_close(saved["slots"], expected["slots"], "gathered memory after 3 steps")
    single = MemoryBank(labels_of_problem(), dim=D)
    single.load_state_dict(sd.shard_bank_state(saved, 0, 1))
    assert_close(single.features_by_index(), runs["ref_after_main"].features_by_index(), "2 -> 1 reload")


def test_checkpoint_resharding_round_trips(runs):
    # 1 -> 2: the shards loaded from a single-process state are its rows.
    one = runs["state_1rank"]["slots"]
    for r, rec in enumerate(runs["main"]):
        start, end = sd.shard_range(N, r, 2)
        assert torch.equal(rec["loaded_slots"], one[start:end])
    # 2 -> 3: the 3 ranks loaded the 2-rank checkpoint, trained a step, and wrote it back.
    two = torch.load(runs["outdir"] / "state_2ranks.pt", weights_only=True)["slots"]
    for r, rec in enumerate(runs["reshard3"]):
        start, end = sd.shard_range(N, r, 3)
        assert torch.equal(rec["loaded_slots"], two[start:end])
    three = torch.load(runs["outdir"] / "state_3ranks.pt", weights_only=True)
    assert three["_extra_state"]["shard"] == [0, 1]
    assert_close(three["slots"], runs["ref_final"].state_dict()["slots"], "memory after 2 -> 3 ranks")


def _assert_knn_equal(got, want, what):
    for kk in want:
        assert torch.equal(got[kk].indices, want[kk].indices), what
        assert torch.equal(got[kk].predictions, want[kk].predictions), what
        assert_close(got[kk].similarities, want[kk].similarities, what)
        assert_close(got[kk].scores, want[kk].scores, what)


def test_knn_on_the_sharded_bank_matches_single_process(runs):
    for world, key, bank in ((2, "main", runs["ref_after_main"]), (3, "reshard3", runs["ref_final"])):
        queries = knn_queries(world)
        for r, rec in enumerate(runs[key]):
            want = knn_classify(queries[r], bank.features_by_index(), bank.labels, k=KS, sigma=T)
            _assert_knn_equal(rec["knn_bank"], want, f"{world} ranks, rank {r}")


def test_knn_tensor_gallery_leave_one_out_matches_single_process(runs):
    gallery, labels, rows = tensor_gallery()
    for r, rec in enumerate(runs["main"]):
        queries = loo_query(gallery, rows[r])
        want = knn_classify(queries, gallery, labels, k=KS, sigma=T, exclude=rows[r], gallery_ids=torch.arange(50) + 1000)
        _assert_knn_equal(rec["knn_ids"], want, f"rank {r}, gallery ids")
        assert not bool((rec["knn_ids"][30].indices == rows[r][:, None] + 1000).any())  # own row left out
        want_rows = knn_classify(queries, gallery, labels, k=7, sigma=T, exclude=rows[r])
        _assert_knn_equal({7: rec["knn_rows"]}, {7: want_rows}, f"rank {r}, row ids")


def test_communication_per_step_is_the_documented_volume(runs):
    def expected(spec: dict) -> tuple[int, int]:
        world, sizes = len(spec["sizes"]), spec["sizes"]
        total, longest = sum(sizes), max(sizes)
        batch_rows = world * 8 + world * longest * (4 * D + 16)  # sizes, then features+label+position
        gathered = batch_rows
        if spec["api"] == "loss, then update_sharded":
            gathered += world * 8 + world * longest * (4 * D + 8)  # features+index, once more
        reduced = 2 * total * 4 + total * (2 * D + 2) * 4  # maxima, then sums and vectors
        return gathered, reduced

    for plan, key, first in ((MAIN_PLAN, "main", 0), (CONT_PLAN, "reshard3", len(MAIN_PLAN))):
        for s, spec in enumerate(plan):
            for rec in runs[key]:
                comm = rec[f"step{first + s}"]["comm"]
                assert (comm["gathered"], comm["reduced"]) == expected(spec), (first + s, comm)


@pytest.mark.parametrize("scenario", ["die", "stuck"])
def test_a_lost_rank_fails_the_job_with_a_clear_message(tmp_path, scenario):
    """Rank 1 exits mid-step (die) or never reaches the next collective (stuck): rank 0 must
    fail on its own with a one-line DistributedError, well within a minute, not hang."""
    began = time.monotonic()
    procs = start(scenario, 2, tmp_path, timeout_s=3.0)
    procs[0].join(90)
    elapsed = time.monotonic() - began
    (code0, err0), (code1, _) = finish(procs, tmp_path, scenario, timeout=1)  # kills a stuck rank 1
    assert code0 == 2, (code0, err0[-2000:])
    assert err0.startswith("snca: error: DistributedError:") and err0.count("\n") == 1, err0
    assert "nca_loss_sharded" in err0 and "rank 0 of 2" in err0, err0
    assert elapsed < 60, elapsed
    if scenario == "die":
        assert code1 == 3


def test_sync_batch_norm_over_ranks_is_batch_norm_over_the_union(tmp_path):
    """``--sync-bn`` on CPU/gloo: each of 3 ranks normalises its 4 images with the statistics of
    all 12; outputs, input gradients, the (summed) parameter gradients and the running
    statistics equal one nn.BatchNorm2d over the 12 images, to float precision."""
    ranks = launch("syncbn", 3, tmp_path)
    x_all, upstream, bn = sync_bn_problem()
    for _ in range(2):
        x = x_all.clone().requires_grad_()
        (bn(x) * upstream).sum().backward()
    y = bn(x_all).detach()  # training mode, as the ranks computed it
    assert all(r["converted"] == "SyncBatchNorm" for r in ranks)
    torch.testing.assert_close(torch.cat([r["y"] for r in ranks]), y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([r["x_grad"] for r in ranks]), x.grad, atol=1e-5, rtol=1e-5)
    # Each rank's loss is its share of the sum: the ranks' parameter gradients add up to the whole's.
    torch.testing.assert_close(sum(r["weight_grad"] for r in ranks), bn.weight.grad / 2, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(sum(r["bias_grad"] for r in ranks), bn.bias.grad / 2, atol=1e-4, rtol=1e-5)
    for r in ranks:
        torch.testing.assert_close(r["running_mean"], bn.running_mean, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(r["running_var"], bn.running_var, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------------------- single process
def test_single_process_fallbacks_equal_the_core(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    info = sd.init_from_env(backend="gloo")
    assert (info.rank, info.world_size, info.backend) == (0, 1, None)
    assert not sd.is_distributed() and sd.is_main() and sd.world_size() == 1
    bank = sd.sharded_bank(labels_of_problem(), dim=D, generator=bank_generator())
    plain = MemoryBank(labels_of_problem(), dim=D, generator=bank_generator())
    feats, idx, _ = step_batch(0, MAIN_PLAN[0])
    a, b = feats.clone().requires_grad_(), feats.clone().requires_grad_()
    sd.nca_loss_sharded(a, idx, bank, T, update_memory=True).backward()
    nca_loss(b, idx, plain, T).backward()
    plain.update(feats, idx)
    assert torch.equal(a.grad, b.grad) and torch.equal(bank.slots, plain.slots)
    got = sd.knn_sharded(feats[:5], bank, k=[1, 5], sigma=T)
    want = knn_classify(feats[:5], plain.features_by_index(), plain.labels, k=[1, 5], sigma=T)
    _assert_knn_equal(got, want, "single process")
    state = sd.gather_bank_state(bank)
    assert state is not None and torch.equal(state["slots"], plain.state_dict()["slots"])


def test_shard_state_validation_and_env_errors(monkeypatch):
    bank = MemoryBank(labels_of_problem(), dim=D, generator=bank_generator())
    shard = sd.shard_bank_state(bank.state_dict(), 1, 2)
    with pytest.raises(SncaError, match="gather_bank_state"):
        sd.shard_bank_state(shard, 0, 1)  # a shard is not a full state
    with pytest.raises(SncaError, match="not a memory bank state"):
        sd.shard_bank_state({"slots": torch.zeros(3, D)}, 0, 1)
    other = MemoryBank(labels_of_problem(), dim=D, shard=(0, 2))
    with pytest.raises(SncaError, match="shard is 0 of 2"):
        sd.nca_loss_sharded(F.normalize(torch.randn(2, D), dim=1), torch.tensor([0, 1]), other, T)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(SncaError, match="MASTER_ADDR"):
        sd.init_from_env(backend="gloo")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "x")
    with pytest.raises(SncaError, match="MASTER_PORT"):
        sd.init_from_env(backend="gloo")



# ---------------------------------------------------------------------------- torchrun end to end
def test_torchrun_trains_data_parallel_and_one_process_reads_the_checkpoint(tmp_path, capsys):
    """``torchrun --nproc-per-node 2 -m snca train`` on real MNIST digits (600 images): DDP with
    the sharded memory. Rank 0 alone logs and writes; the checkpoint holds the whole memory
    (W = 2 -> 1), which ``snca eval`` and a resumed single-process run read."""
    from snca.checkpoint import STATE_FILE, load_checkpoint, load_run
    from snca.cli import main
    from snca.config import config_from_dict
    from snca.data import run_datasets

    run = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    if Path("/sys/class/net/lo").exists():
        env["GLOO_SOCKET_IFNAME"] = "lo"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "snca", "train", "--dataset", "mnist5k", "--subset", "600", "--test-subset", "200", "--epochs", "1",
        "--batch-size", "32", "--lr", "0.01", "--device", "cpu", "--no-progress", "--no-plot", "--run-dir", str(run),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # rank 0 speaks for the job: one header, one epoch line
    assert proc.stdout.count("x 2 ranks (gloo, 16 images per rank per step)") == 1
    assert proc.stdout.count("epoch 1/1") == 1

    assert sorted(p.name for p in run.glob("*.pt")) == ["best.pt", "last.pt"]
    # A sharded checkpoint (torch.distributed.checkpoint): each rank wrote its own memory rows,
    # rank 0 the rest; best.pt holds the same files (hard links).
    files = sorted(p.name for p in (run / "last.pt").iterdir())
    assert STATE_FILE in files and sum(f.endswith(".distcp") for f in files) == 2, files
    assert files == sorted(p.name for p in (run / "best.pt").iterdir())
    assert all((run / "best.pt" / f).read_bytes() == (run / "last.pt" / f).read_bytes() for f in files)
    rest = torch.load(run / "last.pt" / STATE_FILE, weights_only=True)
    assert "slots" not in rest["memory"] and rest["world_size"] == 2 and len(rest["rng"]) == 2
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in records] == ["epoch", "final"]
    assert records[0]["val_top1"] > 0.3  # 10 classes: chance is 0.1
    final = json.loads((run / "final.json").read_text())
    assert final["num_test"] == 200 and final["knn_top1"] > 0.3

    # The checkpoint holds the whole memory: every slot, in one single-process bank.
    state = load_checkpoint(run / "last.pt")
    cfg = config_from_dict(state["config"])
    train_targets = run_datasets(cfg, ("gallery",))["gallery"].targets
    bank = load_run(run / "last.pt").memory
    assert (bank.rank, bank.world_size) == (0, 1) and bank.slots.shape == (600, cfg.model.low_dim)
    assert torch.equal(bank.labels, train_targets)
    resharded = sd.sharded_bank(train_targets, dim=cfg.model.low_dim, num_classes=bank.num_classes)  # no group: W = 1
    sd.load_bank_state(resharded, state["memory"])
    assert torch.equal(resharded.slots, bank.slots)
    # every slot was written by the epoch (DistributedSampler covers every sample on some rank)
    initial = MemoryBank(train_targets, dim=cfg.model.low_dim, generator=torch.Generator().manual_seed(cfg.run.seed))
    assert ((bank.features_by_index() * initial.features_by_index()).sum(1) < 0.99).all()

    # One process evaluates it: the sharded kNN of training gave the same accuracy (ties and
    # the per-rank batching of the feature extraction aside: at most one query in 200).
    code = main(["eval", str(run / "last.pt"), "--device", "cpu", "--json"])
    out = capsys.readouterr().out
    assert code == 0
    rows = {r["gallery"]: r for r in json.loads(out)["results"]}
    assert rows["memory"]["top1"] == pytest.approx(final["knn_top1"], abs=1.01 / 200)
    assert rows["recomputed"]["top1"] == pytest.approx(final["knn_recomputed_top1"], abs=1.01 / 200)

    # ... and continues training it (a checkpoint of 2 ranks resumed on 1).
    code = main(["train", "--resume", str(run / "last.pt"), "--epochs", "2", "--device", "cpu", "--threads", "1"])
    out = capsys.readouterr().out
    assert code == 0 and "epoch 2/2" in out and "ranks" not in out
    assert load_checkpoint(run / "last.pt")["epoch"] == 2
