"""torch.nn.functional.scaled_dot_product_attention on CUDA: which kernel runs, and the workspaces
its backward allocates. Plain values in, plain values out (no torch): the estimator calls these
with the model's numbers, simulate's stand-ins (simulate/_kernels.py) with a tensor's.

Dispatch: pytorch aten/src/ATen/native/transformers/cuda/sdp_utils.cpp `select_sdp_backend`, in the
default priority order flash, efficient, math (docs/cuda-kernels.md#sdpa-backend-dispatch). cuDNN
attention is left out: it comes first only on sm90/sm100 with a runtime cuDNN > 9.15; where it ran
(the H200 records, torch 2.11), its backward held flash's (or the memory-efficient kernel's)
workspace bytes plus 256 B in one block, which moved no replayed peak
(docs/cuda-kernels.md#cudnn-attention-can_use_cudnn_attention).
"""
from __future__ import annotations


from vramplan.core._record import record
from vramplan.cuda._arch import CudaArch

FLASH, EFFICIENT, MATH = "flash", "efficient", "math"
FP32 = 4


@record
class SdpaCall:
    """One scaled_dot_product_attention call, as the dispatcher sees it (layout (b, heads, s, d))."""
    dtype: str                # "bf16" | "fp16" | "fp32": q's dtype
    head_dim: int             # q and k last dim
    head_dim_v: int
    heads: int
    kv_heads: int
    seq_q: int
    seq_k: int
    has_mask: bool
    is_causal: bool
    enable_gqa: bool
    requires_grad: bool = True
    dropout: float = 0.0
    last_dim_contiguous: bool = True


def _round(n: int, m: int) -> int:
    return -(-n // m) * m


def _heads_ok(c: SdpaCall) -> bool:
    if c.heads == c.kv_heads:
        return True
    # check_batch_size_and_num_heads_dense<supports_gqa=true>: enable_gqa and q heads a multiple
    return c.enable_gqa and c.heads % c.kv_heads == 0


def can_use_flash(arch: CudaArch, c: SdpaCall) -> bool:
    """sdp_utils.cpp can_use_flash_attention (docs/cuda-kernels.md#flash-attention-can_use_flash_attention)."""
    if not 80 <= arch.sm <= 121:                       # check_flash_attention_hardware_support
        return False
    if c.dtype not in ("fp16", "bf16") or c.has_mask:  # check_dtypes_flash_attention, check_for_attn_mask
        return False
    # check_head_dim_size_flash: equal head dims <= 256; no multiple-of-8 rule (the op pads)
    if not (c.head_dim == c.head_dim_v and c.head_dim <= 256):
        return False
    # check_requires_grad_and_head_dim_gt192_constraints_on_sm86_89_or_120
    if c.requires_grad and (86 <= arch.sm <= 89 or 120 <= arch.sm <= 121):
        if 192 < c.head_dim <= 224 or (c.head_dim > 224 and c.dropout > 0):
            return False
    if c.is_causal and c.seq_q != c.seq_k:             # check_flash_causal_non_square_seqlens
        return False
    return _heads_ok(c) and c.last_dim_contiguous


def efficient_alignment(arch: CudaArch, dtype: str) -> int:
    """sdp_utils.cpp minimum_gemm_alignment: 128 bits with tensor cores (sm80+, or 16-bit on sm7x),
    at least 4 elements on sm80+, else 1."""
    half = dtype in ("fp16", "bf16")
    tensor_cores = arch.major >= 8 or (arch.major == 7 and half)
    align = 4 if arch.major >= 8 else 1
    return max(align, 128 // (16 if half else 32)) if tensor_cores else align


def can_use_efficient(arch: CudaArch, c: SdpaCall) -> bool:
    """sdp_utils.cpp can_use_mem_efficient_attention
    (docs/cuda-kernels.md#memory-efficient-attention-can_use_mem_efficient_attention).

    Head counts: pytorch main allows grouped KV heads here; torch 2.13's meta kernel of the backward
    (torch/_meta_registrations.py meta__scaled_dot_product_efficient_backward) returns key gradients
    with the query's head count, so equal head counts are required, as in the releases before."""
    if not 50 <= arch.sm <= 121:                       # check_mem_efficient_hardware_support
        return False
    dtypes = ("fp16", "fp32", "bf16") if arch.major >= 8 else ("fp16", "fp32")
    if c.dtype not in dtypes:
        return False
    align = efficient_alignment(arch, c.dtype)        # check_head_dim_size_mem_efficient
    if not (c.head_dim % align == 0 and c.head_dim_v % align == 0):
        return False
    return c.heads == c.kv_heads and c.last_dim_contiguous


def backend(arch: CudaArch, c: SdpaCall) -> str:
    """The kernel select_sdp_backend returns for this call on this GPU."""
    if can_use_flash(arch, c):
        return FLASH
    if can_use_efficient(arch, c):
        return EFFICIENT
    return MATH


def fallback_reason(arch: CudaArch, c: SdpaCall) -> str:
    """Why neither fused kernel takes the call (for output): the first failing check of each."""
    if not 80 <= arch.sm <= 121:
        flash = "flash needs sm80-sm121"
    elif c.dtype not in ("fp16", "bf16"):
        flash = "flash needs fp16/bf16"
    elif c.has_mask:
        flash = "flash takes no mask"
    else:
        flash = "flash refuses this head dim"
    dtypes = ("fp16", "fp32", "bf16") if arch.major >= 8 else ("fp16", "fp32")
    if c.dtype not in dtypes:
        efficient = f"memory-efficient takes no {c.dtype} on sm{arch.sm}"
    elif c.heads != c.kv_heads:
        efficient = "memory-efficient needs equal query and key/value head counts"
    else:
        efficient = f"memory-efficient needs head dims divisible by {efficient_alignment(arch, c.dtype)}"
    return f"{flash}; {efficient}"


# --- what the kernels allocate ----------------------------------------------------------------------

def flash_padded_head_dim(head_dim: int) -> int:
    """attention.cpp scaled_dot_product_attention (flash case): q, k, v padded to a multiple of 8
    (pad_last_dim<8>) before the kernel; flash_api.cpp mha_fwd checks it."""
    return _round(head_dim, 8)


def flash_head_dim_rounded(head_dim: int) -> int:
    """flash_api.cpp mha_fwd/mha_bwd: head_size_rounded = round(d, 32) if d <= 128 else round(d, 64)."""
    return _round(head_dim, 32) if head_dim <= 128 else _round(head_dim, 64)


def flash_backward_workspace(batch, heads: int, seq_q, head_dim: int, round_seq=_round) -> list[tuple[tuple, int]]:
    """flash_api.cpp mha_bwd (docs/cuda-kernels.md#flash-attention-memory), non-deterministic:
    float32 softmax_d (b, H, round(s_q, 128)) and dq_accum (b, round(s_q, 128), H, head_size_rounded).
    Returns (shape, bytes per element) of each; grouped-KV dk/dv expansion is the caller's (its dtype
    is the input's). batch and seq_q may be symbols: round_seq(seq, m) rounds the sequence up to m."""
    s128 = round_seq(seq_q, 128)
    return [((batch, heads, s128), FP32),
            ((batch, s128, heads, flash_head_dim_rounded(head_dim)), FP32)]


def efficient_mask_last_dim(seq_k, round_seq=_round):
    """attention.cpp: a boolean mask becomes an additive one in q's dtype
    (convert_boolean_attn_mask), its last dim padded to a multiple of 16 for the memory-efficient
    kernel (preprocess_mask, pad_bias) and sliced back: the storage holds round(s_k, 16) columns."""
    return round_seq(seq_k, 16)


def efficient_logsumexp(batch, heads: int, seq_q, round_seq=_round) -> tuple[tuple, int]:
    """attention.cpp _efficient_attention_forward with gradients needed: logsumexp float32
    (b, H, round(s_q, kAlignLSE = 32)) (mem_eff_attention/kernel_forward.h)."""
    return (batch, heads, round_seq(seq_q, 32)), FP32


def efficient_backward_workspace(batch, heads: int, seq_q, head_dim: int) -> list[tuple[tuple, int]]:
    """mem_eff_attention/kernel_backward.h + attention_backward.cu _efficient_attention_backward
    (docs/cuda-kernels.md#memory-efficient-attention-memory): float32 `delta` (b, H, s_q), and the
    float32 workspace, about one float32 copy of dQ (GradQTempStorage tiles; always on sm70+ since
    kEnableSplitKeys). Modelled as (b, H, s_q, d) float32: the tile rounding and the dK/dV
    accumulators of large head dims are not modelled."""
    return [((batch, heads, seq_q), FP32), ((batch, heads, seq_q, head_dim), FP32)]


def nbytes(shape: tuple, element: int):
    """Bytes of one (shape, element size) entry; the dimensions may be symbols."""
    out = element
    for d in shape:
        out = d * out
    return out
