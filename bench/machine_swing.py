"""How steady is this machine? The same fixed piece of work timed over and over, one thread per core.

The development and CI machines are 2-core VMs whose speed changes from one second to the next
(another tenant on the same physical cores, presumably: steal time reads 0% meanwhile). A latency
percentile over 20 s then holds the slow seconds while a median over 5 s may hold only fast ones,
which is why bench/serve_load.py interleaves its batch-1 and half-load phases. Prints one JSON line
per core: the median time of the work in each `--window-ms` window, and the slowest window's median
over the fastest's.

    python bench/machine_swing.py                  # 20 s, fp32 matmul, both cores at once
    python bench/machine_swing.py --seconds 60 --window-ms 100 --dtype bf16
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time

import torch


def timeline(core: int, seconds: float, window: float, n: int, dtype: torch.dtype, out: dict[int, list[float]]) -> None:
    """Medians of one n x n matmul per window, on `core` (Linux affinity), into out[core]."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {core})  # 0: the calling thread
    a = torch.randn(n, n, dtype=dtype)
    a @ a
    medians, times = [], []
    end = time.perf_counter() + seconds
    window_end = time.perf_counter() + window
    while (now := time.perf_counter()) < end:
        a @ a
        times.append(time.perf_counter() - now)
        if time.perf_counter() >= window_end:
            medians.append(statistics.median(times) * 1e3)
            times, window_end = [], window_end + window
    out[core] = medians


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--window-ms", type=float, default=250.0)
    ap.add_argument("--size", type=int, default=384, help="matmul size (384: ~1 ms on one core in fp32)")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                    help="bf16 runs on AMX where the CPU has it (the int8/bf16 serving runtimes use it too)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else [0]
    out: dict[int, list[float]] = {}
    threads = [threading.Thread(target=timeline, args=(c, args.seconds, args.window_ms / 1e3, args.size, dtype, out))
               for c in cores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for core, medians in sorted(out.items()):
        q = statistics.quantiles(medians, n=10)
        print(json.dumps({
            "bench": "machine_swing", "dtype": args.dtype, "core": core, "windows": len(medians), "window_ms": args.window_ms,
            "fastest_ms": round(min(medians), 3), "p10_ms": round(q[0], 3), "median_ms": round(statistics.median(medians), 3),
            "p90_ms": round(q[-1], 3), "slowest_ms": round(max(medians), 3),
            "slowest_over_fastest": round(max(medians) / min(medians), 2), "p90_over_p10": round(q[-1] / q[0], 2),
        }), flush=True)


if __name__ == "__main__":
    main()
