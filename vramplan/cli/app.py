"""`vramplan` command line: parse, call the library, render. No arithmetic here.

estimate, models and gpus are handled here; every other command lives in its own module of this
package exposing `register(subparsers, setup_flags)`, with heavy imports only inside its handler.
"""
from __future__ import annotations

import sys

from vramplan.cli import plan, profile, replay, simulate
from vramplan.cli.flags import Parser, alloc_conf_from_args, print_json, setup_flags, setup_from_args
from vramplan.core.errors import VramplanError

# Commands with their own module: each exposes register(subparsers, setup_flags); its heavy imports
# happen inside its handler.
COMMANDS = (simulate, profile, plan, replay)


def cmd_estimate(args) -> int:
    from vramplan.estimate.estimator import estimate

    est = estimate(args.model, setup_from_args(args), gpu=args.gpu, alloc_conf=alloc_conf_from_args(args))
    if args.json:
        print_json(est.to_dict())
    else:
        from vramplan.render.tables import print_estimate
        print_estimate(est)
    return 0


def cmd_models(args) -> int:
    from vramplan.core.models import catalog, spec_from_config

    rows = []
    for entry in catalog().values():
        spec = spec_from_config(entry.config, entry.id, entry.source)
        rows.append({"id": entry.id, "model_type": spec.model_type, "params": spec.num_params,
                     "layers": spec.layers, "hidden": spec.hidden, "kv_heads": spec.kv_heads,
                     "vocab": spec.vocab, "aliases": list(entry.aliases)})
    if args.json:
        print_json(rows)
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Bundled model catalog")
    for col in ("id", "type", "params", "layers", "hidden", "kv heads", "vocab"):
        table.add_column(col, justify="left" if col in ("id", "type") else "right")
    for r in rows:
        table.add_row(r["id"], r["model_type"], f"{r['params'] / 1e9:.2f}B", str(r["layers"]), str(r["hidden"]),
                      str(r["kv_heads"]), f"{r['vocab']:,}")
    Console().print(table)
    return 0


def cmd_gpus(args) -> int:
    from vramplan.core.gpus import catalog

    rows = [g.to_dict() for g in catalog()]
    if args.json:
        print_json(rows)
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Bundled GPU catalog (memory as NVML reports it)")
    for col in ("name", "GiB", "GB", "arch"):
        table.add_column(col, justify="right" if col in ("GiB", "GB") else "left")
    for g in catalog():
        table.add_row(g.name, f"{g.memory_bytes / 2**30:.2f}", f"{g.memory_bytes / 1e9:.2f}", g.arch or "")
    Console().print(table)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="vramplan", description="Peak GPU memory of QLoRA / LoRA fine-tuning: estimate, "
                                                  "simulate, profile, plan.")
    sub = parser.add_subparsers(dest="command", parser_class=Parser, required=True)
    common = setup_flags()
    p = sub.add_parser("estimate", parents=[common], help="analytic estimate of one training step")
    p.set_defaults(handler=cmd_estimate)
    p = sub.add_parser("models", help="the bundled model catalog")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_models)
    p = sub.add_parser("gpus", help="the bundled GPU catalog")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_gpus)
    for command in COMMANDS:
        command.register(sub, common)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.handler(args)
    except VramplanError as exc:
        sys.stderr.write(f"Error: {exc}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("Error: interrupted\n")
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
