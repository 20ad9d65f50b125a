"""The profile record: one measured run next to the estimate for the same setup.

Pure Python (no torch): records are read by `vramplan compare` and by the replay test on any
machine. The schema is documented in profiles/README.md; `SCHEMA` names its version.

Errors are (predicted - measured) / measured, so a positive error is an overestimate:
- `allocated`: the estimate's peak_allocated_bytes against the largest
  torch.cuda.max_memory_allocated of a measured (post-warm-up) step;
- `device_total`: the estimate's device_total_bytes against NVML's peak device used memory during
  the measured steps, minus what was used before the run created its CUDA context.
`tolerance` (`tolerance_for`) is what `vramplan compare` reports; the replay test holds records
to fixed bounds instead (profiles/README.md#the-tolerance-rule).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from vramplan.core._errors import VramplanError
from vramplan.core._models import spec_from_config
from vramplan.core._setup import TrainSetup

SCHEMA = "vramplan.profile/1"
STATUSES = ("ok", "oom", "error", "crashed", "timeout", "skipped")
METRICS = ("allocated", "device_total")

# The replay rule (profiles/README.md): a record fails when |error| grows past
# max(MIN_TOLERANCE, |recorded error| + TOLERANCE_MARGIN).
MIN_TOLERANCE = 0.03
TOLERANCE_MARGIN = 0.01


def relative_error(predicted: int | None, measured: int | None) -> float | None:
    """(predicted - measured) / measured; None when either side is missing."""
    if predicted is None or measured is None or measured <= 0:
        return None
    return (predicted - measured) / measured


def tolerance_for(error: float | None) -> float | None:
    """The tolerance a record keeps for one metric: max(3 %, |error| + 1 pp), rounded up to 0.1 pp
    so the stored number is readable and never below the rule."""
    if error is None:
        return None
    tol = max(MIN_TOLERANCE, abs(error) + TOLERANCE_MARGIN)
    return math.ceil(tol * 1000 - 1e-9) / 1000


# torch.cuda.memory_stats() keys a record keeps (c10/cuda/CUDACachingAllocator.h DeviceStats)
ALLOCATOR_STATS = ("allocated_bytes.all.current", "allocated_bytes.all.peak", "reserved_bytes.all.current",
                   "reserved_bytes.all.peak", "active_bytes.all.peak", "inactive_split_bytes.all.peak",
                   "segment.all.current", "segment.all.peak", "num_alloc_retries", "num_ooms",
                   "num_device_alloc", "num_device_free")


def allocator_stats(stats: dict) -> dict:
    """The recorded subset of torch.cuda.memory_stats(), ints."""
    return {k: int(stats[k]) for k in ALLOCATOR_STATS if k in stats}


@dataclass(frozen=True)
class PhaseStats:
    """One phase of the run (load, or forward / backward / optimizer of one step)."""
    phase: str
    step: int | None            # None for load; 0-based step index otherwise
    warmup: bool
    allocated_start: int        # allocated bytes at the phase's start boundary
    allocated_end: int          # ... and at its end boundary
    peak_allocated: int         # max allocated inside the phase (torch.cuda.max_memory_allocated after a reset)
    reserved_end: int | None = None   # torch.cuda.memory_reserved at the end (None on cpu)
    peak_reserved: int | None = None  # torch.cuda.max_memory_reserved inside the phase
    t_start: float = 0.0        # seconds since the run started
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Measured:
    """What the counters said. Peaks without a prefix are the steady state: the measured steps
    after warm-up, which is what the estimate predicts."""
    counter: str                        # "torch.cuda" or "tracker" (cpu: 512-byte storage accounting)
    peak_allocated_bytes: int | None    # max over measured steps
    peak_reserved_bytes: int | None
    peak_phase: str | None
    peak_step: int | None
    run_peak_allocated_bytes: int       # whole run: load and warm-up included
    run_peak_reserved_bytes: int | None
    phase_peaks: dict                   # phase -> max peak allocated (load, and over measured steps)
    inventory: dict                     # component -> bytes of the live tensors (exact, see runner)
    components_at_peak: dict | None     # component -> bytes at the steady-state peak (tracker only)
    paged_optimizer_bytes: int          # optimizer state in CUDA unified memory (not allocated)
    phases: tuple = ()                  # PhaseStats, in order
    losses: tuple = ()
    # torch.cuda.memory_stats() at the end of the run (ALLOCATOR_STATS keys; None on cpu):
    # allocated / reserved current and peak, retries, OOMs, segments
    allocator_stats: dict | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["phases"] = [p.to_dict() for p in self.phases]
        d["losses"] = list(self.losses)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Measured":
        d = dict(d)
        d["phases"] = tuple(PhaseStats(**p) for p in d.get("phases", ()))
        d["losses"] = tuple(d.get("losses", ()))
        return cls(**_known(cls, d))

    def step_peaks(self) -> dict[int, int]:
        """step -> peak allocated of that step (all phases)."""
        out: dict[int, int] = {}
        for p in self.phases:
            if p.step is not None:
                out[p.step] = max(out.get(p.step, 0), p.peak_allocated)
        return out


@dataclass(frozen=True)
class NvmlTrace:
    """NVML device memory over the run. `available` False means nothing was sampled (a CPU run,
    no driver, no nvidia-ml-py); the reason says why. Never filled with invented numbers."""
    available: bool
    reason: str | None = None
    device_index: int | None = None
    target_hz: float | None = None
    rate_hz: float | None = None                # achieved sampling rate
    samples: int = 0
    query_seconds_mean: float | None = None     # one nvmlDeviceGetMemoryInfo call
    overhead_fraction: float | None = None      # NVML query time / step time (upper bound, see _nvml.py)
    baseline_used_bytes: int | None = None      # device used before the run created its CUDA context
    context_bytes: int | None = None            # CUDA context measured before the model loads
    context_end_bytes: int | None = None        # used - baseline - torch reserved at the end (context + lazily loaded kernels)
    peak_used_bytes: int | None = None          # max (used - baseline) during measured steps: the device total
    run_peak_used_bytes: int | None = None      # max (used - baseline) over the whole run
    trace: tuple = ()                           # ((t seconds, used - baseline bytes), ...) at every change
    markers: tuple = ()                         # ((t seconds, step or None, phase), ...) phase starts

    def to_dict(self) -> dict:
        d = asdict(self)
        d["trace"] = [list(x) for x in self.trace]
        d["markers"] = [list(x) for x in self.markers]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "NvmlTrace":
        d = dict(d)
        d["trace"] = tuple(tuple(x) for x in d.get("trace", ()))
        d["markers"] = tuple(tuple(x) for x in d.get("markers", ()))
        return cls(**_known(cls, d))


@dataclass(frozen=True)
class Failure:
    """Why a run has no (complete) measurement. An OOM is a result: where it happened and the
    last values measured before it."""
    kind: str                               # oom | error | crashed | timeout | skipped
    message: str
    step: int | None = None
    phase: str | None = None
    last_allocated_bytes: int | None = None
    last_peak_allocated_bytes: int | None = None   # the largest allocation total seen before the failure
    last_reserved_bytes: int | None = None
    last_nvml_used_bytes: int | None = None        # used - baseline
    exit_code: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Record:
    id: str
    created: str                 # ISO 8601 UTC
    status: str                  # one of STATUSES
    model_ref: str               # what the user typed
    model: dict                  # ModelSpec.to_dict() plus "config": the config.json fields used
    setup: dict                  # TrainSetup.to_dict()
    run: dict                    # device, steps, warmup, random_weights, seed, memory_limit_bytes, ...
    environment: dict            # GPU, driver, CUDA, library versions
    estimate: dict               # Estimate.to_dict() without model/setup (recorded prediction)
    measured: Measured | None
    nvml: NvmlTrace
    error: dict                  # metric -> relative error (None when not measured)
    tolerance: dict              # metric -> what the replay test enforces
    failure: Failure | None = None
    snapshot: str | None = None  # file name of the torch memory snapshot next to the record
    notes: tuple = ()
    schema: str = SCHEMA

    def to_dict(self) -> dict:
        return {
            "schema": self.schema, "id": self.id, "created": self.created, "status": self.status,
            "model_ref": self.model_ref, "model": self.model, "setup": self.setup, "run": self.run,
            "environment": self.environment, "estimate": self.estimate,
            "measured": self.measured.to_dict() if self.measured else None,
            "nvml": self.nvml.to_dict(), "error": dict(self.error), "tolerance": dict(self.tolerance),
            "failure": self.failure.to_dict() if self.failure else None,
            "snapshot": self.snapshot, "notes": list(self.notes),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Record":
        if not isinstance(d, dict) or not str(d.get("schema", "")).startswith("vramplan.profile/"):
            raise VramplanError("not a vramplan profile record (no 'schema': 'vramplan.profile/1')",
                                hint="records are written by `vramplan profile`")
        try:
            return cls(
                schema=d["schema"], id=d["id"], created=d["created"], status=d["status"],
                model_ref=d.get("model_ref", d["model"].get("id")), model=d["model"], setup=d["setup"],
                run=d["run"], environment=d.get("environment", {}), estimate=d.get("estimate") or {},
                measured=Measured.from_dict(d["measured"]) if d.get("measured") else None,
                nvml=NvmlTrace.from_dict(d.get("nvml") or {"available": False, "reason": "not recorded"}),
                error=d.get("error", {}), tolerance=d.get("tolerance", {}),
                failure=Failure(**_known(Failure, d["failure"])) if d.get("failure") else None,
                snapshot=d.get("snapshot"), notes=tuple(d.get("notes", ())),
            )
        except (KeyError, TypeError) as exc:
            raise VramplanError(f"malformed profile record: {exc!r}",
                                hint="was it written by a newer vramplan, or edited by hand?") from None

    # --- measured quantities the errors are computed from -----------------------------------------
    @property
    def measured_allocated(self) -> int | None:
        return self.measured.peak_allocated_bytes if self.measured else None

    @property
    def measured_device_total(self) -> int | None:
        return self.nvml.peak_used_bytes if self.nvml.available else None


def errors_for(predicted_allocated: int | None, predicted_device_total: int | None,
               measured_allocated: int | None, measured_device_total: int | None) -> dict:
    return {"allocated": relative_error(predicted_allocated, measured_allocated),
            "device_total": relative_error(predicted_device_total, measured_device_total)}


def tolerances_for(errors: dict) -> dict:
    return {m: tolerance_for(errors.get(m)) for m in METRICS}


def _known(cls, d: dict) -> dict:
    names = {f.name for f in fields(cls)}
    return {k: v for k, v in d.items() if k in names}


# --- rebuilding the inputs of a record, for re-estimation ----------------------------------------

def setup_from_record(setup: dict):
    """TrainSetup from a record's setup dict (quant fields are None for lora / full, reentrant
    None without checkpointing or in records older than the field)."""

    d = {k: v for k, v in setup.items() if k in {f.name for f in fields(TrainSetup)}}
    for name in ("quant", "double_quant", "reentrant"):
        if d.get(name) is None:
            d.pop(name, None)
    if "targets" in d:
        d["targets"] = tuple(d["targets"])
    return TrainSetup(**d)


def spec_from_record(model: dict):
    """ModelSpec from the config.json fields the record keeps."""

    return spec_from_config(model["config"], model.get("id", "?"), model.get("source", "profile record"))


def model_dict(spec) -> dict:
    # a multimodal class AutoModelForCausalLM builds whole keeps its outer config (ModelSpec.build_config)
    return {**spec.to_dict(), "config": spec.build_config() if getattr(spec, "wrapper", None) else dict(spec.config)}


def estimate_dict(est) -> dict:
    d = est.to_dict()
    d.pop("model", None)
    d.pop("setup", None)
    return d


# A tiny helper used by renderers: component order and the rows compare shows.
STATIC = ("weights", "quant_constants", "adapters", "optimizer_state")
TRANSIENT = ("activations", "logits_loss", "temporaries")
__all__ = ["SCHEMA", "STATUSES", "Record", "Measured", "PhaseStats", "NvmlTrace", "Failure", "relative_error",
           "tolerance_for", "errors_for", "tolerances_for", "setup_from_record", "spec_from_record",
           "model_dict", "estimate_dict", "STATIC", "TRANSIENT"]
