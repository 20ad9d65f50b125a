"""Properties of the analytic estimate that must hold whatever the calibration."""
import pytest
from hypothesis import given, settings, strategies as st

from vramplan import TrainSetup, estimate
from vramplan.core._components import ALLOCATED
from vramplan.estimate._inventory import static_memory
from vramplan.core._models import catalog, resolve
from vramplan.estimate._quant import bits_per_param

MODELS = sorted(catalog())


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("method", ["qlora", "lora", "full"])
def test_every_catalog_model_estimates_with_integer_components(model, method):
    # (the peak is the sum of these components by construction: that sum is not a check)
    spec = resolve(model)
    attention = spec.arch.attention   # Gemma-2 and gpt-oss train with eager attention only
    attn = "sdpa" if "sdpa" in attention else attention[0]
    flags = {}
    if spec.arch.linear_router and method != "full":   # Llama 4: all-linear would wrap its router
        flags["targets"] = ",".join(dict.fromkeys(l.leaf for l in spec.layer_linears))
    est = estimate(model, method=method, attn=attn, **flags)
    assert set(est.components) == {c.value for c in ALLOCATED}
    assert all(isinstance(v, int) and v >= 0 for v in est.components.values())
    assert est.device_total_bytes > est.peak_allocated_bytes


# Published parameter counts (model cards; the same figures test_models checks the inventory
# against) and peft's trainable count for r=16 all-linear (print_trainable_parameters).
# bf16 base weights: 2 bytes/param; peft adapters in fp32, 4 bytes/param
# (docs/peft-transformers.md#adapter-dtype-autocast_adapter_dtype); torch AdamW: 2 states in the
# parameter dtype (docs/autograd.md#adamw-foreach-vs-fused).
# Tolerance: each tensor is rounded up to the allocator's 512 B block.
@pytest.mark.parametrize("model, params", [("meta-llama/Llama-2-7b-hf", 6_738_415_616),
                                           ("mistralai/Mistral-7B-v0.1", 7_241_732_096),
                                           ("Qwen/Qwen2.5-0.5B", 494_032_768)])
def test_static_components_follow_published_parameter_counts(model, params):
    lora = estimate(model, method="lora")
    assert lora.components["weights"] == pytest.approx(2 * params, rel=1e-4)
    assert lora.components["adapters"] == pytest.approx(4 * lora.trainable_params, rel=1e-3)
    assert lora.components["optimizer_state"] == pytest.approx(2 * 4 * lora.trainable_params, rel=1e-3)
    full = estimate(model, method="full")
    assert full.trainable_params == params
    assert full.phase_components["optimizer"]["weights"] == pytest.approx(2 * params, rel=1e-4)
    assert full.phase_components["optimizer"]["gradients"] == pytest.approx(2 * params, rel=1e-4)
    assert full.phase_components["optimizer"]["optimizer_state"] == pytest.approx(2 * 2 * params, rel=1e-4)


def test_llama2_7b_lora_adapters_match_peft_trainable_count():
    assert estimate("meta-llama/Llama-2-7b-hf", method="lora").components["adapters"] == \
        pytest.approx(4 * 39_976_960, rel=1e-3)


def test_trainable_params_match_peft_for_llama2_7b_r16_all_linear():
    # peft print_trainable_parameters for Llama-2-7b, r=16, all-linear: 39,976,960
    assert estimate("meta-llama/Llama-2-7b-hf").trainable_params == 39_976_960


def test_double_quant_bits_per_param_match_the_qlora_paper():
    # QLoRA sec. 3: 4 + 32/64 = 4.5 bits without, 4 + 8/64 + 32/(64*256) = 4.127 with DQ
    assert bits_per_param("nf4", 4096, 11008, False) == pytest.approx(4.5, abs=1e-3)
    assert bits_per_param("nf4", 4096, 11008, True) == pytest.approx(4.127, abs=1e-3)


def test_double_quant_saves_about_3gb_on_70b():
    spec = resolve("meta-llama/Llama-2-70b-hf")
    saved = (static_memory(spec, TrainSetup(double_quant=False)).quant_constants
             - static_memory(spec, TrainSetup()).quant_constants)
    # ~0.373 bits/param of the quantized linears (QLoRA paper: ~3 GB on 65B)
    assert 2.8e9 < saved < 3.4e9


@settings(max_examples=40, deadline=None)
@given(batch=st.integers(1, 16), seq=st.sampled_from([128, 512, 1024, 2048, 4096, 8192]),
       ckpt=st.booleans(), attn=st.sampled_from(["sdpa", "eager"]),
       model=st.sampled_from(["meta-llama/Llama-2-7b-hf", "meta-llama/Meta-Llama-3-8B", "Qwen/Qwen2.5-0.5B",
                              "microsoft/Phi-3-mini-4k-instruct", "mistralai/Mixtral-8x7B-v0.1"]))
def test_more_tokens_never_need_less_memory(batch, seq, ckpt, attn, model):
    base = estimate(model, batch=batch, seq=seq, grad_ckpt=ckpt, attn=attn).peak_allocated_bytes
    assert estimate(model, batch=batch + 1, seq=seq, grad_ckpt=ckpt, attn=attn).peak_allocated_bytes >= base
    assert estimate(model, batch=batch, seq=seq * 2, grad_ckpt=ckpt, attn=attn).peak_allocated_bytes >= base


@pytest.mark.parametrize("seq", [512, 2048, 8192])
def test_checkpointing_and_sdpa_save_memory(seq):
    m = "meta-llama/Llama-2-7b-hf"
    assert estimate(m, seq=seq, grad_ckpt=True).peak_allocated_bytes < estimate(m, seq=seq, grad_ckpt=False).peak_allocated_bytes
    assert estimate(m, seq=seq, attn="sdpa").peak_allocated_bytes < estimate(m, seq=seq, attn="eager").peak_allocated_bytes


def test_paged_optimizer_state_leaves_allocated_memory():
    plain = estimate("meta-llama/Llama-2-7b-hf", optimizer="adamw8bit")
    paged = estimate("meta-llama/Llama-2-7b-hf", optimizer="paged_adamw8bit")
    total = plain.components["optimizer_state"]
    assert paged.paged_optimizer_bytes > 0
    # bitsandbytes pages only tensors of >= 1e5 elements: r=16 LoRA A of 16 x 4096 stays on the device
    assert 0 < paged.components["optimizer_state"] < total
    assert paged.components["optimizer_state"] + paged.paged_optimizer_bytes == total


def test_methods_order_weights():
    m = "meta-llama/Llama-2-7b-hf"
    q, l, f = (estimate(m, method=x).components for x in ("qlora", "lora", "full"))
    assert q["weights"] < l["weights"] == f["weights"]
    assert f["adapters"] == 0 and q["quant_constants"] > 0 and l["quant_constants"] == 0


def test_gpu_verdict_and_headroom():
    est = estimate("meta-llama/Llama-2-7b-hf", gpu="24GB")
    assert est.fits is True and est.headroom_bytes == 24 * 10**9 - est.device_total_bytes
    est = estimate("meta-llama/Llama-2-70b-hf", gpu="T4")
    assert est.fits is False and est.headroom_bytes < 0


def test_mixtral_experts_stay_16_bit_under_transformers_5():
    est = estimate("mistralai/Mixtral-8x7B-v0.1")
    assert est.components["weights"] > 80e9  # 45B expert parameters in bf16
    assert any("Mixtral experts" in a for a in est.assumptions)


def test_gemma2_refuses_sdpa_like_transformers():
    from vramplan.core._errors import ModelError

    with pytest.raises(ModelError) as info:
        estimate("google/gemma-2-9b", attn="sdpa")
    assert "--attn eager" in str(info.value)
    # without attn, what from_pretrained picks for it: eager
    assert estimate("google/gemma-2-9b").peak_allocated_bytes == \
        estimate("google/gemma-2-9b", attn="eager").peak_allocated_bytes > 0


def test_a_sequence_past_the_config_context_is_warned_about_not_refused():
    # TinyLlama's config.json: max_position_embeddings 2048. The step runs at any length (RoPE), so
    # the estimate answers, and the verdict line says the model was not trained that long.
    spec = resolve("TinyLlama/TinyLlama-1.1B-Chat-v1.0")
    assert estimate(spec, TrainSetup(seq=2048)).warnings == ()
    longer = estimate(spec, TrainSetup(seq=2049))
    assert longer.warnings == ("seq 2,049 is longer than the model's context (max_position_embeddings 2,048 in "
                               "config.json): memory is estimated at that length, but the model was not trained "
                               "for it",)
    assert longer.peak_allocated_bytes > estimate(spec, TrainSetup(seq=2048)).peak_allocated_bytes


def test_an_estimate_whose_components_a_caller_changes_leaves_the_next_one_alone():
    """The step's moments are cached per setup (the planner asks twice): each estimate gets its own."""
    first = estimate("meta-llama/Llama-2-7b", seq=1024)
    weights = first.components["weights"]
    for parts in first.moments.values():
        parts["weights"] += 1
    second = estimate("meta-llama/Llama-2-7b", seq=1024)
    assert second.components["weights"] == weights
    assert sum(second.components.values()) == second.peak_allocated_bytes
