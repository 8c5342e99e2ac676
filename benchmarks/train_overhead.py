"""Training throughput of NCA + memory vs a softmax classifier, same backbone, batch and data.

Prints one JSON line per loss kind (images/s of full optimizer steps: forward, loss, backward,
SGD step and, for NCA, the memory update) and the NCA line carries ``overhead_vs_softmax``
(1 - nca_images_per_s / softmax_images_per_s). Batches are loaded once up front, so data
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

    times: dict[str, list[float]] = {"nca": [], "softmax": []}
    for _ in range(args.repeats):
        for loss, trainer in trainers.items():
            start = time.perf_counter()
            for b in batches[args.warmup :]:
                trainer.train_step([b])
            times[loss].append(time.perf_counter() - start)

    images = args.steps * args.batch_size
    rate = {loss: images / statistics.median(t) for loss, t in times.items()}
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
        if loss == "nca":
            record["overhead_vs_softmax"] = round(1 - rate["nca"] / rate["softmax"], 4)
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
