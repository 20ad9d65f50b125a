"""The decoder families added for issue #10: catalog sizes against the published figures, the
structure read from each config (layer types, q/k norms, nested text configs), and the error for
an architecture the analytic model does not know. Agreement with the traced step is
tests/test_agreement.py."""
import json

import pytest

from vramplan.core.errors import ModelError
from vramplan.core.models import resolve, spec_from_config

B = 10 ** 9

# Published sizes (model cards on huggingface.co), in billions, with the digits they were given
# to: the count must round to the published figure, so the tolerance is half a unit of the last
# published digit. (total, non-embedding or None, decimals)
PUBLISHED = [
    ("Qwen/Qwen3-0.6B", 0.6, 0.44, (1, 2)),      # "Number of Parameters: 0.6B, Non-Embedding: 0.44B"
    ("Qwen/Qwen3-8B", 8.2, 6.95, (1, 2)),        # "8.2B, Non-Embedding: 6.95B"
    ("Qwen/Qwen3-32B", 32.8, 31.2, (1, 1)),      # "32.8B, Non-Embedding: 31.2B"
]


def non_embedding(spec) -> int:
    parts = spec.param_breakdown()
    return spec.num_params - parts["embed_tokens"] - parts["lm_head"]


@pytest.mark.parametrize("model, total, non_emb, decimals", PUBLISHED, ids=[p[0] for p in PUBLISHED])
def test_param_counts_round_to_the_published_sizes(model, total, non_emb, decimals):
    spec = resolve(model)
    assert round(spec.num_params / B, decimals[0]) == total
    if non_emb is not None:
        assert round(non_embedding(spec) / B, decimals[1]) == non_emb


def test_qwen3_has_per_head_qk_norms_and_no_biases():
    spec = resolve("Qwen/Qwen3-8B")
    assert (spec.heads, spec.kv_heads, spec.head_dim, spec.hidden) == (32, 8, 128, 4096)
    assert spec.norm_widths == (4096, 4096, 128, 128)
    assert not any(l.bias for l in spec.layer_linears)
    assert set(spec.layer_types) == {"full_attention"} and spec.sliding_window is None


def test_qwen3_sliding_layers_follow_max_window_layers():
    config = dict(resolve("Qwen/Qwen3-0.6B").config, use_sliding_window=True, sliding_window=4096,
                  max_window_layers=20)
    spec = spec_from_config(config, "q", "test")
    assert spec.layer_types == ("full_attention",) * 20 + ("sliding_attention",) * 8
    assert spec.sliding_window == 4096


def test_explicit_layer_types_win_and_are_checked():
    config = dict(resolve("Qwen/Qwen3-0.6B").config, num_hidden_layers=2, sliding_window=64,
                  layer_types=["sliding_attention", "full_attention"])
    assert spec_from_config(config, "q", "test").layer_types == ("sliding_attention", "full_attention")
    with pytest.raises(ModelError) as info:
        spec_from_config(dict(config, layer_types=["linear_attention", "full_attention"]), "q", "test")
    assert "layer_types must list 2 entries of full_attention / sliding_attention" in str(info.value)


def test_unknown_architecture_names_the_families_and_simulate(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "bert", "hidden_size": 64}))
    with pytest.raises(ModelError) as info:
        resolve(str(path))
    text = str(info.value)
    assert "architecture 'bert'" in text and "qwen3" in text and "`vramplan simulate`" in text
