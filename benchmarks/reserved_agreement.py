"""Peak reserved: the estimate's replay (layer tapes unrolled, small pool lumped) against simulate's
(the traced step's every storage, two steps, every event through the allocator model).

Run: python benchmarks/reserved_agreement.py [--catalog]   (writes a markdown table to stdout)
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from test_agreement import CASES, spec_of  # noqa: E402

from vramplan import TrainSetup, estimate  # noqa: E402
from vramplan.core._models import resolve  # noqa: E402
from vramplan.cuda._replay import replay_allocations  # noqa: E402
from vramplan.estimate._events import step_stream  # noqa: E402
from vramplan.estimate._inventory import static_memory  # noqa: E402

CATALOG = [("meta-llama/Llama-2-7b", dict(seq=2048)), ("meta-llama/Meta-Llama-3-8B", dict(seq=1024, batch=2)),
           ("meta-llama/Llama-2-7b", dict(seq=1024, grad_ckpt=False))]


def main() -> None:
    from vramplan.simulate import simulate

    cases = [(spec_of(n), n, f) for n, f in CASES]
    if "--catalog" in sys.argv:
        cases = [(resolve(n), n, f) for n, f in CATALOG]
    print("| case | simulate reserved MiB | estimate reserved MiB (lumped) | error | estimate exact replay MiB | error |")
    print("|---|---:|---:|---:|---:|---:|")
    errs, errs_exact = [], []
    for spec, name, flags in cases:
        setup = TrainSetup(**flags)
        t = time.perf_counter()
        trace = simulate(spec, setup, alloc_conf="")
        est = estimate(spec, setup, alloc_conf="")
        exact = replay_allocations(step_stream(spec, setup, static_memory(spec, setup)).events).peak_reserved_bytes
        sim = trace.peak_reserved_bytes
        e, ex = est.peak_reserved_bytes / sim - 1, exact / sim - 1
        errs.append(e)
        errs_exact.append(ex)
        label = name + " " + " ".join(f"{k}={v}" for k, v in flags.items())
        print(f"| {label} | {sim / 2**20:,.1f} | {est.peak_reserved_bytes / 2**20:,.1f} | {e:+.2%} | "
              f"{exact / 2**20:,.1f} | {ex:+.2%} |", flush=True)
        del t
    print(f"\nlumped: median |error| {statistics.median(abs(x) for x in errs):.2%}, range {min(errs):+.2%} .. "
          f"{max(errs):+.2%}; exact replay of the estimate's stream: median |error| "
          f"{statistics.median(abs(x) for x in errs_exact):.2%}, range {min(errs_exact):+.2%} .. {max(errs_exact):+.2%}")


if __name__ == "__main__":
    main()
