"""Two versions of ``snca.knn`` (by git revision) and faiss IndexFlatIP on the same data, in one
process, interleaved round by round; medians and whether the two versions agree.

    python benchmarks/knn_ab.py --a 0e3b597 --b 015964d --num-gallery 500000 --num-queries 2048 --rounds 4
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import emit  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def load_version(rev: str, tmp: Path):
    path = tmp / f"knn_{rev}.py"
    path.write_text(subprocess.run(["git", "show", f"{rev}:src/snca/knn.py"], capture_output=True, text=True, check=True,
                                   cwd=ROOT).stdout)
    name = f"snca.knn_{rev}"  # inside the package, so its relative imports resolve
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--a", required=True)
    p.add_argument("--b", required=True)
    p.add_argument("--num-gallery", type=int, default=500_000)
    p.add_argument("--num-queries", type=int, default=2048)
    p.add_argument("--k", type=int, default=30)
    p.add_argument("--rounds", type=int, default=4)
    args = p.parse_args()
    import faiss

    import snca  # noqa: F401 - the package the loaded versions import from

    g = torch.Generator().manual_seed(0)
    gallery = torch.nn.functional.normalize(torch.randn(args.num_gallery, 128, generator=g), dim=1)
    queries = torch.nn.functional.normalize(torch.randn(args.num_queries, 128, generator=g), dim=1)
    index = faiss.IndexFlatIP(128)
    index.add(gallery.numpy())
    faiss.omp_set_num_threads(torch.get_num_threads())
    with tempfile.TemporaryDirectory() as tmp:
        a, b = load_version(args.a, Path(tmp)), load_version(args.b, Path(tmp))
    runs = {args.a: lambda: a.knn_search(queries, gallery, args.k), args.b: lambda: b.knn_search(queries, gallery, args.k),
            "faiss": lambda: index.search(queries.numpy(), args.k)}
    for fn in runs.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, fn in runs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    (sa, ia), (sb, ib) = runs[args.a](), runs[args.b]()
    emit({"benchmark": "knn_ab", "num_gallery": args.num_gallery, "num_queries": args.num_queries, "k": args.k,
          **{f"{name}_median_s": statistics.median(t) for name, t in times.items()},
          "times_s": times, "versions_identical": bool(torch.equal(ia, ib)), "max_sim_diff": float((sa - sb).abs().max()),
          "threads": torch.get_num_threads(), "load_avg": os.getloadavg()[0]})


if __name__ == "__main__":
    main()
