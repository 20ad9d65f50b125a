"""Peak reserved memory of a compiled allocation program in one pass: the result SmallPoolLevel
+ replay_lumped (_reserved.py) give on the program's stream, without building the stream, and
with the large pool kept as ints in a sorted list and dicts instead of Block objects.

For the settings it `covers`: no expandable segments, no max_split_size, no power-of-two rounding
(then the lumped replay's only rules are docs/allocator.md#rules 1-7 below). Anything else goes
through the full model (cuda/_allocator.py). docs/allocator.md#one-pass-replay; tests/test_fast_replay.py
holds it to replay_lumped field for field, OOM included.

The program (estimate/_events.py Program): `ops[i] >= 0` allocates `sizes[ops[i]]` bytes under the
next key (keys count up from 0), `ops[i] < 0` frees key `~ops[i]`; a 0-byte allocation allocates
nothing (NativeCachingAllocator::allocate returns nullptr). `places` are (op index, phase, module)
where each phase starts.

What it reproduces, step by step:
- the small pool as its level (_reserved.py SmallPoolLevel): requests of at most kSmallSize never
  reach the large pool (get_pool); its level rounded per request (round_size), its segments
  grown to whole kSmallBuffer when its peak passes them, one growth event per run of growths
  with no large-pool event or phase start between (SmallPoolLevel._raise merges them);
- the large pool (CUDACachingAllocator.cpp DeviceCachingAllocator): best fit by (size, address)
  (get_free_block, BlockComparatorSize); a new segment of large_segment_size below kMinLargeAlloc,
  else the size rounded up to kRoundLarge (get_allocation_size), at the addresses
  allocator._BumpAddresses hands out (they order ties); split when more than kSmallSize remains
  (should_split); a freed block merges with a free neighbour before it, then after it
  (try_merge_blocks). Segments never touch (_BumpAddresses leaves a gap), so address adjacency
  is adjacency within a segment;
- against a capacity: when a new segment does not fit, release_cached_blocks frees every cached
  block that is a whole segment and the request is tried once more (num_alloc_retries), else
  it fails (the OOM, with the place of the event that failed); a small-pool growth past the
  capacity does the same (replay_lumped);
- the replay's peaks (replay_lumped): peak allocated counts each event's small-pool high mark
  with the large pool as it was, peak reserved is large + small segments, fragmentation is
  reserved minus allocated when reserved peaked.
"""
from __future__ import annotations

from bisect import bisect_left, insort

from vramplan.cuda._alloc_conf import AllocConf
from vramplan.cuda._allocator import (FIRST_SEGMENT_ADDRESS, MIN_LARGE_ALLOC, ROUND_LARGE, SMALL_BUFFER, SMALL_SIZE,
                                      segment_after)
from vramplan.cuda._reserved import ReservedPeak, lumpable

_MASK = (1 << 64) - 1       # free-list keys: size << 64 | address
# An op that is torch.cuda.empty_cache() (emptyCache -> release_cached_blocks): every cached block
# that is a whole segment is released; the small pool, carried as its level, keeps its segments
# (its free segments cannot be told apart). ~EMPTY_CACHE is no key a program makes.
EMPTY_CACHE = ~(1 << 62)


def covers(conf: AllocConf) -> bool:
    """Whether the one-pass replay applies to these settings (the module docstring)."""
    return (conf.backend == "native" and not conf.expandable_segments and not conf.max_split_size_set
            and lumpable(conf))


def release_whole_segments(keys: list, at: dict, ends: dict, segments: dict) -> int:
    """release_blocks over a pool kept as ints (here and cuda/_replay.py): cudaFree every
    cached block that is a whole segment; the bytes freed."""
    freed = 0
    for k in list(keys):
        ptr, size = k & _MASK, k >> 64
        if segments.get(ptr) == size:
            del keys[bisect_left(keys, k)]
            del at[ptr]
            del ends[ptr + size]
            del segments[ptr]
            freed += size
    return freed


def _release(pools: dict, free_at: dict, free_end: dict, segments: dict) -> int:
    """release_cached_blocks: release_whole_segments in every stream's pool; the bytes freed."""
    return sum(release_whole_segments(keys, free_at, free_end, segments) for keys in pools.values())


def replay_program(ops: list, places: list, sizes: list, keys: int, conf: AllocConf,
                   capacity: int | None = None, streams: dict | None = None,
                   count_from: int | None = None) -> ReservedPeak:
    """replay_lumped of the program's lumped stream (see the module docstring); `keys`: how many
    allocations `ops` holds; `capacity`: bytes the allocator may reserve (None: unlimited).
    `streams`: key -> CUDA stream of the large allocations not on the default stream (0): each
    stream has its own large pool, blocks are never shared across streams (get_pool; the small
    pool stays one level, docs/allocator.md#fsdp-stream). `count_from`: the op index (a phase
    start) from which peak allocated is counted, as after torch.cuda.reset_peak_memory_stats
    (peak reserved never falls, so it needs no reset)."""
    if not covers(conf):
        raise ValueError(f"the one-pass replay does not cover these settings: {conf.text!r}")
    segment_small = conf.large_segment_size
    small_size, buffer, min_large, round_large = SMALL_SIZE, SMALL_BUFFER, MIN_LARGE_ALLOC, ROUND_LARGE
    held = [0] * keys        # per key: > 0 the large block's address, < 0 minus the small bytes, 0 nothing
    held_size = [0] * keys   # per key: the large block's size
    key = 0
    # the small pool's level (SmallPoolLevel): level now, high mark since the last event, peak,
    # segments needed; `pending_need` > 0: the last event is a growth that may still merge
    level = high = small_peak = small_need = 0
    pending_need = pending_high = pending_level = pending_index = 0
    index = 0                # events of the lumped stream so far (an OOM names its index)
    # the large pool: free blocks as size << 64 | address (sorted), their sizes by start address
    # and their starts by end address; segments' sizes by base
    free_keys: list = []
    pools = {0: free_keys}   # stream -> its large pool's free list
    streams = streams or {}
    free_at: dict = {}
    free_end: dict = {}
    segments: dict = {}
    put, find = insort, bisect_left
    start_pop, end_pop = free_at.pop, free_end.pop
    large = allocated = 0    # large pool reserved and allocated bytes
    next_address = FIRST_SEGMENT_ADDRESS
    small_reserved = 0       # the small pool's segments
    peak_reserved = fragmentation = peak_allocated = retries = 0
    oom = None
    phase = module = ""
    # the ops between phase starts, each with its place (place_of: ("load", "") before the first)
    bounds = [i for i, _p, _m in places] + [len(ops)]
    chunks = [(0, bounds[0], "load", "")] + [(bounds[j], bounds[j + 1], p, m) for j, (_i, p, m) in enumerate(places)]
    for first, last, chunk_phase, chunk_module in chunks + [(len(ops), len(ops), None, None)]:
        if pending_need:     # a phase starts (SmallPoolLevel.barrier): the growth no longer merges
            # ("small", need, high, level) through replay_lumped
            if allocated + pending_high > peak_allocated:
                peak_allocated = allocated + pending_high
            if capacity is not None and large + pending_need > capacity:
                large -= _release(pools, free_at, free_end, segments)
                retries += 1
                if large + pending_need > capacity:
                    oom = _oom(pending_index, pending_need - small_reserved, large + small_reserved,
                               allocated + pending_level, phase, module)
                    break
            small_reserved = pending_need
            total = large + small_reserved
            if total > peak_reserved:
                peak_reserved, fragmentation = total, total - allocated - pending_level
            if allocated + pending_level > peak_allocated:
                peak_allocated = allocated + pending_level
            pending_need = 0
        if chunk_phase is None:
            break
        if first == count_from:   # reset_peak_memory_stats: allocated counted from here on
            peak_allocated = 0
        phase, module = chunk_phase, chunk_module
        for op in ops[first:last]:
            if op >= 0:
                n = sizes[op]
                if n <= small_size:
                    if n > 0:        # SmallPoolLevel.make: the level, rounded (round_size)
                        r = (n + 511) & -512
                        held[key] = -r
                        level += r
                        if level > high:
                            high = level
                            if level > small_peak:
                                small_peak = level
                                need = -(-level // buffer) * buffer
                                if need > small_need:
                                    small_need = need
                                    if pending_need:   # merged into the growth event before it
                                        pending_need = need
                                        if level > pending_high:
                                            pending_high = level
                                    else:
                                        pending_need, pending_high, pending_index = need, high, index
                                        index += 1
                                    pending_level = level
                    key += 1
                    continue
                this_key = key
                key += 1
            elif op == EMPTY_CACHE:
                this_key, ptr, n = -1, -1, 0
            else:
                this_key = ~op
                ptr = held[this_key]
                if ptr <= 0:         # SmallPoolLevel.drop: the level goes down
                    level += ptr
                    continue
                n = 0
            if this_key < 0:         # empty_cache, an event of the lumped stream like the others
                if pending_need:
                    if allocated + pending_high > peak_allocated:
                        peak_allocated = allocated + pending_high
                    small_reserved = pending_need
                    total = large + small_reserved
                    if total > peak_reserved:
                        peak_reserved, fragmentation = total, total - allocated - pending_level
                    if allocated + pending_level > peak_allocated:
                        peak_allocated = allocated + pending_level
                    pending_need = 0
                if allocated + high > peak_allocated:
                    peak_allocated = allocated + high
                high = level
                index += 1
                large -= _release(pools, free_at, free_end, segments)
                continue
            if streams:              # the large pool of this allocation's stream
                stream = streams.get(this_key, 0)
                free_keys = pools.get(stream)
                if free_keys is None:
                    free_keys = pools[stream] = []
            if pending_need:         # the growth event before this large-pool event, through replay_lumped
                if allocated + pending_high > peak_allocated:
                    peak_allocated = allocated + pending_high
                if capacity is not None and large + pending_need > capacity:
                    large -= _release(pools, free_at, free_end, segments)
                    retries += 1
                    if large + pending_need > capacity:
                        oom = _oom(pending_index, pending_need - small_reserved, large + small_reserved,
                                   allocated + pending_level, phase, module)
                        break
                small_reserved = pending_need
                total = large + small_reserved
                if total > peak_reserved:
                    peak_reserved, fragmentation = total, total - allocated - pending_level
                if allocated + pending_level > peak_allocated:
                    peak_allocated = allocated + pending_level
                pending_need = 0
            # this event carries (high, level); then the high mark restarts at the level
            if allocated + high > peak_allocated:
                peak_allocated = allocated + high
            high = level
            index += 1
            if n:                    # malloc
                size = (n + 511) & -512                       # round_size
                j = find(free_keys, size << 64)               # get_free_block: best fit
                if j < len(free_keys):
                    k = free_keys.pop(j)
                    ptr, found = k & _MASK, k >> 64
                    del free_at[ptr]
                    del free_end[ptr + found]
                else:                # get_allocation_size, alloc_block
                    found = segment_small if size < min_large else -(-size // round_large) * round_large
                    if capacity is not None and large + found > capacity - small_reserved:
                        large -= _release(pools, free_at, free_end, segments)
                        retries += 1
                        if large + found > capacity - small_reserved:
                            oom = _oom(index - 1, n, large + small_reserved, allocated + level, phase, module)
                            break
                    ptr = next_address
                    next_address = segment_after(ptr, found)
                    segments[ptr] = found
                    large += found
                rest = found - size
                if rest > small_size:                         # should_split: the low end is taken
                    tail = ptr + size
                    put(free_keys, (rest << 64) | tail)
                    free_at[tail] = rest
                    free_end[ptr + found] = tail
                    found = size
                held[this_key] = ptr
                held_size[this_key] = found
                allocated += found
                total = large + small_reserved
                if total > peak_reserved:
                    peak_reserved, fragmentation = total, total - allocated - level
                if allocated + level > peak_allocated:
                    peak_allocated = allocated + level
            else:                    # free_block, try_merge_blocks: previous neighbour, then next
                found = held_size[this_key]
                allocated -= found
                end = ptr + found
                before = end_pop(ptr, None)
                if before is not None:
                    size = start_pop(before)
                    del free_keys[find(free_keys, (size << 64) | before)]
                    ptr = before
                size = start_pop(end, None)
                if size is not None:
                    del free_keys[find(free_keys, (size << 64) | end)]
                    end += size
                    del free_end[end]
                free_at[ptr] = end - ptr
                free_end[end] = ptr
                put(free_keys, ((end - ptr) << 64) | ptr)
        if oom is not None:
            break
    if oom is None:              # the closing event (SmallPoolLevel.finish)
        if allocated + high > peak_allocated:
            peak_allocated = allocated + high
    return ReservedPeak(peak_reserved, peak_allocated, fragmentation, retries, oom, True)


def _oom(index: int, nbytes: int, reserved: int, allocated: int, phase: str, module: str) -> dict:
    return {"index": index, "nbytes": nbytes, "reserved_bytes": reserved, "allocated_bytes": allocated,
            "phase": phase, "module": module}
