"""Activation memory of one decoder layer and of the model head, derived op by op from the
transformers modeling code (models/llama/modeling_llama.py and its siblings), peft's LoRA layer
(peft/tuners/lora/bnb.py Linear4bit.forward, lora/layer.py Linear.forward) and bitsandbytes'
MatMul4Bit (autograd/_functions.py).

Autograd keeps a tensor alive only when an op saves it for backward, and only for inputs that
need a gradient: a frozen weight means a matmul does not save its input. The facts that
decide the count (read off the code):
- RMSNorm upcasts to float32: x.float() and rsqrt(var) are saved by pow/mul (LlamaRMSNorm).
- peft LoRA casts the layer input to the adapter dtype (float32) in *every* wrapped module
  (`_cast_input_dtype`), and lora_A saves that copy; lora_B saves lora_A's output (T x r).
- bitsandbytes MatMul4Bit saves only the packed weight, not its input (grad of B unsupported).
- SiLU / GELU save their input, the gate * up product saves both factors.
- SDPA on a GPU runs flash / memory-efficient attention: saves q, k, v, the output and a
  float32 log-sum-exp per (batch, head, query); eager attention materializes scores.
Korthikanti et al. 2022 (sbh(34 + 5as/h)) is the GPT-3 count; LLaMA-style QLoRA blocks differ
enough that it is re-derived here, and simulate (the meta-device trace) is the reference.

Storage sharing matters: one tensor saved by several ops counts once, so saved tensors are
collected in a dict keyed by the tensor they are.
"""
from __future__ import annotations

from dataclasses import dataclass

from .inventory import adapted_linears
from .models import Linear, ModelSpec
from .quant import alloc, dequant_temporary
from .setup import TrainSetup

FP32 = 4


def act_bytes(setup: TrainSetup) -> int:
    """Bytes per element of the residual stream. With prepare_model_for_kbit_training the
    embedding and norm weights are float32, so every hidden state is float32 (Linear4bit
    returns its output in the input dtype: bitsandbytes nn/modules.py Linear4bit.forward)."""
    return FP32 if setup.prepare_kbit else setup.compute_bytes


@dataclass(frozen=True)
class LayerActivations:
    saved: int            # bytes saved for backward by one layer's forward (no checkpointing)
    layer_input: int      # the hidden state entering a layer (what checkpointing keeps)
    forward_transient: int   # extra bytes alive at the worst moment inside a layer's forward
    backward_transient: int  # extra bytes alive at the worst moment inside a layer's backward
    shared: int           # per-forward tensors shared by all layers (rotary cos/sin, masks)
    dequant: int          # largest dequantized weight (forward and backward temporaries)


class _Saved(dict):
    """name -> bytes of tensors saved for backward; adding a name twice keeps one copy."""

    def add(self, name: str, nbytes: int) -> None:
        self[name] = alloc(nbytes)


def layer_activations(spec: ModelSpec, setup: TrainSetup) -> LayerActivations:
    a, T, b, s = act_bytes(setup), setup.tokens, setup.batch, setup.seq
    h, i = spec.hidden, spec.intermediate
    q, kv = spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim
    adapted = {l.name for l in adapted_linears(spec, setup)}
    full = setup.method == "full"
    saved = _Saved()

    def norm(tag: str, src: str) -> str:
        # RMSNorm: x.to(float32) (a new tensor unless already float32) and rsqrt(variance) are
        # saved; with a trainable weight (full) the normalized input of the final mul too.
        saved.add(f"{tag}.x32" if a != FP32 else src, FP32 * T * h)
        saved.add(f"{tag}.rsqrt", FP32 * T)
        if full:
            saved.add(f"{tag}.y", a * T * h)
        return f"{tag}.out"

    def linear(lin: Linear, src: str) -> None:
        # Base layer: frozen weight -> input not saved; full fine-tuning saves it (shared).
        if full:
            saved.add(src, a * T * lin.in_features)
        if lin.name in adapted:
            if setup.lora_dropout > 0:
                # nn.Dropout output (float32) is what lora_A saves, plus dropout's bool mask.
                saved.add(f"{lin.name}.dropout", FP32 * T * lin.in_features)
                saved.add(f"{lin.name}.mask", T * lin.in_features)
            elif a != FP32:
                saved.add(f"{lin.name}.x32", FP32 * T * lin.in_features)  # per-module cast copy
            else:
                saved.add(src, a * T * lin.in_features)
            saved.add(f"{lin.name}.lora_a", FP32 * T * setup.rank)

    linears = {l.name.rsplit(".", 1)[-1]: l for l in spec.layer_linears}
    norms_before_attn = "input_layernorm"
    x = norm(norms_before_attn, "layer.input")
    if spec.arch.fused_qkv:
        linear(linears["qkv_proj"], x)
        v_storage = a * T * (q + 2 * kv)  # v is a view of qkv_proj's output: keeps all of it
    else:
        for name in ("q_proj", "k_proj", "v_proj"):
            linear(linears[name], x)
        v_storage = a * T * kv
    # Rotary: q*cos + rotate_half(q)*sin; cos/sin need no grad, so q, k before rotation are freed.
    attention_scores = 0
    if setup.attn == "sdpa":
        # transformers integrations/sdpa_attention.py: causal, no mask -> GQA handled by the
        # kernel (use_gqa_in_sdpa), k/v not repeated. Flash / efficient attention save q, k,
        # v, the output and float32 logsumexp (b, heads, s) (aten _scaled_dot_product_*_attention).
        saved.add("attn.q", a * T * q)
        saved.add("attn.k", a * T * kv)
        saved.add("attn.v", v_storage)
        saved.add("attn.out", a * T * q)
        saved.add("attn.lse", FP32 * b * spec.heads * s)
    else:
        # eager_attention_forward: repeat_kv copies k/v to all heads when grouped, scores
        # q @ k^T (a x b x H x s x s), softmax in float32 (saved), cast back (saved by @ v).
        rep = spec.heads // spec.kv_heads
        saved.add("attn.q", a * T * q)
        saved.add("attn.k", a * T * (q if rep > 1 else kv))
        saved.add("attn.v", a * T * q if rep > 1 else v_storage)
        scores = b * spec.heads * s * s
        saved.add("attn.probs32", FP32 * scores)
        saved.add("attn.probs", a * scores)
        if spec.attn_logit_softcap:
            saved.add("attn.tanh", a * scores)  # Gemma2: tanh(scores / cap) saves its output
        attention_scores = (a + FP32) * scores  # scores and the float32 softmax input in flight
    linear(linears["o_proj"], "attn.flat")
    if spec.arch.norms_per_layer == 4:
        norm("post_attention_layernorm", "attn.o")
        x = norm("pre_feedforward_layernorm", "residual")
    else:
        x = norm("post_attention_layernorm", "residual")

    if spec.num_experts:
        # MixtralSparseMoeBlock: each token goes to experts_per_tok experts; per routed row the
        # expert saves gate_up output (silu input, chunk view), the activation, and the
        # weighted output (mul by routing weights saves both). Frozen 3D weights: inputs not saved.
        routed = T * spec.experts_per_tok
        saved.add("moe.router_probs", FP32 * T * spec.num_experts)
        saved.add("moe.gate_up", a * routed * 2 * i)
        saved.add("moe.act", a * routed * i)
        saved.add("moe.out", a * routed * h)
        mlp_width = 0
    else:
        if spec.arch.fused_gate_up:
            linear(linears["gate_up_proj"], x)
            saved.add("mlp.gate_up", a * T * 2 * i)   # silu(gate) and up are views of it
        else:
            linear(linears["gate_proj"], x)
            linear(linears["up_proj"], x)
            saved.add("mlp.gate", a * T * i)          # silu input
            saved.add("mlp.up", a * T * i)            # mul operand
        saved.add("mlp.act", a * T * i)               # mul operand
        linear(linears["down_proj"], "mlp.prod")
        mlp_width = i
    if spec.arch.norms_per_layer == 4:
        norm("post_feedforward_layernorm", "mlp.out")

    # --- transients -------------------------------------------------------------------------
    widest = max(max(l.in_features, l.out_features) for l in spec.layer_linears)
    dequant = 0
    if setup.quantized:
        dequant = max(dequant_temporary(setup.quant, l.in_features, l.out_features,
                                        setup.double_quant, setup.compute_bytes)
                      for l in spec.layer_linears)
    # Forward: a LoRA-wrapped projection holds base output, its clone, lora_B output (float32)
    # and the sum at once; eager attention holds the score matrices.
    lora_fwd = (2 * a + 2 * FP32) * T * widest if adapted else 2 * a * T * widest
    forward_transient = max(lora_fwd + dequant, attention_scores)
    # Backward: incoming and outgoing hidden-state gradients, plus the widest op's input
    # gradient in float32 (LoRA path) and the compute dtype (base path), and a dequantized weight.
    width = max(mlp_width, q, h)
    backward_transient = 2 * a * T * h + (FP32 + 2 * a) * T * width + dequant
    if setup.attn == "eager":
        backward_transient = max(backward_transient, 2 * attention_scores)
    shared = 2 * alloc(a * T * spec.head_dim)  # rotary cos and sin, computed once per forward
    if setup.attn == "eager":
        shared += alloc(a * b * s * s)         # the 4D additive causal mask
    return LayerActivations(
        saved=sum(saved.values()), layer_input=alloc(a * T * h),
        forward_transient=forward_transient, backward_transient=backward_transient,
        shared=shared, dequant=dequant,
    )


@dataclass(frozen=True)
class HeadActivations:
    saved: int            # final norm + lm_head input saved through backward
    forward_peak: int     # logits, float32 copy and log-softmax at the loss
    backward_peak: int    # log-softmax, its gradient and the logits gradient at once


def head_activations(spec: ModelSpec, setup: TrainSetup) -> HeadActivations:
    """Final norm, lm_head and transformers' ForCausalLMLoss (loss/loss_utils.py):
    logits (compute dtype) -> logits.float() -> cross_entropy = log_softmax (float32, saved)
    + nll_loss. Backward: nll_loss grad (float32, T x V), log_softmax grad (float32),
    then the cast back to the logits dtype before lm_head's matmul backward.
    Gemma2 soft-caps logits first (logits / cap, tanh saved, * cap)."""
    a, T, V, h = act_bytes(setup), setup.tokens, spec.vocab, spec.hidden
    logits = alloc(setup.compute_bytes * T * V) if not setup.prepare_kbit else alloc(FP32 * T * V)
    logits32 = alloc(FP32 * T * V)
    # final norm saves x32 + rsqrt; lm_head (frozen) saves nothing of its input unless full.
    saved = alloc(FP32 * T * h) + alloc(FP32 * T) if a != FP32 else alloc(FP32 * T)
    if setup.method == "full":
        saved += alloc(a * T * h)
    softcap = 0
    if spec.final_logit_softcap:
        softcap = logits  # tanh output saved
    forward_peak = logits + softcap + logits32 + logits32   # bf16 logits, fp32 copy, log_softmax
    backward_peak = softcap + 3 * logits32                  # log_softmax, its grad, logits grad
    return HeadActivations(saved=saved + softcap, forward_peak=forward_peak, backward_peak=backward_peak)
