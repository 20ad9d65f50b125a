"""The setup flags shared by estimate, simulate, profile and plan, and the parser that turns a
usage error into one `Error:` line (exit 2) instead of argparse's usage dump."""
from __future__ import annotations

import argparse
import json
import sys

from vramplan.core.errors import UsageError


class Parser(argparse.ArgumentParser):
    """argparse that raises UsageError (one line, exit 2) instead of printing usage and exiting."""

    def error(self, message: str):
        raise UsageError(message, hint=f"see `{self.prog} --help`")


def setup_flags() -> argparse.ArgumentParser:
    """The setup flags shared by estimate, simulate, profile and plan (names are the interface)."""
    p = Parser(add_help=False)
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
    p.add_argument("--alloc-conf", dest="alloc_conf", default=None, metavar="SETTINGS",
                   help="PyTorch caching-allocator settings as in PYTORCH_CUDA_ALLOC_CONF, e.g. "
                        "expandable_segments:True (default: that environment variable)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    return p


def alloc_conf_from_args(args):
    """The parsed --alloc-conf (or PYTORCH_CUDA_ALLOC_CONF when not given); a bad string is one
    `Error:` line from the settings parser."""
    from vramplan.cuda.alloc_conf import AllocConf

    text = getattr(args, "alloc_conf", None)
    return AllocConf.from_env() if text is None else AllocConf.parse(text)


def setup_from_args(args):
    from vramplan.core.setup import TrainSetup, parse_targets

    return TrainSetup(method=args.method, quant=args.quant, double_quant=args.double_quant, dtype=args.dtype,
                      rank=args.rank, targets=parse_targets(args.targets), lora_dropout=args.lora_dropout,
                      batch=args.batch, seq=args.seq, grad_ckpt=args.grad_ckpt, attn=args.attn,
                      optimizer=args.optimizer, prepare_kbit=args.prepare_kbit)


def print_json(data) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")
