"""The estimate's allocation stream: every CUDA allocation and free of two training steps (warm-up,
then the measured step), unrolled from the per-layer tapes the estimator already walks
(_ops.py + _walk.py), for the caching-allocator model (cuda/_allocator.py) to replay.

What the stream holds, in order (docs/allocator.md#estimate-stream):
- the persistent state, one allocation per tensor: packed weights and each bitsandbytes
  constant (_quant.py layout), 16-bit weights, norms, embeddings, LoRA A/B (_inventory.py); what
  the inventory counts beyond those tensors is one more allocation;
- per step: the inputs (ids, shifted labels: the loop's; position ids, masks, rotary cos/sin:
  the forward's, the tables until the backward is done), the
  embedding output, every decoder layer's forward tape chained output-to-input, the head and
  loss forward and backward, every layer's backward tape in reverse (the gradient of a layer's
  input is the gradient of the layer below's output), then the optimizer: its state is created
  inside the first step (torch.optim lazy state init, `_init_group`), its foreach workspace
  lives through the update, zero_grad(set_to_none=True) frees the gradients.
A tape entry that is a sum of several allocations (symbolic.Size parts) is that many
allocations. Sizes are the estimator's, already rounded to 512 bytes, so the replay's
peak_allocated is the estimator's peak (tests/test_reserved.py checks it).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from vramplan.core._models import ModelSpec
from vramplan.core._record import record
from vramplan.core._setup import TrainSetup
from vramplan.estimate._inventory import (Static, adapted_linears, adapter_bytes, bias_bytes, checkpoint_order,
                                         device_state_tensors, embedding_bytes, expert_lora_shapes, linear_tensors,
                                         lora_shapes, numel, step_workspace, vision_static, vision_tensors,
                                         weight_bytes)
from vramplan.cuda._arch import ASSUMED, CudaArch
from vramplan.cuda._reserved import SmallPoolLevel
from vramplan.cuda._cublas import workspace_bytes
from vramplan.cuda._fast_replay import EMPTY_CACHE
from vramplan.estimate._ops import (_head_tape, _layer_tapes, _structure, eager_masks, embedding_leaf,
                                   held_embeddings, mask_build, mask_cells, mask_plan, rope_build,
                                   rope_cells,
                                   held_graph_leaf, int8_ctx_inputs, layer_kinds, rope_tables, tied_embedding_grad,
                                   tied_sum_in_place)
from vramplan.estimate._load import LoadTensor, load_ops, quantized_roles, settings_of
from vramplan.estimate._quant import alloc
from vramplan.estimate._symbolic import rounded_bytes, variables
from vramplan.estimate._walk import GRAD
from vramplan.estimate._walk import accumulating as accumulating_tape


@record
class FsdpShards:
    """What one GPU of an N-way FSDP full_shard run holds, from the planner's static split
    (plan/_sharding.py Splits): each decoder layer is one unit (transformer_auto_wrap_policy) with
    a flat frozen and a flat trainable parameter; the root unit holds embeddings, final norm and
    lm_head; bitsandbytes quantization state stays whole on every rank."""
    gpus: int
    # per decoder layer, bottom to top: (weights, adapters, gradients) of its unit; they differ
    # where dense and MoE layers mix (Llama 4 Maverick, DeepSeek-V3)
    units: tuple[tuple[int, int, int], ...]
    root_weights: int
    root_adapters: int
    root_gradients: int
    replicated: int          # quant constants and anything not in a flat parameter
    # The wrap phase (docs/allocator.md#fsdp-wrap), played when unit_params is given: per decoder
    # layer, the bytes of each parameter its unit flattens, in module order (summing to that
    # layer's weights in `units`), the root's likewise (summing to root_weights), and whether FSDP
    # broadcasts them from rank 0 (sync_module_states).
    unit_params: tuple = ()
    root_params: tuple = ()
    sync_module_states: bool = True
    # CPUOffload(offload_params=True) (docs/allocator.md#fsdp-cpu-offload): the shards live on
    # the CPU; each unshard first copies this rank's shard to the GPU in the pre-unshard stream,
    # the sharded gradients wait on the GPU for the end of backward, the optimizer steps on the CPU.
    offload: bool = False
    # ShardingStrategy.SHARD_GRAD_OP (docs/allocator.md#fsdp-shard-grad-op): no reshard after the
    # forward; each unit stays unsharded until its backward ends
    reshard_after_forward: bool = True


# CUDA streams of one FSDP rank (torch/distributed/fsdp/_runtime_utils.py _init_streams): the
# all-gathers run in `_unshard_stream` (_unshard: `with stream(unshard_stream): handle.unshard()`),
# the reduce-scatters in `_post_backward_stream` (_post_backward_hook). The caching allocator keeps
# one pool per stream (docs/allocator.md#rules rule 2), so what one frees the others never reuse.
DEFAULT_STREAM, UNSHARD_STREAM, POST_BACKWARD_STREAM = 0, 1, 2
# _init_streams' `_pre_unshard_stream`: "allocations and writes for CPU offloading (H2D copy)";
# _unshard runs handle.pre_unshard() under it (docs/allocator.md#fsdp-cpu-offload). 4, not 3:
# REDUCTION_STREAM is ZeRO's.
PRE_UNSHARD_STREAM = 4
# torch/distributed/fsdp/_init_utils.py PARAM_BROADCAST_BUCKET_SIZE = int(250 * 1024 * 1024): the
# bucket of _sync_module_params_and_buffers -> _sync_params_and_buffers -> dist._broadcast_coalesced.
PARAM_BROADCAST_BUCKET = 250 * 1024 * 1024


def bucket_assignment(sizes, limits) -> list:
    """torch/csrc/distributed/c10d/reducer.cpp compute_bucket_assignment_by_size for tensors of one
    dtype and device: in order, a tensor joins the open bucket, which closes once its bytes reach
    the current limit; each closed bucket moves to the next limit, the last one staying."""
    buckets, current, total, k = [], [], 0, 0
    for n in sizes:
        current.append(n)
        total += n
        if total >= limits[k]:
            buckets.append(current)
            current, total, k = [], 0, min(k + 1, len(limits) - 1)
    if current:
        buckets.append(current)
    return buckets


def broadcast_buckets(sizes, limit: int = PARAM_BROADCAST_BUCKET) -> list:
    """The buckets broadcast_coalesced (torch/csrc/distributed/c10d/comm.cpp) sends: tensors in
    order, grouped by compute_bucket_assignment_by_size with one limit (bucket_assignment)."""
    return bucket_assignment(sizes, [limit])


def broadcast(make, drop, sizes) -> None:
    """dist._broadcast_coalesced of `sizes` (comm.cpp broadcast_coalesced): per bucket of two or
    more tensors a flattened copy (tensor_flatten.h flatten_dense_tensors; one tensor is sent as
    a view), at most 2 buckets in flight (`max_in_flight`), each freed when it finishes."""
    in_flight: list = []
    for bucket in broadcast_buckets(sizes):
        if len(in_flight) >= 2:
            drop(in_flight.pop(0))
        in_flight.append(make([sum(bucket)]) if len(bucket) > 1 else [])
    for pairs in in_flight:
        drop(pairs)


# torch/csrc/distributed/c10d/reducer.hpp kDefaultFirstBucketBytes = int(1024 * 1024),
# kDefaultBucketBytesCap = int(25 * 1024 * 1024) (DistributedDataParallel bucket_cap_mb=25)
DDP_FIRST_BUCKET, DDP_BUCKET_CAP = 1024 * 1024, 25 * 1024 * 1024


@record
class DdpBuckets:
    """One GPU of torch DistributedDataParallel with gradient_as_bucket_view=False (the default),
    docs/allocator.md#ddp-stream: the whole model on every rank (the single-GPU persistent
    state), then DDP's construction: `states`, the bytes of each parameter and buffer in module
    order, broadcast from rank 0 (_sync_module_states, PARAM_BROADCAST_BUCKET buckets); the
    Reducer's flat bucket tensors, one allocation each, in the order it allocates them:
    `buckets` at construction, `rebuilt` when Reducer::rebuild_buckets replaces them at the
    second iteration's forward (reducer.cpp initialize_buckets: `buckets_.clear()`, then
    `bucket.gradients = at::empty(...)` per bucket)."""
    states: tuple
    buckets: tuple
    rebuilt: tuple


def ddp_buckets(states, trainable, first: int = DDP_FIRST_BUCKET, cap: int = DDP_BUCKET_CAP) -> DdpBuckets:
    """DdpBuckets from the module states and the trainable parameters' bytes (module order).
    torch/nn/parallel/distributed.py _ddp_init_helper: bucket_indices =
    dist._compute_bucket_assignment_by_size(parameters, [_DEFAULT_FIRST_BUCKET_BYTES, bucket_bytes_cap])
    over the parameters in module order, passed to the Reducer reversed ("approximate the order in
    which their gradients are produced"). rebuild_buckets assigns again, same limits, over
    rebuilt_params_: the order their gradients became ready in the first backward (taken as the
    reverse of module order), and allocates in that order."""
    at_init = [alloc(sum(b)) for b in reversed(bucket_assignment(list(trainable), [first, cap]))]
    rebuilt = [alloc(sum(b)) for b in bucket_assignment(list(reversed(trainable)), [first, cap])]
    return DdpBuckets(tuple(states), tuple(at_init), tuple(rebuilt))


REDUCTION_STREAM = 3   # DeepSpeedZeroOptimizer.reduction_stream (overlap_comm); stage 3's reduce_and_partition_stream
DS_ALLGATHER_STREAM = 5   # ZeRO-3's parameter all-gathers (PartitionedParameterCoordinator.__allgather_stream)
NORM_CHUNK = 250_000_000  # stage3.py _constant_buffered_norm2(buffer_size): elements cast to fp64 at a time


@record
class Zero3Params:
    """What one GPU of DeepSpeed ZeRO-3 holds of the model (docs/allocator.md#zero-3-stream), in
    bytes: `load` every tensor loading under zero.Init leaves (each frozen parameter's partition,
    the persistent ones also whole; the bitsandbytes constants and buffers whole); `adapters`
    (LoRA: each trainable tensor whole as peft makes it, paired with its partition, which
    deepspeed.initialize makes before freeing it; full fine-tuning: each partition, made at
    load); `kept` the trainable tensors under the persistence threshold, whole for the run;
    `grads` grad_partitions_flat_buffer; `first` / `steady` the all-gathers and releases of the
    first step and of the steps after it (plan/_zero3.py gather_segments); `groups` the optimizer's
    sub-groups, each with its fp32 master, gradient and state (stage3.py sub_group_size)."""
    load: tuple
    adapters: tuple     # (whole or 0, partition) per trainable tensor
    kept: tuple
    grads: int
    first: tuple
    steady: tuple
    groups: tuple = ()  # elements of each optimizer sub-group (_create_fp16_sub_groups)


@record
class ZeroPartitions:
    """One GPU of DeepSpeed ZeRO-2 (deepspeed/runtime/zero/stage_1_and_2.py DeepSpeedZeroOptimizer,
    partition_gradients, contiguous_gradients; docs/allocator.md#zero-2-stream), or of ZeRO-3 with
    `stage3`, in bytes: `flat` the 16-bit flat buffer of every trainable parameter
    (bit16_groups_flat, aligned), `part16` / `part32` this rank's partition in 16 / 32 bits (no
    32-bit one on the GPU when offloaded), `ipg` one gradient bucket (reduce_bucket_size
    elements, `ipg_buffers` of them: 2 with overlap_comm), `layer_grads` / `head_grads` the 16-bit
    gradients one decoder layer / the head makes (how fast the bucket fills), `states` the
    optimizer state tensors of the partition."""
    gpus: int
    flat: int
    part16: int
    part32: int
    ipg: int
    ipg_buffers: int
    layer_grads: int
    head_grads: int
    states: tuple
    overlap_comm: bool = False
    # offload_optimizer (docs/allocator.md#zero-2-cpu-offload): `staging` the GPU buffer of the
    # largest trainable parameter (temp_grad_buffer_for_gpu_offload), `elem` bytes per gradient
    # element, `slices` (arrival offset of the parameter's gradient in bytes, its elements in this
    # rank's partition) in the order backward makes them
    offload: bool = False
    staging: int = 0
    elem: int = 2
    slices: tuple = ()
    # ZeRO-3 (docs/allocator.md#zero-3-stream): `flat` is then the defragmented buffer of this
    # rank's trainable partitions, `part16` / `part32` their elements in 16 / 32 bits
    stage3: Zero3Params | None = None


def wrap_unit(make, drop, params, gpus: int, sync: bool, offload: bool = False) -> list:
    """One FSDP unit's construction on one rank (torch/distributed/fsdp/_init_utils.py
    _init_param_handle_from_module), as (key, slot) pairs made with `make(sizes)` / dropped with
    `drop(pairs)`; returns the pairs of the shard it keeps:
    - _move_module_to_device (parameters on the CPU) or param_init_fn's to_empty (meta): one
      allocation per parameter, held in `managed_params` until the function returns;
    - with sync_module_states, _sync_module_params_and_buffers broadcasts them in
      PARAM_BROADCAST_BUCKET buckets (broadcast_coalesced: a bucket of two or more tensors is
      flattened into one new tensor, torch/csrc/utils/tensor_flatten.h flatten_dense_tensors; at
      most 2 buckets in flight, `max_in_flight`);
    - FlatParamHandle.flatten_tensors: torch.cat of the parameters, the unit's size;
    - FlatParamHandle.shard -> _get_shard: `chunk.clone()`, ceil(size / N); then
      `orig_storage._resize_(0)` frees the flat tensor; the originals go with managed_params;
    - with `offload` (CPUOffload(offload_params=True)), _init_param_handle_from_params then moves
      the shard to the CPU (`handle.flat_param_to(cpu_device)`): nothing of the unit stays."""
    originals = make(params)
    if sync:
        broadcast(make, drop, params)
    total = sum(params)
    flat = make([total])
    shard = make([alloc(-(-total // gpus))])
    drop(flat)
    drop(originals)
    if offload:
        drop(shard)
        return []
    return shard


@record
class Stream:
    """Events ("alloc", key, nbytes) / ("free", key), and where each phase starts:
    [(first event index, phase, module)] in order, for naming where an OOM happened."""
    events: list
    places: list


def static_sizes(spec: ModelSpec, setup: TrainSetup, static: Static) -> list[int]:
    """One size per persistent tensor, summing to weights + quant_constants + adapters exactly."""
    model, adapters, rest = static_parts(spec, setup, static)
    return model + adapters + rest


def lora_numels(spec: ModelSpec, setup: TrainSetup) -> list[int]:
    """The elements of each LoRA tensor on the decoder's Linear layers (and an adapted lm_head), in
    the order get_peft_model makes them: `named_modules()` order, each layer's adapted Linear
    modules in their registration order (core/_models.py's list, Phi-3's o_proj moved ahead of its
    qkv_proj: registered_before), lora_A then lora_B
    (peft tuners/lora/layer.py update_layer), the lm_head last. Where the layers differ
    (Linear.where: DeepSeek-V3's dense and MoE layers) every layer's tensors of one Linear come
    together, as before."""
    linears = adapted_linears(spec, setup)
    on_head = [numel(shape) for lin in linears if lin.name == "lm_head" for shape in lora_shapes(lin, setup.rank)]
    in_layers = sorted((lin for lin in linears if lin.name != "lm_head"), key=lambda lin: registered_before(spec, lin))
    if all(lin.where == "all" for lin in in_layers):
        one = [numel(shape) for lin in in_layers for shape in lora_shapes(lin, setup.rank)]
        return one * spec.layers + on_head
    return [numel(shape) for lin in in_layers for shape in lora_shapes(lin, setup.rank)
            for _ in range(spec.count(lin))] + on_head


def registered_before(spec: ModelSpec, linear) -> int:
    """0 for a Linear its module registers ahead of the catalog's order: Phi3Attention.__init__
    makes `self.o_proj` before `self.qkv_proj` (transformers models/phi3/modeling_phi3.py), so
    named_modules() yields it first; 1 otherwise (a stable sort keeps the rest as listed)."""
    return 0 if spec.arch.fused_qkv and linear.name == "self_attn.o_proj" else 1


def load_tensors(spec: ModelSpec, setup: TrainSetup, static: Static) -> list[LoadTensor]:
    """One LoadTensor (estimate/_load.py) per persistent tensor, in load order, summing to weights +
    quant_constants + adapters exactly: embed_tokens, an untied lm_head, the norms, each decoder
    layer's tensors (a 4-bit weight "packed" or an "int8" one, with its constants after it), MoE expert stacks, a
    vision tower, the LoRA tensors (lora_numels, then the experts'), and what the inventory counts
    beyond them as one more tensor made last."""
    wb, eb, ab = weight_bytes(setup), embedding_bytes(setup), adapter_bytes(setup)
    n, vh, h = spec.layers, spec.vocab * spec.hidden, spec.hidden
    out: list = []

    def add(role: str, count: int, nbytes: int) -> None:
        out.append(LoadTensor(len(out), role, count, nbytes))
    add("embed", vh, alloc(vh * eb))
    if not spec.tied:
        add("head", vh, alloc(vh * eb))
    for _ in range(n * spec.arch.norms_per_layer + 1):
        add("upcast", h, alloc(h * wb))

    def layer_tensors(dense: bool) -> list:
        """(role, numel, bytes) of one decoder layer's tensors in the order a checkpoint load
        quantizes them (checkpoint_order), or in the modules' order (Static.load_order; DeepSeek-V3:
        a dense-layer MLP or a shared-expert MLP, core/_models.py Linear.where)."""
        layer = []
        linears = spec.layer_linears
        if static.load_order == "checkpoint":
            linears = sorted(linears, key=lambda linear: checkpoint_order(linear.name))
        for linear in linears:
            if linear.where != "all" and dense != (linear.where == "dense"):
                continue
            weight, constants = linear_tensors(setup, linear)
            role, constant = quantized_roles(setup)
            layer.append((role, linear.numel, weight))
            layer += [(constant, 0, c) for c in constants]
            if linear.bias:
                layer.append(("weight", 0, alloc(linear.out_features * bias_bytes(setup))))
        return layer
    per_kind = {dense: layer_tensors(dense) for dense in (True, False)}
    for i in range(n):
        for role, count, nbytes in per_kind[spec.is_dense(i)]:
            add(role, count, nbytes)
    if spec.num_experts and not setup.experts_4bit:
        # the router weight and the two 3D expert stacks of every MoE layer, one allocation each
        # (inventory.static_memory), and DeepSeek-V3's float32 e_score_correction_bias
        E, i = spec.num_experts, spec.expert_width
        stacks = [alloc(E * h * wb), alloc(E * 2 * i * h * wb), alloc(E * h * i * wb)]
        if spec.arch.router == "sigmoid_grouped":
            stacks.append(alloc(4 * E))
        for nbytes in stacks * spec.moe_layers:
            add("weight", 0, nbytes)
    for _component, role, count, nbytes in vision_tensors(spec, setup):   # a multimodal class's vision tower
        add(role, count, nbytes)
    for count in lora_numels(spec, setup):
        add("adapter", count, alloc(count * ab))
    for shape, count in expert_lora_shapes(spec, setup):
        for _ in range(count * spec.moe_layers):
            add("adapter", numel(shape), alloc(numel(shape) * ab))
    for nbytes in vision_static(spec, setup).adapters:
        add("adapter", 0, nbytes)
    total = static.weights + static.quant_constants + static.adapters
    rest = total - sum(t.nbytes for t in out)
    if rest < 0:   # the inventory counts fewer tensors than listed here: keep the total exact
        return [LoadTensor(0, "weight", 0, total)]
    if rest:
        add("later", 0, rest)
    return out


def static_parts(spec: ModelSpec, setup: TrainSetup, static: Static) -> tuple[list, list, list]:
    """static_sizes in three parts: the model's tensors (weights, bitsandbytes constants, norms,
    embeddings), the LoRA tensors, and what the inventory counts beyond them (one more tensor)."""
    tensors = load_tensors(spec, setup, static)
    return ([t.nbytes for t in tensors if t.role not in ("adapter", "later")],
            [t.nbytes for t in tensors if t.role == "adapter"], [t.nbytes for t in tensors if t.role == "later"])


def play_load(b, const, spec: ModelSpec, setup: TrainSetup, static: Static) -> None:
    """The load phase on one GPU (estimate/_load.py load_ops over load_tensors), then what a
    profile record's load made and freed after it (Static.load_transients)."""
    made: dict = {}
    tensors = [t for t in load_tensors(spec, setup, static) if t.nbytes > 0]
    for op in load_ops(tensors, settings_of(spec, setup)):
        if op[0] == "alloc":
            made[op[1]] = b.make([const(op[2])])
        elif op[0] == "free":
            b.drop(made.pop(op[1]))
        else:
            b.ops.append(EMPTY_CACHE)
    for n in static.load_transients:
        b.drop(b.make([const(n)]))


def optimizer_sizes(setup: TrainSetup, static: Static) -> tuple[list[int], list[int]]:
    """(state tensors, workspace tensors of one optimizer.step) on the device, one size each, in
    the order the optimizer makes them (inventory.device_state_tensors, step_workspace: each
    parameter's state tensors apart, so each lands in its own pool), summing to
    static.optimizer_state and static.optimizer_temporaries."""
    grad_bytes = adapter_bytes(setup) if setup.uses_adapters else setup.compute_bytes
    # an 8-bit optimizer's two shared qmaps, moved to the device at its first init_state
    state = [alloc(4 * 256)] * 2 if setup.optimizer.endswith("8bit") else []
    work = []
    for shape, count in static.trainable_shapes:
        tensors = device_state_tensors(setup, shape, grad_bytes)
        w = step_workspace(setup, numel(shape), grad_bytes)
        for _ in range(count):
            state += tensors
            if w:
                work.append(w)
    for total, sizes in ((static.optimizer_state, state), (static.optimizer_temporaries, work)):
        rest = total - sum(sizes)
        if rest > 0:
            sizes.append(rest)
        elif rest < 0:
            sizes[:] = [total] if total else []
    return state, work


@record
class _Template:
    """One tape as allocation lists: per table entry the slots of its allocations (program
    sizes, _Slots), and the tape's events as (kind, tid) with marks carrying a transient entry."""
    parts: tuple           # tid -> tuple of slots (several allocations for a summed Size)
    tags: tuple            # tid -> component tag
    forward: tuple         # events before the phase end: (1, tid) / (-1, tid) / (0, tid) transient
    backward: tuple
    names: dict
    region_exit: tuple = ()  # the frees that open the backward tape: autocast's weight-cast cache,
                             # cleared when the forward's autocast region exits (walk.walk `cached`)
    blas: tuple = (-1, -1)   # index into forward / backward of the first cuBLAS call (walk.Tape.blas)


class _Slots:
    """The sizes of a compiled stream, by slot: each tape allocation is a polynomial in batch and
    sequence rounded on its own (symbolic.rounded_bytes), the persistent tensors are constants,
    and the tensors step_stream sizes itself (inputs, masks...) are named cell
    sizes, computed per batch x seq by `_cell_sizes`. A slot worth 0 bytes allocates nothing
    (NativeCachingAllocator::allocate returns nullptr for 0 bytes)."""

    def __init__(self):
        self.polys: dict = {}      # polynomial key -> slot
        self.consts: dict = {}     # bytes -> slot
        self.cells: dict = {}      # name -> slot
        self.count = 0

    def _new(self, table: dict, key) -> int:
        slot = table[key] = self.count
        self.count += 1
        return slot

    def poly(self, key: tuple) -> int:
        slot = self.polys.get(key)
        return self._new(self.polys, key) if slot is None else slot

    def const(self, nbytes: int) -> int:
        slot = self.consts.get(nbytes)      # the common case inline: a compile asks ~10k times
        return self._new(self.consts, nbytes) if slot is None else slot

    def cell(self, name: str) -> int:
        slot = self.cells.get(name)
        return self._new(self.cells, name) if slot is None else slot


def _template(tape, slots: _Slots) -> _Template:
    parts = tuple(tuple(slots.poly(key) for key, count in size.parts for _ in range(count))
                  for size, _tag in tape.table)
    fwd, bwd, cur = [], [], None
    cur = fwd
    blas = [-1, -1]
    for i, event in enumerate(tape.events):
        if i in tape.blas:
            blas[cur is bwd] = len(cur)
        kind = event[0]
        if kind == 1 or kind == -1:
            cur.append((kind, event[1]))
        elif kind == 0:
            if event[2] >= 0:
                cur.append((0, event[2]))
        else:
            cur = bwd
    n_exit = next((i for i, (kind, _tid) in enumerate(bwd) if kind != -1), len(bwd))
    if blas[1] >= 0:
        blas[1] = max(blas[1] - n_exit, 0)
    return _Template(parts, tuple(tag for _s, tag in tape.table), tuple(fwd), tuple(bwd[n_exit:]), tape.names,
                     tuple(bwd[:n_exit]), tuple(blas))


class _Recorder:
    """step_stream's events with sizes as slots: `make(slots)` allocates one new key per slot,
    `drop(pairs)` frees (key, slot) pairs; ops are a slot (>= 0: allocate it under the next key)
    or ~key (a free). Keys are numbered in allocation order."""

    def __init__(self):
        self.ops: list = []
        self.places: list = []
        self.next_key = 0
        self.streams: dict = {}     # key -> stream, for keys not on the default stream

    def make(self, slots, stream: int = DEFAULT_STREAM) -> list:
        first = self.next_key
        self.ops.extend(slots)
        self.next_key = key = first + len(slots)
        if stream:
            self.streams.update(dict.fromkeys(range(first, key), stream))
        return list(zip(range(first, key), slots))

    def drop(self, pairs) -> None:
        self.ops.extend([~key for key, _slot in pairs])

    def new(self, slot: int) -> list:
        return self.make((slot,))

    def place(self, phase: str, module: str) -> None:
        self.places.append((len(self.ops), phase, module))


class _Builder:
    """The stream's events; with `lump`, the small pool carried as its level
    (cuda/_reserved.py SmallPoolLevel, replayed by replay_lumped). Allocations are (key, nbytes)
    pairs: `make(sizes)` allocates, `drop(pairs)` frees."""

    def __init__(self, lump: bool = False):
        self.level = level = SmallPoolLevel() if lump else None
        self.events: list = level.events if lump else []
        self.places: list = []
        self.next_key = 0
        if lump:
            self.make, self.drop = level.make, level.drop

    def make(self, sizes, stream: int = DEFAULT_STREAM) -> list:
        pairs = []
        key = self.next_key
        events = self.events
        for n in sizes:
            events.append(("alloc", key, n, stream) if stream else ("alloc", key, n))
            pairs.append((key, n))
            key += 1
        self.next_key = key
        return pairs

    def drop(self, pairs) -> None:
        events = self.events
        for key, _n in pairs:
            events.append(("free", key))

    def empty_cache(self) -> None:
        if self.level is not None:
            self.level.empty_cache()
        else:
            self.events.append(("empty_cache",))

    def finish(self) -> None:
        if self.level is not None:
            self.level.finish()

    def place(self, phase: str, module: str) -> None:
        self.places.append((len(self.events), phase, module))
        if self.level is not None:
            self.level.barrier = len(self.events)


@dataclass(frozen=True, eq=False)
class Program:
    """step_stream compiled for one setup structure (everything but batch x seq): the events
    with sizes as slots. `sizes(setup)` evaluates the slots for one batch x seq; `stream` turns
    them into the Stream; cuda/_fast_replay.py replays the ops directly."""
    ops: list                 # slot >= 0: allocate sizes[slot] under the next key; ~key: free that key
    places: list              # (op index, phase, module): where each phase starts
    base: tuple               # sizes with the constant slots filled
    polys: tuple              # (slot, polynomial key) of the tapes' allocations
    cells: dict               # name -> slot of the sizes step_stream computes per batch x seq
    grads: tuple              # slots of the tapes' parameter gradients (with repeats), for extra_grads
    spec: ModelSpec
    static: Static
    fsdp: FsdpShards | None
    keys: int                 # allocations (keys) in ops
    streams: dict = None      # key -> CUDA stream of allocations off the default stream (FSDP)
    count_from: int | None = None  # op index of the first training phase when a wrap phase precedes
                                   # it (train.py's reset_peak_memory_stats before the loop)

    def sizes(self, setup: TrainSetup) -> list:
        """Bytes per slot for this batch x seq."""
        values = variables(setup.batch, setup.seq)
        sizes = list(self.base)
        for slot, key in self.polys:
            sizes[slot] = rounded_bytes(key, values)
        for name, n in _cell_sizes(self.spec, setup, self.static, self.fsdp,
                                   sum(sizes[slot] for slot in self.grads)).items():
            sizes[self.cells[name]] = n
        return sizes

    def stream(self, sizes: list, lump_small: bool = False) -> Stream:
        """The events for these sizes; allocations of 0 bytes (and their frees) are left out."""
        b = _Builder(lump_small)
        pairs: list = [()] * self.keys
        places = self.places
        p, n_places = 0, len(places)
        key = 0
        streams = self.streams or {}
        for i, op in enumerate(self.ops):
            while p < n_places and places[p][0] == i:
                b.place(places[p][1], places[p][2])
                p += 1
            if op >= 0:
                n = sizes[op]
                if n > 0:
                    pairs[key] = b.make((n,), streams.get(key, DEFAULT_STREAM))
                key += 1
            elif op == EMPTY_CACHE:
                b.empty_cache()
            else:
                made = pairs[~op]
                if made:
                    b.drop(made)
        for _i, phase, module in places[p:]:
            b.place(phase, module)
        b.finish()
        return Stream(b.events, b.places)


def _cell_sizes(spec: ModelSpec, setup: TrainSetup, static: Static, fsdp: FsdpShards | None,
                tape_grads: int) -> dict:
    """The allocations step_stream sizes itself for this batch x seq: the inputs (ids, position
    ids, shifted labels, rotary cos/sin), the embedding output, Granite's embedding leaf, the
    eager masks, int8 ctx inputs, and the gradients no tape makes."""
    extra = static.gradients - tape_grads      # embedding / norm gradients of full fine-tuning
    if extra > 0:
        extra = alloc(-(-extra // fsdp.gpus)) if fsdp else extra
    return {"ids": alloc(8 * setup.tokens), "positions": alloc(8 * setup.seq),
            "labels": alloc(8 * (setup.tokens + setup.batch)),
            **{f"rope{i}": n for i, n in enumerate(rope_tables(spec, setup))},
            "leaf": embedding_leaf(spec, setup),       # freed with the graph when backward ends
            "mask": eager_masks(spec, setup),
            **mask_cells(spec, setup), **rope_cells(spec, setup),    # ops.mask_build, rope_build
            "hidden": alloc(embedding_bytes(setup) * setup.tokens * spec.hidden),   # the embedding output
            "ctx": int8_ctx_inputs(spec, setup),
            "tied_grad": tied_embedding_grad(spec, setup),   # one gradient of a tied trainable embedding
            "extra_grads": max(extra, 0)}


class _Instance:
    """One play of a template: tid -> (key, slot) pairs of its allocations; `bound` tids are
    tensors made elsewhere (the layer input, the incoming gradient)."""

    def __init__(self, b: _Recorder, t: _Template, bound: dict):
        self.b, self.t = b, t
        self.keys: dict = dict(bound)

    def run(self, events) -> None:
        """The recorder's make and drop, inlined (a compile records every exact layer's events)."""
        parts, keys, b = self.t.parts, self.keys, self.b
        append = b.ops.append
        key = b.next_key
        for kind, tid in events:
            if kind == 1:
                if tid not in keys:      # else made elsewhere (input, incoming gradient)
                    pairs = keys[tid] = []
                    for slot in parts[tid]:
                        append(slot)
                        pairs.append((key, slot))
                        key += 1
            elif kind == -1:
                pairs = keys.pop(tid, None)
                if pairs:
                    for k, _slot in pairs:
                        append(~k)
            else:                        # a transient inside one op: made, then dropped
                first = key
                for slot in parts[tid]:
                    append(slot)
                    key += 1
                for k in range(first, key):
                    append(~k)
        b.next_key = key

    def take(self, tid) -> list:
        return self.keys.pop(tid, [])


def _net(events) -> tuple:
    """A tape's events without what it allocates and frees itself: what it leaves alive, and the
    frees of what was alive before (a middle layer of a reduced-detail stream)."""
    made, inside = set(), set()
    for kind, tid in events:
        if kind == 1:
            made.add(tid)
        elif kind == -1 and tid in made:
            inside.add(tid)
    return tuple((kind, tid) for kind, tid in events if kind != 0 and tid not in inside)


def step_stream(spec: ModelSpec, setup: TrainSetup, static: Static, arch: CudaArch = ASSUMED,
                steps: int = 2, exact_layers: int | tuple | None = None, fsdp: FsdpShards | None = None,
                lump_small: bool = False, ddp: DdpBuckets | None = None,
                zero: ZeroPartitions | None = None) -> Stream:
    """The allocation stream of `steps` training steps (the first one creates the optimizer
    state) after the persistent state is loaded, with the kernels of `arch`.

    exact_layers=K plays every event of the K bottom and K top decoder layers only; the layers
    between play what their tapes leave alive (outputs, saved tensors, gradients) without the
    transients inside them. None plays every event of every layer. A pair (forward, backward)
    sets each part on its own: (None, K) plays every layer's forward, and the backward of K
    layers at each end.

    fsdp: one GPU of FSDP full_shard instead (docs/allocator.md#fsdp-stream): the flat parameter
    shards are the persistent state; the root unit is gathered for the step, each decoder unit
    is gathered before its forward and freed after it, gathered again for its backward (with the
    next unit prefetched, BACKWARD_PRE), and its full gradients are reduce-scatter into a
    gradient shard when its backward ends; the optimizer holds and updates shards."""
    program = compiled(spec, setup, static, arch, steps, exact_layers, fsdp, ddp, zero)
    return program.stream(program.sizes(setup), lump_small)


def compiled(spec: ModelSpec, setup: TrainSetup, static: Static, arch: CudaArch = ASSUMED, steps: int = 2,
             exact_layers: int | tuple | None = None, fsdp: FsdpShards | None = None,
             ddp: DdpBuckets | None = None, zero: ZeroPartitions | None = None) -> Program:
    """step_stream's Program for this setup's structure: batch x seq change only the sizes, unless
    they change a kernel decision or a layer kind (ops._structure, ops.layer_kinds), which are
    part of the key (docs/allocator.md#one-pass-replay)."""
    kinds = layer_kinds(spec, setup)
    structures = tuple((kind, _structure(spec, setup, arch, *kind)) for kind in dict.fromkeys(kinds))
    # (micro-steps past the second repeat it: any grad_accum > 1 is one program)
    return _compile(spec, setup.with_(batch=1, seq=1, grad_accum=min(setup.grad_accum, 2)), static, arch, steps,
                    exact_layers, fsdp, kinds, structures,
                    _structure(spec, setup, arch), ddp, zero, mask_plan(spec, setup), held_embeddings(spec, setup, arch) > 0)


@lru_cache(maxsize=128)
def _compile(spec: ModelSpec, setup: TrainSetup, static: Static, arch: CudaArch, steps: int,
             exact_layers: int | tuple | None, fsdp: FsdpShards | None, kinds: tuple, structures: tuple,
             head_structure: tuple, ddp: DdpBuckets | None = None,
             zero: ZeroPartitions | None = None, masks_plan: tuple = (), hold_embeds: bool = False) -> Program:
    """The stream's events in order, with slots for sizes (`setup` has batch = seq = 1: only the
    cell sizes depend on batch x seq, and they are evaluated per cell)."""
    slots = _Slots()

    def stack_of(tape_of) -> tuple:
        """Per decoder layer bottom to top, its template (of `tape_of(tape)`). Layers of one kind
        (sliding-window or global attention, with or without RoPE: ops.layer_stack) share one."""
        made = {}
        for kind, structure in structures:
            inner, first, _ = _layer_tapes(spec, structure)
            t_inner = _template(tape_of(inner), slots)
            made[kind] = (t_inner, t_inner if first is inner else _template(tape_of(first), slots))
        return tuple(made[kind][1 if i == 0 else 0] for i, kind in enumerate(kinds))
    stack = stack_of(lambda tape: tape)
    head_tape = _head_tape(spec, head_structure)
    t_head = _template(head_tape, slots)
    # gradient accumulation (TrainSetup.grad_accum): two micro-steps per optimizer step, the second
    # with every .grad alive and each new parameter gradient added into it (walk.accumulating);
    # later micro-steps repeat the second
    micros = 2 if setup.accumulates else 1
    acc_stack, t_head_acc = stack, t_head
    if micros > 1:
        acc_stack = stack_of(accumulating_tape)
        t_head_acc = _template(accumulating_tape(head_tape), slots)
    # a plain loop's outputs (ops.held_outputs): the head's own logits (or TRL's per-token
    # outputs), which its walk keeps past the step
    held_tids = [head_tape.names[name] for name in head_tape.kept]
    L = spec.layers
    exact_forward, exact_backward = exact_layers if isinstance(exact_layers, tuple) else (exact_layers, exact_layers)
    reduced_forward, reduced_backward = ((lambda i: False) if k is None else (lambda i, k=k: k <= i < L - k)
                                         for k in (exact_forward, exact_backward))
    nets: dict = {}

    def net(t: _Template, events: tuple, part: str) -> tuple:
        key = (id(t), part)
        if key not in nets:
            nets[key] = _net(events)
        return nets[key]
    b = _Recorder()
    const = slots.const
    b.place("load", "")
    state_sizes, work_sizes = optimizer_sizes(setup, static)
    z3 = zero.stage3 if zero is not None else None
    gather_stream = DS_ALLGATHER_STREAM
    if z3 is not None:
        # ZeRO-3 (docs/allocator.md#zero-3-stream): the model loaded under zero.Init (partitions);
        # peft's LoRA tensors whole, each partitioned by deepspeed.initialize (its partition made,
        # the tensor freed); DeepSpeedZeroOptimizer_Stage3.__init__: defragment moves the trainable
        # partitions to the CPU, empty_cache(), and back as one flat buffer; each fp32 partition is
        # `fp16_flat.to(fp32).clone()`; initialize_optimizer_states makes and drops an fp32
        # gradient buffer; the ipg bucket and grad_partitions_flat_buffer stay for the run.
        b.make([const(n) for n in z3.load if n > 0])
        whole = [b.make([const(n or part)]) if n or part else [] for n, part in z3.adapters]
        b.place("wrap", "")
        parts = []
        for (n, part), keys in zip(z3.adapters, whole):
            if n:                # LoRA: the tensor whole until its partition exists
                parts += b.make([const(part)]) if part else []
                b.drop(keys)
            else:                # full fine-tuning: loaded as its partition
                parts += keys
        if not zero.offload:     # offloaded, the flat partitions, masters and gradients are on the CPU
            b.drop(parts)
            b.ops.append(EMPTY_CACHE)
            b.make([const(zero.flat)])
            for n in z3.groups:          # _create_fp32_partitions, per sub-group
                converted = b.make([const(alloc(4 * n))])
                b.make([const(alloc(4 * n))])
                b.drop(converted)
            b.drop(b.make([const(alloc(4 * max(z3.groups, default=0)))]))   # initialize_optimizer_states
        b.make([const(zero.ipg)] * zero.ipg_buffers)
        if z3.grads:
            b.make([const(z3.grads)])
        # the persistent trainable parameters, gathered whole at their first use and kept
        b.make([const(n) for n in z3.kept if n > 0])
        unit, root = None, None
        # overlap_comm (stage 3's default) gives the all-gathers and the reductions streams of their
        # own (parameter_offload.py __allgather_stream, stage3.py reduce_and_partition_stream);
        # without it both are the default stream
        reduce_stream = REDUCTION_STREAM if zero.overlap_comm else DEFAULT_STREAM
        gather_stream = DS_ALLGATHER_STREAM if zero.overlap_comm else DEFAULT_STREAM
        state_sizes, work_sizes = list(zero.states), []
    elif zero is not None:
        # DeepSpeedZeroOptimizer.__init__ (docs/allocator.md#zero-2-stream): the trainable
        # parameters (LoRA tensors; every model tensor in full fine-tuning) go to the CPU, each
        # left a `torch.empty(1)` on the GPU, empty_cache(); the flat 16-bit buffer comes back
        # (`flattened_buffer.to(device)`); the fp32 partition is `partition.clone().float()`;
        # initialize_optimizer_states makes and drops an fp32 gradient of the partition.
        model_part, lora_part, rest_part = static_parts(spec, setup, static)
        frozen, trainable = (model_part, lora_part) if setup.uses_adapters else ([], model_part)
        b.make([const(n) for n in frozen if n > 0])
        moved = b.make([const(n) for n in trainable if n > 0])
        b.make([const(n) for n in rest_part if n > 0])
        b.place("wrap", "")
        b.drop(moved)
        b.make([const(alloc(4))] * len(moved))
        b.ops.append(EMPTY_CACHE)
        b.make([const(zero.flat)])
        clone = b.make([const(zero.part16)])
        if zero.offload:     # the fp32 partition is the clone moved to the CPU (self.device is 'cpu')
            b.drop(clone)
            b.make([const(zero.staging)])   # temp_grad_buffer_for_gpu_offload, for the whole run
        else:
            b.make([const(zero.part32)])
            b.drop(clone)
            b.drop(b.make([const(zero.part32)]))
        unit, root = None, None
        reduce_stream = REDUCTION_STREAM if zero.overlap_comm else DEFAULT_STREAM
        state_sizes, work_sizes = list(zero.states), []
    elif fsdp is None:
        play_load(b, const, spec, setup, static)
        unit, root = None, None
        if ddp is not None:      # DistributedDataParallel(model): broadcast, then the Reducer's buckets
            b.place("wrap", "")
            broadcast(lambda sizes: b.make([const(n) for n in sizes if n > 0]), b.drop, ddp.states)
            buckets = b.make([const(n) for n in ddp.buckets if n > 0])
    elif fsdp.unit_params:
        # The wrap phase (docs/allocator.md#fsdp-wrap): what loading leaves on the GPU (the
        # bitsandbytes quant_state, quantized on every rank), then FSDP(model) constructs the units
        # bottom-up (auto-wrap: each layer's LoRA units, the layer, ..., the root last), each on
        # the default stream (wrap_unit). Its cached blocks stay for the training steps.
        N = fsdp.gpus
        b.place("wrap", "")
        if fsdp.replicated:
            b.new(const(fsdp.replicated))

        def made(sizes) -> list:
            return b.make([const(n) for n in sizes if n > 0])
        for i in range(spec.layers):
            b.place("wrap", f"layers.{i}")
            if fsdp.units[i][1]:
                wrap_unit(made, b.drop, [fsdp.units[i][1]], N, fsdp.sync_module_states, fsdp.offload)
            wrap_unit(made, b.drop, list(fsdp.unit_params[i]), N, fsdp.sync_module_states, fsdp.offload)
        b.place("wrap", "root")
        if fsdp.root_adapters:
            wrap_unit(made, b.drop, [fsdp.root_adapters], N, fsdp.sync_module_states, fsdp.offload)
        wrap_unit(made, b.drop, list(fsdp.root_params), N, fsdp.sync_module_states, fsdp.offload)
    else:
        N = fsdp.gpus
        for w, a, _ in fsdp.units:
            for n in (w, a):
                if n and not fsdp.offload:
                    b.new(const(alloc(-(-n // N))))
        for n in (fsdp.root_weights, fsdp.root_adapters, fsdp.replicated):
            if n and (n is fsdp.replicated or not fsdp.offload):
                b.new(const(alloc(-(-n // N)) if n is not fsdp.replicated else n))
    if fsdp is not None:
        N = fsdp.gpus
        unit = lambda i: [n for n in fsdp.units[i][:2] if n]   # noqa: E731  (layer i's flat parameters)
        root = [n for n in (fsdp.root_weights, fsdp.root_adapters) if n]
        # offloaded, the optimizer steps on the CPU: no state or workspace on the GPU
        state_sizes = [] if fsdp.offload else [alloc(-(-n // N)) for n in state_sizes]
        work_sizes = [] if fsdp.offload else [alloc(-(-n // N)) for n in work_sizes]

    def gather(sizes, stream: int = UNSHARD_STREAM) -> list:
        """An all-gathered unit (its padded unsharded flat parameter, allocated in the unshard
        stream), or with POST_BACKWARD_STREAM a reduce-scatter's output shard."""
        return b.make([const(n) for n in sizes if n > 0], stream)

    def unshard(sizes) -> list:
        """_unshard of a unit's flat parameters (`sizes`, unsharded): offloaded, pre_unshard first
        copies each CPU shard to the GPU in the pre-unshard stream (flat_param_to(device)), the
        all-gather reads it, and _use_unsharded_flat_param drops it (flat_param.data now the
        unsharded view)."""
        if not fsdp.offload:
            return gather(sizes)
        gathered = []
        for n in sizes:        # one FSDP handle each (the layer's, its LoRA units'): one _unshard each
            if n > 0:
                copy = b.make([const(alloc(-(-n // N)))], PRE_UNSHARD_STREAM)
                gathered += gather([n])
                b.drop(copy)
        return gathered
    release = b.drop
    cell = slots.cell
    rope = [cell(f"rope{i}") for i in range(len(rope_tables(spec, setup)))]   # ops.rope_tables
    data = [cell("ids"), cell("labels"), cell("labels")]     # the batch, there before the model runs
    for name in ("mask", "mask_bool", "mask_add", "rope_half32", "rope_full32"):
        cell(name)                    # every cell _cell_sizes sizes has a slot, used or not
    eager = setup.attn == "eager"
    table_build = rope_build(spec)

    def build(steps, finals: dict) -> list:
        """ops.mask_build / rope_build steps; returns the pairs of the names in `finals` (name ->
        the cell its tensor is, where the step names none)."""
        named = {}
        for op, name, *where in steps:
            if op == "new":
                named[name] = b.new(cell(where[0] or finals[name]))
            else:
                b.drop(named.pop(name))
        return [pair for name in finals for pair in named.pop(name)]
    tied_grad = cell("tied_grad")     # every cell _cell_sizes sizes has a slot, used or not

    kinds_t = list({id(t): t for t in (*stack, *acc_stack)}.values())     # one template per layer kind
    grad_tids = {id(t): [tid for tid, tag in enumerate(t.tags) if tag == GRAD] for t in (*kinds_t, t_head, t_head_acc)}
    # a layer's forward without the free of its output: that is the next layer's input
    forwards = {id(t): tuple((k, tid) for k, tid in t.forward if not (k == -1 and tid == t.names["layer.out"]))
                for t in kinds_t}
    # where in that forward its first cuBLAS call is (the events kept before it)
    forward_blas = {id(t): -1 if t.blas[0] < 0 else
                    t.blas[0] - sum(1 for k, tid in t.forward[:t.blas[0]] if k == -1 and tid == t.names["layer.out"])
                    for t in kinds_t}
    workspace = const(workspace_bytes(arch))

    def play(inst: _Instance, events: tuple, at: int, pending: bool) -> bool:
        """inst.run(events); while a thread's cuBLAS workspace is pending (its first step), it is
        allocated at `at`, the tape's first cuBLAS call (walk.Tape.blas): at::cuda::blas takes the
        handle's workspace inside the call, after the matmul's output is allocated (cuda/_cublas.py).
        Returns whether it still is pending."""
        if pending and at >= 0:
            inst.run(events[:at])
            b.new(workspace)
            inst.run(events[at:])
            return False
        inst.run(events)
        return pending
    # the tapes' parameter gradients, which the gradients no tape makes are the rest of (_cell_sizes)
    grads_of = lambda t: [slot for tid in grad_tids[id(t)] for slot in t.parts[tid]]  # noqa: E731
    tape_grads = tuple(grads_of(t_head) + [slot for t in stack for slot in grads_of(t)])
    # lm_head's weight gradient in the head tape, when the embedding is tied to it and trains
    # (transformers' loss: lm_head's linear, or its weight cast under autocast; TRL's chunked loss)
    tied_key = next((n for n in ("pgrad:lm_head.base", "pgrad:lm_head.w_amp.cast", "pgrad:fused.logprob")
                     if n in t_head.names), None) if tied_embedding_grad(spec, setup) else None
    held_prev = []
    # the embedding leaf a kept `out`'s graph holds (ops.held_graph_leaf): the first layer's input,
    # or Granite's raw embedding output (the `leaf` cell)
    graph_leaf = ("raw" if spec.arch.scaled_residuals else "input") if held_graph_leaf(spec, setup) else None
    leaf_keys: list = []
    live_gathers: dict = {}

    def gathers(segment) -> None:
        """ZeRO-3: this stretch of the step's all-gathers and releases, in their own stream
        (plan/_zero3.py gather_segments), where the stream reaches it."""
        for sign, name, n in step_gathers.get(segment, ()):
            if sign > 0:
                live_gathers[name] = b.make([const(n)], gather_stream)
            else:
                b.drop(live_gathers.pop(name))
    step_gathers: dict = {}
    held_grads: list = []      # the .grad of every parameter, from the first micro-step to the optimizer's
    for p in range(steps * micros):
        step, micro = divmod(p, micros)
        layer_ts, head_t = (acc_stack, t_head_acc) if micro else (stack, t_head)
        b.place("forward", "")
        keys = b.make(data)
        if z3 is not None:
            step_gathers = dict(z3.first if step == 0 else z3.steady)
        gathers(("forward", "prefix"))
        if ddp is not None and p == micros:   # Reducer::rebuild_buckets, once, in the forward after the
            # first backward that synchronised (the last micro-step's: rebuilt_params_ is filled by
            # autograd_hook only when the backward all-reduces), whether or not this one will
            b.drop(buckets)
            buckets = b.make([const(n) for n in ddp.rebuilt if n > 0])
        # LlamaModel.forward (and every family's): the embedding output, the position ids, the
        # masks (ops.mask_plan, mask_build), then the rotary tables (ops.rope_build)
        leaves = b.new(cell("leaf"))
        # a scaled embedding's raw output is a temporary beside the scaled one (Gemma's
        # ScaledWordEmbedding: `super().forward(input_ids) * self.embed_scale`; Granite's
        # `inputs_embeds * self.embedding_multiplier` where no graph leaf keeps it, ops.embedding_leaf)
        raw = b.new(cell("hidden")) if spec.arch.scaled_embeddings or (spec.arch.scaled_residuals
                                                                      and not embedding_leaf(spec, setup)) else []
        x = b.new(cell("hidden"))
        b.drop(raw)
        # the position ids and the rotary tables live as the masks do (below), except that every
        # layer's `q * cos` and `rotate_half(q) * sin` save the tables (MulBackward0 keeps the other
        # operand), so they stay until the bottom layer's backward even without checkpointing
        # (simulate's step frees them in layer 0's attention backward; with checkpointing, as the
        # layer's recomputation releases its inputs at the end of its backward)
        positions = b.new(cell("positions"))
        masks = []
        for kind in masks_plan:
            masks += b.new(cell("mask")) if kind == "plain" else build(mask_build(kind, eager), {"mask": None})
        tables = []
        if table_build:
            for i in range(0, len(rope), 2):
                finals = ({"cos": None, "sin": None} if spec.arch.rope_float32
                          else {"table_cos": f"rope{i}", "table_sin": f"rope{i + 1}"})
                tables += build(table_build, finals)
        else:
            tables += b.make(rope)
        # the first step allocates each thread's cuBLAS workspace at its first matmul: the forward's
        # (the caller's thread) and the backward's (autograd's device thread); both stay (cuda/_cublas.py)
        forward_ws = backward_ws = p == 0
        rooted = unshard(root) if fsdp else []    # the root unit, unsharded for the whole step
        layers = []
        kept_units: list = []     # SHARD_GRAD_OP's units, unsharded from their forward on
        # the embedding output the base model's local `inputs_embeds` holds (ops.held_embeddings)
        embeds = x if hold_embeds else []
        for i in range(L):
            t = layer_ts[i]
            b.place("forward", f"layers.{i}")
            gathers(("forward", i))
            gathered = unshard(unit(i)) if fsdp else []
            inst = _Instance(b, t, {t.names["x"]: x})      # tape ids are per template
            fwd, fwd_blas = forwards[id(t)], forward_blas[id(t)]
            if i == 0 and embeds:
                # the first layer does not free its input: the head does, after the final norm
                cut = fwd.index((-1, t.names["x"]))
                fwd = fwd[:cut] + fwd[cut + 1:]
                fwd_blas -= 1 if 0 <= cut < fwd_blas else 0
            if reduced_forward(i):
                inst.run(net(t, fwd, "forward"))
            else:
                forward_ws = play(inst, fwd, fwd_blas, forward_ws)
            if i == 0 and embeds:
                inst.take(t.names["x"])    # the step frees it, not the layer's instance
            x = inst.take(t.names["layer.out"])
            if fsdp is None or fsdp.reshard_after_forward:
                release(gathered)                          # reshard_after_forward
            else:
                kept_units.append(gathered)                # SHARD_GRAD_OP: until its backward
            # bitsandbytes int8 matmul inputs kept on the autograd ctx (ops.int8_ctx_inputs; 0 bytes without)
            inst.keys["int8_ctx"] = b.new(cell("ctx"))
            layers.append(inst)
        b.place("forward", "lm_head")
        gathers(("forward", "head"))
        head = _Instance(b, head_t, {head_t.names["x"]: x})
        head_fwd, head_blas = head_t.forward, head_t.blas[0]
        # the masks are locals of the base model's forward that no backward op saves (SDPA saves
        # the additive bias it converts them to, eager attention's `+ causal_mask` saves nothing):
        # they go as it returns, unless checkpointing holds them as the layers' inputs for the
        # recomputation (torch.utils.checkpoint), until the first layer's backward
        early_masks = masks + positions if not setup.grad_ckpt else []
        if embeds or early_masks:
            # the base model returns once the final norm has rebound `hidden_states` (its input
            # freed): `inputs_embeds`, the position ids and the masks go then, before lm_head
            normed = head_fwd.index((-1, head_t.names["x"])) + 1 if (-1, head_t.names["x"]) in head_fwd else 0
            head.run(head_fwd[:normed])
            b.drop(embeds)
            release(early_masks)
            if early_masks:
                masks, positions = [], []
            head_fwd, head_blas = head_fwd[normed:], head_blas - normed if head_blas >= normed else -1
        if play(head, head_fwd, head_blas, forward_ws):
            b.new(workspace)      # no matmul found in the tapes: counted all the same (cuda/_cublas.py)
        gathers(("forward", "head_done"))
        for inst in layers:      # the autocast region exits with the forward
            inst.run(inst.t.region_exit)
        release(held_prev)        # a plain loop rebinds `out` once model() returns
        b.place("backward", "loss")
        gathers(("backward", "head"))
        if zero is not None:     # DeepSpeedZeroOptimizer.backward: the ipg buffer(s), before loss.backward()
            # (stage 3 made its bucket at init)
            ipg = [] if z3 is not None else b.make([const(zero.ipg)] * zero.ipg_buffers)
            filled, in_partition = 0, []
            slices, reduced, norms = list(zero.slices), [0], []   # reduced: gradient bytes reduced so far

            def reduce_ipg(nbytes: int, last: bool = False) -> None:
                """reduce_ipg_grads: average_tensor reduces the bucket to each rank in turn
                (allreduce_bucket flattens that rank's slices: a new tensor, freed after), and
                the first reduction makes grads_in_partition (copy_grads_in_partition); offloaded,
                each of the bucket's gradients in this rank's partition goes to the CPU instead.
                Stage 3 reduces with reduce_scatter_coalesced (a padded flat copy of the whole
                bucket) and partition_grads copies into grad_partitions_flat_buffer, made at init."""
                if nbytes:
                    scattered = nbytes if z3 is not None else -(-nbytes // zero.gpus)
                    b.drop(b.make([const(alloc(scattered))], reduce_stream))
                if zero.offload:
                    reduced[0] += nbytes
                    while slices and (last or slices[0][0] < reduced[0]):
                        offload_slice(slices.pop(0)[1])
                elif z3 is None and not in_partition:
                    in_partition.extend(b.make([const(zero.part16)], reduce_stream))

            def offload_slice(n: int) -> None:
                """copy_grads_in_partition with offload_optimizer, one gradient accumulation step:
                set_norm_for_param_grad_in_gpu (the slice cast to fp64 for its norm, a scalar
                kept in norm_for_param_grads until the step's reset_cpu_buffers), then
                async_inplace_copy_grad_to_fp32_buffer_from_gpu (the slice cast to fp32 on the
                GPU before its copy to the CPU partition; none when it already is fp32).
                Stage 3 (partition_grads): the partition copied to the CPU buffer and back to the
                GPU (`grad_buffer.to(grad_partition.device)`, freed with the next one), its norm
                in fp64 chunks of at most 250M elements (_constant_buffered_norm2), its fp32
                cast for the CPU master's gradient (_offload_grad_partition_at_boundary)."""
                back = b.make([const(alloc(zero.elem * n))], reduce_stream) if z3 is not None else []
                wide = b.make([const(alloc(8 * (min(n, NORM_CHUNK) if z3 is not None else n)))], reduce_stream)
                norms.extend(b.make([const(alloc(8))], reduce_stream))
                b.drop(wide)
                if zero.elem != 4:
                    b.drop(b.make([const(alloc(4 * n))], reduce_stream))
                b.drop(back)

            def fill(nbytes: int) -> int:
                """reduce_independent_p_g_buckets_and_remove_grads: each gradient is copied into the
                bucket (its own tensor freed); a full bucket is reduced first."""
                total = filled + nbytes
                while total > zero.ipg:
                    reduce_ipg(zero.ipg)
                    total -= zero.ipg
                return total
        backward_ws = play(head, head_t.backward, head_t.blas[1], backward_ws)
        gathers(("backward", "head_done"))
        # the new `out` (ops.held_outputs), made in the forward, lives on through the optimizer
        # step and the next forward
        held_prev = [key for tid in held_tids for key in head.take(tid)]
        grad = head.take(head_t.names["grad:x"])
        # a tied trainable embedding: lm_head's weight gradient waits in AccumulateGrad's input
        # buffer for the embedding's (ops.tied_embedding_grad); one GPU only, FSDP keeps its root
        # gradients as they were
        lm_grad = head.take(head_t.names[tied_key]) if tied_key and not fsdp else []
        grads = [key for tid in grad_tids[id(head_t)] for key in head.take(tid)]
        head_grads, grads = (grads, []) if fsdp else ([], grads)   # the root's: sharded when it ends
        if zero is not None:
            release(grads)
            grads = []
            filled = fill(zero.head_grads)
        _free_all(b, head)
        prefetched: list = []
        for i in reversed(range(L)):
            inst = layers[i]
            b.place("backward", f"layers.{i}")
            gathers(("backward", i))
            if fsdp and not fsdp.reshard_after_forward:   # still unsharded since its forward
                gathered = kept_units.pop()
            elif fsdp:   # this unit unsharded (prefetched by the one above), the next one prefetched
                gathered = prefetched or unshard(unit(i))
                prefetched = unshard(unit(i - 1)) if i > 0 else []
            inst.keys[inst.t.names["grad#1"]] = grad
            events, at = inst.t.backward, inst.t.blas[1]
            if i == 0 and graph_leaf == "input":
                # the checkpoint lets go of its input (walk's frame_inputs), which the graph `out`
                # keeps holds as a leaf all the same (taken below)
                free_x = (-1, inst.t.names["x"])
                if free_x in events:
                    cut = events.index(free_x)
                    events, at = events[:cut] + events[cut + 1:], at - (0 <= cut < at)
            if reduced_backward(i):
                inst.run(net(inst.t, events, "backward"))
            else:
                backward_ws = play(inst, events, at, backward_ws)
            grad = inst.take(inst.t.names["grad:x"]) if "grad:x" in inst.t.names else []
            mine = [key for tid in grad_tids[id(inst.t)] for key in inst.take(tid)]
            if fsdp:     # reduce-scatter: the unit's full gradients become this rank's shard
                shard = alloc(-(-fsdp.units[i][2] // fsdp.gpus)) if fsdp.units[i][2] else 0
                mine_shard = gather([shard], POST_BACKWARD_STREAM) if shard else []
                release(mine)
                release(gathered)
                mine = mine_shard
            if zero is not None:
                release(mine)
                mine = []
                filled = fill(zero.layer_grads)
            grads += mine
            if i == 0 and graph_leaf == "input":   # the embedding leaf, held by the graph `out` keeps
                leaf_keys = inst.take(inst.t.names["x"])
            _free_all(b, inst)       # the checkpoint's saved input and whatever the tape leaves
        gathers(("backward", "end"))
        if backward_ws:
            b.new(workspace)      # no matmul found in the tapes: counted all the same (cuda/_cublas.py)
        if lm_grad:
            # the embedding's backward (ops.tied_embedding_grad): embedding_dense_backward's output,
            # made before its incoming gradient goes; then the sum of the two, into lm_head's
            # gradient (in place) or a new tensor that AccumulateGrad steals into .grad while the
            # two it was summed from are freed (ops.tied_sum_in_place)
            own = b.new(tied_grad)
            release(grad)
            if tied_sum_in_place(setup):
                total = lm_grad
                release(own)
            else:
                total = b.new(tied_grad)
                release(lm_grad + own)
            grads += total
        else:
            if not micro:
                # embedding / norm gradients of full fine-tuning: embedding_dense_backward makes
                # the embedding's from its incoming gradient, which goes once the node returns
                grads += b.new(cell("extra_grads"))
            if graph_leaf:           # ... and the .grad accumulated into it (ops.held_graph_leaf)
                held_prev += leaf_keys + grad
            else:
                release(grad)
        if micro:    # ... added into their .grad
            release(b.new(cell("extra_grads")))
        elif lm_grad:
            grads += b.new(cell("extra_grads"))
        if fsdp:
            release(head_grads)
            if fsdp.root_gradients:
                grads += gather([alloc(-(-fsdp.root_gradients // fsdp.gpus))], POST_BACKWARD_STREAM)
        release(rooted)
        if fsdp is not None and fsdp.offload:
            # _post_backward_final_callback -> _finalize_params -> prepare_gradient_for_optim: the
            # optimizer takes the CPU copies (_cpu_grad) and `_saved_grad_shard` goes
            release(grads)
            grads = []
        if graph_leaf == "raw":      # Granite's leaf, the raw embedding output, likewise
            held_prev += leaves
            leaves = []
        release(masks + tables + positions + leaves)
        if zero is not None:     # independent_gradient_partition_epilogue: the last bucket, the ipg buffers go
            release(grads)
            grads = []
            reduce_ipg(filled, last=True)
            release(ipg)
        if micro < micros - 1:   # gradient accumulation: no optimizer step; the .grad stay
            held_grads += grads
            grads = []
        else:
            b.place("optimizer", "")
            if zero is not None:     # step(): flatten(averaged_gradients).to(fp32); its 16-bit flat and the
                # partition's gradients go; the optimizer's state on the first step; the fp32 gradient goes
                if zero.offload:     # the step runs on the CPU; reset_cpu_buffers drops the norms
                    release(norms)
                elif z3 is not None:     # per sub-group (_prepare_fp32_grad_for_sub_group, _optimizer_step,
                    # _release_sub_group): its 16-bit flat, fp32 gradient, state on the first step
                    for n in z3.groups:
                        flat16 = b.make([const(alloc(zero.elem * n))])
                        fp32_grad = b.make([const(alloc(4 * n))])
                        release(flat16)
                        if step == 0:
                            gather([alloc(4 * n)] * len(zero.states), DEFAULT_STREAM)
                        release(fp32_grad)
                else:
                    flat16 = b.make([const(zero.part16)])
                    fp32_grad = b.make([const(zero.part32)])
                    release(flat16)
                    release(in_partition)
                    if step == 0:
                        gather(state_sizes, DEFAULT_STREAM)
                    release(fp32_grad)
            else:
                if step == 0:
                    gather(state_sizes, DEFAULT_STREAM)
                release(gather(work_sizes, DEFAULT_STREAM))
            release(held_grads + grads)
            held_grads = []
        # the estimator counts the inputs (ids, position ids, labels, rotary tables) through the
        # optimizer step (estimator.step_moments `base_acts`); they go with the loop iteration
        release(keys)
        if not setup.outputs_outlive_step:
            release(held_prev)    # `del out` at the end of the step (plain-del)
            held_prev = []
    base = [0] * slots.count
    for n, slot in slots.consts.items():
        base[slot] = n
    count_from = (next(i for i, phase, _m in b.places if phase == "forward")
                  if (fsdp is not None and fsdp.unit_params) or ddp is not None or zero is not None else None)
    return Program(b.ops, b.places, tuple(base), tuple((slot, key) for key, slot in slots.polys.items()),
                   dict(slots.cells), tape_grads, spec, static, fsdp, b.next_key, b.streams, count_from)


def _free_all(b, inst: _Instance) -> None:
    for pairs in inst.keys.values():
        b.drop(pairs)
    inst.keys.clear()


def place_of(stream: Stream, index: int) -> tuple[str, str]:
    """(phase, module) of the event at `index`."""
    phase, module = "load", ""
    for start, p, m in stream.places:
        if start > index:
            break
        phase, module = p, m
    return phase, module
