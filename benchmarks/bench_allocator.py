"""Speed of the caching-allocator model: one million alloc/free events through replay_allocations.

The stream is the real alloc/free order of a resnet18 training step (tests/data/allocator/
zdevito_resnet18_trainstep_ops.json), its leftover blocks freed at the end of each step, repeated
until it holds 1,000,000 events; keys are ints. Target: 1M events in under 2 s (best of 3,
CPU time and wall time both printed).
Run: python benchmarks/bench_allocator.py
"""
from __future__ import annotations

import json
import time
from pathlib import Path

OPS = Path(__file__).parent.parent / "tests" / "data" / "allocator" / "zdevito_resnet18_trainstep_ops.json"
N_EVENTS = 1_000_000


def training_steps(n_events: int = N_EVENTS) -> list[tuple]:
    ops = json.loads(OPS.read_text())["ops"]
    index = {name: i for i, name in enumerate(dict.fromkeys(op[1] for op in ops))}
    leftover: dict = {}
    for op in ops:
        if op[0] == "alloc":
            leftover[op[1]] = True
        else:
            leftover.pop(op[1], None)
    step = [tuple(op) for op in ops] + [("free", name) for name in leftover]
    events, rep = [], 0
    while len(events) < n_events:
        base = rep * len(index)
        events.extend((op[0], base + index[op[1]], *op[2:]) for op in step)
        rep += 1
    return events[:n_events]


def main() -> None:
    from vramplan.cuda._replay import replay_allocations

    events = training_steps()
    best_wall = best_cpu = float("inf")
    for _ in range(3):
        wall, cpu = time.perf_counter(), time.process_time()
        result = replay_allocations(events)
        best_wall = min(best_wall, time.perf_counter() - wall)
        best_cpu = min(best_cpu, time.process_time() - cpu)
    # CPU time is what the replay costs; wall time also counts whatever else the machine runs
    print(f"{len(events):,} events in {best_cpu:.2f} s CPU ({best_wall:.2f} s wall): "
          f"{len(events) / best_cpu:,.0f} events/s "
          f"(peak reserved {result.peak_reserved_bytes:,} B, {result.segments} segments)")


if __name__ == "__main__":
    main()
