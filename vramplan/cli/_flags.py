"""The setup flags shared by estimate, simulate, profile and plan, and the parser that turns a
usage error into one `Error:` line (exit 2) instead of argparse's usage dump."""
from __future__ import annotations

import argparse
import json
import sys

from vramplan.core._errors import UsageError, VramplanError
from vramplan.core._gpus import resolve_gpu
from vramplan.core._setup import check_given, make_setup, parse_targets
from vramplan.cuda._arch import default_dtype, target_arch


class Parser(argparse.ArgumentParser):
    """argparse that raises UsageError (one line, exit 2) instead of printing usage and exiting,
    and that takes flags only by their whole names: with argparse's prefix matching `--no-ckpt`
    meant --no-ckpt-reentrant and left checkpointing on."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        raise UsageError(message, hint=f"see `{self.prog} --help`")


def setup_flags() -> argparse.ArgumentParser:
    """The setup flags shared by estimate, simulate, profile and plan (names are the interface)."""
    p = Parser(add_help=False)
    p.add_argument("model", help="hub id or alias from `vramplan models`, a directory with config.json, or a config.json")
    p.add_argument("--gpu", help="a size (48GB, 24GiB, 80G) or a catalog name (A100-80GB, H100, RTX4090, L40S, A6000)")
    p.add_argument("--arch", help="compute capability whose CUDA kernels to assume with a bare --gpu size or none: "
                                  "sm70 | sm75 | sm80 | sm86 | sm89 | sm90 | sm100 | sm120 (default sm90, an H100)")
    p.add_argument("--method", help="qlora | lora | full (default qlora)")
    p.add_argument("--quant", help="nf4 | fp4 | int8 (default nf4)")
    p.add_argument("--no-double-quant", dest="double_quant", action="store_false", default=None,
                   help="quantize absmax in fp32 only (bnb_4bit_use_double_quant=False)")
    p.add_argument("--dtype", default=None,
                   help="compute / 16-bit weight dtype: bf16 | fp16 | fp32 (default bf16; fp16 on GPUs below sm80)")
    p.add_argument("--rank", type=int, help="LoRA rank (default 16)")
    p.add_argument("--targets", help="all-linear or comma,separated,module,names")
    p.add_argument("--lora-dropout", type=float, help="LoRA dropout (default 0.0)")
    # None until given: `plan --deepspeed` tells a typed --batch from the config's micro-batch
    p.add_argument("--batch", type=int, default=None, help="micro-batch size (default 1)")
    p.add_argument("--seq", type=int, default=2048, help="sequence length in tokens (default 2048)")
    p.add_argument("--grad-accum", dest="grad_accum", type=int, default=None,
                   help="micro-batches per optimizer step (gradient_accumulation_steps, default 1)")
    p.add_argument("--grad-ckpt", dest="grad_ckpt", action=argparse.BooleanOptionalAction, default=None,
                   help="gradient checkpointing (default on)")
    p.add_argument("--ckpt-reentrant", dest="reentrant", action=argparse.BooleanOptionalAction, default=None,
                   help="checkpoint with use_reentrant=True (transformers < 4.35's default, torch's "
                        "CheckpointFunction) instead of non-reentrant (default off)")
    p.add_argument("--attn", default=None,
                   help="sdpa | eager (default: what from_pretrained picks, sdpa unless the model has no SDPA path)")
    p.add_argument("--optimizer", default=None,
                   help="adamw (torch AdamW, foreach: its CUDA default) | adamw_foreach | adamw_fused | adamw8bit | "
                        "paged_adamw | paged_adamw8bit | sgd | adafactor (default adamw)")
    p.add_argument("--prepare-kbit", dest="prepare_kbit", action=argparse.BooleanOptionalAction, default=None,
                   help="model peft's prepare_model_for_kbit_training (non-quantized weights in fp32)")
    p.add_argument("--recast", dest="recast", action=argparse.BooleanOptionalAction, default=None,
                   help="qlora.py's cast after get_peft_model: LoRA, embeddings and lm_head in bf16, norms in fp32 "
                        "(on with --recipe qlora-paper)")
    p.add_argument("--adapter-dtype", dest="adapter_dtype", default=None,
                   help="fp32 (peft's default for LoRA weights) | bf16 (TRL's SFTTrainer casts a quantized "
                        "model's; on with --recipe trl-sft and --method qlora)")
    p.add_argument("--experts", default="16bit",
                   help="MoE expert weights under 4-bit: 16bit (transformers 5 leaves its fused expert stacks "
                        "unquantized, default) | 4bit (stacks that quantize them: transformers 4.x, Unsloth)")
    p.add_argument("--amp", default=None, help="torch.autocast dtype around the forward: bf16 | fp16 | none (default none)")
    p.add_argument("--loop", default=None,
                   help="trainer (only the loss outlives the forward) | plain (`out = model(**batch)` keeps the "
                        "logits through backward, until the next forward returns) | plain-del (the same, with "
                        "`del out` after opt.step()) (default trainer)")
    p.add_argument("--loss", default=None,
                   help="full (transformers' loss on fp32 logits) | chunked (TRL's fused lm_head, no full logits) "
                        "(default full)")
    p.add_argument("--recipe", default=None,
                   help="trainer | trl-sft | qlora-paper | plain: that library's defaults for dtype, amp, optimizer, "
                        "checkpointing, loss and loop; explicit flags override (default: none, the idealized step)")
    p.add_argument("--alloc-conf", dest="alloc_conf", default=None, metavar="SETTINGS",
                   help="PyTorch caching-allocator settings as in PYTORCH_CUDA_ALLOC_CONF, e.g. "
                        "expandable_segments:True (default: that environment variable)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    return p


# Flags whose argparse default is None, so that a flag the user typed can be told from a default:
# only typed flags are checked for contradictions with --method (core/_setup.py check_given).
GIVEN_ONLY = ("method", "quant", "double_quant", "rank", "targets", "lora_dropout")


def alloc_conf_from_args(args):
    """The parsed --alloc-conf (or PYTORCH_CUDA_ALLOC_CONF when not given); a bad string is one
    `Error:` line from the settings parser."""
    from vramplan.cuda._alloc_conf import AllocConf

    text = getattr(args, "alloc_conf", None)
    return AllocConf.from_env() if text is None else AllocConf.parse(text)



def given_setup_flags(args) -> dict:
    """The GIVEN_ONLY flags the user typed, as TrainSetup fields."""
    given = {k: getattr(args, k, None) for k in GIVEN_ONLY}
    given = {k: v for k, v in given.items() if v is not None}
    if "targets" in given:
        given["targets"] = parse_targets(given["targets"])
    return given


def default_attention(model: str) -> str:
    """The attention a model trains with when --attn is not given: what from_pretrained picks
    (core/_architectures.py Architecture.default_attention); "sdpa" for a model the registry does not
    know (simulate builds it with transformers, which picks), the command reporting any other
    problem with the name itself."""
    from vramplan.core._errors import ModelError
    from vramplan.core._hub import HubError
    from vramplan.core._models import resolve

    try:
        return resolve(model).arch.default_attention
    except HubError:        # the Hub did not give the config: the command would only ask it again
        raise
    except ModelError:
        return "sdpa"


def cuda_arch_from_args(args):
    """The architecture the kernel rules emulate for these flags (--gpu's, --arch's, or the assumed one)."""
    gpu, text = None, getattr(args, "gpu", None)
    if isinstance(text, str) and text.strip().lower() != "all":
        gpu = resolve_gpu(text)
    return target_arch(gpu, getattr(args, "arch", None))


# Flags a --recipe sets; None means "not given", so the recipe's (or TrainSetup's) default applies.
RECIPE_FLAGS = ("dtype", "grad_ckpt", "reentrant", "optimizer", "prepare_kbit", "amp", "loop", "loss", "recast",
                "adapter_dtype", "grad_accum")


def setup_from_args(args):
    given = given_setup_flags(args)
    explicit = {name: getattr(args, name) for name in RECIPE_FLAGS if getattr(args, name, None) is not None}
    recipe_name = getattr(args, "recipe", None)
    if "dtype" not in explicit and recipe_name is None:
        # not given: bf16 where the target GPU has it, else fp16 (cuda/_arch.py); a recipe names its own
        explicit["dtype"] = default_dtype(cuda_arch_from_args(args))
    attn = args.attn if args.attn is not None else default_attention(args.model)
    setup = make_setup(recipe_name, batch=1 if args.batch is None else args.batch, seq=args.seq, attn=attn, experts=args.experts,
                       **given, **explicit)
    check_given(setup, {**given, **({"reentrant": True} if explicit.get("reentrant") else {})})
    return setup


def print_json(data) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


class OutputError(VramplanError):
    """What a command printed is lost: stdout is closed, or writing to it failed."""


class Stdout:
    """sys.stdout while main() runs a command. A write that fails (a full disk: ENOSPC, an I/O
    error) is an OutputError, as is any write when the process has no stdout at all (`>&-`: sys.stdout
    is None, and print() and rich's Console would write nowhere and succeed). BrokenPipeError, the
    reader gone (`| head`), passes as it is: main() ends that with 0. Everything else is the stream's."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> int:
        if self.stream is None:
            raise OutputError("cannot write the output: stdout is closed",
                              hint="run it with stdout open, or redirect it to a file")
        return self._guard(self.stream.write, text)

    def flush(self) -> None:
        if self.stream is not None:
            self._guard(self.stream.flush)

    @staticmethod
    def _guard(call, *args):
        try:
            return call(*args)
        except BrokenPipeError:
            raise
        except OSError as exc:
            raise OutputError(f"cannot write the output: {exc.strerror or exc}",
                              hint="check where stdout goes (a full disk?), or redirect it elsewhere") from None

    def __getattr__(self, name):      # isatty, fileno, encoding...: rich reads them
        if name == "stream":          # not set yet (a copy being made): no recursion
            raise AttributeError(name)
        return getattr(self.stream, name)
