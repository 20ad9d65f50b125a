"""TrainSetup: everything about a fine-tuning run except the model. The field names are the
interface shared by the CLI flags, the JSON output and other tools calling the library."""
from __future__ import annotations

from dataclasses import asdict, fields, replace
from typing import Iterable

from vramplan.core._errors import UsageError
from vramplan.core._recipes import RECIPES, recipe
from vramplan.core._record import record

METHODS = ("qlora", "lora", "full")
QUANTS = ("nf4", "fp4", "int8")
DTYPES = {"bf16": 2, "fp16": 2, "fp32": 4}
ATTENTION = ("sdpa", "eager")
# "adamw" is torch.optim.AdamW with its CUDA default, the foreach implementation (adamw_foreach);
# adamw_fused is AdamW(fused=True), the HF Trainer default on torch >= 2.8 (docs/autograd.md#adamw-foreach-vs-fused)
OPTIMIZERS = ("adamw", "adamw_foreach", "adamw_fused", "adamw8bit", "paged_adamw", "paged_adamw8bit", "sgd",
              "adafactor")
AMPS = ("none", "bf16", "fp16")    # torch.autocast(device_type="cuda", dtype=...) around the forward
# trainer: only the loss outlives the forward; plain: `out` (logits) too, until the next forward
# returns; plain-del: `out` through backward and opt.step(), then `del out` (docs/recipes.md#plain-loop-keeps-the-logits)
LOOPS = ("trainer", "plain", "plain-del")
LOSSES = ("full", "chunked")       # full: transformers ForCausalLMLoss; chunked: TRL's fused lm_head + chunked NLL
# The trainable LoRA weights' dtype: fp32 as peft creates them (autocast_adapter_dtype=True), or bf16
# as TRL's SFTTrainer casts a quantized model's (docs/recipes.md#trl-bf16-adapters)
ADAPTER_DTYPES = ("fp32", "bf16")
# MoE expert weights under 4-bit quantization: "16bit" as transformers 5 leaves its fused 3-D expert
# stacks (bitsandbytes replaces only nn.Linear); "4bit" for stacks that quantize them (transformers
# 4.x ModuleList experts of nn.Linear, Unsloth's MoE 4-bit). docs/bitsandbytes.md#moe-experts
EXPERTS = ("16bit", "4bit")
ALL_LINEAR = "all-linear"

# Sanity bounds: beyond these the input is a typo, not a plan (a 2**24-token sequence of batch
# 2**16 would need exabytes of activations).
MAX_BATCH = 65536
MAX_SEQ = 16 * 2**20
MAX_RANK = 65536
MAX_GRAD_ACCUM = 65536


@record
class TrainSetup:
    """Defaults describe the plain QLoRA recipe:
    from_pretrained(quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
    bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=bfloat16), dtype=bfloat16),
    get_peft_model(LoraConfig(r=16, target_modules="all-linear")), torch AdamW,
    non-reentrant gradient checkpointing, labels=input_ids with transformers' causal-LM loss.
    `reentrant`: checkpointing with use_reentrant=True instead (torch CheckpointFunction;
    docs/autograd.md#reentrant-checkpointing); meaningless without grad_ckpt."""

    method: str = "qlora"
    quant: str = "nf4"
    double_quant: bool = True
    dtype: str = "bf16"
    rank: int = 16
    targets: tuple[str, ...] = (ALL_LINEAR,)
    lora_dropout: float = 0.0
    batch: int = 1
    seq: int = 2048
    # micro-batches per optimizer step (gradient_accumulation_steps): after the first, each
    # micro-step's forward and backward run beside every parameter's .grad (docs/autograd.md#gradient-accumulation-steps)
    grad_accum: int = 1
    grad_ckpt: bool = True
    reentrant: bool = False
    attn: str = "sdpa"
    optimizer: str = "adamw"
    prepare_kbit: bool = False
    experts: str = "16bit"
    amp: str = "none"
    loop: str = "trainer"
    loss: str = "full"
    # qlora.py's cast after get_peft_model (core/_recipes.py QLORA_PAPER): LoRA layers in bf16,
    # norms float32, embed_tokens / lm_head bf16 (docs/recipes.md#qlora-paper-recast)
    recast: bool = False
    # LoRA weights, their gradients and torch AdamW's states in bf16 (TRL's SFTTrainer on a
    # quantized model; core/_recipes.py TRL_SFT). qlora.py's recast implies it (adapters_16bit).
    adapter_dtype: str = "fp32"
    recipe: str | None = None      # the training library's recipe the other fields came from (core/_recipes.py);
    # a label here: estimate / plan / sweep given recipe= (or --recipe) apply its defaults (make_setup)

    def __post_init__(self):
        if isinstance(self.targets, str):  # accept "q_proj,v_proj" from callers
            object.__setattr__(self, "targets", parse_targets(self.targets))
        elif isinstance(self.targets, list):   # a list from a library caller (validate checks its items)
            object.__setattr__(self, "targets", tuple(self.targets))
        self.validate()

    # --- validation: every bad value is a UsageError naming the flag -------------------------
    def validate(self) -> None:
        # on / off settings must be booleans: "false" is truthy, and would silently mean the opposite
        for name in ("double_quant", "grad_ckpt", "prepare_kbit", "recast"):
            if not isinstance(getattr(self, name), bool):
                raise UsageError(f"{name} must be true or false, got {getattr(self, name)!r}",
                                 hint=f"pass {name}=True or {name}=False")
        if not isinstance(self.targets, tuple) or not all(isinstance(t, str) for t in self.targets):
            raise UsageError(f"--targets must be module names, got {self.targets!r}",
                             hint="e.g. targets='q_proj,v_proj' or ['q_proj', 'v_proj'], or all-linear")
        if isinstance(self.lora_dropout, bool) or not isinstance(self.lora_dropout, (int, float)):
            raise UsageError(f"--lora-dropout must be a number in [0, 1), got {self.lora_dropout!r}",
                             hint="e.g. --lora-dropout 0.05")
        _choice("--method", self.method, METHODS)
        _choice("--quant", self.quant, QUANTS)
        _choice("--dtype", self.dtype, tuple(DTYPES))
        _choice("--attn", self.attn, ATTENTION)
        _choice("--optimizer", self.optimizer, OPTIMIZERS)
        _bounded("--batch", self.batch, MAX_BATCH)
        _bounded("--seq", self.seq, MAX_SEQ)
        _bounded("--grad-accum", self.grad_accum, MAX_GRAD_ACCUM)
        if self.method != "full":
            _bounded("--rank", self.rank, MAX_RANK)
        if not 0.0 <= self.lora_dropout < 1.0:
            raise UsageError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}",
                             hint="e.g. --lora-dropout 0.05")
        _choice("--experts", self.experts, EXPERTS)
        if self.experts == "4bit" and not (self.method == "qlora" and self.quant in ("nf4", "fp4")):
            raise UsageError("--experts 4bit applies to 4-bit quantization only",
                             hint="use it with --method qlora --quant nf4 (or fp4), or drop it")
        if self.prepare_kbit and self.method != "qlora":
            raise UsageError("--prepare-kbit applies to quantized models only",
                             hint="use it with --method qlora, or drop it")
        if not self.targets or any(not t for t in self.targets):
            raise UsageError("--targets is empty", hint="use all-linear or e.g. q_proj,v_proj")
        if ALL_LINEAR in self.targets and len(self.targets) > 1:   # as parse_targets says it of the flag
            raise UsageError("--targets all-linear cannot be combined with module names",
                             hint="use all-linear alone or list the modules")
        self._validate_step_flags()

    def _validate_step_flags(self) -> None:
        """--amp, --loop, --loss, --recipe (core/_recipes.py)."""
        if not isinstance(self.reentrant, bool):
            raise UsageError(f"--ckpt-reentrant must be true or false, got {self.reentrant!r}",
                             hint="use --ckpt-reentrant or --no-ckpt-reentrant")
        _choice("--amp", self.amp, AMPS)
        _choice("--loop", self.loop, LOOPS)
        _choice("--loss", self.loss, LOSSES)
        if self.recipe is not None:
            _choice("--recipe", self.recipe, tuple(RECIPES))
        if self.amp != "none" and self.dtype != self.amp and not self.amp_over_fp32:
            # autocast over float32 weights is modelled for unquantized weights (lora, full);
            # QLoRA's float32 hidden states under autocast are --prepare-kbit (docs/recipes.md#limits)
            hint = (f"use --dtype {self.amp}, or --prepare-kbit for float32 hidden states" if self.quantized
                    else f"use --dtype {self.amp} or fp32, or --amp none")
            amp = self.flag_text("amp")
            raise UsageError(f"{amp} is modelled for {self.amp} weights, or fp32 weights with --method "
                             f"lora / full (got --dtype {self.dtype}, --method {self.method})", hint=hint)
        if self.amp_over_fp32 and self.attn != "sdpa":
            # eager attention over float32 hidden states under autocast (a float32 mask promoting
            # 16-bit scores) is not modelled (docs/recipes.md#limits)
            raise UsageError(f"--amp {self.amp} over --dtype fp32 is modelled for --attn sdpa",
                             hint=f"use --attn sdpa, or --dtype {self.amp}")
        _choice("--adapter-dtype", self.adapter_dtype, ADAPTER_DTYPES)
        if self.adapter_dtype == "bf16" and not _bf16_adapters_apply(lambda k: getattr(self, k)):
            raise UsageError("--adapter-dtype bf16 is modelled for --method qlora with --dtype bf16, and --amp bf16 "
                             "where --prepare-kbit makes the hidden states float32",
                             hint="give those flags, or --adapter-dtype fp32")
        if self.recast and not _recast_applies(lambda k: getattr(self, k)):
            raise UsageError("--recast is qlora.py's bf16 cast after get_peft_model: it applies with --method qlora "
                             "(nf4 or fp4), --prepare-kbit, --dtype bf16 and --amp bf16",
                             hint="give those flags, or --no-recast")
        if self.amp != "none" and self.prepare_kbit and self.quant == "int8":
            # autocast over prepare_model_for_kbit_training's float32 hidden states is modelled for
            # 4-bit bitsandbytes layers (docs/recipes.md#limits)
            raise UsageError(f"--amp {self.amp} with --prepare-kbit is modelled for 4-bit quantization",
                             hint="use --quant nf4 / fp4, or --amp none")
        if self.amp != "none" and self.prepare_kbit and self.attn != "sdpa" and not self.recast:
            # eager attention there is modelled where qlora.py's recast puts the embedding back in
            # bf16, so that the causal mask (made in the embedding output's dtype) stays 16-bit; a
            # float32 mask promoting the 16-bit scores is not (docs/recipes.md#limits)
            raise UsageError(f"--amp {self.amp} with --prepare-kbit and --attn {self.attn} is modelled with --recast",
                             hint="use --recast (--recipe qlora-paper), --attn sdpa, or --amp none")

    def flag_text(self, name: str) -> str:
        """`--flag value` for a field, naming the recipe where the value is its default rather than a
        flag the user typed (`--amp bf16 (--recipe trainer's)`)."""
        text = f"--{name.replace('_', '-')} {getattr(self, name)}"
        if self.recipe and getattr(RECIPES[self.recipe], name, None) == getattr(self, name):
            text += f" (--recipe {self.recipe}'s)"
        return text

    # --- derived facts, named so the estimator reads like the recipe -------------------------
    @property
    def quantized(self) -> bool:
        return self.method == "qlora"

    @property
    def uses_adapters(self) -> bool:
        return self.method in ("qlora", "lora")

    @property
    def compute_bytes(self) -> int:
        return DTYPES[self.dtype]

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    @property
    def experts_4bit(self) -> bool:
        """MoE expert weights quantized like the Linear layers (validate() ensures 4-bit QLoRA)."""
        return self.experts == "4bit"

    @property
    def reentrant_ckpt(self) -> bool:
        """Gradient checkpointing with torch.utils.checkpoint(use_reentrant=True)
        (docs/autograd.md#reentrant-checkpointing)."""
        return self.grad_ckpt and self.reentrant

    @property
    def autocast(self) -> bool:
        return self.amp != "none"

    @property
    def holds_outputs(self) -> bool:
        """The loop keeps `out = model(**batch)` (the logits) through backward and opt.step()."""
        return self.loop != "trainer"

    @property
    def outputs_outlive_step(self) -> bool:
        """The previous step's `out` is still referenced during the next forward (plain: the name
        is rebound only when model() returns; plain-del drops it at the end of the step)."""
        return self.loop == "plain"

    @property
    def amp_over_fp32(self) -> bool:
        """torch.autocast over float32 weights (--dtype fp32 --amp bf16 / fp16) with --method lora or
        full: every hidden state float32, matmuls in the autocast dtype (docs/recipes.md#autocast-over-fp32-weights)."""
        return self.autocast and self.dtype == "fp32" and not self.quantized

    @property
    def accumulates(self) -> bool:
        """Micro-steps after the first hold every trainable parameter's .grad (grad_accum > 1)."""
        return self.grad_accum > 1

    @property
    def adapters_16bit(self) -> bool:
        """The LoRA weights are bf16 leaves: TRL's cast (--adapter-dtype bf16) or qlora.py's recast."""
        return self.recast or self.adapter_dtype == "bf16"

    @property
    def fused_adamw(self) -> bool:
        return self.optimizer == "adamw_fused"

    @property
    def paged(self) -> bool:
        return self.optimizer.startswith("paged_")

    def with_(self, **changes) -> "TrainSetup":
        """A variation of this setup. A variation that leaves qlora.py's configuration (another
        method, dtype, autocast, no prepare_model_for_kbit_training) is no longer that script, so it
        drops its recast unless `recast` is among the changes; likewise TRL's bf16 LoRA weights
        outside a quantized model (_drop_inapplicable)."""
        _drop_inapplicable(changes, lambda k: getattr(self, k), changes)
        return replace(self, **changes)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["targets"] = list(self.targets)
        if not self.quantized:  # quantization flags mean nothing without --method qlora
            d["quant"] = None
            d["double_quant"] = None
        if not self.grad_ckpt:  # the checkpointing flavour means nothing without checkpointing
            d["reentrant"] = None
        return d


def _drop_inapplicable(values: dict, current, given) -> None:
    """A library's cast exists only in its own configuration (_CONDITIONAL): where the fields in
    `values` (else `current(name)`) leave it, it goes back to its off value in `values`, unless it
    is among the fields `given` explicitly."""
    field = lambda k: values.get(k, current(k))  # noqa: E731
    for name, off, applies in _CONDITIONAL:
        if field(name) != off and name not in given and not applies(field):
            values[name] = off


def _bf16_adapters_apply(field) -> bool:
    """Where bf16 LoRA weights are modelled: TRL's SFTTrainer casts them for a quantized model
    (trl/trainer/sft_trainer.py: `if _is_quantized_model: ... param.data = param.data.to(torch.bfloat16)`),
    over bf16 weights; with prepare_model_for_kbit_training's float32 hidden states, under bf16
    autocast (then F.linear casts the input, as qlora.py's recast runs it)."""
    return (field("method") == "qlora" and field("dtype") == "bf16"
            and (not field("prepare_kbit") or field("amp") == "bf16"))


def _recast_applies(field) -> bool:
    """qlora.py's recast exists in its 4-bit bf16 configuration: prepare_model_for_kbit_training,
    bf16 weights and Trainer autocast (its --bf16). `field(name)` gives a TrainSetup field's value."""
    return (field("method") == "qlora" and field("quant") in ("nf4", "fp4") and bool(field("prepare_kbit"))
            and field("dtype") == "bf16" and field("amp") == "bf16")


# (field, its value outside the configuration, where it applies): qlora.py's recast, and TRL's bf16
# cast of a quantized model's LoRA weights
def _prepare_kbit_applies(field) -> bool:
    """prepare_model_for_kbit_training is modelled for a quantized model (peft/utils/other.py: its
    float32 casts run `if loaded_in_kbit`); a recipe's default leaves with --method lora / full."""
    return field("method") == "qlora"


# in order: the recast and the bf16 adapters read prepare_kbit
_CONDITIONAL = (("prepare_kbit", False, _prepare_kbit_applies), ("recast", False, _recast_applies),
                ("adapter_dtype", "fp32", _bf16_adapters_apply))


# --- contradictory flags: a setting the chosen method does not use -------------------------------
# Checked only for what a caller gave explicitly (typed CLI flags, keyword flags of estimate / plan /
# per_gpu, sweep axes): a TrainSetup itself may carry unused defaults, e.g. after with_(method="full").
# Paged optimizers, --dtype, --attn and --grad-ckpt apply to every method, so they never contradict.
FLAG_NAMES = {"quant": "--quant", "double_quant": "--no-double-quant", "rank": "--rank",
              "targets": "--targets", "lora_dropout": "--lora-dropout", "reentrant": "--ckpt-reentrant"}


def inapplicable(setup: TrainSetup) -> dict[str, str]:
    """Field -> why the setup's method (or quantization) does not use it."""
    out = {}
    if not setup.quantized:
        why = f"--method {setup.method} loads unquantized weights; quantization is --method qlora"
        out["quant"] = out["double_quant"] = why
    elif setup.quant == "int8":
        out["double_quant"] = "LLM.int8 (--quant int8) has no nested absmax quantization; it is a 4-bit option"
    if not setup.uses_adapters:
        for name in ("rank", "targets", "lora_dropout"):
            out[name] = "--method full trains every weight, with no LoRA adapters"
    if not setup.grad_ckpt and setup.reentrant:
        out["reentrant"] = "reentrant is a gradient checkpointing flavour and --no-grad-ckpt turns checkpointing off"
    return out


def check_given(setup: TrainSetup, given: Iterable[str]) -> None:
    """UsageError for the first field the caller gave explicitly that the setup does not use."""
    reasons = inapplicable(setup)
    for name in given:
        if name == "reentrant" and name in reasons:
            raise UsageError("--ckpt-reentrant contradicts --no-grad-ckpt",
                             hint=f"{reasons[name]}; drop one of them")
        if name in reasons:
            flag = FLAG_NAMES[name] + ("" if name == "double_quant" else f" {_shown(getattr(setup, name))}")
            raise UsageError(f"{flag} contradicts --method {setup.method}"
                             + (f" --quant {setup.quant}" if name == "double_quant" and setup.quantized else ""),
                             hint=f"{reasons[name]}; drop {FLAG_NAMES[name]}")


def _shown(value) -> str:
    return ",".join(value) if isinstance(value, tuple) else str(value)


def library_setup(setup: TrainSetup | None, flags: dict, dtype: str, attn: str) -> TrainSetup:
    """The setup a library call (estimate, plan, simulate) runs: `setup`, or TrainSetup with the
    caller's keyword flags (apply_flags) and, where no setup is given, the defaults the CLI gives
    too: `dtype` (the GPU's: bf16 where it has it, cuda/_arch.py default_dtype) unless a dtype flag
    or a recipe names one, and `attn` (the model's: what from_pretrained picks) unless given."""
    if setup is not None and not isinstance(setup, TrainSetup):
        raise UsageError(f"setup must be a TrainSetup, got {type(setup).__name__}",
                         hint="pass TrainSetup(...), or the fields as keywords (batch=4, seq=2048, ...)")
    if setup is None:
        defaults = {"dtype": dtype} if flags.get("recipe") is None else {}
        flags = {**defaults, "attn": attn, **flags}
    return apply_flags(setup, flags)


def apply_flags(setup: TrainSetup | None, flags: dict) -> TrainSetup:
    """setup (default TrainSetup()) with the caller's keyword flags, checked for contradictions.
    A `recipe` flag starts from that recipe's defaults, the other flags taking precedence, as
    `--recipe` does on the command line (make_setup); it cannot also take a ready `setup`, whose
    fields cannot be told apart from defaults."""
    unknown = sorted(set(flags) - {f.name for f in fields(TrainSetup)})
    if unknown:
        raise UsageError(f"unknown setup field {unknown[0]!r}",
                         hint="setup fields are TrainSetup's: " + ", ".join(f.name for f in fields(TrainSetup)))
    name = flags.get("recipe")
    if name is not None:
        _choice("--recipe", name, tuple(RECIPES))   # a list or a typo: one line, before any lookup
        if setup is not None:
            raise UsageError(f"recipe={name!r} sets a new setup's defaults and cannot apply to setup=",
                             hint=f"drop setup= and give its fields as keywords with recipe={name!r}")
        given = {k: v for k, v in flags.items() if k != "recipe"}
        new = make_setup(name, **given)
        check_given(new, given)
        return new
    new = (setup or TrainSetup()).with_(**flags) if flags else (setup or TrainSetup())
    check_given(new, flags)
    return new


def parse_targets(text: str) -> tuple[str, ...]:
    names = tuple(t.strip() for t in str(text).split(",") if t.strip())
    if not names:
        raise UsageError("--targets is empty", hint="use all-linear or e.g. q_proj,v_proj")
    if ALL_LINEAR in names and len(names) > 1:
        raise UsageError("--targets all-linear cannot be combined with module names",
                         hint="use all-linear alone or list the modules")
    return names


def _choice(flag: str, value, choices) -> None:
    if value not in choices:
        raise UsageError(f"unknown {flag[2:]} {value!r}", hint=f"{flag} takes one of: {', '.join(choices)}")


def _bounded(flag: str, value, upper: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise UsageError(f"{flag} must be a whole number, got {value!r}", hint=f"e.g. {flag} 4")
    if value <= 0:
        raise UsageError(f"{flag} must be positive, got {value}", hint=f"e.g. {flag} 4")
    if value > upper:
        raise UsageError(f"{flag} {value} is beyond any real run (max {upper})",
                         hint=f"check the value of {flag}")


def make_setup(name: str | None, **explicit) -> TrainSetup:
    """A TrainSetup from a recipe's defaults (core/_recipes.py), explicitly given fields taking
    precedence."""
    if name is None:
        return TrainSetup(**explicit)
    values = recipe(name).defaults()
    values.update(explicit)
    # flags that leave qlora.py's configuration leave its recast; TRL casts a quantized model's adapters only
    _drop_inapplicable(values, lambda k: getattr(TrainSetup, k), explicit)
    values["recipe"] = name
    known = {f.name for f in fields(TrainSetup)}
    return TrainSetup(**{k: v for k, v in values.items() if k in known})
