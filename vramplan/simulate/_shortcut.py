"""The identical-layers shortcut: trace a few decoder layers, rebuild the full-depth step exactly.

Decoder layers are identical (or repeat with a short period P: Gemma-2 alternates sliding and
full attention, P = 2; a *unit* is P consecutive layers). The step of an L-layer model is then
the step of a model of UNITS = 5 units in which one middle unit (EXPANDED = 2) is repeated
n = L/P - 5 more times, forward and backward. Every storage the traced step allocates or frees
is an event, every op a record (oplog.StepTracker). The events are cut at the first op of each
unit:

    pre | F0 | F1 | F2 | F3 | F4 + head + loss + loss backward | B4 | B3 | B2 | B1 | B0 + embedding | optimizer

and the full step is the same sequence with F2 and B2 each repeated n + 1 times. Every storage of
a repeated segment is repeated with it and its free moves with it (made in unit u and freed in
unit u + d of the traced step: freed in unit u + d of the full one); storages made and freed in
segments that occur once keep their places. Module names are renamed to the full model's layer
numbers. The static state of the repeated unit (weights, quantization constants, adapters) is
registered n more times. The optimizer step is not extrapolated: it runs for real, on meta
parameters with the full model's trainable shapes (warm-up step, then the measured one), and its
state and events replace the traced step's. Replaying the rebuilt event sequence with the
tracker's own rules gives the full trace's peak (first event reaching it), components, phase
peaks, boundaries, top modules and timeline.

That is exact only if the layers are identical, so it is checked on the traced step itself: the
three middle units must allocate and free the same sizes, components, modules (relative to
their unit), ops and lifetimes, event for event, forward and backward, and hold the same static
state; a storage made outside the layers and freed inside a repeated unit, or freed by the
optimizer without being a gradient, cannot be placed. When a check fails the shortcut declines
(says why) and the caller traces every layer. tests/test_simulate_layers.py proves the rebuilt
trace equal to the full one, field for field, on real small configs.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass

from vramplan.core._components import Component
from vramplan.core._setup import TrainSetup
from vramplan.simulate._attribution import component_of, register_optimizer_state, short_name
from vramplan.simulate._step import Measured, Simulation, make_trace
from vramplan.simulate._build import hf_config, make_optimizer, respec

UNITS = 5          # first, three middle units (each checked against the others), last
EXPANDED = 2       # the middle unit that is repeated: its neighbours are middle units too
MIDDLE = range(1, UNITS - 1)
OPT = Component.OPTIMIZER_STATE.value


class Decline(Exception):
    """The traced layers are not interchangeable: trace every layer instead."""


def applies(spec) -> bool:
    return spec.layers > UNITS


# --- the reduced model ----------------------------------------------------------------------------

def reduced_spec(spec, setup: TrainSetup):
    """(spec with UNITS * period decoder layers, period). Per-layer config lists (layer_types:
    sliding or full attention) must repeat with a period that divides the depth."""

    config = dict(spec.config)
    types = getattr(hf_config(spec, setup).get_text_config(), "layer_types", None)
    period = 1
    if types is not None:
        types = list(types)
        if len(types) != spec.layers:
            raise Decline(f"layer_types lists {len(types)} layers for {spec.layers}")
        period = next((p for p in range(1, 5) if all(t == types[i % p] for i, t in enumerate(types))), 0)
        if not period:
            raise Decline("its layers are not all of the same kind (layer_types)")
    k = UNITS * period
    if spec.layers <= k or spec.layers % period:
        raise Decline(f"{spec.layers} layers are too few to repeat units of {period}")
    if types is not None:
        config["layer_types"] = types[:k]
    config["num_hidden_layers"] = k
    return respec(spec, config), period


# --- layer names ------------------------------------------------------------------------------------

class LayerNames:
    """'model.layers.12.mlp.up_proj' -> layer 12, unit 12 // period; shift by whole units."""

    def __init__(self, prefix: str, period: int = 1):
        self.prefix, self.period = prefix, period
        self._re = re.compile(rf"^{re.escape(prefix)}\.(\d+)(?=\.|$)") if prefix else None
        self._cache: dict[str, tuple | None] = {}

    def _split(self, name: str):
        if name in self._cache:
            return self._cache[name]
        m = self._re.match(name) if (self._re and name) else None
        out = (int(m.group(1)), name[m.end():]) if m else None
        self._cache[name] = out
        return out

    def layer(self, name: str) -> int | None:
        s = self._split(name)
        return None if s is None else s[0]

    def unit(self, name: str) -> int | None:
        s = self._split(name)
        return None if s is None else s[0] // self.period

    def shift(self, name: str, units: int) -> str:
        """The same module `units` units further down the stack."""
        s = self._split(name)
        return name if s is None or not units else f"{self.prefix}.{s[0] + units * self.period}{s[1]}"

    def relative(self, name: str, base_unit: int) -> str:
        s = self._split(name)
        return name if s is None else f"{self.prefix}.{s[0] - base_unit * self.period:+d}{s[1]}"


def static_units(built, names: LayerNames) -> dict[int, int | None]:
    """storage key -> unit of every tensor live before the step that belongs to one decoder layer
    (parameters, buffers, bitsandbytes quant state, int8 scales); None if shared between units."""
    import torch

    seen: dict[int, int | None] = {}

    def add(t, unit):
        if isinstance(t, torch.Tensor):
            key = t.untyped_storage()._cdata
            seen[key] = unit if seen.get(key, unit) == unit else None

    for name, module in built.model.named_modules():
        unit = names.unit(short_name(name))
        if unit is None:
            continue
        for t in list(module._parameters.values()) + list(module._buffers.values()):
            add(t, unit)
        weight = getattr(module, "weight", None)
        qs = getattr(weight, "quant_state", None)
        if qs is not None:
            for t in (qs.absmax, qs.code, qs.offset):
                add(t, unit)
            if qs.state2 is not None:
                add(qs.state2.absmax, unit)
                add(qs.state2.code, unit)
        state = getattr(module, "state", None)
        if state is not None and hasattr(state, "SCB"):
            for t in (state.CB, state.SCB, getattr(weight, "SCB", None)):
                add(t, unit)
    return seen


# --- segments -----------------------------------------------------------------------------------------

@dataclass
class Segment:
    kind: str               # "pre", "F", "B", "opt"
    unit: int | None        # F, B: the unit
    rec_lo: int             # records [rec_lo, rec_hi)
    rec_hi: int
    ev_lo: int              # events (ev_lo, ev_hi]
    ev_hi: int


def segments(records: list, n_events: int, names: LayerNames, n_layers: int) -> list[Segment]:
    """Cut the measured step at the first op of each unit, forward and backward."""
    fwd: dict[int, int] = {}
    bwd: dict[int, int] = {}
    opt = None
    current = {"forward": -1, "backward": n_layers}
    for i, (_s, _e, where, _op) in enumerate(records):
        phase = where[0] if where else ""
        if phase == "optimizer":
            opt = i if opt is None else opt
            continue
        layer = names.layer(where[1]) if len(where) > 1 else None
        if layer is None or phase not in current:
            continue
        step = 1 if phase == "forward" else -1
        if layer == current[phase] + step:
            (fwd if step == 1 else bwd)[layer] = i
        elif layer != current[phase]:
            raise Decline(f"the {phase} runs layer {layer} after layer {current[phase]}")
        current[phase] = layer
    if sorted(fwd) != list(range(n_layers)) or sorted(bwd) != list(range(n_layers)) or opt is None:
        raise Decline("the step does not run every layer forward and backward once")
    p = names.period
    cuts = [("pre", None, 0)] + [("F", u, fwd[u * p]) for u in range(UNITS)] \
        + [("B", u, bwd[u * p + p - 1]) for u in reversed(range(UNITS))] + [("opt", None, opt)]
    out = []
    for j, (kind, unit, lo) in enumerate(cuts):
        hi = cuts[j + 1][2] if j + 1 < len(cuts) else len(records)
        if hi <= lo:
            raise Decline("layers overlap in the op sequence")
        ev_hi = records[hi][0] if hi < len(records) else n_events
        out.append(Segment(kind, unit, lo, hi, records[lo][0], ev_hi))
    return out


# --- streams and their replay -------------------------------------------------------------------------

@dataclass(slots=True)
class VBlock:
    """A storage of a (rebuilt) step: the fields the replay and trace() read."""
    size: int
    alloc_event: int
    free_event: int | None
    where: tuple
    op: str
    component: str
    load: tuple = ()              # Block.load: the registered live state's part in the load


@dataclass
class Stream:
    """A measured step as data: storages, op records (start, end, where, op), events."""
    blocks: list
    records: list
    n_events: int
    registered: int               # events 1..registered: live state registered before the step


def stream_of(tracker) -> Stream:
    blocks = [VBlock(b.size, b.alloc_event, b.free_event, b.where, b.op, component_of(b), b.load)
              for b in tracker.blocks]
    registered = tracker.ops[0][0] if tracker.ops else tracker.event
    return Stream(blocks, list(tracker.ops), tracker.event, registered)


def replay(stream: Stream, paged: int = 0, attention: dict | None = None, strays: int = 0):
    """The tracker's bookkeeping over a stream (AllocationTracker._add / __torch_dispatch__ /
    mark): peak (first event reaching it), per-phase maxima, timeline rows, boundaries at the
    four marks, storages live at the peak."""

    n = stream.n_events
    alloc_at: list = [None] * (n + 1)
    free_at: list = [None] * (n + 1)
    for b in stream.blocks:
        for ev, table in ((b.alloc_event, alloc_at), (b.free_event, free_at)):
            if ev is None:
                continue
            if not 0 < ev <= n or alloc_at[ev] is not None or free_at[ev] is not None:
                raise Decline(f"event {ev} is used twice or out of range")
            table[ev] = b
    allocated = peak_bytes = peak_event = 0
    peak_block = None
    phase_max: dict = {}
    timeline: list = []
    marks: list = []
    last = None
    e = 0
    for start, end, where, op in stream.records + [(n, n, None, None)]:
        start_peak = None
        for part in (start, end):
            for ev in range(e + 1, part + 1):
                b = alloc_at[ev]
                if b is not None:
                    allocated += b.size
                    phase = b.where[0] if b.where else ""
                    if allocated > phase_max.get(phase, 0):
                        phase_max[phase] = allocated
                    if allocated > peak_bytes:
                        peak_bytes, peak_event, peak_block = allocated, ev, b
                elif free_at[ev] is not None:
                    allocated -= free_at[ev].size
            e = max(e, part)
            if start_peak is None:      # the op starts: the peak it may raise
                start_peak = peak_event
        if op is None:
            break
        if not op:
            marks.append(allocated)
        if allocated != last:
            if op and peak_event != start_peak and peak_bytes > allocated:
                timeline.append((peak_event, peak_block.where, op, peak_bytes))
            timeline.append((end, where, op, allocated))
            last = allocated
    if len(marks) != 4:
        raise Decline(f"{len(marks)} phase marks in the step, not 4")
    boundary = dict(zip(("start", "forward_end", "backward_end", "optimizer_end"), marks))
    live = sorted((b for b in stream.blocks if b.alloc_event <= peak_event
                   and (b.free_event is None or peak_event < b.free_event)), key=lambda b: b.alloc_event)
    return Measured(peak_bytes, peak_block.where if peak_block else (), peak_block.op if peak_block else "",
                    phase_max, boundary, timeline,
                    [(b.size, b.component, b.op, b.where[1] if len(b.where) > 1 else "") for b in live],
                    strays, paged, dict(attention or {}))


def same_as_tracker(tracker, measured) -> bool:
    peak = tracker.peak
    return (measured.peak_bytes == peak.bytes and measured.peak_where == peak.where and measured.peak_op == peak.op
            and measured.phase_max == tracker.phase_max and measured.timeline == tracker.timeline)


# --- the optimizer at full size -------------------------------------------------------------------------

@dataclass
class OptimizerRun:
    stream: Stream
    state: list                   # VBlock: optimizer state registered before its step
    grad_free: dict               # parameter -> event its gradient is freed at (the stream's numbering)
    paged: int
    strays: int


def optimizer_run(sim, params: list) -> OptimizerRun:
    """opt.step(); opt.zero_grad(set_to_none=True) over meta parameters of the given
    (name, shape, dtype), as the step does it: a warm-up step creates the state, the second one is
    measured under the step's context ("optimizer" phase: allocations are temporaries)."""
    import torch

    tensors = [torch.nn.Parameter(torch.empty(shape, dtype=dtype, device="meta")) for _, shape, dtype in params]
    opt = make_optimizer(tensors, sim.setup, "meta")

    def set_grads():    # what backward leaves: a dense tensor of the parameter's layout (empty_like's)
        for p in tensors:
            p.grad = torch.empty_strided(p.shape, p.stride(), dtype=p.dtype, device=p.device)

    ctx = sim.ctx
    ctx.stack, ctx.bw_module, ctx.region, ctx.phase = [], "", "", "optimizer"
    try:
        with sim.tracker(recording=False):
            set_grads()
            opt.step()
            opt.zero_grad(set_to_none=True)
        set_grads()
        tracker = sim.tracker()
        grads = {}
        for (name, _, _), p in zip(params, tensors):
            tracker.track(p, Component.WEIGHTS.value)
            grads[tracker.track(p.grad, Component.GRADIENTS.value)] = name
        paged: list[int] = []
        register_optimizer_state(tracker, opt, paged)
        with tracker:
            tracker.mark()
            opt.step()
            opt.zero_grad(set_to_none=True)
            tracker.mark()
    finally:
        ctx.phase = "done"
    stream = stream_of(tracker)
    state, grad_free = [], {}
    for b, v in zip(tracker.blocks, stream.blocks):
        if v.alloc_event > stream.registered:
            break
        if b in grads:
            if v.free_event is not None:
                grad_free[grads[b]] = v.free_event
        elif v.component == OPT:
            state.append(v)
        elif v.free_event is not None:
            raise Decline("the optimizer frees a parameter")
    return OptimizerRun(stream, state, grad_free, sum(paged), len(tracker.strays))


# --- the expansion ------------------------------------------------------------------------------------

class Expansion:
    """The traced step of UNITS units and the step of the full depth rebuilt from it."""

    def __init__(self, sim, tracker, target_layers: int, period: int):
        self.sim, self.tracker, self.period = sim, tracker, period
        self.m = EXPANDED
        self.n = (target_layers - UNITS * period) // period      # extra copies of unit m
        self.names = LayerNames(sim.layers_name, period)
        if sim.n_layers != UNITS * period:
            raise Decline(f"the traced model has {sim.n_layers} decoder layers, not {UNITS * period}")
        self.stream = stream_of(tracker)
        self.records = self.stream.records
        self.R = self.stream.registered
        self.segs = segments(self.records, self.stream.n_events, self.names, sim.n_layers)
        self.seg_of: list = [None] * (self.stream.n_events + 1)
        for seg in self.segs:
            for ev in range(seg.ev_lo + 1, seg.ev_hi + 1):
                self.seg_of[ev] = seg
        self.blocks, self.vblocks = tracker.blocks, self.stream.blocks
        self.grad_names = {id(v): sim.grad_params[b] for b, v in zip(self.blocks, self.vblocks)
                           if b in sim.grad_params}
        self.trainable = []      # (short name, shape, dtype) of the parameters given a gradient, in order
        grads = set(sim.grad_params.values())
        for name, p in sim.built.model.named_parameters():
            if p.requires_grad and short_name(name) in grads:
                self.trainable.append((short_name(name), tuple(p.shape), p.dtype))
        keys = static_units(sim.built, self.names)
        self.static: dict = {}   # unit (None: the rest) -> VBlocks registered before the step, not optimizer state
        for b, v in zip(self.blocks, self.vblocks):
            if v.alloc_event > self.R:
                break
            if v.component != OPT:
                self.static.setdefault(keys.get(b.key), []).append(v)

    # --- checks ---------------------------------------------------------------------------------
    def check(self) -> None:
        shapes = {u: sorted((v.size, v.component) for v in self.static.get(u, [])) for u in range(UNITS)}
        if not shapes[self.m] or any(shapes[u] != shapes[self.m] for u in MIDDLE):
            raise Decline("the middle layers do not hold the same weights")
        for kind in ("F", "B"):
            sigs = [self.signature(self.seg(kind, u)) for u in MIDDLE]
            if any(s != sigs[0] for s in sigs):
                raise Decline(f"the middle layers' {'forward' if kind == 'F' else 'backward'} steps differ")
        for v in self.vblocks:
            if v.alloc_event > self.R:
                break
            if v.free_event is not None and v.component != OPT:
                raise Decline("a storage live before the step is freed in it")

    def seg(self, kind: str, unit: int | None) -> Segment:
        return next(s for s in self.segs if s.kind == kind and s.unit == unit)

    def signature(self, seg: Segment) -> tuple:
        rel, lo = self.names.relative, seg.ev_lo
        recs = tuple((s - lo, e - lo, w[0], rel(w[1], seg.unit), w[2], op)
                     for s, e, w, op in self.records[seg.rec_lo:seg.rec_hi])
        alloc_at, free_at = {}, {}
        for b in self.vblocks:
            if seg.ev_lo < b.alloc_event <= seg.ev_hi:
                alloc_at[b.alloc_event] = b
            if b.free_event is not None and seg.ev_lo < b.free_event <= seg.ev_hi:
                free_at[b.free_event] = b
        events = []
        for ev in range(seg.ev_lo + 1, seg.ev_hi + 1):
            if ev in alloc_at:
                b = alloc_at[ev]
                events.append(("a", b.size, b.component, b.where[0], rel(b.where[1], seg.unit), b.where[2], b.op,
                               self.free_desc(b, seg.unit)))
            elif ev in free_at:
                b = free_at[ev]
                events.append(("f", b.size, b.component, self.alloc_desc(b, seg.unit)))
        return recs, tuple(events)

    def free_desc(self, b, base):
        if b.free_event is None:
            return None
        sf = self.seg_of[b.free_event]
        if sf.kind in ("F", "B"):
            return sf.kind, sf.unit - base, b.free_event - sf.ev_lo
        name = self.grad_names.get(id(b))
        return sf.kind, None if name is None else self.names.relative(name, base)

    def alloc_desc(self, b, base):
        if b.alloc_event <= self.R:
            return ("live",)
        sa = self.seg_of[b.alloc_event]
        return (sa.kind, sa.unit - base) if sa.kind in ("F", "B") else (sa.kind,)

    # --- the full depth -------------------------------------------------------------------------
    def unit_map(self, u: int) -> int:
        """Where a unit of the traced model sits in the full one (unit m: its first copy)."""
        return u if u <= self.m else u + self.n

    def stands_for(self, u: int) -> int:
        """The traced unit that unit u of the full model repeats."""
        m, n = self.m, self.n
        return u if u < m else (m if u <= m + n else u - n)

    def full_params(self) -> list:
        """(name, shape, dtype) of the full model's trainable parameters in order: the traced
        model's, with unit m's parameters repeated n more times."""
        units = [self.names.unit(name) for name, _, _ in self.trainable]
        inner = [i for i, u in enumerate(units) if u is not None]
        if inner and (any(units[i] is None for i in range(inner[0], inner[-1] + 1))
                      or [units[i] for i in inner] != sorted(units[i] for i in inner)):
            raise Decline("parameters are not grouped by layer")
        block = [x for x, u in zip(self.trainable, units) if u == self.m]
        out = []
        for x, u in zip(self.trainable, units):
            if u is None:
                out.append(x)
            elif u != self.m:
                out.append((self.names.shift(x[0], self.unit_map(u) - u), x[1], x[2]))
            elif x is block[0]:       # the unit's first parameter: the whole unit, n + 1 times
                out += [(self.names.shift(b[0], c), b[1], b[2]) for c in range(self.n + 1) for b in block]
        return out

    def rebuild(self, opt: OptimizerRun) -> Stream:
        m, n, names = self.m, self.n, self.names
        # live state before the step: the traced model's, unit m's n more times, the full optimizer's
        blocks: list = []
        # in load order: unit m's n copies follow it
        loaded = []
        for u, vs in self.static.items():
            loaded += vs + (vs * n if u == m else [])
        for v in loaded:
            blocks.append(VBlock(v.size, len(blocks) + 1, None, v.where, v.op, v.component, v.load))
        state_at = len(blocks)
        R = state_at + len(opt.state)
        order = []   # (segment, unit of the full model)
        for seg in self.segs:
            if seg.kind == "opt":
                continue
            if seg.unit == m:
                units = range(m, m + n + 1)
                order += [(seg, u) for u in (units if seg.kind == "F" else reversed(units))]
            else:
                order.append((seg, None if seg.unit is None else self.unit_map(seg.unit)))
        start: dict = {}
        cur = R
        for seg, u in order:
            start[(seg.kind, u)] = cur
            cur += seg.ev_hi - seg.ev_lo
        shift = cur - opt.stream.registered       # the optimizer's events follow the backward's
        for i, v in enumerate(opt.state):
            blocks.append(VBlock(v.size, state_at + i + 1, None if v.free_event is None else v.free_event + shift,
                                 v.where, v.op, v.component))

        def at(seg: Segment, u, ev: int) -> int:
            return start[(seg.kind, u)] + (ev - seg.ev_lo)

        renames: dict = {}       # (where, unit, copy's unit) -> where: the same places recur op after op

        def renamed(where: tuple, seg: Segment, u) -> tuple:
            key = (where, seg.unit, u)
            out = renames.get(key)
            if out is None:
                if u is None or u == seg.unit or len(where) < 2 or names.unit(where[1]) != seg.unit:
                    out = where
                else:
                    out = (where[0], names.shift(where[1], u - seg.unit), *where[2:])
                renames[key] = out
            return out

        freed_by_opt = set()
        for v in self.vblocks:
            if v.alloc_event <= self.R:
                continue
            sa = self.seg_of[v.alloc_event]
            if sa.kind == "opt":
                continue                      # the optimizer runs at full size instead
            copies_of = range(m, m + n + 1) if sa.unit == m else \
                [None if sa.unit is None else self.unit_map(sa.unit)]
            grad = self.grad_names.get(id(v))
            freed = v.free_event is not None
            sf = self.seg_of[v.free_event] if freed else None
            for u in copies_of:
                free = None
                if freed:
                    if sf.kind == "opt":
                        if grad is None:
                            raise Decline(f"the optimizer frees {v.component} that are not a gradient")
                        name = names.shift(grad, u - sa.unit) if (u is not None and names.unit(grad) == sa.unit) \
                            else grad
                        if name not in opt.grad_free:
                            raise Decline(f"the optimizer run frees no gradient of {name}")
                        free = opt.grad_free[name] + shift
                        freed_by_opt.add(name)
                    elif sf.kind == "pre":
                        free = at(sf, None, v.free_event)
                    else:
                        if sf.unit != m and sa.unit != m:   # both segments occur once: a fixed place
                            uf = self.unit_map(sf.unit)
                        elif sa.kind in ("F", "B"):         # relative to the unit that made it
                            uf = u + (sf.unit - sa.unit)
                        else:
                            raise Decline("a storage made outside the layers is freed in a repeated layer")
                        if self.stands_for(uf) != sf.unit and not (self.stands_for(uf) in MIDDLE and sf.unit in MIDDLE):
                            raise Decline("a storage is freed in a layer of another kind")
                        free = at(sf, uf, v.free_event)
                blocks.append(VBlock(v.size, at(sa, u, v.alloc_event), free, renamed(v.where, sa, u), v.op,
                                     v.component))
        if freed_by_opt != set(opt.grad_free):
            raise Decline("the optimizer run frees other gradients than the traced step")
        records = []
        for seg, u in order:
            d = start[(seg.kind, u)] - seg.ev_lo
            records += [(s + d, e + d, renamed(w, seg, u), op) for s, e, w, op in self.records[seg.rec_lo:seg.rec_hi]]
        for v in opt.stream.blocks:
            if v.alloc_event > opt.stream.registered:
                blocks.append(VBlock(v.size, v.alloc_event + shift,
                                     None if v.free_event is None else v.free_event + shift, v.where, v.op,
                                     v.component))
        records += [(s + shift, e + shift, w, op) for s, e, w, op in opt.stream.records]
        return Stream(blocks, records, opt.stream.n_events + shift, R)


def with_reserved(trace, stream, alloc_conf=None, gpu=None):
    """The trace with peak reserved memory from its stream replayed as two steps under `alloc_conf`
    (PYTORCH_CUDA_ALLOC_CONF settings; None: the environment's). With `gpu` (core.gpus.Gpu), the
    verdict as estimate gives it: where the unlimited replay passes the card but the allocated
    peak does not, the replay against the card says whether cache releases keep the step on it
    (then its reserved bytes are the device total's) or where the allocator runs out of memory
    (estimate/_estimator.py card_replay, card_outcome)."""
    import dataclasses

    from vramplan.estimate._reserved import conf_of
    from vramplan.simulate._reserved import reserved_of

    conf = conf_of(alloc_conf)
    r = reserved_of(stream, conf)
    verdict_fields = {}
    if gpu is not None:
        from vramplan.core._verdict import TIGHT, verdict
        from vramplan.cuda._context import cuda_context
        from vramplan.estimate._estimator import card_outcome

        context = cuda_context(gpu).bytes
        room = gpu.memory_bytes - context
        oom, retries = None, 0
        if r.peak_reserved_bytes > room and trace.peak_allocated_bytes <= room:
            capped = reserved_of(stream, conf, capacity=room)
            oom, retries = card_outcome(capped, room)
            if oom is None:
                r = capped
        total = context + max(r.peak_reserved_bytes, trace.peak_allocated_bytes)
        verdict_fields = dict(gpu={"name": gpu.name, "memory_bytes": gpu.memory_bytes}, cuda_context_bytes=context,
                              device_total_bytes=total, status=verdict(total, gpu.memory_bytes, TIGHT, oom),
                              headroom_bytes=gpu.memory_bytes - total, allocator_oom=oom, allocator_retries=retries)
        if oom is not None or total > gpu.memory_bytes:
            # the card it needs at the least, as estimate searches it (estimator.smallest_card):
            # the device total above is what a card with room to spare shows
            verdict_fields["smallest_gpu_bytes"] = _smallest_card(stream, conf, trace.peak_allocated_bytes, context,
                                                                  total)
    return dataclasses.replace(trace, peak_reserved_bytes=r.peak_reserved_bytes,
                               fragmentation_bytes=r.fragmentation_bytes, alloc_conf=conf.text, **verdict_fields)


def _smallest_card(stream, conf, peak: int, context: int, total: int) -> int | None:
    """estimator.smallest_card over this step's own replay against each probed card (its
    runs_on_card: neither an allocator OOM nor reserved bytes past the card)."""
    from vramplan.estimate._estimator import smallest_card
    from vramplan.simulate._reserved import reserved_of

    def runs(card: int) -> bool:
        capped = reserved_of(stream, conf, capacity=card - context)
        return capped.oom is None and context + max(capped.peak_reserved_bytes, peak) <= card
    return smallest_card(runs, peak + context, total)


def run_shortcut(spec, setup: TrainSetup, progress=None, arch=None, alloc_conf=None, gpu=None):
    """(Trace, None), or (None, why the layers cannot be repeated)."""

    t0 = time.perf_counter()
    if setup.accumulates:
        # the rebuilt sequence has one forward and one backward per step (the module docstring)
        return None, "gradient accumulation runs two micro-steps per step"
    try:
        small, period = reduced_spec(spec, setup)
    except Decline as why:
        return None, str(why)
    with Simulation(small, setup, "meta", progress=progress, arch=arch) as sim:
        sim.warm_up()
        tracker = sim.measure()
        try:
            if not same_as_tracker(tracker, replay(stream_of(tracker))):
                raise Decline("the replay of the traced step differs from the tracker")
            exp = Expansion(sim, tracker, spec.layers, period)
            exp.check()
            params = exp.full_params()
            if progress is not None:
                progress(f"optimizer step over {len(params)} tensors", 0, 0)
            opt = optimizer_run(sim, params)
            if progress is not None:
                progress("rebuilding the full depth", 0, 0)
            attention = dict(sim.sdpa.counts) if sim.sdpa is not None else {}
            if any(v % UNITS for v in attention.values()):
                raise Decline("attention calls differ between layers")
            attention = {k: v // UNITS * (spec.layers // period) for k, v in attention.items()}
            rebuilt = exp.rebuild(opt)
            measured = replay(rebuilt, opt.paged, attention, len(tracker.strays) + opt.strays)
        except Decline as why:
            return None, str(why)
    unit = "layer" if period == 1 else f"{period}-layer unit"
    notes = sim.assumptions(tracker) + (
        f"identical-layers shortcut: {sim.n_layers} of {spec.layers} decoder layers traced, one {unit}'s "
        f"forward and backward repeated {exp.n} more times, the optimizer step run at full size; "
        f"checked exact for identical layers (--exact traces every layer)",)
    trace = make_trace(spec, setup, "meta", measured, time.perf_counter() - t0,
                       layers_traced=sim.n_layers, extrapolated=True, notes=notes, arch=sim.arch)
    return with_reserved(trace, rebuilt, alloc_conf, gpu), None
