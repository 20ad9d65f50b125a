"""Speed of the estimate path: a cold `vramplan estimate ... --json` process and a warm library call.

Targets (issue #2): cold CLI under 250 ms, library call under 1 ms.
Run: python benchmarks/bench_estimate.py
"""
from __future__ import annotations

import statistics
import subprocess
import sys
import time
import timeit

COLD_RUNS = 15
CLI = [sys.executable, "-m", "vramplan.cli", "estimate", "meta-llama/Llama-2-70b", "--gpu", "48GB", "--json"]


def cold_cli_ms() -> list[float]:
    times = []
    for _ in range(COLD_RUNS):
        start = time.perf_counter()
        subprocess.run(CLI, check=True, capture_output=True)
        times.append((time.perf_counter() - start) * 1000)
    return times


def library_call_us() -> float:
    import vramplan
    from vramplan.core._models import resolve

    spec = resolve("meta-llama/Llama-2-70b")
    setup = vramplan.TrainSetup(batch=2, seq=4096)
    n = 2000
    return timeit.timeit(lambda: vramplan.estimate(spec, setup, gpu="48GB"), number=n) / n * 1e6


def library_call_new_shape_us() -> float:
    """A new batch x seq every call: the layer walk is replayed, not looked up."""
    import vramplan
    from vramplan.core._models import resolve

    spec = resolve("meta-llama/Llama-2-70b")
    vramplan.estimate(spec, seq=2047)  # records the walk for this structure once
    n = 400
    start = time.perf_counter()
    for seq in range(2048, 2048 + n):
        vramplan.estimate(spec, seq=seq, gpu="48GB")
    return (time.perf_counter() - start) / n * 1e6


def main() -> None:
    cold = cold_cli_ms()
    python_only = []
    for _ in range(COLD_RUNS):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        python_only.append((time.perf_counter() - start) * 1000)
    print(f"cold `vramplan estimate ... --json`: median {statistics.median(cold):.0f} ms "
          f"(min {min(cold):.0f}, max {max(cold):.0f}; bare interpreter start {statistics.median(python_only):.0f} ms)")
    print(f"library call vramplan.estimate(spec, setup, gpu): {library_call_us():.0f} us")
    print(f"library call with a new seq each time: {library_call_new_shape_us():.0f} us")


if __name__ == "__main__":
    main()
