"""Every committed profile record, replayed through the current estimator.

A record under profiles/ is a real measurement with the tolerance it was committed with
(profiles/README.md: max(3 %, |error at recording| + 1 pp)). This test recomputes each
prediction with today's estimator and fails when a record's error grows past its tolerance, so a
change that makes agreement with a real GPU worse cannot pass CI. Records that are not complete
measurements (skipped, crashed, timeout) are checked for schema only; an out-of-memory record
checks that the estimate does not predict less than what was already allocated when it failed.
"""
from pathlib import Path

import pytest

from vramplan.profile.compare import compare_record
from vramplan.profile.record import STATUSES, tolerance_for
from vramplan.profile.store import read_record, record_files

PROFILES = Path(__file__).resolve().parents[1] / "profiles"
RECORDS = record_files(PROFILES) if PROFILES.is_dir() and any(PROFILES.rglob("*.json")) else []


def problems(path) -> list[str]:
    """What is wrong with one record under the current estimator (empty: it replays)."""
    rec = read_record(path)
    out = []
    if rec.status not in STATUSES:
        out.append(f"unknown status {rec.status!r}")
    m = rec.measured
    if rec.status == "ok":
        if m is None or m.peak_allocated_bytes is None:
            return out + ["status ok without a measured peak"]
        steady = [p.peak_allocated for p in m.phases if p.step is not None and not p.warmup]
        if steady and max(steady) != m.peak_allocated_bytes:
            out.append("peak_allocated_bytes is not the largest measured-step phase peak")
        if m.components_at_peak and sum(m.components_at_peak.values()) != m.peak_allocated_bytes:
            out.append("components_at_peak do not add up to the peak")
        for metric in ("allocated", "device_total"):
            err, tol = rec.error.get(metric), rec.tolerance.get(metric)
            if err is not None and (tol is None or tol + 1e-9 < tolerance_for(err)):
                out.append(f"{metric}: tolerance {tol} is tighter than the rule gives for error {err:+.4f}")
    c = compare_record(rec, path)
    if c.prediction != "current":
        out.append("cannot re-estimate: " + "; ".join(c.notes))
    for metric, err, tol, passed in c.checks():
        if not passed:
            out.append(f"{metric}: error {err:+.2%} is beyond the recorded tolerance {tol:.1%} "
                       f"(recorded error {rec.error.get(metric)})")
    return out


@pytest.mark.skipif(not RECORDS, reason="no profile records committed under profiles/ yet "
                                        "(run benchmarks/gpu_campaign.sh on a GPU)")
@pytest.mark.parametrize("path", RECORDS, ids=[str(p.relative_to(PROFILES)) for p in RECORDS])
def test_committed_record_replays_within_tolerance(path):
    found = problems(path)
    assert not found, f"{path.name}: " + "; ".join(found)


def test_replay_catches_a_worse_estimate(tmp_path):
    """The replay logic itself, on a record written here: a tolerance tighter than the current
    error is reported; the recorded one passes."""
    from dataclasses import replace

    from vramplan.estimate.estimator import estimate
    from vramplan.core.models import spec_from_config
    from vramplan.profile.record import (Measured, NvmlTrace, PhaseStats, Record, errors_for, estimate_dict,
                                         model_dict, tolerances_for)
    from vramplan.profile.store import write_record
    from vramplan.core.setup import TrainSetup

    spec = spec_from_config({"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
                             "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 256}, "tiny", "test")
    setup = TrainSetup(seq=64)
    est = estimate(spec, setup)
    measured = est.peak_allocated_bytes * 100 // 104     # the estimate is 4 % high
    m = Measured("torch.cuda", measured, None, "backward", 1, measured, None, {"backward": measured}, {}, None, 0,
                 (PhaseStats("backward", 1, False, 0, 0, measured),))
    err = errors_for(est.peak_allocated_bytes, None, measured, None)
    rec = Record("r", "2026-01-01T00:00:00Z", "ok", "tiny", model_dict(spec), setup.to_dict(), {"device": "cuda"},
                 {}, estimate_dict(est), m, NvmlTrace(False, "test"), err, tolerances_for(err))
    good = write_record(rec, tmp_path)
    assert problems(good) == []
    bad = write_record(replace(rec, id="bad", tolerance={"allocated": 0.02, "device_total": None}), tmp_path)
    found = problems(bad)
    assert any("beyond the recorded tolerance" in p for p in found)
    assert any("tighter than the rule" in p for p in found)
