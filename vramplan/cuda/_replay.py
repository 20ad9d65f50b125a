"""Replaying an event stream through the caching-allocator model: `replay_allocations`, the public
API (docs/allocator.md#api).

Two loops give the same result. The general one drives a `CachingAllocator` (cuda/_allocator.py)
event by event; every setting, starting segments and chosen segment addresses go there. Under the
settings most runs use (no expandable segments, no max_split_size, no roundup_power2_divisions,
no memory fraction) with the default segment addresses, `_replay_plain` runs the same rules
(docs/allocator.md#rules 1-7 and 10) with each pool kept as ints in a sorted list and dicts
instead of linked `_Block` objects, about twice as fast (docs/allocator.md#plain-replay).
tests/test_allocator_replay.py holds the two equal field for field, addresses included.
"""
from __future__ import annotations

from bisect import bisect_left, insort
from dataclasses import asdict
from typing import Callable, Iterable

from vramplan.core._errors import UsageError
from vramplan.core._record import record
from vramplan.cuda._alloc_conf import AllocConf, as_conf
from vramplan.cuda._allocator import (MIN_BLOCK_SIZE, ONE_EXABYTE, SMALL_SIZE, CachingAllocator,
                                      FIRST_SEGMENT_ADDRESS, OutOfMemory, SegmentBase, get_allocation_size,
                                      segment_after)
from vramplan.cuda._fast_replay import merge_free, release_whole_segments, split_free

_MASK = (1 << 64) - 1        # free-list keys: size << 64 | address (BlockComparatorSize)


@record
class AllocatorReplay:
    """What the allocator did over an event stream. Byte counts are ints. `largest_free_block_bytes`
    are taken when reserved first reached its peak (`peak_reserved_index`, the event index; -1 = the
    starting state); `fragmentation_bytes` is the peak reserved less the most allocated while
    reserved stood at its peak (docs/allocator.md#fragmentation-at-the-peak). Replay stops at the first
    OOM, as the program would: `oom` then names that event and the state just after the failure
    (the failed malloc may already have released cached segments)."""

    events: int
    peak_allocated_bytes: int
    peak_reserved_bytes: int
    allocated_bytes: int
    reserved_bytes: int
    num_alloc_retries: int
    num_ooms: int
    segments: int
    largest_free_block_bytes: int
    fragmentation_bytes: int
    peak_reserved_index: int
    peak_allocated_index: int
    oom: dict | None

    def to_dict(self) -> dict:
        return asdict(self)


def replay_allocations(events: Iterable[tuple], alloc_conf: AllocConf | str | None = "",
                       capacity: int | None = None, *, memory_limit: int | None = None,
                       initial_segments: list[dict] | None = None,
                       segment_base: SegmentBase | None = None) -> AllocatorReplay:
    """Replay ("alloc", key, nbytes[, stream]) / ("free", key) / ("empty_cache",) events through a
    fresh CachingAllocator (optionally started from `initial_segments`, whose allocated blocks are
    freed by their `id`). Zero-byte allocations never reach the allocator. Events that are not
    such tuples (None, a bare number, an unhashable key) are a UsageError."""
    conf = as_conf(alloc_conf)
    try:
        if initial_segments is None and segment_base is None and memory_limit is None and plain(conf):
            return _replay_plain(events, conf, CachingAllocator(conf, capacity=capacity).capacity)
        allocator = CachingAllocator(conf, capacity=capacity, memory_limit=memory_limit,
                                     segment_base=segment_base)
        live = allocator.load_segments(initial_segments) if initial_segments else {}
        return run_replay(allocator, events, live)
    except (TypeError, IndexError) as exc:     # checked here, not per event: the loop stays fast
        raise UsageError(f"events must be an iterable of ('alloc', key, nbytes[, stream]), ('free', key) and "
                         f"('empty_cache',) tuples with hashable keys ({exc})",
                         hint="e.g. [('alloc', 'a', 4096), ('free', 'a')]") from None


def plain(conf: AllocConf) -> bool:
    """Settings whose rules are only docs/allocator.md#rules 1-7 and 10, without their optional
    branches: what `_replay_plain` covers."""
    return (conf.backend == "native" and not conf.expandable_segments and not conf.max_split_size_set
            and not any(d > 1 for d in conf.roundup_power2_divisions))


def run_replay(allocator: CachingAllocator, events: Iterable[tuple], live: dict | None = None,
               on_alloc: Callable[[int, int], None] | None = None) -> AllocatorReplay:
    """The replay loop over an existing allocator. `live` maps keys to addresses (blocks already
    allocated); `on_alloc(event_index, address)` sees every successful allocation."""
    live = {} if live is None else live
    malloc, free = allocator.malloc, allocator.free
    peak_reserved, peak_reserved_index = allocator.total_reserved, -1
    peak_allocated, peak_allocated_index = allocator.allocated, -1
    largest_at_peak = allocator.largest_free_block()
    allocated_at_peak = allocator.allocated
    oom, index = None, -1
    for index, event in enumerate(events):
        op = event[0]
        if op == "alloc":
            key, nbytes = event[1], event[2]
            if key in live:
                allocated_twice(index, key)
            if nbytes.__class__ is not int or nbytes <= 0:
                _check_event_size(index, nbytes)
                if nbytes == 0:         # zero-byte tensors never reach the allocator
                    live[key] = None
                    continue
            try:
                address = malloc(nbytes, event[3] if len(event) > 3 else 0)
            except OutOfMemory:
                oom = _oom(index, key, nbytes, allocator.total_reserved, allocator.allocated)
                break
            live[key] = address
            if on_alloc is not None:
                on_alloc(index, address)
            if allocator.allocated > peak_allocated:
                peak_allocated, peak_allocated_index = allocator.allocated, index
            if allocator.total_reserved > peak_reserved:
                peak_reserved, peak_reserved_index = allocator.total_reserved, index
                largest_at_peak = allocator.largest_free_block()
                allocated_at_peak = allocator.allocated
            elif allocator.allocated > allocated_at_peak and allocator.total_reserved == peak_reserved:
                allocated_at_peak = allocator.allocated     # the most allocated while reserved stands at its peak
        elif op == "free":
            try:
                address = live.pop(event[1])
            except KeyError:
                not_allocated(index, event[1])
            if address is not None:
                free(address)
        elif op == "empty_cache":
            allocator.empty_cache()
        else:
            _unknown_action(index, op)
    return AllocatorReplay(
        events=index + 1, peak_allocated_bytes=peak_allocated, peak_reserved_bytes=peak_reserved,
        allocated_bytes=allocator.allocated, reserved_bytes=allocator.total_reserved,
        num_alloc_retries=allocator.num_alloc_retries, num_ooms=allocator.num_ooms,
        segments=len(allocator.segments()), largest_free_block_bytes=largest_at_peak,
        fragmentation_bytes=peak_reserved - allocated_at_peak, peak_reserved_index=peak_reserved_index,
        peak_allocated_index=peak_allocated_index, oom=oom)


def _new_pool(small: bool) -> tuple:
    """One (stream, small/large) pool of the plain replay: its free blocks as sorted
    `size << 64 | address` keys; one dict from each free block's start address and from its end
    address to its cell, a one-item list holding its key (the two entries share the cell, so a
    split or merge rewrites the cell and moves only the entry of the end that changes; the two
    kinds never share an address, as a free block ending where another starts would have merged);
    its segments' sizes by base address; and the smallest remainder that splits a block, shifted
    like a key (should_split: kMinBlockSize in the small pool, more than kSmallSize in the large)."""
    return [], {}, {}, (MIN_BLOCK_SIZE if small else SMALL_SIZE + 1) << 64


def _replay_plain(events: Iterable[tuple], conf: AllocConf, capacity: int | None) -> AllocatorReplay:
    """`run_replay` over a fresh allocator under `plain` settings and default segment addresses,
    with the rules inlined but for a free block's split and merge (cuda/_fast_replay.py split_free,
    merge_free, shared with the one-pass replay). Segments never touch (the default addresses leave
    a gap), so a free block that ends where another starts is its neighbour in the same segment."""
    pools: dict[tuple, tuple] = {}
    small0 = pools[(0, True)] = _new_pool(True)
    large0 = pools[(0, False)] = _new_pool(False)
    # key -> (address, block size, size << 64, the pool's keys, its cells), None: 0 bytes
    live: dict = {}
    rounded: dict = {}       # request bytes -> (size, size << 64, small?): a training step repeats its sizes
    find, put, length, mask = bisect_left, insort, len, _MASK       # locals: the loop below is the hot path
    small_size, too_large = SMALL_SIZE, ONE_EXABYTE
    next_address = FIRST_SEGMENT_ADDRESS
    reserved = allocated = retries = ooms = 0
    peak_reserved = peak_allocated = largest_at_peak = allocated_at_peak = 0
    peak_reserved_index = peak_allocated_index = -1
    oom, index = None, -1
    for index, event in enumerate(events):
        op = event[0]
        if op == "alloc":
            key, nbytes = event[1], event[2]
            if key in live:
                allocated_twice(index, key)
            sized = rounded.get(nbytes) if nbytes.__class__ is int else None
            if sized is None:
                if nbytes.__class__ is not int or not 0 < nbytes < too_large:
                    _check_event_size(index, nbytes)
                    if nbytes == 0:                     # zero-byte tensors never reach the allocator
                        live[key] = None
                        continue
                    if nbytes >= too_large:
                        oom = _oom(index, key, nbytes, reserved, allocated)   # NativeCachingAllocator::allocate
                        break
                    nbytes = int(nbytes)                # an int subclass (IntEnum...): its value
                if length(rounded) == 1 << 16:          # bounded, whatever the stream
                    rounded.clear()
                size = (nbytes + 511) & -512            # round_size (rule 1, >= 512 B)
                small = size <= small_size              # get_pool (rule 2)
                sized = rounded[nbytes] = (size, size << 64, small)
            size, shifted, small = sized
            if length(event) == 3 or event[3] == 0:
                pool = small0 if small else large0
            else:
                pool = pools.get((event[3], small)) or pools.setdefault((event[3], small), _new_pool(small))
            keys, cells, segments, split_at = pool
            j = find(keys, shifted)                     # get_free_block: best fit (rule 3)
            if j < length(keys):
                k = keys[j]
                ptr = k & mask
                rest = k - shifted                      # the remainder's size << 64 | ptr
                if rest >= split_at:                    # should_split (rule 5): the low end is taken
                    split_free(keys, cells, j, ptr, size, rest + size)   # rest + size: its key
                    found = size
                else:
                    del keys[j]
                    found = k >> 64
                    shifted = k - ptr
                    del cells[ptr], cells[ptr + found]
            else:                                       # alloc_block (rules 4 and 7)
                found = get_allocation_size(size, conf)
                if capacity is not None and reserved + found > capacity:
                    for other in pools.values():        # release_cached_blocks, then one retry
                        reserved -= _release(other)
                    retries += 1
                    if reserved + found > capacity:
                        ooms += 1
                        oom = _oom(index, key, nbytes, reserved, allocated)
                        break
                ptr = next_address
                next_address = segment_after(ptr, found)
                segments[ptr] = found
                reserved += found
                rest = (found - size) << 64
                if rest >= split_at:                    # should_split (rule 5)
                    rest += ptr + size
                    put(keys, rest)
                    cells[ptr + size] = cells[ptr + found] = [rest]
                    found = size
                else:
                    shifted = found << 64
                if reserved > peak_reserved:            # reserved grows only here
                    peak_reserved, peak_reserved_index, allocated_at_peak = reserved, index, allocated + found
                    largest_at_peak = max((p[0][-1] >> 64 for p in pools.values() if p[0]), default=0)
            live[key] = (ptr, found, shifted, keys, cells)
            allocated += found
            if allocated > peak_allocated:
                peak_allocated, peak_allocated_index = allocated, index
            if allocated > allocated_at_peak and reserved == peak_reserved:
                allocated_at_peak = allocated           # the most allocated while reserved stands at its peak
        elif op == "free":
            try:
                block = live.pop(event[1])
            except KeyError:
                not_allocated(index, event[1])
            if block is None:
                continue
            ptr, size, shifted, keys, cells = block     # free_block, try_merge_blocks (rule 6)
            allocated -= size
            merge_free(keys, cells, ptr, size, shifted)
        elif op == "empty_cache":                       # rule 10
            for pool in pools.values():
                reserved -= _release(pool)
        else:
            _unknown_action(index, op)
    return AllocatorReplay(
        events=index + 1, peak_allocated_bytes=peak_allocated, peak_reserved_bytes=peak_reserved,
        allocated_bytes=allocated, reserved_bytes=reserved, num_alloc_retries=retries, num_ooms=ooms,
        segments=sum(len(p[2]) for p in pools.values()), largest_free_block_bytes=largest_at_peak,
        fragmentation_bytes=peak_reserved - allocated_at_peak, peak_reserved_index=peak_reserved_index,
        peak_allocated_index=peak_allocated_index, oom=oom)


def _release(pool: tuple) -> int:
    """release_whole_segments over one pool of the plain replay, whose starts and ends share one
    dict; the bytes freed."""
    keys, cells, segments, _ = pool
    return release_whole_segments(keys, cells, cells, segments)


# --- bad events: the same one-line errors from both loops -------------------------------------------

def _oom(index: int, key, nbytes: int, reserved: int, allocated: int) -> dict:
    return {"index": index, "key": key, "nbytes": nbytes, "reserved_bytes": reserved, "allocated_bytes": allocated}


def allocated_twice(index: int, key) -> None:
    raise UsageError(f"event {index}: key {key!r} is allocated twice", hint="free it before allocating it again")


def not_allocated(index: int, key) -> None:
    raise UsageError(f"event {index}: free of {key!r}, which is not allocated",
                     hint="every free needs an earlier alloc of the same key") from None


def _unknown_action(index: int, op) -> None:
    raise UsageError(f"event {index}: unknown action {op!r}",
                     hint="events are ('alloc', key, nbytes[, stream]), ('free', key) or ('empty_cache',)")


def _check_event_size(index: int, nbytes) -> None:
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
        raise UsageError(f"event {index}: size {nbytes!r} is not a byte count",
                         hint="sizes are non-negative ints")
