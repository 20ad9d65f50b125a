"""The identical-layers shortcut (simulate/_shortcut.py) against the full trace.

Real configs, small shapes (hidden 64, 7 decoder layers: 5 traced, one repeated twice more; the
Gemma-2 case has 12 layers in 2-layer units): the rebuilt trace must equal the full one field for
field — peak and components byte for byte, and also peak place, phase peaks, boundaries, paged
bytes, attention counts, top modules and the timeline. Only `seconds`, `notes`, `layers_traced`
and `extrapolated` may differ."""
from __future__ import annotations

import importlib
import json

import pytest
from conftest import requires

pytestmark = requires("torch", "transformers", "peft", "bitsandbytes")

from vramplan.core._setup import TrainSetup  # noqa: E402
from vramplan.simulate import simulate as run  # noqa: E402

from vramplan.simulate import _shortcut as layers  # noqa: E402
from vramplan.simulate import _step as step  # noqa: E402
kernels = importlib.import_module("vramplan.simulate._kernels")

SEQ, RANK, DEPTH = 32, 8, 7
BOOKKEEPING = ("seconds", "notes", "layers_traced", "extrapolated")

# (model_type, config overrides, setup): grad checkpointing on/off, sdpa/eager, qlora/lora/full,
# GQA (the tiny configs have 4 query / 2 KV heads), MoE, Gemma-2's alternating layers, biases
# (qwen2), fused projections (phi3), sliding windows, 8-bit / paged / factored optimizers.
CASES = [
    ("llama", {}, {}),
    ("llama", {}, {"grad_ckpt": False}),
    ("llama", {}, {"attn": "eager", "method": "lora"}),
    ("llama", {}, {"method": "full", "grad_ckpt": False, "attn": "eager"}),
    ("llama", {"vocab_size": 2048}, {"method": "full", "optimizer": "paged_adamw"}),
    ("llama", {}, {"optimizer": "adamw8bit", "batch": 2, "lora_dropout": 0.1}),
    ("llama", {}, {"optimizer": "adafactor", "prepare_kbit": True}),
    ("qwen2", {}, {"method": "lora", "optimizer": "sgd"}),
    ("phi3", {}, {"dtype": "fp16"}),
    ("mistral", {"sliding_window": 16}, {"seq": 48}),
    ("mixtral", {}, {}),
    ("mixtral", {"experts_implementation": "eager"}, {"grad_ckpt": False}),
    ("gemma2", {"num_hidden_layers": 12}, {"attn": "eager"}),
]


def setup_(**kw) -> TrainSetup:
    return TrainSetup(seq=kw.pop("seq", SEQ), rank=kw.pop("rank", RANK), **kw)


def comparable(trace) -> dict:
    d = trace.to_dict()
    for key in BOOKKEEPING:
        d.pop(key)
    # The rebuilt step registers the copied layers' static tensors after the traced ones, not in
    # module order, so the allocator packs the small pool's constants in another order: the same
    # peak reserved (compared), reserved-minus-allocated at that peak a few 512-byte blocks apart.
    d.pop("fragmentation_bytes", None)
    return d


@pytest.mark.parametrize("model_type, config, kw", CASES,
                         ids=[f"{m}-{json.dumps(c | k, sort_keys=True)}" for m, c, k in CASES])
def test_shortcut_equals_the_full_trace(tiny_spec, model_type, config, kw):
    spec = tiny_spec(model_type, **{"num_hidden_layers": DEPTH, **config})
    full = run(spec, setup_(**kw), exact=True)
    short = run(spec, setup_(**kw))
    assert short.extrapolated and not full.extrapolated, short.notes
    assert short.layers_traced < spec.layers == full.layers_traced
    assert short.peak_allocated_bytes == full.peak_allocated_bytes
    assert short.components == full.components
    assert comparable(short) == comparable(full)


def test_layers_that_are_not_interchangeable_are_traced_in_full(tiny_spec):
    """bitsandbytes int8 keeps each layer's input (ctx.tensors) until the whole backward ends, a
    free at a fixed place rather than one relative to its layer: the check declines, the full
    trace runs, and the note says why."""
    spec = tiny_spec(num_hidden_layers=DEPTH)
    short = run(spec, setup_(quant="int8"))
    assert not short.extrapolated and short.layers_traced == DEPTH
    assert any("shortcut not used (the middle layers' forward steps differ)" in n for n in short.notes)


def test_layer_kinds_without_a_period_are_traced_in_full(tiny_spec):
    # Qwen2: sliding attention from max_window_layers on: full, full, full, sliding x 4
    spec = tiny_spec("qwen2", num_hidden_layers=DEPTH, use_sliding_window=True, max_window_layers=3,
                     sliding_window=16)
    trace = run(spec, setup_())
    assert not trace.extrapolated
    assert any("not all of the same kind" in n for n in trace.notes)


def test_shallow_models_are_traced_in_full(tiny_spec):
    trace = run(tiny_spec(num_hidden_layers=layers.UNITS), setup_())
    assert not trace.extrapolated and trace.layers_traced == layers.UNITS and not any("shortcut" in n for n in trace.notes)


def test_the_replay_reproduces_the_tracker(tiny_spec):
    """The shortcut's replay of a stream, run on a traced step, gives the tracker's own peak,
    phase maxima and timeline; and the trace built from it equals the tracker's."""
    spec, setup = tiny_spec(), setup_(grad_ckpt=False)
    with step.Simulation(spec, setup, "meta") as sim:
        sim.warm_up()
        tracker = sim.measure()
        measured = layers.replay(layers.stream_of(tracker), sum(sim.paged), dict(sim.sdpa.counts),
                                 len(tracker.strays))
        assert layers.same_as_tracker(tracker, measured)
        assert measured.boundary == sim.boundary
        direct = sim.trace(tracker)
    replayed = step.make_trace(spec, setup, "meta", measured, layers_traced=spec.layers)
    assert comparable(replayed) == comparable(direct)


def test_catalog_70b_uses_the_shortcut():
    """Llama-2-70b QLoRA: 5 of 80 layers traced (benchmarks/simulate_speed.py: ~2 s, ~0.5 GB)."""
    from vramplan.core._models import resolve

    trace = run(resolve("meta-llama/Llama-2-70b-hf"), setup_(seq=2048, rank=16))
    assert trace.extrapolated and trace.layers_traced == 5
    assert trace.peak_phase == "backward"
    assert trace.peak_module.startswith("model.layers.79.")   # renamed to the full model's last layer
    assert trace.attention["flash"] == 2 * 80


def test_foreach_stand_in_allocates_like_the_kernel():
    """Out-of-place foreach ops get one output per tensor, in order, with the kernel's layout;
    in-place ones allocate nothing: the same storages as running the meta kernel on every tensor."""
    import torch

    from vramplan.simulate._tracker import AllocationTracker

    def blocks(overrides):
        shapes = [(64, 8), (8, 64), (64, 8), (8, 64), (3,), (64, 8)]
        ts = [torch.empty(s, device="meta") for s in shapes] + [torch.empty(5, dtype=torch.bfloat16, device="meta")]
        tracker = AllocationTracker("meta", overrides=overrides)
        for t in ts:
            tracker.track(t, "weights")
        with tracker:
            torch._foreach_mul_(ts, 0.9)
            torch._foreach_addcmul_(ts, ts, ts, value=0.1)
            roots = torch._foreach_sqrt(ts)
            sums = torch._foreach_add(ts, roots)
            del roots
        return [(b.size, b.alloc_event, b.free_event, b.op) for b in tracker.blocks], sums

    plain, sums_plain = blocks({})
    stand_in, sums = blocks(dict.fromkeys(kernels.foreach_ops(), kernels.foreach_op))
    assert stand_in == plain
    assert [(s.shape, s.dtype, s.stride()) for s in sums] == [(s.shape, s.dtype, s.stride()) for s in sums_plain]
