"""simulate's peak reserved memory: the measured step's storages (shortcut.Stream: every
allocation and free the tracker saw, stand-in kernels' workspaces included, or the rebuilt
full-depth stream) played as two steps through the caching-allocator model, every event exact.

The warm-up step is the measured step's events with the optimizer state created at the start of
its optimizer phase (torch.optim creates state lazily inside the first opt.step(): `_init_group`);
the second step is the measured one. Storages the step makes and never frees are made once.
docs/allocator.md#simulate-stream.
"""
from __future__ import annotations

from vramplan.core._components import Component
from vramplan.cuda._alloc_conf import AllocConf
from vramplan.cuda._reserved import ReservedPeak, replay_stream

OPT = Component.OPTIMIZER_STATE.value


def two_step_events(stream) -> list:
    blocks = sorted(stream.blocks, key=lambda b: b.alloc_event)
    registered = [b for b in blocks if b.alloc_event <= stream.registered]
    in_step = [b for b in blocks if b.alloc_event > stream.registered]
    opt_start = next((s for s, _e, where, _op in stream.records if where and where[0] == "optimizer"),
                     stream.n_events)
    state = [b for b in registered if b.component == OPT]
    events: list = []
    for b in registered:
        if b.component != OPT:
            events.append(("alloc", ("live", b.alloc_event), b.size))
    for step in (0, 1):
        timeline = []
        for b in in_step:
            if step == 1 and b.free_event is None:
                continue                      # made in the warm-up step and kept
            timeline.append((b.alloc_event, 1, b))
            if b.free_event is not None:
                timeline.append((b.free_event, 0, b))
        if step == 0:
            timeline += [(opt_start, -1, b) for b in state]   # before the optimizer's first event
        timeline.sort(key=lambda t: (t[0], t[1]))
        for _ev, kind, b in timeline:
            if kind == 0:
                events.append(("free", (step, b.alloc_event)))
            elif kind == 1:
                events.append(("alloc", (step, b.alloc_event), b.size))
            else:
                events.append(("alloc", ("live", b.alloc_event), b.size))
    return events


def reserved_of(stream, conf: AllocConf | str | None = "") -> ReservedPeak:
    return replay_stream(two_step_events(stream), conf)
