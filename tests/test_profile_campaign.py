"""benchmarks/gpu_campaign.{py,sh}: the matrix, the budget, the bundle, run on the CPU with tiny
stand-in models (--dry-run) through the same code as on the GPU."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vramplan.core._setup import TrainSetup, make_setup
from vramplan.cuda._alloc_conf import AllocConf

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("gpu_campaign", ROOT / "benchmarks" / "gpu_campaign.py")
campaign = importlib.util.module_from_spec(spec)
sys.modules["gpu_campaign"] = campaign     # dataclasses look their module up while the class is built
spec.loader.exec_module(campaign)


def test_matrix_covers_families_recipes_allocator_settings_and_the_grid():
    configs = campaign.matrix()
    setups = [c.setup() for c in configs]
    keys = {(c.label, s, c.alloc_conf) for c, s in zip(configs, setups)}
    assert len(keys) == len(configs) == 52                       # no configuration twice
    # 1. the plain default on one model of each family, first
    n = len(campaign.FAMILY_DEFAULTS)
    assert [c.label for c in configs[:n]] == list(campaign.FAMILY_DEFAULTS)
    assert all(s == TrainSetup() for s in setups[:n])
    # 2. each recipe as the recipe defines it, 3. allocator settings on the default setup
    recipes = [(c.label, s.recipe) for c, s in zip(configs, setups) if s.recipe]
    assert recipes == list(campaign.RECIPES)
    assert all(s == make_setup(s.recipe, seq=2048) for s in setups if s.recipe)
    confs = [c for c in configs if c.alloc_conf]
    assert [c.alloc_conf for c in confs] == list(campaign.ALLOC_CONFS)
    assert all(c.setup() == TrainSetup() for c in confs)
    for conf in campaign.ALLOC_CONFS:
        AllocConf.parse(conf)                                    # every setting is one PyTorch accepts
    # 4. the larger models, 5. issue 4's grid: every combination of the three models
    assert [c.label for c in configs if c.size != "7b"] == [label for label, _ in campaign.BIG]
    # 4b. Mistral-7B at exactly its sliding window, right after them
    edge = configs[n + len(campaign.RECIPES) + len(campaign.ALLOC_CONFS) + len(campaign.BIG)]
    assert (edge.label, edge.seq, edge.grad_ckpt) == ("mistralai/Mistral-7B-v0.1", 4096, False)
    from vramplan.core._models import resolve
    assert resolve(edge.label).sliding_window == edge.seq
    grid = {(c.label, s.seq, s.grad_ckpt, s.optimizer) for c, s in zip(configs, setups)
            if not s.recipe and not c.alloc_conf}
    for label in campaign.GRID_MODELS:
        for seq in (512, 2048, 8192):
            for gc in (True, False):
                for opt in ("adamw", "paged_adamw8bit"):
                    assert (label, seq, gc, opt) in grid
    # within the grid, a configuration never comes before one that differs less from the default
    tail = [s for c, s in zip(configs, setups) if c.size == "7b" and c.label in campaign.GRID_MODELS
            and not s.recipe and not c.alloc_conf and c is not edge][len(campaign.GRID_MODELS):]
    distance = [(s.seq != 2048) + (not s.grad_ckpt) + (s.optimizer != "adamw") for s in tail]
    assert distance == sorted(distance) and distance[0] == 1


def test_select_picks_matrix_positions():
    assert campaign._ranges("1-3,7", 10) == [1, 2, 3, 7]
    with pytest.raises(SystemExit, match="from 1 to 10"):
        campaign._ranges("9-11", 10)


def test_pack_snapshots_fits_parts_in_campaign_order(tmp_path):
    import tarfile

    folder, out = tmp_path / "records", tmp_path / "out"
    folder.mkdir()
    out.mkdir()
    rows = []
    for i, size in enumerate((300_000, 300_000, 300_000, 2_000_000)):
        name = f"r{i}.snapshot.pickle"
        (folder / name).write_bytes(os.urandom(size))      # incompressible: the gzip is as large
        rows.append(json.dumps({"snapshot": name}))
    rows.append(json.dumps({"snapshot": None}))
    bundle = tmp_path / "c.jsonl"
    bundle.write_text("\n".join(rows) + "\n")
    assert campaign.pack_snapshots(str(bundle), str(folder), str(out), part_mib=0.7, parts=1) == 0
    parts = sorted(p.name for p in out.iterdir())
    assert parts == ["snapshots-1.tar"]                      # one part of at most 0.7 MiB
    with tarfile.open(out / "snapshots-1.tar") as tar:
        assert tar.getnames() == ["r0.snapshot.pickle.gz", "r1.snapshot.pickle.gz"]
    assert (out / "snapshots-1.tar").stat().st_size <= 0.7 * 2**20


def test_pack_snapshots_puts_the_largest_reserved_miss_first(tmp_path):
    import tarfile

    folder, out = tmp_path / "records", tmp_path / "out"
    folder.mkdir()
    out.mkdir()
    rows = []
    # (predicted, measured) peak reserved of each run; the skipped one has no measurement
    for i, (predicted, measured) in enumerate(((100, 101), (100, 96), (100, None), (100, 130), (100, 100))):
        name = f"r{i}.snapshot.pickle"
        (folder / name).write_bytes(os.urandom(300_000))
        rows.append(json.dumps({"snapshot": name, "estimate": {"peak_reserved_bytes": predicted},
                                "measured": {"peak_reserved_bytes": measured} if measured else None}))
    bundle = tmp_path / "c.jsonl"
    bundle.write_text("\n".join(rows) + "\n")
    assert campaign.pack_snapshots(str(bundle), str(folder), str(out), part_mib=1.0, parts=1) == 0
    with tarfile.open(out / "snapshots-1.tar") as tar:   # three fit: 23% off, 4% off, 1% off
        assert tar.getnames() == ["r3.snapshot.pickle.gz", "r1.snapshot.pickle.gz", "r0.snapshot.pickle.gz"]


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
    assert [d["model_ref"] for d in lines] == list(campaign.FAMILY_DEFAULTS[:2])
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
    assert {"campaign.jsonl", "campaign.log", "summary.md", "env.txt"} <= names
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

