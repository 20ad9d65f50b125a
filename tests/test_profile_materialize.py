"""`vramplan profile --random-weights` builds the model one tensor at a time
(profile/_materialize.py), as from_pretrained loads a checkpoint: in checkpoint order, a tensor
tied to one made already shared, never allocated."""
import pytest
from conftest import requires, tiny_config

from vramplan.core._models import spec_from_config
from vramplan.core._setup import TrainSetup

pytestmark = requires("torch", "transformers")


def built(monkeypatch, **config):
    """The random-weights model of a tiny Llama, and the modules whose tensors the build
    allocated (Module.to_empty), in the order it made them."""
    import torch

    from vramplan.profile._materialize import random_model

    spec = spec_from_config(tiny_config("llama", **config), "tiny-llama", "test config")
    made = []
    to_empty = torch.nn.Module.to_empty

    def recording(module, *, device, recurse=True):
        made.append(module)
        return to_empty(module, device=device, recurse=recurse)

    monkeypatch.setattr(torch.nn.Module, "to_empty", recording)
    return random_model(spec, TrainSetup(method="lora", attn="sdpa", dtype="bf16"), "cpu"), made


@pytest.mark.parametrize("tied", [True, False])
def test_a_tied_lm_head_is_shared_not_allocated(monkeypatch, tied):
    model, made = built(monkeypatch, tie_word_embeddings=tied)
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    assert head.weight.device.type == "cpu" and embeddings.weight.device.type == "cpu"
    # a checkpoint load makes one tensor for a tied lm_head and its embeddings, two when untied
    assert (head in made) + (embeddings in made) == (1 if tied else 2)
    assert (head.weight is embeddings.weight) is tied
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_weights_are_made_in_checkpoint_order(monkeypatch):
    """from_pretrained loads (and quantizes) the checkpoint's tensors sorted by key
    (transformers core_model_loading.py, dot_natural_key): the build makes them in that order, not
    in the modules' own order, as the estimate's load replays them (estimate/_inventory.py checkpoint_order)."""
    model, made = built(monkeypatch, num_hidden_layers=11)
    names = {id(m): n for n, m in model.named_modules()}
    order = [names[id(m)] for m in made]
    assert order[:2] == ["lm_head", "model.embed_tokens"]
    assert order[2:11] == ["model.layers.0.input_layernorm", "model.layers.0.mlp.down_proj",
                           "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj",
                           "model.layers.0.post_attention_layernorm", "model.layers.0.self_attn.k_proj",
                           "model.layers.0.self_attn.o_proj", "model.layers.0.self_attn.q_proj",
                           "model.layers.0.self_attn.v_proj"]
    layers = [n.split(".")[2] for n in order if n.startswith("model.layers.")]
    assert layers == sorted(layers, key=int)             # layer 2 before layer 10: numbers numerically
    assert order.index("model.norm") > order.index("model.layers.10.self_attn.v_proj")
