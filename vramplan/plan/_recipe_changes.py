"""Changes to the training loop itself (issue #9), each with the memory it saves on this setup,
computed by the estimate: TRL's chunked loss, the fused AdamW kernel, 8-bit or paged optimizer
states, autocast vs pure 16-bit steps, dropping prepare_model_for_kbit_training's float32 upcast,
bf16 LoRA weights as TRL casts a quantized model's, a plain loop letting its outputs die. Sources:
docs/recipes.md."""
from __future__ import annotations


from vramplan.core._errors import VramplanError
from vramplan.core._models import ModelSpec
from vramplan.core._record import record
from vramplan.core._setup import TrainSetup

SRC_CHUNKED = "TRL SFTTrainer loss_type='nll': add_fused_lm_head, chunked log-probs (docs/recipes.md#trl-chunked-loss)"
SRC_FUSED = "torch.optim.AdamW(fused=True), the HF Trainer default on torch >= 2.8 (docs/recipes.md#fused-adamw)"
SRC_PAGED = "bitsandbytes paged optimizers (NVIDIA unified memory); QLoRA paper sec. 3"
SRC_8BIT = "Dettmers et al. 2022, 8-bit Optimizers via Block-wise Quantization"
SRC_AMP = "torch.autocast + peft bnb LoRA skip the fp32 input copy (docs/recipes.md#autocast-and-peft-lora)"
SRC_KBIT = "peft prepare_model_for_kbit_training casts non-quantized weights to fp32 for stability"
SRC_LOOP = "a plain loop's `out` keeps the logits through backward (docs/recipes.md#plain-loop-keeps-the-logits)"
SRC_BF16_LORA = ("TRL SFTTrainer casts a quantized model's LoRA weights to bf16 (QLoRA paper sec. 3; "
                 "docs/recipes.md#trl-bf16-adapters)")


@record
class RecipeChange:
    key: str           # the field family (one change per family in a combination)
    changes: dict      # TrainSetup fields to set
    cost: float        # same scale as the planner's other changes (fraction of step time / quality)
    text: str
    source: str


@record
class RankedChange:
    change: RecipeChange
    saving_bytes: int  # peak allocated before minus after (negative: it costs memory here)

    def to_dict(self) -> dict:
        return {"changes": {k: list(v) if isinstance(v, tuple) else v for k, v in self.change.changes.items()},
                "saving_bytes": self.saving_bytes, "text": self.change.text, "source": self.change.source}


def recipe_candidates(spec: ModelSpec, setup: TrainSetup) -> list[RecipeChange]:
    out: list[RecipeChange] = []
    add = lambda *a: out.append(RecipeChange(*a))  # noqa: E731
    if setup.loss == "full" and "lm_head" not in setup.targets:
        add("loss", {"loss": "chunked"}, 0.02, "TRL's fused lm_head and chunked NLL: the same loss without full "
            "logits", SRC_CHUNKED)
    opt = setup.optimizer
    if opt in ("adamw", "adamw_foreach"):
        add("optimizer", {"optimizer": "adamw_fused"}, 0.0, "the same AdamW update in one fused kernel, no "
            "foreach workspace", SRC_FUSED)
    if opt in ("adamw", "adamw_foreach", "adamw_fused"):
        add("optimizer", {"optimizer": "adamw8bit"}, 0.05, "8-bit optimizer states", SRC_8BIT)
        add("optimizer", {"optimizer": "paged_adamw"}, 0.05, "optimizer state in unified memory, paged "
            "over PCIe when the GPU runs short", SRC_PAGED)
    if setup.autocast:
        add("amp", {"amp": "none"}, 0.0, "pure 16-bit steps without autocast", SRC_AMP)
    elif setup.dtype in ("bf16", "fp16"):
        add("amp", {"amp": setup.dtype}, 0.0, f"torch.autocast({setup.dtype}) around the forward", SRC_AMP)
    if setup.prepare_kbit:
        add("kbit", {"prepare_kbit": False}, 0.05, "no fp32 upcast of embeddings, norms and lm_head", SRC_KBIT)
    if setup.quantized and not setup.adapters_16bit:
        add("adapters", {"adapter_dtype": "bf16"}, 0.02, "LoRA weights, gradients and AdamW states in bf16, as "
            "TRL's SFTTrainer casts them", SRC_BF16_LORA)
    if setup.holds_outputs:
        add("loop", {"loop": "trainer"}, 0.0, "`loss = model(**batch).loss` (or `del out` before backward)",
            SRC_LOOP)
    return out


def ranked_recipe_changes(spec: ModelSpec, setup: TrainSetup, need=None, gpu=None) -> tuple[RankedChange, ...]:
    """Every applicable recipe change with its saving on the peak, largest saving first.
    `need(setup) -> bytes` defaults to the estimate's peak allocated bytes on `gpu`'s CUDA kernels
    (what the step itself needs; whether the cache holds it anyway is the allocator's part, ranked
    by allocator_changes)."""
    if need is None:
        from vramplan.estimate._estimator import estimate

        def need(s):
            return estimate(spec, s, gpu=gpu, replay=False).peak_allocated_bytes
    before = need(setup)
    out = []
    for change in recipe_candidates(spec, setup):
        try:
            after = need(setup.with_(**change.changes))
        except VramplanError:       # a combination the models do not cover is not a candidate
            continue
        out.append(RankedChange(change, before - after))
    return tuple(sorted(out, key=lambda r: -r.saving_bytes))
