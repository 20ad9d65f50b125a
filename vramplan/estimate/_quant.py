"""bitsandbytes storage layout of one quantized nn.Linear weight, byte-exact.

Read off bitsandbytes 0.50.2:
- functional.quantize_4bit: packed weight uint8 of (n + 1) // 2 bytes (two 4-bit codes per
  byte, quant_storage=uint8), absmax float32 with one value per 64-element block, and `code`, a
  fresh 16-entry float32 tensor from get_4bit_type() for every weight.
- compress_statistics=True (double quantization, QLoRA paper sec. 3): absmax - offset is
  itself quantized by quantize_blockwise(blocksize=256): absmax becomes uint8 (one byte per
  block), plus state2.absmax float32 per 256 blocks, state2.code (the 256-entry float32 dynamic
  map, copied per weight: `code.to(A.device, copy=True)`), and `offset` (a float32 scalar).
- Int8Params (LLM.int8, load_in_8bit): int8 weight, one byte per element, plus SCB, one float32
  scale per output row (functional.int8_vectorwise_quant).
Every tensor is a separate CUDA allocation, so each is rounded up to the caching allocator's
512-byte block (c10/cuda/CUDACachingAllocator.cpp, kMinBlockSize = 512).
"""
from __future__ import annotations


from vramplan.core._record import record
from vramplan.core._units import round_up
from vramplan.cuda._gemm_4bit import BLOCKSIZE, dequantized_absmax_bytes

BLOCK = 512                 # CUDA caching allocator granularity
BLOCKSIZE_NESTED = 256      # quantize_blockwise default used for double quantization
CODE_4BIT_ENTRIES = 16      # nf4 / fp4 code book
CODE_DYNAMIC_ENTRIES = 256  # create_dynamic_map()


def alloc(nbytes: int) -> int:
    """Bytes the caching allocator hands out for one tensor of nbytes."""
    return round_up(nbytes, BLOCK) if nbytes > 0 else 0


@record
class QuantLayout:
    """The bytes one quantized Linear keeps on the device: its packed (or int8) weight and its
    quantization constants (docs/bitsandbytes.md)."""
    weight: int      # bytes of the packed / int8 weight itself
    constants: int   # absmax, nested state, code books, scales

    @property
    def total(self) -> int:
        return self.weight + self.constants


def blocks(n: int, blocksize: int) -> int:
    return -(-n // blocksize)


def constants_4bit(numel: int, double_quant: bool) -> tuple[int, ...]:
    """The bytes of each tensor of one Linear4bit weight's quant_state, one CUDA allocation each,
    in the order the load makes them (estimate/_load.py): the absmax (float32, or with double
    quantization uint8, then state2.absmax float32, state2.code float32 and the float32 `offset`
    scalar), then the 16-entry float32 code book (docs/bitsandbytes.md)."""
    n_blocks = blocks(numel, BLOCKSIZE)   # Linear4bit's default blocksize (cuda/_gemm_4bit.py)
    code = alloc(4 * CODE_4BIT_ENTRIES)
    if not double_quant:
        return alloc(4 * n_blocks), code
    return (alloc(n_blocks),                                   # absmax as uint8
            alloc(4 * blocks(n_blocks, BLOCKSIZE_NESTED)),     # state2.absmax float32
            alloc(4 * CODE_DYNAMIC_ENTRIES),                   # state2.code float32
            alloc(4),                                          # offset float32 scalar
            code)


def layout_4bit(numel: int, double_quant: bool) -> QuantLayout:
    """One Linear4bit weight of `numel` elements (nf4 and fp4 store the same bytes): two 4-bit
    codes a byte, and its constants_4bit."""
    return QuantLayout(alloc((numel + 1) // 2), sum(constants_4bit(numel, double_quant)))


def layout_int8(in_features: int, out_features: int) -> QuantLayout:
    return QuantLayout(alloc(in_features * out_features), alloc(4 * out_features))


def layout(quant: str, in_features: int, out_features: int, double_quant: bool) -> QuantLayout:
    if quant == "int8":
        return layout_int8(in_features, out_features)
    return layout_4bit(in_features * out_features, double_quant)


def bits_per_param(quant: str, in_features: int, out_features: int, double_quant: bool) -> float:
    """Storage bits per weight element including constants (QLoRA paper: 4 + 0.5, or 4 + 0.127)."""
    return 8 * layout(quant, in_features, out_features, double_quant).total / (in_features * out_features)


def dequant_temporary(quant: str, in_features: int, out_features: int, double_quant: bool,
                      compute_bytes: int) -> int:
    """Bytes a dequantization holds at once for one weight.

    4-bit: bitsandbytes' dequantize_4bit (and the CUDA gemm_4bit dequant+F.linear fallback,
    backends/cuda/ops.py _dequant_linear_fallback) first rebuilds float32 absmax when nested,
    then writes the weight in the compute dtype: out x in x compute_bytes.
    int8: MatMul8bitLt.backward multiplies CB.to(dtype) by the scales: one weight in the compute dtype.
    """
    return sum(alloc(n) for n in dequant_buffers(quant, in_features, out_features, double_quant, compute_bytes))


def dequant_buffers(quant: str, in_features: int, out_features: int, double_quant: bool,
                    compute_bytes: int) -> tuple[int, ...]:
    """The buffers of dequant_temporary one by one, in the order they are made: the float32
    absmax (4-bit, nested: functional.py dequantize_4bit's `dequantize_blockwise(quant_state.absmax,
    quant_state.state2)`), then the weight in the compute dtype."""
    weight = in_features * out_features * compute_bytes
    if quant != "int8" and double_quant:
        return dequantized_absmax_bytes(in_features * out_features), weight
    return (weight,)
