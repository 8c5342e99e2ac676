"""Choosing the default Fashion-MNIST recipe on a validation split, then the final runs.

``--sweep``: each variant (overrides of the current default recipe) trains on 55,000 training
images and is scored on the other 5,000 (``data.holdout=5000``: class-stratified, the same
images for every run; the test set is never opened). ``--final``: the default command itself,
``snca train`` (whatever the recipe now says), on the real test set for several seeds, and the
softmax baseline at the same recipe. Results are appended to a JSON file as each run finishes.

    python experiments/default_recipe.py --sweep base e20 e20-t0.1 e25      # docs/bench/default_recipe_sweep.json
    python experiments/default_recipe.py --final --seeds 0 1 2 --losses nca  # docs/bench/default_recipe_final.json
    python experiments/default_recipe.py --final --seeds 0 --losses softmax   # the baseline, appended
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "docs" / "bench"

# Overrides of the default recipe (snca/configs/fashion-mnist.yaml), by name.
VARIANTS: dict[str, dict[str, object]] = {
    "base": {},
    "e20": {"epochs": 20},
    "e25": {"epochs": 25},
    "e20-t0.1": {"epochs": 20, "temperature": 0.1},
    "e20-t0.03": {"epochs": 20, "temperature": 0.03},
    "e20-m0.8": {"epochs": 20, "memory_momentum_schedule": {0: 0.8}},
    "e20-lr0.2": {"epochs": 20, "lr": 0.2},
    "e20-wd1e-4": {"epochs": 20, "weight_decay": 1e-4},
}


def train(args: list[str], run_dir: Path) -> dict:
    cmd = [sys.executable, "-m", "snca", "train", *args, "--no-progress", "--run-dir", str(run_dir)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    final = json.loads((run_dir / "final.json").read_text())
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    monitor = [round(m["val_top1"], 4) for m in metrics if m.get("kind") == "epoch" and m.get("val_top1") is not None]
    return {"command": "snca train " + " ".join(args), "wall_s": round(wall, 1), "monitor_per_epoch": monitor,
            **{k: final.get(k) for k in ("knn_top1", "knn_top5", "knn_recomputed_top1", "classifier_top1",
                                           "knn_penultimate_top1", "epochs", "wall_time_s")}}


def record(path: Path, entry: dict) -> None:
    data = json.loads(path.read_text()) if path.exists() else {"runs": []}
    data["runs"].append(entry)
    path.write_text(json.dumps(data, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", nargs="+", metavar="VARIANT", choices=list(VARIANTS), help="variants scored on the holdout")
    parser.add_argument("--final", action="store_true", help="the default command on the test set, per seed, + softmax")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--losses", nargs="+", default=["nca", "softmax"], choices=["nca", "softmax"],
                        help="--final: which models (the default command is nca; softmax is the baseline)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            if args.sweep:
                out = args.out or BENCH / "default_recipe_sweep.json"
                for name in args.sweep:
                    sets = [f"{k}={json.dumps(v) if isinstance(v, dict) else v}" for k, v in VARIANTS[name].items()]
                    cli = [a for s in sets for a in ("--set", s)] + ["--set", "holdout=5000", "--seed", str(seed), "--no-plot"]
                    r = train(cli, Path(tmp) / f"{name}-s{seed}")
                    record(out, {"variant": name, "overrides": VARIANTS[name], "seed": seed, "evaluated_on": "holdout 5000",
                                 "load_avg": os.getloadavg()[0], **r})
                    print(f"{name:<12} seed {seed}: holdout kNN top-1 {100 * r['knn_top1']:.2f} %  ({r['wall_s']:.0f} s)", flush=True)
            if args.final:
                out = args.out or BENCH / "default_recipe_final.json"
                for loss in args.losses:
                    cli = ["--seed", str(seed)] + (["--loss", "softmax"] if loss == "softmax" else [])
                    r = train(cli, Path(tmp) / f"final-{loss}-s{seed}")
                    record(out, {"loss": loss, "seed": seed, "evaluated_on": "test 10000", "load_avg": os.getloadavg()[0], **r})
                    print(f"final {loss} seed {seed}: test kNN top-1 {100 * r['knn_top1']:.2f} %  ({r['wall_s']:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
