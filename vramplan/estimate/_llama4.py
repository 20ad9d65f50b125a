"""Llama 4's text decoder in the layer walk: what its attention does to q and k before the kernel,
and its MoE block. Read off transformers 5.23 models/llama4/modeling_llama4.py
(docs/architectures.md#llama4_text); the rest of the layer (norms, projections, kernel, residual
adds) is ops.layer_ops. Every function adds ops to an ops._Ops builder `b`.
"""
from __future__ import annotations

from vramplan.core._errors import UsageError
from vramplan.estimate import _symbolic as sym
from vramplan.estimate._inventory import FP32
from vramplan.estimate._symbolic import alloc
from vramplan.estimate._walk import ACT


def attention_inputs(b, lins: dict, n1: str) -> tuple[str, str, str, list]:
    """Llama4TextAttention.forward up to the kernel: q_proj, k_proj, v_proj; on RoPE layers
    apply_rotary_emb, then Llama4TextL2Norm on q and on k (config.use_qk_norm); on the others the
    attention temperature on q (config.attn_temperature_tuning). Returns q, k, v and the extra
    locals the attention keeps until it returns."""
    spec, setup = b.spec, b.setup
    if setup.quantized and setup.quant == "int8":
        # bitsandbytes keeps int8 matmul inputs on the autograd ctx (ops.int8_ctx_inputs); the
        # shared-expert and dense MLPs of Llama 4 take different ones
        raise UsageError(f"int8 base weights are not modelled for {spec.model_type} (its int8 matmul inputs "
                         "differ between the dense and the MoE layers)", hint="use --quant nf4 or fp4")
    q, k, v = (b.linear(lins[name], n1) for name in ("q_proj", "k_proj", "v_proj"))
    if b.use_rope:
        q, k = rotate(b, q, k)
        if spec.setting("use_qk_norm"):
            # one Llama4TextL2Norm module for both, per head over head_dim, no weight
            q = b.norm("self_attn.q_norm", q, spec.head_dim, spec.heads, weight=False)
            k = b.norm("self_attn.k_norm", k, spec.head_dim, spec.kv_heads, weight=False)
        return q, k, v, []
    if spec.setting("attn_temperature_tuning"):
        return temperature(b, q), k, v, ["attn.pos", "attn.scales"]
    return q, k, v, []


def rotate(b, q: str, k: str) -> tuple[str, str]:
    """apply_rotary_emb: xq.float() and xk.float() (copies unless float32 already) viewed as complex
    pairs, each multiplied by freqs_cis (a complex64 product: as many bytes as the float32 copy;
    the multiply saves only freqs_cis, a model input), viewed back as real, then type_as(xq) (a
    copy unless float32). Its locals (the float32 copies and the products) live until it
    returns. Backward per tensor: type_as's float32 gradient, the complex product's gradient
    (grad * freqs_cis.conj()), the cast back to the projection's dtype."""
    spec, a, T = b.spec, b.a, b.T
    widths = {"q": spec.heads * spec.head_dim, "k": spec.kv_heads * spec.head_dim}
    inputs = {"q": q, "k": k}
    copies, products, out = {}, {}, {}
    for tag, x in inputs.items():
        copies[tag] = x
        if a != FP32:
            copies[tag] = f"attn.{tag}.rope32"
            b.op(f"attn.{tag}.to32", [x], [b.t(copies[tag], FP32 * T * widths[tag])],
                 grads=((x, a * T * widths[tag]),))
    for tag in inputs:
        products[tag] = f"attn.{tag}.c"
        b.op(f"attn.{tag}.cmul", [copies[tag]], [b.t(products[tag], FP32 * T * widths[tag])],
             grads=((copies[tag], FP32 * T * widths[tag]),))
    for tag in inputs:
        out[tag] = products[tag]
        if a != FP32:
            out[tag] = f"attn.{tag}.rot"
            b.op(f"attn.{tag}.cast", [products[tag]], [b.t(out[tag], a * T * widths[tag])],
                 grads=((products[tag], FP32 * T * widths[tag]),))
    b.op("attn.rope_return", [*copies.values(), *products.values()])
    return out["q"], out["k"]


def temperature(b, q: str) -> str:
    """Llama4TextAttention.forward on no-RoPE layers: positions = arange(seq) (int64), attn_scales =
    log1p(floor((positions.float() + 1) / floor_scale)) * attn_scale + 1 (float32, a couple of
    seq-long temporaries at a time), then (query_states * attn_scales).to(query_states.dtype): a
    float32 product (the multiply saves attn_scales), cast back; q's gradient comes out float32
    and autograd casts it to q's dtype (validate_outputs). q itself lives until the cast's result
    is bound to its name."""
    a, T, w = b.a, b.T, b.spec.heads * b.spec.head_dim
    b.op("attn.positions", [], [b.t("attn.pos", 8 * sym.S)])
    b.op("attn.scales", ["attn.pos"], [b.t("attn.scales", FP32 * sym.S)], work=2 * alloc(FP32 * sym.S), work_tag=ACT)
    if a == FP32:   # the product is float32 already and .to() returns it
        b.op("attn.q.temp", [q, "attn.scales"], [b.t("attn.q.t", FP32 * T * w)], saves=("attn.scales",),
             grads=((q, FP32 * T * w),))
        return "attn.q.t"
    b.op("attn.q.promote", [q], [b.t("attn.q.p", 0)], grads=((q, a * T * w),))
    b.op("attn.q.temp", ["attn.q.p", "attn.scales"], [b.t("attn.q.t32", FP32 * T * w)], saves=("attn.scales",),
         grads=(("attn.q.p", FP32 * T * w),))
    b.op("attn.q.cast", ["attn.q.t32", q], [b.t("attn.q.t", a * T * w)], grads=(("attn.q.t32", FP32 * T * w),))
    return "attn.q.t"


def router(b, x: str) -> str:
    """Llama4Router.forward: logits = F.linear(x, weight) (a frozen 16-bit weight under LoRA, not an
    nn.Linear bitsandbytes replaces; full fine-tuning saves x for its gradient); topk over the
    experts (values and int64 indices; TopkBackward saves the indices and scatters into a
    (tokens, experts) zeros); full_like(logits, -inf).scatter_(1, indices, values): a (tokens,
    experts) tensor whose backward gathers the values' gradient (the indices saved); then
    sigmoid(scores.float()) (a float32 copy; the sigmoid saves its float32 output) and `.to(dtype)`
    back, after which the scattered tensor's name is rebound. The top values and indices are
    locals until the router returns. Returns the scores (tokens x experts)."""
    spec, a, T = b.spec, b.a, b.T
    h, E, k = spec.hidden, spec.num_experts, spec.experts_per_tok
    full = b.full
    b.op("moe.router", [x], [b.t("moe.logits", a * T * E)], saves=(x,) if full else (), grads=((x, a * T * h),),
         param_grads=alloc(a * E * h) if full else 0)
    b.op("moe.topk", ["moe.logits"], [b.t("moe.top", a * T * k), b.t("moe.idx", 8 * T * k)], saves=("moe.idx",),
         grads=(("moe.logits", a * T * E),))
    b.op("moe.scatter", ["moe.top", "moe.idx"], [b.t("moe.sc", a * T * E)], saves=("moe.idx",),
         grads=(("moe.top", a * T * k),))
    scores = "moe.sc"
    if a != FP32:
        b.op("moe.sc32", ["moe.sc"], [b.t("moe.sc32", FP32 * T * E)], grads=(("moe.sc", a * T * E),))
        scores = "moe.sc32"
    b.op("moe.sigmoid", [scores], [b.t("moe.sig", FP32 * T * E)], saves=("moe.sig",), grads=((scores, FP32 * T * E),))
    scores = "moe.sig"
    if a != FP32:
        b.op("moe.scores", ["moe.sig", "moe.sc"], [b.t("moe.scores", a * T * E)], grads=(("moe.sig", FP32 * T * E),))
        scores = "moe.scores"
    b.op("moe.router_return", ["moe.top", "moe.idx"])
    return scores


def moe(b, x: str, lins: dict) -> str:
    """Llama4TextMoe.forward: the router's scores; routed_in = x.repeat(E, 1), every token once per
    expert (RepeatBackward sums the copies back into one tokens x hidden gradient), times
    scores.transpose(0, 1).reshape(-1, 1) (the transposed scores cannot be viewed flat: a copy;
    the multiply saves both operands and its backward reduces a tokens x experts x hidden
    product to the scores' gradient); Llama4TextExperts: torch.bmm of the (E, tokens, hidden)
    view with gate_up_proj (E, h, 2i), chunk (views), up * act(gate) (act saves gate, the
    product saves both: gate_up stays saved), bmm with down_proj (E, i, h); bmm saves its input
    only for the weight's gradient (full fine-tuning; under LoRA the experts are frozen: peft has
    no MoE conversion for llama4). Then the shared expert (Llama4TextMLP) on x, and
    `out.add_(routed_out.reshape(E, -1, h).sum(dim=0))` in place into its output. routed_in and
    routed_out are locals until the block returns. Returns the block's output, a name for the
    shared expert's output storage, which the layer keeps (b.layer_locals) until it returns,
    together with the router logits (`hidden_states, _ = hidden_states`)."""
    spec, a, T = b.spec, b.a, b.T
    h, i, E = spec.hidden, spec.expert_width, spec.num_experts
    ET, full = E * T, b.full
    scores = router(b, x)
    b.op("moe.repeat", [x], [b.t("moe.rep", a * ET * h)], grads=((x, a * T * h),))
    b.op("moe.scores_t", [scores], [b.t("moe.st", a * ET)], grads=((scores, 0),))
    b.op("moe.weigh", ["moe.rep", "moe.st"], [b.t("moe.xin", a * ET * h)], saves=("moe.rep", "moe.st"),
         grads=(("moe.rep", a * ET * h), ("moe.st", a * ET)), bwd_work=alloc(a * ET * h), work_tag=ACT)
    b.op("moe.gate_up", ["moe.xin"], [b.t("moe.gu", a * ET * 2 * i)], saves=("moe.xin",) if full else (),
         grads=(("moe.xin", a * ET * h),), param_grads=alloc(a * E * h * 2 * i) if full else 0)
    # gate and up are chunk views of gate_up: each gets a half-size gradient (SplitBackward then
    # concatenates them), as in ops._Ops.moe
    b.op("moe.act", ["moe.gu"], [b.t("moe.s", a * ET * i)], saves=("moe.gu",), grads=(("moe.gu", a * ET * i),))
    b.op("moe.prod", ["moe.gu", "moe.s"], [b.t("moe.p", a * ET * i)], saves=("moe.gu", "moe.s"),
         grads=(("moe.gu", a * ET * i), ("moe.s", a * ET * i)))
    b.op("moe.down", ["moe.p"], [b.t("moe.d", a * ET * h)], saves=("moe.p",) if full else (),
         grads=(("moe.p", a * ET * i),), param_grads=alloc(a * E * i * h) if full else 0)
    b.op("moe.experts_return", ["moe.gu"])          # gate_up is a local of Llama4TextExperts.forward
    shared = b.mlp(x, lins)
    if b.setup.autocast and a != FP32:
        # sum is fp32_set_opt_dtype under autocast (docs/recipes.md#cuda-autocast-op-lists): a
        # float32 sum; add_ casts it into the 16-bit output, and its gradient back to float32.
        # The expanded gradient is cast to routed_out's dtype (validate_outputs) before the
        # reshape's copy, so that copy is 16-bit (as in ops._Ops.moe_gpt_oss)
        summed, grad = "moe.out", FP32 * T * h
        b.op("moe.sum", ["moe.d"], [b.t(summed, FP32 * T * h)], grads=(("moe.d", a * ET * h),))
    else:
        b.moe_out = a
        summed, grad = b.moe_sum(T, h, src="moe.d", copies=E), 0
    # add_ writes into the shared expert's output: the block's output is that storage
    b.op("moe.add_", [shared, summed], [b.t("moe.total", 0)], grads=((shared, 0), (summed, grad)))
    b.op("moe.return", [x, scores, "moe.xin", "moe.d"])
    b.layer_locals += [shared, "moe.logits"]
    return "moe.total"
