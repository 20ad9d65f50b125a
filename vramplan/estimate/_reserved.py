"""The estimate's peak reserved memory: its two-step allocation stream (_events.py) replayed
through the caching-allocator model, small pool lumped (cuda/_reserved.py), cached per setup,
settings and capacity (the planner asks the same question many times)."""
from __future__ import annotations

from functools import lru_cache

from vramplan.core._models import ModelSpec
from vramplan.core._setup import TrainSetup
from vramplan.cuda._arch import ASSUMED, CudaArch
from vramplan.cuda._alloc_conf import AllocConf, as_conf
from vramplan.cuda._fast_replay import covers, replay_program
from vramplan.cuda._reserved import ReservedPeak, lumpable, replay_lumped, replay_stream
from vramplan.estimate._inventory import Static


def conf_of(alloc_conf) -> AllocConf:
    """None: the settings of the environment (PYTORCH_CUDA_ALLOC_CONF), as PyTorch reads them."""
    return AllocConf.from_env() if alloc_conf is None else as_conf(alloc_conf)


def reserved_peak(spec: ModelSpec, setup: TrainSetup, static: Static, arch: CudaArch = ASSUMED, alloc_conf=None,
                  capacity: int | None = None, fsdp=None, ddp=None, zero=None) -> tuple[ReservedPeak, str]:
    """`fsdp`: an events.FsdpShards for one GPU of FSDP full_shard instead of a single GPU; `ddp`:
    an events.DdpBuckets for one GPU of DDP; `zero`: an events.ZeroPartitions for ZeRO-2."""
    conf = conf_of(alloc_conf)
    return _cached(spec, setup, static, arch, conf, capacity, fsdp, ddp, zero), conf.text


def capped_is_uncapped(alloc_conf) -> bool:
    """Whether a replay against a capacity that never needed a cache release (num_alloc_retries 0)
    is the unlimited replay, field for field. So it is under the settings the one-pass replay
    covers (cuda/_fast_replay.py): the capacity enters only where a new segment or small-pool
    growth would pass it, and every such point releases the cache and retries (malloc's failure
    path, docs/allocator.md#rules rule 7). Not with max_split_size (an oversize block is released
    before any retry is counted) nor expandable segments (the reservation is sized by the capacity)."""
    return covers(conf_of(alloc_conf))


# Decoder layers played event by event at each end of the stack; the layers between play only what
# they leave alive (events.step_stream exact_layers). Against every event of every layer, peak
# reserved moves by at most 2.5% on the setups of docs/allocator.md#reduced-detail, for a fifth
# of the replay time on Llama-2-70B.
EXACT_LAYERS = 4


def exact_layers_for(setup: TrainSetup, conf: AllocConf | None = None) -> int | tuple | None:
    """How many layers at each end the replay plays event by event (None: every layer; a pair:
    the forward's and the backward's, events.step_stream).
    Checkpointed eager attention recomputes seq x seq scores in every layer's backward, and
    there the reduced detail drifts: against simulate on catalog shapes, Llama-2-7B qlora
    4x2048 is +12.6% and Llama-2-13B -10.8%, where every layer replayed is within 0.5%
    (docs/allocator.md#reduced-detail). Those setups replay every layer.
    Checkpointed layers under autocast drift in their forward: where each layer's saved input
    lands among its transients moves whole segments (recipes trainer / trl-sft / qlora-paper,
    QLoRA 4x2048 on Llama-2 7B-70B: -2.2% to -7.4% against simulate; every layer's forward
    played: -1.8% to +2.6%, the same figures as every event of every layer). A plain loop's
    logits, alive through the next forward (TrainSetup.outputs_outlive_step), do the same: recipe
    `plain`, 28 setups of benchmarks/agreement-recipes.md, mean |error| 0.74% (max 3.3%: Llama-2-7B
    and Mistral-7B QLoRA 4x2048) against simulate, 0.44% (max 2.0%) with every layer's forward
    played (docs/allocator.md#reduced-detail). Those setups play every layer's forward and the
    backward of EXACT_LAYERS at each end.
    Under expandable segments peak reserved is how far each pool's one segment has grown, so one
    block the middle layers would have placed higher moves it: on benchmarks/reserved_detail.py's
    setups the reduced detail is -6.2% .. +0.3% of every layer played (Qwen3-8B QLoRA 4 x 1024,
    Llama-3-8B 1 x 4096), and on Llama-3-8B QLoRA 1 x 2048, measured on an H200 at 10.652 GiB
    reserved, it gives 10.145 GiB where every layer gives 10.633 (docs/allocator.md#reduced-detail).
    Those settings replay every layer (0.1 s for 8B, 0.4 s for 70B)."""
    if conf is not None and conf.expandable_segments:
        return None
    if setup.grad_ckpt and setup.attn == "eager":
        return None
    if setup.grad_ckpt and (setup.autocast or setup.outputs_outlive_step):
        return None, EXACT_LAYERS
    return EXACT_LAYERS


@lru_cache(maxsize=256)
def _cached(spec: ModelSpec, setup: TrainSetup, static: Static, arch: CudaArch, conf: AllocConf,
            capacity: int | None, fsdp, ddp=None, zero=None) -> ReservedPeak:
    from vramplan.estimate._events import compiled, place_of

    program = compiled(spec, setup, static, arch, exact_layers=exact_layers_for(setup, conf), fsdp=fsdp, ddp=ddp,
                       zero=zero)
    sizes = program.sizes(setup)
    if covers(conf):
        # the small pool carried as its level, in one pass over the compiled stream (the same
        # result as replay_lumped on it: tests/test_fast_replay.py)
        return replay_program(program.ops, program.places, sizes, program.keys, conf, capacity, program.streams,
                              program.count_from)
    # the small pool carried as its level (cuda/_reserved.py replay_lumped), unless the settings
    # round small requests too (roundup_power2_divisions): then every event is replayed
    lump = lumpable(conf)
    stream = program.stream(sizes, lump)
    if lump:
        return replay_lumped(stream.events, conf, capacity, place=lambda i: place_of(stream, i),
                             count_from=count_from(program, stream))
    return replay_stream(stream.events, conf, capacity, place=lambda i: place_of(stream, i),
                         count_from=count_from(program, stream))


def count_from(program, stream) -> int | None:
    """The event of `stream` (program.stream's) where program.count_from's phase starts."""
    if program.count_from is None:
        return None
    return next(i for i, phase, _m in stream.places if phase == "forward")
