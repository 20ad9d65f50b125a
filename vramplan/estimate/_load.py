"""The load phase: which tensors are made, cast and freed before the first step, in order. The
estimate's allocation stream (estimate/_events.py) and simulate's (simulate/_reserved.py
two_step_events) both play it, so the caching allocator sees the same load on both sides
(docs/allocator.md#load-order, #quantization-on-load, #kbit-load).

What happens, with its source:
1. from_pretrained loads the checkpoint's tensors in the sorted order of their keys (the caller
   lists them so). An int8 weight is quantized as it arrives (bitsandbytes 0.50 nn/modules.py
   Int8Params._quantize): a float16 copy on the device, then functional.int8_vectorwise_quant
   makes the float32 row scales (SCB) and the int8 weight (backends/cuda/ops.py: row_stats, then
   out_row), and the copy goes when _quantize returns. A 4-bit weight is quantized as it arrives (bitsandbytes 0.50 nn/modules.py
   Params4bit._quantize): its tensor in the load dtype is moved to the device, then
   functional.quantize_4bit makes the float32 absmax and the packed weight
   (backends/cuda/ops.py quantize_4bit: absmax first), the code book and, with double
   quantization, the offset, `_absmax - offset`, and quantize_blockwise's absmax and uint8 absmax
   and code copy; `_absmax - offset` goes when quantize_blockwise returns, the float32 absmax at
   `del _absmax`, the load-dtype tensor when _quantize returns.
2. peft 0.21 utils/other.py prepare_model_for_kbit_training: for every parameter in
   `model.parameters()` order (embed_tokens first, lm_head last) that is float16 / bfloat16 and not
   Params4bit, `param.data = param.data.to(torch.float32)`: the float32 copy is made, then the
   16-bit storage goes. Then `torch.cuda.empty_cache()` (auto_clear_cache=True): every cached
   block that is a whole segment is released, the 16-bit embeddings' segments among them.
3. peft get_peft_model: the LoRA tensors, in `named_modules()` order, each layer's lora_A then
   lora_B (tuners/lora/layer.py update_layer), in float32 (autocast_adapter_dtype).
4. Under qlora.py's recast (get_accelerate_model after get_peft_model, --bf16), in
   `named_modules()` order: embed_tokens `.to(torch.bfloat16)`, every LoraLayer (its lora_A and
   lora_B), lm_head; each through nn.Module._apply, which makes the bfloat16 tensor before the
   float32 one is released.
"""
from __future__ import annotations

from vramplan.core._record import record
from vramplan.core._setup import TrainSetup
from vramplan.estimate._quant import alloc

CAST_FROM = 2       # the 16-bit load dtype of the tensors prepare_model_for_kbit_training casts
CAST_TO = 4         # torch.float32
BLOCKSIZE = 64      # quantize_4bit's default, which Linear4bit / Params4bit use
# A tensor's part in the load:
#   "weight"   made once, as it stays (16-bit weights, biases, buffers, a lump)
#   "packed"   a 4-bit packed weight, quantized on the device as it loads; its bitsandbytes
#              constants follow it in the list as "constant"
#   "int8"     an int8 weight, quantized on the device as it loads; its SCB follows as "constant"
#   "constant" one of the quantized weight's constants before it
#   "upcast"   loaded 16-bit and cast to float32 by prepare_model_for_kbit_training (norms)
#   "embed" / "head"  embed_tokens / an untied lm_head: cast like "upcast", and back to 16-bit by
#              qlora.py's recast where the setup has it
#   "adapter"  a LoRA tensor, made by get_peft_model (float32 until a recast makes it 16-bit)
#   "later"    made after the adapters (the inputs)
# Without prepare_model_for_kbit_training's casts, "upcast", "embed" and "head" are weights.


FP16 = 2            # Int8Params._quantize copies the weight to the device in torch.float16


def quantized_roles(setup: TrainSetup) -> tuple[str, str]:
    """The roles of a Linear weight and of its bitsandbytes constants in this setup's load."""
    if not setup.quantized:
        return "weight", "weight"
    return ("int8" if setup.quant == "int8" else "packed"), "constant"


@record
class LoadTensor:
    key: object       # the caller's name for the tensor as it is when the load is over
    role: str         # one of the roles above
    numel: int        # elements: of the weight a packed one holds, of a cast or adapter tensor
    nbytes: int       # bytes when the load is over


@record
class LoadSettings:
    load_bytes: int      # bytes an element of the load dtype (a 4-bit weight's before it is packed)
    double_quant: bool   # quantize_4bit(compress_statistics=True)
    casts: bool          # prepare_model_for_kbit_training's casts are played (`casts`)
    recast: bool         # ... and qlora.py's recast after get_peft_model


def casts(spec, setup: TrainSetup) -> bool:
    """Whether prepare_model_for_kbit_training's casts are played: on a model loaded in 16 bits (an
    fp32 load has nothing to cast) with adapters, on a dense model without a vision tower. MoE
    expert stacks and a vision tower (cast before embed_tokens: it comes first in the modules'
    order) are not modelled: both sides then make every tensor once, as it stays."""
    return (setup.prepare_kbit and setup.compute_bytes == CAST_FROM and setup.uses_adapters
            and not getattr(spec, "num_experts", 0) and getattr(spec, "vision", None) is None)


def settings_of(spec, setup: TrainSetup) -> LoadSettings:
    cast = casts(spec, setup)
    return LoadSettings(setup.compute_bytes, setup.double_quant, cast, cast and setup.recast)


def _quantized(weight: LoadTensor, constants: list, settings: LoadSettings) -> list:
    """One 4-bit weight as it loads (the module docstring, 1.): the constants keep their order in
    the list; without double quantization the float32 absmax, the first, is made before the packed
    weight, with it the uint8 absmax and the rest after `_absmax - offset`."""
    copy = ("copy", weight.key, settings.load_bytes)
    blocks = -(-weight.numel // BLOCKSIZE)
    ops = [("alloc", copy, alloc(weight.numel * settings.load_bytes))]
    made = [("alloc", t.key, t.nbytes) for t in constants]
    if settings.double_quant:
        absmax, minus_offset = ("absmax", weight.key), ("absmax - offset", weight.key)
        ops += [("alloc", absmax, alloc(blocks * 4)), ("alloc", weight.key, weight.nbytes),
                ("alloc", minus_offset, alloc(blocks * 4))] + made
        ops += [("free", minus_offset), ("free", absmax)]
    else:
        ops += made[:1] + [("alloc", weight.key, weight.nbytes)] + made[1:]
    return ops + [("free", copy)]


def _int8(weight: LoadTensor, constants: list) -> list:
    """One int8 weight as it loads (the module docstring, 1.): the float16 copy, the row scales,
    the int8 weight, the copy freed."""
    copy = ("copy", weight.key, FP16)
    return ([("alloc", copy, alloc(weight.numel * FP16))] + [("alloc", t.key, t.nbytes) for t in constants]
            + [("alloc", weight.key, weight.nbytes), ("free", copy)])


def load_ops(tensors: list[LoadTensor], settings: LoadSettings) -> list[tuple]:
    """The load as ("alloc", key, nbytes) / ("free", key) / ("empty_cache",) events. Each tensor's
    last allocation carries its own key; its earlier copies and transients are keyed apart."""
    ops: list = []
    cast = [t for t in tensors if settings.casts and t.role in ("upcast", "embed", "head")]
    is_cast = {id(t) for t in cast}
    adapters = [t for t in tensors if t.role == "adapter"]
    recast = settings.recast

    def back_to_16(t: LoadTensor) -> bool:
        return recast and t.role in ("embed", "head")

    def copy(t: LoadTensor, nbytes: int) -> object:
        return ("copy", t.key, nbytes)

    i = 0                                               # 1. from_pretrained
    while i < len(tensors):
        t = tensors[i]
        i += 1
        if t.role in ("packed", "int8"):
            group = i
            while i < len(tensors) and tensors[i].role == "constant":
                i += 1
            ops += (_quantized(t, tensors[group:i], settings) if t.role == "packed"
                    else _int8(t, tensors[group:i]))
        elif id(t) in is_cast:
            ops.append(("alloc", copy(t, CAST_FROM), alloc(t.numel * CAST_FROM)))
        elif t.role not in ("adapter", "later"):
            ops.append(("alloc", t.key, t.nbytes))
    # 2. model.parameters() order: embed_tokens is the first module, lm_head the last
    for t in sorted(cast, key=lambda t: {"embed": 0, "head": 2}.get(t.role, 1)):
        ops.append(("alloc", copy(t, CAST_TO) if back_to_16(t) else t.key,
                    alloc(t.numel * CAST_TO) if back_to_16(t) else t.nbytes))
        ops.append(("free", copy(t, CAST_FROM)))
    if cast:
        ops.append(("empty_cache",))
    for t in adapters:                                  # 3. get_peft_model
        ops.append(("alloc", copy(t, CAST_TO), alloc(t.numel * CAST_TO)) if recast else ("alloc", t.key, t.nbytes))
    if recast:                                          # 4. named_modules() order
        order = ([t for t in cast if t.role == "embed"] + adapters + [t for t in cast if t.role == "head"])
        for t in order:
            ops.append(("alloc", t.key, t.nbytes))
            ops.append(("free", copy(t, CAST_TO)))
    ops += [("alloc", t.key, t.nbytes) for t in tensors if t.role == "later"]
    return ops
