"""simulate.step: one real training step (transformers + peft + bitsandbytes) on the meta device,
every storage counted by the allocation tracker, the peak broken into components.

The step is the user's loop body:
    loss = model(input_ids=ids, labels=ids).loss; loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
One warm-up step runs first (optimizer state exists afterwards, bitsandbytes int8 state is
initialized); the second, steady-state step is the measured one, what
torch.cuda.reset_peak_memory_stats() before it and torch.cuda.max_memory_allocated() after it
would report on a GPU.

Components at the peak instant (the definitions the estimator shares):
  weights          parameters and buffers that are not quant state or adapters (all params in full)
  quant_constants  every tensor held by a bitsandbytes QuantState (absmax, code, offset,
                   state2.absmax, state2.code) and int8 SCB scales
  adapters         LoRA A/B parameters
  gradients        storages that are / become .grad of a parameter in this step
  optimizer_state  tensors in optimizer.state (paged state is reported apart, in paged_optimizer_bytes)
  logits_loss      storages allocated by lm_head's forward and the loss function, and by their
                   backward ops (logits, fp32 upcast, log-softmax, grad of logits)
  temporaries      dequantized weights from bitsandbytes dequantize ops in forward/backward, and
                   allocations inside optimizer.step that are not state
  activations      everything else allocated in forward/backward (including the input ids)

By default only a few decoder layers run and the step of the full depth is rebuilt from them
(_shortcut.py: decoder layers are identical, so the full step repeats one layer's forward and backward);
`run(..., exact=True)` executes every layer.
"""
from __future__ import annotations

import gc
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Callable

from vramplan.core._components import ALLOCATED, Component, check_sum
from vramplan.core._record import record
from vramplan.core._setup import TrainSetup
from vramplan.simulate._attribution import (LOGITS_REGION, StepContext, component_of, decoder_layers, module_names,
                                           register_live_state, short_name)
from vramplan.core._errors import require, SimulationError, VramplanError
from vramplan.simulate._build import build
from vramplan.simulate._reserved import CUBLAS_WORKSPACE

Progress = Callable[[str, int, int], None]   # (stage, done, total): decoder layers run so far
STEP_PHASES = ("forward", "backward", "optimizer")
TIMELINE_POINTS = 4096  # at most this many timeline rows are kept (max-preserving)


@record
class Trace:
    """One measured step. With the identical-layers shortcut (extrapolated=True) every field is
    computed from the rebuilt event sequence of the full depth (_shortcut.py): peak, components,
    peak place, phase_peaks, boundaries, paged_optimizer_bytes, attention, top_modules and timeline are
    those of the full trace (tests/test_simulate_layers.py checks them field for field); only
    seconds, notes, layers_traced and extrapolated differ, and strays counts the traced model's."""
    model: str
    setup: dict
    device: str
    peak_allocated_bytes: int
    components: dict                 # component -> bytes at the peak instant; sums to the peak
    peak_phase: str
    peak_module: str
    peak_op: str
    phase_peaks: dict                # phase -> highest allocated bytes inside it
    boundaries: dict                 # allocated bytes at start, forward_end, backward_end, optimizer_end
    paged_optimizer_bytes: int       # paged optimizer state in CUDA unified memory, not allocated
    top_modules: list                # [(module, bytes)] allocated in the step and live at the peak
    timeline: list = field(repr=False)   # [(event, phase, module, op, allocated_bytes)]
    attention: dict = field(default_factory=dict)  # sdpa calls routed to flash / efficient / math
    strays: int = 0                  # device storages found live but never registered (should be 0)
    seconds: float = 0.0
    notes: tuple = ()
    layers_traced: int = 0           # decoder layers executed (all of them unless extrapolated)
    extrapolated: bool = False       # True: the identical-layers shortcut rebuilt the full depth
    model_info: dict = field(default_factory=dict, repr=False)  # ModelSpec.to_dict(): `model` in to_dict
    cuda_arch: dict = field(default_factory=dict)  # the GPU architecture emulated (cuda.arch.CudaArch.to_dict)
    # the step's storages replayed as two steps through the caching-allocator model (_reserved.py)
    peak_reserved_bytes: int = 0
    fragmentation_bytes: int = 0
    alloc_conf: str = ""
    # with a GPU: the verdict estimate gives (core/_verdict.py) on this step's own replay, the
    # replay against the card where the unlimited one passes it (estimate.card_outcome)
    gpu: dict | None = None          # {"name", "memory_bytes"}
    cuda_context_bytes: int | None = None
    device_total_bytes: int | None = None
    status: str | None = None        # fits / tight / no
    headroom_bytes: int | None = None
    allocator_oom: dict | None = None
    allocator_retries: int = 0
    smallest_gpu_bytes: int | None = None   # where it does not fit: the least card it runs on (estimate's)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["timeline"] = [list(row) for row in self.timeline]
        d["top_modules"] = [list(row) for row in self.top_modules]
        d["notes"] = list(self.notes)
        d["model"] = d.pop("model_info") or {"id": self.model}  # the shared model object
        d["fits"] = None if self.status is None else self.status != "no"   # as estimate's JSON says it
        return d


def _downsample(rows: list, limit: int) -> list:
    if len(rows) <= limit:
        return rows
    step = -(-len(rows) // limit)
    out = []
    for i in range(0, len(rows), step):
        chunk = rows[i:i + step]
        out.append(max(chunk, key=lambda r: r[-1]))
    return out


def require_packages(setup: TrainSetup) -> None:
    """DependencyError (pip install 'vramplan[simulate]') unless what this setup needs is installed:
    torch, transformers, peft, and bitsandbytes for quantization or its optimizers. Imports them
    (once per process) with the collector paused (collector_paused)."""
    import logging

    # bitsandbytes logs a warning at import on CPU-only machines (no `kernels` package for its
    # optional fused CPU gemm); it says nothing about the simulated GPU.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    with collector_paused():
        for module in ("torch", "transformers", "peft"):
            require(module, "simulate")
        if setup.method == "qlora" or setup.optimizer not in ("adamw", "sgd", "adafactor"):
            require("bitsandbytes", "simulate")


@contextmanager
def collector_paused():
    """Python's cyclic garbage collector off inside, as it was afterwards. Its full passes walk
    every object alive, torch's and transformers' hundreds of thousands of module-level objects
    included: importing them sets off a dozen (about 1 s of a 70B simulate), a 70B step a few
    more (a few tenths of a second each), and they find next to nothing. The step's storages die
    when their last reference goes, which is when the tracker counts them free."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@dataclass
class Measured:
    """What a measured step gives trace(): from the tracker itself, or replayed (_shortcut.py)."""
    peak_bytes: int
    peak_where: tuple
    peak_op: str
    phase_max: dict
    boundary: dict
    timeline: list               # [(event, where, op, allocated)]
    live_at_peak: list           # [(size, component, op, module)] in allocation order
    strays: int
    paged: int
    attention: dict

    @classmethod
    def from_tracker(cls, tracker, boundary: dict, paged: int, attention: dict) -> "Measured":
        peak = tracker.peak
        live = [(b.size, component_of(b), b.op, b.where[1] if len(b.where) > 1 else "")
                for b in tracker.live_at(peak.event)]
        return cls(peak.bytes, peak.where, peak.op, dict(tracker.phase_max), dict(boundary),
                   list(tracker.timeline), live, len(tracker.strays), paged, attention)


class Simulation:
    """The built model and the patches a meta step needs, as a context manager:

        with Simulation(spec, setup) as sim:
            sim.warm_up()             # step 1: optimizer state appears, nothing recorded
            tracker = sim.measure()   # step 2, every storage counted
        trace = sim.trace(tracker)

    A step that fails raises SimulationError naming the phase, module and op where it failed."""

    def __init__(self, spec, setup: TrainSetup, device: str = "meta", progress: Progress | None = None,
                 arch=None):
        import warnings

        from vramplan.simulate import _kernels as kernels  # imports torch: loaded on use

        from vramplan.cuda._arch import ASSUMED

        require_packages(setup)
        self._paged_before = len(_paged_registry())
        self.spec, self.setup, self.device = spec, setup, device
        self.arch = arch or ASSUMED
        self.meta = device == "meta"
        self.progress = progress
        if progress is not None:
            progress("building the model", 0, 0)
        with warnings.catch_warnings(), _quiet_transformers():
            warnings.simplefilter("ignore")
            self.built = build(spec, setup, device)
        model = self.built.model
        names = module_names(model)
        self.ctx = StepContext(names.get(self.built.lm_head, "lm_head"))
        self.ctx.install(model, names)
        self.ctx.wrap_loss(model.get_base_model() if hasattr(model, "get_base_model") else model)
        self.layers_name, layer_modules = decoder_layers(model)
        self.n_layers = len(layer_modules)
        self.ctx.layer_names = {names[m] for m in layer_modules}
        self.ctx.on_layer = self._layer_ran if progress is not None else None
        self._stage, self._done = "", 0
        self.routing = kernels.Routing(spec.num_experts, spec.experts_per_tok, setup.tokens)
        self.overrides = kernels.cuda_overrides(self.routing, self.arch) if self.meta else kernels.mode_overrides()
        self.sdpa = kernels.SdpaRouting(self.arch) if self.meta else None
        self.cublas = kernels.CublasWorkspace(self.arch) if self.meta else None
        self.layouts = kernels.MetaLayouts() if self.meta else None   # shared by this simulation's trackers
        self.boundary: dict[str, int] = {}
        self.paged: list[int] = []
        self.grad_params: dict = {}     # Block of a .grad -> short parameter name (measured step)
        self._stack = None

    def __enter__(self):
        import contextlib
        import warnings

        from vramplan.simulate import _kernels as kernels  # imports torch: loaded on use

        self._stack = contextlib.ExitStack()
        self._stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore")  # library advice (deprecations, CPU fallbacks) for interactive users
        self._stack.enter_context(_quiet_transformers())
        if self.meta:
            self._stack.enter_context(kernels.paged_state_on(self.device))
            self._stack.enter_context(kernels.autocast_accepts_meta())
            self._stack.enter_context(self.sdpa)
            self._stack.enter_context(kernels.cuda_dropout())
            if self.setup.autocast:
                from vramplan.simulate import _autocast as autocast
                self._stack.enter_context(autocast.emulate_cuda_autocast())
                self._stack.enter_context(autocast.sdpa_autocast())
            if self.setup.loss == "chunked":
                from vramplan.simulate._chunked_loss import trl_cuda_path
                self._stack.enter_context(trl_cuda_path(self.device))
        return self

    def __exit__(self, *exc):
        self.ctx.remove()
        self._stack.close()
        del _paged_registry()[self._paged_before:]   # this simulation's paged optimizer state

    # --- progress -------------------------------------------------------------------------------
    def _layer_ran(self, _name: str) -> None:
        self._done += 1
        self.progress(self._stage, self._done, 2 * self.n_layers)

    def _begin(self, stage: str) -> None:
        self._stage, self._done = stage, 0
        if self.progress is not None:
            self.progress(stage, 0, 2 * self.n_layers)

    # --- the step ------------------------------------------------------------------------------
    def step(self, tracker) -> None:
        model, opt, ids, ctx, boundary = self.built.model, self.built.optimizer, self.built.input_ids, \
            self.ctx, self.boundary
        self.routing.calls = 0
        ctx.failed_module = None
        try:
            boundary["start"] = tracker.allocated
            # gradient accumulation: a second micro-step runs beside every .grad and adds its
            # gradients into them (estimate/_walk.py accumulating); later ones repeat it
            for micro in range(2 if self.setup.accumulates else 1):
                if micro and not self.setup.outputs_outlive_step:
                    self.held = None      # `del out` at the end of the micro-step (plain-del)
                ctx.phase = "forward"
                tracker.mark()
                loss = self.forward_loss(model, ids)
                boundary["forward_end"] = tracker.allocated
                ctx.phase, ctx.region, ctx.bw_module = "backward", LOGITS_REGION, "loss"
                tracker.mark()
                loss.backward()
                del loss
                ctx.region, ctx.bw_module = "", ""
                boundary["backward_end"] = tracker.allocated
                self.grad_params = {}
                for name, p in model.named_parameters():
                    if p.grad is not None:
                        block = tracker.retag(p.grad, Component.GRADIENTS.value)
                        if block is not None:
                            self.grad_params[block] = short_name(name)
            ctx.phase = "optimizer"
            tracker.mark()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if not self.setup.outputs_outlive_step:
                self.held = None      # `del out` at the end of the step (plain-del)
            boundary["optimizer_end"] = tracker.allocated
            tracker.mark()
            ctx.phase = "done"
        except Exception as exc:
            if isinstance(exc, VramplanError):
                raise
            raise self.failure(tracker, exc) from exc

    def forward_loss(self, model, ids):
        """The loop body's forward (loop_forward); a plain loop's outputs are kept as `held`."""
        loss, out = loop_forward(model, ids, self.setup)
        if out is not None:
            self.held = out       # the previous step's outputs die only now
        return loss

    def held_tensors(self) -> list:
        """The tensors of the previous step's outputs a plain loop still references."""
        import torch
        from torch.utils._pytree import tree_leaves

        held = getattr(self, "held", None)
        if held is None:
            return []
        values = held.values() if hasattr(held, "values") else vars(held).values()
        outputs = [t for t in tree_leaves(list(values)) if isinstance(t, torch.Tensor)]
        return outputs + graph_leaves(outputs)

    def failure(self, tracker, exc: BaseException):
        """SimulationError: which phase, module and op a failing step stopped in."""

        where = getattr(tracker, "failure", None)
        op, context = where if where else ("", None)
        phase, module = self.ctx.phase, ""
        if context:
            phase, module = context[0], context[1] if len(context) > 1 else ""
        if self.ctx.failed_module is not None and self.ctx.failed_module[1] is exc and not op:
            module = self.ctx.failed_module[0]   # raised in Python code, not by an op
        module = module or (self.ctx.stack[-1] if self.ctx.stack else self.ctx.bw_module) or phase
        detail = " ".join(str(exc).split()) or "no message"
        if len(detail) > 300:
            detail = detail[:297] + "..."
        at = f"module {module}" + (f", op {op}" if op else "")
        return SimulationError(f"the simulated {phase} step failed in {at}: {type(exc).__name__}: {detail}",
                               hint="vramplan estimate still works; please report this model and setup")

    def tracker(self, recording: bool = True):
        from vramplan.simulate._oplog import StepTracker  # imports torch: loaded on use

        strays = "count" if (self.meta and recording) else "ignore"
        tracker = StepTracker(self.device, self.ctx, self.overrides, strays=strays, layouts=self.layouts)
        tracker.recording = recording
        return tracker

    def warm_up(self) -> None:
        tracker = self.tracker(recording=False)
        self._begin("warm-up step")
        with tracker:
            self.step(tracker)
        if self.sdpa is not None:
            self.sdpa.counts = dict.fromkeys(self.sdpa.counts, 0)

    def live_tracker(self):
        """A tracker holding everything live before the measured step."""
        tracker = self.tracker()
        self.paged = []
        register_live_state(tracker, self.built, self.paged, self.spec, self.setup)
        if self.cublas is not None:   # made by the warm-up step's first matmuls, cached since
            for workspace in self.cublas.tensors():
                tracker.track(workspace, Component.TEMPORARIES.value, op=CUBLAS_WORKSPACE)
        for t in self.held_tensors():   # the previous step's outputs: activations, as in the estimate
            tracker.track(t, Component.ACTIVATIONS.value)
        return tracker

    def measure(self):
        tracker = self.live_tracker()
        self._begin("measured step")
        with tracker:
            self.step(tracker)
        return tracker

    # --- the result -----------------------------------------------------------------------------
    def trace(self, tracker, seconds: float = 0.0) -> Trace:
        measured = Measured.from_tracker(tracker, self.boundary, sum(self.paged),
                                         dict(self.sdpa.counts) if self.sdpa is not None else {})
        return make_trace(self.spec, self.setup, self.device, measured, seconds,
                          layers_traced=self.n_layers, extrapolated=False, notes=self.assumptions(tracker), arch=self.arch)

    def assumptions(self, tracker) -> tuple[str, ...]:
        """What a meta step had to assume where it has no CUDA stand-in: data-dependent answers
        given by a general rule, MoE routing, ops of unknown kernel libraries (_kernels.py)."""
        if not self.meta:
            return ()
        from vramplan.simulate import _kernels as kernels

        foreign = kernels.unknown_kernel_note(getattr(tracker, "foreign_ops", ()))
        layers = kernels.layer_kernel_note(self.spec, self.built.model)
        return self.routing.notes() + tuple(n for n in (foreign, layers) if n)


def graph_leaves(outputs) -> list:
    """The tensors the autograd graph behind `outputs` still holds after backward: every leaf that
    is not a parameter (the embedding output enable_input_require_grads made a leaf) and the `.grad`
    backward accumulated into it. Backward frees the saved tensors (release_variables), not the
    graph's nodes, and an AccumulateGrad node holds its leaf (torch/csrc/autograd/functions/
    accumulate_grad.h `variable`)."""
    import torch

    seen, stack, out = set(), [t.grad_fn for t in outputs if t.grad_fn is not None], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        leaf = getattr(node, "variable", None)
        if isinstance(leaf, torch.Tensor) and not isinstance(leaf, torch.nn.Parameter):
            out.append(leaf)
            if leaf.grad is not None:
                out.append(leaf.grad)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return out


def loop_forward(model, ids, setup: TrainSetup):
    """The loop body's forward as the recipe runs it (docs/recipes.md), shared by simulate and
    profile: `loss = model(...).loss` with the outputs dropped (trainer), or `out = model(...)`
    kept by the caller until the next step's forward returns (plain) or until the step ends
    (plain-del); TRL's chunked loss is
    SFTTrainer.compute_loss: -outputs.log_probs summed over the labelled tokens. Returns (loss,
    the outputs the loop keeps, else None)."""
    if setup.loss == "chunked":
        out = model(input_ids=ids, labels=ids, fused_lm_head=True)
        loss = (-out.log_probs).sum() / out.label_mask.sum().clamp(min=1)
    else:
        out = model(input_ids=ids, labels=ids)
        loss = out.loss
    return loss, (out if setup.holds_outputs else None)


def _paged_registry() -> list:
    """bitsandbytes keeps every paged tensor it creates in one process-wide list for prefetching
    (bitsandbytes/functional.py GlobalPageManager.paged_tensors); a simulated optimizer's tensors
    must not outlive its simulation. Empty when bitsandbytes was never imported."""
    import sys

    functional = sys.modules.get("bitsandbytes.functional")
    return functional.GlobalPageManager.get_instance().paged_tensors if functional is not None else []


def make_trace(spec, setup: TrainSetup, device: str, m: Measured, seconds: float = 0.0, *,
               layers_traced: int = 0, extrapolated: bool = False, notes: tuple = (), arch=None) -> Trace:
    from vramplan.cuda._arch import ASSUMED

    arch = arch or ASSUMED
    components = {c.value: 0 for c in ALLOCATED}
    by_module: dict[str, int] = {}
    for size, component, op, module in m.live_at_peak:
        components[component] += size
        if op not in ("live", "stray", CUBLAS_WORKSPACE):
            by_module[module] = by_module.get(module, 0) + size
    check_sum(components, m.peak_bytes)
    starts = {"forward": "start", "backward": "forward_end", "optimizer": "backward_end"}
    phase_peaks = {p: max(m.phase_max.get(p, 0), m.boundary.get(starts[p], 0)) for p in STEP_PHASES}
    timeline = [(event, where[0] if where else "", where[1] if len(where) > 1 else "", op, allocated)
                for event, where, op, allocated in m.timeline]
    all_notes = []
    if device == "meta":
        all_notes.append(f"CUDA emulated: the kernels of the {arch.describe()} (SDPA backend, bitsandbytes "
                         f"gemm_4bit dispatch, backward workspaces, a {arch.label} cuBLAS workspace)")
    all_notes += list(notes)
    if m.strays:
        all_notes.append(f"{m.strays} device storages were live but not registered before the step")
    top = sorted(by_module.items(), key=lambda kv: -kv[1])[:20]
    return Trace(
        model=spec.id, setup=setup.to_dict(), device=device,
        peak_allocated_bytes=m.peak_bytes, components=components,
        peak_phase=m.peak_where[0] if m.peak_where else "",
        peak_module=m.peak_where[1] if len(m.peak_where) > 1 else "",
        peak_op=m.peak_op, phase_peaks=phase_peaks,
        boundaries={k: m.boundary[k] for k in ("start", "forward_end", "backward_end", "optimizer_end")},
        paged_optimizer_bytes=m.paged, top_modules=top, timeline=_downsample(timeline, TIMELINE_POINTS),
        attention=dict(m.attention), strays=m.strays, seconds=round(seconds, 3), notes=tuple(all_notes),
        layers_traced=layers_traced, extrapolated=extrapolated, model_info=spec.to_dict(),
        cuda_arch=arch.to_dict() if device == "meta" else {},
    )


def _quiet_transformers():
    """transformers logs advice meant for interactive users (use_cache vs checkpointing...)."""
    import contextlib

    @contextlib.contextmanager
    def quiet():
        from transformers.utils import logging as hf_logging

        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            yield
        finally:
            hf_logging.set_verbosity(level)

    return quiet()
