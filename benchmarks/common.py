"""Helpers shared by the benchmark scripts: JSON-line output, memory high-water marks, timing,
and running each implementation in its own subprocess (so every peak is that impl's alone).

Memory figures are in decimal GB (1e9 bytes), as in DESIGN.md.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

GB = 1e9


EXACT_KEYS = ("loss", "diff")  # fields compared across implementations: printed unrounded


def emit(record: dict[str, Any]) -> None:
    """Print one benchmark record as a single JSON line (timings and sizes rounded to 6
    significant digits for readability; losses and differences in full)."""

    def tidy(x: Any, exact: bool = False) -> Any:
        if isinstance(x, float) and not exact:
            return float(f"{x:.6g}")
        if isinstance(x, dict):
            return {k: tidy(v, exact or any(e in k for e in EXACT_KEYS)) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [tidy(v, exact) for v in x]
        return x

    print(json.dumps(tidy(record)), flush=True)


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_gb() -> float:
    """Current resident set size of this process."""
    kb = _status_kb("VmRSS")
    if kb is not None:
        return kb * 1024 / GB
    import psutil  # fallback off Linux

    return psutil.Process().memory_info().rss / GB


def peak_rss_gb() -> float:
    """High-water mark of this process's resident set size since it started."""
    kb = _status_kb("VmHWM")
    if kb is not None:
        return kb * 1024 / GB
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return maxrss / GB if sys.platform == "darwin" else maxrss * 1024 / GB  # bytes on macOS, KiB on Linux


def available_gb() -> float:
    """Memory the OS could give a new process now (free + reclaimable)."""
    import psutil

    return psutil.virtual_memory().available / GB


def load_average() -> float:
    return os.getloadavg()[0]


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def time_calls(fn: Callable[[int], Any], repeats: int, device: str, warmup: int = 1) -> tuple[list[float], list[Any]]:
    """Call ``fn(i)`` ``warmup`` times untimed, then ``repeats`` times timed (device synchronised
    around each call). Returns (seconds per timed call, every call's return value in order)."""
    results = []
    for i in range(warmup):
        results.append(fn(i))
        synchronize(device)
    times = []
    for i in range(warmup, warmup + repeats):
        synchronize(device)
        t0 = time.perf_counter()
        results.append(fn(i))
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return times, results


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def run_worker(
    script: str, args: Sequence[str], timeout: float | None = None, env: dict[str, str] | None = None
) -> list[dict[str, Any]]:
    """Run ``python script *args`` in a fresh process; return the JSON lines it printed.

    A crash (e.g. killed for memory) becomes one record with an ``error`` field, so one failing
    implementation does not hide the others.
    """
    cmd = [sys.executable, script, *args]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return [{"error": f"timed out after {timeout} s", "cmd": " ".join(args)}]
    records = []
    for line in proc.stdout.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-3:]
        records.append({"error": f"worker exited with code {proc.returncode}", "stderr_tail": tail, "cmd": " ".join(args)})
    return records


def environment() -> dict[str, Any]:
    """Conditions worth recording next to any timing."""
    import torch

    info: dict[str, Any] = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "load_avg_1min": round(load_average(), 2),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def merge_rounds(rounds: list[dict[str, Any]], time_key: str, times_key: str) -> dict[str, Any]:
    """One record from the same worker run in several interleaved rounds: all timed calls
    pooled (``time_key`` = their median), peak memory = the largest, other fields from round 1.
    Interleaving implementations round by round spreads a shared machine's load over all."""
    merged = dict(rounds[0])
    if len(rounds) > 1:
        times = [t for r in rounds for t in r[times_key]]
        merged[times_key] = times
        merged[time_key] = median(times)
        for key in ("peak_mem_gb", "peak_minus_baseline_gb", "gpu_peak_mem_gb"):
            if key in merged:
                merged[key] = max(r[key] for r in rounds)
        merged["load_avg_1min"] = [r.get("load_avg_1min") for r in rounds]
        merged["rounds"] = len(rounds)
    return merged
