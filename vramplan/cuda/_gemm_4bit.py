"""bitsandbytes' gemm_4bit dispatch: its fused 4-bit kernel, or the weight dequantized to the
compute dtype and F.linear (docs/cuda-kernels.md#bitsandbytes-gemm_4bit-per-arch,
docs/bitsandbytes.md#gemm_4bit-fused-kernel-rule). No torch here: dtypes are the setup's names
("bf16", "fp16", "fp32") and the GPU a cuda.arch.CudaArch.
"""
from __future__ import annotations

from vramplan.cuda._arch import ASSUMED, CudaArch

# bitsandbytes 0.50 backends/cuda/ops.py `_gemm_4bit_custom_max_m`: past this many rows gemm_4bit
# always dequantizes the weight and calls F.linear; `_GEMM_4BIT_CUSTOM_FLOOR_M`: up to this many
# rows it always runs the fused kernel.
GEMM_4BIT_CUSTOM_MAX_M = 1536
GEMM_4BIT_CUSTOM_FLOOR_M = 4
# BitsAndBytesConfig / Linear4bit default blocksize (bnb_4bit_blocksize): elements per absmax
# (docs/bitsandbytes.md); the estimate's 4-bit layout (estimate/_quant.py) reads it from here
BLOCKSIZE = 64

DTYPES = ("bf16", "fp16", "fp32")
FP32 = 4


def dequantized_absmax_bytes(numel: int) -> int:
    """Bytes of the float32 absmax a nested (double-quantized) 4-bit weight of `numel` elements
    is dequantized to before its weight (bitsandbytes functional.py dequantize_4bit, and
    _dequant_linear_fallback below): one float per BLOCKSIZE-element block."""
    return FP32 * -(-numel // BLOCKSIZE)


def fallback_buffers(numel: int, nested: bool, input_bytes: int) -> tuple[int, ...]:
    """Bytes of each buffer bitsandbytes 0.50 backends/cuda/ops.py `_dequant_linear_fallback`
    makes before F.linear's output, in order; every one stays alive until the function returns
    (its locals): with nested absmax, `absmax_dq = torch.empty_like(absmax_8bit, float32)` and
    `absmax = absmax_dq + absmax_offset` (a new float32 tensor), one float per 64-element block
    each; then `B_dq = torch.empty(shapeB, dtype=A.dtype)`, the whole weight in the input's dtype."""
    absmax = dequantized_absmax_bytes(numel)
    return ((absmax, absmax) if nested else ()) + (numel * input_bytes,)


def gemm_4bit_uses_fused_kernel(M: int, N: int, K: int, dtype: str, arch: CudaArch = ASSUMED) -> bool:
    """bitsandbytes 0.50.2 backends/cuda/ops.py: the `gemm_4bit` CUDA kernel registration (max M,
    K a multiple of the blocksize) then `_gemm_4bit_use_custom_cuda`, ported branch for branch for
    the target GPU's compute capability and SM count (that function reads them from
    torch.cuda.get_device_properties via `_gpu_dispatch_props`).

    M: rows of the input (tokens), N: out_features, K: in_features, dtype: the input's dtype."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if M > GEMM_4BIT_CUSTOM_MAX_M or K % BLOCKSIZE:
        return False
    if M <= GEMM_4BIT_CUSTOM_FLOOR_M:
        return True
    num_sms, major, minor = arch.sms, arch.major, arch.minor
    n_blocks = (N + 63) // 64
    # fp32 has no MMA kernel; pre-sm75 has none; sm75 has fp16 MMA only
    if dtype == "fp32" or major < 7:
        return M < 8
    if major == 7 and (minor < 5 or dtype != "fp16"):
        return M < 8
    if (major == 8 and minor == 7) or major == 11:    # sm87, sm110: no calibration data
        return False
    if major == 10:                                    # sm100: dequant + F.linear is faster
        if n_blocks >= num_sms * 3:
            return M <= 32
        if n_blocks >= num_sms:
            return False if K >= N else M <= 8
        return False
    is_sm75 = (major, minor) == (7, 5)
    is_sm80 = (major, minor) == (8, 0)
    is_sm86 = (major, minor) == (8, 6)
    is_sm90 = major == 9
    is_sm120 = (major, minor) == (12, 0)
    is_sm121 = (major, minor) == (12, 1)
    is_hbm = is_sm80 or is_sm90
    tall_k_2xn = K > N * 2

    if N * K < 4 * 1024 * 1024:                        # small weights
        if K * 2 < N:
            if is_hbm:
                low_wave = n_blocks * 3 < num_sms
                if is_sm80:
                    return M <= (1536 if low_wave else 512)
                return M <= (512 if low_wave else 320)
            if is_sm75:
                if n_blocks >= num_sms * 3:
                    return M <= 320
                if K >= 1024:
                    return M <= 64
                if K >= 704:
                    return M <= 96
                return M <= 320
            if n_blocks >= num_sms:
                return M <= 320
            return M <= 192 if n_blocks * K > num_sms * 320 else M <= 320
        quarter_wave = n_blocks * 4 <= num_sms
        if is_sm80 and quarter_wave:
            if K >= N:
                return M <= (32 if n_blocks * 8 <= num_sms else 128)
            return M <= 384
        if is_sm75 and n_blocks < num_sms and M > 8:
            return M <= 64
        if quarter_wave:
            return M <= (32 if (K < N or is_hbm) else 23)
        if n_blocks * 2 <= num_sms:
            return M <= 16
        return False

    if M > 512:                                        # large weights
        return False
    if M < 8:
        hbm_m67_thresh = 36 if is_sm90 else 48
        if is_hbm and M >= 6 and n_blocks >= hbm_m67_thresh:
            lt_75pct_wave = n_blocks * 4 < num_sms * 3
            lt_60pct_wave = n_blocks * 5 < num_sms * 3
            if K > N and lt_75pct_wave:
                return False
            if K == N:
                if is_sm80 and lt_60pct_wave:
                    return False
                if is_sm90 and lt_75pct_wave and not lt_60pct_wave:
                    return False
        return True

    # M in [8, 512]: per-arch tier ladders
    if is_sm75:
        if n_blocks >= num_sms * 3:
            return M <= (128 if K < N else 64)
        if n_blocks >= num_sms // 2:
            return M <= 64
        return M <= 32
    if is_sm80:
        if n_blocks >= num_sms * 3:
            return M <= 128
        if n_blocks >= num_sms:
            return M <= (64 if K < N else 32)
        if K >= N * 3 and n_blocks * 4 > num_sms:
            return False
        if K == N and n_blocks >= 48 and n_blocks * 5 < num_sms * 3:
            return False
        if n_blocks * 2 < num_sms:
            if K <= N:
                return M <= 128
            if n_blocks * 3 >= num_sms:
                return False
        if n_blocks >= num_sms // 2 and K < N:
            return M <= 128
        return M <= 16
    if is_sm86:
        if n_blocks >= num_sms:
            return M <= 128
        if n_blocks >= num_sms // 2:
            return M <= 64
        return M <= 16
    if is_sm90:
        if n_blocks >= num_sms * 3:
            return M <= 64
        if n_blocks >= num_sms * 2:
            return M <= 48
        if n_blocks >= num_sms:
            return M <= 32
        if n_blocks >= num_sms // 2:
            if K >= N and n_blocks * 4 < num_sms * 3:
                return False
            return M <= 16
        return False
    if is_sm121 and n_blocks >= num_sms:
        return M <= 256
    if is_sm120:
        if n_blocks >= num_sms * 3:
            return M <= 256
        if n_blocks >= num_sms * 2:
            return M <= 128
        if n_blocks * 5 >= num_sms * 4:
            return M <= (96 if K >= N else 64)
        if n_blocks >= num_sms:
            return M <= 64
        if n_blocks >= num_sms // 2:
            return M <= (64 if (K * 2 >= N and n_blocks >= 128) else 8)
        if tall_k_2xn and n_blocks > 64:
            return M <= 16
        return M <= 8
    # fallback: sm89 (RTX 4090, L40S, L4), sm121 below one wave, unrecognized arches
    if n_blocks >= num_sms * 3:
        return M <= 256
    if n_blocks >= num_sms * 2:
        return M <= 128
    if n_blocks * 5 >= num_sms * 4:
        if tall_k_2xn or n_blocks >= 200:
            return M <= 128
        if K >= N:
            return M <= (128 if num_sms >= 60 else 32)
        return M <= 64
    if n_blocks >= num_sms // 2:
        if tall_k_2xn:
            return M <= 64
        if n_blocks >= 64:
            return M <= 8
        return M <= 32
    if K > N and n_blocks <= 48:
        return M <= (12 if K >= N * 3 else 10)
    return M <= (16 if (tall_k_2xn or n_blocks < 48) else 8)
