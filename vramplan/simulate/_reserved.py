"""simulate's peak reserved memory: the measured step's storages (shortcut.Stream: every
allocation and free the tracker saw, stand-in kernels' workspaces included, or the rebuilt
full-depth stream) played as two steps through the caching-allocator model, every event exact.

The warm-up step is the measured step's events with the optimizer state created at the start of
its optimizer phase (torch.optim creates state lazily inside the first opt.step(): `_init_group`)
and the two cuBLAS workspaces at the first matmul of its forward and of its backward (the threads'
first cuBLAS calls, cuda/_cublas.py); the second step is the measured one. Storages the step makes
and never frees are made once. docs/allocator.md#simulate-stream.
"""
from __future__ import annotations

from bisect import bisect_right

from vramplan.core._components import Component
from vramplan.cuda._alloc_conf import AllocConf
from vramplan.cuda._reserved import ReservedPeak, replay_stream
from vramplan.estimate._load import LoadTensor, load_ops

OPT = Component.OPTIMIZER_STATE.value
ACT = Component.ACTIVATIONS.value
# the op the cuBLAS workspaces are registered under before the measured step (_step.py live_tracker)
CUBLAS_WORKSPACE = "cublas_workspace"
# ops that call cuBLAS on the calling thread's handle: torch's matmuls, every overload (the out=
# ones too: TRL's chunked log-prob runs `torch.mm(hidden_chunk, w_chunk.t(), out=tile)`, its
# backward's first matmul; aten/src/ATen/native/cuda/Blas.cpp addmm_out_cuda_impl calls
# at::cuda::blas::gemm for both), and bitsandbytes' gemm_4bit when it dequantizes the weight and
# calls F.linear (_kernels.py gemm_4bit); its fused kernel allocates only its output and calls no cuBLAS
MATMULS = frozenset({"mm", "addmm", "bmm", "baddbmm"})
GEMM_4BIT = "bitsandbytes.gemm_4bit.default"


def is_matmul(op: str) -> bool:
    """Whether `op` ('aten.mm.out') is one of torch's cuBLAS matmuls (MATMULS), any overload."""
    namespace, _, rest = op.partition(".")
    return namespace == "aten" and rest.partition(".")[0] in MATMULS


def first_matmul(stream, phase: str) -> int | None:
    """The event after which the phase's first cuBLAS call takes its thread's workspace: that call's
    last allocation (at::cuda::blas gets the handle's workspace inside the call, once the matmul's
    output exists; cuda/_cublas.py), or where it starts if it allocates nothing. None: no matmul."""
    made = sorted(b.alloc_event for b in stream.blocks if b.alloc_event > stream.registered)
    for start, end, where, op in stream.records:
        if not where or where[0] != phase or not (is_matmul(op) or op == GEMM_4BIT):
            continue
        inside = bisect_right(made, end) - bisect_right(made, start)
        if op == GEMM_4BIT and inside < 2:
            continue                          # the fused kernel: no dequantized weight, no cuBLAS
        return made[bisect_right(made, end) - 1] if inside else start
    return None


def held_pairs(registered: list, in_step: list) -> dict:
    """A plain loop's outputs (`out = model(**batch)`): the previous step's are registered live
    before the measured step and freed in it once model() returns (_step.py forward_loss), and the
    step's own are made in it and never freed. In two steps from a fresh load there is no previous
    step before the warm-up: step 1 frees the warm-up's outputs where the measured step frees the
    previous ones, and makes its own. Returns {id(registered block): the in-step block it stands
    for}, paired by size in order."""
    kept = {}
    for b in in_step:
        if b.free_event is None:             # (tagged as the loss region's: the logits, the loss)
            kept.setdefault(b.size, []).append(b)
    pairs = {}
    for b in registered:
        if b.free_event is not None and b.component == ACT and kept.get(b.size):
            pairs[id(b)] = kept[b.size].pop(0)
    return pairs


def two_step_events(stream) -> list:
    blocks = sorted(stream.blocks, key=lambda b: b.alloc_event)
    registered = [b for b in blocks if b.alloc_event <= stream.registered]
    in_step = [b for b in blocks if b.alloc_event > stream.registered]
    opt_start = next((s for s, _e, where, _op in stream.records if where and where[0] == "optimizer"),
                     stream.n_events)
    state = [b for b in registered if b.component == OPT]
    # the forward thread's workspace, then autograd's (_step.py live_tracker registers them in that
    # order); made where the warm-up step's forward / backward first calls cuBLAS
    workspaces = [b for b in registered if b.op == CUBLAS_WORKSPACE]
    at = [first_matmul(stream, phase) for phase in ("forward", "backward")[:len(workspaces)]]
    first_use = [(ev, b) for ev, b in zip(at, workspaces) if ev is not None]
    late = {id(b) for _ev, b in first_use}
    held = held_pairs(registered, in_step)            # registered block -> the warm-up's own
    remade = {id(b) for b in held.values()}           # each step makes its own outputs
    events: list = []
    loaded = [b for b in registered if b.component != OPT and id(b) not in late and id(b) not in held]
    # the load as the estimate plays it (estimate/_load.py load_ops, from the parts
    # _attribution.py register_live_state gave the live state; what it did not register, after it)
    tensors = [LoadTensor(("live", b.alloc_event), *(b.load[:2] or ("later", 0)), b.size) for b in loaded]
    settings = next((b.load[2] for b in loaded if b.load), None)
    events += load_ops(tensors, settings) if settings else [("alloc", t.key, t.nbytes) for t in tensors]
    for step in (0, 1):
        timeline = []
        for b in in_step:
            if step == 1 and b.free_event is None and id(b) not in remade:
                continue                      # made in the warm-up step and kept
            timeline.append((b.alloc_event, 1, b))
            if b.free_event is not None:
                timeline.append((b.free_event, 0, b))
        if step == 0:
            timeline += [(opt_start, -1, b) for b in state]   # before the optimizer's first event
            timeline += [(ev, 2, b) for ev, b in first_use]   # right after that event
        else:
            timeline += [(b.free_event, 3, b) for b in registered if id(b) in held]
        timeline.sort(key=lambda t: (t[0], 0 if t[1] == 3 else t[1]))   # the held free: a free
        for _ev, kind, b in timeline:
            if kind == 0:
                events.append(("free", (step, b.alloc_event)))
            elif kind == 1:
                events.append(("alloc", (step, b.alloc_event), b.size))
            elif kind == 3:                   # the warm-up's outputs, freed as the previous ones are
                events.append(("free", (0, held[id(b)].alloc_event)))
            else:
                events.append(("alloc", ("live", b.alloc_event), b.size))
    return events


def reserved_of(stream, conf: AllocConf | str | None = "", capacity: int | None = None) -> ReservedPeak:
    """The two steps replayed; `capacity`: bytes the allocator may reserve (None: unlimited). An
    OOM names where its request was made, as the estimate's does: the phase and module of the
    step's storage (its `where`), or the load for the live state made before the step."""
    events = two_step_events(stream)
    where = {b.alloc_event: b.where for b in stream.blocks if b.alloc_event > stream.registered}

    def place(i: int) -> tuple[str, str]:
        key = events[i][1] if len(events[i]) > 1 else None
        at = where.get(key[1]) if isinstance(key, tuple) and len(key) == 2 and key[0] in (0, 1) else None
        if not at:
            return "load", ""
        return at[0], at[1] if len(at) > 1 else ""
    return replay_stream(events, conf, capacity, place=place)
