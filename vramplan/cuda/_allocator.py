"""A pure-Python model of PyTorch's CUDA caching allocator (the native backend).

Each rule below names the upstream function it models, in pytorch/pytorch
`c10/cuda/CUDACachingAllocator.cpp` (class `DeviceCachingAllocator` unless said otherwise);
docs/allocator.md states the rules, their constants and the commits they were read from.

Representation, chosen for speed (a million events in about a second):
- every block (allocated, free, or unmapped address space of an expandable segment) is a `_Block`
  in one dict keyed by its address; blocks of one segment form a doubly linked list;
- the free blocks of a pool are a sorted list of int keys `size << 64 | address`, so best fit by
  (size, address) is one `bisect` (`BlockComparatorSize`);
- a pool is keyed by (stream, small/large): blocks are never shared across streams.
Streams are plain keys; where the C++ orders streams by pointer, the model orders them by first use.
"""
from __future__ import annotations

from bisect import bisect_left, insort
from typing import Callable, Iterable

from vramplan.core._errors import UsageError
from vramplan.cuda._alloc_conf import AllocConf, as_conf

MiB = 1024 * 1024
MIN_BLOCK_SIZE = 512          # kMinBlockSize: every size is rounded to at least 512 bytes
SMALL_SIZE = MiB              # kSmallSize: largest request served from the small pool
SMALL_BUFFER = 2 * MiB        # kSmallBuffer: small pool segment (and expandable page) size
MIN_LARGE_ALLOC = 10 * MiB    # kMinLargeAlloc: below it a large request gets a large_segment_size segment
ROUND_LARGE = 2 * MiB         # kRoundLarge: larger requests get a segment rounded up to 2 MiB
ONE_EXABYTE = 2**60           # NativeCachingAllocator::allocate refuses requests this large outright
DEFAULT_DEVICE_BYTES = 2**40  # address space assumed for an expandable reservation when no capacity is given

_SHIFT = 64
_MASK = (1 << _SHIFT) - 1
_LARGE, _SMALL, _ALL = 0, 1, 2


# --- size policy -------------------------------------------------------------------------------------

def roundup_power2_next_division(size: int, divisions: int) -> int:
    """`roundup_power2_next_division`: the next of `divisions` equal steps between the powers of two
    around `size`; powers of two stay as they are."""
    if size & (size - 1) == 0:
        return size
    floor = 1 << (size.bit_length() - 1)
    step = floor >> (divisions.bit_length() - 1)
    if step == 0:
        return floor << 1
    rounded = size & ~(step - 1)
    return size if rounded == size else rounded + step


def round_size(size: int, conf: AllocConf | None = None) -> int:
    """`round_size`: at least 512 bytes; a multiple of 512, or the next power-of-two division when
    roundup_power2_divisions gives more than one division for this size interval."""
    if size < MIN_BLOCK_SIZE:
        return MIN_BLOCK_SIZE
    divisions = conf.divisions_for(size) if conf is not None else 0
    if divisions > 1 and size > MIN_BLOCK_SIZE * divisions:
        return roundup_power2_next_division(size, divisions)
    return (size + MIN_BLOCK_SIZE - 1) // MIN_BLOCK_SIZE * MIN_BLOCK_SIZE


def get_allocation_size(size: int, conf: AllocConf | None = None) -> int:
    """`get_allocation_size`: the segment cudaMalloc'd for a rounded request with no cached fit:
    2 MiB for the small pool, large_segment_size (20 MiB) below 10 MiB, else rounded up to 2 MiB."""
    if size <= SMALL_SIZE:
        return SMALL_BUFFER
    if size < MIN_LARGE_ALLOC:
        return conf.large_segment_size if conf is not None else 20 * MiB
    return (size + ROUND_LARGE - 1) // ROUND_LARGE * ROUND_LARGE


def format_size(size: int) -> str:
    """`format_size` of the OOM message: bytes, KiB, MiB or GiB with two decimals."""
    if size <= 1024:
        return f"{size} bytes"
    if size <= 1048576:
        return f"{size / 1024:.2f} KiB"
    if size <= 1073741824:
        return f"{size / 1048576:.2f} MiB"
    return f"{size / 1073741824:.2f} GiB"


class OutOfMemory(Exception):
    """malloc found no block, could not get a segment and freeing the cache did not help
    (`malloc`'s TORCH_CHECK_WITH(OutOfMemoryError, ...)); the message names the segment size it
    tried to get, as PyTorch's does."""

    def __init__(self, requested: int, alloc_size: int, reserved: int, allocated: int, limit: int | None):
        self.requested, self.alloc_size = requested, alloc_size
        self.reserved, self.allocated, self.limit = reserved, allocated, limit
        if requested >= ONE_EXABYTE:
            text = "CUDA out of memory. Tried to allocate more than 1EB memory."
        else:
            text = (f"CUDA out of memory. Tried to allocate {format_size(alloc_size)}. "
                    f"{format_size(reserved)} reserved, {format_size(allocated)} allocated"
                    + (f", limit {format_size(limit)}." if limit is not None else "."))
        super().__init__(text)


# --- state ---------------------------------------------------------------------------------------------

class _Block:
    """`Block`: a piece of one segment. `seg` is the expandable segment it lives in, or None."""

    __slots__ = ("ptr", "size", "pool", "prev", "next", "allocated", "mapped", "seg", "requested", "gc_base")

    def __init__(self, ptr: int, size: int, pool: _Pool, seg=None, mapped: bool = True):
        self.ptr = ptr
        self.size = size
        self.pool = pool
        self.seg = seg
        self.mapped = mapped
        self.prev = None
        self.next = None
        self.allocated = False
        self.requested = 0
        self.gc_base = 0


class _ExpandableSegment:
    """`ExpandableSegment`: a reserved address range mapped page by page (2 MiB small pool,
    large_segment_size large pool)."""

    __slots__ = ("base", "page", "size")

    def __init__(self, base: int, page: int, size: int):
        self.base, self.page, self.size = base, page, size


class _Pool:
    """`BlockPool` restricted to one stream: `free` holds `size << 64 | ptr` keys of free mapped
    blocks (BlockComparatorSize), `unmapped` the addresses of unmapped blocks (BlockComparatorAddress)."""

    __slots__ = ("stream", "is_small", "kind", "free", "unmapped", "usage")

    def __init__(self, stream, is_small: bool, usage: _Usage):
        self.stream, self.is_small, self.usage = stream, is_small, usage
        self.kind = _SMALL if is_small else _LARGE
        self.free: list[int] = []
        self.unmapped: list[int] = []


class _Stat:
    """`Stat` for the small pool, the large pool and both: current, peak, allocated, freed."""

    __slots__ = ("current", "peak", "allocated", "freed")

    def __init__(self):
        self.current, self.peak, self.allocated, self.freed = [0, 0, 0], [0, 0, 0], [0, 0, 0], [0, 0, 0]

    def increase(self, kind: int, n: int) -> None:
        cur, peak = self.current, self.peak
        cur[kind] += n
        cur[2] += n
        self.allocated[kind] += n
        self.allocated[2] += n
        if cur[kind] > peak[kind]:
            peak[kind] = cur[kind]
        if cur[2] > peak[2]:
            peak[2] = cur[2]

    def decrease(self, kind: int, n: int) -> None:
        self.current[kind] -= n
        self.current[2] -= n
        self.freed[kind] += n
        self.freed[2] += n

    def reset_peak(self) -> None:
        self.peak[:] = self.current

    def reset_accumulated(self) -> None:
        self.allocated[:] = [0, 0, 0]
        self.freed[:] = [0, 0, 0]


class _Usage:
    """The per-pool counters malloc and free touch (kept flat for speed): allocated bytes (current,
    peak, cumulative), block count and requested bytes (current, cumulative). "Freed" is derived:
    cumulative - current + the current value at the last reset_accumulated."""

    __slots__ = ("bytes", "peak", "bytes_total", "count", "count_total", "requested", "requested_total",
                 "bytes_base", "count_base", "requested_base")

    def __init__(self):
        self.bytes = self.peak = self.bytes_total = self.count = self.count_total = 0
        self.requested = self.requested_total = 0
        self.bytes_base = self.count_base = self.requested_base = 0

    def add(self, size: int, requested: int) -> None:
        self.bytes += size
        self.bytes_total += size
        if self.bytes > self.peak:
            self.peak = self.bytes
        self.count += 1
        self.count_total += 1
        self.requested += requested
        self.requested_total += requested

    def reset_accumulated(self) -> None:
        self.bytes_base, self.count_base, self.requested_base = self.bytes, self.count, self.requested
        self.bytes_total = self.count_total = self.requested_total = 0


SegmentBase = Callable[[str, int, object, bool], int]


FIRST_SEGMENT_ADDRESS = 1 << 40


ADDRESS_LIMIT = 1 << 64    # a device pointer; the replays' free lists pack size << 64 | address


def segment_after(base: int, size: int) -> int:
    """The default address of the segment after one of `size` bytes at `base`: 2 MiB aligned with a
    gap of at least 2 MiB, so segments never touch. Past a 64-bit address space no device reserves
    that much, and the packed free-list keys would mix sizes into addresses: refused."""
    after = base + (size + 2 * SMALL_BUFFER - 1) // SMALL_BUFFER * SMALL_BUFFER
    if after >= ADDRESS_LIMIT:
        raise UsageError(f"the allocations would reserve more than 2**64 bytes ({after - FIRST_SEGMENT_ADDRESS:,} "
                         "in segments): beyond any device's address space", hint="lower the batch or the sequence length")
    return after


class _BumpAddresses:
    """Default segment addresses: increasing, 2 MiB aligned, never adjacent (cudaMalloc gives no
    guarantee of contiguity, and blocks never merge across segments anyway)."""

    def __init__(self, start: int = FIRST_SEGMENT_ADDRESS):
        self.next = start

    def __call__(self, action: str, size: int, stream, is_small: bool) -> int:
        base = self.next
        self.next = segment_after(base, size)
        return base


class CachingAllocator:
    """One device's caching allocator. `capacity`: bytes cudaMalloc / cuMemCreate can still get
    (device memory minus the CUDA context and other processes); `memory_limit`: the per-process
    cap of `torch.cuda.set_per_process_memory_fraction` (`allowed_memory_maximum`), which is also
    what enables garbage_collection_threshold. None = unlimited. `segment_base(action, size,
    stream, is_small)` chooses the address of each new segment (`segment_alloc`) or expandable
    reservation (`segment_reserve`)."""

    def __init__(self, conf: AllocConf | str | None = "", *, capacity: int | None = None,
                 memory_limit: int | None = None, segment_base: SegmentBase | None = None):
        self.capacity = _check_bytes("capacity", capacity)
        self.memory_limit = _check_bytes("memory_limit", memory_limit)
        self.segment_base: SegmentBase = segment_base or _BumpAddresses()
        self._blocks: dict[int, _Block] = {}
        self._pools: dict[tuple, _Pool] = {}
        self._small_pools: dict = {}
        self._large_pools: dict = {}
        self._usage = (_Usage(), _Usage())   # large pool, small pool
        self.peak_allocated = 0
        self._free_block_calls = [0, 0]   # BlockPool::get_free_blocks_call_count, large and small
        self.total_reserved = 0           # total_allocated_memory: bytes cudaMalloc'd or mapped
        self.allocated = 0                # bytes in allocated blocks (allocated_bytes.all.current)
        self.segment_events: list[tuple] = []   # (action, address, size, stream)
        self.segment, self.reserved_bytes = _Stat(), _Stat()
        self.num_alloc_retries = self.num_ooms = self.num_sync_all_streams = 0
        self.num_device_alloc = self.num_device_free = 0
        self.oversize_allocations = self.oversize_segments = 0
        self.set_conf(conf)

    # --- settings ------------------------------------------------------------------------------------

    def set_conf(self, conf: AllocConf | str | None) -> None:
        """`_set_allocator_settings`: a string is re-parsed over the settings in force."""
        if isinstance(conf, str) and hasattr(self, "conf"):
            conf = AllocConf.parse(conf, base=self.conf)
        conf = as_conf(conf)
        if conf.backend != "native":
            raise UsageError(f"backend:{conf.backend} is not modelled",
                             hint="the model covers the native caching allocator only")
        self.conf = conf
        self._max_split = conf.max_split_size
        self._max_non_split_rounding = conf.max_non_split_rounding_size
        self._expandable = conf.expandable_segments
        self._plain_rounding = not any(d > 1 for d in conf.roundup_power2_divisions)
        self._update_gc_active()

    def _update_gc_active(self) -> None:
        # get_free_block / malloc: GC bookkeeping only with a memory fraction AND a threshold
        self._gc_active = self.memory_limit is not None and self.conf.garbage_collection_threshold > 0.0
        # malloc may take the first best-fit block directly unless one of the special rules applies
        self._plain_search = not self._gc_active and not self.conf.max_split_size_set

    def set_memory_limit(self, limit: int | None) -> None:
        """`setMemoryFraction`: fraction * total memory as bytes; None lifts the cap."""
        self.memory_limit = _check_bytes("memory_limit", limit)
        self._update_gc_active()

    # --- malloc ---------------------------------------------------------------------------------------

    def malloc(self, nbytes: int, stream=0) -> int:
        """`malloc`: the address of a block of at least `nbytes`; raises OutOfMemory."""
        if nbytes.__class__ is int and 0 < nbytes < ONE_EXABYTE and self._plain_rounding:
            size = (nbytes + 511) & -512          # round_size without power-of-two divisions (>= 512)
        else:
            size = self._checked_round_size(nbytes)
        if size <= SMALL_SIZE:                    # get_pool
            pool = self._small_pools.get(stream) or self._new_pool(stream, True)
        else:
            pool = self._large_pools.get(stream) or self._new_pool(stream, False)
        # get_free_block, inlined for the common case (no GC, no max_split_size, no expandable block)
        keys = pool.free
        i = bisect_left(keys, size << _SHIFT)
        if not self._plain_search:
            block = self._get_free_block(pool, size)
        elif i == len(keys):
            block = None                          # nothing cached is large enough
        else:
            block = self._blocks[keys[i] & _MASK]
            if block.seg is None:
                del keys[i]
            else:
                block = self._get_free_block(pool, size)
        if block is None:
            block = self._allocate_new(pool, size, nbytes)
        # alloc_found_block: the allocation takes the low end, the remainder goes back to the pool
        remaining = block.size - size
        if pool.is_small or self._expandable:     # should_split
            split = remaining >= MIN_BLOCK_SIZE
        else:
            split = remaining > SMALL_SIZE and size < self._max_split
        if split:
            rest = _Block(block.ptr + size, remaining, pool, block.seg)
            nxt = rest.next = block.next
            if nxt is not None:
                nxt.prev = rest
            rest.prev = block
            block.next = rest
            block.size = size
            self._blocks[rest.ptr] = rest
            rest.gc_base = self._free_block_calls[pool.kind]
            insort(keys, (remaining << _SHIFT) | rest.ptr)
        block.allocated = True
        block.requested = nbytes
        size = block.size
        usage = pool.usage                        # _Usage.add, inlined
        usage.bytes = in_pool = usage.bytes + size
        if in_pool > usage.peak:
            usage.peak = in_pool
        usage.bytes_total += size
        usage.count += 1
        usage.count_total += 1
        usage.requested += nbytes
        usage.requested_total += nbytes
        self.allocated = allocated = self.allocated + size
        if allocated > self.peak_allocated:
            self.peak_allocated = allocated
        if size >= self._max_split:
            self.oversize_allocations += 1
        return block.ptr

    def _checked_round_size(self, nbytes: int) -> int:
        if isinstance(nbytes, bool) or not isinstance(nbytes, int):
            raise TypeError(f"malloc size must be an int, got {nbytes!r}")
        if nbytes >= ONE_EXABYTE:   # NativeCachingAllocator::allocate, before any bookkeeping
            raise OutOfMemory(nbytes, nbytes, self.total_reserved, self.allocated, self.memory_limit)
        if nbytes <= 0:
            raise ValueError("zero-byte tensors never reach the caching allocator")
        return round_size(nbytes, self.conf)

    def _new_pool(self, stream, small: bool) -> _Pool:
        pool = self._pools[(stream, small)] = _Pool(stream, small, self._usage[_SMALL if small else _LARGE])
        (self._small_pools if small else self._large_pools)[stream] = pool
        return pool

    def _get_free_block(self, pool: _Pool, size: int) -> _Block | None:
        """`get_free_block`: the smallest cached block >= size (ties: lowest address), subject to the
        expandable-segment walk and the max_split_size rules for oversize blocks."""
        if self._gc_active:
            self._free_block_calls[pool.kind] += 1
        keys = pool.free
        i = bisect_left(keys, size << _SHIFT)
        n = len(keys)
        if i == n:
            return None
        blocks = self._blocks
        block = blocks[keys[i] & _MASK]
        if block.seg is not None:
            if self._expandable:
                # Best fit counts an expandable block at the size it could grow to (its unmapped
                # neighbour included), so walk to larger blocks while they would grow less.
                grow = _expandable_size(block)
                while block.seg is not None and i + 1 < n:
                    candidate = blocks[keys[i + 1] & _MASK]
                    candidate_grow = _expandable_size(candidate)
                    if candidate_grow >= grow:
                        break
                    i, block, grow = i + 1, candidate, candidate_grow
            else:
                # expandable_segments was switched off: only ordinary blocks may be handed out
                i += 1
                while i < n and blocks[keys[i] & _MASK].seg is not None:
                    i += 1
                if i == n:
                    return None
                block = blocks[keys[i] & _MASK]
        found = block.size
        max_split = self._max_split
        if size < max_split and found >= max_split:
            return None     # do not hand out an oversize block for a request below max_split_size
        if size >= max_split and found >= size + self._max_non_split_rounding:
            return None     # oversize requests may round up by at most max_non_split_rounding_size
        del keys[i]
        return block

    def _allocate_new(self, pool: _Pool, size: int, nbytes: int) -> _Block:
        """`malloc`'s slow path: garbage collection, then alloc_block, then release one fitting
        oversize block and retry, then release every cached block and retry, then OOM."""
        alloc_size = get_allocation_size(size, self.conf)
        if self._gc_active:
            self._garbage_collect_cached_blocks()
        block = self._alloc_block(pool, size, alloc_size, retry=False)
        if block is None and self._release_available_cached_blocks(pool, size):
            block = self._alloc_block(pool, size, alloc_size, retry=False)
        if block is None:
            self._release_cached_blocks()
            block = self._alloc_block(pool, size, alloc_size, retry=True)
        if block is None:
            self.num_ooms += 1
            raise OutOfMemory(nbytes, alloc_size, self.total_reserved, self.allocated,
                              _min_or_none(self.capacity, self.memory_limit))
        return block

    def _alloc_block(self, pool: _Pool, size: int, alloc_size: int, retry: bool) -> _Block | None:
        """`alloc_block`: a new segment of alloc_size (or, with expandable segments, newly mapped
        pages), unless the memory fraction or the device's free memory forbids it."""
        if retry:
            self.num_alloc_retries += 1
        if self.memory_limit is not None and self.total_reserved + alloc_size > self.memory_limit:
            return None
        if self._expandable:
            return self._try_allocate_expandable_block(pool, size)
        if self.capacity is not None and self.total_reserved + alloc_size > self.capacity:
            return None     # cudaMalloc: cudaErrorMemoryAllocation
        ptr = self.segment_base("segment_alloc", alloc_size, pool.stream, pool.is_small)
        block = _Block(ptr, alloc_size, pool)
        self._blocks[ptr] = block
        self.total_reserved += alloc_size
        self.segment.increase(pool.kind, 1)
        self.reserved_bytes.increase(pool.kind, alloc_size)
        if alloc_size >= self._max_split:
            self.oversize_segments += 1
        self.num_device_alloc += 1
        self.segment_events.append(("segment_alloc", ptr, alloc_size, pool.stream))
        return block

    # --- free -----------------------------------------------------------------------------------------

    def free(self, ptr: int) -> None:
        """`free` + `free_block`: the block returns to its pool, merged with free neighbours
        (`try_merge_blocks`, previous first)."""
        block = self._blocks.get(ptr)
        if block is None or not block.allocated:
            raise ValueError(f"free of {ptr:#x}, which is not an allocated block")
        block.allocated = False
        size = block.size
        usage = block.pool.usage
        usage.bytes -= size
        usage.count -= 1
        usage.requested -= block.requested
        self.allocated -= size
        if size >= self._max_split:
            self.oversize_allocations -= 1
        self._insert_free(block)

    def _insert_free(self, block: _Block) -> None:
        """Merge a free mapped block with free mapped neighbours and put it in its pool's free list
        (`free_block`, `try_merge_blocks`, `insert_into_blocks`)."""
        pool, blocks = block.pool, self._blocks
        keys = pool.free
        prev = block.prev
        if prev is not None and not prev.allocated and prev.mapped:
            del keys[bisect_left(keys, (prev.size << _SHIFT) | prev.ptr)]
            del blocks[block.ptr]
            block.ptr = prev.ptr
            block.size += prev.size
            blocks[block.ptr] = block
            before = block.prev = prev.prev
            if before is not None:
                before.next = block
        nxt = block.next
        if nxt is not None and not nxt.allocated and nxt.mapped:
            del keys[bisect_left(keys, (nxt.size << _SHIFT) | nxt.ptr)]
            del blocks[nxt.ptr]
            block.size += nxt.size
            after = block.next = nxt.next
            if after is not None:
                after.prev = block
        block.gc_base = self._free_block_calls[pool.kind]
        insort(keys, (block.size << _SHIFT) | block.ptr)

    # --- releasing cached memory ---------------------------------------------------------------------

    def empty_cache(self) -> None:
        """`emptyCache`: release_cached_blocks for the default pools."""
        self._release_cached_blocks()

    def _release_cached_blocks(self) -> bool:
        """`release_cached_blocks`: synchronize_and_free_events (counted), then release every
        unsplit cached segment and unmap every free page, large pool first."""
        self.num_sync_all_streams += 1
        for small in (False, True):
            for pool in list(self._pools.values()):
                if pool.is_small == small:
                    self._release_blocks(pool)
        return True

    def _release_blocks(self, pool: _Pool) -> None:
        """`release_blocks`: cudaFree the free blocks that are whole segments; expandable free
        blocks are unmapped afterwards (unmapping changes the free list)."""
        blocks = self._blocks
        to_unmap = []
        for key in list(pool.free):
            block = blocks[key & _MASK]
            if block.seg is not None:
                to_unmap.append(block)
            elif block.prev is None and block.next is None:
                self._release_block(block)
        for block in to_unmap:
            self._unmap_block(block)
            if block.prev is None and block.next is None and not block.mapped:
                self._release_expandable_segment(block)

    def _release_block(self, block: _Block) -> None:
        """`release_block`: cudaFree of a whole cached segment."""
        pool = block.pool
        keys = pool.free
        del keys[bisect_left(keys, (block.size << _SHIFT) | block.ptr)]
        del self._blocks[block.ptr]
        self.total_reserved -= block.size
        self.segment.decrease(pool.kind, 1)
        self.reserved_bytes.decrease(pool.kind, block.size)
        if block.size >= self._max_split:
            self.oversize_segments -= 1
        self.num_device_free += 1
        self.segment_events.append(("segment_free", block.ptr, block.size, pool.stream))

    def _release_available_cached_blocks(self, pool: _Pool, size: int) -> bool:
        """`release_available_cached_blocks` (only with max_split_size set): free the smallest cached
        oversize block that fits, else oversize blocks from the largest down until enough is freed."""
        max_split = self._max_split
        if not self.conf.max_split_size_set:
            return False
        target = max(size, max_split)
        keys, blocks = pool.free, self._blocks
        i = bisect_left(keys, target << _SHIFT)
        if i < len(keys) and blocks[keys[i] & _MASK].seg is None:
            block = blocks[keys[i] & _MASK]
            if block.prev is not None or block.next is not None:
                return False    # a split block is not a segment; the C++ would cudaFree its middle
            self._release_block(block)
            return True
        released, j = 0, i - 1
        while released < target and j >= 0 and (keys[j] >> _SHIFT) >= max_split:
            block = blocks[keys[j] & _MASK]
            j -= 1
            if block.seg is None and block.prev is None and block.next is None:
                released += block.size
                self._release_block(block)
        return released >= target

    def _garbage_collect_cached_blocks(self) -> None:
        """`garbage_collect_cached_blocks`: once reserved memory exceeds threshold * memory_limit,
        free unsplit cached large blocks at least as old as the average (age = get_free_block calls
        since the block was cached) until enough is reclaimed."""
        threshold = int(self.conf.garbage_collection_threshold * self.memory_limit)
        if self.total_reserved <= threshold:
            return
        target = self.total_reserved - threshold
        large_pools = [p for p in self._pools.values() if not p.is_small]
        calls = self._free_block_calls[_LARGE]

        def cached():
            return [self._blocks[k & _MASK] for p in large_pools for k in p.free]

        unsplit = [b for b in cached() if b.prev is None and b.next is None]
        total_age = sum(calls - b.gc_base for b in unsplit)
        count = len(unsplit)
        reclaimed, freed_one = 0, True
        while reclaimed < target and freed_one and count > 0:
            age_threshold = total_age / count
            freed_one = False
            for block in cached():
                if block.prev is None and block.next is None and block.seg is None \
                        and calls - block.gc_base >= age_threshold:
                    freed_one = True
                    reclaimed += block.size
                    total_age -= calls - block.gc_base
                    count -= 1
                    self._release_block(block)

    # --- expandable segments -------------------------------------------------------------------------

    def _try_allocate_expandable_block(self, pool: _Pool, size: int) -> _Block | None:
        """`try_allocate_expandable_block`: find address space (free blocks followed by unmapped
        pages), map pages until the candidate holds `size`, and take it out of the free list."""
        candidate = self._find_expandable_block(pool, size)
        if not candidate.mapped and not self._map_block(candidate, min(candidate.size, size)):
            return None
        while candidate.size < size:
            nxt = candidate.next      # invariant: free -> unmapped -> ...
            # past the reservation's end: larger than the address space ExpandableSegment
            # reserves (9/8 of the device), which CUDA cannot map either
            if nxt is None or not self._map_block(nxt, min(size - candidate.size, nxt.size)):
                return None
            candidate = nxt           # map_block merged the candidate into it
        keys = pool.free
        del keys[bisect_left(keys, (candidate.size << _SHIFT) | candidate.ptr)]
        return candidate

    def _find_expandable_block(self, pool: _Pool, size: int) -> _Block:
        """`find_expandable_block`: the lowest-addressed unmapped range (with the free block just
        before it) that can hold `size`, or a fresh reservation."""
        blocks = self._blocks
        for ptr in pool.unmapped:
            c = blocks[ptr]
            if c.prev is not None and not c.prev.allocated:
                c = c.prev
            room, b = 0, c
            while room < size and b is not None and not b.allocated:
                room += b.size
                b = b.next
            if room >= size:
                return c
        page = SMALL_BUFFER if pool.is_small else self.conf.large_segment_size
        device = _min_or_none(self.capacity, self.memory_limit) or DEFAULT_DEVICE_BYTES
        # ExpandableSegment reserves pages for 9/8 of the device's memory
        reserve = -(-(device + device // 8) // page) * page
        base = self.segment_base("segment_reserve", reserve, pool.stream, pool.is_small)
        candidate = _Block(base, reserve, pool, _ExpandableSegment(base, page, reserve), mapped=False)
        blocks[base] = candidate
        insort(pool.unmapped, base)
        return candidate

    def _map_block(self, block: _Block, size: int) -> bool:
        """`map_block`: map the pages covering [block.ptr, block.ptr + size), split off the rest of
        the unmapped block, merge with free neighbours; fails when the device has no memory left."""
        seg, pool = block.seg, block.pool
        offset = block.ptr - seg.base
        begin = offset // seg.page
        end = -(-(offset + size) // seg.page)
        mapped = (end - begin) * seg.page
        if mapped == 0:
            return False
        if self.capacity is not None and self.total_reserved + mapped > self.capacity:
            return False    # cuMemCreate: CUDA_ERROR_OUT_OF_MEMORY
        address = block.ptr
        del pool.unmapped[bisect_left(pool.unmapped, address)]
        block.mapped = True
        if mapped < block.size:
            rest = _Block(address + mapped, block.size - mapped, pool, seg, mapped=False)
            nxt = block.next
            rest.prev, rest.next = block, nxt
            if nxt is not None:
                nxt.prev = rest
            block.next = rest
            block.size = mapped
            self._blocks[rest.ptr] = rest
            insort(pool.unmapped, rest.ptr)
        self._insert_free(block)
        self.total_reserved += mapped
        self.reserved_bytes.increase(pool.kind, mapped)
        self.num_device_alloc += 1
        self.segment_events.append(("segment_map", address, mapped, pool.stream))
        return True

    def _unmap_block(self, block: _Block) -> None:
        """`unmap_block`: unmap the whole pages inside a free expandable block; the partial pages at
        either end stay mapped as free blocks."""
        seg, pool, blocks = block.seg, block.pool, self._blocks
        page = seg.page
        begin = -(-(block.ptr - seg.base) // page)
        end = (block.ptr + block.size - seg.base) // page
        if begin >= end:
            return
        keys = pool.free
        del keys[bisect_left(keys, (block.size << _SHIFT) | block.ptr)]
        del blocks[block.ptr]
        start, length = seg.base + begin * page, (end - begin) * page
        before = start - block.ptr
        after = block.size - before - length
        if before > 0:
            head = _Block(block.ptr, before, pool, seg)
            self._splice(head, block.prev, block)
            blocks[head.ptr] = head
            head.gc_base = self._free_block_calls[pool.kind]
            insort(keys, (before << _SHIFT) | head.ptr)
        if after > 0:
            tail = _Block(start + length, after, pool, seg)
            self._splice(tail, block, block.next)
            blocks[tail.ptr] = tail
            tail.gc_base = self._free_block_calls[pool.kind]
            insort(keys, (after << _SHIFT) | tail.ptr)
        block.ptr, block.size, block.mapped = start, length, False
        blocks[start] = block
        for neighbour in (block.prev, block.next):     # try_merge_blocks with unmapped neighbours
            if neighbour is not None and not neighbour.allocated and not neighbour.mapped:
                self._absorb_unmapped(block, neighbour)
        insort(pool.unmapped, block.ptr)
        self.total_reserved -= length
        self.reserved_bytes.decrease(pool.kind, length)
        self.num_device_free += 1
        self.segment_events.append(("segment_unmap", start, length, pool.stream))

    def _absorb_unmapped(self, block: _Block, other: _Block) -> None:
        unmapped = block.pool.unmapped
        del unmapped[bisect_left(unmapped, other.ptr)]
        del self._blocks[other.ptr]
        if other is block.prev:
            del self._blocks[block.ptr]
            block.ptr = other.ptr
            self._blocks[block.ptr] = block
            block.prev = other.prev
            if other.prev is not None:
                other.prev.next = block
        else:
            block.next = other.next
            if other.next is not None:
                other.next.prev = block
        block.size += other.size

    @staticmethod
    def _splice(block: _Block, before: _Block | None, after: _Block | None) -> None:
        block.prev, block.next = before, after
        if before is not None:
            before.next = block
        if after is not None:
            after.prev = block

    def _release_expandable_segment(self, block: _Block) -> None:
        """`release_expandable_segment`: the whole reservation is unmapped; give it back."""
        unmapped = block.pool.unmapped
        del unmapped[bisect_left(unmapped, block.ptr)]
        del self._blocks[block.ptr]

    # --- starting state ------------------------------------------------------------------------------

    def load_segments(self, segments: Iterable[dict]) -> dict:
        """Start from recorded segments (`initial_segments` of a trace: address, stream,
        segment_type, total_size, blocks with offset, size, allocated, id, requested_size; and
        `expandable: true` for a mapped range of an expandable segment, where the ranges of one
        (stream, pool) are taken to share one reservation starting at the lowest of them).
        Returns {block id (or address): address} of the allocated blocks."""
        ids: dict = {}
        segments = sorted(segments, key=lambda s: s["address"])
        self._load_expandable([s for s in segments if s.get("expandable")], ids)
        for seg in segments:
            if seg.get("expandable"):
                continue
            pool = self._pool_for(seg)
            self.total_reserved += seg["total_size"]
            self.segment.increase(pool.kind, 1)
            self.reserved_bytes.increase(pool.kind, seg["total_size"])
            self.num_device_alloc += 1
            self._load_blocks(seg, pool, None, None, ids)
        return ids

    def _pool_for(self, seg: dict) -> _Pool:
        small = seg.get("segment_type", "large") == "small"
        stream = seg.get("stream", 0)
        return self._pools.get((stream, small)) or self._new_pool(stream, small)

    def _load_blocks(self, seg: dict, pool: _Pool, es, prev: _Block | None, ids: dict) -> _Block | None:
        """Link one recorded segment's blocks after `prev`; returns the last block. Adjacent free
        blocks are merged, as the allocator never keeps them apart."""
        address, offset = seg["address"], 0
        for b in sorted(seg["blocks"], key=lambda b: b["offset"]):
            if b["offset"] != offset or b["size"] <= 0:
                raise UsageError(f"segment {address:#x}: blocks do not tile the segment at offset {offset}",
                                 hint="each block must start where the previous one ends")
            offset += b["size"]
            if not b.get("allocated") and prev is not None and not prev.allocated and prev.mapped \
                    and prev.ptr >= address:
                prev.size += b["size"]
                continue
            block = _Block(address + b["offset"], b["size"], pool, es)
            self._splice(block, prev, None)
            self._blocks[block.ptr] = block
            prev = block
            if b.get("allocated"):
                block.allocated = True
                block.requested = b.get("requested_size", b["size"])
                ids[b.get("id", block.ptr)] = block.ptr
                pool.usage.add(block.size, block.requested)
                self.allocated += block.size
                self.peak_allocated = max(self.peak_allocated, self.allocated)
        if offset != seg["total_size"]:
            raise UsageError(f"segment {address:#x}: blocks cover {offset} of {seg['total_size']} bytes",
                             hint="each block must start where the previous one ends")
        block = prev
        while block is not None and block.mapped and block.ptr >= address:
            if not block.allocated:
                insort(pool.free, (block.size << _SHIFT) | block.ptr)
            block = block.prev
        return prev

    def _load_expandable(self, segments: list[dict], ids: dict) -> None:
        groups: dict = {}
        for seg in segments:
            groups.setdefault((seg.get("stream", 0), seg.get("segment_type") == "small"), []).append(seg)
        for (stream, small), ranges in groups.items():
            pool = self._pools.get((stream, small)) or self._new_pool(stream, small)
            page = SMALL_BUFFER if small else self.conf.large_segment_size
            base = ranges[0]["address"]
            device = _min_or_none(self.capacity, self.memory_limit) or DEFAULT_DEVICE_BYTES
            reserve = -(-(device + device // 8) // page) * page
            end_of_ranges = ranges[-1]["address"] + ranges[-1]["total_size"]
            reserve = max(reserve, -(-(end_of_ranges - base) // page) * page + page)
            es = _ExpandableSegment(base, page, reserve)
            prev, cursor = None, base
            for seg in ranges:
                if (seg["address"] - base) % page or seg["total_size"] % page:
                    raise UsageError(f"expandable segment range {seg['address']:#x} is not page aligned",
                                     hint=f"pages are {page} bytes")
                if seg["address"] > cursor:
                    prev = self._add_unmapped(pool, es, cursor, seg["address"] - cursor, prev)
                prev = self._load_blocks(seg, pool, es, prev, ids)
                self.total_reserved += seg["total_size"]
                self.reserved_bytes.increase(pool.kind, seg["total_size"])
                self.num_device_alloc += 1
                cursor = seg["address"] + seg["total_size"]
            self._add_unmapped(pool, es, cursor, base + reserve - cursor, prev)

    def _add_unmapped(self, pool: _Pool, es, ptr: int, size: int, prev: _Block | None) -> _Block:
        block = _Block(ptr, size, pool, es, mapped=False)
        self._splice(block, prev, None)
        self._blocks[ptr] = block
        insort(pool.unmapped, ptr)
        return block

    # --- introspection -------------------------------------------------------------------------------

    @property
    def reserved(self) -> int:
        return self.total_reserved

    def largest_free_block(self) -> int:
        """The largest cached (free, mapped) block over all pools."""
        return max((p.free[-1] >> _SHIFT for p in self._pools.values() if p.free), default=0)

    def segments(self) -> list[dict]:
        """`snapshot`'s segments: one per cudaMalloc, one per contiguous mapped range of an
        expandable segment; blocks in address order."""
        out = []
        for block in sorted(self._blocks.values(), key=lambda b: b.ptr):
            if not block.mapped or (block.prev is not None and block.prev.mapped):
                continue
            pool = block.pool
            seg = {"address": block.ptr, "stream": pool.stream,
                   "segment_type": "small" if pool.is_small else "large",
                   "expandable": block.seg is not None, "total_size": 0, "allocated_size": 0, "blocks": []}
            b = block
            while b is not None and b.mapped:
                seg["blocks"].append({"address": b.ptr, "size": b.size, "allocated": b.allocated,
                                      "requested_size": b.requested if b.allocated else 0})
                seg["total_size"] += b.size
                seg["allocated_size"] += b.size if b.allocated else 0
                b = b.next
            out.append(seg)
        return out

    def reset_peak_stats(self) -> None:
        """`resetPeakStats`: every peak becomes the current value."""
        for stat in (self.segment, self.reserved_bytes):
            stat.reset_peak()
        for usage in self._usage:
            usage.peak = usage.bytes
        self.peak_allocated = self.allocated

    def reset_accumulated_stats(self) -> None:
        """`resetAccumulatedStats`: cumulative counters restart from zero."""
        for stat in (self.segment, self.reserved_bytes):
            stat.reset_accumulated()
        for usage in self._usage:
            usage.reset_accumulated()
        self.num_alloc_retries = self.num_ooms = self.num_sync_all_streams = 0
        self.num_device_alloc = self.num_device_free = 0

    def stats(self) -> dict:
        """`torch.cuda.memory_stats()` names. Without record_stream the model has no blocks awaiting
        events, so "active" equals "allocated". Peaks are kept for allocated_bytes, reserved_bytes
        and segment (the counters malloc and free touch are kept lean); inactive_split is counted
        on demand (current only)."""
        out: dict = {}
        for name, stat in (("segment", self.segment), ("reserved_bytes", self.reserved_bytes)):
            for kind, label in ((_ALL, "all"), (_SMALL, "small_pool"), (_LARGE, "large_pool")):
                for field in ("current", "peak", "allocated", "freed"):
                    out[f"{name}.{label}.{field}"] = getattr(stat, field)[kind]
        large, small = self._usage
        for label, parts in (("all", (large, small)), ("small_pool", (small,)), ("large_pool", (large,))):
            for names, cur, total, base in ((("allocated_bytes", "active_bytes"), "bytes", "bytes_total",
                                             "bytes_base"),
                                            (("allocation", "active"), "count", "count_total", "count_base"),
                                            (("requested_bytes",), "requested", "requested_total",
                                             "requested_base")):
                current = sum(getattr(u, cur) for u in parts)
                allocated = sum(getattr(u, total) for u in parts)
                freed = allocated - current + sum(getattr(u, base) for u in parts)
                for name in names:
                    out[f"{name}.{label}.current"] = current
                    out[f"{name}.{label}.allocated"] = allocated
                    out[f"{name}.{label}.freed"] = freed
            if label != "all":
                out[f"allocated_bytes.{label}.peak"] = out[f"active_bytes.{label}.peak"] = parts[0].peak
        out["allocated_bytes.all.peak"] = out["active_bytes.all.peak"] = self.peak_allocated
        split = {("inactive_split", k): 0 for k in (_LARGE, _SMALL)}
        split.update({("inactive_split_bytes", k): 0 for k in (_LARGE, _SMALL)})
        for p in self._pools.values():
            for key in p.free:
                b = self._blocks[key & _MASK]
                if b.seg is None and (b.prev is not None or b.next is not None):
                    split[("inactive_split", p.kind)] += 1
                    split[("inactive_split_bytes", p.kind)] += b.size
        for name in ("inactive_split", "inactive_split_bytes"):
            out[f"{name}.large_pool.current"] = split[(name, _LARGE)]
            out[f"{name}.small_pool.current"] = split[(name, _SMALL)]
            out[f"{name}.all.current"] = split[(name, _LARGE)] + split[(name, _SMALL)]
        out.update({"num_alloc_retries": self.num_alloc_retries, "num_ooms": self.num_ooms,
                    "num_sync_all_streams": self.num_sync_all_streams,
                    "num_device_alloc": self.num_device_alloc, "num_device_free": self.num_device_free,
                    "oversize_allocations.current": self.oversize_allocations,
                    "oversize_segments.current": self.oversize_segments,
                    "max_split_size": -1 if not self.conf.max_split_size_set else self._max_split,
                    "largest_free_block_bytes": self.largest_free_block()})
        return out


def _expandable_size(block: _Block) -> int:
    nxt = block.next
    return block.size + (nxt.size if nxt is not None and not nxt.mapped else 0)


def _min_or_none(a: int | None, b: int | None) -> int | None:
    if a is None:
        return b
    return a if b is None else min(a, b)


def _check_bytes(name: str, value) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UsageError(f"{name} must be a non-negative number of bytes, got {value!r}",
                         hint="bytes are ints; None means unlimited")
    return value
