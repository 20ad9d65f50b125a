"""Profile records: schema round trip, the tolerance rule, atomic files, reading folders.
Pure Python: no torch."""
import json
import os

import pytest

from vramplan.core._errors import UsageError, VramplanError
from vramplan.profile import _store as store
from vramplan.profile._record import (SCHEMA, Failure, Measured, NvmlTrace, PhaseStats, Record, errors_for,
                                     relative_error, setup_from_record, spec_from_record, tolerance_for)
from vramplan.core._setup import TrainSetup

CONFIG = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256}


def make_record(status="ok", setup=None, **over) -> Record:
    from vramplan.estimate._estimator import estimate
    from vramplan.core._models import spec_from_config
    from vramplan.profile._record import estimate_dict, model_dict

    spec = spec_from_config(CONFIG, "tiny", "test")
    setup = setup or TrainSetup(seq=64)
    est = estimate(spec, setup)
    phases = (PhaseStats("load", None, False, 0, 1000, 1200),
              PhaseStats("forward", 0, True, 1000, 2000, 2500, t_start=1.0, seconds=0.5),
              PhaseStats("forward", 1, False, 1000, 2000, 2400, t_start=2.0, seconds=0.5))
    measured = Measured(counter="tracker", peak_allocated_bytes=2400, peak_reserved_bytes=None, peak_phase="forward",
                        peak_step=1, run_peak_allocated_bytes=2500, run_peak_reserved_bytes=None,
                        phase_peaks={"load": 1200, "forward": 2400}, inventory={"weights": 512},
                        components_at_peak=None, paged_optimizer_bytes=0, phases=phases, losses=(5.5,))
    fields = dict(id="tiny_test", created="2026-01-01T00:00:00Z", status=status, model_ref="tiny",
                  model=model_dict(spec), setup=setup.to_dict(), run={"device": "cpu", "steps": 1, "warmup": 1},
                  environment={"torch": "x"}, estimate=estimate_dict(est), measured=measured,
                  nvml=NvmlTrace(available=False, reason="--device cpu"), error={"allocated": 0.1},
                  tolerance={"allocated": 0.11})
    fields.update(over)
    return Record(**fields)


def test_record_round_trip():
    rec = make_record(failure=Failure("oom", "CUDA out of memory", step=1, phase="backward",
                                      last_peak_allocated_bytes=10))
    data = json.loads(json.dumps(rec.to_dict()))
    back = Record.from_dict(data)
    assert back == rec
    assert data["schema"] == SCHEMA
    assert all(isinstance(p["peak_allocated"], int) for p in data["measured"]["phases"])


def test_record_rebuilds_its_inputs():
    rec = make_record(setup=TrainSetup(method="lora", seq=64, targets=("q_proj", "v_proj")))
    setup = setup_from_record(rec.setup)
    assert setup.method == "lora" and setup.targets == ("q_proj", "v_proj")
    spec = spec_from_record(rec.model)
    assert spec.hidden == 64 and spec.kv_heads == 2


def test_not_a_record_is_a_clear_error():
    with pytest.raises(VramplanError, match="not a vramplan profile record"):
        Record.from_dict({"hello": 1})
    with pytest.raises(VramplanError, match="malformed profile record"):
        Record.from_dict({"schema": SCHEMA, "id": "x"})


@pytest.mark.parametrize("error, tol", [(0.0, 0.03), (0.005, 0.03), (0.05, 0.06), (-0.1, 0.11), (0.0234, 0.034)])
def test_tolerance_rule(error, tol):
    # max(3 %, |error| + 1 pp), rounded up to 0.1 pp (profiles/README.md)
    assert tolerance_for(error) == pytest.approx(tol)
    assert tolerance_for(error) >= abs(error) + 0.01 - 1e-12
    assert tolerance_for(None) is None


def test_relative_error_sign():
    assert relative_error(110, 100) == pytest.approx(0.10)   # overestimate is positive
    assert relative_error(90, 100) == pytest.approx(-0.10)
    assert relative_error(1, 0) is None and relative_error(None, 1) is None
    assert errors_for(110, None, 100, 5) == {"allocated": pytest.approx(0.1), "device_total": None}


def test_atomic_write_and_unique_names(tmp_path):
    rec = make_record()
    p1 = store.write_record(rec, tmp_path / "profiles")
    p2 = store.write_record(rec, tmp_path / "profiles")
    assert p1 != p2 and p1.exists() and p2.exists()
    assert [f.name for f in (tmp_path / "profiles").iterdir() if f.name.startswith(".")] == []
    assert Record.from_dict(json.loads(p1.read_text())) == rec


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
    def boom(src, dst):
        raise KeyboardInterrupt
    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        store.write_record(make_record(), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_out_must_be_a_folder(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(UsageError, match="is a file"):
        store.write_record(make_record(), f)


def test_reading_a_folder_skips_hidden_and_foreign_files(tmp_path):
    store.write_record(make_record(), tmp_path / "a")
    store.write_record(make_record(status="skipped", measured=None), tmp_path / "a" / "b")
    (tmp_path / "a" / ".tmp-1-x.json").write_text("{half")
    (tmp_path / "a" / "other.json").write_text('{"not": "a record"}')
    (tmp_path / "a" / "README.md").write_text("# hi")
    records = store.read_records(tmp_path / "a")
    assert sorted(r.status for _, r in records) == ["ok", "skipped"]
    with pytest.raises(VramplanError, match="not a vramplan profile record"):
        store.read_records(tmp_path / "a" / "other.json")
    with pytest.raises(UsageError, match="no such file or folder"):
        store.read_records(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(VramplanError, match="no profile records"):
        store.read_records(tmp_path / "empty")


def test_record_ids_are_file_names():
    rid = store.record_id("meta-llama/Llama-2-7b-hf", TrainSetup(seq=2048).to_dict(), "cuda:0", "2026-01-02T03:04:05Z")
    assert rid == "Llama-2-7b-hf_qlora-nf4_b1_s2048_gc_adamw_cuda_20260102T030405"
    reentrant = TrainSetup(seq=2048, reentrant=True).to_dict()
    assert "_s2048_gcr_adamw_" in store.record_id("meta-llama/Llama-2-7b-hf", reentrant, "cuda:0", "2026-01-02T03:04:05Z")
    assert store.slug("../weird name/..") == "model"
    assert store.slug("/data/my model (v2)/") == "my_model_v2"


def test_profile_package_and_compare_import_nothing_heavy(tmp_path):
    import subprocess
    import sys

    store.write_record(make_record(), tmp_path)
    code = ("import sys, contextlib, io\n"
            "import vramplan.profile, vramplan.cli._profile\n"
            "from vramplan.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            f"    assert main(['compare', {str(tmp_path)!r}, '--json']) == 0\n"
            "heavy = [m for m in ('torch', 'transformers', 'peft', 'bitsandbytes', 'pandas', 'numpy', 'pynvml',\n"
            "                     'matplotlib') if m in sys.modules]\n"
            "print(','.join(heavy))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""


def test_progress_follows_the_events():
    pytest.importorskip("rich")
    from vramplan.render._profile_tables import Progress

    bar = Progress(total_steps=2, device="cuda", enabled=False)
    with bar:
        bar({"event": "context", "available": True})
        bar({"event": "phase", "stage": "start", "phase": "load", "step": None, "allocated": 0})
        bar({"event": "phase", "stage": "end", "stats": {"phase": "load", "allocated_end": 3 * 2**30,
                                                          "peak_allocated": 4 * 2**30}})
        bar({"event": "phase", "stage": "start", "phase": "forward", "step": 0, "allocated": 3 * 2**30})
        bar({"event": "nvml", "used": 5 * 2**30})
    assert (bar.phase, bar.step, bar.peak, bar.nvml) == ("forward", 0, 4 * 2**30, 5 * 2**30)
    task = bar.bar.tasks[0]
    assert task.completed == 1 and task.description == "step 1 forward"
    assert "peak 4.00 GiB" in task.fields["mem"] and "device 5.00 GiB" in task.fields["mem"]


# --- reading records: the shape is checked once, at load -------------------------------------------

def test_a_newer_schema_is_refused_with_an_upgrade_hint():
    data = dict(make_record().to_dict(), schema="vramplan.profile/2")
    with pytest.raises(VramplanError) as exc:
        Record.from_dict(data)
    assert exc.value.message == ("record schema vramplan.profile/2 is newer than the one this vramplan reads "
                                 "(vramplan.profile/1)")
    assert exc.value.hint == "upgrade vramplan (pip install -U vramplan) to read it"


def test_an_unknown_status_is_refused():
    # (oom / timeout / crashed / skipped records have no complete measurement: null is their value)
    for status in ("oom", "timeout", "crashed", "skipped"):
        rec = make_record(status=status, measured=None, failure=Failure(status, "x"))
        assert Record.from_dict(json.loads(json.dumps(rec.to_dict()))) == rec
    with pytest.raises(VramplanError) as exc:
        Record.from_dict(dict(make_record().to_dict(), status="weird"))
    assert exc.value.message == ('malformed profile record: unknown status "weird" '
                                 "(one of ok, oom, error, crashed, timeout, skipped)")


_DELETE = object()


def _set(path: str, value):
    """A change to a record's dict: set the field at dotted `path` (_DELETE: delete it)."""
    def change(d):
        *parents, last = path.split(".")
        for p in parents:
            d = d[p]
        if value is _DELETE:
            del d[last]
        else:
            d[last] = value
    return change


@pytest.mark.parametrize("path, value, message", [
    ("measured.peak_allocated_bytes", "9.3GiB",
     'measured.peak_allocated_bytes must be a whole number of bytes >= 0 and below 2**63, got "9.3GiB"'),
    ("measured.peak_allocated_bytes", 1.5e10,
     "measured.peak_allocated_bytes must be a whole number of bytes >= 0 and below 2**63, got 15000000000.0"),
    ("measured.peak_allocated_bytes", True, "measured.peak_allocated_bytes must be a whole number of bytes >= 0 and below 2**63, got true"),
    ("measured.peak_allocated_bytes", -1, "measured.peak_allocated_bytes must be a whole number of bytes >= 0 and below 2**63, got -1"),
    ("measured.peak_allocated_bytes", 2**63,
     f"measured.peak_allocated_bytes must be a whole number of bytes >= 0 and below 2**63, got {2**63}"),
    ("measured.peak_allocated_bytes", None, "an ok record has no measured.peak_allocated_bytes"),
    ("measured.peak_allocated_bytes", _DELETE, "an ok record has no measured.peak_allocated_bytes"),
    ("measured.peak_allocated_bytes", float("nan"),
     "measured.peak_allocated_bytes is NaN (NaN and Infinity are no JSON numbers)"),
    ("measured.peak_reserved_bytes", "x", 'measured.peak_reserved_bytes must be a whole number of bytes >= 0 and below 2**63, got "x"'),
    ("measured.phases", [{"phase": "load"}], "measured.phases[0].warmup is missing"),
    ("measured", "x", 'measured must be an object, got "x"'),
    ("measured", [], "measured must be an object, got a list"),
    ("measured", None, "an ok record has no measured.peak_allocated_bytes"),
    ("nvml", "x", 'nvml must be an object, got "x"'),
    ("nvml.peak_used_bytes", "x", 'nvml.peak_used_bytes must be a whole number of bytes >= 0 and below 2**63, got "x"'),
    ("run", "x", 'run must be an object, got "x"'),
    ("run.memory_limit_bytes", "x", 'run.memory_limit_bytes must be a whole number of bytes >= 0 and below 2**63, got "x"'),
    ("model", "x", 'model must be an object, got "x"'),
    ("model", _DELETE, "model is missing"),
    ("environment", "x", 'environment must be an object, got "x"'),
    ("estimate", "x", 'estimate must be an object, got "x"'),
    ("estimate.gpu", {"name": "x"}, "estimate.gpu.memory_bytes is missing"),
    ("estimate.gpu", {"name": "x", "memory_bytes": "lots"}, 'estimate.gpu.memory_bytes must be a whole number >= 1, got "lots"'),
    ("setup", "x", 'setup must be an object, got "x"'),
    ("setup.batch", "1", 'setup.batch must be a whole number >= 1, got "1"'),
    ("failure", "x", 'failure must be an object, got "x"'),
    ("failure", {"bogus": 1}, "failure.kind is missing"),
    ("tolerance", [], "tolerance must be an object, got a list"),
    ("tolerance.allocated", "x", 'tolerance.allocated must be a finite number >= 0, got "x"'),
    ("notes", 5, "notes must be a list, got 5"),
    ("id", ["x"], "id must be a string, got a list"),
])
def test_malformed_records_are_refused_at_load(path, value, message):
    data = json.loads(json.dumps(make_record().to_dict()))
    _set(path, value)(data)
    with pytest.raises(VramplanError) as exc:
        Record.from_dict(data)
    assert exc.value.message == f"malformed profile record: {message}"
    assert exc.value.hint == "was it written by a newer vramplan, or edited by hand?"


def test_a_record_file_with_nan_is_refused(tmp_path):
    path = store.write_record(make_record(), tmp_path)
    text = path.read_text().replace('"error": {\n  "allocated": 0.1', '"error": {\n  "allocated": NaN')
    assert "NaN" in text
    path.write_text(text)
    with pytest.raises(VramplanError) as exc:
        store.read_record(path)
    assert exc.value.message == (f"cannot read record {path}: malformed profile record: "
                                 "error.allocated is NaN (NaN and Infinity are no JSON numbers)")


def test_a_folder_skips_unreadable_records_and_says_which(tmp_path):
    good = store.write_record(make_record(), tmp_path)
    (tmp_path / "cut.json").write_text(good.read_text()[:200])
    (tmp_path / "newer.json").write_text(json.dumps(dict(make_record().to_dict(), schema="vramplan.profile/2")))
    (tmp_path / "other.json").write_text('{"not": "a record"}')   # another kind of file: passed over quietly
    skipped = []
    records = store.read_records(tmp_path, on_skip=lambda f, exc: skipped.append((f.name, exc.message)))
    assert [p for p, _ in records] == [good]
    assert [name for name, _ in skipped] == ["cut.json", "newer.json"]
    assert skipped[0][1].startswith("not valid JSON (Unterminated string")
    assert skipped[1][1].startswith("record schema vramplan.profile/2 is newer")
    with pytest.raises(VramplanError) as exc:
        store.read_records(tmp_path, strict=True)
    assert exc.value.message.startswith(f"cannot read record {tmp_path / 'cut.json'}: not valid JSON")


def test_a_folder_without_a_readable_record_is_an_error(tmp_path):
    good = store.write_record(make_record(), tmp_path / "src")
    (tmp_path / "cut.json").write_text(good.read_text()[:200])
    with pytest.raises(VramplanError) as exc:
        store.read_records(tmp_path / "cut.json")
    assert exc.value.message.startswith(f"cannot read record {tmp_path / 'cut.json'}: not valid JSON")
    folder = tmp_path / "only"
    folder.mkdir()
    (tmp_path / "cut.json").rename(folder / "cut.json")
    with pytest.raises(VramplanError) as exc:
        store.read_records(folder)
    assert exc.value.message.startswith(f"no readable profile records in {folder}: {folder / 'cut.json'}: "
                                        "not valid JSON (Unterminated string")


def test_probing_a_folder_leaves_nothing(tmp_path):
    store.probe_folder(tmp_path / "a" / "b")
    assert list(tmp_path.iterdir()) == []
    store.probe_folder(tmp_path)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError):
        store.probe_folder(tmp_path / "file" / "sub")
    assert [f.name for f in tmp_path.iterdir()] == ["file"]


def test_a_diverged_loss_is_recorded_as_null():
    from vramplan.profile._session import ProfileOptions, _measured, _State

    state = _State(phases=[PhaseStats("forward", 0, False, 0, 10, 20)], result={"losses": [float("nan"), 5.5]})
    m = _measured(state, ProfileOptions(device="cpu"))
    assert m.losses == (None, 5.5)
    rec = make_record(measured=m)
    assert Record.from_dict(json.loads(json.dumps(rec.to_dict(), allow_nan=False))) == rec
