"""plan/_zero3.py against DeepSpeed's own coordinator: tests/data/zero3_coordinator.json.gz holds,
for a 6-layer Llama run under DeepSpeed ZeRO-3 on the CPU (benchmarks/zero3_coordinator.py), the
elements of partitioned parameters gathered after every fetch and release of a steady-state step,
under seven stage3 settings, with and without LoRA and checkpointing. The replay of the trace
built from the model's config must give the same modules in the same order, and the same
gathered elements after every call."""
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
