"""Allocation counters for the profile child: torch.cuda on a GPU, the simulate package's
allocation tracker on the CPU. Both answer the same questions at phase boundaries: bytes
allocated now, the peak since the last reset, and (CUDA only) bytes reserved.

On the CPU there is no caching allocator to ask, so every storage the run creates is counted
by vramplan.simulate.tracker.AllocationTracker (a TorchDispatchMode) rounded to 512 bytes, the
CUDA caching allocator's block size (c10/cuda/CUDACachingAllocator.cpp kMinBlockSize): the
number torch.cuda.memory_allocated would report for the same storages on a GPU. The kernels are
the CPU ones, so kernel-internal buffers differ from a GPU run (see profiles/README.md).
"""
from __future__ import annotations

import contextlib


class CudaMeter:
    counter = "torch.cuda"

    def __init__(self, device):
        import torch
        self.torch = torch
        self.device = device
        self.peak_event = None

    def sync(self) -> None:
        self.torch.cuda.synchronize(self.device)

    def allocated(self) -> int:
        return int(self.torch.cuda.memory_allocated(self.device))

    def reserved(self) -> int | None:
        return int(self.torch.cuda.memory_reserved(self.device))

    def reset_peak(self) -> None:
        self.torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> tuple[int, int | None]:
        return (int(self.torch.cuda.max_memory_allocated(self.device)),
                int(self.torch.cuda.max_memory_reserved(self.device)))

    def active(self):
        return contextlib.nullcontext()

    # tagging is a tracker feature; on a GPU the components come from the tensor inventory
    def retag(self, tensor, component: str) -> None:
        pass

    def ignore(self, tensor) -> None:
        pass

    def set_phase(self, phase: str) -> None:
        pass


class TrackerMeter:
    """The CPU counter. `limit` (bytes) emulates a GPU of that size: an allocation that takes
    the total past it raises torch.OutOfMemoryError, as the CUDA allocator would."""

    counter = "tracker"

    def __init__(self, context=None, limit: int | None = None):
        import torch

        from vramplan.simulate.tracker import AllocationTracker, Peak  # imports torch: loaded on use

        self.torch = torch
        self._Peak = Peak
        meter = self

        class Tracker(AllocationTracker):
            def _add(self, st, key, tag, op):
                before = self.peak
                block = super()._add(st, key, tag, op)
                if meter.limit is not None and self.allocated > meter.limit:
                    # as on a GPU, the allocation that does not fit never happened
                    size = block.size if block is not None else 0
                    self._release(key)
                    if self.blocks and self.blocks[-1] is block:
                        self.blocks.pop()
                    self.peak = before
                    raise getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)(
                        f"CPU emulation of a {meter.limit:,}-byte GPU: tried to allocate {size:,} bytes "
                        f"with {self.allocated:,} bytes allocated")
                return block

        self.limit = limit
        self.context = context or _PhaseContext()
        self.tracker = Tracker(device="cpu", context=self.context, strays="ignore")
        self.tracker.recording = False   # no per-op timeline: phases are recorded by the runner
        self.peak_event = 0
        self.late_tracked = 0   # storages counted only when the inventory found them (see retag)

    def sync(self) -> None:
        pass

    def allocated(self) -> int:
        return int(self.tracker.allocated)

    def reserved(self) -> int | None:
        return None

    def reset_peak(self) -> None:
        t = self.tracker
        t.peak = self._Peak(t.allocated, t.event, self.context(), "")

    def peak(self) -> tuple[int, int | None]:
        self.peak_event = self.tracker.peak.event
        return int(self.tracker.peak.bytes), None

    def active(self):
        return self.tracker

    def retag(self, tensor, component: str) -> None:
        """Label a storage with its component. A tensor built from Python data (torch.tensor(list):
        e.g. the 16-entry NF4 code book bitsandbytes makes per weight) is created without
        dispatching an op, so the tracker never saw it and ignores it as a stray; on a GPU it is
        a device allocation like any other, so it is counted from here on."""
        t = self.tracker
        if tensor is None or not isinstance(tensor, self.torch.Tensor) or tensor.device.type != "cpu":
            return
        if t.block_of(tensor) is None:
            key = tensor.untyped_storage()._cdata
            t._ignored.discard(key)
            t._ignored_refs.pop(key, None)
            t.track(tensor, component)
            self.late_tracked += 1
        t.retag(tensor, component)

    def ignore(self, tensor) -> None:
        self.tracker.ignore(tensor)

    def set_phase(self, phase: str) -> None:
        if hasattr(self.context, "phase"):
            self.context.phase = phase


class _PhaseContext:
    """(phase, module, tag) without module attribution: used when simulate's StepContext is not
    available."""

    def __init__(self):
        self.phase = "setup"

    def __call__(self) -> tuple:
        return (self.phase, self.phase, None)
