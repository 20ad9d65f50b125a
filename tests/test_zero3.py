"""plan/_zero3.py against DeepSpeed's own coordinator: tests/data/zero3_coordinator.json.gz holds,
for a 6-layer Llama run under DeepSpeed ZeRO-3 on the CPU (benchmarks/zero3_coordinator.py), the
elements of partitioned parameters gathered after every fetch and release of a steady-state step,
under seven stage3 settings, with and without LoRA and checkpointing. The replay of the trace
built from the model's config must give the same modules in the same order, and the same
gathered elements after every call."""
import dataclasses
import gzip
import json
from pathlib import Path

import pytest

from vramplan.core._models import resolve, spec_from_config
from vramplan.core._setup import TrainSetup
from vramplan.plan._sharding import Parallel, per_gpu
from vramplan.plan._zero3 import gathered_at_moments, replay, step_trace

DATA = json.loads(gzip.open(Path(__file__).parent / "data" / "zero3_coordinator.json.gz", "rt").read())
SPEC = spec_from_config(DATA["config"], "tiny-llama-zero3", "tests/data/zero3_coordinator.json.gz")


def _name(name: str, lora: bool) -> str:
    """DeepSpeed's module names in this trace's terms: peft's wrapper and LoRA adapter names, and
    the norms by position."""
    roots = {"": "peft", "base_model.model": ""} if lora else {"": ""}
    if name in roots:
        return roots[name]
    name = name.removeprefix("base_model.model.").removesuffix(".default")
    return name.replace("input_layernorm", "norm0").replace("post_attention_layernorm", "norm1")


def _case_id(case: dict) -> str:
    return (f"reuse{case['reuse_distance']:.0e}-prefetch{case['prefetch_bucket']:.0e}-live{case['max_live']:.0e}"
            f"-{'ckpt' if case['grad_ckpt'] else 'nockpt'}-{'lora' if case['lora'] else 'full'}")


@pytest.mark.parametrize("case", DATA["cases"], ids=_case_id)
def test_replay_gathers_what_deepspeed_gathers(case):
    setup = TrainSetup(method="lora" if case["lora"] else "full", dtype="fp32", rank=DATA["rank"],
                       grad_ckpt=case["grad_ckpt"], batch=1, seq=32)
    trace = step_trace(SPEC, setup, DATA["persistence_threshold"], DATA["element_bytes"])
    after = replay(trace, case["reuse_distance"], case["prefetch_bucket"], case["max_live"])
    # DeepSpeed's record holds every fetch and the releases of modules with parameters of their own
    mine = [(kind, name, forward, sum(gathered) // DATA["element_bytes"])
            for (kind, name, own, forward), gathered in zip(trace.calls, after) if kind == "fetch" or own]
    real = [(kind, _name(name, case["lora"]), forward, numel) for kind, name, forward, numel in case["calls"]]
    assert len(mine) == len(real)
    for i, (m, r) in enumerate(zip(mine, real)):
        assert m == r, f"call {i}"


def test_defaults_keep_what_is_used_again_within_the_reuse_distance():
    """Llama-2-7B QLoRA under DeepSpeed's defaults: from the forward to the backward a GPU keeps
    about stage3_max_reuse_distance elements (1e9, 2 bytes each) gathered; gathering only the
    module in use, it holds at most the largest parameter."""
    spec, setup = resolve("meta-llama/Llama-2-7b-hf"), TrainSetup(batch=1, seq=512)
    defaults = gathered_at_moments(spec, setup, 100_000, 2, 1_000_000_000, 50_000_000, 1_000_000_000)
    assert 0.9e9 * 2 <= sum(defaults["forward.loss"]) <= 1.1e9 * 2
    assert defaults["optimizer"] == (0, 0)
    # gathering only what is in use: at most the largest module (the 16-bit embedding or
    # lm_head, 32,000 x 4,096 x 2 bytes), or a checkpointed layer's frozen weights, which its
    # recomputation keeps for the backward of the layer's last module
    minimal = gathered_at_moments(spec, setup, 100_000, 2, 0, 0, 1_000_000_000)
    assert 0 < max(sum(v) for v in minimal.values()) <= spec.vocab * spec.hidden * 2


def test_per_gpu_zero3_counts_the_gathered_parameters():
    spec, setup = resolve("meta-llama/Llama-2-7b-hf"), TrainSetup(batch=1, seq=512)
    est = per_gpu(spec, setup, Parallel(2, "zero3"))
    gathered = {t.component: t.bytes for t in est.terms if t.held == "gathered"}
    at_peak = gathered_at_moments(spec, setup, 100_000, 2, 1_000_000_000, 50_000_000, 1_000_000_000)
    assert (gathered["weights"], gathered["adapters"]) in at_peak.values()
    tighter = per_gpu(spec, setup, Parallel(2, "zero3", max_reuse_distance=0, max_live_parameters=0))
    assert tighter.peak_allocated_bytes < est.peak_allocated_bytes - 1024 ** 3


def _two_modules():
    """A hand-made trace: module a holds parameters 0 (1,000 elements) and 3 (500), module b
    parameter 1 (3,001), each fetched and released in turn; parameter 2 (10 elements) is
    persistent and belongs to module a too."""
    from vramplan.plan._zero3 import Param, StepTrace
    params = (Param(1000, 2048, True, False), Param(3001, 6144, True, False), Param(10, 512, True, True),
              Param(500, 1024, True, False))
    calls = (("fetch", "a", (0, 2, 3), True), ("release", "a", (0, 2, 3), True),
             ("fetch", "b", (1,), True), ("release", "b", (1,), True))
    return StepTrace(params, ((0, 2, 3), (1,)), calls, {}, ((0, ("forward", "prefix")), (2, ("forward", 0))))


def test_gather_events_by_hand():
    """2 GPUs, 2-byte elements. Several parameters: one coalesced flat tensor of their partitions
    times N (500 + 250 elements x 2 x 2 bytes = 3,000, 3,072 allocated), each parameter's own
    tensor when waited, the flat tensor freed after the last. One parameter: a buffer of its
    partition times N (ceil(3001 / 2) x 2 = 3,002 elements, 6,004 bytes, 6,144 allocated), which
    is its data. A release frees the parameter's tensor; the persistent parameter is never
    gathered."""
    from vramplan.plan._zero3 import gather_segments
    trace = _two_modules()
    # the first step: no prefetch, every parameter released with its module
    first = dict(gather_segments(trace, 10**9, 10**9, 10**9, 2, 2, True))
    flat0 = ("flat", 0)
    assert first[("forward", "prefix")] == ((1, flat0, 3072), (1, 0, 2048), (1, 3, 1024), (-1, flat0, 0),
                                            (-1, 0, 0), (-1, 3, 0))
    assert first[("forward", 0)] == ((1, 1, 6144), (-1, 1, 0))
    # after it (the trace complete), reuse distance 0: module a's fetch prefetches parameter 1 (its
    # buffer made then, its data when module b waits for it); nothing is kept for reuse
    steady = dict(gather_segments(trace, 0, 10**9, 10**9, 2, 2, False))
    assert steady[("forward", "prefix")] == ((1, flat0, 3072), (1, 0, 2048), (1, 3, 1024), (-1, flat0, 0),
                                             (1, 1, 6144), (-1, 0, 0), (-1, 3, 0))
    assert steady[("forward", 0)] == ((-1, 1, 0),)
    # offload_param: each partition is copied to the GPU for the all-gather (500 / 2 x 2 bytes: 512)
    off = dict(gather_segments(trace, 10**9, 10**9, 10**9, 2, 2, True, offload=True))
    copy0, copy3 = ("copy", 0), ("copy", 3)
    assert off[("forward", "prefix")][:5] == ((1, flat0, 3072), (1, copy0, 1024), (1, copy3, 512), (-1, copy0, 0),
                                              (-1, copy3, 0))
    # module b fetched again last (as the embedding ends backward): under the default reuse
    # distance parameter 1 stays gathered from its first use, and release_and_reset_all frees it
    again = dataclasses.replace(trace, modules=trace.modules + ((1,),),
                                calls=trace.calls + (("fetch", "b", (1,), False),))
    kept = dict(gather_segments(again, 10**9, 0, 10**9, 2, 2, False))
    assert kept[("forward", 0)] == ((1, 1, 6144), (-1, 1, 0))


def test_first_step_gathers_one_module_at_a_time():
    """Before the trace is complete nothing is prefetched or kept: a Llama-2-7B QLoRA step never
    holds more than one module's parameters gathered (each module has one partitioned parameter of
    its own: one buffer, the largest the 16-bit embedding's 250 MiB)."""
    from vramplan.plan._zero3 import gather_segments
    spec, setup = resolve("meta-llama/Llama-2-7b-hf"), TrainSetup(batch=1, seq=1)
    for ckpt in (True, False):
        trace = step_trace(spec, setup.with_(grad_ckpt=ckpt), 100_000, 2)
        live, held, most = {}, 0, 0
        for _segment, events in gather_segments(trace, 10**9, 5 * 10**7, 10**9, 2, 2, True):
            for sign, name, n in events:
                if sign > 0:
                    live[name] = n
                    held += n
                else:
                    held -= live.pop(name)
                most = max(most, held)
        assert not live and most == 32000 * 4096 * 2
