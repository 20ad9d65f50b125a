"""The CPU profile's float32 stand-ins for 16-bit kernels (profile/_meters.py fast_matmuls): each
gives the real op's shape, dtype and strides, and its values within 16-bit rounding."""
import pytest
from conftest import requires

pytestmark = requires("torch", "bitsandbytes")


@pytest.fixture(scope="module")
def table():
    import bitsandbytes  # noqa: F401  (registers torch.ops.bitsandbytes)
    import torch

    from vramplan.profile._meters import fast_matmuls

    # both 16-bit dtypes stood in for, whatever GEMMs this CPU has natively (a CPU with
    # AVX512-BF16 runs the real bf16 kernels in a profile, but the stand-ins are checked all the same)
    found = fast_matmuls({torch.bfloat16, torch.float16})
    if not hasattr(torch.ops.bitsandbytes, "gemm_4bit"):
        pytest.skip("bitsandbytes registers no gemm_4bit")
    return found


def same_tensor_layout(a, b) -> None:
    assert (a.shape, a.stride(), a.dtype, a.device) == (b.shape, b.stride(), b.dtype, b.device)


def test_gemm_4bit_in_float32_matches_the_bf16_kernel(table):
    """The stand-in dequantizes to float32 where the kernel dequantizes to bf16: its result is the
    float32 linear rounded once, and within the weight's bf16 rounding of the kernel's."""
    import torch
    from bitsandbytes.functional import dequantize_4bit, quantize_4bit

    op = torch.ops.bitsandbytes.gemm_4bit.default
    torch.manual_seed(0)
    weight = torch.randn(96, 128, dtype=torch.bfloat16)
    packed, state = quantize_4bit(weight, blocksize=64, quant_type="nf4")
    A = torch.randn(3, 5, 128, dtype=torch.bfloat16)
    args = (A, packed, list(weight.shape), state.absmax, 64, "nf4")
    real = op(*args)
    stand_in = table[op](None, op, args, {})
    same_tensor_layout(stand_in, real)
    state.dtype = torch.float32
    expected = torch.nn.functional.linear(A.float(), dequantize_4bit(packed, state)).to(torch.bfloat16)
    assert torch.equal(stand_in, expected)
    assert ((stand_in.float() - real.float()).norm() / real.float().norm()).item() < 1e-2


def test_flash_attention_backward_in_float32_matches_the_bf16_kernel(table):
    import torch

    aten = torch.ops.aten
    op = aten._scaled_dot_product_flash_attention_for_cpu_backward.default
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 64, 32, dtype=torch.bfloat16) for _ in range(3))
    out, lse = aten._scaled_dot_product_flash_attention_for_cpu.default(q, k, v, 0.0, True)
    grad = torch.randn_like(out)
    args = (grad, q, k, v, out, lse, 0.0, True)
    real = op(*args)
    stand_in = table[op](None, op, args, {})
    assert len(stand_in) == len(real) == 3
    for s, r in zip(stand_in, real):
        same_tensor_layout(s, r)
        assert torch.allclose(s.float(), r.float(), rtol=3e-2, atol=3e-2)
