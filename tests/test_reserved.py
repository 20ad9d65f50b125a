"""Peak reserved memory: the estimate's two-step allocation stream, its replay through the
caching-allocator model, and the one verdict every command uses."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from vramplan.cli import main
from vramplan.core._gpus import Gpu
from vramplan.core._models import resolve
from vramplan.core._setup import TrainSetup
from vramplan.core._verdict import TIGHT, verdict
from vramplan.cuda._replay import replay_allocations
from vramplan.cuda._arch import ASSUMED
from vramplan.cuda._cublas import workspace_bytes
from vramplan.cuda._reserved import replay_stream
from vramplan.estimate._estimator import estimate
from vramplan.estimate._events import place_of, step_stream
from vramplan.estimate._inventory import static_memory

LLAMA4_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"   # all-linear would wrap the router

SETUPS = [
    ("meta-llama/Llama-2-7b", {}),
    ("meta-llama/Llama-2-7b", {"grad_ckpt": False, "seq": 512}),
    ("meta-llama/Llama-2-7b", {"attn": "eager", "seq": 512, "batch": 2}),
    ("meta-llama/Llama-2-7b", {"method": "lora", "optimizer": "adamw8bit", "seq": 1024}),
    ("mistralai/Mistral-7B-v0.1", {"method": "full", "grad_ckpt": False, "seq": 256}),
    ("meta-llama/Meta-Llama-3-8B", {"quant": "int8", "seq": 512}),
    # sliding-window and global layers (two templates), layers without RoPE
    ("google/gemma-3-1b-pt", {"seq": 2048}),
    ("HuggingFaceTB/SmolLM3-3B-Base", {"seq": 512}),
    # recipe knobs: a plain loop's held logits, autocast's weight-cast cache, TRL's chunked loss, fused AdamW
    ("meta-llama/Llama-2-7b", {"loop": "plain", "seq": 1024}),
    ("meta-llama/Llama-2-7b", {"loop": "plain-del", "seq": 1024}),
    ("ibm-granite/granite-3.1-3b-a800m-instruct", {"loop": "plain", "seq": 512}),
    ("meta-llama/Llama-2-7b", {"amp": "bf16", "seq": 1024}),
    # reentrant checkpointing: the recomputed output and incoming gradient held (the bottom layer's
    # backward is the peak at 512 tokens), no int8 ctx inputs, autocast re-entered in backward
    ("mistralai/Mistral-7B-v0.1", {"reentrant": True, "seq": 512}),
    ("meta-llama/Meta-Llama-3-8B", {"quant": "int8", "seq": 512, "reentrant": True}),
    ("meta-llama/Llama-2-7b", {"amp": "bf16", "seq": 1024, "reentrant": True}),
    ("Qwen/Qwen3-0.6B", {"loss": "chunked", "optimizer": "adamw_fused", "seq": 1024}),
    # gradient accumulation: the second micro-step beside every .grad (its moments are the peak
    # here), a plain loop's outputs per micro-step, full fine-tuning under SGD with and without
    # checkpointing, reentrant int8 and autocast
    ("meta-llama/Llama-2-7b", {"grad_accum": 4, "seq": 1024}),
    ("meta-llama/Llama-2-7b", {"loop": "plain", "seq": 1024, "grad_accum": 8}),
    ("mistralai/Mistral-7B-v0.1", {"method": "full", "seq": 1024, "grad_accum": 2, "optimizer": "sgd"}),
    ("mistralai/Mistral-7B-v0.1", {"method": "full", "seq": 1024, "grad_accum": 2, "optimizer": "sgd",
                                   "grad_ckpt": False}),
    ("meta-llama/Meta-Llama-3-8B", {"quant": "int8", "seq": 512, "reentrant": True, "grad_accum": 2}),
    ("meta-llama/Llama-2-7b", {"amp": "bf16", "seq": 1024, "grad_accum": 2}),
    ("google/gemma-3-1b-pt", {"seq": 2048, "grad_accum": 2}),
    # MoE: routed experts adapted through ParamWrapper
    ("Qwen/Qwen3-30B-A3B", {"seq": 512}),
    # Llama 4: a complex64 rotary table, every-expert MoE layers; chunked-attention masks past
    # 8192 tokens; dense and MoE layers interleaved (two templates each for RoPE / no-RoPE)
    ("meta-llama/Llama-4-Scout-17B-16E", {"seq": 8192, "targets": LLAMA4_TARGETS}),
    (str(Path(__file__).parent / "configs" / "llama4-interleave.json"),
     {"seq": 512, "attn": "eager", "grad_ckpt": False, "targets": LLAMA4_TARGETS}),
]


def _live_peak(events) -> int:
    live, cur, peak = {}, 0, 0
    for ev in events:
        if ev[0] == "alloc":
            live[ev[1]] = ev[2]
            cur += ev[2]
            peak = max(peak, cur)
        else:
            cur -= live.pop(ev[1])
    return peak


@pytest.mark.parametrize("model, kw", SETUPS, ids=[f"{m}-{kw}" for m, kw in SETUPS])
def test_stream_peak_is_the_estimators_peak(model, kw):
    """The unrolled stream holds the same tensors as the estimator's moments: same peak, to the byte."""
    spec, setup = resolve(model), TrainSetup(**kw)
    est = estimate(spec, setup, replay=False)
    stream = step_stream(spec, setup, static_memory(spec, setup))
    assert _live_peak(stream.events) == est.peak_allocated_bytes


def test_granite_embedding_leaf_goes_with_the_graph():
    """Granite under checkpointing keeps its embedding leaf until backward ends (ops.embedding_leaf):
    the stream frees it before the optimizer step, as the estimator's optimizer moment leaves it out."""
    from vramplan.estimate._ops import embedding_leaf

    spec = resolve("ibm-granite/granite-3.1-3b-a800m-instruct")
    for setup in (TrainSetup(seq=512), TrainSetup(seq=512, grad_ckpt=False)):
        est = estimate(spec, setup, replay=False)
        assert _live_peak(step_stream(spec, setup, static_memory(spec, setup)).events) == est.peak_allocated_bytes
    ckpt, plain = (estimate(spec, TrainSetup(seq=512, grad_ckpt=g), replay=False) for g in (True, False))
    assert embedding_leaf(spec, TrainSetup(seq=512)) > 0
    assert ckpt.moments["optimizer"] == plain.moments["optimizer"]


@pytest.mark.parametrize("amp, loss", [("none", "full"), ("bf16", "full"), ("none", "chunked")])
def test_tied_embedding_sum_is_in_the_stream(amp, loss):
    """Full fine-tuning of a tied embedding: the stream plays the embedding's backward as the
    estimator's backward.embedding moment (ops.tied_embedding_grad), the sum a new tensor or, under
    autocast over float32 weights or TRL's chunked loss, lm_head's gradient (ops.tied_sum_in_place).
    Without an optimizer state that moment is the step's peak, to the byte."""
    spec = resolve("Qwen/Qwen2.5-0.5B")
    setup = TrainSetup(method="full", dtype="fp32", optimizer="sgd", seq=256, amp=amp, loss=loss)
    est = estimate(spec, setup, replay=False)
    assert est.peak_moment == "backward.embedding"
    assert _live_peak(step_stream(spec, setup, static_memory(spec, setup)).events) == est.peak_allocated_bytes


def test_every_allocation_is_freed_or_persistent():
    spec, setup = resolve("meta-llama/Llama-2-7b"), TrainSetup(seq=512)
    static = static_memory(spec, setup)
    events = step_stream(spec, setup, static).events
    live = {}
    for ev in events:
        if ev[0] == "alloc":
            live[ev[1]] = ev[2]
        else:
            live.pop(ev[1])
    # after two steps: the persistent tensors, the optimizer state and the two cached cuBLAS
    # workspaces (forward and backward threads)
    assert sum(live.values()) == (static.weights + static.quant_constants + static.adapters + static.optimizer_state
                                  + 2 * workspace_bytes(ASSUMED))


def test_lumped_small_pool_stays_close_to_the_exact_replay():
    spec, setup = resolve("meta-llama/Llama-2-7b"), TrainSetup(seq=1024, batch=2)
    events = step_stream(spec, setup, static_memory(spec, setup)).events
    exact = replay_allocations(events)
    lumped = replay_stream(events, lump_small=True)
    assert lumped.peak_allocated_bytes == exact.peak_allocated_bytes
    assert abs(lumped.peak_reserved_bytes - exact.peak_reserved_bytes) <= 0.02 * exact.peak_reserved_bytes


def test_device_total_is_context_plus_peak_reserved_and_components_sum():
    est = estimate("meta-llama/Llama-2-7b", TrainSetup(seq=1024), gpu="A100-80GB")
    assert est.peak_reserved_bytes >= est.peak_allocated_bytes
    assert est.device_total_bytes == est.cuda_context_bytes + est.peak_reserved_bytes
    d = est.to_dict()
    assert sum(d["components"].values()) + sum(d["device_components"].values()) == d["device_total_bytes"]
    assert d["device_components"]["allocator_overhead"] == est.peak_reserved_bytes - est.peak_allocated_bytes
    for key in ("peak_reserved_bytes", "fragmentation_bytes", "alloc_conf", "status"):
        assert key in d


def test_settings_change_the_replay():
    base = estimate("meta-llama/Llama-2-7b", TrainSetup(seq=2048, batch=2), alloc_conf="")
    expandable = estimate("meta-llama/Llama-2-7b", TrainSetup(seq=2048, batch=2),
                          alloc_conf="expandable_segments:True")
    assert expandable.alloc_conf == "expandable_segments:True"
    assert expandable.peak_allocated_bytes == base.peak_allocated_bytes
    # expandable segments map pages as needed: no segment rounding waste beyond a page per pool
    assert expandable.peak_reserved_bytes < base.peak_reserved_bytes
    assert any("expandable_segments:True" in a for a in expandable.assumptions)


def test_environment_supplies_the_default_settings(monkeypatch):
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    est = estimate("meta-llama/Llama-2-7b", TrainSetup(seq=256))
    assert est.alloc_conf == "expandable_segments:True"


def test_zero_headroom_is_tight_everywhere():
    assert verdict(100, 100) == "tight"
    assert verdict(101, 100) == "no"
    assert verdict(100 - int(TIGHT * 100), 100) == "fits"
    assert verdict(10, 100, oom={"index": 3}) == "no"
    est = estimate("meta-llama/Llama-2-7b", TrainSetup(seq=256))
    exact = estimate("meta-llama/Llama-2-7b", TrainSetup(seq=256), gpu=Gpu("exact", est.device_total_bytes))
    assert exact.status == "tight" and exact.fits
    from vramplan.plan._planner import status_of
    assert status_of(est.device_total_bytes, est.device_total_bytes) == "tight"


def test_an_allocator_oom_below_capacity_is_reported_with_its_place():
    """A card between the allocated peak and the unlimited reserved peak: the capped replay either
    gets by (malloc frees the cache and retries), reserving at most the card, or runs out of
    memory although the allocated bytes fit: a fragmentation OOM, named with its place."""
    spec, setup = resolve("meta-llama/Llama-2-7b"), TrainSetup(seq=2048, batch=4)
    free_run = estimate(spec, setup)
    context = free_run.cuda_context_bytes
    seen_oom = False
    for frac in (0.1, 0.3, 0.5, 0.7, 0.9):
        cap = context + free_run.peak_allocated_bytes + int(frac * (free_run.peak_reserved_bytes
                                                                     - free_run.peak_allocated_bytes))
        est = estimate(spec, setup, gpu=Gpu("between", cap))
        if est.allocator_oom is None:
            assert est.device_total_bytes <= cap and est.status in ("fits", "tight")
        else:
            seen_oom = True
            assert est.status == "no" and not est.fits
            assert est.allocator_oom["fragmentation"] is True
            assert est.allocator_oom["phase"] in ("forward", "backward", "optimizer")
            assert est.allocator_oom["module"] or est.allocator_oom["phase"] == "optimizer"
            assert est.device_total_bytes == free_run.device_total_bytes
    assert seen_oom, "no capacity between allocated and reserved peaks made the allocator fail"


def test_place_of_names_phase_and_layer():
    spec, setup = resolve("meta-llama/Llama-2-7b"), TrainSetup(seq=256)
    stream = step_stream(spec, setup, static_memory(spec, setup))
    start = next(i for i, p, m in stream.places if m == "layers.3" and p == "backward")
    assert place_of(stream, start) == ("backward", "layers.3")
    assert place_of(stream, 0) == ("load", "")


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_alloc_conf_flag(capsys):
    code, out, _ = _run(capsys, "estimate", "meta-llama/Llama-2-7b", "--seq", "512",
                        "--alloc-conf", "expandable_segments:True", "--json")
    assert code == 0 and json.loads(out)["alloc_conf"] == "expandable_segments:True"
    code, out, err = _run(capsys, "estimate", "meta-llama/Llama-2-7b", "--alloc-conf", "foo:1")
    assert code != 0 and out == ""
    assert err.startswith("Error: invalid allocator settings 'foo:1': unrecognized key 'foo'"), err
    assert err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("model, kw", [("meta-llama/Llama-2-7b", {}), ("google/gemma-3-1b-pt", {"seq": 2048}),
                                       ("meta-llama/Meta-Llama-3-8B", {"quant": "int8", "seq": 512})])
@pytest.mark.parametrize("conf", ["", "expandable_segments:True", "max_split_size_mb:128"])
@pytest.mark.parametrize("capacity", [None, 6 * 2**30])
def test_the_small_pool_carried_as_a_level_replays_the_same(model, kw, conf, capacity):
    """The estimate's stream carries the small pool as its level (events._Builder(lump=True)):
    on these setups the replay is the one replay_stream gives by lumping the request-by-request
    stream itself, peaks, retries and OOM alike (the two part where a phase starts between two
    small-pool growths: docs/allocator.md#estimate-stream)."""
    from vramplan.cuda._reserved import replay_lumped

    spec, setup = resolve(model), TrainSetup(**kw)
    static = static_memory(spec, setup)
    every = replay_stream(step_stream(spec, setup, static, exact_layers=4).events, conf, capacity, lump_small=True)
    level = replay_lumped(step_stream(spec, setup, static, exact_layers=4, lump_small=True).events, conf, capacity)

    def key(r):
        return (r.peak_reserved_bytes, r.peak_allocated_bytes, r.fragmentation_bytes, r.num_alloc_retries,
                None if r.oom is None else (r.oom["nbytes"], r.oom["reserved_bytes"], r.oom["allocated_bytes"]))
    assert key(level) == key(every)


def test_profile_takes_alloc_conf_and_refuses_a_bad_one(capsys):
    """profile runs the training child under --alloc-conf; a malformed string stops it first."""
    code = main(["profile", "llama-2-7b", "--random-weights", "--device", "cpu", "--alloc-conf", "bogus:1"])
    assert code == 2
    assert capsys.readouterr().err == ("Error: invalid allocator settings 'bogus:1': unrecognized key 'bogus' "
                                       "(hint: see docs/allocator.md, section 'Settings syntax')\n")


@pytest.mark.parametrize("model, shape, conf", [
    ("meta-llama/Llama-2-7b", dict(batch=2, seq=4096), ""),
    ("meta-llama/Meta-Llama-3-8B", dict(seq=4096), "expandable_segments:True"),
    ("Qwen/Qwen3-8B", dict(batch=4, seq=1024), "expandable_segments:True"),
], ids=["llama2-7b-2x4096", "llama3-8b-4096-expandable", "qwen3-8b-4x1024-expandable"])
def test_the_replay_plays_every_forward(model, shape, conf):
    """Setups where 4 exact layers at each end drift from every event of every layer (+2.5%,
    -5.7%, -6.1% with the load of docs/allocator.md#quantization-on-load; +3.9%, -5.8%, -6.2%
    before it: docs/allocator.md#reduced-detail): the estimate's peak reserved is the replay of
    every layer's forward, which is every event's here to the byte."""
    spec, setup = resolve(model), TrainSetup(**shape)
    static = static_memory(spec, setup)

    def replay(exact):
        return replay_stream(step_stream(spec, setup, static, exact_layers=exact).events, conf,
                             lump_small=True).peak_reserved_bytes
    full, reduced = replay(None), replay(4)
    assert abs(reduced - full) > 0.02 * full
    assert estimate(spec, setup, alloc_conf=conf).peak_reserved_bytes == replay((None, 4)) == full


def test_a_setup_that_does_not_fit_names_the_smallest_card_it_runs_on():
    """Without a card the replay keeps every segment it made; on a smaller card malloc releases the
    cache and retries first, so the step runs on a card well below its device total. The smallest
    one is found by replaying against cards of other sizes (estimator.smallest_card)."""
    from vramplan.estimate._estimator import SMALLEST_CARD_STEP, SMALLEST_CARD_STEPS

    spec = resolve("TinyLlama/TinyLlama-1.1B-Chat-v1.0")
    setup = TrainSetup(batch=24, seq=2048)
    est = estimate(spec, setup, gpu="24GB")
    card = est.smallest_gpu_bytes
    assert est.status == "no" and card is not None
    # between what a card must hold at the least and what the step reserves with room to spare
    assert est.peak_allocated_bytes + est.cuda_context_bytes < card < est.device_total_bytes
    step = max(SMALLEST_CARD_STEP, est.device_total_bytes // SMALLEST_CARD_STEPS)
    mib = 2**20
    runs = estimate(spec, setup, gpu=f"{-(-card // mib)}MiB")
    assert runs.status != "no" and runs.smallest_gpu_bytes is None
    assert estimate(spec, setup, gpu=f"{(card - step) // mib}MiB").status == "no"
    assert estimate(spec, TrainSetup(batch=1, seq=2048), gpu="24GB").smallest_gpu_bytes is None   # it fits
    assert "smallest_gpu_bytes" in est.to_dict()


def test_the_verdict_line_says_the_smallest_card(capsys):
    assert main(["estimate", "TinyLlama/TinyLlama-1.1B-Chat-v1.0", "--batch", "24", "--gpu", "24GB"]) == 0
    words = " ".join(capsys.readouterr().out.split())
    card = estimate("TinyLlama/TinyLlama-1.1B-Chat-v1.0", TrainSetup(batch=24, seq=2048), gpu="24GB")
    assert (f"DOES NOT FIT on 24GB (22.35 GiB): it runs on a card of about {card.smallest_gpu_bytes / 2**30:.2f} GiB "
            f"or more (short by about {(card.smallest_gpu_bytes - 24 * 10**9) / 2**30:.2f} GiB); with room to "
            f"spare the caching allocator keeps more cached: {card.device_total_bytes / 2**30:.2f} GiB in all.") in words


def test_cuda_context_per_gpu_names_its_source():
    """docs/gpus.md#cuda-context-size: the H200's context measured after QLoRA steps; the RTX 3090's
    published fresh context plus the kernels a step loads (measured on the H200); other GPUs the
    default. The estimate's device total and assumptions use the figure of the GPU asked for."""
    from vramplan.core._units import MiB
    from vramplan.cuda._context import DEFAULT_CONTEXT
    setup = TrainSetup(seq=512)
    spec = resolve("meta-llama/Llama-2-7b-hf")
    h200 = estimate(spec, setup, gpu="H200")
    rtx3090 = estimate(spec, setup, gpu="RTX3090")
    a100 = estimate(spec, setup, gpu="A100-80GB")
    assert h200.cuda_context_bytes == 804_061_184                 # profiles/h200, after the steps
    assert rtx3090.cuda_context_bytes == 256 * MiB + 804_061_184 - 552_402_944
    assert a100.cuda_context_bytes == DEFAULT_CONTEXT.bytes
    assert any("InvokeAI issue #9413" in a for a in rtx3090.assumptions)
    for est in (h200, rtx3090, a100):
        assert est.device_total_bytes == est.cuda_context_bytes + est.peak_reserved_bytes


def test_the_load_makes_each_layer_s_weights_in_checkpoint_order():
    """from_pretrained quantizes the checkpoint's tensors in sorted key order (transformers
    core_model_loading.py, dot_natural_key): within a layer mlp before self_attn, Phi-3's o_proj
    before its qkv_proj, layer 2 before layer 10. The packed o_proj (4.5 MiB) then opens a 20 MiB
    segment that the packed qkv_proj (13.5 MiB) fills, where qkv_proj first would take a 14 MiB
    segment of its own (docs/allocator.md#load-order)."""
    from dataclasses import replace

    from vramplan.estimate._events import static_sizes
    from vramplan.estimate._inventory import checkpoint_order

    names = ["self_attn.qkv_proj", "layers.10.mlp", "self_attn.o_proj", "mlp.down_proj", "layers.2.mlp"]
    assert sorted(names, key=checkpoint_order) == ["layers.2.mlp", "layers.10.mlp", "mlp.down_proj",
                                                   "self_attn.o_proj", "self_attn.qkv_proj"]
    spec = resolve("microsoft/Phi-3-mini-4k-instruct")
    setup = TrainSetup(method="qlora", seq=512)
    static = static_memory(spec, setup)
    packed = {n: n * 3072 // 2 for n in (3072, 9216, 16384)}    # o_proj, qkv_proj, gate_up_proj (8192 x 3072: down)
    big = [n for n in static_sizes(spec, setup, static) if n >= 4 << 20]

    def first_layer(sizes):
        start = next(i for i, n in enumerate(sizes) if n < 1 << 27)     # past the two embeddings
        return sizes[start:start + 4]
    assert first_layer(big) == [8192 * 3072 // 2, packed[16384], packed[3072], packed[9216]]
    modules = static_sizes(spec, setup, replace(static, load_order="modules"))
    assert first_layer([n for n in modules if n >= 4 << 20]) == [packed[9216], packed[3072], packed[16384],
                                                                 8192 * 3072 // 2]


@pytest.mark.parametrize("ckpt, freed", [(False, "forward"), (True, "backward")])
def test_the_mask_goes_as_the_base_model_returns_unless_checkpointing_holds_it(ckpt, freed):
    """transformers' boolean sliding-window mask (masking_utils) is a local of the base model's
    forward that no backward op saves (SDPA saves the additive bias it makes from it): it goes as
    the forward returns, before lm_head, as in simulate's trace; checkpointing holds it as the
    layers' input for the recomputation, until the first layer's backward
    (Llama-2-70B LoRA 1 x 2048 eager without checkpointing against simulate: +0.29% -> -0.00%)."""
    from vramplan.estimate._events import compiled

    spec = resolve("google/gemma-3-1b-pt")
    setup = TrainSetup(seq=2048, grad_ckpt=ckpt)
    program = compiled(spec, setup, static_memory(spec, setup), ASSUMED, exact_layers=None)
    stream = program.stream(program.sizes(setup), False)
    made, kept = {}, []
    for i, event in enumerate(stream.events):
        if event[0] == "alloc" and event[2] == 2048 * 2048 and place_of(stream, i) == ("forward", ""):
            made[event[1]] = i
        elif event[0] == "free" and event[1] in made:
            made.pop(event[1])
            if place_of(stream, i) != ("forward", ""):
                kept.append(place_of(stream, i))
    assert kept and {phase for phase, _module in kept} == {freed}
    if not ckpt:
        assert set(kept) == {("forward", "lm_head")}
