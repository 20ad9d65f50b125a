"""simulate runs any causal LM transformers builds from a config, with or without the analytic
registry. The configs come from transformers' own config classes at tiny shapes; the tests hold
whether or not the estimator knows the type (another family may be added to it at any time)."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

import torch  # noqa: E402

from vramplan.cli import main  # noqa: E402
from vramplan.core._architectures import ARCHITECTURES  # noqa: E402
from vramplan.core._errors import ModelError, UsageError  # noqa: E402
from vramplan.core._setup import TrainSetup  # noqa: E402
from vramplan.estimate._quant import alloc  # noqa: E402

SHAPES = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=128, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def write_config(tmp_path, name: str, config) -> str:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config.to_dict()))
    return str(folder)


def qwen3(layers: int = 2):
    from transformers import Qwen3Config
    return Qwen3Config(num_hidden_layers=layers, head_dim=16, **SHAPES)


def olmo2(layers: int = 2):
    from transformers import Olmo2Config
    return Olmo2Config(num_hidden_layers=layers, **SHAPES)


def deepseek_v3(layers: int = 2):
    """MLA with a q LoRA rank, one dense layer below the MoE ones, grouped sigmoid routing."""
    from transformers import DeepseekV3Config
    shapes = dict(SHAPES, num_key_value_heads=4)
    return DeepseekV3Config(num_hidden_layers=layers, moe_intermediate_size=32, n_routed_experts=4,
                            n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
                            first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16,
                            qk_rope_head_dim=8, v_head_dim=16, **shapes)


def cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("make", [qwen3, olmo2, deepseek_v3])
def test_simulate_cli_any_causal_lm(tmp_path, capsys, make):
    config = make()
    path = write_config(tmp_path, config.model_type, config)
    code, out, err = cli(capsys, "simulate", path, "--method", "lora", "--seq", "32", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["peak_allocated_bytes"] == sum(data["components"].values()) > 0
    assert data["components"]["adapters"] > 0 and data["components"]["weights"] > 0
    if config.model_type in ARCHITECTURES:     # the estimator knows it: side by side as for any model
        assert data["estimate"] is not None and "estimate_skipped" not in data
    else:
        assert data["estimate"] is None and data["difference"] is None
        assert data["estimate_skipped"].startswith(
            f"the analytic model does not know model_type {config.model_type!r} (it knows ")


def test_qlora_quantizes_gpt2_conv1d_as_transformers_does(tmp_path, capsys):
    """GPT-2's attention and MLP are Conv1D ([in, out] weights), which transformers' bitsandbytes
    quantizer replaces by Linear4bit after a transpose: each 4-bit weight is that of an
    [out, in] Linear, nothing left in 16 bits but the embeddings, norms and biases."""
    from transformers import GPT2Config

    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=256, bos_token_id=1,
                        eos_token_id=2)
    path = write_config(tmp_path, "gpt2", config)
    code, out, err = cli(capsys, "simulate", path, "--seq", "32", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["components"]["quant_constants"] > 0 and data["components"]["adapters"] > 0
    # per layer, c_attn 64 x 192, attn c_proj 64 x 64, c_fc 64 x 256, mlp c_proj 256 x 64, packed
    # two nf4 values a byte
    packed = 2 * sum(alloc(i * o // 2) for i, o in ((64, 192), (64, 64), (64, 256), (256, 64)))
    # in bf16: wte (tied to lm_head) and wpe; per layer ln_1 and ln_2 weight and bias and the four
    # Conv1D biases; ln_f weight and bias
    dense = alloc(128 * 64 * 2) + alloc(256 * 64 * 2)
    dense += 2 * sum(alloc(n * 2) for n in (64, 64, 64, 64, 192, 64, 256, 64))
    dense += 2 * alloc(64 * 2)
    assert data["components"]["weights"] == packed + dense


def test_a_config_the_estimate_does_not_model_is_simulated_as_its_hint_says(tmp_path, capsys):
    """Qwen3-MoE with dense MLP layers among the MoE ones: the estimate refuses it and points at
    simulate, which builds it with transformers and says why no estimate stands beside it."""
    from transformers import Qwen3MoeConfig

    config = Qwen3MoeConfig(num_hidden_layers=2, head_dim=16, moe_intermediate_size=32, num_experts=4,
                            num_experts_per_tok=2, mlp_only_layers=[0], **SHAPES)
    path = write_config(tmp_path, "qwen3_moe", config)
    code, _out, err = cli(capsys, "estimate", path)
    assert code == 1 and "are not modelled (hint: `vramplan simulate` traces this model)" in err
    code, out, err = cli(capsys, "simulate", path, "--method", "lora", "--seq", "32", "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["estimate"] is None and data["peak_allocated_bytes"] > 0
    assert data["estimate_skipped"].startswith("the analytic model does not model this config (config for ")
    assert "dense MLP layers among the MoE layers (mlp_only_layers [0]" in data["estimate_skipped"]


def test_library_simulate_takes_estimates_keywords():
    from vramplan import estimate
    from vramplan.simulate import simulate

    trace = simulate("tests/configs/llama-gqa.json", batch=2, seq=32, method="lora")
    est = estimate("tests/configs/llama-gqa.json", batch=2, seq=32, method="lora")
    assert trace.setup == est.setup.to_dict()
    with pytest.raises(UsageError, match="simulate takes a model name, a config path or a ModelSpec"):
        simulate(None)


def test_registry_free_weights_are_transformers_parameters(tmp_path):
    """Without the analytic registry the weights component is still every parameter and buffer of
    the model transformers builds, each one CUDA allocation rounded to 512 bytes."""
    from transformers import AutoModelForCausalLM

    from vramplan.simulate import simulate
    from vramplan.simulate._build import ConfigSpec, config_spec

    config = olmo2()
    spec = config_spec(config.to_dict(), "tiny-olmo2", "test")
    if config.model_type in ARCHITECTURES:
        pytest.skip("olmo2 is in the analytic registry now; ConfigSpec is exercised with qwen3")
    assert isinstance(spec, ConfigSpec) and (spec.layers, spec.vocab, spec.num_experts) == (2, 128, 0)
    trace = simulate(spec, TrainSetup(method="lora", seq=32))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    expected = sum(alloc(t.numel() * t.element_size()) for t in [*model.parameters(), *model.buffers()])
    assert trace.components["weights"] == expected


def test_config_spec_reads_transformers_defaults():
    from vramplan.simulate._build import config_spec

    # num_hidden_layers left out: Qwen3Config's default (36) applies, as transformers builds it
    spec = config_spec({"model_type": "qwen3", "vocab_size": 128}, "x/y", "test")
    from transformers import Qwen3Config
    assert spec.layers == Qwen3Config().num_hidden_layers
    moe = config_spec({"model_type": "qwen3_moe", "num_experts": 6, "num_experts_per_tok": 2}, "x/m", "test")
    assert (moe.num_experts, moe.experts_per_tok) == (6, 2)


def test_shortcut_rebuilds_a_registry_free_model_exactly(tmp_path):
    """The identical-layers shortcut works on a ConfigSpec too: same peak and components as
    tracing every layer."""
    from vramplan.simulate import simulate
    from vramplan.simulate._build import config_spec

    config = qwen3(layers=7)
    spec = config_spec(config.to_dict(), "tiny-qwen3", "test")
    setup = TrainSetup(method="lora", seq=32)
    short = simulate(spec, setup)
    full = simulate(spec, setup, exact=True)
    assert short.extrapolated and not full.extrapolated, short.notes
    assert (short.peak_allocated_bytes, short.components, short.phase_peaks) == \
        (full.peak_allocated_bytes, full.components, full.phase_peaks)


def test_library_simulate_takes_a_path(tmp_path):
    import vramplan

    path = write_config(tmp_path, "q3", qwen3())
    trace = vramplan.simulate(path, TrainSetup(method="lora", seq=16))
    assert trace.model == path and trace.peak_allocated_bytes > 0


def test_type_transformers_lacks_is_one_line_error(tmp_path, capsys):
    folder = tmp_path / "odd"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "no-such-arch", "vocab_size": 10}))
    code, out, err = cli(capsys, "simulate", str(folder))
    assert (code, out) == (1, "")
    assert err.startswith(f"Error: architecture 'no-such-arch' ({folder}) is not known to transformers ")
    assert err.count("\n") == 1 and "(hint: " in err


# --- what the meta step assumed where it has no CUDA stand-in ---------------------------------------

def test_balanced_routing_answers_and_says_so():
    from vramplan.simulate._kernels import Routing

    r = Routing(num_experts=4, top_k=2, tokens=6)     # 12 token-expert rows over 4 experts
    hit = torch.empty(5, device="meta")
    assert r.nonzero_rows(hit) == 4
    rows = [r.nonzero_rows(torch.empty(2, 6, device="meta")) for _ in range(4)]
    assert rows == [3, 3, 3, 3]
    r2 = Routing(num_experts=5, top_k=2, tokens=6)     # 12 rows over 5 experts: 3, 3, 2, 2, 2
    assert [r2.nonzero_rows(torch.empty(2, 6, device="meta")) for _ in range(5)] == [3, 3, 2, 2, 2]
    notes = r.notes()
    assert any(n.startswith("MoE routing answered as a balanced router would: each of the 4 experts") for n in notes)


def test_moe_without_routing_answers_says_grouped_mm():
    from vramplan.simulate._kernels import Routing

    notes = Routing(num_experts=8, top_k=2, tokens=64, grouped=True).notes()
    assert len(notes) == 1 and "grouped_mm" in notes[0] and "no routing had to be assumed" in notes[0]
    assert Routing().notes() == ()
    # Llama 4's experts never call torch._grouped_mm (every token through every expert, bmm)
    notes = Routing(num_experts=16, top_k=1, tokens=64).notes()
    assert len(notes) == 1 and "grouped_mm" not in notes[0] and "every token through every expert" in notes[0]


def test_ops_of_unknown_kernel_libraries_are_named():
    from vramplan.simulate._kernels import unknown_kernel_note
    from vramplan.simulate._oplog import StepTracker

    @torch.library.custom_op("vramplan_test::twice", mutates_args=())
    def twice(x: torch.Tensor) -> torch.Tensor:
        return x * 2

    @twice.register_fake
    def _(x):
        return torch.empty_like(x)

    x = torch.empty(8, device="meta")
    tracker = StepTracker("meta")
    with tracker:
        twice(x + 1)
    assert tracker.foreign_ops == {"vramplan_test.twice.default"}
    assert unknown_kernel_note(tracker.foreign_ops) == (
        "no CUDA stand-in for vramplan_test.twice.default: ran their meta kernels, assumed to allocate on CUDA "
        "what those say")
    assert unknown_kernel_note(set()) is None


def qwen3_next():
    from transformers import Qwen3NextConfig
    return Qwen3NextConfig(num_hidden_layers=4, head_dim=16, num_experts=4, num_experts_per_tok=2,
                           moe_intermediate_size=64, shared_expert_intermediate_size=64, linear_num_value_heads=4,
                           linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16, **SHAPES)


def test_simulate_cli_hybrid_linear_attention_says_which_kernels_ran(tmp_path, capsys):
    """Qwen3-Next mixes gated-DeltaNet layers ("linear_attention") with full attention: the
    estimate refuses the family, simulate traces it and prints (not crashes on) its missing
    estimate, and says that the linear-attention layers ran transformers' own code."""
    path = write_config(tmp_path, "qwen3_next", qwen3_next())
    code, out, err = cli(capsys, "estimate", path)
    assert code == 1 and err.startswith("Error: architecture 'qwen3_next'") and "vramplan simulate" in err
    code, out, err = cli(capsys, "simulate", path, "--seq", "32")
    assert code == 0, err
    text = " ".join(out.split())
    assert "Estimate skipped" in text and "linear_attention layers ran" in text
    assert "profiler." not in text      # record_function markers are not kernels


def test_simulate_text_output_without_an_estimate(tmp_path, capsys):
    """The table output of a model type the analytic model does not know: no estimate column, the
    skip reason printed, no traceback."""
    from transformers import Starcoder2Config

    config = Starcoder2Config(num_hidden_layers=2, **SHAPES)
    path = write_config(tmp_path, config.model_type, config)
    code, out, err = cli(capsys, "simulate", path, "--method", "lora", "--seq", "32")
    assert (code, err) == (0, "")
    assert "Peak reserved" in out
    if config.model_type not in ARCHITECTURES:
        assert "Estimate skipped: the analytic model does not know model_type" in " ".join(out.split())


def test_hybrid_configs_are_refused_by_their_layer_kinds(tmp_path, capsys):
    """The estimate refuses a hybrid decoder by the layer kinds its config lists, not by its name:
    the error names those layers and the kernels whose memory it does not model."""
    from transformers import GraniteMoeHybridConfig

    for model_type, config in (("qwen3_next", qwen3_next()), ("granitemoehybrid", GraniteMoeHybridConfig(
            num_hidden_layers=2, **SHAPES))):
        path = write_config(tmp_path, model_type, config)
        code, out, err = cli(capsys, "estimate", path)
        assert code == 1 and err.count("\n") == 1, err
        assert err.startswith(f"Error: architecture '{model_type}'") and "is not modelled by the estimate: its " \
            "linear_attention layers run chunked recurrent kernels" in err and "(hint: `vramplan simulate`" in err
