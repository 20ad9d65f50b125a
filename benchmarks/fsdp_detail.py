"""Peak reserved of one GPU's FSDP replay (plan/_sharding.py fsdp_slack) at the estimate's reduced
detail (estimate/_reserved.py EXACT_LAYERS decoder layers at each end event by event, the middle
layers' net allocations only) against every event of every layer, on the 15 Answer.AI runs of
tests/test_sharding.py (FSDP full_shard over 2 GPUs, six with CPU offload), beside the published
max_memory_reserved (docs/allocator.md#fsdp-reduced-detail).

Run: python benchmarks/fsdp_detail.py   (about a minute; writes a markdown table to stdout)
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from test_sharding import AAI, AAI_BASE, AAI_SPECS  # noqa: E402

from vramplan.cuda._alloc_conf import as_conf  # noqa: E402
from vramplan.cuda._fast_replay import replay_program  # noqa: E402
from vramplan.estimate._events import compiled  # noqa: E402
from vramplan.estimate._inventory import static_memory  # noqa: E402
from vramplan.estimate._reserved import EXACT_LAYERS  # noqa: E402
from vramplan.plan._sharding import Parallel, effective_setup, fsdp_shards, splits_for  # noqa: E402

GiB = 2**30


def main() -> None:
    print(f"| run | reduced ({EXACT_LAYERS} exact layers) GiB | every layer GiB | reduced vs every | published GiB "
          "| reduced vs published | every vs published |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    drift, seconds = [], [0.0, 0.0]
    for rid, model, method, batch, seq, offload, published, _allocated in AAI:
        spec, setup = AAI_SPECS[model], AAI_BASE.with_(method=method, batch=batch, seq=seq)
        par = Parallel(2, "fsdp", offload=offload)
        run = effective_setup(setup, par)
        shards = fsdp_shards(spec, run, splits_for(spec, run, par), par)
        static = static_memory(spec, run)
        out = []
        for i, exact in enumerate((EXACT_LAYERS, None)):
            program = compiled(spec, run, static, exact_layers=exact, fsdp=shards)
            t0 = time.perf_counter()
            r = replay_program(program.ops, program.places, program.sizes(run), program.keys, as_conf(""), None,
                               program.streams, program.count_from)
            seconds[i] += time.perf_counter() - t0
            out.append(r.peak_reserved_bytes / GiB)
        drift.append(out[0] / out[1] - 1)
        print(f"| {rid} | {out[0]:.3f} | {out[1]:.3f} | {drift[-1]:+.1%} | {published:.2f} "
              f"| {out[0] / published - 1:+.1%} | {out[1] / published - 1:+.1%} |")
    print(f"\nreduced vs every layer: {min(drift):+.1%} .. {max(drift):+.1%}; replay seconds "
          f"{seconds[0]:.2f} (reduced) / {seconds[1]:.2f} (every layer)")


if __name__ == "__main__":
    main()
