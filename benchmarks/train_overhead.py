"""Training throughput of NCA + memory vs a softmax classifier, same backbone, batch and data.

Prints one JSON line per loss kind (images/s of full optimizer steps: forward, loss, backward,
SGD step and, for NCA, the memory update) and the NCA line carries ``overhead_vs_softmax``
(1 - nca_images_per_s / softmax_images_per_s), the time NCA adds per step (its step minus the
softmax step) and the floor that added time is compared against: the arithmetic the loss cannot
avoid at this size, timed alone in the same blocks - one B x N x D similarity product in the
library's chunks, exp2 of the B x N logits, one B x N x D product of the weights with the
slots - in the faster of the two orientations (B x chunk or chunk x B), both reported. Target: added <= 1.3 x floor. Batches are loaded once up front, so data
loading is excluded from both. The two kinds alternate in blocks (``--repeats``) in the same
process and the median block is reported, which keeps a noisy shared machine from favouring
either one.

    .venv/bin/python benchmarks/train_overhead.py                 # Fashion-MNIST, small_cnn, N=60000
    .venv/bin/python benchmarks/train_overhead.py --arch cifar_resnet18 --steps 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="small_cnn")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per block")
    p.add_argument("--repeats", type=int, default=3, help="blocks per loss kind (alternating)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per kind before the first block")
    p.add_argument("--subset", type=int, default=None, help="training images (= memory slots); default all 60000")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--dataset", default="fashion-mnist")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from snca.config import load_config
    from snca.data import run_datasets
    from snca.models import build_model
    from snca.train import Trainer

    overrides = {"dataset": args.dataset, "arch": args.arch, "subset": args.subset, "batch_size": args.batch_size,
                 "lr": 0.01, "lr_schedule": "constant"}
    data = run_datasets(load_config("fashion-mnist", overrides), ("train",))
    train = data["train"]
    n_batches = args.warmup + args.steps
    loader = torch.utils.data.DataLoader(train, batch_size=args.batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(0), drop_last=True)
    batches = []
    for b in loader:
        batches.append(b)
        if len(batches) == n_batches:
            break

    trainers = {}
    for loss in ("nca", "softmax"):
        cfg = load_config("fashion-mnist", {**overrides, "loss": loss})
        torch.manual_seed(0)
        trainers[loss] = Trainer(cfg, build_model(cfg.model.arch, cfg.model.low_dim, data.in_chans), train)
        trainers[loss].net.train()
        for b in batches[: args.warmup]:
            trainers[loss].train_step([b])

    from snca.nca import default_chunk_size

    slots = trainers["nca"].objective.memory.slots
    queries = torch.nn.functional.normalize(torch.randn(args.batch_size, slots.shape[1]), dim=1) * 20.0
    queries_t = queries.t().contiguous()
    chunk = default_chunk_size(args.batch_size)
    buffer = torch.empty(args.batch_size * min(chunk, len(slots)))

    def floor_step(slot_major: bool) -> None:  # the unavoidable arithmetic of one loss evaluation
        acc = torch.zeros(args.batch_size, slots.shape[1])
        for a in range(0, len(slots), chunk):
            block = slots[a : a + chunk]
            out = buffer[: args.batch_size * len(block)]
            if slot_major:  # block @ queries.T: (chunk, B)
                logits = torch.mm(block, queries_t, out=out.view(len(block), args.batch_size)).exp2_()
                acc.addmm_(logits.t(), block)
            else:  # queries @ block.T: (B, chunk), the library's orientation
                logits = torch.mm(queries, block.t(), out=out.view(args.batch_size, len(block))).exp2_()
                acc.addmm_(logits, block)

    for _ in range(args.warmup):
        floor_step(False)
        floor_step(True)
    times: dict[str, list[float]] = {"nca": [], "softmax": [], "floor_query_major": [], "floor_slot_major": []}
    for _ in range(args.repeats):
        for loss, trainer in trainers.items():
            start = time.perf_counter()
            for b in batches[args.warmup :]:
                trainer.train_step([b])
            times[loss].append(time.perf_counter() - start)
        for slot_major in (False, True):
            start = time.perf_counter()
            for _ in range(args.steps):
                floor_step(slot_major)
            times["floor_slot_major" if slot_major else "floor_query_major"].append(time.perf_counter() - start)

    images = args.steps * args.batch_size
    rate = {loss: images / statistics.median(times[loss]) for loss in ("nca", "softmax")}
    step_ms = {loss: 1e3 * statistics.median(t) / args.steps for loss, t in times.items()}
    step_ms["floor"] = min(step_ms["floor_query_major"], step_ms["floor_slot_major"])  # the fastest orientation
    for loss in ("nca", "softmax"):
        record = {
            "benchmark": "train_overhead",
            "loss": loss,
            "images_per_s": round(rate[loss], 1),
            "arch": args.arch,
            "dataset": args.dataset,
            "batch_size": args.batch_size,
            "memory_slots": len(train) if loss == "nca" else None,
            "steps": args.steps,
            "repeats": args.repeats,
            "block_seconds": [round(t, 3) for t in times[loss]],
            "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "device": "cpu",
        }
        record["step_ms"] = round(step_ms[loss], 2)
        if loss == "nca":
            record["overhead_vs_softmax"] = round(1 - rate["nca"] / rate["softmax"], 4)
            added = step_ms["nca"] - step_ms["softmax"]
            record.update(added_ms=round(added, 2), floor_ms=round(step_ms["floor"], 2),
                          added_over_floor=round(added / step_ms["floor"], 3),
                          target_added_le_1_3x_floor=added <= 1.3 * step_ms["floor"],
                          floor_query_major_ms=round(step_ms["floor_query_major"], 2),
                          floor_slot_major_ms=round(step_ms["floor_slot_major"], 2),
                          omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", "default"), load_avg=os.getloadavg()[0])
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
