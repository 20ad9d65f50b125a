"""Activation memory of one decoder layer and of the model head, op by op.

Each layer is written as the list of ops its forward runs (graph.Op), read off the modeling code
of transformers 5 (models/llama/modeling_llama.py and siblings), peft's LoRA layers
(peft/tuners/lora/bnb.py Linear4bit.forward, lora/layer.py Linear.forward) and bitsandbytes'
MatMul4Bit (autograd/_functions.py); graph.walk then plays autograd's allocation rules over it.

The facts that decide the count:
- RMSNorm upcasts to float32: x.float() and rsqrt(variance) are saved (LlamaRMSNorm.forward).
- peft LoRA clones the base output and casts the layer input to the adapter dtype (float32) in
  *every* wrapped module (`result.clone()`, `_cast_input_dtype`); lora_A saves that copy and
  lora_B saves lora_A's output.
- bitsandbytes MatMul4Bit saves only the packed weight, never its input; its backward always
  dequantizes the weight (F.dequantize_4bit), its forward only past the fused kernel's range
  (backends/cuda/ops.py gemm_4bit -> _dequant_linear_fallback).
- A frozen nn.Linear (method lora) does not save its input either; full fine-tuning does.
- SiLU / GELU save their input; gate * up saves both factors.
- SDPA runs the kernel torch's dispatcher picks on the target GPU (cuda/_sdpa.py): flash
  attention (causal, no mask; grouped KV heads natively, transformers
  integrations/sdpa_attention.py use_gqa_in_sdpa) saves q, k, v, output and float32
  log-sum-exp, and its backward allocates float32 softmax_d and dq_accum workspaces and, for grouped
  KV heads, dk/dv expanded to every query head (PyTorch flash_attn/flash_api.cpp mha_bwd);
  memory-efficient attention and the math fallback (T4/V100, bf16 below sm80) are below.
- Eager attention materializes b x H x s x s scores, a float32 softmax (saved) and its cast.
Korthikanti et al. 2022 count sbh(34 + 5as/h) for GPT-3 blocks; LLaMA-style QLoRA blocks differ
enough that the count is re-derived here, and `vramplan simulate` (the real step on the meta
device) is the reference a test matrix holds this to.
"""
from __future__ import annotations


from functools import lru_cache

from vramplan.core._record import record
from vramplan.cuda import _cublas as cuda_cublas, _sdpa as cuda_sdpa
from vramplan.cuda._arch import ASSUMED, CudaArch
from vramplan.cuda._gemm_4bit import fallback_buffers, gemm_4bit_uses_fused_kernel
from vramplan.estimate._walk import ACT, BLAS, BWD_BLAS, Op, Tape, Tensor, WalkResult, walk
from vramplan.estimate._walk import accumulating as accumulating_tape
from vramplan.estimate._inventory import (adapted_linears, adapter_bytes, embedding_bytes, expert_linears, experts_adapted,
                                         experts_quantized, rope_kinds, rope_width, weight_bytes)
from vramplan.core._models import Linear, ModelSpec
from vramplan.estimate._quant import alloc as alloc_bytes, dequant_buffers, dequant_temporary
from vramplan.estimate import _llama4 as llama4, _symbolic as sym
from vramplan.estimate._symbolic import alloc, in_order, variables
from vramplan.core._setup import DTYPES, TrainSetup

FP32 = 4
LORA_ALPHA = 8      # peft tuners/lora/config.py LoraConfig.lora_alpha default (the recipes leave it)
LOGITS = "logits_loss"


def act_bytes(spec: ModelSpec, setup: TrainSetup) -> int:
    """Bytes per element of the residual stream. With prepare_model_for_kbit_training the
    embedding and norm weights are float32, so every hidden state is float32 (Linear4bit
    returns its output in the input dtype: bitsandbytes nn/modules.py Linear4bit.forward).
    After qlora.py's recast the embedding is 16-bit again and the norms stay float32: a
    LlamaRMSNorm (`weight * x.to(input_dtype)`) promotes its 16-bit input to a float32 output, and
    the stream above the first layer is float32; Gemma's and OLMo 2's norms cast their result back
    to the input dtype (`type_as(x)`, `.to(input_dtype)`), so the stream stays 16-bit
    (docs/recipes.md#qlora-paper-recast)."""
    if not setup.prepare_kbit:
        return setup.compute_bytes
    if setup.recast and spec.arch.norm_style in ("gemma", "olmo"):
        return setup.compute_bytes
    return FP32



def operand_grads(self_grad: tuple, other_grad: tuple) -> tuple:
    """The gradients of a two-operand op in the order autograd makes them: the second operand's
    first, then the first's (torch generated Functions.cpp: BmmBackward0::apply makes mat2's
    before self's, MulBackward0::apply other's before self's), for eager and math attention's
    q @ k^T and p @ v, and the MLP's `act(gate) * up`. The order places the two in the caching
    allocator."""
    return other_grad, self_grad

class _Ops:
    """Collects the ops of one segment with helpers for the recurring blocks."""

    def __init__(self, spec: ModelSpec, setup: TrainSetup, tag: str = ACT, decided: tuple | None = None,
                 arch: CudaArch = ASSUMED):
        self.spec, self.setup, self.tag, self.arch = spec, setup, tag, arch
        # sizes are polynomials in b and s (_symbolic.py); decisions that depend on the actual
        # numbers (fused 4-bit kernel or not, sliding-window mask or not) are taken from `setup`
        self.a, self.T = act_bytes(spec, setup), sym.B * sym.S
        # autocast dtype (bytes); tensors whose dtype differs from `a` are listed in `bytes_of`
        self.c = DTYPES[setup.amp] if setup.autocast else self.a
        self.bytes_of: dict[str, int] = {}
        self.fused, self.window, self.kv_view, self.use_rope, self.dense, self.single = (
            decisions(spec, setup, arch) if decided is None else decided)
        self.full = setup.method == "full"
        self.adapted = {l.name for l in adapted_linears(spec, setup)}
        if experts_quantized(spec, setup) and experts_adapted(spec, setup):
            self.adapted |= {l.name for l in expert_linears(spec)}   # LoRA on every 4-bit expert
        self.ops: list[Op] = []
        self.dequant = 0   # largest dequantized-weight temporary seen
        self.cached: tuple = ()   # autocast weight casts, held by autocast's cache until the region exits
        self.held: tuple = ()     # head outputs the loop keeps through backward (`out.logits`)
        # outputs made only with grad mode on and an input requiring grad (the memory-efficient
        # kernel's logsumexp): a reentrant checkpoint's no_grad forward does not make them
        self.grad_only: tuple = ()
        self.layer_locals: list = []   # names a decoder layer's forward holds until it returns
        self.view_base: dict = {}      # heads(): a (b, heads, s, head_dim) view -> the tensor it views

    def t(self, name: str, nbytes: int) -> Tensor:
        return Tensor(name, alloc(nbytes), self.tag)

    def op(self, name, inputs, outputs=(), **kw) -> None:
        inputs = tuple(inputs)
        if self.view_base:
            # a view (heads()) shares its base's storage: reading or saving it keeps the base
            bases = tuple(self.view_base[n] for n in inputs if n in self.view_base)
            inputs += bases
            saved = [self.view_base[n] for n in kw.get("saves", ()) if n in self.view_base]
            if saved:
                kw["saves"] = (*kw["saves"], *saved)
        self.ops.append(Op(name, inputs, tuple(outputs), **kw))

    # --- RMSNorm ------------------------------------------------------------------------------
    def norm(self, p: str, x: str, width: int | None = None, groups: int = 1, weight: bool = True) -> str:
        """_norm_ops; the argument `x` lives until the norm returns (the caller holds it: a local, or
        the temporary `self.q_proj(hidden_states).view(...)` Qwen3Attention passes to q_norm) even
        though the norm rebinds its own `hidden_states` to the float32 copy."""
        out = self._norm_ops(p, x, width, groups, weight)
        if out != x:
            self.op(f"{p}.return", [x])
        return out

    def _norm_ops(self, p: str, x: str, width: int | None = None, groups: int = 1, weight: bool = True) -> str:
        """LlamaRMSNorm: x.float(); pow(2).mean(-1); + eps; rsqrt; x * r; .to(dtype); weight * y.
        Gemma2RMSNorm / Gemma3RMSNorm: the same in float32, then * (1 + weight.float()) and type_as(x).
        `width` is the normalized dimension (hidden by default); `groups` rows per token: a per-head
        q/k norm (Qwen3 / Gemma3 q_norm) normalizes H rows of head_dim per token, so the float32
        copies are as large as the projection and the variance has H values per token.
        weight=False: Llama4TextL2Norm, `self._norm(x.float()).type_as(x)` and nothing more."""
        a, h = self.bytes_of.get(x, self.a), width or self.spec.hidden
        T = self.T * groups
        x32 = x
        if a != FP32:
            x32 = f"{p}.x32"
            self.op(f"{p}.to32", [x], [self.t(x32, FP32 * T * h)], grads=((x, a * T * h),))
        # pow backward (FunctionsManual.cpp pow_backward, `grad * (exponent * self.pow(exponent - 1))`):
        # x.pow(1), then 2 * it, both float32 and alive until the product with the gradient exists
        self.op(f"{p}.pow", [x32], [self.t(f"{p}.sq", FP32 * T * h)], saves=(x32,), grads=((x32, FP32 * T * h),),
                bwd_held=(alloc(FP32 * T * h), alloc(FP32 * T * h)), work_tag=ACT)
        self.op(f"{p}.mean", [f"{p}.sq"], [self.t(f"{p}.var", FP32 * T)], grads=((f"{p}.sq", FP32 * T * h),))
        self.op(f"{p}.eps", [f"{p}.var"], [self.t(f"{p}.var_eps", FP32 * T)], grads=((f"{p}.var", 0),))
        self.op(f"{p}.rsqrt", [f"{p}.var_eps"], [self.t(f"{p}.r", FP32 * T)], saves=(f"{p}.r",),
                grads=((f"{p}.var_eps", FP32 * T),))
        # mul backward (MulBackward0): r's gradient first, `g * x` at full size, then x's, `g * r`; the
        # full product is reduced to r's shape only after the node returns (engine.cpp
        # validate_outputs: sum_to), so it lives until x's gradient exists
        self.op(f"{p}.mul", [x32, f"{p}.r"], [self.t(f"{p}.y32", FP32 * T * h)], saves=(x32, f"{p}.r"),
                grads=((x32, FP32 * T * h), (f"{p}.r", FP32 * T)), bwd_held=(alloc(FP32 * T * h),), work_tag=ACT)
        # the weight factor a norm multiplies by ((1 + weight) for Gemma), which MulBackward0 saves
        # for the product's gradient (derivatives.yaml mul.Tensor); hidden-sized, not tracked, but
        # a saved tensor all the same: where it is the last one a checkpointed layer saves (a
        # post-norm ends the layer: Gemma 2 / 3, OLMo 2), recomputation stops as it is packed,
        # before the multiply's kernel (docs/autograd.md#non-reentrant-checkpointing)
        factor = f"{p}.weight_factor"
        if self.spec.arch.norm_style in ("gemma", "olmo"):
            # the weight multiplies the float32 product; a trainable weight also saves that
            # product for its gradient. The cast back is a new tensor unless the hidden states
            # are float32 already (type_as / .to of the same dtype is a no-op).
            self.op(f"{p}.scale", [f"{p}.y32", factor], [self.t(f"{p}.z32", FP32 * T * h)],
                    saves=(factor, f"{p}.y32") if self.full else (factor,), grads=((f"{p}.y32", FP32 * T * h),),
                    param_grads=alloc(a * h) if self.full else 0)
            if a == FP32:
                return f"{p}.z32"
            out = f"{p}.out"
            self.op(f"{p}.cast", [f"{p}.z32"], [self.t(out, a * T * h)], grads=((f"{p}.z32", FP32 * T * h),))
            return out
        y = f"{p}.y32"
        if a != FP32:
            y = f"{p}.y"
            self.op(f"{p}.cast", [f"{p}.y32"], [self.t(y, a * T * h)], grads=((f"{p}.y32", FP32 * T * h),))
        if not weight:
            return y
        out = f"{p}.out"
        # `weight * hidden_states.to(input_dtype)` promotes: a float32 weight (prepare_model_for_kbit_training)
        # over a 16-bit input (the embedding output after qlora.py's recast) gives a float32 output
        ob = max(a, weight_bytes(self.setup))
        # LlamaRMSNorm: `hidden_states` (the float32 product) is a local of forward(): it lives
        # until the return, i.e. through the weight multiply. Llama4TextRMSNorm casts the product
        # inside one expression (`self._norm(x.float()).type_as(x)`), which frees it first.
        product = [f"{p}.y32"] if self.spec.arch.norm_style == "llama" else []
        # a trainable weight saves the normalized input for its gradient: `y`, which is the float32
        # product itself when the hidden states are float32 (.to of the same dtype is a no-op)
        self.op(f"{p}.weight", [y, *product, factor], [self.t(out, ob * T * h)],
                saves=(factor, y) if self.full else (factor,),
                grads=((y, a * T * h),), param_grads=alloc(a * h) if self.full else 0)
        if ob != self.a:
            self.bytes_of[out] = ob
        return out

    # --- nn.Linear, bnb Linear4bit / Linear8bitLt, peft LoRA wrapper ------------------------
    def linear(self, lin: Linear, x: str, prefix: str = "") -> str:
        s, a, T = self.setup, self.bytes_of.get(x, self.a), self.T
        name = prefix + lin.name
        o, i = lin.out_features, lin.in_features
        work = bwd_work = 0
        work_before: tuple = ()
        bwd_before: tuple = ()
        if s.quantized and lin.name != "lm_head":
            # backward: MatMul4Bit / MatMul8bitLt dequantize the weight before the input's gradient
            # (walk.Op.bwd_before): MatMul4Bit's buffers in order (functional dequantize_4bit);
            # MatMul8bitLt's `CB = state.CB.to(ctx.dtype_A, copy=True).mul_(...)`, then
            # `grad_A = torch.matmul(grad_output..., CB)` (bitsandbytes 0.50 autograd/_functions.py)
            dq = dequant_temporary(s.quant, i, o, s.double_quant, s.compute_bytes)
            if s.quant == "int8":
                bwd_before = (alloc(dq),)
            else:
                bwd_before = dequant_buffers(s.quant, i, o, s.double_quant, s.compute_bytes)
            if s.quant == "int8":
                # bnb int8_scaled_mm on CUDA: an int32 product, then fp16 (backends/cuda/ops.py)
                work = alloc(4 * T * o) + alloc(2 * T * o) + alloc(T * i) + alloc(4 * T)
            elif lin.name not in self.fused:
                # forward past the fused kernel's range: dequantize + F.linear, its buffers before
                # the output (cuda/_gemm_4bit.py fallback_buffers)
                work_before = fallback_buffers(i * o, s.double_quant, s.compute_bytes)
            self.dequant = max(self.dequant, dq, sum(alloc_bytes(n) for n in work_before))
        # torch matmuls (cuBLAS): F.linear, and bitsandbytes' dequantize + F.linear fallback; its fused
        # 4-bit kernel and the int8 matmul (bnb's own cublasLt handle) are not, but their backward's
        # torch.matmul on the dequantized weight is (bitsandbytes autograd/_functions.py MatMul4Bit /
        # MatMul8bitLt.backward)
        own_kernel = s.quantized and lin.name != "lm_head" and (s.quant == "int8" or lin.name in self.fused)
        blas = BWD_BLAS if own_kernel else BLAS
        if s.amp_over_fp32:
            base, ob = self.autocast_base(name, lin, x, a), self.c
        else:
            base, ob = f"{name}.base", a
            # full fine-tuning saves the input for the weight gradient; bitsandbytes MatMul8bitLt
            # (autograd/_functions.py) keeps its input A for backward as well
            full_saves = (x,) if self.full or (s.quantized and s.quant == "int8" and lin.name != "lm_head") else ()
            # bitsandbytes 0.50 nn/modules.py Linear4bit.forward: `inp_dtype = x.dtype`, `x =
            # x.to(self.compute_dtype)`, then `bnb.matmul_4bit(...).to(inp_dtype)`: a float32 input
            # (prepare_model_for_kbit_training's hidden states) is cast to the compute dtype, the
            # matmul returns that dtype and its result is cast back; the cast input is the
            # function's local `x` until it returns. Autograd casts each gradient back
            # (ToCopyBackward0). docs/allocator.md#linear4bit-casts
            cb = s.compute_bytes
            casts = s.quantized and s.quant != "int8" and lin.name != "lm_head" and a != cb
            xq, mm, mb = (f"{name}.xq", f"{name}.mm", cb) if casts else (x, base, a)
            if casts:
                self.op(f"{name}.in", [x], [self.t(xq, cb * T * i)], grads=((x, a * T * i),))
            # nn.Linear hands its input's gradient back as a view of its 2-D product (walk.Op.view_grads,
            # docs/autograd.md#gradient-accumulation); bitsandbytes' MatMul4Bit / MatMul8bitLt as
            # torch.matmul's `_unsafe_view`, a tensor of its own
            self.op(f"{name}.base", [xq], [self.t(mm, mb * T * o)], saves=full_saves, grads=((xq, mb * T * i),),
                    work=work, bwd_work=bwd_work, blas=blas, work_before=work_before, bwd_before=bwd_before,
                    param_grads=alloc(a * i * o) + (alloc(a * o) if lin.bias else 0) if self.full else 0,
                    view_grads=() if own_kernel or (s.quantized and lin.name != "lm_head") else (xq,))
            if casts:
                self.op(f"{name}.out", [mm], [self.t(base, a * T * o)], grads=((mm, cb * T * o),))
                self.op(f"{name}.in_return", [xq])
        if ob != self.a:   # bitsandbytes Linear4bit returns its input's dtype (nn/modules.py forward)
            self.bytes_of[base] = ob
        if lin.name not in self.adapted:
            return base
        r = s.rank
        # peft 0.21 lora/bnb.py Linear4bit.forward clones the base output ("for 4bit, we need to
        # defensively clone"); Linear8bitLt.forward and lora/layer.py Linear.forward do not
        res = base
        if s.quantized and s.quant != "int8":
            res = f"{name}.res"
            self.op(f"{name}.clone", [base], [self.t(res, ob * T * o)], grads=((base, 0),))
            if ob != self.a:
                self.bytes_of[res] = ob
        if s.autocast:
            return self.lora_autocast(name, x, res, i, o, r, a, ob)
        # peft casts the input to the adapter weights' dtype (`x = self._cast_input_dtype(x,
        # lora_A.weight.dtype)`: float32, or nothing where TRL made them bf16) and the LoRA path runs in it
        xin, ab = x, adapter_bytes(s)
        if a != ab:
            xin = f"{name}.x32"
            self.op(f"{name}.cast", [x], [self.t(xin, ab * T * i)], grads=((x, a * T * i),))
        if s.lora_dropout > 0:
            # nn.Dropout (native_dropout): output and a bool mask, the mask saved
            self.op(f"{name}.dropout", [xin], [self.t(f"{name}.xd", ab * T * i), self.t(f"{name}.mask", T * i)],
                    saves=(f"{name}.mask",), grads=((xin, ab * T * i),))
            xin = f"{name}.xd"
        self.op(f"{name}.lora_A", [xin], [self.t(f"{name}.la", ab * T * r)], saves=(xin,),
                grads=((xin, ab * T * i),), param_grads=alloc(ab * r * i), blas=BLAS, view_grads=(xin,))
        self.op(f"{name}.lora_B", [f"{name}.la"], [self.t(f"{name}.lb", ab * T * o)], saves=(f"{name}.la",),
                grads=((f"{name}.la", ab * T * r),), param_grads=alloc(ab * o * r), blas=BLAS,
                view_grads=(f"{name}.la",))
        self.op(f"{name}.scale", [f"{name}.lb"], [self.t(f"{name}.ls", ab * T * o)],
                grads=((f"{name}.lb", ab * T * o),))
        lc = f"{name}.ls"
        out = f"{name}.out"
        if not s.quantized and a != ab:
            # lora/layer.py Linear.forward: `result = result + lora_B(lora_A(dropout(x))) * scaling`
            # promotes to float32 (autograd casts the base output's gradient back,
            # validate_outputs), then `result = result.to(torch_result_dtype)`. The LoRA term is a
            # temporary, freed as the sum is made, before `result` is rebound to it
            self.op(f"{name}.add", [lc, res], [self.t(f"{name}.sum32", ab * T * o)], grads=((res, a * T * o), (lc, 0)))
            self.op(f"{name}.to", [f"{name}.sum32"], [self.t(out, a * T * o)],
                    grads=((f"{name}.sum32", ab * T * o),))
        else:
            if a != ab:     # bnb.py: `output = output.to(expected_dtype)` before the sum
                lc = f"{name}.lc"
                self.op(f"{name}.uncast", [f"{name}.ls"], [self.t(lc, a * T * o)],
                        grads=((f"{name}.ls", ab * T * o),))
            self.op(f"{name}.add", self.lora_sum_inputs(res, lc), [self.t(out, a * T * o)], grads=((res, 0), (lc, 0)))
        # the cast input is peft's local `x` until forward returns, saved or not
        # (docs/peft-transformers.md#input-cast-and-base-output-clone); bnb.py's LoRA term too
        self.lora_return(name, [f"{name}.x32"] if a != ab else [], lc)
        return out

    def lora_sum_inputs(self, res: str, term: str) -> list:
        """The sum of the base output and the LoRA term, in the order Python frees them
        (docs/peft-transformers.md#input-cast-and-base-output-clone): lora/layer.py Linear.forward
        (`result = result + lora_B(lora_A(dropout(x))) * scaling`) frees the term, a temporary,
        as the sum is made and then the old `result` as it is rebound; bnb.py Linear4bit /
        Linear8bitLt.forward (`output = ...; result = result + output`) hold the term in the local
        `output` until forward returns (lora_return), so the old `result` goes first."""
        return [res, term] if self.setup.quantized else [term, res]

    def lora_return(self, name: str, locals_: list, term: str) -> None:
        """The LoRA layer's forward returns: its frame frees its locals in order, the cast input
        `x` (an argument) before bnb.py's `output`."""
        held = [*locals_, *([term] if self.setup.quantized else [])]
        if held:
            self.op(f"{name}.return", held)

    def autocast_base(self, name: str, lin: Linear, x: str, a: int) -> str:
        """nn.Linear over float32 weights under CUDA autocast (TrainSetup.amp_over_fp32): linear is
        on the lower-precision list, so autocast_mode.cpp casts the input, the weight and the bias
        to the autocast dtype (in that order) and the matmul returns that dtype. cached_cast keeps a
        cast only for a float32 leaf that requires grad: a trainable weight (full fine-tuning) is
        cast once per autocast region and held by the cache until the region exits; a frozen one
        (LoRA's base layer) is cast on every call. The matmul saves the weight's cast when its
        input needs a gradient, and the input's cast when the weight trains; the 16-bit weight
        gradient goes back through the cast (ToCopyBackward) into the float32 .grad.
        docs/recipes.md#autocast-over-fp32-weights"""
        c, T, full = self.c, self.T, self.full
        o, i = lin.out_features, lin.in_features
        xin = x
        if a != c:
            xin = f"{name}.x_amp"
            self.op(f"{name}.x_amp", [x], [self.t(xin, c * T * i)], grads=((x, a * T * i),))
        casts = [(f"{name}.w_amp", o * i)] + ([(f"{name}.b_amp", o)] if lin.bias else [])
        for cast, n in casts:
            self.op(f"{cast}.cast", [], [self.t(cast, c * n)], param_grads=alloc(FP32 * n) if full else 0)
            if full:
                self.cached += (cast,)
        base = f"{name}.base"
        self.op(base, [xin, *(cast for cast, _ in casts)], [self.t(base, c * T * o)], blas=BLAS,
                saves=(xin, f"{name}.w_amp") if full else (f"{name}.w_amp",),
                grads=((xin, c * T * i), *((cast, c * n) for cast, n in casts)), view_grads=(xin,))
        return base

    def lora_autocast(self, name: str, x: str, res: str, i: int, o: int, r: int, a: int, ob: int) -> str:
        """peft's LoRA under torch.autocast: `requires_conversion = not torch.is_autocast_enabled()`
        skips the float32 input cast (peft/tuners/lora/bnb.py Linear4bit.forward); lora_A / lora_B
        are F.linear, on CUDA autocast's lower-precision list (aten/src/ATen/autocast_mode.cpp),
        so they run in the autocast dtype on a cast of the float32 adapter weight. That cast is
        cached for the autocast region (cached_cast: float32 leaf requiring grad) and saved by
        the linear; its backward (ToCopyBackward) turns the 16-bit weight gradient into the
        float32 .grad. docs/autograd.md#autocast-weight-cache, docs/peft-transformers.md#input-cast-and-base-output-clone.
        With prepare_model_for_kbit_training the hidden state `x` is float32: F.linear casts it
        (saved), and the 16-bit LoRA output is added to the float32 base output without
        `.to(expected_dtype)` (bnb.py skips it under autocast), so the sum promotes to float32.
        Only the bitsandbytes wrappers check autocast: lora/layer.py Linear.forward (method lora)
        casts x to float32 unconditionally (`x = self._cast_input_dtype(x, lora_A.weight.dtype)`),
        and autocast then casts that copy back for lora_A. `ob`: the base output's bytes per element
        (the input's for Linear4bit, the autocast dtype's for nn.Linear over float32 weights)."""
        T, c = self.T, self.c
        xin, xb = x, a
        if not self.setup.quantized and a != FP32:
            xin, xb = f"{name}.x32", FP32
            self.op(f"{name}.cast", [x], [self.t(xin, FP32 * T * i)], grads=((x, a * T * i),))
        if self.setup.lora_dropout > 0:
            self.op(f"{name}.dropout", [xin], [self.t(f"{name}.xd", xb * T * i), self.t(f"{name}.mask", T * i)],
                    saves=(f"{name}.mask",), grads=((xin, xb * T * i),))
            xin = f"{name}.xd"
        if xb != c:   # autocast's cast of the float32 input for F.linear
            self.op(f"{name}.x16", [xin], [self.t(f"{name}.x16", c * T * i)], grads=((xin, xb * T * i),))
            xin = f"{name}.x16"
        if self.setup.adapters_16bit:
            # qlora.py's recast or TRL's cast: the adapter weights are bf16 leaves already, so F.linear
            # uses them as they are (no cast, nothing cached) and their gradients are bf16 .grad tensors
            self.op(f"{name}.lora_A", [xin], [self.t(f"{name}.la", c * T * r)], saves=(xin,),
                    grads=((xin, c * T * i),), param_grads=alloc(c * r * i), blas=BLAS, view_grads=(xin,))
            self.op(f"{name}.lora_B", [f"{name}.la"], [self.t(f"{name}.lb", c * T * o)], saves=(f"{name}.la",),
                    grads=((f"{name}.la", c * T * r),), param_grads=alloc(c * o * r), blas=BLAS,
                    view_grads=(f"{name}.la",))
        else:
            wa, wb = f"{name}.A16", f"{name}.B16"
            self.op(f"{name}.cast_A", [], [self.t(wa, c * r * i)], param_grads=alloc(FP32 * r * i))
            self.cached += (wa,)
            # F.linear on a 3-D input is mm on its 2-D view: MmBackward0 makes the weight's (mat2's)
            # gradient before the input's (operand_grads)
            self.op(f"{name}.lora_A", [xin, wa], [self.t(f"{name}.la", c * T * r)], saves=(xin, wa),
                    grads=operand_grads((xin, c * T * i), (wa, c * r * i)), blas=BLAS, view_grads=(xin,))
            self.op(f"{name}.cast_B", [], [self.t(wb, c * o * r)], param_grads=alloc(FP32 * o * r))
            self.cached += (wb,)
            self.op(f"{name}.lora_B", [f"{name}.la", wb], [self.t(f"{name}.lb", c * T * o)],
                    saves=(f"{name}.la", wb), grads=operand_grads((f"{name}.la", c * T * r), (wb, c * o * r)), blas=BLAS,
                    view_grads=(f"{name}.la",))
        self.op(f"{name}.scale", [f"{name}.lb"], [self.t(f"{name}.ls", c * T * o)],
                grads=((f"{name}.lb", c * T * o),))
        out = f"{name}.out"
        self.op(f"{name}.add", self.lora_sum_inputs(res, f"{name}.ls"), [self.t(out, ob * T * o)],
                grads=((res, 0), (f"{name}.ls", 0 if ob == c else c * T * o)))
        if ob != self.a:
            self.bytes_of[out] = ob
        # the float32 cast is peft's local `x` until forward returns, saved or not, as without
        # autocast (docs/peft-transformers.md#input-cast-and-base-output-clone)
        self.lora_return(name, [f"{name}.x32"] if not self.setup.quantized and a != FP32 else [], f"{name}.ls")
        return out

    # --- attention ------------------------------------------------------------------------------
    def heads(self, x: str, width: int, name: str) -> str:
        """`proj(x).view(*input_shape, -1, head_dim).transpose(1, 2)`, the (b, heads, s, head_dim)
        view RoPE (or, for v, the kernel) reads: nothing in forward. Backward: RoPE's gradient
        reaches it laid out as (b, heads, s, head_dim), the first to arrive being a SliceBackward0
        zero-filled tensor of that shape, into which the others are added in place
        (docs/autograd.md#gradient-accumulation), as does v's from eager or math attention;
        TransposeBackward0 makes that a (b, s, heads, head_dim) view that ViewBackward0's reshape to
        (b, s, heads * head_dim) cannot take without a copy (a new tensor of x's size), and the
        summed gradient dies as the node returns (docs/peft-transformers.md#rotary-embedding).
        Made where the model calls `.view(hidden_shape)` (layer_ops), which sets when the copy
        runs: autograd's engine runs ready nodes latest-made first. Ops that read or save the
        view keep x alive (op()). With one head (a single KV head: Gemma-3-1B, multi-query
        attention) there is no copy: transposing a size-1 dim leaves the gradient's layout that of
        (b, s, 1, head_dim), which the reshape takes as a view (simulate's step makes none)."""
        return self._copying_view(x, width, f"{name}.heads", f"{name}.h", copies=width != self.spec.head_dim)

    def slice_view(self, x: str, width: int, name: str) -> str:
        """`x[..., start:end]`, `width` being x's last dim: a view, nothing in forward. Its
        SliceBackward0 writes the incoming gradient into zeros of x's whole size (slice_backward),
        a new tensor the engine sums with x's other gradients (docs/autograd.md#gradient-accumulation).
        A slice over the whole dim is no slice at all: Python indexing returns x itself
        (TensorIndexing.h applySlice), so no op is made for it."""
        return self._copying_view(x, width, f"{name}.slice", f"{name}.sl")

    def _copying_view(self, x: str, width: int, op: str, out: str, copies: bool = True) -> str:
        """A view `out` of x (nothing in forward) whose backward makes a new gradient of x's
        whole size, `width` its last dim, in x's dtype (heads, slice_view); or, `copies` False,
        passes the incoming gradient on as x's."""
        xb = self.bytes_of.get(x, self.a)
        self.op(op, [x], [self.t(out, 0)], grads=((x, xb * self.T * width if copies else 0),))
        if xb != self.a:
            self.bytes_of[out] = xb
        self.view_base[out] = self.view_base.get(x, x)   # a view of a view shares the first base
        return out

    def rope(self, x: str, width: int, name: str, whole: int = 0) -> str:
        """apply_rotary_pos_emb: x * cos + cat(-x2, x1) * sin, op by op (default layout below;
        docs/peft-transformers.md#rotary-embedding). cos/sin need no grad, so nothing is saved.
        `whole`: the width of the tensor x was sliced from where Phi-3 rotates only its leading
        dims (ModelSpec.rotary_dim; `width` is then the rotated part's), which the final cat with
        the passed-through dims restores."""
        a, T = self.a, self.T
        out = f"{name}.rot"
        xb = self.bytes_of.get(x, a)
        if xb != a:
            # autocast over float32 weights: q / k come out of the matmul in the autocast dtype,
            # cos / sin are float32 (the hidden states' dtype): q * cos and rotate_half(q) * sin
            # promote to float32 (cat and neg stay 16-bit); the two float32 products are alive
            # with the float32 sum; backward casts the products' gradients back (validate_outputs)
            full = alloc(a * T * width)
            self.op(f"{name}.rope", [x], [self.t(out, a * T * width)], grads=((x, xb * T * width),),
                    work=2 * full, work_tag=ACT, bwd_work=full + 2 * alloc(xb * T * width))
            return out
        if self.spec.arch.rope_half:
            # gpt-oss _apply_rotary_emb: chunk into halves (views); first * cos - second * sin and
            # second * cos + first * sin, then cat: the two half-width results live with the output
            self.op(f"{name}.rope", [x], [self.t(out, a * T * width)], grads=((x, a * T * width),),
                    work=2 * alloc(a * T * width // 2), work_tag=ACT, bwd_work=2 * alloc(a * T * width // 2))
            return out
        # transformers' apply_rotary_pos_emb, op by op: q * cos, then rotate_half(q) (its two halves
        # are slices, views; -x2 and the cat are new tensors), * sin, and the sum. Backward follows
        # autograd's nodes: the sum passes its gradient on; MulBackward0 multiplies by sin (cat's
        # backward slices it, views); NegBackward0 makes half a width, each SliceBackward0 a whole
        # zero-filled width, summed into x's gradient with MulBackward0's by cos
        # (docs/peft-transformers.md#rotary-embedding)
        full, half = a * T * width, a * T * (width // 2)
        # float32 tables (Architecture.rope_float32): both products and the sum are float32, each
        # product's gradient (grad * cos, grad * sin) a float32 tensor that autograd casts back to
        # the 16-bit input's dtype (validate_outputs), the float32 one freed once the cast exists
        # (compared as bytes per element: sizes are symbolic, and two equal polynomials are two objects)
        promoted = self.spec.arch.rope_float32 and a != FP32
        prod = FP32 * T * width if promoted else full
        cast_back = (prod,) if promoted else ()
        if promoted:
            out = f"{name}.rot32"
            self.bytes_of[out] = FP32     # the caller casts it back (rope_cast)
        self.op(f"{name}.rope_cos", [x], [self.t(f"{name}.xc", prod)], grads=((x, full),), bwd_before=cast_back)
        self.op(f"{name}.rope_x1", [x], [self.t(f"{name}.x1", 0)], grads=((x, full),))
        self.op(f"{name}.rope_x2", [x], [self.t(f"{name}.x2", 0)], grads=((x, full),))
        self.op(f"{name}.rope_neg", [f"{name}.x2"], [self.t(f"{name}.neg", half)], grads=((f"{name}.x2", half),))
        self.op(f"{name}.rope_cat", [f"{name}.neg", f"{name}.x1"], [self.t(f"{name}.cat", full)],
                grads=((f"{name}.neg", 0), (f"{name}.x1", 0)))
        self.op(f"{name}.rope_sin", [f"{name}.cat"], [self.t(f"{name}.xs", prod)], grads=((f"{name}.cat", full),),
                bwd_before=cast_back)
        self.op(f"{name}.rope", [f"{name}.xc", f"{name}.xs"], [self.t(out, prod)],
                grads=((f"{name}.xc", 0), (f"{name}.xs", 0)))
        if self.spec.arch.rope_pass_cat:
            # cat([rotated, x_pass]): CatBackward0 hands the sum and the (empty) pass-through slice
            # views of the incoming gradient; a float32 rotated part promotes the cat to float32
            # (torch.cat's type promotion)
            cat = (FP32 if promoted else a) * T * (whole or width)
            self.op(f"{name}.rope_pass", [out, f"{name}.pass.sl"], [self.t(f"{name}.rotp", cat)],
                    grads=((out, 0), (f"{name}.pass.sl", 0)))
            if promoted:
                self.bytes_of[f"{name}.rotp"] = FP32
            out = f"{name}.rotp"
        return out

    def rope_cast(self, rot32: str, width: int) -> str:
        """A float32 rotary embedding cast back to the hidden states' dtype (Architecture.rope_float32);
        ToCopyBackward0 makes the float32 gradient."""
        out = rot32.rsplit(".", 1)[0] + ".rot"    # attn.q.rot32 or attn.q.rotp -> attn.q.rot
        self.op(f"{out}.cast", [rot32], [self.t(out, self.a * self.T * width)], grads=((rot32, FP32 * self.T * width),))
        return out

    def rope_interleave(self, x: str, width: int, name: str) -> str:
        """apply_rotary_pos_emb_interleave (DeepSeek-V3, rope_interleave=True): on the even / odd
        slices (views) x1 * cos - x2 * sin and x2 * cos + x1 * sin, each product and sum a
        half-width temporary, then one cat. cos / sin need no grad, so nothing is saved. Backward:
        the half-width products and the two strided-slice gradients scattered into zeros."""
        a, T = self.a, self.T
        half = alloc(a * T * width // 2)
        out = f"{name}.rot"
        self.op(f"{name}.rope", [x], [self.t(out, a * T * width)], grads=((x, a * T * width),),
                work=2 * half, work_tag=ACT, bwd_work=4 * half + 2 * alloc(a * T * width))
        return out

    def mla_attention(self, n1: str, lins: dict) -> tuple[str, list]:
        """DeepseekV3Attention.forward (models/deepseek_v3/modeling_deepseek_v3.py): q =
        q_b_proj(q_a_layernorm(q_a_proj(x))) (or q_proj(x)), viewed (b, H, s, qk_nope + qk_rope) and
        split (views); compressed_kv = kv_a_proj_with_mqa(x) split into the latent (normalized by
        kv_a_layernorm, its float32 copy made from the strided view) and the shared k_rot; RoPE on
        q_rot and k_rot; query_states = cat(q_pass, q_rot); expand_kv: kv_b_proj(latent) viewed
        (b, H, s, qk_nope + v_head_dim), k_nope and the values split off as views, key_states a new
        tensor filled by two copy_ (k_nope, k_rot expanded to every head); the values stay a strided
        view of kv_b_proj's output. Returns o_proj's input and the attention's locals."""
        spec, a, T = self.spec, self.a, self.T
        m, H = spec.mla, spec.heads
        qk = m.qk_head_dim
        if self.setup.quantized and self.setup.quant == "int8":
            from vramplan.core._errors import UsageError
            raise UsageError(f"int8 base weights are not modelled for {spec.model_type} (its int8 matmul inputs "
                             "differ between the dense and the MoE layers)", hint="use --quant nf4 or fp4")
        if m.q_lora_rank:
            qa = self.linear(lins["q_a_proj"], n1)
            q = self.linear(lins["q_b_proj"], self.norm("self_attn.q_a_layernorm", qa, m.q_lora_rank))
        else:
            q = self.linear(lins["q_proj"], n1)
        # SplitWithSizesBackward stacks the two slice gradients into one new tensor
        self.op("attn.q_split", [q], [self.t("attn.q_pass", 0), self.t("attn.q_rot", 0)], grads=((q, a * T * H * qk),))
        ckv = self.linear(lins["kv_a_proj_with_mqa"], n1)
        self.op("attn.kv_split", [ckv], [self.t("attn.kv_nope", 0), self.t("attn.k_rot", 0)],
                grads=((ckv, a * T * (m.kv_lora_rank + m.qk_rope)),))
        latent = self.norm("self_attn.kv_a_layernorm", "attn.kv_nope", m.kv_lora_rank)
        qr = self.rope_interleave("attn.q_rot", H * m.qk_rope, "attn.q")
        kr = self.rope_interleave("attn.k_rot", m.qk_rope, "attn.k")
        self.op("attn.query", ["attn.q_pass", qr], [self.t("attn.qs", a * T * H * qk)],
                grads=(("attn.q_pass", 0), (qr, 0)))
        kvb = self.linear(lins["kv_b_proj"], latent)
        self.op("attn.kv_b_split", [kvb], [self.t("attn.k_nope", 0), self.t("attn.v", 0)],
                grads=((kvb, a * T * H * (m.qk_nope + m.v_head_dim)),))
        # key_states.copy_ twice: each CopySlices backward clones the full gradient; k_rot's
        # gradient is summed over the heads it was expanded to
        self.op("attn.key", ["attn.k_nope", kr], [self.t("attn.ks", a * T * H * qk)],
                grads=(("attn.k_nope", a * T * H * m.qk_nope), (kr, a * T * m.qk_rope)),
                bwd_work=2 * alloc(a * T * H * qk) + alloc(a * T * H * m.qk_rope))
        out = self.attention("attn.qs", "attn.ks", "attn.v", kvb, dims=(qk, m.v_head_dim))
        return out, [out, "attn.qs", "attn.ks", kvb]

    def attention(self, q: str, k: str, v: str, v_storage: str, dims: tuple[int, int] | None = None,
                  rope_applied: bool = False) -> str:
        """The attention kernel on q, k, v. `dims`: (q/k head dim, v head dim) of multi-head latent
        attention (DeepSeek-V3: every head, RoPE already applied, v a strided view of kv_b_proj's
        output); otherwise spec.head_dim for all three and RoPE is applied here, unless
        `rope_applied` (Llama 4 rotates before its q/k norm: estimate/_llama4.py)."""
        spec, s, a, T = self.spec, self.setup, self.a, self.T
        b, seq, H, hd = sym.B, sym.S, spec.heads, dims[0] if dims else spec.head_dim
        qw, kvw = H * hd, spec.kv_heads * hd
        vin, ow = (H * dims[1], H * dims[1]) if dims else (kvw, qw)   # widths of v and of the output
        if self.use_rope and not dims and not rope_applied:  # SmolLM3's no-RoPE layers skip apply_rotary_pos_emb (attention.use_rope)
            rd = spec.rotary_dim
            if spec.arch.rope_pass_cat:
                # Phi-3's apply_rotary_pos_emb: `q_rot, q_pass = q[..., :rotary_dim], q[..., rotary_dim:]`,
                # then k's. Every dim rotated: q_rot is q itself and q_pass an empty slice whose
                # backward still fills a zero gradient of q's size (slice_view). A partial rotary
                # embedding (rotary_dim < head_dim) makes q_rot a slice too, each with its own
                # zero-filled gradient of q's size
                qr = self.slice_view(q, qw, "attn.q.rot_part") if rd else q
                self.slice_view(q, qw, "attn.q.pass")
                kr = self.slice_view(k, kvw, "attn.k.rot_part") if rd else k
                self.slice_view(k, kvw, "attn.k.pass")
            if rd:
                rotated = (self.rope(qr, H * rd, "attn.q", whole=qw), self.rope(kr, spec.kv_heads * rd, "attn.k", whole=kvw))
            else:
                rotated = self.rope(q, qw, "attn.q"), self.rope(k, kvw, "attn.k")
            # apply_rotary_pos_emb(q, k, cos, sin) holds its arguments, the projections' outputs,
            # until it returns both (docs/peft-transformers.md#rotary-embedding)
            held = [q, k]
            if self.bytes_of.get(rotated[0], a) != a:
                # `return q_embed.to(q_type), k_embed.to(k_type)`: the float32 embeddings are locals
                held += rotated
                rotated = tuple(self.rope_cast(r, w) for r, w in zip(rotated, (qw, kvw)))
            self.op("attn.rope_return", held)
            q, k = rotated
        if spec.arch.sinks:
            return self.eager_sinks(q, k, v)
        backend = sdpa_backend(spec, s, self.window, self.arch) if s.attn == "sdpa" else "eager"
        if self.c != a:
            # SDPA is on CUDA autocast's lower-precision list: float32 q, k, v (hidden states of
            # prepare_model_for_kbit_training) are cast, the kernel runs on the casts (saved) and
            # returns the autocast dtype (docs/recipes.md#cuda-autocast-op-lists)
            # (under autocast over float32 weights v is the 16-bit matmul output: not cast)
            c = self.c
            cast = []
            for name, width in ((q, qw), (k, kvw), (v, vin)):
                nb = self.bytes_of.get(name, a)
                if nb != c:
                    self.op(f"{name}.amp", [name], [self.t(f"{name}.16", c * T * width)],
                            grads=((name, nb * T * width),))
                cast.append(f"{name}.16" if nb != c else name)
            if cast[2] != v:
                v_storage = f"{v}.16" if v_storage == v else f"{v_storage}.16"
            (q, k, v), a = cast, c
            self.bytes_of["attn.o"] = c
        bias = ()
        if backend != "eager" and self.window:
            # with a mask transformers repeats k/v to every head (repeat_kv) and CUDA's efficient
            # attention turns the boolean mask into an additive one in q's dtype, its last dim
            # padded to a multiple of 16 (attention.cpp convert_boolean_attn_mask, pad_bias): a
            # new tensor per layer, saved for backward
            if spec.kv_heads != H:
                # repeat_kv is expand + reshape: a copy, except with one KV head (multi-query,
                # Gemma-3-1b), where the size-1 head dim merges with the expanded one into a
                # stride-0 view of k / v, so the kernel saves the original storages
                view = spec.kv_heads == 1
                rep = 0 if view else a * T * qw
                self.op("attn.k_rep", [k], [self.t("attn.kr", rep)], grads=((k, a * T * kvw),))
                self.op("attn.v_rep", [v], [self.t("attn.vr", rep)], grads=((v, a * T * kvw),))
                bias = (k,) if view else ()
                # the kernel's dk / dv are the repeated k / v's, of every head (repeat_kv's backward
                # sums them down to the KV heads)
                k, v, v_storage, kvw, vin = "attn.kr", "attn.vr", v_storage if view else "attn.vr", qw, qw
            self.op("attn.bias", [], [self.t("attn.bias", a * b * seq * cuda_sdpa.efficient_mask_last_dim(seq, _sym_round))])
            bias = (*bias, "attn.bias")
        if backend == "efficient":
            # memory-efficient attention (a mask, fp32, fp16 below sm80; same head counts): saves
            # q, k, v, output and float32 logsumexp; its backward allocates float32 delta and the
            # dQ accumulator workspace (cuda/_sdpa.py, docs/cuda-kernels.md#memory-efficient-attention-memory)
            lse = cuda_sdpa.nbytes(*cuda_sdpa.efficient_logsumexp(b, H, seq, _sym_round))
            bwd = in_order(*(alloc(cuda_sdpa.nbytes(*w)) for w in cuda_sdpa.efficient_backward_workspace(b, H, seq, hd)))
            # (attention.cpp _scaled_dot_product_efficient_attention: compute_log_sumexp only when
            # grad mode is on and q, k or v requires grad; docs/autograd.md#reentrant-checkpointing)
            self.grad_only += ("attn.lse",)
            self.op("attn.sdpa", [q, k, v, *bias], [self.t("attn.o", a * T * ow), self.t("attn.lse", lse)],
                    saves=(q, k, v_storage, "attn.o", "attn.lse", *bias),
                    grads=((q, a * T * qw), (k, a * T * kvw), (v, a * T * vin)), bwd_work=bwd)
        elif backend == "math" and dims:
            from vramplan.core._errors import UsageError
            raise UsageError(f"SDPA's math fallback ({s.dtype} on {self.arch.label}) is not modelled for multi-head "
                             "latent attention", hint="use --attn eager, or a GPU / dtype the memory-efficient kernel takes")
        elif backend == "math":
            # aten _scaled_dot_product_attention_math (CompositeImplicit, so the meta trace runs it
            # as a GPU does): fp16/bf16 q, k, v are first copied to float32 (the default
            # allowFP16BF16ReductionMathSDP is off) and everything runs in float32: q scaled,
            # the causal mask built (ones, tril, where -> float32 s x s), k/v repeated to every
            # head (enable_gqa), k scaled, scores, + mask, _safe_softmax (saved), the
            # probabilities cast back (returned as the second output, dropped), @ v, output cast.
            S, c = b * H * seq * seq, FP32
            if a != FP32:
                self.op("attn.q32", [q], [self.t("attn.q32", c * T * qw)], grads=((q, a * T * qw),))
                self.op("attn.k32", [k], [self.t("attn.k32", c * T * kvw)], grads=((k, a * T * kvw),))
                self.op("attn.v32", [v], [self.t("attn.v32", c * T * kvw)], grads=((v, a * T * kvw),))
                q, k, v = "attn.q32", "attn.k32", "attn.v32"
            self.op("attn.q_scale", [q], [self.t("attn.qs", c * T * qw)], grads=((q, c * T * qw),))
            masks = []
            if not bias:   # is_causal: the mask is built here; an explicit one was converted above
                # `at::ones({L, S}, kBool).tril()`: the ones go once tril exists; then
                # convert_boolean_attn_mask's float32 `where`, after which the boolean one goes
                self.op("attn.ones", [], [self.t("attn.ones", seq * seq)])
                self.op("attn.tril", ["attn.ones"], [self.t("attn.tril", seq * seq)])
                self.op("attn.causal", ["attn.tril"], [self.t("attn.cm", c * seq * seq)])
                masks = ["attn.cm"]
            if kvw != qw:   # not yet repeated for a mask
                self.op("attn.k_rep", [k], [self.t("attn.kr", c * T * qw)], grads=((k, c * T * kvw),))
                self.op("attn.v_rep", [v], [self.t("attn.vr", c * T * qw)], grads=((v, c * T * kvw),))
                k, v = "attn.kr", "attn.vr"
            self.op("attn.k_scale", [k], [self.t("attn.ks", c * T * qw)], grads=((k, c * T * qw),))
            self.op("attn.qk", ["attn.qs", "attn.ks"], [self.t("attn.s", c * S)], saves=("attn.qs", "attn.ks"),
                    grads=operand_grads(("attn.qs", c * T * qw), ("attn.ks", c * T * qw)), blas=BLAS)
            self.op("attn.bias", ["attn.s", *masks, *bias], [self.t("attn.sb", c * S)], grads=(("attn.s", 0),))
            self.op("attn.softmax", ["attn.sb"], [self.t("attn.p", c * S)], saves=("attn.p",),
                    grads=(("attn.sb", c * S),))
            weights = []
            if a != FP32:
                self.op("attn.p_cast", ["attn.p"], [self.t("attn.pw", a * S)])
                weights = ["attn.pw"]
            out = "attn.o32" if a != FP32 else "attn.o"
            self.op("attn.pv", ["attn.p", v], [self.t(out, c * T * qw)], saves=("attn.p", v),
                    grads=operand_grads(("attn.p", c * S), (v, c * T * qw)), blas=BLAS)
            if a != FP32:
                self.op("attn.o_cast", [out], [self.t("attn.o", a * T * qw)], grads=((out, c * T * qw),))
            # the kernel's locals live until it returns (aten _scaled_dot_product_attention_math:
            # the float32 copies of q/k/v, the scaled q, k/v repeated for enable_gqa, the mask;
            # docs/peft-transformers.md#attention-locals)
            made = {t.name for op in self.ops for t in op.outputs}
            kernel_locals = [n for n in ("attn.q32", "attn.k32", "attn.v32", "attn.kr", "attn.vr") if n in made]
            self.op("attn.math_return", [*weights, "attn.qs", *masks, *kernel_locals])
        elif backend == "flash":
            # a head dim that is not a multiple of 8 is padded first (q, k, v copies, saved by the
            # kernel; cuda/_sdpa.py flash_padded_head_dim). Backward workspaces (mha_bwd): float32
            # softmax_d and dq_accum (cuda/_sdpa.py); grouped KV heads: dk/dv expanded to every
            # query head in the input dtype.
            hp = cuda_sdpa.flash_padded_head_dim(hd)
            qp, kvp = H * hp, spec.kv_heads * hp
            if hp != hd:
                self.op("attn.q_pad", [q], [self.t("attn.qp", a * T * qp)], grads=((q, a * T * qw),))
                self.op("attn.k_pad", [k], [self.t("attn.kp", a * T * kvp)], grads=((k, a * T * kvw),))
                self.op("attn.v_pad", [v], [self.t("attn.vp", a * T * kvp)], grads=((v, a * T * kvw),))
                q, k, v, v_storage = "attn.qp", "attn.kp", "attn.vp", "attn.vp"
            # (made in mha_bwd's order: softmax_d, dq_accum, then dk / dv expanded)
            bwd = in_order(*(alloc(cuda_sdpa.nbytes(*w)) for w in cuda_sdpa.flash_backward_workspace(b, H, seq, hp, _sym_round)),
                           *((alloc(a * T * qp),) * 2 if spec.kv_heads != H else ()))
            self.op("attn.sdpa", [q, k, v], [self.t("attn.o", a * T * qp), self.t("attn.lse", FP32 * b * H * seq)],
                    saves=(q, k, v_storage, "attn.o", "attn.lse"),
                    grads=((q, a * T * qp), (k, a * T * kvp), (v, a * T * kvp)), bwd_work=bwd)
            if hp != hd:
                # the output is a slice of the padded one: transformers' transpose(1, 2).contiguous()
                # copies it; the slice's backward fills a zero-padded gradient
                self.op("attn.flat", ["attn.o"], [self.t("attn.of", a * T * qw)], grads=(("attn.o", a * T * qp),))
                return "attn.of"
        else:
            rep = H // spec.kv_heads
            S = b * H * seq * seq
            keep_k = keep_v = ()
            if rep > 1:  # repeat_kv: expand + reshape copies k/v to every head
                # ... except with one KV head and one sequence (self.kv_view): repeat_kv is then a
                # stride-0 view and so is matmul's (b * H) batch reshape, so q @ k^T and p @ v
                # save the original k / v storages. eager_attention_forward repeats both before
                # its first matmul
                size = 0 if self.kv_view else a * T * qw
                self.op("attn.k_rep", [k], [self.t("attn.kr", size)], grads=((k, a * T * kvw),))
                self.op("attn.v_rep", [v], [self.t("attn.vr", size)], grads=((v, a * T * kvw),))
                keep_k, keep_v = ((k,), (v,)) if self.kv_view else ((), ())
                k, v = "attn.kr", "attn.vr"
            # Phi-3's rotary embedding ends with a cat (rope_pass_cat): q and k come out contiguous
            # (b, H, s, hd), so matmul's reshape below is a view of them, as simulate's step shows
            rope_cat = spec.arch.rope_pass_cat and self.use_rope and not dims and not rope_applied
            if not self.single and not rope_cat:
                # q and k are laid out as (b, s, heads, hd) seen through `.transpose(1, 2)` (Llama 4's
                # are those views; RoPE's products keep their inputs' layout): matmul's
                # reshape to (b * H, s, hd) for bmm (aten matmul: expand + reshape) cannot merge
                # b and H in a view unless b is 1, so it copies q (and k when repeat_kv does not),
                # inside `torch.matmul(query, key_states.transpose(2, 3))`, after repeat_kv;
                # bmm saves the copies, the reshape's backward passes the gradient through
                self.op("attn.q_copy", [q], [self.t("attn.qc", a * T * qw)], grads=((q, 0),))
                q = "attn.qc"
                if rep == 1:
                    self.op("attn.k_copy", [k], [self.t("attn.kc", a * T * kvw)], grads=((k, 0),))
                    k = "attn.kc"
            # bmm reads q and k^T as copied above (batch > 1) or as views (batch 1, or k after
            # repeat_kv's copy)
            self.op("attn.qk", [q, k, *keep_k], [self.t("attn.s", a * S)], saves=(q, k, *keep_k),
                    grads=operand_grads((q, a * T * qw), (k, a * T * qw)), blas=BLAS)
            self.op("attn.scale", ["attn.s"], [self.t("attn.s2", a * S)], grads=(("attn.s", a * S),))
            scores = "attn.s2"
            if spec.attn_logit_softcap:  # Gemma2: tanh(scores / cap) * cap, tanh saves its output
                self.op("attn.cap_div", [scores], [self.t("attn.c1", a * S)], grads=((scores, a * S),))
                self.op("attn.tanh", ["attn.c1"], [self.t("attn.c2", a * S)], saves=("attn.c2",),
                        grads=(("attn.c1", a * S),))
                self.op("attn.cap_mul", ["attn.c2"], [self.t("attn.c3", a * S)], grads=(("attn.c2", a * S),))
                scores = "attn.c3"
            # eager_attention_forward adds the materialized causal mask (a new b x H x s x s tensor)
            self.op("attn.mask", [scores], [self.t("attn.sm", a * S)], grads=((scores, 0),))
            scores = "attn.sm"
            # softmax(dtype=float32) converts the input first (aten._to_copy), then softmaxes in
            # float32 (output saved); backward: float32 grad, then the cast back. Llama 4's
            # eager_attention_forward softmaxes in the scores' dtype (output saved), except under
            # autocast, where softmax is fp32_set_opt_dtype: the same float32 softmax, whose
            # output matmul (lower precision) casts back for p @ v (docs/recipes.md#cuda-autocast-op-lists)
            fp32_softmax = spec.arch.eager_softmax_fp32 or s.autocast
            s32 = scores
            if a != FP32 and fp32_softmax:  # .to(float32) and the cast back are no-ops on float32 scores
                s32 = "attn.s32"
                self.op("attn.to32", [scores], [self.t(s32, FP32 * S)], grads=((scores, a * S),))
            sb, probs = (FP32, "attn.p32") if fp32_softmax else (a, "attn.p")
            # `attn_weights` names the masked scores while the softmax runs
            self.op("attn.softmax", [s32, scores], [self.t(probs, sb * S)], saves=(probs,), grads=((s32, sb * S),))
            if a != FP32 and fp32_softmax:
                # Llama: `attn_weights` still names the scaled scores until the cast result is
                # bound to it (Llama 4 under autocast rebinds it to the float32 softmax)
                keep = [scores] if spec.arch.eager_softmax_fp32 else []
                probs = "attn.p"
                self.op("attn.cast", ["attn.p32", *keep], [self.t(probs, a * S)], grads=(("attn.p32", FP32 * S),))
            if dims or (rep == 1 and not self.single):
                # matmul reshapes v (b, H, s, dv) to (b * H, s, dv) for bmm: a strided view of
                # kv_b_proj's output, or of v_proj's (or Phi-3's fused qkv_proj's) output seen
                # through `.transpose(1, 2)`, cannot merge b and H unless b is 1 (as q and k
                # above; repeat_kv's copy is contiguous), so it is copied right before the bmm
                # (saved by it); the reshape's backward is a view
                self.op("attn.v_copy", [v], [self.t("attn.vc", a * T * vin)], grads=((v, 0),))
                v = "attn.vc"
            self.op("attn.pv", [probs, v, *keep_v], [self.t("attn.o", a * T * ow)], saves=(probs, v, *keep_v),
                    grads=operand_grads((probs, a * S), (v, a * T * (vin if dims else qw))), blas=BLAS)
        if backend in ("flash", "efficient"):
            # the fused kernels' output is (b, s, H, hd) in memory, so transformers'
            # transpose(1, 2).contiguous() and reshape are free views: memory-efficient attention
            # always makes it so (attention_backward.cu's forward: empty({B, M, H, K})), flash lays
            # it out as q (flash_api.cpp mha_fwd: empty_like(q), q transposed to (b, s, H, hd)),
            # which is the projection's `.transpose(1, 2)` view, except after Phi-3's rotary
            # embedding, which ends with a cat: a contiguous (b, H, s, hd) q, so the output is too
            # and `.contiguous()` copies it (the copy's gradient is a view the kernel's backward
            # transposes back)
            if backend == "flash" and spec.arch.rope_pass_cat and self.use_rope and not dims and not rope_applied:
                self.op("attn.flat", ["attn.o"], [self.t("attn.of", a * T * ow)], grads=(("attn.o", 0),))
                return "attn.of"
            return "attn.o"
        # eager / math: (b, H, s, hd) -> transpose(1, 2).contiguous() is a copy o_proj reads. Its
        # gradient reaches `p @ v` as a transposed view of o_proj's input gradient, which matmul's
        # output reshape (at::matmul's _unsafe_view of the (b * H, s, hd) bmm output) takes back
        # to (b * H, s, hd): a copy unless b is 1, where the size-1 dim folds into a view
        # (UnsafeViewBackward0; simulate's step makes no such tensor at batch 1)
        self.op("attn.flat", ["attn.o"], [self.t("attn.of", a * T * ow)],
                grads=(("attn.o", 0 if self.single else a * T * ow),))
        if backend == "eager":
            self.eager_return()
        return "attn.of"

    def eager_return(self) -> None:
        """eager_attention_forward's locals `key_states` / `value_states`, repeat_kv's copies, live
        until it returns, after the output's transpose copy (transformers models/llama/modeling_llama.py
        eager_attention_forward)."""
        made = {t.name for op in self.ops for t in op.outputs}
        reps = [n for n in ("attn.kr", "attn.vr") if n in made]
        if reps:
            self.op("attn.eager_return", reps)

    def eager_sinks(self, q: str, k: str, v: str) -> str:
        """gpt-oss eager_attention_forward (models/gpt_oss/modeling_gpt_oss.py), the only attention
        transformers lets it train with (_supports_sdpa = False): k / v repeated to every head,
        scores = q @ k^T * scaling + mask, the per-head sink appended as one more column
        (torch.cat: b x H x s x (s + 1)), minus its row max (max saves its int64 indices), softmax
        in the scores' dtype (no float32 upcast; output saved), the sink column sliced off (a view
        the matmul with v saves), output transposed to (b, s, H, hd) with a copy. The masked scores
        (`attn_weights`) live until the name is rebound after the softmax, the centred logits
        (`combined_logits`) until the function returns. Backward: the slice scatters into zeros of
        the full width, the subtraction makes a negated full-width gradient before reducing it to
        the max's shape, and max's backward scatters into zeros of the full width again."""
        spec, a, T = self.spec, self.a, self.T
        b, seq, H = sym.B, sym.S, spec.heads
        qw, kvw = H * spec.head_dim, spec.kv_heads * spec.head_dim
        S, S1, rows = b * H * seq * seq, b * H * seq * seq + b * H * seq, b * H * seq
        if H != spec.kv_heads:   # repeat_kv: expand + reshape copies k / v to every head
            self.op("attn.k_rep", [k], [self.t("attn.kr", a * T * qw)], grads=((k, a * T * kvw),))
            self.op("attn.v_rep", [v], [self.t("attn.vr", a * T * qw)], grads=((v, a * T * kvw),))
            k, v = "attn.kr", "attn.vr"
        sinks = alloc(a * H) if self.full else 0
        self.op("attn.qk", [q, k], [self.t("attn.s", a * S)], saves=(q, k), grads=operand_grads((q, a * T * qw), (k, a * T * qw)),
                blas=BLAS)
        self.op("attn.scale", ["attn.s"], [self.t("attn.s2", a * S)], grads=(("attn.s", a * S),))
        self.op("attn.mask", ["attn.s2"], [self.t("attn.sm", a * S)], grads=(("attn.s2", 0),))
        # cat's backward hands out narrow views of the incoming gradient; the sinks' own gradient
        # (full fine-tuning) is that view summed over batch and positions
        self.op("attn.cat", ["attn.sm"], [self.t("attn.c", a * S1)], grads=(("attn.sm", 0),), param_grads=sinks)
        self.op("attn.max", ["attn.c"], [self.t("attn.mx", a * rows), self.t("attn.mi", 8 * rows)],
                saves=("attn.mi",), grads=(("attn.c", a * S1),))
        self.op("attn.sub", ["attn.c", "attn.mx"], [self.t("attn.cc", a * S1)],
                grads=(("attn.c", 0), ("attn.mx", a * rows)), bwd_work=alloc(a * S1))
        self.op("attn.softmax", ["attn.cc"], [self.t("attn.p", a * S1)], saves=("attn.p",),
                grads=(("attn.cc", a * S1),))
        self.op("attn.slice", ["attn.p", "attn.sm"], [self.t("attn.pw", 0)], grads=(("attn.p", a * S1),))
        self.op("attn.pv", ["attn.pw", "attn.p", v], [self.t("attn.o", a * T * qw)], saves=("attn.p", v),
                grads=operand_grads(("attn.pw", a * S), (v, a * T * qw)), blas=BLAS)
        self.op("attn.flat", ["attn.o"], [self.t("attn.of", a * T * qw)], grads=(("attn.o", a * T * qw),))
        self.op("attn.return", ["attn.cc", "attn.of"])
        self.eager_return()
        return "attn.of"

    def residual(self, name: str, x: str, y: str) -> str:
        if self.spec.arch.scaled_residuals:
            # Granite: residual + y * residual_multiplier: the product is a new tensor (a scalar
            # multiply saves nothing), its backward a new gradient
            yb = self.bytes_of.get(y, self.a)
            w = yb * self.T * self.spec.hidden
            self.op(f"{name}.scale", [y], [self.t(f"{name}.y", w)], grads=((y, w),))
            if yb != self.a:
                self.bytes_of[f"{name}.y"] = yb
            # `hidden_states = residual + hidden_states * self.residual_multiplier`: the product is
            # a temporary, freed as the sum is made, the unscaled branch output as `hidden_states`
            # is rebound
            return self.add(name, x, f"{name}.y", held=(y,))
        return self.add(name, x, y)

    def add(self, name: str, x: str, y: str, held: tuple = ()) -> str:
        """x + y over the hidden width: a 16-bit operand added to a float32 one promotes, and
        autograd casts that operand's gradient back (validate_outputs). The decoder layer's
        `hidden_states = residual + hidden_states` frees the branch output y as `hidden_states` is
        rebound, before the residual x, which its local `residual` holds until it is rebound or
        the layer returns (transformers models/llama/modeling_llama.py LlamaDecoderLayer.forward)."""
        TH = self.T * self.spec.hidden
        xb, yb = self.bytes_of.get(x, self.a), self.bytes_of.get(y, self.a)
        ob = max(xb, yb)
        out = f"{name}.out" if name != "layer" else "layer.out"
        self.op(name, [y, *held, x], [self.t(out, ob * TH)],
                grads=((x, 0 if xb == ob else xb * TH), (y, 0 if yb == ob else yb * TH)))
        if ob != self.a:
            self.bytes_of[out] = ob
        return out

    # --- Mixture of experts (transformers 5 MixtralSparseMoeBlock, grouped_mm experts) ---------
    def moe(self, x: str, lins: dict | None = None) -> str:
        """The family's router (router_weights) then its experts (MixtralExperts, Qwen3MoeExperts,
        GraniteMoeExperts) with experts_implementation="grouped_mm" (the transformers 5.23
        default): tokens sorted by expert and gathered (index), one grouped matmul for gate_up and
        one for down, the routing weights multiply the output, which is put back in token order
        and summed over the chosen experts (moe_sum), then cast if the sum is float32.
        With all-linear LoRA, peft's ParamWrapper merges weight + B @ A (baddbmm) into a fresh
        compute-dtype copy of each expert stack on every forward; the grouped matmul saves it."""
        spec, s, a, T = self.spec, self.setup, self.a, self.T
        if self.c != a:
            from vramplan.core._errors import UsageError
            raise UsageError("--amp over float32 hidden states (--prepare-kbit, or --dtype fp32) is not modelled for "
                             "mixture-of-experts layers (grouped_mm is on no autocast list)",
                             hint="use --amp none, or --dtype equal to --amp without --prepare-kbit")
        if spec.arch.moe_style == "gpt_oss":
            return self.moe_gpt_oss(x)
        if spec.arch.moe_style == "llama4":
            return llama4.moe(self, x, lins)
        h, i, E, k = spec.hidden, spec.expert_width, spec.num_experts, spec.experts_per_tok
        cb, Tk = s.compute_bytes, T * k
        lora = experts_adapted(spec, s)
        r = s.rank
        full = self.full
        if spec.arch.router == "sigmoid_grouped":
            # DeepSeek's router yields "moe.w" in float32, or in the autocast dtype under autocast
            self.grouped_router(x, lora)
            self.moe_w = self.c if s.autocast else FP32
        else:
            # the router weight trains under full fine-tuning (its .grad in the weight dtype, as
            # nn.Linear's in `linear`) or through ParamWrapper's LoRA factors (float32 .grad): either
            # way F.linear saves the input for the weight gradient
            lb = adapter_bytes(s)
            router_grads = alloc(lb * r * h) + alloc(lb * E * r) if lora else alloc(a * E * h) if full else 0
            self.op("moe.router", [x], [self.t("moe.logits", a * T * E)], saves=(x,) if lora or full else (),
                    grads=((x, a * T * h),), param_grads=router_grads)
            self.router_weights(T, E, k)
        # the weighted expert outputs, their unsorted copy and the sum over the chosen experts
        # have the promoted dtype of the routing weights and the hidden states
        wb = self.moe_w
        self.moe_out = FP32 if FP32 in (wb, a) else a
        if experts_quantized(spec, s):
            return self.moe_4bit_experts(x)
        wgu, wd = "moe.w_gate_up", "moe.w_down"
        factors = []
        if lora:
            # peft ParamWrapper._activate_lora, the outer wrapper (down_proj) first: get_delta_factors
            # casts the LoRA factors to the weight dtype, the parametrization holds them until the
            # experts return, and register_parametrization evaluates it once as a check (a merged
            # copy, dropped at once). The cast's backward makes the float32 .grad.
            # (docs/peft-transformers.md#mixtral-experts-in-transformers-5)
            # bf16 factors (TRL's cast, TrainSetup.adapters_16bit) are in the weight dtype already:
            # `.to(param.dtype)` returns the reshaped views themselves (nothing made), and their
            # bf16 gradients come back through the views, reshaped into a contiguous .grad
            lb = adapter_bytes(s)
            own = 0 if lb == cb else 1
            for name, lhs, rhs, merged in (("down", E * h * r, E * r * i, E * h * i),
                                           ("gate_up", E * 2 * i * 2 * r, E * 2 * r * h, E * 2 * i * h)):
                self.op(f"moe.factors_{name}", [], [self.t(f"moe.{name}.lhs", own * cb * lhs),
                                                     self.t(f"moe.{name}.rhs", own * cb * rhs)],
                        work=alloc(cb * merged), work_tag=ACT,
                        param_grads=alloc(lb * lhs) + alloc(lb * rhs))
                factors += [f"moe.{name}.lhs", f"moe.{name}.rhs"]
        self.moe_dispatch(x, wb)
        if lora:  # the cached parametrization merges on first access: baddbmm(W, lhs, rhs, alpha=scaling)
            grads = (("moe.gate_up.lhs", cb * E * 2 * i * 2 * r), ("moe.gate_up.rhs", cb * E * 2 * r * h))
            self.op("moe.merge_gate_up", ["moe.gate_up.lhs", "moe.gate_up.rhs"], [self.t(wgu, cb * E * 2 * i * h)],
                    saves=("moe.gate_up.lhs", "moe.gate_up.rhs"), grads=grads, grad_before=self.baddbmm_products(grads))
        # grouped_mm saves its input when the weight needs a gradient (full fine-tuning: the 3D
        # parameter's .grad, in the weight dtype; LoRA: the merged copy's gradient)
        self.op("moe.gate_up", ["moe.xs"] + ([wgu] if lora else []), [self.t("moe.gu", a * Tk * 2 * i)],
                saves=("moe.xs", wgu) if lora else ("moe.xs",) if full else (),
                grads=(("moe.xs", a * Tk * h),) + (((wgu, cb * E * 2 * i * h),) if lora else ()),
                param_grads=alloc(a * E * 2 * i * h) if full else 0)
        # gate and up are chunk views of gate_up: each gets a half-size gradient (SplitBackward
        # then concatenates them)
        self.op("moe.act", ["moe.gu"], [self.t("moe.s", a * Tk * i)], saves=("moe.gu",),
                grads=(("moe.gu", a * Tk * i),))
        self.op("moe.prod", ["moe.s", "moe.gu"], [self.t("moe.p", a * Tk * i)], saves=("moe.s", "moe.gu"),
                grads=(("moe.s", a * Tk * i), ("moe.gu", a * Tk * i)))
        if lora:
            grads = (("moe.down.lhs", cb * E * h * r), ("moe.down.rhs", cb * E * r * i))
            self.op("moe.merge_down", ["moe.down.lhs", "moe.down.rhs"], [self.t(wd, cb * E * h * i)],
                    saves=("moe.down.lhs", "moe.down.rhs"), grads=grads, grad_before=self.baddbmm_products(grads))
        self.op("moe.down", ["moe.p"] + ([wd] if lora else []), [self.t("moe.d", a * Tk * h)],
                saves=("moe.p", wd) if lora else ("moe.p",) if full else (),
                grads=(("moe.p", a * Tk * i),) + (((wd, cb * E * h * i),) if lora else ()),
                param_grads=alloc(a * E * h * i) if full else 0)
        ob = self.moe_out
        self.weigh("moe.d", "moe.wg", Tk, h)
        # inv_perm = empty_like(perm); inv_perm[perm] = arange (a transient)
        self.op("moe.inv_perm", ["moe.perm"], [self.t("moe.inv", 8 * Tk)], work=alloc(8 * Tk), work_tag=ACT)
        self.op("moe.unsort", ["moe.dw", "moe.inv"], [self.t("moe.du", ob * Tk * h)], saves=("moe.inv",),
                grads=(("moe.dw", ob * Tk * h),))
        summed = self.moe_sum(T, h)
        # the experts' locals (gathered tokens, projections, routing bookkeeping) and the cached
        # merged weights live until the experts forward returns (nn.utils.parametrize.cached)
        self.op("moe.experts_return", ["moe.ids", "moe.perm", "moe.xs", "moe.wg", "moe.ids32", "moe.hist",
                                       "moe.offs", "moe.d", "moe.inv", "moe.du", summed, *factors]
                + ([wgu, wd] if lora else []))
        self.op("moe.return", [x])
        return "moe.out"

    def baddbmm_products(self, factors: tuple) -> tuple:
        """peft ParamWrapper merges `torch.baddbmm(W, lhs, rhs, alpha=scaling)` (tuners/lora/layer.py),
        scaling = lora_alpha / r with LoraConfig's default lora_alpha of 8: each factor's gradient is
        `maybe_multiply(grad.bmm(...), alpha)` (derivatives.yaml baddbmm), a product and then its
        scaled copy, unless the scaling is 1 (walk.Op.grad_before)."""
        if LORA_ALPHA == self.setup.rank:
            return ()
        return tuple((name, alloc(nbytes)) for name, nbytes in factors)

    def grouped_router(self, x: str, lora: bool) -> None:
        """DeepseekV3TopkRouter.forward (models/deepseek_v3/modeling_deepseek_v3.py): router_logits =
        F.linear(x.float(), weight.float()) (the float32 copy of x is saved when LoRA makes the weight
        trainable; the float32 weight copy always, for x's gradient); sigmoid (output saved); the
        choice (scores + e_score_correction_bias, per-group top-2 sums, the topk_group best groups
        as a mask, masked_fill, top-k) runs on (tokens, experts) float32 temporaries and yields
        indices only; the weights are gathered from the sigmoid scores (index saved), renormalized
        (sum + 1e-20, in-place division saving the denominator) and scaled by routed_scaling_factor.
        Outputs "moe.w" (float32 tokens x top-k) and "moe.idx" (int64), as the softmax router.
        Under torch.autocast F.linear is on the lower-precision list (aten/src/ATen/autocast_mode.cpp):
        both float32 copies are cast back, and the logits, scores and routing weights are in the
        autocast dtype (docs/recipes.md#cuda-autocast-op-lists)."""
        spec, a, T = self.spec, self.a, self.T
        h, E, k, (G, tg) = spec.hidden, spec.num_experts, spec.experts_per_tok, spec.router_groups
        r, Tk, TE = self.setup.rank, T * k, T * E
        sb = self.c if self.setup.autocast else FP32      # bytes of the logits, scores and weights
        x32 = x
        if a != FP32:
            x32 = "moe.x32"
            self.op("moe.x32", [x], [self.t(x32, FP32 * T * h)], grads=((x, a * T * h),))
        # peft ParamWrapper: the weight read through the parametrization is W + B @ A (a
        # compute-dtype merge, a transient), then .float()
        merge = alloc(self.setup.compute_bytes * E * h) if lora else 0
        # full fine-tuning: the weight's gradient comes back through the .float() copy (float32,
        # then cast to the parameter dtype)
        lb = adapter_bytes(self.setup)
        grads = (alloc(lb * r * h) + alloc(lb * E * r) if lora else
                 alloc(self.setup.compute_bytes * E * h) if self.full else 0)
        self.op("moe.w32", [], [self.t("moe.w32", FP32 * E * h)], work=merge, work_tag=ACT, param_grads=grads,
                bwd_work=alloc(FP32 * E * h) if self.full else 0)
        xin, w = x32, "moe.w32"
        if sb != FP32:   # autocast's casts of both operands, which the linear saves
            self.op("moe.x16", [x32], [self.t("moe.x16", sb * T * h)], grads=((x32, FP32 * T * h),))
            self.op("moe.w16", ["moe.w32"], [self.t("moe.w16", sb * E * h)])
            xin, w = "moe.x16", "moe.w16"
        self.op("moe.router", [xin, w], [self.t("moe.logits", sb * TE)],
                saves=((xin,) if lora or self.full else ()) + (w,), grads=((xin, sb * T * h),))
        self.op("moe.sigmoid", ["moe.logits"], [self.t("moe.scores", sb * TE)], saves=("moe.scores",),
                grads=(("moe.logits", sb * TE),))
        # scores_for_choice, the expanded group mask, its bool and negation, the masked scores;
        # the per-group top-2 (values, indices), their sums, the group top-k and the zeros mask
        choice = (3 * alloc(sb * TE) + 2 * alloc(TE) + alloc((sb + 8) * T * G * 2) + 2 * alloc(sb * T * G)
                  + alloc((sb + 8) * T * tg) + alloc(sb * Tk))
        self.op("moe.choice", ["moe.scores"], [self.t("moe.idx", 8 * Tk)], work=choice, work_tag=ACT)
        # gather's backward scatters into zeros of the scores' shape
        self.op("moe.gather", ["moe.scores", "moe.idx"], [self.t("moe.wk", sb * Tk)], saves=("moe.idx",),
                grads=(("moe.scores", sb * TE),))
        wk = "moe.wk"
        if spec.config.get("norm_topk_prob", True):
            self.op("moe.denom", [wk], [self.t("moe.den", sb * T)], work=alloc(sb * T), work_tag=ACT,
                    saves=("moe.den",), grads=((wk, sb * Tk),))
        self.op("moe.scale", [wk], [self.t("moe.w", sb * Tk)], grads=((wk, sb * Tk),))

    def moe_dispatch(self, x: str, weight_bytes: int) -> None:
        """grouped_mm_experts_forward (integrations/moe.py): sort by expert, gather the tokens
        (`hidden_states[perm // k]`: IndexBackward saves the index, so the recomputation keeps
        perm // k until the gather's backward) and the routing weights (`weight_bytes` each),
        histc over the float expert ids, cumsum offsets."""
        spec, a, T = self.spec, self.a, self.T
        h, E, Tk = spec.hidden, spec.num_experts, T * spec.experts_per_tok
        self.op("moe.sort", ["moe.idx"], [self.t("moe.ids", 8 * Tk), self.t("moe.perm", 8 * Tk)])
        self.op("moe.token_of", ["moe.perm"], [self.t("moe.tok", 8 * Tk)])
        self.op("moe.gather", [x, "moe.tok"], [self.t("moe.xs", a * Tk * h)], saves=("moe.tok",),
                grads=((x, a * T * h),))
        self.op("moe.gather_w", ["moe.w", "moe.perm"], [self.t("moe.wg", weight_bytes * Tk)],
                grads=(("moe.w", weight_bytes * Tk),))
        self.op("moe.offsets", ["moe.ids"], [self.t("moe.ids32", 4 * Tk), self.t("moe.hist", 4 * E),
                                             self.t("moe.offs", 4 * E)])

    def moe_gpt_oss(self, x: str) -> str:
        """GptOssMLP (models/gpt_oss/modeling_gpt_oss.py): GptOssTopKRouter is F.linear(x, weight,
        bias), topk of the logits, softmax over the k values in the logits dtype (16-bit routing
        weights, unlike Mixtral's float32); GptOssExperts runs integrations/moe.py
        grouped_mm_experts_forward (is_transposed, has_bias): tokens sorted by expert and gathered,
        the experts' biases gathered per row (`gate_up_proj_bias[expert_ids_g]`) and added in place
        to each grouped matmul's output; GptOssExperts._apply_gate takes the interleaved gate / up
        columns as strided views, clamps both (each clamp saves the view, so the whole gate_up
        output stays saved), glu = gate * sigmoid(gate * alpha), (up + 1) * glu. The routing
        weights multiply the down output in 16-bit, it is put back in token order and summed over
        the k experts. Under all-linear LoRA nothing here is adapted (Architecture.peft_moe_conversion)."""
        spec, s, a, T = self.spec, self.setup, self.a, self.T
        h, i, E, k = spec.hidden, spec.intermediate, spec.num_experts, spec.experts_per_tok
        Tk, wb = T * k, FP32 if s.prepare_kbit else s.compute_bytes
        full = self.full
        self.op("moe.router", [x], [self.t("moe.logits", a * T * E)], saves=(x,) if full else (),
                grads=((x, a * T * h),), param_grads=alloc(a * E * h) + alloc(a * E) if full else 0)
        # topk saves its indices; softmax(dtype=logits dtype) saves its output
        self.op("moe.topk", ["moe.logits"], [self.t("moe.tv", a * Tk), self.t("moe.idx", 8 * Tk)],
                saves=("moe.idx",), grads=(("moe.logits", a * T * E),))
        self.op("moe.softmax", ["moe.tv"], [self.t("moe.w", a * Tk)], saves=("moe.w",), grads=(("moe.tv", a * Tk),))
        self.moe_dispatch(x, a)   # 16-bit routing weights; then the biases gathered per row
        self.op("moe.bias_gu", ["moe.ids"], [self.t("moe.bgu", wb * Tk * 2 * i)],
                param_grads=alloc(wb * E * 2 * i) if full else 0)
        self.op("moe.gate_up", ["moe.xs", "moe.bgu"], [self.t("moe.gu", a * Tk * 2 * i)],
                saves=("moe.xs",) if full else (), grads=(("moe.xs", a * Tk * h),),
                param_grads=alloc(wb * E * h * 2 * i) if full else 0)
        # gate_up[..., ::2] and [..., 1::2]: views; each view's backward scatters into zeros of the
        # full width (as_strided / slice backward)
        for v in ("g", "u"):
            self.op(f"moe.{v}_view", ["moe.gu"], [self.t(f"moe.{v}", 0)], grads=(("moe.gu", a * Tk * 2 * i),))
        self.op("moe.clamp_g", ["moe.g", "moe.gu"], [self.t("moe.gc", a * Tk * i)], saves=("moe.gu",),
                grads=(("moe.g", a * Tk * i),))
        self.op("moe.clamp_u", ["moe.u", "moe.gu"], [self.t("moe.uc", a * Tk * i)], saves=("moe.gu",),
                grads=(("moe.u", a * Tk * i),))
        self.op("moe.alpha", ["moe.gc"], [self.t("moe.ga", a * Tk * i)], grads=(("moe.gc", a * Tk * i),))
        self.op("moe.sigmoid", ["moe.ga"], [self.t("moe.sg", a * Tk * i)], saves=("moe.sg",),
                grads=(("moe.ga", a * Tk * i),))
        self.op("moe.glu", ["moe.gc", "moe.sg"], [self.t("moe.glu", a * Tk * i)], saves=("moe.gc", "moe.sg"),
                grads=(("moe.gc", a * Tk * i), ("moe.sg", a * Tk * i)))
        self.op("moe.up1", ["moe.uc"], [self.t("moe.u1", a * Tk * i)], grads=(("moe.uc", 0),))
        self.op("moe.gated", ["moe.u1", "moe.glu"], [self.t("moe.p", a * Tk * i)], saves=("moe.u1", "moe.glu"),
                grads=(("moe.u1", a * Tk * i), ("moe.glu", a * Tk * i)))
        # _apply_gate's locals, and `proj_out` (the gate_up output) until its name is rebound
        self.op("moe.gate_return", ["moe.gc", "moe.uc", "moe.glu", "moe.gu"])
        # `selected_biases` now names the down biases: the gate_up ones are dropped
        self.op("moe.bias_d", ["moe.ids", "moe.bgu"], [self.t("moe.bd", wb * Tk * h)],
                param_grads=alloc(wb * E * h) if full else 0)
        self.op("moe.down", ["moe.p", "moe.bd"], [self.t("moe.d", a * Tk * h)], saves=("moe.p",) if full else (),
                grads=(("moe.p", a * Tk * i),), param_grads=alloc(wb * E * i * h) if full else 0)
        self.op("moe.weigh", ["moe.d", "moe.wg"], [self.t("moe.dw", a * Tk * h)], saves=("moe.d", "moe.wg"),
                grads=(("moe.d", a * Tk * h), ("moe.wg", a * Tk)), bwd_work=alloc(a * Tk * h))
        self.op("moe.inv_perm", ["moe.perm"], [self.t("moe.inv", 8 * Tk)], work=alloc(8 * Tk), work_tag=ACT)
        self.op("moe.unsort", ["moe.dw", "moe.inv"], [self.t("moe.du", a * Tk * h)], saves=("moe.inv",),
                grads=(("moe.dw", a * Tk * h),))
        # view(T, k, h).sum(1): the backward expands the gradient, and the view's backward
        # reshapes that expanded tensor to (T * k, h), a copy. Under CUDA autocast sum is
        # fp32_set_opt_dtype (docs/recipes.md#cuda-autocast-op-lists): a float32 sum, which
        # `.to(hidden_states.dtype)` copies back
        if s.autocast and a != FP32:
            self.op("moe.sum", ["moe.du"], [self.t("moe.ds", FP32 * T * h)], grads=(("moe.du", a * Tk * h),))
            self.op("moe.cast", ["moe.ds"], [self.t("moe.out", a * T * h)], grads=(("moe.ds", FP32 * T * h),))
        else:
            self.op("moe.sum", ["moe.du"], [self.t("moe.out", a * T * h)], grads=(("moe.du", a * Tk * h),))
        self.op("moe.experts_return", ["moe.ids", "moe.perm", "moe.xs", "moe.wg", "moe.ids32", "moe.hist",
                                       "moe.offs", "moe.bd", "moe.d", "moe.inv", "moe.du"])
        # GptOssMLP.forward keeps the router logits (`_`) until it returns
        self.op("moe.return", [x, "moe.logits"])
        return "moe.out"

    def moe_4bit_experts(self, x: str) -> str:
        """--experts 4bit (assumed layout, docs/bitsandbytes.md#moe-experts): the routed tokens
        (tokens x top_k rows, gathered by expert) go through each expert's w1, w3 and w2 as
        Linear4bit + LoRA layers (the `linear` block: dequantized weight per expert, peft's fp32
        input copy and cloned base output), over its share of the rows; no merged 16-bit copy of
        the expert stacks. The routing weights, unsort, sum and cast are as in the grouped path."""
        spec, a = self.spec, self.a
        h, i, k = spec.hidden, spec.expert_width, spec.experts_per_tok
        T, Tk = self.T, self.T * k
        self.op("moe.gather", [x], [self.t("moe.xs", a * Tk * h)], grads=((x, a * T * h),))
        self.T = Tk     # every expert Linear runs over its share; the shares add up to tokens x top_k rows
        w1, w3, w2 = expert_linears(spec)
        g = self.linear(w1, "moe.xs", prefix="moe.")
        u = self.linear(w3, "moe.xs", prefix="moe.")
        self.op("moe.act", [g], [self.t("moe.s", a * Tk * i)], saves=(g,), grads=((g, a * Tk * i),))
        self.op("moe.prod", ["moe.s", u], [self.t("moe.p", a * Tk * i)], saves=("moe.s", u),
                grads=(("moe.s", a * Tk * i), (u, a * Tk * i)))
        d = self.linear(w2, "moe.p", prefix="moe.")
        self.T = T
        ob = self.moe_out
        self.weigh(d, "moe.w", Tk, h)
        self.op("moe.unsort", ["moe.dw"], [self.t("moe.du", ob * Tk * h)], grads=(("moe.dw", ob * Tk * h),))
        self.moe_sum(T, h)
        self.op("moe.return", [x])
        return "moe.out"

    def router_weights(self, T, E: int, k: int) -> None:
        """"moe.logits" (tokens x experts, hidden dtype) to the routing weights "moe.w" (tokens x
        top_k, dtype self.moe_w) and expert ids "moe.idx" (int64), as the family's router runs
        (Architecture.router, docs/architectures.md#moe-routers):
        - MixtralTopKRouter / Qwen3MoeTopKRouter: a float32 softmax of the logits over every expert
          (saved), topk of the probabilities (TopkBackward scatters into a tokens x experts
          zeros); Qwen3-MoE casts the k weights back to the logits dtype;
        - GraniteMoeTopKRouter: `logits.float()`, topk of the float32 logits, softmax over the k
          values (its output saved), `.type_as(hidden_states)`."""
        a, Tk = self.a, T * k
        router = self.spec.arch.router
        if router == "topk_softmax":
            logits = "moe.logits"
            if a != FP32:   # .float() of float32 logits is the tensor itself
                logits = "moe.logits32"
                self.op("moe.float", ["moe.logits"], [self.t(logits, FP32 * T * E)],
                        grads=(("moe.logits", a * T * E),))
            self.op("moe.topk", [logits], [self.t("moe.top", FP32 * Tk), self.t("moe.idx", 8 * Tk)],
                    saves=("moe.idx",), grads=((logits, FP32 * T * E),))
            self.op("moe.softmax", ["moe.top"], [self.t("moe.w32", FP32 * Tk)], saves=("moe.w32",),
                    grads=(("moe.top", FP32 * Tk),))
            top = "moe.w32"
        else:
            self.op("moe.softmax", ["moe.logits"], [self.t("moe.probs", FP32 * T * E)], saves=("moe.probs",),
                    grads=(("moe.logits", a * T * E),))
            top = "moe.w" if router == "softmax_topk" else "moe.w32"
            self.op("moe.topk", ["moe.probs"], [self.t(top, FP32 * Tk), self.t("moe.idx", 8 * Tk)],
                    saves=("moe.idx",), grads=(("moe.probs", FP32 * T * E),))
        self.moe_w = FP32 if router == "softmax_topk" else a
        if top != "moe.w":
            if a == FP32:
                self.op("moe.w_alias", [top], [self.t("moe.w", 0)], grads=((top, 0),))
            else:
                self.op("moe.w_cast", [top], [self.t("moe.w", a * Tk)], grads=((top, FP32 * Tk),))

    def weigh(self, d: str, w: str, Tk, h: int) -> None:
        """proj_out * sample_weights.unsqueeze(-1) (integrations/moe.py grouped_mm_experts_forward),
        in the promoted dtype of the two. MulBackward0 makes the weights' gradient as
        `grad * proj_out` (tokens x top_k x hidden, a transient) summed down to the weights'
        shape, and proj_out's as `grad * weights` in the promoted dtype; when that is float32 and
        proj_out is not (Mixtral's float32 weights), the node releases its saved tensors before
        autograd casts that gradient back (validate_outputs): `moe.dp` stands for the promoted
        operand, its gradient the float32 product, the cast's result the gradient of proj_out.
        That early release is non-reentrant checkpointing's (its unpack hook hands the recomputed
        proj_out to the node once, docs/autograd.md#non-reentrant-checkpointing). Without
        checkpointing, and in a reentrant checkpoint's recomputation, it is saved in a plain
        SavedVariable, which the engine releases only after the node's validate_outputs
        (docs/autograd.md#plain-savedvariables-outlive-validate_outputs): the
        cast of proj_out's gradient then runs with proj_out, the incoming gradient and the
        weights' unreduced product (summed to their shape after that cast) all alive, so the
        cast is part of the node's transient, and `moe.promote` holds proj_out until it is done."""
        a, ob, wb = self.a, self.moe_out, self.moe_w
        grad_d = d
        plain = self.setup.reentrant_ckpt or not self.setup.grad_ckpt
        if ob != a:
            grad_d = "moe.dp"
            self.op("moe.promote", [d], [self.t(grad_d, 0)], saves=(d,) if plain else (), grads=((d, a * Tk * h),))
        cast = alloc(a * Tk * h) if plain and ob != a else 0
        self.op("moe.weigh", [d, grad_d, w], [self.t("moe.dw", ob * Tk * h)], saves=(d, w),
                grads=((grad_d, ob * Tk * h), (w, wb * Tk)), bwd_work=alloc(ob * Tk * h) + cast, work_tag=ACT)

    def moe_sum(self, T, h: int, src: str = "moe.du", copies: int | None = None) -> str:
        """weighted_out.view(tokens, k, h).sum(1).to(hidden dtype) (integrations/moe.py
        grouped_mm_experts_forward), or Llama 4's routed_out.reshape(E, tokens, h).sum(dim=0)
        over `copies` = every expert (Llama4TextMoe.forward). Backward: SumBackward expands the
        gradient (a stride-0 view), ViewBackward's reshape of it cannot be a view, so it copies: a
        tokens x copies x hidden gradient of the sum's dtype. Neither saves a tensor, so under
        checkpointing both run before the recomputation and that copy stays alive through it. The
        cast is a new tensor only when the sum is float32 and the hidden states are not (Mixtral's
        float32 routing weights); `.to()` of the same dtype returns the sum itself."""
        a, ob, Tk = self.a, self.moe_out, T * (copies or self.spec.experts_per_tok)
        summed = "moe.out" if ob == a else "moe.ds"
        self.op("moe.sum", [src], [self.t(summed, ob * T * h)], grads=((src, ob * Tk * h),))
        if summed != "moe.out":
            self.op("moe.cast", [summed], [self.t("moe.out", a * T * h)], grads=((summed, ob * T * h),))
        return summed

    # --- MLP ------------------------------------------------------------------------------------
    def mlp(self, x: str, lins: dict) -> str:
        T, i = self.T, lins["down_proj"].in_features
        # LlamaMLP: down_proj(act_fn(gate_proj(x)) * up_proj(x)), evaluated left to right, so
        # the activation exists while up_proj runs. Phi3MLP: gate_up_proj, chunk (views), act.
        # Under autocast over float32 weights the projections return the autocast dtype, and
        # the activation and product stay in it (silu and mul are on no autocast list).
        width = i  # the gradient of each chunk view (SplitBackward concatenates them)
        if self.spec.arch.fused_gate_up:
            gu = self.linear(lins["gate_up_proj"], x)
            a = self.bytes_of.get(gu, self.a)
            # `gate, up_states = up_states.chunk(2, dim=-1)`: two views of one node, SplitBackward0,
            # which runs once both gradients are in and concatenates them into a new tensor of the
            # output's size (split_backward -> cat); the two halves die as it returns
            gate, up = "mlp.gate", "mlp.up"
            self.op("mlp.chunk", [gu], [self.t(gate, 0), self.t(up, 0)], grads=((gu, a * T * 2 * i),))
            for view in (gate, up):
                self.view_base[view] = gu
                if a != self.a:
                    self.bytes_of[view] = a
            self.op("mlp.act", [gate], [self.t("mlp.s", a * T * i)], saves=(gate,), grads=((gate, a * T * width),))
        else:
            gate = self.linear(lins["gate_proj"], x)
            a = self.bytes_of.get(gate, self.a)
            self.op("mlp.act", [gate], [self.t("mlp.s", a * T * i)], saves=(gate,), grads=((gate, a * T * width),))
            up = self.linear(lins["up_proj"], x)
        self.op("mlp.prod", ["mlp.s", up], [self.t("mlp.p", a * T * i)], saves=("mlp.s", up),
                grads=operand_grads(("mlp.s", a * T * i), (up, a * T * width)))
        if a != self.a:
            self.bytes_of["mlp.p"] = a
        out = self.linear(lins["down_proj"], "mlp.p")
        # the product (a temporary of the down_proj call's expression) goes as that call returns;
        # gate_up_proj's output, which Phi3MLP's local `gate` (a chunk, a view) still names, as the
        # frame goes; the argument when the decoder layer's `hidden_states = self.mlp(hidden_states)`
        # rebinds it (docs/peft-transformers.md#attention-locals)
        held = [gate] if self.spec.arch.fused_gate_up else []
        self.op("mlp.return", ["mlp.p", *held, x])
        return out


def _sym_round(seq, multiple: int):
    """The sequence rounded up to `multiple`, as the symbol symbolic.variables evaluates."""
    return {16: sym.S16, 32: sym.S32, 128: sym.S128}[multiple]


def gemm_4bit_fused(rows: int, out_features: int, in_features: int, dtype: str = "bf16",
                    arch: CudaArch = ASSUMED) -> bool:
    """Whether bitsandbytes' gemm_4bit runs its fused kernel (no dequantized weight) for a
    training matmul of `rows` tokens whose input is `dtype`: cuda/_gemm_4bit.py, the rule simulate
    uses as well."""
    return gemm_4bit_uses_fused_kernel(rows, out_features, in_features, dtype, arch)


def activation_dtype(setup: TrainSetup) -> str:
    """The dtype of the hidden states (and so of q/k/v and every 4-bit matmul's input)."""
    return "fp32" if setup.prepare_kbit else setup.dtype


def windowed(spec: ModelSpec, setup: TrainSetup) -> bool:
    """A local-attention mask on some layer: a sequence as long as the sliding window or longer,
    or Llama 4's attention chunks: transformers then builds an explicit boolean mask
    (masking_utils.create_sliding_window_causal_mask / create_chunked_causal_mask) instead of
    passing is_causal."""
    return _sliding(spec, setup) or _chunked(spec, setup)


def _sliding(spec: ModelSpec, setup: TrainSetup) -> bool:
    """masking_utils.sliding_window_causal_mask passes `local_size=sliding_window` to
    _ignore_causal_mask_sdpa, which keeps the mask `if local_attention_size is not None and
    kv_length >= local_attention_size`: from a sequence of exactly the window on (where the mask
    still equals the causal one), not only past it."""
    return spec.sliding_window is not None and setup.seq >= spec.sliding_window


def _chunked(spec: ModelSpec, setup: TrainSetup) -> bool:
    """masking_utils._ignore_causal_mask_sdpa: `if local_attention_size is not None and kv_length >=
    local_attention_size: return False`: the chunked mask is built from one chunk's length on."""
    return spec.attention_chunk is not None and setup.seq >= spec.attention_chunk


def layer_windows(spec: ModelSpec, setup: TrainSetup) -> tuple[bool, ...]:
    """Per decoder layer, bottom to top: whether its attention gets a local-attention mask. Only
    "sliding_attention" and "chunked_attention" layers do (config.layer_types,
    docs/architectures.md#layer-types); global layers of Gemma 3 or Qwen3 below max_window_layers
    and Llama 4's no-RoPE layers run plain causal attention."""
    if not spec.layer_types:
        return (windowed(spec, setup),) * spec.layers
    masked = {"sliding_attention": _sliding(spec, setup), "chunked_attention": _chunked(spec, setup)}
    return tuple(masked.get(t, False) for t in spec.layer_types)


def sdpa_call(spec: ModelSpec, setup: TrainSetup, window: bool | None = None) -> cuda_sdpa.SdpaCall:
    """The scaled_dot_product_attention call transformers' sdpa_attention_forward makes for one
    training layer: no mask and is_causal for an unpadded causal batch, a boolean mask with a
    sequence as long as the sliding window or longer (_sliding); with a mask k/v are first repeated to every head
    (use_gqa_in_sdpa is False), without one enable_gqa is passed (integrations/sdpa_attention.py)."""
    masked = windowed(spec, setup) if window is None else window
    gqa = not masked and spec.head_dim <= 256
    # SDPA is on CUDA autocast's lower-precision list: under autocast q, k, v reach the kernel in
    # the autocast dtype whatever the hidden states' (docs/recipes.md#cuda-autocast-op-lists)
    dtype = setup.amp if setup.autocast else activation_dtype(setup)
    if spec.mla:   # DeepseekV3Attention: q/k of qk_nope + qk_rope, v of v_head_dim, every head
        return cuda_sdpa.SdpaCall(dtype=dtype, head_dim=spec.mla.qk_head_dim,
                                  head_dim_v=spec.mla.v_head_dim, heads=spec.heads, kv_heads=spec.heads,
                                  seq_q=setup.seq, seq_k=setup.seq, has_mask=masked, is_causal=not masked,
                                  enable_gqa=False)
    return cuda_sdpa.SdpaCall(dtype=dtype, head_dim=spec.head_dim, head_dim_v=spec.head_dim,
                              heads=spec.heads, kv_heads=spec.heads if masked else spec.kv_heads,
                              seq_q=setup.seq, seq_k=setup.seq, has_mask=masked, is_causal=not masked,
                              enable_gqa=gqa)


def sdpa_backend(spec: ModelSpec, setup: TrainSetup, window: bool | None = None, arch: CudaArch = ASSUMED) -> str:
    """The kernel torch's SDPA dispatcher picks on the target GPU for a training layer
    (cuda/_sdpa.py backend: flash, efficient or math)."""
    return cuda_sdpa.backend(arch, sdpa_call(spec, setup, window))


def int8_ctx_inputs(spec: ModelSpec, setup: TrainSetup) -> int:
    """Bytes per layer that bitsandbytes' MatMul8bitLt keeps on its autograd ctx (ctx.tensors,
    not save_for_backward): gradient checkpointing cannot drop them, so under checkpointing
    every layer's int8 matmul inputs stay alive from the forward to that layer's backward.
    Inputs: the normed hidden state (q/k/v, gate/up share one), the attention output, the MLP product."""
    if not (setup.grad_ckpt and setup.quantized and setup.quant == "int8"):
        return 0
    if setup.reentrant_ckpt:
        # reentrant checkpointing runs the first forward under no_grad: MatMul8bitLt's
        # needs_input_grad is all False, so nothing goes on ctx.tensors, and the ctx itself is
        # dropped with the unrecorded graph (docs/autograd.md#reentrant-checkpointing)
        return 0
    a, T = act_bytes(spec, setup), setup.tokens
    q = spec.heads * spec.head_dim
    mlp = spec.intermediate if not spec.num_experts else 0
    return sum(alloc_bytes(a * T * w) for w in (spec.hidden, q, spec.hidden, mlp) if w)


def embedding_leaf(spec: ModelSpec, setup: TrainSetup) -> int:
    """Bytes of the raw embedding output Granite keeps for the whole step under gradient
    checkpointing: enable_input_require_grads (transformers modeling_utils) makes the embedding
    module's output a leaf that requires grad, and GraniteModel multiplies it by
    embedding_multiplier *outside* that module, so the leaf is not the first layer's input; the
    graph's AccumulateGrad node holds it until backward ends. (Gemma scales inside its embedding
    module, so its leaf is the layer input itself.) The leaf is in the embedding weight's dtype
    (F.embedding returns it): float32 after prepare_model_for_kbit_training, 16-bit again after
    qlora.py's recast (embedding_bytes), where the residual stream above it is float32."""
    if not (setup.grad_ckpt and spec.arch.scaled_residuals):
        return 0
    return alloc_bytes(embedding_bytes(setup) * setup.tokens * spec.hidden)


def tied_embedding_grad(spec: ModelSpec, setup: TrainSetup) -> int:
    """Bytes of one gradient of a tied, trainable embedding weight (lm_head.weight is
    embed_tokens.weight; full fine-tuning), 0 otherwise: the parameter's dtype, as
    inventory.static_memory's gradients. The weight is used twice, so its AccumulateGrad node gets
    two gradients: lm_head's, made first in the backward and held in the node's input buffer, and
    embed_tokens', made last (embedding_dense_backward); the engine sums them before AccumulateGrad
    steals the sum into .grad (docs/autograd.md#gradient-accumulation)."""
    if not (spec.tied and setup.method == "full"):
        return 0
    return alloc_bytes(setup.compute_bytes * spec.vocab * spec.hidden)


def tied_sum_in_place(setup: TrainSetup) -> bool:
    """Whether the engine adds the embedding's gradient into lm_head's buffered one in place
    (input_buffer.cpp accumulate, can_accumulate_inplace): it does when lm_head's gradient is a
    tensor of its own, under autocast over float32 weights (ToCopyBackward0's float32 copy of the
    16-bit gradient) and with TRL's chunked loss (ChunkedLogProbFunction returns the weight
    gradient it accumulated over the tiles); with transformers' loss and no autocast it is
    TBackward0's view of mm's result, whose storage the base shares, and the sum is a new tensor
    (docs/autograd.md#gradient-accumulation)."""
    return setup.amp_over_fp32 or setup.loss == "chunked"


def eager_masks(spec: ModelSpec, setup: TrainSetup) -> int:
    """Bytes of the causal masks transformers materializes (masking_utils create_causal_mask):
    eager attention gets (batch, 1, seq, seq) in the compute dtype, Gemma2 a sliding-window one
    beside the full one; SDPA gets none for an unpadded causal batch (is_causal), but a boolean
    one when the sequence is as long as a sliding window or longer: (1, 1, seq, seq), which SDPA
    broadcasts over the batch (mask_plan); Llama 4's chunked one, (batch, 1, seq, seq)."""
    cells = mask_cells(spec, setup)
    if setup.attn != "eager":
        if not windowed(spec, setup):
            return 0
        return cells["mask_bool"] if mask_plan(spec, setup) == ("sliding",) else alloc_bytes(setup.batch * setup.seq * setup.seq)
    # one mask per attention type present (Gemma2Model / Gemma3TextModel causal_mask_mapping), or
    # per type the model always builds (Llama4TextModel: full and chunked, Architecture.mask_types)
    count = len(set(spec.layer_types) | set(spec.arch.mask_types)) or 1
    return count * cells["mask_add"]


def mask_cells(spec: ModelSpec, setup: TrainSetup) -> dict:
    """Bytes of mask_build's tensors: a (1, 1, seq, seq) boolean condition, and eager attention's
    additive mask over the batch in the compute dtype."""
    return {"mask_bool": alloc_bytes(setup.seq * setup.seq),
            "mask_add": alloc_bytes(act_bytes(spec, setup) * setup.batch * setup.seq * setup.seq)}


def mask_plan(spec: ModelSpec, setup: TrainSetup) -> tuple[str, ...]:
    """The masks transformers 5.23 builds before the decoder layers, in order (masking_utils;
    the full causal one first, as Gemma3TextModel's causal_mask_mapping): "full" and "sliding" are
    built op by op by `mask_build`; "plain" (Llama 4's chunked masks) is one allocation of
    eager_masks' bytes. Empty: none (SDPA passes is_causal)."""
    if spec.arch.mask_types or spec.attention_chunk is not None:
        return ("plain",) if setup.attn == "eager" or windowed(spec, setup) else ()
    kinds = set(spec.layer_types) or {"full_attention"}
    if setup.attn != "eager":
        return ("sliding",) if _sliding(spec, setup) else ()
    return tuple(k for k, name in (("full", "full_attention"), ("sliding", "sliding_attention")) if name in kinds)


def mask_build(kind: str, eager: bool) -> tuple:
    """How `kind`'s mask is made: ("new", name, cell) / ("drop", name) steps, the mask kept is
    "mask". Each condition of the mask function is a (1, 1, seq, seq) boolean (masking_utils
    sdpa_mask over broadcast index tensors): the full causal one `kv_idx <= q_idx` (le); a
    sliding window's and_masks(sliding_window_overlay, causal) `gt`, its `bitwise_and`, then the
    causal `le` and the second `bitwise_and`. Eager attention gets `torch.where(mask, 0.0,
    min_dtype)` over the batch in the compute dtype (masking_utils eager_mask), the boolean freed."""
    if kind == "full":
        steps = [("new", "bool", "mask_bool")]
    else:
        steps = [("new", "gt", "mask_bool"), ("new", "and1", "mask_bool"), ("drop", "gt"),
                 ("new", "le", "mask_bool"), ("new", "bool", "mask_bool"), ("drop", "le"), ("drop", "and1")]
    if eager:
        steps += [("new", "mask", "mask_add"), ("drop", "bool")]
    else:
        steps = [(op, "mask" if name == "bool" else name, *rest) for op, name, *rest in steps]
    return tuple(steps)


def rope_build(spec: ModelSpec) -> tuple:
    """How one rotary embedding's tables are made (LlamaRotaryEmbedding.forward, transformers
    5.23), mask_build's steps: `freqs` (float32, half the width), `emb = cat((freqs, freqs))`,
    `emb.cos() * attention_scaling` (the cos freed once scaled), the same for sin, then
    `cos.to(x.dtype)` and `sin.to(x.dtype)`; the locals go as it returns. With float32 tables
    (Architecture.rope_float32) the scaled products are the tables. Empty for gpt-oss's
    half-width and Llama 4's complex tables (made as their final tensors only)."""
    if spec.arch.rope_half or spec.arch.rope_complex:
        return ()
    steps = [("new", "freqs", "rope_half32"), ("new", "emb", "rope_full32"),
             ("new", "c", "rope_full32"), ("new", "cos", "rope_full32"), ("drop", "c"),
             ("new", "s", "rope_full32"), ("new", "sin", "rope_full32"), ("drop", "s")]
    if spec.arch.rope_float32:
        return tuple(steps + [("drop", "freqs"), ("drop", "emb")])
    return tuple(steps + [("new", "table_cos", None), ("new", "table_sin", None),
                          ("drop", "freqs"), ("drop", "emb"), ("drop", "cos"), ("drop", "sin")])


def rope_cells(spec: ModelSpec, setup: TrainSetup) -> dict:
    """Bytes of rope_build's float32 tensors: the frequencies (half the width) and a full-width table."""
    return {"rope_half32": alloc_bytes(FP32 * setup.seq * (rope_width(spec) // 2)),
            "rope_full32": alloc_bytes(FP32 * setup.seq * rope_width(spec))}


def rope_tables(spec: ModelSpec, setup: TrainSetup) -> list[int]:
    """Bytes of the rotary tables the model computes once per forward and every layer reads:
    cos and sin of (1, seq, width) in the hidden-state dtype per rotary embedding
    (LlamaRotaryEmbedding.forward), or Llama 4's one complex64 freqs_cis of (1, seq, head_dim / 2)
    (Llama4TextRotaryEmbedding.forward: torch.polar of float32 frequencies)."""
    if spec.arch.rope_complex:
        return [alloc_bytes(8 * setup.seq * (spec.head_dim // 2))]
    table = FP32 if spec.arch.rope_float32 else act_bytes(spec, setup)   # Architecture.rope_float32
    return [alloc_bytes(table * setup.seq * rope_width(spec))] * (2 * rope_kinds(spec))


def layer_ops(spec: ModelSpec, setup: TrainSetup, b: "_Ops | None" = None) -> tuple[list[Op], int]:
    """The ops of one decoder layer, input "x", output "layer.out"; and the largest dequantized
    weight among them (bytes)."""
    b = b or _Ops(spec, setup)
    # DeepSeek-V3: a dense layer's MLP or a MoE layer's shared experts (core/_models.py Linear.where)
    lins = {l.leaf: l for l in spec.layer_linears if l.where in ("all", "dense" if b.dense else "moe")}
    # q and k as RoPE reads them, (b, heads, s, head_dim) views whose gradient the view's backward
    # copies (_Ops.heads); where attention() applies transformers' apply_rotary_pos_emb
    rope_here = b.use_rope and not spec.mla and not spec.arch.rope_complex

    # v likewise where the kernel hands back its gradient as (b, heads, s, head_dim) (eager's and the
    # math kernel's bmm, repeat_kv's sum: with a mask SDPA gets k and v repeated to every head, and
    # the sum over a repeat is contiguous, except over one KV head, whose view folds the size-1 dim);
    # flash and memory-efficient attention lay dv out as v is
    repeated = b.window and 1 < spec.kv_heads < spec.heads
    v_copied = not spec.mla and not spec.arch.rope_complex and (
        setup.attn == "eager" or repeated or sdpa_backend(spec, setup, b.window, b.arch) == cuda_sdpa.MATH)

    def per_head(x: str, which: str) -> str:
        if not (v_copied if which == "v" else rope_here):
            return x
        return b.heads(x, (spec.heads if which == "q" else spec.kv_heads) * spec.head_dim, f"attn.{which}")
    # OLMo 2 normalizes block outputs, not inputs: attention reads the residual stream itself
    n1 = "x" if spec.arch.norm_placement == "post" else b.norm("input_layernorm", "x")
    if spec.mla:
        attn, locals_ = b.mla_attention(n1, lins)
    elif spec.arch.fused_qkv:
        # Phi3Attention.forward: qkv_proj's output sliced into q, k, v (views, each slice's
        # gradient a zero-filled tensor of qkv's width), then the three `.view(hidden_shape)
        # .transpose(1, 2)`; v stays a view, so saving it keeps all of qkv
        qkv = b.linear(lins["qkv_proj"], n1)
        width = lins["qkv_proj"].out_features
        qs, ks, vs = (b.slice_view(qkv, width, f"attn.{w}") for w in "qkv")
        qn, kn = per_head(qs, "q"), per_head(ks, "k")
        vn = v_storage = per_head(vs, "v")
    elif spec.arch.qk_norm == "head" and spec.arch.norm_style == "llama":
        # Qwen3Attention.forward: q_norm(q_proj(x).view(..., H, hd)), then k_norm(k_proj(x)), then v_proj
        qn = b.norm("self_attn.q_norm", per_head(b.linear(lins["q_proj"], n1), "q"), spec.head_dim, spec.heads)
        kn = b.norm("self_attn.k_norm", per_head(b.linear(lins["k_proj"], n1), "k"), spec.head_dim, spec.kv_heads)
        vn = v_storage = b.linear(lins["v_proj"], n1)
        vn = per_head(vn, "v")
    elif spec.arch.rope_complex:
        # Llama4TextAttention.forward: RoPE, then the L2 q/k norm or the temperature (estimate/_llama4.py)
        qn, kn, vn, extra_locals = llama4.attention_inputs(b, lins, n1)
        v_storage = vn
    elif spec.arch.qk_norm == "projection":
        # Olmo2Attention.forward: q_norm(q_proj(x)), k_norm(k_proj(x)) over the whole width, v_proj
        qn = b.norm("self_attn.q_norm", b.linear(lins["q_proj"], n1), spec.heads * spec.head_dim)
        kn = b.norm("self_attn.k_norm", b.linear(lins["k_proj"], n1), spec.kv_heads * spec.head_dim)
        vn = v_storage = b.linear(lins["v_proj"], n1)
        # then the three `.view(hidden_shape).transpose(1, 2)`
        qn, kn, vn = per_head(qn, "q"), per_head(kn, "k"), per_head(vn, "v")
    else:
        # `self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)`, then k, then v
        qn = per_head(b.linear(lins["q_proj"], n1), "q")
        kn = per_head(b.linear(lins["k_proj"], n1), "k")
        v_storage = b.linear(lins["v_proj"], n1)
        vn = per_head(v_storage, "v")
        if spec.arch.qk_norm == "head":
            # Gemma3Attention.forward: all three projections first, then q_norm and k_norm per head
            qn = b.norm("self_attn.q_norm", qn, spec.head_dim, spec.heads)
            kn = b.norm("self_attn.k_norm", kn, spec.head_dim, spec.kv_heads)
    if not spec.mla:
        attn = b.attention(qn, kn, vn, v_storage, rope_applied=spec.arch.rope_complex)
    o = b.linear(lins["o_proj"], attn)
    # Python keeps the o_proj input (a local) alive until `attn_output = self.o_proj(attn_output)`
    # rebinds it, the rotated `query_states` / `key_states`, the `value_states` and, for eager
    # attention, the returned `attn_weights` until self_attn returns (its frame's locals go in
    # order), and the attention's input until the decoder layer's `hidden_states, _ =
    # self.self_attn(hidden_states=hidden_states, ...)` rebinds it after the return; saved or not
    # (transformers models/llama/modeling_llama.py LlamaAttention.forward / LlamaDecoderLayer.forward;
    # docs/peft-transformers.md#attention-locals)
    made = {t.name for op in b.ops for t in op.outputs}
    if spec.arch.rope_complex:   # query_states / key_states as the kernel got them
        locals_ = [attn, qn, kn, v_storage, *extra_locals]
    elif not spec.mla:
        rot = ("attn.q.rotp", "attn.k.rotp") if spec.arch.rope_pass_cat else ("attn.q.rot", "attn.k.rot")
        locals_ = [attn, *(rot if b.use_rope else (qn, kn)), v_storage]
    # the returned attn_weights: Llama's cast of the float32 softmax, Llama 4's softmax output
    if spec.arch.eager_softmax_fp32:
        probs = "attn.p" if b.a != FP32 else "attn.p32"
    else:
        probs = "attn.p32" if "attn.p32" in made else "attn.p"
    if setup.attn == "eager":
        locals_.append(probs)
    locals_.append(n1)
    b.op("self_attn.return", [name for name in locals_ if name in made or name == n1])
    if setup.attn == "eager" and probs in made and spec.arch.moe_style != "llama4" and not spec.arch.sinks:
        # the decoder layer's `hidden_states, _ = self.self_attn(...)` keeps the returned attention
        # weights in `_` until the layer returns (transformers models/llama/modeling_llama.py
        # LlamaDecoderLayer.forward, and every other family's decoder layer the catalog holds);
        # Llama 4 and gpt-oss rebind or keep it their own way (below)
        b.layer_locals.append(probs)
    if spec.arch.norm_placement == "sandwich":
        o = b.norm("post_attention_layernorm", o)
        h1 = b.residual("res1", "x", o)
        m = b.mlp(b.norm("pre_feedforward_layernorm", h1), lins)
        m = b.norm("post_feedforward_layernorm", m)
    elif spec.arch.norm_placement == "post":
        # Olmo2DecoderLayer.forward: h = x + post_attention_layernorm(self_attn(x));
        # out = h + post_feedforward_layernorm(mlp(h))
        h1 = b.residual("res1", "x", b.norm("post_attention_layernorm", o))
        m = b.norm("post_feedforward_layernorm", b.mlp(h1, lins))
    else:
        h1 = b.residual("res1", "x", o)
        n2 = b.norm("post_attention_layernorm", h1)
        if spec.num_experts and not b.dense:
            m = b.moe(n2, lins)
            if spec.shared_intermediate:
                # DeepseekV3MoE.forward: experts(x) + shared_experts(residuals), a new tensor
                shared = b.mlp(n2, lins)
                b.op("moe.shared_add", [m, shared], [b.t("moe.total", b.a * b.T * spec.hidden)],
                     grads=((m, 0), (shared, 0)))
                m = "moe.total"
        else:
            m = b.mlp(n2, lins)
    if spec.arch.moe_style == "llama4":
        # Llama4TextDecoderLayer.forward: `attention_states, _ = self.self_attn(...)` names the
        # attention output until the layer returns (the residual add binds `hidden_states`), and
        # `_` the (eager) attention weights until `hidden_states, _ = hidden_states` rebinds it to
        # the router logits (MoE layers) or the layer returns (dense layers); Llama4TextModel's
        # loop (`hidden_states = decoder_layer(hidden_states, ...)`) holds the layer input until then
        if setup.attn == "eager":
            if spec.num_experts and not b.dense:
                b.op("feed_forward.unpack", [probs])
            else:
                b.layer_locals.append(probs)
        b.layer_locals += [o, "x"]
    if spec.arch.scaled_residuals:
        # (the product a temporary of the sum, the unscaled output held until `hidden_states` is rebound)
        b.op("res2.scale", [m], [b.t("res2.y", b.a * b.T * spec.hidden)], grads=((m, b.a * b.T * spec.hidden),))
        b.add("layer", h1, "res2.y", held=(m,))
    else:
        b.add("layer", h1, m)
    if "x" not in b.layer_locals:
        # the model's loop (`hidden_states = decoder_layer(hidden_states, ...)`, LlamaModel.forward
        # and every family's) holds the layer's input until the layer returns
        b.layer_locals.append("x")
    b.op("layer.return", b.layer_locals)
    if spec.arch.sinks:
        # GptOssDecoderLayer.forward: `hidden_states, _ = self.self_attn(...)` keeps the returned
        # attention weights (a view of the softmax output) until the layer returns; GptOssModel's
        # loop (`hidden_states = decoder_layer(hidden_states, ...)`) holds the layer input until then
        b.op("layer.return", ["attn.p", "x"])
    return b.ops, b.dequant


def head_ops(spec: ModelSpec, setup: TrainSetup, b: "_Ops | None" = None) -> list[Op]:
    """Final norm, lm_head and transformers' ForCausalLMLoss (loss/loss_utils.py): logits in the
    lm_head dtype -> logits.float() -> cross_entropy = log_softmax (saved) + nll_loss. Gemma2
    soft-caps the logits first (tanh saved). Input "x", output "loss"."""
    b = b or _Ops(spec, setup)
    n = b.norm("norm", "x")
    b.tag = LOGITS
    if setup.loss == "chunked":
        return chunked_head_ops(spec, setup, b, n)
    T, V = b.T, spec.vocab
    lb = b.c                       # lm_head runs in the hidden-state dtype, or autocast's
    logits = b.linear(spec.lm_head, n) if "lm_head" in b.adapted or setup.method == "full" else None
    if logits is None and lb != b.a:
        # autocast over a float32 hidden state and prepare_model_for_kbit_training's float32
        # lm_head: F.linear casts the input and the frozen weight (not cached: it does not require
        # grad), and keeps the weight's cast for the input gradient until the head's backward.
        # After qlora.py's recast the weight is bf16 already: only the input is cast.
        h = spec.hidden
        b.op("lm_head.x16", [n], [b.t("lm_head.x16", lb * T * h)], grads=((n, b.a * T * h),))
        weight = []
        if embedding_bytes(setup) != lb:
            b.op("lm_head.w16", [], [b.t("lm_head.w16", lb * V * h)])
            weight = ["lm_head.w16"]
        b.op("lm_head", ["lm_head.x16", *weight], [b.t("logits", lb * T * V)], saves=tuple(weight), blas=BLAS,
             grads=(("lm_head.x16", lb * T * h),), view_grads=("lm_head.x16",))
        logits = "logits"
    elif logits is None:
        b.op("lm_head", [n], [b.t("logits", lb * T * V)], grads=((n, b.a * T * spec.hidden),), blas=BLAS,
             view_grads=(n,))
        logits = "logits"
    if spec.arch.scaled_logits:    # Granite: logits / logits_scaling, a new tensor
        b.op("logits_scale", [logits], [b.t("logits_s", lb * T * V)], grads=((logits, lb * T * V),))
        logits = "logits_s"
    if spec.final_logit_softcap:   # logits / cap; tanh (saves output); * cap
        b.op("cap_div", [logits], [b.t("cap1", lb * T * V)], grads=((logits, lb * T * V),))
        b.op("cap_tanh", ["cap1"], [b.t("cap2", lb * T * V)], saves=("cap2",), grads=(("cap1", lb * T * V),))
        b.op("cap_mul", ["cap2"], [b.t("cap3", lb * T * V)], grads=(("cap2", lb * T * V),))
        logits = "cap3"
    out_logits = logits   # what CausalLMOutput.logits holds
    if lb != FP32:
        b.op("float", [logits], [b.t("logits32", FP32 * T * V)], grads=((logits, lb * T * V),))
        logits = "logits32"
    b.op("log_softmax", [logits], [b.t("logp", FP32 * T * V)], saves=("logp",), grads=((logits, FP32 * T * V),))
    b.op("nll_loss", ["logp"], [b.t("loss", 4)], grads=(("logp", FP32 * T * V),))
    # The CausalLM forward holds `outputs.last_hidden_state` (the normed hidden state) and
    # `logits` (lm_head's output, soft-capped) until it returns them in CausalLMOutputWithPast,
    # so both are alive through the loss; `model(...).loss` then drops the output object
    # (transformers models/llama/modeling_llama.py LlamaForCausalLM.forward; docs/peft-transformers.md#causal-lm-head-lifetimes)
    b.op("forward.return", [n, out_logits])
    if setup.autocast and setup.loop == "trainer" and lb != FP32:
        # accelerate wraps the autocast forward in convert_outputs_to_fp32 (accelerate/utils/operations.py
        # ConvertOutputsToFp32): a float32 copy of the 16-bit logits, dropped with `outputs` before backward
        b.op("outputs_fp32", [out_logits], [b.t("logits_out32", FP32 * T * V)])
    b.held = (out_logits,) if setup.holds_outputs else ()
    return b.ops


def chunked_head_ops(spec: ModelSpec, setup: TrainSetup, b: "_Ops", n: str) -> list[Op]:
    """TRL's fused lm_head + chunked NLL (trl/trainer/utils.py add_fused_lm_head `_fused_forward`,
    trl/kernels/chunked_logprob.py ChunkedLogProbFunction, TRL 1.16; docs/recipes.md#trl-chunked-loss),
    on CUDA (Triton folds each tile in place, compact=True):
    hidden[:, :-1][mask] copies the N = b * (s - 1) labelled rows; the forward keeps seven float32
    N-vectors of online-logsumexp statistics and one (min(N, 4096), 32768) tile buffer in the
    compute dtype; it saves hidden rows, targets, log_z and entropy; masked_scatter puts log-probs
    back on (b, s - 1). Backward: a float32 N x hidden gradient (zeros, addmm with out_dtype
    float32; with full fine-tuning a float32 vocab x hidden one after it), the tile buffer again,
    then `grad_hidden.to(hidden.dtype)` as it returns, while those locals live (walk.Op.bwd_held);
    index and slice backward scatter it into zeros of (b, s - 1, h) and (b, s, h)."""
    if "lm_head" in b.adapted:
        from vramplan.core._errors import UsageError
        raise UsageError("--loss chunked (TRL's fused lm_head) reads lm_head.weight directly: a LoRA on "
                         "lm_head would not train", hint="drop lm_head from --targets, or use --loss full")
    a, h, V = b.a, spec.hidden, spec.vocab
    N = sym.B * sym.S + sym.B * -1
    cd = 2 if setup.autocast else a            # autocast dtype, else the hidden state's (compute_dtype)
    tile = alloc(cd * sym.NT * TRL_VOCAB_CHUNK)
    vec = alloc(FP32 * N)
    b.op("fused.mask", [], [b.t("fused.mask", N)])                       # labels[:, 1:] != -100
    b.op("fused.slice", [n], [b.t("fused.hs", 0)], grads=((n, a * b.T * h),))   # [:, :-1] view
    b.op("fused.index", ["fused.hs", "fused.mask"], [b.t("fused.hc", a * N * h)], saves=("fused.mask",),
         grads=(("fused.hs", a * N * h),))
    b.op("fused.targets", ["fused.mask"], [b.t("fused.tg", 8 * N)])     # labels[mask]
    full = setup.method == "full"
    b.op("fused.logprob", ["fused.hc", "fused.tg"],
         [b.t("fused.logz", FP32 * N), b.t("fused.lp", FP32 * N), b.t("fused.ent", FP32 * N),
          b.t("fused.top1", N)],
         saves=("fused.hc", "fused.tg", "fused.logz", "fused.ent"), grads=(("fused.hc", a * N * h),),
         work=7 * vec + tile + 2 * alloc(N), work_tag=ACT,
         bwd_held=(alloc(FP32 * N * h),) + ((alloc(FP32 * V * h),) if full else ()) + (tile,), blas=BWD_BLAS,
         param_grads=alloc(a * V * h) if full else 0)
    # (None if x is None else x.new_zeros(mask.shape).masked_scatter(mask, x)): zeros, then the result
    b.op("fused.scatter_lp", ["fused.lp", "fused.mask"], [b.t("fused.lpf", FP32 * N)], saves=("fused.mask",),
         grads=(("fused.lp", FP32 * N),), work=vec, work_tag=ACT)
    b.op("fused.scatter_ent", ["fused.ent", "fused.mask"], [b.t("fused.entf", FP32 * N)], work=vec, work_tag=ACT)
    b.op("fused.scatter_top1", ["fused.top1", "fused.mask"], [b.t("fused.top1f", N)], work=alloc(N), work_tag=ACT)
    # SFTTrainer.compute_loss: per_token_loss = -outputs.log_probs; its sum over the labelled tokens
    b.op("fused.neg", ["fused.lpf"], [b.t("fused.nll", FP32 * N)], grads=(("fused.lpf", FP32 * N),))
    b.op("fused.sum", ["fused.nll"], [b.t("loss", 4)], grads=(("fused.nll", FP32 * N),))
    b.op("fused.return", [n, "fused.entf", "fused.top1f"])   # backbone_outputs live until _fused_forward returns
    b.held = ("fused.lpf", "fused.entf") if setup.holds_outputs else ()
    return b.ops


TRL_VOCAB_CHUNK = 32768   # trl/trainer/utils.py _CHUNKED_LOGPROB_CHUNK_SIZE: the tile buffer's columns


@record
class LayerMemory:
    """One decoder layer's walk (forward, then backward). It counts the layer input "x" while it
    lives; the caller adds what is alive around the layer. Under gradient checkpointing the input
    is kept by the checkpoint (torch.utils.checkpoint saves the function's inputs) and nothing
    else is saved in the first forward; backward recomputes the forward with saving.

    `first` is the bottom layer: without checkpointing nothing makes the embedding output require
    a gradient (peft and transformers call enable_input_require_grads only for gradient
    checkpointing), so the first layer saves nothing on behalf of its input; with checkpointing
    it is like every other layer."""
    walk: WalkResult
    first: WalkResult
    saved: int               # bytes one layer leaves alive for backward (its input under ckpt)
    first_saved: int
    hidden: int              # one hidden state (the layer input / output)
    dequant: int             # largest dequantized weight


@record
class HeadMemory:
    """The head's walk (final norm, lm_head, loss): its forward and backward, and what the forward
    leaves saved for backward."""
    forward: WalkResult
    backward: WalkResult
    saved: int


def decisions(spec: ModelSpec, setup: TrainSetup, arch: CudaArch = ASSUMED, window: bool | None = None,
              rope: bool = True, dense: bool = False) -> tuple[frozenset, bool, bool, bool, bool, bool]:
    """The choices the actual batch x seq make: which 4-bit matmuls run bitsandbytes' fused
    kernel on `arch` (no dequantized weight in forward), whether a sliding window forces a mask
    (`window`: for one layer kind; by default whether any layer's does), whether eager
    attention reads one KV head through views (multi-query with a single sequence), whether
    the layer applies RoPE (`rope`), whether it is one of the dense layers among the MoE ones
    (`dense`: DeepSeek-V3's first_k_dense_replace, Llama 4's moe_layers), and whether the batch
    is a single sequence (a size-1 batch dim folds into any view: matmul's reshape of a
    transposed q copies only for batch > 1)."""
    # Linear4bit.forward casts its input to the compute dtype before matmul_4bit (bitsandbytes
    # 0.50 nn/modules.py: `x = x.to(self.compute_dtype)`), so the kernel sees setup.dtype even where
    # prepare_model_for_kbit_training leaves the hidden states in float32
    fused = frozenset(l.name for l in spec.layer_linears
                      if setup.quantized and setup.quant != "int8"
                      and gemm_4bit_fused(setup.tokens, l.out_features, l.in_features, setup.dtype, arch))
    single = setup.batch == 1
    kv_view = spec.kv_heads == 1 and spec.heads > 1 and single
    return fused, windowed(spec, setup) if window is None else window, kv_view, rope, dense, single


def kernels(spec: ModelSpec, setup: TrainSetup, arch: CudaArch = ASSUMED) -> dict:
    """The CUDA kernels the estimate assumes on `arch`, for output and JSON."""
    fused = decisions(spec, setup, arch)[0]
    if setup.attn == "sdpa":
        kinds = sorted(set(layer_windows(spec, setup)))
        backends = {w: sdpa_backend(spec, setup, w, arch) for w in kinds}
        if len(set(backends.values())) == 1:
            sdpa = f"{next(iter(backends.values()))} (every layer)"
        else:
            local = "chunked-attention" if spec.attention_chunk else "sliding-window"
            sdpa = ", ".join(f"{b} ({local if w else 'global'} layers)" for w, b in backends.items())
    else:
        sdpa = "eager attention (no SDPA)"
    out = {"gpu_arch": arch.to_dict(), "sdpa": sdpa, "cublas_workspace_bytes": cuda_cublas.workspace_bytes(arch)}
    if setup.quantized and setup.quant != "int8":
        names = sorted(l.leaf for l in spec.layer_linears)
        fused_leaves = sorted({l.leaf for l in spec.layer_linears if l.name in fused})
        out["gemm_4bit"] = ("fused 4-bit kernel for " + ", ".join(fused_leaves) if fused_leaves else
                            "dequantize + F.linear for every 4-bit matmul") + \
            ("; dequantize + F.linear for the rest" if fused_leaves and len(fused_leaves) < len(set(names)) else "")
    return out


def _structure(spec: ModelSpec, setup: TrainSetup, arch: CudaArch = ASSUMED, window: bool | None = None,
               rope: bool = True, dense: bool = False) -> tuple:
    """What, besides the sizes, decides a walk: the setup without batch/seq (and without the
    optimizer, which acts after backward), the decisions, and the GPU whose kernels run."""
    return (setup.with_(batch=1, seq=1, optimizer="adamw", grad_accum=1), decisions(spec, setup, arch, window, rope, dense),
            sdpa_backend(spec, setup, window, arch), arch)


@lru_cache(maxsize=1024)
def held_embeddings(spec: ModelSpec, setup: TrainSetup, arch: CudaArch = ASSUMED) -> int:
    """Bytes of the embedding output the base model's local `inputs_embeds` holds until it returns,
    after the final norm (LlamaModel.forward, every family's), where the first decoder layer would
    otherwise free it in its forward (without checkpointing, nothing saves a layer's input); 0 where
    the first layer keeps it anyway (checkpointing saves it until that layer's backward)."""
    if spec.layers < 2:
        return 0
    first = _layer_tapes(spec, _structure(spec, setup, arch, *layer_kinds(spec, setup)[0]))[1]
    forward = first.events[:first.events.index((2,))] if (2,) in first.events else first.events
    if (-1, first.names["x"]) not in forward:
        return 0
    return alloc_bytes(embedding_bytes(setup) * setup.tokens * spec.hidden)


@lru_cache(maxsize=256)
def _layer_tapes(spec: ModelSpec, structure: tuple) -> tuple[Tape, Tape, int]:
    setup, decided, _, arch = structure
    hidden = alloc(act_bytes(spec, setup) * sym.B * sym.S * spec.hidden)
    ckpt = setup.grad_ckpt
    keep = ("x",) if ckpt else ()   # the checkpoint holds the layer input until its backward

    built: dict = {}    # input bytes -> (ops, autocast cache, dequant): one op list per input dtype

    def run(needs: frozenset, x_bytes: int) -> tuple[Tape, int]:
        """The walk of one layer whose input "x" has x_bytes per element; its output is always
        a hidden state of the stream's dtype."""
        if x_bytes not in built:
            b = _Ops(spec, setup, decided=decided, arch=arch)
            if x_bytes != act_bytes(spec, setup):
                b.bytes_of["x"] = x_bytes
            ops, dequant = layer_ops(spec, setup, b)
            built[x_bytes] = ops, b.cached, b.grad_only, dequant
        ops, cached, grad_only, dequant = built[x_bytes]
        return walk(ops, {"x": alloc(x_bytes * sym.B * sym.S * spec.hidden)}, keep=keep, save=not ckpt,
                    backward=True, grad_of={"layer.out": hidden}, needs_grad=needs, cached=cached,
                    reentrant=setup.reentrant_ckpt, grad_only=grad_only), dequant

    inner, dequant = run(frozenset({"x"}), act_bytes(spec, setup))
    # the bottom layer reads the embedding output: 16-bit after qlora.py's recast while the hidden
    # states above it are float32 (norm copies, a 16-bit first residual), so it gets its own walk;
    # without checkpointing its input needs no gradient (the embedding is frozen)
    x0 = embedding_bytes(setup)
    if x0 == act_bytes(spec, setup) and ckpt:
        return inner, inner, dequant
    return inner, run(frozenset({"x"}) if ckpt else frozenset(), x0)[0], dequant


@lru_cache(maxsize=256)
def _head_tape(spec: ModelSpec, structure: tuple) -> Tape:
    setup, decided, _, arch = structure
    hidden = alloc(act_bytes(spec, setup) * sym.B * sym.S * spec.hidden)
    b = _Ops(spec, setup, decided=decided, arch=arch)
    ops = head_ops(spec, setup, b)
    return walk(ops, {"x": hidden}, backward=True, keep=b.held, cached=b.cached,
                grad_of={"loss": alloc(4)}, needs_grad=frozenset({"x"}))


def held_outputs(spec: ModelSpec, setup: TrainSetup) -> int:
    """Bytes of the model outputs a plain loop (`out = model(**batch); out.loss.backward()`) keeps
    alive from the end of the forward through the whole backward: out.logits (or TRL's per-token
    outputs with the chunked loss). The trainer loops keep only the loss."""
    if not setup.holds_outputs:
        return 0
    if setup.loss == "chunked":
        return 2 * alloc_bytes(FP32 * setup.batch * (setup.seq - 1))
    logits = DTYPES[setup.amp] if setup.autocast else act_bytes(spec, setup)
    return alloc_bytes(logits * setup.tokens * spec.vocab)


def held_graph_leaf(spec: ModelSpec, setup: TrainSetup) -> int:
    """Bytes a loop that keeps `out` also keeps through its graph: under checkpointing with a frozen
    embedding, enable_input_require_grads (transformers modeling_utils) makes the embedding output
    a leaf that requires grad; `out.logits.grad_fn` reaches its AccumulateGrad node, which holds
    the leaf, and the leaf holds the `.grad` backward accumulated into it (the same size), until
    `out` goes. The leaf is the first layer's input, or Granite's raw embedding output
    (embedding_leaf), which the graph alone holds past the backward."""
    if not (setup.holds_outputs and setup.grad_ckpt and setup.method != "full"):
        return 0
    if spec.arch.scaled_residuals:
        return 2 * embedding_leaf(spec, setup)
    return 2 * alloc_bytes(embedding_bytes(setup) * setup.tokens * spec.hidden)


def autocast_cache(spec: ModelSpec, setup: TrainSetup) -> int:
    """Bytes of one decoder layer's adapter weight casts that autocast's cache keeps from the
    layer's (non-saving, checkpointed) forward to the end of the forward region
    (autocast_mode.cpp cached_cast; docs/autograd.md#autocast-weight-cache). Without
    checkpointing the linears save them anyway, which the walk counts."""
    if not (setup.autocast and setup.grad_ckpt) or setup.adapters_16bit:
        return 0      # (bf16 adapter weights are not cast, nothing is cached)
    c, r = DTYPES[setup.amp], setup.rank
    if setup.method == "full":
        # autocast over float32 weights (amp_over_fp32): every trainable layer weight and bias is
        # cached; with 16-bit weights nothing is cast
        if not setup.amp_over_fp32:
            return 0
        return sum(alloc_bytes(c * l.out_features * l.in_features) + (alloc_bytes(c * l.out_features) if l.bias else 0)
                   for l in spec.layer_linears)
    return sum(alloc_bytes(c * r * l.in_features) + alloc_bytes(c * l.out_features * r)
               for l in adapted_linears(spec, setup) if l.name != "lm_head")


@lru_cache(maxsize=512)
def layer_stack(spec: ModelSpec, setup: TrainSetup, arch: CudaArch = ASSUMED,
                accumulating: bool = False) -> tuple[LayerMemory, ...]:
    """Every decoder layer's walk, bottom to top: layers of one kind share one LayerMemory
    object (a sliding-window layer and a global one differ once the window is shorter than the
    sequence: mask, repeated k/v, kernel). `accumulating`: in a micro-step after the first
    (walk.accumulating)."""
    kinds = layer_kinds(spec, setup)
    memory = {kind: _layer_memory(spec, setup, arch, *kind, accumulating=accumulating) for kind in set(kinds)}
    return tuple(memory[kind] for kind in kinds)


def layer_kinds(spec: ModelSpec, setup: TrainSetup) -> tuple[tuple, ...]:
    """Per decoder layer, bottom to top, what tells its walk apart: the sliding-window mask, RoPE
    (SmolLM3: some layers without), and, below DeepSeek-V3's first_k_dense_replace, a dense MLP
    instead of the MoE block."""
    ropes = spec.rope_layers or (True,) * spec.layers
    kinds = tuple(zip(layer_windows(spec, setup), ropes))
    if spec.dense_layers:   # DeepSeek-V3's first layers, Llama 4's moe_layers (ModelSpec.is_dense)
        kinds = tuple((*kind, spec.is_dense(i)) for i, kind in enumerate(kinds))
    return kinds


def layer_memory(spec: ModelSpec, setup: TrainSetup, arch: CudaArch = ASSUMED, window: bool | None = None,
                 rope: bool = True, dense: bool = False) -> LayerMemory:
    """The recorded walk (cached per structure) replayed for this batch x seq on `arch`; `window`:
    the layer kind (sliding-window mask or not), by default whether any layer has the mask."""
    return _layer_memory(spec, setup, arch, windowed(spec, setup) if window is None else window, rope, dense)


@lru_cache(maxsize=512)
def _layer_memory(spec: ModelSpec, setup: TrainSetup, arch: CudaArch, window: bool, rope: bool,
                  dense: bool = False, accumulating: bool = False) -> LayerMemory:
    # one cache key however the arguments are passed: the estimate asks for the same layer twice
    # (layer_stack, estimator.transient_sizes)
    return _replayed_layer(spec, setup, arch, window, rope, dense, accumulating)


@lru_cache(maxsize=512)
def _replayed_layer(spec: ModelSpec, setup: TrainSetup, arch: CudaArch, window: bool, rope: bool,
                    dense: bool, accumulating: bool) -> LayerMemory:
    structure = _structure(spec, setup, arch, window, rope, dense)
    inner_tape, first_tape, dequant = _layer_tapes(spec, structure)
    if accumulating:
        same = first_tape is inner_tape
        inner_tape = accumulating_tape(inner_tape)
        first_tape = inner_tape if same else accumulating_tape(first_tape)
    values = variables(setup.batch, setup.seq)
    inner = inner_tape.replay(values)
    first = inner if first_tape is inner_tape else first_tape.replay(values)
    # what a finished layer leaves alive; its output is not counted: it is the next input
    return LayerMemory(walk=inner, first=first, saved=WalkResult.total(inner.forward_end),
                       first_saved=WalkResult.total(first.forward_end),
                       hidden=alloc_bytes(act_bytes(spec, setup) * setup.tokens * spec.hidden), dequant=dequant)


@lru_cache(maxsize=512)
def head_memory(spec: ModelSpec, setup: TrainSetup, arch: CudaArch = ASSUMED, accumulating: bool = False) -> HeadMemory:
    """`accumulating`: in a micro-step after the first (walk.accumulating)."""
    tape = _head_tape(spec, _structure(spec, setup, arch))
    both = (accumulating_tape(tape) if accumulating else tape).replay(variables(setup.batch, setup.seq))
    return HeadMemory(forward=both, backward=both, saved=WalkResult.total(both.forward_end))
