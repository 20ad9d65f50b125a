"""What NVML sees beyond torch.cuda.max_memory_allocated: the CUDA context and the caching
allocator's reserved-but-unallocated memory.

These two are models, not derivations: the context depends on the driver, the GPU and lazy
module loading, and allocator slack on the order of allocations. They are kept apart from
peak_allocated (which is derived exactly) and will be checked against profile records.
"""
from __future__ import annotations


from vramplan.core._record import record
from vramplan.core._units import MiB, round_up

# CUDA context + kernels loaded by a PyTorch process with CUDA_MODULE_LOADING=LAZY (the default
# since CUDA 11.7 / torch 1.13): "several hundred MiB depending on GPU, driver and lazy module
# loading" (docs/gpus.md#cuda-context-size). 500 MiB where no figure for the GPU is known.
CUDA_CONTEXT_BYTES = 500 * MiB


@record
class ContextFigure:
    """One published (or measured) CUDA context size: what NVML counts beyond the allocator."""
    bytes: int
    source: str
    gpu: str = ""            # catalog name it was measured on; "" = GPU not named
    after_step: bool = False  # measured after a training step (kernels loaded): used for that GPU


# docs/gpus.md#cuda-context-size and docs/cuda-kernels.md#cuda-context.
CONTEXT_FIGURES = (
    ContextFigure(287_047_680, "pytorch PR #86509: lazy module loading, CUDA 11.7, one small tensor"),
    ContextFigure(666_632_192, "pytorch PR #86509: eager module loading, CUDA 11.7, one small tensor"),
    ContextFigure(400 * 1000**2, "pytorch issue #109888: 'around 400MB', CUDA >= 11.7, lazy loading"),
    ContextFigure(426 * MiB, "huggingface/unsloth-zoo PR #1053: nvidia-smi after torch.cuda.mem_get_info, "
                  "torch 2.10 + CUDA 13.0", gpu="RTX6000-Ada"),
    ContextFigure(256 * MiB, "invoke-ai/InvokeAI issue #9413: nvidia-smi of a process that created its CUDA "
                  "context and ran nothing, torch 2.7.1 + CUDA 12.8, driver 610.43.03", gpu="RTX3090"),
    # When the context is created, before the model loads (NVML used less torch reserved, every
    # profiles/h200 record)
    ContextFigure(552_402_944, "measured on an H200 when the CUDA context is created (NVML used less torch "
                  "reserved; torch 2.11 + CUDA 13.0, driver 580.159.04)", gpu="H200"),
    # After the measured steps of a QLoRA step (NVML used - torch reserved at the end, with
    # cuBLAS, SDPA and bitsandbytes' 4-bit kernels loaded): the same to the byte in every
    # profiles/h200 record without a paged optimizer, 7B to 70B (docs/gpus.md#cuda-context-size)
    ContextFigure(804_061_184, "measured on an H200 after QLoRA steps (NVML used less torch reserved; torch 2.11 "
                  "+ CUDA 13.0, driver 580.159.04)", gpu="H200", after_step=True),
)
# The kernels a QLoRA step loads (cuBLAS, flash attention, bitsandbytes) grow the lazily loaded
# context past the one-small-tensor figures; without a per-GPU measurement after a training step
# the default stays 500 MiB, between the lazy (287 MB) and the eager (667 MB) figures.
DEFAULT_CONTEXT = ContextFigure(CUDA_CONTEXT_BYTES, "vramplan default: between pytorch PR #86509's lazy "
                                "(287 MB) and eager (667 MB) figures, for the kernels a training step loads")
# What the context may differ by between setups: eager minus lazy loading (PR #86509).
CONTEXT_SPREAD_BYTES = 666_632_192 - 287_047_680


def _gpu_key(name: str) -> str:
    """'NVIDIA H200' (torch.cuda's name) and 'H200' (the catalog's) are one card."""
    key = name.lower().replace(" ", "").replace("-", "")
    return key.removeprefix("nvidia")


def _figure(gpu: str, after_step: bool) -> ContextFigure | None:
    key = _gpu_key(gpu)
    return next((f for f in CONTEXT_FIGURES if f.after_step == after_step and _gpu_key(f.gpu) == key), None)


# What a QLoRA step's kernels (cuBLAS, SDPA, bitsandbytes' 4-bit kernels) add to a freshly created
# context: the H200's figure after the measured steps less its figure when the context is created
# (251,658,240 B = 240 MiB, docs/gpus.md#cuda-context-size).
KERNELS_LOADED_BYTES = _figure("H200", True).bytes - _figure("H200", False).bytes


def cuda_context(gpu=None) -> ContextFigure:
    """The context figure used for `gpu` (a core.gpus.Gpu or None): a measurement after a training
    step on that GPU when one exists; else a published figure of that GPU's freshly created
    context plus the kernels a QLoRA step loads (KERNELS_LOADED_BYTES, measured on the H200);
    else the default."""
    if gpu is not None:
        measured = _figure(gpu.name, True)
        if measured is not None:
            return measured
        fresh = _figure(gpu.name, False)
        if fresh is not None:
            return ContextFigure(fresh.bytes + KERNELS_LOADED_BYTES,
                                 f"{fresh.bytes // MiB} MiB when the context is created ({fresh.source}) + "
                                 f"{KERNELS_LOADED_BYTES // MiB} MiB of kernels a QLoRA step loads (measured on "
                                 "an H200: after the steps less at creation)", gpu=fresh.gpu, after_step=True)
    return DEFAULT_CONTEXT


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


@record
class DeviceOverhead:
    """What the device holds beyond the allocated bytes: the CUDA context and the caching
    allocator's reserved-minus-allocated."""
    cuda_context: int
    allocator_overhead: int


def device_overhead(largest_transients: list[int]) -> DeviceOverhead:
    """Allocator slack: the step's large transient tensors (layer activations, dequantized
    weights, logits) are cached after first use; each reserves its own rounded segment,
    so the slack is at least the rounding of each, plus one small-pool segment."""
    slack = SMALL_BUFFER + sum(segment_bytes(n) - n for n in largest_transients if n > 0)
    return DeviceOverhead(cuda_context=CUDA_CONTEXT_BYTES, allocator_overhead=slack)
