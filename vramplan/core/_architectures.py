"""Typed registry of the decoder architectures the analytic model knows.

Each entry is data read off the transformers modeling code (transformers 5.x,
models/<type>/modeling_<type>.py and configuration_<type>.py): which nn.Linear modules a
decoder layer has, where biases are, how many RMSNorms, and the config defaults used when a
config.json leaves a field out. An architecture not listed here fails loudly: the estimator
never guesses a layer it has not read.
"""
from __future__ import annotations

from dataclasses import field

from vramplan.core._record import record


@record
class Architecture:
    """One decoder family as transformers 5 builds it: layer structure, norms, routers and config
    defaults, each field read off its modeling and configuration files (docs/architectures.md)."""
    model_type: str
    # Config defaults from configuration_<type>.py (fields a config.json may omit).
    defaults: dict
    # Attention projections: separate q/k/v (LlamaAttention) or one fused qkv_proj (Phi3Attention).
    fused_qkv: bool = False
    # MLP: gate/up/down (LlamaMLP) or fused gate_up_proj (Phi3MLP); None for MoE-only layers.
    fused_gate_up: bool = False
    # Bias of q/k/v and of o_proj: a config key to read, or a fixed bool when the code hard-codes it.
    qkv_bias: str | bool = "attention_bias"
    o_bias: str | bool = "attention_bias"
    mlp_bias: str | bool = "mlp_bias"
    norms_per_layer: int = 2  # input_layernorm + post_attention_layernorm (4: Gemma's sandwich norms)
    # q/k RMSNorm inside attention (docs/architectures.md#qk-norm): "head" normalizes each head
    # over head_dim with one (head_dim,) weight (Qwen3Attention, Gemma3Attention q_norm/k_norm);
    # "projection" normalizes the whole q / k projection width (Olmo2Attention); "l2" a weightless
    # per-head norm after RoPE, on RoPE layers only, when config.use_qk_norm (Llama4TextL2Norm);
    # None: no q/k norm.
    qk_norm: str | None = None
    # RMSNorm arithmetic: "llama" (LlamaRMSNorm: weight * x_normed.to(dtype)), "llama4"
    # (Llama4TextRMSNorm: the same ops, the float32 product freed before the weight multiply), "gemma"
    # (Gemma2RMSNorm / Gemma3RMSNorm: x_normed * (1 + weight) in float32, then type_as(x)) or
    # "olmo" (Olmo2RMSNorm: (weight * x_normed).to(dtype), the product in float32).
    norm_style: str = "llama"
    # Where the block norms sit: "pre" (input_layernorm before attention, post_attention_layernorm
    # before the MLP: Llama), "sandwich" (Gemma: before and after each block) or "post" (OLMo 2:
    # post_attention_layernorm / post_feedforward_layernorm on each block's output, before the
    # residual add; the block input is not normalized). docs/architectures.md#olmo2
    norm_placement: str = "pre"
    # How transformers fills layer_types when config.json leaves it out (configuration_<type>.py
    # __post_init__): "window_from" (Qwen2/Qwen3: sliding from max_window_layers up, when
    # use_sliding_window), "pattern" (Gemma: every sliding_window_pattern-th layer is global),
    # "all" (Mistral / Mixtral / Phi-3: every layer sliding when sliding_window is set), "olmo3"
    # (Olmo3Config: every fourth layer full, the others sliding), "all_if_used" (Qwen3MoeConfig:
    # sliding_window only with use_sliding_window, then on every layer), "chunked" (Llama4TextConfig:
    # "chunked_attention" on the RoPE layers, "full_attention" on the others), None: none.
    layer_types_rule: str | None = None
    # Granite's multipliers that run as ops (models/granite/modeling_granite.py): every block output
    # is scaled before its residual add (`residual + h * residual_multiplier`, GraniteDecoderLayer)
    # and the logits divided by logits_scaling (GraniteForCausalLM); both run even at 1.0, each a
    # new tensor. attention_multiplier is only the softmax scale. docs/architectures.md#granite
    scaled_residuals: bool = False
    scaled_logits: bool = False
    # Some layers apply no RoPE (SmolLM3: config.no_rope_layers, SmolLM3Attention.use_rope)
    nope_layers: bool = False
    # One rotary embedding per layer type (Gemma3RotaryEmbedding: local and global rope_theta):
    # inv_freq buffers and cos/sin exist once per distinct layer type.
    rope_per_layer_type: bool = False
    moe: bool = False  # experts as 3D nn.Parameters (MixtralExperts) + a TopKRouter weight
    # MoE config keys: the expert count and the width of one expert (MixtralConfig
    # num_local_experts / intermediate_size; Qwen3MoeConfig num_experts / moe_intermediate_size)
    experts_key: str = "num_local_experts"
    expert_width_key: str = "intermediate_size"
    # The router's ops (docs/architectures.md#moe-routers): "softmax_topk" (MixtralTopKRouter: a
    # float32 softmax over all experts, top-k of it; the routing weights stay float32),
    # "softmax_topk_cast" (Qwen3MoeTopKRouter: the same, then `.to(router_logits.dtype)`) or
    # "topk_softmax" (GraniteMoeTopKRouter: top-k of the float32 logits, a softmax over those k,
    # `.type_as(hidden_states)`) or "sigmoid_grouped" (DeepseekV3TopkRouter: float32 sigmoid
    # scores plus e_score_correction_bias, top-k within the topk_group best of n_group groups,
    # weights renormalized and scaled by routed_scaling_factor) or "sigmoid_scatter" (Llama4Router:
    # top-k of the logits scattered into a -inf (tokens, experts) tensor, a float32 sigmoid of it
    # cast back: a score per expert, zero for the others). The weights' dtype decides the
    # dtype of the weighted expert outputs (integrations/moe.py grouped_mm_experts_forward:
    # proj_out * sample_weights).
    router: str = "softmax_topk"
    # peft maps "all-linear" onto the fused experts and the router (target_parameters) only for
    # model types in its MoE conversion table (peft/utils/transformers_weight_conversion.py
    # _MOE_TARGET_MODULE_MAPPING via transformers conversion_mapping._MODEL_TO_CONVERSION_PATTERN:
    # mixtral, qwen3_moe -> qwen2_moe); elsewhere all-linear adapts only the nn.Linear modules.
    peft_moe_conversion: bool = True
    # transformers 4 built every expert as nn.Linear modules (MixtralBlockSparseTop2MLP w1/w3/w2,
    # Qwen3MoeMLP gate/up/down): the layout --experts 4bit models (docs/bitsandbytes.md#moe-experts).
    # GraniteMoE's transformers 4 experts (GraniteMoeParallelExperts) were 3D weights already.
    expert_linears_v4: bool = True
    # Multi-head latent attention (DeepseekV3Attention): q through an optional low-rank
    # q_a_proj / q_a_layernorm / q_b_proj, keys and values from one compressed latent
    # (kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj); RoPE on a qk_rope_head_dim slice only.
    # docs/architectures.md#deepseek_v3
    mla: bool = False
    activation_key: str = "hidden_act"
    # Gemma scales embeddings by sqrt(hidden) (Gemma2TextScaledWordEmbedding) and soft-caps logits.
    scaled_embeddings: bool = False
    # attn_implementation values transformers accepts for training this model, the default first
    # (default_attention)
    attention: tuple[str, ...] = ("sdpa", "eager")
    notes: tuple[str, ...] = field(default=())
    # gpt-oss (models/gpt_oss/modeling_gpt_oss.py): a learned per-head attention sink
    # (GptOssAttention.sinks, a (heads,) parameter concatenated to the scores as one more column),
    # cos/sin of half the head dim (GptOssRotaryEmbedding: `emb = freqs`, no cat), and the
    # experts' layout: "mixtral" (MixtralTopKRouter / MixtralExperts) or "gpt_oss" (GptOssTopKRouter
    # with a bias, top-k then softmax in the logits dtype; GptOssExperts with biases, an
    # interleaved gate_up_proj (E, h, 2i) and a clamped SwiGLU). docs/architectures.md#gpt_oss
    # "llama4": every token through every expert, scaled by its router score (Llama4TextMoe),
    # Llama4TextExperts gate_up_proj (E, h, 2i) / down_proj (E, i, h) by torch.bmm, a shared expert.
    sinks: bool = False
    rope_half: bool = False
    # rope_pass_cat: apply_rotary_pos_emb rotates the first cos.shape[-1] dims and ends with
    # `torch.cat([rotated, x_pass], dim=-1)`, a new tensor even when nothing passes through
    # (models/phi3/modeling_phi3.py apply_rotary_pos_emb)
    rope_pass_cat: bool = False
    # rope_float32: the rotary embedding returns float32 cos / sin (Olmo2RotaryEmbedding.forward
    # has no `.to(x.dtype)`), so apply_rotary_pos_emb multiplies in float32 and casts both
    # embeddings back as it returns (`return q_embed.to(q_type), k_embed.to(k_type)`)
    # (models/olmo2/modeling_olmo2.py, models/olmo3/modeling_olmo3.py)
    rope_float32: bool = False
    moe_style: str = "mixtral"
    # Llama 4's text decoder (models/llama4/modeling_llama4.py, docs/architectures.md#llama4_text):
    # - rope_complex: apply_rotary_emb multiplies float32 copies of q / k viewed as complex numbers
    #   by freqs_cis (one complex64 table, Llama4TextRotaryEmbedding), on the (batch, seq, heads,
    #   head_dim) layout; q / k reach the kernel as `.transpose(1, 2)` views of it;
    # - temperature_tuning: no-RoPE layers scale q by a float32 per-position factor
    #   (Llama4TextAttention, config.attn_temperature_tuning);
    # - eager_softmax_fp32 False: its eager_attention_forward softmaxes in the scores' dtype;
    # - linear_router: the router subclasses nn.Linear and returns (scores, logits), which peft's
    #   all-linear would wrap in a LoRA layer that cannot run (inventory.adapted_linears);
    # - mask_types: the masks the model builds whatever its layers use (Llama4TextModel.forward
    #   causal_mask_mapping: full and chunked; eager materializes both).
    rope_complex: bool = False
    temperature_tuning: bool = False
    eager_softmax_fp32: bool = True
    linear_router: bool = False
    mask_types: tuple[str, ...] = ()
    # The causal-LM class's `base_model` (PreTrainedModel.base_model: getattr(self,
    # base_model_prefix, self)) is its decoder. TRL's fused lm_head runs base_model for the last
    # hidden state (docs/recipes.md#trl-chunked-loss). Llama4ForCausalLM names its prefix
    # "language_model" but keeps the decoder at .model, so its base_model is the model itself.
    base_model_is_decoder: bool = True

    @property
    def default_attention(self) -> str:
        """What from_pretrained picks when no attn_implementation is given (modeling_utils.py
        get_correct_attn_implementation: "sdpa" by default, falling back to "eager" where the class
        sets _supports_sdpa = False, as Gemma2, "sdpa does not support softcapping", and gpt-oss do)."""
        return self.attention[0]


_LLAMA_DEFAULTS = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=None, head_dim=None, hidden_act="silu",
                       max_position_embeddings=2048, tie_word_embeddings=False, attention_bias=False,
                       mlp_bias=False)

ARCHITECTURES: dict[str, Architecture] = {a.model_type: a for a in (
    # models/llama/modeling_llama.py: LlamaAttention q/k/v/o (bias=config.attention_bias),
    # LlamaMLP gate/up/down (bias=config.mlp_bias), two LlamaRMSNorm per layer.
    Architecture("llama", _LLAMA_DEFAULTS),
    # models/mistral/modeling_mistral.py: Llama layout, no biases at all.
    Architecture("mistral", dict(_LLAMA_DEFAULTS, intermediate_size=14336, num_key_value_heads=8,
                                 max_position_embeddings=4096 * 32),
                 qkv_bias=False, o_bias=False, mlp_bias=False, layer_types_rule="all"),
    # models/ministral/modeling_ministral.py (MinistralAttention, MinistralDecoderLayer, MinistralMLP)
    # and configuration_ministral.py (MinistralConfig): Mistral's layer (q/k/v/o and MLP with
    # bias=False hard-coded) with a per-layer attention type: config.layer_types, or every layer
    # sliding when sliding_window is set (MinistralConfig.__post_init__; default window 4096).
    # docs/architectures.md#ministral
    Architecture("ministral", dict(_LLAMA_DEFAULTS, intermediate_size=14336, num_key_value_heads=8,
                                   max_position_embeddings=4096 * 32, sliding_window=4096),
                 qkv_bias=False, o_bias=False, mlp_bias=False, layer_types_rule="all"),
    # models/qwen2/modeling_qwen2.py: q/k/v with bias=True hard-coded, o_proj and MLP without.
    Architecture("qwen2", dict(_LLAMA_DEFAULTS, vocab_size=151936, intermediate_size=22016,
                               num_key_value_heads=32, max_position_embeddings=32768, max_window_layers=28),
                 qkv_bias=True, o_bias=False, mlp_bias=False, layer_types_rule="window_from"),
    # models/qwen3/modeling_qwen3.py (Qwen3Attention, Qwen3DecoderLayer) and
    # configuration_qwen3.py (Qwen3Config): the Llama layout with q/k/v/o bias=config.attention_bias
    # (False by default) and a Qwen3RMSNorm(head_dim) q_norm / k_norm applied per head to the q
    # and k projections before RoPE. docs/architectures.md#qwen3
    Architecture("qwen3", dict(_LLAMA_DEFAULTS, vocab_size=151936, hidden_size=4096, intermediate_size=22016,
                               num_hidden_layers=32, num_key_value_heads=32, head_dim=128,
                               max_position_embeddings=32768, use_sliding_window=False, sliding_window=4096,
                               max_window_layers=28),
                 mlp_bias=False, qk_norm="head", layer_types_rule="window_from"),
    # models/gemma2/modeling_gemma2.py: q/k/v/o bias=config.attention_bias, MLP without bias,
    # four RMSNorms per layer (input, post_attention, pre_feedforward, post_feedforward),
    # scaled embeddings, tied lm_head, soft-capped attention and final logits.
    Architecture("gemma2", dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216,
                                num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4,
                                head_dim=256, hidden_activation="gelu_pytorch_tanh",
                                max_position_embeddings=8192, tie_word_embeddings=True,
                                attention_bias=False, final_logit_softcapping=30.0,
                                attn_logit_softcapping=50.0, query_pre_attn_scalar=256),
                 mlp_bias=False, norms_per_layer=4, activation_key="hidden_activation",
                 scaled_embeddings=True, norm_style="gemma", norm_placement="sandwich", layer_types_rule="alternate",
                 # Gemma2ForCausalLM refuses attn_implementation="sdpa" (transformers 5.23:
                 # "does not support an attention implementation through ... sdpa yet")
                 attention=("eager",)),
    # models/gemma3/modeling_gemma3.py (Gemma3ForCausalLM, Gemma3DecoderLayer, Gemma3Attention)
    # and configuration_gemma3.py (Gemma3TextConfig): Gemma2's sandwich layer (four Gemma3RMSNorm,
    # (1 + weight) in float32), q/k/v/o bias=config.attention_bias, per-head q_norm / k_norm after
    # the three projections, five sliding-window layers per global one (layer_types /
    # sliding_window_pattern), one rotary embedding per layer type, scaled embeddings, tied
    # lm_head, no soft-capping by default; SDPA is supported. docs/architectures.md#gemma3_text
    Architecture("gemma3_text", dict(vocab_size=262208, hidden_size=2304, intermediate_size=9216,
                                     num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4,
                                     head_dim=256, hidden_activation="gelu_pytorch_tanh",
                                     max_position_embeddings=131072, tie_word_embeddings=True,
                                     attention_bias=False, query_pre_attn_scalar=256, sliding_window=4096,
                                     sliding_window_pattern=6),
                 mlp_bias=False, norms_per_layer=4, activation_key="hidden_activation", norm_placement="sandwich",
                 scaled_embeddings=True, norm_style="gemma", qk_norm="head", layer_types_rule="pattern",
                 rope_per_layer_type=True,
                 notes=()),
    # models/olmo2/modeling_olmo2.py (Olmo2DecoderLayer, Olmo2Attention, Olmo2RMSNorm) and
    # configuration_olmo2.py (Olmo2Config): Llama projections (bias=config.attention_bias) and MLP,
    # norms after the attention and MLP outputs, q_norm / k_norm over the whole q and k
    # projection widths. docs/architectures.md#olmo2
    Architecture("olmo2", dict(_LLAMA_DEFAULTS, vocab_size=50304, max_position_embeddings=2048),
                 mlp_bias=False, qk_norm="projection", norm_style="olmo", norm_placement="post", rope_float32=True),
    # models/olmo3/modeling_olmo3.py (Olmo3DecoderLayer, Olmo3Attention, Olmo3RMSNorm,
    # Olmo3RotaryEmbedding) and configuration_olmo3.py (Olmo3Config): OLMo 2's layer (post-norm,
    # q_norm / k_norm over the whole projection widths, MLP without bias) with sliding-window
    # layers: config.layer_types, or three sliding layers per full one (Olmo3Config.__post_init__),
    # window config.sliding_window (4096 by default); one rotary embedding per layer type.
    # docs/architectures.md#olmo3
    Architecture("olmo3", dict(_LLAMA_DEFAULTS, vocab_size=50304, max_position_embeddings=2048,
                               sliding_window=4096),
                 mlp_bias=False, qk_norm="projection", norm_style="olmo", norm_placement="post",
                 layer_types_rule="olmo3", rope_per_layer_type=True, rope_float32=True),
    # models/granite/modeling_granite.py (GraniteDecoderLayer, GraniteModel, GraniteForCausalLM) and
    # configuration_granite.py (GraniteConfig): the Llama layout (q/k/v/o bias=attention_bias, MLP
    # bias=mlp_bias) with embedding / residual / attention / logits multipliers.
    Architecture("granite", dict(_LLAMA_DEFAULTS, embedding_multiplier=1.0, logits_scaling=1.0,
                                 residual_multiplier=1.0, attention_multiplier=1.0),
                 scaled_residuals=True, scaled_logits=True),
    # models/smollm3/modeling_smollm3.py (SmolLM3Attention, SmolLM3DecoderLayer) and
    # configuration_smollm3.py (SmolLM3Config): the Llama layout (q/k/v/o bias=attention_bias, MLP
    # bias=mlp_bias), tied embeddings, every fourth layer without RoPE (no_rope_layers), sliding
    # windows only on those layers and only with use_sliding_window. docs/architectures.md#smollm3
    Architecture("smollm3", dict(_LLAMA_DEFAULTS, vocab_size=128256, hidden_size=2048, num_hidden_layers=36,
                                 num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=32768,
                                 tie_word_embeddings=True, use_sliding_window=False),
                 layer_types_rule="nope_window", nope_layers=True),
    # models/phi3/modeling_phi3.py: fused qkv_proj and gate_up_proj, no biases.
    Architecture("phi3", dict(_LLAMA_DEFAULTS, vocab_size=32064, hidden_size=3072, intermediate_size=8192,
                              max_position_embeddings=4096),
                 fused_qkv=True, fused_gate_up=True, qkv_bias=False, o_bias=False, mlp_bias=False,
                 layer_types_rule="all", rope_pass_cat=True),
    # models/mixtral/modeling_mixtral.py (transformers 5): Llama attention without biases, a
    # MixtralTopKRouter holding a plain (E, hidden) weight, and MixtralExperts storing every
    # expert as one 3D nn.Parameter (gate_up_proj (E, 2i, h), down_proj (E, h, i)). Neither is
    # an nn.Linear, so bitsandbytes' replace_with_bnb_linear leaves them in the load dtype and
    # peft's all-linear does not target them.
    Architecture("mixtral", dict(_LLAMA_DEFAULTS, intermediate_size=14336, num_key_value_heads=8,
                                 max_position_embeddings=4096 * 32, num_local_experts=8,
                                 num_experts_per_tok=2),
                 qkv_bias=False, o_bias=False, mlp_bias=False, moe=True, layer_types_rule="all",
                 notes=("transformers 5 keeps Mixtral experts as 3D parameters: bitsandbytes does not "
                        "quantize them (they stay 16-bit); peft's all-linear adapts them through "
                        "target_parameters (ParamWrapper, gate_up_proj at rank 2r), merging a 16-bit copy "
                        "of each expert stack on every forward",)),
    # models/qwen3_moe/modeling_qwen3_moe.py (Qwen3MoeAttention, Qwen3MoeDecoderLayer,
    # Qwen3MoeSparseMoeBlock, Qwen3MoeTopKRouter, Qwen3MoeExperts) and configuration_qwen3_moe.py
    # (Qwen3MoeConfig): Qwen3's attention (per-head q_norm / k_norm, bias=attention_bias) and
    # pre-norm layer with Mixtral-style fused 3D experts (num_experts of moe_intermediate_size) and
    # a router weight (E, h); routing weights cast back to the logits dtype. Only all-sparse layer
    # stacks (decoder_sparse_step 1, no mlp_only_layers) are modelled. docs/architectures.md#qwen3_moe
    Architecture("qwen3_moe", dict(_LLAMA_DEFAULTS, vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                                   num_hidden_layers=24, num_attention_heads=32, num_key_value_heads=4,
                                   max_position_embeddings=32768, use_sliding_window=False, sliding_window=4096,
                                   decoder_sparse_step=1, mlp_only_layers=[], moe_intermediate_size=768,
                                   num_experts_per_tok=8, num_experts=128, norm_topk_prob=False),
                 mlp_bias=False, qk_norm="head", layer_types_rule="all_if_used", moe=True,
                 experts_key="num_experts", expert_width_key="moe_intermediate_size", router="softmax_topk_cast",
                 notes=("transformers 5 keeps Qwen3-MoE experts as 3D parameters: bitsandbytes does not "
                        "quantize them (they stay 16-bit); peft's all-linear adapts them through "
                        "target_parameters (the qwen2_moe conversion: ParamWrapper, gate_up_proj at rank 2r), "
                        "merging a 16-bit copy of each expert stack on every forward",)),
    # models/granitemoe/modeling_granitemoe.py (GraniteMoeAttention, GraniteMoeDecoderLayer,
    # GraniteMoeMoE, GraniteMoeTopKRouter, GraniteMoeExperts, GraniteMoeModel, GraniteMoeForCausalLM)
    # and configuration_granitemoe.py (GraniteMoeConfig): Granite's multipliers (residual,
    # embedding, logits) around a Mixtral-style layer: q/k/v/o bias=attention_bias, fused 3D
    # experts (num_local_experts of intermediate_size), a router weight (E, h) whose top-k runs
    # on the float32 logits before the softmax. peft 0.21 has no MoE conversion for granitemoe,
    # so all-linear adapts the attention projections only. docs/architectures.md#granitemoe
    Architecture("granitemoe", dict(_LLAMA_DEFAULTS, embedding_multiplier=1.0, logits_scaling=1.0,
                                    residual_multiplier=1.0, attention_multiplier=1.0, num_local_experts=8,
                                    num_experts_per_tok=2),
                 mlp_bias=False, scaled_residuals=True, scaled_logits=True, moe=True, router="topk_softmax",
                 peft_moe_conversion=False, expert_linears_v4=False,
                 notes=("transformers 5 keeps GraniteMoE experts as 3D parameters: bitsandbytes does not "
                        "quantize them (they stay 16-bit); peft's all-linear adapts only the attention "
                        "projections (no MoE conversion for granitemoe): experts and router stay frozen",)),
    # models/deepseek_v3/modeling_deepseek_v3.py (DeepseekV3Attention, DeepseekV3MLP,
    # DeepseekV3TopkRouter, DeepseekV3Experts, DeepseekV3MoE, DeepseekV3DecoderLayer) and
    # configuration_deepseek_v3.py (DeepseekV3Config, whose defaults are DeepSeek-V3's own
    # shapes): MLA attention (projections bias=attention_bias on q_a_proj, kv_a_proj_with_mqa and
    # o_proj, none on q_proj / q_b_proj / kv_b_proj), a dense DeepseekV3MLP in the first
    # first_k_dense_replace layers, then DeepseekV3MoE: a sigmoid-scored group-limited router, the
    # routed experts as 3D parameters (moe_intermediate_size wide) and n_shared_experts fused into
    # one DeepseekV3MLP of moe_intermediate_size * n_shared_experts. docs/architectures.md#deepseek_v3
    Architecture("deepseek_v3", dict(vocab_size=129280, hidden_size=7168, intermediate_size=18432,
                                     moe_intermediate_size=2048, num_hidden_layers=61, num_attention_heads=128,
                                     num_key_value_heads=None, head_dim=None, n_shared_experts=1,
                                     n_routed_experts=256, kv_lora_rank=512, q_lora_rank=1536,
                                     qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128, n_group=8,
                                     topk_group=4, num_experts_per_tok=8, first_k_dense_replace=3,
                                     hidden_act="silu", max_position_embeddings=4096, tie_word_embeddings=False,
                                     attention_bias=False, rope_interleave=True),
                 qkv_bias="attention_bias", o_bias="attention_bias", mlp_bias=False, moe=True,
                 experts_key="n_routed_experts", router="sigmoid_grouped", mla=True,
                 notes=("transformers 5 keeps DeepSeek-V3 routed experts as 3D parameters: bitsandbytes does "
                        "not quantize them (they stay 16-bit); peft's all-linear adapts them through "
                        "target_parameters and, converting the config for transformers 5, drops gate_proj / "
                        "up_proj / down_proj from the module targets, so the dense and shared-expert MLPs stay "
                        "4-bit without LoRA",)),
    # models/gpt_oss/modeling_gpt_oss.py (GptOssAttention, GptOssDecoderLayer, GptOssMLP,
    # GptOssTopKRouter, GptOssExperts, GptOssRMSNorm) and configuration_gpt_oss.py (GptOssConfig):
    # q/k/v/o with bias=config.attention_bias (True), head_dim read from the config, a `sinks`
    # parameter per layer; layer_types alternate sliding / full (GptOssConfig.__post_init__:
    # `(i + 1) % 2` slides); GptOssRMSNorm multiplies the weight into the float32 product before
    # the cast (as OLMo 2); experts as 3D parameters with biases. GptOssPreTrainedModel sets
    # _supports_sdpa = False: from_pretrained(attn_implementation="sdpa") raises, so only eager
    # attention (with the sink column) is modelled. docs/architectures.md#gpt_oss
    Architecture("gpt_oss", dict(_LLAMA_DEFAULTS, vocab_size=201088, hidden_size=2880, intermediate_size=2880,
                                 num_hidden_layers=36, num_attention_heads=64, num_key_value_heads=8,
                                 head_dim=64, max_position_embeddings=131072, sliding_window=128,
                                 attention_bias=True, num_local_experts=128, num_experts_per_tok=4),
                 mlp_bias=False, norm_style="olmo", layer_types_rule="alternate", moe=True,
                 attention=("eager",), sinks=True, rope_half=True, moe_style="gpt_oss", peft_moe_conversion=False,
                 expert_linears_v4=False,
                 notes=("transformers 5 keeps gpt-oss experts and router as 3D / custom parameters: bitsandbytes "
                        "does not quantize them and peft's all-linear does not adapt them (it targets q/k/v/o)",)),
    # models/llama4/modeling_llama4.py (Llama4TextAttention, Llama4TextDecoderLayer, Llama4TextMoe,
    # Llama4Router, Llama4TextExperts, Llama4TextMLP, Llama4TextL2Norm, Llama4TextRMSNorm,
    # Llama4TextRotaryEmbedding, eager_attention_forward) and configuration_llama4.py
    # (Llama4TextConfig): q/k/v/o with bias=config.attention_bias; MoE layers (config.moe_layers, or
    # every interleave_moe_layer_step-th) route every token through every expert plus a shared
    # Llama4TextMLP(intermediate_size), the others are a Llama4TextMLP(intermediate_size_mlp);
    # no_rope_layers pick the RoPE layers, which attend in chunks of attention_chunk_size. The
    # router is not quantized (`type(module) is nn.Linear` fails for a subclass) and the 3D experts
    # neither; peft has no MoE conversion for llama4 (conversion_mapping), so both stay frozen under
    # LoRA. Flash attention is refused (_supports_flash_attn = False). docs/architectures.md#llama4_text
    Architecture("llama4_text", dict(vocab_size=202048, hidden_size=5120, intermediate_size=8192,
                                     intermediate_size_mlp=16384, num_hidden_layers=48, num_attention_heads=40,
                                     num_key_value_heads=8, head_dim=128, hidden_act="silu",
                                     max_position_embeddings=4096 * 32, tie_word_embeddings=False,
                                     attention_bias=False, num_experts_per_tok=1, num_local_experts=16,
                                     moe_layers=None, interleave_moe_layer_step=1, use_qk_norm=True,
                                     output_router_logits=False, no_rope_layers=None, no_rope_layer_interval=4,
                                     attention_chunk_size=8192, layer_types=None, attn_temperature_tuning=True,
                                     floor_scale=8192, attn_scale=0.1),
                 mlp_bias=False, qk_norm="l2", norm_style="llama4", layer_types_rule="chunked", nope_layers=True,
                 moe=True, router="sigmoid_scatter", moe_style="llama4", peft_moe_conversion=False,
                 expert_linears_v4=False, rope_complex=True, temperature_tuning=True, eager_softmax_fp32=False,
                 linear_router=True, mask_types=("full_attention", "chunked_attention"), base_model_is_decoder=False,
                 notes=("transformers 5 keeps Llama 4 experts as 3D parameters and its router as an nn.Linear "
                        "subclass: bitsandbytes quantizes neither (both stay 16-bit) and LoRA adapts neither; "
                        "every token runs through every expert (hidden_states.repeat), so expert activations "
                        "grow with experts x tokens",)),
)}


# Softmax-attention layer kinds in config.layer_types (Llama 4's "chunked_attention": local
# attention within aligned chunks, masking_utils.create_chunked_causal_mask). Any other kind
# ("linear_attention": Qwen3-Next / Qwen3.5 gated DeltaNet; "mamba": Granite-MoE-hybrid, whose
# config lists them in layers_block_type) runs a recurrent layer through chunked kernels.
ATTENTION_LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention", "attention")


def recurrent_layer_kinds(config: dict) -> list[str]:
    """The layer kinds of a config that are not softmax attention, from its own fields."""
    kinds = config.get("layer_types") or config.get("layers_block_type") or ()
    return sorted({k for k in kinds if isinstance(k, str) and k not in ATTENTION_LAYER_TYPES})


def supported() -> str:
    return ", ".join(sorted(ARCHITECTURES))
