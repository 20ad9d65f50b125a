"""quant.py against bitsandbytes itself: quantize real-shaped weights on the meta device (bnb
registers meta kernels for its ops) and count the storages its QuantState holds, byte for byte."""
import pytest
from conftest import requires

pytestmark = requires("torch", "bitsandbytes")

import torch  # noqa: E402
import bitsandbytes.functional as bnb_functional  # noqa: E402

from vramplan.estimate._quant import alloc, constants_4bit, dequant_temporary, layout_4bit, layout_int8  # noqa: E402


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
    # tensor by tensor, as the load allocates them (estimate/_inventory.py linear_tensors)
    held = sorted(alloc(t.untyped_storage().nbytes()) for t in quant_state_tensors(state) if t is not None)
    assert held == sorted(constants_4bit(shape[0] * shape[1], double_quant))


@pytest.mark.parametrize("double_quant", [True, False])
def test_dequantized_temporary_matches_bitsandbytes(double_quant):
    """dequantize_4bit rebuilds fp32 absmax (nested) and writes the weight in its dtype."""
    from vramplan.simulate._tracker import AllocationTracker  # the project's storage counter

    weight = torch.empty((11008, 4096), dtype=torch.bfloat16, device="meta")
    packed, state = bnb_functional.quantize_4bit(weight, blocksize=64, compress_statistics=double_quant)
    with AllocationTracker(device="meta", strays="ignore") as tracker:
        out = bnb_functional.dequantize_4bit(packed, state)
    assert out.dtype == torch.bfloat16
    assert tracker.peak.bytes == dequant_temporary("nf4", 4096, 11008, double_quant, 2)


# --- LLM.int8 (load_in_8bit) ----------------------------------------------------------------------
# bitsandbytes nn/modules.py: Int8Params._quantize runs functional.int8_vectorwise_quant on the
# first move off the CPU/meta weights (here .to("cpu")), keeping CB (int8, the weight's own
# storage) and SCB (float32, one scale per output row); Linear8bitLt.forward moves both into its
# MatmulLtState (init_8bit_state) and points weight.data at state.CB. docs/bitsandbytes.md#llmint8-layout

def int8_linear(out_features, in_features):
    import bitsandbytes as bnb

    lin = bnb.nn.Linear8bitLt(in_features, out_features, bias=False, has_fp16_weights=False, threshold=6.0,
                              device="meta")
    weight = torch.empty(out_features, in_features, dtype=torch.float16).normal_()
    lin.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False).to("cpu")
    return lin


def held_tensors(lin):
    """Every tensor the module holds: its parameters and buffers, the Int8Params attributes and
    the MatmulLtState's tensors."""
    w = lin.weight
    state = [v for v in vars(lin.state).values() if isinstance(v, torch.Tensor)]
    return [w.data, w.CB, w.SCB, *state, *lin.buffers()]


# (out, in): Llama-2-7B q_proj / up_proj, Llama-3-8B k_proj (GQA), odd small shapes
@pytest.mark.parametrize("shape", [(4096, 4096), (11008, 4096), (1024, 4096), (7, 9), (100, 33)])
def test_int8_layout_is_byte_exact(shape):
    out_features, in_features = shape
    lin = int8_linear(out_features, in_features)
    expected = layout_int8(in_features, out_features)
    w = lin.weight
    assert w.dtype == torch.int8 and w.SCB.dtype == torch.float32 and w.SCB.shape == (out_features,)
    assert storages(w.data) == expected.weight
    assert storages(*held_tensors(lin)) == expected.weight + expected.constants
    # after a forward the state holds the same two storages (input with an outlier column, so
    # the threshold path runs)
    x = torch.randn(1, 3, in_features, dtype=torch.float16)
    x[..., 0] = 50.0
    lin(x)
    assert lin.weight.CB is None and lin.state.CB is not None
    assert storages(lin.weight.data) == expected.weight
    assert storages(*held_tensors(lin)) == expected.weight + expected.constants
