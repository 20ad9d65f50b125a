"""A small allocation tracker: a TorchDispatchMode that sees every storage an op creates and,
through weak references to the UntypedStorage objects (as torch.distributed._tools.mem_tracker
does), every storage that dies. It counts storages, not tensors (views share a storage), rounds
each to the CUDA caching allocator's 512-byte granularity, and keeps the running total and its
peak: what torch.cuda.memory_allocated / max_memory_allocated would report on a GPU.

It knows nothing about models. Callers register what is live before the step (`track`), give a
`context()` callable that says where execution is (phase, module, default tag), may relabel a
storage later (`retag`: a buffer that became a .grad), and may install `overrides` that replace an
op by a stand-in (_kernels.py); stand-ins run their sub-ops through `run` so they are counted too.

PyTorch's own MemTracker is not used: it registers grad hooks on every parameter, which fails on
frozen (requires_grad=False) quantized weights.
"""
from __future__ import annotations

import weakref
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# c10/cuda/CUDACachingAllocator.cpp: kMinBlockSize = 512, every request is rounded up to it.
GRANULARITY = 512


def round_up(nbytes: int, granularity: int = GRANULARITY) -> int:
    return -(-int(nbytes) // granularity) * granularity


@dataclass(eq=False)
class Block:
    """One storage: its rounded size, when it was allocated and freed (event numbers) and why."""
    key: int
    size: int                 # bytes, rounded to GRANULARITY
    nbytes: int               # bytes as the storage reports them
    alloc_event: int
    tag: str | None           # component name, or None: decided from `where` at the end
    where: tuple = ()         # context() at allocation: (phase, module, default tag)
    op: str = ""
    free_event: int | None = None
    # the backward node whose apply made it (its sequence number; None outside a backward
    # formula): kernels.engine_accumulation tells the engine's buffered gradient by it
    node: int | None = None
    # registered live state only: its part in the load (estimate/_load.py LoadTensor's role
    # and numel, and the LoadSettings); () where the load makes it as it is
    load: tuple = ()

    def live_at(self, event: int) -> bool:
        return self.alloc_event <= event and (self.free_event is None or event < self.free_event)


@dataclass
class Peak:
    bytes: int = 0
    event: int = 0
    where: tuple = ()
    op: str = ""


def storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


_OP_NAMES: dict = {}


def op_name(func) -> str:
    """'aten.mm.default', 'bitsandbytes.dequantize_4bit.default'."""
    name = _OP_NAMES.get(func)
    if name is None:
        ns = getattr(func, "namespace", "")
        name = getattr(func, "__name__", None)
        if name is None:
            name = str(func)
        name = _OP_NAMES[func] = f"{ns}.{name}" if ns else name
    return name


def tensors_in(tree) -> list:
    """The tensors of an op's arguments or results, in torch.utils._pytree.tree_leaves order. Ops
    nest tensors only in lists, tuples (torch.return_types included) and keyword dicts, which
    this walks without pytree's per-node type registry: the tracker does it for every op."""
    found: list = []
    _collect((tree,), found)
    return found


def _collect(items, found: list) -> None:
    for x in items:
        if isinstance(x, torch.Tensor):
            found.append(x)
        elif isinstance(x, (list, tuple)):
            _collect(x, found)
        elif isinstance(x, dict):
            _collect(x.values(), found)


class AllocationTracker(TorchDispatchMode):
    """Counts device storages created and freed while the mode is active.

    device: the device type whose storages count ("meta" emulates a GPU, "cpu" for real runs).
    context: () -> tuple, stored with each allocation (the simulator passes (phase, module, tag)).
    overrides: {OpOverload: fn(tracker, func, args, kwargs)} replacing ops by stand-ins.
    strays: what to do with a device storage an op reads that was never registered nor created
        under the mode: "count" it from that moment (flagged in `strays`), or "ignore" it (a real
        CPU run creates host tensors from Python data; on a GPU those would stay on the host).
    """

    def __init__(self, device: str = "meta", context=None, overrides=None, strays: str = "count"):
        super().__init__()
        self.device_type = device
        self.context = context or (lambda: ())
        self.overrides = dict(overrides or {})
        self.stray_policy = strays
        self.blocks: list[Block] = []
        self.strays: list[Block] = []
        self._live: dict[int, Block] = {}
        self._refs: dict[int, weakref.ref] = {}
        self._ignored: set[int] = set()
        self._ignored_refs: dict[int, weakref.ref] = {}
        self._tag_stack: list[str] = []
        # storages whose readers' outputs get a tag (quantized weights -> "temporaries": whatever
        # an op makes from a packed weight is a dequantized copy), except for the ops listed
        self.propagate: dict[int, str] = {}
        self.propagate_skip: set = set()
        self.allocated = 0
        self.peak = Peak()
        self.phase_max: dict = {}         # context()[0] -> highest total reached there
        self.event = 0
        self.op = ""                      # the op being dispatched (outermost)
        self.timeline: list[tuple] = []   # (event, context, op, allocated) after ops that changed it
        self._last_recorded = None
        self.recording = True

    # --- registration ---------------------------------------------------------------------------
    def track(self, t: torch.Tensor | None, tag: str, op: str = "live") -> Block | None:
        """Register a storage that is already live (parameters, optimizer state, inputs)."""
        if t is None or not isinstance(t, torch.Tensor) or t.device.type != self.device_type:
            return None
        key = storage_key(t)
        if key in self._live:
            return self._live[key]
        if key in self._ignored:
            return None
        return self._add(t.untyped_storage(), key, tag, op)

    def ignore(self, t: torch.Tensor | None) -> None:
        """Never count this storage (paged optimizer state; host-side tensors in a CPU run)."""
        if t is None or not isinstance(t, torch.Tensor):
            return
        st = t.untyped_storage()
        key = st._cdata
        if key in self._live:
            self._release(key)
        self._ignored.add(key)
        self._ignored_refs[key] = weakref.ref(st, lambda _r, k=key: self._forget_ignored(k))

    def retag(self, t: torch.Tensor | None, tag: str) -> Block | None:
        block = self.block_of(t)
        if block is not None:
            block.tag = tag
        return block

    def block_of(self, t: torch.Tensor | None) -> Block | None:
        if t is None or not isinstance(t, torch.Tensor) or t.device.type != self.device_type:
            return None
        return self._live.get(storage_key(t))

    @contextmanager
    def tagging(self, tag: str):
        """Storages allocated inside get this tag (stand-in kernels mark their temporaries)."""
        self._tag_stack.append(tag)
        try:
            yield
        finally:
            self._tag_stack.pop()

    def live_blocks(self) -> list[Block]:
        return list(self._live.values())

    # --- the mode ---------------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        outer = not self.op
        if outer:
            self.op = op_name(func)
        start_peak = self.peak.event
        try:
            override = self.overrides.get(func)
            if override is not None:
                out = override(self, func, args, kwargs)
                self._register(out, ())
            else:
                out = self.run(func, args, kwargs)
        finally:
            if outer:
                if self.recording and self.allocated != self._last_recorded:
                    if self.peak.event != start_peak and self.peak.bytes > self.allocated:
                        self.timeline.append((self.peak.event, self.peak.where, self.op, self.peak.bytes))
                    self.timeline.append((self.event, self.context(), self.op, self.allocated))
                    self._last_recorded = self.allocated
                self.op = ""
        return out

    def run(self, func, args=(), kwargs=None):
        """Execute one op (outside the mode) and count the storages it creates."""
        kwargs = kwargs or {}
        inputs = self._input_keys(args, kwargs)
        out = self._execute(func, args, kwargs, inputs)
        tag = None
        if self.propagate and func not in self.propagate_skip:
            tag = next((self.propagate[k] for k in inputs if k in self.propagate), None)
        self._register(out, inputs, tag)
        if func._schema.is_mutable:  # an out= or resize_ may have grown a storage in place
            self._resync(args, kwargs)
        return out

    def made(self, tensors) -> None:
        """Count the storages of new tensors a stand-in made itself, in order (what `run` of one
        aten.empty_strided per tensor would count)."""
        self._register(tensors, set())

    def _execute(self, func, args, kwargs, inputs):
        """The op itself (`inputs`: the storage keys it reads); a subclass may answer it faster."""
        return func(*args, **kwargs)

    def mark(self) -> None:
        """Record the current total in the timeline (phase boundaries; frees outside ops)."""
        if self.recording and self.allocated != self._last_recorded:
            self.timeline.append((self.event, self.context(), "", self.allocated))
            self._last_recorded = self.allocated

    # --- internals --------------------------------------------------------------------------------
    def _input_keys(self, args, kwargs) -> set[int]:
        keys = set()
        device = self.device_type
        for a in tensors_in((args, kwargs)):
            if a.device.type == device:
                key = a.untyped_storage()._cdata     # storage_key, inlined: every tensor of every op
                keys.add(key)
                if key not in self._live and key not in self._ignored:
                    if self.stray_policy == "ignore":
                        self.ignore(a)
                    else:
                        self.strays.append(self._add(a.untyped_storage(), key, "stray", "stray"))
        return keys

    def _register(self, out, inputs, tag=None) -> None:
        if self._tag_stack:
            tag = self._tag_stack[-1]
        for t in tensors_in(out):
            if t.device.type != self.device_type:
                continue
            key = storage_key(t)
            if key in inputs or key in self._live or key in self._ignored:
                continue
            self._add(t.untyped_storage(), key, tag, self.op)

    def _add(self, st, key: int, tag, op) -> Block | None:
        nbytes = st.nbytes()
        self.event += 1
        node = torch._C._current_autograd_node()
        block = Block(key, round_up(nbytes), nbytes, self.event, tag, self.context(), op,
                      node=None if node is None else node._sequence_nr())
        self.blocks.append(block)
        self._live[key] = block
        self._refs[key] = weakref.ref(st, lambda _r, k=key: self._release(k))
        self.allocated += block.size
        phase = block.where[0] if block.where else ""
        if self.allocated > self.phase_max.get(phase, 0):
            self.phase_max[phase] = self.allocated
        if self.allocated > self.peak.bytes:
            self.peak = Peak(self.allocated, self.event, block.where, op)
        return block

    def _release(self, key: int) -> None:
        block = self._live.pop(key, None)
        self._refs.pop(key, None)
        if block is None:
            return
        self.event += 1
        block.free_event = self.event
        self.allocated -= block.size

    def _forget_ignored(self, key: int) -> None:
        self._ignored.discard(key)
        self._ignored_refs.pop(key, None)

    def _resync(self, args, kwargs) -> None:
        for a in tensors_in((args, kwargs)):
            if a.device.type == self.device_type:
                block = self._live.get(storage_key(a))
                if block is not None:
                    nbytes = a.untyped_storage().nbytes()
                    if nbytes != block.nbytes:  # resized: count it as a free and a new allocation
                        tag, op = block.tag, block.op
                        self._release(block.key)
                        self._add(a.untyped_storage(), storage_key(a), tag, op)

    # --- results ------------------------------------------------------------------------------------
    def live_at(self, event: int) -> list[Block]:
        return [b for b in self.blocks if b.live_at(event)]
