"""The analytic estimate of one steady-state training step (the second step onwards, when the
optimizer state exists), phase by phase.

The step is `loss = model(input_ids, labels=input_ids).loss; loss.backward(); opt.step();
opt.zero_grad(set_to_none=True)`. Static memory comes from _inventory.py (byte-exact), activations
from _ops.py (one decoder layer and the head walked op by op). Candidate peaks, each a sum
of named components (step_moments):
- forward: the top layer's forward over what the layers below keep (their saved activations, or
  with gradient checkpointing their inputs), and the loss forward;
- backward: the loss backward, the top layer's backward (its recomputation under
  checkpointing), the bottom layer's, where the most parameter gradients exist, and a tied
  trainable embedding's, where its two gradients are summed beside every other one;
- optimizer: gradients plus the optimizer's workspace.
The peak is the largest candidate; its components sum to peak_allocated_bytes exactly.
"""
from __future__ import annotations

from dataclasses import field
from functools import lru_cache

from vramplan.core._record import record
from vramplan.estimate._ops import (autocast_cache, eager_masks, embedding_leaf, head_memory, held_embeddings,
                                   held_graph_leaf,
                                   held_outputs, int8_ctx_inputs, kernels, layer_memory, layer_stack, rope_tables,
                                   tied_embedding_grad, tied_sum_in_place)
from vramplan.cuda._arch import ASSUMED, CudaArch, check_dtype, default_dtype, hardware_name, target_arch
from vramplan.cuda._cublas import STEP_THREADS, step_workspace_bytes, workspace_bytes
from vramplan.core._components import ALLOCATED_NAMES, Component, check_sum
from vramplan.cuda._context import cuda_context, device_overhead
from vramplan.core._errors import ModelError, UsageError
from vramplan.core._gpus import Gpu, resolve_gpu
from vramplan.estimate._load import casts as load_casts
from vramplan.estimate._inventory import (Static, adapted_linears, embedding_bytes, expert_weight_bytes,
                                         experts_adapted, experts_quantized, static_memory)
from vramplan.core._models import ModelSpec, resolve
from vramplan.estimate._quant import alloc
from vramplan.core._setup import TrainSetup, library_setup
from vramplan.core._units import MiB, format_bytes

C = Component


class Verdict:
    """Fit verdict for any result with `gpu` and `device_total_bytes` (single or per-GPU)."""

    @property
    def fits(self) -> bool | None:
        if self.gpu is None:
            return None
        return self.device_total_bytes <= self.gpu.memory_bytes and not getattr(self, "allocator_oom", None)

    @property
    def status(self) -> str | None:
        """fits / tight / no: core/_verdict.py, the one rule every command uses."""
        from vramplan.core._verdict import verdict

        if self.gpu is None:
            return None
        return verdict(self.device_total_bytes, self.gpu.memory_bytes, oom=getattr(self, "allocator_oom", None))

    @property
    def headroom_bytes(self) -> int | None:
        """GPU memory left at the peak (negative: the shortfall)."""
        return None if self.gpu is None else self.gpu.memory_bytes - self.device_total_bytes


@record
class Estimate(Verdict):
    """The analytic estimate of one setup: components and phases at the peak, the peak allocated and
    reserved bytes, the device total and the verdict against the GPU."""
    model: ModelSpec
    setup: TrainSetup
    components: dict            # component -> bytes at the peak (ALLOCATED components only)
    peak_allocated_bytes: int   # torch.cuda.max_memory_allocated for the step
    peak_phase: str
    phase_peaks: dict           # phase -> allocated bytes at that phase's worst moment
    cuda_context_bytes: int
    allocator_overhead_bytes: int
    paged_optimizer_bytes: int  # CUDA unified memory: outside peak_allocated
    trainable_params: int
    gpu: Gpu | None = None
    phase_components: dict = field(default_factory=dict, repr=False)
    peak_moment: str = ""
    moments: dict = field(default_factory=dict, repr=False)  # every candidate peak, by name
    # the caching-allocator replay of two steps (estimate/_events.py, cuda/_reserved.py)
    peak_reserved_bytes: int = 0
    fragmentation_bytes: int = 0
    alloc_conf: str = ""
    allocator_oom: dict | None = None
    # cache releases (cudaFree of cached segments, then retry) the replay against the card needed:
    # the step runs within the card, synchronizing the device each time (num_alloc_retries)
    allocator_retries: int = 0
    context_source: str = ""
    cuda_arch: CudaArch = ASSUMED   # the GPU architecture whose kernels the estimate assumes
    # the part of it NVML counts: bitsandbytes prefetches paged state to the device before each
    # update and the driver keeps it there while the card has room (paged_resident)
    paged_resident_bytes: int = 0
    # where it does not fit: the smallest GPU memory it runs on, when below the device total (smallest_card)
    smallest_gpu_bytes: int | None = None

    @property
    def assumptions(self) -> tuple[str, ...]:
        return assumptions(self.model, self.setup, self.cuda_arch, self.gpu) + device_assumptions(self)

    @property
    def kernels(self) -> dict:
        """The CUDA kernels assumed (SDPA backend, gemm_4bit path, cuBLAS workspace)."""
        return kernels(self.model, self.setup, self.cuda_arch)

    @property
    def warnings(self) -> tuple[str, ...]:
        """What the verdict must say out loud (render/_tables.py prints them on the verdict line)."""
        return warnings(self.model, self.setup)

    @property
    def device_total_bytes(self) -> int:
        """What NVML / nvidia-smi would show at the peak."""
        return (self.peak_allocated_bytes + self.cuda_context_bytes + self.allocator_overhead_bytes
                + self.paged_resident_bytes)


    def to_dict(self) -> dict:
        return {
            "model": self.model.to_dict(),
            "setup": self.setup.to_dict(),
            "gpu": self.gpu.to_dict() if self.gpu else None,
            "fits": self.fits,
            "headroom_bytes": self.headroom_bytes,
            "peak_allocated_bytes": self.peak_allocated_bytes,
            "device_total_bytes": self.device_total_bytes,
            "status": self.status,
            "peak_reserved_bytes": self.peak_reserved_bytes,
            "fragmentation_bytes": self.fragmentation_bytes,
            "alloc_conf": self.alloc_conf,
            "allocator_oom": self.allocator_oom,
            "allocator_retries": self.allocator_retries,
            "smallest_gpu_bytes": self.smallest_gpu_bytes,
            "peak_phase": self.peak_phase,
            "components": dict(self.components),
            "device_components": {C.CUDA_CONTEXT.value: self.cuda_context_bytes,
                                  C.ALLOCATOR_OVERHEAD.value: self.allocator_overhead_bytes,
                                  C.PAGED_OPTIMIZER.value: self.paged_resident_bytes},
            "phase_peaks": dict(self.phase_peaks),
            "paged_optimizer_bytes": self.paged_optimizer_bytes,
            "trainable_params": self.trainable_params,
            "warnings": list(self.warnings),
            "assumptions": list(self.assumptions),
            "kernels": self.kernels,
        }


def estimate(model: str | ModelSpec, setup: TrainSetup | None = None, gpu: str | int | Gpu | None = None,
             static: Static | None = None, arch: str | CudaArch | None = None, *,
             alloc_conf=None, replay: bool = True, smallest: bool = True, **flags) -> Estimate:
    """Estimate peak memory. `flags` are TrainSetup fields (batch=4, seq=4096, method="lora", ...).
    `static` reuses static_memory(spec, setup) computed earlier (it does not depend on batch/seq).
    The CUDA kernels are those of `gpu`'s architecture (a catalog GPU), of `arch` ("sm75") for a
    bare size or no GPU, else of an H100 (cuda.arch.ASSUMED). With neither `setup` nor a dtype
    flag the compute dtype is bf16, or fp16 on a GPU without bf16 (sm < 80); bf16 given for such a
    GPU is refused (UsageError).
    `alloc_conf`: PYTORCH_CUDA_ALLOC_CONF settings (a string or AllocConf; None: the environment's).
    `replay`: run the caching-allocator model over two steps for peak reserved memory (False:
    the quick rounding model, cuda/_context.py device_overhead). `smallest`: where the setup does
    not fit `gpu`, also search the smallest card it runs on (smallest_card, about six more
    replays; False for callers that evaluate many setups and show only the device total)."""
    spec = model if isinstance(model, ModelSpec) else resolve(model)
    gpu_obj = resolve_gpu(gpu) if gpu is not None else None
    cuda_arch = target_arch(gpu_obj, arch)
    setup = library_setup(setup, flags, default_dtype(cuda_arch), spec.arch.default_attention)
    check_dtype(cuda_arch, setup.dtype, setup)
    if setup.attn not in spec.arch.attention:
        raise ModelError(f"{spec.id} ({spec.model_type}) cannot train with attn={setup.attn!r} in transformers 5",
                         hint=f"use --attn {' or '.join(spec.arch.attention)}")
    if setup.experts_4bit and spec.num_experts and not spec.arch.expert_linears_v4:
        # the --experts 4bit layout is the v4 per-expert Linear stack (Architecture.expert_linears_v4)
        raise ModelError(f"--experts 4bit is not modelled for {spec.model_type}: its experts never were "
                         "per-expert Linear layers", hint="drop --experts 4bit")
    check_reentrant_kernels(spec, setup, cuda_arch)
    static = static if static is not None else static_memory(spec, setup)
    moments = step_moments(spec, setup, static, cuda_arch)
    peak_moment = max(moments, key=lambda m: sum(moments[m].values()))
    components = moments[peak_moment]
    peak = sum(components.values())
    peak_phase = phase_of(peak_moment)
    phases = {}
    for name, parts in moments.items():
        if sum(parts.values()) > sum(phases.get(phase_of(name), {}).values()):
            phases[phase_of(name)] = parts
    context = cuda_context(gpu_obj)
    reserved = {}
    if replay:
        room = None if gpu_obj is None else gpu_obj.memory_bytes - context.bytes
        r, conf_text, oom, retries = card_replay(spec, setup, static, cuda_arch, alloc_conf, peak, room)
        reserved = {"peak_reserved_bytes": max(r.peak_reserved_bytes, peak),
                    "fragmentation_bytes": r.fragmentation_bytes, "alloc_conf": conf_text,
                    "allocator_oom": oom, "allocator_retries": retries}
        slack = reserved["peak_reserved_bytes"] - peak
        if smallest and room is not None and (oom is not None or reserved["peak_reserved_bytes"] > room):
            # it does not fit: the device total above is what a card with room to spare shows
            # (the unlimited replay); the card it needs at the least is smaller
            runs = runs_on_card(spec, setup, static, cuda_arch, alloc_conf, peak, context.bytes)
            reserved["smallest_gpu_bytes"] = smallest_card(runs, peak + context.bytes,
                                                           context.bytes + reserved["peak_reserved_bytes"])
    else:
        slack = device_overhead(transient_sizes(spec, setup, cuda_arch)).allocator_overhead
        reserved = {"peak_reserved_bytes": peak + slack, "fragmentation_bytes": slack}
    resident = paged_resident(static.paged_optimizer_state, gpu_obj,
                              peak + context.bytes + slack)
    return Estimate(
        model=spec, setup=setup, components=components, peak_allocated_bytes=peak,
        peak_phase=peak_phase, phase_peaks={p: sum(c.values()) for p, c in phases.items()},
        cuda_context_bytes=context.bytes, allocator_overhead_bytes=slack, context_source=context.source,
        **reserved,
        paged_optimizer_bytes=static.paged_optimizer_state, paged_resident_bytes=resident,
        trainable_params=static.trainable_params, gpu=gpu_obj, phase_components=phases,
        peak_moment=peak_moment, moments=moments, cuda_arch=cuda_arch,
    )


def check_reentrant_kernels(spec: ModelSpec, setup: TrainSetup, arch: CudaArch) -> None:
    """Reentrant checkpointing runs a layer's first forward under no_grad, where q, k, v require no
    grad: SDPA's dispatcher may then take another kernel than the recomputation does (flash on
    sm86-89 / sm120 with a head dim over 192, check_requires_grad_and_head_dim_gt192...). One op
    list per layer cannot hold two kernels: refused (docs/autograd.md#reentrant-checkpointing)."""
    if not (setup.reentrant_ckpt and setup.attn == "sdpa"):
        return
    from dataclasses import replace

    from vramplan.cuda import _sdpa as cuda_sdpa
    from vramplan.estimate._ops import layer_windows, sdpa_call

    for window in set(layer_windows(spec, setup)):
        call = sdpa_call(spec, setup, window)
        grad, no_grad = cuda_sdpa.backend(arch, call), cuda_sdpa.backend(arch, replace(call, requires_grad=False))
        if grad != no_grad:
            raise UsageError(f"--ckpt-reentrant on {arch.label}: SDPA runs {no_grad} in the no_grad first forward and "
                             f"{grad} in the recomputation (head dim {call.head_dim}); the estimate models one kernel "
                             "per layer", hint="use --no-ckpt-reentrant, or `vramplan simulate` for this setup")


def card_replay(spec: ModelSpec, setup: TrainSetup, static: Static, arch: CudaArch, alloc_conf, peak: int,
                room: int | None, need: bool = True, fsdp=None, ddp=None, zero=None):
    """The caching-allocator replay behind the device total (estimate/_reserved.py), on a card
    with `room` bytes for the allocator (None: no card): (replay, settings text, allocator OOM
    or None, cache releases). `peak`: the step's peak allocated bytes. need=False: after an OOM
    the unlimited replay (the need, which only a number needs: the verdict is "no") is not run,
    and the failed replay is returned. `fsdp` / `ddp` / `zero`: one GPU of FSDP full_shard, DDP or
    ZeRO-2 (events.FsdpShards, events.DdpBuckets, events.ZeroPartitions).
    The order of the replays: docs/allocator.md#verdict."""
    from vramplan.estimate._reserved import capped_is_uncapped, reserved_peak

    oom, retries = None, 0
    # Where the settings allow it, the first replay is already against the card: it is the
    # unlimited one until a request would pass the card (reserved.capped_is_uncapped), so the
    # card is passed exactly where it needed a cache release (num_alloc_retries).
    against_card = room is not None and peak <= room and capped_is_uncapped(alloc_conf)
    r, conf_text = reserved_peak(spec, setup, static, arch, alloc_conf, room if against_card else None, fsdp, ddp, zero)
    passed = r.num_alloc_retries > 0 if against_card else room is not None and r.peak_reserved_bytes > room
    if passed and peak <= room:
        # Past the card, malloc releases the cache and retries before it fails: replay against
        # the card to see whether the step still runs, or where it fails while the allocated
        # bytes alone would fit (fragmentation). Allocated bytes past the card fail anyway.
        capped = r if against_card else reserved_peak(spec, setup, static, arch, alloc_conf, room, fsdp, ddp, zero)[0]
        oom, retries = card_outcome(capped, room)
        if oom is None:
            r = capped
        elif against_card and need:      # the need is the unlimited replay's
            r, _ = reserved_peak(spec, setup, static, arch, alloc_conf, None, fsdp, ddp, zero)
    return r, conf_text, oom, retries


def card_outcome(capped, room: int) -> tuple[dict | None, int]:
    """(allocator OOM or None, cache releases) of a replay against a card with `room` bytes for
    the allocator (estimate's card_replay, simulate's with_reserved). The OOM says whether it is
    fragmentation, where the request would fit beside what is allocated at that moment; else that
    moment holds more than the step's peak (the load's copies, docs/allocator.md#kbit-load):
    plainly out of memory there."""
    failed = capped.oom
    if failed is None:
        return None, capped.num_alloc_retries
    return dict(failed, fragmentation=failed["allocated_bytes"] + failed["nbytes"] <= room), 0


# The smallest card is searched to within 1/SMALLEST_CARD_STEPS of the device total without a card
# (at least SMALLEST_CARD_STEP): each probe is one replay against a card of that size, about six.
SMALLEST_CARD_STEPS = 64
SMALLEST_CARD_STEP = 64 * MiB


def smallest_card(runs, least: int, largest: int) -> int | None:
    """The smallest GPU memory (the card's total, as NVML reports it) on which the step runs:
    `runs(card)` replays it against a card of that size. Without a card the caching allocator
    keeps every segment it made; on a smaller one, malloc releases the cache and retries before it
    fails (docs/allocator.md#verdict), so a setup can run on a card well below its device total.
    Bisection between `least` (peak allocated + context: the least a card holds) and `largest`
    (the device total without a card, where it runs), to within 1/SMALLEST_CARD_STEPS of it; a
    card larger than one it runs on is taken to run it too. None where no smaller card runs it
    (the allocated bytes alone decide): then the device total says it all."""
    step = max(SMALLEST_CARD_STEP, largest // SMALLEST_CARD_STEPS)
    lo, hi = least, largest
    while hi - lo > step:
        mid = (lo + hi) // 2
        if runs(mid):
            hi = mid
        else:
            lo = mid
    return hi if hi < largest else None


def runs_on_card(spec: ModelSpec, setup: TrainSetup, static: Static, arch: CudaArch, alloc_conf, peak: int,
                 context: int):
    """smallest_card's probe on one GPU: the replay against the card (card_replay) neither runs out
    of memory nor reserves past it."""
    def runs(card: int) -> bool:
        r, _conf, oom, _retries = card_replay(spec, setup, static, arch, alloc_conf, peak, card - context, need=False)
        return oom is None and context + max(r.peak_reserved_bytes, peak) <= card
    return runs


def paged_resident(paged: int, gpu, needed: int) -> int:
    """The paged optimizer state NVML counts on the device. bitsandbytes prefetches each paged
    state to the GPU before its update (optim/optimizer.py prefetch_state -> F.prefetch_tensor)
    and CUDA unified memory keeps the pages there until the card runs short, when the driver
    evicts them to host RAM instead of failing: on a card, what fits beside the rest of the step;
    without one, all of it (docs/bitsandbytes.md#paged-optimizers-and-unified-memory)."""
    if gpu is None:
        return paged
    return max(0, min(paged, gpu.memory_bytes - needed))


def transient_sizes(spec: ModelSpec, setup: TrainSetup, arch: CudaArch = ASSUMED) -> list[int]:
    """The large short-lived tensors of a step (a dequantized weight, a hidden state, the logits,
    one layer's saved activations): what the caching allocator keeps segments for."""
    layer = layer_memory(spec, setup, arch)
    logits = alloc(4 * setup.tokens * spec.vocab)
    return [layer.dequant, layer.hidden, logits, layer.saved]


def step_moments(spec: ModelSpec, setup: TrainSetup, static: Static, arch: CudaArch = ASSUMED) -> dict[str, dict[str, int]]:
    """_step_moments, a fresh copy of the cached result (the planner asks for each setup twice:
    without the allocator replay, then with it)."""
    return {name: dict(parts) for name, parts in _step_moments(spec, setup, static, arch).items()}


@lru_cache(maxsize=1024)
def _step_moments(spec: ModelSpec, setup: TrainSetup, static: Static, arch: CudaArch = ASSUMED) -> dict[str, dict[str, int]]:
    """Every candidate peak of the step, name -> bytes per component (ALLOCATED order).

    Decoder layers are identical, so one layer is walked (activations.layer_memory) and the
    others are added as what they keep alive: their saved activations without checkpointing,
    their inputs with it. The top layer is where the most is kept; the bottom layer is where the
    most gradients exist (it matters when every parameter trains)."""
    L = spec.layers
    head = head_memory(spec, setup, arch)
    # input_ids (int64, also passed as labels: one storage) and the shifted labels ForCausalLMLoss
    # builds (pad + contiguous), int64 each: the loop's through the optimizer step.
    base_acts = alloc(8 * setup.tokens) + 2 * alloc(8 * (setup.tokens + setup.batch))
    # position_ids (1, seq), a local of the base model's forward, and the rotary tables
    # (ops.rope_tables) every layer reads: the tables are saved by each layer's `q * cos` and
    # `rotate_half(q) * sin` (MulBackward0), so they last through the backward; the position ids
    # too where checkpointing holds them as the layers' inputs (estimate/_events.py, with the masks)
    positions, tables = alloc(8 * setup.seq), sum(rope_tables(spec, setup))
    # Granite's embedding leaf under checkpointing (ops.embedding_leaf): the graph's AccumulateGrad
    # node holds it, so it goes with the graph when backward ends, before the optimizer step
    leaf = embedding_leaf(spec, setup)
    fixed = {C.WEIGHTS.value: static.weights, C.QUANT_CONSTANTS.value: static.quant_constants,
             C.ADAPTERS.value: static.adapters, C.OPTIMIZER_STATE.value: static.optimizer_state,
             # the forward's and the backward thread's cuBLAS workspaces, cached from the first
             # step on (cuda/_cublas.py)
             C.TEMPORARIES.value: step_workspace_bytes(arch)}

    # eager attention's causal masks: built in the forward; gradient checkpointing keeps them
    # (they are inputs of every checkpointed layer) until backward is done
    masks = eager_masks(spec, setup)
    fwd_masks = masks + positions + tables
    bwd_masks = (masks + positions if setup.grad_ckpt else 0) + tables

    def at(*parts: dict, activations: int = 0, gradients: int = 0, temporaries: int = 0,
           graph: bool = True) -> dict[str, int]:
        out = dict.fromkeys(ALLOCATED_NAMES, 0)
        for k, v in fixed.items():
            out[k] += v
        out[C.ACTIVATIONS.value] += base_acts + (leaf if graph else 0) + activations
        out[C.GRADIENTS.value] += gradients
        out[C.TEMPORARIES.value] += temporaries
        for part in parts:
            for k, v in part.items():
                out[k] += v
        return out

    # What finished layers leave alive: `below(k)` for the k layers under the current one;
    # int8 matmul inputs held on the autograd ctx survive checkpointing (int8_ctx_inputs).
    ctx = int8_ctx_inputs(spec, setup)

    # Layers of different kinds (sliding-window and global attention, docs/architectures.md#layer-types)
    # keep different amounts: `stack` is every layer's walk, bottom to top.
    stack = layer_stack(spec, setup, arch)
    kept = [m.first_saved if i == 0 else m.saved for i, m in enumerate(stack)]


    # Autocast's weight-cast cache (ops.autocast_cache) is part of what a checkpointed layer leaves
    # alive in the forward, and gone once the autocast region (the forward) exits.
    cache = autocast_cache(spec, setup)

    def below(k: int, forward: bool = False) -> int:
        return sum(kept[:k]) + k * ctx - (0 if forward else k * cache)

    # A plain loop's `out` (logits) outlives the step: the previous step's during the forward (the
    # name is rebound only when model() returns), this step's through backward and opt.step()
    # (plain-del: this step's only).
    # Counted as activations (tensors the loop keeps): a moment with logits_loss bytes is a loss
    # moment to the sharding model (plan/_sharding.py _phase_terms).
    held = {C.ACTIVATIONS.value: held_outputs(spec, setup)}
    # with them, the graph's embedding leaf and its .grad (ops.held_graph_leaf): past the backward,
    # where this step's own are counted by the walks
    after = {C.ACTIVATIONS.value: held[C.ACTIVATIONS.value] + held_graph_leaf(spec, setup)}
    # the previous step's, in the forward: only where the loop rebinds `out` (plain); a loop that
    # drops it at the end of the step (plain-del) holds none there
    previous = after if setup.outputs_outlive_step else {}
    head_grads = head.backward.end.get(C.GRADIENTS.value, 0)
    grads = [m.walk.end.get(C.GRADIENTS.value, 0) for m in stack]
    layer = stack[-1]
    top = layer.walk if L > 1 else layer.first
    # the embedding output the base model's `inputs_embeds` holds through the layers (ops.held_embeddings)
    embeds = held_embeddings(spec, setup, arch)
    moments = {
        "forward.layer": at(top.forward_peak, previous, activations=below(L - 1, True) + fwd_masks + embeds),
        # the masks are locals of the base model's forward: without checkpointing nothing saves
        # them, so they are gone once it returns, before lm_head and the loss run
        "forward.loss": at(head.forward.forward_peak, previous, activations=below(L, True) + bwd_masks),
        "backward.loss": at(head.backward.backward_peak, activations=below(L) + bwd_masks),
        # backward_peak includes the recomputation under checkpointing
        "backward.top_layer": at(top.backward_peak, held, activations=below(L - 1) + ctx + bwd_masks,
                                 gradients=head_grads),
        "backward.bottom_layer": at(stack[0].first.backward_peak, held, activations=ctx + bwd_masks,
                                    gradients=head_grads + sum(grads[1:])),
        "optimizer": at(after, gradients=static.gradients, temporaries=static.optimizer_temporaries,
                        graph=False),
    }
    tied = tied_embedding_grad(spec, setup)
    extra = static.gradients - head_grads - sum(grads)   # what no tape makes: the embedding's, the norms'
    if extra > 0 and not tied:
        # full fine-tuning's untied embedding: embedding_dense_backward makes its gradient (every
        # other .grad made) while its incoming gradient, the embedding output's, is alive
        # (estimate/_events.py); the graph is still alive (leaf, checkpointed masks)
        incoming = alloc(embedding_bytes(setup) * setup.tokens * spec.hidden)
        moments["backward.embedding"] = at(held, activations=bwd_masks + incoming, gradients=static.gradients)
    if tied:
        # The tied embedding's backward, the step's last node (ops.tied_embedding_grad): every
        # .grad exists (the tied one counted once in static.gradients), with
        # embedding_dense_backward's output beside it (activations). Summed out of place, the peak
        # is the new sum, when lm_head's gradient is still alive (logits_loss: lm_head's backward
        # made it) and the node's incoming gradient is gone; summed in place (lm_head's gradient
        # is the .grad), it is embedding_dense_backward's output, made while the incoming
        # gradient (the embedding output's, tokens x hidden) is alive. The graph is still alive
        # (leaf, checkpointed masks).
        if tied_sum_in_place(setup):
            held_lm, incoming = 0, alloc(embedding_bytes(setup) * setup.tokens * spec.hidden)
        else:
            held_lm, incoming = tied, 0
        moments["backward.embedding"] = at({C.LOGITS_LOSS.value: held_lm}, held,
                                           activations=bwd_masks + tied + incoming, gradients=static.gradients)
    if len(set(map(id, stack))) > 1:
        # mixed kinds: the worst layer of each phase need not be the top or bottom one
        def worst(*candidates: dict) -> dict:
            return max(candidates, key=lambda parts: sum(parts.values()))
        for j in range(1, L):
            walk = stack[j].walk
            moments["forward.layer"] = worst(moments["forward.layer"],
                                             at(walk.forward_peak, previous, activations=below(j, True) + fwd_masks + embeds))
            moments["backward.top_layer"] = worst(moments["backward.top_layer"], at(
                walk.backward_peak, held, activations=below(j) + ctx + bwd_masks, gradients=head_grads + sum(grads[j + 1:])))
    if setup.accumulates:
        # a micro-step after the first (gradient accumulation, docs/autograd.md#gradient-accumulation-steps):
        # every .grad exists from its forward on, and each new parameter gradient is added into it
        # and freed right after the op that made it (walk.accumulating); its forward is the first
        # micro-step's, beside every gradient
        every = static.gradients
        acc = layer_stack(spec, setup, arch, accumulating=True)
        acc_head = head_memory(spec, setup, arch, accumulating=True)
        acc_top = acc[-1].walk if L > 1 else acc[-1].first
        for name in ("forward.layer", "forward.loss"):
            parts = dict(moments[name])
            parts[C.GRADIENTS.value] += every
            moments[f"{name}.accumulating"] = parts
        moments["backward.loss.accumulating"] = at(acc_head.backward.backward_peak, gradients=every,
                                                   activations=below(L) + bwd_masks)
        moments["backward.top_layer.accumulating"] = at(acc_top.backward_peak, held, gradients=every,
                                                        activations=below(L - 1) + ctx + bwd_masks)
        moments["backward.bottom_layer.accumulating"] = at(acc[0].first.backward_peak, held, gradients=every,
                                                           activations=ctx + bwd_masks)
        if len(set(map(id, stack))) > 1:
            for j in range(1, L):
                moments["backward.top_layer.accumulating"] = worst(moments["backward.top_layer.accumulating"], at(
                    acc[j].walk.backward_peak, held, gradients=every, activations=below(j) + ctx + bwd_masks))
    for parts in moments.values():
        check_sum(parts, sum(parts.values()))
    return moments


def phase_of(moment: str) -> str:
    return moment.split(".", 1)[0]


def assumptions(spec: ModelSpec, setup: TrainSetup, arch: CudaArch = ASSUMED, gpu: Gpu | None = None) -> tuple[str, ...]:
    """What the prediction takes for granted, in words a user can check against their script."""
    from vramplan.core._recipes import NO_RECIPE, recipe
    out = [gpu_assumption(arch, gpu), recipe(setup.recipe).summary(setup) if setup.recipe else "recipe " + NO_RECIPE]
    if not arch.bf16 and setup.dtype == "fp16":
        out.append(f"compute dtype fp16: {hardware_name(arch)} has no bf16 hardware")
    if setup.quantized:
        if setup.quant == "int8":
            out.append("base weights: bitsandbytes LLM.int8 (Linear8bitLt), lm_head and embeddings in "
                       f"{setup.dtype}")
        else:
            out.append(f"base weights: bitsandbytes {setup.quant} 4-bit, blocksize 64, "
                       f"{'double' if setup.double_quant else 'single'} quantization of absmax; "
                       + (f"lm_head and embeddings in {setup.dtype}, norms in fp32 (qlora.py's recast)" if setup.recast
                          else f"lm_head, embeddings and norms in {'fp32' if setup.prepare_kbit else setup.dtype}"))
    else:
        out.append(f"base weights in {setup.dtype}")
    if setup.uses_adapters:
        out.append(f"LoRA rank {setup.rank} on {adapted_text(spec, setup)}"
                   + (f", adapters in {setup.dtype} (qlora.py's recast)" if setup.recast
                      else ", adapters in bf16 (TRL SFTTrainer's cast of a quantized model's LoRA weights)"
                      if setup.adapters_16bit else ", adapters in fp32 (peft autocast_adapter_dtype)")
                   + (f", dropout {setup.lora_dropout}" if setup.lora_dropout else ""))
    else:
        out.append(f"full fine-tuning: every parameter trainable in {setup.dtype}")
    loss = ("transformers ForCausalLMLoss (logits upcast to fp32)" if setup.loss == "full" else
            "TRL fused lm_head + chunked NLL (no full logits; 4096 x 32768 tiles)")
    out.append(f"micro-batch {setup.batch} x sequence {setup.seq} tokens, no padding, labels = input_ids, {loss}")
    if setup.accumulates:
        out.append(f"gradient accumulation over {setup.grad_accum} micro-steps: from the second on, every .grad is "
                   "alive through the forward and backward, and each new gradient is added into it in place "
                   "(the third and later repeat the second)")
    cache = ("adapter weights already bf16: nothing cast or cached" if setup.adapters_16bit
             else "adapter weight casts cached until the forward ends")
    if setup.amp_over_fp32:
        # docs/recipes.md#autocast-over-fp32-weights
        trained = "every weight" if setup.method == "full" else "LoRA A / B"
        out.append(f"torch.autocast({setup.amp}) over fp32 weights: every linear casts its input and weight to "
                   f"{setup.amp}; frozen weights cast per call (the cast saved for backward), {trained} cast once "
                   "and cached until the forward ends; residual stream, norms, RoPE and the loss in fp32; "
                   "fp32 gradients and optimizer states")
    else:
        out.append(f"torch.autocast({setup.amp}) around the forward: matmuls in {setup.amp}, LoRA inputs not cast "
                   f"to fp32, {cache}" if setup.autocast else "no autocast: every op in its inputs' dtype")
    out.append({"plain": "loop: `out = model(**batch)` keeps the logits through backward and opt.step(), until the "
                         "next forward returns",
                "plain-del": "loop: `out = model(**batch)` keeps the logits through backward and opt.step(), then "
                             "`del out` before the next forward"}.get(
        setup.loop, "loop: only the loss outlives the forward (Trainer compute_loss)"))
    if setup.reentrant_ckpt:
        out.append("gradient checkpointing (reentrant, use_reentrant=True) on every decoder layer: first forward "
                   "under no_grad, backward recomputes the whole layer and keeps its output and incoming "
                   "gradient until the layer's backward returns")
    else:
        out.append("gradient checkpointing (non-reentrant) on every decoder layer" if setup.grad_ckpt
                   else "no gradient checkpointing: every layer's activations kept for backward")
    out.append(attention_assumption(spec, setup, arch))
    opt = {"adamw": "torch AdamW (foreach, its CUDA default), 2 states in the parameter dtype",
           "adamw_foreach": "torch AdamW (foreach), 2 states in the parameter dtype",
           "adamw_fused": "torch AdamW(fused=True), 2 states in the parameter dtype, no foreach workspace",
           "adamw8bit": "bitsandbytes AdamW8bit (blockwise 8-bit states)",
           "paged_adamw": "bitsandbytes PagedAdamW 32-bit: states in CUDA unified memory (not counted as "
                          "allocated; in the device total while resident)",
           "paged_adamw8bit": "bitsandbytes PagedAdamW8bit: states of tensors of 1e5 elements or more in CUDA "
                              "unified memory (not counted as allocated; in the device total while resident), "
                              "absmax and smaller tensors' states on the device",
           "sgd": "torch SGD without momentum (no state)",
           "adafactor": "transformers Adafactor (factored second moment, no first moment)"}[setup.optimizer]
    out.append("optimizer: " + opt)
    if setup.prepare_kbit:
        out.append("prepare_model_for_kbit_training: non-quantized weights and hidden states in fp32"
                   + ("; then qlora.py's recast: LoRA, embed_tokens and lm_head back to bf16, norms in fp32, so the "
                      "bottom layer reads a bf16 embedding output" if setup.recast else ""))
        if load_casts(spec, setup):
            out.append("load before the first step: prepare_model_for_kbit_training makes each float32 copy "
                       "(embed_tokens, norms, lm_head) while the 16-bit one is still held, then empties the cache"
                       + ("; qlora.py's recast leaves the float32 copies' segments cached" if setup.recast else "")
                       + ": peak reserved counts that load, which can exceed the step's on short sequences")
    if setup.quantized and setup.quant != "int8":
        out.append(f"bitsandbytes gemm_4bit on {arch.label} at {setup.tokens} tokens: "
                   f"{kernels(spec, setup, arch)['gemm_4bit']} (backward always dequantizes)")
    out.append(f"{STEP_THREADS} cuBLAS workspaces of {workspace_bytes(arch):,} B on {arch.label} (the forward's "
               "thread and autograd's backward thread), cached from their first matmul (counted in temporaries)")
    out.append("steady state: the second step onwards (optimizer state already allocated), "
               "zero_grad(set_to_none=True)")
    if experts_quantized(spec, setup):
        out.append(f"--experts 4bit: each of the {spec.num_experts} experts per layer is three Linear4bit layers "
                   f"(w1, w3: {spec.hidden} -> {spec.expert_width}; w2 back), as transformers 4.x ModuleList experts "
                   "or Unsloth's MoE 4-bit build them; the router stays 16-bit; "
                   + ("all-linear LoRA wraps every expert Linear (no merged 16-bit expert copy); "
                      if experts_adapted(spec, setup) else "")
                   + "activations walked as the grouped experts path with 4-bit LoRA matmuls")
    else:
        out.extend(spec.arch.notes)
    out.extend(spec.notes)          # how a multimodal checkpoint's config was read (core/_models.py)
    if spec.vision:
        out.append(vision_line(spec, setup))
    out.extend(spec.defaults_used)  # fields config.json left out (core/_config_fields.py)
    return tuple(out)


def vision_line(spec: ModelSpec, setup: TrainSetup) -> str:
    """The inventory line of a multimodal class's vision tower (inventory.vision_static)."""
    from vramplan.estimate._inventory import vision_static

    v, vis = spec.vision, vision_static(spec, setup)
    parts = [f"weights {sum(vis.weights):,} B" + (" (Linear layers 4-bit)" if setup.quantized and setup.quant != "int8"
                                                  else " (Linear layers int8)" if setup.quantized else "")]
    if vis.quant_constants:
        parts.append(f"quantization constants {sum(vis.quant_constants):,} B")
    if vis.adapters:
        parts.append(f"LoRA on its {', '.join(dict.fromkeys(vis.adapted))} {sum(vis.adapters):,} B")
    return (f"vision tower and projector: AutoModelForCausalLM builds Gemma3ForConditionalGeneration for "
            f"model_type gemma3, so the SigLIP encoder ({v.layers} layers, width {v.hidden}, "
            f"{v.num_params:,} parameters with the projector) is loaded: " + ", ".join(parts)
            + "; a text-only step never runs it (no pixel_values): no activations, gradients or optimizer state")


def warnings(spec: ModelSpec, setup: TrainSetup) -> tuple[str, ...]:
    """What the verdict line says besides fits / does not fit: a sequence longer than the context
    the config declares, and the 16-bit MoE experts under quantization."""
    return context_warning(spec, setup) + moe_warning(spec, setup)


def context_warning(spec: ModelSpec, setup: TrainSetup) -> tuple[str, ...]:
    """A sequence past the config's max_position_embeddings: the step still runs (RoPE has no
    table to index past), so the memory is estimated as asked, but the model was not trained at
    that length."""
    context = spec.config.get("max_position_embeddings")
    if isinstance(context, bool) or not isinstance(context, int) or setup.seq <= context:
        return ()
    return (f"seq {setup.seq:,} is longer than the model's context (max_position_embeddings {context:,} in "
            f"config.json): memory is estimated at that length, but the model was not trained for it",)


def moe_warning(spec: ModelSpec, setup: TrainSetup) -> tuple[str, ...]:
    """MoE under quantization in transformers 5: the fused 3-D expert stacks are not nn.Linear, so
    bitsandbytes does not quantize them (bitsandbytes-foundation/bitsandbytes issue #1849, PR #1965;
    docs/bitsandbytes.md#moe-experts). Most of an MoE's weights then stay 16-bit: say so, in bytes."""
    if not (spec.num_experts and setup.quantized and not setup.experts_4bit):
        return ()
    sixteen, four = expert_weight_bytes(spec, setup)
    quant = setup.quant.upper() if setup.quant != "int8" else "int8"
    text = (f"MoE experts stay 16-bit: transformers 5 does not quantize fused expert stacks with bitsandbytes "
            f"(bitsandbytes #1849); they take {format_bytes(sixteen, 'GiB')} ({sixteen:,} bytes) of the weights, "
            f"{format_bytes(four, 'GiB')} as {quant}")
    if experts_adapted(spec, setup):
        merge = spec.num_experts * 3 * spec.hidden * spec.expert_width * setup.compute_bytes
        text += f", plus a {format_bytes(merge, 'GiB')} merged 16-bit copy per layer on each forward (LoRA)"
    if setup.quant != "int8" and spec.arch.expert_linears_v4:
        text += "; --experts 4bit models stacks that quantize them"
    return (text,)


def gpu_assumption(arch: CudaArch, gpu: Gpu | None) -> str:
    """Which GPU architecture's kernels the estimate assumes, and why."""
    if gpu is not None and gpu.cuda is not None:
        return f"CUDA kernels of the {arch.describe()}"
    why = "no GPU given" if gpu is None else f"--gpu {gpu.name} names no card"
    if arch is ASSUMED:
        return f"CUDA kernels assumed of an {arch.describe()} ({why}; set another with --arch, e.g. --arch sm75)"
    return f"CUDA kernels of an {arch.label} GPU, SM count of the {arch.describe()} ({why}, --arch {arch.label})"


def attention_assumption(spec: ModelSpec, setup: TrainSetup, arch: CudaArch) -> str:
    if setup.attn != "sdpa" and spec.arch.sinks:   # ops.eager_sinks
        return ("attention: eager with a learned sink column per head (materializes batch x heads x seq x "
                "(seq + 1) logits and a softmax in the scores' dtype; transformers has no SDPA path for it)")
    if setup.attn != "sdpa":   # Llama 4's eager_attention_forward does not upcast the softmax
        softmax = "fp32 softmax" if spec.arch.eager_softmax_fp32 else "a softmax in the scores' dtype"
        only = "" if "sdpa" in spec.arch.attention else f"; {spec.model_type} has no SDPA path"
        return f"attention: eager (materializes batch x heads x seq x seq scores and {softmax}{only})"
    from vramplan.cuda._sdpa import fallback_reason
    from vramplan.estimate._ops import sdpa_backend, sdpa_call

    backend = sdpa_backend(spec, setup, arch=arch)
    if backend == "math":
        return (f"attention: SDPA math fallback on {arch.label}, materializing batch x heads x seq x seq scores "
                f"and softmax ({fallback_reason(arch, sdpa_call(spec, setup))})")
    return {"flash": "attention: SDPA flash-attention kernel (no seq x seq matrix)",
            "efficient": "attention: SDPA memory-efficient kernel (no seq x seq matrix)"}[backend]


def device_assumptions(est: "Estimate") -> tuple[str, ...]:
    """What the device total takes for granted: the CUDA context used and the allocator settings."""
    conf = est.alloc_conf or "defaults"
    out = [f"CUDA context {est.cuda_context_bytes / 2**20:,.0f} MiB ({est.context_source})"]
    if est.alloc_conf or est.peak_reserved_bytes:
        out.append(f"device total = CUDA context + peak reserved of the caching allocator (PyTorch's "
                   f"CUDACachingAllocator replayed over a warm-up and a measured step, "
                   f"PYTORCH_CUDA_ALLOC_CONF: {conf})"
                   + (" + the paged optimizer state resident on the device" if est.paged_optimizer_bytes else ""))
    if est.paged_optimizer_bytes and est.paged_resident_bytes < est.paged_optimizer_bytes:
        out.append(f"paged optimizer state: {est.paged_resident_bytes / 2**20:,.0f} of "
                   f"{est.paged_optimizer_bytes / 2**20:,.0f} MiB fit beside the step on this card; unified memory "
                   "keeps the rest in host RAM and pages it in for each update")
    return tuple(out)


def adapted_text(spec: ModelSpec, setup: TrainSetup) -> str:
    """What LoRA adapts: the Linear modules by name, and under all-linear on an MoE model the
    router and expert stacks peft wraps besides them (inventory.experts_adapted)."""
    names = ", ".join(sorted(set(static_adapted(spec, setup))))
    if experts_adapted(spec, setup):
        experts = ("the router and each expert's w1, w2, w3 (Linear4bit)" if experts_quantized(spec, setup)
                   else "the router and the expert stacks (ParamWrapper; gate_up_proj at rank 2r)")
        return f"{names} and {experts}" if names else experts
    return names or "nothing"


def static_adapted(spec: ModelSpec, setup: TrainSetup) -> tuple[str, ...]:
    return tuple(l.leaf for l in adapted_linears(spec, setup))
