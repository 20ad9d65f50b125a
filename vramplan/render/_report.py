"""Data -> rows: the component table every front end (rich, JSON, pandas) draws from."""
from __future__ import annotations

from vramplan.core._components import ALLOCATED, Component
from vramplan.estimate._estimator import Estimate

DESCRIPTIONS = {
    Component.WEIGHTS: "model parameters and buffers",
    Component.QUANT_CONSTANTS: "bitsandbytes absmax, nested state, code books",
    Component.ADAPTERS: "LoRA A and B matrices",
    Component.GRADIENTS: "gradients of trainable parameters",
    Component.OPTIMIZER_STATE: "optimizer moments on the device",
    Component.ACTIVATIONS: "tensors saved for backward, gradients in flight",
    Component.LOGITS_LOSS: "logits, fp32 upcast, log-softmax and their gradients",
    Component.TEMPORARIES: "dequantized weights, optimizer workspace",
    Component.CUDA_CONTEXT: "CUDA context and kernels (NVML only)",
    Component.ALLOCATOR_OVERHEAD: "reserved by the caching allocator, not allocated",
    Component.PAGED_OPTIMIZER: "paged optimizer state on the device (unified memory, NVML only)",
}


def component_rows(est: Estimate) -> list[dict]:
    """One row per component at the peak, then the device-only ones; shares are of the device total."""
    total = est.device_total_bytes
    rows = [{"component": c.value, "bytes": est.components[c.value], "share": est.components[c.value] / total,
             "what": DESCRIPTIONS[c], "allocated": True} for c in ALLOCATED]
    device = [(Component.CUDA_CONTEXT, est.cuda_context_bytes),
              (Component.ALLOCATOR_OVERHEAD, est.allocator_overhead_bytes)]
    if est.paged_optimizer_bytes:   # a row only where a paged optimizer runs
        device.append((Component.PAGED_OPTIMIZER, est.paged_resident_bytes))
    for c, n in device:
        rows.append({"component": c.value, "bytes": n, "share": n / total, "what": DESCRIPTIONS[c],
                     "allocated": False})
    return rows
