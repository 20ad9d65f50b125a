"""StepTracker: the allocation tracker plus a log of every outer op, which is what the
identical-layers shortcut (_shortcut.py) replays, and the place of the first failure.

Kept apart from _tracker.py, whose AllocationTracker the profile package shares unchanged.
"""
from __future__ import annotations

from vramplan.simulate._tracker import AllocationTracker, op_name

# Op namespaces whose meta kernels allocate what CUDA does, or whose CUDA differences have a
# stand-in in _kernels.py: aten / prims (PyTorch's own meta kernels) and bitsandbytes (its
# registered meta kernels). Ops of any other namespace are listed in Trace.notes.
# "profiler": torch.autograd.profiler.record_function markers (profiler._record_function_enter_new),
# which allocate no device memory
KNOWN_NAMESPACES = frozenset({"aten", "prims", "bitsandbytes", "profiler"})


class StepTracker(AllocationTracker):
    """`ops`: one (start event, end event, context() at the end, op name) per outer op, and
    (event, event, context(), "") per mark(), in order, while `recording`. `failure`: the op name
    and context() of the first op that raised. `layouts`: a kernels.MetaLayouts that answers the
    ops it can (a meta step), or None."""

    def __init__(self, *args, layouts=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.layouts = layouts
        self.ops: list[tuple] = []
        self.failure: tuple | None = None
        self.foreign_ops: set[str] = set()   # ops outside kernels.KNOWN_NAMESPACES (Trace.notes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace not in KNOWN_NAMESPACES:
            self.foreign_ops.add(op_name(func))
        if self.op:  # not an outer op (a stand-in's sub-ops run outside the mode; kept for safety)
            return super().__torch_dispatch__(func, types, args, kwargs)
        start = self.event
        try:
            return super().__torch_dispatch__(func, types, args, kwargs)
        except Exception:
            if self.failure is None:
                self.failure = (op_name(func), self.context())
            raise
        finally:
            if self.recording:
                self.ops.append((start, self.event, self.context(), op_name(func)))

    def _execute(self, func, args, kwargs, inputs):
        if self.layouts is None:
            return func(*args, **kwargs)
        return self.layouts.run(self, func, args, kwargs, inputs)

    def mark(self) -> None:
        super().mark()
        if self.recording:
            self.ops.append((self.event, self.event, self.context(), ""))
