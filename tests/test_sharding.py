"""Per-GPU memory under DDP / FSDP / ZeRO: invariants, engine formulas, bad input, and the
comparison with Answer.AI's published FSDP + QLoRA per-GPU measurements."""
import csv
from pathlib import Path

import pytest

from vramplan import TrainSetup, estimate
from vramplan.cli import main
from vramplan.core._errors import UsageError
from vramplan.core._models import resolve, spec_from_config
from vramplan.plan._sharding import (DS_REDUCE_BUCKET, NCCL_BYTES, STRATEGIES, Parallel, gathered_units, per_gpu,
                                     splits_for)

GiB = 2**30
LLAMA2_7B = resolve("meta-llama/Llama-2-7b-hf")
LLAMA2_70B = resolve("meta-llama/Llama-2-70b-hf")


@pytest.mark.parametrize("model", ["meta-llama/Llama-2-7b-hf", "google/gemma-2-2b", "microsoft/Phi-3-mini-4k-instruct",
                                   "mistralai/Mixtral-8x7B-v0.1"])
@pytest.mark.parametrize("method", ["qlora", "lora", "full"])
def test_single_gpu_is_the_estimate_to_the_byte(model, method):
    setup = TrainSetup(method=method, batch=2, seq=1024, attn="eager" if "gemma" in model else "sdpa")
    est = estimate(model, setup)
    one = per_gpu(model, setup)
    assert one.components == est.components
    assert one.peak_allocated_bytes == est.peak_allocated_bytes
    assert one.device_total_bytes == est.device_total_bytes
    assert one.phase_peaks == est.phase_peaks
    assert one.comm_bytes == 0 and one.cpu_bytes == 0


@pytest.mark.parametrize("strategy", STRATEGIES[1:])
@pytest.mark.parametrize("offload", ["none", "cpu"])
@pytest.mark.parametrize("method", ["qlora", "lora", "full"])
def test_every_term_names_its_source(strategy, offload, method):
    # (the peak and components are sums of these terms by construction: not asserted here)
    if offload == "cpu" and strategy == "ddp":
        pytest.skip("DDP cannot offload")
    e = per_gpu(LLAMA2_7B, TrainSetup(method=method, batch=2, seq=512), gpus=4, strategy=strategy, offload=offload)
    assert e.terms and all(t.source and t.held for t in e.terms)
    assert e.comm_bytes == NCCL_BYTES


# ZeRO paper (Rajbhandari et al. 2020, sec. 5 and fig. 1): with mixed-precision Adam each GPU
# holds 2 bytes/param of bf16 weights (divided by N under stage 3) and K = 12 bytes/param of
# optimizer state (fp32 master weights, momentum, variance) divided by N from stage 1 on.
# FSDP full_shard divides the bf16 weights and torch AdamW's states (2 x 2 bytes/param in the
# parameter dtype, docs/autograd.md#adamw-foreach-vs-fused) by N. Psi: Llama-2-7B's published
# parameter count (model card). Tolerance: each shard is rounded up to the 512 B allocator block.
# ZeRO-3 keeps parameters of at most stage3_param_persistence_threshold (1e5) elements whole on
# every GPU (deepspeed/runtime/zero/config.py): Llama-2-7B's 2 x 32 + 1 RMSNorm weights of 4096.
PSI_LLAMA2_7B = 6_738_415_616
PERSISTENT_LLAMA2_7B = 65 * 4096


@pytest.mark.parametrize("gpus", [2, 4, 8])
@pytest.mark.parametrize("strategy, weights_per_param, optimizer_per_param", [
    ("ddp", lambda n: 2, lambda n: 4),
    ("zero2", lambda n: 2, lambda n: 12 / n),
    ("zero3", lambda n: 2 / n + 2 * (1 - 1 / n) * PERSISTENT_LLAMA2_7B / PSI_LLAMA2_7B, lambda n: 12 / n),
    ("fsdp", lambda n: 2 / n, lambda n: 4 / n),
])
def test_full_fine_tuning_model_states_per_gpu_follow_the_zero_paper(gpus, strategy, weights_per_param,
                                                                      optimizer_per_param):
    e = per_gpu(LLAMA2_7B, TrainSetup(method="full", batch=1, seq=512), gpus=gpus, strategy=strategy)
    at_step = e.phase_components["optimizer"]
    assert at_step["weights"] == pytest.approx(weights_per_param(gpus) * PSI_LLAMA2_7B, rel=1e-4)
    assert at_step["optimizer_state"] == pytest.approx(optimizer_per_param(gpus) * PSI_LLAMA2_7B, rel=1e-4)


def test_sharding_shrinks_static_memory_and_never_activations():
    setup = TrainSetup(batch=1, seq=2048)
    single = per_gpu(LLAMA2_70B, setup)
    needs = [per_gpu(LLAMA2_70B, setup, gpus=n, strategy="fsdp").peak_allocated_bytes for n in (2, 4, 8, 16)]
    assert needs == sorted(needs, reverse=True) and needs[0] < single.peak_allocated_bytes
    ddp = per_gpu(LLAMA2_70B, setup, gpus=2, strategy="ddp")
    assert ddp.peak_allocated_bytes >= single.peak_allocated_bytes
    for n in (2, 8):
        e = per_gpu(LLAMA2_70B, setup, gpus=n, strategy="fsdp")
        per_rank = [t for t in e.terms if t.held == "per rank"]
        assert sum(t.bytes for t in per_rank if t.component == "activations") == e.components["activations"]
    # quant_state is not a parameter: replicated, the same on 2 and 8 GPUs.
    q = [per_gpu(LLAMA2_70B, setup, gpus=n, strategy="fsdp").components["quant_constants"] for n in (2, 8)]
    assert q[0] == q[1] == single.components["quant_constants"] > 0


def test_fsdp_gathers_two_layer_units_and_keeps_the_root():
    setup = TrainSetup(batch=1, seq=512)
    e = per_gpu(LLAMA2_70B, setup, gpus=8, strategy="fsdp")
    sp = splits_for(LLAMA2_70B, setup, e.parallel)
    gathered = {t.part: t.bytes for t in e.terms if t.held == "gathered" and t.component == "weights"}
    assert gathered["root unit unsharded (embeddings, norm, lm_head)"] == sp.root_weights
    assert gathered["2 decoder-layer units unsharded (current + prefetched)"] == 2 * sp.unit_weights
    # root = embeddings + lm_head + final norm + rotary buffer, in bf16
    assert sp.root_weights >= 2 * 32000 * 8192 * 2
    assert sp.layers * sp.unit_weights + sp.root_weights == sp.weights
    shard = next(t.bytes for t in e.terms if t.part.startswith("weight shards"))
    assert shard == pytest.approx(sp.weights / 8, rel=1e-3)


LLAMA4_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def test_fsdp_shards_interleaved_dense_layers_as_units_of_their_own():
    """tests/configs/llama4-maverick.json (Maverick's layout shrunk: dense layers 0 and 2, MoE
    layers 1 and 3 with 128 experts), QLoRA nf4 in bf16 with rank-16 float32 adapters, 4 GPUs.
    Worked by hand: a dense unit is q/o 512x512 and k/v 512x128 packed 4-bit (numel / 2 bytes),
    gate/up/down 512x1024 packed, two bf16 norms of 512; a MoE unit the same attention, the shared
    expert's gate/up/down 512x256 packed, the bf16 router (128, 512) and experts gate_up (128, 512,
    512) and down (128, 256, 512), the norms. The root is the embedding and lm_head (512 x 512
    bf16), the final norm and the rotary inv_freq pair (2 x 32 float32, 512-byte blocks)."""
    import json

    spec = spec_from_config(json.loads((Path(__file__).parent / "configs" / "llama4-maverick.json").read_text()),
                            "llama4-maverick", "tests/configs")
    attention = 2 * 512 * 512 // 2 + 2 * 512 * 128 // 2
    dense = attention + 3 * 512 * 1024 // 2 + 2 * 1024
    moe = attention + 3 * 512 * 256 // 2 + 128 * 512 * 2 + 128 * 512 * 512 * 2 + 128 * 256 * 512 * 2 + 2 * 1024
    assert (dense, moe) == (1_116_160, 101_320_704)
    # LoRA A (16, in) and B (out, 16) in float32 on q, k, v, o and the layer's MLP
    lora = lambda pairs: 4 * sum(16 * (i + o) for i, o in pairs)  # noqa: E731
    att_lora = [(512, 512), (512, 128), (512, 128), (512, 512)]
    dense_a = lora(att_lora + [(512, 1024), (512, 1024), (1024, 512)])
    moe_a = lora(att_lora + [(512, 256), (512, 256), (256, 512)])
    assert (dense_a, moe_a) == (507_904, 360_448)
    root = 2 * 512 * 512 * 2 + 1024 + 2 * 512

    e = per_gpu(spec, TrainSetup(seq=512, targets=LLAMA4_TARGETS), gpus=4, strategy="fsdp")
    sp = splits_for(spec, e.setup, e.parallel)
    assert sp.layer_units == ((dense, dense_a, dense_a), (moe, moe_a, moe_a)) * 2
    assert (sp.root_weights, sp.root_adapters, sp.root_gradients) == (root, 0, 0)
    assert sp.root_weights + 2 * (dense + moe) == sp.weights
    # each layer's flat parameter padded to a multiple of 4 on its own
    shards = 2 * (-(-dense // 4) + -(-moe // 4)) + -(-root // 4)
    assert shards == 51_481_088
    # forward: a dense and a MoE unit unsharded together, never the MoE unit twice; the root whole
    assert gathered_units(sp, backward=False) == (2, dense + moe, dense_a + moe_a, 0)
    # backward: layer i + 1 with layer i prefetched, i + 1's gradients unsharded: largest where the
    # current layer is the dense one (layer 2, layer 1 prefetched)
    assert gathered_units(sp, backward=True) == (2, dense + moe, dense_a + moe_a, dense_a)
    for phase in ("forward", "backward"):
        assert e.phase_components[phase]["weights"] == shards + root + dense + moe == 154_968_576
    terms = {t.part: t.bytes for t in e.terms}
    assert terms["2 decoder-layer units unsharded (current + prefetched)"] == dense + moe
    assert terms["root unit unsharded (embeddings, norm, lm_head)"] == root


def test_fsdp_maverick_gathers_a_dense_and_a_moe_layer():
    """meta-llama/Llama-4-Maverick-17B-128E, QLoRA nf4 bf16 on the named targets, 8 GPUs: the
    24 dense layers (q/o 5120x5120, k/v 5120x1024, MLP 3 x 5120x16384, packed 4-bit) are sharded
    like the MoE layers, and a layer moment gathers one of each (128 bf16 experts of 8192, a
    shared expert of 8192, the router), not the MoE layer twice. Before, the dense layers sat
    unsharded in the root (+3.78 GB per GPU) and two MoE units were gathered (+32.15 GB)."""
    spec = resolve("meta-llama/Llama-4-Maverick-17B-128E")
    attention = (2 * 5120 * 5120 + 2 * 5120 * 1024) // 2
    dense = attention + 3 * 5120 * 16384 // 2 + 2 * 5120 * 2
    moe = (attention + 3 * 5120 * 8192 // 2 + 128 * 5120 * 2 + 128 * 5120 * 16384 * 2 + 128 * 8192 * 5120 * 2
           + 2 * 5120 * 2)
    assert (dense, moe) == (157_306_880, 32_307_957_760)
    root = 2 * 202048 * 5120 * 2 + 5120 * 2 + 2 * 512
    e = per_gpu(spec, TrainSetup(seq=2048, targets=LLAMA4_TARGETS), gpus=8, strategy="fsdp")
    sp = splits_for(spec, e.setup, e.parallel)
    assert [u[0] for u in sp.layer_units] == [dense, moe] * 24 and sp.root_weights == root
    terms = {t.part: t.bytes for t in e.terms}
    assert terms["2 decoder-layer units unsharded (current + prefetched)"] == dense + moe == 32_465_264_640
    assert terms["root unit unsharded (embeddings, norm, lm_head)"] == root
    assert terms["weight shards (flat parameters)"] == 24 * (-(-dense // 8) + -(-moe // 8)) + -(-root // 8)


@pytest.mark.parametrize("model", ["deepseek-ai/DeepSeek-V3", "moonshotai/Moonlight-16B-A3B",
                                   "meta-llama/Llama-4-Scout-17B-16E", "meta-llama/Llama-2-7b-hf"])
def test_fsdp_units_and_root_sum_to_the_weights(model):
    """Every decoder layer is a unit whatever its kind (DeepSeek-V3's dense first layers, Scout's
    MoE-only stack, a dense Llama): units plus root are the static bytes exactly."""
    spec = resolve(model)
    setup = TrainSetup(seq=512, targets=LLAMA4_TARGETS if "Llama-4" in model else "all-linear")
    sp = splits_for(spec, setup, Parallel(8, "fsdp"))
    assert len(sp.layer_units) == spec.layers
    for k, total in enumerate((sp.weights, sp.adapters, sp.gradients)):
        assert sum(u[k] for u in sp.layer_units) + (sp.root_weights, sp.root_adapters, sp.root_gradients)[k] == total
    kinds = {spec.is_dense(i): sp.layer_units[i] for i in range(spec.layers)}
    assert len(kinds) == (2 if spec.dense_layers and spec.moe_layers else 1)
    if len(kinds) == 2:
        assert kinds[True][0] < kinds[False][0]    # DeepSeek's dense MLP layer is smaller than a MoE one


def test_shard_grad_op_holds_every_unit_from_forward_to_backward():
    setup = TrainSetup(batch=1, seq=512)
    full = per_gpu(LLAMA2_7B, setup, gpus=4, strategy="fsdp")
    grad_op = per_gpu(LLAMA2_7B, setup, gpus=4, strategy="fsdp_grad_op")
    assert grad_op.components["weights"] > full.components["weights"]
    assert grad_op.components["weights"] >= splits_for(LLAMA2_7B, setup, grad_op.parallel).weights


def test_cpu_offload_moves_shards_to_the_cpu():
    setup = TrainSetup(batch=2, seq=2048)
    on = per_gpu(LLAMA2_70B, setup, gpus=2, strategy="fsdp")
    off = per_gpu(LLAMA2_70B, setup, gpus=2, strategy="fsdp", offload="cpu")
    assert off.peak_allocated_bytes < on.peak_allocated_bytes
    assert off.cpu_bytes > 0.9 * (on.components["weights"] - sum(t.bytes for t in on.terms if t.held == "gathered"
                                                                    and t.component == "weights"))
    assert off.components["optimizer_state"] == 0
    z3 = per_gpu(LLAMA2_70B, setup, gpus=8, strategy="zero3", offload="cpu")
    assert z3.components["optimizer_state"] == 0 and z3.cpu_bytes > 0


def test_zero_full_finetuning_follows_the_zero_paper():
    """ZeRO (Rajbhandari et al. 2020): mixed-precision Adam keeps K = 12 bytes per parameter of
    optimizer state (fp32 master + 2 moments), partitioned 1/N; ZeRO-2 keeps 16-bit params whole."""
    spec = resolve("Qwen/Qwen2.5-0.5B")
    setup = TrainSetup(method="full", batch=1, seq=512)
    psi = estimate(spec, setup).trainable_params
    for n in (2, 8):
        z2 = per_gpu(spec, setup, gpus=n, strategy="zero2")
        assert z2.components["optimizer_state"] == pytest.approx(12 * psi / n, rel=0.01)
        # gathering only the module in use (no prefetch, no reuse): parameters partitioned 1/N
        z3 = per_gpu(spec, setup, Parallel(n, "zero3", prefetch_bucket_size=0, max_reuse_distance=0))
        assert z3.components["optimizer_state"] == z2.components["optimizer_state"]
        assert z3.components["weights"] < z2.components["weights"]


def test_zero3_defaults_keep_a_small_model_gathered():
    """Under DeepSpeed's defaults (stage3_max_reuse_distance and stage3_max_live_parameters 1e9
    elements) a 0.5B model is used again within the reuse distance everywhere, so the
    coordinator keeps every parameter gathered from its forward to its backward: at the peak a
    GPU holds the whole 16-bit model besides its partition, more than ZeRO-2's replica alone."""
    spec = resolve("Qwen/Qwen2.5-0.5B")
    setup = TrainSetup(method="full", batch=1, seq=512)
    z2 = per_gpu(spec, setup, gpus=2, strategy="zero2")
    z3 = per_gpu(spec, setup, gpus=2, strategy="zero3")
    gathered = sum(t.bytes for t in z3.terms if t.held == "gathered" and t.component == "weights")
    partitioned = sum(t.bytes for t in z3.terms if t.held != "gathered" and t.component == "weights")
    assert gathered >= 0.95 * z2.components["weights"]
    assert z3.components["weights"] == gathered + partitioned > z2.components["weights"]


def test_deepspeed_reduce_buckets():
    setup = TrainSetup(batch=1, seq=512)
    z2 = per_gpu(LLAMA2_7B, setup, gpus=2, strategy="zero2")
    bucket = [t for t in z2.terms if t.held == "bucket"]
    assert len(bucket) == 1 and bucket[0].bytes == 2 * DS_REDUCE_BUCKET  # 5e8 bf16 elements
    overlapped = per_gpu(LLAMA2_7B, setup, Parallel(2, "zero2", overlap_comm=True))
    assert sum(t.bytes for t in overlapped.terms if t.held == "bucket") == 4 * DS_REDUCE_BUCKET
    small = per_gpu(LLAMA2_7B, setup, Parallel(2, "zero3", reduce_bucket_size=4096 * 4096))
    assert sum(t.bytes for t in small.terms if t.held == "bucket") == 2 * 4096 * 4096


def test_ddp_buckets_copy_the_gradients_unless_bucket_view():
    setup = TrainSetup(method="full", batch=1, seq=256)
    spec = resolve("Qwen/Qwen2.5-0.5B")
    single = per_gpu(spec, setup)
    ddp = per_gpu(spec, setup, gpus=2, strategy="ddp")
    view = per_gpu(spec, setup, Parallel(2, "ddp", gradient_as_bucket_view=True))
    grads = splits_for(spec, setup, ddp.parallel).gradients
    assert ddp.phase_peaks["optimizer"] - single.phase_peaks["optimizer"] == grads
    assert view.peak_allocated_bytes == single.peak_allocated_bytes


def test_deepspeed_undoes_prepare_kbit_fp32_cast():
    e = per_gpu(LLAMA2_7B, TrainSetup(prepare_kbit=True), gpus=2, strategy="zero2")
    assert e.setup.prepare_kbit is False


@pytest.mark.parametrize("kwargs, message", [
    (dict(gpus=0), "--gpus must be positive, got 0"),
    (dict(gpus=-2, strategy="fsdp"), "--gpus must be positive, got -2"),
    (dict(gpus=2.5), "--gpus must be a whole number"),
    (dict(gpus=10**6), "is beyond any real run"),
    (dict(gpus=2, strategy="megatron"), "unknown strategy 'megatron'"),
    (dict(gpus=2, strategy="single"), "--strategy single cannot use 2 GPUs"),
    (dict(gpus=2, strategy="ddp", offload="cpu"), "--offload cpu needs a sharding engine"),
    (dict(gpus=2, strategy="fsdp", offload="nvme"), "unknown offload 'nvme'"),
])
def test_bad_parallel_values(kwargs, message):
    with pytest.raises(UsageError) as info:
        Parallel(**kwargs)
    assert message in str(info.value)


def test_strategy_aliases_and_defaults():
    assert Parallel(2).strategy == "ddp" and Parallel(1).strategy == "single"
    assert Parallel(2, "FULL_SHARD").strategy == "fsdp"
    assert Parallel(2, "shard_grad_op").strategy == "fsdp_grad_op"
    assert Parallel(8, "zero-3").strategy == "zero3"


@pytest.mark.parametrize("argv, message", [
    (["plan", "llama-2-7b", "--gpu", "24GB", "--gpus", "0", "--strategy", "fsdp"], "Error: --gpus must be positive"),
    (["plan", "llama-2-7b", "--gpu", "24GB", "--gpus", "2", "--strategy", "tp"], "Error: unknown strategy 'tp'"),
    (["plan", "llama-2-7b", "--gpu", "24GB", "--gpus", "two"], "Error: argument --gpus: invalid int value"),
    (["plan", "llama-2-7b", "--gpu", "24GB", "--gpus", "2", "--offload", "cpu"], "Error: --offload cpu needs a sharding"),
])
def test_cli_parallel_errors_are_one_line_exit_2(capsys, argv, message):
    assert main(argv) == 2
    out, err = capsys.readouterr()
    assert err.startswith(message) and err.count("\n") == 1 and "Traceback" not in err and "hint:" in err



@pytest.mark.parametrize("strategy, offload, grad_ckpt", [
    ("fsdp", "none", True), ("fsdp_grad_op", "none", True), ("fsdp_grad_op", "cpu", True), ("fsdp", "cpu", False)])
def test_one_gpu_fsdp_is_refused_where_no_shard_is_not_modelled(strategy, offload, grad_ckpt):
    """torch runs FSDP on one GPU as NO_SHARD (fsdp/_init_utils.py _init_core_state): without offload
    it computes in the flat parameters, with no gathered copy beside them as FULL_SHARD's model
    would add (Llama-3-8B: about 2 GiB of root unit counted twice)."""
    with pytest.raises(UsageError, match="FSDP on one GPU runs as NO_SHARD"):
        per_gpu("meta-llama/Meta-Llama-3-8B", TrainSetup(grad_ckpt=grad_ckpt), gpus=1, strategy=strategy,
                offload=offload)


def test_one_gpu_fsdp_with_offload_and_checkpointing_says_it_runs_as_no_shard():
    e = per_gpu("meta-llama/Meta-Llama-3-8B", TrainSetup(), gpus=1, strategy="fsdp", offload="cpu")
    assert any(a.startswith("one GPU: torch runs FSDP as NO_SHARD") for a in e.assumptions)


def test_cli_one_gpu_fsdp_error_is_one_line_exit_2(capsys):
    assert main(["plan", "llama-2-7b", "--gpu", "24GB", "--gpus", "1", "--strategy", "fsdp"]) == 2
    _out, err = capsys.readouterr()
    assert err.startswith("Error: FSDP on one GPU runs as NO_SHARD") and err.count("\n") == 1
    assert "hint: plan one GPU without --strategy, or use --gpus 2 or more" in err

# --- Answer.AI FSDP + QLoRA per-GPU measurements ---------------------------------------------------
# github.com/AnswerDotAI/fsdp_qlora benchmarks_03_2024.md (runs Feb-Mar 2024; per GPU, 2 GPUs,
# FSDP full_shard), bundled in tests/data/published_measurements.csv (AAI-01..12,
# 'Peak Memory (GiB)' = torch.cuda.max_memory_reserved) plus the same page's rows quoted in the
# CSV notes; docs/published-measurements.md#answerai-fsdp--qlora-benchmarks. train.py defaults: r=64, alpha 16, lora_dropout 0.1, targets q,k,v,up,down,gate
# (no o_proj), AdamW, sdpa, FSDP activation checkpointing.
AAI = [  # id, model, method, batch, seq, offload, reserved GiB, allocated GiB (when published)
    ("AAI-01", "llama2-7b", "qlora", 1, 512, "none", 4.98, None),
    ("AAI-02", "llama2-7b", "qlora", 1, 2048, "none", 5.21, None),
    ("AAI-03", "llama2-7b", "lora", 1, 512, "none", 10.24, 8.28),
    ("AAI-03 ctx2048", "llama2-7b", "lora", 1, 2048, "none", 10.22, 9.16),
    ("AAI-04", "llama2-7b", "qlora", 10, 2048, "none", 20.97, None),
    ("AAI-05", "llama2-7b", "lora", 6, 2048, "none", 21.35, None),
    ("AAI-05 bs4", "llama2-7b", "lora", 4, 2048, "none", 16.14, None),
    ("AAI-06", "yi-34b", "qlora", 2, 2048, "none", 23.05, None),
    ("AAI-06 offload", "yi-34b", "qlora", 4, 2048, "cpu", 22.98, None),
    ("AAI-07", "llama2-7b", "qlora", 4, 2048, "none", 11.22, None),
    ("AAI-08", "llama2-7b", "qlora", 12, 2048, "cpu", 22.38, None),
    ("AAI-09", "llama2-7b", "lora", 10, 2048, "cpu", 22.69, None),
    ("AAI-10", "llama2-70b", "qlora", 2, 2048, "cpu", 14.92, None),
    ("AAI-11", "mistral-7b-v0.2", "qlora", 12, 2048, "cpu", 22.54, None),
    ("AAI-12", "mistral-7b-v0.2", "qlora", 1, 24576, "cpu", 22.54, None),
]
# The card each run's figure came from: the 3090 rig, or the dual 4090 workstation (its rows
# AAI-08, -09, -11, -12; the 7B and Yi-34B figures it repeats are the 3090 rows'), both 24 GiB.
CARD = {"AAI-08": "RTX 4090", "AAI-09": "RTX 4090", "AAI-11": "RTX 4090", "AAI-12": "RTX 4090"}
CSV = Path(__file__).resolve().parent / "data" / "published_measurements.csv"
# 01-ai/Yi-34B config.json (not in the bundled catalog): a Llama architecture.
YI_34B = {"model_type": "llama", "hidden_size": 7168, "intermediate_size": 20480, "num_hidden_layers": 60,
          "num_attention_heads": 56, "num_key_value_heads": 8, "vocab_size": 64000, "tie_word_embeddings": False,
          "max_position_embeddings": 4096}
# Mistral-7B v0.2 base config.json (not in the bundled catalog): v0.1's shapes with a 32k context
# window, rope_theta 1e6 and no sliding window.
MISTRAL_7B_V02 = {"model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                  "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000,
                  "tie_word_embeddings": False, "max_position_embeddings": 32768, "rope_theta": 1000000.0,
                  "sliding_window": None, "rms_norm_eps": 1e-05}
# How far a prediction may be from these runs: the issue's +-10% (#8), both ways. train.py keeps
# `output = model(...)` alive through backward and optimizer.step(), then sets it to None: modelled
# as --loop plain-del (docs/recipes.md#plain-loop-keeps-the-logits). What is modelled of the
# real run: FSDP(model)'s wrap phase before the steps (its cache stays: reserved_after_model_wrap
# 3.72 GiB on AAI-01, test_wrap_phase_reserved_matches_answer_ai), and the all-gathers and
# reduce-scatters in their own CUDA streams, whose pools share nothing with the default stream
# (docs/allocator.md#fsdp-wrap, #fsdp-stream). Known gaps, each making the measurement larger or
# smaller: transformers ~4.38 returned fp32 logits (transformers 5, modelled, keeps them bf16);
# pure-bf16 adapters (precision='bf16') are smaller than the fp32 adapters modelled.
# The table also prints, as a diagnostic only (not asserted), the prediction plus two fp32 logits
# copies (batch x seq x vocab x 4 bytes): the legacy loss's fp32 upcast and its full-size zero
# gradient of `logits[..., :-1, :]`.
RESERVED_TARGET = 0.10
RESERVED_BOUNDS = (-RESERVED_TARGET, RESERVED_TARGET)
ALLOCATED_TOLERANCE = 0.10


# train.py's defaults (docs/published-measurements.md#answerai-fsdp--qlora-benchmarks)
AAI_BASE = TrainSetup(rank=64, targets="q_proj,k_proj,v_proj,up_proj,down_proj,gate_proj", lora_dropout=0.1,
                      grad_ckpt=True, attn="sdpa", optimizer="adamw", loop="plain-del")
AAI_SPECS = {"llama2-7b": LLAMA2_7B, "llama2-70b": LLAMA2_70B,
             "yi-34b": spec_from_config(YI_34B, "01-ai/Yi-34B", "test: Yi-34B config.json"),
             "mistral-7b-v0.2": spec_from_config(MISTRAL_7B_V02, "mistralai/Mistral-7B-v0.2",
                                                 "test: Mistral-7B v0.2 config.json")}


def aai_estimate(model: str, method: str, batch: int, seq: int, offload: str, gpu=None):
    """One GPU of an Answer.AI run: train.py's defaults on `model`, FSDP full_shard over 2 GPUs."""
    return per_gpu(AAI_SPECS[model], AAI_BASE.with_(method=method, batch=batch, seq=seq), gpus=2, strategy="fsdp",
                   offload=offload, gpu=gpu)


def aai_table():
    rows = []
    for rid, model, method, batch, seq, offload, reserved, allocated in AAI:
        e = aai_estimate(model, method, batch, seq, offload)
        legacy = 2 * 4 * batch * seq * AAI_SPECS[model].vocab
        rows.append((rid, e.reserved_bytes / GiB, reserved, e.peak_allocated_bytes / GiB, allocated,
                     (e.reserved_bytes + legacy) / GiB))
    return rows


def test_transcription_matches_the_bundled_csv():
    """Every figure of the AAI table is read off the bundled rows: a main row's measured_gb and
    configuration, or a figure quoted (in GiB) in its notes / metric."""
    with CSV.open() as f:
        published = {r["id"]: r for r in csv.DictReader(f)}
    assert sorted(published) == [f"AAI-{i:02d}" for i in range(1, 13)]
    names = {"llama2-7b": "Llama-2-7b-hf", "llama2-70b": "Llama-2-70b-hf", "yi-34b": "Yi-34B",
             "mistral-7b-v0.2": "Mistral-7B-v0.2"}
    for rid, model, method, batch, seq, offload, reserved, allocated in AAI:
        row = published[rid.split()[0]]
        assert ("lora-16bit" if method == "lora" else "qlora-nf4") == row["method"] and row["lora_r"] == "64"
        assert names[model] in row["model"], rid
        assert CARD.get(rid, "RTX 3090") in row["gpu"], rid
        quoted = row["notes"] + " " + row["metric"]
        if rid in published:      # a main row: its own configuration and decimal-GB figure
            assert int(row["batch"]) == batch and row["seq_len"].startswith(str(seq)), rid
            assert float(row["measured_gb"]) == pytest.approx(reserved * GiB / 1e9, abs=0.006), rid
        assert f"{reserved:.2f} GiB" in quoted, rid
        if allocated is not None:
            assert f"{allocated:.2f} GiB" in quoted, rid
        offloaded = "use_cpu_offload True" in quoted if rid in published else (
            "with CPU offload" in quoted and rid.endswith("offload"))   # a row quoted in another's notes
        assert (offload == "cpu") == offloaded, rid


def test_answer_ai_fsdp_qlora_per_gpu_measurements(capsys):
    rows = aai_table()
    lines = [f"{'run':<16}{'pred reserved':>14}{'measured':>10}{'error':>8}   {'pred alloc':>10}{'measured':>10}"
             f"{'error':>8}   {'+legacy loss':>12}{'error':>8}"]
    errors, legacy_errors = [], []
    for rid, pred_r, meas_r, pred_a, meas_a, legacy in rows:
        err_r = (pred_r - meas_r) / meas_r
        err_a = (pred_a - meas_a) / meas_a if meas_a else None
        err_l = (legacy - meas_r) / meas_r
        errors.append(err_r)
        legacy_errors.append(err_l)
        lines.append(f"{rid:<16}{pred_r:>12.2f}Gi{meas_r:>8.2f}Gi{err_r:>+8.1%}   {pred_a:>8.2f}Gi"
                     + (f"{meas_a:>8.2f}Gi{err_a:>+8.1%}" if meas_a else f"{'-':>10}{'-':>8}")
                     + f"   {legacy:>10.2f}Gi{err_l:>+8.1%}")
    lines.append(f"mean |error| vs reserved: {sum(map(abs, errors)) / len(errors):.1%} "
                 f"(diagnostic with the legacy loss: {sum(map(abs, legacy_errors)) / len(legacy_errors):.1%})")
    table = "\n".join(lines)
    with capsys.disabled():
        print("\nAnswer.AI FSDP+QLoRA, 2 GPUs, per GPU (GiB):\n" + table)
    for rid, pred_r, meas_r, pred_a, meas_a, _ in rows:
        err = (pred_r - meas_r) / meas_r
        assert RESERVED_BOUNDS[0] <= err <= RESERVED_BOUNDS[1], f"{rid}: {err:+.1%}\n{table}"
        if meas_a:
            assert abs(pred_a - meas_a) / meas_a <= ALLOCATED_TOLERANCE, f"{rid} allocated\n{table}"
    # What the runs show, the model must show: more batch needs more; QLoRA below LoRA; offload
    # lets Yi-34B double its batch within the same memory.
    by = {r[0]: r[1] for r in rows}
    assert by["AAI-01"] < by["AAI-02"] < by["AAI-04"]
    assert by["AAI-02"] < by["AAI-03 ctx2048"] and by["AAI-05 bs4"] < by["AAI-05"]


def test_answer_ai_runs_fit_their_cards():
    """Every run ran on a 24 GiB card (RTX 3090 or 4090), most of them at the largest batch that
    fit: the verdict on that card must let each run (past the card, malloc releases the cache and
    retries: the replay against the card)."""
    for rid, model, method, batch, seq, offload, _reserved, _allocated in AAI:
        e = aai_estimate(model, method, batch, seq, offload, gpu=CARD.get(rid, "RTX 3090"))
        assert e.status != "no" and not e.allocator_oom, (rid, e.device_total_bytes / GiB)


def test_fsdp_setup_that_does_not_fit_names_the_smallest_card_per_gpu():
    """As on one GPU (tests/test_reserved.py): each rank's own FSDP stream, replayed against cards
    of other sizes, runs on a card below its device total (sharding.smallest_per_gpu)."""
    from vramplan.estimate._estimator import SMALLEST_CARD_STEP, SMALLEST_CARD_STEPS
    from vramplan.plan._sharding import Parallel, per_gpu, smallest_per_gpu
    from vramplan.core._gpus import resolve_gpu

    spec, setup, par = resolve("meta-llama/Llama-2-7b-hf"), TrainSetup(batch=8, seq=4096), Parallel(2, "fsdp")
    est = per_gpu(spec, setup, par, gpu="16GB")
    card = smallest_per_gpu(spec, setup, par, resolve_gpu("16GB"))
    assert est.status == "no" and card is not None
    assert est.peak_allocated_bytes + est.cuda_context_bytes + est.comm_bytes < card < est.device_total_bytes
    mib = 2**20
    assert per_gpu(spec, setup, par, gpu=f"{-(-card // mib)}MiB").status != "no"
    step = max(SMALLEST_CARD_STEP, est.device_total_bytes // SMALLEST_CARD_STEPS)
    assert per_gpu(spec, setup, par, gpu=f"{(card - step) // mib}MiB").status == "no"
    assert smallest_per_gpu(spec, TrainSetup(), par, resolve_gpu("16GB")) is None                 # it fits
    bucket_view = Parallel(2, "ddp", gradient_as_bucket_view=True)
    assert per_gpu(spec, setup, bucket_view, gpu="16GB").status == "no"
    assert smallest_per_gpu(spec, setup, bucket_view, resolve_gpu("16GB")) is None    # no own stream
    # ZeRO-3 replays its own stream too (docs/allocator.md#zero-3-stream)
    z3 = per_gpu(spec, setup, Parallel(2, "zero3"), gpu="16GB")
    card = smallest_per_gpu(spec, setup, Parallel(2, "zero3"), resolve_gpu("16GB"))
    assert z3.status == "no" and card is not None
    assert z3.peak_allocated_bytes + z3.cuda_context_bytes + z3.comm_bytes < card <= z3.device_total_bytes
    assert per_gpu(spec, setup, Parallel(2, "zero3"), gpu=f"{-(-card // mib)}MiB").status != "no"
