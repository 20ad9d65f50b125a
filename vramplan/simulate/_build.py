"""Build the model, adapters, optimizer and batch exactly as a user's training script would.

The recipe (TrainSetup's docstring) is
    model = AutoModelForCausalLM.from_pretrained(id, quantization_config=BitsAndBytesConfig(...),
                                                 dtype=compute_dtype, attn_implementation=attn)
    model = prepare_model_for_kbit_training(model)            # only with setup.prepare_kbit
    model.gradient_checkpointing_enable({"use_reentrant": setup.reentrant})   # with setup.grad_ckpt
    model = get_peft_model(model, LoraConfig(r, target_modules, lora_dropout, task_type="CAUSAL_LM"))
    optimizer = ...; model.train()

from_pretrained needs weights; here the same steps run from the config: the model is built by
`from_config` under the target device, and bitsandbytes quantization goes through transformers'
own quantizer object (Bnb4BitHfQuantizer / Bnb8BitHfQuantizer): `preprocess_model` runs
get_modules_to_not_convert + replace_with_bnb_linear (lm_head and tied weights stay unquantized,
only `type(module) is nn.Linear` is replaced), then each weight is quantized the way
integrations/bitsandbytes.py Bnb4bitQuantize / Bnb8bitQuantize do when a checkpoint tensor
arrives: Params4bit(value, requires_grad=False, **old.__dict__).to(device) (Int8Params for 8-bit).
`.to("meta")` skips quantization, so on meta the same `_quantize` it would call runs directly;
bitsandbytes registers meta kernels for quantize_4bit / int8_vectorwise_quant, so the packed
weight and every QuantState tensor exist with their real shapes and dtypes.
"""
from __future__ import annotations

import contextlib
import warnings
import dataclasses
from dataclasses import dataclass, field

from vramplan.core._errors import ModelError, SimulationError, UnmodelledError
from vramplan.core._record import record
from vramplan.core._setup import ALL_LINEAR, TrainSetup

DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


@dataclass
class Built:
    model: object            # what the step calls (a PeftModel for lora / qlora)
    base: object             # the transformers model inside
    optimizer: object
    input_ids: object
    device: str
    compute_dtype: object
    lm_head: object          # the output embedding module (logits)
    notes: list = field(default_factory=list)


@record
class ConfigSpec:
    """A model the analytic registry (core/_architectures.py) does not know, as simulate needs it:
    the config.json that transformers builds it from, and the few shapes the step reads. Duck-types
    the fields of core.models.ModelSpec that simulate uses."""
    id: str
    source: str
    model_type: str
    config: dict = field(repr=False, compare=False)
    layers: int = 0
    vocab: int = 0
    num_experts: int = 0
    experts_per_tok: int = 0
    unmodelled: str = ""      # why the analytic model, which knows the type, does not model this config
    analytic = False          # no estimate beside it: the analytic model lacks this type or setting

    def to_dict(self) -> dict:
        """The `model` object of the JSON (core.models.ModelSpec.to_dict's keys this spec knows)."""
        return {"id": self.id, "source": self.source, "model_type": self.model_type,
                "num_hidden_layers": self.layers, "vocab_size": self.vocab,
                "num_local_experts": self.num_experts, "num_experts_per_tok": self.experts_per_tok}


def config_spec(config: dict, model_id: str, source: str) -> ConfigSpec:
    """Read depth, vocabulary and MoE fields through transformers' own config class
    (AutoConfig.for_model semantics: CONFIG_MAPPING[model_type].from_dict), so defaults a
    config.json leaves out are those transformers uses."""
    if not isinstance(config, dict) or not config.get("model_type"):
        raise ModelError(f"config for {model_id} has no model_type",
                         hint="a Hugging Face config.json names its model_type")
    probe = ConfigSpec(model_id, source, config["model_type"], dict(config))
    try:
        text = hf_config(probe, None).get_text_config()
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise ModelError(f"transformers cannot read the config of {model_id}: {_clipped(str(exc))}",
                         hint="check config.json against the model's configuration class") from None
    experts = getattr(text, "num_local_experts", None) or getattr(text, "num_experts", None) or 0
    top_k = getattr(text, "num_experts_per_tok", None) or 0 if experts else 0
    return ConfigSpec(model_id, source, config["model_type"], dict(config), layers=int(text.num_hidden_layers),
                      vocab=int(text.vocab_size), num_experts=int(experts), experts_per_tok=int(top_k))


def simulation_spec(name: str):
    """The spec simulate runs: the analytic registry's ModelSpec when it knows the type (so the
    estimate can stand beside it), otherwise a ConfigSpec that transformers builds."""
    from vramplan.core._architectures import ARCHITECTURES
    from vramplan.core._models import TEXT_CONFIG_TYPES, resolve, resolve_config

    config, model_id, source = resolve_config(name)
    # a multimodal config whose decoder the registry knows (Gemma 3's gemma3 -> gemma3_text) is a
    # ModelSpec too: it builds the whole multimodal class (ModelSpec.build_config)
    if isinstance(config, dict) and (config.get("model_type") in ARCHITECTURES or config.get("model_type") in TEXT_CONFIG_TYPES):
        try:
            return resolve(name)
        except UnmodelledError as exc:   # a setting the estimate does not model: transformers builds it
            return dataclasses.replace(config_spec(config, model_id, source), unmodelled=exc.message)
    return config_spec(config, model_id, source)


def respec(spec, config: dict):
    """The same kind of spec for another config of the same model (the shortcut's shallower copy)."""
    if isinstance(spec, ConfigSpec):
        return config_spec(config, spec.id, spec.source)
    from vramplan.core._models import spec_from_config
    if getattr(spec, "wrapper", None):   # the text config inside the same multimodal checkpoint
        config = {**spec.wrapper, "text_config": config}
    return spec_from_config(config, spec.id, spec.source)


def refuse_4bit_experts(spec, setup: TrainSetup) -> None:
    """--experts 4bit describes stacks transformers 5 cannot build: its MoE experts are fused 3-D
    nn.Parameters that bitsandbytes does not quantize (bitsandbytes issue #1849). Simulating them
    would silently measure 16-bit experts, so simulate and profile refuse."""
    if setup.experts_4bit and getattr(spec, "num_experts", 0):
        import transformers
        raise SimulationError(
            f"simulate cannot build {spec.id} with 4-bit experts: transformers {transformers.__version__} keeps "
            "MoE experts as fused 3-D parameters that bitsandbytes does not quantize",
            hint="--experts 4bit is estimate-only (vramplan estimate); drop it to simulate the 16-bit experts "
                 "transformers 5 trains")


def refuse_router_lora(spec, setup: TrainSetup) -> None:
    """LoRA on Llama 4's router fails on the first forward on any device (peft wraps the nn.Linear
    subclass Llama4Router, whose forward returns a tuple): the estimate's one-line error
    (estimate/_inventory.py refuse_router_lora) instead of a traceback from inside the step."""
    from vramplan.core._architectures import ARCHITECTURES

    arch = ARCHITECTURES.get(getattr(spec, "model_type", None))
    if arch is not None and arch.linear_router and hasattr(spec, "layer_linears"):   # a ModelSpec
        from vramplan.estimate._inventory import refuse_router_lora as refuse
        refuse(spec, setup)


def torch_dtype(setup: TrainSetup):
    import torch
    return getattr(torch, DTYPE_NAMES[setup.dtype])


def hf_config(spec, setup: TrainSetup):
    """The transformers config object for spec.config, or ModelError if transformers lacks it."""
    from transformers import CONFIG_MAPPING

    # a multimodal checkpoint AutoModelForCausalLM builds whole (core/_models.py WHOLE_MULTIMODAL:
    # Gemma3ForConditionalGeneration) is built from its outer config, text decoder inside
    source = spec.build_config() if getattr(spec, "wrapper", None) else dict(spec.config)
    model_type = source.get("model_type", spec.model_type)
    if model_type not in CONFIG_MAPPING:
        import transformers
        raise ModelError(f"architecture {model_type!r} ({spec.id}) is not known to transformers "
                         f"{transformers.__version__}",
                         hint="simulate needs a transformers release that has this model_type; "
                              "the analytic estimate does not")
    try:
        config = CONFIG_MAPPING[model_type].from_dict(source)
    except Exception as exc:   # transformers' strict config fields raise their own types (huggingface_hub's)
        raise ModelError(f"transformers refuses the config of {spec.id}: {_first_line(exc)}",
                         hint="fix the field it names in config.json") from None
    # training: no KV cache (transformers turns it off for checkpointing too); a wrapper's text
    # decoder reads its own config (Gemma3TextModel: `use_cache` of config.text_config)
    for part in {id(c): c for c in (config, config.get_text_config())}.values():
        part.use_cache = False
    return config


def build_model(spec, setup: TrainSetup, device: str = "meta", seed: int = 0):
    """The transformers model (quantized for qlora), before peft."""
    import torch
    from transformers import AutoModelForCausalLM

    refuse_4bit_experts(spec, setup)
    config = hf_config(spec, setup)
    refuse_router_lora(spec, setup)
    dtype = torch_dtype(setup)
    if device != "meta":
        torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.device(device):
            try:
                model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=setup.attn)
            except ValueError as exc:
                hint = ("use --attn eager" if "attention implementation" in str(exc)
                        else "simulate supports AutoModelForCausalLM architectures")
                first = str(exc).split(". ")[0]   # transformers adds advice after the first sentence
                raise ModelError(f"transformers cannot build {spec.id} as a causal LM: {_clipped(first)}",
                                 hint=hint) from None
            except (TypeError, KeyError, AssertionError, AttributeError, IndexError) as exc:
                # a config value the model's constructor cannot use: an unknown hidden_act (ACT2FN),
                # a pad_token_id outside the vocabulary (nn.Embedding's padding_idx assert), a string
                # where a number goes
                raise ModelError(f"transformers cannot build {spec.id} from its config: {_first_line(exc)}",
                                 hint="check the config.json values the message names") from None
    if setup.method == "qlora":
        quantize(model, setup, device)
    return model


def _first_line(exc: BaseException) -> str:
    text = _clipped(str(exc))
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _clipped(text: str, limit: int = 300) -> str:
    """A library's message on one line, at most `limit` characters: transformers' can list every
    config class it knows (about 3 KB for "Unrecognized configuration class")."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def bnb_config(setup: TrainSetup):
    from transformers import BitsAndBytesConfig

    if setup.quant == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=setup.quant,
                              bnb_4bit_use_double_quant=setup.double_quant,
                              bnb_4bit_compute_dtype=torch_dtype(setup))


def quantize(model, setup: TrainSetup, device: str) -> None:
    """transformers' quantizer replaces the Linear modules; then every weight is quantized as the
    checkpoint loader does (Bnb4bitQuantize.convert / Bnb8bitQuantize.convert)."""
    import bitsandbytes as bnb
    import torch
    from transformers.quantizers.auto import AutoHfQuantizer

    dtype = torch_dtype(setup)
    # bitsandbytes caches its 8-bit "dynamic" code book on the device of the first tensor it
    # quantizes (functional.quantize_blockwise); create it on the host first so that a meta run
    # does not leave a meta code book behind for later real runs.
    bnb_functional = bnb.functional
    if "dynamic" not in bnb_functional.name2qmap or bnb_functional.name2qmap["dynamic"].device.type == "meta":
        bnb_functional.name2qmap["dynamic"] = bnb_functional.create_dynamic_map()
    from transformers.pytorch_utils import Conv1D

    # the modules transformers' quantizer replaces: nn.Linear and GPT-2's Conv1D, whose [in, out]
    # weight is transposed before quantization (transformers/integrations/bitsandbytes.py
    # replace_with_bnb_linear, Bnb4bitQuantize.convert: `if issubclass(module.source_cls, Conv1D)`)
    linears = {name: (m.weight.T if isinstance(m, Conv1D) else m.weight, m.bias)
               for name, m in model.named_modules() if type(m) is torch.nn.Linear or isinstance(m, Conv1D)}
    quantizer = AutoHfQuantizer.from_config(bnb_config(setup), pre_quantized=False)
    quantizer.preprocess_model(model=model, dtype=dtype, device_map=None, checkpoint_files=None,
                               use_kernels=False)
    dev = torch.device(device)
    for name, module in model.named_modules():
        if not isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
            continue
        weight, bias = linears[name]
        value = weight.detach().to(dtype)  # the checkpoint tensor, in the load dtype
        old = module.weight
        if isinstance(module, bnb.nn.Linear4bit):
            new = bnb.nn.Params4bit(value, requires_grad=False, **old.__dict__)
            new = new._quantize(dev) if dev.type == "meta" else new.to(dev)
        else:
            kwargs = dict(old.__dict__)
            kwargs.pop("SCB", None)
            new = bnb.nn.Int8Params(value, requires_grad=False, **kwargs)
            new = new._quantize(dev) if dev.type == "meta" else new.to(dev)
        module.weight = new
        if bias is not None:  # loaded from the checkpoint in the load dtype
            module.bias = torch.nn.Parameter(bias.detach().to(dtype), requires_grad=False)
    quantizer.postprocess_model(model)
    model.hf_quantizer = quantizer
    model.is_loaded_in_4bit = setup.quant != "int8"
    model.is_loaded_in_8bit = setup.quant == "int8"


def add_adapters(model, setup: TrainSetup, device: str):
    from peft import LoraConfig, get_peft_model

    targets = ALL_LINEAR if setup.targets == (ALL_LINEAR,) else list(setup.targets)
    config = LoraConfig(r=setup.rank, target_modules=targets, lora_dropout=setup.lora_dropout,
                        task_type="CAUSAL_LM")
    try:
        with warnings.catch_warnings(), _values_unset(device):
            warnings.simplefilter("ignore")
            return get_peft_model(model, config)
    except ValueError as exc:
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if _is_linear(m)})
        raise ModelError(f"--targets {','.join(setup.targets)} matches no module of this model ({exc})",
                         hint=f"linear layers here: {', '.join(names)}; or use all-linear") from None


def _values_unset(device: str):
    """On meta, the adapters' initial values are thrown away: peft makes each LoRA factor on the
    host (nn.Linear, which fills it), fills it again (kaiming_uniform_ for A, zeros for B:
    LoraLayer.reset_lora_parameters), then moves it to the base layer's device and dtype
    (_move_adapter_to_device_of_base_layer), and a move to meta keeps shape and dtype only.
    transformers' switch for weights that are about to be replaced (initialization.no_init_weights:
    torch.nn.init's fill functions do nothing inside) leaves them unfilled: the same tensors on the
    same devices, without writing tens of MB of fresh host memory (half of a 70B model's build,
    more of Mixtral's)."""
    if device != "meta":
        return contextlib.nullcontext()
    from transformers.initialization import no_init_weights
    return no_init_weights()


def _is_linear(module) -> bool:
    import torch
    try:
        import bitsandbytes as bnb
        kinds = (torch.nn.Linear, bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    except ImportError:
        kinds = (torch.nn.Linear,)
    return isinstance(module, kinds)


def make_optimizer(params, setup: TrainSetup, device: str):
    import torch

    params = list(params)
    if setup.optimizer == "adamw_fused":
        if device == "meta":
            return fused_adamw_on_meta(params)
        return torch.optim.AdamW(params, lr=2e-4, fused=True)
    if setup.optimizer in ("adamw", "adamw_foreach", "sgd"):
        # On CUDA torch picks the foreach implementation by default
        # (optimizer.py _default_to_fused_or_foreach: foreach for CUDA tensors, fused only on
        # request). meta and cpu are not foreach devices, so it is asked for explicitly.
        if setup.optimizer != "sgd":
            return torch.optim.AdamW(params, lr=2e-4, foreach=True)
        return torch.optim.SGD(params, lr=2e-4, foreach=True)
    if setup.optimizer == "adafactor":
        from transformers.optimization import Adafactor
        return Adafactor(params, lr=None, scale_parameter=True, relative_step=True, warmup_init=False)
    import bitsandbytes as bnb
    kinds = {"adamw8bit": bnb.optim.AdamW8bit, "paged_adamw": bnb.optim.PagedAdamW,
             "paged_adamw8bit": bnb.optim.PagedAdamW8bit}
    return kinds[setup.optimizer](params, lr=2e-4)


def fused_adamw_on_meta(params):
    """torch.optim.AdamW(fused=True) as CUDA runs it, on meta: AdamW refuses fused=True for meta
    parameters (_device_dtype_check_for_fused), so the state is made by Adam._init_group with
    group["fused"] set (exp_avg, exp_avg_sq and a float32 device `step` scalar per parameter) and
    the update is the same torch._fused_adamw_ call _fused_adam makes (it has a meta kernel and,
    like the CUDA one, allocates nothing)."""
    import torch
    from torch.optim import adam

    class MetaFusedAdamW(torch.optim.AdamW):
        @torch.no_grad()
        def step(self, closure=None):
            checker = adam._device_dtype_check_for_fused
            adam._device_dtype_check_for_fused = lambda p, cuda_unsupported=False: None
            try:
                for group in self.param_groups:
                    ps, grads, avgs, sqs, maxs, steps = [], [], [], [], [], []
                    group["fused"] = True
                    self._init_group(group, ps, grads, avgs, sqs, maxs, steps)
                    group["fused"] = False
                    if not ps:
                        continue
                    torch._foreach_add_(steps, 1)   # _fused_adam: torch._foreach_add_(device_state_steps, 1)
                    beta1, beta2 = group["betas"]
                    torch._fused_adamw_(ps, grads, avgs, sqs, maxs, steps, lr=group["lr"], beta1=beta1,
                                        beta2=beta2, weight_decay=group["weight_decay"], eps=group["eps"],
                                        amsgrad=group["amsgrad"], maximize=group["maximize"])
            finally:
                adam._device_dtype_check_for_fused = checker
            return None

    return MetaFusedAdamW(params, lr=2e-4, foreach=False)


def make_trainable(model, setup: TrainSetup, device: str):
    """What a training script does after loading: prepare_model_for_kbit_training if asked,
    gradient checkpointing, LoRA adapters (or every parameter trainable), train mode, the
    optimizer. Returns (the model the step calls, its optimizer). Shared by simulate and profile."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if setup.prepare_kbit:
            from peft import prepare_model_for_kbit_training
            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=setup.grad_ckpt,
                gradient_checkpointing_kwargs={"use_reentrant": setup.reentrant_ckpt})
        if setup.grad_ckpt:
            # transformers 5: also calls enable_input_require_grads() for input_ids models, the
            # hook peft and the Trainer rely on so checkpointed blocks see an input needing grad
            # (reentrant checkpointing needs it: docs/autograd.md#reentrant-checkpointing).
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": setup.reentrant_ckpt})
        if setup.uses_adapters:
            model = add_adapters(model, setup, device)
            if setup.recast:
                recast_like_qlora_py(model)
            elif setup.adapters_16bit:
                adapters_to_bf16_like_trl(model)
        else:
            for p in model.parameters():
                p.requires_grad_(True)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    return model, make_optimizer(trainable, setup, device)


def adapters_to_bf16_like_trl(model) -> None:
    """TRL 1.16 SFTTrainer.__init__ on a quantized model (TrainSetup.adapter_dtype bf16,
    docs/recipes.md#trl-bf16-adapters): every trainable parameter but DoRA's magnitude vector
    becomes bf16 in place (`param.data = param.data.to(torch.bfloat16)`)."""
    import torch

    for name, param in model.named_parameters():
        if param.requires_grad and "lora_magnitude_vector" not in name:
            param.data = param.data.to(torch.bfloat16)


def recast_like_qlora_py(model) -> None:
    """qlora.py get_accelerate_model after get_peft_model under --bf16 (TrainSetup.recast,
    docs/recipes.md#qlora-paper-recast): every LoraLayer to bfloat16 (its adapters and the
    wrapped layer's floating-point tensors; 4-bit weights are uint8 and stay), modules named
    '*norm*' to float32, lm_head / embed_tokens to bfloat16 where float32."""
    import torch
    from peft.tuners.lora import LoraLayer

    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            module.to(torch.bfloat16)
        if "norm" in name:
            module.to(torch.float32)
        if "lm_head" in name or "embed_tokens" in name:
            weight = getattr(module, "weight", None)
            if weight is not None and weight.dtype == torch.float32:
                module.to(torch.bfloat16)


def apply_loop(model, setup: TrainSetup, device: str):
    """What the training library does to the model's forward (docs/recipes.md):
    - loss chunked: TRL's SFTTrainer add_fused_lm_head on the base model (simulate/_chunked_loss.py);
    - amp: the forward runs under torch.autocast. The Trainer gets it from accelerate
      (accelerate/accelerator.py prepare_model, native_amp: model.forward wrapped in autocast, then
      in convert_outputs_to_fp32); a plain loop writes `with torch.autocast(...)` around the call.
      torch.autocast is looked up per call, so on meta the emulation (simulate/_autocast.py) runs.
      On meta the device type stands for "cuda"; a real CPU run uses CPU autocast."""
    import types

    if setup.loss == "chunked":
        from vramplan.simulate._chunked_loss import add_fused_lm_head
        add_fused_lm_head(model.get_base_model() if hasattr(model, "get_base_model") else model)
    if not setup.autocast:
        return model
    import torch

    dtype, kind = getattr(torch, DTYPE_NAMES[setup.amp]), "cuda" if device == "meta" else device
    forward = model.forward.__func__

    def autocast_forward(self, *args, **kwargs):
        with torch.autocast(kind, dtype=dtype):
            return forward(self, *args, **kwargs)

    model.forward = types.MethodType(autocast_forward, model)
    if setup.loop == "trainer":
        try:
            from accelerate.utils import convert_outputs_to_fp32
        except ImportError:       # accelerate comes with transformers' Trainer; without it, no copy
            return model
        model.forward = types.MethodType(convert_outputs_to_fp32(model.forward.__func__), model)
    return model


def build(spec, setup: TrainSetup, device: str = "meta", seed: int = 0) -> Built:
    import torch

    base = build_model(spec, setup, device, seed)
    model, optimizer = make_trainable(base, setup, device)
    model = apply_loop(model, setup, device)
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, spec.vocab, (setup.batch, setup.seq), generator=g).to(device) \
        if device != "meta" else torch.zeros((setup.batch, setup.seq), dtype=torch.long, device=device)
    return Built(model=model, base=base, optimizer=optimizer, input_ids=input_ids, device=device,
                 compute_dtype=torch_dtype(setup), lm_head=base.get_output_embeddings())
