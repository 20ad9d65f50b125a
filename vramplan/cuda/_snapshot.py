"""Real allocator histories: read a `torch.cuda.memory._dump_snapshot` pickle (or its JSON trace
form), replay it through the model, and check the model against what the real allocator did.

A snapshot pickle is a dict of plain data (torch/cuda/memory.py: `_snapshot`): `segments` (the
state at dump time: address, total_size, stream, segment_type, blocks with address, size,
requested_size, state), `device_traces` (per device, the recorded events: action in alloc,
free_requested, free_completed, segment_alloc, segment_free, segment_map, segment_unmap, oom,
snapshot; addr, size, stream) and `allocator_settings`. It is loaded by an unpickler that refuses
every global, so a crafted file cannot run code.

The trace form (`initial_segments`, `ops`, `expected`, `allocator_settings`) is what replay and
check consume; docs/allocator.md describes it and how the starting state is rebuilt.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import zlib
from bisect import bisect_left, insort
from dataclasses import asdict

from vramplan.core._errors import UsageError
from vramplan.core._record import record
from vramplan.cuda._alloc_conf import AllocConf
from vramplan.cuda._allocator import SMALL_BUFFER, CachingAllocator, OutOfMemory, round_size
from vramplan.cuda._replay import allocated_twice, not_allocated, run_replay

MAX_FILE_BYTES = 2 * 2**30        # larger files are refused rather than read into memory
# Recorded events (or trace ops) replayed at most: 14x the largest profiles/ snapshot (142,187
# entries). Each costs about 0.7 KB once converted and replayed, so a small file whose entries
# repeat one memoized object cannot make the replay take gigabytes.
MAX_TRACE_EVENTS = 2_000_000
BYTES_LIMIT = 2**64               # addresses and sizes are a size_t / void* (c10/cuda/CUDACachingAllocator.cpp)
STREAM_LOW = -(2**63)             # a cudaStream_t as torch records it: an int64 or a pointer value
_HINT_ENTRIES = "record fewer entries (_record_memory_history(max_entries=...))"
GZIP_MAGIC = b"\x1f\x8b"
UTF8_BOM = b"\xef\xbb\xbf"       # editors on Windows save JSON with it; no pickle opcode is 0xef
_HINT_FILE = "give a file written by torch.cuda.memory._dump_snapshot, or a JSON trace"
_TRACE_ACTIONS = {"alloc", "free_requested", "free_completed", "free", "segment_alloc", "segment_free",
                  "segment_map", "segment_unmap", "oom", "snapshot"}


class _PlainDataUnpickler(pickle.Unpickler):
    """Snapshots are dicts, lists, tuples, strings and numbers: any global is refused."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refers to {module}.{name}")

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("uses a persistent id")


# --- reading -----------------------------------------------------------------------------------------

def load_trace(path: str, *, max_bytes: int = MAX_FILE_BYTES, device: int | None = None) -> dict:
    """A snapshot pickle, a snapshot in JSON, or a JSON trace, as a trace dict."""
    name = os.fspath(path)
    try:
        size = os.path.getsize(name)
        if size > max_bytes:
            raise UsageError(f"{name}: {size:,} bytes is larger than the {max_bytes:,}-byte limit",
                             hint="record fewer entries (_record_memory_history(max_entries=...))")
        with open(name, "rb") as f:
            data = f.read()
    except UsageError:
        raise
    except OSError as exc:
        raise UsageError(f"cannot read {name}: {exc.strerror or exc}", hint="check the path") from None
    if data[:2] == GZIP_MAGIC:
        data = _gunzip(data, name, max_bytes)
    return parse_trace_bytes(data, name, device=device)


def _gunzip(data: bytes, name: str, max_bytes: int) -> bytes:
    """A gzipped snapshot (how profiles/ keeps them), inflated to at most max_bytes: a small file
    that would inflate past the limit is refused before it fills memory."""
    inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)   # gzip header and trailer
    try:
        out = inflate.decompress(data, max_bytes + 1)
        if len(out) > max_bytes or inflate.unconsumed_tail:
            raise UsageError(f"{name}: inflates past the {max_bytes:,}-byte limit",
                             hint="record fewer entries (_record_memory_history(max_entries=...))")
        out += inflate.flush()
    except zlib.error as exc:
        raise UsageError(f"{name}: not a readable gzip file ({_one_line(exc)})", hint=_HINT_FILE) from None
    if not inflate.eof:
        raise UsageError(f"{name}: the gzip file is truncated", hint=_HINT_FILE)
    return out


def parse_trace_bytes(data: bytes, name: str = "<bytes>", *, device: int | None = None) -> dict:
    text = data[len(UTF8_BOM):] if data.startswith(UTF8_BOM) else data
    if text.lstrip()[:1] in (b"{", b"["):
        data = text                     # json.loads refuses a BOM ("Unexpected UTF-8 BOM")
        try:
            obj = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise UsageError(f"{name}: not valid JSON ({_one_line(exc)})", hint=_HINT_FILE) from None
        except RecursionError:
            raise UsageError(f"{name}: the JSON nests too deeply", hint=_HINT_FILE) from None
    else:
        obj = _unpickle(data, name)
    if isinstance(obj, dict) and "ops" in obj:
        held = obj.get("device", 0)
        if device is not None and device != held:
            raise UsageError(f"{name}: the trace holds device {held!r} only, not device {device}",
                             hint="drop --device for a trace; it names one device of a snapshot")
        return validate_trace(obj, name)
    return validate_trace(snapshot_to_trace(obj, name, device=device), name)


def _unpickle(data: bytes, name: str):
    if not data:
        raise UsageError(f"{name}: the file is empty", hint=_HINT_FILE)
    try:
        return _PlainDataUnpickler(io.BytesIO(data)).load()
    except pickle.UnpicklingError as exc:
        message = _one_line(exc)
        if message.startswith(("refers to", "uses a persistent")):
            raise UsageError(f"{name}: refused, the pickle {message} (a memory snapshot holds only plain data)",
                             hint="only load snapshots you trust; this one was not executed") from None
        if "truncated" in message:
            raise UsageError(f"{name}: the pickle is truncated", hint=_HINT_FILE) from None
        raise UsageError(f"{name}: not a readable pickle ({message})", hint=_HINT_FILE) from None
    except EOFError:
        raise UsageError(f"{name}: the pickle is truncated", hint=_HINT_FILE) from None
    except RecursionError:
        raise UsageError(f"{name}: the pickle nests too deeply", hint=_HINT_FILE) from None
    except MemoryError:
        raise UsageError(f"{name}: the pickle needs more memory than is available", hint=_HINT_FILE) from None
    except Exception as exc:     # a corrupt stream raises ValueError, KeyError, IndexError, TypeError, ...
        raise UsageError(f"{name}: not a readable pickle ({type(exc).__name__}: {_one_line(exc)})",
                         hint=_HINT_FILE) from None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:200] if text else type(exc).__name__


def _fail(name: str, what: str):
    raise UsageError(f"{name}: not a memory snapshot: {what}", hint=_HINT_FILE)


def _int(value, name: str, where: str, low: int = 0, high: int = BYTES_LIMIT) -> int:
    """An int in [low, high): addresses and byte counts are size_t values, so a negative one or
    one of thousands of digits is not a recording."""
    if isinstance(value, bool) or not isinstance(value, int):
        _fail(name, f"{where} is {type(value).__name__}, not an int")
    if not low <= value < high:
        _fail(name, f"{where} is out of range for {'a stream' if low < 0 else 'an address or byte count'}")
    return value


def _span(address: int, size: int, name: str, where: str) -> None:
    """[address, address + size) within the 64-bit address space: a segment or segment event that
    runs past 2**64 names memory no device has (and wraps the allocator model's block ends)."""
    if address + size > BYTES_LIMIT:
        _fail(name, f"{where} at {address:#x} of {size:,} bytes ends past the 64-bit address space")


def _stream(value, name: str, where: str) -> int:
    """A stream id is an int: anything else would reach a dict key (a deeply nested tuple there
    overflows the C stack when hashed)."""
    return _int(value, name, where, STREAM_LOW, BYTES_LIMIT)


def _ident(value, name: str, where: str):
    """A block id of a trace: a string or an int (it becomes a dict key)."""
    if isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    _fail(name, f"{where} is {type(value).__name__}, not a string or an int id")


# --- snapshot -> trace -----------------------------------------------------------------------------------

def snapshot_to_trace(snapshot, name: str = "<snapshot>", *, device: int | None = None) -> dict:
    """Convert a `_snapshot()` dict into the trace form. The starting state is rebuilt from the
    final `segments` by undoing the recorded events; a block allocated before recording and freed
    during it gets the size round_size(request). A run of segment_free / segment_unmap events
    becomes an `empty_cache` op (the trace cannot tell empty_cache from malloc's release path)."""
    if not isinstance(snapshot, dict):
        _fail(name, f"the top level is {type(snapshot).__name__}, not a dict")
    segments, traces = snapshot.get("segments"), snapshot.get("device_traces")
    if not isinstance(segments, list) or not isinstance(traces, list):
        _fail(name, "no 'segments' and 'device_traces' lists")
    if not all(isinstance(t, list) for t in traces):
        _fail(name, "'device_traces' must be a list of lists")
    if not traces:
        raise UsageError(f"{name}: the snapshot holds no recorded history ('device_traces' is empty)",
                         hint="call torch.cuda.memory._record_memory_history() before the step, then dump")
    if device is None:
        device = next((i for i, t in enumerate(traces) if t), 0)
    elif device >= len(traces):
        raise UsageError(f"{name}: no device {device} (the snapshot has {len(traces)})",
                         hint="leave --device out, or give --device 0" if len(traces) == 1
                         else f"give --device 0 to {len(traces) - 1}")
    entries = traces[device]
    if len(entries) > MAX_TRACE_EVENTS:
        raise UsageError(f"{name}: {len(entries):,} recorded events, more than the {MAX_TRACE_EVENTS:,} replayed",
                         hint=_HINT_ENTRIES)
    if len({id(e) for e in entries}) != len(entries):
        _fail(name, f"device_traces[{device}] repeats one entry object (a recording makes each anew)")
    settings = snapshot.get("allocator_settings") or {}
    if not isinstance(settings, dict):
        _fail(name, "'allocator_settings' is not a dict")
    conf = AllocConf.from_snapshot_settings(settings) if settings else AllocConf()
    if not all(isinstance(s, dict) for s in segments):
        _fail(name, "a segment is not a dict")
    final = [_final_segment(s, i, name) for i, s in enumerate(segments) if s.get("device", device) == device]
    spans = sorted((s["address"], s["address"] + s["total_size"]) for s in final)
    for (a, a_end), (b, _b_end) in zip(spans, spans[1:]):
        if b < a_end:
            _fail(name, f"segments at {a:#x} and {b:#x} overlap")
    if any(s["pool"] not in ((0, 0), None) for s in final):
        raise UsageError(f"{name}: the snapshot has CUDA graph / MemPool private pool segments",
                         hint="the model replays the default pool only")
    ops, alloc_addr, seg_events = [], [], []
    seg_where: list[str] = []          # device_traces[d][k] of each segment event, for errors
    live: dict[int, str] = {}          # address -> id of blocks allocated during the trace
    prefreed: list[dict] = []          # blocks allocated before recording, freed during it
    touched: set[int] = set()          # addresses the trace allocates or frees
    releasing = False
    recorded_ooms = 0
    for k, e in enumerate(entries):
        if not isinstance(e, dict) or not isinstance(e.get("action"), str):
            _fail(name, f"device_traces[{device}][{k}] is not a trace entry")
        action = e["action"]
        if action not in _TRACE_ACTIONS:
            continue                   # newer torch may add actions; none of them moves memory
        if action == "oom":
            recorded_ooms += 1
            continue
        if action in ("snapshot", "free_requested"):
            continue
        where = f"device_traces[{device}][{k}]"
        addr = _int(e.get("addr"), name, where + ".addr")
        size = _int(e.get("size"), name, where + ".size")
        stream = _stream(e.get("stream", 0), name, where + ".stream")
        if action == "alloc":
            releasing = False
            ident = f"a{len(alloc_addr)}"
            ops.append(["alloc", ident, size, stream])
            alloc_addr.append(addr)
            live[addr] = ident
            touched.add(addr)
        elif action in ("free_completed", "free"):
            releasing = False
            touched.add(addr)
            if addr in live:
                ops.append(["free", live.pop(addr)])
            else:
                ident = f"p{len(prefreed)}"
                prefreed.append({"id": ident, "address": addr, "requested_size": size, "stream": stream})
                ops.append(["free", ident])
        else:
            if action in ("segment_free", "segment_unmap") and not releasing:
                ops.append(["empty_cache"])
                releasing = True
            if size <= 0:       # cudaMalloc / cuMemMap of nothing makes no segment event
                _fail(name, f"{where} {action} of {size:,} bytes at {addr:#x}: a segment event maps or frees memory")
            _span(addr, size, name, where)
            before = len(ops) - 1 if action in ("segment_free", "segment_unmap") else len(ops)
            seg_events.append({"before_op": before, "action": action, "addr": addr, "size": size,
                               "stream": stream})
            seg_where.append(where)
    initial, dropped = _initial_segments(final, seg_events, prefreed, touched, conf, name, seg_where)
    final_reserved = sum(s["total_size"] for s in final)
    trace_reserved = _reserved_at_end(initial, seg_events)
    return {"source": name, "version_hint": "converted from a torch.cuda.memory._snapshot dict",
            "allocator_settings": settings, "device": device,
            "initial_segments": initial, "ops": ops,
            "expected": {"alloc_addr": alloc_addr, "segment_events": seg_events,
                         "final_reserved_bytes_from_trace": trace_reserved,
                         "final_snapshot_reserved_bytes": final_reserved,
                         "snapshot_matches_trace_end": trace_reserved == final_reserved},
            "n_prefreed_blocks": len(prefreed), "n_dropped_blocks": dropped,
            "recorded_ooms": recorded_ooms}


def _final_segment(seg: dict, i: int, name: str) -> dict:
    where = f"segments[{i}]"
    address = _int(seg.get("address"), name, where + ".address")
    total = _int(seg.get("total_size"), name, where + ".total_size")
    _span(address, total, name, where)
    blocks = seg.get("blocks", [])
    if not isinstance(blocks, list):
        _fail(name, where + ".blocks is not a list")
    live = []
    for j, b in enumerate(blocks):
        if not isinstance(b, dict):
            _fail(name, f"{where}.blocks[{j}] is not a dict")
        size = _int(b.get("size"), name, f"{where}.blocks[{j}].size")
        if b.get("state", "inactive") != "inactive":      # active_allocated or active_awaiting_free
            block_addr = _int(b.get("address"), name, f"{where}.blocks[{j}].address")
            requested = b.get("requested_size", size)
            live.append({"address": block_addr, "size": size,
                         "requested_size": requested if isinstance(requested, int) else size})
    pool = seg.get("segment_pool_id")
    if isinstance(pool, (list, tuple)):
        pool = tuple(_int(p, name, f"{where}.segment_pool_id", STREAM_LOW) for p in pool)
    return {"address": address, "total_size": total, "stream": _stream(seg.get("stream", 0), name, where + ".stream"),
            "segment_type": seg.get("segment_type", "small" if total == SMALL_BUFFER else "large"),
            "expandable": bool(seg.get("is_expandable", False)),
            "pool": pool if isinstance(pool, tuple) else None, "live": live}


def _initial_segments(final: list[dict], seg_events: list[dict], prefreed: list[dict], touched: set,
                      conf: AllocConf, name: str = "<snapshot>",
                      seg_where: list[str] | None = None) -> tuple[list[dict], int]:
    """Undo the segment events on the final segments, then place the blocks that were live when
    recording began: final blocks the trace never touched, and the blocks it freed without having
    allocated them. Returns the segments and how many blocks fit no starting segment.

    Undone last to first, `ranges` is the memory mapped just after each event: what a
    segment_free / segment_unmap released is unmapped then, so a range that overlaps a mapped
    one (freed twice, or a release of memory that stays in use) is not a recording
    (cudaFree / cuMemUnmap of the whole range, c10/cuda/CUDACachingAllocator.cpp release_block /
    unmap_block)."""
    mapped = _Mapped(final)
    for k in range(len(seg_events) - 1, -1, -1):
        ev = seg_events[k]
        a, size = ev["addr"], ev["size"]
        if ev["action"] in ("segment_alloc", "segment_map"):
            mapped.remove(a, size)
        else:
            clash = mapped.overlapping(a, size)
            if clash is not None:
                where = seg_where[k] if seg_where else f"segment event {k}"
                _fail(name, f"{where} {ev['action']} of {size:,} bytes at {a:#x} overlaps the segment at "
                            f"{clash['address']:#x} of {clash['total_size']:,} bytes, still mapped after it")
            small = size == SMALL_BUFFER if ev["action"] == "segment_free" else None
            mapped.add({"address": a, "total_size": size, "stream": ev["stream"],
                        "segment_type": "small" if small else "large",
                        "expandable": ev["action"] == "segment_unmap", "live": []})
    ranges, starts = mapped.ranges, mapped.sorted_starts()
    blocks = [dict(b, id=f"q{i}", inferred=False) for i, b in
              enumerate(b for s in final for b in s["live"] if b["address"] not in touched)]
    blocks += [{"id": p["id"], "address": p["address"], "size": round_size(p["requested_size"], conf),
                "requested_size": p["requested_size"], "inferred": True} for p in prefreed]
    placed: dict[int, list] = {a: [] for a in starts}
    dropped = 0
    for b in blocks:
        seg = _containing(ranges, starts, b["address"])
        if seg is None:
            dropped += 1
        else:
            placed[seg["address"]].append(b)
    out = []
    for a in starts:
        s = ranges[a]
        out.append({"address": a, "stream": s["stream"], "segment_type": s["segment_type"],
                    "total_size": s["total_size"], "expandable": s["expandable"],
                    "blocks": _tile(s, placed[a])})
    return out, dropped


class _Starts:
    """Sorted ints in chunks of at most 2 * CHUNK: adding, removing and finding the predecessor
    cost a search and a short shift, where one sorted list shifts all of it (a crafted snapshot of
    200,000 segment events took 13 s that way, its 2,000,000 about twenty minutes)."""
    CHUNK = 256

    def __init__(self, values):
        values = sorted(values)
        self.chunks = [values[i:i + self.CHUNK] for i in range(0, len(values), self.CHUNK)]
        self.maxes = [c[-1] for c in self.chunks]

    def add(self, value: int) -> None:
        if not self.chunks:
            self.chunks, self.maxes = [[value]], [value]
            return
        i = min(bisect_left(self.maxes, value), len(self.chunks) - 1)
        chunk = self.chunks[i]
        insort(chunk, value)
        self.maxes[i] = chunk[-1]
        if len(chunk) > 2 * self.CHUNK:
            half = self.CHUNK
            self.chunks[i:i + 1] = [chunk[:half], chunk[half:]]
            self.maxes[i:i + 1] = [chunk[half - 1], chunk[-1]]

    def remove(self, value: int) -> None:
        i = bisect_left(self.maxes, value)
        chunk = self.chunks[i]
        del chunk[bisect_left(chunk, value)]
        if chunk:
            self.maxes[i] = chunk[-1]
        else:
            del self.chunks[i], self.maxes[i]

    def before(self, value: int) -> int | None:
        """The largest value below `value`, or None."""
        i = bisect_left(self.maxes, value)      # the first chunk holding one >= value
        if i < len(self.chunks):
            chunk = self.chunks[i]
            j = bisect_left(chunk, value)
            if j:
                return chunk[j - 1]
        return self.maxes[i - 1] if i else None

    def __iter__(self):
        for chunk in self.chunks:
            yield from chunk


class _Mapped:
    """The mapped ranges while the segment events are undone, by start address (_Starts keeps
    the starts in order), so that each event costs a search, not a pass over every range. The
    ranges never overlap (validate_trace checks the final segments; a release that would overlap
    is refused)."""

    def __init__(self, final: list[dict]):
        self.ranges = {s["address"]: dict(s) for s in final}
        self.starts = _Starts(self.ranges)
        self.coalesced = False

    def sorted_starts(self) -> list[int]:
        return list(self.starts)

    def overlapping(self, addr: int, size: int) -> dict | None:
        """A mapped range that shares a byte with [addr, addr + size), or None: the last one
        starting before its end is the only candidate, as the ranges are disjoint."""
        start = self.starts.before(addr + size)
        if start is None:
            return None
        seg = self.ranges[start]
        return seg if addr < start + seg["total_size"] else None

    def remove(self, addr: int, size: int) -> None:
        """Take [addr, addr + size) out (a whole segment, or pages of one)."""
        end = addr + size
        start = self.starts.before(end)
        while start is not None:
            seg = self.ranges[start]
            seg_end = start + seg["total_size"]
            if seg_end <= addr:
                break
            self._drop(start)
            if start < addr:
                self._put(dict(seg, total_size=addr - start))
            if seg_end > end:
                self._put(dict(seg, address=end, total_size=seg_end - end))
            start = self.starts.before(start)

    def add(self, seg: dict) -> None:
        """A released range mapped again, merged with adjacent expandable ranges of its stream:
        one snapshot segment. The first time, every range is merged so (the final segments as
        the snapshot lists them); after that only the new range can have such a neighbour."""
        self._put(seg)
        if not self.coalesced:
            self.coalesced = True
            for start in list(self.starts):
                if start in self.ranges:
                    self._merge_after(start)
            return
        before = self.starts.before(seg["address"])
        if before is not None and before + self.ranges[before]["total_size"] == seg["address"]:
            self._merge_after(before)
        if seg["address"] in self.ranges:
            self._merge_after(seg["address"])

    def _merge_after(self, start: int) -> None:
        """Adjacent expandable ranges of one stream are one snapshot segment."""
        seg = self.ranges[start]
        if not seg["expandable"]:
            return
        nxt = self.ranges.get(start + seg["total_size"])
        while nxt is not None and nxt["expandable"] and nxt["stream"] == seg["stream"]:
            self._drop(nxt["address"])
            seg["total_size"] += nxt["total_size"]
            nxt = self.ranges.get(start + seg["total_size"])

    def _put(self, seg: dict) -> None:
        self.starts.add(seg["address"])
        self.ranges[seg["address"]] = seg

    def _drop(self, start: int) -> None:
        self.starts.remove(start)
        del self.ranges[start]


def _containing(ranges: dict, starts: list[int], addr: int) -> dict | None:
    from bisect import bisect_right

    i = bisect_right(starts, addr) - 1
    if i < 0:
        return None
    seg = ranges[starts[i]]
    return seg if addr < seg["address"] + seg["total_size"] else None


def _tile(seg: dict, blocks: list[dict]) -> list[dict]:
    """Blocks in offset order with the gaps free. An inferred size that would overlap the next
    block is cut short (round_size(request) can only underestimate a block that was split)."""
    out, offset, end = [], 0, seg["total_size"]
    blocks = sorted(blocks, key=lambda b: b["address"])
    for i, b in enumerate(blocks):
        start = b["address"] - seg["address"]
        if start < offset:
            continue                   # overlaps the previous block: not a consistent state
        limit = (blocks[i + 1]["address"] - seg["address"]) if i + 1 < len(blocks) else end
        size = min(b["size"], limit - start)
        if start > offset:
            out.append({"offset": offset, "size": start - offset, "allocated": False})
        out.append({"offset": start, "size": size, "allocated": True, "requested_size": b["requested_size"],
                    "id": b["id"], "inferred_size": b["inferred"]})
        offset = start + size
    if offset < end:
        out.append({"offset": offset, "size": end - offset, "allocated": False})
    return out


def _reserved_at_end(initial: list[dict], seg_events: list[dict]) -> int:
    total = sum(s["total_size"] for s in initial)
    for ev in seg_events:
        total += ev["size"] if ev["action"] in ("segment_alloc", "segment_map") else -ev["size"]
    return total


# --- trace validation ----------------------------------------------------------------------------------

def validate_trace(trace, name: str = "<trace>") -> dict:
    """Check everything replay and check read, so that a malformed or crafted trace (a JSON
    trace, a pickle in the trace form, or a converted snapshot) fails with a one-line message,
    never a traceback: op shapes and ids, byte counts and streams in range, segments that do
    not overlap and blocks that tile them, and the `expected` record of what the real allocator
    did."""
    if not isinstance(trace, dict):
        _fail(name, "a trace must be a JSON object")
    ops = trace.get("ops")
    if not isinstance(ops, list):
        _fail(name, "'ops' is not a list")
    if len(ops) > MAX_TRACE_EVENTS:
        raise UsageError(f"{name}: {len(ops):,} ops, more than the {MAX_TRACE_EVENTS:,} replayed", hint=_HINT_ENTRIES)
    for i, op in enumerate(ops):
        _check_op(op, name, i)
    initial = trace.get("initial_segments", [])
    if not isinstance(initial, list):
        _fail(name, "'initial_segments' is not a list")
    ids: set = set()
    for i, seg in enumerate(initial):
        _check_segment(seg, name, f"initial_segments[{i}]", ids)
    ends = sorted((seg["address"], seg["address"] + seg["total_size"]) for seg in initial)
    for (a, a_end), (b, _b_end) in zip(ends, ends[1:]):
        if b < a_end:
            _fail(name, f"initial segments at {a:#x} and {b:#x} overlap")
    _check_expected(trace.get("expected", {}), name)
    settings = trace.get("allocator_settings", {})
    if not isinstance(settings, dict):
        _fail(name, "'allocator_settings' is not an object")
    if settings:
        AllocConf.from_snapshot_settings(settings)      # refuses values the allocator would refuse
    _int(trace.get("recorded_ooms", 0) or 0, name, "recorded_ooms")
    return trace


def _check_op(op, name: str, i: int) -> None:
    ok = isinstance(op, (list, tuple)) and op and isinstance(op[0], str)
    if ok and op[0] == "alloc":
        ok = len(op) in (3, 4)
        if ok:
            _ident(op[1], name, f"ops[{i}] id")
            _int(op[2], name, f"ops[{i}] bytes")
            if len(op) == 4:
                _stream(op[3], name, f"ops[{i}] stream")
    elif ok and op[0] == "free":
        ok = len(op) == 2 and _ident(op[1], name, f"ops[{i}] id") is not None
    elif ok:
        ok = list(op) == ["empty_cache"]
    if not ok:
        _fail(name, f"ops[{i}] is not ['alloc', id, bytes, stream], ['free', id] or ['empty_cache']")


def _check_segment(seg, name: str, where: str, ids: set) -> None:
    if not isinstance(seg, dict) or not isinstance(seg.get("blocks"), list):
        _fail(name, f"{where} has no blocks")
    address = _int(seg.get("address"), name, f"{where}.address")
    total = _int(seg.get("total_size"), name, f"{where}.total_size")
    if total == 0:
        _fail(name, f"{where}.total_size is 0")
    _span(address, total, name, where)
    _stream(seg.get("stream", 0), name, f"{where}.stream")
    if seg.get("segment_type", "large") not in ("small", "large"):
        _fail(name, f"{where}.segment_type is neither 'small' nor 'large'")
    if not isinstance(seg.get("expandable", False), bool):
        _fail(name, f"{where}.expandable is not true or false")
    for j, b in enumerate(seg["blocks"]):
        at = f"{where}.blocks[{j}]"
        if not isinstance(b, dict):
            _fail(name, f"{at} is not an object")
        for key in ("offset", "size"):
            _int(b.get(key), name, f"{at}.{key}")
        if not isinstance(b.get("allocated", False), bool):
            _fail(name, f"{at}.allocated is not true or false")
        if b.get("allocated"):
            _int(b.get("requested_size", b["size"]), name, f"{at}.requested_size")
            if "id" in b:
                ident = _ident(b["id"], name, f"{at}.id")
                if ident in ids:
                    _fail(name, f"{at}.id {ident!r} is a second block with that id")
                ids.add(ident)


def _check_expected(expected, name: str) -> None:
    """What the real allocator did, as --check compares it: each allocation's address, each
    segment event, the reserved bytes at the end."""
    if not isinstance(expected, dict):
        _fail(name, "'expected' is not an object")
    addresses = expected.get("alloc_addr", [])
    if not isinstance(addresses, list):
        _fail(name, "expected.alloc_addr is not a list")
    for k, a in enumerate(addresses):
        _int(a, name, f"expected.alloc_addr[{k}]")
    events = expected.get("segment_events", [])
    if not isinstance(events, list):
        _fail(name, "expected.segment_events is not a list")
    for k, e in enumerate(events):
        at = f"expected.segment_events[{k}]"
        if not isinstance(e, dict) or not isinstance(e.get("action"), str):
            _fail(name, f"{at} has no action")
        _int(e.get("addr"), name, f"{at}.addr")
        _int(e.get("size"), name, f"{at}.size", 1)    # a segment event maps or frees memory
        _span(e["addr"], e["size"], name, at)     # --check places new segments at these addresses
        _int(e.get("before_op"), name, f"{at}.before_op", -1)
    final = expected.get("final_reserved_bytes_from_trace")
    if final is not None:
        _int(final, name, "expected.final_reserved_bytes_from_trace")


# --- replay and check ------------------------------------------------------------------------------------

def recorded_conf(trace: dict) -> AllocConf:
    settings = trace.get("allocator_settings") or {}
    return AllocConf.from_snapshot_settings(settings) if settings else AllocConf()


def _events(trace: dict):
    return [tuple(op) for op in trace["ops"]]


@record
class SnapshotReplay:
    """A recorded history replayed through the model under `alloc_conf` (the recorded settings
    unless another string was given). Bytes are ints."""

    alloc_conf: str
    recorded_alloc_conf: str
    ops: int                 # in the recording
    ops_replayed: int        # up to and including the first OOM, where the replay stops
    peak_reserved_bytes: int
    final_reserved_bytes: int
    peak_allocated_bytes: int
    final_allocated_bytes: int
    fragmentation_bytes: int
    largest_free_block_bytes: int
    num_alloc_retries: int
    num_ooms: int            # torch.cuda.memory_stats()'s num_ooms: malloc's failures (a request
    oom: dict | None         # of an exabyte or more fails before malloc, and is not counted)
    segments: int
    recorded_ooms: int

    def to_dict(self) -> dict:
        return asdict(self)


def replay_snapshot(trace: dict, alloc_conf: AllocConf | str | None = None,
                    capacity: int | None = None) -> SnapshotReplay:
    """Replay from the trace's starting state. `alloc_conf` None = the recorded settings (the
    what-if: pass e.g. "expandable_segments:True"); `capacity` caps what may be reserved."""
    recorded = recorded_conf(trace)
    conf = recorded if alloc_conf is None else alloc_conf if isinstance(alloc_conf, AllocConf) \
        else AllocConf.parse(alloc_conf)
    allocator = CachingAllocator(conf, capacity=capacity)
    live = allocator.load_segments(trace.get("initial_segments", []))
    if capacity is not None and allocator.total_reserved > capacity:
        raise UsageError(f"the recorded starting state already reserves {allocator.total_reserved:,} bytes, "
                         f"more than the capacity {capacity:,}", hint="give a larger capacity")
    r = run_replay(allocator, _events(trace), live)
    return SnapshotReplay(
        alloc_conf=conf.text if alloc_conf is not None else _settings_text(trace, recorded),
        recorded_alloc_conf=_settings_text(trace, recorded), ops=len(trace["ops"]), ops_replayed=r.events,
        peak_reserved_bytes=r.peak_reserved_bytes, final_reserved_bytes=r.reserved_bytes,
        peak_allocated_bytes=r.peak_allocated_bytes, final_allocated_bytes=r.allocated_bytes,
        fragmentation_bytes=r.fragmentation_bytes, largest_free_block_bytes=r.largest_free_block_bytes,
        num_alloc_retries=r.num_alloc_retries, num_ooms=r.num_ooms, oom=r.oom, segments=r.segments,
        recorded_ooms=int(trace.get("recorded_ooms", 0) or 0))


def _settings_text(trace: dict, conf: AllocConf) -> str:
    settings = trace.get("allocator_settings") or {}
    text = settings.get("PYTORCH_CUDA_ALLOC_CONF", settings.get("PYTORCH_ALLOC_CONF", conf.text))
    return text if isinstance(text, str) else conf.text


@record
class SnapshotCheck:
    """The model against the recording: every allocation at its recorded address, every segment
    event (action, address, size, op) as recorded, the final reserved bytes equal."""

    ops: int
    allocs: int
    address_mismatches: int
    first_address_mismatch: int | None
    segment_events: int
    expected_segment_events: int
    segment_mismatches: int
    first_segment_mismatch: int | None
    final_reserved_bytes: int
    expected_final_reserved_bytes: int | None

    @property
    def ok(self) -> bool:
        return (self.address_mismatches == 0 and self.segment_mismatches == 0
                and self.final_reserved_bytes == self.expected_final_reserved_bytes)

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def check_snapshot(trace: dict) -> SnapshotCheck:
    """Replay under the recorded settings; each new segment (or expandable reservation) gets the
    address of the next recorded segment event, as a model cannot know where cudaMalloc puts it."""
    expected = trace.get("expected", {})
    if expected.get("final_reserved_bytes_from_trace") is None:
        # nothing recorded to hold the model to: "0 of 0" against nothing would read as a verdict
        raise UsageError("the trace records no allocator results to check against (its expected block has no "
                         "final_reserved_bytes_from_trace)", hint="replay it without --check for the model's figures")
    want_addr = list(expected.get("alloc_addr", []))
    want_events = list(expected.get("segment_events", []))
    allocator = CachingAllocator(recorded_conf(trace))
    known = [s["address"] + s["total_size"] for s in trace.get("initial_segments", [])]
    known += [e["addr"] + e["size"] for e in want_events] + want_addr
    spare = [max(known, default=0) + (1 << 40)]

    def next_recorded_address(action, size, stream, is_small):
        k = len(allocator.segment_events)
        if k < len(want_events):
            return want_events[k]["addr"]
        base = spare[0]                 # the model needs more segments than were recorded
        spare[0] += size + (1 << 30)
        return base

    allocator.segment_base = next_recorded_address
    live = allocator.load_segments(trace.get("initial_segments", []))
    got_addr: list[int] = []
    op_of_event: list[int] = []
    events = allocator.segment_events
    for i, op in enumerate(_events(trace)):
        try:
            if op[0] == "alloc":
                if op[1] in live:       # as the replay refuses it (cuda/_replay.py run_replay)
                    allocated_twice(i, op[1])
                if op[2] > 0:
                    live[op[1]] = allocator.malloc(op[2], op[3] if len(op) > 3 else 0)
                    got_addr.append(live[op[1]])
                else:
                    live[op[1]] = None
            elif op[0] == "free":
                if op[1] not in live:
                    not_allocated(i, op[1])
                address = live.pop(op[1])
                if address is not None:
                    allocator.free(address)
            else:
                allocator.empty_cache()
        except OutOfMemory:
            break
        op_of_event.extend([i] * (len(events) - len(op_of_event)))
    address_mismatches = [i for i, (a, b) in enumerate(zip(got_addr, want_addr)) if a != b]
    n_addr = len(address_mismatches) + abs(len(got_addr) - len(want_addr))
    got_events = [{"before_op": op_of_event[k], "action": e[0], "addr": e[1], "size": e[2]}
                  for k, e in enumerate(events)]
    seg_mismatches = [k for k, (a, b) in enumerate(zip(got_events, want_events))
                      if (a["before_op"], a["action"], a["addr"], a["size"])
                      != (b.get("before_op"), b.get("action"), b.get("addr"), b.get("size"))]
    n_seg = len(seg_mismatches) + abs(len(got_events) - len(want_events))
    first_addr = address_mismatches[0] if address_mismatches else (
        min(len(got_addr), len(want_addr)) if len(got_addr) != len(want_addr) else None)
    first_seg = seg_mismatches[0] if seg_mismatches else (
        min(len(got_events), len(want_events)) if len(got_events) != len(want_events) else None)
    return SnapshotCheck(
        ops=len(trace["ops"]), allocs=len(want_addr), address_mismatches=n_addr,
        first_address_mismatch=first_addr, segment_events=len(got_events),
        expected_segment_events=len(want_events), segment_mismatches=n_seg, first_segment_mismatch=first_seg,
        final_reserved_bytes=allocator.total_reserved,
        expected_final_reserved_bytes=expected.get("final_reserved_bytes_from_trace"))
