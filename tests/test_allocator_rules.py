"""Each allocator rule on a short hand-made sequence. The expected values are worked out in the
comments from the cited C++ (c10/cuda/CUDACachingAllocator.cpp, DeviceCachingAllocator::...),
never copied from the model's output."""
import pytest

from vramplan.cuda._alloc_conf import AllocConf
from vramplan.cuda._allocator import CachingAllocator, OutOfMemory, get_allocation_size, round_size
from vramplan.cuda._replay import replay_allocations
from vramplan.core._errors import UsageError

MiB = 2**20


def events(a):
    return [(action, size) for action, _, size, _ in a.segment_events]


# --- round_size ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("request_bytes, rounded", [
    (1, 512), (512, 512), (513, 1024),          # kMinBlockSize = 512, multiples of 512
    (1000, 1024), (4000, 4096), (1048577, 1049088),
])
def test_round_size_plain(request_bytes, rounded):
    assert round_size(request_bytes) == rounded


def test_round_size_power2_divisions_plain_int():
    conf = AllocConf.parse("roundup_power2_divisions:4")
    # 84 MiB: floor power of two 64 MiB, step 64/4 = 16 MiB -> 80 MiB + 16 MiB = 96 MiB
    assert round_size(84 * MiB, conf) == 96 * MiB
    # a power of two stays; an exact division stays (80 MiB = 64 + 16)
    assert round_size(64 * MiB, conf) == 64 * MiB
    assert round_size(80 * MiB, conf) == 80 * MiB
    # size <= 512 * divisions (2048 B) keeps 512-byte rounding: 1500 -> 1536
    assert round_size(1500, conf) == 1536
    # 3000 B: floor 2048, step 2048/4 = 512 -> 3072
    assert round_size(3000, conf) == 3072


def test_round_size_power2_divisions_bracket():
    conf = AllocConf.parse("roundup_power2_divisions:[64:8,128:2,>:1]")
    # 84 MiB is in the [64 MiB, 128 MiB) interval: 8 divisions, step 8 MiB -> 88 MiB
    assert round_size(84 * MiB, conf) == 88 * MiB
    # 200 MiB in [128, 256): 2 divisions, step 64 MiB: 192 + 64 = 256 MiB
    assert round_size(200 * MiB, conf) == 256 * MiB
    # 300 MiB in [256, 512): '>' gave 1 division -> plain 512-byte rounding
    assert round_size(300 * MiB + 1, conf) == 300 * MiB + 512
    # 5 MiB is below the first key, which fills every lower interval with 8: floor 4 MiB, step 512 KiB
    assert round_size(5 * MiB + 1, conf) == 5 * MiB + 512 * 1024


@pytest.mark.parametrize("size, segment", [
    (512, 2 * MiB), (MiB, 2 * MiB),                       # small pool: kSmallBuffer
    (MiB + 512, 20 * MiB), (10 * MiB - 512, 20 * MiB),    # 1-10 MiB: kLargeBuffer
    (10 * MiB, 10 * MiB), (10 * MiB + 512, 12 * MiB),     # >= 10 MiB: round up to 2 MiB
])
def test_get_allocation_size(size, segment):
    assert get_allocation_size(size) == segment


# --- should_split -----------------------------------------------------------------------------------------

def test_small_pool_splits_a_512_byte_remainder():
    a = CachingAllocator("")
    first = a.malloc(MiB)             # 2 MiB small segment, remainder 1 MiB >= 512: split
    a.malloc(MiB - 512)               # remainder 2 MiB - 1 MiB - (1 MiB - 512) = 512 >= 512: split
    last = a.malloc(512)              # fits in that 512-byte remainder: no new segment
    assert events(a) == [("segment_alloc", 2 * MiB)]
    assert last == first + 2 * MiB - 512


def test_large_pool_splits_only_a_remainder_above_1mib():
    a = CachingAllocator("")
    first = a.malloc(9 * MiB)         # 20 MiB segment; remainder 11 MiB > 1 MiB: split
    second = a.malloc(10 * MiB)       # from the 11 MiB block: remainder exactly 1 MiB, not > 1 MiB
    assert second == first + 9 * MiB
    assert a.allocated == 9 * MiB + 11 * MiB      # the whole 11 MiB block was handed out
    b = CachingAllocator("")
    b.malloc(9 * MiB)
    b.malloc(10 * MiB - 512)          # remainder 1 MiB + 512 > 1 MiB: split
    assert b.allocated == 9 * MiB + 10 * MiB - 512
    assert b.largest_free_block() == MiB + 512


# --- free and merge -------------------------------------------------------------------------------------------

def test_free_merges_with_both_neighbours():
    a = CachingAllocator("")
    x, y, z = a.malloc(4096), a.malloc(4096), a.malloc(4096)
    a.free(x)
    a.free(z)                          # z merges with the free tail of the segment
    blocks = a.segments()[0]["blocks"]
    assert [(b["size"], b["allocated"]) for b in blocks] == [(4096, False), (4096, True), (2 * MiB - 8192, False)]
    a.free(y)                          # y merges with x before and the tail after: one block again
    assert [(b["size"], b["allocated"]) for b in a.segments()[0]["blocks"]] == [(2 * MiB, False)]
    a.empty_cache()                    # an unsplit cached segment is released
    assert a.total_reserved == 0 and events(a)[-1] == ("segment_free", 2 * MiB)


def test_best_fit_prefers_smallest_then_lowest_address():
    a = CachingAllocator("")
    blocks = [a.malloc(n) for n in (8192, 512, 4096, 512, 4096, 512)]
    for p in (blocks[0], blocks[2], blocks[4]):
        a.free(p)                      # free 8192, 4096, 4096 with allocated 512s between
    assert a.malloc(3000) == blocks[2]   # 3072 -> smallest fit is 4096; two of them: lower address
    assert a.malloc(3000) == blocks[4]


def test_streams_do_not_share_blocks():
    a = CachingAllocator("")
    p = a.malloc(4096, stream=0)
    a.free(p)
    q = a.malloc(4096, stream=7)       # the cached block belongs to stream 0: a new segment
    assert q != p and events(a) == [("segment_alloc", 2 * MiB)] * 2


# --- max_split_size / max_non_split_rounding --------------------------------------------------------------

def _cached_block(conf, nbytes):
    a = CachingAllocator(conf)
    a.free(a.malloc(nbytes))
    return a


def test_oversize_block_is_not_split_for_a_small_request():
    # max_split 40 MiB: a cached 60 MiB block (>= max_split) is not handed to a 30 MiB request
    a = _cached_block("max_split_size_mb:40", 60 * MiB)
    a.malloc(30 * MiB)
    assert events(a) == [("segment_alloc", 60 * MiB), ("segment_alloc", 30 * MiB)]


def test_a_block_exactly_max_split_size_is_oversize():
    # get_free_block: a request below max_split refuses a block with size >= max_split (here ==)
    a = _cached_block("max_split_size_mb:40", 40 * MiB)
    a.malloc(30 * MiB)
    assert events(a) == [("segment_alloc", 40 * MiB), ("segment_alloc", 30 * MiB)]


def test_oversize_request_may_round_up_by_less_than_max_non_split_rounding():
    # request 50 MiB >= max_split: the 60 MiB block is < 50 + 20 (default rounding) -> reused whole
    a = _cached_block("max_split_size_mb:40", 60 * MiB)
    a.malloc(50 * MiB)
    assert len(events(a)) == 1 and a.allocated == 60 * MiB      # should_split: 50 MiB >= max_split -> no split
    # request 40 MiB: 60 >= 40 + 20 -> refused, a new 40 MiB segment
    b = _cached_block("max_split_size_mb:40", 60 * MiB)
    b.malloc(40 * MiB)
    assert events(b)[-1] == ("segment_alloc", 40 * MiB)
    # with max_non_split_rounding_mb:30: 60 < 40 + 30 -> reused
    c = _cached_block("max_split_size_mb:40,max_non_split_rounding_mb:30", 60 * MiB)
    c.malloc(40 * MiB)
    assert len(events(c)) == 1 and c.allocated == 60 * MiB


# --- expandable segments ------------------------------------------------------------------------------------

def test_expandable_segment_grows_by_pages_and_unmaps_on_release():
    a = CachingAllocator("expandable_segments:True")
    x = a.malloc(16 * MiB)            # large pool page 20 MiB: one page mapped at the reservation base
    y = a.malloc(16 * MiB)            # free tail 4 MiB + unmapped: one more page, contiguous
    assert y == x + 16 * MiB
    assert [(e[0], e[1] - x, e[2]) for e in a.segment_events] == [("segment_map", 0, 20 * MiB),
                                                                  ("segment_map", 20 * MiB, 20 * MiB)]
    assert a.total_reserved == 40 * MiB and a.stats()["segment.all.current"] == 0   # no cudaMalloc segment
    a.free(x)
    a.empty_cache()                   # x's block covers no whole page: nothing unmapped
    assert a.total_reserved == 40 * MiB
    a.free(y)
    a.empty_cache()                   # now the whole 40 MiB is free: both pages unmapped in one range
    assert a.segment_events[-1][0] == "segment_unmap" and a.segment_events[-1][2] == 40 * MiB
    assert a.total_reserved == 0
    s = CachingAllocator("expandable_segments:True")
    s.malloc(1000)                    # small pool page: 2 MiB
    assert events(s) == [("segment_map", 2 * MiB)]


# --- failure path ------------------------------------------------------------------------------------------

def test_release_cached_blocks_and_retry():
    a = CachingAllocator("", capacity=60 * MiB)
    a.free(a.malloc(30 * MiB))        # cached 30 MiB segment
    a.malloc(40 * MiB)                # 30 + 40 > 60: release_cached_blocks frees the cached segment, retry
    assert a.num_alloc_retries == 1 and a.num_ooms == 0
    assert events(a) == [("segment_alloc", 30 * MiB), ("segment_free", 30 * MiB), ("segment_alloc", 40 * MiB)]


def test_release_available_cached_blocks_frees_one_oversize_block_without_a_retry():
    a = CachingAllocator("max_split_size_mb:20", capacity=60 * MiB)
    a.free(a.malloc(50 * MiB))        # cached 50 MiB block, oversize (>= 20 MiB)
    # 25 MiB: get_free_block refuses 50 MiB (>= 25 + 20); cudaMalloc 26 MiB fails (50 + 26 > 60);
    # release_available_cached_blocks frees the 50 MiB block (smallest >= max(25, 20) MiB); alloc succeeds
    a.malloc(25 * MiB)
    assert a.num_alloc_retries == 0
    assert events(a) == [("segment_alloc", 50 * MiB), ("segment_free", 50 * MiB), ("segment_alloc", 26 * MiB)]


def test_oom_with_capacity_and_replay_stops_there():
    a = CachingAllocator("", capacity=30 * MiB)
    a.malloc(20 * MiB)
    with pytest.raises(OutOfMemory):
        a.malloc(20 * MiB)            # 20 + 20 > 30 even after releasing the (empty) cache
    assert a.num_ooms == 1 and a.num_alloc_retries == 1
    r = replay_allocations([("alloc", "a", 20 * MiB), ("alloc", "b", 20 * MiB), ("free", "a")],
                           capacity=30 * MiB)
    assert r.oom == {"index": 1, "key": "b", "nbytes": 20 * MiB, "reserved_bytes": 20 * MiB,
                     "allocated_bytes": 20 * MiB}
    assert r.events == 2 and r.num_ooms == 1


# --- garbage collection ---------------------------------------------------------------------------------

def test_garbage_collection_threshold_frees_old_cached_blocks_before_cudamalloc():
    # memory fraction 100 MiB, threshold 0.5 -> GC once more than 50 MiB is reserved
    a = CachingAllocator("garbage_collection_threshold:0.5", memory_limit=100 * MiB)
    x = a.malloc(30 * MiB)            # large get_free_block calls: 1
    a.malloc(30 * MiB)                # 2
    a.free(x)                         # cached with age base 2
    a.malloc(40 * MiB)                # call 3, no fit; GC: 60 > 50, x's age 1 >= average 1 -> released
    assert a.num_alloc_retries == 0
    assert events(a) == [("segment_alloc", 30 * MiB)] * 2 + [("segment_free", 30 * MiB), ("segment_alloc", 40 * MiB)]
    # below the threshold (60 MiB <= 0.5 * 200 MiB) nothing is collected
    c = CachingAllocator("garbage_collection_threshold:0.5", memory_limit=200 * MiB)
    z = c.malloc(30 * MiB)
    c.malloc(30 * MiB)
    c.free(z)
    c.malloc(40 * MiB)
    assert c.total_reserved == 100 * MiB
    # a capacity alone is not a memory fraction: GC stays off, as in PyTorch
    b = CachingAllocator("garbage_collection_threshold:0.5", capacity=100 * MiB)
    y = b.malloc(30 * MiB)
    b.malloc(30 * MiB)
    b.free(y)
    b.malloc(40 * MiB)
    assert b.total_reserved == 100 * MiB


# --- replay API ------------------------------------------------------------------------------------------

def test_replay_reports_peaks_and_fragmentation_at_the_reserved_peak():
    r = replay_allocations([("alloc", "a", 4096), ("alloc", "b", 9 * MiB), ("free", "a"), ("free", "b")])
    # peak reserved after event 1: 2 MiB small + 20 MiB large; allocated then 4096 + 9 MiB
    assert r.peak_reserved_bytes == 22 * MiB and r.peak_reserved_index == 1
    assert r.fragmentation_bytes == 22 * MiB - 4096 - 9 * MiB
    assert r.largest_free_block_bytes == 11 * MiB
    assert r.allocated_bytes == 0 and r.reserved_bytes == 22 * MiB and r.segments == 2
    assert r.to_dict()["peak_allocated_bytes"] == 4096 + 9 * MiB


@pytest.mark.parametrize("bad, message", [
    ([("free", "x")], "free of 'x'"),
    ([("alloc", "x", 10), ("alloc", "x", 10)], "allocated twice"),
    ([("alloc", "x", -1)], "not a byte count"),
    ([("resize", "x")], "unknown action"),
])
def test_replay_rejects_bad_events(bad, message):
    with pytest.raises(UsageError, match=message):
        replay_allocations(bad)


def test_replay_accepts_a_conf_object_and_streams():
    conf = AllocConf.parse("expandable_segments:True")
    r = replay_allocations([("alloc", "a", 4096, 1), ("alloc", "b", 4096, 2)], conf)
    assert r.reserved_bytes == 4 * MiB      # one 2 MiB page per stream's small pool


def test_fragmentation_is_taken_where_the_most_is_allocated_at_the_reserved_peak():
    """A 40 MiB request that finds only a cached 30 MiB block reserves a new segment: reserved
    peaks at 70 MiB with 40 MiB allocated. The 30 MiB request after it is served from the cache,
    so at that same peak 70 MiB are allocated: no byte of the peak is unused then
    (docs/allocator.md#fragmentation-at-the-peak; taken at the peak's first moment it was 30 MiB)."""
    from vramplan.cuda._reserved import replay_stream

    events = [("alloc", "a", 30 * MiB), ("free", "a"), ("alloc", "b", 40 * MiB), ("alloc", "c", 30 * MiB)]
    for r in (replay_allocations(events), replay_stream(events), replay_stream(events, lump_small=True)):
        assert (r.peak_reserved_bytes, r.fragmentation_bytes) == (70 * MiB, 0)
    before_c = replay_allocations(events[:3])
    assert (before_c.peak_reserved_bytes, before_c.fragmentation_bytes) == (70 * MiB, 30 * MiB)


def test_a_small_pool_growth_counts_its_high_mark_beside_its_new_segments():
    """The lumped small pool: a growth's high mark needed the segments it adds, so it is counted at
    the peak after them. Counted beside the reserved bytes before them, the fragmentation of this
    replay, which runs out of memory growing the small pool, came out negative (-49 MiB)."""
    from vramplan.cuda._reserved import replay_stream

    events = [("alloc", 0, 20 * MiB)] + [("alloc", k, MiB) for k in range(1, 51)]
    for lump in (True, False):
        r = replay_stream(events, "", 30 * MiB, lump_small=lump)
        assert r.oom is not None and r.fragmentation_bytes == 0
