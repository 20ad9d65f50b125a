"""Where an allocation belongs: the phase, module and component a storage is charged to while a
simulated (or profiled) step runs, and the registration of what is on the device before it.
Shared by the full trace (_step.py), the identical-layers shortcut (_shortcut.py) and the real
profile run, so all three attribute memory the same way."""
from __future__ import annotations

from typing import Callable

from vramplan.core._components import Component

LOGITS_REGION = "logits_loss"


class StepContext:
    """Where execution is: phase, module and the component newly allocated storages default to.

    Forward: a module stack from forward pre/post hooks (recomputation under gradient
    checkpointing fires them again inside backward). Backward: a tensor hook on each module
    output fires when its gradient is ready (that module's backward starts), a hook on its input
    when the input's gradient is ready (it ends). Backward starts in the loss, then lm_head."""

    def __init__(self, lm_head_name: str):
        self.phase = "setup"
        self.stack: list[str] = []
        self.bw_module = ""
        self.region = ""              # "logits_loss" inside lm_head / the loss function
        self.lm_head = lm_head_name
        self.lm_ancestors: set[str] = set()   # modules whose subtree holds lm_head
        self.handles = []
        self.layer_names: set[str] = set()    # decoder layers: on_layer() fires as each one runs
        self.on_layer: Callable[[str], None] | None = None
        self.failed_module: tuple | None = None   # (module, exception) of an exception leaving a module

    def __call__(self) -> tuple:
        module = self.stack[-1] if self.stack else self.bw_module
        tag = None
        if self.phase == "optimizer":
            tag = Component.TEMPORARIES.value
        elif self.region == LOGITS_REGION or module == self.lm_head or module.startswith(self.lm_head + "."):
            tag = Component.LOGITS_LOSS.value
            if self.region == LOGITS_REGION and module in self.lm_ancestors:
                module = "loss"  # the loss function, called by the top-level model
        return (self.phase, module or self.phase, tag)

    # --- hooks ---------------------------------------------------------------------------------
    def install(self, model, names: dict) -> None:
        import sys

        import torch
        from torch.utils._pytree import tree_leaves

        def pre(module, args, kwargs):
            name = names[module]
            self.stack.append(name)
            if self.on_layer is not None and self.phase == "forward" and name in self.layer_names:
                self.on_layer(name)
            if torch.is_grad_enabled():
                for t in tree_leaves((args, kwargs)):
                    if isinstance(t, torch.Tensor) and t.requires_grad and t.grad_fn is not None:
                        t.register_hook(lambda g, n=name: self._bw_leave(n))
                        break

        def post(module, args, out):
            name = names[module]
            exc = sys.exc_info()[1]  # always_call hooks also run while an exception leaves the module
            if exc is not None and type(exc).__name__ != "_StopRecomputationError" \
                    and (self.failed_module is None or self.failed_module[1] is not exc):
                self.failed_module = (name, exc)  # the innermost module sees it first
            if self.stack and self.stack[-1] == name:
                self.stack.pop()
            elif name in self.stack:
                self.stack.remove(name)
            if torch.is_grad_enabled():
                for t in tree_leaves(out):
                    if isinstance(t, torch.Tensor) and t.requires_grad and t.grad_fn is not None:
                        t.register_hook(lambda g, n=name: self._bw_enter(n))

        for module in model.modules():
            if any(names.get(m) == self.lm_head for m in module.modules()):
                self.lm_ancestors.add(names[module])
        for module in model.modules():
            if module in names:
                self.handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
                # always_call: checkpoint recomputation stops early by raising inside the forward
                self.handles.append(module.register_forward_hook(post, always_call=True))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def _bw_enter(self, name: str) -> None:
        self.bw_module = name
        if self.on_layer is not None and name in self.layer_names:
            self.on_layer(name)
        if self.region == LOGITS_REGION and name not in self.lm_ancestors \
                and not name.startswith(self.lm_head + "."):
            self.region = ""  # backward reached a module before lm_head's: logits are done

    def _bw_leave(self, name: str) -> None:
        # hooks on one tensor fire in registration order: the input of lora_B is the output of
        # lora_A, so "leave lora_B" may come after "enter lora_A"; leave only what is current.
        if self.bw_module == name or self.bw_module.startswith(name + "."):
            self.bw_module = name.rsplit(".", 1)[0] if "." in name else ""
        if name == self.lm_head:
            self.region = ""  # the gradient has left lm_head: logits and loss are done

    def wrap_loss(self, base) -> None:
        """Mark the loss function as the logits_loss region (transformers' loss_function setter)."""
        loss_fn = base.loss_function

        def loss_function(*args, **kwargs):
            outer = self.region
            self.region = LOGITS_REGION
            try:
                return loss_fn(*args, **kwargs)
            finally:
                self.region = outer

        base.loss_function = loss_function


def module_names(model) -> dict:
    """Readable names: peft's 'base_model.model.' prefix dropped."""
    names = {}
    for name, module in model.named_modules():
        short = name.removeprefix("base_model.model.")
        names[module] = type(module).__name__ if short in ("", "base_model", "base_model.model") else short
    return names


def short_name(name: str) -> str:
    """A parameter / module name as _module_names shows it (peft's prefix dropped)."""
    return name.removeprefix("base_model.model.")


def decoder_layers(model) -> tuple[str, list]:
    """(short name of the decoder layer list, its modules): the largest nn.ModuleList of the model;
    of two as long, the one outside a vision tower (Gemma3ForConditionalGeneration builds the SigLIP
    encoder's layers before the language model's)."""
    import torch

    best, rank = ("", []), (-1, False)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and (len(module), "vision" not in name) > rank:
            best, rank = (short_name(name), list(module)), (len(module), "vision" not in name)
    return best


def register_live_state(tracker, built, paged: list, spec=None, setup=None) -> None:
    """Everything on the device before the step: quant state, parameters, buffers, optimizer state,
    the batch. Each block gets its part in the load (Block.load: estimate/_load.py LoadTensor's
    role and numel, and the LoadSettings of `spec` and `setup`), which _reserved.py
    two_step_events plays as the estimate does: the model's tensors in the order a checkpoint load
    makes them, each 4-bit weight quantized as it arrives, the LoRA tensors after them in
    get_peft_model's order, the batch last; prepare_model_for_kbit_training's casts and qlora.py's
    recast where estimate/_load.py casts says they are played."""
    from vramplan.simulate import _kernels as kernels  # imports torch: loaded when a step runs

    import torch

    from vramplan.estimate._load import settings_of
    from vramplan.estimate._inventory import checkpoint_order

    model = built.model
    settings = settings_of(spec, setup) if setup is not None else None

    def track(t, tag, role="weight", count=None):
        block = tracker.track(t, tag)
        if block is not None and not block.load and settings is not None:
            block.load = (role, t.numel() if count is None else count, settings)
        return block

    quantized = []

    def track_quantized(module) -> None:
        weight = module.weight
        qs = getattr(weight, "quant_state", None)
        if qs is not None:   # the packed 4-bit weight, quantized as it loads, its constants after it
            quantized.append(track(weight, Component.WEIGHTS.value, "packed", qs.shape.numel()))
            for t in (qs.absmax, qs.code, qs.offset):
                quantized.append(track(t, Component.QUANT_CONSTANTS.value, "constant"))
            if qs.state2 is not None:
                quantized.append(track(qs.state2.absmax, Component.QUANT_CONSTANTS.value, "constant"))
                quantized.append(track(qs.state2.code, Component.QUANT_CONSTANTS.value, "constant"))
        else:   # bnb Linear8bitLt: the int8 weight (MatmulLtState.CB is its storage), quantized as it loads, its SCB after it
            state = module.state
            quantized.append(track(weight, Component.WEIGHTS.value, "int8", weight.numel()))
            quantized.append(track(state.CB, Component.WEIGHTS.value))
            quantized.append(track(state.SCB, Component.QUANT_CONSTANTS.value, "constant"))
            quantized.append(track(getattr(weight, "SCB", None), Component.QUANT_CONSTANTS.value, "constant"))

    embed = built.base.get_input_embeddings().weight
    head = getattr(built.lm_head, "weight", None)

    def track_param(p) -> None:
        # what prepare_model_for_kbit_training would cast (estimate/_load.py casts says whether it does): the
        # embeddings, and the parameters float32 after it
        role = ("embed" if p is embed else "head" if p is head
                else "upcast" if p.dtype == torch.float32 else "weight")
        track(p, Component.WEIGHTS.value, role)

    # The model's tensors in the order from_pretrained loads and quantizes the checkpoint's keys
    # (sorted, estimate/_inventory.py checkpoint_order): quantized Linear layers, under their weight's
    # key, among the other parameters. Which small tensors share a segment follows from it.
    entries, packed = [], set()
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if getattr(weight, "quant_state", None) is not None or hasattr(getattr(module, "state", None), "SCB"):
            entries.append((checkpoint_order(name + ".weight"), track_quantized, module))
            packed.add(id(weight))
    params = list(model.named_parameters())
    entries += [(checkpoint_order(name), track_param, p) for name, p in params
                if "lora_" not in name and id(p) not in packed]
    for _key, register, item in sorted(entries, key=lambda e: e[0]):
        register(item)
    # What an op builds from a quantized weight or its constants is a dequantized copy
    # (MatMul8bitLt.backward: CB.to(dtype).mul_(SCB / 127); functional.dequantize_4bit), except
    # the bitsandbytes matmuls themselves, whose outputs are activations.
    tracker.propagate = {b.key: Component.TEMPORARIES.value for b in quantized if b is not None}
    tracker.propagate_skip = kernels.matmul_ops()
    # get_peft_model makes the LoRA tensors after the load, in the modules' order
    for _name, p in [np for np in params if "lora_" in np[0]]:
        track(p, Component.ADAPTERS.value, "adapter")
    for _, b in model.named_buffers():
        track(b, Component.WEIGHTS.value)
    register_optimizer_state(tracker, built.optimizer, paged)
    track(built.input_ids, Component.ACTIVATIONS.value, "later")


def register_optimizer_state(tracker, optimizer, paged: list) -> None:
    """optimizer.state on the device; paged state (CUDA unified memory) only adds to `paged`."""
    from vramplan.simulate import _kernels as kernels  # imports torch: loaded when a step runs

    import torch

    for state in optimizer.state.values():
        for key, v in state.items():
            if not isinstance(v, torch.Tensor):
                continue
            if kernels.is_paged(v):
                paged.append(v.untyped_storage().nbytes())
                tracker.ignore(v)
            elif key == "step" and v.dim() == 0 and tracker.device_type == "cpu" \
                    and not optimizer.defaults.get("fused"):
                # torch.optim keeps `step` on the host unless capturable/fused (adam.py
                # _init_group); a real CPU run has it on its only device: not counted. Fused
                # AdamW keeps it on the parameters' device, as on CUDA: counted.
                tracker.ignore(v)
            else:
                tracker.track(v, Component.OPTIMIZER_STATE.value)


def component_of(block) -> str:
    from vramplan.simulate import _kernels as kernels  # imports torch: loaded when a step runs

    if block.tag == "stray":  # should not happen (Trace.strays counts them): the step made it
        return Component.ACTIVATIONS.value
    if block.tag is not None:
        return block.tag
    _phase, _module, tag = block.where
    if block.op in kernels.DEQUANT_OPS:
        return Component.TEMPORARIES.value
    return tag or Component.ACTIVATIONS.value
