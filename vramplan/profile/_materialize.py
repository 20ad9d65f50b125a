"""Random weights on the device, one tensor at a time, for models too big to build whole.

`vramplan profile --random-weights` must be able to run a 70B model on one GPU: building it with
`from_config` under `torch.device("cuda")` would first materialize every weight in bf16
(140 GB for 70B), and building it on the CPU would need that much host RAM. What a checkpoint
load does instead (transformers' from_pretrained with a BitsAndBytesConfig: the model skeleton
on the meta device, then each checkpoint tensor moved to the device and quantized by
Bnb4bitQuantize / Bnb8bitQuantize as it arrives) is repeated here with random tensors:

1. `AutoModelForCausalLM.from_config` under `torch.device("meta")`: shapes only, no memory.
2. For qlora, transformers' own quantizer replaces the nn.Linear modules (`preprocess_model`:
   replace_with_bnb_linear, lm_head and tied weights kept), exactly as from_pretrained does.
3. Module by module, in the order from_pretrained loads their weights (sorted checkpoint keys,
   not the modules' own order): every parameter and buffer is created on the device with
   `Module.to_empty(recurse=False)` and initialized by the model's own `_init_weights` (normal
   with std = initializer_range, ones for norms, rotary inv_freq recomputed); a quantized Linear
   gets its bf16 weight drawn directly on the device and handed to
   `Params4bit(value, requires_grad=False, **old.__dict__).to(device)` (Int8Params for 8-bit),
   the call Bnb4bitQuantize.convert makes, which quantizes it on the device; the bf16 tensor is
   then freed. At most one bf16 weight exists at a time (for 70B the largest is 8192 x 28672 x 2
   bytes = 470 MB), as in a checkpoint load.
4. Parameters shared by several modules (tied embeddings) are created once and shared again,
   never allocated a second time (BUILD).

The simulate package's helpers (hf_config, bnb_config) are reused so the model, its quantization
config and attention choice are the ones simulate and the estimate assume.
"""
from __future__ import annotations

import warnings

from vramplan.core._errors import ModelError
from vramplan.simulate._build import bnb_config, hf_config, torch_dtype

# Recorded in a random-weights profile record (run["random_weights_build"]). Records without it
# come from build 1, which made the modules in their own order and allocated a tensor tied to one
# made already (an lm_head tied to the embeddings) with Module.to_empty, freed once re-shared;
# build 2 makes them in checkpoint order, as from_pretrained loads them, and shares a tied tensor
# without allocating it (docs/allocator.md#random-weights-load).
BUILD = 2


def random_model(spec, setup, device: str, seed: int = 0):
    """The transformers model with random weights on `device` (quantized for qlora), before peft."""
    import torch
    from transformers import AutoModelForCausalLM

    config = hf_config(spec, setup)
    dtype = torch_dtype(setup)
    dev = torch.device(device)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.device("meta"):
            try:
                model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=setup.attn)
            except ValueError as exc:
                raise ModelError(f"transformers cannot build {spec.id} as a causal LM: {exc}",
                                 hint="profile supports AutoModelForCausalLM architectures") from None
        quantizer = _preprocess(model, setup) if setup.method == "qlora" else None
        _materialize(model, dev, dtype)
        if quantizer is not None:
            quantizer.postprocess_model(model)
            model.hf_quantizer = quantizer
            model.is_loaded_in_4bit = setup.quant != "int8"
            model.is_loaded_in_8bit = setup.quant == "int8"
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    model.train()
    return model


def _preprocess(model, setup):
    import inspect

    from transformers.quantizers.auto import AutoHfQuantizer

    quantizer = AutoHfQuantizer.from_config(bnb_config(setup), pre_quantized=False)
    kwargs = dict(model=model, dtype=torch_dtype(setup), device_map=None)
    # transformers 5.x added keyword arguments over time (checkpoint_files, use_kernels); pass
    # the ones this version names, as from_pretrained does.
    params = inspect.signature(quantizer.preprocess_model).parameters
    if "checkpoint_files" in params or any(p.kind == p.VAR_KEYWORD for p in params.values()):
        kwargs.update(checkpoint_files=None, use_kernels=False)
    quantizer.preprocess_model(**kwargs)
    return quantizer


def _materialize(model, dev, dtype) -> None:
    import torch

    try:
        import bitsandbytes as bnb
        quantized = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    except ImportError:
        bnb, quantized = None, ()
    done: dict[int, torch.Tensor] = {}   # id(meta tensor) -> its device replacement (tied weights)
    std = _std(model)
    for module in _checkpoint_ordered(model):
        own = list(module._parameters.items()) + list(module._buffers.items())
        if quantized and isinstance(module, quantized):
            _quantized_linear(module, bnb, dev, dtype, std)
            continue
        replaced = {name: done[id(t)] for name, t in own if t is not None and id(t) in done}
        originals = {name: t for name, t in own if t is not None}
        if len(replaced) < len(originals):
            module.to_empty(device=dev, recurse=False)
            _init(model, module)
        # else every tensor is shared with one made already (an lm_head tied to the embeddings):
        # from_pretrained never allocates it, and neither may this. `to_empty` would allocate a
        # full copy, freed once re-shared: a segment the caching allocator keeps for the run
        # (docs/allocator.md#random-weights-load)
        for name, t in replaced.items():  # re-share tied tensors
            if name in module._parameters:
                module._parameters[name] = t
            else:
                module._buffers[name] = t
        for name, old in originals.items():
            new = module._parameters.get(name) if name in module._parameters else module._buffers.get(name)
            done.setdefault(id(old), new)


def _checkpoint_ordered(model) -> list:
    """The modules holding meta tensors, in the order from_pretrained loads their weights: by
    their first tensor's name in checkpoint order (estimate/_inventory.py checkpoint_order), which
    within a decoder layer is not the modules' own order (mlp before self_attn)."""
    from vramplan.estimate._inventory import checkpoint_order

    found = []
    for prefix, module in model.named_modules():
        own = [(name, t) for name, t in list(module._parameters.items()) + list(module._buffers.items())
               if t is not None]
        if any(t.device.type == "meta" for _, t in own):
            first = min(checkpoint_order(f"{prefix}.{name}" if prefix else name) for name, _t in own)
            found.append((first, len(found), module))
    return [module for _first, _i, module in sorted(found, key=lambda f: f[:2])]


def _init(model, module) -> None:
    """The model's own initialization for one module (transformers PreTrainedModel._init_weights:
    normal(0, initializer_range) for Linear / Embedding, ones for norms, rotary inv_freq).

    Rotary embeddings are rebuilt from their config on the device as well: their inv_freq
    buffers are computed, not learned, and an older transformers 5.x `_init_weights` may not
    recompute them after `to_empty`."""
    import torch

    with torch.no_grad():
        model._init_weights(module)
        if "RotaryEmbedding" in type(module).__name__ and hasattr(module, "inv_freq"):
            try:
                fresh = type(module)(config=module.config, device=module.inv_freq.device)
            except Exception:  # noqa: BLE001 - a signature this code does not know: keep _init_weights' values
                return
            for name, buf in fresh._buffers.items():
                if name in module._buffers and module._buffers[name] is not None \
                        and module._buffers[name].shape == buf.shape:
                    module._buffers[name].copy_(buf)


def _std(model) -> float:
    config = model.config
    for key in ("initializer_range", "init_std"):
        value = getattr(config, key, None)
        if value:
            return float(value)
    return 0.02


def _quantized_linear(module, bnb, dev, dtype, std: float) -> None:
    """As Bnb4bitQuantize / Bnb8bitQuantize.convert: the checkpoint tensor (here drawn at random,
    directly on the device) wrapped in Params4bit / Int8Params and moved, which quantizes it."""
    import torch

    old = module.weight
    with torch.no_grad():
        value = torch.empty(tuple(old.shape), dtype=dtype, device=dev).normal_(0.0, std)
        if isinstance(module, bnb.nn.Linear4bit):
            new = bnb.nn.Params4bit(value, requires_grad=False, **old.__dict__).to(dev)
        else:
            kwargs = dict(old.__dict__)
            kwargs.pop("SCB", None)
            new = bnb.nn.Int8Params(value, requires_grad=False, **kwargs).to(dev)
        del value
        module.weight = new
        if module.bias is not None and module.bias.device.type == "meta":
            module.bias = torch.nn.Parameter(torch.zeros(tuple(module.bias.shape), dtype=dtype, device=dev),
                                             requires_grad=False)
    for name, buf in list(module._buffers.items()):
        if buf is not None and buf.device.type == "meta":
            module._buffers[name] = torch.zeros_like(buf, device=dev)
