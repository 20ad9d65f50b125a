"""The analytic estimate of one steady-state training step (the second step onwards, when the
optimizer state exists), phase by phase.

The step is `loss = model(input_ids, labels=input_ids).loss; loss.backward(); opt.step();
opt.zero_grad(set_to_none=True)`. Candidate peaks, each a sum of named components:
- forward: all layers' saved activations (or, with gradient checkpointing, each layer's input
  only: torch.utils.checkpoint non-reentrant keeps the inputs) plus the loss's logits.
- backward: the loss backward (float32 logits gradients) or the first layer backward (its
  activations recomputed under checkpointing, plus gradient working memory and a dequantized
  weight); gradients of trainable parameters accumulate as backward proceeds.
- optimizer: gradients plus the optimizer's workspace.
The peak is the largest candidate; its components sum to peak_allocated_bytes exactly.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from .activations import HeadActivations, LayerActivations, act_bytes, head_activations, layer_activations
from .components import ALLOCATED, Component, check_sum
from .device import device_overhead
from .gpus import Gpu, resolve_gpu
from .inventory import Static, static_memory
from .models import ModelSpec, resolve
from .quant import alloc
from .setup import TrainSetup

C = Component


@dataclass(frozen=True)
class Estimate:
    model: ModelSpec
    setup: TrainSetup
    components: dict            # component -> bytes at the peak (ALLOCATED components only)
    peak_allocated_bytes: int   # torch.cuda.max_memory_allocated for the step
    peak_phase: str
    phase_peaks: dict           # phase -> allocated bytes at that phase's worst moment
    cuda_context_bytes: int
    allocator_overhead_bytes: int
    paged_optimizer_bytes: int  # CUDA unified memory: outside peak_allocated
    trainable_params: int
    assumptions: tuple[str, ...]
    gpu: Gpu | None = None
    phase_components: dict = field(default_factory=dict, repr=False)

    @property
    def device_total_bytes(self) -> int:
        """What NVML / nvidia-smi would show at the peak."""
        return self.peak_allocated_bytes + self.cuda_context_bytes + self.allocator_overhead_bytes

    @property
    def fits(self) -> bool | None:
        return None if self.gpu is None else self.device_total_bytes <= self.gpu.memory_bytes

    @property
    def headroom_bytes(self) -> int | None:
        """GPU memory left at the peak (negative: the shortfall)."""
        return None if self.gpu is None else self.gpu.memory_bytes - self.device_total_bytes

    def to_dict(self) -> dict:
        return {
            "model": self.model.to_dict(),
            "setup": self.setup.to_dict(),
            "gpu": self.gpu.to_dict() if self.gpu else None,
            "fits": self.fits,
            "headroom_bytes": self.headroom_bytes,
            "peak_allocated_bytes": self.peak_allocated_bytes,
            "device_total_bytes": self.device_total_bytes,
            "peak_phase": self.peak_phase,
            "components": dict(self.components),
            "device_components": {C.CUDA_CONTEXT.value: self.cuda_context_bytes,
                                  C.ALLOCATOR_OVERHEAD.value: self.allocator_overhead_bytes},
            "phase_peaks": dict(self.phase_peaks),
            "paged_optimizer_bytes": self.paged_optimizer_bytes,
            "trainable_params": self.trainable_params,
            "assumptions": list(self.assumptions),
        }


def estimate(model: str | ModelSpec, setup: TrainSetup | None = None, gpu: str | int | Gpu | None = None,
             **flags) -> Estimate:
    """Estimate peak memory. `flags` are TrainSetup fields (batch=4, seq=4096, method="lora", ...)."""
    spec = model if isinstance(model, ModelSpec) else resolve(model)
    setup = (setup or TrainSetup()).with_(**flags) if flags else (setup or TrainSetup())
    gpu_obj = resolve_gpu(gpu) if gpu is not None else None
    static = static_memory(spec, setup)
    layer = layer_activations(spec, setup)
    head = head_activations(spec, setup)
    phases = _phases(spec, setup, static, layer, head)
    peak_phase = max(phases, key=lambda p: sum(phases[p].values()))
    components = phases[peak_phase]
    peak = sum(components.values())
    check_sum(components, peak)
    overhead = device_overhead([layer.dequant, head.forward_peak // 2, layer.layer_input, layer.saved])
    return Estimate(
        model=spec, setup=setup, components=components, peak_allocated_bytes=peak,
        peak_phase=peak_phase, phase_peaks={p: sum(c.values()) for p, c in phases.items()},
        cuda_context_bytes=overhead.cuda_context, allocator_overhead_bytes=overhead.allocator_overhead,
        paged_optimizer_bytes=static.paged_optimizer_state, trainable_params=static.trainable_params,
        assumptions=assumptions(spec, setup), gpu=gpu_obj, phase_components=phases,
    )


def _phases(spec: ModelSpec, setup: TrainSetup, static: Static, layer: LayerActivations,
            head: HeadActivations) -> dict[str, dict[str, int]]:
    L = spec.layers
    # input_ids (int64, also passed as labels: one storage), position_ids, and the shifted
    # labels built by ForCausalLMLoss (pad + contiguous): int64 each.
    inputs = alloc(8 * setup.tokens) + alloc(8 * setup.seq) + 2 * alloc(8 * (setup.tokens + setup.batch))
    per_layer = layer.layer_input if setup.grad_ckpt else layer.saved
    kept = inputs + layer.shared + L * per_layer   # alive from the last layer's forward on

    def at(grads: int, activations: int, logits: int = 0, temporaries: int = 0) -> dict[str, int]:
        parts = {C.WEIGHTS: static.weights, C.QUANT_CONSTANTS: static.quant_constants,
                 C.ADAPTERS: static.adapters, C.GRADIENTS: grads, C.OPTIMIZER_STATE: static.optimizer_state,
                 C.ACTIVATIONS: activations, C.LOGITS_LOSS: logits, C.TEMPORARIES: temporaries}
        return {c.value: parts[c] for c in ALLOCATED}

    # Gradients of one layer's trainable tensors (they accumulate layer by layer in backward).
    layer_grads = (static.gradients - _head_grads(spec, setup, static)) // L if L else 0
    head_grads = static.gradients - layer_grads * L

    # Forward: the last layer runs with every earlier layer's activations kept; then the loss.
    last_layer = kept - per_layer + (0 if setup.grad_ckpt else 0)
    forward_layer = at(0, last_layer + layer.forward_transient - layer.dequant, temporaries=layer.dequant)
    forward_loss = at(0, kept + head.saved, logits=head.forward_peak)
    forward = max(forward_layer, forward_loss, key=lambda c: sum(c.values()))

    # Backward: the loss backward, then the first (top) layer backward with its activations
    # (recomputed under checkpointing) and working memory; with many trainable tensors the
    # end of backward, when all gradients exist, can be worse.
    backward_loss = at(head_grads, kept + head.saved, logits=head.backward_peak)
    recompute = layer.saved if setup.grad_ckpt else 0
    top_layer = at(head_grads + layer_grads,
                   kept + recompute + layer.backward_transient - layer.dequant, temporaries=layer.dequant)
    bottom_layer = at(static.gradients,
                      inputs + layer.shared + per_layer + recompute + layer.backward_transient - layer.dequant,
                      temporaries=layer.dequant)
    backward = max(backward_loss, top_layer, bottom_layer, key=lambda c: sum(c.values()))

    optimizer = at(static.gradients, inputs, temporaries=static.optimizer_temporaries)
    return {"forward": forward, "backward": backward, "optimizer": optimizer}


def _head_grads(spec: ModelSpec, setup: TrainSetup, static: Static) -> int:
    """Gradient bytes of trainable tensors outside the decoder layers (full: embeddings, final
    norm, lm_head; LoRA on lm_head)."""
    if setup.method == "full":
        n = spec.vocab * spec.hidden * (1 if spec.tied else 2)
        return alloc(n * setup.compute_bytes) + alloc(spec.hidden * setup.compute_bytes)
    if "lm_head" in static.adapted:
        return alloc(4 * setup.rank * spec.hidden) + alloc(4 * spec.vocab * setup.rank)
    return 0


def assumptions(spec: ModelSpec, setup: TrainSetup) -> tuple[str, ...]:
    """What the prediction takes for granted, in words a user can check against their script."""
    out = []
    if setup.quantized:
        if setup.quant == "int8":
            out.append("base weights: bitsandbytes LLM.int8 (Linear8bitLt), lm_head and embeddings in "
                       f"{setup.dtype}")
        else:
            out.append(f"base weights: bitsandbytes {setup.quant} 4-bit, blocksize 64, "
                       f"{'double' if setup.double_quant else 'single'} quantization of absmax; "
                       f"lm_head, embeddings and norms in {'fp32' if setup.prepare_kbit else setup.dtype}")
    else:
        out.append(f"base weights in {setup.dtype}")
    if setup.uses_adapters:
        out.append(f"LoRA rank {setup.rank} on {', '.join(sorted(set(static_adapted(spec, setup)))) or 'nothing'}"
                   f", adapters in fp32 (peft autocast_adapter_dtype)"
                   + (f", dropout {setup.lora_dropout}" if setup.lora_dropout else ""))
    else:
        out.append(f"full fine-tuning: every parameter trainable in {setup.dtype}")
    out.append(f"micro-batch {setup.batch} x sequence {setup.seq} tokens, no padding, labels = input_ids, "
               "transformers ForCausalLMLoss (logits upcast to fp32)")
    out.append("gradient checkpointing (non-reentrant) on every decoder layer" if setup.grad_ckpt
               else "no gradient checkpointing: every layer's activations kept for backward")
    out.append("attention: SDPA flash / memory-efficient kernel (no seq x seq matrix)" if setup.attn == "sdpa"
               else "attention: eager (materializes batch x heads x seq x seq scores and fp32 softmax)")
    opt = {"adamw": "torch AdamW (foreach), 2 states in the parameter dtype",
           "adamw8bit": "bitsandbytes AdamW8bit (blockwise 8-bit states)",
           "paged_adamw": "bitsandbytes PagedAdamW 32-bit: states in CUDA unified memory (not counted as allocated)",
           "paged_adamw8bit": "bitsandbytes PagedAdamW8bit: states in CUDA unified memory (not counted as allocated)",
           "sgd": "torch SGD without momentum (no state)",
           "adafactor": "transformers Adafactor (factored second moment, no first moment)"}[setup.optimizer]
    out.append("optimizer: " + opt)
    if setup.prepare_kbit:
        out.append("prepare_model_for_kbit_training: non-quantized weights and hidden states in fp32")
    if setup.quantized and setup.quant != "int8":
        out.append("4-bit matmuls dequantize the weight to the compute dtype (bitsandbytes gemm_4bit falls back "
                   "to dequantize + F.linear above 1536 tokens, and backward always dequantizes)")
    out.append("steady state: the second step onwards (optimizer state already allocated), "
               "zero_grad(set_to_none=True)")
    out.append("device total = peak allocated + CUDA context (500 MiB, a model) + caching-allocator slack (a model)")
    out.extend(spec.arch.notes)
    return tuple(out)


def static_adapted(spec: ModelSpec, setup: TrainSetup) -> tuple[str, ...]:
    from .inventory import adapted_linears
    return tuple(l.leaf for l in adapted_linears(spec, setup))
