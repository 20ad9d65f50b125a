"""Pure decisions CUDA kernels make, shared by the estimator and the simulator. No torch here:
dtypes are the setup's names ("bf16", "fp16", "fp32") and a GPU is (major, minor, SM count).
"""
from __future__ import annotations

# A GPU to emulate where bitsandbytes' choice depends on it: H100 SXM (sm90, 132 SMs).
GPU_PROPS = (9, 0, 132)

# bitsandbytes 0.50 backends/cuda/ops.py `_gemm_4bit_custom_max_m`: past this many rows gemm_4bit
# always dequantizes the weight and calls F.linear.
GEMM_4BIT_CUSTOM_MAX_M = 1536

DTYPES = ("bf16", "fp16", "fp32")


def gemm_4bit_uses_fused_kernel(M: int, N: int, K: int, dtype: str, props: tuple = GPU_PROPS) -> bool:
    """bitsandbytes 0.50 backends/cuda/ops.py: `gemm_4bit` runs its fused kernel only for few rows;
    past 1536 rows (`_gemm_4bit_custom_max_m`) it always dequantizes. Between, the choice is
    `_gemm_4bit_use_custom_cuda`: ported here for the emulated GPU, the branches that decide for
    training-sized weights (N*K >= 4Mi) and the small-weight tiers.

    M: rows of the input (tokens), N: out_features, K: in_features, dtype: "bf16" | "fp16" | "fp32"
    (the input's dtype), props: (major, minor, multiprocessor count) of the GPU."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if M > GEMM_4BIT_CUSTOM_MAX_M or K % 64:
        return False
    if M <= 4:
        return True
    major, minor, sms = props
    if dtype == "fp32" or major < 7 or (major == 7 and (minor < 5 or dtype != "fp16")):
        return M < 8
    n_blocks = (N + 63) // 64
    if major == 10:
        if n_blocks >= sms * 3:
            return M <= 32
        return False if n_blocks < sms else (False if K >= N else M <= 8)
    is_sm80, is_sm90 = (major, minor) == (8, 0), major == 9
    if N * K < 4 * 1024 * 1024:
        if K * 2 < N and (is_sm80 or is_sm90):
            low_wave = n_blocks * 3 < sms
            return M <= ((1536 if low_wave else 512) if is_sm80 else (512 if low_wave else 320))
        quarter_wave = n_blocks * 4 <= sms
        if quarter_wave:
            return M <= (32 if (K < N or is_sm80 or is_sm90) else 23)
        if n_blocks * 2 <= sms:
            return M <= 16
        return False
    if M > 512:
        return False
    if M < 8:
        return True
    if is_sm90:
        if n_blocks >= sms * 3:
            return M <= 64
        if n_blocks >= sms * 2:
            return M <= 48
        if n_blocks >= sms:
            return M <= 32
        if n_blocks >= sms // 2:
            return False if (K >= N and n_blocks * 4 < sms * 3) else M <= 16
        return False
    if is_sm80:
        if n_blocks >= sms * 3:
            return M <= 128
        if n_blocks >= sms:
            return M <= (64 if K < N else 32)
        return M <= 16
    return M <= 8
