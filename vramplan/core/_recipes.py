"""Training recipes: the defaults a training library's current release applies to one step, so a
prediction describes the loop people actually run (issue #9). One frozen dataclass per recipe;
each default cites the upstream line it comes from (docs/recipes.md has the same facts).
Explicit flags override a recipe's defaults (make_setup). Pure Python: the estimate path
imports this module."""
from __future__ import annotations

from dataclasses import dataclass

from vramplan.core._errors import UsageError
from vramplan.core._record import record

# The fields a recipe may set; every other TrainSetup field keeps its own default.
RECIPE_FIELDS = ("dtype", "amp", "optimizer", "grad_ckpt", "reentrant", "loss", "loop", "prepare_kbit", "rank",
                 "targets", "recast", "adapter_dtype", "grad_accum")


@record
class Recipe:
    """A training loop's defaults as one library release sets them (docs/recipes.md#recipe-defaults);
    each default's source line is in `sources`."""
    name: str
    describes: str            # the library releases whose defaults these are
    dtype: str
    amp: str
    optimizer: str
    grad_ckpt: bool
    loss: str
    loop: str
    prepare_kbit: bool
    rank: int
    targets: tuple[str, ...]
    reentrant: bool           # gradient checkpointing flavour: use_reentrant (TrainSetup.reentrant)
    sources: tuple[tuple[str, str], ...]   # (field, upstream source of its default)
    recast: bool = False      # qlora.py's dtype cast after get_peft_model (TrainSetup.recast)
    adapter_dtype: str = "fp32"   # TRL's bf16 cast of a quantized model's LoRA weights (TrainSetup.adapter_dtype)
    grad_accum: int = 1       # gradient_accumulation_steps (TrainSetup.grad_accum); 1 in TrainingArguments

    def defaults(self) -> dict:
        return {f: getattr(self, f) for f in RECIPE_FIELDS}

    def summary(self, setup=None) -> str:
        """The recipe's defaults; with `setup` (a TrainSetup run under it), the fields given
        explicitly that differ from them, so the line never contradicts the setup's own lines."""
        ckpt = ("non-reentrant checkpointing" if not self.reentrant else "reentrant checkpointing") \
            if self.grad_ckpt else "no checkpointing"
        text = (f"recipe {self.name} ({self.describes}): {self.dtype} weights, autocast {self.amp}, "
                f"{self.optimizer}, {ckpt}, {self.loss} loss, {self.loop} loop"
                + (", prepare_model_for_kbit_training" if self.prepare_kbit else "")
                + (", LoRA / embeddings / lm_head cast to bf16 after get_peft_model" if self.recast else "")
                + (", a quantized model's LoRA weights cast to bf16" if self.adapter_dtype == "bf16" else "")
                + (f", {self.grad_accum} micro-steps per optimizer step" if self.grad_accum > 1 else ""))
        if setup is None:
            return text
        changed = [f"{name} {_shown(getattr(setup, name))}" for name in RECIPE_FIELDS
                   if getattr(setup, name) != getattr(self, name)]
        return text + (f"; this run differs in: {', '.join(changed)}" if changed else "")


ALL_LINEAR = ("all-linear",)


def _shown(value) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return ",".join(value) if isinstance(value, tuple) else str(value)

TRAINER = Recipe(
    name="trainer", describes="transformers 5.23 Trainer + accelerate 1.15, TrainingArguments(bf16=True)",
    dtype="bf16", amp="bf16", optimizer="adamw_fused", grad_ckpt=True, loss="full", loop="trainer",
    prepare_kbit=False, rank=16, targets=ALL_LINEAR, reentrant=False,
    sources=(
        ("amp", "accelerate/accelerator.py Accelerator.prepare_model (native_amp): model.forward wrapped in "
                "torch.autocast(dtype=bfloat16) when TrainingArguments.bf16=True"),
        ("optimizer", "transformers/training_args.py: default_optim = 'adamw_torch_fused' when "
                      "is_torch_greater_or_equal_than_2_8 (torch.optim.AdamW(fused=True))"),
        ("grad_ckpt", "transformers/modeling_utils.py gradient_checkpointing_enable: use_reentrant=False when no "
                      "kwargs are given (checkpointing itself is what a QLoRA user turns on)"),
        ("loss", "transformers/loss/loss_utils.py ForCausalLMLoss: full logits upcast to float32"),
        ("loop", "transformers/trainer.py compute_loss returns outputs['loss']; the outputs die before "
                 "accelerator.backward(loss)"),
    ))

TRL_SFT = Recipe(
    name="trl-sft", describes="TRL 1.16 SFTTrainer/SFTConfig on transformers 5.23",
    dtype="bf16", amp="bf16", optimizer="adamw_fused", grad_ckpt=True, loss="chunked", loop="trainer",
    prepare_kbit=False, rank=16, targets=ALL_LINEAR, reentrant=False,
    sources=(
        ("amp", "trl/trainer/sft_config.py: bf16 defaults to True unless fp16 is set"),
        ("grad_ckpt", "trl/trainer/sft_config.py: gradient_checkpointing defaults to True; sft_trainer.py "
                      "setdefault('use_reentrant', False)"),
        ("loss", "trl/trainer/sft_trainer.py: add_fused_lm_head(...) and model(**inputs, fused_lm_head=True) "
                 "for loss_type 'nll' (the default): lm_head on labelled tokens only, in 4096-token x "
                 "32768-vocab tiles (trl/kernels/chunked_logprob.py ChunkedLogProbFunction)"),
        ("optimizer", "inherited from TrainingArguments: adamw_torch_fused on torch >= 2.8"),
        ("loop", "SFTTrainer.compute_loss keeps only the loss and the per-token log-probs for metrics"),
        ("adapter_dtype", "trl/trainer/sft_trainer.py SFTTrainer.__init__: `if _is_quantized_model:` every trainable "
                          "parameter but DoRA's magnitude `param.data = param.data.to(torch.bfloat16)` (QLoRA paper, "
                          "sec. 3); for --method qlora only"),
    ), adapter_dtype="bf16")

QLORA_PAPER = Recipe(
    name="qlora-paper", describes="artidoro/qlora qlora.py (QLoRA paper) run on peft 0.21 / transformers 5.23",
    dtype="bf16", amp="bf16", optimizer="paged_adamw", grad_ckpt=True, loss="full", loop="trainer",
    prepare_kbit=True, rank=64, targets=ALL_LINEAR, reentrant=False,
    sources=(
        ("prepare_kbit", "qlora.py get_accelerate_model: prepare_model_for_kbit_training(model, "
                         "use_gradient_checkpointing=args.gradient_checkpointing)"),
        ("optimizer", "qlora.py TrainingArguments default optim='paged_adamw_32bit'"),
        ("rank", "qlora.py lora_r=64, lora_alpha=16, find_all_linear_names (every Linear4bit but lm_head)"),
        ("amp", "qlora.py bf16=True in the paper's scripts (scripts/finetune_*.sh --bf16) -> Trainer autocast"),
        ("grad_ckpt", "qlora.py gradient_checkpointing=True; transformers 5 makes it non-reentrant"),
        ("recast", "qlora.py get_accelerate_model, after get_peft_model: every LoraLayer .to(torch.bfloat16) "
                   "under --bf16, modules named '*norm*' .to(torch.float32), lm_head / embed_tokens "
                   ".to(torch.bfloat16) when float32"),
        ("grad_accum", "qlora.py TrainingArguments gradient_accumulation_steps=16 (per_device_train_batch_size=1)"),
    ), recast=True, grad_accum=16)

PLAIN = Recipe(
    name="plain", describes="a hand-written PyTorch loop: out = model(**batch); out.loss.backward()",
    dtype="bf16", amp="none", optimizer="adamw", grad_ckpt=True, loss="full", loop="plain",
    prepare_kbit=False, rank=16, targets=ALL_LINEAR, reentrant=False,
    sources=(
        ("optimizer", "torch/optim/optimizer.py _default_to_fused_or_foreach: foreach on CUDA unless fused=True"),
        ("loop", "`out` (a CausalLMOutput holding logits) stays referenced through out.loss.backward()"),
        ("amp", "no torch.autocast in the loop; the model is loaded in bf16"),
    ))

RECIPES: dict[str, Recipe] = {r.name: r for r in (TRAINER, TRL_SFT, QLORA_PAPER, PLAIN)}

# With no --recipe the setup is TrainSetup's own defaults: the idealized step vramplan has always
# predicted (no autocast, foreach AdamW, full fp32 logits, only the loss kept). README "Recipes".
NO_RECIPE = "none: no autocast, torch AdamW (foreach), full fp32 logits, only the loss outlives the forward"


def recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise UsageError(f"unknown recipe {name!r}", hint=f"--recipe takes one of: {', '.join(RECIPES)}")
    return RECIPES[name]
