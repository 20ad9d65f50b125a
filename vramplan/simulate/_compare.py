"""Simulate vs estimate: the same components side by side, and their difference. Pure Python
(no torch): it reads a Trace and the estimator's public result (components, peak_allocated_bytes,
peak_phase, phase_peaks) and nothing else of the estimator."""
from __future__ import annotations

from vramplan.core._components import ALLOCATED

DEFINITION = "estimate - simulate, in bytes; percent of simulate"


def percent(diff: int, reference: int) -> float | None:
    return None if not reference else round(100.0 * diff / reference, 2)


def estimate_block(est) -> dict:
    return {"peak_allocated_bytes": int(est.peak_allocated_bytes), "peak_phase": est.peak_phase,
            "components": {c.value: int(est.components.get(c.value, 0)) for c in ALLOCATED},
            "phase_peaks": {k: int(v) for k, v in est.phase_peaks.items()},
            "peak_reserved_bytes": int(est.peak_reserved_bytes), "alloc_conf": est.alloc_conf}


def difference(trace, est) -> dict:
    """Per component, peak and phase: estimate - simulate (bytes) and that as a percent of simulate."""
    e = estimate_block(est)
    comps = {c.value: e["components"][c.value] - trace.components.get(c.value, 0) for c in ALLOCATED}
    peak = e["peak_allocated_bytes"] - trace.peak_allocated_bytes
    phases = {p: e["phase_peaks"].get(p, 0) - v for p, v in trace.phase_peaks.items() if p in e["phase_peaks"]}
    return {
        "definition": DEFINITION,
        "peak_allocated_bytes": peak,
        "peak_allocated_percent": percent(peak, trace.peak_allocated_bytes),
        "same_peak_phase": e["peak_phase"] == trace.peak_phase,
        "components": comps,
        "components_percent": {k: percent(v, trace.components.get(k, 0)) for k, v in comps.items()},
        "phase_peaks": phases,
    }


def rows(trace, est) -> list[dict]:
    """One row per component, then the peak: simulate, estimate, difference, percent (estimate,
    difference and percent None when no estimate stands beside the simulation)."""
    if est is None:
        out = [{"component": c.value, "simulate": trace.components.get(c.value, 0), "estimate": None,
                "difference": None, "percent": None} for c in ALLOCATED]
        return out + [{"component": "peak_allocated", "simulate": trace.peak_allocated_bytes, "estimate": None,
                       "difference": None, "percent": None}]
    e = estimate_block(est)
    out = []
    for c in ALLOCATED:
        sim, an = trace.components.get(c.value, 0), e["components"][c.value]
        out.append({"component": c.value, "simulate": sim, "estimate": an, "difference": an - sim,
                    "percent": percent(an - sim, sim)})
    sim, an = trace.peak_allocated_bytes, e["peak_allocated_bytes"]
    out.append({"component": "peak_allocated", "simulate": sim, "estimate": an, "difference": an - sim,
                "percent": percent(an - sim, sim)})
    return out


def to_dict(trace, est, skipped: str | None = None) -> dict:
    """Trace.to_dict() plus `estimate` and `difference` (the CLI's --json); without an estimate
    both are null and `estimate_skipped` says why."""
    d = trace.to_dict()
    if est is not None:
        d["model"] = est.model.to_dict()  # the model object every command's JSON shares (ModelSpec.to_dict)
    d["estimate"] = estimate_block(est) if est is not None else None
    d["difference"] = difference(trace, est) if est is not None else None
    d["warnings"] = list(est.warnings) if est is not None else []   # the setup's, as estimate gives them
    if est is None:
        d["estimate_skipped"] = skipped or "no estimate"
    return d
