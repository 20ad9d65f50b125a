"""`vramplan replay`: a recorded allocator history (a `torch.cuda.memory._dump_snapshot` pickle or
its JSON trace) replayed through the caching-allocator model: peak and final reserved memory,
fragmentation, retries, OOMs; `--alloc-conf` replays it under other settings (would
expandable_segments have saved me?), `--check` compares the model with what the real allocator did.

Light at import: the snapshot is read and replayed inside the handler.
"""
from __future__ import annotations

from vramplan.core._errors import UsageError
from vramplan.cli._flags import print_json
from vramplan.core._units import parse_size


NAMES = ("replay",)   # the commands register() adds


def register(subparsers, setup_flags_parent) -> None:
    p = subparsers.add_parser(
        "replay", help="replay a recorded CUDA allocator history (memory snapshot) through the allocator model",
        description="Replay a torch.cuda.memory._dump_snapshot pickle (or its JSON trace) through a model of "
                    "PyTorch's caching allocator: peak and final reserved bytes, fragmentation, retries, OOMs.")
    p.add_argument("snapshot", help="a _dump_snapshot pickle, or a JSON trace (initial_segments, ops, expected)")
    p.add_argument("--alloc-conf", metavar="STR",
                   help="replay under these PYTORCH_CUDA_ALLOC_CONF settings instead of the recorded ones, "
                        "e.g. 'expandable_segments:True'")
    p.add_argument("--capacity", metavar="SIZE",
                   help="bytes the allocator may reserve (card minus context), e.g. 22GiB; default unlimited")
    p.add_argument("--check", action="store_true",
                   help="compare with what the real allocator did (addresses, segment events, final reserved); "
                        "exit 1 on any mismatch")
    p.add_argument("--device", type=int, default=None, help="which device's trace to read (default: the first "
                                                            "with events)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(handler=cmd_replay)


def cmd_replay(args) -> int:
    # this command's code loads only when it runs
    from vramplan.cuda._snapshot import check_snapshot, load_trace, replay_snapshot

    if args.check and (args.alloc_conf is not None or args.capacity is not None):
        raise UsageError("--check replays the recorded settings without a capacity",
                         hint="drop --alloc-conf / --capacity, or drop --check for a what-if replay")
    capacity = None
    if args.capacity is not None:
        capacity = parse_size(args.capacity, "--capacity")
    if args.device is not None and args.device < 0:
        raise UsageError(f"--device must be >= 0, got {args.device}", hint="devices are numbered from 0")
    trace = load_trace(args.snapshot, device=args.device)
    if args.check:
        result = check_snapshot(trace)
        if args.json:
            print_json(result.to_dict())
        else:
            print_check(result, args.snapshot)
        return 0 if result.ok else 1
    result = replay_snapshot(trace, args.alloc_conf, capacity=capacity)
    if args.json:
        print_json(result.to_dict())
    else:
        print_replay(result, args.snapshot)
    return 0


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**30:,.3f} GiB"


def print_replay(r, source: str, console=None) -> None:
    from rich.console import Console
    from rich.markup import escape  # a model id or path is text, never markup
    from rich.table import Table

    table = Table(title=f"Allocator replay of {escape(source)}")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    settings = r.alloc_conf or "(defaults)"
    if r.alloc_conf != r.recorded_alloc_conf:
        settings += f"  (recorded: {r.recorded_alloc_conf or 'defaults'})"
    replayed = f"{r.ops_replayed:,}" + (f" of {r.ops:,} (the replay stops at its first OOM)"
                                        if r.ops_replayed < r.ops else "")
    rows = [("settings", settings), ("ops replayed", replayed), ("peak reserved", _gib(r.peak_reserved_bytes)),
            ("reserved at the OOM" if r.oom else "final reserved", _gib(r.final_reserved_bytes)),
            ("peak allocated", _gib(r.peak_allocated_bytes)),
            ("fragmentation at the reserved peak", _gib(r.fragmentation_bytes)),
            ("largest free block at the reserved peak", _gib(r.largest_free_block_bytes)),
            ("segments at the OOM" if r.oom else "segments at the end", f"{r.segments:,}"),
            ("alloc retries (cache flushes)", str(r.num_alloc_retries)), ("OOMs (num_ooms)", str(r.num_ooms))]
    if r.oom:
        rows.append(("first OOM", f"op {r.oom['index']}: {r.oom['nbytes']:,} bytes with "
                                  f"{_gib(r.oom['reserved_bytes'])} reserved"))
    if r.recorded_ooms:
        rows.append(("OOMs in the recording", str(r.recorded_ooms)))

    for name, value in rows:
        table.add_row(name, escape(value))
    (console or Console()).print(table)


def print_check(c, source: str, console=None) -> None:
    from rich.console import Console
    from rich.markup import escape  # a model id or path is text, never markup
    from rich.table import Table

    table = Table(title=f"Allocator model vs recording: {escape(source)}")
    table.add_column("check")
    table.add_column("model", justify="right")
    table.add_column("recorded", justify="right")
    table.add_column("mismatches", justify="right")
    table.add_row("allocation addresses", f"{c.allocs - min(c.address_mismatches, c.allocs):,} of {c.allocs:,}",
                  f"{c.allocs:,}", str(c.address_mismatches))
    table.add_row("segment events", f"{c.segment_events:,}", f"{c.expected_segment_events:,}",
                  str(c.segment_mismatches))
    table.add_row("final reserved", _gib(c.final_reserved_bytes), _gib(c.expected_final_reserved_bytes),
                  "0" if c.final_reserved_bytes == c.expected_final_reserved_bytes else "1")
    console = console or Console()
    console.print(table)
    console.print("EXACT" if c.ok else "MISMATCH: the model diverges from the recording")
