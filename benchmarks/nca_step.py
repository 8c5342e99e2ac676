"""One NCA training step (loss forward + backward + memory update): snca vs the naive reference
vs pytorch-metric-learning's NCALoss, at ImageNet and CIFAR scale.

    python benchmarks/nca_step.py --scale both --device cpu --repeats 3
    python benchmarks/nca_step.py --scale imagenet --impls snca,naive --contend 1   # slowdown on a busy CPU

Each implementation runs in its own subprocess, so each peak-memory figure is that
implementation's alone. Every implementation sees the same memory, labels, batches and indices
(same seed); the first step's loss, gradient and the updated memory rows are compared across
implementations. Prints one JSON line per implementation, then one summary line per scale.

Memory: on CPU ``peak_mem_gb`` is the process's peak RSS (VmHWM), ``baseline_gb`` the RSS after
imports, ``bank_gb`` the bytes of the N x D float32 memory; on CUDA ``peak_mem_gb`` is
torch.cuda.max_memory_allocated() (the bank included, baseline 0).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (  # noqa: E402
    GB,
    available_gb,
    emit,
    environment,
    median,
    merge_rounds,
    peak_rss_gb,
    rss_gb,
    run_worker,
    time_calls,
)

SCALES = {
    # N = ImageNet-1k train set size, C classes; B and D from the ImageNet recipe.
    "imagenet": {"num_samples": 1_281_167, "num_classes": 1000},
    "cifar": {"num_samples": 50_000, "num_classes": 10},
}
IMPLS = ("snca", "naive", "pml")

# Bytes per element of the B x N similarity matrix an implementation keeps alive at its peak,
# measured at CIFAR scale with this script (peak - baseline - memory copies, / (B * N)); used
# only to decide whether a run fits before starting it. snca keeps no B x N tensor.
BYTES_PER_LOGIT = {"snca": 0.0, "naive": 24.0, "pml": 24.0}
# Copies of the N x D bank alive at an implementation's peak (construction / normalised copy).
BANK_COPIES = {"snca": 2.0, "naive": 2.0, "pml": 3.0}


def estimate_peak_gb(impl: str, n: int, b: int, d: int) -> float:
    """Rough peak (process RSS or GPU memory) of one worker, to skip runs that cannot fit."""
    return 0.5 + BANK_COPIES[impl] * n * d * 4 / GB + BYTES_PER_LOGIT[impl] * b * n / GB


# --------------------------------------------------------------------------- the reference
def naive_nca_loss(x, indexes, memory, labels, temperature: float, margin: float = 0.0):
    """The original implementation's NCA step, written out (one B x N matrix per line):
    LinearAverage's similarities then NCACrossEntropy, gradients by autograd."""
    import torch

    # LinearAverage.forward: out = mm(x, memory^T), div_(T) in place (memory is not a parameter)
    out = torch.mm(x, memory.t()).div_(temperature)
    # NCACrossEntropy.forward
    batch_size = out.size(0)
    n = out.size(1)
    exp = torch.exp(out)
    y = torch.index_select(labels, 0, indexes).view(batch_size, 1)
    same = y.repeat(1, n).eq_(labels)
    # self prob exclusion, "hack with memory for efficiency" (as in the reference)
    exp.data.scatter_(1, indexes.view(-1, 1), 0)
    p = torch.mul(exp, same.float()).sum(dim=1)
    z = exp.sum(dim=1)
    z_exclude = z - p
    p = p.div(math.exp(margin))
    z = z_exclude + p
    prob = torch.div(p, z)
    prob_masked = torch.masked_select(prob, prob.ne(0))
    loss = prob_masked.log().sum(0)
    return -loss / batch_size


def reference_memory_update(memory, indexes, x, momentum: float) -> None:
    """LinearAverage.backward's update: m <- normalise(mu * m + (1 - mu) * x), in place."""
    import torch

    with torch.no_grad():
        weight_pos = memory.index_select(0, indexes)
        weight_pos.mul_(momentum).add_(x.detach() * (1 - momentum))
        w_norm = weight_pos.pow(2).sum(1, keepdim=True).pow(0.5)
        memory.index_copy_(0, indexes, weight_pos.div(w_norm))


# --------------------------------------------------------------------------- worker
def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.nn.functional as F

    import snca  # noqa: F401
    from snca import MemoryBank, NCALoss, nca_loss

    if args.impl == "pml":
        from pytorch_metric_learning.distances import DotProductSimilarity
        from pytorch_metric_learning.losses import NCALoss as PMLNCALoss

    cuda = args.device.startswith("cuda")
    device = torch.device(args.device)
    baseline = 0.0 if cuda else rss_gb()
    if cuda:
        torch.cuda.init()
        torch.cuda.reset_peak_memory_stats()

    n, c, b, d, t = args.num_samples, args.num_classes, args.batch_size, args.dim, args.temperature
    steps = 1 + args.repeats
    gen = torch.Generator().manual_seed(args.seed)
    labels_cpu = torch.randint(0, c, (n,), generator=gen)
    batches = torch.randperm(n, generator=gen)[: steps * b].view(steps, b)
    feats = F.normalize(torch.randn(steps, b, d, generator=gen), dim=2)
    bank = MemoryBank(
        labels_cpu, dim=d, num_classes=c, momentum=args.momentum,
        generator=torch.Generator().manual_seed(args.seed + 1), device=device,
    )
    batches, feats = batches.to(device), feats.to(device)
    labels = labels_cpu.to(device)
    bank_gb = n * d * 4 / GB
    grads: dict[str, Any] = {}
    extra: dict[str, Any] = {}

    if args.impl == "snca":
        criterion = NCALoss(bank, temperature=t, chunk_size=args.chunk_size)
        # What pml computes (the own slot is not excluded there): same code path, no indices.
        v = feats[0].clone().requires_grad_()
        loss_incl_own = nca_loss(v, None, bank, temperature=t, labels=labels[batches[0]])
        loss_incl_own.backward()
        extra["loss_incl_own"] = float(loss_incl_own)
        grads["grad_incl_own"] = v.grad.detach().cpu()

        def step(i: int) -> tuple[float, Any]:
            v = feats[i].clone().requires_grad_()
            loss = criterion(v, batches[i])  # updates the memory after computing the loss
            loss.backward()
            return float(loss), v.grad

        def rows(idx):
            return bank.get(idx)

    else:
        memory = bank.features_by_index()  # the reference keeps the memory in dataset order
        del bank
        if args.impl == "pml":
            # Dot-product similarity scaled by 1/T: the same softmax as the NCA loss here
            # (PML's default squared-L2 distance gives it too with scale 1/(2T), at more cost).
            pml_loss = PMLNCALoss(softmax_scale=1.0 / t, distance=DotProductSimilarity())

        def step(i: int) -> tuple[float, Any]:
            v = feats[i].clone().requires_grad_()
            idx = batches[i]
            if args.impl == "naive":
                loss = naive_nca_loss(v, idx, memory, labels, t)
            else:
                loss = pml_loss(v, labels[idx], ref_emb=memory, ref_labels=labels)
            loss.backward()
            reference_memory_update(memory, idx, v, args.momentum)
            return float(loss), v.grad

        def rows(idx):
            return memory[idx]

    ready = 0.0 if cuda else rss_gb()
    times, results = time_calls(step, args.repeats, args.device, warmup=1)
    if cuda:
        peak = torch.cuda.max_memory_allocated() / GB
    else:
        peak = peak_rss_gb()
    grads["grad"] = results[0][1].detach().cpu()
    grads["features"] = feats[0].cpu()
    grads["rows"] = rows(batches.flatten()).cpu()
    if args.out:
        torch.save(grads, args.out)
    emit({
        "impl": args.impl,
        "device": args.device,
        "scale": args.scale,
        "num_samples": n,
        "batch_size": b,
        "dim": d,
        "num_classes": c,
        "temperature": t,
        "step_s": median(times),
        "step_times_s": times,
        "peak_mem_gb": peak,
        "bank_gb": bank_gb,
        "baseline_gb": baseline,
        "ready_gb": ready,
        "peak_minus_baseline_gb": peak - baseline,
        "loss": results[0][0],
        "loss_last": results[-1][0],
        **extra,
        **({"host_peak_rss_gb": peak_rss_gb()} if cuda else {}),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
        **environment(),
    })


# --------------------------------------------------------------------------- driver
def _spin() -> None:  # pragma: no cover - a busy process for --contend
    x = 1.0
    while True:
        x = x * 1.0000001 + 1e-9


def start_contenders(n: int) -> list:
    """``n`` single-threaded busy processes: the other jobs of a shared machine."""
    import multiprocessing

    procs = [multiprocessing.get_context("spawn").Process(target=_spin, daemon=True) for _ in range(n)]
    for proc in procs:
        proc.start()
    return procs


def stop_contenders(procs: list) -> None:
    for proc in procs:
        proc.kill()
        proc.join()


def worker_env(args: argparse.Namespace) -> dict[str, str]:
    env = dict(os.environ)
    if args.omp_wait_policy != "inherit":
        env["OMP_WAIT_POLICY"] = args.omp_wait_policy.upper()
    return env


def fits(impl: str, cfg: dict[str, int], device: str) -> tuple[bool, float, float]:
    est = estimate_peak_gb(impl, cfg["num_samples"], cfg["batch_size"], cfg["dim"])
    if device.startswith("cuda"):
        import torch

        free = torch.cuda.mem_get_info()[0] / GB
    else:
        free = available_gb()
    return est <= free - 1.0, est, free


def compare(records: dict[str, dict], tensors: dict[str, dict]) -> dict[str, Any]:
    """Largest relative disagreements with snca (loss, first-step gradient, updated memory)."""
    out: dict[str, Any] = {}
    ref = records.get("snca")
    if ref is None:
        return out
    for impl in ("naive", "pml"):
        rec = records.get(impl)
        if rec is None or "loss" not in rec:
            continue
        # pml includes each sample's own slot in its softmax; compare it with snca's same loss.
        ref_loss = ref["loss"] if impl == "naive" else ref["loss_incl_own"]
        out[f"loss_rel_diff_{impl}"] = abs(rec["loss"] - ref_loss) / abs(ref_loss)
        if impl in tensors and "snca" in tensors:
            g_ref = tensors["snca"]["grad" if impl == "naive" else "grad_incl_own"]
            g = tensors[impl]["grad"]
            if impl == "pml":
                # pml re-normalises the embeddings inside the loss, so its gradient is the
                # tangential part of the others' (the radial part does not change the loss).
                v = tensors["snca"]["features"]
                g_ref = g_ref - (g_ref * v).sum(1, keepdim=True) * v
            out[f"grad_rel_diff_{impl}"] = float((g - g_ref).abs().max() / g_ref.abs().max())
            if impl == "naive":  # the memory update of pml's run is ours, not pml's
                r_ref, r = tensors["snca"]["rows"], tensors[impl]["rows"]
                out[f"memory_max_abs_diff_{impl}"] = float((r - r_ref).abs().max())
    return out


def run_scale(scale: str, args: argparse.Namespace, tmp: str) -> None:
    import torch

    cfg = dict(SCALES[scale])
    if args.num_samples:
        cfg["num_samples"] = args.num_samples
    if args.num_classes:
        cfg["num_classes"] = args.num_classes
    cfg["batch_size"], cfg["dim"] = args.batch_size, args.dim
    records: dict[str, dict] = {}
    tensors: dict[str, dict] = {}
    rounds: dict[str, list[dict]] = {}
    runnable = []
    for impl in args.impls:
        ok, est, free = fits(impl, cfg, args.device)
        if ok:
            runnable.append((impl, est))
        else:
            emit({
                "impl": impl, "device": args.device, "scale": scale, **cfg,
                "skipped": f"estimated peak {est:.1f} GB > {free:.1f} GB available - 1 GB margin",
            })
    # Each implementation quiet, then with --contend busy processes (in the same round): its
    # slowdown under contention is the ratio of the two.
    loads = [0, args.contend] if args.contend else [0]
    contended: dict[str, list[dict]] = {}
    for _ in range(args.rounds):  # implementations interleaved round by round
        for impl, est in runnable:
            for load in loads:
                out = os.path.join(tmp, f"{scale}_{impl}.pt")
                worker_args = [
                    "--worker", "--impl", impl, "--scale", scale, "--device", args.device,
                    "--repeats", str(args.repeats), "--seed", str(args.seed),
                    "--num-samples", str(cfg["num_samples"]), "--num-classes", str(cfg["num_classes"]),
                    "--batch-size", str(args.batch_size), "--dim", str(args.dim),
                    "--temperature", str(args.temperature), "--momentum", str(args.momentum), "--out", out,
                ]
                if args.chunk_size:
                    worker_args += ["--chunk-size", str(args.chunk_size)]
                busy = start_contenders(load)
                try:
                    recs = run_worker(os.path.abspath(__file__), worker_args, env=worker_env(args))
                finally:
                    stop_contenders(busy)
                for rec in recs:
                    rec = {"impl": impl, "device": args.device, "scale": scale, **cfg, **rec, "contenders": load}
                    rec["estimated_peak_gb"] = round(est, 2)
                    if "loss" in rec:
                        (contended if load else rounds).setdefault(impl, []).append(rec)
                    else:
                        emit(rec)  # an error record
                if os.path.exists(out):
                    tensors.setdefault(impl, torch.load(out))
                    os.remove(out)
    for impl, _ in runnable:
        if impl in rounds:
            records[impl] = merge_rounds(rounds[impl], "step_s", "step_times_s")
            emit(records[impl])

    slowdown: dict[str, float] = {}
    for impl, recs in contended.items():
        merged = merge_rounds(recs, "step_s", "step_times_s")
        emit(merged)
        if impl in records:
            slowdown[impl] = merged["step_s"] / records[impl]["step_s"]

    summary: dict[str, Any] = {"summary": "nca_step", "scale": scale, "device": args.device, **cfg}
    if args.contend:
        summary["contenders"] = args.contend
        summary.update({f"slowdown_{impl}": v for impl, v in slowdown.items()})
    snca_rec, naive_rec, pml_rec = (records.get(k) for k in IMPLS)
    if snca_rec:
        summary["snca_step_s"] = snca_rec["step_s"]
        summary["snca_peak_minus_bank_gb"] = snca_rec["peak_minus_baseline_gb"] - snca_rec["bank_gb"]
    if snca_rec and naive_rec:
        summary["speedup_vs_naive"] = naive_rec["step_s"] / snca_rec["step_s"]
        summary["naive_peak_mem_gb"] = naive_rec["peak_mem_gb"]
        summary["memory_saved_vs_naive_gb"] = naive_rec["peak_mem_gb"] - snca_rec["peak_mem_gb"]
    if snca_rec and pml_rec:
        summary["speedup_vs_pml"] = pml_rec["step_s"] / snca_rec["step_s"]
        summary["pml_peak_mem_gb"] = pml_rec["peak_mem_gb"]
    diffs = compare(records, tensors)
    summary.update(diffs)
    loss_diffs = [v for k, v in diffs.items() if k.startswith("loss_rel_diff")]
    summary["losses_agree_1e-4"] = bool(loss_diffs) and max(loss_diffs) <= 1e-4
    targets: dict[str, bool] = {}
    cuda = args.device.startswith("cuda")
    if snca_rec:
        limit = 1.0 if cuda else 0.5
        targets[f"snca_peak<=bank+{limit}GB"] = summary["snca_peak_minus_bank_gb"] <= limit
    if snca_rec and naive_rec and not cuda and scale == "imagenet":
        targets["speedup_vs_naive>=2.5"] = summary["speedup_vs_naive"] >= 2.5
    if "snca" in slowdown and "naive" in slowdown:
        targets[f"snca_slowdown<=naive_slowdown(contend={args.contend})"] = slowdown["snca"] <= slowdown["naive"]
    summary["targets_met"] = targets
    summary["all_targets_met"] = bool(targets) and all(targets.values()) and summary["losses_agree_1e-4"]
    emit(summary)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", choices=["imagenet", "cifar", "both"], default="both")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    p.add_argument("--repeats", type=int, default=3, help="timed steps after one warm-up step (>= 3)")
    p.add_argument("--rounds", type=int, default=1, help="run the implementations this many times, interleaved")
    p.add_argument("--impls", default=",".join(IMPLS), help="comma-separated subset of snca,naive,pml")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--num-samples", type=int, default=0, help="override N of the scale")
    p.add_argument("--num-classes", type=int, default=0, help="override C of the scale")
    p.add_argument("--temperature", type=float, default=0.05)
    p.add_argument("--momentum", type=float, default=0.5)
    p.add_argument("--chunk-size", type=int, default=0, help="snca chunk size (0: library default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--omp-wait-policy", choices=["inherit", "passive", "active"], default="inherit",
        help="OMP_WAIT_POLICY for the workers; 'passive' keeps idle OpenMP threads from spinning, "
        "which matters on a CPU shared with other busy processes",
    )
    p.add_argument("--contend", type=int, default=0, metavar="N",
                   help="also time each implementation with N busy processes running, and report the slowdowns")
    # internal: run one implementation in this process
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--impl", choices=IMPLS, help=argparse.SUPPRESS)
    p.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.chunk_size = args.chunk_size or None
    if args.worker:
        worker(args)
        return
    args.impls = [x for x in args.impls.split(",") if x]
    unknown = set(args.impls) - set(IMPLS)
    if unknown:
        p.error(f"unknown impls {sorted(unknown)}; choose from {IMPLS}")
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            p.error("--device cuda but torch.cuda.is_available() is False")
    scales = ["cifar", "imagenet"] if args.scale == "both" else [args.scale]
    with tempfile.TemporaryDirectory(prefix="snca_bench_") as tmp:
        for scale in scales:
            run_scale(scale, args, tmp)


if __name__ == "__main__":
    main()
