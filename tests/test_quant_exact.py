"""quant.py against bitsandbytes itself: quantize real-shaped weights on the meta device (bnb
registers meta kernels for its ops) and count the storages its QuantState holds, byte for byte."""
import pytest
from conftest import requires

pytestmark = requires("torch", "bitsandbytes")

import torch  # noqa: E402
import bitsandbytes.functional as bnb_functional  # noqa: E402

from vramplan.estimate.quant import alloc, dequant_temporary, layout_4bit  # noqa: E402


def storages(*tensors):
    seen = {}
    for t in tensors:
        if t is not None:
            seen[t.untyped_storage()._cdata] = alloc(t.untyped_storage().nbytes())
    return sum(seen.values())


def quant_state_tensors(state):
    out = [state.absmax, state.code, state.offset if state.nested else None]
    if state.nested:
        out += [state.state2.absmax, state.state2.code]
    return out


@pytest.mark.parametrize("shape", [(4096, 4096), (11008, 4096), (1024, 8192), (28672, 8192),
                                   (256000, 3584), (7, 9), (100, 33), (896, 128)])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_layout_is_byte_exact(shape, double_quant, quant_type):
    weight = torch.empty(shape, dtype=torch.bfloat16, device="meta")
    packed, state = bnb_functional.quantize_4bit(weight, blocksize=64, compress_statistics=double_quant,
                                                 quant_type=quant_type)
    expected = layout_4bit(shape[0] * shape[1], double_quant)
    assert storages(packed) == expected.weight
    assert storages(*quant_state_tensors(state)) == expected.constants


@pytest.mark.parametrize("double_quant", [True, False])
def test_dequantized_temporary_matches_bitsandbytes(double_quant):
    """dequantize_4bit rebuilds fp32 absmax (nested) and writes the weight in its dtype."""
    from vramplan.simulate.tracker import AllocationTracker  # the project's storage counter

    weight = torch.empty((11008, 4096), dtype=torch.bfloat16, device="meta")
    packed, state = bnb_functional.quantize_4bit(weight, blocksize=64, compress_statistics=double_quant)
    with AllocationTracker(device="meta", strays="ignore") as tracker:
        out = bnb_functional.dequantize_4bit(packed, state)
    assert out.dtype == torch.bfloat16
    assert tracker.peak.bytes == dequant_temporary("nf4", 4096, 11008, double_quant, 2)
