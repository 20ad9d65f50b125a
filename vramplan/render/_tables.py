"""Rows -> rich tables. Nothing here computes a number; it only formats what _report.py gives."""
from __future__ import annotations

from rich.console import Console
from rich.table import Table

from vramplan.estimate._estimator import Estimate
from vramplan.render._report import component_rows
from vramplan.core._units import GiB, format_bytes, format_signed
from rich.markup import escape   # a model id or path is text, never markup: "cfg/[/x]" crashed the print


def gib(n: int) -> str:
    return format_bytes(n, "GiB")


def shape_text(s) -> str:
    """'batch 1 x seq 2048', with ' x 16 micro-steps' under gradient accumulation."""
    return f"batch {s.batch} x seq {s.seq}" + (f" x {s.grad_accum} micro-steps" if s.accumulates else "")


def estimate_table(est: Estimate) -> Table:
    spec, s = est.model, est.setup
    title = (f"{escape(spec.id)} — {s.method}"
             + (f" {s.quant}{'+dq' if s.double_quant and s.quant != 'int8' else ''}" if s.quantized else "")
             + f", {shape_text(s)}, {s.optimizer}")
    table = Table(title=title, title_justify="left")
    # Names and numbers never wrap or get cut at 80 columns: only the prose column "what" wraps.
    table.add_column("component", no_wrap=True)
    table.add_column("GiB", justify="right", no_wrap=True)
    table.add_column("share", justify="right", no_wrap=True)
    table.add_column("what")
    for row in component_rows(est):
        style = None if row["allocated"] else "dim"
        table.add_row(row["component"], f"{row['bytes'] / GiB:,.3f}", f"{row['share']:.1%}", row["what"], style=style)
    table.add_section()
    table.add_row("peak allocated", f"{est.peak_allocated_bytes / GiB:,.3f}", "",
                  f"torch.cuda.max_memory_allocated, in the {est.peak_phase} phase", style="bold")
    if est.peak_reserved_bytes:
        table.add_row("peak reserved", f"{est.peak_reserved_bytes / GiB:,.3f}", "",
                      "torch.cuda.max_memory_reserved (caching-allocator model, two steps)", style="bold")
    table.add_row("device total", f"{est.device_total_bytes / GiB:,.3f}", "", "what nvidia-smi / NVML would show",
                  style="bold")
    if est.paged_optimizer_bytes:
        table.add_row("paged optimizer", f"{est.paged_optimizer_bytes / GiB:,.3f}", "",
                      "all of it, in CUDA unified memory: resident while the card has room (in the device "
                      "total), paged to host RAM under pressure", style="dim")
    return table


def verdict(est: Estimate) -> str:
    """The verdict line; the estimate's warnings are part of it, never only in the assumptions."""
    return fit_line(est) + "".join(f" [bold yellow]WARNING:[/bold yellow] {w}." for w in est.warnings)


def fit_line(est) -> str:
    """The fits / tight / no sentence of anything with estimate's verdict fields (an Estimate, or a
    simulated step's: cli/_simulate.py)."""
    if est.gpu is None:
        return f"Device total {gib(est.device_total_bytes)} ({est.device_total_bytes / 1e9:,.2f} GB); pass --gpu for a verdict."
    g = est.gpu
    where = f"{g.name} ({gib(g.memory_bytes)})"
    status = est.status
    if status in ("fits", "tight"):
        word = "[green]FITS[/green]" if status == "fits" else "[yellow]TIGHT[/yellow]"
        # the percent rounded down: a tight setup (under 5% left) never reads "5%"
        line = (f"{word} on {where}: {gib(est.device_total_bytes)} needed, "
                f"{format_signed(est.headroom_bytes)} headroom ({est.headroom_bytes * 100 // g.memory_bytes}%).")
        if getattr(est, "allocator_retries", 0):
            line += (f" The caching allocator frees its cache and retries {est.allocator_retries} "
                     f"time{'s' if est.allocator_retries != 1 else ''} over two steps to stay within the card (each one synchronizes the GPU).")
        return line
    oom = est.allocator_oom
    smallest = getattr(est, "smallest_gpu_bytes", None)
    runs = "" if smallest is None else (f" It runs on a card of about {gib(smallest)} or more "
                                        f"(short by about {gib(smallest - g.memory_bytes)}).")
    if oom and oom.get("fragmentation"):
        # a simulated step's replay does not name where (its events carry no phase)
        place = oom.get("phase") and " in " + oom["phase"] + (f", {oom['module']}" if oom.get("module") else "")
        return (f"[red]DOES NOT FIT[/red] on {where}: the caching allocator runs out of memory{place or ''} "
                f"(a {gib(oom['nbytes'])} request with {gib(oom['reserved_bytes'])} reserved, "
                f"{gib(oom['allocated_bytes'])} allocated: fragmentation); try --alloc-conf expandable_segments:True."
                + runs)
    if oom and oom.get("phase") == "load":
        # the load's own peak (docs/allocator.md#kbit-load): more is allocated there than in the step
        moment = oom["allocated_bytes"] + oom["nbytes"]
        return (f"[red]DOES NOT FIT[/red] on {where}: the load runs out of memory (a {gib(oom['nbytes'])} request "
                f"with {gib(oom['allocated_bytes'])} allocated: {gib(moment)} at that moment, more than the step's "
                f"peak of {gib(est.peak_allocated_bytes)})." + runs)
    if smallest is not None:
        return (f"[red]DOES NOT FIT[/red] on {where}: it runs on a card of about {gib(smallest)} or more "
                f"(short by about {gib(smallest - g.memory_bytes)}); with room to spare the caching allocator "
                f"keeps more cached: {gib(est.device_total_bytes)} in all.")
    return (f"[red]DOES NOT FIT[/red] on {where}: {gib(est.device_total_bytes)} needed, "
            f"short by {gib(-est.headroom_bytes)}.")


def print_estimate(est: Estimate, console: Console | None = None) -> None:
    console = console or Console()
    console.print(estimate_table(est))
    phases = ", ".join(f"{p} {gib(n)}" for p, n in est.phase_peaks.items())
    console.print(f"Peak by phase: {phases}")
    console.print(f"Trainable parameters: {est.trainable_params:,} of {est.model.num_params:,}")
    console.print(verdict(est), highlight=False)
    if est.gpu is not None and est.gpu.arch is None and est.gpu.memory_bytes % 10**9 == 0:
        console.print(f"[dim]Note: {est.gpu.name} = {est.gpu.memory_bytes:,} bytes ({gib(est.gpu.memory_bytes)}); "
                      "a card sold as '48GB' reports about 48 GiB: name it (e.g. --gpu A6000) for its real size.[/dim]")
    console.print("Assumptions:")
    for a in est.assumptions:
        console.print(f"  - {a}", highlight=False)
