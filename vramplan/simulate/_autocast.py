"""CUDA autocast emulated on the meta device (autocast has no meta backend: meta tensors carry no
AutocastCUDA dispatch key, so `torch.autocast("cuda")` would change nothing there).

Inside an emulated region every torch function on CUDA autocast's op lists has its floating
inputs cast as aten/src/ATen/autocast_mode.cpp does for CUDA (torch 2.13; docs/recipes.md#cuda-autocast-op-lists):
- lower_precision_fp (matmuls, linear, convolutions, SDPA): inputs to the autocast dtype;
- fp32 (pow, rsqrt, exp, log, norms, nll_loss and the other losses, logsumexp, ...): inputs to float32;
- fp32_set_opt_dtype (softmax, log_softmax, sum, prod, cumsum, cumprod): a lower-precision input
  runs with dtype=float32 (no separate cast), others unchanged;
- promote (addcmul, addcdiv, dot, index_put, scatter_add, ...): inputs to the widest dtype.
`cached_cast`: a float32 leaf that requires grad (and is not a view), cast to the lower-precision
dtype, is cast once per region and the copy cached until the outermost region exits; a frozen
float32 weight is cast on every call (docs/autograd.md#autocast-weight-cache).

The region is torch.autocast / torch.amp.autocast with device_type "meta" or "cuda" (the device
the step stands in for), used as a context manager or decorator as accelerate and
torch.utils.checkpoint use it. torch.is_autocast_enabled() (peft reads it: no fp32 LoRA input
cast under autocast), torch.get_autocast_dtype and torch.amp.is_autocast_available answer for the
emulated region, so non-reentrant checkpointing saves the region's state and re-enters it for
the recomputation as it does on CUDA (checkpoint.py _get_autocast_kwargs / recompute_fn).
F.cross_entropy on a lower-precision input is decomposed as CUDA autocast sees it (its
CompositeImplicit kernel: log_softmax with dtype=float32, then nll_loss in float32).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

# aten/src/ATen/autocast_mode.h AT_FORALL_LOWER_PRECISION_FP / AT_FORALL_FP32 /
# AT_FORALL_FP32_SET_OPT_DTYPE / AT_FORALL_PROMOTE, registered for CUDA by autocast_mode.cpp
# TORCH_LIBRARY_IMPL(aten, Autocast, m) (torch 2.13; the RNN cells are left out: no module here calls them)
LOWER_PRECISION_FP = ("_convolution", "conv1d", "conv2d", "conv3d", "conv_tbc", "conv_transpose1d",
                      "conv_transpose2d", "conv_transpose3d", "convolution", "prelu", "addmm", "addmv", "addr",
                      "matmul", "einsum", "mm", "mv", "linalg_vecdot", "linear", "addbmm", "baddbmm", "bmm",
                      "chain_matmul", "linalg_multi_dot", "scaled_dot_product_attention")
FP32 = ("acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal", "rsqrt",
        "sinh", "tan", "pow", "softplus", "layer_norm", "group_norm", "frobenius_norm", "nuclear_norm",
        "cosine_similarity", "poisson_nll_loss", "cosine_embedding_loss", "nll_loss", "nll_loss2d",
        "hinge_embedding_loss", "kl_div", "l1_loss", "smooth_l1_loss", "huber_loss", "mse_loss",
        "margin_ranking_loss", "multilabel_margin_loss", "soft_margin_loss", "triplet_margin_loss",
        "multi_margin_loss", "binary_cross_entropy_with_logits", "dist", "pdist", "cdist", "renorm", "logsumexp")
FP32_SET_OPT_DTYPE = ("prod", "softmax", "log_softmax", "cumprod", "cumsum", "linalg_vector_norm",
                      "linalg_matrix_norm", "sum")
PROMOTE = ("addcdiv", "addcmul", "atan2", "bilinear", "cross", "dot", "grid_sampler", "index_put", "scatter_add",
           "tensordot")
LOWER_DTYPES = (torch.float16, torch.bfloat16)
EMULATED_DEVICES = ("meta", "cuda")


def _policy() -> dict:
    """torch function object -> policy, for every spelling of each listed op (torch.x, Tensor.x,
    Tensor.__x__, F.x, torch._C._nn.x)."""
    out = {}
    for policy, names in (("lower", LOWER_PRECISION_FP), ("fp32", FP32), ("fp32_opt", FP32_SET_OPT_DTYPE),
                          ("promote", PROMOTE)):
        for name in names:
            for home in (torch, torch.Tensor, F, torch._C._nn, torch.linalg):
                for attr in (name, f"__{name}__", f"__r{name}__"):
                    fn = getattr(home, attr, None)
                    if callable(fn):
                        out[fn] = policy
    return out


@dataclass
class State:
    """The emulated autocast thread-local state: a stack of (enabled, dtype) and the cast cache."""
    stack: list = field(default_factory=list)
    cache: dict = field(default_factory=dict)     # id(leaf) -> (leaf, its cast)
    casts: int = 0                                 # casts made (for tests and notes)

    @property
    def enabled(self) -> bool:
        return bool(self.stack) and self.stack[-1][0]

    @property
    def dtype(self):
        return self.stack[-1][1] if self.stack else torch.bfloat16


STATE = State()


def _eligible(t) -> bool:
    return isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64


def cached_cast(t, dtype):
    """autocast_mode.cpp cached_cast: cache float32 leaves requiring grad (not views) cast to the
    lower dtype; anything else, a frozen weight included, is cast anew on every call."""
    if not _eligible(t) or t.dtype == dtype:
        return t
    if dtype in LOWER_DTYPES and t.dtype == torch.float32 and t.requires_grad and t.is_leaf and not t._is_view():
        hit = STATE.cache.get(id(t))
        if hit is not None and hit[0] is t:
            return hit[1]
        out = t.to(dtype)
        STATE.cache[id(t)] = (t, out)
        STATE.casts += 1
        return out
    STATE.casts += 1
    return t.to(dtype)


class CudaAutocastMode(TorchFunctionMode):
    """Casts the inputs of listed ops while the emulated region is enabled."""

    def __init__(self):
        super().__init__()
        self.policy = _policy()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not STATE.enabled:
            return func(*args, **kwargs)
        if func is F.cross_entropy or func is torch._C._nn.cross_entropy_loss:
            x = args[0] if args else kwargs.get("input")
            if _eligible(x) and x.dtype in LOWER_DTYPES:
                return _cross_entropy_fp32(*args, **kwargs)
            return func(*args, **kwargs)
        policy = self.policy.get(func)
        if policy == "lower":
            dtype = STATE.dtype
            args, kwargs = tree_map(lambda t: cached_cast(t, dtype), (args, kwargs))
        elif policy == "fp32":
            args, kwargs = tree_map(lambda t: cached_cast(t, torch.float32), (args, kwargs))
        elif policy == "fp32_opt":
            first = args[0] if args else None
            if _eligible(first) and first.dtype in LOWER_DTYPES and kwargs.get("dtype") is None \
                    and not _has_positional_dtype(func, args):
                kwargs = {**kwargs, "dtype": torch.float32}
        elif policy == "promote":
            floats = [t for t in (*args, *kwargs.values()) if _eligible(t)]
            if floats:
                widest = max((t.dtype for t in floats), key=lambda d: torch.finfo(d).bits)
                args, kwargs = tree_map(lambda t: cached_cast(t, widest), (args, kwargs))
        return func(*args, **kwargs)


def _has_positional_dtype(func, args) -> bool:
    return any(isinstance(a, torch.dtype) for a in args[1:])


def _cross_entropy_fp32(input, target, weight=None, size_average=None, ignore_index=-100, reduce=None,
                        reduction="mean", label_smoothing=0.0):
    """cross_entropy's CompositeImplicit kernel under CUDA autocast: log_softmax(dim=1) gets
    dtype=float32 (fp32_set_opt_dtype), nll_loss runs in float32."""
    if label_smoothing:
        raise NotImplementedError("label smoothing under emulated autocast")
    logp = torch.log_softmax(input, 1, dtype=torch.float32)
    return F.nll_loss(logp, target, weight, None, ignore_index, None, reduction)


_MODE: list = []


class EmulatedAutocast:
    """torch.autocast for the emulated device: pushes (enabled, dtype), activates the casting mode
    for the outermost region, clears the cache when the outermost region exits."""

    def __init__(self, device_type="cuda", dtype=None, enabled=True, cache_enabled=None):
        self.device_type = device_type
        self.dtype = dtype if dtype is not None else (STATE.dtype if STATE.stack else torch.bfloat16)
        self.enabled = bool(enabled)

    def __enter__(self):
        STATE.stack.append((self.enabled, self.dtype))
        if len(STATE.stack) == 1:
            mode = CudaAutocastMode()
            mode.__enter__()
            _MODE.append(mode)
        return self

    def __exit__(self, *exc):
        STATE.stack.pop()
        if not STATE.stack:
            STATE.cache.clear()          # autocast_mode.cpp clear_cache on the outermost exit
            _MODE.pop().__exit__(*exc)
        return False

    def __call__(self, func):
        import functools

        @functools.wraps(func)
        def wrapped(*args, **kwargs):
            with EmulatedAutocast(self.device_type, self.dtype, self.enabled):
                return func(*args, **kwargs)
        return wrapped


@contextmanager
def emulate_cuda_autocast():
    """Route torch.autocast("meta"/"cuda") to the emulation while a simulated step runs."""
    saved = (torch.autocast, torch.amp.autocast, torch.is_autocast_enabled, torch.get_autocast_dtype,
             torch.amp.is_autocast_available)
    original_autocast, _, original_enabled, original_dtype, original_available = saved

    def autocast(device_type, dtype=None, enabled=True, cache_enabled=None):
        if device_type in EMULATED_DEVICES:
            return EmulatedAutocast(device_type, dtype, enabled, cache_enabled)
        return original_autocast(device_type, dtype=dtype, enabled=enabled, cache_enabled=cache_enabled)

    def is_autocast_enabled(device_type=None):
        if device_type is None or device_type in EMULATED_DEVICES:
            return STATE.enabled
        return original_enabled(device_type)

    def get_autocast_dtype(device_type):
        if device_type in EMULATED_DEVICES:
            return STATE.dtype
        return original_dtype(device_type)

    def is_autocast_available(device_type):
        return device_type in EMULATED_DEVICES or original_available(device_type)

    torch.autocast = torch.amp.autocast = autocast
    torch.is_autocast_enabled = is_autocast_enabled
    torch.get_autocast_dtype = get_autocast_dtype
    torch.amp.is_autocast_available = is_autocast_available
    try:
        yield STATE
    finally:
        (torch.autocast, torch.amp.autocast, torch.is_autocast_enabled, torch.get_autocast_dtype,
         torch.amp.is_autocast_available) = saved
        STATE.stack.clear()
        STATE.cache.clear()
        while _MODE:
            _MODE.pop().__exit__(None, None, None)


def sdpa_casting(sdpa):
    """F.scaled_dot_product_attention is replaced by a Python function in a simulation
    (kernels.SdpaRouting), which a torch-function mode does not see: cast its q, k, v (and a
    floating mask) here, as the lower_precision_fp entry does."""
    def scaled_dot_product_attention(query, key, value, *args, **kwargs):
        if STATE.enabled:
            query, key, value = (cached_cast(t, STATE.dtype) for t in (query, key, value))
        return sdpa(query, key, value, *args, **kwargs)
    return scaled_dot_product_attention


@contextmanager
def sdpa_autocast():
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = sdpa_casting(original)
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original
