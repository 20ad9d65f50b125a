"""The allocator snapshots recorded on a real GPU (profiles/**/<record id>.snapshot.pickle.gz, the
torch.cuda.memory._dump_snapshot of a profiled QLoRA run), replayed through the caching-allocator
model under the settings they were recorded with: every allocation must land at the recorded
address, every segment event must match, and the final reserved bytes must agree. A change to
cuda/_allocator.py that makes it differ from PyTorch's allocator on a real training step fails here.
"""
import gzip
import json
import os
from pathlib import Path

import pytest

from vramplan.core._errors import UsageError
from vramplan.cuda._snapshot import check_snapshot, load_trace

PROFILES = Path(__file__).resolve().parents[1] / "profiles"
SNAPSHOTS = sorted(PROFILES.rglob("*.snapshot.pickle.gz"))


def _record_of(snapshot: Path) -> dict:
    return json.loads(snapshot.with_name(snapshot.name.removesuffix(".snapshot.pickle.gz") + ".json").read_text())


def test_gpu_snapshots_are_committed_with_their_records():
    assert SNAPSHOTS, "profiles/ holds no GPU allocator snapshot"
    for snap in SNAPSHOTS:
        record = _record_of(snap)
        assert record["status"] == "ok" and record["snapshot"] + ".gz" == snap.name


@pytest.mark.parametrize("snapshot", SNAPSHOTS, ids=[p.name.split("_cuda_")[0] + p.name[-25:-19] for p in SNAPSHOTS])
def test_gpu_snapshot_replays_exactly(snapshot):
    trace = load_trace(snapshot)
    record = _record_of(snapshot)
    # the settings the snapshot says the allocator ran with are the ones the record was run with
    assert trace["allocator_settings"].get("PYTORCH_CUDA_ALLOC_CONF") == (record["run"].get("alloc_conf") or "")
    check = check_snapshot(trace)
    assert check.allocs > 30_000 and check.expected_segment_events > 100
    assert check.address_mismatches == 0, check
    assert check.segment_mismatches == 0, check
    assert check.final_reserved_bytes == check.expected_final_reserved_bytes


def test_gzipped_snapshot_limits(tmp_path):
    """A gzip that would inflate past the size limit is refused before it fills memory; a cut-off
    one is one error line, not a traceback."""
    bomb = tmp_path / "bomb.pickle.gz"
    bomb.write_bytes(gzip.compress(b"\0" * (8 * 2**20)))
    with pytest.raises(UsageError, match="inflates past the 1,048,576-byte limit"):
        load_trace(bomb, max_bytes=2**20)
    cut = tmp_path / "cut.pickle.gz"
    cut.write_bytes(gzip.compress(os.urandom(100_000))[:2000])
    with pytest.raises(UsageError, match="truncated"):
        load_trace(cut)
    junk = tmp_path / "junk.gz"
    junk.write_bytes(b"\x1f\x8b" + b"not deflate data at all")
    with pytest.raises(UsageError, match="not a readable gzip file"):
        load_trace(junk)
