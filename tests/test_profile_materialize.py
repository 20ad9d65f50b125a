"""`vramplan profile --random-weights` builds the model one tensor at a time
(profile/_materialize.py): a tensor tied to one made already is shared, never allocated."""
import pytest
from conftest import requires, tiny_config

from vramplan.core._models import spec_from_config
from vramplan.core._setup import TrainSetup

pytestmark = requires("torch", "transformers")


@pytest.mark.parametrize("tied", [True, False])
def test_a_tied_lm_head_is_shared_not_allocated(monkeypatch, tied):
    import torch

    from vramplan.profile._materialize import random_model

    spec = spec_from_config(tiny_config("llama", tie_word_embeddings=tied), "tiny-llama", "test config")
    made = []
    to_empty = torch.nn.Module.to_empty

    def recording(module, *, device, recurse=True):
        made.append(module)
        return to_empty(module, device=device, recurse=recurse)

    monkeypatch.setattr(torch.nn.Module, "to_empty", recording)
    model = random_model(spec, TrainSetup(method="lora", attn="sdpa", dtype="bf16"), "cpu")
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    assert head.weight.device.type == "cpu" and embeddings.weight.device.type == "cpu"
    # a checkpoint load never allocates a tied lm_head; an untied one is a tensor of its own
    assert (head in made) is not tied
    assert (head.weight is embeddings.weight) is tied
    assert all(p.device.type == "cpu" for p in model.parameters())
