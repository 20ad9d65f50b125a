"""Shared test helpers. Model configs are built here as dicts (tiny shapes) so the tests do not
depend on the bundled catalog."""
from __future__ import annotations

import pytest

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=128)


def tiny_config(model_type: str = "llama", **overrides) -> dict:
    config = dict(model_type=model_type, **TINY)
    if model_type == "mixtral":
        config.update(num_local_experts=4, num_experts_per_tok=2)
    if model_type == "phi3":  # its default pad/bos/eos ids (32000) lie outside a tiny vocab
        config.update(num_key_value_heads=4, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if model_type == "gemma2":
        config.update(head_dim=16)
    config.update(overrides)
    return config


@pytest.fixture
def tiny_spec():
    from vramplan.core.models import spec_from_config

    def make(model_type: str = "llama", **overrides):
        return spec_from_config(tiny_config(model_type, **overrides), f"tiny-{model_type}", "test config")

    return make
