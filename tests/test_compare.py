"""`vramplan compare`: predicted vs measured per component and in total, error and tolerance, NVML
context and allocator overhead, JSON / CSV / Markdown outputs. Records here are test fixtures
built in tmp folders (GPU-shaped ones included); none is written under profiles/."""
import json
from dataclasses import replace

import pytest

from vramplan.cli import main
from vramplan.core._errors import VramplanError
from vramplan.profile import _store as store
from vramplan.profile._compare import REST, compare_path, compare_record, error_table_markdown
from vramplan.profile._record import Failure, Measured, NvmlTrace, PhaseStats, Record, estimate_dict, model_dict
from vramplan.core._setup import TrainSetup

CONFIG = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256}
MiB = 2**20


def gpu_shaped(scale_alloc=1.0, nvml=True, status="ok", **over) -> Record:
    """A record shaped like a GPU run: inventory + torch counters + NVML; the measured numbers
    are the prediction scaled, so errors are known exactly."""
    from vramplan.estimate._estimator import estimate
    from vramplan.core._models import spec_from_config

    spec = spec_from_config(CONFIG, "tiny", "test")
    setup = TrainSetup(seq=64)
    est = estimate(spec, setup)
    measured_alloc = int(est.peak_allocated_bytes / scale_alloc)
    inv = {c: est.components[c] for c in ("weights", "quant_constants", "adapters", "optimizer_state")}
    inv["gradients"] = est.phase_components["optimizer"]["gradients"]
    m = Measured(counter="torch.cuda", peak_allocated_bytes=measured_alloc, peak_reserved_bytes=measured_alloc + MiB,
                 peak_phase="backward", peak_step=1, run_peak_allocated_bytes=measured_alloc,
                 run_peak_reserved_bytes=measured_alloc + MiB, phase_peaks={"backward": measured_alloc},
                 inventory=inv, components_at_peak=None, paged_optimizer_bytes=0,
                 phases=(PhaseStats("backward", 1, False, 0, 0, measured_alloc, t_start=1.0, seconds=1.0),))
    context = 520 * MiB
    device_total = measured_alloc + context + 30 * MiB
    nv = NvmlTrace(available=True, device_index=0, target_hz=200, rate_hz=199.0, samples=400,
                   query_seconds_mean=2e-5, overhead_fraction=0.004, baseline_used_bytes=600 * MiB,
                   context_bytes=500 * MiB, context_end_bytes=context, peak_used_bytes=device_total,
                   run_peak_used_bytes=device_total, trace=((0.5, context), (1.5, device_total)),
                   markers=((1.0, 1, "backward"),)) if nvml else NvmlTrace(False, "--device cpu")
    err = {"allocated": (est.peak_allocated_bytes - measured_alloc) / measured_alloc,
           "device_total": (est.device_total_bytes - device_total) / device_total if nvml else None}
    from vramplan.profile._record import tolerances_for
    fields = dict(id=f"tiny_{scale_alloc}", created="2026-01-01T00:00:00Z", status=status, model_ref="tiny",
                  model=model_dict(spec), setup=setup.to_dict(), run={"device": "cuda:0", "steps": 2, "warmup": 1},
                  environment={"gpu": "NVIDIA H200", "gpu_memory_bytes": 150 * 10**9}, estimate=estimate_dict(est),
                  measured=m, nvml=nv, error=err, tolerance=tolerances_for(err))
    fields.update(over)
    return Record(**fields)


def test_gpu_shaped_rows_add_up_to_the_totals():
    rec = gpu_shaped(1.10)
    c = compare_record(rec)
    assert c.prediction == "current"
    assert c.error_allocated == pytest.approx(0.10, abs=1e-6)
    rows = {r.component: r for r in c.rows}
    assert REST in rows and rows["weights"].error == 0
    # (the rest row and the allocator overhead are defined as remainders, so sums of rows are not checked)
    # NVML: context at the end of the run (520 MiB), overhead = device total - context - peak (30 MiB)
    assert rows["cuda_context"].measured == 520 * MiB
    assert rows["allocator_overhead"].measured == 30 * MiB
    assert c.within_tolerance is True


def test_tolerance_is_enforced_against_the_current_estimate():
    rec = gpu_shaped(1.10)
    # the same measurement with a tighter recorded tolerance: the current estimate is out of it
    tight = replace(rec, tolerance={"allocated": 0.05, "device_total": None})
    c = compare_record(tight)
    assert c.within_tolerance is False
    assert [(m, ok) for m, _, _, ok in c.checks()] == [("allocated", False)]


def test_recorded_prediction_is_used_on_request():
    rec = gpu_shaped(1.0)
    rec = replace(rec, estimate={**rec.estimate, "peak_allocated_bytes": rec.estimate["peak_allocated_bytes"] * 2})
    assert compare_record(rec, recorded=True).error_allocated == pytest.approx(1.0)
    assert compare_record(rec).error_allocated == pytest.approx(0.0, abs=1e-6)


def test_unknown_architecture_falls_back_to_the_recorded_prediction():
    rec = gpu_shaped(1.0)
    rec = replace(rec, model={**rec.model, "config": {**rec.model["config"], "model_type": "nope"}})
    c = compare_record(rec)
    assert c.prediction == "recorded" and "cannot re-estimate" in c.notes[0]


def test_oom_record_is_a_lower_bound():
    rec = gpu_shaped(1.0, status="oom", measured=None,
                     failure=Failure("oom", "CUDA out of memory", step=1, phase="backward",
                                     last_peak_allocated_bytes=10**9),
                     tolerance={"allocated_lower_bound": 0.03})
    c = compare_record(rec)
    assert c.measured_allocated == 10**9 and c.lower_bound_error < 0
    assert c.within_tolerance is False        # the estimate predicts less than was already allocated
    assert "oom at step 1, backward" in c.failure


def test_skipped_record_has_no_check(tmp_path):
    rec = gpu_shaped(1.0, status="skipped", measured=None, nvml=False, failure=Failure("skipped", "budget"),
                     error={"allocated": None, "device_total": None}, tolerance={})
    c = compare_record(rec)
    assert c.within_tolerance is None and c.rows == () and c.measured_allocated is None


def test_cli_compare_outputs(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    store.write_record(gpu_shaped(1.10), tmp_path / "p")
    store.write_record(gpu_shaped(0.95, nvml=False), tmp_path / "p")
    assert main(["compare", str(tmp_path / "p")]) == 0
    out = capsys.readouterr().out
    assert "Predicted vs measured" in out and "NVIDIA H200" in out
    assert main(["compare", str(tmp_path / "p"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert sorted(round(d["error_allocated"], 4) for d in data) == [-0.05, 0.1]
    assert main(["compare", str(tmp_path / "p"), "--markdown"]) == 0
    md = capsys.readouterr().out
    assert md.startswith("| model |") and "+10.0%" in md


@pytest.mark.pandas
def test_cli_compare_csv(tmp_path, capsys):
    store.write_record(gpu_shaped(1.10), tmp_path / "p")
    store.write_record(gpu_shaped(0.95, nvml=False), tmp_path / "p")
    assert main(["compare", str(tmp_path / "p"), "--csv", str(tmp_path / "c.csv")]) == 0
    capsys.readouterr()
    import pandas as pd
    df = pd.read_csv(tmp_path / "c.csv")
    assert len(df) == 2 and {"error_allocated", "weights_measured_bytes", "cuda_context_measured_bytes"} <= set(df)
    assert main(["compare", str(tmp_path / "p"), "--csv", "-"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("record_id,")
    import csv
    import io
    for row in csv.DictReader(io.StringIO(text)):   # bytes stay integers, blank where unknown
        assert all("." not in v for k, v in row.items() if k.endswith("_bytes"))


def test_cli_compare_strict_and_errors(tmp_path, capsys):
    rec = gpu_shaped(1.10)
    store.write_record(replace(rec, tolerance={"allocated": 0.05}), tmp_path)
    assert main(["compare", str(tmp_path), "--strict"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Error: 1 record(s) beyond their tolerance") and err.count("\n") == 1
    assert main(["compare", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.startswith("Error: no such file or folder")
    (tmp_path / "bad.json").write_text("{not json")
    assert main(["compare", str(tmp_path / "bad.json")]) == 1
    assert capsys.readouterr().err.startswith("Error: cannot read record")


def test_markdown_table_rows():
    md = error_table_markdown([compare_record(gpu_shaped(1.10)), compare_record(gpu_shaped(1.0, nvml=False))])
    lines = md.strip().splitlines()
    assert len(lines) == 4 and lines[2].count("|") == lines[0].count("|")


def test_compare_path_reads_files_and_folders(tmp_path):
    p = store.write_record(gpu_shaped(1.0), tmp_path)
    assert len(compare_path(p)) == 1 and len(compare_path(tmp_path)) == 1
    with pytest.raises(VramplanError):
        compare_path(tmp_path / "nothing-here")


# --- reserved next to allocated; malformed records; folders; output destinations --------------------

def test_reserved_is_compared_next_to_allocated(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    rec = gpu_shaped(1.10)
    oom = gpu_shaped(1.0, status="oom", id="tiny_oom",
                     measured=replace(rec.measured, peak_allocated_bytes=None, peak_reserved_bytes=None),
                     failure=Failure("oom", "CUDA out of memory", step=1, phase="backward",
                                     last_peak_allocated_bytes=10**9, last_reserved_bytes=2 * 10**9),
                     tolerance={"allocated_lower_bound": 0.03})
    cpu = gpu_shaped(1.0, nvml=False, id="tiny_cpu", measured=replace(rec.measured, peak_reserved_bytes=None))
    for r in (rec, oom, cpu):
        store.write_record(r, tmp_path)
    assert main(["compare", str(tmp_path), "--json"]) == 0
    data = {d["record_id"]: d for d in json.loads(capsys.readouterr().out)}
    ok = data["tiny_1.1"]
    assert ok["measured_reserved_bytes"] == rec.measured.peak_reserved_bytes
    assert isinstance(ok["predicted_reserved_bytes"], int) and ok["predicted_reserved_bytes"] > 0
    assert ok["error_reserved"] == pytest.approx(
        (ok["predicted_reserved_bytes"] - ok["measured_reserved_bytes"]) / ok["measured_reserved_bytes"])
    for rid in ("tiny_oom", "tiny_cpu"):   # no reserved measurement: null, never a made-up number
        assert data[rid]["measured_reserved_bytes"] is None and data[rid]["error_reserved"] is None
        assert isinstance(data[rid]["predicted_reserved_bytes"], int)
    assert main(["compare", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if "alloc" in line and "reserved" in line)
    assert header.index("alloc") < header.index("reserved")
    assert "torch.cuda.max_memory_allocated / max_memory_reserved" in out


@pytest.mark.pandas
def test_csv_has_the_reserved_columns(tmp_path, capsys):
    store.write_record(gpu_shaped(1.10), tmp_path)
    assert main(["compare", str(tmp_path), "--csv", "-"]) == 0
    import csv
    import io
    row = next(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert {"predicted_reserved_bytes", "measured_reserved_bytes", "error_reserved"} <= set(row)
    assert row["measured_reserved_bytes"] == str(gpu_shaped(1.10).measured.peak_reserved_bytes)


@pytest.mark.parametrize("mode", [[], ["--json"], ["--markdown"], pytest.param(["--csv", "-"], marks=pytest.mark.pandas)])
@pytest.mark.parametrize("path, value, message", [
    (("measured", "peak_allocated_bytes"), "9.3GiB",
     'measured.peak_allocated_bytes must be a whole number of bytes >= 0 and below 2**63, got "9.3GiB"'),
    (("measured", "peak_reserved_bytes"), "x", 'measured.peak_reserved_bytes must be a whole number of bytes >= 0 and below 2**63, got "x"'),
    (("nvml",), "x", 'nvml must be an object, got "x"'),
    (("run",), "x", 'run must be an object, got "x"'),
    (("estimate", "gpu"), {"name": "x"}, "estimate.gpu.memory_bytes is missing"),
])
def test_a_malformed_record_is_one_line_in_every_output_mode(tmp_path, capsys, mode, path, value, message):
    data = gpu_shaped(1.0).to_dict()
    target = data
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    f = tmp_path / "rec.json"
    f.write_text(json.dumps(data))
    assert main(["compare", str(f), *mode]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (f"Error: cannot read record {f}: malformed profile record: {message} "
                            "(hint: was it written by a newer vramplan, or edited by hand?)\n")


def test_a_future_schema_is_refused(tmp_path, capsys):
    f = tmp_path / "rec.json"
    f.write_text(json.dumps(dict(gpu_shaped(1.0).to_dict(), schema="vramplan.profile/2")))
    assert main(["compare", str(f), "--json"]) == 1
    assert capsys.readouterr().err == (
        f"Error: cannot read record {f}: record schema vramplan.profile/2 is newer than the one this vramplan reads "
        "(vramplan.profile/1) (hint: upgrade vramplan (pip install -U vramplan) to read it)\n")


def test_a_folder_compares_the_readable_records_and_warns_about_the_rest(tmp_path, capsys):
    good = store.write_record(gpu_shaped(1.0), tmp_path)
    (tmp_path / "cut.json").write_text(good.read_text()[:300])
    (tmp_path / "newer.json").write_text(json.dumps(dict(gpu_shaped(1.0).to_dict(), schema="vramplan.profile/2")))
    assert main(["compare", str(tmp_path), "--json"]) == 0
    captured = capsys.readouterr()
    assert [d["path"] for d in json.loads(captured.out)] == [str(good)]
    lines = captured.err.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"Warning: skipped {tmp_path / 'cut.json'}: not valid JSON (")
    assert lines[1].startswith(f"Warning: skipped {tmp_path / 'newer.json'}: record schema vramplan.profile/2 is newer")
    # --strict: any file that is not a readable record is the error, and nothing is printed
    assert main(["compare", str(tmp_path), "--json", "--strict"]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert captured.err.startswith(f"Error: cannot read record {tmp_path / 'cut.json'}: not valid JSON (")
    # no readable record at all: one Error line that names the file and why
    good.unlink()
    (tmp_path / "newer.json").unlink()
    assert main(["compare", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"Error: no readable profile records in {tmp_path}: {tmp_path / 'cut.json'}: not valid JSON (")
    assert err.count("\n") == 1


@pytest.mark.parametrize("argv, code, message", [
    (["--csv", ""], 2, "Error: --csv needs a file name (hint: e.g. --csv errors.csv, or --csv - for stdout)\n"),
    (["--csv", "{tmp}"], 2, "Error: --csv {tmp} is a folder (hint: give a file name, e.g. --csv table.csv)\n"),
    (["--csv", "{tmp}/file/x.csv"], 2, "Error: --csv {tmp}/file/x.csv: {tmp}/file is not a folder "
                                       "(hint: write the file into an existing folder)\n"),
    (["--csv", "-", "--json"], 2, "Error: --json and --csv - both print to stdout "
                                  "(hint: give one of them, or write the CSV to a file: --csv FILE)\n"),
    (["--csv", "-", "--markdown"], 2, "Error: --markdown and --csv - both print to stdout "
                                      "(hint: give one of them, or write the CSV to a file: --csv FILE)\n"),
])
def test_output_destinations_are_checked_before_comparing(tmp_path, capsys, argv, code, message):
    rec = store.write_record(gpu_shaped(1.0), tmp_path / "p")
    (tmp_path / "file").write_text("x")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(["compare", str(rec), *argv]) == code
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == message.replace("{tmp}", str(tmp_path))
    assert sorted(f.name for f in tmp_path.iterdir()) == ["file", "p"]


def test_a_paged_records_context_row_compares_like_for_like(capsys):
    """NVML's context figure holds the resident paged optimizer state; the prediction it is
    compared with holds it too (the H200 paged_adamw record: within 2%, where the bare context
    was 62% under)."""
    from pathlib import Path

    from vramplan.profile._compare import compare_record
    from vramplan.profile._store import read_records

    path = next((Path(__file__).parent.parent / "profiles/h200").glob("Meta-Llama-3-8B_*_paged_adamw_cuda_*.json"))
    (_, record), = read_records(path)
    rows = {r.component: r for r in compare_record(record).rows}
    assert rows["paged_optimizer"].predicted > 0 and not rows["paged_optimizer"].in_total
    assert abs(rows["cuda_context"].error) < 0.02


@pytest.mark.parametrize("recorded_estimate", [None, {}, "no context"])
def test_a_record_without_a_recorded_prediction_compares_with_dashes(recorded_estimate):
    """A record may hold no prediction (null, {}, or no cuda_context among its device components):
    --recorded shows '-' for what it lacks; it ended with a TypeError adding None to the context."""
    rec = gpu_shaped()
    if recorded_estimate == "no context":
        est = dict(rec.estimate, device_components={k: v for k, v in rec.estimate["device_components"].items()
                                                    if k != "cuda_context"})
    else:
        est = recorded_estimate
    c = compare_record(replace(rec, estimate=est), recorded=True)
    row = next(r for r in c.rows if r.component == "cuda_context")
    assert row.predicted is None and row.measured is not None
    json.dumps(c.to_dict())
