"""The planner's shortcuts give the numbers and verdicts of the full path, exactly:
- the one-pass replay of a compiled stream (cuda/_fast_replay.py) is replay_lumped on that
  stream, field for field, OOM and cache releases included;
- a replay against the card that needed no cache release is the unlimited replay
  (estimate/_reserved.py capped_is_uncapped), so estimate() may replay against the card first;
- FSDP full_shard skips a single-GPU replay it does not use (plan/_sharding.py base_estimate);
- a plan (grid, limits, changes) equals the plan computed with every shortcut off, and every
  grid cell is the public API's number and verdict under the full replay.
"""
from __future__ import annotations

import importlib
from contextlib import contextmanager

import pytest

from vramplan.core._gpus import Gpu, resolve_gpu
from vramplan.core._models import resolve
from vramplan.core._setup import TrainSetup
from vramplan.cuda._alloc_conf import as_conf
from vramplan.cuda._fast_replay import EMPTY_CACHE, covers, replay_program
from vramplan.cuda._reserved import replay_lumped
from vramplan.estimate._estimator import estimate
from vramplan.estimate._events import FsdpShards, Program, compiled, ddp_buckets, place_of
from vramplan.estimate._inventory import static_memory
from vramplan.plan._planner import plan
from vramplan.plan._sharding import (Parallel, ddp_trainable, distribute, effective_setup, per_gpu, splits_for,
                                    unit_params, zero_partitions)

reserved = importlib.import_module("vramplan.estimate._reserved")

SETUPS = [
    ("meta-llama/Llama-2-7b", {"seq": 1024, "batch": 2}),
    ("meta-llama/Llama-2-7b", {"grad_ckpt": False, "seq": 512}),
    ("meta-llama/Llama-2-7b", {"attn": "eager", "seq": 512, "batch": 2}),       # every layer replayed
    ("meta-llama/Meta-Llama-3-8B", {"quant": "int8", "seq": 512}),
    ("mistralai/Mistral-7B-v0.1", {"method": "full", "grad_ckpt": False, "seq": 256}),
    ("google/gemma-3-1b-pt", {"seq": 2048}),                                    # two layer kinds
    ("meta-llama/Meta-Llama-3-8B", {"batch": 16, "seq": 512, "loop": "plain"}),
    ("Qwen/Qwen3-30B-A3B", {"seq": 512}),                                       # MoE
]
CONFS = ["", "large_segment_size_mb:40"]


def _capacities(ref) -> list:
    """No limit, the unlimited peak, and capacities between allocated and reserved peaks, where
    malloc must release the cache and either gets by or runs out of memory (fragmentation)."""
    lo, hi = ref.peak_allocated_bytes, ref.peak_reserved_bytes
    return [None, hi] + [lo + (hi - lo) * k // 8 for k in range(1, 8)] + [lo // 2]


def _lumped(spec, setup, fsdp=None):
    static = static_memory(spec, setup)
    program = compiled(spec, setup, static, exact_layers=reserved.exact_layers_for(setup, fsdp=fsdp is not None), fsdp=fsdp)
    sizes = program.sizes(setup)
    return program, sizes, program.stream(sizes, lump_small=True)


def _fsdp_shards(spec, setup, gpus=2, wrap=False) -> FsdpShards:
    sp = splits_for(spec, setup, Parallel(gpus, "fsdp"))
    params = unit_params(spec, setup.with_(batch=1, seq=1), sp) if wrap else ((), ())
    return FsdpShards(gpus, sp.layer_units, sp.root_weights, sp.root_adapters, sp.root_gradients,
                      sp.quant_constants, *params)


@pytest.mark.parametrize("model, kw", SETUPS, ids=[f"{m}-{kw}" for m, kw in SETUPS])
def test_one_pass_replay_is_replay_lumped(model, kw):
    spec, setup = resolve(model), TrainSetup(**kw)
    program, sizes, stream = _lumped(spec, setup)
    seen = set()
    for text in CONFS:
        conf = as_conf(text)
        assert covers(conf)
        ref = replay_lumped(stream.events, conf)
        for capacity in _capacities(ref):
            full = replay_lumped(stream.events, conf, capacity, place=lambda i: place_of(stream, i))
            fast = replay_program(program.ops, program.places, sizes, program.keys, conf, capacity)
            assert fast == full, (text, capacity)
            seen.add("oom" if full.oom else "released" if full.num_alloc_retries else "plain")
    assert "oom" in seen and "plain" in seen


@pytest.mark.parametrize("wrap", [False, True])
def test_one_pass_replay_of_fsdp_streams(wrap):
    """Three CUDA streams (all-gathers and reduce-scatters in their own pools), with and without
    the wrap phase before the steps (peak allocated counted from the first step)."""
    spec = resolve("meta-llama/Llama-2-13b-hf")
    for setup in (TrainSetup(batch=2, seq=2048), TrainSetup(batch=1, seq=512, grad_ckpt=False)):
        program, _sizes, _stream = _lumped(spec, setup, _fsdp_shards(spec, setup, wrap=wrap))
        assert program.streams and (program.count_from is not None) == wrap
        _assert_one_pass_equals_lumped(program, setup)


def _assert_one_pass_equals_lumped(program, setup):
    """The one-pass replay of a multi-GPU program against replay_lumped of its stream, unlimited and
    against cards that force cache releases and OOMs."""
    sizes = program.sizes(setup)
    stream = program.stream(sizes, lump_small=True)
    start = reserved.count_from(program, stream)
    conf = as_conf("")
    ref = replay_lumped(stream.events, conf, count_from=start)
    for capacity in _capacities(ref):
        full = replay_lumped(stream.events, conf, capacity, place=lambda i: place_of(stream, i), count_from=start)
        assert replay_program(program.ops, program.places, sizes, program.keys, conf, capacity, program.streams,
                              program.count_from) == full


def test_one_pass_replay_of_ddp_streams():
    """DDP's construction (module-state broadcast, the Reducer's buckets) and the bucket rebuild."""
    spec = resolve("meta-llama/Llama-2-7b-hf")
    for setup in (TrainSetup(method="lora", batch=2, seq=1024), TrainSetup(method="full", batch=1, seq=512),
                  TrainSetup(method="qlora", batch=2, seq=1024, grad_accum=4)):
        sp = splits_for(spec, setup, Parallel(2, "ddp"))
        layers, root = unit_params(spec, setup.with_(batch=1, seq=1), sp)
        buckets = ddp_buckets(list(root) + [p for layer in layers for p in layer],
                              ddp_trainable(spec, setup.with_(batch=1, seq=1), sp))
        static = static_memory(spec, setup)
        program = compiled(spec, setup, static, exact_layers=reserved.exact_layers_for(setup), ddp=buckets)
        _assert_one_pass_equals_lumped(program, setup)


def test_one_pass_replay_of_zero_streams():
    """ZeRO-2's construction (empty_cache included), gradient buckets and step, with and without
    offload_optimizer; ZeRO-3's, with its all-gathers in their own stream."""
    spec = resolve("meta-llama/Llama-2-7b-hf")
    for par, setup in ((par, setup) for par in (Parallel(2, "zero2"), Parallel(2, "zero2", offload="cpu"),
                                                Parallel(2, "zero3"), Parallel(2, "zero3", offload="cpu"))
                       for setup in (TrainSetup(method="lora", batch=2, seq=1024),
                                     TrainSetup(method="full", batch=1, seq=512))):
        setup = effective_setup(setup, par)
        z = zero_partitions(spec, setup.with_(batch=1, seq=1), splits_for(spec, setup, par), par)
        static = static_memory(spec, setup)
        program = compiled(spec, setup, static, exact_layers=reserved.exact_layers_for(setup), zero=z)
        _assert_one_pass_equals_lumped(program, setup)


@pytest.mark.parametrize("sizes, capacity", [
    ([30 * 2**20, 512], 31 * 2**20),     # the 512 B request needs a 2 MiB small segment past the card
    ([512], 2**20),
    ([512], 2 * 2**20),                  # the segment fits: no release, no OOM
])
def test_a_small_pool_growth_before_empty_cache_meets_the_capacity(sizes, capacity):
    """empty_cache right after a small-pool growth: the growth is settled against the capacity
    first, as before any large-pool event (release_cached_blocks, one retry, else the OOM), and
    the one-pass replay is replay_lumped field for field."""
    ops = list(range(len(sizes))) + [EMPTY_CACHE]
    program = Program(ops, [], tuple(sizes), (), {}, (), None, None, None, len(sizes))
    stream = program.stream(list(sizes), lump_small=True)
    conf = as_conf("")
    ref = replay_lumped(stream.events, conf, capacity, place=lambda i: place_of(stream, i))
    assert replay_program(ops, [], list(sizes), len(sizes), conf, capacity) == ref
    assert ref.peak_reserved_bytes <= capacity
    assert (ref.oom is not None) == (capacity < sum(sizes) - 512 + 2 * 2**20)


def test_settings_outside_the_one_pass_replay_take_the_full_model():
    for text in ("expandable_segments:True", "max_split_size_mb:128", "roundup_power2_divisions:4"):
        assert not covers(as_conf(text))
        assert not reserved.capped_is_uncapped(text)
        with pytest.raises(ValueError):
            replay_program([], [], [], 0, as_conf(text))


def test_a_replay_against_the_card_without_a_release_is_the_unlimited_one():
    spec, setup = resolve("meta-llama/Llama-2-7b"), TrainSetup(seq=2048, batch=4)
    program, sizes, stream = _lumped(spec, setup)
    conf = as_conf("")
    free = replay_lumped(stream.events, conf)
    for capacity in _capacities(free):
        capped = replay_lumped(stream.events, conf, capacity)
        assert (capped.num_alloc_retries == 0) == (capacity is None or free.peak_reserved_bytes <= capacity)
        if capped.num_alloc_retries == 0:
            assert capped == free


@contextmanager
def full_path():
    """Every replay through the stream and replay_lumped, unlimited first then against the card
    (the estimate before the one-pass replay): reserved.covers off, the replay cache emptied."""
    mp = pytest.MonkeyPatch()
    mp.setattr(reserved, "covers", lambda conf: False)
    reserved._cached.cache_clear()
    try:
        yield
    finally:
        mp.undo()
        reserved._cached.cache_clear()


def test_estimate_against_the_card_first_is_the_full_path():
    spec = resolve("meta-llama/Llama-2-7b")
    setups = [TrainSetup(seq=s, batch=b, dtype="fp16") for s in (512, 2048) for b in (1, 4, 8)]
    gpus = ["A100-40GB", "T4"] + [Gpu(f"{n} GiB", n * 2**30) for n in (12, 15, 17, 19)]
    fast = [estimate(spec, s, gpu=g).to_dict() for g in gpus for s in setups]
    with full_path():
        full = [estimate(spec, s, gpu=g).to_dict() for g in gpus for s in setups]
    assert fast == full
    kinds = {"oom" if e["allocator_oom"] else "released" if e["allocator_retries"] else e["status"] for e in full}
    assert {"oom", "released", "fits", "no"} <= kinds, kinds


@pytest.mark.parametrize("gpus, offload", [(2, "none"), (4, "none")])
def test_fsdp_skips_only_a_replay_it_does_not_use(gpus, offload):
    spec, par, gpu = resolve("meta-llama/Llama-2-13b-hf"), Parallel(gpus, "fsdp", offload), resolve_gpu("24GB")
    for setup in (TrainSetup(batch=2, seq=2048), TrainSetup(batch=1, seq=4096, grad_ckpt=False)):
        run = effective_setup(setup, par)
        with_replay = distribute(estimate(spec, run, gpu=gpu), par, gpu=gpu)
        assert per_gpu(spec, setup, par, gpu=gpu).to_dict() == with_replay.to_dict()


GRIDS = [
    # (model, GPU, setup, grid batches, grid seqs, the kinds of cell the grid must hold)
    ("meta-llama/Meta-Llama-3-8B", "24GB", {"batch": 16, "seq": 512}, [12, 14, 16, 17, 18, 19], [256, 512, 768],
     {"fits", "tight", "oom", "lower bound"}),     # "oom": a fragmentation OOM below the card
    ("meta-llama/Llama-2-13b-hf", "24GB", {"batch": 2, "seq": 2048, "gpus": 4, "strategy": "fsdp"},
     [1, 2, 5, 8], [512, 2048, 3072], {"fits", "tight", "lower bound"}),
    ("meta-llama/Llama-2-13b-hf", "24GB", {"batch": 2, "seq": 2048, "gpus": 4, "strategy": "zero3"},
     [1, 2, 6, 8], [512, 2048, 3072], {"fits", "oom", "lower bound"}),   # ZeRO-3's own stream, against the card
]


@pytest.mark.parametrize("model, gpu, kw, batches, seqs, expected", GRIDS, ids=[f"{g[0]}-{g[2]}" for g in GRIDS])
def test_plan_grid_is_the_full_path(model, gpu, kw, batches, seqs, expected):
    fast = plan(model, gpu=gpu, batches=batches, seqs=seqs, recommend=False, **kw)
    with full_path():
        full = plan(model, gpu=gpu, batches=batches, seqs=seqs, recommend=False, **kw)
        assert fast.to_dict() == full.to_dict()
        spec, kinds = resolve(model), set()
        for row in fast.grid.cells:
            for cell in row:
                est = per_gpu(spec, fast.setup.with_(batch=cell.batch, seq=cell.seq), fast.parallel, gpu=fast.gpu)
                assert est.status == cell.status
                if cell.lower_bound:     # allocated + context alone exceed the card: a floor, marked
                    assert cell.need_bytes <= est.device_total_bytes and cell.status == "no"
                else:
                    assert cell.need_bytes == est.device_total_bytes
                kinds.add("lower bound" if cell.lower_bound else "oom" if est.allocator_oom else cell.status)
    assert expected <= kinds, kinds


def test_plan_with_changes_is_the_full_path():
    """A setup that fails from fragmentation below the card: ranked changes, limits and minimum."""
    args = dict(gpu="24GB", batch=18, seq=512, batches=[8, 16, 18], seqs=[512, 1024])
    fast = plan("meta-llama/Meta-Llama-3-8B", **args)
    assert fast.estimate.allocator_oom is not None and fast.changes
    with full_path():
        assert fast.to_dict() == plan("meta-llama/Meta-Llama-3-8B", **args).to_dict()
