"""The cuBLAS workspace: allocated from the CUDA caching allocator at a handle's first matmul and
cached with the handle, so from then on it is part of torch.cuda.memory_allocated
(docs/cuda-kernels.md#cublas-workspace; pytorch issue #95668).

pytorch aten/src/ATen/cuda/CublasHandlePool.cpp `parseChosenWorkspaceSize` / `getChosenWorkspaceSize`:
without CUBLAS_WORKSPACE_CONFIG the size is `4096 KiB * 2 + 16 KiB * 8` (the ":4096:2:16:8" config),
except on Hopper (major 9, minor 0 in every version read) where it is `4096 KiB * 8` = 32 MiB. The
main branch extended the 32 MiB case to sm10x/sm12x in 2026 (pytorch PR #175344); whether torch
2.13 has that is unverified, so only sm90 gets 32 MiB here.

A training step holds two: handles are per thread (CublasHandlePool.cpp: a thread-local handle
pool) and workspaces are cached per (handle, stream), and autograd's engine runs the backward of
CUDA tensors on its own device thread, so the forward's thread and the backward thread each get one.
Measured on an H200 (profiles/h200 snapshots): two 32 MiB blocks stay allocated from the first
step on, one allocated from the forward's first matmul, one from the backward thread
(docs/cuda-kernels.md#cublas-workspace).
"""
from __future__ import annotations

from vramplan.cuda._arch import CudaArch

KiB = 1024
DEFAULT_WORKSPACE_BYTES = 4096 * KiB * 2 + 16 * KiB * 8     # 8,519,680 B
HOPPER_WORKSPACE_BYTES = 4096 * KiB * 8                      # 33,554,432 B


# the threads that run matmuls in a training step: the caller's (forward, optimizer) and
# autograd's device thread (torch/csrc/autograd/engine.cpp: one worker thread per CUDA device)
STEP_THREADS = 2


def workspace_bytes(arch: CudaArch) -> int:
    """Bytes of one default cuBLAS workspace torch 2.13 allocates on this GPU."""
    return HOPPER_WORKSPACE_BYTES if (arch.major, arch.minor) == (9, 0) else DEFAULT_WORKSPACE_BYTES


def step_workspace_bytes(arch: CudaArch) -> int:
    """The cuBLAS workspaces a training step keeps allocated from its first step on."""
    return STEP_THREADS * workspace_bytes(arch)
