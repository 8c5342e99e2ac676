"""What the checkpoint integrity checks cost: writing and reading a training checkpoint of the
default run's size (small_cnn, a 60,000 x 128 float32 memory, SGD momentum), with and without
the digest and the content validation, each timed alone in the same process.

    python benchmarks/checkpoint_io.py [--rows 60000] [--repeats 5]

Prints one JSON line: median seconds of save, load, tensor_digest and validate_state, the file
size, and the share of save + load the checks take.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit  # noqa: E402

from snca import MemoryBank  # noqa: E402
from snca.checkpoint import load_checkpoint, save_checkpoint, tensor_digest, validate_state  # noqa: E402
from snca.config import config_to_dict, load_config  # noqa: E402
from snca.models import build_model  # noqa: E402


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=60_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    cfg = load_config("fashion-mnist")
    model = build_model("small_cnn", low_dim=128, in_chans=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 1, 28, 28)).sum().backward()
    opt.step()
    bank = MemoryBank(torch.arange(args.rows) % 10, dim=128)
    state = {"config": config_to_dict(cfg), "model": model.state_dict(), "memory": bank.state_dict(),
             "optimizer": opt.state_dict(), "epoch": 1, "facts": {"class_names": [str(c) for c in range(10)]}}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "last.pt"
        save_s = median_time(lambda: save_checkpoint(path, state), args.repeats)
        load_s = median_time(lambda: load_checkpoint(path), args.repeats)
        loaded = load_checkpoint(path)
        digest_s = median_time(lambda: tensor_digest(loaded), args.repeats)
        validate_s = median_time(lambda: validate_state(loaded, path), args.repeats)
        size = path.stat().st_size
    checks = 2 * digest_s + validate_s  # a digest on save and on load, the validation on load
    emit({"benchmark": "checkpoint_io", "rows": args.rows, "file_bytes": size, "save_s": save_s, "load_s": load_s,
          "digest_s": digest_s, "validate_s": validate_s, "checks_share_of_save_plus_load": checks / (save_s + load_s),
          "load_avg": os.getloadavg()[0], "torch_threads": torch.get_num_threads()})


if __name__ == "__main__":
    main()
