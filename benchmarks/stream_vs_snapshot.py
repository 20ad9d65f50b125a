"""How closely the estimate's allocation stream follows a real CUDA step, event by event.

Takes profile records made with `vramplan profile --snapshot` (under profiles/), each with its
allocator snapshot beside it, and the estimate's stream of the record's setup with every layer
played: one decoder layer's backward of the last step, its allocations and frees over --min-mib
MiB, in order. The snapshot's window is the run of the same length that shares the most events
with it; the figure is the share of events the two have in common in order, 2 x matched / (both
lengths); --show lists the runs that differ.

Run: python benchmarks/stream_vs_snapshot.py profiles/h200 [--show]

2026-12-01 (twelfth session), the six H200 records with a snapshot (Meta-Llama-3-8B x 4, Qwen3-8B,
gemma-3-1b-pt; QLoRA 1 x 2048, checkpointed): 0.97 each. With every gradient sum a new buffer, as
the walk had it before (docs/autograd.md#gradient-accumulation): 0.67, 0.67, 0.67, 0.88, 0.59,
0.94. The differences left on Meta-Llama-3-8B: flash attention's backward workspace, one
64.25 MiB allocation on the H200 (torch 2.11) where the estimate makes softmax_d, dq_accum and
the expanded dk / dv one by one (cuda/_sdpa.py flash_backward_workspace, from torch 2.13's
flash_api.cpp), and where the layer's first and last gradients are freed.
"""
from __future__ import annotations

import argparse
import difflib
import importlib
import pathlib
import sys


def layer_backward(stream, layer: int, threshold: int) -> list:
    """The estimate's ("a"|"f", bytes) events over `threshold` in `layer`'s backward, last step."""
    starts = list(stream.places)
    k = [j for j, (_i, phase, module) in enumerate(starts) if phase == "backward" and module == f"layers.{layer}"][-1]
    lo, hi = starts[k][0], starts[k + 1][0]
    size, out = {}, []
    for i, event in enumerate(stream.events[:hi]):
        if event[0] == "alloc":
            size[event[1]] = event[2]
            if i >= lo and event[2] >= threshold:
                out.append(("a", event[2]))
        elif event[0] == "free" and i >= lo and size.get(event[1], 0) >= threshold:
            out.append(("f", size[event[1]]))
    return out


def snapshot_events(path: str, threshold: int) -> list:
    """The snapshot's ("a"|"f", bytes) allocator events over `threshold`, in order."""
    from vramplan.cuda._snapshot import load_trace

    trace = load_trace(path)
    size, out = {}, []
    for op in trace["ops"]:
        if op[0] == "alloc":
            size[op[1]] = op[2]
            if op[2] >= threshold:
                out.append(("a", -(-op[2] // 512) * 512))
        elif op[0] == "free" and size.get(op[1], 0) >= threshold:
            out.append(("f", -(-size[op[1]] // 512) * 512))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("records", nargs="+", help="profile records (.json) made with --snapshot, or folders of them")
    ap.add_argument("--layer", type=int, default=None, help="decoder layer (default: the middle one)")
    ap.add_argument("--min-mib", type=float, default=8.0)
    ap.add_argument("--show", action="store_true", help="list the runs that differ")
    args = ap.parse_args()
    from vramplan.estimate._inventory import static_memory
    from vramplan.profile._compare import _reestimate
    from vramplan.profile._record import spec_from_record
    from vramplan.profile._store import read_record
    events = importlib.import_module("vramplan.estimate._events")

    threshold = int(args.min_mib * 2**20)
    paths = []
    for given in map(pathlib.Path, args.records):
        paths += sorted(p for p in given.glob("*.json") if p.with_suffix(".snapshot.pickle.gz").exists()) \
            if given.is_dir() else [given]
    for path in paths:
        record = read_record(pathlib.Path(path))
        snapshot = pathlib.Path(path).with_suffix(".snapshot.pickle.gz")
        spec, est = spec_from_record(record.model), _reestimate(record)
        layer = spec.layers // 2 if args.layer is None else args.layer
        program = events.compiled(spec, est.setup, static_memory(spec, est.setup), est.cuda_arch, exact_layers=None)
        mine = layer_backward(program.stream(program.sizes(est.setup), False), layer, threshold)
        real = snapshot_events(str(snapshot), threshold)
        best = max(difflib.SequenceMatcher(None, real, mine, autojunk=False).get_matching_blocks(),
                   key=lambda b: b.size)
        start = max(0, best.a - best.b)
        window = real[start:start + len(mine)]
        matcher = difflib.SequenceMatcher(None, window, mine, autojunk=False)
        print(f"{pathlib.Path(path).name}: layer {layer} backward, {len(mine)} events over {args.min_mib:g} MiB; "
              f"in common with the snapshot: {matcher.ratio():.2f}")
        show = lambda seq: " ".join(f"{k}{n / 2**20:g}" for k, n in seq)  # noqa: E731
        for tag, i1, i2, j1, j2 in matcher.get_opcodes() if args.show else ():
            if tag != "equal":
                print(f"  {tag:8} snapshot: {show(window[i1:i2]) or '-'} | estimate: {show(mine[j1:j2]) or '-'}")


if __name__ == "__main__":
    sys.exit(main())
