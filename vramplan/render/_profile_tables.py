"""Rich output for profile and compare: tables from Comparison rows, and the live progress bar.
Formatting only; every number comes from profile/_compare.py / the record."""
from __future__ import annotations

from rich.console import Console
from rich.table import Table

from vramplan.core._units import format_amount
from vramplan.profile._compare import Comparison
from vramplan.profile._store import ckpt_label
from rich.markup import escape   # model ids, paths and failure messages are text, never markup

GIB = 2**30
UNITS = (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10))
_UNIT_NAMES = {factor: name for name, factor in UNITS}


def gib(n) -> str:
    return format_amount(n, "GiB")


def unit_for(values) -> tuple[str, int]:
    """The largest binary unit in which the biggest value is at least 1 (tiny test models are
    read in KiB, real ones in GiB)."""
    top = max((abs(v) for v in values if v is not None), default=0)
    for name, factor in UNITS:
        if top >= factor:
            return name, factor
    return "KiB", 2**10


def amount(n, factor: int) -> str:
    """n in the unit unit_for chose (its factor); the header names the unit."""
    return format_amount(n, _UNIT_NAMES[factor])


def pct(x) -> str:
    return "—" if x is None else f"{x:+.1%}"


def setup_text(s: dict) -> str:
    """'qlora-nf4+dq b1 s2048 gc adamw' (attention named only when not sdpa)."""
    quant = f"-{s['quant']}{'+dq' if s.get('double_quant') and s.get('quant') != 'int8' else ''}" if s.get("quant") else ""
    attn = f" {s['attn']}" if s.get("attn", "sdpa") != "sdpa" else ""
    accum = f" x{s['grad_accum']}" if s.get("grad_accum", 1) > 1 else ""
    return (f"{s['method']}{quant} b{s['batch']}{accum} s{s['seq']} "
            f"{ckpt_label(s)}{attn} {s['optimizer']}")


def detail_table(c: Comparison) -> Table:
    device_rows = ("cuda_context", "allocator_overhead")
    # One unit for every row: the header names it, so no cell may carry another (a CUDA context
    # next to a tiny model's allocations reads e.g. 0.049 / 488.000 MiB, not KiB and MiB mixed).
    unit, f = unit_for([c.predicted_allocated, c.measured_allocated, c.predicted_device_total,
                        c.measured_device_total] + [v for r in c.rows for v in (r.predicted, r.measured)])
    table = Table(title=escape(f"{c.model} — {setup_text(c.setup)} on {c.gpu or c.device} [{c.status}]"),
                  title_justify="left", caption_justify="left")
    # Names and numbers are never cut: headers take two lines, a sum of components wraps at " + ",
    # and the notes go under the table as numbered lines, so the table fits 80 columns.
    for col, just in (("component", "left"), (f"predicted\n{unit}", "right"), (f"measured\n{unit}", "right"),
                      (f"diff\n{unit}", "right"), ("error", "right"), ("note", "right")):
        table.add_column(col, justify=just, no_wrap=col != "component")
    notes: dict[str, int] = {}

    def mark(note: str) -> str:
        return f"[{notes.setdefault(note, len(notes) + 1)}]" if note else ""

    for r in c.rows:
        if r.component in device_rows:
            continue
        table.add_row(r.component.replace("+", " + "), amount(r.predicted, f), amount(r.measured, f),
                      _diff(r.predicted, r.measured, f), pct(r.error), mark(r.note),
                      style=None if r.in_total else "dim")
    table.add_section()
    table.add_row("peak allocated", amount(c.predicted_allocated, f), amount(c.measured_allocated, f),
                  _diff(c.predicted_allocated, c.measured_allocated, f), pct(c.error_allocated),
                  mark(f"peak allocated: predicted in {c.predicted_peak_phase}"
                       + (f", measured in {c.measured_peak_phase}" if c.measured_peak_phase else "")),
                  style="bold")
    for r in c.rows:
        if r.component in device_rows:
            table.add_row(r.component, amount(r.predicted, f), amount(r.measured, f),
                          _diff(r.predicted, r.measured, f), pct(r.error), mark(r.note))
    table.add_row("device total", amount(c.predicted_device_total, f), amount(c.measured_device_total, f),
                  _diff(c.predicted_device_total, c.measured_device_total, f),
                  pct(c.error_device_total), mark("device total: NVML, what nvidia-smi shows"), style="bold")
    table.caption = "\n".join(f"[{i}] {note}" for note, i in notes.items())
    return table


def _diff(a, b, factor: int) -> str:
    return format_amount(None if a is None or b is None else a - b, _UNIT_NAMES[factor], signed=True)


def summary_table(comparisons: list[Comparison]) -> Table:
    """One row per record. Each memory cell stacks predicted, measured and the error, so that the
    table fits 80 columns without cutting a model name or a number; context and allocator
    overhead are in the detail table."""
    current = bool(comparisons) and comparisons[0].prediction == "current"
    unit, f = unit_for([c.predicted_allocated for c in comparisons] + [c.measured_allocated for c in comparisons])
    runit, rf = unit_for([c.predicted_reserved for c in comparisons] + [c.measured_reserved for c in comparisons])
    dunit, df = unit_for([c.predicted_device_total for c in comparisons] + [c.measured_device_total for c in comparisons])
    table = Table(title="Predicted vs measured peak memory "
                        f"({'current estimator' if current else 'recorded prediction'})", title_justify="left",
                  caption="memory cells: predicted / measured / error (alloc / reserved: "
                          "torch.cuda.max_memory_allocated / max_memory_reserved; device total: NVML)",
                  caption_justify="left")
    # "alloc", as the Markdown table says: the columns stay narrow enough at 80 that a setup such as
    # "qlora-nf4+dq b1 s2048 gc adamw" is not wrapped
    for col, just in (("model / setup / device", "left"), ("status", "left"), (f"alloc\n{unit}", "right"),
                      (f"reserved\n{runit}", "right"), (f"device\ntotal\n{dunit}", "right"), ("check", "left")):
        table.add_column(col, justify=just,
                         no_wrap=col in ("check",) or col.startswith(("alloc", "reserved", "device")))
    for c in comparisons:
        ok = c.within_tolerance
        verdict = "—" if ok is None else ("[green]ok[/green]" if ok else "[red]EXCEEDED[/red]")
        err_alloc = c.error_allocated if c.status == "ok" else c.lower_bound_error
        status = c.status if c.status != "oom" else f"oom (>= {amount(c.measured_allocated, f)})"
        measured = c.measured_allocated if c.status == "ok" else None
        table.add_row(f"{c.model.rsplit('/', 1)[-1]}\n{setup_text(c.setup)}\n{c.gpu or c.device}", status,
                      f"{amount(c.predicted_allocated, f)}\n{amount(measured, f)}\n{pct(err_alloc)}",
                      f"{amount(c.predicted_reserved, rf)}\n{amount(c.measured_reserved, rf)}\n{pct(c.error_reserved)}",
                      f"{amount(c.predicted_device_total, df)}\n{amount(c.measured_device_total, df)}\n"
                      f"{pct(c.error_device_total)}", verdict)
        if c is not comparisons[-1]:
            table.add_section()
    return table


def print_comparisons(comparisons: list[Comparison], detail: bool, console: Console | None = None) -> None:
    console = console or Console()
    if detail:
        for c in comparisons:
            console.print(detail_table(c))
            if c.failure:
                console.print(f"[red]{escape(c.failure)}[/red]", highlight=False)
            for n in c.notes:
                console.print(f"[dim]{escape(n)}[/dim]", highlight=False)
    console.print(summary_table(comparisons))


class Progress:
    """The live bar: steps done, current phase, current and peak memory."""

    def __init__(self, total_steps: int, device: str, enabled: bool = True):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeElapsedColumn

        self.console = Console(stderr=True)
        self.enabled = enabled and self.console.is_terminal
        self.device = device
        self.alloc = 0
        self.peak = 0
        self.nvml = None
        self.phase = "starting"
        self.step = None
        self.bar = RichProgress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[mem]}"), TimeElapsedColumn(), console=self.console,
                                transient=True, disable=not self.enabled)
        self.task = self.bar.add_task("starting", total=total_steps + 1, mem="")

    def __enter__(self):
        self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        return self.bar.__exit__(*exc)

    def __call__(self, event: dict) -> None:
        kind = event.get("event")
        if kind == "phase":
            if event["stage"] == "start":
                self.phase, self.step = event["phase"], event.get("step")
                self.alloc = event.get("allocated") or self.alloc
            else:
                s = event["stats"]
                self.alloc = s["allocated_end"]
                self.peak = max(self.peak, s["peak_allocated"])
                if s["phase"] in ("load", "optimizer"):
                    self.bar.advance(self.task)
        elif kind == "nvml":
            self.nvml = event.get("used")
        elif kind == "context" and event.get("available"):
            self.phase = "CUDA context"
        where = self.phase if self.step is None else f"step {self.step + 1} {self.phase}"
        mem = f"allocated {self.alloc / GIB:.2f} GiB, peak {self.peak / GIB:.2f} GiB"
        if self.nvml is not None:
            mem += f", device {self.nvml / GIB:.2f} GiB"
        self.bar.update(self.task, description=where, mem=mem)
