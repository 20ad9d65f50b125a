"""MoE under 4-bit: transformers 5 leaves fused expert stacks 16-bit (bitsandbytes #1849); the
verdict says so in bytes; --experts 4bit models the stacks that quantize them (estimate-only)."""
from __future__ import annotations

import json

import pytest

from conftest import tiny_config
from vramplan.cli import main
from vramplan.core._errors import SimulationError, UsageError
from vramplan.core._models import spec_from_config
from vramplan.core._setup import TrainSetup
from vramplan.estimate._estimator import estimate
from vramplan.estimate._inventory import expert_weight_bytes, static_memory
from vramplan.estimate._quant import alloc

MIXTRAL = "mistralai/Mixtral-8x7B-v0.1"


def cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def tiny_mixtral(**overrides):
    return spec_from_config(tiny_config("mixtral", **overrides), "tiny-mixtral", "test config")


# --- the warning -----------------------------------------------------------------------------------

def test_verdict_line_itself_says_experts_stay_16bit(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")    # one terminal line per printed line
    code, out, _ = cli(capsys, "estimate", MIXTRAL, "--gpu", "80GB")
    assert code == 0
    verdict = next(line for line in out.splitlines() if "FIT" in line)
    assert "WARNING: MoE experts stay 16-bit: transformers 5 does not quantize fused expert stacks with " \
           "bitsandbytes (bitsandbytes #1849)" in verdict
    sixteen, four = expert_weight_bytes(estimate(MIXTRAL).model, TrainSetup())
    assert f"({sixteen:,} bytes)" in verdict and "as NF4" in verdict and "--experts 4bit" in verdict
    # without --gpu the line that stands for the verdict carries it too
    _, out, _ = cli(capsys, "estimate", MIXTRAL)
    assert "WARNING: MoE experts stay 16-bit" in next(l for l in out.splitlines() if l.startswith("Device total"))


def test_json_warnings(capsys):
    code, out, _ = cli(capsys, "estimate", MIXTRAL, "--json")
    data = json.loads(out)
    assert code == 0 and len(data["warnings"]) == 1 and data["warnings"][0].startswith("MoE experts stay 16-bit")
    _, out, _ = cli(capsys, "estimate", "meta-llama/Llama-2-7b-hf", "--json")
    assert json.loads(out)["warnings"] == []
    _, out, _ = cli(capsys, "estimate", MIXTRAL, "--method", "lora", "--json")   # nothing is quantized
    assert json.loads(out)["warnings"] == []
    _, out, _ = cli(capsys, "estimate", MIXTRAL, "--experts", "4bit", "--json")
    assert json.loads(out)["warnings"] == []


GRANITE_MOE = "ibm-granite/granite-3.1-3b-a800m-instruct"


@pytest.mark.parametrize("family", ["qwen3_moe", "granitemoe"])
def test_every_moe_family_gets_the_warning(capsys, family):
    """Qwen3-MoE and GraniteMoE keep fused 3-D expert stacks as Mixtral does: the same warning, in
    bytes; the merged LoRA copy only where all-linear adapts the experts (not GraniteMoE), and
    --experts 4bit only where that layout exists."""
    model = "Qwen/Qwen3-30B-A3B" if family == "qwen3_moe" else GRANITE_MOE
    code, out, _ = cli(capsys, "estimate", model, "--json")
    data = json.loads(out)
    assert code == 0 and data["model"]["model_type"] == family and len(data["warnings"]) == 1
    text = data["warnings"][0]
    assert text.startswith("MoE experts stay 16-bit: transformers 5 does not quantize fused expert stacks")
    from vramplan.core._models import resolve
    spec = resolve(model)
    sixteen, _ = expert_weight_bytes(spec, TrainSetup())
    assert f"({sixteen:,} bytes)" in text
    assert ("merged 16-bit copy per layer" in text) == (family == "qwen3_moe")
    assert ("--experts 4bit" in text) == (family == "qwen3_moe")
    _, out, _ = cli(capsys, "estimate", model, "--method", "lora", "--json")    # nothing is quantized
    assert json.loads(out)["warnings"] == []


MOE_TINY = {"mixtral": {}, "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48),
            "granitemoe": dict(num_local_experts=4, num_experts_per_tok=2),
            # Llama 4: (E, h, 2i) / (E, i, h) stacks in the MoE layers only (every second layer here)
            "llama4_text": dict(num_local_experts=4, head_dim=16, intermediate_size_mlp=256,
                                interleave_moe_layer_step=2)}


@pytest.mark.parametrize("family", sorted(MOE_TINY))
def test_sixteen_bit_expert_bytes_are_the_transformers_expert_parameters(family):
    """What the warning quotes: every expert parameter transformers 5 builds, in bf16, one CUDA
    allocation each (512-byte rounding)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = tiny_config(family, num_hidden_layers=3, **MOE_TINY[family])
    spec = spec_from_config(config, f"tiny-{family}", "test")
    hf = transformers.CONFIG_MAPPING[family].from_dict(config)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf, dtype=torch.bfloat16)
    experts = [p for name, p in model.named_parameters() if ".experts." in name]
    assert experts   # gate_up_proj and down_proj per layer
    sixteen, _ = expert_weight_bytes(spec, TrainSetup())
    assert sixteen == sum(alloc(p.numel() * p.element_size()) for p in experts)


# --- --experts 4bit -----------------------------------------------------------------------------

def _linear4bit_bytes(in_features: int, out_features: int) -> int:
    """One bitsandbytes Linear4bit weight quantized on meta: packed weight and every QuantState tensor."""
    torch = pytest.importorskip("torch")
    bnb = pytest.importorskip("bitsandbytes")
    w = torch.empty(out_features, in_features, dtype=torch.bfloat16, device="meta")
    p = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4", compress_statistics=True)._quantize("meta")
    qs = p.quant_state
    tensors = [p, qs.absmax, qs.code, qs.offset, qs.state2.absmax, qs.state2.code]
    return sum(alloc(t.numel() * t.element_size()) for t in tensors)


def test_4bit_experts_are_counted_as_bitsandbytes_linear4bit():
    spec = tiny_mixtral(num_hidden_layers=3)
    sixteen_setup, four_setup = TrainSetup(), TrainSetup(experts="4bit")
    s16, s4 = static_memory(spec, sixteen_setup), static_memory(spec, four_setup)
    h, i, E, n = spec.hidden, spec.intermediate, spec.num_experts, spec.layers
    per_expert = 2 * _linear4bit_bytes(h, i) + _linear4bit_bytes(i, h)     # w1, w3, w2
    sixteen, four = expert_weight_bytes(spec, sixteen_setup)
    assert four == n * E * per_expert
    # the router stays as it is; only the expert stacks change
    assert (s4.weights + s4.quant_constants) - (s16.weights + s16.quant_constants) == n * E * per_expert - sixteen


def test_4bit_experts_lora_is_ordinary_lora_per_expert():
    spec = tiny_mixtral()
    r, h, i, E, n = 16, spec.hidden, spec.intermediate, spec.num_experts, spec.layers
    attn = static_memory(spec, TrainSetup(targets="q_proj,k_proj,v_proj,o_proj")).trainable_params
    s4 = static_memory(spec, TrainSetup(experts="4bit"))
    router = r * h + E * r
    experts = E * (2 * (r * h + i * r) + (r * i + h * r))     # w1, w3: A (r, h), B (i, r); w2: A (r, i), B (h, r)
    assert s4.trainable_params - attn == n * (router + experts)


def test_4bit_experts_drop_the_merged_copy():
    from vramplan.estimate._ops import layer_ops

    spec = tiny_mixtral()
    names16 = [op.name for op in layer_ops(spec, TrainSetup())[0]]
    names4 = [op.name for op in layer_ops(spec, TrainSetup(experts="4bit"))[0]]
    assert "moe.merge_gate_up" in names16 and "moe.merge_down" in names16
    assert not any("merge" in n for n in names4)
    assert {"moe.experts.w1.lora_A", "moe.experts.w3.lora_A", "moe.experts.w2.lora_A"} <= set(names4)
    e16 = estimate(MIXTRAL, TrainSetup())
    e4 = estimate(MIXTRAL, TrainSetup(experts="4bit"))
    assert e4.components["weights"] < e16.components["weights"] / 3
    assert any(a.startswith("--experts 4bit: each of the 8 experts per layer") for a in e4.assumptions)


def test_experts_flag_validation(capsys):
    code, _, err = cli(capsys, "estimate", MIXTRAL, "--experts", "2bit")
    assert (code, err) == (2, "Error: unknown experts '2bit' (hint: --experts takes one of: 16bit, 4bit)\n")
    code, _, err = cli(capsys, "estimate", MIXTRAL, "--experts", "4bit", "--quant", "int8")
    assert (code, err) == (2, "Error: --experts 4bit applies to 4-bit quantization only (hint: use it with "
                              "--method qlora --quant nf4 (or fp4), or drop it)\n")
    with pytest.raises(UsageError):
        TrainSetup(method="lora", experts="4bit")
    assert TrainSetup().to_dict()["experts"] == "16bit"


# --- simulate -------------------------------------------------------------------------------------

def test_simulate_refuses_4bit_experts(capsys, monkeypatch):
    pytest.importorskip("transformers")
    import importlib

    package = importlib.import_module("vramplan.simulate")
    monkeypatch.setattr(package, "simulate", lambda *a, **k: pytest.fail("simulated despite --experts 4bit"))
    code, out, err = cli(capsys, "simulate", MIXTRAL, "--experts", "4bit")
    assert (code, out) == (1, "")
    assert err.startswith("Error: simulate cannot build mistralai/Mixtral-8x7B-v0.1 with 4-bit experts: transformers ")
    assert err.endswith("keeps MoE experts as fused 3-D parameters that bitsandbytes does not quantize (hint: "
                        "--experts 4bit is estimate-only (vramplan estimate); drop it to simulate the 16-bit "
                        "experts transformers 5 trains)\n")
    from vramplan.simulate._driver import simulate
    with pytest.raises(SimulationError):
        simulate(tiny_mixtral(), TrainSetup(experts="4bit"))


def test_simulate_states_how_moe_routing_ran():
    pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")
    from vramplan.simulate._driver import simulate

    trace = simulate(tiny_mixtral(), TrainSetup(seq=32))
    moe = [n for n in trace.notes if n.startswith("MoE")]
    assert len(moe) == 1 and "grouped_mm" in moe[0] and "4 experts, top-2" in moe[0]
    # Llama 4 repeats every token for every expert and runs torch.bmm: no grouped_mm to name
    llama4 = spec_from_config(tiny_config("llama4_text", num_local_experts=4, head_dim=16), "tiny-llama4", "test")
    trace = simulate(llama4, TrainSetup(seq=32, targets="q_proj,v_proj"))
    moe = [n for n in trace.notes if n.startswith("MoE")]
    assert len(moe) == 1 and "grouped_mm" not in moe[0] and "every token through every expert" in moe[0]


# --- DeepSeek-V3: the same warning, routed experts only ---------------------------------------------

DEEPSEEK = "moonshotai/Moonlight-16B-A3B"


def test_deepseek_v3_warns_that_routed_experts_stay_16bit(capsys):
    code, out, _ = cli(capsys, "estimate", DEEPSEEK, "--json")
    data = json.loads(out)
    assert code == 0 and len(data["warnings"]) == 1
    sixteen, four = expert_weight_bytes(estimate(DEEPSEEK).model, TrainSetup())
    assert data["warnings"][0].startswith("MoE experts stay 16-bit") and f"({sixteen:,} bytes)" in data["warnings"][0]
    _, out, _ = cli(capsys, "estimate", DEEPSEEK, "--experts", "4bit", "--json")
    assert json.loads(out)["warnings"] == []


def test_deepseek_v3_sixteen_bit_expert_bytes_are_the_transformers_expert_parameters():
    """Only the routed experts (DeepseekV3Experts, in the MoE layers above first_k_dense_replace)
    stay 16-bit: the dense and shared-expert MLPs are nn.Linear, which bitsandbytes quantizes."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from pathlib import Path

    config = json.loads((Path(__file__).parent / "configs" / "deepseek-v3-mla.json").read_text())
    spec = spec_from_config(config, "tiny-deepseek", "test")
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(
            transformers.CONFIG_MAPPING["deepseek_v3"].from_dict(config), dtype=torch.bfloat16)
    experts = [p for name, p in model.named_parameters() if ".experts." in name]
    assert len(experts) == 2 * spec.moe_layers == 2 * (spec.layers - config["first_k_dense_replace"])
    sixteen, four = expert_weight_bytes(spec, TrainSetup())
    assert sixteen == sum(alloc(p.numel() * p.element_size()) for p in experts)
    per_expert = 2 * _linear4bit_bytes(spec.hidden, spec.expert_width) + _linear4bit_bytes(spec.expert_width, spec.hidden)
    assert four == spec.moe_layers * spec.num_experts * per_expert


def test_gpt_oss_experts_stay_16bit_with_their_biases():
    """gpt-oss under QLoRA: GptOssExperts' 3D stacks and their biases are what the warning quotes
    (every `.experts.` parameter transformers builds); the router is not an nn.Linear either, so only
    q/k/v/o are quantized and all-linear adapts nothing else."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = tiny_config("gpt_oss", num_hidden_layers=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                         intermediate_size=64)
    spec = spec_from_config(config, "tiny-gpt-oss", "test")
    hf = transformers.CONFIG_MAPPING["gpt_oss"].from_dict(config)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf, dtype=torch.bfloat16)
    experts = [p for name, p in model.named_parameters() if ".experts." in name]
    assert len(experts) == 4 * spec.layers      # gate_up_proj, its bias, down_proj, its bias
    sixteen, _ = expert_weight_bytes(spec, TrainSetup())
    assert sixteen == sum(alloc(p.numel() * p.element_size()) for p in experts)
    warning = estimate(spec, TrainSetup(attn="eager")).warnings[0]
    assert warning.startswith("MoE experts stay 16-bit") and f"({sixteen:,} bytes)" in warning
    assert "merged 16-bit copy" not in warning and "--experts 4bit" not in warning
    s = static_memory(spec, TrainSetup(attn="eager"))
    assert set(s.adapted) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    r = 16
    assert s.trainable_params == spec.layers * sum(r * l.in_features + l.out_features * r for l in spec.layer_linears)


def test_simulate_runs_float32_experts_as_cuda_does_and_says_so():
    """prepare_model_for_kbit_training makes the experts float32: CUDA's torch._grouped_mm takes
    them through its per-group fallback, the meta kernel would refuse them (bf16 only)."""
    pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")
    from vramplan.simulate._driver import simulate

    spec = spec_from_config(tiny_config("gpt_oss", head_dim=16, num_local_experts=4, num_experts_per_tok=2),
                            "tiny-gpt-oss", "test")
    trace = simulate(spec, TrainSetup(seq=32, attn="eager", prepare_kbit=True))
    assert any(n.startswith("MoE experts in float32: torch._grouped_mm run as CUDA's per-group fallback")
               for n in trace.notes)
    est = estimate(spec, TrainSetup(seq=32, attn="eager", prepare_kbit=True))
    assert est.components["weights"] == trace.components["weights"]


@pytest.mark.parametrize("experts, says", [
    ("16bit", "and the router and the expert stacks (ParamWrapper; gate_up_proj at rank 2r)"),
    ("4bit", "and the router and each expert's w1, w2, w3 (Linear4bit)")])
def test_the_lora_assumption_names_the_adapted_experts(experts, says):
    """Under all-linear almost all of an MoE model's trainable parameters are the experts'
    adapters: the assumption that names what LoRA adapts says so, not attention alone."""
    est = estimate("Qwen/Qwen3-30B-A3B", TrainSetup(experts=experts))
    line = next(a for a in est.assumptions if a.startswith("LoRA rank 16 on"))
    assert line.startswith("LoRA rank 16 on k_proj, o_proj, q_proj, v_proj " + says)
    dense = estimate("Qwen/Qwen3-30B-A3B", TrainSetup(targets="q_proj,v_proj"))
    assert next(a for a in dense.assumptions if a.startswith("LoRA")).startswith("LoRA rank 16 on q_proj, v_proj,")
