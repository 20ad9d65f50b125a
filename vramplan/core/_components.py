"""The closed vocabulary of memory components, shared by estimate, simulate and profile.

peak_allocated (what torch.cuda.max_memory_allocated reports) is the sum of the ALLOCATED
components at the peak; the device total (what NVML / nvidia-smi shows) adds the DEVICE ones.
"""
from __future__ import annotations

from enum import Enum


class Component(str, Enum):
    WEIGHTS = "weights"                  # model parameters and buffers (packed 4-bit, int8 or 16/32-bit)
    QUANT_CONSTANTS = "quant_constants"  # bitsandbytes absmax / nested state / codebooks / int8 scales
    ADAPTERS = "adapters"                # LoRA A and B matrices
    GRADIENTS = "gradients"              # .grad of trainable parameters
    OPTIMIZER_STATE = "optimizer_state"  # optimizer moments (not paged; paged state is reported apart)
    ACTIVATIONS = "activations"          # tensors saved for backward and their gradients in flight
    LOGITS_LOSS = "logits_loss"          # logits, their fp32 upcast, log-softmax and its gradient
    TEMPORARIES = "temporaries"          # dequantized weights, optimizer workspaces, kernel workspaces
    CUDA_CONTEXT = "cuda_context"        # driver context + kernels: visible to NVML only
    ALLOCATOR_OVERHEAD = "allocator_overhead"  # reserved-but-unallocated caching allocator slack
    PAGED_OPTIMIZER = "paged_optimizer"  # bitsandbytes paged state resident on the device (unified memory)

    def __str__(self) -> str:  # so f-strings print "weights", not "Component.WEIGHTS"
        return self.value


ALLOCATED = (Component.WEIGHTS, Component.QUANT_CONSTANTS, Component.ADAPTERS, Component.GRADIENTS,
             Component.OPTIMIZER_STATE, Component.ACTIVATIONS, Component.LOGITS_LOSS,
             Component.TEMPORARIES)
DEVICE = (Component.CUDA_CONTEXT, Component.ALLOCATOR_OVERHEAD, Component.PAGED_OPTIMIZER)
# the names as plain strings, for the dicts built per estimate (an Enum member's .value is a lookup)
ALLOCATED_NAMES = tuple(c.value for c in ALLOCATED)
_NAMES = frozenset(c.value for c in Component)

# Parts of one training step, in order; a peak is attributed to one of them.
PHASES = ("load", "forward", "backward", "optimizer")


def check_sum(components: dict[str, int], total: int) -> None:
    """Parts must add up to the total, to the byte (mem_tracker's invariant)."""
    parts = sum(components.values())
    if parts != total:
        raise AssertionError(f"components sum to {parts} bytes but the total is {total}")
    unknown = components.keys() - _NAMES
    if unknown:
        raise AssertionError(f"unknown components: {sorted(unknown)}")
