"""How closely the estimate's allocation stream follows a recorded CUDA step, event by event: one
decoder layer's backward, its allocations and frees above a size, against the record's allocator
snapshot (`vramplan profile --snapshot`). The share of events the two have in common in order,
2 x matched / (both lengths), over the snapshot's window of the same length that shares the most
(benchmarks/stream_vs_snapshot.py; docs/autograd.md#gradient-accumulation).

Sizes are compared as the caching allocator rounds them (512 B), which is how the estimate's
stream holds them."""
from __future__ import annotations

import difflib

from vramplan.core._record import record
from vramplan.cuda._allocator import round_size


@record
class StreamMatch:
    layer: int
    events: int          # the estimate's events in the layer's backward
    ratio: float         # share in common, 0..1
    differences: tuple   # (tag, snapshot events, estimate events) of each run that differs


def layer_backward_events(stream, layer: int, threshold: int) -> list:
    """("a" | "f", bytes) of the estimate's stream (events.Stream) in `layer`'s backward of the
    last step, of at least `threshold` bytes."""
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


def trace_events(trace: dict, threshold: int) -> list:
    """("a" | "f", bytes rounded as the allocator does) of a snapshot trace (cuda/_snapshot.py
    load_trace), of at least `threshold` bytes."""
    size, out = {}, []
    for op in trace["ops"]:
        if op[0] == "alloc":
            size[op[1]] = round_size(op[2])
            if size[op[1]] >= threshold:
                out.append(("a", size[op[1]]))
        elif op[0] == "free" and size.get(op[1], 0) >= threshold:
            out.append(("f", size[op[1]]))
    return out


def match_layer(spec, setup, trace: dict, layer: int, threshold: int, gpu=None, alloc_conf: str = "") -> StreamMatch:
    """The estimate of `setup` (every layer played) against `trace` for `layer`'s backward."""
    from vramplan.estimate._estimator import estimate
    from vramplan.estimate._events import compiled
    from vramplan.estimate._inventory import static_memory

    est = estimate(spec, setup, gpu=gpu, alloc_conf=alloc_conf)
    program = compiled(spec, est.setup, static_memory(spec, est.setup), est.cuda_arch, exact_layers=None)
    mine = layer_backward_events(program.stream(program.sizes(est.setup), False), layer, threshold)
    real = trace_events(trace, threshold)
    best = max(difflib.SequenceMatcher(None, real, mine, autojunk=False).get_matching_blocks(), key=lambda b: b.size)
    start = max(0, best.a - best.b)
    window = real[start:start + len(mine)]
    matcher = difflib.SequenceMatcher(None, window, mine, autojunk=False)
    differences = tuple((tag, tuple(window[i1:i2]), tuple(mine[j1:j2]))
                        for tag, i1, i2, j1, j2 in matcher.get_opcodes() if tag != "equal")
    return StreamMatch(layer, len(mine), matcher.ratio(), differences)
