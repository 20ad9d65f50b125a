"""How closely the estimate's allocation stream follows a real CUDA step, event by event.

Takes profile records made with `vramplan profile --snapshot` (under profiles/), each with its
allocator snapshot beside it, and the estimate's stream of the record's setup with every layer
played: one decoder layer's backward of the last step, its allocations and frees over --min-mib
MiB, in order. The snapshot's window is the run of the same length that shares the most events
with it; the figure is the share of events the two have in common in order, 2 x matched / (both
lengths); --show lists the runs that differ.

Run: python benchmarks/stream_vs_snapshot.py profiles/h200 [--show]

2026-12-01 (twelfth session), the six H200 records with a snapshot (Meta-Llama-3-8B x 4, Qwen3-8B,
gemma-3-1b-pt; QLoRA 1 x 2048, checkpointed): 0.97 after the gradient sums were made in place,
then 0.97, 0.97, 0.97, 0.98, 0.98, 0.99 with the step's order as the engine makes it (the q/k view
copies, RMSNorm's backward temporaries, the checkpoint's input release). With every gradient sum
a new buffer, as the walk had it before (docs/autograd.md#gradient-accumulation): 0.67, 0.67,
0.67, 0.88, 0.59, 0.94. The differences left on Meta-Llama-3-8B: flash attention's backward workspace, one
64.25 MiB allocation on the H200 (torch 2.11) where the estimate makes softmax_d, dq_accum and
the expanded dk / dv one by one (cuda/_sdpa.py flash_backward_workspace, from torch 2.13's
flash_api.cpp), and where the layer's first and last gradients are freed.
"""
from __future__ import annotations

import argparse
import pathlib
import sys


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("records", nargs="+", help="profile records (.json) made with --snapshot, or folders of them")
    ap.add_argument("--layer", type=int, default=None, help="decoder layer (default: the middle one)")
    ap.add_argument("--min-mib", type=float, default=8.0)
    ap.add_argument("--show", action="store_true", help="list the runs that differ")
    args = ap.parse_args()
    from vramplan.cuda._snapshot import load_trace
    from vramplan.profile._compare import _reestimate
    from vramplan.profile._record import spec_from_record
    from vramplan.profile._store import read_record
    from vramplan.profile._stream_match import match_layer

    threshold = int(args.min_mib * 2**20)
    paths = []
    for given in map(pathlib.Path, args.records):
        paths += sorted(p for p in given.glob("*.json") if p.with_suffix(".snapshot.pickle.gz").exists()) \
            if given.is_dir() else [given]
    show = lambda seq: " ".join(f"{k}{n / 2**20:g}" for k, n in seq) or "-"  # noqa: E731
    for path in paths:
        record = read_record(path)
        spec, est = spec_from_record(record.model), _reestimate(record)
        layer = spec.layers // 2 if args.layer is None else args.layer
        trace = load_trace(str(path.with_suffix(".snapshot.pickle.gz")))
        m = match_layer(spec, est.setup, trace, layer, threshold, gpu=est.gpu, alloc_conf=est.alloc_conf)
        print(f"{path.name}: layer {layer} backward, {m.events} events of {args.min_mib:g} MiB or more; "
              f"in common with the snapshot: {m.ratio:.2f}")
        for tag, real, mine in m.differences if args.show else ():
            print(f"  {tag:8} snapshot: {show(real)} | estimate: {show(mine)}")


if __name__ == "__main__":
    sys.exit(main())
