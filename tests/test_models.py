import json

import pytest

from vramplan.core._errors import ModelError
from vramplan.core._models import catalog, lookup, resolve, spec_from_config

REQUIRED = ["meta-llama/Llama-2-7b-hf", "meta-llama/Llama-2-13b-hf", "meta-llama/Llama-2-70b-hf",
            "meta-llama/Meta-Llama-3-8B", "meta-llama/Meta-Llama-3-70B", "meta-llama/Llama-3.1-8B",
            "meta-llama/Llama-3.1-70B", "meta-llama/Llama-3.2-1B", "meta-llama/Llama-3.2-3B",
            "mistralai/Mistral-7B-v0.1", "mistralai/Mixtral-8x7B-v0.1", "Qwen/Qwen2.5-0.5B", "Qwen/Qwen2.5-7B",
            "Qwen/Qwen2.5-14B", "Qwen/Qwen2.5-32B", "Qwen/Qwen2.5-72B", "google/gemma-2-2b", "google/gemma-2-9b",
            "google/gemma-2-27b", "microsoft/Phi-3-mini-4k-instruct", "TinyLlama/TinyLlama-1.1B-Chat-v1.0"]


def test_catalog_has_the_models_people_fine_tune():
    assert set(REQUIRED) <= set(catalog())


def test_every_entry_records_its_source_and_builds():
    for entry in catalog().values():
        assert entry.source.strip()
        spec = spec_from_config(entry.config, entry.id, entry.source)
        assert spec.num_params > 0


def test_no_alias_points_at_two_models():
    seen = {}
    for entry in catalog().values():
        for alias in (entry.id, *entry.aliases):
            assert seen.setdefault(alias.lower(), entry.id) == entry.id, alias


@pytest.mark.parametrize("name, model_id", [
    ("meta-llama/Llama-2-70b", "meta-llama/Llama-2-70b-hf"),
    ("meta-llama/Llama-2-70b-hf", "meta-llama/Llama-2-70b-hf"),
    ("META-LLAMA/LLAMA-2-70B-HF", "meta-llama/Llama-2-70b-hf"),
    ("Llama-2-70b-hf", "meta-llama/Llama-2-70b-hf"),
    ("mistral-7b", "mistralai/Mistral-7B-v0.1"),
])
def test_forgiving_aliases(name, model_id):
    assert resolve(name).id == model_id


# Published sizes (model cards): the analytic parameter inventory must reproduce them.
@pytest.mark.parametrize("name, params", [
    ("meta-llama/Llama-2-7b-hf", 6_738_415_616),
    ("meta-llama/Llama-2-70b-hf", 68_976_648_192),
    ("meta-llama/Meta-Llama-3-8B", 8_030_261_248),
    ("mistralai/Mistral-7B-v0.1", 7_241_732_096),
    ("mistralai/Mixtral-8x7B-v0.1", 46_702_792_704),
    ("Qwen/Qwen2.5-0.5B", 494_032_768),
    ("google/gemma-2-9b", 9_241_705_984),
    ("TinyLlama/TinyLlama-1.1B-Chat-v1.0", 1_100_048_384),
])
def test_param_counts_match_published_sizes(name, params):
    assert resolve(name).num_params == params


def test_gqa_and_head_dim_are_read_not_derived():
    spec = resolve("google/gemma-2-9b")
    assert (spec.heads, spec.kv_heads, spec.head_dim, spec.hidden) == (16, 8, 256, 3584)
    assert spec.tied and spec.final_logit_softcap == 30.0


def test_local_directory_and_config_path(tmp_path):
    config = {"model_type": "llama", "hidden_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
              "intermediate_size": 688, "vocab_size": 1000}
    (tmp_path / "config.json").write_text(json.dumps(config))
    for name in (str(tmp_path), str(tmp_path / "config.json")):
        spec = resolve(name)
        assert spec.kv_heads == 4 and spec.head_dim == 64  # defaults transformers' LlamaConfig would use


@pytest.mark.parametrize("content, message", [
    ("[1, 2]", "is not a JSON object"),
    ("{not json", "cannot read"),
    ('{"hidden_size": 64}', "has no model_type"),
    ('{"model_type": "bert", "hidden_size": 64}', "architecture 'bert'"),
    ('{"model_type": "llama", "hidden_size": 0}', "hidden_size must be a positive integer"),
    ('{"model_type": "llama", "hidden_size": 100, "num_attention_heads": 3}', "not divisible"),
    ('{"model_type": "llama", "num_attention_heads": 32, "num_key_value_heads": 5}', "not a multiple"),
    # a field of the config class with the wrong JSON type (transformers would store it and fail in
    # the first forward)
    ('{"model_type": "granite", "residual_multiplier": "0.22"}', "residual_multiplier must be a number, got '0.22'"),
    ('{"model_type": "gemma2", "final_logit_softcapping": true}', "final_logit_softcapping must be a number"),
    ('{"model_type": "llama", "tie_word_embeddings": "no"}', "tie_word_embeddings must be true or false"),
    ('{"model_type": "llama", "hidden_act": 3}', "hidden_act must be a string, got 3"),
])
def test_malformed_configs_fail_clearly(tmp_path, content, message):
    path = tmp_path / "config.json"
    path.write_text(content)
    with pytest.raises(ModelError) as info:
        resolve(str(path))
    assert message in str(info.value)


def test_unknown_model_suggests_close_matches(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no test may touch the network
    with pytest.raises(ModelError) as info:
        resolve("meta-llama/Llama-2-7x-hf")
    assert "did you mean" in str(info.value) and "Llama-2-7b-hf" in str(info.value)


def test_missing_local_path():
    with pytest.raises(ModelError) as info:
        resolve("./no/such/dir")
    assert "no such file or directory" in str(info.value)


def test_lookup_is_case_insensitive():
    assert lookup("qwen/qwen2.5-7b").id == "Qwen/Qwen2.5-7B"
