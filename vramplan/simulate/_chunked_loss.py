"""TRL's fused lm_head + chunked NLL (the SFTTrainer default loss), for simulate.

With TRL installed (`pip install 'vramplan[trl]'`) its own `trl.trainer.utils.add_fused_lm_head`
patches the model, and on the meta device `trl_cuda_path` steers TRL's own code down its CUDA
path (what the meta device stands in for). Without it, this module is an op-for-op stand-in for TRL 1.16's CUDA path
(trl/trainer/utils.py add_fused_lm_head `_fused_forward`; trl/kernels/chunked_logprob.py
ChunkedLogProbFunction with the Triton folds, compact=True; docs/recipes.md#trl-chunked-loss):
the same tensors are allocated, saved and freed in the same order; the Triton kernels, which
update their tile and statistics in place, are in-place no-ops here. Only "log_probs",
"entropy" and "is_top1" are computed, the outputs SFTTrainer asks for.
"""
from __future__ import annotations

import types
from contextlib import contextmanager

import torch

from vramplan.core._errors import UsageError

TOKEN_CHUNK_SIZE = 4096       # trl/kernels/chunked_logprob.py
VOCAB_CHUNK_SIZE = 32768      # trl/trainer/utils.py _CHUNKED_LOGPROB_CHUNK_SIZE


def trl_available() -> bool:
    try:
        import trl.trainer.utils  # noqa: F401
    except Exception:
        return False
    return True


class ChunkedLogProb(torch.autograd.Function):
    """ChunkedLogProbFunction, CUDA path, outputs ("log_probs", "entropy", "is_top1")."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets):
        ctx.set_materialize_grads(False)
        device, N, vocab = hidden.device, hidden.shape[0], weight.shape[0]
        compute_dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled() else hidden.dtype
        f32 = dict(device=device, dtype=torch.float32)
        running_max = torch.full((N,), float("-inf"), **f32)
        sum_exp, x_sum_exp, sq_sum_exp, z_sum = (torch.zeros((N,), **f32) for _ in range(4))
        max_before_target = torch.full((N,), float("-inf"), **f32)
        target_logit = torch.zeros((N,), **f32)
        mm_buf = torch.empty((min(N, TOKEN_CHUNK_SIZE), VOCAB_CHUNK_SIZE), device=device, dtype=compute_dtype)
        for start_t in range(0, N, TOKEN_CHUNK_SIZE):
            end_t = min(start_t + TOKEN_CHUNK_SIZE, N)
            hidden_chunk = hidden[start_t:end_t].to(compute_dtype)
            for start in range(0, vocab, VOCAB_CHUNK_SIZE):
                end = min(start + VOCAB_CHUNK_SIZE, vocab)
                tile = mm_buf[:end_t - start_t, :end - start]
                torch.mm(hidden_chunk, weight[start:end].to(compute_dtype).t(), out=tile)
                if bias is not None:
                    tile.add_(bias[start:end].to(compute_dtype))
                # _forward_kernel (Triton) folds the tile into the statistics in place
        log_z = running_max + torch.log(sum_exp)
        logprobs = target_logit - log_z
        entropy = log_z - x_sum_exp / sum_exp
        is_top1 = (target_logit >= running_max) & (target_logit > max_before_target)
        ctx.save_for_backward(hidden, weight, bias, targets, log_z, entropy)
        ctx.compute_dtype = compute_dtype
        ctx.mark_non_differentiable(is_top1)
        return logprobs, entropy, is_top1

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy, _):
        hidden, weight, bias, targets, log_z, entropy = ctx.saved_tensors
        cd = ctx.compute_dtype
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        N, vocab = hidden.shape[0], weight.shape[0]
        grad_hidden = torch.zeros(hidden.shape, device=hidden.device, dtype=torch.float32) if need_h else None
        grad_weight = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if need_w else None
        grad_bias = torch.zeros(bias.shape, device=bias.device, dtype=torch.float32) if need_b else None
        mm_buf = torch.empty((min(N, TOKEN_CHUNK_SIZE), VOCAB_CHUNK_SIZE), device=hidden.device, dtype=cd)
        grad_logprobs = grad_logprobs.float().contiguous() if grad_logprobs is not None else None
        for start_t in range(0, N, TOKEN_CHUNK_SIZE):
            end_t = min(start_t + TOKEN_CHUNK_SIZE, N)
            hidden_chunk = hidden[start_t:end_t].to(cd)
            for start in range(0, vocab, VOCAB_CHUNK_SIZE):
                end = min(start + VOCAB_CHUNK_SIZE, vocab)
                w_chunk = weight[start:end].to(cd)
                tile = mm_buf[:end_t - start_t, :end - start]
                torch.mm(hidden_chunk, w_chunk.t(), out=tile)
                # _backward_kernel (Triton) turns the tile into the logits gradient in place;
                # _addmm_fp32 on CUDA: torch.addmm(acc, a, b, out_dtype=float32, out=acc), no copies
                if grad_hidden is not None:
                    _addmm_fp32(grad_hidden[start_t:end_t], tile, w_chunk)
                if grad_weight is not None:
                    _addmm_fp32(grad_weight[start:end], tile.t(), hidden_chunk)
                if grad_bias is not None:
                    grad_bias[start:end] += tile.sum(dim=0, dtype=torch.float32)
        return (grad_hidden.to(hidden.dtype) if grad_hidden is not None else None,
                grad_weight.to(weight.dtype) if grad_weight is not None else None,
                grad_bias.to(bias.dtype) if grad_bias is not None else None, None)


def _addmm_fp32(acc, a, b) -> None:
    """trl/kernels/chunked_logprob.py _addmm_fp32: on CUDA with 16-bit operands (torch >= 2.8)
    torch.addmm(acc, a, b, out_dtype=float32, out=acc), which allocates nothing; otherwise TRL
    upcasts both operands (acc.addmm_(a.float(), b.float())). On meta nothing is computed."""
    if acc.device.type == "meta":
        return
    if acc.device.type == "cuda" and a.dtype in (torch.float16, torch.bfloat16):
        # not the upcast: a.float() of a 4096 x 32768 tile and of a 32768-row weight chunk
        # would add their float32 copies to the backward peak (measured on an H200: +0.45 GiB)
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
        return
    acc.addmm_(a.float(), b.float())


def _nonzero_on_meta(mask):
    """Boolean indexing runs nonzero(), whose size depends on the data: on meta it is made with
    every element true, which is the batch vramplan models (no padding: every label counts)."""
    import contextlib

    if mask.device.type != "meta":
        return contextlib.nullcontext()
    import torch.fx.experimental._config as fx_config
    return fx_config.patch(meta_nonzero_assume_all_nonzero=True)


class _InPlaceFold:
    """A Triton fold of TRL's chunked log-prob (`_forward_kernel[grid](...)`, `_backward_kernel`):
    it updates its tile and per-token statistics in place, so on meta it is a no-op."""

    def __getitem__(self, _grid):
        return lambda *args, **kwargs: None


@contextmanager
def trl_cuda_path(device: str):
    """TRL's own chunked loss on the meta device, down the path it takes on CUDA: on meta,
    trl/kernels/chunked_logprob.py `_use_triton` is False (so every position would be scored, not
    the labelled ones: `compact` in add_fused_lm_head), `_addmm_fp32` would upcast both operands
    (CUDA's `torch.addmm(..., out_dtype=float32, out=acc)` allocates nothing), and
    `torch.is_autocast_enabled("meta")` raises. For the step's duration: `_use_triton` is True on
    meta, the Triton folds are in-place no-ops (_InPlaceFold), `_addmm_fp32` is this module's
    (nothing on meta), autocast's state for "meta" is CUDA's (the emulated one under --amp), and
    boolean indexing on meta keeps every position (_nonzero_on_meta: the batch has no padding).
    A no-op off the meta device or without TRL."""
    if device != "meta" or not trl_available():
        yield
        return
    import torch.fx.experimental._config as fx_config
    from trl.kernels import chunked_logprob as kernels
    from trl.trainer import utils as trainer_utils

    real_triton = kernels._use_triton
    uses_triton = lambda d: d.type == "meta" or real_triton(d)  # noqa: E731
    enabled, dtype = torch.is_autocast_enabled, torch.get_autocast_dtype
    patches = [(kernels, "_use_triton", uses_triton), (trainer_utils, "_use_triton", uses_triton),
               (kernels, "_forward_kernel", _InPlaceFold()), (kernels, "_backward_kernel", _InPlaceFold()),
               (kernels, "_addmm_fp32", _addmm_fp32),
               (torch, "is_autocast_enabled", lambda device_type=None: enabled() if device_type is None else enabled(
                   "cuda" if device_type == "meta" else device_type)),
               (torch, "get_autocast_dtype", lambda device_type: dtype("cuda" if device_type == "meta" else device_type))]
    if not hasattr(kernels, "triton"):     # torch without Triton: only its grid helper is read
        patches.append((kernels, "triton", types.SimpleNamespace(cdiv=lambda a, b: -(-a // b))))
    saved = [(module, name, getattr(module, name, None), hasattr(module, name)) for module, name, _ in patches]
    for module, name, value in patches:
        setattr(module, name, value)
    try:
        with fx_config.patch(meta_nonzero_assume_all_nonzero=True):
            yield
    finally:
        for module, name, value, had in reversed(saved):
            if had:
                setattr(module, name, value)
            else:
                delattr(module, name)


def add_fused_lm_head(model) -> None:
    """trl.trainer.utils.add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1")) as
    SFTTrainer calls it, the real one when TRL is installed. Both take the last hidden state from
    `model.base_model`; a model class whose base_model is itself (Llama4ForCausalLM) cannot run
    it (estimate/_inventory.py refuse_fused_head), which is said here for any model."""
    if model.base_model is model:
        raise UsageError(f"--loss chunked cannot run on {type(model).__name__}: TRL's fused lm_head reads the "
                         "hidden states from model.base_model, which for this model class is the causal LM itself",
                         hint="use --loss full")
    if trl_available():
        from trl.trainer.utils import add_fused_lm_head as trl_add
        trl_add(model, outputs=("log_probs", "entropy", "is_top1"))
        return
    original_forward = model.forward

    def _fused_forward(self, *args, fused_lm_head=False, labels=None, **kwargs):
        if not fused_lm_head:
            return original_forward(*args, labels=labels, **kwargs)
        kwargs["use_cache"] = False
        backbone_outputs = self.base_model(*args, **kwargs)
        hidden_states = backbone_outputs.last_hidden_state[:, :-1]
        labels = labels[:, 1:]
        lm_head = self.get_output_embeddings()
        mask = labels != -100
        with _nonzero_on_meta(mask):
            rows, targets = hidden_states[mask], labels[mask]
        logprobs, entropy, is_top1 = ChunkedLogProb.apply(rows, lm_head.weight, lm_head.bias, targets)
        log_probs, entropy, is_top1 = (x.new_zeros(mask.shape).masked_scatter(mask, x)
                                       for x in (logprobs, entropy, is_top1))
        loss = -log_probs.sum() / mask.sum().clamp(min=1)
        return types.SimpleNamespace(loss=loss, log_probs=log_probs, entropy=entropy, is_top1=is_top1,
                                     label_mask=mask)

    model.forward = types.MethodType(_fused_forward, model)
