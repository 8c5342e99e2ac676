"""Does a 2-rank run train like one process? mnist5k, the same config and seed, three ways:

- one process, batch 64;
- two gloo ranks, 32 images each per step (the same 64 images per step: DistributedSampler
  interleaves one permutation), batch norm over each rank's 32;
- two gloo ranks with ``--sync-bn`` (batch norm over all 64, as in one process).

If the third matches the first and the second does not, per-rank batch-norm statistics are the
cause. Prints a table and writes docs/bench/ddp_dynamics.json.

    python experiments/ddp_dynamics.py --seeds 0 1 2 --epochs 1 3   (lr 0.01, as in the issue report)

The code before the application-layer redesign, for comparison:

    git worktree add /tmp/snca-ec75aa2 ec75aa2
    python experiments/ddp_dynamics.py --src /tmp/snca-ec75aa2 --ways "1 process" "2 ranks" --epochs 1 \
        --out docs/bench/ddp_dynamics_ec75aa2.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["--dataset", "mnist5k", "--batch-size", "64", "--device", "cpu", "--no-progress", "--no-plot",
          "--set", "recompute_gallery=false"]
WAYS = {
    "1 process": (1, []),
    "2 ranks": (2, []),
    "2 ranks --sync-bn": (2, ["--sync-bn"]),
}


def run_once(ranks: int, extra: list[str], seed: int, epochs: int, lr: float, subset: int | None, workdir: Path,
             src: Path | None = None) -> dict:
    run_dir = workdir / f"r{ranks}-{'sync' if extra else 'plain'}-s{seed}-e{epochs}"
    args = ["train", *COMMON, "--seed", str(seed), "--epochs", str(epochs), "--lr", str(lr), "--run-dir", str(run_dir), *extra]
    if subset:
        args += ["--subset", str(subset)]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"  # two ranks on two cores: one thread each; the same for one process
    if Path("/sys/class/net/lo").exists():
        env["GLOO_SOCKET_IFNAME"] = "lo"
    if src is not None:  # another checkout's code (e.g. a git worktree of an older commit)
        env["PYTHONPATH"] = str(src / "src")
    if ranks == 1:
        cmd = [sys.executable, "-m", "snca", *args, "--threads", "1"]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks), "-m", "snca", *args]
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=src or ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    final = json.loads((run_dir / "final.json").read_text())
    return {"knn_top1": final["knn_top1"], "wall_s": round(time.perf_counter() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--subset", type=int, default=None, help="train on N of the 4,000 training images")
    parser.add_argument("--ways", nargs="+", default=list(WAYS), choices=list(WAYS), help="which of the three ways to run")
    parser.add_argument("--src", type=Path, default=None, help="run the snca of another checkout (its src/ on PYTHONPATH)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "bench" / "ddp_dynamics.json"))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for epochs in args.epochs:
            for way in args.ways:
                ranks, extra = WAYS[way]
                values = []
                for seed in args.seeds:
                    r = run_once(ranks, extra, seed, epochs, args.lr, args.subset, Path(tmp), args.src)
                    values.append(r["knn_top1"])
                    print(f"epochs {epochs}  {way:<18} seed {seed}: {100 * r['knn_top1']:.2f} %  ({r['wall_s']} s)", flush=True)
                rows.append({"epochs": epochs, "way": way, "seeds": args.seeds, "knn_top1": values,
                             "mean": statistics.mean(values), "min": min(values), "max": max(values)})
    print(f"\n{'epochs':>6}  {'way':<18} {'mean':>7} {'min':>7} {'max':>7}   (memory-kNN top-1 %, k=30, mnist5k test)")
    for r in rows:
        print(f"{r['epochs']:>6}  {r['way']:<18} {100 * r['mean']:>7.2f} {100 * r['min']:>7.2f} {100 * r['max']:>7.2f}")
    out = {"command": "python experiments/ddp_dynamics.py " + " ".join(sys.argv[1:]), "lr": args.lr, "subset": args.subset,
           "src": str(args.src) if args.src else None,
           "config": COMMON, "rows": rows, "load_before": os.getloadavg()}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
