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


# Decoder layers whose backward is played event by event at each end of the stack; the backward
# of the layers between plays only what it leaves alive (events.step_stream exact_layers). Every
# layer's forward is played event by event (exact_layers_for).
EXACT_LAYERS = 4


def exact_layers_for(setup: TrainSetup, conf: AllocConf | None = None, fsdp: bool = False) -> int | tuple | None:
    """How much of the step the replay plays event by event (events.step_stream exact_layers: a
    pair is the forward's and the backward's; None: every layer): every layer's forward, and the
    backward of EXACT_LAYERS layers at each end, for every setup and every allocator setting.
    Why the forward in full (docs/allocator.md#reduced-detail): where each layer's saved tensors
    land among its forward's transients is what moves whole segments, and a middle layer that
    plays only what it keeps lands them elsewhere. With only EXACT_LAYERS layers at each end
    played in full, peak reserved was 0.88% from simulate on average over the 664 setups of
    benchmarks/agreement.md (632 within 3%) and 1.02% (median; mean 1.51%) from the 49 H200
    records of profiles/h200; with every forward played, 0.63% (644 within 3%) and 0.42% (mean
    1.04%; before RoPE was made op by op, docs/allocator.md#reduced-detail has the figures since),
    the same as every event of every layer (within 0.05% on benchmarks/reserved_detail.py's
    setups, expandable segments included), for half its replay time (Llama-2-70B QLoRA 1 x 2048:
    39 ms against 88 ms; 15 ms with EXACT_LAYERS at each end only). Playing the backward's middle
    layers as well moved no figure above by more than 0.05%; with the stream as it is since
    (docs/allocator.md#reduced-detail, seventh session) it moves none of eight spot checks but
    Llama-2-70B QLoRA 1 x 2048 with eager attention, by as much either way: 45.59 GiB here, 43.59
    with every layer, simulate 44.55; since the attention's locals are freed in Python's order
    (docs/peft-transformers.md#attention-locals, eleventh session) both give 44.59. Checkpointed
    eager attention is where the middle layers' backward still matters most: Mistral-7B LoRA
    1 x 2048 eager is -2.84% from simulate here and 0.00% with every layer; over the 144 such
    setups of benchmarks/agreement.md, mean |error| 0.155% here, 0.146% with every layer, for
    twice the replay.
    Under gradient accumulation every layer's backward is played too: in each micro-step after
    the first, every trainable parameter's new gradient is made in its layer's backward, added
    into `.grad` and freed (walk.accumulating), allocations a middle layer played by what it leaves
    alive leaves out, and which move where the next blocks land. Over the 40 accumulating
    `qlora-paper` setups of benchmarks/agreement-recipes*.md that the estimate runs, peak reserved
    against simulate went from a sum of |error| of 8.1% (SmolLM3-3B 1 x 512 -6.62%, Llama-2-70B
    4 x 2048 -1.43%) to 0.9% (Llama-2-7B 1 x 512 -0.08% -> -0.90%, every other setup within 0.35%,
    as before); the H200 records hold no accumulating setup.
    Since autograd's gradient sums are in place and the step's order follows the engine's
    (docs/autograd.md#gradient-accumulation, twelfth session), the 49 H200 records' peak reserved
    is 0.54% off at the median (mean 1.07%) with this detail and 0.44% (1.04%) with every layer's
    backward played: two records differ, Llama-2-70B QLoRA 1 x 2048 (-0.87% here, -0.35% with
    every layer) and Qwen3-30B-A3B (-1.08%, -0.12%). With the records' own load replayed (the
    tied lm_head their random-weights build allocated, docs/allocator.md#random-weights-load):
    0.44% (mean 0.94%) here, 0.38% (0.91%) with every layer. On the agreement matrices every layer for
    the mixture-of-experts setups moved benchmarks/agreement-new-families.md's MoE rows from 0.22%
    to 0.09% mean |error| and the MoE recipe rows from 0.20% to 0.24%, at twice the replay. Tried
    again in the fifteenth session: the H200's Qwen3-30B-A3B record -1.09% -> -0.12%, the new-family
    table 0.19% -> 0.18% mean (130 -> 131 of 136 within 1%), the catalog's Mixtral rows 659 -> 660 of
    664 within 1%, but the family recipes 0.17% -> 0.19% mean (174 -> 171 of 180 within 1%, up to
    +2.10%): the MoE layers' own stream still differs from simulate's (routing-dependent sizes), so
    playing more of it is no better on the whole; not kept.
    One GPU of FSDP (`fsdp`) keeps its own detail (fsdp_detail)."""
    if fsdp:
        return fsdp_detail(setup, conf)
    if setup.accumulates:
        return None
    return None, EXACT_LAYERS


def fsdp_detail(setup: TrainSetup, conf: AllocConf | None = None) -> int | tuple | None:
    """The detail of one GPU's FSDP replay (docs/allocator.md#fsdp-reduced-detail): EXACT_LAYERS
    layers at each end, forward and backward. Against Answer.AI's 15 published FSDP runs (torch
    2.2, tests/test_sharding.py) that is -6.9% .. +7.7% on peak reserved where every forward
    played is -10.1% .. +15.9%; those runs cannot tell which is nearer their allocator, and no
    per-GPU trace of a real FSDP run is bundled. Where the single-GPU replay played every layer
    before its forward was played in full everywhere, so does this: expandable segments and
    checkpointed eager attention (every layer), checkpointed layers under autocast or with a plain
    loop's outputs alive (every forward; docs/allocator.md#reduced-detail)."""
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

    program = compiled(spec, setup, static, arch, exact_layers=exact_layers_for(setup, conf, fsdp is not None),
                       fsdp=fsdp, ddp=ddp, zero=zero)
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
