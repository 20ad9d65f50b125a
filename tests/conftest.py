"""Shared test helpers. Model configs are built here as dicts (tiny shapes) so the tests do not
depend on the bundled catalog.

Optional dependencies: a test that needs torch, transformers, peft, bitsandbytes, pandas or
matplotlib carries the marker of that name (`@pytest.mark.pandas`), and one that needs a CUDA
device carries `@pytest.mark.gpu` (markers registered in pyproject.toml). `pytest_runtest_setup`
below skips it, with the reason, when the package or the device is missing. A test file whose
module-level imports need a package declares `pytestmark = requires("torch", ...)`: the marks,
and a module-level skip before those imports run."""
from __future__ import annotations

import functools
import importlib.util

import pytest

# marker name (= the module it stands for) -> the extra that installs it; "gpu" is checked through torch.cuda
OPTIONAL = {"torch": "simulate", "transformers": "simulate", "peft": "simulate", "bitsandbytes": "simulate",
            "pandas": "export", "matplotlib": "export"}


@functools.cache
def missing(name: str) -> str | None:
    """Why the optional dependency `name` is unavailable (None: it is there)."""
    if name == "gpu":
        if missing("torch"):
            return "needs a CUDA device (torch is not installed)"
        import torch
        return None if torch.cuda.is_available() else "needs a CUDA device (torch.cuda.is_available() is False)"
    if importlib.util.find_spec(name) is None:
        return f"needs {name} (not installed; pip install 'vramplan[{OPTIONAL[name]}]')"
    return None


def requires(*names: str) -> list:
    """For a module's `pytestmark`: mark every test of the file, and skip the whole file at
    collection when one of `names` is missing (its imports would fail before any hook runs)."""
    for name in names:
        reason = missing(name)
        if reason:
            pytest.skip(reason, allow_module_level=True)
    return [getattr(pytest.mark, name) for name in names]


def pytest_runtest_setup(item):
    for mark in item.iter_markers():
        if mark.name in OPTIONAL or mark.name == "gpu":
            reason = missing(mark.name)
            if reason:
                pytest.skip(reason)

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
    from vramplan.core._models import spec_from_config

    def make(model_type: str = "llama", **overrides):
        return spec_from_config(tiny_config(model_type, **overrides), f"tiny-{model_type}", "test config")

    return make
