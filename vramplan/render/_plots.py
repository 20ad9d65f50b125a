"""Stacked component bars, one per setup, with the GPU's memory drawn as a line.

matplotlib is imported only when a plot is asked for (the `export` extra), with the Agg
backend so it works without a display.
"""
from __future__ import annotations

from pathlib import Path

from vramplan.core._components import ALLOCATED
from vramplan.core._errors import UsageError, require
from vramplan.plan._sharding import per_gpu

FORMATS = (".png", ".svg", ".pdf")
DEVICE_LABEL = "context + NCCL + allocator"
MAX_BARS = 60


def stacked_bars(bars: list[tuple[str, dict, int]], path: str | Path, capacity: int | None = None,
                 capacity_label: str = "", title: str = "") -> Path:
    """bars: (label, allocated components {name: bytes}, device-only bytes). Writes `path`."""
    path = Path(path)
    if path.suffix.lower() not in FORMATS:
        raise UsageError(f"cannot plot to {str(path)!r}: unknown image format",
                         hint=f"end the file name with one of {', '.join(FORMATS)}")
    if not path.parent.exists():
        raise UsageError(f"cannot plot to {str(path)!r}: no directory {str(path.parent)!r}",
                         hint="create the directory or pick another path")
    if not bars:
        raise UsageError("nothing to plot", hint="give at least one setup")
    bars = bars[:MAX_BARS]
    require("matplotlib", "export")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gib = 2**30
    names = [c.value for c in ALLOCATED]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.7 * len(bars) + 3), 5))
    x = range(len(bars))
    bottom = [0.0] * len(bars)
    colors = plt.get_cmap("tab10").colors
    for i, name in enumerate(names + [DEVICE_LABEL]):
        values = [(parts.get(name, 0) if name != DEVICE_LABEL else device) / gib for _, parts, device in bars]
        if not any(values):
            continue
        ax.bar(x, values, bottom=bottom, label=name, color=colors[i % len(colors)] if name != DEVICE_LABEL else "0.8")
        bottom = [b + v for b, v in zip(bottom, values)]
    if capacity:
        ax.axhline(capacity / gib, color="black", linestyle="--", linewidth=1.2,
                   label=capacity_label or f"GPU {capacity / gib:.1f} GiB")
    ax.set_xticks(list(x))
    ax.set_xticklabels([label for label, _, _ in bars], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("GiB per GPU")
    if title:
        ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    try:
        fig.savefig(path)
    except OSError as exc:
        raise UsageError(f"cannot write {str(path)!r}: {exc.strerror or exc}", hint="check the path") from None
    finally:
        plt.close(fig)
    return path


def device_only(est) -> int:
    """Bytes NVML adds on top of the allocated components (context, NCCL, allocator slack)."""
    return est.device_total_bytes - est.peak_allocated_bytes


def plot_plan(plan, path: str | Path) -> Path:
    """Bars: the requested setup, the largest batch, the longest sequence, each ranked change."""

    spec, setup, par = plan.model, plan.setup, plan.parallel
    bars = [("requested", plan.estimate.components, device_only(plan.estimate))]
    picks = []
    if plan.max_batch and plan.max_batch.value and plan.max_batch.value != setup.batch:
        picks.append((f"max batch {plan.max_batch.value}", setup.with_(batch=plan.max_batch.value), par))
    if plan.max_seq and plan.max_seq.value and plan.max_seq.value != setup.seq:
        picks.append((f"max seq {plan.max_seq.value}", setup.with_(seq=plan.max_seq.value), par))
    for i, change in enumerate(plan.changes[:6], 1):
        picks.append((f"change {i}", change.setup, par))
    if plan.minimum and plan.minimum.changes:
        for i, change in enumerate(plan.minimum.changes[:3], 1):
            picks.append((f"{plan.minimum.changes_parallel.label}: {i}", change.setup, plan.minimum.changes_parallel))
    for label, s, p in picks:
        est = per_gpu(spec, s, p, gpu=plan.gpu)   # the planned card's kernels, as the plan's own figures
        bars.append((label, est.components, device_only(est)))
    if plan.gpu is None:
        capacity, capacity_label = None, ""
    else:
        capacity, capacity_label = plan.gpu.memory_bytes, f"{plan.gpu.name} ({plan.gpu.memory_bytes / 2**30:.1f} GiB)"
    title = f"{spec.id}: {setup.method}, batch {setup.batch} x seq {setup.seq}, {par.label}"
    return stacked_bars(bars, path, capacity, capacity_label, title)


def plot_sweep(df, path: str | Path, varying: list[str]) -> Path:
    """One bar per sweep row, labelled by the axes that vary."""
    names = [c.value for c in ALLOCATED]
    bars = []
    for _, row in df.iterrows():
        if isinstance(row.get("error"), str):  # a combination that cannot run has no bar
            continue
        label = ", ".join(f"{k}={row[k]}" for k in varying) or str(row["batch"])
        parts = {n: int(row[n]) for n in names}
        bars.append((label, parts, int(row["device_total_bytes"]) - int(row["peak_allocated_bytes"])))
    capacity = int(df["gpu_memory_bytes"].iloc[0]) if "gpu_memory_bytes" in df else None
    label = f"{df['gpu'].iloc[0]} ({capacity / 2**30:.1f} GiB)" if capacity else ""
    return stacked_bars(bars, path, capacity, label, f"{df['model'].iloc[0]} sweep")
