"""Allocation counters for the profile child: torch.cuda on a GPU, the simulate package's
allocation tracker on the CPU. Both answer the same questions at phase boundaries: bytes
allocated now, the peak since the last reset, and (CUDA only) bytes reserved.

On the CPU there is no caching allocator to ask, so every storage the run creates is counted
by vramplan.simulate._tracker.AllocationTracker (a TorchDispatchMode) rounded to 512 bytes, the
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

        from vramplan.simulate._tracker import AllocationTracker, Peak  # imports torch: loaded on use

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
        self.tracker = Tracker(device="cpu", context=self.context, strays="ignore", overrides=fast_matmuls())
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


def fast_matmuls(slow: set | None = None) -> dict:
    """Stand-ins for the 16-bit matmuls on a CPU without a native bf16 / fp16 GEMM (`slow`: the
    dtypes to stand in for; None: those this CPU has no native GEMM for).

    Without AVX512-BF16 / AMX (oneDNN's bf16 path) torch runs bf16 and fp16 mm / addmm / bmm /
    baddbmm through its scalar reference GEMM (aten/src/ATen/native/CPUBlas.cpp
    cpublas_gemm_impl), about 25x slower than float32 MKL: on a 2-core AVX2 machine it was 87%
    of a tiny model's profile run (the lm_head matmuls over a 32000-word vocabulary). The
    stand-in computes in float32 and rounds once to the op's dtype, as the reference kernel
    does (it accumulates in float32, at::opmath_type), and returns a tensor of the op's shape,
    dtype and layout. It runs inside the tracker's dispatch, so its float32 copies are never
    counted: the tracker sees exactly the one output storage the real op allocates.

    Two more ops reach that GEMM from inside their own kernel, where the mm stand-in never sees
    it (together about a third of a tiny QLoRA model's profile run at 2048 tokens):
    - bitsandbytes' gemm_4bit on the CPU (backends/default/ops.py _gemm_4bit_default_impl)
      dequantizes the weight to the input's dtype and runs F.linear in it: with a float32 input
      and bias the weight is dequantized to float32 (not rounded to bf16 first; the result
      moves by that rounding, under 1% here) and the linear runs in float32;
    - SDPA's CPU flash-attention backward (aten/src/ATen/native/cpu/FlashAttentionKernel.cpp)
      runs its blocks' matmuls in the inputs' dtype: in float32 it returns the gradients of
      q, k and v in float32 (logsumexp is float32 either way)."""
    import torch

    aten = torch.ops.aten
    if slow is None:
        slow = set()
        if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            slow.add(torch.bfloat16)
        if not torch.ops.mkldnn._is_mkldnn_fp16_supported():
            slow.add(torch.float16)
    if not slow:
        return {}

    def upcast(x, dtype):
        return x.float() if isinstance(x, torch.Tensor) and x.dtype == dtype else x

    def stand_in(tracker, func, args, kwargs):
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        dtype = tensors[0].dtype if tensors else None
        if dtype not in slow or any(t.dtype != dtype or t.device.type != "cpu" for t in tensors):
            return tracker.run(func, args, kwargs)
        return func(*[upcast(a, dtype) for a in args], **kwargs).to(dtype)

    def in_float32(first: int):
        """A stand-in for an op whose tensors in the dtype of args[first] are computed in float32;
        its outputs (a tensor or a tuple of them) are rounded back to that dtype."""
        def run(tracker, func, args, kwargs):
            dtype = args[first].dtype
            if dtype not in slow or args[first].device.type != "cpu":
                return tracker.run(func, args, kwargs)
            out = func(*[upcast(a, dtype) for a in args], **{k: upcast(v, dtype) for k, v in kwargs.items()})
            return out.to(dtype) if isinstance(out, torch.Tensor) else tuple(o.to(dtype) for o in out)
        return run

    table = {op: stand_in for op in (aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default)}
    table[aten._scaled_dot_product_flash_attention_for_cpu_backward.default] = in_float32(1)   # q's dtype
    bnb = getattr(torch.ops, "bitsandbytes", None)
    if bnb is not None and hasattr(bnb, "gemm_4bit"):     # registered once bitsandbytes is imported
        table[bnb.gemm_4bit.default] = in_float32(0)      # the input A's dtype
    return table
