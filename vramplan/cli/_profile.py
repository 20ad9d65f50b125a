"""`vramplan profile` and `vramplan compare`: argument parsing and rendering only.

Light on purpose: `vramplan estimate` imports this module to build its parser, so nothing heavy
(torch, pandas, pynvml, matplotlib, rich) is imported until a handler runs.
"""
from __future__ import annotations

import argparse
import sys

from vramplan.cli._flags import alloc_conf_from_args, print_json, setup_from_args
from vramplan.core._errors import require, UsageError, VramplanError
from vramplan.core._gpus import resolve_gpu

PROFILE_EPILOG = """\
The setup flags are those of `vramplan estimate`; the run uses them the way a training script
does. --gpu here emulates that GPU size on the device you run on (CUDA: the allocator is capped
with set_per_process_memory_fraction; CPU: the run stops with out-of-memory when allocated bytes
pass it), and gives the estimate its verdict. Without a GPU use --device cpu: the same code runs
with bitsandbytes' CPU kernels and allocated bytes are counted per storage as the CUDA allocator
would (NVML is reported as unavailable).
"""


COMPARE_EPILOG = """\
Each record shows allocated (torch.cuda.max_memory_allocated), reserved (max_memory_reserved,
against the caching-allocator model) and the device total (NVML), predicted / measured / error.
A file given by name must be a readable record. In a folder, JSON files that are not profile
records are passed over; a record that cannot be read (truncated, malformed, written by a newer
vramplan) is skipped with a warning on stderr naming it and why, and the rest are compared.
With --strict any such file is an error; a folder with no readable record is always one.
"""


NAMES = ("profile", "compare")   # the commands register() adds


def register(subparsers, setup_flags_parent) -> None:
    p = subparsers.add_parser("profile", parents=[setup_flags_parent], epilog=PROFILE_EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              help="train real steps and measure memory (torch.cuda counters + NVML), store a record")
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    p.add_argument("--steps", type=int, default=None,
                   help="measured steps after warm-up (default 5 on a GPU; 2 on the CPU, whose counts repeat exactly)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up steps, not in the steady-state peak (default 1)")
    p.add_argument("--random-weights", action="store_true",
                   help="random weights built on the device tensor by tensor (no download; any model size)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and token ids")
    p.add_argument("--out", default="profiles", help="folder the record goes to (default profiles/)")
    p.add_argument("--no-record", action="store_true", help="measure and print, write no record")
    p.add_argument("--snapshot", action="store_true",
                   help="also save the caching allocator's history (torch.cuda.memory._dump_snapshot): "
                        "`vramplan replay SNAPSHOT --check` replays it; https://pytorch.org/memory_viz draws it")
    p.add_argument("--plot", metavar="FILE", help="draw the memory timeline to FILE (.png, .svg, .pdf)")
    p.add_argument("--timeout", type=float, metavar="SECONDS", help="end the run after this long (recorded as timeout)")
    p.add_argument("--nvml-hz", type=float, default=200.0, help="NVML sampling rate (default 200)")
    p.set_defaults(handler=cmd_profile)

    c = subparsers.add_parser("compare", help="predicted vs measured for profile records (a file or a folder)",
                              epilog=COMPARE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("paths", nargs="+", metavar="PATH", help="record files or folders of records")
    c.add_argument("--json", action="store_true", help="print the comparisons as JSON")
    c.add_argument("--csv", metavar="FILE", help="write one row per record as CSV (pandas); '-' for stdout")
    c.add_argument("--markdown", action="store_true", help="print the error table as Markdown")
    c.add_argument("--detail", action="store_true", help="per-component table for every record")
    c.add_argument("--recorded", action="store_true",
                   help="use the prediction stored in each record instead of re-estimating with this version")
    c.add_argument("--strict", action="store_true",
                   help="exit 1 when a record's error exceeds its tolerance, or when a JSON file in a folder "
                        "is not a readable record")
    c.set_defaults(handler=cmd_compare)


def cmd_profile(args) -> int:
    from vramplan.profile._session import ProfileOptions, profile  # this command's code loads only when it runs

    setup = setup_from_args(args)
    if args.alloc_conf is not None:
        alloc_conf_from_args(args)   # a malformed string is one Error: line, before anything runs
    limit = resolve_gpu(args.gpu).memory_bytes if args.gpu else None
    options = ProfileOptions(device=args.device, steps=args.steps, warmup=args.warmup,
                             random_weights=args.random_weights, seed=args.seed, memory_limit_bytes=limit,
                             snapshot=args.snapshot, timeout_s=args.timeout, nvml_hz=args.nvml_hz,
                             model_ref=args.model, alloc_conf=args.alloc_conf)
    options.validate()
    if args.plot:  # checked before the run: a finished run must not fail on its plot
        _check_plot_path(args.plot)
        require("matplotlib", "export")
    out = None if args.no_record else args.out
    if out is not None and not str(out).strip():
        raise UsageError("--out needs a folder name", hint="e.g. --out profiles/, or --no-record")
    if args.json:
        record, path = profile(args.model, setup, options, out=out)
    else:
        from vramplan.render._profile_tables import Progress  # rich loads only when a table is printed
        with Progress(options.steps + options.warmup, options.device) as progress:
            record, path = profile(args.model, setup, options, out=out, on_event=progress)
    plot_path = None
    if args.plot:
        from vramplan.render._profile_plots import plot_record  # this command's code loads only when it runs
        plot_path = plot_record(record, args.plot)
    if args.json:
        data = record.to_dict()
        data["path"] = str(path) if path else None
        print_json(data)
    else:
        _print_profile(record, path, plot_path)
    if record.status in ("ok", "oom"):
        return 0
    raise _run_failed(record, path, options)


def _where(f) -> str:
    """Where in the run a failure happened (steps counted from 0, as the record counts them)."""
    if f.step is not None:
        return f"at step {f.step}, {f.phase}"
    return "while loading the model, before the first step" if f.phase == "load" else "before the first step"


def _run_failed(record, path, options) -> VramplanError:
    f = record.failure
    kept = f" (record: {path})" if path else ""
    hint = "the record keeps the last measured values; " if path else ""
    cpu = options.device == "cpu"
    if f is None:
        return VramplanError(f"the run ended with status {record.status}{kept}", hint=hint + "see the run's notes")
    if record.status == "timeout":
        return VramplanError(f"the run passed its --timeout of {options.timeout_s:g} s {_where(f)} and was "
                             f"ended{kept}", hint=hint + "allow it more time with a larger --timeout")
    what = "crashed" if record.status == "crashed" else "failed"
    device_hint = ("check the machine's free memory (a run killed by signal 9 is often out of memory)" if cpu
                   else "check the GPU with nvidia-smi")
    return VramplanError(f"the run {what} {_where(f)}: {f.message}{kept}", hint=hint + device_hint)


def _check_plot_path(path: str) -> None:
    """--plot's type and destination, before the run."""
    from pathlib import Path

    if Path(path).suffix.lower() not in (".png", ".svg", ".pdf"):
        raise UsageError(f"--plot {path}: unknown image type", hint="end the file name with .png, .svg or .pdf")
    _check_writable_file(path, "--plot", "memory.png", "write the plot elsewhere")


def _check_writable_file(dest: str, flag: str, example: str, elsewhere: str) -> None:
    """Refuse an output file `flag` cannot write, before any work (core/_files.py file_destination:
    a folder, a device or a missing folder refused; the folder must take a new file)."""
    from vramplan.core._files import file_destination
    from vramplan.profile._store import probe_folder  # this command's code loads only when it runs

    path = file_destination(dest, flag, example)
    try:
        probe_folder(path.parent)
    except OSError as exc:
        raise VramplanError(f"cannot write {flag} {dest}: {exc.strerror or exc}", hint=elsewhere) from None


def _print_profile(record, path, plot_path) -> None:
    from rich.markup import escape  # a model id or path is text, never markup
    from rich.console import Console

    from vramplan.profile._compare import compare_record  # this command's code loads only when it runs
    # rich loads only when a table is printed
    from vramplan.render._profile_tables import amount, detail_table, gib, pct, unit_for

    console = Console()
    cmp = compare_record(record, path or "")
    console.print(detail_table(cmp))
    m, nv = record.measured, record.nvml
    if m is not None:
        run = record.run
        unit, f = unit_for([m.run_peak_allocated_bytes])
        console.print(f"Steps: {run['warmup']} warm-up + {run['steps']} measured on {run['device']} "
                      f"({m.counter}); whole-run peak {amount(m.run_peak_allocated_bytes, f)} {unit}"
                      + (f", reserved {amount(m.peak_reserved_bytes, f)} {unit}" if m.peak_reserved_bytes else "")
                      + (f"; losses {', '.join('—' if x is None else f'{x:.3f}' for x in m.losses)}"
                         if m.losses else ""), highlight=False)
        phases = ", ".join(f"{p} {amount(n, f)}" for p, n in m.phase_peaks.items())
        console.print(f"Peak by phase ({unit}): {phases}", highlight=False)
    if nv.available:
        console.print(f"NVML: {nv.samples} samples at {nv.rate_hz:.0f} Hz, query {1e6 * (nv.query_seconds_mean or 0):.0f} us, "
                      f"overhead {pct(nv.overhead_fraction).lstrip('+')} of step time; context {gib(nv.context_bytes)} GiB "
                      f"before load", highlight=False)
    else:
        console.print(f"NVML: unavailable ({nv.reason})", highlight=False)
    if record.failure is not None:
        f = record.failure
        console.print(f"[bold red]{f.kind.upper()}[/bold red] {escape(_where(f))}: {escape(f.message)}", highlight=False)
        unit, k = unit_for([f.last_peak_allocated_bytes, f.last_allocated_bytes])
        if f.last_allocated_bytes is None and f.last_peak_allocated_bytes is None:
            console.print("Last measured: nothing", highlight=False)
        else:
            console.print(f"Last measured: allocated {amount(f.last_allocated_bytes, k)} {unit}, "
                          f"peak {amount(f.last_peak_allocated_bytes, k)} {unit}"
                          + (f", device {amount(f.last_nvml_used_bytes, k)} {unit} (NVML)"
                             if f.last_nvml_used_bytes is not None else ""), highlight=False)
    if path:
        console.print(escape(f"Record: {path}" + (f" (snapshot: {record.snapshot})" if record.snapshot else "")), highlight=False)
    if plot_path:
        console.print(escape(f"Plot: {plot_path}"), highlight=False)


def cmd_compare(args) -> int:
    from vramplan.profile._compare import compare_path, error_table_markdown, write_csv  # loads only when it runs

    to_stdout = [flag for flag, on in (("--json", args.json), ("--markdown", args.markdown),
                                       ("--csv -", args.csv == "-")) if on]
    if len(to_stdout) > 1:   # two documents on one stream parse as neither
        raise UsageError(f"{' and '.join(to_stdout)} both print to stdout",
                         hint="give one of them, or write the CSV to a file: --csv FILE")
    if args.csv is not None:
        _check_csv_path(args.csv)

    def skipped(path, exc) -> None:
        sys.stderr.write(f"Warning: skipped {path}: {exc}\n")

    comparisons = []
    for path in args.paths:
        comparisons.extend(compare_path(path, recorded=args.recorded, strict=args.strict, on_skip=skipped))
    if args.csv:
        text = write_csv(comparisons, args.csv)
        if text is not None:
            sys.stdout.write(text)
    if args.json:
        print_json([c.to_dict() for c in comparisons])
    elif args.markdown:
        sys.stdout.write(error_table_markdown(comparisons))
    elif args.csv != "-":
        from vramplan.render._profile_tables import print_comparisons  # rich loads only when a table is printed
        print_comparisons(comparisons, detail=args.detail or len(comparisons) == 1)
    if args.strict and any(c.within_tolerance is False for c in comparisons):
        bad = [c.record_id for c in comparisons if c.within_tolerance is False]
        raise VramplanError(f"{len(bad)} record(s) beyond their tolerance: {', '.join(bad[:5])}",
                            hint="see `vramplan compare --detail` for the components that moved")
    return 0


def _check_csv_path(dest: str) -> None:
    """Refuse a --csv destination that cannot be written before comparing anything."""
    if dest == "-":
        return
    if not dest.strip():
        raise UsageError("--csv needs a file name", hint="e.g. --csv errors.csv, or --csv - for stdout")
    _check_writable_file(dest, "--csv", "table.csv", "write the CSV elsewhere")
