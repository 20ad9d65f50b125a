"""Snapshot files and `vramplan replay`: pickles in the `_dump_snapshot` layout round-trip into
the trace form, hostile or broken files give one-line errors, and --check fails on a mismatch."""
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

from vramplan.cli import main
from vramplan.cuda._allocator import CachingAllocator
from vramplan.cuda._snapshot import check_snapshot, load_trace, recorded_conf, replay_snapshot
from vramplan.core._errors import UsageError

DATA = Path(__file__).parent / "data" / "allocator"
TRACES = sorted((DATA / "traces").glob("*.json"))
SMALL_TRACE = DATA / "traces" / "trace_silmont2000_mem_snapshot.json"


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def trace_to_snapshot(trace: dict) -> dict:
    """A `torch.cuda.memory._snapshot()` dict that records `trace`: its events as device_traces
    (alloc / free_requested / free_completed / segment_*), and the end state as segments. Addresses
    come from the trace's expected values (the model places blocks exactly as recorded)."""
    want = trace["expected"]["segment_events"]
    allocator = CachingAllocator(recorded_conf(trace))
    allocator.segment_base = lambda *_: want[len(allocator.segment_events)]["addr"]
    live = allocator.load_segments(trace["initial_segments"])
    requested = {b["id"]: b["requested_size"] for s in trace["initial_segments"] for b in s["blocks"] if "id" in b}
    entries, pending = [], list(want)
    for i, op in enumerate(trace["ops"]):
        seen = len(allocator.segment_events)
        if op[0] == "alloc":
            live[op[1]] = allocator.malloc(op[2], op[3])
            requested[op[1]] = op[2]
        for e in allocator.segment_events[seen:]:
            entries.append({"action": e[0], "addr": e[1], "size": e[2], "stream": e[3], "frames": []})
        if op[0] == "alloc":
            entries.append({"action": "alloc", "addr": live[op[1]], "size": op[2], "stream": op[3], "frames": []})
        else:
            addr = live.pop(op[1])
            allocator.free(addr)
            for action in ("free_requested", "free_completed"):
                entries.append({"action": action, "addr": addr, "size": requested[op[1]], "stream": 0,
                                "frames": []})
    assert len(allocator.segment_events) == len(pending)
    segments = [{"address": s["address"], "total_size": s["total_size"], "stream": s["stream"],
                 "segment_type": s["segment_type"], "segment_pool_id": (0, 0), "is_expandable": s["expandable"],
                 "allocated_size": s["allocated_size"], "active_size": s["allocated_size"],
                 "blocks": [{"address": b["address"], "size": b["size"], "requested_size": b["requested_size"],
                             "state": "active_allocated" if b["allocated"] else "inactive", "frames": []}
                            for b in s["blocks"]]} for s in allocator.segments()]
    return {"segments": segments, "device_traces": [entries], "allocator_settings": trace["allocator_settings"]}


def _layout(segments):
    return [(s["address"], s["total_size"], [(b["offset"], b["size"], b["allocated"]) for b in s["blocks"]])
            for s in segments]


@pytest.mark.parametrize("path", TRACES, ids=[p.stem for p in TRACES])
def test_pickle_round_trip_rebuilds_the_trace(tmp_path, path):
    trace = load_trace(path)
    target = tmp_path / "snapshot.pickle"
    target.write_bytes(pickle.dumps(trace_to_snapshot(trace)))
    got = load_trace(target)
    assert got["expected"]["alloc_addr"] == trace["expected"]["alloc_addr"]
    assert [(e["before_op"], e["action"], e["addr"], e["size"]) for e in got["expected"]["segment_events"]] == \
        [(e["before_op"], e["action"], e["addr"], e["size"]) for e in trace["expected"]["segment_events"]]
    assert [op[0] for op in got["ops"]] == [op[0] for op in trace["ops"]]
    assert _layout(got["initial_segments"]) == _layout(trace["initial_segments"])
    assert got["expected"]["final_reserved_bytes_from_trace"] == trace["expected"]["final_reserved_bytes_from_trace"]
    assert check_snapshot(got).ok


def test_small_hand_made_snapshot_replays_and_checks(tmp_path):
    MiB = 2**20
    base = 0x7F0000000000
    snapshot = {
        "segments": [{"address": base, "total_size": 2 * MiB, "stream": 0, "segment_type": "small",
                      "segment_pool_id": (0, 0), "blocks": [
                          {"address": base, "size": 4096, "requested_size": 4000, "state": "active_allocated"},
                          {"address": base + 4096, "size": 2 * MiB - 4096, "requested_size": 0,
                           "state": "inactive"}]}],
        "device_traces": [[
            {"action": "segment_alloc", "addr": base, "size": 2 * MiB, "stream": 0},
            {"action": "alloc", "addr": base, "size": 1000, "stream": 0},
            {"action": "alloc", "addr": base + 1024, "size": 4000, "stream": 0},
            {"action": "free_requested", "addr": base, "size": 1000, "stream": 0},
            {"action": "free_completed", "addr": base, "size": 1000, "stream": 0},
        ]],
        "allocator_settings": {"PYTORCH_CUDA_ALLOC_CONF": "", "max_split_size": -1,
                               "garbage_collection_threshold": 0.0, "expandable_segments": False},
    }
    path = tmp_path / "s.pickle"
    path.write_bytes(pickle.dumps(snapshot))
    trace = load_trace(path)
    assert trace["initial_segments"] == []
    assert trace["ops"] == [["alloc", "a0", 1000, 0], ["alloc", "a1", 4000, 0], ["free", "a0"]]
    # the model puts the 4000-byte request at 1024 (after the 1024-byte block), as the recording says
    assert check_snapshot(trace).ok
    r = replay_snapshot(trace)
    assert r.peak_reserved_bytes == 2 * MiB and r.final_allocated_bytes == 4096


def test_cli_replay_table_and_json(capsys):
    code, out, err = run(capsys, "replay", SMALL_TRACE)
    assert code == 0 and "peak reserved" in out and err == ""
    code, out, _ = run(capsys, "replay", SMALL_TRACE, "--json")
    data = json.loads(out)
    trace = json.loads(SMALL_TRACE.read_text())
    assert data["final_reserved_bytes"] == trace["expected"]["final_reserved_bytes_from_trace"]
    for key in ("peak_reserved_bytes", "fragmentation_bytes", "num_alloc_retries", "num_ooms", "alloc_conf"):
        assert key in data


def test_cli_what_if_alloc_conf(capsys):
    code, out, _ = run(capsys, "replay", SMALL_TRACE, "--alloc-conf", "expandable_segments:True", "--json")
    data = json.loads(out)
    assert code == 0 and data["alloc_conf"] == "expandable_segments:True" and data["recorded_alloc_conf"] == ""


@pytest.mark.parametrize("path", TRACES, ids=[p.stem for p in TRACES])
def test_cli_check_passes_on_real_traces(capsys, path):
    code, out, _ = run(capsys, "replay", path, "--check", "--json")
    data = json.loads(out)
    assert code == 0, data
    assert data["address_mismatches"] == 0 and data["segment_mismatches"] == 0
    assert data["final_reserved_bytes"] == data["expected_final_reserved_bytes"]


def test_cli_check_exits_nonzero_on_a_mismatch(capsys, tmp_path):
    trace = json.loads(SMALL_TRACE.read_text())
    trace["expected"]["alloc_addr"][5] += 512
    trace["expected"]["segment_events"][2]["size"] += 2**21
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(trace))
    code, out, _ = run(capsys, "replay", path, "--check", "--json")
    data = json.loads(out)
    assert code == 1
    assert data["address_mismatches"] == 1 and data["first_address_mismatch"] == 5
    assert data["segment_mismatches"] == 1 and data["ok"] is False
    code, out, _ = run(capsys, "replay", path, "--check")
    assert code == 1 and "MISMATCH" in out


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _alloc(addr: int, size: int, stream=0) -> dict:
    return {"action": "alloc", "addr": addr, "size": size, "stream": stream}


def _segment(address: int, total: int = 2 * 2**20) -> dict:
    return {"address": address, "total_size": total, "stream": 0, "segment_type": "large",
            "blocks": [{"address": address, "size": total, "state": "inactive"}]}


_PLACEHOLDER = "STREAM-PLACEHOLDER"
# pickle opcodes of a tuple nested 200,000 deep: None, then TUPLE1 over and over
_DEEP_TUPLE = b"N" + b"\x85" * 200_000


def _snapshot_bytes(entries: list, segments=None, traces=None) -> bytes:
    """A snapshot pickle; an entry whose stream is _PLACEHOLDER gets _DEEP_TUPLE as its stream."""
    data = pickle.dumps({"segments": segments or [], "device_traces": [entries] if traces is None else traces,
                         "allocator_settings": {}}, protocol=2)
    as_opcodes = b"X" + len(_PLACEHOLDER).to_bytes(4, "little") + _PLACEHOLDER.encode()   # BINUNICODE
    return data.replace(as_opcodes, _DEEP_TUPLE)


def _repeated_entry_snapshot(count: int) -> bytes:
    """One alloc entry referenced `count` times from the memo (BINGET): a few bytes per event."""
    entry = _alloc(0x10, 512)
    return pickle.dumps({"segments": [], "device_traces": [[entry] * count]}, protocol=2)


def _assert_one_line_error(code, out, err, expected_code=2):
    assert code == expected_code
    assert out == ""
    assert err.startswith("Error: ") and err.count("\n") == 1 and "hint:" in err and "Traceback" not in err


def test_a_pickle_with_globals_is_refused_without_running(capsys, tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pickle"
    path.write_bytes(pickle.dumps({"segments": [], "device_traces": [[]], "x": _RunsCode(marker)}))
    code, out, err = run(capsys, "replay", path)
    _assert_one_line_error(code, out, err)
    assert "refused, the pickle refers to" in err and "system" in err
    assert not marker.exists()


@pytest.mark.parametrize("content, message", [
    (pickle.dumps({"segments": [], "device_traces": [[]]})[:-7], "the pickle is truncated"),
    (b"\x80\x04\x95garbage\xff\xfe", "not a readable pickle"),
    (b"", "the file is empty"),
    (pickle.dumps([1, 2, 3]), "not a memory snapshot: the top level is list"),
    (pickle.dumps({"segments": "x", "device_traces": []}), "no 'segments' and 'device_traces' lists"),
    (pickle.dumps({"segments": [], "device_traces": [[{"action": "alloc", "addr": "0x10", "size": 4}]]}),
     "device_traces[0][0].addr is str, not an int"),
    (b'{"ops": 5}', "'ops' is not a list"),
    (b'{"ops": [["alloc", "a", -3, 0]]}', "ops[0] bytes is out of range"),
    (b"{not json", "not valid JSON"),
    (b"[" * 200_000 + b"]" * 200_000, "the JSON nests too deeply"),
    # a stream that is a deeply nested tuple: hashing it as a dict key would overflow the C stack
    (_snapshot_bytes([_alloc(0x10, 512, stream=_PLACEHOLDER)]), "stream is tuple, not an int"),
    (_snapshot_bytes([_alloc(0x10, 512, stream=[1])]), "stream is list, not an int"),
    (_snapshot_bytes([_alloc(0x10, 10**5000)]), "size is out of range"),
    (_snapshot_bytes([_alloc(0x10, -4096)]), "size is out of range"),
    (_snapshot_bytes([], segments=[_segment(0x200000), _segment(0x200000)]), "overlap"),
    (_snapshot_bytes([], traces=[]), "holds no recorded history"),
    (_repeated_entry_snapshot(50), "repeats one entry object"),
    (b'{"ops": [["alloc", ["a"], 512, 0]]}', "ops[0] id is list, not a string or an int id"),
    (b'{"ops": [["free", {"a": 1}]]}', "ops[0] id is dict"),
    (b'{"ops": [["alloc", "a", 512, [0]]]}', "ops[0] stream is list"),
    (b'{"ops": [], "initial_segments": [{"address": 0, "total_size": 2097152, "stream": [0], "blocks": []}]}',
     "initial_segments[0].stream is list"),
    (b'{"ops": [], "initial_segments": [{"address": 1048576, "total_size": 2097152, "blocks": '
     b'[{"offset": 0, "size": 2097152}]}, {"address": 1049088, "total_size": 2097152, "blocks": '
     b'[{"offset": 0, "size": 2097152}]}]}', "initial segments at 0x100000 and 0x100200 overlap"),
    (b'{"ops": [], "initial_segments": [{"address": 0, "total_size": 2097152, "blocks": '
     b'[{"offset": 0, "size": 2097152, "allocated": true, "requested_size": "x"}]}]}',
     "blocks[0].requested_size is str"),
    (b'{"ops": [], "recorded_ooms": "many"}', "recorded_ooms is str"),
    (b'{"ops": [], "expected": {"alloc_addr": 5}}', "expected.alloc_addr is not a list"),
    (b'{"ops": [], "expected": {"alloc_addr": ["0x10"]}}', "expected.alloc_addr[0] is str"),
    (b'{"ops": [], "expected": {"segment_events": [{"action": "segment_alloc", "size": 2097152, "before_op": 0}]}}',
     "expected.segment_events[0].addr is NoneType"),
    (b'{"ops": [], "expected": {"final_reserved_bytes_from_trace": "2097152"}}',
     "final_reserved_bytes_from_trace is str"),
    (b'{"ops": [], "expected": {"final_reserved_bytes_from_trace": 1e999}}',
     "final_reserved_bytes_from_trace is float"),
    (b'{"ops": [], "allocator_settings": {"max_split_size": 1}}', "max_split_size"),
    (b'{"ops": [], "allocator_settings": {"roundup_power2_divisions": {"1": 3}}}', "power of 2"),
], ids=["truncated", "garbage", "empty", "list", "wrong-types", "str-address", "json-ops", "json-negative",
        "bad-json", "json-deep", "deep-tuple-stream", "list-stream", "huge-size", "negative-size",
        "overlapping-segments", "no-device-traces", "repeated-entry", "list-id", "dict-id", "json-list-stream",
        "segment-list-stream", "overlapping-initial", "str-requested", "str-ooms", "addr-not-list",
        "str-expected-addr", "event-no-addr", "str-final", "inf-final", "tiny-max-split", "bad-divisions"])
def test_broken_files_give_one_line_errors(capsys, tmp_path, content, message):
    path = tmp_path / "f.pickle"
    path.write_bytes(content)
    code, out, err = run(capsys, "replay", path)
    _assert_one_line_error(code, out, err)
    assert message in err, err


def test_too_large_file_is_refused(tmp_path):
    path = tmp_path / "big.pickle"
    path.write_bytes(b"\x80" * 4096)
    with pytest.raises(UsageError, match="larger than the 1,000-byte limit"):
        load_trace(path, max_bytes=1000)


@pytest.mark.parametrize("argv, message", [
    (["--alloc-conf", "max_split_size_mb:2"], "Error: invalid allocator settings 'max_split_size_mb:2'"),
    (["--check", "--alloc-conf", "expandable_segments:True"], "Error: --check replays the recorded settings"),
    (["--capacity", "lots"], "Error: cannot read 'lots' as a memory size"),
    (["--capacity", "0GB"], "Error: memory size '0GB' must be positive (hint: e.g. --capacity 24GB)"),
])
def test_cli_bad_flags_pinned(capsys, argv, message):
    code, out, err = run(capsys, "replay", SMALL_TRACE, *argv)
    _assert_one_line_error(code, out, err)
    assert err.startswith(message), err


def test_device_out_of_range_is_refused(capsys, tmp_path):
    path = tmp_path / "s.pickle"
    path.write_bytes(pickle.dumps({"segments": [], "device_traces": [[_alloc(0x10, 512)]]}))
    for flags in (["--device", "7"], ["--check", "--device", "7"]):
        code, out, err = run(capsys, "replay", path, *flags)
        _assert_one_line_error(code, out, err)
        assert err.startswith(f"Error: {path}: no device 7 (the snapshot has 1) (hint: leave --device out, or give --device 0)"), err
    code, out, err = run(capsys, "replay", SMALL_TRACE, "--device", "1")
    _assert_one_line_error(code, out, err)
    assert "the trace holds device 0 only, not device 1" in err


@pytest.mark.parametrize("check", [False, True])
def test_an_id_allocated_twice_is_refused_by_replay_and_check(capsys, tmp_path, check):
    path = tmp_path / "t.json"
    path.write_text(json.dumps({"ops": [["alloc", "a", 512, 0], ["alloc", "a", 1024, 0]],
                                "expected": {"final_reserved_bytes_from_trace": 0}}))   # something to check
    code, out, err = run(capsys, "replay", path, *(["--check"] if check else []))
    _assert_one_line_error(code, out, err)
    assert err.startswith("Error: event 1: key 'a' is allocated twice"), err


def test_cli_missing_file(capsys, tmp_path):
    code, out, err = run(capsys, "replay", tmp_path / "nope.pickle")
    _assert_one_line_error(code, out, err)
    assert err.startswith("Error: cannot read ")


def test_capacity_what_if_reports_the_first_oom(capsys, monkeypatch):
    code, out, _ = run(capsys, "replay", SMALL_TRACE, "--capacity", "1GiB", "--json")
    data = json.loads(out)
    # silmont2000 starts empty and needs 512 MiB segments: the third one (> 1 GiB reserved) fails
    assert code == 0 and data["num_ooms"] == 1 and data["oom"]["reserved_bytes"] <= 2**30
    # the replay stops at that OOM: what it replayed, and the reserved bytes then
    assert data["ops_replayed"] == data["oom"]["index"] + 1 < data["ops"]
    assert data["final_reserved_bytes"] == data["oom"]["reserved_bytes"]
    monkeypatch.setenv("COLUMNS", "200")   # one table row a line
    code, out, _ = run(capsys, "replay", SMALL_TRACE, "--capacity", "1GiB")
    text = " ".join(out.split())
    assert f"{data['ops_replayed']:,} of {data['ops']:,} (the replay stops at its first OOM)" in text
    assert "reserved at the OOM" in text and "final reserved" not in text


def test_a_segment_that_is_not_an_object_is_refused(capsys, tmp_path):
    path = tmp_path / "s.pickle"
    path.write_bytes(pickle.dumps({"segments": [1], "device_traces": [[_alloc(0x10, 512)]]}))
    code, out, err = run(capsys, "replay", path)
    _assert_one_line_error(code, out, err)
    assert err.startswith(f"Error: {path}: not a memory snapshot: a segment is not a dict")


def test_python_dash_m_entry_point():
    proc = subprocess.run([sys.executable, "-m", "vramplan.cli", "replay", str(SMALL_TRACE), "--check", "--json"],
                          capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["ok"] is True


def test_check_without_recorded_results_is_refused(capsys, tmp_path):
    """--check holds the model to what the trace recorded; a trace whose expected block is empty
    has nothing to hold it to, which is said rather than reported as '0 of 0' and MISMATCH."""
    trace = json.loads(Path(SMALL_TRACE).read_text())
    trace["expected"] = {}
    path = tmp_path / "t.json"
    path.write_text(json.dumps(trace))
    code, out, err = run(capsys, "replay", path, "--check")
    _assert_one_line_error(code, out, err)
    assert err.startswith("Error: the trace records no allocator results to check against")
    assert run(capsys, "replay", path)[0] == 0      # the plain replay still runs


def test_a_json_trace_with_a_utf8_byte_order_mark_is_read(capsys, tmp_path):
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + SMALL_TRACE.read_bytes())
    assert load_trace(path) == load_trace(SMALL_TRACE)
    code, out, _ = run(capsys, "replay", path, "--check", "--json")
    assert code == 0 and json.loads(out)["ok"] is True


_MiB = 2**20


def _snapshot_segment(address: int, total: int, blocks=None) -> dict:
    return {"address": address, "total_size": total, "stream": 0, "segment_type": "large", "segment_pool_id": (0, 0),
            "blocks": blocks or [{"address": address, "size": total, "state": "inactive"}]}


_TOP = 2**64 - 4 * _MiB
_LIVE = 0x7F0000000000


@pytest.mark.parametrize("content, message", [
    # an initial segment that ends past 2**64: the allocator model's block ends wrap (KeyError in malloc)
    (json.dumps({"ops": [["alloc", "a", 512, 0]], "initial_segments": [
        {"address": 2**64 - _MiB, "total_size": 2 * _MiB, "blocks": [{"offset": 0, "size": 2 * _MiB}]}]}).encode(),
     "not a memory snapshot: initial_segments[0] at 0xfffffffffff00000 of 2,097,152 bytes ends past the "
     "64-bit address space"),
    (pickle.dumps({"segments": [_snapshot_segment(_TOP, 20 * _MiB)], "device_traces": [[
        _alloc(0x10, 4 * _MiB), {"action": "free_completed", "addr": 0x10, "size": 4 * _MiB, "stream": 0},
        _alloc(0x20, 4 * _MiB), _alloc(0x30, 3 * _MiB)]]}),
     "not a memory snapshot: segments[0] at 0xffffffffffc00000 of 20,971,520 bytes ends past the "
     "64-bit address space"),
    (pickle.dumps({"segments": [], "device_traces": [[
        {"action": "segment_alloc", "addr": _TOP, "size": 20 * _MiB, "stream": 0}]]}),
     "not a memory snapshot: device_traces[0][0] at 0xffffffffffc00000 of 20,971,520 bytes ends past the "
     "64-bit address space"),
    (json.dumps({"ops": [], "expected": {"segment_events": [
        {"action": "segment_alloc", "addr": _TOP, "size": 20 * _MiB, "before_op": 0}]}}).encode(),
     "not a memory snapshot: expected.segment_events[0] at 0xffffffffffc00000 of 20,971,520 bytes ends past the "
     "64-bit address space"),
    # a segment_free of 2**63 bytes over a segment still mapped (and in use) after it
    (pickle.dumps({"segments": [_snapshot_segment(_LIVE, 20 * _MiB, [
        {"address": _LIVE, "size": 4 * _MiB, "requested_size": 4 * _MiB, "state": "active_allocated"},
        {"address": _LIVE + 4 * _MiB, "size": 16 * _MiB, "state": "inactive"}])], "device_traces": [[
            {"action": "segment_alloc", "addr": _LIVE, "size": 20 * _MiB, "stream": 0}, _alloc(_LIVE, 4 * _MiB),
            {"action": "segment_free", "addr": 3, "size": 2**63, "stream": 0}]]}),
     "not a memory snapshot: device_traces[0][2] segment_free of 9,223,372,036,854,775,808 bytes at 0x3 overlaps "
     "the segment at 0x7f0000000000 of 20,971,520 bytes, still mapped after it"),
    # one segment released twice
    (pickle.dumps({"segments": [], "device_traces": [[
        {"action": "segment_alloc", "addr": _LIVE, "size": 20 * _MiB, "stream": 0},
        {"action": "segment_free", "addr": _LIVE, "size": 20 * _MiB, "stream": 0},
        {"action": "segment_unmap", "addr": _LIVE + 2 * _MiB, "size": 2 * _MiB, "stream": 0}]]}),
     "not a memory snapshot: device_traces[0][1] segment_free of 20,971,520 bytes at 0x7f0000000000 overlaps "
     "the segment at 0x7f0000200000 of 2,097,152 bytes, still mapped after it"),
    # a segment event of no bytes (it made a second start at one address: a KeyError)
    (pickle.dumps({"segments": [], "device_traces": [[
        {"action": "segment_alloc", "addr": _LIVE, "size": 2 * _MiB, "stream": 0},
        {"action": "segment_free", "addr": _LIVE, "size": 2 * _MiB, "stream": 0},
        {"action": "segment_free", "addr": _LIVE, "size": 0, "stream": 0}]]}),
     "not a memory snapshot: device_traces[0][2] segment_free of 0 bytes at 0x7f0000000000: a segment event maps "
     "or frees memory"),
    (json.dumps({"ops": [], "expected": {"segment_events": [
        {"action": "segment_alloc", "addr": _LIVE, "size": 0, "before_op": 0}]}}).encode(),
     "not a memory snapshot: expected.segment_events[0].size is out of range for an address or byte count"),
], ids=["json-segment-past-2**64", "pickle-segment-past-2**64", "segment-event-past-2**64",
        "expected-event-past-2**64", "segment-free-over-a-live-segment", "released-twice", "empty-segment-event",
        "empty-expected-event"])
def test_impossible_segments_are_refused(capsys, tmp_path, content, message):
    path = tmp_path / "f.pickle"
    path.write_bytes(content)
    for flags in ([], ["--check"]):
        code, out, err = run(capsys, "replay", path, *flags)
        _assert_one_line_error(code, out, err)
        assert err.startswith(f"Error: {path}: {message} (hint: "), err


def test_a_segment_freed_and_allocated_again_at_its_address_is_read():
    # cudaFree then cudaMalloc may hand back the same range: released, then mapped anew
    events = [{"action": "segment_free", "addr": _LIVE, "size": 20 * _MiB, "stream": 0},
              {"action": "segment_alloc", "addr": _LIVE, "size": 20 * _MiB, "stream": 0},
              _alloc(_LIVE, 4 * _MiB)]
    seg = _snapshot_segment(_LIVE, 20 * _MiB, [
        {"address": _LIVE, "size": 4 * _MiB, "requested_size": 4 * _MiB, "state": "active_allocated"},
        {"address": _LIVE + 4 * _MiB, "size": 16 * _MiB, "state": "inactive"}])
    from vramplan.cuda._snapshot import parse_trace_bytes
    trace = parse_trace_bytes(pickle.dumps({"segments": [seg], "device_traces": [events]}))
    assert [(s["address"], s["total_size"]) for s in trace["initial_segments"]] == [(_LIVE, 20 * _MiB)]


def test_the_segment_starts_answer_as_one_sorted_list_would():
    """_Starts (chunked, so that undoing many segment events does not shift one long list each
    time) against a plain sorted list, over random adds, removes and predecessor queries."""
    import bisect
    import random

    from vramplan.cuda._snapshot import _Starts

    rng = random.Random(7)
    plain: list = sorted(rng.sample(range(10**6), 700))
    starts = _Starts(plain)
    for _ in range(20000):
        v = rng.randrange(10**6)
        if rng.random() < 0.5 and v not in plain:
            bisect.insort(plain, v)
            starts.add(v)
        elif plain and rng.random() < 0.5:
            gone = plain.pop(rng.randrange(len(plain)))
            starts.remove(gone)
        i = bisect.bisect_left(plain, v)
        assert starts.before(v) == (plain[i - 1] if i else None)
    assert list(starts) == plain
