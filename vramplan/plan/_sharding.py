"""Per-GPU memory of one training step spread over several GPUs: DDP, PyTorch FSDP (FULL_SHARD,
SHARD_GRAD_OP, CPU offload) and DeepSpeed ZeRO-2 / ZeRO-3 (with offload).

Built on the single-GPU estimate: each phase of `estimate()` (its `phase_components`) is taken
apart into named terms, and each term is held one of five ways on a GPU:
- per rank: activations, logits and their temporaries (data parallel: every GPU runs its own
  micro-batch of `setup.batch` sequences, so these do not shrink with more GPUs);
- replicated: a full copy on every GPU;
- sharded 1/N: each GPU keeps ceil(bytes / N) (FSDP flat parameters are padded to a multiple
  of N: torch/distributed/fsdp/_flat_param.py FlatParamHandle._get_shard);
- gathered: unsharded on the GPU only while in use (all-gather of an FSDP unit or a ZeRO-3
  module), or a communication bucket;
- offloaded: in pinned CPU memory (reported apart as cpu_bytes, not on the GPU).
Every term cites the engine code or docs it is read from. The terms of a phase sum exactly to
its components, which sum to peak_allocated_bytes. The allocator slack above them: FSDP
full_shard replays one GPU's run (the wrap phase, then the steps with all-gathers and
reduce-scatters in their own CUDA streams: docs/allocator.md#fsdp-wrap, #fsdp-stream; with CPU
offload, #fsdp-cpu-offload; SHARD_GRAD_OP, #fsdp-shard-grad-op), DDP its stream with the Reducer's
buckets (docs/allocator.md#ddp-stream), ZeRO-2 its optimizer's flat buffer, partitions and gradient
buckets (docs/allocator.md#zero-2-stream; with offload_optimizer, #zero-2-cpu-offload), ZeRO-3
its partitions and the coordinator's all-gathers (#zero-3-stream); DDP with
gradient_as_bucket_view carries the single-GPU replay's.

The model is read for these recipes (the ones people run QLoRA with beyond one GPU):
- FSDP as in Answer.AI's fsdp_qlora train.py and accelerate's FSDP plugin: one FSDP unit per
  decoder layer (transformer_auto_wrap_policy), trainable LoRA Linear modules wrapped as their
  own units (lambda_auto_wrap_policy on `weight.requires_grad`), the embeddings, final norm and
  lm_head in the root unit, no MixedPrecision policy (parameters kept in their load dtype),
  backward_prefetch=BACKWARD_PRE and limit_all_gathers=True (the defaults); QLoRA needs
  bnb_4bit_quant_storage = the compute dtype so packed 4-bit weights flatten with the rest.
- DeepSpeed through the HF Trainer / accelerate: bf16 (or fp16) enabled, the engine's Adam
  (fused, fp32 master weights), the DeepSpeed zero_optimization defaults unless given.
"""
from __future__ import annotations

import dataclasses
from collections import Counter
from dataclasses import field
from functools import lru_cache

from vramplan.core._components import ALLOCATED_NAMES, Component, check_sum
from vramplan.core._errors import UsageError
from vramplan.core._gpus import Gpu, resolve_gpu
from vramplan.core._record import record
from vramplan.estimate._estimator import estimate, paged_resident, phase_of, smallest_card, Verdict
from vramplan.estimate._inventory import (adapted_linears, adapter_bytes, bias_bytes, embedding_bytes,
                                         expert_lora_shapes, lora_shapes, numel, optimizer_memory, static_memory,
                                         weight_bytes)
from vramplan.core._models import ModelSpec, resolve
from vramplan.estimate._quant import alloc, layout
from vramplan.core._setup import TrainSetup, apply_flags
from vramplan.core._units import MiB
from vramplan.plan._zero3 import (DS_MAX_LIVE_PARAMETERS, DS_MAX_REUSE_DISTANCE, gather_segments,
                                  gathered_at_moments, module_trace)

C = Component

STRATEGIES = ("single", "ddp", "fsdp", "fsdp_grad_op", "zero2", "zero3")
DESCRIPTIONS = {
    "single": "one GPU, no data parallelism",
    "ddp": "torch DistributedDataParallel: everything replicated, gradients all-reduced in buckets",
    "fsdp": "torch FSDP FULL_SHARD (ZeRO-3 like): parameters, gradients and optimizer state sharded",
    "fsdp_grad_op": "torch FSDP SHARD_GRAD_OP (ZeRO-2 like): parameters stay unsharded from forward to backward",
    "zero2": "DeepSpeed ZeRO-2: gradients and optimizer state partitioned, parameters replicated",
    "zero3": "DeepSpeed ZeRO-3: parameters, gradients and optimizer state partitioned",
}
_ALIASES = {"none": "single", "full_shard": "fsdp", "fsdp_full_shard": "fsdp", "fsdp-full-shard": "fsdp",
            "shard_grad_op": "fsdp_grad_op", "fsdp-grad-op": "fsdp_grad_op", "zero-2": "zero2",
            "zero_2": "zero2", "deepspeed2": "zero2", "zero-3": "zero3", "zero_3": "zero3",
            "deepspeed3": "zero3"}
OFFLOADS = ("none", "cpu")
FSDP = ("fsdp", "fsdp_grad_op")
DEEPSPEED = ("zero2", "zero3")
MAX_GPUS = 65536  # beyond any real data-parallel group: a typo

# DeepSpeed zero_optimization defaults (deepspeed/runtime/zero/config.py DeepSpeedZeroConfig):
# reduce_bucket_size 5e8 elements, stage3_prefetch_bucket_size 5e7, stage3_param_persistence_threshold
# 1e5, sub_group_size 1e9, contiguous_gradients True, overlap_comm None -> True for stage 3 only
# (validator overlap_comm_valid). The HF Trainer's "auto" values are smaller (hidden^2,
# 0.9 * hidden^2, 10 * hidden: transformers/integrations/deepspeed.py); pass them when used.
DS_REDUCE_BUCKET = 500_000_000
DS_PREFETCH_BUCKET = 50_000_000
DS_PERSISTENCE_THRESHOLD = 100_000
DS_SUB_GROUP = 1_000_000_000

# NCCL communicator buffers live outside the caching allocator (NVML sees them, torch does not).
# A model, not a derivation: NCCL_BUFFSIZE defaults to 4 MiB per channel and direction (NCCL
# environment-variable docs); 2 directions x 16 channels is assumed until per-rank profile
# records measure it.
NCCL_BYTES = 2 * 16 * 4 * MiB

# --- sources, quoted once and cited by every term that uses them ----------------------------------
SRC_PER_RANK = "data parallel: each rank runs its own micro-batch (DistributedSampler), so activations are per GPU"
SRC_DDP = ("torch DistributedDataParallel: a full replica per rank; docs of gradient_as_bucket_view: False "
           "(default) keeps reducer buckets beside the gradients, True 'saves memory equal to the total "
           "gradients size'")
SRC_FSDP_SHARD = ("torch FSDP ShardingStrategy.FULL_SHARD: 'Parameters, gradients, and optimizer states are "
                  "sharded'; each unit's FlatParameter is padded to a multiple of N (_flat_param.py)")
SRC_FSDP_GATHER = ("torch FSDP docs: BackwardPrefetch.BACKWARD_PRE (default) 'at the peak ... holds the current "
                   "set of parameters, next set of parameters, and current set of gradients'; "
                   "limit_all_gathers=True keeps at most two units unsharded in forward")
SRC_FSDP_ROOT = ("torch/distributed/fsdp/_runtime_utils.py _post_forward_reshard: 'Do not free the root's "
                 "parameters in the post-forward for FULL_SHARD' (embeddings, final norm, lm_head stay "
                 "unsharded from forward to the end of backward)")
SRC_FSDP_GRAD_OP = ("torch FSDP ShardingStrategy.SHARD_GRAD_OP: 'unshards before the forward, does not reshard "
                    "them after the forward, and only reshards them after the backward computation'")
SRC_FSDP_GRAD = ("torch/distributed/fsdp/_runtime_utils.py _post_backward_hook: a unit's unsharded gradient "
                 "exists until its reduce-scatter; the sharded gradient accumulates 1/N")
SRC_FSDP_OFFLOAD = ("torch FSDP CPUOffload(offload_params=True): 'offloads gradients to CPU as well, meaning "
                    "that the optimizer step runs on CPU'; sharded parameters live on CPU between uses")
SRC_FSDP_OFFLOAD_GRAD = ("torch/distributed/fsdp/_runtime_utils.py _accumulate_sharded_grad keeps the reduce-"
                         "scattered shard as flat_param._saved_grad_shard; _offload_grad copies it to _cpu_grad; "
                         "_flat_param.py prepare_gradient_for_optim deletes it at the end of backward")
SRC_QUANT_STATE = ("bitsandbytes Params4bit.quant_state is not an nn.Parameter, so FSDP / ZeRO never shard "
                   "it; Answer.AI fsdp_qlora train.py quantizes every layer on every rank 'to initialize "
                   "quant_state on all ranks'")
SRC_DS_CAST = ("deepspeed/runtime/engine.py _configure_distributed_model: with bf16/fp16 enabled the engine "
               "calls self.module.bfloat16()/half(), so trainable parameters and gradients are 16-bit")
SRC_DS_MASTER = ("ZeRO (Rajbhandari et al. 2020, sec. 3): fp32 master weights + optimizer moments "
                 "partitioned 1/N (stage_1_and_2.py single_partition_of_fp32_groups, stage3.py "
                 "fp32_partitioned_groups_flat)")
SRC_DS_GRAD2 = ("deepspeed/runtime/zero/stage_1_and_2.py: the reduced gradient partition (1/N, 16-bit) "
                "accumulates in averaged_gradients; step() converts it to an fp32 single_grad_partition")
SRC_DS_STEP2 = ("deepspeed/runtime/zero/stage_1_and_2.py step(): single_grad_partition = "
                "self.flatten(self.averaged_gradients[i]).to(fp32): the whole partition flattened in 16 bits, "
                "then cast to fp32, while the reduced partition (averaged_gradients) is still held")
SRC_DS_IPG2 = ("deepspeed/runtime/zero/stage_1_and_2.py backward(): contiguous_gradients allocates ipg_buffer "
               "= torch.empty(reduce_bucket_size) in the 16-bit dtype, a second one with overlap_comm")
SRC_DS_IPG3 = ("deepspeed/runtime/zero/stage3.py __init__: contiguous_gradients allocates "
               "__ipg_bucket_flat_buffer = torch.empty(reduce_bucket_size) for the whole run")
SRC_DS_GRAD3 = ("deepspeed/runtime/zero/stage3.py: grad_partitions_flat_buffer holds the 1/N gradient "
                "partition of every trainable parameter from init on; step() makes an fp32 copy per "
                "sub_group (sub_group_size 1e9 elements): _prepare_fp32_grad_for_sub_group "
                "self.flatten(averaged_gradients).to(fp32), a 16-bit flat first")
SRC_DS3_PARAMS = ("deepspeed/runtime/zero/config.py: parameters above stage3_param_persistence_threshold "
                  "(1e5 elements) are partitioned 1/N, smaller ones stay whole on every GPU")
SRC_DS3_GATHER = ("deepspeed/runtime/zero/partitioned_param_coordinator.py: each module's parameters are "
                  "all-gathered whole for its forward / backward, stage3_prefetch_bucket_size (5e7) elements "
                  "ahead are prefetched, and a parameter used again within stage3_max_reuse_distance (1e9) "
                  "elements of the trace stays gathered; the coordinator replayed over the step "
                  "(docs/allocator.md#zero-3-gathering)")
SRC_DS_FUSED = "DeepSpeed FusedAdam / DeepSpeedCPUAdam update in fused multi-tensor kernels: no per-parameter workspace"
SRC_DS_OFFLOAD2 = ("deepspeed/runtime/zero/stage_1_and_2.py with offload_optimizer: __init__ keeps "
                   "temp_grad_buffer_for_gpu_offload (the largest trainable parameter) on the GPU; "
                   "copy_grads_in_partition -> set_norm_for_param_grad_in_gpu casts each gradient slice of the "
                   "partition to fp64 for its norm (kept until reset_cpu_buffers), then "
                   "async_inplace_copy_grad_to_fp32_buffer_from_gpu casts it to fp32 for the copy to the CPU")
SRC_DS_OFFLOAD = ("DeepSpeed offload_optimizer (ZeRO 1-3): fp32 master weights, moments and the step on CPU, "
                  "gradient partitions copied to pinned CPU memory; offload_param (ZeRO-3 only): parameter "
                  "partitions on CPU")


@record
class Parallel:
    """How the step is spread: `gpus` data-parallel ranks, one engine, optional CPU offload.

    offload="cpu" means what each engine can offload: FSDP CPUOffload(offload_params=True)
    (parameters, gradients, optimizer step); ZeRO-2 offload_optimizer; ZeRO-3 offload_optimizer +
    offload_param. The DeepSpeed knobs default to DeepSpeed's own defaults."""

    gpus: int = 1
    strategy: str | None = None      # None: "single" for 1 GPU, "ddp" for more (torchrun / accelerate default)
    offload: str = "none"
    reduce_bucket_size: int = DS_REDUCE_BUCKET
    overlap_comm: bool | None = None  # DeepSpeed: None -> True for ZeRO-3, False for ZeRO-2
    prefetch_bucket_size: int = DS_PREFETCH_BUCKET
    param_persistence_threshold: int = DS_PERSISTENCE_THRESHOLD
    max_live_parameters: int = DS_MAX_LIVE_PARAMETERS
    max_reuse_distance: int = DS_MAX_REUSE_DISTANCE
    gradient_as_bucket_view: bool = False  # DDP

    def __post_init__(self):
        gpus = self.gpus
        if isinstance(gpus, bool) or not isinstance(gpus, int):
            raise UsageError(f"--gpus must be a whole number, got {gpus!r}", hint="e.g. --gpus 2")
        if gpus <= 0:
            raise UsageError(f"--gpus must be positive, got {gpus}", hint="e.g. --gpus 2")
        if gpus > MAX_GPUS:
            raise UsageError(f"--gpus {gpus} is beyond any real run (max {MAX_GPUS})", hint="check the value of --gpus")
        strategy = self.strategy
        if strategy is None:
            strategy = "single" if gpus == 1 else "ddp"
        key = str(strategy).strip().lower()
        key = _ALIASES.get(key, _ALIASES.get(key.replace("-", "_"), key))
        if key not in STRATEGIES:
            raise UsageError(f"unknown strategy {strategy!r}", hint=f"--strategy takes one of: {', '.join(STRATEGIES)}")
        if key == "single" and gpus > 1:
            raise UsageError(f"--strategy single cannot use {gpus} GPUs",
                             hint="use --strategy ddp, fsdp, fsdp_grad_op, zero2 or zero3")
        offload = str(self.offload).strip().lower()
        if offload not in OFFLOADS:
            raise UsageError(f"unknown offload {self.offload!r}", hint=f"--offload takes one of: {', '.join(OFFLOADS)}")
        if offload != "none" and key in ("single", "ddp"):
            raise UsageError(f"--offload {offload} needs a sharding engine, not {key}",
                             hint="use --strategy fsdp, zero2 or zero3 with --offload cpu")
        for name in ("reduce_bucket_size", "prefetch_bucket_size", "param_persistence_threshold",
                     "max_live_parameters", "max_reuse_distance"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise UsageError(f"{name} must be a whole number >= 0, got {value!r}", hint=f"e.g. {name}=0")
        object.__setattr__(self, "strategy", key)
        object.__setattr__(self, "offload", offload)

    @property
    def offloaded(self) -> bool:
        return self.offload != "none"

    @property
    def deepspeed(self) -> bool:
        return self.strategy in DEEPSPEED

    @property
    def ds_overlap_comm(self) -> bool:
        return self.strategy == "zero3" if self.overlap_comm is None else self.overlap_comm

    @property
    def label(self) -> str:
        s = "1 GPU" if self.strategy == "single" else f"{self.gpus} x {self.strategy}"
        return s + (" + CPU offload" if self.offloaded else "")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["description"] = DESCRIPTIONS[self.strategy]
        return d


def parallel_of(gpus: int = 1, strategy: str | None = None, offload: str = "none",
                parallel: Parallel | None = None) -> Parallel:
    """The Parallel a caller means: an explicit one, or built from the three CLI-like values."""
    if parallel is not None:
        if not isinstance(parallel, Parallel):
            raise UsageError(f"parallel must be a vramplan.plan._sharding.Parallel, got {type(parallel).__name__}",
                             hint="e.g. Parallel(gpus=2, strategy='fsdp')")
        return parallel
    return Parallel(gpus=gpus, strategy=strategy, offload=offload)


def accumulation_modelled(parallel: Parallel) -> bool:
    """Whether gradient accumulation (TrainSetup.grad_accum) is modelled under `parallel`: on one
    GPU, and under DDP with gradient_as_bucket_view=False (the default), whose micro-steps before
    the last run under `no_sync()` (HF Trainer / accelerate `accumulate`): the Reducer's autograd
    hooks return at once (reducer.cpp `autograd_hook`: `if (!expect_autograd_hooks_) return;`,
    set only by `prepare_for_backward` when `require_backward_grad_sync`), so those micro-steps
    are the single GPU's beside the buckets, and the last one copies each accumulated .grad into
    its bucket in place (`mark_variable_ready_dense`: `at::mul_out(bucket_view, grad, ...)`), as
    without accumulation (docs/allocator.md#ddp-stream). Each other engine accumulates its own
    way (gradient_as_bucket_view's .grad outside the buckets until the last micro-step, FSDP's
    unsharded gradients under no_sync, ZeRO's averaged_gradients partitions): not modelled."""
    return parallel.strategy == "single" or (parallel.strategy == "ddp" and not parallel.gradient_as_bucket_view)


def one_gpu_fsdp_modelled(setup: TrainSetup, parallel: Parallel) -> bool:
    """Whether FSDP on one GPU is modelled. torch runs it as NO_SHARD whatever was asked
    (torch/distributed/fsdp/_init_utils.py `_init_core_state`: `if state.world_size == 1:`
    ... `sharding_strategy = ShardingStrategy.NO_SHARD`). Without offload NO_SHARD computes in the
    flat parameters themselves, where FULL_SHARD's model adds each unit's gathered copy beside its
    shard: not that. With CPUOffload(offload_params=True) each unit's flat parameter is copied to
    the GPU for its forward and backward (_flat_param.py `pre_unshard`: `flat_param_to(self.device)`)
    and dropped as it reshards (`_use_sharded_flat_param`: `flat_param.data = flat_param._local_shard`),
    which frees the copy only where no saved tensor views it: under gradient checkpointing, where
    a layer's forward saves nothing; without it the copies of every layer live until its backward.
    SHARD_GRAD_OP's model keeps units gathered after the forward, which NO_SHARD with offload does not."""
    return parallel.strategy == "fsdp" and parallel.offloaded and setup.grad_ckpt


def effective_setup(setup: TrainSetup, parallel: Parallel) -> TrainSetup:
    """The setup as the engine runs it. DeepSpeed with bf16/fp16 casts the whole module to the
    16-bit dtype (engine.py _configure_distributed_model), undoing prepare_model_for_kbit_training's
    fp32 cast of embeddings, norms and lm_head."""
    if setup.accumulates and not accumulation_modelled(parallel):
        engine = "DDP with gradient_as_bucket_view" if parallel.strategy == "ddp" else parallel.strategy
        raise UsageError(f"--grad-accum {setup.grad_accum} is modelled on one GPU and under DDP, not under {engine}",
                         hint="drop --grad-accum (the peak of one micro-step), or plan one GPU or DDP")
    if parallel.strategy in FSDP and parallel.gpus == 1 and not one_gpu_fsdp_modelled(setup, parallel):
        raise UsageError("FSDP on one GPU runs as NO_SHARD (torch clamps the strategy at a world size of 1), "
                         "modelled only as --strategy fsdp with --offload cpu and gradient checkpointing",
                         hint="plan one GPU without --strategy, or use --gpus 2 or more")
    if parallel.deepspeed and setup.prepare_kbit and setup.dtype != "fp32":
        return setup.with_(prepare_kbit=False)
    return setup


# --- static memory taken apart: one decoder layer (an FSDP unit) and the root -----------------------

@record
class Splits:
    """Static bytes split the way engines hold them (all from inventory.static_memory)."""
    weights: int
    quant_constants: int
    adapters: int
    gradients: int
    optimizer_state: int           # device or paged: what an engine partitions
    unit_weights: int              # one decoder layer = one FSDP unit (transformer_auto_wrap_policy):
    unit_adapters: int             # the largest one where layers differ (MoE / dense)
    unit_gradients: int
    root_weights: int              # embeddings, final norm, lm_head, rotary buffer (the root unit)
    root_adapters: int
    root_gradients: int
    layers: int                    # decoder layers: FSDP units besides the root
    persistent_weights: int        # ZeRO-3: parameters at or under param_persistence_threshold
    # DeepSpeed view of the trainable parameters (16-bit after the engine's cast)
    ds_trainable: int              # trainable parameters in the DeepSpeed dtype
    ds_trainable_persistent: int   # of which small enough to stay whole under ZeRO-3
                                   # (their gradients: same shapes and dtype, so the same bytes)
    ds_master: int                 # fp32 master copies
    ds_optimizer: int              # optimizer moments for fp32 master weights
    ds_elem: int                   # bytes per element of the 16-bit (or fp32) training dtype
    trainable_params: int
    # per decoder layer, bottom to top: (weights, adapters, gradients) of its FSDP unit
    layer_units: tuple[tuple[int, int, int], ...] = ()


def _static_of(spec: ModelSpec, setup: TrainSetup, dense: int, moe: int):
    """Static memory of the model with `dense` dense and `moe` MoE decoder layers (the dense ones
    below, as DeepSeek-V3's first_k_dense_replace: per-layer bytes do not depend on the order)."""
    return static_memory(dataclasses.replace(spec, layers=dense + moe, dense_layers=dense, dense_flags=()), setup)


def _units(spec: ModelSpec, setup: TrainSetup) -> dict[bool, tuple[int, int, int]]:
    """(weights, adapters, gradients) of one decoder layer of each kind the model has, keyed by
    ModelSpec.is_dense: static memory with one more layer of that kind, less without it. Llama 4
    (Maverick: MoE and dense layers alternate, ModelSpec.dense_flags) and DeepSeek-V3 (dense layers
    below first_k_dense_replace) have two kinds; every other model one (is_dense False)."""
    moe = 1 if spec.moe_layers else 0
    kinds = {spec.is_dense(i) for i in range(spec.layers)}
    out = {}
    for dense in kinds:
        d = 1 if spec.dense_layers and not dense else 0   # the other kind held at one layer
        m = moe if dense else 0
        one, two = ((_static_of(spec, setup, 1 + d, m), _static_of(spec, setup, 2 + d, m)) if dense else
                    (_static_of(spec, setup, d, 1), _static_of(spec, setup, d, 2)))
        out[dense] = (two.weights - one.weights, two.adapters - one.adapters, two.gradients - one.gradients)
    return out


@lru_cache(maxsize=512)
def splits(spec: ModelSpec, setup: TrainSetup, persistence_threshold: int = DS_PERSISTENCE_THRESHOLD) -> Splits:
    """One layer's static bytes are S(2 layers) - S(1 layer); the root is S(L) - L * layer.
    Depends on neither batch nor seq, so callers pass a setup with those fixed."""
    full = static_memory(spec, setup)
    # Every decoder layer is an FSDP unit of its own, whatever its kind: Llama 4's dense layers
    # between MoE ones and DeepSeek-V3's dense first layers are sharded like the MoE layers
    kinds = _units(spec, setup)
    units = tuple(kinds[spec.is_dense(i)] for i in range(spec.layers))
    unit_w, unit_a, unit_g = max(kinds.values(), key=lambda u: (u[0] + u[1], u[2]))
    L = spec.layers
    optimizer = full.optimizer_state + full.paged_optimizer_state
    wb = 4 if setup.prepare_kbit else setup.compute_bytes
    # Norm weights (hidden elements) and biases are under the ZeRO-3 persistence threshold.
    small = [(spec.hidden, spec.layers * spec.arch.norms_per_layer + 1)]
    small += [(lin.out_features, spec.count(lin)) for lin in spec.layer_linears if lin.bias]
    persistent = sum(k * alloc(n * wb) for n, k in small if n <= persistence_threshold)
    # DeepSpeed trains the trainable parameters in the engine dtype, with fp32 masters.
    ds_elem = 4 if setup.dtype == "fp32" else setup.compute_bytes
    shapes = Counter(dict(full.trainable_shapes))
    ds_trainable = sum(k * alloc(numel(s) * ds_elem) for s, k in shapes.items())
    ds_persistent = sum(k * alloc(numel(s) * ds_elem) for s, k in shapes.items()
                        if numel(s) <= persistence_threshold)
    master = sum(k * alloc(numel(s) * 4) for s, k in shapes.items())
    ds_optimizer, _ = optimizer_memory(setup, shapes, 4)
    return Splits(
        weights=full.weights, quant_constants=full.quant_constants, adapters=full.adapters,
        gradients=full.gradients, optimizer_state=optimizer,
        unit_weights=unit_w, unit_adapters=unit_a, unit_gradients=unit_g,
        root_weights=full.weights - sum(u[0] for u in units), root_adapters=full.adapters - sum(u[1] for u in units),
        root_gradients=full.gradients - sum(u[2] for u in units), layers=L,
        persistent_weights=persistent,
        ds_trainable=ds_trainable, ds_trainable_persistent=ds_persistent,
        ds_master=master, ds_optimizer=ds_optimizer, ds_elem=ds_elem,
        trainable_params=full.trainable_params, layer_units=units,
    )


def splits_for(spec: ModelSpec, setup: TrainSetup, parallel: Parallel) -> Splits:
    return splits(spec, setup.with_(batch=1, seq=1), parallel.param_persistence_threshold)


# --- the per-GPU result ----------------------------------------------------------------------------

@record
class Term:
    """One named part of a component on one GPU, and how the engine holds it."""
    component: str
    part: str
    held: str       # "per rank", "replicated", "sharded 1/N", "gathered", "bucket", "on this GPU"
    bytes: int
    source: str

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@record
class ShardedEstimate(Verdict):
    """Per-GPU memory under a Parallel. Same shape as Estimate where it can be: components sum to
    peak_allocated_bytes; device_total_bytes adds CUDA context, NCCL buffers and allocator slack."""
    model: ModelSpec
    setup: TrainSetup
    parallel: Parallel
    components: dict
    peak_allocated_bytes: int
    peak_phase: str
    phase_peaks: dict
    terms: tuple            # Terms at the peak phase; they sum to peak_allocated_bytes
    cuda_context_bytes: int
    comm_bytes: int         # NCCL buffers (a model), outside the caching allocator
    allocator_overhead_bytes: int
    cpu_bytes: int          # pinned host memory per rank for what is offloaded
    paged_optimizer_bytes: int
    trainable_params: int
    assumptions: tuple
    gpu: Gpu | None = None
    phase_components: dict = field(default_factory=dict, repr=False)
    allocator_oom: dict | None = None   # the single-GPU replay's failed request (estimate's), if any
    alloc_conf: str = ""
    paged_resident_bytes: int = 0        # this GPU's paged state NVML counts (estimator.paged_resident)
    fragmentation_bytes: int = 0         # the replay's peak reserved - the most allocated at that peak

    @property
    def device_total_bytes(self) -> int:
        return (self.peak_allocated_bytes + self.cuda_context_bytes + self.comm_bytes + self.allocator_overhead_bytes
                + self.paged_resident_bytes)

    @property
    def reserved_bytes(self) -> int:
        """What torch.cuda.max_memory_reserved would report: allocated plus caching-allocator slack."""
        return self.peak_allocated_bytes + self.allocator_overhead_bytes


    def with_gpu(self, gpu: Gpu | None) -> "ShardedEstimate":
        # a replay's OOM holds for the card it was replayed against only; how much paged state stays
        # resident depends on the card's room
        rest = self.device_total_bytes - self.paged_resident_bytes
        return dataclasses.replace(self, gpu=gpu, allocator_oom=self.allocator_oom if gpu == self.gpu else None,
                                   paged_resident_bytes=paged_resident(self.paged_optimizer_bytes, gpu, rest))

    def to_dict(self) -> dict:
        return {
            "model": self.model.to_dict(),
            "setup": self.setup.to_dict(),
            "parallel": self.parallel.to_dict(),
            "gpu": self.gpu.to_dict() if self.gpu else None,
            "fits": self.fits,
            "headroom_bytes": self.headroom_bytes,
            "peak_allocated_bytes": self.peak_allocated_bytes,
            "peak_reserved_bytes": self.reserved_bytes,
            "fragmentation_bytes": self.fragmentation_bytes,
            "alloc_conf": self.alloc_conf,
            "allocator_oom": self.allocator_oom,
            "device_total_bytes": self.device_total_bytes,
            "status": self.status,
            "peak_phase": self.peak_phase,
            "components": dict(self.components),
            "device_components": {C.CUDA_CONTEXT.value: self.cuda_context_bytes + self.comm_bytes,
                                  C.ALLOCATOR_OVERHEAD.value: self.allocator_overhead_bytes,
                                  C.PAGED_OPTIMIZER.value: self.paged_resident_bytes},
            "nccl_bytes": self.comm_bytes,
            "phase_peaks": dict(self.phase_peaks),
            "terms": [t.to_dict() for t in self.terms],
            "cpu_bytes": self.cpu_bytes,
            "paged_optimizer_bytes": self.paged_optimizer_bytes,
            "trainable_params": self.trainable_params,
            "assumptions": list(self.assumptions),
        }


def _ceil_div(n: int, d: int) -> int:
    return -(-n // d)


def per_gpu(model: str | ModelSpec, setup: TrainSetup | None = None, parallel: Parallel | None = None,
            gpu: str | int | Gpu | None = None, *, gpus: int = 1, strategy: str | None = None,
            offload: str = "none", alloc_conf=None, **flags) -> ShardedEstimate:
    """Per-GPU memory of `setup` under `parallel` (or gpus/strategy/offload); `alloc_conf`:
    PYTORCH_CUDA_ALLOC_CONF settings for the caching-allocator replay (None: the environment's)."""

    spec = model if isinstance(model, ModelSpec) else resolve(model)
    par = parallel_of(gpus, strategy, offload, parallel)
    setup = apply_flags(setup, flags)  # flags the caller gave must apply to the method
    run = effective_setup(setup, par)
    gpu_obj = resolve_gpu(gpu) if gpu is not None else None
    base = base_estimate(spec, run, par, gpu_obj, alloc_conf)   # the GPU's CUDA kernels (cuda/_arch.py)
    return distribute(base, par, gpu=gpu_obj)


def smallest_per_gpu(spec: ModelSpec, setup: TrainSetup, parallel: Parallel, gpu: Gpu, alloc_conf=None) -> int | None:
    """Where `setup` spread over `parallel` does not fit `gpu`: the smallest GPU memory on which
    one GPU's own stream runs (FSDP, DDP, ZeRO-2, ZeRO-3: their replays against cards of other sizes,
    estimator.smallest_card). None where it fits, and for the engines that carry the single-GPU
    replay's slack."""
    if not replays_own_stream(parallel):
        return None
    base = base_estimate(spec, effective_setup(setup, parallel), parallel, gpu, alloc_conf)
    sp = splits_for(spec, base.setup, parallel)
    est = distribute(base, parallel, gpu=gpu, split=sp)
    if est.status != "no":
        return None
    peak, fixed = est.peak_allocated_bytes, est.cuda_context_bytes + est.comm_bytes
    slack_of = own_stream_slack(parallel)

    def runs(card: int) -> bool:
        slack, oom, _fragmentation = slack_of(base, sp, parallel, peak, card - fixed, need=False)
        return oom is None and peak + fixed + slack <= card
    return smallest_card(runs, peak + fixed, peak + fixed + est.allocator_overhead_bytes)


def replays_own_stream(parallel: Parallel) -> bool:
    """FSDP (full_shard or SHARD_GRAD_OP, with or without CPU offload), ZeRO-2 (with or without
    offload_optimizer), ZeRO-3 (with or without offload), and DDP without gradient_as_bucket_view replay
    one GPU's own allocation stream for their allocator slack (fsdp_slack, zero_slack,
    ddp_slack); the other engines carry the single-GPU replay's slack."""
    if parallel.gpus < 2:
        return False
    return (parallel.strategy in FSDP or parallel.strategy in ("zero2", "zero3")
            or (parallel.strategy == "ddp" and not parallel.gradient_as_bucket_view))


def own_stream_slack(parallel: Parallel):
    """The replay of one GPU's own stream for an engine that has one (replays_own_stream)."""
    return {"fsdp": fsdp_slack, "fsdp_grad_op": fsdp_slack, "ddp": ddp_slack, "zero2": zero_slack,
            "zero3": zero_slack}[parallel.strategy]


def base_estimate(spec: ModelSpec, run: TrainSetup, parallel: Parallel, gpu: Gpu | None, alloc_conf=None,
                  static=None):
    """The single-GPU estimate `distribute` spreads over `parallel` (`run`: effective_setup).
    Where the engine replays its own stream (replays_own_stream), nothing of the single-GPU
    replay reaches the per-GPU result (distribute takes the slack from fsdp_slack, and no
    single-GPU OOM for a spread run), so it is not run; the settings are recorded as it would."""
    if not replays_own_stream(parallel):
        # the planner's grids and sweeps show the device total: no smallest-card search per setup
        return estimate(spec, run, gpu=gpu, static=static, alloc_conf=alloc_conf, smallest=False)
    from vramplan.estimate._reserved import conf_of

    conf = conf_of(alloc_conf)      # refuses bad settings as the replay would
    return dataclasses.replace(estimate(spec, run, gpu=gpu, static=static, replay=False), alloc_conf=conf.text)


def distribute(base, parallel: Parallel, gpu: Gpu | None = None, split: Splits | None = None,
               replay: bool = True, need: bool = True) -> ShardedEstimate:
    """Spread a single-GPU estimate (an Estimate, or anything with its model, setup,
    phase_components (and moments, when it has them), cuda_context_bytes,
    allocator_overhead_bytes, paged_optimizer_bytes and trainable_params) over `parallel`. FSDP,
    ZeRO-2, ZeRO-3 and DDP replay one GPU's own allocation stream for their allocator
    slack (`fsdp_slack`, `zero_slack`, `ddp_slack`, unless `replay` is False), against `gpu` when
    given (need=False: after an allocator OOM against it, the unlimited replay is not run:
    estimator.card_replay); other engines carry the single-GPU replay's slack."""
    spec, setup = base.model, base.setup
    sp = split or splits_for(spec, setup, parallel)
    phases: dict[str, dict[str, int]] = {}
    phase_terms: dict[str, tuple[Term, ...]] = {}
    cpu = 0
    # Every candidate moment of the single-GPU step, not only each phase's largest: what a moment
    # gathers differs (a loss moment holds the root unit, a layer moment two decoder units and the
    # current unit's unsharded gradients too), so another moment of a phase can be its per-GPU peak
    # (Llama-2-7B LoRA 4 x 2048, 2-way FSDP: backward's top layer, not its loss, by 0.45 GiB).
    moments = getattr(base, "moments", None) or base.phase_components
    gathered = _zero3_gathered(spec, setup, sp, parallel) if parallel.strategy == "zero3" else {}
    offload = (zero2_offload(spec, setup.with_(batch=1, seq=1), sp, parallel)
               if parallel.strategy == "zero2" and parallel.offloaded and parallel.gpus > 1 else None)
    for moment, comps in moments.items():
        name = phase_of(moment)
        at = gathered.get(moment) or max((v for k, v in gathered.items() if phase_of(k) == name), key=sum,
                                         default=(0, 0))
        terms, cpu_phase = _phase_terms(name, comps, sp, parallel, at, offload)
        parts = dict.fromkeys(ALLOCATED_NAMES, 0)
        for t in terms:
            parts[t.component] += t.bytes
        cpu = max(cpu, cpu_phase)
        if name not in phases or sum(parts.values()) > sum(phases[name].values()):
            phases[name], phase_terms[name] = parts, tuple(t for t in terms if t.bytes)
    peak_phase = max(phases, key=lambda p: sum(phases[p].values()))
    components = phases[peak_phase]
    peak = sum(components.values())
    check_sum(components, peak)
    spread = parallel.strategy != "single" and parallel.gpus > 1
    slack = base.allocator_overhead_bytes
    # peak reserved - the most allocated at that peak: the replay's, as estimate reports it (a replay
    # that was not run, replay=False, has none: its slack stands in, as estimate's does)
    fragmentation = getattr(base, "fragmentation_bytes", slack)
    paged = _paged(base.paged_optimizer_bytes, parallel)
    comm = NCCL_BYTES if spread else 0
    # one GPU: the replay's allocator OOM against this card stands; a spread run's is its own
    # stream's. One GPU with CPU offload holds its weights (and optimizer) on the CPU, which the
    # single-GPU stream holds on the device: that stream's OOM is not this run's.
    oom = None if spread or gpu is None or parallel.offloaded else getattr(base, "allocator_oom", None)
    if replay and replays_own_stream(parallel) and hasattr(base, "cuda_arch"):
        room = None if gpu is None else gpu.memory_bytes - base.cuda_context_bytes - comm
        slack_of = own_stream_slack(parallel)
        slack, oom, fragmentation = slack_of(base, sp, parallel, peak, room, need)
    resident = paged_resident(paged, gpu, peak + base.cuda_context_bytes + comm + slack)
    return ShardedEstimate(
        model=spec, setup=setup, parallel=parallel, components=components, peak_allocated_bytes=peak,
        peak_phase=peak_phase, phase_peaks={p: sum(c.values()) for p, c in phases.items()},
        terms=phase_terms[peak_phase], cuda_context_bytes=base.cuda_context_bytes,
        comm_bytes=comm, allocator_overhead_bytes=slack, fragmentation_bytes=fragmentation,
        cpu_bytes=cpu, paged_optimizer_bytes=paged, paged_resident_bytes=resident,
        trainable_params=base.trainable_params, assumptions=assumptions(spec, setup, parallel), gpu=gpu,
        phase_components=phases,
        allocator_oom=oom,
        alloc_conf=getattr(base, "alloc_conf", ""),
    )


def _exact(sizes: list, total: int) -> tuple:
    """`sizes` made to sum to `total`: what they miss is one more parameter (rotary buffers, MoE
    stacks...); where they pass it, the total as one parameter."""
    rest = total - sum(sizes)
    if rest < 0:
        return (total,) if total else ()
    return tuple(sizes + ([rest] if rest else []))


@lru_cache(maxsize=256)
def unit_params(spec: ModelSpec, setup: TrainSetup, sp: Splits) -> tuple[tuple, tuple]:
    """(each decoder unit's, the root unit's) parameters as FSDP flattens them, in module order, one
    size each (the wrap phase, estimate/_events.py wrap_unit): each Linear's weight (the packed
    4-bit storage when quantized, _quant.layout; quant_state is not a parameter) and bias, then the
    layer's norms; the root: embed_tokens, the final norm, lm_head (untied). What the inventory
    counts beyond them (buffers, MoE stacks) is one more parameter of the unit. Dense and MoE
    layers (ModelSpec.is_dense) have their own Linears (core/_models.py Linear.where)."""
    kinds = {dense: _frozen_params(spec, setup, dense) for dense in {spec.is_dense(i) for i in range(spec.layers)}}
    layers = tuple(_exact(kinds[spec.is_dense(i)], sp.layer_units[i][0]) for i in range(spec.layers))
    return layers, _exact(_root_params(spec, setup), sp.root_weights)


def _frozen_params(spec: ModelSpec, setup: TrainSetup, dense: bool = False) -> list:
    """One decoder layer's parameters (of the dense or the other kind) before unit_params makes
    them sum to the inventory's."""
    wb = weight_bytes(setup)
    skip = "moe" if dense else "dense"
    layer = []
    for lin in spec.layer_linears:
        if lin.where == skip:
            continue
        layer.append(layout(setup.quant, lin.in_features, lin.out_features, setup.double_quant).weight
                     if setup.quantized else alloc(lin.numel * wb))
        if lin.bias:
            layer.append(alloc(lin.out_features * bias_bytes(setup)))
    return layer + [alloc(spec.hidden * wb)] * spec.arch.norms_per_layer


def _root_params(spec: ModelSpec, setup: TrainSetup) -> list:
    """The root unit's parameters: embed_tokens, the final norm, lm_head (untied)."""
    eb = embedding_bytes(setup)
    root = [alloc(spec.vocab * spec.hidden * eb), alloc(spec.hidden * weight_bytes(setup))]
    if not spec.tied:
        root.append(alloc(spec.vocab * spec.hidden * eb))
    return root


def replay_slack(r, peak: int) -> int:
    """What the device total adds to the per-GPU peak allocated `peak` (the terms'): the replay's
    peak reserved less it, so the device total is the replay's reserved, as on one GPU
    (estimator.estimate). The replay's own peak allocated can pass the terms' (blocks keeping
    their un-split remainders; an offloaded unit's H2D shard copy beside two gathered units at
    the start of a layer's backward, docs/allocator.md#fsdp-cpu-offload); without `peak`, that."""
    return max(0, r.peak_reserved_bytes - (peak or r.peak_allocated_bytes))


def fsdp_shards(spec: ModelSpec, setup: TrainSetup, sp: Splits, parallel: Parallel):
    """What one GPU of `parallel` (an FSDP strategy) holds, for its replay: events.FsdpShards."""
    from vramplan.estimate._events import FsdpShards

    layers, root = unit_params(spec, setup, sp)
    return FsdpShards(parallel.gpus, sp.layer_units, sp.root_weights, sp.root_adapters, sp.root_gradients,
                      sp.quant_constants, layers, root, offload=parallel.offloaded,
                      reshard_after_forward=parallel.strategy == "fsdp")


def fsdp_slack(base, sp: Splits, parallel: Parallel, peak: int = 0, room: int | None = None,
               need: bool = True) -> tuple[int, dict | None, int]:
    """(the replay's peak reserved above `peak`, replay_slack; the allocator OOM against the card
    or None; the replay's fragmentation_bytes) of one GPU's FSDP run (full_shard or SHARD_GRAD_OP), replayed through the caching-allocator model:
    FSDP(model)'s wrap phase, then two steps (estimate/_events.py FsdpShards,
    docs/allocator.md#fsdp-wrap, #fsdp-stream, #fsdp-shard-grad-op and, offloaded,
    #fsdp-cpu-offload). Allocated is counted from the first step on (train.py resets the peak
    statistics before its loop); reserved never falls, so its peak includes the wrap phase's
    cache. `room`: what the card leaves the allocator (None: no card); past it, malloc releases
    the cache and retries, as on one GPU (estimator.card_replay, docs/allocator.md#verdict);
    `peak`: the per-GPU peak allocated bytes; `need`: card_replay's."""
    from vramplan.estimate._estimator import card_replay

    spec, setup = base.model, base.setup
    r, _conf, oom, _retries = card_replay(spec, setup, static_memory(spec, setup), base.cuda_arch, base.alloc_conf,
                                          peak, room, need, fsdp=fsdp_shards(spec, setup, sp, parallel))
    return replay_slack(r, peak), oom, r.fragmentation_bytes


def trainable_numels(spec: ModelSpec, setup: TrainSetup) -> list[int]:
    """The trainable parameters' elements in module order (model.parameters(), what DDP's Reducer
    and DeepSpeed's flat buffer see): per decoder layer each adapted Linear's lora_A, lora_B
    (inventory.lora_shapes) and the experts' LoRA tensors, then lm_head's; full fine-tuning:
    embeddings, each layer's Linears (weight, bias) and norms, final norm, lm_head (untied)."""
    if setup.uses_adapters:
        layer, head = [], []
        for lin in adapted_linears(spec, setup):
            (head if lin.name == "lm_head" else layer).extend(numel(shape) for shape in lora_shapes(lin, setup.rank))
        for shape, count in expert_lora_shapes(spec, setup):
            layer += [numel(shape)] * count
        return layer * spec.layers + head
    out = [spec.vocab * spec.hidden]
    for i in range(spec.layers):
        skip = "moe" if spec.is_dense(i) else "dense"
        for lin in spec.layer_linears:
            if lin.where != skip:
                out += [lin.numel] + ([lin.out_features] if lin.bias else [])
        out += [spec.hidden] * spec.arch.norms_per_layer
    out.append(spec.hidden)
    return out if spec.tied else out + [spec.vocab * spec.hidden]


def ddp_trainable(spec: ModelSpec, setup: TrainSetup, sp: Splits) -> tuple:
    """The trainable parameters' bytes in module order, one size each (their gradients, the
    Reducer's bucket contents): trainable_numels; full fine-tuning as unit_params lays each
    layer's weights out. What this list misses of the inventory's gradients is one more parameter
    at the end."""
    if setup.uses_adapters:
        ab = adapter_bytes(setup)
        return _exact([alloc(n * ab) for n in trainable_numels(spec, setup)], sp.gradients)
    root = _root_params(spec, setup)
    layers = [p for i in range(spec.layers) for p in _frozen_params(spec, setup, spec.is_dense(i))]
    return _exact(root[:1] + layers + root[1:], sp.gradients)


def ddp_slack(base, sp: Splits, parallel: Parallel, peak: int = 0, room: int | None = None,
              need: bool = True) -> tuple[int, dict | None, int]:
    """fsdp_slack for one GPU of DDP (gradient_as_bucket_view=False): the single-GPU stream, with
    DDP's construction (module-state broadcast, the Reducer's buckets) after the model is loaded
    and the buckets rebuilt in the forward after the first optimizer step (estimate/_events.py DdpBuckets,
    docs/allocator.md#ddp-stream)."""
    from vramplan.estimate._estimator import card_replay
    from vramplan.estimate._events import ddp_buckets

    spec, setup = base.model, base.setup
    layers, root = unit_params(spec, setup, sp)
    states = list(root[:1]) + [p for i, params in enumerate(layers)
                               for p in (*params, *([sp.layer_units[i][1]] if sp.layer_units[i][1] else []))] \
        + list(root[1:]) + ([sp.root_adapters] if sp.root_adapters else [])
    buckets = ddp_buckets(states, ddp_trainable(spec, setup, sp))
    r, _conf, oom, _retries = card_replay(spec, setup, static_memory(spec, setup), base.cuda_arch, base.alloc_conf,
                                          peak, room, need, ddp=buckets)
    return replay_slack(r, peak), oom, r.fragmentation_bytes


def zero_partitions(spec: ModelSpec, setup: TrainSetup, sp: Splits, parallel: Parallel) -> "ZeroPartitions":
    """events.ZeroPartitions of one GPU (deepspeed/runtime/zero/stage_1_and_2.py): the trainable
    elements E flattened and padded to a multiple of nccl_start_alignment_factor (2) x N
    (flatten_dense_tensors_aligned), partitions of 1/N of that (get_data_parallel_partitions);
    ipg buffers of reduce_bucket_size elements (backward); the optimizer's state tensors as many
    partition-size fp32 tensors as the engine's optimizer keeps per fp32 master element (Adam: 2)."""
    from vramplan.estimate._events import ZeroPartitions

    setup = setup.with_(batch=1, seq=1)      # none of it depends on batch x seq: one per structure
    if parallel.strategy == "zero3":
        return zero3_partitions(spec, setup, sp, parallel)
    N, elem = parallel.gpus, sp.ds_elem
    _E, flat_elems, part = _flat_partition(spec, setup, N)
    layer, head = _grads_per_layer(spec, setup)
    states = round(sp.ds_optimizer / sp.ds_master) if sp.ds_master else 0
    if not parallel.offloaded:
        return ZeroPartitions(N, alloc(flat_elems * elem), alloc(part * elem), alloc(part * 4),
                              alloc(parallel.reduce_bucket_size * elem), 2 if parallel.ds_overlap_comm else 1,
                              layer * elem, head * elem, (alloc(part * 4),) * states, parallel.ds_overlap_comm)
    # offload_optimizer: the fp32 partition, its gradient and the optimizer's state live on the CPU;
    # what stays on the GPU is the staging buffer of the largest trainable parameter
    # (temp_grad_buffer_for_gpu_offload) and, per parameter slice of the partition reduced, the
    # gradient-norm and fp32 copies of copy_grads_in_partition. The rank modelled is the last: its
    # partition (the top of the model) is reduced first, while backward still holds most activations.
    staging, slices = zero2_offload(spec, setup, sp, parallel)
    return ZeroPartitions(N, alloc(flat_elems * elem), alloc(part * elem), 0,
                          alloc(parallel.reduce_bucket_size * elem), 2 if parallel.ds_overlap_comm else 1,
                          layer * elem, head * elem, (), parallel.ds_overlap_comm,
                          offload=True, staging=staging, elem=elem, slices=slices)


def _flat_partition(spec: ModelSpec, setup: TrainSetup, gpus: int) -> tuple[int, int, int]:
    """ZeRO-2's flat buffer (stage_1_and_2.py): (trainable elements E, E padded to a multiple of
    nccl_start_alignment_factor (2) x N (flatten_dense_tensors_aligned), one rank's partition of
    it (get_data_parallel_partitions))."""
    E = sum(numel(shape) * k for shape, k in static_memory(spec, setup).trainable_shapes)
    flat = -(-E // (2 * gpus)) * 2 * gpus
    return E, flat, flat // gpus


def _grads_per_layer(spec: ModelSpec, setup: TrainSetup) -> tuple[int, int]:
    """(elements of trainable gradients one decoder layer makes, those the head makes): how fast
    backward fills DeepSpeed's gradient bucket."""
    if setup.uses_adapters:
        layer, head = 0, 0
        for lin in adapted_linears(spec, setup):
            n = sum(numel(shape) for shape in lora_shapes(lin, setup.rank))
            if lin.name == "lm_head":
                head += n
            else:
                layer += n * spec.count(lin) // max(1, spec.layers)
        return layer + sum(numel(shape) * count for shape, count in expert_lora_shapes(spec, setup)), head
    layer = (sum(lin.numel for lin in spec.layer_linears if lin.where != "dense")
             + spec.hidden * spec.arch.norms_per_layer)
    return layer, 0 if spec.tied else spec.vocab * spec.hidden


@lru_cache(maxsize=64)
def zero3_partitions(spec: ModelSpec, setup: TrainSetup, sp: Splits, parallel: Parallel) -> "ZeroPartitions":
    """events.ZeroPartitions of one GPU of ZeRO-3 (deepspeed/runtime/zero/stage3.py,
    partition_parameters.py; docs/allocator.md#zero-3-stream), from the parameters as DeepSpeed's
    coordinator sees them (plan/_zero3.py step_trace): each partition is ceil(numel / N) elements
    (Init._partition_param, aligned to N); the bitsandbytes constants and buffers are not
    parameters and stay whole; the optimizer keeps its partitions in one flat buffer
    (defragment) and their fp32 masters; the gradient partitions live in
    grad_partitions_flat_buffer (the 16-bit dtype: grad_accum_dtype unset is the model's); Adam's
    two fp32 states per partition element; the all-gathers of the first step (trace incomplete)
    and of the steps after it (gather_segments). Offloaded (offload_param, offload_optimizer):
    the partitions (but the persistent parameters'), masters, gradient partitions and state are
    on the CPU; each all-gather copies its partitions to the GPU first, and backward makes GPU
    copies of each gradient partition (`slices`, as ZeRO-2's offload)."""
    from vramplan.estimate._events import Zero3Params, ZeroPartitions, static_parts
    from vramplan.estimate._inventory import linear_tensors

    N, elem, offload = parallel.gpus, sp.ds_elem, parallel.offloaded
    trace = module_trace(spec, setup, parallel.param_persistence_threshold, elem)
    share = lambda p: -(-p.numel // N)      # noqa: E731  (a partition's elements)
    # offload_param: a partition lives on the CPU, unless its parameter is persistent
    # (Init._partition_param: ds_persist partitions stay on the local device)
    part = lambda p: 0 if offload and not p.persistent else alloc(share(p) * elem)   # noqa: E731
    load = []
    for p in trace.params:
        if p.frozen:
            load.append(part(p))
            if p.persistent:
                load.append(p.nbytes)
    if setup.quantized:
        for lin in spec.layer_linears:
            load += linear_tensors(setup, lin)[1] * spec.count(lin)
    static = static_memory(spec, setup)
    load += static_parts(spec, setup, static)[2]
    trainable = [p for p in trace.params if not p.frozen]
    adapters = tuple((p.nbytes if setup.uses_adapters else 0, part(p)) for p in trainable)
    kept = tuple(p.nbytes for p in trainable if p.persistent)
    elems = sum(share(p) for p in trainable)
    groups, n = [], 0          # _create_fp16_sub_groups: parameters until sub_group_size is reached
    for p in trainable:
        n += share(p)
        if n >= DS_SUB_GROUP:
            groups.append(n)
            n = 0
    groups += [n] if n or not groups else []
    states = round(sp.ds_optimizer / sp.ds_master) if sp.ds_master else 0
    layer, head = _grads_per_layer(spec, setup)
    segments = [gather_segments(trace, parallel.max_reuse_distance, parallel.prefetch_bucket_size,
                                parallel.max_live_parameters, N, elem, first, offload) for first in (True, False)]
    if offload:      # offload_optimizer: the flat partitions, fp32 masters, gradients and state on the CPU
        slices, arrived = [], 0
        for p in reversed(trainable):      # partition_grads: this rank's share of every gradient
            slices.append((arrived * elem, share(p)))
            arrived += p.numel
        z3 = Zero3Params(tuple(load), adapters, kept, 0, *segments, ())
        return ZeroPartitions(N, 0, 0, 0, alloc(parallel.reduce_bucket_size * elem), 1, layer * elem, head * elem,
                              (), parallel.ds_overlap_comm, offload=True, elem=elem, slices=tuple(slices),
                              stage3=z3)
    z3 = Zero3Params(tuple(load), adapters, kept, alloc(elems * elem), *segments, tuple(groups))
    return ZeroPartitions(N, alloc(elems * elem), alloc(elems * elem), alloc(elems * 4),
                          alloc(parallel.reduce_bucket_size * elem), 1, layer * elem, head * elem,
                          (alloc(elems * 4),) * states, parallel.ds_overlap_comm, elem=elem, stage3=z3)


@lru_cache(maxsize=64)
def zero2_offload(spec: ModelSpec, setup: TrainSetup, sp: Splits, parallel: Parallel) -> tuple[int, tuple]:
    """What ZeRO-2's offload_optimizer keeps on one GPU (stage_1_and_2.py): the staging buffer of
    the largest trainable parameter in bytes (temp_grad_buffer_for_gpu_offload, held for the
    run), and the slices of the gradients in this rank's partition as (arrival offset in bytes,
    elements), in the order backward makes them (reverse module order). The rank is the last:
    its partition (the top of the model) is reduced first, while backward still holds most
    activations. Partitions as zero_partitions cuts them."""
    N, elem = parallel.gpus, sp.ds_elem
    E, _flat, part = _flat_partition(spec, setup, N)
    numels = _exact(trainable_numels(spec, setup), E)
    lo, hi = (N - 1) * part, N * part
    slices, arrived, start = [], 0, E
    for n in reversed(numels):
        start -= n
        inside = min(start + n, hi) - max(start, lo)
        if inside > 0:
            slices.append((arrived * elem, inside))
        arrived += n
    return alloc(max(numels, default=0) * elem), tuple(slices)


def zero_slack(base, sp: Splits, parallel: Parallel, peak: int = 0, room: int | None = None,
               need: bool = True) -> tuple[int, dict | None, int]:
    """fsdp_slack for one GPU of ZeRO-2: the single-GPU stream with the engine's construction
    (trainable parameters out to the CPU, empty_cache, the flat 16-bit buffer, the fp32 partition
    or, offloaded, the staging buffer), its gradient buckets in backward, and its step
    (estimate/_events.py ZeroPartitions, docs/allocator.md#zero-2-stream, #zero-2-cpu-offload);
    of ZeRO-3: its partitions, the optimizer's construction and the coordinator's all-gathers
    (zero3_partitions, docs/allocator.md#zero-3-stream)."""
    from vramplan.estimate._estimator import card_replay

    spec, setup = base.model, base.setup
    r, _conf, oom, _retries = card_replay(spec, setup, static_memory(spec, setup), base.cuda_arch, base.alloc_conf,
                                          peak, room, need, zero=zero_partitions(spec, setup, sp, parallel))
    return replay_slack(r, peak), oom, r.fragmentation_bytes


def _paged(paged: int, p: Parallel) -> int:
    """Paged optimizer state (CUDA unified memory) per GPU: whole under DDP, of the local shard
    under FSDP (the optimizer sees only flat-parameter shards), none where the optimizer runs on
    the CPU (FSDP offload) or DeepSpeed brings its own optimizer."""
    if p.deepspeed or (p.strategy in FSDP and p.offloaded):
        return 0
    return _ceil_div(paged, p.gpus) if p.strategy in FSDP else paged


class _Rank:
    """The terms one GPU holds in one phase, and what the rank keeps in pinned CPU memory instead."""

    def __init__(self, offload: bool):
        self.offload = offload
        self.terms: list[Term] = []
        self.cpu = 0

    def add(self, component: Component, part: str, held: str, n: int, source: str) -> None:
        self.terms.append(Term(component.value, part, held, int(n), source))

    def shard(self, component: Component, part: str, n: int, source: str, cpu_bytes: int | None = None) -> None:
        """A 1/N shard: on this GPU, or on the CPU when offloaded (cpu_bytes when the CPU copy
        differs from this phase's GPU bytes, e.g. the whole run's gradient shard)."""
        if self.offload:
            self.cpu += n if cpu_bytes is None else cpu_bytes
        else:
            self.add(component, part, "sharded 1/N", n, source)


def _zero3_gathered(spec: ModelSpec, setup: TrainSetup, sp: Splits, p: Parallel) -> dict[str, tuple[int, int]]:
    """Per moment of the step, the (frozen, trainable) bytes ZeRO-3 holds gathered (plan/_zero3.py)."""
    return gathered_at_moments(spec, setup, p.param_persistence_threshold, sp.ds_elem, p.max_reuse_distance,
                               p.prefetch_bucket_size, p.max_live_parameters)


def _phase_terms(phase: str, c: dict, sp: Splits, p: Parallel,
                 gathered: tuple[int, int] = (0, 0), offload: tuple | None = None) -> tuple[list[Term], int]:
    """Terms of one estimator phase on one GPU, and the bytes this rank keeps on the CPU.

    The phase kind decides what is gathered: "optimizer" (nothing), a loss moment (logits
    alive: the root unit only) or a layer moment (root + two units); ZeRO-3's `gathered`
    (frozen, trainable) bytes come from its coordinator's replay (_zero3_gathered); ZeRO-2's
    `offload` is what offload_optimizer keeps on the GPU (zero2_offload)."""
    s = p.strategy
    kind = "optimizer" if phase == "optimizer" else ("loss" if c[C.LOGITS_LOSS.value] else "layer")
    rank = _Rank(p.offloaded)
    add = rank.add
    # Per rank in every strategy: the micro-batch's activations, logits and kernel temporaries.
    add(C.ACTIVATIONS, "saved activations and gradients in flight", "per rank", c[C.ACTIVATIONS.value], SRC_PER_RANK)
    add(C.LOGITS_LOSS, "logits, fp32 copies, log-softmax", "per rank", c[C.LOGITS_LOSS.value], SRC_PER_RANK)
    if kind != "optimizer":
        add(C.TEMPORARIES, "dequantized weights, kernel workspaces", "per rank", c[C.TEMPORARIES.value],
            SRC_PER_RANK)

    if s in ("single", "ddp"):
        held = "on this GPU" if s == "single" else "replicated"
        src = "vramplan.estimate (one GPU)" if s == "single" else SRC_DDP
        add(C.WEIGHTS, "model weights", held, c[C.WEIGHTS.value], src)
        add(C.QUANT_CONSTANTS, "quantization constants", held, c[C.QUANT_CONSTANTS.value], src)
        add(C.ADAPTERS, "LoRA adapters", held, c[C.ADAPTERS.value], src)
        add(C.GRADIENTS, "gradients", held, c[C.GRADIENTS.value], src)
        add(C.OPTIMIZER_STATE, "optimizer state", held, c[C.OPTIMIZER_STATE.value], src)
        if kind == "optimizer":
            add(C.TEMPORARIES, "optimizer workspace", held, c[C.TEMPORARIES.value], src)
        if s == "ddp" and not p.gradient_as_bucket_view and sp.gradients:
            # Reducer buckets are built at construction and kept for the whole run.
            add(C.GRADIENTS, "DDP all-reduce buckets (a copy of every gradient)", "bucket", sp.gradients, SRC_DDP)
    else:
        # Not parameters, so neither FSDP nor ZeRO shards them: every rank holds all of them.
        add(C.QUANT_CONSTANTS, "bitsandbytes quant_state (absmax, codes)", "replicated",
            c[C.QUANT_CONSTANTS.value], SRC_QUANT_STATE)
        if s in FSDP:
            _fsdp_terms(rank, kind, phase == "backward", c, sp, p)
        else:
            _zero_terms(rank, kind, phase == "backward", c, sp, p, gathered, offload)
    return rank.terms, rank.cpu


@lru_cache(maxsize=256)     # per model and setup structure; every phase of every batch x seq asks
def gathered_units(sp: Splits, backward: bool) -> tuple[int, int, int, int]:
    """(units, weights, adapters, gradients) unsharded at a decoder-layer moment, at the layer
    where they are largest: in forward the current unit and the next one (limit_all_gathers);
    in backward (BACKWARD_PRE) the current unit, the one below it prefetched, and the current
    unit's unsharded gradients (SRC_FSDP_GATHER, SRC_FSDP_GRAD). Where layers differ (Llama 4
    Maverick's dense / MoE alternation) the pair is one of each, not the largest unit twice."""
    units = sp.layer_units
    if len(units) < 2:
        w, a, g = units[0] if units else (0, 0, 0)
        return len(units), w, a, g if backward else 0
    moments = []    # (bytes, units, weights, adapters, gradients)
    for i in range(len(units) - 1):
        (w0, a0, _), (w1, a1, g1) = units[i], units[i + 1]
        # backward: layer i + 1 runs with layer i prefetched; forward: i runs with i + 1 prefetched
        g = g1 if backward else 0
        moments.append((w0 + a0 + w1 + a1 + g, 2, w0 + w1, a0 + a1, g))
    if backward:   # the bottom layer's backward prefetches nothing
        w, a, g = units[0]
        moments.append((w + a + g, 1, w, a, g))
    _, n, w, a, g = max(moments)
    return n, w, a, g


@lru_cache(maxsize=256)
def _unit_shards(sp: Splits, gpus: int) -> tuple[int, int]:
    """(weight, adapter) bytes of one rank's shards: each unit's flat parameter split over the
    GPUs, the root's too."""
    return (sum(_ceil_div(u[0], gpus) for u in sp.layer_units) + _ceil_div(sp.root_weights, gpus),
            sum(_ceil_div(u[1], gpus) for u in sp.layer_units) + _ceil_div(sp.root_adapters, gpus))


def _fsdp_terms(rank: _Rank, kind: str, backward: bool, c: dict, sp: Splits, p: Parallel) -> None:
    N = p.gpus
    add, shard = rank.add, rank.shard
    weight_shards, adapter_shards = _unit_shards(sp, N)
    shard(C.WEIGHTS, "weight shards (flat parameters)", weight_shards, SRC_FSDP_SHARD)
    shard(C.ADAPTERS, "adapter shards (LoRA units)", adapter_shards, SRC_FSDP_SHARD)
    units, unit_w, unit_a, unit_g = gathered_units(sp, backward)
    if kind != "optimizer":
        if p.strategy == "fsdp_grad_op":
            # Every unit stays unsharded from its forward to its backward: at the turn, all of them.
            add(C.WEIGHTS, "all units unsharded (forward -> backward)", "gathered", sp.weights, SRC_FSDP_GRAD_OP)
            add(C.ADAPTERS, "all adapter units unsharded", "gathered", sp.adapters, SRC_FSDP_GRAD_OP)
        else:
            add(C.WEIGHTS, "root unit unsharded (embeddings, norm, lm_head)", "gathered", sp.root_weights,
                SRC_FSDP_ROOT)
            add(C.ADAPTERS, "root adapters unsharded", "gathered", sp.root_adapters, SRC_FSDP_ROOT)
            if kind == "layer":
                add(C.WEIGHTS, f"{units} decoder-layer units unsharded (current + prefetched)", "gathered",
                    unit_w, SRC_FSDP_GATHER)
                add(C.ADAPTERS, f"{units} layers' adapter units unsharded", "gathered", unit_a, SRC_FSDP_GATHER)
    grads = c[C.GRADIENTS.value]
    shard(C.GRADIENTS, "gradient shards", _ceil_div(grads, N), SRC_FSDP_SHARD, _ceil_div(sp.gradients, N))
    if p.offloaded and backward and grads:
        # the CPU copy is made, yet each reduce-scattered shard stays on the GPU (_saved_grad_shard)
        # until _finalize_params at the end of backward (SRC_FSDP_OFFLOAD_GRAD)
        add(C.GRADIENTS, "gradient shards until the end of backward", "sharded 1/N", _ceil_div(grads, N),
            SRC_FSDP_OFFLOAD_GRAD)
    if backward and grads:
        # Unsharded gradients awaiting reduce-scatter: the root's through the whole backward,
        # and the current unit's.
        add(C.GRADIENTS, "unsharded gradients before reduce-scatter", "gathered",
            sp.root_gradients + (unit_g if kind == "layer" else 0), SRC_FSDP_GRAD)
    shard(C.OPTIMIZER_STATE, "optimizer state of the local shard", _ceil_div(c[C.OPTIMIZER_STATE.value], N),
          SRC_FSDP_SHARD, _ceil_div(sp.optimizer_state, N))
    if kind == "optimizer":  # with offload the step runs on the CPU: no GPU workspace
        shard(C.TEMPORARIES, "optimizer workspace of the local shard", _ceil_div(c[C.TEMPORARIES.value], N),
              SRC_FSDP_SHARD, 0)


def _zero_terms(rank: _Rank, kind: str, backward: bool, c: dict, sp: Splits, p: Parallel,
                gathered: tuple[int, int] = (0, 0), offload: tuple | None = None) -> None:
    N, stage3, elem = p.gpus, p.strategy == "zero3", sp.ds_elem
    add, shard = rank.add, rank.shard
    # Trainable parameters after the engine's 16-bit cast. LoRA: the adapters; full: the weights.
    lora = sp.adapters > 0
    if stage3:
        frozen = sp.weights - sp.persistent_weights
        add(C.WEIGHTS, "small parameters kept whole (norms, biases)", "replicated", sp.persistent_weights,
            SRC_DS3_PARAMS)
        shard(C.WEIGHTS, "parameter partitions", _ceil_div(frozen, N), SRC_DS3_PARAMS)
        if lora:
            add(C.ADAPTERS, "adapters under the persistence threshold", "replicated", sp.ds_trainable_persistent,
                SRC_DS3_PARAMS)
            shard(C.ADAPTERS, "adapter partitions", _ceil_div(sp.ds_trainable - sp.ds_trainable_persistent, N),
                  SRC_DS3_PARAMS)
        frozen_gathered, trainable_gathered = gathered
        add(C.WEIGHTS, "parameters gathered (in use, prefetched, kept for reuse)", "gathered",
            frozen_gathered if lora else frozen_gathered + trainable_gathered, SRC_DS3_GATHER)
        if lora:
            add(C.ADAPTERS, "adapters gathered (in use, prefetched, kept for reuse)", "gathered", trainable_gathered,
                SRC_DS3_GATHER)
    else:
        add(C.WEIGHTS, "model weights", "replicated", sp.weights,
            "ZeRO-2 partitions gradients and optimizer state only; " + SRC_DS_CAST)
        if lora:
            add(C.ADAPTERS, "LoRA adapters (16-bit after the engine cast)", "replicated", sp.ds_trainable, SRC_DS_CAST)

    # Gradients: the 16-bit partition, the communication bucket, and the step's fp32 copy.
    part = _ceil_div(sp.ds_trainable, N)
    if stage3:
        shard(C.GRADIENTS, "gradient partition buffer", part, SRC_DS_GRAD3)   # allocated at init, whole run
        if sp.ds_trainable:
            add(C.GRADIENTS, "contiguous reduce bucket (reduce_bucket_size)", "bucket",
                alloc(p.reduce_bucket_size * elem), SRC_DS_IPG3)
    else:
        # The partition fills as backward reduces buckets (the estimator's gradient share of the phase).
        g16 = c[C.GRADIENTS.value] * sp.ds_trainable // sp.gradients if sp.gradients else 0
        shard(C.GRADIENTS, "reduced gradient partition", part if kind == "optimizer" else _ceil_div(g16, N),
              SRC_DS_GRAD2, part)
        if backward and sp.ds_trainable:
            buffers = 2 if p.ds_overlap_comm else 1
            add(C.GRADIENTS, f"{buffers} contiguous reduce bucket(s) (reduce_bucket_size)", "bucket",
                buffers * alloc(p.reduce_bucket_size * elem), SRC_DS_IPG2)
        if offload:
            staging, slices = offload
            add(C.GRADIENTS, "offload staging buffer (the largest trainable parameter)", "per rank", staging,
                SRC_DS_OFFLOAD2)
            # each slice's fp64 and fp32 copies come and go while buckets are reduced, between the
            # moments the terms take: one GPU's replay (zero_slack) places them, and its peak
            # reserved is the device total
            if backward and slices:
                add(C.GRADIENTS, "gradient norms of the partition, kept for the step", "per rank",
                    len(slices) * alloc(8), SRC_DS_OFFLOAD2)
    shard(C.OPTIMIZER_STATE, "fp32 master weights + moments of the partition",
          _ceil_div(sp.ds_master + sp.ds_optimizer, N), SRC_DS_MASTER)
    if kind == "optimizer":
        if stage3:   # one sub-group at a time, flattened in 16 bits first
            group = min(_ceil_div(sp.trainable_params, N), DS_SUB_GROUP)
            shard(C.GRADIENTS, "fp32 gradient partition for the step", alloc(4 * group), SRC_DS_GRAD3, 0)
            shard(C.GRADIENTS, "16-bit flattened gradient partition (cast source)", alloc(elem * group),
                  SRC_DS_GRAD3, 0)
        else:
            # the whole partition at once (no sub-groups in stage 1/2), flattened in 16 bits first
            shard(C.GRADIENTS, "fp32 gradient partition for the step", alloc(4 * _ceil_div(sp.trainable_params, N)),
                  SRC_DS_STEP2, 0)
            shard(C.GRADIENTS, "16-bit flattened gradient partition (cast source)", part, SRC_DS_STEP2, 0)


def assumptions(spec: ModelSpec, setup: TrainSetup, parallel: Parallel) -> tuple[str, ...]:
    s, N = parallel.strategy, parallel.gpus
    if s == "single":
        return ()
    out = [f"{N} data-parallel ranks, each with micro-batch {setup.batch} x {setup.seq} tokens: "
           "activations and logits are per GPU", DESCRIPTIONS[s]]
    if s in FSDP:
        out.append("FSDP units: one per decoder layer (transformer_auto_wrap_policy), LoRA Linear modules "
                   "wrapped apart, embeddings/norm/lm_head in the root; parameters in their load dtype "
                   "(no MixedPrecision policy); BACKWARD_PRE prefetch, limit_all_gathers=True")
        if setup.quantized:
            out.append("QLoRA + FSDP: bnb_4bit_quant_storage = the compute dtype (required to flatten packed "
                       "weights); quant_state replicated on every rank")
        if parallel.offloaded:
            out.append("CPUOffload(offload_params=True): parameter, gradient and optimizer shards on the CPU, "
                       "the optimizer step on the CPU; only units in use are on the GPU, and each unit's "
                       "gradient shard until the end of backward")
        if N == 1:
            out.append("one GPU: torch runs FSDP as NO_SHARD (a world size of 1 clamps the strategy); each unit's "
                       "parameters copied to the GPU for its forward and backward are modelled as FULL_SHARD's "
                       "with CPU offload")
        if N > 1:
            out.append("allocator: FSDP(model) wraps a model loaded to the CPU or meta device, unit by unit, with "
                       "sync_module_states (Answer.AI train.py low_memory); that wrap's cache stays, and the "
                       "all-gathers and reduce-scatters run in their own CUDA streams (docs/allocator.md#fsdp-wrap)"
                       + ("; offloaded, each shard's copy to the GPU runs in the pre-unshard stream "
                          "(docs/allocator.md#fsdp-cpu-offload)" if parallel.offloaded else ""))
    if parallel.deepspeed:
        out.append(f"DeepSpeed {setup.dtype} enabled: the engine casts the module to {setup.dtype}, so "
                   "trainable parameters and gradients are 16-bit, with fp32 master weights and moments "
                   "partitioned 1/N")
        out.append("activations keep the fp32 LoRA input copies of the single-GPU model (an upper bound: with "
                   "16-bit adapters peft casts inputs to 16-bit)")
        out.append(f"reduce_bucket_size {parallel.reduce_bucket_size:,} elements, overlap_comm "
                   f"{parallel.ds_overlap_comm}" + (f", stage3_prefetch_bucket_size {parallel.prefetch_bucket_size:,}, "
                                                    f"stage3_param_persistence_threshold "
                                                    f"{parallel.param_persistence_threshold:,}, "
                                                    f"stage3_max_live_parameters {parallel.max_live_parameters:,}, "
                                                    f"stage3_max_reuse_distance {parallel.max_reuse_distance:,}"
                                                    if s == "zero3" else ""))
        if s == "zero3":
            out.append("ZeRO-3 gathering: DeepSpeed's parameter coordinator replayed over the step's module trace "
                       "(prefetch, reuse distance, checkpoint recomputation), in a step after the first "
                       "(docs/allocator.md#zero-3-gathering)")
        out.append("optimizer step: " + SRC_DS_FUSED)
        if s == "zero3":
            out.append("allocator: the partitions as zero.Init loads them, the optimizer's flat buffers, and the "
                       "coordinator's all-gathers in their own stream replayed, the first step's apart "
                       "(docs/allocator.md#zero-3-stream)")
        if s == "zero2":
            out.append("allocator: the engine's construction (trainable parameters to the CPU, empty_cache, the flat "
                       "16-bit buffer), its gradient buckets and step replayed (docs/allocator.md#zero-2-stream)"
                       + ("; offloaded, the staging buffer and each gradient slice's fp64 norm and fp32 copies "
                          "(#zero-2-cpu-offload)" if parallel.offloaded else ""))
        if parallel.offloaded:
            out.append("offload_optimizer: cpu" + (" and offload_param: cpu" if s == "zero3" else ""))
        if setup.paged:
            out.append("DeepSpeed runs its own (fused) Adam: the paged optimizer choice does not apply")
    if s == "ddp":
        out.append("DDP gradient_as_bucket_view="
                   f"{parallel.gradient_as_bucket_view}: reducer buckets "
                   + ("alias the gradients" if parallel.gradient_as_bucket_view else "hold a copy of every gradient"
                      " (bucket_cap_mb 25, first bucket 1 MiB, rebuilt once in the second step: "
                      "docs/allocator.md#ddp-stream)"))
        if setup.accumulates:
            out.append(f"gradient accumulation under DDP: the first {setup.grad_accum - 1} micro-steps of each step "
                       "run under no_sync (the Reducer's hooks return at once), the last copies each accumulated "
                       ".grad into its bucket (docs/autograd.md#gradient-accumulation-steps)")
    out.append(f"NCCL buffers: {NCCL_BYTES // MiB} MiB per GPU outside the caching allocator (a model, not measured)")
    return tuple(out)
