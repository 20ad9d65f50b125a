"""The plain replay (cuda/_replay.py `_replay_plain`) against the general one (a CachingAllocator
driven event by event): the same AllocatorReplay, field for field, on real allocation histories and
on random streams with several streams, cache releases, OOMs and bad events. Both implement
docs/allocator.md#rules; the general one is itself checked against PyTorch's own GPU tests and
real snapshots (tests/test_allocator_reference.py), so agreement here carries that over."""
import json
import random
from pathlib import Path

import pytest

from vramplan import replay_allocations
from vramplan.core._errors import UsageError
from vramplan.cuda._alloc_conf import as_conf
from vramplan.cuda._allocator import CachingAllocator
from vramplan.cuda._replay import _replay_plain, plain, run_replay

DATA = Path(__file__).parent / "data" / "allocator"
MiB, GiB = 2**20, 2**30


def general(events, conf="", capacity=None):
    return run_replay(CachingAllocator(conf, capacity=capacity), events)


def fast(events, conf="", capacity=None):
    return _replay_plain(events, as_conf(conf), capacity)


def trace_events(path: Path) -> list[tuple]:
    """A recorded history's alloc/free ops, without frees of blocks allocated before it started."""
    ops, seen = json.loads(path.read_text())["ops"], set()
    out = []
    for op in ops:
        if op[0] == "alloc":
            seen.add(op[1])
        elif op[0] == "free" and op[1] not in seen:
            continue
        out.append(tuple(op))
    return out


HISTORIES = sorted((DATA / "traces").glob("*.json")) + [DATA / "zdevito_resnet18_trainstep_ops.json"]


@pytest.mark.parametrize("path", HISTORIES, ids=lambda p: p.stem)
def test_real_histories_unlimited_and_against_a_small_card(path):
    events = trace_events(path)
    unlimited = general(events)
    assert fast(events) == unlimited
    # a card with room for about two thirds of the peak: cache releases, retries and an OOM
    capacity = unlimited.peak_reserved_bytes * 2 // 3
    tight = general(events, capacity=capacity)
    assert fast(events, capacity=capacity) == tight
    assert tight.num_alloc_retries > 0 or tight.oom is not None


def random_stream(rng: random.Random, n: int) -> list[tuple]:
    sizes = [rng.choice([1, 511, 512, 513, 4096, MiB - 1, MiB, MiB + 1, 2 * MiB, 9 * MiB, 10 * MiB,
                         10 * MiB + 1, 21 * MiB, 64 * MiB]) for _ in range(40)] + [rng.randrange(1, 80 * MiB)
                                                                                   for _ in range(40)]
    live, events, key = [], [], 0
    for _ in range(n):
        r = rng.random()
        if r < 0.5 or not live:
            stream = rng.choice([(), (), (), (0,), (1,), ("side",)])
            events.append(("alloc", key, rng.choice(sizes) if rng.random() < 0.95 else 0, *stream))
            live.append(key)
            key += 1
        elif r < 0.98:
            events.append(("free", live.pop(rng.randrange(len(live)))))
        else:
            events.append(("empty_cache",))
    return events


@pytest.mark.parametrize("seed", range(12))
def test_random_streams(seed):
    rng = random.Random(seed)
    events = random_stream(rng, 3000)
    unlimited = general(events)
    assert fast(events) == unlimited
    for fraction in (0.9, 0.6, 0.3):
        capacity = int(unlimited.peak_reserved_bytes * fraction)
        assert fast(events, capacity=capacity) == general(events, capacity=capacity)


def test_public_api_takes_the_plain_replay_only_where_it_applies():
    assert plain(as_conf("")) and plain(as_conf("garbage_collection_threshold:0.6"))
    for conf in ("expandable_segments:True", "max_split_size_mb:128", "roundup_power2_divisions:4"):
        assert not plain(as_conf(conf))
    events = random_stream(random.Random(99), 2000)
    for conf in ("", "expandable_segments:True", "max_split_size_mb:128", "roundup_power2_divisions:4"):
        assert replay_allocations(events, conf) == general(events, conf)


@pytest.mark.parametrize("bad, message", [
    ([("alloc", "a", 10), ("alloc", "a", 10)], "event 1: key 'a' is allocated twice"),
    ([("free", "a")], "event 0: free of 'a', which is not allocated"),
    ([("alloc", "a", -1)], "event 0: size -1 is not a byte count"),
    ([("alloc", "a", 1.5)], "event 0: size 1.5 is not a byte count"),
    ([("resize", "a")], "event 0: unknown action 'resize'"),
])
def test_bad_events_give_the_same_error_from_both(bad, message):
    for run in (general, fast):
        with pytest.raises(UsageError, match=message):
            run(bad)


def test_an_exabyte_request_is_an_oom_in_both():
    events = [("alloc", "a", 4096), ("alloc", "b", 2**60)]
    assert fast(events) == general(events)
    assert fast(events).oom["key"] == "b"


def test_an_int_subclass_size_is_its_value_in_both():
    """A size that is an int subclass (an IntEnum here) is a byte count like any int: the plain
    loop's size cache keys on exact ints, and a subclass must still allocate, not fail."""
    import enum

    class Size(enum.IntEnum):
        THREE_MIB = 3 * MiB
        HALF_KIB = 512

    events = [("alloc", "a", Size.THREE_MIB), ("alloc", "b", Size.HALF_KIB), ("free", "a"),
              ("alloc", "c", 3 * MiB)]
    assert fast(events) == general(events)
    assert fast(events).oom is None
    # a (3 MiB, large pool) and b (512 B, small pool) are live together; c reuses a's block
    assert fast(events).peak_allocated_bytes == 3 * MiB + 512


def test_reserving_past_a_64_bit_address_space_is_refused():
    # 2**59 bytes each (under the 1 EB a single allocation may ask for): the 32nd segment passes
    # 2**64, where the free lists' packed keys would mix sizes into addresses
    with pytest.raises(UsageError, match=r"would reserve more than 2\*\*64 bytes"):
        replay_allocations([("alloc", i, 1 << 59) for i in range(32)])
    assert replay_allocations([("alloc", i, 1 << 59) for i in range(20)]).peak_reserved_bytes == 20 << 59
