"""simulate.step: the real transformers + peft + bitsandbytes step on the meta device.

Tiny configs (hidden 64, 2 layers, vocab 128): every run takes well under a second; the meta runs
are checked against the same tiny step run for real on the CPU, counted by the same tracker."""
from __future__ import annotations

import dataclasses
import importlib
import json
import subprocess
import sys

import pytest
from conftest import requires

pytestmark = requires("torch", "transformers", "peft", "bitsandbytes")

from vramplan.core._components import ALLOCATED, PHASES  # noqa: E402
from vramplan.core._errors import ModelError, SimulationError, UsageError  # noqa: E402
from vramplan.core._setup import TrainSetup  # noqa: E402
from vramplan.simulate import Trace, simulate as run  # noqa: E402

from vramplan.simulate import _step as sim_run  # noqa: E402
from vramplan.simulate._attribution import component_of  # noqa: E402
from vramplan.cuda._arch import ASSUMED  # noqa: E402
from vramplan.cuda._cublas import step_workspace_bytes  # noqa: E402
kernels = importlib.import_module("vramplan.simulate._kernels")
build_mod = importlib.import_module("vramplan.simulate._build")

SEQ, RANK = 32, 8
# the emulated GPU's cuBLAS workspace (live from the warm-up step on): a meta trace has it, a real
# CPU run has no counterpart (vramplan/cuda/_cublas.py)
CUBLAS = step_workspace_bytes(ASSUMED)   # forward and backward threads (vramplan/cuda/_cublas.py)


def setup_(**kw) -> TrainSetup:
    return TrainSetup(seq=kw.pop("seq", SEQ), rank=kw.pop("rank", RANK), **kw)


_CACHE: dict = {}


def traced(spec, device="meta", **kw) -> Trace:
    key = (spec.id, json.dumps(spec.config, sort_keys=True), device, json.dumps(kw, sort_keys=True))
    if key not in _CACHE:
        _CACHE[key] = run(spec, setup_(**kw), device=device)
    return _CACHE[key]


# --- the package stays light ---------------------------------------------------------------------

def test_importing_vramplan_and_simulate_does_not_import_torch():
    code = "import sys, vramplan, vramplan.simulate; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --- the trace ------------------------------------------------------------------------------------

def test_trace_shape_and_invariants(tiny_spec):
    t = traced(tiny_spec())
    assert set(t.components) == {c.value for c in ALLOCATED}
    # (the components adding up to the peak is enforced by step.py's check_sum before a Trace exists)
    assert all(v % 512 == 0 and v >= 0 for v in t.components.values())
    assert t.peak_phase in PHASES and t.peak_op and t.peak_module
    assert set(t.phase_peaks) == {"forward", "backward", "optimizer"}
    assert max(t.phase_peaks.values()) == t.peak_allocated_bytes
    assert set(t.boundaries) == {"start", "forward_end", "backward_end", "optimizer_end"}
    assert t.boundaries["optimizer_end"] == t.boundaries["start"]  # steady state: the step returns to it
    assert t.strays == 0 and t.paged_optimizer_bytes == 0
    assert t.attention == {"flash": 4, "efficient": 0, "math": 0}  # 2 layers, forward + recompute
    assert max(row[-1] for row in t.timeline) == t.peak_allocated_bytes
    assert all(len(row) == 5 for row in t.timeline)
    assert t.top_modules and all(isinstance(m, str) and b > 0 for m, b in t.top_modules)
    json.dumps(t.to_dict())  # data first: plain JSON


def test_everything_live_before_the_step_is_registered(tiny_spec):
    """The tracker's live state equals every meta storage Python can reach (a gc scan)."""
    import gc

    import torch

    with sim_run.Simulation(tiny_spec(), setup_(), "meta") as sim:
        sim.warm_up()
        tracker = sim.live_tracker()
        gc.collect()
        reachable = {o.untyped_storage()._cdata for o in gc.get_objects()
                     if isinstance(o, torch.Tensor) and o.device.type == "meta"}
        assert {b.key for b in tracker.live_blocks()} == reachable


# --- static components are exact ------------------------------------------------------------------

def _expected_static(model) -> dict:
    """weights / quant_constants / adapters straight from the model's tensors, storages counted once."""
    from vramplan.simulate._tracker import round_up

    seen, out = set(), {"weights": 0, "quant_constants": 0, "adapters": 0}

    def add(t, kind):
        if t is None or t.untyped_storage()._cdata in seen:
            return
        seen.add(t.untyped_storage()._cdata)
        out[kind] += round_up(t.untyped_storage().nbytes())

    for module in model.modules():
        qs = getattr(getattr(module, "weight", None), "quant_state", None)
        if qs is not None:
            for t in (qs.absmax, qs.code, qs.offset):
                add(t, "quant_constants")
            if qs.state2 is not None:
                add(qs.state2.absmax, "quant_constants")
                add(qs.state2.code, "quant_constants")
        state = getattr(module, "state", None)
        if state is not None and hasattr(state, "SCB"):
            add(state.SCB, "quant_constants")
            add(getattr(module.weight, "SCB", None), "quant_constants")
    for name, p in model.named_parameters():
        add(p, "adapters" if "lora_" in name else "weights")
    for _, b in model.named_buffers():
        add(b, "weights")
    return out


@pytest.mark.parametrize("kw", [{}, {"double_quant": False}, {"quant": "int8"}, {"method": "lora"},
                                {"method": "full"}, {"prepare_kbit": True}])
def test_weights_quant_constants_adapters_are_exact(tiny_spec, kw):
    spec = tiny_spec()
    t = traced(spec, **kw)
    built = build_mod.build(spec, setup_(**kw), "meta")
    expected = _expected_static(built.model)
    assert {k: t.components[k] for k in expected} == expected


def test_quant_constants_match_the_bitsandbytes_layout(tiny_spec):
    """nf4 + double quant, per Linear4bit: absmax uint8 n/64, code 16 fp32, offset fp32 scalar,
    state2.absmax fp32 per 256 blocks, state2.code 256 fp32; each storage rounded to 512 B."""
    from vramplan.simulate._tracker import round_up

    spec = tiny_spec()
    t = traced(spec)
    per_layer = sum(round_up(lin.numel // 64) + round_up(16 * 4) + round_up(4)
                    + round_up(4 * -(-lin.numel // 64 // 256)) + round_up(256 * 4) for lin in spec.layer_linears)
    assert t.components["quant_constants"] == spec.layers * per_layer
    packed = spec.layers * sum(round_up(lin.numel // 2) for lin in spec.layer_linears)
    embed = round_up(spec.vocab * spec.hidden * 2)
    norms = (2 * spec.layers + 1) * round_up(spec.hidden * 2)
    rope = 2 * round_up(spec.head_dim // 2 * 4)  # inv_freq and original_inv_freq buffers
    assert t.components["weights"] == packed + 2 * embed + norms + rope


# --- meta agrees with a real CPU run --------------------------------------------------------------

AGREEMENT = [
    ("llama", {}),
    ("llama", {"grad_ckpt": False}),
    ("llama", {"attn": "eager"}),
    ("llama", {"method": "lora"}),
    ("llama", {"method": "full"}),
    ("llama", {"quant": "int8"}),
    ("llama", {"optimizer": "adamw8bit"}),
    ("qwen2", {}),
    ("mixtral", {}),
]


@pytest.mark.parametrize("model_type, kw", AGREEMENT)
def test_meta_peak_within_1pct_of_real_cpu_run(tiny_spec, model_type, kw):
    spec = tiny_spec(model_type)
    meta, cpu = traced(spec, "meta", **kw), traced(spec, "cpu", **kw)
    cublas = CUBLAS
    assert meta.components["temporaries"] >= cublas
    peak = meta.peak_allocated_bytes - cublas
    assert abs(peak - cpu.peak_allocated_bytes) <= 0.01 * cpu.peak_allocated_bytes
    for name in ("start", "backward_end", "optimizer_end"):  # live state, grads: byte for byte
        assert meta.boundaries[name] - cublas == cpu.boundaries[name]
    # forward_end: flash attention saves a philox seed/offset pair per layer on CUDA, not on CPU
    fwd_end = meta.boundaries["forward_end"] - cublas
    assert abs(fwd_end - cpu.boundaries["forward_end"]) <= 0.01 * cpu.boundaries["forward_end"]
    if kw.get("attn") == "eager":             # no CUDA kernel emulated: the same step, the same bytes
        assert peak == cpu.peak_allocated_bytes
        assert {**meta.components, "temporaries": meta.components["temporaries"] - cublas} == cpu.components


# --- components ------------------------------------------------------------------------------------

def test_logits_loss_at_the_loss_backward_peak(tiny_spec):
    spec = tiny_spec()
    t = traced(spec, grad_ckpt=False)
    assert t.peak_op == "aten._log_softmax_backward_data.default" and t.peak_module == "loss"
    fp32_logits = SEQ * spec.vocab * 4
    # log-softmax output (saved), its gradient from nll_loss_backward, and the new gradient
    assert t.components["logits_loss"] >= 3 * fp32_logits
    assert t.components["gradients"] == 0  # no .grad exists yet at the start of backward


def test_gradients_and_optimizer_state(tiny_spec):
    t = traced(tiny_spec(), attn="eager")   # its peak is deep in backward: some grads exist
    assert 0 < t.components["gradients"] <= t.components["adapters"]
    assert t.components["optimizer_state"] == 2 * t.components["adapters"]  # AdamW: two fp32 moments


def test_dequantized_weights_are_temporaries(tiny_spec):
    with sim_run.Simulation(tiny_spec(), setup_(), "meta") as sim:
        sim.warm_up()
        tracker = sim.measure()
    dequant = [b for b in tracker.blocks if b.op == "bitsandbytes.dequantize_4bit.default"]
    assert dequant and all(component_of(b) == "temporaries" for b in dequant)
    optimizer = [b for b in tracker.blocks if b.where and b.where[0] == "optimizer"]
    assert optimizer and all(component_of(b) == "temporaries" for b in optimizer)


def test_paged_optimizer_state_is_reported_apart(tiny_spec):
    """bitsandbytes pages state of tensors with >= 1e5 elements (optimizer.py get_state_buffer);
    smaller ones get ordinary device buffers. Paged bytes are not allocated bytes."""
    from vramplan.simulate._tracker import round_up

    spec = tiny_spec(vocab_size=2048)   # embed / lm_head of 131072 elements: paged
    t = traced(spec, method="full", optimizer="paged_adamw")
    params = list(build_mod.build(spec, setup_(method="full"), "meta").model.parameters())
    big = [p for p in params if p.numel() >= 1e5]
    assert len(big) == 2
    assert t.paged_optimizer_bytes == sum(2 * p.numel() * 4 for p in big)   # two fp32 states each
    assert t.components["optimizer_state"] == sum(2 * round_up(p.numel() * 4) for p in params if p.numel() < 1e5)


@pytest.mark.parametrize("kw", [{"optimizer": "sgd"}, {"optimizer": "adafactor"},
                                {"optimizer": "paged_adamw8bit"}, {"quant": "fp4"},
                                {"targets": "q_proj,v_proj"}, {"lora_dropout": 0.1}, {"batch": 2},
                                {"dtype": "fp16"}, {"dtype": "fp32"}])
def test_setups_run(tiny_spec, kw):
    t = traced(tiny_spec(), **kw)
    assert t.peak_allocated_bytes > 0 and t.strays == 0


def test_checkpointing_keeps_fewer_activations(tiny_spec):
    spec = tiny_spec()
    on, off = traced(spec), traced(spec, grad_ckpt=False)
    assert on.boundaries["forward_end"] < off.boundaries["forward_end"]


def test_fp32_gqa_without_mask_falls_back_to_math(tiny_spec):
    # flash needs fp16/bf16; memory-efficient has no GQA: a GPU runs the math kernel
    assert traced(tiny_spec(), dtype="fp32").attention == {"flash": 0, "efficient": 0, "math": 4}


# --- mixture of experts ----------------------------------------------------------------------------

def test_mixtral_eager_experts_routing_is_answered(tiny_spec):
    """The eager expert loop uses nonzero / torch.where / item: answered as even routing."""
    spec = tiny_spec("mixtral", experts_implementation="eager")
    meta, cpu = traced(spec, "meta"), traced(spec, "cpu")
    assert meta.strays == 0
    assert abs(meta.peak_allocated_bytes - CUBLAS - cpu.peak_allocated_bytes) <= 0.01 * cpu.peak_allocated_bytes


def test_peft_all_linear_adapts_mixtral_experts(tiny_spec):
    """peft 0.21 `all-linear` on a transformers-5 Mixtral also targets the 3D expert parameters and
    the router (LoraConfig.target_parameters), not only the attention Linears."""
    spec = tiny_spec("mixtral")
    built = build_mod.build(spec, setup_(), "meta")
    targeted = built.model.peft_config["default"].target_parameters
    assert {"gate_up_proj", "down_proj"} <= set(targeted)
    attention_only = traced(spec, targets="q_proj,k_proj,v_proj,o_proj")
    assert traced(spec).components["adapters"] > attention_only.components["adapters"]


# --- kernels -----------------------------------------------------------------------------------------

def test_gemm_4bit_dispatch_follows_bitsandbytes():
    import torch

    from vramplan.cuda._gemm_4bit import gemm_4bit_uses_fused_kernel

    assert gemm_4bit_uses_fused_kernel(1, 4096, 4096, "bf16")
    assert not gemm_4bit_uses_fused_kernel(2048, 4096, 4096, "bf16")   # > 1536 rows
    assert not gemm_4bit_uses_fused_kernel(600, 11008, 4096, "bf16")   # > 512, big weight
    assert gemm_4bit_uses_fused_kernel(6, 4096, 4096, "fp32") is True   # fp32: M < 8
    assert gemm_4bit_uses_fused_kernel(8, 4096, 4096, "fp32") is False
    # the simulator asks the same rule with torch dtypes
    assert kernels.gemm_4bit_fused(600, 11008, 4096, torch.bfloat16) is False
    assert kernels.gemm_4bit_fused(1, 4096, 4096, torch.float16) is True
    with pytest.raises(ValueError):
        gemm_4bit_uses_fused_kernel(1, 4096, 4096, "float16")


def test_cuda_package_is_torch_free():
    code = "import sys, vramplan.cuda._gemm_4bit; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_even_routing_rows():
    import torch

    routing = kernels.Routing(num_experts=4, top_k=2, tokens=10)
    assert routing.nonzero_rows(torch.empty(5, device="meta")) == 4
    rows = [routing.nonzero_rows(torch.empty(2, 10, device="meta")) for _ in range(4)]
    assert sum(rows) == 20 and max(rows) - min(rows) <= 1
    assert kernels.Routing().nonzero_rows(torch.empty(3, 7, device="meta")) == 21


def test_unknown_data_dependent_value_is_a_clear_error():
    import torch

    from vramplan.simulate._tracker import AllocationTracker

    tracker = AllocationTracker("meta", overrides=kernels.cuda_overrides())
    with tracker:
        x = torch.zeros(3, device="meta")
        assert bool((x == 0).all()) is True        # a mask check: all-ones answer
        with pytest.raises(SimulationError, match="data-dependent"):
            int(x.sum())


# --- errors ---------------------------------------------------------------------------------------

def test_targets_matching_nothing_is_a_model_error(tiny_spec):
    with pytest.raises(ModelError, match="matches no module") as info:
        run(tiny_spec(), setup_(targets="query_key_value"))
    assert "q_proj" in info.value.hint


def test_architecture_unknown_to_transformers_is_a_model_error(tiny_spec):
    spec = dataclasses.replace(tiny_spec(), model_type="notamodel", config={"model_type": "notamodel"})
    with pytest.raises(ModelError, match="not known to transformers"):
        run(spec, setup_())


def test_gemma2_sdpa_is_refused_by_transformers(tiny_spec):
    with pytest.raises(ModelError) as info:
        run(tiny_spec("gemma2"), setup_())
    assert "--attn eager" in info.value.hint
    assert traced(tiny_spec("gemma2"), attn="eager").strays == 0


def test_device_must_be_meta_or_cpu(tiny_spec):
    with pytest.raises(UsageError):
        run(tiny_spec(), setup_(), device="cuda")
