"""Exact kNN throughput: snca.knn.knn_search vs faiss IndexFlatIP on the same gallery.

    python benchmarks/knn.py --device cpu --num-queries 2048 --repeats 3

Gallery: N x D random unit vectors (default 1,000,000 x 128, seeded); queries: random unit
vectors from the same seed; k = 30. Each implementation runs in its own subprocess. The
neighbours are checked to be identical up to ties: sorted similarities within 1e-5, and where
the index sets differ, every differing neighbour's exact similarity lies within 1e-5 of the
k-th one. Prints one JSON line per implementation, then a summary line.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (  # noqa: E402
    GB,
    emit,
    environment,
    median,
    merge_rounds,
    peak_rss_gb,
    rss_gb,
    run_worker,
    time_calls,
)

IMPLS = ("snca", "faiss")
TIE_TOL = 1e-5


def make_data(num_gallery: int, num_queries: int, dim: int, seed: int):
    import torch

    gen = torch.Generator().manual_seed(seed)
    gallery = torch.randn(num_gallery, dim, generator=gen)
    gallery.div_(gallery.norm(dim=1, keepdim=True))  # in place: no second 0.5 GB copy
    queries = torch.randn(num_queries, dim, generator=gen)
    queries.div_(queries.norm(dim=1, keepdim=True))
    return gallery, queries


def worker(args: argparse.Namespace) -> None:
    import torch

    from snca.knn import knn_search

    baseline = rss_gb()
    gallery, queries = make_data(args.num_gallery, args.num_queries, args.dim, args.seed)
    device = args.device
    extra: dict[str, Any] = {}
    if args.impl == "snca":
        gallery, queries = gallery.to(device), queries.to(device)
        kwargs = {}
        if args.query_block:
            kwargs["query_block"] = args.query_block
        if args.gallery_block:
            kwargs["gallery_block"] = args.gallery_block

        def search(q):
            return knn_search(q, gallery, args.k, **kwargs)

        run_device = device
    else:
        import faiss

        faiss.omp_set_num_threads(torch.get_num_threads())
        gallery_np = gallery.numpy()
        if device.startswith("cuda") and hasattr(faiss, "StandardGpuResources"):
            res = faiss.StandardGpuResources()
            index = faiss.GpuIndexFlatIP(res, args.dim)
            run_device = device
        else:
            index = faiss.IndexFlatIP(args.dim)
            run_device = "cpu"  # faiss-cpu: the faiss line always runs on the CPU
            if device.startswith("cuda"):
                extra["note"] = "faiss has no GPU support in this install; faiss ran on the CPU"
        index.add(gallery_np)
        del gallery_np
        extra["faiss"] = faiss.__version__
        extra["faiss_threads"] = faiss.omp_get_max_threads()

        def search(q):
            sims, idx = index.search(q.numpy(), args.k)
            return torch.from_numpy(sims), torch.from_numpy(idx)

    ready = rss_gb()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    warm = queries[: min(64, len(queries))]
    times, results = time_calls(
        lambda i: search(warm if i == 0 else queries), args.repeats, run_device, warmup=1
    )
    sims, idx = results[-1]
    torch.save({"sims": sims.cpu(), "idx": idx.cpu()}, args.out)
    rec = {
        "impl": args.impl,
        "device": run_device,
        "num_gallery": args.num_gallery,
        "dim": args.dim,
        "num_queries": args.num_queries,
        "k": args.k,
        "search_s": median(times),
        "search_times_s": times,
        "queries_per_s": args.num_queries / median(times),
        "peak_mem_gb": peak_rss_gb(),
        "baseline_gb": baseline,
        "ready_gb": ready,
        "gallery_gb": args.num_gallery * args.dim * 4 / GB,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
        **extra,
        **environment(),
    }
    if device.startswith("cuda") and run_device != "cpu":
        rec["gpu_peak_mem_gb"] = torch.cuda.max_memory_allocated() / GB
    emit(rec)


def check_neighbours(a: dict, b: dict, args: argparse.Namespace) -> dict[str, Any]:
    """Identical neighbours up to ties (see module docstring)."""
    import torch

    gallery, queries = make_data(args.num_gallery, args.num_queries, args.dim, args.seed)
    sa, ia, sb, ib = a["sims"].float(), a["idx"].long(), b["sims"].float(), b["idx"].long()
    sim_diff = float((sa - sb).abs().max())
    same_sets = (ia.sort(dim=1).values == ib.sort(dim=1).values).all(dim=1)
    bad = 0
    for q in torch.nonzero(~same_sets).flatten().tolist():
        differing = sorted(set(ia[q].tolist()) ^ set(ib[q].tolist()))
        exact = (gallery[differing].double() @ queries[q].double()).tolist()
        kth = min(float(sa[q, -1]), float(sb[q, -1]))
        if any(abs(s - kth) > TIE_TOL for s in exact):
            bad += 1
    return {
        "max_sim_diff": sim_diff,
        "queries_with_identical_sets": int(same_sets.sum()),
        "queries_differing_beyond_ties": bad,
        "neighbours_identical": sim_diff <= TIE_TOL and bad == 0,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i] (for snca; faiss uses its GPU build if present)")
    p.add_argument("--num-gallery", type=int, default=1_000_000)
    p.add_argument("--num-queries", type=int, default=2048)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--k", type=int, default=30)
    p.add_argument("--repeats", type=int, default=3, help="timed searches of all queries after a warm-up")
    p.add_argument("--rounds", type=int, default=1, help="run the implementations this many times, interleaved")
    p.add_argument("--impls", default=",".join(IMPLS))
    p.add_argument("--query-block", type=int, default=0, help="snca query_block (0: library default)")
    p.add_argument("--gallery-block", type=int, default=0, help="snca gallery_block (0: library default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--omp-wait-policy", choices=["inherit", "passive", "active"], default="inherit",
        help="OMP_WAIT_POLICY for the workers ('passive' on a CPU shared with other busy processes)",
    )
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--impl", choices=IMPLS, help=argparse.SUPPRESS)
    p.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return
    impls = [x for x in args.impls.split(",") if x]
    if set(impls) - set(IMPLS):
        p.error(f"--impls must be a subset of {IMPLS}")
    import torch

    records: dict[str, dict] = {}
    results: dict[str, dict] = {}
    rounds: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="snca_knn_") as tmp:
        for _ in range(args.rounds):  # implementations interleaved round by round
            for impl in impls:
                out = os.path.join(tmp, f"{impl}.pt")
                worker_args = [
                    "--worker", "--impl", impl, "--device", args.device, "--num-gallery", str(args.num_gallery),
                    "--num-queries", str(args.num_queries), "--dim", str(args.dim), "--k", str(args.k),
                    "--repeats", str(args.repeats), "--seed", str(args.seed), "--out", out,
                    "--query-block", str(args.query_block), "--gallery-block", str(args.gallery_block),
                ]
                env = dict(os.environ)
                if args.omp_wait_policy != "inherit":
                    env["OMP_WAIT_POLICY"] = args.omp_wait_policy.upper()
                for rec in run_worker(os.path.abspath(__file__), worker_args, env=env):
                    rec.setdefault("impl", impl)
                    if "queries_per_s" in rec:
                        rounds.setdefault(impl, []).append(rec)
                    else:
                        emit(rec)
                if os.path.exists(out) and impl not in results:
                    results[impl] = torch.load(out)
    for impl in impls:
        if impl in rounds:
            rec = merge_rounds(rounds[impl], "search_s", "search_times_s")
            rec["queries_per_s"] = args.num_queries / rec["search_s"]
            records[impl] = rec
            emit(rec)
    summary: dict[str, Any] = {
        "summary": "knn", "num_gallery": args.num_gallery, "dim": args.dim,
        "num_queries": args.num_queries, "k": args.k, "device": args.device,
    }
    if "snca" in records and "faiss" in records:
        summary["snca_qps"] = records["snca"]["queries_per_s"]
        summary["faiss_qps"] = records["faiss"]["queries_per_s"]
        summary["snca_vs_faiss"] = summary["snca_qps"] / summary["faiss_qps"]
        summary.update(check_neighbours(results["snca"], results["faiss"], args))
        summary["targets_met"] = {"snca_vs_faiss>=1.1": summary["snca_vs_faiss"] >= 1.1}
        summary["all_targets_met"] = summary["snca_vs_faiss"] >= 1.0 and summary["neighbours_identical"]
    emit(summary)


if __name__ == "__main__":
    main()
