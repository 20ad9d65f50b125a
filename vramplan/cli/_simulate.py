"""`vramplan simulate`: the real training step traced on the meta device, next to the estimate.

Light at import: torch, transformers, peft and bitsandbytes load inside the handler, after the
model, the setup and the estimate have been checked (everything estimate rejects, simulate
rejects first, in a second).
"""
from __future__ import annotations


from vramplan.core._errors import UsageError
from vramplan.cli._flags import alloc_conf_from_args, print_json, setup_from_args
from vramplan.core._gpus import resolve_gpu
from vramplan.estimate._estimator import estimate

TOP_MODULES = 10


NAMES = ("simulate",)   # the commands register() adds


def register(subparsers, setup_flags_parent) -> None:
    p = subparsers.add_parser(
        "simulate", parents=[setup_flags_parent],
        help="run the real transformers + peft + bitsandbytes step on the meta device: exact peak, no GPU",
        description="Execute the real forward, backward and optimizer step on meta tensors (no memory, no "
                    "compute) under an allocation tracker: peak allocated and where it happens, the components "
                    "at the peak, the top modules, and the analytic estimate side by side.")
    p.add_argument("--timeline", metavar="CSV",
                   help="write allocated bytes over the step to this CSV "
                        "(event, phase, module, op, allocated_bytes; at most 4096 max-preserving rows)")
    p.add_argument("--exact", action="store_true",
                   help="trace every decoder layer (default: trace 5, rebuild the identical rest; same result)")
    p.set_defaults(handler=cmd_simulate)


def cmd_simulate(args) -> int:
    # the simulate package loads only when this command runs: `vramplan estimate` builds this parser too
    from vramplan.simulate._build import refuse_4bit_experts, simulation_spec

    setup = setup_from_args(args)
    spec = simulation_spec(args.model)   # a type the analytic model lacks is built by transformers alone
    refuse_4bit_experts(spec, setup)     # transformers 5 cannot build them: estimate-only
    gpu = None
    if args.gpu:
        gpu = resolve_gpu(args.gpu)
    if args.timeline:   # refused before the trace: a folder, a named pipe, a missing folder
        from vramplan.core._files import file_destination
        file_destination(args.timeline, "--timeline", "mem.csv")
    conf = alloc_conf_from_args(args)
    est = estimate(spec, setup, gpu=gpu, arch=args.arch, alloc_conf=conf) if getattr(spec, "analytic", True) else None  # same GPU architecture as the trace
    from vramplan.simulate._step import require_packages  # this command's code loads only when it runs
    from vramplan.simulate import simulate  # this command's code loads only when it runs
    require_packages(setup)     # before the progress bar: a missing package is a one-line error
    with _progress() as progress:
        trace = simulate(spec, setup, gpu=gpu, arch=args.arch, exact=args.exact, progress=progress,
                         alloc_conf=conf)
    if args.timeline:
        write_timeline(trace, args.timeline)
    from vramplan.simulate import _compare as compare  # this command's code loads only when it runs
    if args.json:
        print_json(compare.to_dict(trace, est, skipped=estimate_skipped(spec)))
    else:
        print_simulation(trace, est, layers=spec.layers, gpu=gpu, timeline=args.timeline,
                         skipped=estimate_skipped(spec))
    return 0


def estimate_skipped(spec) -> str | None:
    """Why no estimate stands beside the simulation, or None when one does."""
    if getattr(spec, "analytic", True):
        return None
    if getattr(spec, "unmodelled", ""):
        return (f"the analytic model does not model this config ({spec.unmodelled}); the simulation ran the "
                "model transformers builds from its config")
    from vramplan.core._architectures import supported
    return (f"the analytic model does not know model_type {spec.model_type!r} (it knows {supported()}); "
            "the simulation ran the model transformers builds from its config")


def write_timeline(trace, path: str) -> None:
    """The timeline CSV, written whole or not at all (profile/_store.py atomic_write_bytes)."""
    import csv
    import io

    from vramplan.core._files import file_destination
    from vramplan.profile._store import atomic_write_bytes

    text = io.StringIO(newline="")
    w = csv.writer(text)
    w.writerow(["event", "phase", "module", "op", "allocated_bytes"])
    w.writerows(trace.timeline)
    try:
        atomic_write_bytes(file_destination(path, "--timeline", "mem.csv"), text.getvalue().encode())
    except OSError as exc:
        raise UsageError(f"cannot write --timeline {path}: {exc.strerror or exc}",
                         hint="check the path and its permissions") from None


class _progress:
    """A rich progress bar on stderr (decoder layers run, forward and backward, per step)."""

    def __enter__(self):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        console = Console(stderr=True)
        self.bar = Progress(TextColumn("[bold]simulate[/bold] {task.description}"), BarColumn(),
                            MofNCompleteColumn(), TextColumn("layers"), TimeElapsedColumn(),
                            console=console, transient=True, disable=not console.is_terminal)
        self.bar.__enter__()
        self.task = self.bar.add_task("starting", total=None)
        return self

    def __call__(self, stage: str, done: int, total: int) -> None:
        self.bar.update(self.task, description=stage, completed=done, total=total or None)

    def __exit__(self, *exc):
        self.bar.__exit__(*exc)


# --- rendering --------------------------------------------------------------------------------------

def _gib(n: int | None) -> str:
    from vramplan.core._units import format_amount
    return format_amount(n, "GiB", missing="-")


def _signed_gib(n: int) -> str:
    from vramplan.core._units import format_amount
    return format_amount(n, "GiB", signed=True)


def _pct(p: float | None) -> str:
    return "-" if p is None else f"{p:+.1f}%"


def print_simulation(trace, est, layers: int, gpu=None, timeline: str | None = None, console=None,
                     skipped: str | None = None) -> None:
    from rich.markup import escape  # a model id or path is text, never markup
    from rich.console import Console
    from rich.table import Table

    from vramplan.simulate import _compare as compare  # this command's code loads only when it runs

    console = console or Console()
    s = trace.setup
    quant = f" {s['quant']}{'+dq' if s.get('double_quant') and s['quant'] != 'int8' else ''}" if s["quant"] else ""
    rank = "" if s["method"] == "full" else f"r={s['rank']}, "      # full fine-tuning has no adapters
    console.print(f"{escape(trace.model)} — {s['method']}{quant}, {rank}batch {s['batch']} x seq {s['seq']}, "
                  f"{s['optimizer']}, {('reentrant checkpointing' if s.get('reentrant') else 'checkpointing') if s['grad_ckpt'] else 'no checkpointing'}, {s['attn']} "
                  f"— simulated on the meta device", style="bold", highlight=False)
    console.print(f"Peak allocated [bold]{_gib(trace.peak_allocated_bytes)} GiB[/bold] "
                  f"({trace.peak_allocated_bytes:,} bytes) in {trace.peak_phase}: module {trace.peak_module}, "
                  f"op {trace.peak_op}", highlight=False)

    table = Table(title="Components at the peak (GiB)", title_justify="left")
    cols = (("component", "left"), ("simulate", "right"))
    if est is not None:
        cols += (("estimate", "right"), ("est - sim", "right"), ("%", "right"))
    for col, justify in cols:
        table.add_column(col, justify=justify, no_wrap=True)
    rows = compare.rows(trace, est)
    for row in rows:
        if row["component"] == "peak_allocated":
            table.add_section()
        style = "bold" if row["component"] == "peak_allocated" else (
            "dim" if not row["simulate"] and not row["estimate"] else None)
        cells = [row["component"], _gib(row["simulate"])]
        if est is not None:
            cells += [_gib(row["estimate"]), _signed_gib(row["difference"]), _pct(row["percent"])]
        table.add_row(*cells, style=style)
    console.print(table)
    if trace.peak_reserved_bytes:
        estimated = f", estimate {_gib(est.peak_reserved_bytes)} GiB" if est is not None else ""
        console.print(f"Peak reserved (caching-allocator model, warm-up + measured step, "
                      f"{trace.alloc_conf or 'default settings'}): simulate {_gib(trace.peak_reserved_bytes)} GiB"
                      f"{estimated}", highlight=False)
    phases = ", ".join(f"{p} {_gib(v)}" for p, v in trace.phase_peaks.items())
    if est is not None:
        est_phases = ", ".join(f"{p} {_gib(v)}" for p, v in est.phase_peaks.items())
        console.print(f"Peak by phase (GiB): simulate {phases}; estimate {est_phases} (estimate peaks in "
                      f"{est.peak_phase})", highlight=False)
    else:
        console.print(f"Peak by phase (GiB): simulate {phases}", highlight=False)
        console.print(f"Estimate skipped: {skipped}", highlight=False)

    top = Table(title="Top modules at the peak (what they allocated in the step that is still live)",
                title_justify="left")
    top.add_column("module", no_wrap=True)
    top.add_column("GiB", justify="right")
    top.add_column("share of peak", justify="right")
    for module, nbytes in trace.top_modules[:TOP_MODULES]:
        top.add_row(module, _gib(nbytes), f"{nbytes / trace.peak_allocated_bytes:.1%}")
    console.print(top)

    if trace.paged_optimizer_bytes:
        console.print(f"Paged optimizer state: {_gib(trace.paged_optimizer_bytes)} GiB in CUDA unified memory "
                      f"(not allocated; pages to host RAM under pressure)", highlight=False)
    if gpu is not None and trace.status is not None:
        from types import SimpleNamespace

        from vramplan.render._tables import fit_line

        # the simulated step's own device total and replay against the card, in estimate's words
        console.print("Simulated: " + fit_line(SimpleNamespace(
            gpu=gpu, status=trace.status, device_total_bytes=trace.device_total_bytes,
            headroom_bytes=trace.headroom_bytes, allocator_retries=trace.allocator_retries,
            allocator_oom=trace.allocator_oom, peak_allocated_bytes=trace.peak_allocated_bytes,
            smallest_gpu_bytes=trace.smallest_gpu_bytes)), highlight=False)
    for warning in (est.warnings if est is not None else ()):   # the setup's, as estimate says them
        console.print(f"[bold yellow]WARNING:[/bold yellow] {warning}.", highlight=False)
    how = (f"{trace.layers_traced} of {layers} decoder layers traced, the rest rebuilt"
           if trace.extrapolated else f"all {trace.layers_traced} layers traced")
    attention = ", ".join(f"{v} {k}" for k, v in trace.attention.items() if v)   # calls per backend
    console.print(f"[dim]{how}; {trace.seconds:.1f} s"
                  + (f"; attention kernels: {attention}" if attention else "")
                  + (f"; timeline written to {timeline}" if timeline else "") + "[/dim]", highlight=False)
    for note in trace.notes:
        console.print(f"[dim]  - {note}[/dim]", highlight=False)
