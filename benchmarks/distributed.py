"""Memory and communication of the sharded NCA step at ImageNet scale, for W = 1, 2, 4 ranks.

Starts W CPU processes (gloo on 127.0.0.1, torchrun's environment variables), each building its
shard of an N x D bank and running a few steps of ``nca_loss_sharded(..., update_memory=True)``
with B samples per rank. Prints one JSON line per W: peak RSS and bank bytes of every rank, and
the bytes one step moves through collectives (counted by snca.distributed.COMM: all_gather and
all_to_all count bytes received, all_reduce the reduced buffer).

    python benchmarks/distributed.py                       # N=1,281,167, D=128, B=256, W=1,2,4
    python benchmarks/distributed.py --num-samples 100000 --worlds 1,2

Timings are printed too but mean little on a shared 2-core machine: W processes split the
cores, and every rank does the same B_tot x N/W x D work as one process does for B x N x D.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-samples", type=int, default=1_281_167)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--batch", type=int, default=256, help="samples per rank per step")
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--worlds", default="1,2,4")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="CPU threads shared by all ranks")
    p.add_argument("--overhead-gb", type=float, default=0.6, help="assumed torch overhead per process")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # output path of one rank
    return p.parse_args(argv)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(args: argparse.Namespace) -> None:
    import psutil
    import torch
    import torch.nn.functional as F

    import snca.distributed as sd

    proc = psutil.Process()
    rss_import = proc.memory_info().rss
    info = sd.init_from_env(backend="gloo", timeout_s=3600)
    n, d = args.num_samples, args.dim
    labels = torch.randint(0, args.classes, (n,), generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    bank = sd.sharded_bank(labels, dim=d, momentum=0.5, generator=torch.Generator().manual_seed(1))
    build_s = time.perf_counter() - t0
    del labels
    rss_bank = proc.memory_info().rss
    slot_bytes = bank.slots.numel() * bank.slots.element_size()
    index_bytes = sum(b.numel() * b.element_size() for name, b in bank.named_buffers() if name != "slots")

    steps = []
    for step in range(args.steps):
        g = torch.Generator().manual_seed(1000 * step + info.rank)
        features = F.normalize(torch.randn(args.batch, d, generator=g), dim=1).requires_grad_()
        indices = torch.randint(0, n, (args.batch,), generator=g)
        sd.COMM.reset()
        t0 = time.perf_counter()
        loss = sd.nca_loss_sharded(features, indices, bank, 0.05, update_memory=True)
        loss.backward()
        steps.append({"seconds": time.perf_counter() - t0, "comm": sd.COMM.as_dict(), "loss": float(loss.detach())})
    result = {
        "rank": info.rank,
        "rss_after_steps": proc.memory_info().rss,
        "slot_bytes": slot_bytes,
        "index_bytes": index_bytes,
        "rss_after_import": rss_import,
        "rss_after_bank": rss_bank,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "build_seconds": build_s,
        "steps": steps,
        "threads": torch.get_num_threads(),
    }
    Path(args.worker).write_text(json.dumps(result))
    sd.cleanup()


def run_world(args: argparse.Namespace, world: int) -> dict:
    import psutil

    n, d = args.num_samples, args.dim
    bank_gb = n * d * 4 / 2**30
    need_gb = world * (bank_gb / world + 5 * n * 8 / 2**30 + args.overhead_gb) + 1.0
    avail_gb = psutil.virtual_memory().available / 2**30
    base = {"bench": "distributed", "world_size": world, "num_samples": n, "dim": d, "batch_per_rank": args.batch}
    if avail_gb < 1.3 * need_gb:
        return {**base, "skipped": f"needs about {need_gb:.1f} GB, {avail_gb:.1f} GB available"}
    port = free_port()
    threads = max(1, args.threads // world)
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for r in range(world):
            env = dict(
                os.environ, RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r), LOCAL_WORLD_SIZE=str(world),
                MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS=str(threads),
                CUDA_VISIBLE_DEVICES="",
            )
            if Path("/sys/class/net/lo").exists():
                env["GLOO_SOCKET_IFNAME"] = "lo"
            cmd = [sys.executable, __file__, "--worker", str(Path(tmp) / f"rank{r}.json")]
            cmd += [f"--num-samples={n}", f"--dim={d}", f"--classes={args.classes}"]
            cmd += [f"--batch={args.batch}", f"--steps={args.steps}"]
            procs.append(subprocess.Popen(cmd, env=env))
        codes = [p.wait() for p in procs]
        if any(codes):
            return {**base, "error": f"ranks exited with {codes}"}
        ranks = [json.loads((Path(tmp) / f"rank{r}.json").read_text()) for r in range(world)]
    last = [rk["steps"][-1] for rk in ranks]
    comm = last[0]["comm"]
    single_bank = n * d * 4
    return {
        **base,
        "threads_per_rank": threads,
        "bank_bytes_single_process": single_bank,
        "slot_bytes_per_rank": [rk["slot_bytes"] for rk in ranks],
        "slot_fraction_of_single": round(max(rk["slot_bytes"] for rk in ranks) / single_bank, 4),
        "index_bytes_per_rank": [rk["index_bytes"] for rk in ranks],
        "peak_rss_bytes_per_rank": [rk["peak_rss"] for rk in ranks],
        "rss_after_import_per_rank": [rk["rss_after_import"] for rk in ranks],
        "peak_rss_above_import_per_rank": [rk["peak_rss"] - rk["rss_after_import"] for rk in ranks],
        "rss_after_bank_per_rank": [rk["rss_after_bank"] for rk in ranks],
        "rss_after_steps_per_rank": [rk["rss_after_steps"] for rk in ranks],
        "comm_bytes_per_step": {"gathered": comm["gathered"], "reduced": comm["reduced"], "total": comm["total"]},
        "comm_by_op": comm["by_op"],
        "comm_fraction_of_bank": round(comm["total"] / single_bank, 6),
        "step_seconds_per_rank": [round(s["seconds"], 2) for s in last],
        "bank_build_seconds_per_rank": [round(rk["build_seconds"], 2) for rk in ranks],
        "loss_per_rank": [round(s["loss"], 4) for s in last],
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return
    for world in (int(w) for w in args.worlds.split(",")):
        print(json.dumps(run_world(args, world)), flush=True)


if __name__ == "__main__":
    main()
