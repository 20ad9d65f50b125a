"""`vramplan plan` and `vramplan sweep`: parse, call planner / sweep, render (rich) last.

Light at import: the planner, pandas, matplotlib and rich load inside the handlers.
"""
from __future__ import annotations

import argparse
import dataclasses

from vramplan.core._errors import UsageError
from vramplan.core._gpus import resolve_gpu
from vramplan.core._setup import MAX_BATCH, MAX_SEQ, _bounded as bounded
from vramplan.cli._flags import (GIVEN_ONLY, RECIPE_FLAGS, alloc_conf_from_args, cuda_arch_from_args, print_json,
                                 setup_flags, setup_from_args)
from vramplan.cuda._arch import check_dtype, target_arch

STATUS_STYLE = {"fits": "green", "tight": "yellow", "no": "red"}
TRAIN_DEFAULTS = {"rank": 16, "method": "qlora", "quant": "nf4", "optimizer": "adamw (or the recipe's)",
                  "dtype": "bf16 (or the recipe's)",
                  "attn": "the model's: sdpa unless it has no SDPA path"}  # TrainSetup's, for --help
STATUS_WORD = {"fits": "FITS", "tight": "TIGHT", "no": "DOES NOT FIT"}
# Text marks, so that a verdict survives without colour (piped output, NO_COLOR, a screen reader).
STATUS_MARK = {"fits": "✓", "tight": "~", "no": "✗"}


def marked(status: str, text: str) -> str:
    """`text` with its status mark, coloured when the console has colour."""
    return f"[{STATUS_STYLE[status]}]{text} {STATUS_MARK[status]}[/]"


def legend(tight: float) -> str:
    return (f"{STATUS_MARK['fits']} fits, {STATUS_MARK['tight']} tight (under {tight:.0%} of the GPU left), "
            f"{STATUS_MARK['no']} does not fit")


def parse_list(flag: str, text: str, kind=int, bound: int | None = None) -> list:
    """'1,2,4' -> [1, 2, 4]; a malformed list, or a number outside [1, bound] where a bound is
    given, is a UsageError naming the flag."""
    items = [t.strip() for t in str(text).split(",")]
    if not items or any(not t for t in items):
        raise UsageError(f"{flag} {text!r} is not a comma-separated list", hint=f"e.g. {flag} 1,2,4")
    if kind is int:
        out = []
        for t in items:
            try:
                out.append(int(t))
            except ValueError:
                raise UsageError(f"{flag} {text!r}: {t!r} is not a whole number", hint=f"e.g. {flag} 1,2,4") from None
        for value in out if bound is not None else ():
            bounded(flag, value, bound)   # TrainSetup's own check, under the flag the user gave
        return out
    return items


def _parallel_flags(p: argparse.ArgumentParser, lists: bool) -> None:
    p.add_argument("--gpus", default="1" if lists else 1, type=str if lists else int,
                   help="number of GPUs = data-parallel ranks (default 1)" + ("; comma-separated" if lists else ""))
    p.add_argument("--strategy", default=None,
                   help="single | ddp | fsdp | fsdp_grad_op | zero2 | zero3 (default: single for 1 GPU, ddp above)")
    p.add_argument("--offload", default=None,
                   help="none | cpu: FSDP CPUOffload, ZeRO offload_optimizer (+ offload_param for zero3); default none")


NAMES = ("plan", "sweep")   # the commands register() adds


def register(subparsers, setup_flags_parent) -> None:
    p = subparsers.add_parser("plan", parents=[setup_flags_parent],
                              help="what fits: largest batch / sequence, a grid, changes that fit, per-GPU under FSDP / ZeRO",
                              description="What fits on a GPU, per GPU under DDP / FSDP / DeepSpeed ZeRO. --gpu also "
                                          "takes 'all' (every catalog GPU: fits? headroom).")
    _parallel_flags(p, lists=False)
    p.add_argument("--deepspeed", metavar="CONFIG",
                   help="a DeepSpeed config JSON: its ZeRO stage, offload, buckets and stage-3 gathering settings "
                        "(\"auto\" as the HF Trainer fills it) for --gpus ranks; its "
                        "train_micro_batch_size_per_gpu as --batch and an enabled fp16 / bf16 as --dtype")
    p.add_argument("--grid-batch", help="batch values of the grid, e.g. 1,2,4,8 (default: powers of two)")
    p.add_argument("--grid-seq", help="sequence lengths of the grid, e.g. 512,2048,8192 (default: powers of two)")
    p.add_argument("--tight", type=float, default=0.05,
                   help="a fit with less than this fraction of the GPU left is 'tight' (default 0.05)")
    p.add_argument("--no-recommend", dest="recommend", action="store_false", help="skip the ranked changes")
    p.add_argument("--plot", help="write stacked components per setup with the GPU line (.png, .svg, .pdf)")
    p.add_argument("--workers", type=int, default=None,
                   help="processes that evaluate the grid, the ranked changes and the minimum hardware (default: one "
                        "per CPU, at most 8; 1: this process)")
    p.set_defaults(handler=cmd_plan)

    # a fresh copy of the setup flags: sweep redefines some of them as lists
    s = subparsers.add_parser("sweep", parents=[setup_flags()], conflict_handler="resolve",
                              help="the estimate over a product of setups, as a table / CSV (pandas)")
    # rank, method, quant, optimizer, attn and dtype default to None: an axis the user did not type is not
    # swept, so that it is never checked against a method that does not use it (core/_setup.py
    # check_given) and a --recipe's own optimizer and dtype stand.
    for flag, default, what in (("--batch", "1", "micro-batch sizes"), ("--seq", "2048", "sequence lengths"),
                                ("--rank", None, "LoRA ranks"), ("--method", None, "methods"),
                                ("--optimizer", None, "optimizers"), ("--attn", None, "attention kernels"),
                                ("--quant", None, "quantizations"), ("--dtype", None, "dtypes")):
        s.add_argument(flag, default=default,
                       help=f"{what}, comma-separated (default {default or TRAIN_DEFAULTS[flag[2:]]})")
    _parallel_flags(s, lists=True)
    s.add_argument("--csv", help="write the table to this CSV file")
    s.add_argument("--plot", help="write stacked components per setup with the GPU line (.png, .svg, .pdf)")
    s.add_argument("--tight", type=float, default=0.05, help="'tight' threshold as a fraction of the GPU (0.05)")
    s.add_argument("--workers", type=int, default=None,
                   help="processes that evaluate the rows (default: one per CPU, at most 8; 1: this process)")
    s.set_defaults(handler=cmd_sweep)


# --- plan ----------------------------------------------------------------------------------------

def target_gpu(args):
    """--gpu resolved; a bare size given with --arch carries that architecture, whose CUDA kernels
    the planner's estimates then assume (core/_gpus.py Gpu.cuda), as estimate's --arch does. An
    --arch that contradicts a catalog GPU is estimate's error (cuda/_arch.py target_arch)."""
    gpu = resolve_gpu(args.gpu)
    arch = target_arch(gpu, args.arch)
    if args.arch is None or gpu.cuda is not None:
        return gpu
    return dataclasses.replace(gpu, compute_capability=f"{arch.major}.{arch.minor}", sms=arch.sms)


def cmd_plan(args) -> int:
    from rich.markup import escape  # a model id or path is text, never markup
    from vramplan.plan._planner import plan  # this command's code loads only when it runs

    batches = parse_list("--grid-batch", args.grid_batch, bound=MAX_BATCH) if args.grid_batch else None
    seqs = parse_list("--grid-seq", args.grid_seq, bound=MAX_SEQ) if args.grid_seq else None
    if args.gpu is None:
        raise UsageError("plan needs a GPU", hint="e.g. --gpu 24GB, --gpu A100-80GB, or --gpu all")
    survey = args.gpu.strip().lower() == "all"
    if survey and (args.grid_batch or args.grid_seq):
        raise UsageError("--grid-batch / --grid-seq shape one GPU's grid; --gpu all has none",
                         hint="give one GPU, e.g. --gpu 24GB, for a grid")
    if survey and args.arch is not None:
        raise UsageError(f"--arch {args.arch} contradicts --gpu all: each catalog GPU has its own",
                         hint="give --arch only with a bare size such as --gpu 16GB")
    model, parallel = args.model, None
    if args.deepspeed:
        from vramplan.core._models import resolve
        from vramplan.plan._deepspeed_config import parallel_from_deepspeed, setup_from_deepspeed
        model = resolve(args.model)
        parallel = parallel_from_deepspeed(args.deepspeed, args.gpus, model, args.strategy, args.offload)
        keys = {"batch": "train_micro_batch_size_per_gpu", "dtype": "its enabled fp16 / bf16 section"}
        for field, value in setup_from_deepspeed(args.deepspeed).items():
            given = getattr(args, field)
            if given is not None and given != value:
                raise UsageError(f"--{field} {given} contradicts {args.deepspeed} ({keys[field]}: {value})",
                                 hint=f"drop --{field}: the config decides it")
            setattr(args, field, value)
    setup = setup_from_args(args)
    gpu, card_setup = "all", None
    if survey:
        # each card plans what `plan --gpu CARD` would: estimate's defaults for that card (its dtype)
        def card_setup(card):
            return setup_from_args(argparse.Namespace(**{**vars(args), "gpu": card.name}))
    else:
        gpu = target_gpu(args)
        check_dtype(cuda_arch_from_args(args), setup.dtype, setup)   # estimate's refusal, in its words
    result = plan(model, setup, gpu, gpus=args.gpus, strategy=args.strategy,
                  offload=args.offload or "none", parallel=parallel, batches=batches, seqs=seqs, tight=args.tight,
                  recommend=args.recommend, alloc_conf=alloc_conf_from_args(args), workers=args.workers,
                  card_setup=card_setup)
    if args.plot:
        from vramplan.render._plots import plot_plan  # this command's code loads only when it runs
        plot_plan(result, args.plot)
    if args.json:
        print_json(result.to_dict())
    else:
        print_plan(result)
        if args.plot:
            from rich.console import Console
            Console().print(f"Plot written to {escape(args.plot)}", highlight=False)
    return 0


def _next(lim) -> str:
    """What happens one past a limit: the allocator's out-of-memory on this GPU, or the need."""
    at = f"{lim.field}={lim.value + 1 if lim.value else 1}"
    smallest = lim.next_smallest_gpu_bytes
    oom = lim.next_oom
    if oom:
        where = oom["phase"] + (f", {oom['module']}" if oom.get("module") else "")
        why = ": fragmentation" if oom.get("fragmentation") else ""
        larger = (f"it runs on a card of about {_gib(smallest)}" if smallest is not None
                  else f"a larger card would reserve {_gib(lim.next_need_bytes, 3)}")
        return f"{at} runs out of memory in {where}{why}; {larger}"
    if smallest is not None:
        return f"{at} runs on a card of about {_gib(smallest)}"
    return f"{at} needs {_gib(lim.next_need_bytes, 3)}"


def _gib(n: int | None, digits: int = 2) -> str:
    from vramplan.core._units import format_bytes
    return "-" if n is None else format_bytes(n, "GiB", digits)


def print_plan(result, console=None) -> None:
    from rich.markup import escape  # a model id or path is text, never markup
    from rich.console import Console
    from rich.table import Table

    from vramplan.render._tables import shape_text

    console = console or Console()
    s, par, est = result.setup, result.parallel, result.estimate
    head = (f"{escape(result.model.id)} — {s.method}" + (f" {s.quant}" if s.quantized else "")
            + ("" if s.method == "full" else f", r={s.rank}")      # full fine-tuning has no adapters
            + f", {shape_text(s)}, {s.optimizer}, "
            + (("reentrant checkpointing" if s.reentrant else "checkpointing") if s.grad_ckpt else "no checkpointing") + f", {s.attn} — {par.label}")
    console.print(head, style="bold", highlight=False)
    if result.survey:
        _print_survey(result, console, Table)
    else:
        style = STATUS_STYLE[result.status]
        per = "per GPU " if par.gpus > 1 else ""
        need = f"{_gib(result.need_bytes)} {per}needed, headroom {_gib(result.headroom_bytes)}"
        if result.smallest_gpu_bytes is not None:
            need = (f"runs on a card of about {_gib(result.smallest_gpu_bytes)} or more "
                    f"({_gib(result.need_bytes)} with room to spare)")
        console.print(f"[{style}]{STATUS_WORD[result.status]}[/{style}] on {result.gpu.name} "
                      f"({_gib(result.gpu.memory_bytes)}): {need}; peak in {est.peak_phase}", highlight=False)
        if par.strategy != "single":
            _print_terms(est, console, Table)
        for lim, other in ((result.max_batch, f"at seq {s.seq}"), (result.max_seq, f"at batch {s.batch}")):
            if lim.value == 0:
                console.print(f"Largest {lim.field}: none fits {other} ({_next(lim)})", highlight=False)
            else:
                nxt = lim.bound if lim.capped else _next(lim)
                console.print(f"Largest {lim.field} {other}: [bold]{lim.value}[/bold] ({_gib(lim.need_bytes, 3)}; "
                              f"{nxt})", highlight=False)
        _print_grid(result, console, Table)
        if result.changes:
            _print_changes(result.changes, result.gpu, console, Table, "Changes that make it fit (cheapest first)")
        elif result.status == "no" and result.minimum is not None:
            console.print("No change to the setup alone fits this GPU.", highlight=False)
        _print_recipe_changes(result, console)
        _print_allocator_changes(result, console)
    if result.minimum is not None:
        _print_minimum(result.minimum, result, console, Table)
    for note in result.notes:
        console.print(f"[yellow]Note:[/yellow] {note}", highlight=False)
    if par.strategy != "single":
        console.print("Assumptions:")
        for a in est.assumptions:
            console.print(f"  - {a}", highlight=False)


def _print_terms(est, console, Table) -> None:
    table = Table(title=f"Per GPU at the peak ({est.peak_phase}), {est.parallel.label}", title_justify="left")
    for col, just in (("component", "left"), ("part", "left"), ("held", "left"), ("GiB", "right"), ("src", "right")):
        table.add_column(col, justify=just, no_wrap=col != "part")  # only the prose column wraps
    sources: list[str] = []
    for t in sorted(est.terms, key=lambda t: -t.bytes):
        if t.source not in sources:
            sources.append(t.source)
        table.add_row(t.component, t.part, t.held, f"{t.bytes / 2**30:,.3f}", f"[{sources.index(t.source) + 1}]")
    table.add_section()
    table.add_row("peak allocated", "", "", f"{est.peak_allocated_bytes / 2**30:,.3f}", "", style="bold")
    table.add_row("device total", "+ CUDA context, NCCL, allocator slack", "", f"{est.device_total_bytes / 2**30:,.3f}",
                  "", style="bold")
    if est.cpu_bytes:
        table.add_row("CPU (pinned)", "offloaded shards and optimizer", "offloaded", f"{est.cpu_bytes / 2**30:,.3f}",
                      "", style="dim")
    console.print(table)
    for i, src in enumerate(sources, 1):
        console.print(f"  [{i}] {src}", style="dim", highlight=False)


def _print_grid(result, console, Table) -> None:
    grid = result.grid
    table = Table(title=f"GiB per GPU on {result.gpu.name}", title_justify="left",
                  caption=f"batch across, seq down: {legend(result.tight)} (its number: what a card with room to "
                          "spare would show; a smaller card may still run it); ≥: allocated alone exceeds the GPU",
                  caption_justify="left")
    table.add_column("seq \\ batch", justify="right")
    for b in grid.batches:
        table.add_column(str(b), justify="right")
    for s, row in zip(grid.seqs, grid.cells):
        table.add_row(str(s), *[marked(c.status, ("≥" if c.lower_bound else "") + f"{c.need_bytes / 2**30:,.1f}")
                                for c in row])
    console.print(table)


def _print_recipe_changes(result, console) -> None:
    """The training loop's own changes with what each saves on this setup's peak."""
    if not result.recipe_changes:
        return
    console.print("Training-loop changes (memory needed at the peak, saved):", highlight=False)
    for r in result.recipe_changes:
        flags = ", ".join(f"--{k.replace('_', '-')} {v}" if not isinstance(v, bool) else
                          (f"--{k.replace('_', '-')}" if v else f"--no-{k.replace('_', '-')}")
                          for k, v in r.change.changes.items())
        console.print(f"  {r.saving_bytes / 2**30:+.3f} GiB  {flags}: {r.change.text}", highlight=False)


def _print_allocator_changes(result, console) -> None:
    """The caching-allocator settings, each replayed on this setup (plan/_allocator_changes.py)."""
    if not result.allocator_changes:
        return
    now = result.estimate.alloc_conf or "defaults"
    console.print(f"Allocator settings (device total, saved vs {now}):", highlight=False)
    for a in result.allocator_changes:
        console.print(f"  {_gib(a.need_bytes)} {marked(a.status, '')} {a.saving_bytes / 2**30:+.3f} GiB  "
                      f"--alloc-conf {a.alloc_conf}: {a.text}", highlight=False)


def _print_changes(changes, gpu, console, Table, title) -> None:
    table = Table(title=title, title_justify="left")
    for col, just in (("#", "right"), ("change", "left"), ("need", "right"), ("headroom", "right"),
                      ("cost", "right"), ("what it costs", "left")):
        table.add_column(col, justify=just, no_wrap=col not in ("change", "what it costs"))
    for i, c in enumerate(changes, 1):
        table.add_row(str(i), c.description, marked(c.status, _gib(c.need_bytes)),
                      _gib(c.headroom_bytes), f"{c.cost:.2f}", c.cost_text)
    console.print(table)


def _print_minimum(m, result, console, Table) -> None:
    console.print(f"[bold]What it takes:[/bold] {m.message}.", highlight=False)
    if m.options:
        from vramplan.plan._planner import MIN_GPU_COUNTS

        counts = ", ".join(map(str, MIN_GPU_COUNTS))
        table = Table(title=f"Fewest GPUs per engine for the setup as asked (of {counts})", title_justify="left")
        for col in ("GPUs x engine", "per GPU", "CPU per rank"):
            table.add_column(col, justify="left" if col == "GPUs x engine" else "right")
        for o in m.options:
            table.add_row(o.label, marked(o.status, _gib(o.need_bytes)),
                          _gib(o.cpu_bytes) if o.cpu_bytes else "-")
        console.print(table)
    if m.changes:
        gpu = result.gpu or [r.gpu for r in result.survey if r.error is None][-1]   # the card _survey asked
        _print_changes(m.changes, gpu, console, Table, f"With {m.changes_parallel.label} on {gpu.name}")


def _print_survey(result, console, Table) -> None:
    s = result.setup
    # no one need for all: each card runs its own CUDA kernels (and its default dtype where none was given)
    table = Table(title=f"Every catalog GPU ({result.parallel.label}), each as `plan --gpu` that card alone",
                  title_justify="left", caption=f"GiB; max batch at seq {s.seq}, max seq at batch {s.batch}",
                  caption_justify="left")
    for col in ("GPU", "memory", "need", "verdict", "headroom", "max batch", "max seq"):
        table.add_column(col, justify="left" if col in ("GPU", "verdict") else "right",
                         no_wrap=col in ("GPU", "verdict"))
    gib = lambda n: f"{n / 2**30:,.2f}"  # noqa: E731 - the unit is in the caption: the table fits 80 columns
    errors: dict[str, int] = {}  # reason -> its footnote number
    for r in result.survey:
        if r.error is not None:   # a card the setup cannot run on: its reason below the table
            number = errors.setdefault(r.error, len(errors) + 1)
            table.add_row(r.gpu.name, gib(r.gpu.memory_bytes), "-", f"cannot run [{number}]", "-", "-", "-",
                          style="dim")
            continue
        table.add_row(r.gpu.name, gib(r.gpu.memory_bytes), gib(r.need_bytes), marked(r.status, r.status),
                      gib(r.headroom_bytes), str(r.max_batch), str(r.max_seq))
    console.print(table)
    for reason, i in errors.items():
        console.print(f"  [{i}] cannot run: {reason}", highlight=False)


# --- sweep ---------------------------------------------------------------------------------------

def cmd_sweep(args) -> int:
    from vramplan.core._files import file_destination
    from vramplan.plan._sweep import sweep  # this command's code loads only when it runs

    if args.csv:
        file_destination(args.csv, "--csv")   # before any row is computed
    axes = {"batch": parse_list("--batch", args.batch), "seq": parse_list("--seq", args.seq)}
    for name, kind in (("rank", int), ("method", str), ("quant", str), ("optimizer", str), ("dtype", str),
                       ("attn", str)):
        # swept only when typed
        if getattr(args, name) is not None:
            axes[name] = parse_list(f"--{name}", getattr(args, name), kind)
    gpu = None
    if args.gpu is not None:
        gpu = target_gpu(args)
    elif args.arch is not None:
        # the planner takes the kernels from the GPU (target_gpu): with none, no card carries them
        raise UsageError(f"sweep --arch {args.arch} needs a bare --gpu size",
                         hint=f"e.g. --gpu 16GB --arch {args.arch}, or `vramplan estimate` without --gpu")
    # The setup the rows vary: estimate's from the flags that are not swept (cli/_flags.py
    # setup_from_args: the recipe, --experts, the GPU's default dtype, ...); the swept ones at their
    # defaults, each row setting its own.
    fixed = argparse.Namespace(**{**vars(args), **dict.fromkeys(axes), "batch": 1, "seq": 2048})
    base = setup_from_args(fixed)
    dtypes = axes.get("dtype", [base.dtype])
    if len(dtypes) == 1:   # one dtype for every row: estimate's refusal, in its words
        check_dtype(cuda_arch_from_args(args), dtypes[0])
    given = tuple(k for k in (*GIVEN_ONLY, *RECIPE_FLAGS) if getattr(fixed, k, None) is not None)
    strategies = parse_list("--strategy", args.strategy, str) if args.strategy else [None]
    df = sweep(args.model, gpu, setup=base, gpus=parse_list("--gpus", args.gpus),
               strategy=strategies, offload=parse_list("--offload", args.offload or "none", str), tight=args.tight,
               alloc_conf=alloc_conf_from_args(args), workers=args.workers, given=given, **axes)
    varying = [c for c in (*axes, "gpus", "strategy", "offload") if df[c].nunique() > 1]
    _write_outputs(df, args, varying)
    if args.json:
        # a value a row does not have (quant of a lora row, status of a row that cannot run) is
        # NaN in pandas and null in JSON: NaN is no JSON number
        print_json(df.astype(object).where(df.notna(), None).to_dict(orient="records"))
        return 0
    print_sweep(df, varying, args)
    return 0


def _write_outputs(df, args, varying) -> None:
    """--csv and --plot, both or neither: the CSV is staged beside its path and takes its name once
    the plot is written (profile/_store.py staged_bytes); a failure removes what this call wrote."""
    import os

    from vramplan.core._files import file_destination
    from vramplan.profile._store import atomic_move, staged_bytes

    tmp, new_plot = None, False
    csv = file_destination(args.csv, "--csv") if args.csv else None   # a link's target; no device replaced
    try:
        if csv is not None:
            try:
                tmp = staged_bytes(csv, df.to_csv(index=False).encode())
            except OSError as exc:
                raise UsageError(f"cannot write {args.csv!r}: {exc.strerror or exc}", hint="check the path") from None
        if args.plot:
            from vramplan.render._plots import plot_sweep  # this command's code loads only when it runs
            new_plot = not os.path.exists(args.plot)
            plot_sweep(df, args.plot, varying)
        if tmp is not None:
            try:
                atomic_move(tmp, csv)
            except OSError as exc:
                raise UsageError(f"cannot write {args.csv!r}: {exc.strerror or exc}", hint="check the path") from None
            tmp = None
    except BaseException:
        if new_plot and os.path.exists(args.plot):   # written, or half-written, by this call
            os.unlink(args.plot)
        raise
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def _cell(value) -> str:
    """A sweep value; None / NaN (quant of a non-quantized row) shows as '-'."""
    return "-" if value is None or value != value else str(value)


def print_sweep(df, varying, args) -> None:
    from rich.markup import escape  # a model id or path is text, never markup
    from rich.console import Console
    from rich.table import Table

    console = Console()
    title = escape(f"{df['model'].iloc[0]}" + (f" on {df['gpu'].iloc[0]}" if "gpu" in df else ""))
    table = Table(title=title, title_justify="left")
    cols = varying or ["batch", "seq"]
    for c in cols:
        table.add_column(c, justify="right")
    for c in ("peak allocated", "device total", "phase") + (("verdict",) if "status" in df else ()):
        table.add_column(c, justify="right")
    errors: dict[str, int] = {}  # reason -> its footnote number
    for _, row in df.iterrows():
        cells = [_cell(row[c]) for c in cols]
        if isinstance(row["error"], str):  # a combination that cannot run: its reason below the table
            number = errors.setdefault(row["error"], len(errors) + 1)
            cells += ["-", "-", f"cannot run [{number}]"] + (["-"] if "status" in df else [])
            table.add_row(*cells, style="dim")
            continue
        cells += [_gib(int(row["peak_allocated_bytes"])), _gib(int(row["device_total_bytes"])), row["peak_phase"]]
        if "status" in df:
            cells.append(f"[{STATUS_STYLE[row['status']]}]{row['status']}[/]")
        table.add_row(*cells)
    console.print(table)
    for reason, i in errors.items():
        console.print(f"  [{i}] cannot run: {reason}", highlight=False)
    if args.csv:
        console.print(f"CSV written to {escape(args.csv)} ({len(df)} rows, {len(df.columns)} columns)", highlight=False)
    if args.plot:
        console.print(f"Plot written to {escape(args.plot)}", highlight=False)
