"""`vramplan` command line: parse, call the library, render. No arithmetic here.

Each command beyond estimate / models / gpus lives in a light `cli_<name>.py` module exposing
`register(subparsers, setup_flags)`; heavy imports happen only inside its handler.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys

from .errors import UsageError, VramplanError

EXTENSIONS = ("cli_simulate", "cli_profile", "cli_plan", "cli_replay")


class _Parser(argparse.ArgumentParser):
    """argparse that raises UsageError (one line, exit 2) instead of printing usage and exiting."""

    def error(self, message: str):
        raise UsageError(message, hint=f"see `{self.prog} --help`")


def setup_flags() -> argparse.ArgumentParser:
    """The setup flags shared by estimate, simulate, profile and plan (names are the interface)."""
    p = _Parser(add_help=False)
    p.add_argument("model", help="hub id or alias from `vramplan models`, a directory with config.json, or a config.json")
    p.add_argument("--gpu", help="a size (48GB, 24GiB, 80G) or a catalog name (A100-80GB, H100, RTX4090, L40S, A6000)")
    p.add_argument("--method", default="qlora", help="qlora | lora | full (default qlora)")
    p.add_argument("--quant", default="nf4", help="nf4 | fp4 | int8 (default nf4)")
    p.add_argument("--no-double-quant", dest="double_quant", action="store_false",
                   help="quantize absmax in fp32 only (bnb_4bit_use_double_quant=False)")
    p.add_argument("--dtype", default="bf16", help="compute / 16-bit weight dtype: bf16 | fp16 | fp32")
    p.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    p.add_argument("--targets", default="all-linear", help="all-linear or comma,separated,module,names")
    p.add_argument("--lora-dropout", type=float, default=0.0, help="LoRA dropout (default 0.0)")
    p.add_argument("--batch", type=int, default=1, help="micro-batch size (default 1)")
    p.add_argument("--seq", type=int, default=2048, help="sequence length in tokens (default 2048)")
    p.add_argument("--grad-ckpt", dest="grad_ckpt", action=argparse.BooleanOptionalAction, default=True,
                   help="gradient checkpointing (default on)")
    p.add_argument("--attn", default="sdpa", help="sdpa | eager (default sdpa)")
    p.add_argument("--optimizer", default="adamw",
                   help="adamw | adamw8bit | paged_adamw | paged_adamw8bit | sgd | adafactor")
    p.add_argument("--prepare-kbit", action="store_true",
                   help="model peft's prepare_model_for_kbit_training (non-quantized weights in fp32)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    return p


def setup_from_args(args):
    from .setup import TrainSetup, parse_targets

    return TrainSetup(method=args.method, quant=args.quant, double_quant=args.double_quant, dtype=args.dtype,
                      rank=args.rank, targets=parse_targets(args.targets), lora_dropout=args.lora_dropout,
                      batch=args.batch, seq=args.seq, grad_ckpt=args.grad_ckpt, attn=args.attn,
                      optimizer=args.optimizer, prepare_kbit=args.prepare_kbit)


def print_json(data) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


def cmd_estimate(args) -> int:
    from .estimator import estimate

    est = estimate(args.model, setup_from_args(args), gpu=args.gpu)
    if args.json:
        print_json(est.to_dict())
    else:
        from .render import print_estimate
        print_estimate(est)
    return 0


def cmd_models(args) -> int:
    from .models import catalog, spec_from_config

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
    from .gpus import catalog

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
    parser = _Parser(prog="vramplan", description="Peak GPU memory of QLoRA / LoRA fine-tuning: estimate, "
                                                  "simulate, profile, plan.")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser, required=True)
    common = setup_flags()
    p = sub.add_parser("estimate", parents=[common], help="analytic estimate of one training step")
    p.set_defaults(handler=cmd_estimate)
    p = sub.add_parser("models", help="the bundled model catalog")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_models)
    p = sub.add_parser("gpus", help="the bundled GPU catalog")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_gpus)
    for name in EXTENSIONS:
        try:
            module = importlib.import_module(f"vramplan.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"vramplan.{name}":
                raise
            continue
        module.register(sub, common)
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
