"""benchmarks/gpu_campaign.{py,sh}: the matrix, the budget, the bundle, run on the CPU with tiny
stand-in models (--dry-run) through the same code as on the GPU."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("gpu_campaign", ROOT / "benchmarks" / "gpu_campaign.py")
campaign = importlib.util.module_from_spec(spec)
sys.modules["gpu_campaign"] = campaign     # dataclasses look their module up while the class is built
spec.loader.exec_module(campaign)


def test_matrix_covers_the_issue_in_value_order():
    configs = campaign.matrix()
    assert len(configs) == 38
    keys = {(c.label, c.seq, c.grad_ckpt, c.optimizer) for c in configs}
    assert len(keys) == 38
    for label in campaign.FAMILIES:
        for seq in (512, 2048, 8192):
            for gc in (True, False):
                for opt in ("adamw", "paged_adamw8bit"):
                    assert (label, seq, gc, opt) in keys
    # the default recipe on each 7-8B model first, then 13B and 70B
    assert [(c.seq, c.grad_ckpt, c.optimizer) for c in configs[:3]] == [(2048, True, "adamw")] * 3
    assert [c.size for c in configs[3:5]] == ["13b", "70b"]
    # a configuration never comes before one that differs less from the recipe
    distance = [(c.seq != 2048) + (not c.grad_ckpt) + (c.optimizer != "adamw") for c in configs if c.size == "7b"]
    assert distance == sorted(distance)


@pytest.mark.torch
@pytest.mark.transformers
@pytest.mark.peft
@pytest.mark.bitsandbytes
def test_dry_run_writes_records_bundle_and_summary(tmp_path):
    out, bundle, summary = tmp_path / "records", tmp_path / "c.jsonl", tmp_path / "summary.md"
    code = campaign.main(["run", "--dry-run", "--device", "cpu", "--budget", "300", "--only", "2", "--out", str(out),
                          "--bundle", str(bundle), "--summary", str(summary), "--log", str(tmp_path / "log")])
    assert code == 0
    lines = [json.loads(x) for x in bundle.read_text().splitlines()]
    assert [d["status"] for d in lines] == ["ok", "ok"]
    assert [d["model_ref"] for d in lines] == list(campaign.FAMILIES[:2])
    assert all(d["run"]["random_weights"] and d["measured"]["peak_allocated_bytes"] > 0 for d in lines)
    assert len(list(out.glob("*.json"))) == 2
    assert summary.read_text().count("| ok |") == 2
    # unpack: the bundle becomes one record file each
    again = tmp_path / "unpacked"
    assert campaign.main(["unpack", str(bundle), str(again)]) == 0
    assert len(list(again.glob("*.json"))) == 2


def test_out_of_budget_configurations_are_recorded_as_skipped(tmp_path):
    bundle = tmp_path / "c.jsonl"
    code = campaign.main(["run", "--dry-run", "--device", "cpu", "--budget", "0.001", "--only", "5",
                          "--bundle", str(bundle), "--launcher", "subprocess"])
    assert code == 0
    lines = [json.loads(x) for x in bundle.read_text().splitlines()]
    assert [d["status"] for d in lines] == ["skipped"] * 5
    for d in lines:
        assert d["measured"] is None and d["nvml"]["available"] is False      # nothing invented
        assert d["estimate"]["peak_allocated_bytes"] > 0 and "budget" in d["failure"]["message"]


@pytest.mark.torch
@pytest.mark.transformers
@pytest.mark.peft
@pytest.mark.bitsandbytes
@pytest.mark.skipif(os.name != "posix", reason="bash script")
def test_shell_script_dry_run(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), BUDGET="200")
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_campaign.sh"), "--dry-run", "--only", "1"],
                          capture_output=True, text=True, env=env, timeout=600, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    names = {p.name for p in tmp_path.iterdir()}
    assert {"campaign.jsonl", "campaign.log", "summary.md", "env.txt", "records.tar.gz"} <= names
    assert len(names) <= 8            # what comes back from a device run: at most 8 files
    assert json.loads((tmp_path / "campaign.jsonl").read_text().splitlines()[0])["status"] == "ok"


def test_snapshots_are_kept_next_to_their_records(tmp_path):
    import dataclasses


    snap = tmp_path / "work" / "x.snapshot.pickle"
    snap.parent.mkdir()
    snap.write_bytes(b"pickle")
    Rec = dataclasses.make_dataclass("Rec", ["id", "snapshot"], frozen=True)
    out = campaign.keep_snapshot(Rec("rid", str(snap)), str(tmp_path / "records"))
    assert out.snapshot == "rid.snapshot.pickle"
    assert (tmp_path / "records" / "rid.snapshot.pickle").read_bytes() == b"pickle" and not snap.exists()
    assert campaign.keep_snapshot(Rec("rid", None), str(tmp_path)).snapshot is None

