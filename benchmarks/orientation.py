"""Which orientation of the chunked similarity product is faster on this CPU: ``queries @
block.T`` (query-major, B x chunk) or ``block @ queries.T`` (gallery-major, chunk x B), for the
kNN search's block and for the NCA step's chunk (product, exp2, weights @ slots), at the
library's block sizes. Interleaved, median of ``--repeats``, one JSON line per case.

    python benchmarks/orientation.py
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import emit  # noqa: E402


def timed(fn, repeats: int, inner: int) -> float:
    fn()
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        out.append((time.perf_counter() - start) / inner)
    return statistics.median(out)


def measure(kind: str, nq: int, width: int, d: int, repeats: int, g: torch.Generator) -> dict:
    q = torch.nn.functional.normalize(torch.randn(nq, d, generator=g), dim=1)
    block = torch.nn.functional.normalize(torch.randn(width, d, generator=g), dim=1)
    q_t = q.t().contiguous()
    buf = torch.empty(nq * width)
    acc = torch.zeros(nq, d)

    def query_major() -> None:
        logits = torch.mm(q, block.t(), out=buf.view(nq, width))
        if kind == "nca":
            logits.exp2_()
            logits.sum(dim=1)
            acc.addmm_(logits, block)

    def gallery_major() -> None:
        logits = torch.mm(block, q_t, out=buf.view(width, nq))
        if kind == "nca":
            logits.exp2_()
            logits.sum(dim=0)
            acc.addmm_(logits.t(), block)

    times: dict[str, list[float]] = {"query_major": [], "gallery_major": []}
    for _ in range(3):  # interleaved
        times["query_major"].append(timed(query_major, repeats, 5))
        times["gallery_major"].append(timed(gallery_major, repeats, 5))
    qm, gm = statistics.median(times["query_major"]), statistics.median(times["gallery_major"])
    return {"benchmark": "orientation", "kind": kind, "queries": nq, "block": width, "dim": d,
            "query_major_ms": 1e3 * qm, "gallery_major_ms": 1e3 * gm, "gallery_major_speedup": qm / gm,
            "threads": torch.get_num_threads(), "load_avg": os.getloadavg()[0]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--dim", type=int, default=128)
    args = p.parse_args()
    g = torch.Generator().manual_seed(0)
    for kind, nq, width in [("knn", 1024, 4096), ("knn", 1024, 8192), ("knn", 2048, 4096), ("nca", 128, 16384),
                            ("nca", 256, 8192)]:
        emit(measure(kind, nq, width, args.dim, args.repeats, g))


if __name__ == "__main__":
    main()
