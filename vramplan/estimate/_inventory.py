"""Every tensor that lives through the whole training step, byte-exact: weights, quantization
constants, LoRA adapters, gradients and optimizer state.

Each tensor is one CUDA allocation rounded to 512 bytes (quant.alloc). Sources per term are
cited inline; tests build the same model with transformers + bitsandbytes + peft on the meta
device and compare to the byte.
"""
from __future__ import annotations

from collections import Counter


from vramplan.core._components import Component
from vramplan.core._errors import ModelError, UsageError
from vramplan.core._models import Linear, ModelSpec
from vramplan.core._record import record
from vramplan.estimate._quant import alloc, blocks, constants_4bit, layout, layout_4bit, layout_int8
from vramplan.estimate._load import quantized_roles
from vramplan.core._setup import ALL_LINEAR, TrainSetup

FP32 = 4
PAGE_MIN_NUMEL = 100_000   # bitsandbytes/optim/optimizer.py get_state_buffer: p.numel() < 1e5 -> not paged


@record
class Static:
    """Bytes of the tensors that persist across the step, by component."""
    weights: int
    quant_constants: int
    adapters: int
    gradients: int            # at the end of backward (all trainable grads exist)
    optimizer_state: int      # on the device (0 for paged optimizers)
    paged_optimizer_state: int
    optimizer_temporaries: int  # transient workspace inside optimizer.step()
    trainable_params: int
    trainable_shapes: tuple[tuple[tuple[int, ...], int], ...]  # (shape, how many tensors of it)
    adapted: tuple[str, ...]   # leaf names of the Linear modules LoRA wraps
    # of weights / quant_constants / adapters: the vision tower and projector a multimodal class
    # holds (Gemma3ForConditionalGeneration; vision_static), their own line of the inventory
    vision: tuple[int, int, int] = (0, 0, 0)
    # tensors a load made and freed after the persistent ones, which a checkpoint load does not
    # make: only a profile record's re-estimate sets them (profile/_compare.py record_load,
    # docs/allocator.md#random-weights-load), for the caching-allocator replay
    load_transients: tuple[int, ...] = ()
    # the order a load makes each decoder layer's weights in: "checkpoint", transformers'
    # from_pretrained (sorted checkpoint keys, estimate/_inventory.py checkpoint_order), or "modules",
    # the modules' registration order, which a profile record's re-estimate may set
    # (profile/_compare.py record_load)
    load_order: str = "checkpoint"

    def by_component(self) -> dict[str, int]:
        return {Component.WEIGHTS.value: self.weights, Component.QUANT_CONSTANTS.value: self.quant_constants,
                Component.ADAPTERS.value: self.adapters}


def weight_bytes(setup: TrainSetup) -> int:
    """Bytes per element of the weights that stay un-quantized (embeddings, norms, lm_head, biases).

    peft.prepare_model_for_kbit_training casts every fp16/bf16 parameter that is not Params4bit
    to float32 (peft/utils/other.py)."""
    return FP32 if setup.prepare_kbit else setup.compute_bytes


def embedding_bytes(setup: TrainSetup) -> int:
    """embed_tokens and lm_head: as weight_bytes, but qlora.py's recast (TrainSetup.recast) puts
    them back in bf16 (`if 'lm_head' in name or 'embed_tokens' in name: module.to(bfloat16)`)."""
    return setup.compute_bytes if setup.recast else weight_bytes(setup)


def adapter_bytes(setup: TrainSetup) -> int:
    """LoRA weights (and their gradients): peft's autocast_adapter_dtype=True (the default) creates
    16-bit adapters in float32 (peft/tuners/tuners_utils.py _cast_adapter_dtype); qlora.py's recast
    moves every LoraLayer to bf16, and TRL's SFTTrainer casts a quantized model's (TrainSetup.adapters_16bit)."""
    return setup.compute_bytes if setup.adapters_16bit else FP32


def bias_bytes(setup: TrainSetup) -> int:
    """The bias of a Linear that stays a Linear (full, lora) is a weight like the others; a
    bitsandbytes Linear4bit casts its bias to the compute dtype in place on the first forward
    (nn/modules.py Linear4bit.forward: `bias.data = bias.data.to(x.dtype)`), so in steady state
    it is 16-bit even after prepare_model_for_kbit_training."""
    if setup.quantized and setup.quant in ("nf4", "fp4"):
        return setup.compute_bytes
    return weight_bytes(setup)


def adapted_linears(spec: ModelSpec, setup: TrainSetup) -> tuple[Linear, ...]:
    """Linear modules of one decoder layer (plus lm_head if named) that peft wraps with LoRA.

    "all-linear" (peft/tuners/tuners_utils.py, _maybe_include_all_linear_layers) targets every
    nn.Linear / bnb Linear except the output layer; named targets match a module whose name is
    the target or ends with "." + target (peft check_target_module_exists)."""
    if not setup.uses_adapters:
        return ()
    refuse_router_lora(spec, setup)
    moved = PEFT_MOE_PARAMETER_TARGETS.get(spec.model_type, ())
    if setup.targets == (ALL_LINEAR,):
        return tuple(l for l in spec.layer_linears if l.leaf not in moved)
    if moved and any(t in moved or t.rsplit(".", 1)[-1] in moved for t in setup.targets):
        raise ModelError(f"--targets {','.join(setup.targets)}: peft turns {', '.join(moved)} of {spec.model_type} "
                         "into target_parameters of the routed experts (and leaves the dense / shared MLPs "
                         "without LoRA); that mix is not modelled",
                         hint="target attention projections by name, or use all-linear")
    candidates = (*spec.layer_linears, spec.lm_head)
    chosen = tuple(l for l in candidates if any(l.name == t or l.name.endswith("." + t) or l.leaf == t
                                               for t in setup.targets))
    vision = spec.vision.linears if spec.vision else ()   # vision_adapted: the vision tower's, matched alike
    unmatched = [t for t in setup.targets
                 if not any(l.name == t or l.name.endswith("." + t) or l.leaf == t for l in (*candidates, *vision))]
    if unmatched:
        names = ", ".join(sorted({l.leaf for l in (*candidates, *vision)}))
        raise ModelError(f"target modules {', '.join(unmatched)} match nothing in {spec.id}",
                         hint=f"its Linear modules are: {names} (or use all-linear)")
    return chosen


def refuse_fused_head(spec: ModelSpec, setup: TrainSetup) -> None:
    """TRL's fused lm_head (--loss chunked) takes the last hidden state from `model.base_model`
    (docs/recipes.md#trl-chunked-loss). Where that is the causal LM itself (Llama4ForCausalLM:
    base_model_prefix "language_model", decoder at .model), the fused forward gets the causal LM's
    output, which has no last_hidden_state, and fails: no run trains that way."""
    if setup.loss == "chunked" and not spec.arch.base_model_is_decoder:
        raise ModelError(f"--loss chunked cannot run on {spec.model_type}: TRL's fused lm_head reads the hidden "
                         "states from model.base_model, which for this model class is the causal LM itself",
                         hint="use --loss full")


def refuse_router_lora(spec: ModelSpec, setup: TrainSetup) -> None:
    """Llama4Router subclasses nn.Linear (models/llama4/modeling_llama4.py) and returns (scores,
    logits). peft's all-linear takes every nn.Linear (tuners_utils._maybe_include_all_linear_layers:
    isinstance), as does a target naming `router`; the lora.Linear wrapping it then fails on the
    first forward (peft/tuners/lora/layer.py Linear.forward: `result.dtype` of the tuple). No run
    trains that way, so the estimate refuses it."""
    if not (spec.arch.linear_router and spec.num_experts and setup.uses_adapters):
        return
    if setup.targets == (ALL_LINEAR,) or any(t.rsplit(".", 1)[-1] == "router" for t in setup.targets):
        names = ",".join(dict.fromkeys(l.leaf for l in spec.layer_linears))
        raise ModelError(f"LoRA on {spec.model_type}'s router cannot run: peft wraps Llama4Router (an nn.Linear "
                         "subclass returning scores and logits) and its forward fails on the tuple",
                         hint=f"name the targets, e.g. --targets {names}")


# peft 0.21 _convert_peft_config_moe (peft/utils/transformers_weight_conversion.py) with
# transformers' conversion_mapping._MODEL_TO_CONVERSION_PATTERN["deepseek_v3"] = "qwen2_moe":
# "all-linear" is resolved to leaf names, and the names of the v4 expert projections
# (_MOE_TARGET_MODULE_MAPPING["qwen2_moe"]: gate_proj, up_proj -> gate_up_proj; down_proj) move
# from target_modules to target_parameters. So no nn.Linear called gate_proj / up_proj /
# down_proj gets a LoRA layer: DeepSeek's dense and shared-expert MLPs stay 4-bit and frozen.
# docs/architectures.md#deepseek_v3
PEFT_MOE_PARAMETER_TARGETS = {"deepseek_v3": ("gate_proj", "up_proj", "down_proj")}


def lora_shapes(linear: Linear, rank: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """lora_A.weight (r, in) and lora_B.weight (out, r): peft/tuners/lora/layer.py update_layer."""
    return (rank, linear.in_features), (linear.out_features, rank)


def experts_adapted(spec: ModelSpec, setup: TrainSetup) -> bool:
    """peft 0.21 on transformers 5 MoE models (peft/utils/transformers_weight_conversion.py
    _convert_peft_config_moe): "all-linear" is resolved against the v4 module names, so the
    router `gate` and the experts' w1/w2/w3 become target_parameters of the fused 3D weights,
    wrapped by lora.ParamWrapper; gate_up_proj fuses w1 and w3, so its rank is doubled. Model
    types without that conversion (granitemoe, Architecture.peft_moe_conversion) keep experts and
    router frozen: neither is an nn.Linear."""
    return (bool(spec.num_experts) and setup.uses_adapters and setup.targets == (ALL_LINEAR,)
            and spec.arch.peft_moe_conversion)


def experts_quantized(spec: ModelSpec, setup: TrainSetup) -> bool:
    """--experts 4bit on an MoE model: every expert a 4-bit Linear of its own (transformers 4.x
    MixtralBlockSparseTop2MLP w1/w3 (h -> i) and w2 (i -> h) as nn.Linear, which
    replace_with_bnb_linear turns into Linear4bit; Unsloth's MoE 4-bit quantizes the same
    matrices). docs/bitsandbytes.md#moe-experts"""
    return bool(spec.num_experts) and setup.experts_4bit


def expert_linears(spec: ModelSpec) -> tuple[Linear, ...]:
    """One expert's Linear modules in the 4-bit layout (names as in transformers 4.x)."""
    h, i = spec.hidden, spec.expert_width
    return (Linear("experts.w1", h, i, False), Linear("experts.w3", h, i, False), Linear("experts.w2", i, h, False))


def expert_weight_bytes(spec: ModelSpec, setup: TrainSetup) -> tuple[int, int]:
    """(bytes of all expert weights kept 16-bit as transformers 5 keeps them, the same experts as
    separate quantized Linear weights with their constants): what --experts 4bit saves."""
    if not spec.num_experts:
        return 0, 0
    n, E, wb = spec.moe_layers, spec.num_experts, weight_bytes(setup)
    sixteen = n * sum(alloc(numel(shape) * wb) for name, shape in spec.moe_shapes() if name.startswith("experts."))
    quant = setup.quant if setup.quantized else "nf4"
    four = n * E * sum(layout(quant, l.in_features, l.out_features, setup.double_quant).total
                       for l in expert_linears(spec))
    return sixteen, four


def expert_lora_shapes(spec: ModelSpec, setup: TrainSetup) -> list[tuple[tuple[int, int], int]]:
    """(shape, count per layer) of the LoRA tensors ParamWrapper adds (peft/tuners/lora/layer.py
    ParamWrapper: for a (E, in, out) parameter lora_A is Linear(in, r * E), lora_B Linear(r * E, out);
    a 2D (out, in) parameter is one expert). With --experts 4bit each expert is a Linear4bit that
    all-linear wraps with an ordinary LoRA layer (lora_shapes), E of each per layer."""
    if not experts_adapted(spec, setup):
        return []
    r, E, h, i = setup.rank, spec.num_experts, spec.hidden, spec.expert_width
    if experts_quantized(spec, setup):
        per_expert = Counter()
        for lin in expert_linears(spec):
            for shape in lora_shapes(lin, r):
                per_expert[shape] += E
        return [((r, h), 1), ((E, r), 1)] + list(per_expert.items())   # router + experts
    return [((r, h), 1), ((E, r), 1),                        # router weight (E, h)
            ((2 * r * E, 2 * i), 1), ((h, 2 * r * E), 1),    # experts.gate_up_proj (E, 2i, h), rank 2r
            ((r * E, h), 1), ((i, r * E), 1)]                # experts.down_proj (E, h, i)


def rope_kinds(spec: ModelSpec) -> int:
    """Rotary embeddings the model holds: one, or one per layer type (Gemma3RotaryEmbedding,
    models/gemma3/modeling_gemma3.py: inv_freq per sorted(set(config.layer_types)))."""
    return len(set(spec.layer_types)) if spec.arch.rope_per_layer_type and spec.layer_types else 1


def rope_width(spec: ModelSpec) -> int:
    """Last dim of the rotary cos / sin: head_dim (LlamaRotaryEmbedding: cat(freqs, freqs)), or
    head_dim / 2 for gpt-oss (GptOssRotaryEmbedding.forward: `emb = freqs`, and _apply_rotary_emb
    multiplies each half by it), or the rotated dims of a partial rotary embedding (Phi-4-mini:
    ModelSpec.rotary_dim)."""
    if spec.arch.rope_half:
        return spec.head_dim // 2
    return spec.rotary_dim or spec.head_dim


def numel(shape: tuple[int, ...]) -> int:
    out = 1
    for d in shape:
        out *= d
    return out


@record
class VisionStatic:
    """One allocation per tensor of the vision tower and projector (ModelSpec.vision), by component,
    and the parameters peft / full fine-tuning make trainable there."""
    weights: tuple[int, ...]
    quant_constants: tuple[int, ...]
    adapters: tuple[int, ...]
    trainable_params: int
    adapted: tuple[str, ...]


def vision_adapted(spec: ModelSpec, setup: TrainSetup) -> tuple[Linear, ...]:
    """The vision encoder's Linear modules peft wraps: all-linear takes every nn.Linear but the
    output embedding (peft tuners_utils._maybe_include_all_linear_layers), so q/k/v/out_proj and
    fc1 / fc2 of every SiglipEncoderLayer; named targets match them by name as in the decoder."""
    if not (spec.vision and setup.uses_adapters):
        return ()
    if setup.targets == (ALL_LINEAR,):
        return spec.vision.linears
    return tuple(l for l in spec.vision.linears
                 if any(l.name == t or l.name.endswith("." + t) or l.leaf == t for t in setup.targets))


def linear_tensors(setup: TrainSetup, linear) -> tuple[int, list[int]]:
    """(the weight's bytes, its bitsandbytes constants' bytes one tensor each) of one Linear:
    int8's weight and SCB; NF4/FP4's packed weight and quant_state (estimate/_quant.py
    constants_4bit); a 16-bit weight alone."""
    if setup.quantized and setup.quant == "int8":
        q = layout_int8(linear.in_features, linear.out_features)
        return q.weight, [q.constants]
    if setup.quantized:
        numel_ = linear.in_features * linear.out_features
        return layout_4bit(numel_, setup.double_quant).weight, list(constants_4bit(numel_, setup.double_quant))
    return alloc(linear.numel * weight_bytes(setup)), []


def checkpoint_order(name: str) -> tuple:
    """Where a parameter named `name` comes in a checkpoint load: transformers 5 sorts the
    checkpoint's keys before it loads and quantizes them one by one (core_model_loading.py
    convert_and_load_state_dict_in_model, `sorted(state_dict.items(), key=dot_natural_key)`:
    dot-separated parts, numbers numerically, names alphabetically). Within a decoder layer that is
    mlp before self_attn, and Phi-3's o_proj before its qkv_proj, which decides what shares the
    caching allocator's 20 MiB segments (docs/allocator.md#load-order)."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in name.split("."))


def vision_tensors(spec: ModelSpec, setup: TrainSetup) -> list[tuple[str, str, int, int]]:
    """(component, load role, elements, bytes) of each tensor of Gemma3ForConditionalGeneration's
    vision tower and projector (docs/architectures.md#gemma3_text), in checkpoint order:
    'model.multi_modal_projector' sorts before 'model.vision_tower'; in the tower the embeddings
    (patch Conv2d bias, weight, position embedding), each encoder layer (LayerNorms, then mlp.fc1,
    mlp.fc2, self_attn k / out / q / v, each Linear's bias before its weight), post_layernorm; the
    int64 position_ids buffer last. bitsandbytes replaces the tower's nn.Linear modules like the
    decoder's (get_keys_to_not_convert skips only tied weights, the output embedding and the last
    parameter; Gemma 3 has no _keep_in_fp32_modules): a 4-bit weight is "packed", an int8 one
    "int8", its constants after it (linear_tensors; the load quantizes it there, estimate/_load.py); biases
    stay in the load dtype, float32 after prepare_model_for_kbit_training (weight_bytes: Linear4bit's
    first-forward cast back never happens in a tower that does not run); the Conv2d patch
    embedding, position embedding, LayerNorms and projector stay 16-bit (float32 after
    prepare_model_for_kbit_training)."""
    v = spec.vision
    if v is None:
        return []
    W, Q = Component.WEIGHTS.value, Component.QUANT_CONSTANTS.value
    wb, h = weight_bytes(setup), v.hidden
    dense = lambda *shape: (W, "weight", 0, alloc(numel(shape) * wb))   # noqa: E731
    out = [dense(h, v.text_hidden), dense(h),                             # the projector, its norm
           dense(h), dense(h, v.channels, v.patch, v.patch), dense(v.positions, h)]
    role, constant = quantized_roles(setup)
    layer = [dense(h)] * 4                                                # layer_norm1 / 2, bias and weight
    for linear in sorted(v.linears, key=lambda linear: checkpoint_order(linear.name)):
        weight, constants = linear_tensors(setup, linear)
        layer.append((W, "weight", 0, alloc(linear.out_features * wb)))   # the bias, in the load dtype
        layer.append((W, role, linear.numel, weight))
        layer += [(Q, constant, 0, c) for c in constants]
    out += layer * v.layers + [dense(h), dense(h)]                        # post_layernorm
    out.append((W, "weight", 0, alloc(8 * v.positions)))                  # SiglipVisionEmbeddings.position_ids
    return out


def vision_static(spec: ModelSpec, setup: TrainSetup) -> VisionStatic:
    """Gemma3ForConditionalGeneration's SigLIP tower and projector (vision_tensors), by component.
    LoRA layers on its Linear modules never get a gradient in a text-only step (no pixel_values:
    the tower does not run), so they add no gradients and no optimizer state (AdamW skips
    parameters whose grad is None); nor do its weights under full fine-tuning."""
    if spec.vision is None:
        return VisionStatic((), (), (), 0, ())
    v, ab = spec.vision, adapter_bytes(setup)
    tensors = vision_tensors(spec, setup)
    weights = [n for component, _role, _count, n in tensors if component == Component.WEIGHTS.value]
    consts = [n for component, _role, _count, n in tensors if component == Component.QUANT_CONSTANTS.value]
    adapters = []
    adapted = vision_adapted(spec, setup)
    trainable = 0
    for linear in adapted:
        for shape in lora_shapes(linear, setup.rank):
            adapters += [alloc(numel(shape) * ab)] * v.layers
            trainable += v.layers * numel(shape)
    if setup.method == "full":
        trainable = v.num_params
    return VisionStatic(tuple(weights), tuple(consts), tuple(adapters), trainable, tuple(l.leaf for l in adapted))


def static_memory(spec: ModelSpec, setup: TrainSetup) -> Static:
    wb, eb, ab = weight_bytes(setup), embedding_bytes(setup), adapter_bytes(setup)
    refuse_fused_head(spec, setup)
    if setup.recast and spec.num_experts:
        # the recast comes with --recipe qlora-paper or --recast: the hint turns it off either way
        source = "--recipe qlora-paper's recast" if setup.recipe == "qlora-paper" else "--recast"
        raise UsageError(f"{source} is modelled for dense models (qlora.py predates fused MoE experts)",
                         hint="add --no-recast, or use --recipe trainer")
    if setup.accumulates and spec.tied and setup.method == "full":
        # the tied weight's two gradients meet in its AccumulateGrad input buffer before they are
        # added into .grad (estimate/_ops.py tied_embedding_grad): not modelled across micro-steps
        raise UsageError(f"{setup.flag_text('grad_accum')} with a tied embedding trained in full is not modelled",
                         hint="use --grad-accum 1 (the peak of one micro-step), or --method lora / qlora")
    n = spec.layers
    weights = quant_constants = 0
    trainable: Counter[tuple[int, ...]] = Counter()  # shape -> number of tensors

    # Embeddings, norms and lm_head are never quantized (transformers keeps lm_head / tied
    # embeddings in modules_to_not_convert; norms and embeddings are not nn.Linear).
    weights += alloc(spec.vocab * spec.hidden * eb)                              # embed_tokens
    # every RMSNorm weight of a layer (Qwen3 / Gemma3 q_norm and k_norm are (head_dim,) each)
    weights += n * sum(alloc(w * wb) for w in spec.norm_widths) + alloc(spec.hidden * wb)
    if not spec.tied:
        weights += alloc(spec.vocab * spec.hidden * eb)                          # lm_head
    # Rotary embedding: inv_freq and its clone original_inv_freq, float32 (head_dim / 2) each,
    # non-persistent buffers (models/llama/modeling_llama.py LlamaRotaryEmbedding.__init__);
    # Gemma2TextScaledWordEmbedding adds a scalar embed_scale buffer.
    # Gemma3RotaryEmbedding keeps that pair once per layer type (local and global rope_theta).
    weights += 2 * rope_kinds(spec) * alloc(4 * (spec.head_dim // 2)) + (alloc(eb) if spec.arch.scaled_embeddings else 0)
    if setup.method == "full":
        trainable[(spec.vocab, spec.hidden)] += 1 if spec.tied else 2
        trainable[(spec.hidden,)] += 1
        for width in spec.norm_widths:
            trainable[(width,)] += n

    for linear in spec.layer_linears:
        k = spec.count(linear)   # DeepSeek: dense-MLP and shared-expert linears are in some layers only
        if setup.quantized:
            q = layout(setup.quant, linear.in_features, linear.out_features, setup.double_quant)
            weights += k * q.weight
            quant_constants += k * q.constants
        else:
            weights += k * alloc(linear.numel * wb)
            if setup.method == "full":
                trainable[(linear.out_features, linear.in_features)] += k
        if linear.bias:
            weights += k * alloc(linear.out_features * bias_bytes(setup))
            if setup.method == "full":
                trainable[(linear.out_features,)] += k

    m = spec.moe_layers
    if m and spec.arch.router == "sigmoid_grouped":
        # DeepseekV3TopkRouter.e_score_correction_bias: an (E,) buffer per MoE layer, float32
        # (DeepseekV3PreTrainedModel._keep_in_fp32_modules_strict, applied by from_pretrained)
        weights += m * alloc(4 * spec.num_experts)
    if experts_quantized(spec, setup):
        # --experts 4bit: the router weight (E, h) stays 16-bit as in transformers 5 (assumed);
        # each expert's w1, w3, w2 is a Linear4bit (packed weight + quantization constants)
        weights += m * alloc(spec.num_experts * spec.hidden * wb)
        for lin in expert_linears(spec):
            q = layout(setup.quant, lin.in_features, lin.out_features, setup.double_quant)
            weights += m * spec.num_experts * q.weight
            quant_constants += m * spec.num_experts * q.constants
    elif spec.num_experts:
        # MixtralTopKRouter.weight (E, h) and MixtralExperts' 3D parameters (GptOssTopKRouter and
        # GptOssExperts with their biases) stay in the load dtype under bitsandbytes (only
        # `type(module) is nn.Linear` is replaced).
        expert_tensors = [shape for _name, shape in spec.moe_shapes()]
        weights += m * sum(alloc(numel(t) * wb) for t in expert_tensors)
        if setup.method == "full":
            for shape in expert_tensors:
                trainable[shape] += m

    if spec.arch.sinks:
        # GptOssAttention.sinks: a (heads,) parameter per layer, never quantized
        weights += n * alloc(spec.heads * wb)
        if setup.method == "full":
            trainable[(spec.heads,)] += n

    adapters = 0
    for shape, count in expert_lora_shapes(spec, setup):
        adapters += count * m * alloc(numel(shape) * ab)
        trainable[shape] += count * m
    adapted = adapted_linears(spec, setup)
    for linear in adapted:
        per_layer = 1 if linear.name == "lm_head" else spec.count(linear)
        for shape in lora_shapes(linear, setup.rank):
            adapters += per_layer * alloc(numel(shape) * ab)       # adapter_bytes
            trainable[shape] += per_layer

    vis = vision_static(spec, setup)
    vision = (sum(vis.weights), sum(vis.quant_constants), sum(vis.adapters))
    weights, quant_constants, adapters = weights + vision[0], quant_constants + vision[1], adapters + vision[2]

    grad_bytes = ab if setup.uses_adapters else setup.compute_bytes
    gradients = sum(k * alloc(numel(t) * grad_bytes) for t, k in trainable.items())
    state, temporaries = optimizer_memory(setup, trainable, grad_bytes)
    paged = 0
    if setup.paged:
        paged = paged_state_bytes(setup, trainable)
    return Static(
        weights=weights, quant_constants=quant_constants, adapters=adapters, gradients=gradients,
        optimizer_state=state - paged,
        paged_optimizer_state=paged,
        optimizer_temporaries=temporaries,
        trainable_params=sum(k * numel(t) for t, k in trainable.items()) + vis.trainable_params,
        trainable_shapes=tuple(trainable.items()), adapted=tuple(l.leaf for l in adapted) + vis.adapted,
        vision=vision,
    )


def optimizer_memory(setup: TrainSetup, shapes: Counter, param_bytes: int) -> tuple[int, int]:
    """(state bytes, transient bytes inside step()) for the chosen optimizer: state_tensors and
    step_workspace of every parameter, plus what all parameters share."""
    state = _shared_qmaps(setup)
    temporaries = 0
    for s, k in shapes.items():
        state += k * sum(n for n, _pageable in state_tensors(setup, s, param_bytes))
        temporaries += k * step_workspace(setup, numel(s), param_bytes)
    return state, temporaries


def state_tensors(setup: TrainSetup, shape: tuple, param_bytes: int) -> tuple[tuple[int, bool], ...]:
    """The optimizer state of one parameter of `shape` whose gradient has `param_bytes` per
    element: (bytes, pageable) per tensor, in the order the optimizer creates them on its first
    step. `pageable`: a bitsandbytes state buffer (get_state_buffer), which a paged optimizer
    puts in unified memory from PAGE_MIN_NUMEL elements on (paged_state_bytes)."""
    opt = setup.optimizer.removeprefix("paged_")
    t = numel(shape)
    if opt == "adamw_fused":
        # torch.optim.AdamW(fused=True), adam.py _init_group: `step` first, a float32 device
        # scalar (_get_scalar_dtype(is_fused=True), device=p.device), then exp_avg and exp_avg_sq
        # (zeros_like(p)); torch._fused_adamw_ updates in place, no parameter-sized workspace
        # (docs/autograd.md#adamw-foreach-vs-fused)
        return (alloc(4), False), (alloc(t * param_bytes), False), (alloc(t * param_bytes), False)
    if opt in ("adamw", "adamw_foreach"):
        if setup.paged:
            # bitsandbytes' PagedAdamW (32-bit) keeps two float32 states (state1, state2) whatever
            # the parameter dtype (optim/optimizer.py Optimizer2State.init_state: optim_bits 32 ->
            # torch.float32, get_state_buffer); `step` is a Python int
            return (alloc(t * FP32), True), (alloc(t * FP32), True)
        # torch.optim.AdamW: exp_avg and exp_avg_sq in the param dtype (torch/optim/adamw.py
        # _init_group); `step` is a CPU scalar unless capturable/fused
        return (alloc(t * param_bytes), False), (alloc(t * param_bytes), False)
    if opt == "adamw8bit":
        # bitsandbytes Optimizer2State.init_state: tensors under min_8bit_size=4096 elements
        # keep two float32 states; larger ones state1 and state2 in uint8, then float32 absmax1 /
        # absmax2 per 256-element block (torch.zeros((blocks,), device=p.device), never paged)
        if t < 4096:
            return (alloc(4 * t), True), (alloc(4 * t), True)
        absmax = alloc(4 * blocks(t, 256))
        return (alloc(t), True), (alloc(t), True), (absmax, False), (absmax, False)
    if opt == "sgd":
        return ()        # torch.optim.SGD with momentum=0 (its default) keeps no state
    if opt == "adafactor":
        # transformers.optimization.Adafactor (factored second moment, beta1=None): a 2D (or
        # larger) tensor gets a row and a column vector in the grad dtype, a 1D tensor a full
        # exp_avg_sq (Adafactor._get_options: factored = len(shape) >= 2; exp_avg_sq_row is
        # shape[:-1], exp_avg_sq_col is shape[:-2] + shape[-1:]); after the update
        # state["RMS"] = self._rms(p) is a 0-d tensor on the device
        if len(shape) >= 2:
            vectors = (alloc(numel(shape[:-1]) * param_bytes), alloc(numel(shape[:-2] + shape[-1:]) * param_bytes))
        else:
            vectors = (alloc(t * param_bytes),)
        return tuple((n, False) for n in (*vectors, alloc(param_bytes)))
    raise AssertionError(opt)


def step_workspace(setup: TrainSetup, t: int, param_bytes: int) -> int:
    """Bytes one parameter of `t` elements adds to the optimizer step's transient workspace."""
    if setup.optimizer in ("adamw", "adamw_foreach"):
        # The CUDA default is the foreach implementation (_default_to_fused_or_foreach):
        # _multi_tensor_adamw allocates exp_avg_sq_sqrt = torch._foreach_sqrt(exp_avg_sqs),
        # one param-sized tensor per parameter, for the update.
        return alloc(t * param_bytes)
    return 0  # fused kernels: torch._fused_adamw_, bitsandbytes' 8-bit / paged update


def paged_state_bytes(setup: TrainSetup, shapes: Counter) -> int:
    """The part of a bitsandbytes paged optimizer's state in CUDA unified memory. Only state1 /
    state2 come from Optimizer8bit.get_state_buffer, which pages tensors of at least 1e5 elements
    (bitsandbytes/optim/optimizer.py: `if not self.is_paged or p.numel() < 1e5: torch.zeros_like`);
    smaller tensors' states, the 8-bit absmax1 / absmax2 (Optimizer2State.init_state:
    torch.zeros((blocks,), device=p.device)) and the shared qmaps are ordinary device memory
    (docs/bitsandbytes.md#paged-optimizers-and-unified-memory)."""
    return sum(k * sum(n for n, pageable in state_tensors(setup, s, FP32) if pageable)
               for s, k in shapes.items() if numel(s) >= PAGE_MIN_NUMEL)


def device_state_tensors(setup: TrainSetup, shape: tuple, param_bytes: int) -> list[int]:
    """The bytes of each state tensor of one parameter of `shape` that lives in device memory,
    in creation order (state_tensors without what a paged optimizer pages)."""
    paged = setup.paged and numel(shape) >= PAGE_MIN_NUMEL
    return [n for n, pageable in state_tensors(setup, shape, param_bytes) if n and not (paged and pageable)]


def _shared_qmaps(setup: TrainSetup) -> int:
    """The signed and unsigned 256-entry float32 dynamic maps an 8-bit optimizer moves to the
    device once and shares across parameters (Optimizer2State.init_state, name2qmap)."""
    return 2 * alloc(4 * 256) if setup.optimizer.endswith("8bit") else 0
