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

import json
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
    losses: tuple = ()                  # per step; None where the loss was not finite
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
        """The record in `d` (parsed JSON). Its shape is checked here, once, so that every reader
        (compare, the replay test, plots) can trust its types: bytes are whole numbers, objects
        are objects, no NaN. Raises NotARecord for JSON that is no profile record at all, and
        VramplanError for a record this version cannot read."""
        check_record(d)
        try:
            return cls(
                schema=d["schema"], id=d["id"], created=d["created"], status=d["status"],
                model_ref=d.get("model_ref", d["model"].get("id")), model=d["model"], setup=d["setup"],
                run=d["run"], environment=d.get("environment", {}), estimate=d.get("estimate") or {},
                measured=Measured.from_dict(d["measured"]) if d.get("measured") is not None else None,
                nvml=NvmlTrace.from_dict(d.get("nvml") or {"available": False, "reason": "not recorded"}),
                error=d.get("error", {}), tolerance=d.get("tolerance", {}),
                failure=Failure(**_known(Failure, d["failure"])) if d.get("failure") is not None else None,
                snapshot=d.get("snapshot"), notes=tuple(d.get("notes", ())),
            )
        except (KeyError, TypeError) as exc:
            raise VramplanError(f"malformed profile record: {exc!r}", hint=_HINT) from None

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


class NotARecord(VramplanError):
    """JSON that is no vramplan profile record at all: a folder of records may hold other files."""


_HINT = "was it written by a newer vramplan, or edited by hand?"


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# Bytes and counts past 2**63 are no measurement (a device's memory is far below; pandas' int64
# columns and float arithmetic overflow past it).
_LIMIT = 2**63

# The kinds of value a record holds: (test, what the error says the value must be).
_KINDS = {
    "bytes": (lambda v: _is_int(v) and 0 <= v < _LIMIT, "a whole number of bytes >= 0 and below 2**63"),
    "count": (lambda v: _is_int(v) and 0 <= v < _LIMIT, "a whole number >= 0 and below 2**63"),
    "positive": (lambda v: _is_int(v) and v >= 1, "a whole number >= 1"),
    "int": (_is_int, "a whole number"),
    "number": (_is_number, "a finite number"),
    "ratio": (lambda v: _is_number(v) and v >= 0, "a finite number >= 0"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "object": (lambda v: isinstance(v, dict), "an object"),
    "sample": (lambda v: isinstance(v, (list, tuple)) and len(v) == 2 and _is_number(v[0]) and _is_int(v[1]),
               "[seconds, bytes]"),
    "marker": (lambda v: isinstance(v, (list, tuple)) and len(v) == 3 and _is_number(v[0])
               and (v[1] is None or (_is_int(v[1]) and v[1] >= 0)) and isinstance(v[2], str),
               "[seconds, step or null, phase]"),
}

# Field -> kind. "K{}" is an object of K, "K[]" a list of K; a kind ending in "?" may be null or
# absent, one ending in "=" may be absent (the reader's default) but not null.
_RECORD_FIELDS = {
    "id": "str", "created": "str", "status": "str", "model_ref": "str=", "model": "object", "setup": "object",
    "run": "object", "environment": "object=", "estimate": "object?", "measured": "object?", "nvml": "object?",
    "error": "number?{}=", "tolerance": "ratio?{}=", "failure": "object?", "snapshot": "str?", "notes": "str[]=",
}
_MODEL_FIELDS = {"id": "str", "config": "object"}
_SETUP_FIELDS = {   # what compare shows of a setup; TrainSetup checks the rest when it re-estimates
    "method": "str", "batch": "positive", "seq": "positive", "optimizer": "str", "quant": "str?",
    "double_quant": "bool?", "grad_ckpt": "bool=", "reentrant": "bool?", "attn": "str=", "grad_accum": "positive=",
    "recipe": "str?", "targets": "str[]=",
}
_RUN_FIELDS = {
    "device": "str=", "steps": "count=", "warmup": "count=", "random_weights": "bool=", "random_weights_build": "int=",
    "memory_limit_bytes": "bytes?", "alloc_conf": "str?", "timeout_s": "number?",
}
_ENVIRONMENT_FIELDS = {"gpu": "str?", "gpu_memory_bytes": "bytes?", "env": "object?"}
_ESTIMATE_FIELDS = {
    "gpu": "object?", "peak_allocated_bytes": "bytes?", "device_total_bytes": "bytes?", "peak_reserved_bytes": "bytes?",
    "components": "bytes{}?", "device_components": "int?{}?", "phase_peaks": "bytes{}?", "peak_phase": "str?",
    "paged_optimizer_bytes": "bytes?", "fits": "bool?", "alloc_conf": "str?",
}
_GPU_FIELDS = {"name": "str", "memory_bytes": "positive", "arch": "str?", "source": "str="}
_MEASURED_FIELDS = {
    "counter": "str", "peak_allocated_bytes": "bytes?", "peak_reserved_bytes": "bytes?", "peak_phase": "str?",
    "peak_step": "count?", "run_peak_allocated_bytes": "bytes", "run_peak_reserved_bytes": "bytes?",
    "phase_peaks": "bytes{}", "inventory": "bytes{}", "components_at_peak": "bytes{}?",
    "paged_optimizer_bytes": "bytes",
    "phases": "object[]=", "losses": "number?[]=", "allocator_stats": "count{}?",
}
_PHASE_FIELDS = {
    "phase": "str", "step": "count?", "warmup": "bool", "allocated_start": "bytes", "allocated_end": "bytes",
    "peak_allocated": "bytes", "reserved_end": "bytes?", "peak_reserved": "bytes?", "t_start": "number=",
    "seconds": "number=",
}
_NVML_FIELDS = {
    "available": "bool", "reason": "str?", "device_index": "count?", "target_hz": "number?", "rate_hz": "number?",
    "samples": "count=", "query_seconds_mean": "number?", "overhead_fraction": "number?",
    "baseline_used_bytes": "bytes?", "context_bytes": "bytes?", "context_end_bytes": "bytes?",
    "peak_used_bytes": "bytes?", "run_peak_used_bytes": "bytes?", "trace": "sample[]=", "markers": "marker[]=",
}
_FAILURE_FIELDS = {
    "kind": "str", "message": "str", "step": "count?", "phase": "str?", "last_allocated_bytes": "bytes?",
    "last_peak_allocated_bytes": "bytes?", "last_reserved_bytes": "bytes?", "last_nvml_used_bytes": "bytes?",
    "exit_code": "int?",
}


def check_record(d) -> None:
    """Raise unless `d` is a record of this schema version with every field of the right type."""
    schema = d.get("schema") if isinstance(d, dict) else None
    if not isinstance(schema, str) or not schema.startswith("vramplan.profile/"):
        raise NotARecord(f"not a vramplan profile record (no 'schema': '{SCHEMA}')",
                         hint="records are written by `vramplan profile`")
    if schema != SCHEMA:
        version = schema.split("/", 1)[1]
        newer = version.isdigit() and int(version) > int(SCHEMA.rsplit("/", 1)[1])
        raise VramplanError(f"record schema {schema} is {'newer than' if newer else 'not'} the one this vramplan "
                            f"reads ({SCHEMA})",
                            hint="upgrade vramplan (pip install -U vramplan) to read it" if newer
                            else "records are written by `vramplan profile`")
    _no_nan(d)
    _check(d, "", _RECORD_FIELDS)
    if d["status"] not in STATUSES:
        _malformed(f"unknown status {_show(d['status'])} (one of {', '.join(STATUSES)})")
    for key, spec in (("model", _MODEL_FIELDS), ("setup", _SETUP_FIELDS), ("run", _RUN_FIELDS),
                      ("environment", _ENVIRONMENT_FIELDS), ("estimate", _ESTIMATE_FIELDS),
                      ("measured", _MEASURED_FIELDS), ("nvml", _NVML_FIELDS), ("failure", _FAILURE_FIELDS)):
        if d.get(key) is not None:
            _check(d[key], f"{key}.", spec)
    if (d.get("estimate") or {}).get("gpu") is not None:
        _check(d["estimate"]["gpu"], "estimate.gpu.", _GPU_FIELDS)
    for i, phase in enumerate((d.get("measured") or {}).get("phases", ())):
        _check(phase, f"measured.phases[{i}].", _PHASE_FIELDS)
    if d["status"] == "ok" and (d.get("measured") is None or d["measured"].get("peak_allocated_bytes") is None):
        _malformed("an ok record has no measured.peak_allocated_bytes")


def _check(d: dict, where: str, spec: dict) -> None:
    for key, kind in spec.items():
        if key not in d:
            if not kind.endswith(("?", "=")):
                _malformed(f"{where}{key} is missing")
            continue
        _check_value(d[key], kind.removesuffix("="), f"{where}{key}")


def _check_value(v, kind: str, where: str) -> None:
    if kind.endswith("?"):
        if v is None:
            return
        kind = kind[:-1]
    if kind.endswith("{}"):
        if not isinstance(v, dict):
            _malformed(f"{where} must be an object, got {_show(v)}")
        for k, x in v.items():
            _check_value(x, kind[:-2], f"{where}.{k}")
    elif kind.endswith("[]"):
        if not isinstance(v, (list, tuple)):
            _malformed(f"{where} must be a list, got {_show(v)}")
        for i, x in enumerate(v):
            _check_value(x, kind[:-2], f"{where}[{i}]")
    else:
        test, what = _KINDS[kind]
        if not test(v):
            _malformed(f"{where} must be {what}, got {_show(v)}")


def _no_nan(d: dict) -> None:
    """Python's json reads NaN and Infinity, which are no JSON numbers: a record holding one
    would make `compare --json` print invalid JSON."""
    stack = [("", d)]
    while stack:
        where, v = stack.pop()
        if isinstance(v, float) and not math.isfinite(v):
            _malformed(f"{where} is {json.dumps(v)} (NaN and Infinity are no JSON numbers)")
        elif isinstance(v, dict):
            stack.extend((f"{where}.{k}" if where else str(k), x) for k, x in v.items())
        elif isinstance(v, (list, tuple)):
            stack.extend((f"{where}[{i}]", x) for i, x in enumerate(v))


def _show(v) -> str:
    text = json.dumps(v) if isinstance(v, (str, int, float, bool, type(None))) else \
        ("an object" if isinstance(v, dict) else "a list" if isinstance(v, (list, tuple)) else type(v).__name__)
    return text if len(text) <= 40 else text[:37] + "..."


def _malformed(what: str):
    raise VramplanError(f"malformed profile record: {what}", hint=_HINT)


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
__all__ = ["SCHEMA", "STATUSES", "Record", "NotARecord", "check_record",
           "Measured", "PhaseStats", "NvmlTrace", "Failure", "relative_error",
           "tolerance_for", "errors_for", "tolerances_for", "setup_from_record", "spec_from_record",
           "model_dict", "estimate_dict", "STATIC", "TRANSIENT"]
