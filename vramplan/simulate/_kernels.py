"""Meta-device stand-ins for what a CUDA run does differently from a meta run.

On the meta device every op runs its meta (shape-only) kernel. Three kinds of ops need help so
that the storages a meta step creates are the ones a CUDA step creates:

1. Data-dependent ops (Tensor.item(), nonzero, torch.where(cond)) have no meta kernel. They are
   answered as real inputs would answer them: `input_ids` is one unpadded sequence per row
   (position ids 0..seq-1, no packing), so masks are all ones; MoE tokens spread evenly over the
   experts (each expert gets tokens * experts_per_tok / num_experts rows).
2. Kernels whose CUDA implementation allocates more than their meta kernel says:
   - bitsandbytes::gemm_4bit: for more than a few rows the CUDA backend dequantizes the whole
     weight and calls F.linear (bitsandbytes/backends/cuda/ops.py, `_dequant_linear_fallback`).
   - bitsandbytes::int8_scaled_mm: an int32 product, then an fp16 dequantized output, then a cast
     (backends/default/ops.py + backends/cuda/ops.py int8_mm_dequant).
   - flash-attention backward: fp32 softmax_d and dq_accum workspaces, and for GQA dk/dv expanded
     to all query heads (PyTorch's flash_attn/flash_api.cpp mha_bwd).
   - memory-efficient attention backward: fp32 delta and the dQ accumulator workspace.
   - cuBLAS: its workspace, cached from the first matmul (`cublas_workspace`).
   - torch._grouped_mm (MoE experts): CUDA runs fp16 / fp32 through a per-group fallback, while
     the meta kernel takes bf16 only (`grouped_mm`).
3. scaled_dot_product_attention: on meta it takes the math path and materializes seq x seq
   scores. A GPU picks a fused kernel (PyTorch's default priority: flash, efficient, math, cudnn;
   torch._C._get_sdp_priority_order() == [1, 2, 0, 3, 4]); `SdpaRouting` makes the same choice
   for the target GPU's compute capability.

Every CUDA rule (which kernel, what it allocates) lives in vramplan/cuda/ (torch-free, shared with
the estimator); the stand-ins here convert tensors to plain values and call it.

4. For speed only, foreach ops (an optimizer step over every parameter) run their meta kernel
   once per distinct tensor layout instead of once per tensor (`foreach_op`), and any other op
   that only makes new tensors runs it once per distinct signature of its arguments
   (`MetaLayouts`).

None of this is installed for a real CPU run: there every kernel is real. What the tracking mode
itself changes in autograd's engine is undone in both (5, `mode_overrides`): a second gradient
summed in place into the buffered one where a run without the mode reuses it, and the
gradient of an advanced index (`x[mask]`, `x[indices]`) scattered in place into its zeros.
"""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch._prims_common import is_non_overlapping_and_dense_or_false

from vramplan.core._architectures import recurrent_layer_kinds
from vramplan.cuda import _cublas as cuda_cublas, _sdpa as cuda_sdpa
from vramplan.cuda._arch import ASSUMED, CudaArch
from vramplan.cuda._gemm_4bit import gemm_4bit_uses_fused_kernel
from vramplan.core._errors import SimulationError  # noqa: F401  (re-exported: raised by the stand-ins below)

aten = torch.ops.aten
F = torch.nn.functional


# --- 1. data-dependent ops -------------------------------------------------------------------------

# (file name, function name) of the code asking -> the answer real inputs give. The call site is
# found by walking up the Python stack past torch's own frames.
SCALAR_ANSWERS = {
    # masking_utils.find_packed_sequence_indices: `(packed_sequence_mask[:, -1] == 0).all()`;
    # position ids 0..seq-1 hold one sequence per row, so nothing is packed.
    ("masking_utils.py", "find_packed_sequence_indices"): True,
    # MixtralExperts eager loop: `if expert_idx == self.num_experts: continue`; expert_hit only
    # holds real experts (the sentinel class num_experts is never routed to).
    ("modeling_mixtral.py", "forward"): False,
}


def _caller_site() -> tuple[str, str]:
    frame = sys._getframe(2)
    torch_dir = f"{os.sep}torch{os.sep}"
    while frame is not None:
        path = frame.f_code.co_filename
        if torch_dir not in path and f"{os.sep}vramplan{os.sep}simulate{os.sep}" not in path:
            return os.path.basename(path), frame.f_code.co_name
        frame = frame.f_back
    return "?", "?"


@dataclass
class Routing:
    """Even MoE routing: how many rows each data-dependent nonzero returns. `assumed` collects,
    once each, the answers given by a general rule rather than a known call site (Trace.notes).

    MoE on transformers 5: the default experts implementation is grouped_mm
    (integrations/moe.py grouped_mm_experts_forward): token-expert pairs sorted by expert, per-expert
    counts from histc, one grouped matmul over all tokens x top_k rows. Nothing there is data-
    dependent and every buffer has tokens x top_k rows however the router spreads them, so on
    meta it runs as is (F.grouped_mm has a meta kernel; sm80+ CUDA takes the same path). Only
    the eager experts loop (experts_implementation="eager": expert_hit = ...nonzero(), then
    torch.where(expert_mask[e]) per expert) asks for counts: answered as a balanced router would,
    each expert getting tokens x top_k / num_experts rows. docs/peft-transformers.md#moe-routing-on-the-meta-device"""
    num_experts: int = 0
    top_k: int = 0
    tokens: int = 0
    calls: int = field(default=0, repr=False)
    assumed: dict = field(default_factory=dict, repr=False)   # key -> note, in first-seen order
    # torch._grouped_mm ran (make_grouped_mm): Llama 4's experts do not use it (Llama4TextExperts:
    # torch.bmm over every expert), so the note says what ran
    grouped: bool = field(default=False, repr=False)

    def nonzero_rows(self, t: torch.Tensor) -> int:
        if self.num_experts:
            if tuple(t.shape) == (self.num_experts + 1,):      # expert_hit: every real expert
                self.assume("moe.hit", f"MoE: every one of the {self.num_experts} experts receives tokens")
                return self.num_experts
            if tuple(t.shape) == (self.top_k, self.tokens):   # torch.where(expert_mask[e])
                total = self.tokens * self.top_k
                base, rem = divmod(total, self.num_experts)
                rows = base + (1 if self.calls % self.num_experts < rem else 0)
                self.calls += 1
                self.assume("moe.balanced", f"MoE routing answered as a balanced router would: each of the "
                            f"{self.num_experts} experts gets {total} / {self.num_experts} of the {self.tokens} "
                            f"tokens x top-{self.top_k} rows (a skewed router makes its busiest expert's "
                            "activations larger)")
                return rows
        site = _caller_site()
        self.assume(("nonzero",) + site, f"nonzero at {site[0]}:{site[1]} answered as on an all-ones mask "
                                         f"(every element nonzero)")
        return t.numel()  # an all-ones mask: every element is nonzero

    def assume(self, key, note: str) -> None:
        self.assumed.setdefault(key, note)

    def notes(self) -> tuple[str, ...]:
        out = tuple(self.assumed.values())
        if self.num_experts and "moe.balanced" not in self.assumed and self.grouped:
            out += (f"MoE: {self.num_experts} experts, top-{self.top_k}, run on meta through the grouped_mm "
                    f"experts (transformers 5 default): every buffer has tokens x top-{self.top_k} rows "
                    "whatever the routing, so no routing had to be assumed",)
        elif self.num_experts and "moe.balanced" not in self.assumed:
            out += (f"MoE: {self.num_experts} experts, top-{self.top_k}: no expert computation depended on the "
                    "routing (Llama 4 runs every token through every expert), so no routing had to be assumed",)
        return out


def make_local_scalar_dense(routing: Routing):
    def answer(tracker, func, args, kwargs):
        return local_scalar_dense(tracker, func, args, kwargs, routing)
    return answer


def local_scalar_dense(tracker, func, args, kwargs, routing: Routing | None = None):
    t = args[0]
    if t.device.type != "meta":   # a host tensor (torch.optim's `step` counts): no device storage to count
        return func(*args, **kwargs)
    site = _caller_site()
    if site in SCALAR_ANSWERS:
        return SCALAR_ANSWERS[site]
    if t.dtype == torch.bool:  # a mask check: all-ones masks answer True
        if routing is not None:
            routing.assume(("scalar",) + site, f"data-dependent check at {site[0]}:{site[1]} answered True, "
                                               "as on an all-ones mask")
        return True
    raise SimulationError(f"data-dependent value asked on the meta device at {site[0]}:{site[1]} "
                          f"({t.dtype} {tuple(t.shape)})",
                          hint="add the answer real inputs give to vramplan.simulate._kernels.SCALAR_ANSWERS")


def make_nonzero(routing: Routing):
    def nonzero(tracker, func, args, kwargs):
        t = args[0]
        if t.device.type != "meta":
            return tracker.run(func, args, kwargs)
        rows = routing.nonzero_rows(t)
        return tracker.run(aten.empty.memory_format, ((rows, t.dim()),),
                           dict(dtype=torch.long, device=t.device))
    return nonzero


# --- 2. CUDA kernels that allocate more than their meta kernel -------------------------------------

# The dispatch rule itself is torch-free (vramplan/cuda/_gemm_4bit.py, shared with the estimator).
TORCH_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def gemm_4bit_fused(M: int, N: int, K: int, dtype: torch.dtype, arch: CudaArch = ASSUMED) -> bool:
    """cuda.gemm_4bit.gemm_4bit_uses_fused_kernel for a torch dtype."""
    return gemm_4bit_uses_fused_kernel(M, N, K, TORCH_DTYPE_NAMES[dtype], arch)


def gemm_4bit(tracker, func, args, kwargs, arch: CudaArch = ASSUMED):
    """CUDA `gemm_4bit`: past a few rows, `_dequant_linear_fallback` (nested absmax dequantized
    into a new fp32 buffer, plus the offset into another; the weight dequantized to A.dtype; then
    F.linear). Every buffer it makes lives until the call returns."""
    names = ("A", "B", "shapeB", "absmax", "blocksize", "quant_type", "bias", "absmax_8bit",
             "absmax_code", "absmax_offset")
    a = dict(zip(names, args), **kwargs)
    A, shapeB = a["A"], list(a["shapeB"])
    K, N = A.shape[-1], shapeB[0]
    M = A.numel() // K
    if A.device.type != "meta" or gemm_4bit_fused(M, N, K, A.dtype, arch):
        return tracker.run(func, args, kwargs)
    absmax = a["absmax"]
    with tracker.tagging("temporaries"):
        held = []
        if a.get("absmax_8bit") is not None:
            absmax_dq = tracker.run(torch.ops.bitsandbytes.dequantize_blockwise.default,
                                    (a["absmax_8bit"], absmax, a["absmax_code"], 256, torch.float32))
            absmax = tracker.run(aten.add.Tensor, (absmax_dq, a["absmax_offset"]))
            held += [absmax_dq, absmax]
        w = tracker.run(torch.ops.bitsandbytes.dequantize_4bit.default,
                        (a["B"], absmax, a["blocksize"], a["quant_type"], shapeB, A.dtype))
        held.append(w)
    out = tracker.run(aten.linear.default, (A, w, a.get("bias")))
    del held, w
    return out


def int8_vectorwise_quant(tracker, func, args, kwargs):
    """With threshold > 0 the outlier column count is data-dependent: activations of real text
    through a freshly quantized model rarely exceed 6.0; no outliers is the answer here."""
    A = args[0]
    threshold = args[1] if len(args) > 1 else kwargs.get("threshold", 0.0)
    if A.device.type != "meta" or not threshold:
        return tracker.run(func, args, kwargs)
    row, stats, _ = tracker.run(func, (A, 0.0))
    return row, stats, tracker.run(aten.empty.memory_format, ((0,),), dict(dtype=torch.long, device=A.device))


def int8_double_quant(tracker, func, args, kwargs):
    A = args[0]
    threshold = args[1] if len(args) > 1 else kwargs.get("threshold", 0.0)
    if A.device.type != "meta" or not threshold:
        return tracker.run(func, args, kwargs)
    # backends/cuda/ops.py: row quant via int8_vectorwise_quant, the column side in PyTorch
    row, stats, cols = int8_vectorwise_quant(tracker, torch.ops.bitsandbytes.int8_vectorwise_quant.default,
                                             (A, threshold), {})
    col = tracker.run(aten.empty_like.default, (A,), dict(dtype=torch.int8))
    col_stats = tracker.run(aten.empty.memory_format, ((A.shape[-1],),), dict(dtype=torch.float32, device=A.device))
    return row, col, stats, col_stats, cols


def int8_scaled_mm(tracker, func, args, kwargs):
    """CUDA: int8_linear_matmul -> int32 (rows, out), int8_mm_dequant -> fp16, `.to(dtype)`."""
    names = ("A", "B", "row_stats", "col_stats", "bias", "dtype")
    a = dict(zip(names, args), **kwargs)
    A = a["A"]
    if A.device.type != "meta":
        return tracker.run(func, args, kwargs)
    acc = tracker.run(torch.ops.bitsandbytes.int8_linear_matmul.default, (A, a["B"]))
    out16 = tracker.run(torch.ops.bitsandbytes.int8_mm_dequant.default,
                        (acc, a["row_stats"], a["col_stats"]), dict(dtype=torch.float16, bias=a.get("bias")))
    del acc
    dtype = a.get("dtype") or torch.float16
    if dtype != torch.float16:
        return tracker.run(aten._to_copy.default, (out16,), dict(dtype=dtype))
    return out16


def int8_mixed_scaled_mm(tracker, func, args, kwargs):
    """backends/default/ops.py with no outlier columns: subA is an empty tensor."""
    names = ("A", "CA", "CB", "SCA", "SCB", "outlier_cols", "bias")
    a = dict(zip(names, args), **kwargs)
    A = a["A"]
    if A.device.type != "meta":
        return tracker.run(func, args, kwargs)
    sub_a = tracker.run(aten.empty.memory_format, ((0,),), dict(dtype=A.dtype, device=A.device))
    out = int8_scaled_mm(tracker, torch.ops.bitsandbytes.int8_scaled_mm.default,
                         (a["CA"], a["CB"], a["SCA"], a["SCB"]), dict(bias=a.get("bias"), dtype=A.dtype))
    return out, sub_a


def make_grouped_mm(routing: Routing):
    def stand_in(tracker, func, args, kwargs):
        routing.grouped = True
        out = grouped_mm(tracker, func, args, kwargs)
        if out.dtype != torch.bfloat16 and out.device.type == "meta":
            routing.assume("moe.grouped_mm", f"MoE experts in {str(out.dtype).removeprefix('torch.')}: "
                           "torch._grouped_mm run as CUDA's per-group fallback allocates (its one output; "
                           "the meta kernel takes bf16 only)")
        return out
    return stand_in


def grouped_mm(tracker, func, args, kwargs):
    """torch._grouped_mm on CUDA (aten/src/ATen/native/cuda/GroupedBlas.cpp _grouped_mm_cuda): bf16
    inputs run the CUTLASS kernel on sm90 / sm100, any other dtype (or GPU) `_grouped_mm_fallback`,
    one mm per group written into the output; either way the only allocation is the output of
    create_grouped_gemm_output_tensor (last dim padded to 16 bytes in the stride). torch 2.13's
    meta kernel (torch/_meta_registrations.py meta_grouped_mm) accepts bf16 only, so fp16 / fp32
    experts (--dtype fp16, prepare_model_for_kbit_training) get that output here."""
    names = ("mat_a", "mat_b", "offs", "bias", "out_dtype")
    a = dict(zip(names, args), **kwargs)
    mat_a, mat_b = a["mat_a"], a["mat_b"]
    if mat_a.device.type != "meta" or (mat_a.dtype == mat_b.dtype == torch.bfloat16):
        return tracker.run(func, args, kwargs)
    dtype = a.get("out_dtype") or mat_a.dtype
    a2, b2, n = mat_a.dim() == 2, mat_b.dim() == 2, mat_b.size(-1)
    if a2:   # (S, k) x (E, k, n) -> (S, n); (k, S) x (S, n) -> (E, k, n) per group (weight gradients)
        size = [a["offs"].size(0), mat_a.size(0), n] if b2 else [mat_a.size(0), n]
    else:
        size = [mat_a.size(1), n] if b2 else [mat_a.size(0), mat_a.size(1), n]
    align = 16 // dtype.itemsize
    padded = -(-n // align) * align
    stride = [size[1] * padded, padded, 1] if a2 == b2 else [padded, 1]
    return tracker.run(aten.empty_strided.default, (size, stride), dict(dtype=dtype, device=mat_a.device))


def _workspace(tracker, shapes, device) -> list:
    """Allocate the float32 workspaces a cuda/_sdpa.py rule lists as (shape, 4)."""
    empty = aten.empty.memory_format
    return [tracker.run(empty, (shape,), dict(dtype=torch.float32, device=device)) for shape, _ in shapes]


def flash_attention_backward(tracker, func, args, kwargs):
    """PyTorch's flash_attn mha_bwd: dq, dk, dv, then the fp32 workspaces of
    cuda.sdpa.flash_backward_workspace, and with fewer KV heads than query heads dk/dv expanded
    to every query head, summed into dk/dv at the end."""
    q, k = args[1], args[2]
    if q.device.type != "meta":
        return tracker.run(func, args, kwargs)
    grads = tracker.run(func, args, kwargs)
    b, h, s_q, d = q.shape
    h_k, s_k = k.shape[1], k.shape[2]
    empty = aten.empty.memory_format
    work = _workspace(tracker, cuda_sdpa.flash_backward_workspace(b, h, s_q, d), q.device)
    if h_k != h:
        work += [tracker.run(empty, ((b, s_k, h, d),), dict(dtype=q.dtype, device=q.device)) for _ in range(2)]
    del work
    return grads


def efficient_attention_backward(tracker, func, args, kwargs):
    """attention_backward.cu _efficient_attention_backward: grad_q, grad_k, grad_v, then the fp32
    delta and dQ accumulator of cuda.sdpa.efficient_backward_workspace."""
    q = args[1]
    if q.device.type != "meta":
        return tracker.run(func, args, kwargs)
    grads = tracker.run(func, args, kwargs)
    b, h, s_q, d = q.shape
    work = _workspace(tracker, cuda_sdpa.efficient_backward_workspace(b, h, s_q, d), q.device)
    del work
    return grads


class CublasWorkspace:
    """cuBLAS allocates its workspace from the caching allocator at a handle's first matmul and
    keeps it; a training step has two handles, the forward's thread and autograd's backward thread
    (cuda/_cublas.py). Before the measured step both exist (the warm-up step made them):
    `tensors()` are those storages, registered as live state in the `temporaries` component."""

    def __init__(self, arch: CudaArch = ASSUMED):
        self.nbytes = cuda_cublas.workspace_bytes(arch)
        self._tensors = ()

    def tensors(self) -> tuple[torch.Tensor, ...]:
        if not self._tensors:
            self._tensors = tuple(torch.empty(self.nbytes, dtype=torch.uint8, device="meta")
                                  for _ in range(cuda_cublas.STEP_THREADS))
        return self._tensors


# --- 4. speed: foreach ops over many tensors -------------------------------------------------------

def _signature(x) -> tuple:
    if isinstance(x, torch.Tensor):
        return ("T", x.shape, x.stride(), x.dtype, x.storage_offset(), x.device.type)
    return ("S", type(x))


def foreach_op(tracker, func, args, kwargs):
    """An optimizer's foreach op (torch._foreach_mul_, _foreach_sqrt, ...) over every parameter:
    on meta, the per-tensor meta kernels dominate a 70B step's optimizer (~1,100 tensors x ~10
    ops). Tensors with the same shape, strides and dtype get the same answer, so the meta kernel
    runs on one tensor of each kind; in-place ops allocate nothing, out-of-place ones get one
    output per tensor with that representative's layout, allocated in order as the kernel would."""
    self_list = args[0] if args else None
    if (kwargs or not isinstance(self_list, (list, tuple)) or not self_list
            or not isinstance(self_list[0], torch.Tensor) or self_list[0].device.type != "meta"):
        return tracker.run(func, args, kwargs)
    n = len(self_list)
    lists = [i for i, a in enumerate(args) if isinstance(a, (list, tuple)) and len(a) == n]
    kind_of: dict = {}
    reps, index = [], []
    for j, key in enumerate(zip(*(map(_signature, args[i]) for i in lists))):
        if key not in kind_of:
            kind_of[key] = len(reps)
            reps.append(j)
        index.append(kind_of[key])
    if len(reps) == n:
        return tracker.run(func, args, kwargs)
    tracker._input_keys(args, kwargs)     # storages it reads: strays are found as in tracker.run
    rep_args = [[a[j] for j in reps] if i in lists else a for i, a in enumerate(args)]
    out = func(*rep_args)                 # shapes only: the mode is off inside its own handler
    if not func._schema.returns or not isinstance(out, (list, tuple)):
        return out
    outs = [torch.empty_strided(out[k].shape, out[k].stride(), dtype=out[k].dtype, device=out[k].device) for k in index]
    tracker.made(outs)
    return outs


class _Opaque(Exception):
    """An argument whose meta kernel answer is not a function of what `_layout_key` keeps."""


_PLAIN_ARGUMENTS = frozenset({bool, int, float, complex, str, type(None), torch.dtype, torch.device, torch.layout,
                              torch.memory_format})


def _layout_key(x):
    """What a meta kernel can read of an argument (MetaLayouts), as a dict key."""
    if isinstance(x, torch.Tensor):
        if not x.is_meta or x.layout != torch.strided or x.is_conj() or x.is_neg():
            raise _Opaque
        return type(x), x.shape, x.stride(), x.dtype, x.storage_offset()
    if isinstance(x, (list, tuple)):
        return type(x), tuple(_layout_key(y) for y in x)
    if isinstance(x, dict):
        return dict, tuple((k, _layout_key(v)) for k, v in x.items())
    if type(x) in _PLAIN_ARGUMENTS:
        return type(x), x      # the type too: 1, 1.0 and True promote differently
    raise _Opaque


class MetaLayouts:
    """For speed only: a meta kernel reads nothing but its arguments' metadata, so an op that
    only makes new tensors answers every call with the same arguments (shapes, strides, dtypes,
    storage offsets of its meta tensors; its other arguments; the default dtype) with new tensors
    of the same layouts. Most of a step's ops repeat that way (every decoder layer runs the same
    ops on the same shapes, forward, recomputation and backward, in both steps), and their meta
    kernels are Python (torch/_refs, _meta_registrations) that costs far more than an empty
    tensor. The first call of each signature runs the kernel; its layouts are reused only if its
    outputs are plain strided meta tensors, each on a storage of its own, new (no input's, none
    live), at offset 0 and exactly the size its shape and strides need, which is all
    torch.empty_strided makes. Ops that mutate, return views or lists, or return anything but
    tensors always run their kernel.

    StepTracker.run hands it each op to execute (`run`) and registers what it returns, the
    kernel's outputs or the new tensors, as always: the same storages in the same order."""

    def __init__(self):
        self._replayable: dict = {}   # op -> how many tensors its schema returns, 0: not only new tensors
        self._known: dict = {}        # (op, argument keys) -> [(shape, stride, dtype)] or None: run the kernel

    def run(self, tracker, func, args, kwargs, inputs):
        n = self._replayable.get(func)
        if n is None:
            schema = func._schema
            new_tensors = not schema.is_mutable and all(r.alias_info is None and str(r.type) == "Tensor"
                                                        for r in schema.returns)
            n = self._replayable[func] = len(schema.returns) if new_tensors else 0
        if not n:
            return func(*args, **kwargs)
        try:
            key = (func, _layout_key(args), _layout_key(kwargs), torch.get_default_dtype())
        except _Opaque:
            return func(*args, **kwargs)
        layouts = self._known.get(key, self)
        if layouts is self:               # first call of this signature
            out = func(*args, **kwargs)
            self._known[key] = _new_layouts(tracker, out, n, inputs)
            return out
        if layouts is None:
            return func(*args, **kwargs)
        outs = [torch.empty_strided(shape, stride, dtype=dtype, device="meta") for shape, stride, dtype in layouts]
        return outs[0] if n == 1 else tuple(outs)


def _new_layouts(tracker, out, n: int, inputs) -> list | None:
    """[(shape, stride, dtype)] of a kernel's outputs if torch.empty_strided makes the same (see
    MetaLayouts), else None."""
    outs = (out,) if n == 1 else out
    if not isinstance(outs, tuple) or len(outs) != n:
        return None
    layouts, storages = [], set()
    for o in outs:
        if type(o) is not torch.Tensor or not o.is_meta or o.layout != torch.strided or o.is_conj() or o.is_neg() \
                or o.storage_offset() or tracker.block_of(o) is not None:
            return None
        st = o.untyped_storage()
        if st._cdata in inputs or st._cdata in storages:
            return None
        storages.add(st._cdata)
        shape, stride = tuple(o.shape), o.stride()
        if torch.empty_strided(shape, stride, dtype=o.dtype, device="meta").untyped_storage().nbytes() != st.nbytes():
            return None
        layouts.append((shape, stride, o.dtype))
    return layouts


def foreach_ops() -> list:
    """Every aten::_foreach_* overload except the out= ones."""
    ops = []
    for name in torch._C._dispatch_get_all_op_names():
        if not name.startswith("aten::_foreach_"):
            continue
        packet, _, overload = name[len("aten::"):].partition(".")
        if overload.endswith("out"):
            continue
        try:
            ops.append(getattr(getattr(aten, packet), overload or "default"))
        except AttributeError:
            continue
    return ops


# --- 5. what the tracking mode itself changes ---------------------------------------------------------

def engine_accumulation(tracker, func, args, kwargs):
    """aten.add.Tensor where autograd's engine sums a second gradient into a node's input buffer
    (torch/csrc/autograd/input_buffer.cpp accumulate, `old_var + var`): with no Python dispatch
    mode, and grad mode off as in `loss.backward()`, the engine adds the incoming gradient into the
    buffered one in place, `old_var.add_(var)`, when it may reuse it (can_accumulate_inplace: a
    plain tensor, non-overlapping and dense, that the buffer alone references, storage included);
    under this tracker, which holds a Python reference to every tensor an op returns, the engine
    never reuses the buffer and always makes a new tensor. Both happen where
    RMSNorm's float32 input gets its second gradient, and where the residual stream, a LoRA layer's
    input or a tied embedding weight gets theirs (docs/autograd.md#gradient-accumulation: a CUDA
    snapshot of a QLoRA step shows the in-place sums). The engine reports the producer of the
    incoming gradient as the current node while it accumulates, so a sum is the engine's when the
    buffered gradient was made outside the current node's apply (Block.node); a formula's own sum
    of two tensors it made stays as it is. The storage test is torch's own (the buffered tensor's
    reference plus `storage`'s); the tensor's reference count is the one the mode inflates, so it
    is not checked: it is one whenever the sum runs unless one node passed a single tensor to two
    inputs and the second input's node has not run yet (estimate/_walk.py attach counts those
    references)."""
    old, new = args[0], args[1] if len(args) > 1 else None
    if (not kwargs and isinstance(new, torch.Tensor) and isinstance(old, torch.Tensor)
            and not torch.is_grad_enabled() and old.shape == new.shape and old.dtype == new.dtype
            and old.device == new.device):
        node = torch._C._current_autograd_node()
        block = tracker.block_of(old)
        if (node is not None and block is not None and block.node != node._sequence_nr()
                and is_non_overlapping_and_dense_or_false(old)
                and torch._C._storage_Use_Count(old.untyped_storage()._cdata) == 2):
            return tracker.run(aten.add_.Tensor, (old, new), {})
    return tracker.run(func, args, kwargs)


def index_accumulation(tracker, func, args, kwargs):
    """aten.index_put.default where IndexBackward0 scatters the gradient of an advanced index
    `x[idx]` (a bool mask: TRL's `hidden[:, :-1][mask]`, --loss chunked; or long indices) into
    zeros of x's shape. torch/csrc/autograd/FunctionsManual.cpp index_backward calls the in-place
    `at::_index_put_impl_(zeros_like_self, indices, grad, accumulate=true, unsafe=true)` on plain
    tensors, and the out-of-place `zeros_like_self.index_put(...)` only when a tensor is
    subclass-like, which every tensor is while a Python dispatch mode is active
    (ATen/TensorSubclassLikeUtils.h isTensorSubclassLike). Without the mode the zeros are the
    gradient: aten::new_zeros, then aten::_index_put_impl_, which allocates nothing
    (tests/test_simulate_tracker.py holds the installed torch to it); under the tracker a second
    buffer of x's size would be made and the zeros freed after it."""
    if (type(torch._C._current_autograd_node()).__name__ == "IndexBackward0" and not kwargs
            and len(args) == 4 and args[3] is True):
        self_, indices, values, _accumulate = args
        tracker.run(aten._index_put_impl_.default, (self_, indices, values, True, True), {})
        return self_
    return tracker.run(func, args, kwargs)


def mode_overrides() -> dict:
    """Stand-ins that undo what the tracking mode itself changes, for a meta or a real run."""
    return {aten.add.Tensor: engine_accumulation, aten.index_put.default: index_accumulation}


def cuda_overrides(routing: Routing | None = None, arch: CudaArch = ASSUMED) -> dict:
    """The op -> stand-in table for a meta run emulating a CUDA device of architecture `arch`."""
    routing = routing if routing is not None else Routing()
    table = dict.fromkeys(foreach_ops(), foreach_op)
    table.update(mode_overrides())
    table.update({
        aten._local_scalar_dense.default: make_local_scalar_dense(routing),
        aten.nonzero.default: make_nonzero(routing),
        aten._scaled_dot_product_flash_attention_backward.default: flash_attention_backward,
        aten._scaled_dot_product_efficient_attention_backward.default: efficient_attention_backward,
        aten._grouped_mm.default: make_grouped_mm(routing),
    })
    if _has_bitsandbytes():
        bnb = torch.ops.bitsandbytes

        def gemm_4bit_on_arch(tracker, func, args, kwargs):
            return gemm_4bit(tracker, func, args, kwargs, arch)

        table.update({
            bnb.gemm_4bit.default: gemm_4bit_on_arch,
            bnb.int8_vectorwise_quant.default: int8_vectorwise_quant,
            bnb.int8_double_quant.default: int8_double_quant,
            bnb.int8_scaled_mm.default: int8_scaled_mm,
            bnb.int8_mixed_scaled_mm.default: int8_mixed_scaled_mm,
        })
    return table


def layer_kernel_note(spec, model) -> str | None:
    """Trace note for decoder layers that are not softmax attention (config.layer_types entries
    such as "linear_attention": Qwen3-Next / Qwen3.5 gated DeltaNet, Granite-MoE-hybrid Mamba):
    transformers runs them through optional kernel packages (flash-linear-attention, causal-conv1d,
    mamba-ssm) when its modeling module finds them (`is_fast_path_available`), else through its
    own torch code, which is what runs on meta. Their CUDA kernels chunk and save differently."""
    config = getattr(spec, "config", None) or {}
    config = config.get("text_config", config) if isinstance(config, dict) else {}
    other = recurrent_layer_kinds(config)
    if not other:
        return None
    import importlib.util
    import sys

    inner = getattr(model, "base_model", model)
    module = sys.modules.get(type(getattr(inner, "model", inner)).__module__)
    # transformers 5 fetches these kernels through the `kernels` package
    # (integrations/hub_kernels.py use_kernel_func_from_hub_with_fallback) and falls back to its
    # torch functions without it; older modeling files test `is_fast_path_available`
    fast = getattr(module, "is_fast_path_available", importlib.util.find_spec("kernels") is not None)
    how = ("transformers' torch fallbacks (no `kernels` package or kernel library to load their CUDA "
           "kernels from)" if not fast else "the kernels transformers loaded")
    return (f"{', '.join(other)} layers ran {how}; no CUDA stand-in models their kernels "
            "(flash-linear-attention / causal-conv1d / mamba chunked scans), whose workspaces differ")


def unknown_kernel_note(op_names) -> str | None:
    """Trace note for ops outside oplog.KNOWN_NAMESPACES (custom kernels of a model or a library):
    they ran their meta (fake) kernels, assumed to allocate what their CUDA kernels do."""
    names = sorted(op_names)
    if not names:
        return None
    return (f"no CUDA stand-in for {', '.join(names)}: ran their meta kernels, assumed to allocate on CUDA "
            "what those say")


def _has_bitsandbytes() -> bool:
    try:
        import bitsandbytes  # noqa: F401  (registers torch.ops.bitsandbytes)
    except ImportError:
        return False
    return True


def matmul_ops() -> frozenset:
    """bitsandbytes matmuls: they read quantized weights but make activations."""
    if not _has_bitsandbytes():
        return frozenset()
    names = ("gemm_4bit", "gemv_4bit", "int8_scaled_mm", "int8_mixed_scaled_mm", "int8_linear_matmul",
             "int8_mm_dequant")
    return frozenset(getattr(torch.ops.bitsandbytes, n).default for n in names)

# Ops whose outputs are dequantized weights (the `temporaries` component).
DEQUANT_OPS = frozenset({"bitsandbytes.dequantize_4bit.default", "bitsandbytes.dequantize_blockwise.default",
                         "bitsandbytes.int8_vectorwise_dequant.default"})


# --- 3. scaled_dot_product_attention --------------------------------------------------------------

def sdpa_call(q, k, v, attn_mask, dropout_p, is_causal, enable_gqa) -> cuda_sdpa.SdpaCall | None:
    """The plain description cuda/_sdpa.py decides on; None for what no fused kernel takes here
    (not 4-d, an unknown dtype, keys and values with different head counts, different head dims
    of q and k)."""
    if q.dim() != 4 or q.dtype not in TORCH_DTYPE_NAMES or k.shape[-3] != v.shape[-3] or q.shape[-1] != k.shape[-1]:
        return None
    contiguous = q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1 and (
        attn_mask is None or attn_mask.stride(-1) == 1)
    return cuda_sdpa.SdpaCall(dtype=TORCH_DTYPE_NAMES[q.dtype], head_dim=q.shape[-1], head_dim_v=v.shape[-1],
                              heads=q.shape[-3], kv_heads=k.shape[-3], seq_q=q.shape[-2], seq_k=k.shape[-2],
                              has_mask=attn_mask is not None, is_causal=bool(is_causal), enable_gqa=bool(enable_gqa),
                              requires_grad=any(t.requires_grad for t in (q, k, v)) and torch.is_grad_enabled(),
                              dropout=float(dropout_p), last_dim_contiguous=contiguous)


def sdpa_backend(q, k, v, attn_mask, dropout_p, is_causal, enable_gqa, arch: CudaArch = ASSUMED) -> str:
    """The backend the target GPU picks (cuda.sdpa.backend)."""
    call = sdpa_call(q, k, v, attn_mask, dropout_p, is_causal, enable_gqa)
    return cuda_sdpa.MATH if call is None else cuda_sdpa.backend(arch, call)


class SdpaRouting:
    """Send meta scaled_dot_product_attention to the fused kernel a GPU would run, so its saved
    tensors (output + fp32 logsumexp) and backward are those of the GPU kernel.

    Without a mask (transformers passes is_causal=True and no mask for unpadded causal batches)
    that is flash attention; with a mask it is memory-efficient attention, which on CUDA first
    turns a boolean mask into an additive one in q's dtype (attention.cpp convert_boolean_attn_mask)
    and pads its last dim to a multiple of 16 (pad_bias).

    Used as a context manager: it replaces torch.nn.functional.scaled_dot_product_attention, which
    transformers' sdpa_attention_forward looks up at call time (a TorchFunctionMode would be
    switched off inside its own handler, i.e. for the whole backward and its recomputation)."""

    def __init__(self, arch: CudaArch = ASSUMED):
        self.arch = arch
        self.counts = {"flash": 0, "efficient": 0, "math": 0}
        self._original = None

    def __enter__(self):
        self._original = F.scaled_dot_product_attention
        original = self._original

        def scaled_dot_product_attention(query, key, value, *args, **kwargs):
            if isinstance(query, torch.Tensor) and query.device.type == "meta":
                return self._sdpa(query, key, value, *args, **kwargs)
            return original(query, key, value, *args, **kwargs)

        F.scaled_dot_product_attention = scaled_dot_product_attention
        return self

    def __exit__(self, *exc):
        F.scaled_dot_product_attention = self._original

    def _sdpa(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
              enable_gqa=False):
        backend = sdpa_backend(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa, self.arch)
        self.counts[backend] += 1
        if backend == "flash":
            head_dim = query.shape[-1]
            padded = cuda_sdpa.flash_padded_head_dim(head_dim)
            if padded == head_dim:
                return aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal, False,
                                                                 scale=scale)[0]
            # attention.cpp: q, k, v padded to a multiple of 8, the scale of the original head dim,
            # the output sliced back (cuda.sdpa.flash_padded_head_dim)
            q, k, v = (F.pad(t, (0, padded - head_dim)) for t in (query, key, value))
            out = aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal, False,
                                                           scale=scale if scale is not None else head_dim ** -0.5)[0]
            return out[..., :head_dim]
        if backend == "efficient":
            bias = attn_mask
            if bias is not None:
                if bias.dtype == torch.bool:
                    # attention.cpp convert_boolean_attn_mask_: `at::where(*attn_mask, 0.0,
                    # at::scalar_tensor(neg_inf, dtype))`, one additive mask in the query's dtype
                    bias = torch.where(bias, 0.0, torch.scalar_tensor(float("-inf"), dtype=query.dtype,
                                                                      device=bias.device))
                last = bias.shape[-1]
                if cuda_sdpa.efficient_mask_last_dim(last) != last:
                    padded = bias.new_empty((*bias.shape[:-1], cuda_sdpa.efficient_mask_last_dim(last)))
                    padded[..., :last] = bias
                    bias = padded[..., :last]
                bias = bias.expand(query.shape[0], query.shape[1], query.shape[2], key.shape[2])
            need_lse = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
            return aten._scaled_dot_product_efficient_attention(query, key, value, bias, need_lse, dropout_p,
                                                                 is_causal, scale=scale)[0]
        return self._original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                              is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)


# --- paged optimizer state -------------------------------------------------------------------------

@contextmanager
def paged_state_on(device: str):
    """bitsandbytes puts paged optimizer state (tensors of >= 1e5 elements) in CUDA unified memory
    (functional.get_paged -> cget_managed_ptr), outside the caching allocator. On meta that call
    cannot run: give back a device tensor marked `is_paged`, which the simulator reports apart.
    Without bitsandbytes (plain LoRA with torch AdamW) there is nothing to patch."""
    try:
        import bitsandbytes.functional as bf
    except ImportError:
        yield
        return

    saved = bf.get_paged, bf.fill, bf.prefetch_tensor

    def get_paged(*shape, dtype=torch.float32, device=None):
        out = torch.zeros(shape, dtype=dtype, device=device)
        out.is_paged = True
        out.page_deviceid = getattr(device, "index", None)
        return out

    def fill(A, value, device=None, prefetch=True):
        if getattr(A, "is_paged", False) and A.device.type == "meta":
            A.fill_(value)
        else:
            saved[1](A, value, device, prefetch)

    def prefetch_tensor(A, to_cpu=False):
        if A.device.type != "meta":
            saved[2](A, to_cpu)

    bf.get_paged, bf.fill, bf.prefetch_tensor = get_paged, fill, prefetch_tensor
    try:
        yield
    finally:
        bf.get_paged, bf.fill, bf.prefetch_tensor = saved


@contextmanager
def autocast_accepts_meta():
    """peft's ParamWrapper (LoRA on nn.Parameters, e.g. MoE experts) folds its factors under
    `torch.autocast(device_type=W.device.type, enabled=False)`; autocast rejects "meta". Being
    disabled, it is a no-op on any device: on meta it is built for the host instead."""
    original = torch.autocast

    class autocast(original):  # noqa: N801 - stands in for torch.autocast
        def __init__(self, device_type, *args, **kwargs):
            super().__init__("cpu" if device_type == "meta" else device_type, *args, **kwargs)

    torch.autocast = autocast
    try:
        yield
    finally:
        torch.autocast = original


def is_paged(t) -> bool:
    return bool(getattr(t, "is_paged", False))


# --- 4. dropout ---------------------------------------------------------------------------------

@contextmanager
def cuda_dropout():
    """On CUDA, F.dropout in training runs the fused native_dropout kernel: its mask is a bool
    tensor (aten/src/ATen/native/Dropout.cpp, is_fused_kernel_acceptable -> native_dropout). On
    meta that check fails and dropout decomposes into a float mask (empty_like + bernoulli_),
    four times larger. Route meta dropout to native_dropout, whose meta kernel and autograd
    (NativeDropoutBackward saves the bool mask) are those of the CUDA run."""
    original = F.dropout

    def dropout(input, p=0.5, training=True, inplace=False):
        if (isinstance(input, torch.Tensor) and input.device.type == "meta" and training
                and 0.0 < p < 1.0 and not inplace):
            return torch.native_dropout(input, p, True)[0]
        return original(input, p, training, inplace)

    F.dropout = dropout
    try:
        yield
    finally:
        F.dropout = original
