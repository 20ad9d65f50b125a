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
  optimizer_state  tensors in optimizer.state (paged state is reported apart, in paged_bytes)
  logits_loss      storages allocated by lm_head's forward and the loss function, and by their
                   backward ops (logits, fp32 upcast, log-softmax, grad of logits)
  temporaries      dequantized weights from bitsandbytes dequantize ops in forward/backward, and
                   allocations inside optimizer.step that are not state
  activations      everything else allocated in forward/backward (including the input ids)

By default only a few decoder layers run and the step of the full depth is rebuilt from them
(layers.py: decoder layers are identical, so the full step repeats one layer's forward and backward);
`run(..., exact=True)` executes every layer.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable

from ..components import ALLOCATED, Component, check_sum
from ..setup import TrainSetup

STEP_PHASES = ("forward", "backward", "optimizer")
LOGITS_REGION = "logits_loss"
TIMELINE_POINTS = 4096  # at most this many timeline rows are kept (max-preserving)


@dataclass(frozen=True)
class Trace:
    """One measured step. With the identical-layers shortcut (extrapolated=True) every field is
    computed from the rebuilt event sequence of the full depth (layers.py): peak, components,
    peak place, phase_peaks, boundaries, paged_bytes, attention, top_modules and timeline are
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
    paged_bytes: int                 # paged optimizer state in CUDA unified memory, not allocated
    top_modules: list                # [(module, bytes)] allocated in the step and live at the peak
    timeline: list = field(repr=False)   # [(event, phase, module, op, allocated_bytes)]
    attention: dict = field(default_factory=dict)  # sdpa calls routed to flash / efficient / math
    strays: int = 0                  # device storages found live but never registered (should be 0)
    seconds: float = 0.0
    notes: tuple = ()
    layers_traced: int = 0           # decoder layers executed (all of them unless extrapolated)
    extrapolated: bool = False       # True: the identical-layers shortcut rebuilt the full depth

    def to_dict(self) -> dict:
        d = asdict(self)
        d["timeline"] = [list(row) for row in self.timeline]
        d["top_modules"] = [list(row) for row in self.top_modules]
        d["notes"] = list(self.notes)
        return d


class StepContext:
    """Where execution is: phase, module and the component newly allocated storages default to.

    Forward: a module stack from forward pre/post hooks (recomputation under gradient
    checkpointing fires them again inside backward). Backward: a tensor hook on each module
    output fires when its gradient is ready (that module's backward starts), a hook on its input
    when the input's gradient is ready (it ends). Backward starts in the loss, then lm_head."""

    def __init__(self, lm_head_name: str):
        self.phase = "setup"
        self.stack: list[str] = []
        self.bw_module = ""
        self.region = ""              # "logits_loss" inside lm_head / the loss function
        self.lm_head = lm_head_name
        self.lm_ancestors: set[str] = set()   # modules whose subtree holds lm_head
        self.handles = []
        self.layer_names: set[str] = set()    # decoder layers: on_layer() fires as each one runs
        self.on_layer: Callable[[str], None] | None = None
        self.failed_module: tuple | None = None   # (module, exception) of an exception leaving a module

    def __call__(self) -> tuple:
        module = self.stack[-1] if self.stack else self.bw_module
        tag = None
        if self.phase == "optimizer":
            tag = Component.TEMPORARIES.value
        elif self.region == LOGITS_REGION or module == self.lm_head or module.startswith(self.lm_head + "."):
            tag = Component.LOGITS_LOSS.value
            if self.region == LOGITS_REGION and module in self.lm_ancestors:
                module = "loss"  # the loss function, called by the top-level model
        return (self.phase, module or self.phase, tag)

    # --- hooks ---------------------------------------------------------------------------------
    def install(self, model, names: dict) -> None:
        import sys

        import torch
        from torch.utils._pytree import tree_leaves

        def pre(module, args, kwargs):
            name = names[module]
            self.stack.append(name)
            if self.on_layer is not None and self.phase == "forward" and name in self.layer_names:
                self.on_layer(name)
            if torch.is_grad_enabled():
                for t in tree_leaves((args, kwargs)):
                    if isinstance(t, torch.Tensor) and t.requires_grad and t.grad_fn is not None:
                        t.register_hook(lambda g, n=name: self._bw_leave(n))
                        break

        def post(module, args, out):
            name = names[module]
            exc = sys.exc_info()[1]  # always_call hooks also run while an exception leaves the module
            if exc is not None and type(exc).__name__ != "_StopRecomputationError" \
                    and (self.failed_module is None or self.failed_module[1] is not exc):
                self.failed_module = (name, exc)  # the innermost module sees it first
            if self.stack and self.stack[-1] == name:
                self.stack.pop()
            elif name in self.stack:
                self.stack.remove(name)
            if torch.is_grad_enabled():
                for t in tree_leaves(out):
                    if isinstance(t, torch.Tensor) and t.requires_grad and t.grad_fn is not None:
                        t.register_hook(lambda g, n=name: self._bw_enter(n))

        for module in model.modules():
            if any(names.get(m) == self.lm_head for m in module.modules()):
                self.lm_ancestors.add(names[module])
        for module in model.modules():
            if module in names:
                self.handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
                # always_call: checkpoint recomputation stops early by raising inside the forward
                self.handles.append(module.register_forward_hook(post, always_call=True))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def _bw_enter(self, name: str) -> None:
        self.bw_module = name
        if self.on_layer is not None and name in self.layer_names:
            self.on_layer(name)
        if self.region == LOGITS_REGION and name not in self.lm_ancestors \
                and not name.startswith(self.lm_head + "."):
            self.region = ""  # backward reached a module before lm_head's: logits are done

    def _bw_leave(self, name: str) -> None:
        # hooks on one tensor fire in registration order: the input of lora_B is the output of
        # lora_A, so "leave lora_B" may come after "enter lora_A"; leave only what is current.
        if self.bw_module == name or self.bw_module.startswith(name + "."):
            self.bw_module = name.rsplit(".", 1)[0] if "." in name else ""
        if name == self.lm_head:
            self.region = ""  # the gradient has left lm_head: logits and loss are done

    def wrap_loss(self, base) -> None:
        """Mark the loss function as the logits_loss region (transformers' loss_function setter)."""
        loss_fn = base.loss_function

        def loss_function(*args, **kwargs):
            outer = self.region
            self.region = LOGITS_REGION
            try:
                return loss_fn(*args, **kwargs)
            finally:
                self.region = outer

        base.loss_function = loss_function


def _module_names(model) -> dict:
    """Readable names: peft's 'base_model.model.' prefix dropped."""
    names = {}
    for name, module in model.named_modules():
        short = name.removeprefix("base_model.model.")
        names[module] = type(module).__name__ if short in ("", "base_model", "base_model.model") else short
    return names


def short_name(name: str) -> str:
    """A parameter / module name as _module_names shows it (peft's prefix dropped)."""
    return name.removeprefix("base_model.model.")


def decoder_layers(model) -> tuple[str, list]:
    """(short name of the decoder layer list, its modules): the largest nn.ModuleList of the model."""
    import torch

    best = ("", [])
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > len(best[1]):
            best = (short_name(name), list(module))
    return best


def _register_live_state(tracker, built, paged: list) -> None:
    """Everything on the device before the step: quant state, parameters, buffers, optimizer state,
    the batch. Order matters only for storages shared between two of these (none expected)."""
    from . import kernels

    model = built.model
    quantized = []
    for module in model.modules():
        weight = getattr(module, "weight", None)
        qs = getattr(weight, "quant_state", None)
        if qs is not None:
            quantized.append(tracker.track(weight, Component.WEIGHTS.value))  # the packed 4-bit weight
            for t in (qs.absmax, qs.code, qs.offset):
                quantized.append(tracker.track(t, Component.QUANT_CONSTANTS.value))
            if qs.state2 is not None:
                quantized.append(tracker.track(qs.state2.absmax, Component.QUANT_CONSTANTS.value))
                quantized.append(tracker.track(qs.state2.code, Component.QUANT_CONSTANTS.value))
        state = getattr(module, "state", None)  # bnb Linear8bitLt MatmulLtState
        if state is not None and hasattr(state, "SCB"):
            quantized.append(tracker.track(weight, Component.WEIGHTS.value))
            quantized.append(tracker.track(state.CB, Component.WEIGHTS.value))
            quantized.append(tracker.track(state.SCB, Component.QUANT_CONSTANTS.value))
            quantized.append(tracker.track(getattr(weight, "SCB", None), Component.QUANT_CONSTANTS.value))
    # What an op builds from a quantized weight or its constants is a dequantized copy
    # (MatMul8bitLt.backward: CB.to(dtype).mul_(SCB / 127); functional.dequantize_4bit), except
    # the bitsandbytes matmuls themselves, whose outputs are activations.
    tracker.propagate = {b.key: Component.TEMPORARIES.value for b in quantized if b is not None}
    tracker.propagate_skip = kernels.matmul_ops()
    for name, p in model.named_parameters():
        tag = Component.ADAPTERS if "lora_" in name else Component.WEIGHTS
        tracker.track(p, tag.value)
    for _, b in model.named_buffers():
        tracker.track(b, Component.WEIGHTS.value)
    register_optimizer_state(tracker, built.optimizer, paged)
    tracker.track(built.input_ids, Component.ACTIVATIONS.value)


def register_optimizer_state(tracker, optimizer, paged: list) -> None:
    """optimizer.state on the device; paged state (CUDA unified memory) only adds to `paged`."""
    import torch

    from . import kernels

    for state in optimizer.state.values():
        for key, v in state.items():
            if not isinstance(v, torch.Tensor):
                continue
            if kernels.is_paged(v):
                paged.append(v.untyped_storage().nbytes())
                tracker.ignore(v)
            elif key == "step" and v.dim() == 0 and tracker.device_type == "cpu":
                # torch.optim keeps `step` on the host unless capturable/fused (adam.py
                # _init_group); a real CPU run has it on its only device: not counted.
                tracker.ignore(v)
            else:
                tracker.track(v, Component.OPTIMIZER_STATE.value)


def _component(block) -> str:
    from . import kernels

    if block.tag == "stray":  # should not happen (Trace.strays counts them): the step made it
        return Component.ACTIVATIONS.value
    if block.tag is not None:
        return block.tag
    _phase, _module, tag = block.where
    if block.op in kernels.DEQUANT_OPS:
        return Component.TEMPORARIES.value
    return tag or Component.ACTIVATIONS.value


def _downsample(rows: list, limit: int) -> list:
    if len(rows) <= limit:
        return rows
    step = -(-len(rows) // limit)
    out = []
    for i in range(0, len(rows), step):
        chunk = rows[i:i + step]
        out.append(max(chunk, key=lambda r: r[-1]))
    return out


Progress = Callable[[str, int, int], None]   # (stage, done, total): decoder layers run so far


def run(spec, setup: TrainSetup, device: str = "meta", exact: bool = False,
        progress: Progress | None = None) -> Trace:
    """Simulate one steady-state training step of `spec` under `setup` on `device`.

    device "meta" emulates a CUDA GPU (no memory, no compute: shapes only); "cpu" runs the same
    step for real on small models (the check that the meta emulation is faithful).

    On meta, unless `exact`, a model deeper than layers.TRACED_LAYERS decoder layers is traced at
    that depth and the step of the full depth is rebuilt from it (layers.py): the same result,
    byte for byte, in a fraction of the time and memory. It falls back to the full trace by
    itself when the traced layers turn out not to be identical.

    progress(stage, done, total) is called as decoder layers run (forward and backward of the
    warm-up and of the measured step)."""
    if device not in ("meta", "cpu"):
        from ..errors import UsageError
        raise UsageError(f"simulate runs on 'meta' (or 'cpu' for small real runs), not {device!r}",
                         hint="use `vramplan profile` to measure on a GPU")
    t0 = time.perf_counter()
    require_packages(setup)
    notes: list[str] = []
    if device == "meta" and not exact:
        from . import layers

        if layers.applies(spec):
            trace, why = layers.run_shortcut(spec, setup, progress=progress)
            if trace is not None:
                return _with_seconds(trace, time.perf_counter() - t0)
            notes.append(f"identical-layers shortcut not used ({why}): every layer traced")
    with Simulation(spec, setup, device, progress=progress) as sim:
        sim.warm_up()
        tracker = sim.measure()
        trace = sim.trace(tracker, time.perf_counter() - t0)
    if notes:
        import dataclasses
        trace = dataclasses.replace(trace, notes=trace.notes + tuple(notes))
    return trace


def _with_seconds(trace: Trace, seconds: float) -> Trace:
    import dataclasses
    return dataclasses.replace(trace, seconds=round(seconds, 3))


def require_packages(setup: TrainSetup) -> None:
    """DependencyError (pip install 'vramplan[simulate]') unless what this setup needs is installed:
    torch, transformers, peft, and bitsandbytes for quantization or its optimizers."""
    import logging

    from ..errors import require

    # bitsandbytes logs a warning at import on CPU-only machines (no `kernels` package for its
    # optional fused CPU gemm); it says nothing about the simulated GPU.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    for module in ("torch", "transformers", "peft"):
        require(module, "simulate")
    if setup.method == "qlora" or setup.optimizer not in ("adamw", "sgd", "adafactor"):
        require("bitsandbytes", "simulate")


_require = require_packages


@dataclass
class Measured:
    """What a measured step gives trace(): from the tracker itself, or replayed (layers.py)."""
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
        live = [(b.size, _component(b), b.op, b.where[1] if len(b.where) > 1 else "")
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

    def __init__(self, spec, setup: TrainSetup, device: str = "meta", progress: Progress | None = None):
        import warnings

        from . import kernels
        from .build import build

        require_packages(setup)
        self.spec, self.setup, self.device = spec, setup, device
        self.meta = device == "meta"
        self.progress = progress
        if progress is not None:
            progress("building the model", 0, 0)
        with warnings.catch_warnings(), _quiet_transformers():
            warnings.simplefilter("ignore")
            self.built = build(spec, setup, device)
        model = self.built.model
        names = _module_names(model)
        self.ctx = StepContext(names.get(self.built.lm_head, "lm_head"))
        self.ctx.install(model, names)
        self.ctx.wrap_loss(model.get_base_model() if hasattr(model, "get_base_model") else model)
        self.layers_name, layer_modules = decoder_layers(model)
        self.n_layers = len(layer_modules)
        self.ctx.layer_names = {names[m] for m in layer_modules}
        self.ctx.on_layer = self._layer_ran if progress is not None else None
        self._stage, self._done = "", 0
        self.routing = kernels.Routing(spec.num_experts, spec.experts_per_tok, setup.tokens)
        self.overrides = kernels.cuda_overrides(self.routing) if self.meta else {}
        self.sdpa = kernels.SdpaRouting() if self.meta else None
        self.boundary: dict[str, int] = {}
        self.paged: list[int] = []
        self.grad_params: dict = {}     # Block of a .grad -> short parameter name (measured step)
        self._stack = None

    def __enter__(self):
        import contextlib
        import warnings

        from . import kernels

        self._stack = contextlib.ExitStack()
        self._stack.enter_context(warnings.catch_warnings())
        warnings.simplefilter("ignore")  # library advice (deprecations, CPU fallbacks) for interactive users
        self._stack.enter_context(_quiet_transformers())
        if self.meta:
            self._stack.enter_context(kernels.paged_state_on(self.device))
            self._stack.enter_context(kernels.autocast_accepts_meta())
            self._stack.enter_context(self.sdpa)
            self._stack.enter_context(kernels.cuda_dropout())
        return self

    def __exit__(self, *exc):
        self.ctx.remove()
        self._stack.close()

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
            ctx.phase = "forward"
            boundary["start"] = tracker.allocated
            tracker.mark()
            loss = model(input_ids=ids, labels=ids).loss
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
            boundary["optimizer_end"] = tracker.allocated
            tracker.mark()
            ctx.phase = "done"
        except Exception as exc:
            from ..errors import VramplanError
            if isinstance(exc, VramplanError):
                raise
            raise self.failure(tracker, exc) from exc

    def failure(self, tracker, exc: BaseException):
        """SimulationError: which phase, module and op a failing step stopped in."""
        from ..errors import SimulationError

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
        from .oplog import StepTracker

        strays = "count" if (self.meta and recording) else "ignore"
        tracker = StepTracker(self.device, self.ctx, self.overrides, strays=strays)
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
        _register_live_state(tracker, self.built, self.paged)
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
                          layers_traced=self.n_layers, extrapolated=False)


def make_trace(spec, setup: TrainSetup, device: str, m: Measured, seconds: float = 0.0, *,
               layers_traced: int = 0, extrapolated: bool = False, notes: tuple = ()) -> Trace:
    components = {c.value: 0 for c in ALLOCATED}
    by_module: dict[str, int] = {}
    for size, component, op, module in m.live_at_peak:
        components[component] += size
        if op not in ("live", "stray"):
            by_module[module] = by_module.get(module, 0) + size
    check_sum(components, m.peak_bytes)
    starts = {"forward": "start", "backward": "forward_end", "optimizer": "backward_end"}
    phase_peaks = {p: max(m.phase_max.get(p, 0), m.boundary.get(starts[p], 0)) for p in STEP_PHASES}
    timeline = [(event, where[0] if where else "", where[1] if len(where) > 1 else "", op, allocated)
                for event, where, op, allocated in m.timeline]
    all_notes = []
    if device == "meta":
        all_notes.append("CUDA emulated: sdpa routed as on sm80+ (flash without mask, efficient with one); "
                         "bitsandbytes gemm_4bit dispatch as on an H100 (sm90, 132 SMs)")
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
        paged_bytes=m.paged, top_modules=top, timeline=_downsample(timeline, TIMELINE_POINTS),
        attention=dict(m.attention), strays=m.strays, seconds=round(seconds, 3), notes=tuple(all_notes),
        layers_traced=layers_traced, extrapolated=extrapolated,
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
