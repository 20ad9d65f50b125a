"""Predicted vs measured, per component and in total, for profile records.

By default the prediction is recomputed with the current estimator from the record's config and
setup (what the replay test checks: a change that worsens agreement with a real measurement
fails); `recorded=True` uses the prediction stored in the record when it was measured.

Per component, what a run can measure:
- weights, quant_constants, adapters, optimizer_state: exact, from the live tensors;
- on the CPU (allocation tracker) every component at the peak instant, attributed as simulate
  does; on a GPU the rest of the peak, gradients + activations + logits_loss + temporaries, in
  one row (torch.cuda counters have no attribution);
- from NVML: the CUDA context (at the end of the run: context + lazily loaded kernels + library
  handles) and the allocator overhead, defined so that the parts add up to the device total:
  device total - context - peak allocated.
Pure Python; pandas only for to_dataframe().
"""
from __future__ import annotations

import os
from dataclasses import asdict, field, replace
from pathlib import Path

from vramplan.core._files import file_destination

from vramplan.core._errors import require, VramplanError
from vramplan.core._record import record
from vramplan.profile._record import STATIC, TRANSIENT, Record, relative_error, setup_from_record, spec_from_record
from vramplan.profile._store import atomic_write_bytes, ckpt_label, read_records
from vramplan.core._gpus import Gpu
from vramplan.estimate._estimator import estimate
from vramplan.estimate._inventory import static_memory
from vramplan.estimate._quant import alloc

REST = "gradients+activations+logits_loss+temporaries"


@record
class Row:
    component: str
    predicted: int | None
    measured: int | None
    note: str = ""
    in_total: bool = True     # part of the sum that makes peak allocated / device total

    @property
    def error(self) -> float | None:
        return relative_error(self.predicted, self.measured)

    @property
    def difference(self) -> int | None:
        if self.predicted is None or self.measured is None:
            return None
        return self.predicted - self.measured

    def to_dict(self) -> dict:
        d = asdict(self)
        d["error"] = self.error
        d["difference"] = self.difference
        return d


@record
class Comparison:
    path: str
    record_id: str
    model: str
    setup: dict
    device: str
    gpu: str | None
    status: str
    prediction: str                       # "current" (re-estimated) or "recorded"
    predicted_allocated: int | None
    measured_allocated: int | None
    predicted_device_total: int | None
    measured_device_total: int | None
    predicted_peak_phase: str | None
    measured_peak_phase: str | None
    rows: tuple = ()                      # Row, allocated components then device components
    tolerance: dict = field(default_factory=dict)
    recorded_error: dict = field(default_factory=dict)
    failure: str | None = None
    fits_predicted: bool | None = None
    notes: tuple = ()
    model_info: dict = field(default_factory=dict)  # the record's ModelSpec.to_dict() (without config)
    predicted_reserved: int | None = None  # the caching-allocator model vs torch.cuda.max_memory_reserved
    measured_reserved: int | None = None
    alloc_conf: str | None = None          # PYTORCH_CUDA_ALLOC_CONF of the run

    @property
    def error_reserved(self) -> float | None:
        return relative_error(self.predicted_reserved, self.measured_reserved)

    @property
    def error_allocated(self) -> float | None:
        return relative_error(self.predicted_allocated, self.measured_allocated)

    @property
    def error_device_total(self) -> float | None:
        return relative_error(self.predicted_device_total, self.measured_device_total)

    @property
    def lower_bound_error(self) -> float | None:
        """For an out-of-memory run: prediction vs what was already allocated when it failed."""
        if self.status != "oom":
            return None
        return relative_error(self.predicted_allocated, self.measured_allocated)

    def checks(self) -> list[tuple[str, float, float, bool]]:
        """(metric, error, tolerance, passed) for every metric the record holds a tolerance for."""
        out = []
        if self.status == "ok":
            for metric, err in (("allocated", self.error_allocated), ("device_total", self.error_device_total)):
                tol = self.tolerance.get(metric)
                if tol is not None and err is not None:
                    out.append((metric, err, tol, abs(err) <= tol + 1e-12))
        elif self.status == "oom":
            tol = self.tolerance.get("allocated_lower_bound")
            err = self.lower_bound_error
            if tol is not None and err is not None:
                out.append(("allocated_lower_bound", err, tol, err >= -tol - 1e-12))
        return out

    @property
    def within_tolerance(self) -> bool | None:
        checks = self.checks()
        return all(c[3] for c in checks) if checks else None

    def to_dict(self) -> dict:
        return {
            "path": self.path, "record_id": self.record_id,
            "model": self.model_info or {"id": self.model}, "setup": self.setup,
            "device": self.device, "gpu": self.gpu, "status": self.status, "prediction": self.prediction,
            "predicted_allocated_bytes": self.predicted_allocated, "measured_allocated_bytes": self.measured_allocated,
            "error_allocated": self.error_allocated,
            "predicted_reserved_bytes": self.predicted_reserved, "measured_reserved_bytes": self.measured_reserved,
            "error_reserved": self.error_reserved,
            "predicted_device_total_bytes": self.predicted_device_total,
            "measured_device_total_bytes": self.measured_device_total, "error_device_total": self.error_device_total,
            "predicted_peak_phase": self.predicted_peak_phase, "measured_peak_phase": self.measured_peak_phase,
            "components": [r.to_dict() for r in self.rows], "tolerance": dict(self.tolerance),
            "recorded_error": dict(self.recorded_error),
            "checks": [{"metric": m, "error": e, "tolerance": t, "passed": p} for m, e, t, p in self.checks()],
            "within_tolerance": self.within_tolerance, "failure": self.failure, "fits_predicted": self.fits_predicted,
            "notes": list(self.notes),
        }

    def flat(self) -> dict:
        """One row for a CSV / DataFrame."""
        s = self.setup
        d = {"record_id": self.record_id, "model": self.model, "method": s.get("method"), "quant": s.get("quant"),
             "batch": s.get("batch"), "seq": s.get("seq"), "grad_ckpt": s.get("grad_ckpt"),
             "optimizer": s.get("optimizer"), "attn": s.get("attn"), "device": self.device, "gpu": self.gpu,
             "status": self.status, "prediction": self.prediction,
             "predicted_allocated_bytes": self.predicted_allocated, "measured_allocated_bytes": self.measured_allocated,
             "error_allocated": self.error_allocated, "tolerance_allocated": self.tolerance.get("allocated"),
             "predicted_reserved_bytes": self.predicted_reserved, "measured_reserved_bytes": self.measured_reserved,
             "error_reserved": self.error_reserved,
             "predicted_device_total_bytes": self.predicted_device_total,
             "measured_device_total_bytes": self.measured_device_total,
             "error_device_total": self.error_device_total, "tolerance_device_total": self.tolerance.get("device_total"),
             "predicted_peak_phase": self.predicted_peak_phase, "measured_peak_phase": self.measured_peak_phase,
             "within_tolerance": self.within_tolerance, "failure": self.failure, "path": self.path}
        for r in self.rows:
            d[f"{r.component}_predicted_bytes"] = r.predicted
            d[f"{r.component}_measured_bytes"] = r.measured
        return d


def compare_record(record: Record, path: str | os.PathLike = "", recorded: bool = False) -> Comparison:
    notes = []
    est_d, est = record.estimate or {}, None     # a record may hold no prediction (null or {})
    prediction = "recorded"
    if not recorded:
        try:
            est = _reestimate(record)
            prediction = "current"
        except VramplanError as exc:
            notes.append(f"cannot re-estimate with this version ({exc.message}); using the recorded prediction")
    if est is not None:
        comps = dict(est.components)
        pred_alloc, pred_total = est.peak_allocated_bytes, est.device_total_bytes
        pred_ctx, pred_over = est.cuda_context_bytes, est.allocator_overhead_bytes
        pred_phase, pred_paged = est.peak_phase, est.paged_optimizer_bytes
        pred_resident = est.paged_resident_bytes
        pred_grads_all = est.phase_components.get("optimizer", {}).get("gradients")
        pred_reserved = est.peak_reserved_bytes
        fits = est.fits
    else:
        comps = dict(est_d.get("components") or {})
        pred_alloc, pred_total = est_d.get("peak_allocated_bytes"), est_d.get("device_total_bytes")
        dev = est_d.get("device_components") or {}
        pred_ctx, pred_over = dev.get("cuda_context"), dev.get("allocator_overhead")
        pred_phase, pred_paged = est_d.get("peak_phase"), est_d.get("paged_optimizer_bytes")
        pred_resident = dev.get("paged_optimizer", 0)
        pred_grads_all = None
        pred_reserved = est_d.get("peak_reserved_bytes")
        fits = est_d.get("fits")

    m = record.measured
    nv = record.nvml
    status = record.status
    meas_alloc = m.peak_allocated_bytes if m else None
    failure = None
    if record.failure is not None:
        f = record.failure
        where = f" at step {f.step}, {f.phase}" if f.step is not None else (f" in {f.phase}" if f.phase else "")
        failure = f"{f.kind}{where}: {f.message}"
        if status == "oom":
            meas_alloc = f.last_peak_allocated_bytes
    meas_total = nv.peak_used_bytes if (nv.available and status == "ok") else None
    # like the device total, reserved is measured over complete steps only (not for an OOM's last values)
    meas_reserved = m.peak_reserved_bytes if (m is not None and status == "ok") else None

    rows = []
    inv = (m.inventory if m else {}) or {}
    at_peak = m.components_at_peak if m else None
    if status == "ok" and m is not None:
        if at_peak:
            for c in (*STATIC[:3], "gradients", "optimizer_state", *TRANSIENT):
                rows.append(Row(c, comps.get(c), at_peak.get(c)))
        else:
            static_measured = sum(int(inv.get(c, 0)) for c in STATIC)
            for c in STATIC:
                rows.append(Row(c, comps.get(c), inv.get(c)))
            rest_pred = sum(int(comps.get(c, 0)) for c in ("gradients", *TRANSIENT))
            rest_meas = meas_alloc - static_measured if meas_alloc is not None else None
            rows.append(Row(REST, rest_pred, rest_meas, "the peak less the persistent tensors"))
        rows.append(Row("gradients (all, after backward)", pred_grads_all, inv.get("gradients"),
                        "every trainable tensor's .grad", in_total=False))
        # the caching allocator: the model's replay of two steps vs torch.cuda.max_memory_reserved
        rows.append(Row("peak reserved", pred_reserved, m.peak_reserved_bytes,
                        "torch.cuda.max_memory_reserved (steady-state steps)", in_total=False))
        if pred_paged or m.paged_optimizer_bytes:
            rows.append(Row("paged optimizer state", pred_paged, m.paged_optimizer_bytes,
                            "CUDA unified memory, not in allocated", in_total=False))
        if nv.available:
            ctx = nv.context_end_bytes if nv.context_end_bytes is not None else nv.context_bytes
            note = f"before load {nv.context_bytes:,} B; at the end incl. lazily loaded kernels" \
                if nv.context_bytes is not None else ""
            if pred_resident:    # NVML's context figure holds it: compared like for like
                note += "; it includes the resident paged optimizer state, and so does the prediction"
            rows.append(Row("cuda_context", None if pred_ctx is None else pred_ctx + (pred_resident or 0), ctx, note))
            over = (meas_total - ctx - meas_alloc) if None not in (meas_total, ctx, meas_alloc) else None
            rows.append(Row("allocator_overhead", pred_over, over, "device total - context - peak allocated"))
            if pred_resident:
                rows.append(Row("paged_optimizer", pred_resident, None,
                                "resident in unified memory: NVML counts it within the context above",
                                in_total=False))
        else:
            rows.append(Row("cuda_context", pred_ctx, None, nv.reason or "NVML unavailable"))
            rows.append(Row("allocator_overhead", pred_over, None, nv.reason or "NVML unavailable"))
            if pred_resident:
                rows.append(Row("paged_optimizer", pred_resident, None, nv.reason or "NVML unavailable"))

    s = record.setup
    env = record.environment or {}
    gpu = env.get("gpu")
    if record.run.get("memory_limit_bytes"):
        gpu = f"{gpu or record.run.get('device')} capped at {record.run['memory_limit_bytes'] / 2**30:.1f} GiB"
    return Comparison(
        path=str(path), record_id=record.id, model=record.model.get("id", record.model_ref), setup=dict(s),
        device=record.run.get("device", "?"), gpu=gpu, status=status, prediction=prediction,
        predicted_allocated=pred_alloc, measured_allocated=meas_alloc, predicted_device_total=pred_total,
        measured_device_total=meas_total, predicted_peak_phase=pred_phase,
        measured_peak_phase=m.peak_phase if m else None, rows=tuple(rows), tolerance=dict(record.tolerance),
        recorded_error=dict(record.error), failure=failure, fits_predicted=fits, notes=tuple(notes),
        model_info={k: v for k, v in record.model.items() if k != "config"},
        predicted_reserved=pred_reserved or None, measured_reserved=meas_reserved,
        alloc_conf=record.run.get("alloc_conf") or (env.get("env") or {}).get("PYTORCH_CUDA_ALLOC_CONF"))


def _reestimate(record: Record):
    spec = spec_from_record(record.model)
    setup = setup_from_record(record.setup)
    gpu_d = (record.estimate or {}).get("gpu")
    gpu = Gpu(gpu_d["name"], int(gpu_d["memory_bytes"]), gpu_d.get("arch"), gpu_d.get("source", "")) if gpu_d else None
    static = replace(static_memory(spec, setup), **record_load(record.run or {}, spec, setup))
    # the allocator settings of the run (PYTORCH_CUDA_ALLOC_CONF as recorded; defaults otherwise)
    return estimate(spec, setup, gpu=gpu, alloc_conf=(record.estimate or {}).get("alloc_conf") or "", static=static)


def record_load(run: dict, spec, setup) -> dict:
    """How the run's load differed from a checkpoint load, as Static fields for the replay. The
    random-weights build 1 (records without run["random_weights_build"]; profile/_materialize.py
    BUILD) made each decoder layer's weights in the modules' order rather than the checkpoint's
    (load_order), and allocated a tensor tied to one made already, the lm_head tied to the
    embeddings (Module.to_empty, in the load dtype), freed once re-shared: the caching allocator
    keeps its segment for the run (load_transients; docs/allocator.md#random-weights-load)."""
    if not run.get("random_weights") or run.get("random_weights_build", 1) >= 2:
        return {}
    tied = (alloc(spec.vocab * spec.hidden * setup.compute_bytes),) if spec.tied else ()
    return {"load_transients": tied, "load_order": "modules"}


def compare_path(path: str | os.PathLike, recorded: bool = False, strict: bool = False,
                 on_skip=None) -> list[Comparison]:
    """Every record under `path` compared; files that cannot be read as records as in read_records."""
    return [compare_record(rec, p, recorded) for p, rec in read_records(path, strict=strict, on_skip=on_skip)]


def to_dataframe(comparisons: list[Comparison]):
    pd = require("pandas", "export")
    df = pd.DataFrame([c.flat() for c in comparisons])
    for col in df.columns:   # bytes stay integers even where a record has no value (pandas' nullable Int64)
        if col.endswith("_bytes"):
            df[col] = df[col].astype("Int64")
    return df


def write_csv(comparisons: list[Comparison], dest: str) -> str | None:
    """CSV via pandas to `dest` ("-" for stdout); returns the text when dest is "-"."""
    df = to_dataframe(comparisons)
    if dest == "-":
        return df.to_csv(index=False)
    path = file_destination(dest, "--csv")     # a link's target, never the link replaced by a file
    try:
        atomic_write_bytes(path, df.to_csv(index=False).encode())
    except OSError as exc:
        raise VramplanError(f"cannot write {dest}: {exc.strerror or exc}", hint="write the CSV elsewhere") from None
    return None


def error_table_markdown(comparisons: list[Comparison]) -> str:
    """The table profiles/README.md carries: one line per record."""
    head = ("| model | setup | device | status | predicted alloc GiB | measured alloc GiB | error | "
            "predicted reserved GiB | measured reserved GiB | error | "
            "predicted device GiB | NVML device GiB | error | tolerance (alloc / device) |\n"
            "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n")
    lines = []
    for c in comparisons:
        s = c.setup
        setup = (f"{s.get('method')}{'-' + s['quant'] if s.get('quant') else ''} b{s.get('batch')} s{s.get('seq')} "
                 f"{ckpt_label(s)} {s.get('optimizer')}"
                 + (f" recipe {s['recipe']}" if s.get("recipe") else "")
                 + (f" `{c.alloc_conf}`" if c.alloc_conf else ""))
        lines.append("| " + " | ".join([
            c.model.rsplit("/", 1)[-1], setup, c.gpu or c.device, c.status, _gib(c.predicted_allocated),
            _gib(c.measured_allocated), _pct(c.error_allocated if c.status == "ok" else c.lower_bound_error),
            _gib(c.predicted_reserved), _gib(c.measured_reserved),
            _pct(c.error_reserved if c.status == "ok" else None),
            _gib(c.predicted_device_total), _gib(c.measured_device_total), _pct(c.error_device_total),
            f"{_tol(c.tolerance.get('allocated') or c.tolerance.get('allocated_lower_bound'))} / "
            f"{_tol(c.tolerance.get('device_total'))}"]) + " |")
    return head + "\n".join(lines) + "\n"


def _gib(n) -> str:
    return "—" if n is None else f"{n / 2**30:.3f}"


def _pct(x) -> str:
    return "—" if x is None else f"{x:+.1%}"


def _tol(x) -> str:
    return "—" if x is None else f"{x:.1%}"
