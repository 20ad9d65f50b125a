"""The load under peft's prepare_model_for_kbit_training (and qlora.py's recast after it): which
tensors are made, cast and freed before the first step, in order. The estimate's allocation
stream (estimate/_events.py) and simulate's (simulate/_reserved.py two_step_events) both play it,
so the caching allocator sees the same load on both sides (docs/allocator.md#kbit-load).

What happens, with its source:
1. from_pretrained loads the model with its 16-bit tensors in the load dtype (embeddings, norms,
   lm_head: 2 bytes an element) and the quantized weights packed.
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

LOAD_BYTES = 2      # the 16-bit load dtype of the tensors prepare_model_for_kbit_training casts
CAST_BYTES = 4      # torch.float32
# A tensor's part in the load:
#   "weight"  made once, as it stays (quantized weights, their constants, 16-bit biases, buffers)
#   "upcast"  loaded 16-bit and cast to float32 by prepare_model_for_kbit_training (norms)
#   "embed" / "head"  embed_tokens / an untied lm_head: cast like "upcast", and back to 16-bit by
#             qlora.py's recast where the setup has it
#   "adapter" a LoRA tensor, made by get_peft_model (float32 until a recast makes it 16-bit)
#   "later"   made after the adapters (the inputs)
ROLES = ("weight", "upcast", "embed", "head", "adapter", "later")


@record
class LoadTensor:
    key: object       # the caller's name for the tensor as it is when the load is over
    role: str         # one of ROLES
    numel: int        # elements (the sizes of its 16-bit and float32 copies)
    nbytes: int       # bytes when the load is over


def applies(spec, setup: TrainSetup) -> bool:
    """Whether this load is played: prepare_model_for_kbit_training on a model loaded in 16 bits (an
    fp32 load has nothing to cast) with adapters, on a dense model without a vision tower. MoE
    expert stacks and a vision tower (cast before embed_tokens: it comes first in the modules'
    order) are not modelled: both sides then make every tensor once, as it stays."""
    return (setup.prepare_kbit and setup.compute_bytes == LOAD_BYTES and setup.uses_adapters
            and not getattr(spec, "num_experts", 0) and getattr(spec, "vision", None) is None)


def load_ops(tensors: list[LoadTensor], recast: bool) -> list[tuple]:
    """The load as ("alloc", key, nbytes) / ("free", key) / ("empty_cache",) events. Each tensor's
    last allocation carries its own key; its earlier copies are keyed ("copy", key, dtype bytes)."""
    ops: list = []
    cast = [t for t in tensors if t.role in ("upcast", "embed", "head")]
    adapters = [t for t in tensors if t.role == "adapter"]

    def back_to_16(t: LoadTensor) -> bool:
        return recast and t.role in ("embed", "head")

    def copy(t: LoadTensor, nbytes: int) -> object:
        return ("copy", t.key, nbytes)

    for t in tensors:                                   # 1. from_pretrained
        if t.role == "weight":
            ops.append(("alloc", t.key, t.nbytes))
        elif t.role in ("upcast", "embed", "head"):
            ops.append(("alloc", copy(t, LOAD_BYTES), alloc(t.numel * LOAD_BYTES)))
    # 2. model.parameters() order: embed_tokens is the first module, lm_head the last
    for t in sorted(cast, key=lambda t: {"embed": 0, "head": 2}.get(t.role, 1)):
        ops.append(("alloc", copy(t, CAST_BYTES) if back_to_16(t) else t.key,
                    alloc(t.numel * CAST_BYTES) if back_to_16(t) else t.nbytes))
        ops.append(("free", copy(t, LOAD_BYTES)))
    if cast:
        ops.append(("empty_cache",))
    for t in adapters:                                  # 3. get_peft_model
        ops.append(("alloc", copy(t, CAST_BYTES), alloc(t.numel * CAST_BYTES)) if recast else ("alloc", t.key, t.nbytes))
    if recast:                                          # 4. named_modules() order
        order = ([t for t in cast if t.role == "embed"] + adapters + [t for t in cast if t.role == "head"])
        for t in order:
            ops.append(("alloc", t.key, t.nbytes))
            ops.append(("free", copy(t, CAST_BYTES)))
    ops += [("alloc", t.key, t.nbytes) for t in tensors if t.role == "later"]
    return ops
