"""Every committed profile record, replayed through the current estimator, held to FIXED bounds.

A record under profiles/ is a real measurement. This test recomputes each prediction with
today's estimator and compares it with the measurement, with tolerances stated here (not the
ones stored in the record, which were derived from the error at recording time and so could
never fail on the record that set them):
- the persistent tensors (weights, quant_constants, adapters, optimizer_state) are counted from
  the live tensors by the profiler and predicted from the layouts (bitsandbytes, peft, torch
  optimizers): they must agree to the byte;
- the steady-state peak allocated (torch.cuda.max_memory_allocated over the measured steps)
  within ALLOCATED_TOLERANCE;
- the device total NVML saw within DEVICE_TOLERANCE;
- an out-of-memory record: the estimate may not predict less than what was already allocated
  when the run failed (within ALLOCATED_TOLERANCE).
Records that are not complete measurements (skipped, crashed, timeout) are checked for schema only.
"""
import statistics
from dataclasses import replace
from pathlib import Path

import pytest

from vramplan.core._models import spec_from_config
from vramplan.core._setup import TrainSetup
from vramplan.estimate._estimator import estimate
from vramplan.profile._compare import compare_record
from vramplan.profile._record import (STATIC, STATUSES, Measured, NvmlTrace, PhaseStats, Record, errors_for,
                                     estimate_dict, model_dict, tolerances_for)
from vramplan.profile._store import read_record, record_files, write_record

PROFILES = Path(__file__).resolve().parents[1] / "profiles"
RECORDS = record_files(PROFILES) if PROFILES.is_dir() and any(PROFILES.rglob("*.json")) else []

# Peak allocated: the bar tests/test_agreement.py holds the estimate to against the simulated
# step (3 %); a real GPU must meet the same one.
ALLOCATED_TOLERANCE = 0.03
# Device total adds the CUDA context, a model (500 MiB, docs/gpus.md#cuda-context-size) that
# depends on driver and lazily loaded kernels, and caching-allocator slack that depends on the
# order of allocations (docs/published-measurements.md#reserved-above-allocated): 10 %.
DEVICE_TOLERANCE = 0.10


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
            # two measurements: the tracker's live blocks classified, and its running counter
            out.append("components_at_peak do not add up to the measured peak")
    c = compare_record(rec, path)
    if c.prediction != "current":
        return out + ["cannot re-estimate: " + "; ".join(c.notes)]
    if rec.status == "ok":
        for row in c.rows:
            if row.component in STATIC and row.measured is not None and row.predicted != row.measured:
                out.append(f"{row.component}: predicted {row.predicted:,} B, measured {row.measured:,} B "
                           f"(persistent tensors must agree to the byte)")
        for metric, err, tol in (("allocated", c.error_allocated, ALLOCATED_TOLERANCE),
                                 ("device_total", c.error_device_total, DEVICE_TOLERANCE)):
            if err is not None and abs(err) > tol:
                out.append(f"{metric}: error {err:+.2%} is beyond {tol:.0%}")
    elif rec.status == "oom" and c.lower_bound_error is not None and c.lower_bound_error < -ALLOCATED_TOLERANCE:
        out.append(f"out of memory with {c.measured_allocated:,} B allocated, but the estimate is "
                   f"{c.lower_bound_error:+.2%} below that")
    return out


@pytest.mark.skipif(not RECORDS, reason="no profile records committed under profiles/ yet "
                                        "(run benchmarks/gpu_campaign.sh on a GPU)")
@pytest.mark.parametrize("path", RECORDS, ids=[str(p.relative_to(PROFILES)) for p in RECORDS])
def test_committed_record_replays_within_fixed_bounds(path):
    found = problems(path)
    assert not found, f"{path.name}: " + "; ".join(found)


def tiny_record(measured_allocated: int, inventory_delta: int = 0) -> Record:
    """A record of a tiny Llama, measured numbers set here: the checks' own inputs."""
    spec = spec_from_config({"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
                             "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 256}, "tiny", "test")
    setup = TrainSetup(seq=64)
    est = estimate(spec, setup)
    inventory = {c: est.components[c] for c in STATIC}
    inventory["adapters"] += inventory_delta
    m = Measured("torch.cuda", measured_allocated, None, "backward", 1, measured_allocated, None,
                 {"backward": measured_allocated}, inventory, None, 0,
                 (PhaseStats("backward", 1, False, 0, 0, measured_allocated),))
    err = errors_for(est.peak_allocated_bytes, None, measured_allocated, None)
    return Record("r", "2026-01-01T00:00:00Z", "ok", "tiny", model_dict(spec), setup.to_dict(), {"device": "cuda"},
                  {}, estimate_dict(est), m, NvmlTrace(False, "test"), err, tolerances_for(err))


def test_the_bounds_are_fixed_not_the_recorded_tolerance(tmp_path):
    """On records written here: an estimate 2 % high passes; 4 % high fails although the record
    stores a 5 % tolerance; a persistent component off by one block fails."""
    predicted = estimate(spec_from_config({"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
                                           "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 256},
                                          "tiny", "test"), TrainSetup(seq=64)).peak_allocated_bytes
    good = write_record(replace(tiny_record(predicted * 100 // 102), id="good"), tmp_path)
    assert problems(good) == []
    high = tiny_record(predicted * 100 // 104)
    assert high.tolerance["allocated"] >= 0.05          # what the record itself would allow
    found = problems(write_record(replace(high, id="high"), tmp_path))
    assert len(found) == 1 and found[0].startswith("allocated: error +4.") and "beyond 3%" in found[0]
    off = write_record(replace(tiny_record(predicted, inventory_delta=512), id="off"), tmp_path)
    assert problems(off) == [f"adapters: predicted {tiny_record(predicted).measured.inventory['adapters']:,} B, "
                             f"measured {tiny_record(predicted).measured.inventory['adapters'] + 512:,} B "
                             "(persistent tensors must agree to the byte)"]


# The records measured under non-default allocator settings, and the same setup under the
# defaults: the estimate's peak reserved against torch.cuda.max_memory_reserved of each run.
SETTINGS_RECORDS = [p for p in RECORDS if "Meta-Llama-3-8B_qlora-nf4_b1_s2048_gc_adamw_cuda_20261130T01" in p.name]
RESERVED_TOLERANCE = 0.02


@pytest.mark.skipif(not SETTINGS_RECORDS, reason="the allocator-settings records are not committed")
@pytest.mark.parametrize("path", SETTINGS_RECORDS, ids=[p.name for p in SETTINGS_RECORDS])
def test_peak_reserved_under_each_allocator_setting(path):
    """Llama-3-8B QLoRA 1 x 2048 on an H200 under the defaults, expandable_segments,
    max_split_size_mb:128 and garbage_collection_threshold: the replay of the estimate's stream
    under the run's settings gives the reserved peak the real allocator reached, within 2%
    (every layer's forward replayed event by event: estimate/_reserved.py exact_layers_for)."""
    from vramplan.profile._compare import _reestimate
    rec = read_record(path)
    measured = rec.measured.peak_reserved_bytes
    assert measured, "the record holds torch.cuda.max_memory_reserved"
    predicted = _reestimate(rec).peak_reserved_bytes
    assert abs(predicted - measured) <= RESERVED_TOLERANCE * measured, (predicted, measured)


# Peak reserved over every committed GPU record: the estimate's replay against
# torch.cuda.max_memory_reserved. The median says how close the stream is in general, the bound
# on each record that no setup is far off (docs/allocator.md#reduced-detail has the figures).
# Measured with the load as it happens (docs/allocator.md#quantization-on-load): median |error|
# 0.13%, the farthest -3.51% (Llama-3-8B without checkpointing at 2,048 tokens); before it 0.44%
# and -4.11%, when these bounds were 1% and 5%.
RESERVED_MEDIAN = 0.005
RESERVED_EACH = 0.04
GPU_RECORDS = [p for p in RECORDS if "_cuda_" in p.name]


@pytest.mark.skipif(not GPU_RECORDS, reason="no GPU records are committed")
def test_peak_reserved_over_every_gpu_record():
    from vramplan.profile._compare import _reestimate
    errors = {}
    for path in GPU_RECORDS:
        rec = read_record(path)
        if rec.status != "ok" or not rec.measured.peak_reserved_bytes:
            continue
        measured = rec.measured.peak_reserved_bytes
        errors[path.name] = (_reestimate(rec).peak_reserved_bytes - measured) / measured
    assert len(errors) >= 40, "the H200 records hold torch.cuda.max_memory_reserved"
    far = {name: f"{e:+.2%}" for name, e in errors.items() if abs(e) > RESERVED_EACH}
    assert not far, far
    assert statistics.median(abs(e) for e in errors.values()) <= RESERVED_MEDIAN


# Gemma 3 ties lm_head to the embeddings. The random-weights build these records were made with
# (profile/_materialize.py BUILD 1) allocated the tied lm_head (Module.to_empty) at the end of the
# load and freed it once re-shared: one vocab x hidden bf16 segment (576 MiB for Gemma-3-1B, at
# event 4028 of its snapshot) that the caching allocator keeps and later fills with activations.
# Without it in the replay these records were -2.6% and +1.9% (docs/allocator.md#random-weights-load).
TIED_RECORDS = [p for p in GPU_RECORDS if p.name.startswith("gemma-3-")]


@pytest.mark.skipif(not TIED_RECORDS, reason="the Gemma 3 records are not committed")
@pytest.mark.parametrize("path", TIED_RECORDS, ids=[p.name for p in TIED_RECORDS])
def test_tied_embedding_records_replay_their_load(path):
    from vramplan.profile._compare import _reestimate, record_load
    from vramplan.profile._record import setup_from_record, spec_from_record
    rec = read_record(path)
    spec, setup = spec_from_record(rec.model), setup_from_record(rec.setup)
    assert spec.tied and "random_weights_build" not in rec.run
    assert record_load(rec.run, spec, setup)["load_transients"] == (spec.vocab * spec.hidden * 2,)
    measured = rec.measured.peak_reserved_bytes
    assert abs(_reestimate(rec).peak_reserved_bytes - measured) <= 0.01 * measured


def test_the_old_build_s_load_is_replayed_for_its_records_only(tiny_spec):
    from vramplan.profile._compare import record_load
    from vramplan.profile._materialize import BUILD
    tied, untied = tiny_spec(tie_word_embeddings=True), tiny_spec(tie_word_embeddings=False)
    setup = TrainSetup(method="lora", dtype="bf16")
    old = {"random_weights": True}
    assert record_load(old, tied, setup) == {"load_transients": (128 * 64 * 2,), "load_order": "modules"}
    assert record_load(old, tied, setup.with_(dtype="fp32"))["load_transients"] == (128 * 64 * 4,)
    assert record_load(old, untied, setup) == {"load_transients": (), "load_order": "modules"}
    # the current build loads as from_pretrained does, and a checkpoint's run is from_pretrained
    assert record_load({**old, "random_weights_build": BUILD}, tied, setup) == {}
    assert record_load({"random_weights": False}, tied, setup) == {}
