"""config.json fields read as transformers 5 reads them: attribute_map aliases, explicit nulls,
multimodal wrappers and pre-quantized checkpoints (core/_config_fields.py, core/_models.py);
malformed values give one-line errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from vramplan.core._errors import ModelError, UnmodelledError
from vramplan.core._models import spec_from_config

CONFIGS = Path(__file__).parent / "configs"


def config(name: str, **changes) -> dict:
    out = json.loads((CONFIGS / f"{name}.json").read_text())
    for key, value in changes.items():
        if value is _DROP:
            out.pop(key, None)
        else:
            out[key] = value
    return out


_DROP = object()


def spec(cfg: dict):
    return spec_from_config(cfg, "test", "test")


@pytest.mark.parametrize("name, field, alias", [
    ("qwen3moe-experts", "num_experts", "num_local_experts"),     # Qwen3MoeConfig.attribute_map
    ("mixtral-moe", "num_local_experts", "num_experts"),          # MixtralConfig.attribute_map
    ("gptoss-sinks", "num_local_experts", "num_experts"),         # GptOssConfig.attribute_map
    ("deepseek-v3-moonlight", "n_routed_experts", "num_local_experts"),  # DeepseekV3Config.attribute_map
])
def test_an_expert_count_under_its_alias_is_read(name, field, alias):
    base = config(name)
    count = base[field]
    renamed = config(name, **{field: _DROP, alias: count})
    assert spec(renamed).num_experts == spec(base).num_experts == count
    assert spec(renamed).num_params == spec(base).num_params
    with pytest.raises(ModelError) as err:
        spec(config(name, **{alias: count * 2}))
    message = err.value.message
    assert message.startswith("config for test gives both ")
    assert message.endswith(", which transformers reads as one field")
    assert f"{alias} ({count * 2})" in message and f"{field} ({count})" in message


def test_a_null_softcap_is_no_softcap_not_the_class_default():
    # Gemma2Config final_logit_softcapping: float | None = 30.0; None skips the tanh
    base = spec(config("gemma2-softcap"))
    assert base.final_logit_softcap is not None
    assert spec(config("gemma2-softcap", final_logit_softcapping=None)).final_logit_softcap is None
    assert spec(config("gemma2-softcap", attn_logit_softcapping=None)).attn_logit_softcap is None


@pytest.mark.parametrize("name", ["qwen2-tied-bias", "qwen3-qknorm", "llama-gqa"])
def test_a_null_kv_head_count_is_the_head_count(name):
    # Qwen2Config defaults num_key_value_heads to 32, but __post_init__ sets a None to the heads
    cfg = config(name, num_key_value_heads=None)
    assert spec(cfg).kv_heads == cfg["num_attention_heads"]


@pytest.mark.parametrize("field", ["hidden_size", "intermediate_size", "vocab_size"])
def test_a_null_core_field_is_refused_as_transformers_refuses_it(field):
    with pytest.raises(ModelError) as err:
        spec(config("llama-gqa", **{field: None}))
    assert err.value.message == f"config for test: {field} is null; LlamaConfig needs a value"
    assert err.value.hint.startswith(f"give {field} in config.json, or leave it out for the class default ")


def test_a_null_expert_count_is_refused():
    with pytest.raises(ModelError, match="num_local_experts is null; MixtralConfig needs a value"):
        spec(config("mixtral-moe", num_local_experts=None))


def test_model_type_must_be_a_string():
    with pytest.raises(ModelError) as err:
        spec(config("llama-gqa", model_type=["llama"]))
    assert err.value.message == "config for test: model_type must be a string, got ['llama']"


@pytest.mark.parametrize("field", ["first_k_dense_replace", "n_shared_experts"])
def test_negative_deepseek_counts_are_refused(field):
    with pytest.raises(ModelError) as err:
        spec(config("deepseek-v3-moonlight", **{field: -1}))
    assert err.value.message == f"config for test: {field} must be a whole number of at least 0, got -1"


@pytest.mark.parametrize("value", [0, -5, "256", True, 256.5])
def test_a_malformed_sliding_window_is_refused(value):
    with pytest.raises(ModelError) as err:
        spec(config("mistral-sliding", sliding_window=value))
    assert err.value.message == f"config for test: sliding_window must be a positive integer or null, got {value!r}"


def test_gemma3_multimodal_ties_by_the_outer_config():
    """Gemma3ForConditionalGeneration ties lm_head by the outer tie_word_embeddings (default True);
    text_config's own flag and model_type do not change what Gemma3Config builds."""
    base = config("gemma3-multimodal")
    assert spec(base).tied
    assert not spec({**base, "tie_word_embeddings": False}).tied
    text_untied = {**base, "text_config": {**base["text_config"], "tie_word_embeddings": False}}
    assert spec(text_untied).tied
    as_llama = {**base, "text_config": {**base["text_config"], "model_type": "llama"}}
    assert spec(as_llama).model_type == "gemma3_text"


@pytest.mark.parametrize("text", [None, "x"])
def test_a_wrapper_without_a_text_config_object_names_it(text):
    with pytest.raises(ModelError) as err:
        spec({**config("gemma3-multimodal"), "text_config": text})
    assert err.value.message == (f"config for test: a gemma3 config.json holds its decoder's fields in text_config, "
                                 f"got {text!r}")


@pytest.mark.parametrize("method", ["gptq", "awq", "fp8"])
def test_a_checkpoint_quantized_another_way_is_refused(method):
    with pytest.raises(UnmodelledError) as err:
        spec(config("llama-gqa", quantization_config={"quant_method": method, "bits": 4}))
    assert err.value.message.startswith(f"config for test is a pre-quantized checkpoint (quantization_config "
                                        f"quant_method {method!r})")


def test_a_bitsandbytes_checkpoint_is_planned_and_says_so():
    cfg = config("llama-gqa", quantization_config={"quant_method": "bitsandbytes", "load_in_4bit": True})
    assert any("bitsandbytes-quantized checkpoint" in n for n in spec(cfg).notes)
    assert spec(cfg).num_params == spec(config("llama-gqa")).num_params


@pytest.mark.parametrize("name, value", [("llama-gqa", "swish"), ("gemma2-softcap", "gelu")])
def test_an_activation_of_the_same_kernel_is_accepted(name, value):
    key = "hidden_activation" if name.startswith("gemma") else "hidden_act"
    assert spec(config(name, **{key: value})).num_params == spec(config(name)).num_params


@pytest.mark.parametrize("value", ["gelu_new", "relu2", "foobar"])
def test_an_activation_the_layer_walk_does_not_play_is_refused(value):
    # NewGELUActivation & co. are several Python ops with their own saved tensors
    with pytest.raises(UnmodelledError) as err:
        spec(config("llama-gqa", hidden_act=value))
    assert err.value.message == (f"config for test: hidden_act {value!r} is not modelled for llama (the estimate "
                                 "plays 'silu', as its published configs use)")


def test_a_multimodal_checkpoint_is_judged_by_its_outer_quantization_config():
    base = config("gemma3-multimodal")
    with pytest.raises(UnmodelledError, match="quant_method 'gptq'"):
        spec({**base, "quantization_config": {"quant_method": "gptq", "bits": 4}})


@pytest.mark.parametrize("name", ["smollm3-nope", "llama4-scout"])
@pytest.mark.parametrize("value", [0, -4, "x", True, 2.5])
def test_a_malformed_nope_interval_is_refused(name, value):
    # SmolLM3Config / Llama4TextConfig.__post_init__: `(layer_idx + 1) % no_rope_layer_interval`,
    # an int; read only where no_rope_layers is absent
    cfg = config(name, no_rope_layers=_DROP, no_rope_layer_interval=value)
    with pytest.raises(ModelError) as err:
        spec(cfg)
    # Llama4's field types are checked first (core/_config_fields.py check_field_types: "a number")
    kind = ("a number" if name.startswith("llama4") and (isinstance(value, bool) or not isinstance(value, int | float))
            else "a positive integer")
    assert err.value.message == f"config for test: no_rope_layer_interval must be {kind}, got {value!r}"
    if kind != "a number":
        assert spec(config(name, no_rope_layer_interval=value)).layers    # no_rope_layers given: not read


@pytest.mark.parametrize("value, kind", [(0, "a positive integer"), (-6, "a positive integer"),
                                         (1.5, "a positive integer"), ("6", "a number"), (True, "a number")])
def test_a_malformed_sliding_window_pattern_is_refused(value, kind):
    # Gemma3TextConfig.__post_init__: `bool((i + 1) % self._sliding_window_pattern)`; a string or
    # a flag is refused first by core/_config_fields.py check_field_types (the class default is 6)
    with pytest.raises(ModelError) as err:
        spec(config("gemma3-sliding", layer_types=_DROP, sliding_window_pattern=value))
    assert err.value.message == f"config for test: sliding_window_pattern must be {kind}, got {value!r}"


@pytest.mark.parametrize("field", ["attn_logit_softcapping", "final_logit_softcapping"])
@pytest.mark.parametrize("value", [[], {}, "30", True, 0, -50.0])
def test_a_malformed_softcap_is_refused(field, value):
    with pytest.raises(ModelError) as err:
        spec(config("gemma3-sliding", **{field: value}))
    assert err.value.message == f"config for test: {field} must be a positive number or null, got {value!r}"
    assert spec(config("gemma3-sliding", **{field: 30})).layers      # an int cap is a number


def _vision(**changes) -> dict:
    base = config("gemma3-multimodal")
    return {**base, "vision_config": {**base["vision_config"], **changes}}


@pytest.mark.parametrize("field, value, limit", [
    ("num_hidden_layers", 2**64, 1 << 10), ("num_hidden_layers", 10**7, 1 << 10),
    ("hidden_size", 2**40, 1 << 17), ("intermediate_size", 2**40, 1 << 20),
    ("image_size", 2**40, 1 << 14), ("patch_size", 2**40, 1 << 14), ("num_channels", 2**40, 1 << 10),
])
def test_a_vision_tower_beyond_any_model_is_refused(field, value, limit):
    with pytest.raises(ModelError) as err:
        spec(_vision(**{field: value}))
    assert err.value.message == (f"config for test: vision_config.{field} {value:,} is beyond any model "
                                 f"(at most {limit:,})")


def test_a_vision_patch_larger_than_the_image_is_refused():
    with pytest.raises(ModelError) as err:
        spec(_vision(patch_size=1000, image_size=896))
    assert err.value.message == "config for test: vision_config.patch_size 1000 must be at most image_size 896"


def test_vision_fields_at_their_bounds_are_estimated():
    # the largest tower the bounds allow stays well inside 64-bit byte counts
    big = spec(_vision(num_hidden_layers=1 << 10, hidden_size=1 << 17, intermediate_size=1 << 20,
                       num_channels=1 << 10, image_size=1 << 14, patch_size=1))
    assert big.vision.num_params < 2**60
