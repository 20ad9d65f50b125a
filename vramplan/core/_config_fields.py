"""Which config.json fields the shape model reads, and what it does when one is missing.

transformers fills every field a config.json leaves out from its config class
(models/<type>/configuration_<type>.py), so `{"model_type": "llama", "hidden_size": 4096}` loads
as a 6.7B Llama-2-7b. vramplan refuses a config that leaves out most of its core shape fields (three or more of five:
mostly defaults, not the user's model), and lists every default it applies as an assumption of
the estimate (field, value used, where it comes from). Up to two missing core fields are accepted
because published configs do it: google/gemma-3-4b-pt's text_config leaves out vocab_size and
num_attention_heads (Gemma3TextConfig's 262208 and 8).
Facts: docs/peft-transformers.md#config-fields-a-configjson-leaves-out
"""
from __future__ import annotations

from vramplan.core._errors import ModelError, UnmodelledError

# Without these the "model" is mostly the config class's defaults, not the user's model.
CORE_SHAPE_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                     "vocab_size")

# transformers' config class per model_type (models/<type>/configuration_<type>.py).
CONFIG_CLASSES = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config",
                  "gemma2": "Gemma2Config", "phi3": "Phi3Config", "mixtral": "MixtralConfig",
                  "qwen3": "Qwen3Config", "gemma3_text": "Gemma3TextConfig", "olmo2": "Olmo2Config",
                  "granite": "GraniteConfig", "smollm3": "SmolLM3Config", "olmo3": "Olmo3Config",
                  "ministral": "MinistralConfig", "qwen3_moe": "Qwen3MoeConfig",
                  "granitemoe": "GraniteMoeConfig", "deepseek_v3": "DeepseekV3Config", "gpt_oss": "GptOssConfig",
                  "llama4_text": "Llama4TextConfig"}

# Fields derived from others when absent, as transformers does: the config classes set
# `num_key_value_heads = num_attention_heads` (e.g. LlamaConfig.__post_init__), and head_dim is
# hidden_size // num_attention_heads (LlamaConfig.__post_init__; Qwen2Attention.__init__
# `getattr(config, "head_dim", config.hidden_size // config.num_attention_heads)`).
DERIVED = {"num_key_value_heads": "num_attention_heads", "head_dim": "hidden_size / num_attention_heads"}

# Other names transformers reads as the same field: each config class's `attribute_map` (alias ->
# field; PretrainedConfig.__setattr__ / __getattribute__ redirect the alias), for the fields the
# shape model reads. A config.json may use either name (transformers 5.23:
# MixtralConfig / GptOssConfig / Qwen3MoeConfig {"num_experts": "num_local_experts"},
# DeepseekV3Config {"num_local_experts": "n_routed_experts"}).
FIELD_ALIASES = {"mixtral": (("num_experts", "num_local_experts"),),
                 "gpt_oss": (("num_experts", "num_local_experts"),),
                 "qwen3_moe": (("num_experts", "num_local_experts"),),
                 "deepseek_v3": (("num_local_experts", "n_routed_experts"),)}

# An explicit null, as transformers reads it. Its config classes are dataclasses: a field typed
# without None (every core shape field, the expert counts) refuses a null when the class is built
# (strict field validation), so the estimate refuses it too; these fields keep a null's meaning:
# - NULL_MEANS_NONE: no sliding window (MistralConfig `sliding_window: int | None`), no logit
#   softcapping (Gemma2Config `final_logit_softcapping` / `attn_logit_softcapping: float | None`,
#   Gemma2Model skips the tanh when None), no query compression (DeepseekV3Config
#   `q_lora_rank: int | None`: q_proj instead of q_a_proj / q_b_proj), whatever the class default;
# - DERIVED: derived as the class derives an absent one (below), not the class default
#   (Qwen2Config defaults num_key_value_heads to 32, but its __post_init__ sets a None to
#   num_attention_heads).
NULL_MEANS_NONE = ("sliding_window", "final_logit_softcapping", "attn_logit_softcapping", "q_lora_rank")
NULL_REFUSED = (*CORE_SHAPE_FIELDS, "num_experts_per_tok", "moe_intermediate_size", "n_shared_experts",
                "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim")

# model types whose spec reads a sliding window (see models._sliding_window).
WINDOWED = {"mistral": ("sliding_window",), "mixtral": ("sliding_window",), "phi3": ("sliding_window",),
            "qwen2": ("use_sliding_window", "sliding_window"), "ministral": ("sliding_window",),
            "olmo3": ("sliding_window",), "qwen3_moe": ("use_sliding_window", "sliding_window"),
            "gpt_oss": ("sliding_window",)}


# Fields read only when another one is absent (Llama4TextConfig.__post_init__: the NoPE interval
# without no_rope_layers, the MoE interleave step without moe_layers)
READ_WITHOUT = {"no_rope_layer_interval": "no_rope_layers", "interleave_moe_layer_step": "moe_layers"}


def read_aliases(config: dict, arch, model_id: str) -> dict:
    """`config` with each alias (FIELD_ALIASES) read under the name the shape model reads
    (arch.experts_key for the expert count); ModelError where both names are given, differently."""
    out = dict(config)
    for alias, field_name in FIELD_ALIASES.get(arch.model_type, ()):
        names = (alias, field_name)
        given = {name: config[name] for name in names if config.get(name) is not None}
        if len(set(map(repr, given.values()))) > 1:
            raise ModelError(f"config for {model_id} gives both {alias} ({given[alias]!r}) and {field_name} "
                             f"({given[field_name]!r}), which transformers reads as one field",
                             hint="keep one of them in config.json")
        read = arch.experts_key if arch.experts_key in names else field_name
        if given and read not in given:
            out[read] = next(iter(given.values()))
    return out


def refuse_nulls(config: dict, arch, model_id: str) -> None:
    """ModelError (one line) for a null in a field transformers' config class types without None
    (NULL_REFUSED, and the family's expert count)."""
    refused = (*NULL_REFUSED, arch.experts_key) if arch.moe else NULL_REFUSED
    for key in refused:
        if key in config and config[key] is None:
            default = arch.defaults.get(key)
            hint = (f"give {key} in config.json" + (f", or leave it out for the class default {default!r}"
                                                     if default is not None else ""))
            cls = CONFIG_CLASSES.get(arch.model_type, "its config class")
            raise ModelError(f"config for {model_id}: {key} is null; {cls} needs a value", hint=hint)


def with_nulls(config: dict, cfg: dict) -> dict:
    """`cfg` (class defaults under the config's non-null fields) with each explicit null read as
    transformers reads it: None for NULL_MEANS_NONE and DERIVED fields (DERIVED ones are then
    derived by the spec as from absence)."""
    for key in (*NULL_MEANS_NONE, *DERIVED):
        if key in config and config[key] is None:
            cfg[key] = None
    return cfg


# Activations by the autograd graph they make (transformers 5.23 activations.py ACT2CLS): "silu"
# (SiLUActivation) and "swish" (nn.SiLU) are one F.silu, "gelu" (GELUActivation) and
# "gelu_pytorch_tanh" (GELUTanh) one F.gelu, each saving its input for backward. The others
# (gelu_new, gelu_fast, quick_gelu, relu2, ...) are several elementwise ops in Python with their
# own saved tensors, which the layer walk does not play.
ACTIVATION_KERNELS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu"}


def check_activation(config: dict, arch, model_id: str) -> None:
    """UnmodelledError (one line) where config.json's activation is not one kernel with the
    family's own (the layer walk plays the family's MLP as every published config of it runs)."""
    value = config.get(arch.activation_key)
    default = arch.defaults.get(arch.activation_key)
    if value is None or default is None or value == default:
        return
    if ACTIVATION_KERNELS.get(value, value) != ACTIVATION_KERNELS.get(default, default):
        raise UnmodelledError(f"config for {model_id}: {arch.activation_key} {value!r} is not modelled for "
                              f"{arch.model_type} (the estimate plays {default!r}, as its published configs use)",
                              hint="`vramplan simulate` traces the model transformers builds with it")


def _given(config: dict, key: str) -> bool:
    """An explicit null counts as given (transformers keeps it), except for derived fields, which
    transformers derives from null exactly as from absence."""
    return key in config and (config[key] is not None or key not in DERIVED)


# At most this many core shape fields may come from the config class's defaults.
MAX_DEFAULTED_CORE = 2


def require_core_fields(config: dict, model_id: str, arch) -> None:
    """ModelError naming every missing core shape field (one line) when more than
    MAX_DEFAULTED_CORE are missing, or one is missing that the family gives no default for."""
    missing = [k for k in CORE_SHAPE_FIELDS if config.get(k) is None]
    if len(missing) > MAX_DEFAULTED_CORE or any(arch.defaults.get(k) is None for k in missing):
        raise ModelError(f"config for {model_id} is missing {', '.join(missing)}",
                         hint=f"a {arch.model_type} config.json must give {', '.join(CORE_SHAPE_FIELDS)}; "
                              "vramplan fills at most two of them from transformers' defaults")


def check_field_types(config: dict, arch, model_id: str) -> None:
    """ModelError (one line) for a field of the family's config class given with the wrong JSON
    type: a number where the class has a number (multipliers, softcaps, window sizes), true or
    false where it has a flag, a string for the activation, a list for a layer list. transformers
    stores whatever config.json holds, and such a model fails in its first forward (a string
    multiplier in `hidden_states * residual_multiplier`), so the estimate refuses it up front."""
    for key, default in arch.defaults.items():
        value = config.get(key)
        if value is None or default is None:
            continue
        if isinstance(default, bool):
            ok, kind = isinstance(value, bool) or value in (0, 1), "true or false"
        elif isinstance(default, (int, float)):
            ok, kind = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
        elif isinstance(default, str):
            ok, kind = isinstance(value, str), "a string"
        elif isinstance(default, list):
            ok, kind = isinstance(value, list), "a list"
        else:
            continue
        if not ok:
            raise ModelError(f"config for {model_id}: {key} must be {kind}, got {value!r}",
                             hint=f"fix {key} in config.json")


def read_fields(arch) -> tuple[str, ...]:
    """The non-core fields the shape model reads for this architecture (models.spec_from_config)."""
    fields = [*CORE_SHAPE_FIELDS, "num_key_value_heads", "head_dim", "tie_word_embeddings"]
    fields += [rule for rule in (arch.qkv_bias, arch.o_bias, arch.mlp_bias) if isinstance(rule, str)]
    if arch.moe:
        fields += [arch.experts_key, "num_experts_per_tok"]
        if arch.expert_width_key != "intermediate_size":
            fields += [arch.expert_width_key, "mlp_only_layers", "decoder_sparse_step"]
    if arch.mla:   # _models.py _mla_spec
        fields += ["q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
                   "moe_intermediate_size", "n_shared_experts", "first_k_dense_replace", "n_group", "topk_group"]
        fields.remove("head_dim")   # DeepseekV3Config.__post_init__: head_dim = qk_rope_head_dim
    if arch.moe_style == "llama4":   # _models.py _llama4_feed_forward, _rope_layers, _attention_chunk
        fields += ["intermediate_size_mlp", "interleave_moe_layer_step", "no_rope_layer_interval",
                   "attention_chunk_size", "use_qk_norm", "attn_temperature_tuning"]
    fields += [k for k in ("final_logit_softcapping", "attn_logit_softcapping") if k in arch.defaults]
    fields += WINDOWED.get(arch.model_type, ())
    return tuple(dict.fromkeys(fields))


def defaults_applied(config: dict, arch, resolved: dict) -> tuple[str, ...]:
    """One assumption line listing each field the config leaves out, the value used and its origin;
    empty when the config gives every field the shape model reads."""
    cls = CONFIG_CLASSES.get(arch.model_type)
    origin = f"transformers' {cls}" if cls else f"transformers' configuration_{arch.model_type}.py"
    parts = []
    for key in read_fields(arch):
        if _given(config, key) or (key in READ_WITHOUT and config.get(READ_WITHOUT[key])):
            continue
        value = resolved.get(key)
        if key in DERIVED and (arch.defaults.get(key) is None):
            parts.append(f"{key} = {DERIVED[key]} = {value} (as transformers derives it)")
        elif key in arch.defaults:
            parts.append(f"{key} = {value!r} ({origin} default)")
        else:
            parts.append(f"{key} = {value!r} (absent: read as unset)")
    if not parts:
        return ()
    return (f"config.json leaves out fields the estimate reads; defaults used: {'; '.join(parts)}",)
