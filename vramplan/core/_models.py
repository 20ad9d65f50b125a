"""Model resolution: a hub id, alias, directory or config.json path -> ModelSpec (shapes only).

Order: local path, bundled catalog (no network), then the Hugging Face cache and Hub
(core/_hub.py, only config.json). Nothing here imports torch or transformers.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import field
from functools import lru_cache
from pathlib import Path

from vramplan.core._architectures import ARCHITECTURES, Architecture, recurrent_layer_kinds, supported
from vramplan.core._config_fields import (check_activation, check_field_types, defaults_applied, read_aliases,
                                         refuse_nulls, require_core_fields, with_nulls)
from vramplan.core._errors import ModelError, UnmodelledError
from vramplan.core._record import record

CATALOG_DIR = Path(__file__).parent / "catalog" / "models"


@record
class Linear:
    """One nn.Linear of the model: what bitsandbytes quantizes and peft can adapt."""
    name: str           # module name inside a decoder layer ("self_attn.q_proj") or top level ("lm_head")
    in_features: int
    out_features: int
    bias: bool
    # which decoder layers hold it: "all", or in a model with dense layers below MoE ones
    # (DeepseekV3DecoderLayer: layer_idx >= first_k_dense_replace is MoE) "dense" / "moe"
    where: str = "all"

    @property
    def leaf(self) -> str:  # what peft's target_modules matches against
        return self.name.rsplit(".", 1)[-1]

    @property
    def numel(self) -> int:
        return self.in_features * self.out_features


@record
class Mla:
    """Multi-head latent attention shapes (DeepseekV3Attention.__init__): q through q_proj, or
    q_a_proj (hidden -> q_lora_rank) + q_a_layernorm + q_b_proj when q_lora_rank is set;
    kv_a_proj_with_mqa (hidden -> kv_lora_rank + qk_rope_head_dim), kv_a_layernorm(kv_lora_rank),
    kv_b_proj (kv_lora_rank -> heads * (qk_nope_head_dim + v_head_dim)); o_proj from heads * v_head_dim."""
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope: int
    qk_rope: int
    v_head_dim: int

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope + self.qk_rope


@record
class VisionTower:
    """The SigLIP vision tower and multimodal projector Gemma3ForConditionalGeneration builds
    (models/siglip/modeling_siglip.py SiglipVisionModel, models/gemma3/modeling_gemma3.py
    Gemma3MultiModalProjector; docs/architectures.md#gemma3_text). SiglipEncoderLayer: q/k/v/out_proj
    (hidden -> hidden) and fc1 / fc2 (hidden <-> intermediate), all nn.Linear with bias, and two
    LayerNorms (weight and bias); SiglipVisionEmbeddings: a Conv2d patch embedding (with bias), a
    position Embedding of (image / patch)^2 rows and its int64 position_ids buffer; post_layernorm;
    the projector's mm_input_projection_weight (vision hidden, text hidden) and a Gemma3RMSNorm."""
    layers: int
    hidden: int
    intermediate: int
    channels: int
    patch: int
    image: int
    text_hidden: int

    @property
    def linears(self) -> tuple[Linear, ...]:
        h, i = self.hidden, self.intermediate
        return (Linear("self_attn.q_proj", h, h, True), Linear("self_attn.k_proj", h, h, True),
                Linear("self_attn.v_proj", h, h, True), Linear("self_attn.out_proj", h, h, True),
                Linear("mlp.fc1", h, i, True), Linear("mlp.fc2", i, h, True))

    @property
    def positions(self) -> int:
        return (self.image // self.patch) ** 2

    def dense_shapes(self) -> tuple[tuple[int, ...], ...]:
        """Every 16-bit parameter that is not an nn.Linear weight or bias, one shape each: the patch
        Conv2d weight and bias, the position embedding, each layer's two LayerNorms (weight, bias),
        post_layernorm, the projector's weight and its RMSNorm weight."""
        h = self.hidden
        return ((h, self.channels, self.patch, self.patch), (h,), (self.positions, h),
                *(((h,),) * 4 * self.layers), (h,), (h,), (h, self.text_hidden), (h,))

    @property
    def num_params(self) -> int:
        linear = self.layers * sum(l.numel + l.out_features for l in self.linears)
        return linear + sum(math.prod(s) for s in self.dense_shapes())


@record
class ModelSpec:
    """A model's shape as the estimate needs it, from its config.json (the bundled catalog, a local
    file or the Hub) and its family's Architecture."""
    id: str
    source: str
    model_type: str
    config: dict = field(repr=False, compare=False)
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    layer_linears: tuple[Linear, ...]
    num_experts: int = 0
    experts_per_tok: int = 0
    final_logit_softcap: float | None = None
    attn_logit_softcap: float | None = None
    sliding_window: int | None = None   # attention window, when the model uses one
    # Llama 4's attention_chunk_size, when some layer is "chunked_attention": those layers attend
    # within aligned chunks of that many tokens (masking_utils.chunked_overlay)
    attention_chunk: int | None = None
    defaults_used: tuple[str, ...] = ()  # assumption lines for fields config.json left out
    # per decoder layer: "full_attention" or "sliding_attention" (config.layer_types, or the rule
    # transformers' configuration_<type>.py fills it with); empty for a spec built by hand
    layer_types: tuple[str, ...] = ()
    # widths of the RMSNorm weights inside one decoder layer (block norms, then q/k norms)
    layer_norms: tuple[int, ...] = ()
    # per decoder layer: whether it applies RoPE (SmolLM3 no_rope_layers); empty: every layer
    rope_layers: tuple[bool, ...] = ()
    # the leading dims of each head RoPE rotates (Phi-3's partial_rotary_factor: Phi-4-mini rotates
    # 96 of 128); 0: every dim (head_dim)
    rotary_dim: int = 0
    # assumption lines on how the config was read (the text decoder of a multimodal checkpoint)
    notes: tuple[str, ...] = ()
    # DeepSeek-V3: multi-head latent attention shapes, the dense layers below the MoE ones
    # (first_k_dense_replace), the routed experts' width (moe_intermediate_size; 0: intermediate),
    # the shared experts' MLP width (0: none) and the router's (n_group, topk_group)
    mla: "Mla | None" = None
    dense_layers: int = 0
    # per decoder layer, bottom to top, whether it is dense where dense and MoE layers interleave
    # (Llama 4's moe_layers); empty: the first dense_layers are (DeepSeek-V3)
    dense_flags: tuple[bool, ...] = ()
    expert_intermediate: int = 0
    shared_intermediate: int = 0
    router_groups: tuple[int, int] = (1, 1)
    # a multimodal checkpoint whose class AutoModelForCausalLM builds whole (Gemma 3:
    # Gemma3ForConditionalGeneration): its vision tower, and the outer config.json the text
    # decoder's `config` was read from (simulate builds that class from it)
    vision: "VisionTower | None" = None
    wrapper: dict | None = field(default=None, repr=False, compare=False)

    def build_config(self) -> dict:
        """The config.json transformers builds the model from: the outer multimodal config with
        this spec's text config in it, or the text config itself."""
        return {**self.wrapper, "text_config": dict(self.config)} if self.wrapper else dict(self.config)

    @property
    def arch(self) -> Architecture:
        return ARCHITECTURES[self.model_type]

    def setting(self, key: str):
        """A config field as transformers reads it: the config.json value, else the config class
        default (Architecture.defaults)."""
        value = self.config.get(key)
        return self.arch.defaults.get(key) if value is None else value

    @property
    def moe_layers(self) -> int:
        """Decoder layers with routed experts."""
        return self.layers - self.dense_layers if self.num_experts else 0

    @property
    def expert_width(self) -> int:
        """One routed expert's intermediate size."""
        return self.expert_intermediate or self.intermediate

    def is_dense(self, layer: int) -> bool:
        """Whether decoder layer `layer` has a dense MLP where the others have MoE blocks."""
        return self.dense_flags[layer] if self.dense_flags else layer < self.dense_layers

    def count(self, linear: Linear) -> int:
        """How many decoder layers hold this Linear."""
        return {"all": self.layers, "dense": self.dense_layers, "moe": self.moe_layers}[linear.where]

    @property
    def norm_widths(self) -> tuple[int, ...]:
        return self.layer_norms or (self.hidden,) * self.arch.norms_per_layer

    @property
    def lm_head(self) -> Linear:
        return Linear("lm_head", self.hidden, self.vocab, False)

    # --- parameter inventory (nanoGPT-style breakdown; a test checks it against transformers) -----
    def param_breakdown(self) -> dict[str, int]:
        h, n = self.hidden, self.layers
        linear = sum(self.count(l) * (l.numel + (l.out_features if l.bias else 0)) for l in self.layer_linears)
        parts = {
            "embed_tokens": self.vocab * h,
            "layers.linear": linear,
            "layers.norms": n * sum(self.norm_widths),
            "norm": h,
            "lm_head": 0 if self.tied else self.vocab * h,
        }
        if self.num_experts:
            shapes = self.moe_shapes()
            m = self.moe_layers
            parts["layers.router"] = m * sum(math.prod(s) for name, s in shapes if name.startswith("router."))
            parts["layers.experts"] = m * sum(math.prod(s) for name, s in shapes if name.startswith("experts."))
        if self.arch.sinks:
            parts["layers.sinks"] = n * self.heads
        if self.vision:
            parts["vision_tower"] = self.vision.num_params
        return parts

    def moe_shapes(self) -> tuple[tuple[str, tuple[int, ...]], ...]:
        """(name, shape) of one layer's router and expert parameters as transformers 5 builds them:
        MixtralTopKRouter.weight (E, h), MixtralExperts gate_up_proj (E, 2i, h) and down_proj
        (E, h, i) (models/mixtral/modeling_mixtral.py); GptOssTopKRouter weight (E, h) and bias (E,),
        GptOssExperts gate_up_proj (E, h, 2i), gate_up_proj_bias (E, 2i), down_proj (E, i, h),
        down_proj_bias (E, h) (models/gpt_oss/modeling_gpt_oss.py); Llama4Router weight (E, h),
        Llama4TextExperts gate_up_proj (E, h, 2i) and down_proj (E, i, h)
        (models/llama4/modeling_llama4.py)."""
        E, h, i = self.num_experts, self.hidden, self.expert_width
        if not E:
            return ()
        if self.arch.moe_style == "llama4":
            return (("router.weight", (E, h)), ("experts.gate_up_proj", (E, h, 2 * i)),
                    ("experts.down_proj", (E, i, h)))
        if self.arch.moe_style == "gpt_oss":
            return (("router.weight", (E, h)), ("router.bias", (E,)),
                    ("experts.gate_up_proj", (E, h, 2 * i)), ("experts.gate_up_proj_bias", (E, 2 * i)),
                    ("experts.down_proj", (E, i, h)), ("experts.down_proj_bias", (E, h)))
        return (("router.weight", (E, h)), ("experts.gate_up_proj", (E, 2 * i, h)),
                ("experts.down_proj", (E, h, i)))

    @property
    def num_params(self) -> int:
        return sum(self.param_breakdown().values())

    def to_dict(self) -> dict:
        return {
            "id": self.id, "source": self.source, "model_type": self.model_type,
            "hidden_size": self.hidden, "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers, "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads, "head_dim": self.head_dim,
            "vocab_size": self.vocab, "tie_word_embeddings": self.tied,
            "num_local_experts": self.num_experts, "num_experts_per_tok": self.experts_per_tok,
            "num_params": self.num_params,
        }


# --- building a spec from a config dict ------------------------------------------------------------

# Multimodal checkpoints whose language model is a known decoder, nested in text_config: the
# estimate models that text decoder as its causal LM class builds it from the text config. The
# text config's own model_type decides the family; the value here is what transformers uses when
# text_config names none:
# - models/gemma3/configuration_gemma3.py Gemma3Config.text_config: a Gemma3TextConfig;
# - models/mistral3/configuration_mistral3.py Mistral3Config.sub_configs_defaults: text_config is
#   built with AutoConfig, model_type "mistral" unless it names another (docs/architectures.md#mistral3).
# - models/llama4/configuration_llama4.py Llama4Config.sub_configs_defaults: a Llama4TextConfig,
#   which Llama4ForCausalLM builds (AutoModelForCausalLM maps llama4 and llama4_text to it).
TEXT_CONFIG_TYPES = {"gemma3": "gemma3_text", "mistral3": "mistral", "llama4": "llama4_text"}
# Of those, the ones whose outer model_type AutoModelForCausalLM maps to the multimodal class
# itself, vision tower included (transformers 5.23 models/auto/modeling_auto.py
# MODEL_FOR_CAUSAL_LM_MAPPING_NAMES: "gemma3" -> Gemma3ForConditionalGeneration, while "llama4"
# -> Llama4ForCausalLM builds the text decoder only). docs/architectures.md#gemma3_text
WHOLE_MULTIMODAL = ("gemma3",)
# What the estimate leaves out of such a checkpoint (the Gemma 3 note is the gemma3_text family's own)
TEXT_CONFIG_NOTES = {"gemma3": "multimodal Gemma 3 checkpoint (Gemma3ForConditionalGeneration, which "
                               "AutoModelForCausalLM builds for model_type gemma3): the text decoder (text_config, "
                               "model_type {text}) walked as in Gemma3ForCausalLM, plus the vision tower's static "
                               "memory",
                     "mistral3": "multimodal Mistral 3 checkpoint (Mistral3ForConditionalGeneration): the text "
                                 "decoder (text_config, model_type {text}) is modelled as its causal LM class builds "
                                 "it; the Pixtral vision tower and the multimodal projector are not counted",
                     # Llama4ForConditionalGeneration built from Llama-4-Scout's (= Maverick's) vision_config on meta:
                     # 871,932,416 parameters besides the text decoder
                     "llama4": "multimodal Llama 4 checkpoint (Llama4ForConditionalGeneration): the text decoder "
                               "(text_config, model_type {text}) is modelled as Llama4ForCausalLM builds it; the "
                               "vision tower and the multimodal projector (about 0.87B parameters at the vision_config "
                               "Scout and Maverick publish) are not counted"}


# A checkpoint published in MXFP4 (gpt-oss) trains dequantized: transformers' Mxfp4HfQuantizer is
# not trainable and points to Mxfp4Config(dequantize=True) (quantizers/quantizer_mxfp4.py
# is_trainable), which loads bf16 weights; a BitsAndBytesConfig for the MXFP4 checkpoint is refused
# (quantizers/auto.py merge_quantization_configs: "The model is quantized with Mxfp4Config but you
# are passing a BitsAndBytesConfig config"). docs/architectures.md#gpt_oss
MXFP4_NOTE = ("config.json names an MXFP4 checkpoint (quantization_config quant_method mxfp4): training loads it "
              "dequantized to bf16 (Mxfp4Config(dequantize=True)), so every weight is counted in the compute dtype; "
              "transformers refuses a BitsAndBytesConfig for it, so a 4-bit run means a bf16 copy loaded with "
              "bitsandbytes, which quantizes the nn.Linear layers only")

# Pre-quantized checkpoints (quantization_config.quant_method) the estimate plans: MXFP4 (loaded
# dequantized, MXFP4_NOTE) and bitsandbytes (a checkpoint saved after BitsAndBytesConfig
# quantization: QLoRA on it holds the same 4-bit or int8 layout --quant plans, made on load from
# 16-bit weights). Any other method (GPTQ, AWQ, FP8, HQQ, ...) stores its own packed layout and
# kernels, which the estimate does not know.
BNB_NOTE = ("config.json is a bitsandbytes-quantized checkpoint's (quantization_config quant_method bitsandbytes): "
            "the estimate plans the layout --quant names, quantized on load from 16-bit weights; give the --quant "
            "the checkpoint was saved with (load_in_4bit: nf4 or fp4, load_in_8bit: int8)")


def _quantized_checkpoint(quant, model_id: str) -> tuple[str, ...]:
    """The note for a pre-quantized checkpoint the estimate plans, or UnmodelledError for one it
    cannot."""
    if quant is None:
        return ()
    method = quant.get("quant_method") if isinstance(quant, dict) else None
    if method == "mxfp4":
        return (MXFP4_NOTE,)
    if method == "bitsandbytes":
        return (BNB_NOTE,)
    raise UnmodelledError(f"config for {model_id} is a pre-quantized checkpoint (quantization_config "
                          f"{('quant_method ' + repr(method)) if method is not None else repr(quant)}), whose packed "
                          "weights and kernels the estimate does not model",
                          hint="give the config of the 16-bit base model: vramplan plans bitsandbytes "
                               "quantization of its weights (QLoRA)")


# Where the multimodal config builds its text config with a fixed class, whatever text_config's
# own model_type says (transformers 5.23 Gemma3Config / Llama4Config sub_configs_defaults
# "text_config": Gemma3TextConfig / Llama4TextConfig); Mistral3Config builds it with AutoConfig
# from its model_type, "mistral" when absent (SubConfigSpec(config_class=AutoConfig, model_type="mistral")).
FIXED_TEXT_CLASS = ("gemma3", "llama4")


def _text_config(config: dict, model_id: str) -> dict:
    """The decoder's config of a multimodal config.json (TEXT_CONFIG_TYPES), as transformers builds
    it. Gemma3ForConditionalGeneration ties its lm_head by the outer config's
    tie_word_embeddings (Gemma3Config, default True), not text_config's: the spec reads that one."""
    outer, text = config["model_type"], config.get("text_config")
    if not isinstance(text, dict):
        raise ModelError(f"config for {model_id}: a {outer} config.json holds its decoder's fields in "
                         f"text_config, got {text!r}", hint="give text_config as an object (the decoder's config)")
    text = {"model_type": TEXT_CONFIG_TYPES[outer], **text}
    if outer in FIXED_TEXT_CLASS:
        text["model_type"] = TEXT_CONFIG_TYPES[outer]
    if outer in WHOLE_MULTIMODAL:
        text["tie_word_embeddings"] = bool(config.get("tie_word_embeddings", True))
    return text


# Upper bounds of config.json shape fields, far past any released model: Llama-3.1-405B has
# hidden_size 16,384, intermediate_size 53,248, 126 layers and 128 heads, Gemma 3 a vocabulary of
# 262,208, Kimi K2 384 experts, Llama 4 Scout a 10M-token context. A larger value is a typo; it
# would also make byte counts pass 2**64, which the allocator replay packs sizes under
# (cuda/_fast_replay.py keys), and a layer count of millions would run for minutes.
SHAPE_LIMITS = {"hidden_size": 1 << 17, "intermediate_size": 1 << 20, "moe_intermediate_size": 1 << 20,
                "num_hidden_layers": 1 << 10, "num_attention_heads": 1 << 12, "num_key_value_heads": 1 << 12,
                "head_dim": 1 << 13, "vocab_size": 1 << 22, "max_position_embeddings": 1 << 27}
SHAPE_LIMIT_OTHER = 1 << 16    # expert counts, experts per token


def spec_from_config(config, model_id: str, source: str) -> ModelSpec:
    spec = _spec_from_config(config, model_id, source)
    if isinstance(config, dict) and config.get("model_type") in WHOLE_MULTIMODAL and isinstance(
            config.get("text_config"), dict):
        wrapper = {k: v for k, v in config.items() if k != "text_config"}
        spec = dataclasses.replace(spec, vision=_vision_tower(wrapper, spec.hidden, model_id), wrapper=wrapper)
    return spec


def _vision_tower(wrapper: dict, text_hidden: int, model_id: str) -> VisionTower:
    """Gemma3Config.vision_config: a SiglipVisionConfig (sub_configs_defaults: AutoConfig,
    model_type siglip_vision_model), its defaults filling what the checkpoint omits."""
    vc = wrapper.get("vision_config") or {}
    if not isinstance(vc, dict) or vc.get("model_type", "siglip_vision_model") != "siglip_vision_model":
        raise UnmodelledError(f"config for {model_id}: vision_config must be a SigLIP vision config "
                         f"(model_type siglip_vision_model)", hint="`vramplan simulate` builds other vision towers")
    cfg = {**SIGLIP_VISION_DEFAULTS, **{k: v for k, v in vc.items() if v is not None}}
    if cfg["vision_use_head"]:
        # SiglipVisionTransformer builds a SiglipMultiheadAttentionPoolingHead with it, which
        # Gemma3Model never calls; the published Gemma 3 configs say false
        raise UnmodelledError(f"config for {model_id}: vision_use_head true (a SigLIP pooling head) is not modelled",
                         hint="set vision_use_head to false as the Gemma 3 checkpoints do, or use `vramplan simulate`")
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_channels", "patch_size", "image_size"):
        value = cfg[key]
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ModelError(f"config for {model_id}: vision_config.{key} must be a positive integer, got {value!r}",
                             hint=f"fix vision_config.{key} in config.json")
        limit = VISION_LIMITS[key]
        if value > limit:
            raise ModelError(f"config for {model_id}: vision_config.{key} {value:,} is beyond any model "
                             f"(at most {limit:,})", hint=f"fix vision_config.{key} in config.json")
    if cfg["patch_size"] > cfg["image_size"]:
        # SiglipVisionEmbeddings: a Conv2d of kernel and stride patch_size over an image_size image
        # makes (image_size // patch_size) ** 2 patches: none, and no position embedding rows
        raise ModelError(f"config for {model_id}: vision_config.patch_size {cfg['patch_size']} must be at most "
                         f"image_size {cfg['image_size']}", hint="fix vision_config.patch_size in config.json")
    return VisionTower(layers=cfg["num_hidden_layers"], hidden=cfg["hidden_size"],
                       intermediate=cfg["intermediate_size"], channels=cfg["num_channels"], patch=cfg["patch_size"],
                       image=cfg["image_size"], text_hidden=text_hidden)


# transformers 5.23 models/siglip/configuration_siglip.py SiglipVisionConfig
SIGLIP_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_channels=3,
                              image_size=224, patch_size=16, vision_use_head=True)
# Upper bounds of the vision tower's fields, as SHAPE_LIMITS bounds the decoder's (Gemma 3's SigLIP:
# 27 layers, width 1152, 4304 wide MLP, 896 px images in 14 px patches, 3 channels). Past them
# the tower's tensor count runs for minutes (one entry per layer, estimate/_inventory.py
# vision_tensors) and the patch Conv2d's bytes (hidden * channels * patch ** 2) pass 2**64.
VISION_LIMITS = {"hidden_size": SHAPE_LIMITS["hidden_size"], "intermediate_size": SHAPE_LIMITS["intermediate_size"],
                 "num_hidden_layers": SHAPE_LIMITS["num_hidden_layers"], "num_channels": 1 << 10,
                 "image_size": 1 << 14, "patch_size": 1 << 14}


def _spec_from_config(config, model_id: str, source: str) -> ModelSpec:
    if not isinstance(config, dict):
        raise ModelError(f"config for {model_id} is not a JSON object",
                         hint="a Hugging Face config.json is an object like {\"model_type\": \"llama\", ...}")
    notes = ()
    if not isinstance(config.get("model_type", ""), str):
        raise ModelError(f"config for {model_id}: model_type must be a string, got {config['model_type']!r}",
                         hint=f"e.g. \"model_type\": \"llama\"; one of {supported()}")
    quant = config.get("quantization_config")     # a multimodal checkpoint's is the outer config's
    if config.get("model_type") in TEXT_CONFIG_TYPES:
        outer = config["model_type"]
        config = _text_config(config, model_id)
        if outer in TEXT_CONFIG_NOTES:
            notes = (TEXT_CONFIG_NOTES[outer].format(text=config["model_type"]),)
    notes += _quantized_checkpoint(quant if quant is not None else config.get("quantization_config"), model_id)
    model_type = config.get("model_type")
    if model_type is None:
        raise ModelError(f"config for {model_id} has no model_type",
                         hint=f"add \"model_type\": one of {supported()}")
    if not isinstance(model_type, str):
        raise ModelError(f"config for {model_id}: text_config.model_type must be a string, got {model_type!r}",
                         hint=f"one of {supported()}")
    arch = ARCHITECTURES.get(model_type)
    if arch is None:
        recurrent = recurrent_layer_kinds(config)
        if recurrent:   # hybrid models: docs/architectures.md#hybrid-linear-attention
            raise UnmodelledError(f"architecture {model_type!r} ({model_id}) is not modelled by the estimate: its "
                             f"{', '.join(recurrent)} layers run chunked recurrent kernels (flash-linear-attention, "
                             "causal-conv1d, mamba-ssm) whose workspaces the analytic model does not know",
                             hint="`vramplan simulate` traces it (those layers through transformers' torch code); "
                                  f"the estimate covers: {supported()}")
        raise ModelError(f"architecture {model_type!r} ({model_id}) is not known to the analytic model",
                         hint=f"supported model_type values: {supported()}; `vramplan simulate` traces any "
                              f"architecture transformers can build")
    config = read_aliases(config, arch, model_id)
    check_field_types(config, arch, model_id)
    check_activation(config, arch, model_id)
    refuse_nulls(config, arch, model_id)
    # an explicit null is kept where transformers keeps it (no window: MinistralConfig / Olmo3Config
    # default to 4096, Mistral-Small-3.1's text_config says null), else the class default applies
    cfg = with_nulls(config, {**arch.defaults, **{k: v for k, v in config.items() if v is not None}})

    def need_int(key: str) -> int:
        value = cfg.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ModelError(f"config for {model_id}: {key} must be a positive integer, got {value!r}",
                             hint=f"fix {key} in config.json")
        limit = SHAPE_LIMITS.get(key, SHAPE_LIMIT_OTHER)
        if value > limit:
            raise ModelError(f"config for {model_id}: {key} {value:,} is beyond any model (at most {limit:,})",
                             hint=f"fix {key} in config.json")
        return value

    hidden, heads = need_int("hidden_size"), need_int("num_attention_heads")
    cfg.setdefault("num_key_value_heads", heads)
    window_size = cfg.get("sliding_window")
    if window_size is not None and (isinstance(window_size, bool) or not isinstance(window_size, int)
                                    or window_size <= 0):
        raise ModelError(f"config for {model_id}: sliding_window must be a positive integer or null, got "
                         f"{window_size!r}", hint="fix sliding_window in config.json (null: no window)")
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        cap = cfg.get(key)
        # Gemma2Config / Gemma3TextConfig type them `float | None`; the model divides by a cap that
        # is not None (modeling_gemma3.py Gemma3ForCausalLM.forward `logits / final_logit_softcapping`,
        # eager_attention_forward `attn_weights / softcap`): 0 is no "off", it makes NaNs
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, (int, float)) or not cap > 0):
            raise ModelError(f"config for {model_id}: {key} must be a positive number or null, got {cap!r}",
                             hint=f"fix {key} in config.json (null: no softcapping)")
    if cfg.get("num_key_value_heads") is None:
        cfg["num_key_value_heads"] = heads
    if cfg.get("head_dim") is None:
        if hidden % heads:
            raise ModelError(f"config for {model_id}: hidden_size {hidden} is not divisible by "
                             f"num_attention_heads {heads}", hint="set head_dim in config.json")
        cfg["head_dim"] = hidden // heads
    kv_heads, head_dim = need_int("num_key_value_heads"), need_int("head_dim")
    if heads % kv_heads:
        raise ModelError(f"config for {model_id}: num_attention_heads {heads} is not a multiple of "
                         f"num_key_value_heads {kv_heads}", hint="check the GQA fields of config.json")
    inter, layers, vocab = need_int("intermediate_size"), need_int("num_hidden_layers"), need_int("vocab_size")
    experts = need_int(arch.experts_key) if arch.moe else 0
    per_tok = need_int("num_experts_per_tok") if arch.moe else 0
    if per_tok > experts:
        raise ModelError(f"config for {model_id}: num_experts_per_tok {per_tok} > {arch.experts_key} {experts}",
                         hint="check the MoE fields of config.json")
    if arch.moe and cfg.get("output_router_logits"):
        # MixtralForCausalLM / Qwen3MoeForCausalLM / GraniteMoeForCausalLM add load_balancing_loss_func
        # over every layer's router logits, kept through the forward: not in the layer walk
        raise UnmodelledError(f"config for {model_id}: output_router_logits (the router load-balancing loss) is "
                         "not modelled", hint="set output_router_logits to false, or use `vramplan simulate`")
    if arch.moe and arch.expert_width_key != "intermediate_size":
        # Qwen3-MoE: an expert is moe_intermediate_size wide; intermediate_size only sizes the dense
        # Qwen3MoeMLP of the layers Qwen3MoeDecoderLayer leaves dense (layer_idx in mlp_only_layers,
        # or (layer_idx + 1) % decoder_sparse_step != 0), which the layer walk does not mix in
        inter = need_int(arch.expert_width_key)
        dense = cfg.get("mlp_only_layers") or []
        step = cfg.get("decoder_sparse_step", 1)
        if dense or step != 1:
            raise UnmodelledError(f"config for {model_id}: dense MLP layers among the MoE layers (mlp_only_layers "
                             f"{dense}, decoder_sparse_step {step}) are not modelled",
                             hint="`vramplan simulate` traces this model")

    if config.get("max_position_embeddings") is not None:
        need_int("max_position_embeddings")     # the context the seq warning compares against
    types, window = _layer_types(arch, cfg, layers, model_id)

    def flag(rule) -> bool:
        return bool(cfg.get(rule, False)) if isinstance(rule, str) else rule

    q, kv, o_bias = heads * head_dim, kv_heads * head_dim, flag(arch.o_bias)
    qkv_bias, mlp_bias = flag(arch.qkv_bias), flag(arch.mlp_bias)
    if arch.mla:
        return _mla_spec(config, cfg, arch, model_id, source, need_int, types, window, experts, per_tok, notes)
    if arch.fused_qkv:
        linears = [Linear("self_attn.qkv_proj", hidden, q + 2 * kv, qkv_bias)]
    else:
        linears = [Linear("self_attn.q_proj", hidden, q, qkv_bias),
                   Linear("self_attn.k_proj", hidden, kv, qkv_bias),
                   Linear("self_attn.v_proj", hidden, kv, qkv_bias)]
    linears.append(Linear("self_attn.o_proj", q, hidden, o_bias))
    norms = [hidden] * arch.norms_per_layer
    if arch.qk_norm == "head":        # Qwen3RMSNorm(head_dim) / Gemma3RMSNorm(head_dim)
        norms += [head_dim, head_dim]
    elif arch.qk_norm == "projection":  # Olmo2RMSNorm(H * head_dim), Olmo2RMSNorm(kv * head_dim)
        norms += [q, kv]
    dense_flags, chunk = (), None
    if arch.moe_style == "llama4":
        chunk = _attention_chunk(config, cfg, model_id)
        ff, dense_flags = _llama4_feed_forward(cfg, hidden, inter, layers, model_id, need_int)
        linears += ff
        if all(dense_flags):   # no layer in moe_layers: a dense model
            experts, per_tok, dense_flags = 0, 0, ()
    elif not arch.moe:
        if arch.fused_gate_up:
            linears.append(Linear("mlp.gate_up_proj", hidden, 2 * inter, mlp_bias))
        else:
            linears += [Linear("mlp.gate_proj", hidden, inter, mlp_bias),
                        Linear("mlp.up_proj", hidden, inter, mlp_bias)]
        linears.append(Linear("mlp.down_proj", inter, hidden, mlp_bias))

    require_core_fields(config, model_id, arch)  # after the checks above, which name a bad value first
    return ModelSpec(
        id=model_id, source=source, model_type=model_type, config=dict(config),
        hidden=hidden, intermediate=inter, layers=layers, heads=heads, kv_heads=kv_heads,
        head_dim=head_dim, vocab=vocab, tied=bool(cfg.get("tie_word_embeddings")),
        layer_linears=tuple(linears), num_experts=experts, experts_per_tok=per_tok,
        final_logit_softcap=cfg.get("final_logit_softcapping"),
        attn_logit_softcap=cfg.get("attn_logit_softcapping"),
        sliding_window=window if "sliding_attention" in types else None,
        attention_chunk=chunk if "chunked_attention" in types else None,
        layer_types=types, layer_norms=tuple(norms), rope_layers=_rope_layers(arch, cfg, layers, model_id),
        rotary_dim=_rotary_dim(arch, cfg, head_dim, model_id),
        defaults_used=defaults_applied(config, arch, cfg), notes=notes,
        dense_layers=sum(dense_flags), dense_flags=dense_flags,
    )


def _attention_chunk(config: dict, cfg: dict, model_id: str) -> int:
    """Llama4TextModel.forward builds create_chunked_causal_mask for every forward, whatever its
    layers use (masking_utils.py: `chunk_size = getattr(config, "attention_chunk_size", None)`):
    an explicit null fails there in transformers 5.23, so it is refused here."""
    value = config.get("attention_chunk_size", cfg.get("attention_chunk_size"))
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ModelError(f"config for {model_id}: attention_chunk_size must be a positive integer, got {value!r} "
                         "(Llama4TextModel builds a chunked attention mask on every forward)",
                         hint="set attention_chunk_size in config.json (8192 in the published Llama 4 configs)")
    return value


def _llama4_feed_forward(cfg: dict, hidden: int, inter: int, layers: int, model_id: str,
                         need_int) -> tuple[list, tuple[bool, ...]]:
    """Llama4TextDecoderLayer (models/llama4/modeling_llama4.py): layer_idx in config.moe_layers
    gets a Llama4TextMoe, whose shared_expert is a Llama4TextMLP(intermediate_size); the others a
    Llama4TextMLP(intermediate_size_mlp); gate/up/down without bias. Llama4TextConfig.__post_init__:
    moe_layers, or range(interleave_moe_layer_step - 1, layers, interleave_moe_layer_step).
    Returns the MLP linears and, per layer, whether it is dense."""
    moe = cfg.get("moe_layers")
    if moe is None:
        step = need_int("interleave_moe_layer_step")
        moe = range(step - 1, layers, step)
    elif not isinstance(moe, list) or any(isinstance(i, bool) or not isinstance(i, int) for i in moe):
        raise ModelError(f"config for {model_id}: moe_layers must list layer indices",
                         hint="fix moe_layers in config.json, or drop it to use interleave_moe_layer_step")
    moe = set(moe)
    dense = tuple(i not in moe for i in range(layers))
    linears = []
    if not all(dense):
        linears += _mlp_linears("feed_forward.shared_expert.", hidden, inter, "moe")
    if any(dense):
        linears += _mlp_linears("feed_forward.", hidden, need_int("intermediate_size_mlp"),
                                "all" if all(dense) else "dense")
    return linears, dense


def _mlp_linears(prefix: str, hidden: int, width: int, where: str) -> list:
    """gate_proj / up_proj / down_proj without bias (Llama4TextMLP, DeepseekV3MLP)."""
    return [Linear(prefix + "gate_proj", hidden, width, False, where),
            Linear(prefix + "up_proj", hidden, width, False, where),
            Linear(prefix + "down_proj", width, hidden, False, where)]


def _mla_spec(config: dict, cfg: dict, arch: Architecture, model_id: str, source: str, need_int, types, window,
              experts: int, per_tok: int, notes: tuple) -> ModelSpec:
    """DeepSeek-V3 (models/deepseek_v3/modeling_deepseek_v3.py, docs/architectures.md#deepseek_v3).
    DeepseekV3Attention: q_proj (no bias), or q_a_proj (bias=attention_bias) -> q_a_layernorm ->
    q_b_proj (no bias); kv_a_proj_with_mqa (bias=attention_bias), kv_a_layernorm, kv_b_proj (no
    bias); o_proj (bias=attention_bias). DeepseekV3DecoderLayer: DeepseekV3MLP (gate/up/down, no
    bias) below first_k_dense_replace, DeepseekV3MoE above it (router, routed experts, and
    shared_experts = DeepseekV3MLP(moe_intermediate_size * n_shared_experts)).
    DeepseekV3Config.__post_init__ sets head_dim = qk_rope_head_dim: the rotary embedding's width."""
    hidden, heads, layers = need_int("hidden_size"), need_int("num_attention_heads"), need_int("num_hidden_layers")
    if cfg["num_key_value_heads"] != heads:
        # kv_b_proj expands the latent to every query head; sdpa/eager then repeat keys by
        # num_attention_heads // num_key_value_heads, which only fits when that is 1
        raise ModelError(f"config for {model_id}: num_key_value_heads {cfg['num_key_value_heads']} differs from "
                         f"num_attention_heads {heads}; DeepseekV3Attention expands keys and values to every head",
                         hint="set num_key_value_heads to num_attention_heads in config.json")
    # an explicit null means no q compression (Moonlight, DeepSeek-V2-Lite), whatever the class default
    q_rank = None if "q_lora_rank" in config and config["q_lora_rank"] is None else cfg.get("q_lora_rank")
    mla = Mla(q_lora_rank=need_int("q_lora_rank") if q_rank is not None else None,
              kv_lora_rank=need_int("kv_lora_rank"), qk_nope=need_int("qk_nope_head_dim"),
              qk_rope=need_int("qk_rope_head_dim"), v_head_dim=need_int("v_head_dim"))
    inter, vocab = need_int("intermediate_size"), need_int("vocab_size")
    moe_inter = need_int("moe_intermediate_size")
    for key in ("n_shared_experts", "first_k_dense_replace"):   # counts: 0 is none
        value = cfg.get(key) or 0
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ModelError(f"config for {model_id}: {key} must be a whole number of at least 0, got {value!r}",
                             hint=f"fix {key} in config.json")
    shared = cfg.get("n_shared_experts") or 0
    dense = min(cfg.get("first_k_dense_replace") or 0, layers)
    groups = (need_int("n_group"), need_int("topk_group"))
    if experts % groups[0] or groups[1] > groups[0]:
        raise ModelError(f"config for {model_id}: n_routed_experts {experts} must split into n_group {groups[0]} "
                         f"groups, topk_group {groups[1]} of them", hint="check the MoE fields of config.json")
    bias = bool(cfg.get("attention_bias", False))
    H, qk = heads, mla.qk_head_dim
    linears = []
    if mla.q_lora_rank is None:
        linears.append(Linear("self_attn.q_proj", hidden, H * qk, False))
    else:
        linears += [Linear("self_attn.q_a_proj", hidden, mla.q_lora_rank, bias),
                    Linear("self_attn.q_b_proj", mla.q_lora_rank, H * qk, False)]
    linears += [Linear("self_attn.kv_a_proj_with_mqa", hidden, mla.kv_lora_rank + mla.qk_rope, bias),
                Linear("self_attn.kv_b_proj", mla.kv_lora_rank, H * (mla.qk_nope + mla.v_head_dim), False),
                Linear("self_attn.o_proj", H * mla.v_head_dim, hidden, bias)]
    if dense == layers:   # no MoE layer at all: every layer's MLP is the dense one
        dense, experts, per_tok, shared = 0, 0, 0, 0
    for width, prefix, where in ((inter, "mlp.", "dense" if experts else "all"),
                                 (moe_inter * shared, "mlp.shared_experts.", "moe")):
        if width and (dense if where == "dense" else layers):
            linears += _mlp_linears(prefix, hidden, width, where)
    norms = [hidden, hidden] + ([mla.q_lora_rank] if mla.q_lora_rank else []) + [mla.kv_lora_rank]
    require_core_fields(config, model_id, arch)
    return ModelSpec(
        id=model_id, source=source, model_type=arch.model_type, config=dict(config),
        hidden=hidden, intermediate=inter, layers=layers, heads=heads, kv_heads=heads, head_dim=mla.qk_rope,
        vocab=vocab, tied=bool(cfg.get("tie_word_embeddings")), layer_linears=tuple(linears),
        num_experts=experts, experts_per_tok=per_tok,
        layer_types=types, layer_norms=tuple(norms), defaults_used=defaults_applied(config, arch, cfg), notes=notes,
        mla=mla, dense_layers=dense, expert_intermediate=moe_inter, shared_intermediate=moe_inter * shared,
        router_groups=groups)


def _rope_layers(arch: Architecture, cfg: dict, layers: int, model_id: str) -> tuple[bool, ...]:
    """SmolLM3Config.__post_init__ (configuration_smollm3.py): no_rope_layers[i] is 1 where layer i
    uses RoPE (SmolLM3Attention.use_rope); absent, every no_rope_layer_interval-th layer (default 4)
    goes without. docs/architectures.md#smollm3"""
    if not arch.nope_layers:
        return ()
    flags = cfg.get("no_rope_layers")
    # Llama4TextConfig.__post_init__ takes an empty list as absent, and a longer list is read by
    # layer index (Llama4TextAttention: `config.no_rope_layers[layer_idx]`)
    chunked = arch.layer_types_rule == "chunked"
    if flags is None or (chunked and flags == []):
        interval = _nope_interval(cfg, model_id)
        return tuple(bool((i + 1) % interval) for i in range(layers))
    if not isinstance(flags, list) or (len(flags) < layers if chunked else len(flags) != layers):
        raise ModelError(f"config for {model_id}: no_rope_layers must list {layers} entries of 0 / 1",
                         hint="fix no_rope_layers in config.json")
    return tuple(bool(f) for f in flags[:layers])


def _nope_interval(cfg: dict, model_id: str) -> int:
    """no_rope_layer_interval, read where no_rope_layers is absent: SmolLM3Config /
    Llama4TextConfig type it `int` and __post_init__ computes `(layer_idx + 1) % no_rope_layer_interval`
    (configuration_smollm3.py), so it must be a positive integer (0 divides by zero there)."""
    value = cfg.get("no_rope_layer_interval", 4)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ModelError(f"config for {model_id}: no_rope_layer_interval must be a positive integer, got {value!r}",
                         hint="fix no_rope_layer_interval in config.json (every no_rope_layer_interval-th layer "
                              "goes without RoPE; 4 in the published configs)")
    return value


def _rotary_dim(arch: Architecture, cfg: dict, head_dim: int, model_id: str) -> int:
    """The dims of each head RoPE rotates where the family reads partial_rotary_factor (Phi-3:
    Phi3Config keeps `rope_parameters["partial_rotary_factor"]`, else the top-level field, else
    1.0; Phi3RotaryEmbedding.compute_default_rope_parameters makes `int(head_dim * factor)` wide
    tables and apply_rotary_pos_emb rotates that many leading dims, passing the rest through);
    0 where every dim is rotated. The other families' rotary embeddings ignore the field
    (models/llama/modeling_llama.py LlamaRotaryEmbedding). docs/architectures.md#phi3-at-phi-4-sizes"""
    if not arch.rope_pass_cat:
        return 0
    params = cfg.get("rope_parameters")
    factor = params.get("partial_rotary_factor") if isinstance(params, dict) else None
    if factor is None:
        factor = cfg.get("partial_rotary_factor", 1.0)
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor <= 1:
        raise ModelError(f"config for {model_id}: partial_rotary_factor must be a number in (0, 1], got {factor!r}",
                         hint="fix partial_rotary_factor in config.json")
    dim = int(head_dim * factor)
    if dim < 2 or dim % 2:
        # rotate_half splits the rotated dims in two equal halves, and the tables are
        # cat((freqs, freqs)) of arange(0, dim, 2): an odd width cannot be rotated
        raise ModelError(f"config for {model_id}: partial_rotary_factor {factor} rotates {dim} of head_dim "
                         f"{head_dim} dims, which must be an even number of at least 2",
                         hint="fix partial_rotary_factor in config.json")
    return 0 if dim == head_dim else dim


LAYER_TYPES = ("full_attention", "sliding_attention")
# Llama4TextModel's causal_mask_mapping has these two keys only
CHUNKED_LAYER_TYPES = ("full_attention", "chunked_attention")


def _layer_types(arch: Architecture, cfg: dict, layers: int, model_id: str) -> tuple[tuple[str, ...], int | None]:
    """(attention type of every decoder layer, sliding window), as the configuration classes of
    transformers 5.23 derive them (docs/architectures.md#layer-types):
    - an explicit `layer_types` list is used as is;
    - "window_from" (Qwen2Config / Qwen3Config __post_init__): sliding_window only with
      use_sliding_window, and then layers from max_window_layers up are sliding;
    - "pattern" (Gemma3TextConfig): every sliding_window_pattern-th layer (default 6) is global;
      "alternate" (Gemma2Config): odd layers global;
    - "all" (Mistral / Mixtral / Phi-3 / Ministral: one sliding_window for every layer when set);
      "all_if_used" (Qwen3MoeConfig.__post_init__: the same, only with use_sliding_window);
    - "olmo3" (Olmo3Config.__post_init__): `(i + 1) % 4 != 0` slides: three sliding layers per
      full one, whatever sliding_window says (docs/architectures.md#olmo3);
    - "chunked" (Llama4TextConfig.__post_init__): "chunked_attention" where no_rope_layers says
      RoPE, "full_attention" elsewhere (docs/architectures.md#llama4_text)."""
    window = cfg.get("sliding_window")
    if arch.layer_types_rule in ("window_from", "nope_window", "all_if_used") and not cfg.get("use_sliding_window"):
        window = None
    window = window if isinstance(window, int) and not isinstance(window, bool) and window > 0 else None
    explicit = cfg.get("layer_types")
    rule = arch.layer_types_rule
    names = CHUNKED_LAYER_TYPES if rule == "chunked" else LAYER_TYPES
    if explicit is not None:
        if (not isinstance(explicit, list) or len(explicit) != layers
                or any(t not in names for t in explicit)):
            raise UnmodelledError(f"config for {model_id}: layer_types must list {layers} entries of "
                             f"{' / '.join(names)}",
                             hint="fix layer_types in config.json, or `vramplan simulate` for other layer kinds")
        types = tuple(explicit)
    elif rule == "chunked":
        types = tuple("chunked_attention" if rope else "full_attention"
                      for rope in _rope_layers(arch, cfg, layers, model_id))
    elif rule == "window_from":
        start = cfg.get("max_window_layers", 0)
        types = tuple("sliding_attention" if window is not None and i >= start else "full_attention"
                      for i in range(layers))
    elif rule in ("pattern", "alternate", "olmo3"):
        pattern = {"pattern": cfg.get("sliding_window_pattern", 6), "alternate": 2, "olmo3": 4}[rule]
        # Gemma3TextConfig.__post_init__: `bool((i + 1) % self._sliding_window_pattern)`, the
        # pattern read from kwargs untyped; 0 divides by zero there, a non-integer is no period
        if isinstance(pattern, bool) or not isinstance(pattern, int) or pattern <= 0:
            raise ModelError(f"config for {model_id}: sliding_window_pattern must be a positive integer, got "
                             f"{pattern!r}", hint="fix sliding_window_pattern in config.json (every "
                                                  "sliding_window_pattern-th layer is global; 6 in Gemma 3)")
        types = tuple("sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers))
    elif rule == "nope_window":
        ropes = _rope_layers(arch, cfg, layers, model_id)   # SmolLM3Config.__post_init__: windows on NoPE layers
        use = cfg.get("use_sliding_window") and window is not None
        types = tuple("sliding_attention" if use and not ropes[i] else "full_attention" for i in range(layers))
    elif rule in ("all", "all_if_used") and window is not None:
        types = ("sliding_attention",) * layers
    else:
        types = ("full_attention",) * layers
    return types, window


# --- the bundled catalog ---------------------------------------------------------------------------

@record
class CatalogEntry:
    """One bundled model: its id, aliases, the source of its config.json, and the config itself."""
    id: str
    aliases: tuple[str, ...]
    source: str
    config: dict = field(repr=False)
    path: Path = field(repr=False)


@lru_cache(maxsize=1)
def catalog() -> dict[str, CatalogEntry]:
    """Hub id -> entry, read from vramplan/catalog/models/<org>/<name>.json."""
    entries = {}
    for path in sorted(CATALOG_DIR.glob("*/*.json")):
        data = json.loads(path.read_text())
        entries[data["id"]] = CatalogEntry(data["id"], tuple(data.get("aliases", ())),
                                           data["source"], data["config"], path)
    return entries


@lru_cache(maxsize=1)
def _alias_index() -> dict[str, str]:
    index = {}
    for entry in catalog().values():
        for name in (entry.id, *entry.aliases):
            for key in _keys(name):
                index.setdefault(key, entry.id)
    return index


def _keys(name: str) -> tuple[str, ...]:
    """Forgiving forms of a name: case-insensitive, with or without the org and a '-hf' suffix."""
    low = name.lower().strip().rstrip("/")
    base = low[:-3] if low.endswith("-hf") else low
    keys = [low, base]
    if "/" in base:
        keys.append(base.split("/", 1)[1])
    return tuple(dict.fromkeys(keys))


def lookup(name: str) -> CatalogEntry | None:
    for key in _keys(name):
        model_id = _alias_index().get(key)
        if model_id:
            return catalog()[model_id]
    return None


# --- resolution -------------------------------------------------------------------------------------

def resolve(name: str) -> ModelSpec:
    """Resolve a model name to its shapes. Raises ModelError with close matches when unknown."""
    if not isinstance(name, str) or not name.strip():
        raise ModelError("no model given", hint="e.g. vramplan estimate meta-llama/Llama-2-7b-hf")
    return _resolve(name.strip())


@lru_cache(maxsize=256)
def _resolve(name: str) -> ModelSpec:
    config, model_id, source = locate(name)
    return spec_from_config(config, model_id, source)


def resolve_config(name: str) -> tuple[dict, str, str]:
    """(config dict, model id, where it came from) without the analytic model's checks: what
    `vramplan simulate` builds with transformers when the registry does not know the type."""
    if not isinstance(name, str) or not name.strip():
        raise ModelError("no model given", hint="e.g. vramplan simulate meta-llama/Llama-2-7b-hf")
    return locate(name.strip())


def locate(name: str) -> tuple[dict, str, str]:
    """A local path, the bundled catalog, then the Hugging Face cache and Hub (core/_hub.py)."""
    path = Path(os.path.expanduser(name))
    try:
        exists = path.exists()
    except OSError:          # a name no file system takes (ENAMETOOLONG): not a local path
        exists = False
    if exists:
        return _from_path(path)
    entry = lookup(name)
    if entry is not None:
        return entry.config, entry.id, f"bundled catalog ({entry.source})"
    if _looks_like_path(name):
        raise ModelError(f"no such file or directory: {name}",
                         hint="give a directory holding config.json, or the config.json file itself")
    import difflib     # the error path only

    close = difflib.get_close_matches(name.lower(), list(_alias_index()), n=3, cutoff=0.5)
    suggestions = list(dict.fromkeys(_alias_index()[c] for c in close))
    hint = f"did you mean {', '.join(suggestions)}?" if suggestions else "run `vramplan models` for the catalog"
    if name.count("/") == 1:   # an org/name hub id
        from vramplan.core import _hub as hub
        try:
            found = hub.read_config(name)
        except hub.HubOfflineError as exc:
            if suggestions:    # most likely a typo of a bundled id
                exc.hint = f"{hint} {exc.hint}"
            raise
        if found is not None:
            return found[0], name, found[1]
    raise ModelError(f"unknown model {name!r}: not in the bundled catalog, not a local path, "
                     f"not in the Hugging Face cache", hint=hint + " or pass a directory with config.json")


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.endswith(".json") or name.count("/") > 1


def _from_path(path: Path) -> tuple[dict, str, str]:
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise ModelError(f"{path} has no config.json", hint="point at a Hugging Face model directory")
    try:
        config = json.loads(file.read_text())
    except RecursionError:
        raise ModelError(f"cannot read {file}: its JSON nests too deeply", hint="is it a valid config.json?") from None
    except (OSError, ValueError) as exc:     # ValueError: JSONDecodeError, UnicodeDecodeError, a 4,300-digit int
        raise ModelError(f"cannot read {file}: {exc}", hint="is it a valid config.json?") from None
    model_id = config.get("_name_or_path") if isinstance(config, dict) else None
    return config, model_id or str(path), f"local file {file}"
