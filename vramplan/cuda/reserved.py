"""Peak reserved memory of an allocation stream: the caching-allocator model (allocator.py) run
over a step's events, shared by estimate and simulate.

Two fidelities (docs/allocator.md#estimate-stream):
- exact: every event through the allocator (simulate, `vramplan replay`);
- lumped (the estimate's default): requests of at most kSmallSize (1 MiB) live in the small pool,
  whose 2 MiB segments never serve a large request (CUDACachingAllocator.cpp get_pool), so the
  large pool is replayed event by event and the small pool is counted as its peak allocated
  bytes rounded up to whole kSmallBuffer segments. That drops the small pool's own
  fragmentation (a few 2 MiB segments; measured against the exact replay in docs/allocator.md).
"""
from __future__ import annotations

from dataclasses import dataclass

from vramplan.cuda.alloc_conf import AllocConf, as_conf
from vramplan.cuda.allocator import SMALL_BUFFER, SMALL_SIZE, CachingAllocator, OutOfMemory


@dataclass(frozen=True)
class ReservedPeak:
    peak_reserved_bytes: int
    peak_allocated_bytes: int      # the allocator's (block sizes, unsplit remainders included)
    fragmentation_bytes: int       # reserved - allocated when reserved peaked
    num_alloc_retries: int
    oom: dict | None               # first failed request: index, nbytes, reserved, allocated, phase, module
    lumped: bool


def replay_stream(events, conf: AllocConf | str | None = "", capacity: int | None = None, *,
                  lump_small: bool = False, place=None) -> ReservedPeak:
    """Replay ("alloc", key, nbytes) / ("free", key) events. `capacity`: bytes the allocator may
    reserve (device memory minus the CUDA context). `place(index) -> (phase, module)` names
    where an OOM happened."""
    conf = as_conf(conf)
    small_limit = SMALL_SIZE if lump_small and not any(d > 1 for d in conf.roundup_power2_divisions) else 0
    alloc = CachingAllocator(conf, capacity=capacity)
    malloc, free = alloc.malloc, alloc.free
    live: dict = {}
    small_live: dict = {}
    small = small_peak = 0
    small_reserved = 0                       # whole 2 MiB segments covering the small pool's peak
    peak_res = frag = peak_alloc = 0
    oom = None
    retries = 0
    for index, event in enumerate(events):
        if event[0] == "alloc":
            key, n = event[1], event[2]
            if n <= small_limit:
                n = (n + 511) & -512
                small_live[key] = n
                small += n
                if small > small_peak:
                    small_peak = small
                    need = -(-small_peak // SMALL_BUFFER) * SMALL_BUFFER
                    if need > small_reserved:
                        if capacity is not None and alloc.total_reserved + need > capacity:
                            # malloc's retry: release every cached segment, then try again
                            alloc.empty_cache()
                            retries += 1
                        if capacity is not None and alloc.total_reserved + need > capacity:
                            oom = _oom(index, n, alloc.total_reserved + small_reserved, alloc.allocated + small, place)
                            break
                        small_reserved = need
                        if alloc.total_reserved + small_reserved > peak_res:
                            peak_res = alloc.total_reserved + small_reserved
                            frag = peak_res - alloc.allocated - small
                if alloc.allocated + small > peak_alloc:
                    peak_alloc = alloc.allocated + small
                continue
            if capacity is not None:
                alloc.capacity = capacity - small_reserved
            try:
                live[key] = malloc(n)
            except OutOfMemory:
                oom = _oom(index, n, alloc.total_reserved + small_reserved, alloc.allocated + small, place)
                break
            total = alloc.total_reserved + small_reserved
            if total > peak_res:
                peak_res, frag = total, total - alloc.allocated - small
            if alloc.allocated + small > peak_alloc:
                peak_alloc = alloc.allocated + small
        else:
            key = event[1]
            ptr = live.pop(key, None)
            if ptr is not None:
                free(ptr)
            else:
                small -= small_live.pop(key, 0)
    return ReservedPeak(peak_res, peak_alloc, frag, alloc.num_alloc_retries + retries, oom, bool(small_limit))


def replay_lumped(events, conf: AllocConf | str | None = "", capacity: int | None = None, *,
                  place=None) -> ReservedPeak:
    """replay_stream(lump_small=True) over a stream whose small pool is already carried as its
    level (estimate/events.py _Builder(lump=True)): ("alloc", key, nbytes, high, level),
    ("free", key, high, level), ("small", bytes, high, level), ("end", high, level), where `high`
    is the small pool's highest level since the previous event and `level` its level now. Same
    result as replaying every small request, in a fraction of the events. Not for settings with
    roundup_power2_divisions, which round small requests too."""
    conf = as_conf(conf)
    alloc = CachingAllocator(conf, capacity=capacity)
    malloc, free = alloc.malloc, alloc.free
    live: dict = {}
    small_reserved = 0
    peak_res = frag = peak_alloc = 0
    oom = None
    retries = 0
    for index, event in enumerate(events):
        high, small = event[-2], event[-1]
        if alloc.allocated + high > peak_alloc:      # the small pool peaked with the large pool as it was
            peak_alloc = alloc.allocated + high
        kind = event[0]
        if kind == "alloc":
            if capacity is not None:
                alloc.capacity = capacity - small_reserved
            try:
                live[event[1]] = malloc(event[2])
            except OutOfMemory:
                oom = _oom(index, event[2], alloc.total_reserved + small_reserved, alloc.allocated + small, place)
                break
        elif kind == "free":
            free(live.pop(event[1]))
            continue
        elif kind == "small":
            need = event[1]
            if capacity is not None and alloc.total_reserved + need > capacity:
                alloc.empty_cache()           # malloc's retry: release every cached segment, then try again
                retries += 1
                if alloc.total_reserved + need > capacity:
                    oom = _oom(index, need - small_reserved, alloc.total_reserved + small_reserved,
                               alloc.allocated + small, place)
                    break
            small_reserved = need
        else:
            continue
        total = alloc.total_reserved + small_reserved
        if total > peak_res:
            peak_res, frag = total, total - alloc.allocated - small
        if alloc.allocated + small > peak_alloc:
            peak_alloc = alloc.allocated + small
    return ReservedPeak(peak_res, peak_alloc, frag, alloc.num_alloc_retries + retries, oom, True)


def _oom(index: int, nbytes: int, reserved: int, allocated: int, place) -> dict:
    phase, module = place(index) if place is not None else ("", "")
    return {"index": index, "nbytes": nbytes, "reserved_bytes": reserved, "allocated_bytes": allocated,
            "phase": phase, "module": module}
