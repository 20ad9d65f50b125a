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
  with the large pool as it was, peak reserved is large + small segments, fragmentation is the
  peak reserved less the most allocated while reserved stood at its peak.
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


def merge_free(keys: list, cells: dict, ptr: int, size: int, shifted: int,
               find=bisect_left, put=insort, length=len) -> None:
    """free_block over a pool kept as ints (here and cuda/_replay.py): the block of `size` bytes
    (`shifted`: size << 64) at `ptr` becomes free, merged with a free neighbour before it, then
    after it (try_merge_blocks). `keys`: the pool's free blocks as sorted size << 64 | address;
    `cells`: from each free block's start and end address to its cell, a one-item list holding its
    key (the two entries share the cell, so a merge rewrites the surviving neighbour's cell and
    moves only the entry of the end that changes)."""
    end = ptr + size
    after = cells.pop(end, None)                # the free neighbour after it
    before = cells.pop(ptr, None)               # the free neighbour before it
    if before is None:
        if after is None:                       # a free block of its own
            k = shifted + ptr
            put(keys, k)
            cells[ptr] = cells[end] = [k]
            return
        cell = after                            # the neighbour after it grows down to ptr
        old = after[0]
        k = old + shifted - size
        cells[ptr] = after
    else:                                       # the neighbour before it grows up to end
        cell = before
        old = before[0]
        k = old + shifted
        if after is None:
            cells[end] = before
        else:                                   # ... and on to the end of the one after
            following = after[0]
            del keys[find(keys, following)]
            k += following - end
            cells[end + (following >> 64)] = before
    i = find(keys, old)                         # the merged key sorts after the neighbour's
    if i + 1 < length(keys) and keys[i + 1] < k:
        del keys[i]
        keys.insert(find(keys, k, i), k)
    else:
        keys[i] = k
    cell[0] = k


def split_free(keys: list, cells: dict, j: int, ptr: int, size: int, rest: int,
               find=bisect_left) -> None:
    """should_split over a pool kept as ints (here and cuda/_replay.py): the free block `keys[j]` at
    `ptr` gives its low `size` bytes and stays free as the remainder, whose key `rest` sorts at or
    before j (a neighbouring key, not a search, says whether it stays in place); its cell is
    rewritten and its start entry moves (merge_free has the layout)."""
    if j and keys[j - 1] > rest:
        del keys[j]
        keys.insert(find(keys, rest, 0, j), rest)
    else:
        keys[j] = rest
    cell = cells.pop(ptr)
    cell[0] = rest
    cells[ptr + size] = cell


def _release(pools: dict, cells: dict, segments: dict) -> int:
    """release_cached_blocks: release_whole_segments in every stream's pool, whose free blocks'
    starts and ends share one dict; the bytes freed."""
    return sum(release_whole_segments(keys, cells, cells, segments) for keys in pools.values())


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
    # per size slot, its bytes rounded (round_size): minus them for the small pool (get_pool: at
    # most kSmallSize), 0 for none (0 bytes), else the large request and its size << 64
    rounded = [0 if n <= 0 else -((n + 511) & -512) if n <= small_size else (n + 511) & -512 for n in sizes]
    shifted_of = [r << 64 if r > 0 else 0 for r in rounded]
    split_at = (small_size + 1) << 64   # should_split: more than kSmallSize remains, shifted like a key
    held = [0] * keys        # per key: > 0 the large block's address, < 0 minus the small bytes, 0 nothing
    held_size = [0] * keys   # per key: the large block's size
    key = 0
    # the small pool's level (SmallPoolLevel): level now, high mark since the last event, segments
    # needed for its peak; `pending_need` > 0: the last event is a growth that may still merge
    level = high = small_need = 0
    pending_need = pending_high = pending_level = pending_index = 0
    index = 0                # events of the lumped stream so far (an OOM names its index)
    # the large pool: free blocks as size << 64 | address (sorted, one list per stream), their
    # cells by start and by end address (merge_free; one dict for every stream, as addresses are
    # unique across streams), segments' sizes by base
    free_keys: list = []
    pools = {0: free_keys}   # stream -> its large pool's free list
    pool_of = None           # per key: its stream's free list (where any allocation is on another stream)
    if streams:
        for stream in streams.values():
            pools.setdefault(stream, [])
        pool_of = [free_keys] * keys
        for k, stream in streams.items():
            pool_of[k] = pools[stream]
    cells: dict = {}
    segments: dict = {}
    put, find, length, mask = insort, bisect_left, len, _MASK
    large = allocated = 0    # large pool reserved and allocated bytes
    next_address = FIRST_SEGMENT_ADDRESS
    small_reserved = 0       # the small pool's segments
    peak_reserved = peak_allocated = retries = 0
    at_peak = 0              # the most allocated while reserved stands at its peak
    settled = 0              # the small pool's level at the last large-pool event
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
            if allocated + settled > at_peak and large + small_reserved == peak_reserved:
                at_peak = allocated + settled   # the last large-pool event's bytes, beside the old segments
            if capacity is not None and large + pending_need > capacity:
                large -= _release(pools, cells, segments)
                retries += 1
                if large + pending_need > capacity:
                    oom = _oom(pending_index, pending_need - small_reserved, large + small_reserved,
                               allocated + pending_level, phase, module)
                    break
            small_reserved = pending_need
            total = large + small_reserved
            if total > peak_reserved:   # the growth's high mark needed these segments
                peak_reserved, at_peak = total, allocated + pending_high
            elif allocated + pending_high > at_peak and total == peak_reserved:
                at_peak = allocated + pending_high
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
                size = rounded[op]
                if size <= 0:
                    if size:         # SmallPoolLevel.make: the level, rounded (round_size)
                        held[key] = size
                        level -= size
                        if level > high:
                            high = level
                            if level > small_need:   # past its segments: whole kSmallBuffer more
                                need = -(-level // buffer) * buffer
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
            elif op == EMPTY_CACHE:  # empty_cache, an event of the lumped stream like the others: a
                size = -1            # small-pool growth before it is settled first, against the
                # capacity as before a large-pool event (release, retry, else the OOM)
            else:
                this_key = ~op
                ptr = held[this_key]
                if ptr <= 0:         # SmallPoolLevel.drop: the level goes down
                    level += ptr
                    continue
                size = 0
            if pool_of and size >= 0:   # the large pool of this allocation's stream
                free_keys = pool_of[this_key]
            if pending_need:         # the growth event before this large-pool event, through replay_lumped
                if allocated + pending_high > peak_allocated:
                    peak_allocated = allocated + pending_high
                if allocated + settled > at_peak and large + small_reserved == peak_reserved:
                    at_peak = allocated + settled   # the last large-pool event's bytes, beside the old segments
                if capacity is not None and large + pending_need > capacity:
                    large -= _release(pools, cells, segments)
                    retries += 1
                    if large + pending_need > capacity:
                        oom = _oom(pending_index, pending_need - small_reserved, large + small_reserved,
                                   allocated + pending_level, phase, module)
                        break
                small_reserved = pending_need
                total = large + small_reserved
                if total > peak_reserved:   # the growth's high mark needed these segments
                    peak_reserved, at_peak = total, allocated + pending_high
                elif allocated + pending_high > at_peak and total == peak_reserved:
                    at_peak = allocated + pending_high
                if allocated + pending_level > peak_allocated:
                    peak_allocated = allocated + pending_level
                pending_need = 0
            # this event carries (high, level); then the high mark restarts at the level. The most
            # allocated while reserved stands at its peak is counted here too: what the event before
            # allocated, and the small pool's high mark since, with reserved as it was since then
            now = allocated + high
            if now > peak_allocated:
                peak_allocated = now
            if now > at_peak and large + small_reserved == peak_reserved:
                at_peak = now
            high = settled = level
            index += 1
            if size < 0:             # empty_cache: release_cached_blocks
                large -= _release(pools, cells, segments)
            elif size:               # malloc
                shifted = shifted_of[op]
                j = find(free_keys, shifted)                  # get_free_block: best fit
                if j < length(free_keys):
                    k = free_keys[j]
                    ptr = k & mask
                    rest = k - shifted                        # the remainder's size << 64 | ptr
                    if rest >= split_at:                      # should_split: the low end is taken
                        split_free(free_keys, cells, j, ptr, size, rest + size)   # rest + size: its key
                        found = size
                    else:
                        del free_keys[j]
                        found = k >> 64
                        del cells[ptr], cells[ptr + found]
                else:                # get_allocation_size, alloc_block
                    found = segment_small if size < min_large else -(-size // round_large) * round_large
                    if capacity is not None and large + found > capacity - small_reserved:
                        large -= _release(pools, cells, segments)
                        retries += 1
                        if large + found > capacity - small_reserved:
                            oom = _oom(index - 1, sizes[op], large + small_reserved, allocated + level, phase, module)
                            break
                    ptr = next_address
                    next_address = segment_after(ptr, found)
                    segments[ptr] = found
                    large += found
                    rest = (found - size) << 64
                    if rest >= split_at:                      # should_split: the low end is taken
                        rest += ptr + size
                        put(free_keys, rest)
                        cells[ptr + size] = cells[ptr + found] = [rest]
                        found = size
                    total = large + small_reserved            # reserved grows only here and with
                    if total > peak_reserved:                 # the small pool's segments
                        peak_reserved, at_peak = total, allocated + found + level
                held[this_key] = ptr
                held_size[this_key] = found
                allocated += found   # peak allocated is not checked here: every later event (or the
                # closing one) first counts allocated plus a high mark of at least this level, unless
                # the peak is reset before it (count_from)
            else:                    # free_block, try_merge_blocks (merge_free)
                found = held_size[this_key]
                allocated -= found
                merge_free(free_keys, cells, ptr, found, found << 64)
        if oom is not None:
            break
    if oom is None:              # the closing event (SmallPoolLevel.finish)
        if allocated + high > peak_allocated:
            peak_allocated = allocated + high
        if allocated + high > at_peak and large + small_reserved == peak_reserved:
            at_peak = allocated + high
    return ReservedPeak(peak_reserved, peak_allocated, peak_reserved - at_peak, retries, oom, True)


def _oom(index: int, nbytes: int, reserved: int, allocated: int, phase: str, module: str) -> dict:
    return {"index": index, "nbytes": nbytes, "reserved_bytes": reserved, "allocated_bytes": allocated,
            "phase": phase, "module": module}
