"""What NVML sees beyond torch.cuda.max_memory_allocated: the CUDA context and the caching
allocator's reserved-but-unallocated memory.

These two are models, not derivations: the context depends on the driver, the GPU and lazy
module loading, and allocator slack on the order of allocations. They are kept apart from
peak_allocated (which is derived exactly) and will be checked against profile records.
"""
from __future__ import annotations

from dataclasses import dataclass

from vramplan.core.units import MiB, round_up

# CUDA context + kernels loaded by a PyTorch process with CUDA_MODULE_LOADING=LAZY (the default
# since CUDA 11.7 / torch 1.13): several hundred MiB depending on GPU, driver and lazy module
# loading (287 MB to ~430 MiB reported; docs/gpus.md#cuda-context-size). 500 MiB until measured records refine it.
CUDA_CONTEXT_BYTES = 500 * MiB

# c10/cuda/CUDACachingAllocator.cpp: allocations above kSmallSize (1 MiB) come from the large
# pool; requests under kMinLargeAlloc (10 MiB) get a kLargeBuffer (20 MiB) segment, larger ones
# are rounded up to kRoundLarge (2 MiB). Small allocations share 2 MiB kSmallBuffer segments.
SMALL_SIZE = 1 * MiB
MIN_LARGE_ALLOC = 10 * MiB
LARGE_BUFFER = 20 * MiB
ROUND_LARGE = 2 * MiB
SMALL_BUFFER = 2 * MiB


def segment_bytes(nbytes: int) -> int:
    """Bytes reserved from the driver for one allocation made when no cached block fits."""
    if nbytes <= SMALL_SIZE:
        return SMALL_BUFFER
    if nbytes < MIN_LARGE_ALLOC:
        return LARGE_BUFFER
    return round_up(nbytes, ROUND_LARGE)


@dataclass(frozen=True)
class DeviceOverhead:
    cuda_context: int
    allocator_overhead: int


def device_overhead(largest_transients: list[int]) -> DeviceOverhead:
    """Allocator slack: the step's large transient tensors (layer activations, dequantized
    weights, logits) are cached after first use; each reserves its own rounded segment,
    so the slack is at least the rounding of each, plus one small-pool segment."""
    slack = SMALL_BUFFER + sum(segment_bytes(n) - n for n in largest_transients if n > 0)
    return DeviceOverhead(cuda_context=CUDA_CONTEXT_BYTES, allocator_overhead=slack)
