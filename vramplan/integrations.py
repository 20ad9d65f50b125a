"""vramplan inside a user's own training run: `MemoryCallback` for transformers' Trainer (and TRL's
trainers, which are Trainers).

    from vramplan.integrations import MemoryCallback
    trainer = Trainer(..., callbacks=[MemoryCallback()])        # or MemoryCallback(seq=2048)

At train start it reads the setup off the model and TrainingArguments (quantization config,
peft LoraConfig, batch size, gradient checkpointing, optimizer, attention) and logs the estimate;
the sequence length comes from `seq=`, from args.max_length / max_seq_length (TRL), or from the
first batch the model sees. Every optimizer step it resets torch.cuda's peak counter at the start
and reads torch.cuda.max_memory_allocated at the end, logs it, keeps it in `history`, and warns
when the measurement exceeds the prediction (by more than `margin`).

Notes: with gradient accumulation one Trainer step spans several micro-batches and the gradients
stay allocated between them; the estimate takes args.gradient_accumulation_steps as its
--grad-accum and models that (docs/autograd.md#gradient-accumulation-steps). The callback never
stops training: a setup it cannot estimate is logged and the callback goes quiet.

This module imports transformers (TrainerCallback); `import vramplan` does not import it.
"""
from __future__ import annotations

import logging
import math
import warnings


from vramplan.core._errors import UsageError, VramplanError, require
from vramplan.core._models import spec_from_config
from vramplan.core._record import record
from vramplan.core._gpus import resolve_gpu
from vramplan.core._setup import ALL_LINEAR, MAX_SEQ, TrainSetup
from vramplan.estimate._estimator import estimate

# Importing transformers imports bitsandbytes, whose CPU backend (bitsandbytes/backends/cpu/ops.py,
# on CPUs with AVX512-BF16) tries the optional `kernels` package for a fused CPU gemm_4bit and logs
# a warning when it is missing. A training script on a GPU does not use that kernel, so the warning
# only alarms: drop exactly that record, on that logger, before the import.
BNB_CPU_LOGGER = "bitsandbytes.backends.cpu.ops"
BNB_KERNELS_WARNING = "Failed to load CPU gemm_4bit_forward from kernels-community"


def _not_bnb_kernels_warning(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(BNB_KERNELS_WARNING)


if _not_bnb_kernels_warning not in logging.getLogger(BNB_CPU_LOGGER).filters:
    logging.getLogger(BNB_CPU_LOGGER).addFilter(_not_bnb_kernels_warning)

_transformers = require("transformers", "simulate")
TrainerCallback = _transformers.TrainerCallback

logger = logging.getLogger("vramplan")

# transformers.training_args.OptimizerNames -> TrainSetup.optimizer; Trainer.get_optimizer_cls_and_kwargs
# builds torch.optim.AdamW with fused=True for adamw_torch_fused (docs/recipes.md#fused-adamw) and
# with torch's foreach default for adamw_torch
OPTIMIZERS = {
    "adamw_torch": "adamw_foreach", "adamw_torch_fused": "adamw_fused", "adamw_torch_xla": "adamw",
    "adamw_hf": "adamw",
    "adamw_apex_fused": "adamw", "adamw_bnb_8bit": "adamw8bit", "adamw_8bit": "adamw8bit",
    "paged_adamw_32bit": "paged_adamw", "paged_adamw_8bit": "paged_adamw8bit", "sgd": "sgd",
    "adafactor": "adafactor",
}


# transformers' attn_implementation -> TrainSetup.attn. flash_attention_2 (the flash-attn package)
# runs the kernel SDPA's flash backend wraps (aten/src/ATen/native/transformers/cuda/flash_attn:
# FlashAttention-2) and saves the same output and logsumexp for backward
# (flash_attn/flash_attn_interface.py FlashAttnFunc.forward: ctx.save_for_backward(q, k, v, out, softmax_lse))
ATTENTION = {"sdpa": "sdpa", "eager": "eager", "flash_attention_2": "sdpa"}


@record
class StepMemory:
    step: int
    peak_allocated_bytes: int
    predicted_peak_allocated_bytes: int | None
    exceeded: bool

    def to_dict(self) -> dict:
        return {"step": self.step, "peak_allocated_bytes": self.peak_allocated_bytes,
                "predicted_peak_allocated_bytes": self.predicted_peak_allocated_bytes, "exceeded": self.exceeded}


class CudaPeakMeter:
    """torch.cuda's peak counter on the current device."""

    def __init__(self):
        import torch
        self.torch = torch

    @property
    def available(self) -> bool:
        return self.torch.cuda.is_available()

    def reset(self) -> None:
        self.torch.cuda.reset_peak_memory_stats()

    def peak(self) -> int:
        return int(self.torch.cuda.max_memory_allocated())


class MemoryCallback(TrainerCallback):
    """Log vramplan's estimate at train start and the measured peak per step; warn on excess.

    setup: a TrainSetup to use as is (otherwise inferred); seq: the sequence length; model_id:
    a name for the logs; gpu: a --gpu value for the fit verdict; margin: relative slack before
    warning (0.0 warns on any excess); meter: an object with reset() / peak() / available
    (default: torch.cuda)."""

    def __init__(self, setup=None, *, seq: int | None = None, model_id: str | None = None, gpu=None,
                 margin: float = 0.0, meter=None):
        # checked here, before training starts: once it runs, the callback never stops it
        if setup is not None and not isinstance(setup, TrainSetup):
            raise UsageError(f"setup must be a TrainSetup, got {type(setup).__name__}",
                             hint="pass TrainSetup(...), or leave it out to read the setup off the model")
        if seq is not None and (isinstance(seq, bool) or not isinstance(seq, int) or not 0 < seq <= MAX_SEQ):
            raise UsageError(f"seq must be a whole number of tokens from 1 to {MAX_SEQ:,}, got {seq!r}",
                             hint="e.g. seq=2048")
        if gpu is not None:
            resolve_gpu(gpu)    # an unknown card or an impossible size: the one-line error estimate gives
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not math.isfinite(margin) \
                or margin < 0:
            raise UsageError(f"margin must be a fraction >= 0, got {margin!r}",
                             hint="e.g. margin=0.05 warns past 5% above the prediction")
        if meter is not None and not all(callable(getattr(meter, name, None)) for name in ("reset", "peak")):
            raise UsageError(f"meter must have reset() and peak(), got {type(meter).__name__}",
                             hint="leave it out to measure with torch.cuda")
        self.setup = setup
        self.seq = seq
        self.model_id = model_id
        self.gpu = gpu
        self.margin = margin
        self.meter = meter
        self.estimate = None
        self.history: list[StepMemory] = []
        self.disabled_reason: str | None = None
        self._spec = None
        self._observed_seq = 0
        self._observed_batch = 0
        self._hook = None
        self._warned_at = 0
        self.measuring = False

    # --- Trainer events ---------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.meter is None:
            try:
                self.meter = CudaPeakMeter()
            except Exception as exc:  # noqa: BLE001 - never stop the user's training
                self.disabled_reason = f"torch unavailable: {exc}"
        self.measuring = self.meter is not None and bool(getattr(self.meter, "available", True))
        if not self.measuring and self.disabled_reason is None:
            self.disabled_reason = "no CUDA device: nothing to measure"
            logger.info("vramplan: %s", self.disabled_reason)
        try:
            self._spec = spec_of(model, self.model_id)
            seq = self.seq or (self.setup.seq if self.setup is not None else None) or _seq_from_args(args)
            if seq:
                self._estimate(seq, args, model)
            elif model is not None:  # learn the shape from the first batch
                self._hook = model.register_forward_pre_hook(self._observe, with_kwargs=True)
        except VramplanError as exc:
            self._spec = None
            logger.warning("vramplan: cannot estimate this run: %s", exc)
        return control

    def on_step_begin(self, args, state, control, **kwargs):
        if self.measuring:
            self.meter.reset()
        return control

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self.estimate is None and self._spec is not None and self._observed_seq:
            try:
                self._estimate(self._observed_seq, args, model)
            except VramplanError as exc:
                self._spec = None
                logger.warning("vramplan: cannot estimate this run: %s", exc)
        if not self.measuring:
            return control
        peak = self.meter.peak()
        predicted = self.estimate.peak_allocated_bytes if self.estimate is not None else None
        exceeded = predicted is not None and peak > predicted * (1 + self.margin)
        self.history.append(StepMemory(state.global_step, peak, predicted, exceeded))
        logger.info("vramplan: step %d peak allocated %.3f GiB%s", state.global_step, peak / 2**30,
                    f" (predicted {predicted / 2**30:.3f} GiB)" if predicted else "")
        if exceeded and peak > self._warned_at:  # warn again only when a new high is reached
            self._warned_at = peak
            message = (f"vramplan: step {state.global_step} peaked at {peak / 2**30:.3f} GiB allocated, "
                       f"{(peak - predicted) / 2**20:,.1f} MiB above the prediction ({predicted / 2**30:.3f} GiB)")
            logger.warning(message)
            warnings.warn(message, ResourceWarning, stacklevel=2)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        return control

    # --- helpers -------------------------------------------------------------------------------------
    def _observe(self, module, args, kwargs):
        ids = kwargs.get("input_ids") if kwargs else None
        if ids is None and args:
            ids = args[0]
        shape = getattr(ids, "shape", None)
        if shape is not None and len(shape) == 2:
            self._observed_batch = max(self._observed_batch, int(shape[0]))
            self._observed_seq = max(self._observed_seq, int(shape[1]))

    def _estimate(self, seq: int, args, model) -> None:
        setup = self.setup if self.setup is not None else setup_of(model, args, seq)
        self.estimate = estimate(self._spec, setup, gpu=self.gpu)
        e = self.estimate
        # e.status: core/_verdict.py, the verdict estimate / plan / sweep print (fits / tight / no)
        words = {"fits": ", fits", "tight": ", TIGHT", "no": ", DOES NOT FIT"}
        logger.info("vramplan: predicted peak allocated %.3f GiB, peak reserved %.3f GiB, device total %.3f GiB "
                    "(%s phase) for %s, %s batch %d x seq %d, %s%s", e.peak_allocated_bytes / 2**30,
                    e.peak_reserved_bytes / 2**30, e.device_total_bytes / 2**30,
                    e.peak_phase, self._spec.id, setup.method, setup.batch, setup.seq, setup.optimizer,
                    words.get(e.status, ""))

    def summary(self) -> dict:
        peaks = [h.peak_allocated_bytes for h in self.history]
        return {"estimate": self.estimate.to_dict() if self.estimate is not None else None,
                "max_peak_allocated_bytes": max(peaks) if peaks else None,
                "steps": [h.to_dict() for h in self.history], "disabled_reason": self.disabled_reason}


# --- reading the setup off a live model -----------------------------------------------------------------

def spec_of(model, model_id: str | None = None):
    """ModelSpec from the model's config (a PeftModel's base config)."""
    if model is None:
        raise VramplanError("no model passed to the callback", hint="use it with a transformers Trainer")
    config = getattr(model, "config", None)
    if config is None:
        raise VramplanError("the model has no config", hint="MemoryCallback supports transformers models")
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    name = model_id or d.get("_name_or_path") or d.get("model_type", "model")
    return spec_from_config(d, name, "transformers model config")


def setup_of(model, args, seq: int):
    """TrainSetup from the model (quantization, adapters, attention) and TrainingArguments."""

    peft_config = getattr(model, "peft_config", None)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    qc = getattr(getattr(base, "config", None), "quantization_config", None)
    if qc is not None and not isinstance(qc, dict):
        qc = qc.to_dict()
    quantized = bool(getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False)
                     or (qc and (qc.get("load_in_4bit") or qc.get("load_in_8bit"))))
    fields = {}
    if peft_config:
        lora = next(iter(peft_config.values()))
        targets = lora.target_modules
        if isinstance(targets, str):
            targets = (targets,) if targets == ALL_LINEAR else tuple(t.strip() for t in targets.split(","))
        else:
            # peft expands "all-linear" into full module paths (model.layers.0.mlp.down_proj, ...);
            # the estimator matches module names inside a layer, so keep the leaf names
            targets = tuple(sorted({str(t).rsplit(".", 1)[-1] for t in (targets or ())})) or (ALL_LINEAR,)
        fields.update(method="qlora" if quantized else "lora", rank=int(lora.r), targets=targets,
                      lora_dropout=float(lora.lora_dropout or 0.0))
    else:
        fields["method"] = "qlora" if quantized else "full"
    if quantized and qc:
        if qc.get("load_in_8bit"):
            fields["quant"] = "int8"
        else:
            fields["quant"] = qc.get("bnb_4bit_quant_type", "nf4")
            fields["double_quant"] = bool(qc.get("bnb_4bit_use_double_quant", False))
    fields["dtype"] = _dtype(args, qc, base)
    # Trainer(bf16=True / fp16=True) runs the step under torch.autocast (accelerate's mixed
    # precision; docs/recipes.md#recipe-defaults). Autocast over weights of another dtype is refused
    # by TrainSetup (not modelled), which the callback logs instead of estimating.
    fields["amp"] = "bf16" if getattr(args, "bf16", False) else "fp16" if getattr(args, "fp16", False) else "none"
    fields["batch"] = int(getattr(args, "per_device_train_batch_size", 1) or 1)
    if _is_sft_config(args) and not getattr(args, "label_smoothing_factor", 0):
        # TRL's SFTTrainer patches the model with its fused lm_head and computes the loss through it
        # (trl/trainer/sft_trainer.py: add_fused_lm_head, compute_loss `fused_lm_head=True`;
        # docs/recipes.md#trl-chunked-loss); label smoothing takes the full logits instead
        fields["loss"] = "chunked"
    fields["grad_accum"] = max(1, int(getattr(args, "gradient_accumulation_steps", 1) or 1))
    fields["seq"] = int(seq)
    fields["grad_ckpt"] = _checkpointing(args, base)
    fields["reentrant"] = fields["grad_ckpt"] and _reentrant(args)
    attn = getattr(getattr(base, "config", None), "_attn_implementation", "sdpa") or "sdpa"
    if attn not in ATTENTION:
        raise UsageError(f"attention implementation {attn!r} is not modelled",
                         hint="the estimate models sdpa, eager and flash_attention_2 (as SDPA's flash kernel)")
    fields["attn"] = ATTENTION[attn]
    if attn != fields["attn"]:
        logger.info("vramplan: %s estimated as SDPA's flash kernel (the same FlashAttention-2 kernel)", attn)
    optim = str(getattr(getattr(args, "optim", None), "value", getattr(args, "optim", "adamw_torch")))
    if optim not in OPTIMIZERS:
        raise UsageError(f"optimizer {optim!r} is not modelled",
                         hint=f"the estimate models the Trainer's {', '.join(OPTIMIZERS)}")
    fields["optimizer"] = OPTIMIZERS[optim]
    if peft_config and quantized:
        # TRL's SFTTrainer casts a quantized model's LoRA weights to bf16 (TrainSetup.adapter_dtype)
        lora = next((p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n), None)
        if lora is not None and str(lora.dtype) == "torch.bfloat16":
            fields["adapter_dtype"] = "bf16"
    if quantized:
        embed = base.get_input_embeddings() if hasattr(base, "get_input_embeddings") else None
        weight = getattr(embed, "weight", None)
        fields["prepare_kbit"] = weight is not None and str(weight.dtype) == "torch.float32"
    return TrainSetup(**fields)


def _is_sft_config(args) -> bool:
    """TRL's SFTConfig (or a subclass): the arguments of an SFTTrainer."""
    return any(c.__name__ == "SFTConfig" and c.__module__.startswith("trl.") for c in type(args).__mro__)


def _checkpointing(args, base) -> bool:
    """transformers 5.2x renamed gradient checkpointing to activation checkpointing (the old
    names warn); read whichever this version has, the new one first."""
    fields = getattr(args, "__dataclass_fields__", {})
    for name in ("activation_checkpointing", "gradient_checkpointing"):
        if name in fields and getattr(args, name, False):
            return True
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if isinstance(getattr(type(base), name, None), property):
            return bool(getattr(base, name))
    return False


def _reentrant(args) -> bool:
    """use_reentrant from the Trainer's checkpointing kwargs (activation_checkpointing_kwargs, or
    the deprecated gradient_checkpointing_kwargs), which Trainer passes on to
    activation_checkpointing_enable; absent: transformers' default, non-reentrant
    (docs/autograd.md#reentrant-checkpointing)."""
    import json

    for name in ("activation_checkpointing_kwargs", "gradient_checkpointing_kwargs"):
        kwargs = getattr(args, name, None)
        if isinstance(kwargs, str):
            try:
                kwargs = json.loads(kwargs)
            except ValueError:
                kwargs = None
        if isinstance(kwargs, dict) and "use_reentrant" in kwargs:
            return bool(kwargs["use_reentrant"])
    return False


def _seq_from_args(args) -> int | None:
    for key in ("max_length", "max_seq_length"):  # TRL SFTConfig
        value = getattr(args, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _dtype(args, qc, base) -> str:
    """The weights' dtype: a 4-bit model's compute dtype, else the model's own (Trainer(bf16=True)
    over float32 weights is autocast, `amp`, not bf16 weights); TrainingArguments only where the
    model says nothing."""
    if qc and qc.get("bnb_4bit_compute_dtype"):
        text = str(qc["bnb_4bit_compute_dtype"])
        return "fp16" if "float16" in text and "bfloat16" not in text else ("fp32" if "float32" in text else "bf16")
    dtype = getattr(base, "dtype", None)
    if dtype is not None:
        return {"torch.float16": "fp16", "torch.float32": "fp32"}.get(str(dtype), "bf16")
    if getattr(args, "fp16", False):
        return "fp16"
    return "bf16"
