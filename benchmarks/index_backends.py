"""Gallery search backends: build time, queries/s and recall@k against exact search.

    python benchmarks/index_backends.py [--num-gallery 1000000] [--dim 128] [--k 10]
                                        [--num-queries 1000] [--threads N]

Data: seeded, clustered unit vectors (``--clusters`` random centres plus Gaussian noise of norm
``--spread``, living in a random ``--intrinsic-dim``-dimensional subspace per cluster; 0 makes
it isotropic in all dimensions), so an IVF partition is meaningful and neighbours are not
trivially the cluster. Queries are fresh draws from the same distribution, or with
``--novel-queries`` around other random centres (like images of classes not in the gallery).
Backends go through :class:`snca.gallery.GalleryIndex` (what a user gets): ``torch`` (exact,
snca.knn.knn_search), ``faiss-flat`` (exact IndexFlatIP), ``faiss-ivf`` at several ``nprobe``
and ``faiss-hnsw`` at several ``efSearch``. Recall@k is the
fraction of the exact top-k ids found. Prints one JSON object per line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch
import torch.nn.functional as F

from snca.gallery import GalleryIndex


def make_model(dim: int, clusters: int, intrinsic: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Cluster centres, and (for ``intrinsic`` > 0) one random ``intrinsic``-dimensional
    subspace per cluster in which its spread lives (learned embeddings vary along few
    directions per class; isotropic noise in all 128 dimensions is the hardest case for ANN)."""
    centres = F.normalize(torch.randn(clusters, dim, generator=generator), dim=1)
    bases = None
    if intrinsic > 0:
        bases = torch.linalg.qr(torch.randn(clusters, dim, intrinsic, generator=generator)).Q.transpose(1, 2)
    return centres, bases


def clustered(n: int, centres: torch.Tensor, bases: torch.Tensor | None, spread: float, generator: torch.Generator) -> torch.Tensor:
    """Unit vectors: a random centre plus noise of expected norm ``spread``."""
    clusters, dim = centres.shape
    out = torch.empty(n, dim)
    block = 1 << 16
    for a in range(0, n, block):
        m = min(block, n - a)
        assign = torch.randint(0, clusters, (m,), generator=generator)
        if bases is None:
            noise = torch.randn(m, dim, generator=generator) * (spread / dim**0.5)
        else:
            r = bases.shape[1]
            coeff = torch.randn(m, 1, r, generator=generator) * (spread / r**0.5)
            noise = torch.bmm(coeff, bases[assign]).squeeze(1)
        out[a : a + m] = F.normalize(centres[assign] + noise, dim=1)
    return out


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-gallery", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--num-queries", type=int, default=1000)
    p.add_argument("--clusters", type=int, default=1000)
    p.add_argument("--spread", type=float, default=0.6, help="noise norm relative to the unit centre")
    p.add_argument("--intrinsic-dim", type=int, default=16,
                   help="dimensions each cluster varies in (0: isotropic noise in all --dim dimensions)")
    p.add_argument("--novel-queries", action="store_true",
                   help="draw queries around new random centres (like images of classes not in the gallery)")
    p.add_argument("--nlist", type=int, default=None, help="IVF cells (default: sqrt(N))")
    p.add_argument("--nprobe", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--ef-search", type=int, nargs="+", default=[32, 128])
    p.add_argument("--backends", nargs="+", default=["torch", "faiss-flat", "faiss-ivf", "faiss-hnsw"])
    p.add_argument("--threads", type=int, default=None, help="torch and faiss threads (default: library default)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
        try:
            import faiss

            faiss.omp_set_num_threads(args.threads)
        except ImportError:
            pass
    g = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    centres, bases = make_model(args.dim, args.clusters, args.intrinsic_dim, g)
    gallery = clustered(args.num_gallery, centres, bases, args.spread, g)
    if args.novel_queries:  # queries around centres the gallery does not have
        centres, bases = make_model(args.dim, args.clusters, args.intrinsic_dim, g)
    queries = clustered(args.num_queries, centres, bases, args.spread, g)
    labels = torch.zeros(args.num_gallery, dtype=torch.long)
    ids = [str(i) for i in range(args.num_gallery)]
    nlist = args.nlist or max(1, int(args.num_gallery**0.5))
    emit({
        "bench": "index_backends", "num_gallery": args.num_gallery, "dim": args.dim, "k": args.k,
        "num_queries": args.num_queries, "clusters": args.clusters, "spread": args.spread,
        "intrinsic_dim": args.intrinsic_dim, "novel_queries": args.novel_queries, "seed": args.seed,
        "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(), "machine": platform.machine(),
        "data_s": round(time.perf_counter() - t0, 2),
    })

    exact_idx = None
    for backend in args.backends:
        params = {"nlist": nlist} if backend == "faiss-ivf" else {}
        index = GalleryIndex(args.dim, ["all"], backend=backend, backend_params=params)
        t = time.perf_counter()
        index.add(gallery, labels, ids)
        if backend != "torch":
            index._searcher.ensure(index.features)  # build (train / graph) outside the timed queries
        build_s = time.perf_counter() - t
        sweep = {"faiss-ivf": [("nprobe", v) for v in args.nprobe], "faiss-hnsw": [("ef_search", v) for v in args.ef_search]}
        for knob in sweep.get(backend, [(None, None)]):
            if knob[0]:
                index.backend_params[knob[0]] = knob[1]
            index.search(queries[:8], args.k)  # warm-up
            t = time.perf_counter()
            _, idx = index.search(queries, args.k)
            search_s = time.perf_counter() - t
            if exact_idx is None:
                if backend not in ("torch", "faiss-flat"):
                    raise SystemExit("list an exact backend (torch or faiss-flat) first: recall is measured against it")
                exact_idx = idx
            hits = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(idx, exact_idx, strict=True))
            record = {
                "backend": backend, "build_s": round(build_s, 2), "search_s": round(search_s, 3),
                "queries_per_s": round(args.num_queries / search_s, 1),
                f"recall_at_{args.k}": round(hits / (args.k * args.num_queries), 4),
            }
            if knob[0]:
                record[knob[0]] = knob[1]
            if backend == "faiss-ivf":
                record["nlist"] = nlist
            emit(record)
        del index


if __name__ == "__main__":
    main()
