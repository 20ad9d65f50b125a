"""Peak reserved memory of an allocation stream: the caching-allocator model (_allocator.py) run
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


from vramplan.core._record import record
from vramplan.cuda._alloc_conf import AllocConf, as_conf
from vramplan.cuda._allocator import SMALL_BUFFER, SMALL_SIZE, CachingAllocator, OutOfMemory


@record
class ReservedPeak:
    """What a replay of the step's allocations through the caching-allocator model gives: peaks,
    fragmentation at the reserved peak, retries and the OOM against a card, if any."""
    peak_reserved_bytes: int
    peak_allocated_bytes: int      # the allocator's (block sizes, unsplit remainders included)
    fragmentation_bytes: int       # peak reserved - the most allocated while reserved stood at its peak
    num_alloc_retries: int
    oom: dict | None               # first failed request: index, nbytes, reserved, allocated, phase, module
    lumped: bool


def lumpable(conf: AllocConf) -> bool:
    """Whether the small pool may be carried as its level: not when roundup_power2_divisions
    rounds small requests too."""
    return not any(d > 1 for d in conf.roundup_power2_divisions)


class SmallPoolLevel:
    """A stream with the small pool carried as its level: requests of at most kSmallSize never
    reach the large pool (CUDACachingAllocator.cpp get_pool), so only large-pool events are kept,
    each ending with (the small pool's highest level since the previous event, its level now),
    and ("small", bytes) says the small pool's segments must grow to `bytes` (its peak rounded
    up to whole kSmallBuffer segments). `index[i]` is the source event of output event i.

    Two ways in: `alloc(key, nbytes)` / `free(key)` for a stream of keyed events, and
    `make(sizes)` / `drop(pairs)` for a builder that keeps (key, nbytes) pairs itself (no size
    lookup on free; the estimate's stream, estimate/_events.py)."""

    def __init__(self):
        self.events: list = []
        self.index: list = []
        self.sizes: dict = {}
        self.level = self.high = self.peak = self.reserved = 0
        self.at = 0
        self.next_key = 0
        self.barrier = 0     # events before this index are not merged into (a phase starts there)

    def alloc(self, key, nbytes: int, stream=0) -> None:
        if nbytes > SMALL_SIZE:
            self._emit(("alloc", key, nbytes, stream) if stream else ("alloc", key, nbytes))
            return
        self.sizes[key] = n = (nbytes + 511) & -512      # round_size
        self._raise(n)

    def free(self, key) -> None:
        n = self.sizes.pop(key, None)
        if n is None:
            self._emit(("free", key))
        else:
            self.level -= n

    def make(self, sizes, stream=0) -> list:
        """Allocate each of `sizes` (bytes > 0) under a new key: [(key, nbytes)]; large ones on
        `stream` (the small pool stays one level whatever the stream)."""
        pairs = []
        key = self.next_key
        for n in sizes:
            if n > SMALL_SIZE:
                self.events.append(("alloc", key, n, stream, self.high, self.level) if stream
                                   else ("alloc", key, n, self.high, self.level))
                self.index.append(self.at)
                self.high = self.level
            else:
                self._raise((n + 511) & -512)         # round_size
            pairs.append((key, n))
            key += 1
        self.next_key = key
        return pairs

    def drop(self, pairs) -> None:
        """Free (key, nbytes) pairs made by `make`."""
        for key, n in pairs:
            if n > SMALL_SIZE:
                self.events.append(("free", key, self.high, self.level))
                self.index.append(self.at)
                self.high = self.level
            else:
                self.level -= (n + 511) & -512

    def _raise(self, n: int) -> None:
        self.level = level = self.level + n
        if level > self.high:
            self.high = level
            if level > self.peak:
                self.peak = level
                need = -(-level // SMALL_BUFFER) * SMALL_BUFFER
                if need > self.reserved:
                    self.reserved = need
                    events = self.events
                    if len(events) > self.barrier and events[-1][0] == "small":
                        # nothing reached the large pool since the last growth: one growth to `need`
                        events[-1] = ("small", need, max(events[-1][2], level), level)
                        self.index[-1] = self.at
                        self.high = level
                    else:
                        self._emit(("small", need))

    def empty_cache(self) -> None:
        """torch.cuda.empty_cache(): an event of its own (the large pool's cached segments go)."""
        self._emit(("empty_cache",))

    def finish(self) -> list:
        self._emit(("end",))
        return self.events

    def _emit(self, event: tuple) -> None:
        self.events.append(event + (self.high, self.level))
        self.index.append(self.at)
        self.high = self.level


def replay_stream(events, conf: AllocConf | str | None = "", capacity: int | None = None, *,
                  lump_small: bool = False, place=None, count_from: int | None = None) -> ReservedPeak:
    """Replay ("alloc", key, nbytes[, stream]) / ("free", key) / ("empty_cache",) events. `capacity`: bytes the
    allocator may reserve (device memory minus the CUDA context). `place(index) -> (phase, module)`
    names where an OOM happened. `lump_small`: the small pool as its level (SmallPoolLevel,
    replay_lumped) where the settings allow it. `count_from`: the event index from which peak
    allocated is counted (replay_lumped)."""
    conf = as_conf(conf)
    if lump_small and lumpable(conf):
        level = SmallPoolLevel()
        for i, event in enumerate(events):
            level.at = i
            if event[0] == "alloc":
                level.alloc(event[1], event[2], event[3] if len(event) > 3 else 0)
            elif event[0] == "empty_cache":
                level.empty_cache()
            else:
                level.free(event[1])
        level.at = len(events)
        lumped = level.finish()
        start = None if count_from is None else next(j for j, i in enumerate(level.index) if i >= count_from)
        return replay_lumped(lumped, conf, capacity,
                             place=None if place is None else (lambda i: place(level.index[i])), count_from=start)
    alloc = CachingAllocator(conf, capacity=capacity)
    malloc, free = alloc.malloc, alloc.free
    live: dict = {}
    peak_res = at_peak = peak_alloc = 0
    oom = None
    for index, event in enumerate(events):
        if index == count_from:
            peak_alloc = 0
        if event[0] == "alloc":
            if not event[2]:
                continue      # NativeCachingAllocator::allocate returns nullptr for 0 bytes: no block
            try:
                live[event[1]] = malloc(event[2], event[3] if len(event) > 3 else 0)
            except OutOfMemory:
                oom = _oom(index, event[2], alloc.total_reserved, alloc.allocated, place)
                break
            if alloc.total_reserved > peak_res:
                peak_res, at_peak = alloc.total_reserved, alloc.allocated
            elif alloc.allocated > at_peak and alloc.total_reserved == peak_res:
                at_peak = alloc.allocated     # the most allocated while reserved stands at its peak
            if alloc.allocated > peak_alloc:
                peak_alloc = alloc.allocated
        elif event[0] == "empty_cache":
            alloc.empty_cache()
        else:
            ptr = live.pop(event[1], None)
            if ptr is not None:
                free(ptr)
    return ReservedPeak(peak_res, peak_alloc, peak_res - at_peak, alloc.num_alloc_retries, oom, False)


def replay_lumped(events, conf: AllocConf | str | None = "", capacity: int | None = None, *,
                  place=None, count_from: int | None = None) -> ReservedPeak:
    """Replay a SmallPoolLevel stream: the large pool event by event through the allocator (each
    allocation on its stream's pool), the small pool as whole kSmallBuffer segments covering its
    peak (its own fragmentation is dropped). Not for settings with roundup_power2_divisions
    (`lumpable`). `count_from`: the event index from which peak allocated is counted
    (torch.cuda.reset_peak_memory_stats; fast_replay.replay_program's count_from)."""
    conf = as_conf(conf)
    alloc = CachingAllocator(conf, capacity=capacity)
    malloc, free = alloc.malloc, alloc.free
    live: dict = {}
    small_reserved = 0
    peak_res = at_peak = peak_alloc = 0
    oom = None
    retries = 0
    for index, event in enumerate(events):
        if index == count_from:
            peak_alloc = 0
        high, small = event[-2], event[-1]
        kind = event[0]
        if alloc.allocated + high > peak_alloc:      # the small pool peaked with the large pool as it was
            peak_alloc = alloc.allocated + high
        # the most allocated while reserved stands at its peak; a growth's high mark needed its new
        # segments, so it is counted after them, below
        if kind != "small" and alloc.allocated + high > at_peak and alloc.total_reserved + small_reserved == peak_res:
            at_peak = alloc.allocated + high
        if kind == "alloc":
            if capacity is not None:
                alloc.capacity = capacity - small_reserved
            try:
                live[event[1]] = malloc(event[2], event[3] if len(event) == 6 else 0)
            except OutOfMemory:
                oom = _oom(index, event[2], alloc.total_reserved + small_reserved, alloc.allocated + small, place)
                break
        elif kind == "free":
            free(live.pop(event[1]))
            continue
        elif kind == "empty_cache":
            alloc.empty_cache()
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
        held = alloc.allocated + (high if kind == "small" else small)
        if total > peak_res:
            peak_res, at_peak = total, held
        elif held > at_peak and total == peak_res:
            at_peak = held
        if alloc.allocated + small > peak_alloc:
            peak_alloc = alloc.allocated + small
    return ReservedPeak(peak_res, peak_alloc, peak_res - at_peak, alloc.num_alloc_retries + retries, oom, True)


def _oom(index: int, nbytes: int, reserved: int, allocated: int, place) -> dict:
    phase, module = place(index) if place is not None else ("", "")
    return {"index": index, "nbytes": nbytes, "reserved_bytes": reserved, "allocated_bytes": allocated,
            "phase": phase, "module": module}
