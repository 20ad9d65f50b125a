"""`vramplan` command line: parse, call the library, render. No arithmetic here.

estimate, models and gpus are handled here; every other command lives in its own module of this
package exposing `register(subparsers, setup_flags)`, with heavy imports only inside its handler.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys

from vramplan.cli import _plan as plan, _profile as profile, _replay as replay, _simulate as simulate
from vramplan.cli._flags import (OutputError, Parser, Stdout, alloc_conf_from_args, print_json, setup_flags,
                                 setup_from_args)
from vramplan.core._architectures import ARCHITECTURES
from vramplan.core._errors import ModelError, VramplanError
from vramplan.estimate._estimator import estimate
from vramplan.core._models import catalog, spec_from_config

# Commands with their own module: each exposes register(subparsers, setup_flags); its heavy imports
# happen inside its handler.
COMMANDS = (simulate, profile, plan, replay)
COMMAND_NAMES = ("estimate", "models", "gpus", *(name for module in COMMANDS for name in module.NAMES))


def cmd_estimate(args) -> int:
    est = estimate(args.model, setup_from_args(args), gpu=args.gpu, arch=args.arch,
                   alloc_conf=alloc_conf_from_args(args))
    if args.json:
        print_json(est.to_dict())
    else:
        from vramplan.render._tables import print_estimate  # rich loads only when a table is printed
        print_estimate(est)
    return 0


def cmd_models(args) -> int:

    query = (args.query or "").strip().lower()
    rows = []
    for entry in catalog().values():
        spec = spec_from_config(entry.config, entry.id, entry.source)
        names = (entry.id, *entry.aliases, spec.model_type)
        if query and not any(query in n.lower() for n in names):
            continue
        rows.append({"id": entry.id, "model_type": spec.model_type, "params": spec.num_params,
                     "layers": spec.layers, "hidden": spec.hidden, "kv_heads": spec.kv_heads,
                     "vocab": spec.vocab, "aliases": list(entry.aliases)})
    types = sorted({r["model_type"] for r in rows} | {t for t in ARCHITECTURES if query and query in t.lower()})
    families = [family_features(ARCHITECTURES[t]) for t in types]
    if not rows and not families:
        raise ModelError(f"no bundled model or family matches {args.query!r}",
                         hint="`vramplan models` lists them all; any hub id or config.json also works")
    if args.json:   # the model rows, each with its family's features
        by_type = {f["model_type"]: f for f in families}
        print_json([dict(r, family=by_type[r["model_type"]]) for r in rows])
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console()
    # one space between columns and no rules: every id fits whole in 80 columns
    narrow = dict(box=None, pad_edge=False, collapse_padding=True, header_style="bold underline",
                  title_justify="left")
    # grouped under each model_type's own line rather than a type column: ids up to 48 characters
    # (ibm-granite/granite-3.1-3b-a800m-instruct is 41) stay whole in 80 columns
    table = Table(title="Bundled model catalog, by model_type", **narrow)
    table.add_column("id", no_wrap=True, min_width=max((len(r["id"]) for r in rows), default=2))
    for col in ("params", "layers", "hidden", "kv", "vocab"):
        table.add_column(col, justify="right", no_wrap=True)
    for model_type in sorted({r["model_type"] for r in rows}):
        table.add_row(f"[bold]{model_type}:[/bold]")
        for r in (r for r in rows if r["model_type"] == model_type):
            # params: three significant digits at least, six characters at most; the vocabulary
            # without separators, so DeepSeek-V3's 128 KV heads fit too
            billions = r["params"] / 1e9
            table.add_row(r["id"], f"{billions:.{2 if billions < 100 else 1}f}B", str(r["layers"]),
                          str(r["hidden"]), str(r["kv_heads"]), str(r["vocab"]))
    if rows:
        console.print(table)
    fam = Table(title="Families: what each supports", **narrow)
    for col in ("type", "methods", "attention", "MoE experts"):
        fam.add_column(col, no_wrap=col == "type", overflow="fold")
    for f in families:
        fam.add_row(f["model_type"], ", ".join(f["methods"]), ", ".join(f["attention"]), f["moe"] or "-")
    console.print(fam)
    console.print("[dim]simulate and profile also run model types not listed here: transformers builds them "
                  "from config.json.[/dim]", highlight=False)
    return 0


# What a family in the analytic registry supports: read from its Architecture entry.
METHODS = ("estimate", "simulate", "profile")


def family_features(arch) -> dict:
    moe = ""
    if arch.moe:
        moe = ("fused 3-D stacks" + (" with biases" if arch.moe_style == "gpt_oss" else "")
               + ", 16-bit under 4-bit quantization in transformers 5; "
               # peft has no MoE conversion for the type: all-linear leaves the experts frozen;
               # Llama 4's router is an nn.Linear all-linear would wrap (inventory.refuse_router_lora)
               + ("LoRA through ParamWrapper" if arch.peft_moe_conversion else
                  "frozen under LoRA; named --targets only (all-linear would wrap the router)" if arch.linear_router
                  else "frozen under all-linear LoRA")
               + ("; --experts 4bit for stacks that quantize them" if arch.expert_linears_v4 else ""))
    return {"model_type": arch.model_type, "methods": list(getattr(arch, "methods", METHODS)),
            "attention": list(arch.attention), "moe": moe}


def cmd_gpus(args) -> int:
    from vramplan.core._gpus import catalog  # local: cmd_models imports core.models' catalog by the same name

    rows = [g.to_dict() for g in catalog()]
    if args.json:
        print_json(rows)
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Bundled GPU catalog (memory as NVML reports it)")
    for col in ("name", "GiB", "GB", "arch", "sm", "SMs"):
        table.add_column(col, justify="right" if col in ("GiB", "GB", "sm", "SMs") else "left")
    for g in catalog():
        table.add_row(g.name, f"{g.memory_bytes / 2**30:.2f}", f"{g.memory_bytes / 1e9:.2f}", g.arch or "",
                      g.compute_capability or "", str(g.sms or ""))
    Console().print(table)
    return 0


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command, or of `command` alone when it names one: a run parses one
    command, and building the others' flags costs about 10 ms of a cold start (benchmarks/
    bench_estimate.py)."""
    parser = Parser(prog="vramplan", description="Peak GPU memory of QLoRA / LoRA fine-tuning: estimate, "
                                                  "simulate, profile, plan.")
    sub = parser.add_subparsers(dest="command", parser_class=Parser, required=True)
    wanted = lambda name: command not in COMMAND_NAMES or command == name  # noqa: E731
    common = setup_flags() if command not in ("models", "gpus") else None
    if wanted("estimate"):
        p = sub.add_parser("estimate", parents=[common], help="analytic estimate of one training step")
        p.set_defaults(handler=cmd_estimate)
    if wanted("models"):
        p = sub.add_parser("models", help="the bundled model catalog and what each family supports")
        p.add_argument("query", nargs="?", help="show only models whose id, alias or type contains this (any case)")
        p.add_argument("--json", action="store_true")
        p.set_defaults(handler=cmd_models)
    if wanted("gpus"):
        p = sub.add_parser("gpus", help="the bundled GPU catalog")
        p.add_argument("--json", action="store_true")
        p.set_defaults(handler=cmd_gpus)
    for module in COMMANDS:
        if any(wanted(name) for name in module.NAMES):
            module.register(sub, common)
    return parser


def _reader_closed(exc: SystemExit) -> bool:
    """Whether `exc` is rich's Console.on_broken_pipe ending the process (SystemExit(1)) after the
    reader of stdout, `head` say, closed the pipe: main() ends that as it ends a BrokenPipeError,
    with 0. rich has pointed stdout at /dev/null by then, so nothing else fails writing to it."""
    tb = exc.__traceback__
    while tb is not None:
        code = tb.tb_frame.f_code
        if code.co_name == "on_broken_pipe" and "rich" in code.co_filename:
            return True
        tb = tb.tb_next
    return False


def main(argv: list[str] | None = None) -> int:
    real_stdout, sys.stdout = sys.stdout, Stdout(sys.stdout)
    try:
        argv = sys.argv[1:] if argv is None else list(argv)
        args = build_parser(argv[0] if argv else None).parse_args(argv)
        code = args.handler(args)
        sys.stdout.flush()   # a write still buffered fails here, where it can be one Error line, not at exit
        return code
    except OutputError as exc:
        _LOST.append(real_stdout)
        _error_line(f"Error: {exc}")
        return exc.exit_code
    except VramplanError as exc:
        _error_line(f"Error: {exc}")
        return exc.exit_code
    except KeyboardInterrupt:
        _error_line("Error: interrupted")
        return 130
    except BrokenPipeError:
        _LOST.append(real_stdout)
        return 0
    except SystemExit as exc:
        if _reader_closed(exc):
            return 0
        raise
    finally:
        sys.stdout = real_stdout


# the stdout whose buffered bytes failed to go out: run() points its descriptor at /dev/null before
# the process exits; a caller of main() in its own process keeps its stdout as it is
_LOST: list = []


def _error_line(text: str) -> None:
    """The one line on stderr, if the process has one that takes it (`2>&-` leaves sys.stderr None)."""
    try:
        if sys.stderr is not None:
            sys.stderr.write(text + "\n")
            sys.stderr.flush()
    except OSError:
        pass


def _drop_output(stream) -> None:
    """What is still buffered for a stdout that failed would fail again when the interpreter
    flushes it at exit ("Exception ignored ...", exit 120): point its descriptor at /dev/null,
    as Python's documentation advises for SIGPIPE (signal module, "Note on SIGPIPE")."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)
    except (AttributeError, OSError, ValueError):   # no stdout, or not a file (pytest's capture)
        pass


def run() -> None:
    """The `vramplan` console script and `python -m vramplan.cli`: main(), then the process exits.

    At exit the interpreter's last collections walk every object still alive, which after
    `simulate` or `profile` means torch's and transformers' hundreds of thousands (over 1.5 s on a
    2-core machine); frozen objects are left out of them. All a command writes is written and
    closed before main() returns, and stdout is flushed at exit, so they have nothing left to do."""
    code = main()
    if _LOST:
        _drop_output(_LOST.pop())
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    run()
