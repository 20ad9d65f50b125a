"""The memory timeline of a profile record as a PNG (matplotlib, Agg backend: no display needed).

Drawn: NVML device used memory (minus the pre-run baseline) as a step line when it was
sampled; torch allocated bytes at every phase boundary and each phase's peak (the counters the
run reads); phase spans shaded (load, forward, backward, optimizer; warm-up steps hatched);
the predicted peak allocated (and, when NVML sampled the run, the predicted device total) as
horizontal lines. The unit follows the size (GiB, MiB or KiB).
"""
from __future__ import annotations

import os
from pathlib import Path

from vramplan.core._errors import require, UsageError
from vramplan.profile._record import Record
from vramplan.profile._store import atomic_write_bytes, ckpt_label

UNITS = (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10))
COLORS = {"load": "#dddddd", "forward": "#cfe2f3", "backward": "#f4cccc", "optimizer": "#d9ead3"}


def plot_record(record: Record, dest: str | os.PathLike, predicted: dict | None = None) -> Path:
    """Write the timeline of `record` to `dest` (.png, .svg or .pdf); returns the path.

    predicted: {"peak_allocated_bytes", "device_total_bytes"} to draw (default: the record's own)."""

    dest = Path(dest)
    if dest.suffix.lower() not in (".png", ".svg", ".pdf"):
        raise UsageError(f"--plot {dest}: unknown image type {dest.suffix or '(none)'}",
                         hint="end the file name with .png, .svg or .pdf")
    matplotlib = require("matplotlib", "export")
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    predicted = predicted or record.estimate or {}
    m = record.measured
    nv = record.nvml
    lines = [("peak_allocated_bytes", "--", "predicted peak allocated")]
    if nv.available:  # the device total is compared with NVML only; without it the line means nothing
        lines.append(("device_total_bytes", ":", "predicted device total"))
    values = [predicted.get(k) or 0 for k, _, _ in lines]
    if m is not None:
        values += [p.peak_allocated for p in m.phases]
    if nv.available:
        values += [u for _, u in nv.trace]
    unit, scale = _unit(max(values, default=0))
    fig, ax = plt.subplots(figsize=(11, 5), dpi=110)
    top = 0.0
    if m is not None:
        for p in m.phases:
            ax.axvspan(p.t_start, p.t_start + max(p.seconds, 1e-6), color=COLORS.get(p.phase, "#eeeeee"), alpha=0.6,
                       hatch="//" if p.warmup else None, linewidth=0)
        xs, ys, px, py = [], [], [], []
        for p in m.phases:
            xs += [p.t_start, p.t_start + p.seconds]
            ys += [p.allocated_start / scale, p.allocated_end / scale]
            px.append(p.t_start + p.seconds / 2)
            py.append(p.peak_allocated / scale)
        ax.plot(xs, ys, "o-", color="#1f4e79", markersize=3, linewidth=1, label="allocated at phase boundaries")
        ax.plot(px, py, "v", color="#c00000", markersize=6, label="peak allocated in phase")
        top = max([top, *py]) if py else top
        seen = set()
        for p in m.phases:
            if p.phase not in seen:
                ax.plot([], [], color=COLORS.get(p.phase, "#eeeeee"), linewidth=8,
                        label=p.phase + (" (hatched: warm-up)" if p.phase == "forward" else ""))
                seen.add(p.phase)
    if nv.available and nv.trace:
        tx = [t for t, _ in nv.trace]
        ty = [u / scale for _, u in nv.trace]
        ax.step(tx, ty, where="post", color="#7030a0", linewidth=1.2, label="NVML device used (minus baseline)")
        top = max(top, max(ty))
    for key, style, label in lines:
        value = predicted.get(key)
        if value:
            ax.axhline(value / scale, color="#000000", linestyle=style, linewidth=1.2,
                       label=f"{label} {value / scale:,.2f} {unit}")
            top = max(top, value / scale)
    if record.failure is not None:
        f = record.failure
        ax.text(0.01, 0.97, f"{f.kind.upper()} at step {f.step}, {f.phase}", transform=ax.transAxes,
                color="#c00000", va="top", fontsize=10, fontweight="bold")
    s = record.setup
    ax.set_title(f"{record.model.get('id', record.model_ref)} — {s['method']} b{s['batch']} s{s['seq']} "
                 f"{ckpt_label(s)} {s['optimizer']} on "
                 f"{record.environment.get('gpu') or record.run.get('device')}"
                 + ("" if nv.available else " (no NVML: allocated bytes only)"), fontsize=10)
    ax.set_xlabel("seconds since the run started")
    ax.set_ylabel(unit)
    ax.set_ylim(0, top * 1.15 if top else 1)
    ax.legend(loc="lower right", fontsize=7, ncol=2, framealpha=0.9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    import io
    buf = io.BytesIO()
    fig.savefig(buf, format=dest.suffix.lower().lstrip("."))
    plt.close(fig)
    return atomic_write_bytes(dest, buf.getvalue())


def _unit(top: int) -> tuple[str, int]:
    for name, factor in UNITS:
        if top >= factor:
            return name, factor
    return "KiB", 2**10
