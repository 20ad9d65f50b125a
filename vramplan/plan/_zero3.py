"""What DeepSpeed ZeRO-3 keeps gathered on one GPU through a training step: its parameter
coordinator (deepspeed/runtime/zero/partitioned_param_coordinator.py PartitionedParameterCoordinator,
DeepSpeed 0.19) replayed over the step's module trace (docs/allocator.md#zero-3-gathering).

Each partitioned parameter is all-gathered whole when a module that holds it runs (a new tensor of
its full size on every rank) and released after the module unless the coordinator keeps it. Once
the first step has recorded the module trace, it keeps:
- what it prefetched: after each fetch, parameters of the modules ahead, in trace order, up to
  stage3_prefetch_bucket_size elements not yet gathered, and no further than
  stage3_max_live_parameters elements gathered in all (_fetch_sub_module_impl);
- a parameter used again within stage3_max_reuse_distance elements of the trace ahead, or one whose
  later use the prefetch scan already passed (__params_to_release);
- a frozen parameter fetched while a checkpointed layer recomputes its forward belongs to the
  module whose backward started that recomputation, and goes when that module's backward ends
  (update_recompute_parameters, release_sub_module);
- nothing after the backward (release_and_reset_all).

Parameters at or under stage3_param_persistence_threshold elements stay whole from the start and
are not counted here (plan/_sharding.py counts them). tests/test_zero3.py holds this replay to the
gathered parameters DeepSpeed itself reported after every fetch and release, on the CPU.
"""
from __future__ import annotations

from bisect import bisect_left
from collections import defaultdict, deque

from vramplan.core._models import ModelSpec
from vramplan.core._record import record
from vramplan.core._setup import TrainSetup
from vramplan.estimate._inventory import adapted_linears, lora_shapes, numel
from vramplan.estimate._quant import alloc, layout

# deepspeed/runtime/zero/config.py DeepSpeedZeroConfig: stage3_max_live_parameters and
# stage3_max_reuse_distance default to 1e9 elements (the HF Trainer's DeepSpeed examples keep them)
DS_MAX_LIVE_PARAMETERS = 1_000_000_000
DS_MAX_REUSE_DISTANCE = 1_000_000_000


@record
class Param:
    """One parameter as the coordinator sees it: `numel` its ds_numel (a 4-bit weight counts the
    elements of its packed storage), `nbytes` the tensor an all-gather makes, `frozen` without grad."""
    numel: int
    nbytes: int
    frozen: bool
    persistent: bool


@record
class StepTrace:
    """One training step as the coordinator sees it: `modules`, per fetch in order (the module
    trace it records), the ids of the parameters the module holds itself; `calls`: ("fetch" |
    "release", module name, its parameter ids, forward) in order; `spans`: call index ranges
    [start, end) of the estimator's moments (estimate/_estimator.py step_moments); `marks`: (call
    index, segment) where each stretch of the allocation stream starts (gather_segments)."""
    params: tuple
    modules: tuple
    calls: tuple
    spans: dict
    marks: tuple = ()


@record
class _Node:
    """A module: its own parameters, its children in forward order, and whether its output
    reaches the loss (DeepSpeed's backward hooks fire only then)."""
    name: str
    params: tuple
    children: tuple = ()
    grad: bool = True


def _linear(setup: TrainSetup, lin, prefix: str, make, adapted: frozenset) -> _Node:
    """An nn.Linear (or bitsandbytes Linear4bit), or, where `adapted` names it (the linears peft
    wraps: inventory.adapted_linears), peft's LoRA Linear around it: base_layer, lora_dropout,
    lora_A, lora_B (peft/tuners/lora/layer.py Linear.forward)."""
    frozen = setup.uses_adapters
    ids = (make(lin.numel, frozen, lin),) + ((make(lin.out_features, frozen),) if lin.bias else ())
    name = prefix + lin.name
    if lin.name not in adapted:
        return _Node(name, ids)
    a, b = (make(numel(shape), False) for shape in lora_shapes(lin, setup.rank))
    return _Node(name, (), (_Node(name + ".base_layer", ids), _Node(name + ".lora_dropout", ()),
                            _Node(name + ".lora_A", (a,)), _Node(name + ".lora_B", (b,))))


def _layer(spec: ModelSpec, setup: TrainSetup, i: int, make, adapted: frozenset) -> _Node:
    """Decoder layer i in LlamaDecoderLayer's order: a norm, the attention's projections, the
    other norms, then the MLP (gate, act_fn, up, down; a MoE layer's experts after its router)."""
    prefix = f"model.layers.{i}."
    frozen = setup.uses_adapters
    dense = spec.is_dense(i)
    attn, mlp = [], []
    for lin in spec.layer_linears:
        if lin.where != "all" and dense != (lin.where == "dense"):
            continue
        node = _linear(setup, lin, prefix, make, adapted)
        (attn if lin.name.startswith(("self_attn.", "attn.", "attention.")) else mlp).append(node)
    if len(mlp) == 3 and mlp[0].name.endswith("gate_proj"):
        mlp.insert(1, _Node(prefix + "mlp.act_fn", ()))
    if spec.num_experts and not dense:
        E, h, w = spec.num_experts, spec.hidden, spec.expert_width
        mlp.append(_Node(prefix + "mlp.experts", (make(E * 2 * w * h, frozen), make(E * h * w, frozen))))
    norms = [_Node(prefix + f"norm{k}", (make(spec.hidden, frozen),)) for k in range(spec.arch.norms_per_layer)]
    children = (norms[:1] + [_Node(prefix + "self_attn", (), tuple(attn))] + norms[1:]
                + [_Node(prefix + "mlp", (), tuple(mlp))])
    return _Node(prefix.rstrip("."), (), tuple(children))


def step_trace(spec: ModelSpec, setup: TrainSetup, persistence_threshold: int, elem: int) -> StepTrace:
    """The coordinator's view of one step of `setup` (batch and seq do not matter) with 16-bit
    parameters of `elem` bytes (the engine's cast; a 4-bit weight's packed storage is of that
    dtype: bnb_4bit_quant_storage). Every module's pre-forward hook fetches and its post-forward
    hook releases; backward walks the tree in reverse; a checkpointed layer's backward first
    reaches its last module, whose backward recomputes the layer's forward up to that module
    (torch.utils.checkpoint stops there), then runs back through the rest."""
    params: list = []

    def make(n: int, frozen: bool, linear=None) -> int:
        if linear is not None and setup.quantized and frozen:
            stored = layout(setup.quant, linear.in_features, linear.out_features, setup.double_quant).weight
            n = -(-stored // elem)
        params.append(Param(n, alloc(n * elem), frozen, n <= persistence_threshold))
        return len(params) - 1

    base_frozen = setup.uses_adapters
    embed = (make(spec.vocab * spec.hidden, base_frozen),)
    adapted = frozenset(lin.name for lin in adapted_linears(spec, setup))
    layers = [_layer(spec, setup, i, make, adapted) for i in range(spec.layers)]
    norm = (make(spec.hidden, base_frozen),)
    head = embed if spec.tied else (make(spec.vocab * spec.hidden, base_frozen),)
    norm_node = _Node("model.norm", norm)
    decoder = _Node("model", (), (_Node("model.embed_tokens", embed), _Node("model.rotary_emb", (), grad=False),
                                  *layers, norm_node))
    root = _Node("", (), (decoder, _Node("lm_head", head)))
    if setup.uses_adapters:
        root = _Node("peft", (), (root,))

    modules: list = []
    calls: list = []
    spans: dict = {}
    marks: list = [(0, ("forward", "prefix"))]
    layer_index = {id(node): i for i, node in enumerate(layers)}
    recomputing = [False]

    def fetch(node: _Node, forward: bool) -> None:
        modules.append(node.params)
        calls.append(("fetch", node.name, node.params, forward))

    def release(node: _Node, forward: bool) -> None:
        calls.append(("release", node.name, node.params, forward))

    def forward(node: _Node, stop: _Node | None = None) -> bool:
        """The node's forward; True where it reached `stop` (the recomputation ends there)."""
        start = len(calls)
        if not recomputing[0] and id(node) in layer_index:
            marks.append((start, ("forward", layer_index[id(node)])))
        elif not recomputing[0] and node is norm_node:
            marks.append((start, ("forward", "head")))
        fetch(node, True)
        if node is stop:
            return True
        for child in node.children:
            if forward(child, stop):
                return True
        if node.name == "lm_head" and not recomputing[0]:   # the head's tape has run
            marks.append((len(calls), ("forward", "head_done")))
        release(node, True)
        if node.name == "lm_head":
            spans["forward.loss"] = (start, len(calls))
        elif node is layers[-1]:
            spans["forward.layer"] = (start, len(calls))
        return False

    def backward(node: _Node) -> None:
        if not node.grad:
            return
        start = len(calls)
        is_layer = id(node) in layer_index
        if is_layer:
            marks.append((start, ("backward", layer_index[id(node)])))
        if setup.grad_ckpt and is_layer:
            path = [node]
            while path[-1].children:
                path.append([c for c in path[-1].children if c.grad][-1])
            for n in path:
                fetch(n, False)
            recomputing[0] = True
            for child in node.children:
                if forward(child, stop=path[-1]):
                    break
            recomputing[0] = False
            release(path[-1], False)
            for parent, done in zip(reversed(path[:-1]), reversed(path[1:])):
                for child in reversed(parent.children):
                    if child is not done:
                        backward(child)
                release(parent, False)
        else:
            fetch(node, False)
            if node.name == "model.embed_tokens":
                return          # the end of backward: release_and_reset_all releases the rest
            for child in reversed(node.children):
                backward(child)
            if node.name == "lm_head":      # the head's backward tape has run
                marks.append((len(calls), ("backward", "head_done")))
            release(node, False)
        if node.name == "lm_head":
            spans["backward.loss"] = (start, len(calls))
        elif node is layers[-1]:
            spans["backward.top_layer"] = (start, len(calls))
        if node is layers[0]:
            spans["backward.bottom_layer"] = (start, len(calls))
            marks.append((len(calls), ("backward", "end")))

    forward(root)
    marks.append((len(calls), ("backward", "head")))
    backward(root)
    return StepTrace(tuple(params), tuple(modules), tuple(calls), spans, tuple(marks))


def replay(trace: StepTrace, reuse_distance: int, prefetch_bucket: int, max_live: int,
           first: bool = False, log: _GatherLog | None = None) -> list[tuple[int, int]]:
    """(frozen, trainable) bytes gathered after each call of `trace.calls`, in a step after the
    first (the trace is complete): PartitionedParameterCoordinator's fetch_sub_module and
    release_sub_module, rule by rule (the module docstring). `first`: the first step, whose
    trace is not complete yet: no prefetch, and release_sub_module releases every parameter of
    the module. `log`: records the allocations the all-gathers make and free (_GatherLog)."""
    P, modules = trace.params, trace.modules
    queue = deque((p, k) for k, ids in enumerate(modules) for p in sorted(set(ids)))    # __param_order
    recent: dict = defaultdict(lambda: -10 ** 10)      # __most_recent_step_id_param_fetched_for
    gathered: set = set()
    live = 0                                           # __n_available_params
    step = 0                                           # __step_id
    holders: dict = defaultdict(set)                   # ds_active_sub_modules (by module name)
    active_backward: dict = {}                         # __active_backward_submodules (insertion order)
    recomputed: dict = defaultdict(set)                # ds_recompute_parameters
    in_backward = False
    frozen_bytes = trainable_bytes = 0
    out = []

    def gather(ids) -> None:
        nonlocal live, frozen_bytes, trainable_bytes
        for p in ids:
            if not P[p].persistent and p not in gathered:
                gathered.add(p)
                live += P[p].numel
                if P[p].frozen:
                    frozen_bytes += P[p].nbytes
                else:
                    trainable_bytes += P[p].nbytes

    def release(p) -> None:
        nonlocal live, frozen_bytes, trainable_bytes
        if log is not None:
            log.drop(p)
        gathered.discard(p)
        live -= P[p].numel
        if P[p].frozen:
            frozen_bytes -= P[p].nbytes
        else:
            trainable_bytes -= P[p].nbytes

    # __params_to_release walks the trace from the next module, adding up every parameter's
    # ds_numel, and keeps what it meets before the sum reaches the reuse distance: a parameter
    # is kept when its next use j satisfies numel(modules[step:j]) < reuse_distance
    upto = [0]
    for ids in modules:
        upto.append(upto[-1] + sum(P[p].numel for p in ids))
    uses: dict = defaultdict(list)
    for k, ids in enumerate(modules):
        for p in set(ids):
            uses[p].append(k)

    def reused(p) -> bool:
        at = uses[p]
        i = bisect_left(at, step)
        return i < len(at) and upto[at[i]] - upto[step] < reuse_distance

    def to_release(ids) -> set:
        if first:
            return {p for p in ids if not P[p].persistent}
        return {p for p in ids if not P[p].persistent and not recent[p] > step and not reused(p)}

    for kind, name, own, forward in trace.calls:
        ids = set(own)
        if log is not None:
            log.call()
        if kind == "fetch":
            if not forward:
                in_backward = True
                active_backward[name] = True     # a module fetched again keeps its place
            if log is not None:     # one coalesced all-gather of what is not there, then each waited
                log.issue(sorted(p for p in ids if not P[p].persistent and p not in gathered))
                for p in sorted(ids):
                    log.wait(p)
            gather(ids)
            for p in ids:
                holders[p].add(name)
                if forward and in_backward and active_backward and P[p].frozen:
                    owner = next(reversed(active_backward))
                    recomputed[owner].add(p)
                    holders[p].add(owner)
            if not first:            # the first step has no trace to pop or prefetch from
                fresh = {p for p in ids if recent[p] < step}
                popped: set = set()
                while queue and len(popped) < len(fresh):
                    p, at = queue.popleft()
                    recent[p] = at
                    popped.add(p)
            if prefetch_bucket > 0 and not first:
                room, ahead, chosen = min(max_live - live, prefetch_bucket), 0, set()
                while queue and ahead < room:
                    p, at = queue.popleft()
                    recent[p] = max(recent[p], at)
                    if p not in gathered and not P[p].persistent and p not in chosen:
                        chosen.add(p)
                        ahead += P[p].numel
                gather(chosen)
                if log is not None:
                    log.issue(sorted(chosen))
            step += 1
        else:
            go = to_release(ids)
            if not forward:
                go |= {p for p in recomputed[name] if not P[p].persistent}
                ids |= recomputed.pop(name, set())
                active_backward.pop(name, None)
            for p in ids:
                holders[p].discard(name)
                if p in go and p in gathered and not holders[p]:
                    release(p)
        out.append((frozen_bytes, trainable_bytes))
    if log is not None:      # release_and_reset_all: what is in flight is waited, then all released
        log.call()
        for p in sorted(gathered):
            log.wait(p)
        for p in sorted(gathered):
            release(p)
    return out


class _GatherLog:
    """The allocations of one GPU's all-gathers in a step, per call of the trace (and one last
    entry for release_and_reset_all), in DeepSpeed's order (partition_parameters.py
    all_gather_coalesced), as (+1, name, size) / (-1, name, None) where a size does not yet say
    how many GPUs there are (gather_segments sizes it):
    - one parameter (_all_gather_sequential): a buffer of its partition times N
      (("parts", ids): ceil(numel / N) x N elements) that becomes its data
      (`param_buffer.narrow(...).view(...)`);
    - several (_all_gather_coalesced -> _all_gather_dtype: a prefetch, or a module with more):
      one flat tensor of their partitions times N (`torch.empty(partition_sz * world_size)`);
      waiting for each parameter (AllGatherCoalescedHandle.wait) allocates its own tensor
      (("whole", p): `torch.cat` of its N pieces, ds_numel elements), and the flat tensor goes once
      the last of them has been waited (the handle is then unreferenced);
    - with offload_param, each partition is first copied to the GPU (("copy", p):
      `p.ds_tensor.to(device)`), the copies freed once the all-gather has its input;
    - releasing a parameter (free_param) frees its tensor.
    Persistent parameters are never gathered here."""

    def __init__(self, offload: bool = False):
        self.offload = offload
        self.calls: list = []
        self.inflight: dict = {}    # parameter -> its coalesced all-gather (None: its own buffer)
        self.waiting: dict = {}     # coalesced all-gather -> its parameters not yet waited
        self.available: set = set()
        self.count = 0

    def call(self) -> None:
        self.calls.append([])

    def issue(self, ids: list) -> None:
        if not ids:
            return
        ids = tuple(ids)
        if len(ids) == 1:
            g = None
            self.calls[-1].append((1, ids[0], ("parts", ids)))
        else:
            g = ("flat", self.count)
            self.count += 1
            self.waiting[g] = set(ids)
            self.calls[-1].append((1, g, ("parts", ids)))
        for p in ids:
            self.inflight[p] = g
        if self.offload:
            self.calls[-1] += [(1, ("copy", p), ("copy", p)) for p in ids]
            self.calls[-1] += [(-1, ("copy", p), None) for p in ids]

    def wait(self, p: int) -> None:
        if p not in self.inflight:
            return
        g = self.inflight.pop(p)
        self.available.add(p)
        if g is None:            # its own buffer is its data already
            return
        self.calls[-1].append((1, p, ("whole", p)))
        self.waiting[g].discard(p)
        if not self.waiting[g]:
            del self.waiting[g]
            self.calls[-1].append((-1, g, None))

    def drop(self, p: int) -> None:
        if p in self.available:
            self.available.discard(p)
            self.calls[-1].append((-1, p, None))


def _gather_calls(trace: StepTrace, reuse_distance: int, prefetch_bucket: int, max_live: int, first: bool,
                  offload: bool) -> tuple:
    """_GatherLog's calls for one step, cached per trace object (module_trace keeps one per model)
    and settings: which parameters move does not depend on the GPU count, which the planner
    varies."""
    key = (id(trace), reuse_distance, prefetch_bucket, max_live, first, offload)
    found = _CALLS.get(key)
    if found is None or found[0] is not trace:      # the trace itself is kept: its id stays its own
        if len(_CALLS) >= 32:
            _CALLS.clear()
        log = _GatherLog(offload)
        replay(trace, reuse_distance, prefetch_bucket, max_live, first, log)
        found = _CALLS[key] = (trace, tuple(tuple(events) for events in log.calls))
    return found[1]


_CALLS: dict = {}


def gather_segments(trace: StepTrace, reuse_distance: int, prefetch_bucket: int, max_live: int, gpus: int,
                    elem: int, first: bool, offload: bool = False) -> tuple:
    """One step's all-gather allocations (_GatherLog) on one of `gpus` GPUs, in bytes, cut where
    the allocation stream plays them: ((segment, events), ...) with segment ("forward", "prefix"
    | layer index | "head" | "head_done") or ("backward", "head" | "head_done" | layer index |
    "end"), each stretch of calls from its mark to the next ("head_done" from lm_head's release
    on: the head's tape runs before it), release_and_reset_all at the end of ("backward", "end")."""
    calls = _gather_calls(trace, reuse_distance, prefetch_bucket, max_live, first, offload)
    part = [-(-p.numel // gpus) for p in trace.params]      # each partition's elements
    sized: dict = {}                                        # size -> bytes, for this GPU count

    def nbytes(size) -> int:
        found = sized.get(size)
        if found is None:
            kind, what = size
            found = sized[size] = (alloc(sum(part[p] for p in what) * gpus * elem) if kind == "parts" else
                                   trace.params[what].nbytes if kind == "whole" else alloc(part[what] * elem))
        return found
    bounds = [at for at, _seg in trace.marks] + [len(calls)]
    return tuple((seg, tuple((sign, name, nbytes(size) if sign > 0 else 0)
                             for events in calls[bounds[k]:bounds[k + 1]] for sign, name, size in events))
                 for k, (_at, seg) in enumerate(trace.marks))


def module_trace(spec: ModelSpec, setup: TrainSetup, persistence_threshold: int, elem: int) -> StepTrace:
    """step_trace, one per model and what the trace depends on (trace_fields): the planner asks for
    setups that differ elsewhere, and over several GPU counts."""
    key = (spec, trace_fields(setup), persistence_threshold, elem)
    found = _TRACES.get(key)
    if found is None:
        if len(_TRACES) >= 16:
            _TRACES.clear()
        found = _TRACES[key] = step_trace(spec, setup.with_(batch=1, seq=1), persistence_threshold, elem)
    return found


_TRACES: dict = {}


def gathered_at_moments(spec: ModelSpec, setup: TrainSetup, persistence_threshold: int, elem: int,
                        reuse_distance: int, prefetch_bucket: int, max_live: int) -> dict[str, tuple[int, int]]:
    """Per estimator moment, the (frozen, trainable) bytes gathered at the call of its span where
    their sum is largest; the optimizer step holds none (release_and_reset_all). Cached by what
    the module trace depends on (the planner asks for setups that differ elsewhere)."""
    key = (spec, trace_fields(setup), persistence_threshold, elem, reuse_distance, prefetch_bucket, max_live)
    found = _GATHERED.get(key)
    if found is None:
        if len(_GATHERED) >= 64:
            _GATHERED.clear()
        trace = module_trace(spec, setup, persistence_threshold, elem)
        after = replay(trace, reuse_distance, prefetch_bucket, max_live)
        found = {name: max(after[start:end], key=sum) for name, (start, end) in trace.spans.items()}
        found["optimizer"] = (0, 0)
        _GATHERED[key] = found
    return dict(found)


_GATHERED: dict = {}


def trace_fields(setup: TrainSetup) -> tuple:
    """The fields of a setup step_trace reads: which parameters train, how 4-bit weights are
    stored, which linears carry LoRA, and whether layers are checkpointed."""
    return (setup.method, setup.quantized and setup.quant, setup.quantized and setup.double_quant,
            setup.uses_adapters and setup.targets, setup.uses_adapters and setup.rank, setup.grad_ckpt)
