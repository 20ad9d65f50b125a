"""The allocation tracker on its own, with hand-made tensors: no model, no transformers."""
from __future__ import annotations

import pytest
from conftest import requires

pytestmark = requires("torch")

import torch  # noqa: E402

from vramplan.simulate._tracker import GRANULARITY, AllocationTracker, round_up  # noqa: E402


def meta(*shape, dtype=None):
    return torch.empty(*shape, dtype=dtype or torch.float32, device="meta")


@pytest.mark.parametrize("nbytes, rounded", [(0, 0), (1, 512), (511, 512), (512, 512), (513, 1024),
                                              (4000, 4096), (2**20 + 1, 2**20 + 512)])
def test_round_up_to_caching_allocator_granularity(nbytes, rounded):
    assert GRANULARITY == 512
    assert round_up(nbytes) == rounded


def test_allocations_frees_and_peak():
    tracker = AllocationTracker("meta")
    with tracker:
        a = meta(100)            # 400 B -> 512
        b = meta(1000)           # 4000 B -> 4096
        assert tracker.allocated == 512 + 4096
        del a
        assert tracker.allocated == 4096
        c = b * 2                # a new storage
        assert tracker.allocated == 2 * 4096
        del b, c
    assert tracker.allocated == 0
    assert tracker.peak.bytes == 2 * 4096
    assert [blk.size for blk in tracker.blocks] == [512, 4096, 4096]
    assert all(blk.free_event is not None for blk in tracker.blocks)
    peak_live = tracker.live_at(tracker.peak.event)
    assert sum(blk.size for blk in peak_live) == tracker.peak.bytes


def test_views_share_a_storage():
    tracker = AllocationTracker("meta")
    with tracker:
        a = meta(64, 64)                   # 16 KiB
        views = [a[1:], a.t(), a.view(-1), a[:, :3], a.unsqueeze(0), a.transpose(0, 1)]
        assert tracker.allocated == 16384
        a.mul_(2)                          # in place: nothing new
        assert tracker.allocated == 16384
        del a                              # the views keep the storage alive
        assert tracker.allocated == 16384
        del views
    assert tracker.allocated == 0
    assert len(tracker.blocks) == 1


def test_multiple_outputs_and_out_resize():
    tracker = AllocationTracker("meta")
    with tracker:
        x = meta(256)
        values, indices = torch.sort(x)    # two new storages: fp32 and int64
        assert tracker.allocated == 1024 + 1024 + 2048
        out = meta(0)
        torch.add(x, x, out=out)           # out= resizes an empty storage to 1 KiB
        assert tracker.allocated == 1024 + 1024 + 2048 + 1024
        del values, indices, out, x


def test_live_state_strays_and_ignored():
    weight = meta(256)                     # made before the tracker: not counted unless tracked
    host = torch.ones(4)                   # cpu: another device, never counted
    unknown = meta(512)
    tracker = AllocationTracker("meta", strays="count")
    tracker.track(weight, "weights")
    assert tracker.allocated == 1024
    paged = meta(1024)
    tracker.ignore(paged)
    with tracker:
        y = weight + 1
        _ = host + 1
        paged.add_(1)                      # ignored: no stray, no count
        z = unknown * 2                    # unknown was live all along: a stray
    assert [b.tag for b in tracker.strays] == ["stray"]
    assert tracker.allocated == 1024 + 1024 + 2048 + 2048
    assert tracker.block_of(weight).tag == "weights"
    assert tracker.block_of(y).tag is None
    tracker.retag(y, "gradients")
    assert tracker.block_of(y).tag == "gradients"
    del z


def test_context_is_recorded_and_tagging_wins():
    where = {"phase": "forward"}
    tracker = AllocationTracker("meta", context=lambda: (where["phase"], "mod", None))
    with tracker:
        a = meta(10)
        where["phase"] = "backward"
        with tracker.tagging("temporaries"):
            b = meta(10)
    assert tracker.block_of(a).where == ("forward", "mod", None)
    assert tracker.block_of(b).where[0] == "backward"
    assert tracker.block_of(b).tag == "temporaries"
    assert tracker.phase_max == {"forward": 512, "backward": 1024}
    assert tracker.timeline[-1][-1] == 1024


def test_override_stand_in_counts_its_temporaries():
    """A stand-in kernel runs sub-ops through tracker.run; their transient buffers raise the peak."""
    def fat_mm(tracker, func, args, kwargs):
        with tracker.tagging("temporaries"):
            workspace = tracker.run(torch.ops.aten.empty.memory_format, ((1024,),),
                                    dict(dtype=torch.float32, device=args[0].device))
        out = tracker.run(func, args, kwargs)
        del workspace
        return out

    tracker = AllocationTracker("meta", overrides={torch.ops.aten.mm.default: fat_mm})
    with tracker:
        a, b = meta(8, 8), meta(8, 8)
        c = a @ b
    assert tracker.allocated == 3 * 512
    assert tracker.peak.bytes == 3 * 512 + 4096   # the workspace was live with the output
    assert tracker.peak.op == "aten.mm.default"
    assert max(row[-1] for row in tracker.timeline) == tracker.peak.bytes
    del c


def test_real_cpu_tensors_count_the_same_way():
    tracker = AllocationTracker("cpu", strays="ignore")
    with tracker:
        a = torch.randn(1000)              # 4000 B -> 4096
        b = a[::2].contiguous()            # 2000 B -> 2048
        c = torch.tensor([1.0, 2.0])       # made from Python data: a host-side stray, ignored
        d = c * 3                          # a new storage from an op: 8 B -> 512
        assert tracker.allocated == 4096 + 2048 + 512
        del a, b, c, d
    assert tracker.allocated == 0


def _tied_step(amp: bool, tracker=None) -> tuple[list, torch.Tensor]:
    """A tied embedding used at the bottom and as lm_head on top, as a causal LM uses it: the
    embedding's gradient reaches the weight's AccumulateGrad last, after lm_head's. Returns the
    aten add ops the backward ran after embedding_dense_backward (under the torch profiler: no
    Python dispatch mode, no hook) and the weight."""
    import torch.nn.functional as F
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    V, H = 1000, 64
    w = torch.randn(V, H, requires_grad=True)
    lin = torch.nn.Linear(H, H)
    ids = torch.randint(0, V, (2, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        h = F.embedding(ids, w)
        h = torch.tanh(lin(h)) + h
        loss = F.linear(h, w).float().logsumexp(-1).mean()
    if tracker is not None:
        with tracker:
            loss.backward()
        return [], w
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        loss.backward()
    names = [e.name for e in prof.events()]
    last = max(i for i, n in enumerate(names) if n == "aten::embedding_dense_backward")
    return [n for n in names[last:] if n in ("aten::add", "aten::add_")], w


@pytest.mark.parametrize("amp, op", [(False, "aten::add"), (True, "aten::add_")])
def test_a_tied_embeddings_two_gradients_are_summed_as_torch_does(amp, op):
    """docs/autograd.md#gradient-accumulation, checked on the installed torch
    without any Python dispatch mode: lm_head's gradient is TBackward0's view (a new tensor for
    the sum), or under autocast ToCopyBackward0's float32 copy (reused in place)."""
    assert _tied_step(amp)[0] == [op]


@pytest.mark.parametrize("amp", [False, True])
def test_the_tracker_replays_the_tied_sum_as_a_run_without_it(amp):
    """Under the tracking mode the engine would always make a new tensor for the sum; the
    stand-in (kernels.engine_accumulation) keeps what a run without the mode does: at the sum,
    beside lm_head's gradient, the embedding's and (out of place) the new one."""
    from vramplan.simulate._kernels import mode_overrides

    tracker = AllocationTracker("cpu", overrides=mode_overrides(), strays="ignore")
    _, w = _tied_step(amp, tracker)
    E = round_up(w.numel() * 4)
    at_embedding = [blk for blk in tracker.live_at(tracker.peak.event) if blk.size == E]
    assert len(at_embedding) == (2 if amp else 3)
    assert tracker.peak.op in ("aten.add.Tensor", "aten.embedding_dense_backward.default")


def _norm_residual_lora_step(tracker=None):
    """A decoder layer's sums in small: LlamaRMSNorm's float32 input gets its gradient through
    the product and through the variance, the normalized input through a frozen projection and a
    float32 LoRA path, the layer input through the residual and the norm. Returns the aten add
    ops the backward ran (torch.profiler: no Python dispatch mode), or the input's gradient when
    the tracker watches the backward."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    T, H, r = 64, 256, 8
    x = torch.randn(T, H, dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(H, H, dtype=torch.bfloat16) * 0.05
    lora_a = (torch.randn(r, H) * 0.05).requires_grad_(True)
    lora_b = torch.full((H, r), 0.01, requires_grad=True)
    x32 = x.float()
    normed = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype)
    out = normed @ w.t() + ((normed.float() @ lora_a.t()) @ lora_b.t()).to(x.dtype)
    loss = (x + out).float().pow(2).mean()
    if tracker is not None:
        with tracker:
            loss.backward()
        return x.grad
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        loss.backward()
    return [e.name for e in prof.events() if e.name in ("aten::add", "aten::add_")]


def test_the_engine_adds_a_second_gradient_into_the_buffered_one_without_a_dispatch_mode():
    """input_buffer.cpp accumulate on the installed torch, no mode: each of the three sums (the
    float32 norm input, the normalized input, the layer input) is aten::add_ into the buffered
    gradient (docs/autograd.md#gradient-accumulation)."""
    assert _norm_residual_lora_step() == ["aten::add_"] * 3


def test_the_tracker_replays_the_engines_sums_in_place_as_a_run_without_it():
    """Under the tracking mode each sum would be a new tensor (aten.add.Tensor); with
    kernels.engine_accumulation none is, and the gradient is the same."""
    from vramplan.simulate._kernels import mode_overrides

    plain = AllocationTracker("cpu", strays="ignore")
    expected = _norm_residual_lora_step(plain)
    assert [b.op for b in plain.blocks].count("aten.add.Tensor") == 3
    tracker = AllocationTracker("cpu", overrides=mode_overrides(), strays="ignore")
    grad = _norm_residual_lora_step(tracker)
    assert torch.equal(grad, expected)
    assert "aten.add.Tensor" not in [b.op for b in tracker.blocks]
    assert len(tracker.blocks) == len(plain.blocks) - 3


def _masked_index_backward(tracker=None):
    """The gradient of `h[:, :-1][mask]` (TRL's chunked loss selects the labelled rows so): the
    aten ops IndexBackward0 runs without a dispatch mode (torch.profiler), or the storages the
    tracker counted under it."""
    from torch.profiler import ProfilerActivity, profile

    h = torch.randn(2, 9, 4, requires_grad=True)
    mask = torch.ones(2, 8, dtype=torch.bool)
    y = h[:, :-1][mask]
    if tracker is not None:
        with tracker:
            y.backward(torch.ones_like(y))
        return h.grad
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        y.backward(torch.ones_like(y))
    return [(e.name, e.cpu_memory_usage) for e in prof.events()
            if e.cpu_parent is not None and e.cpu_parent.name == "IndexBackward0"]


def test_a_masked_index_gradient_is_scattered_in_place_without_a_dispatch_mode():
    """FunctionsManual.cpp index_backward on plain tensors, on the installed torch: new_zeros,
    then the in-place _index_put_impl_, which allocates nothing."""
    assert _masked_index_backward() == [("aten::new_zeros", 2 * 8 * 4 * 4), ("aten::_index_put_impl_", 0)]


def test_the_tracker_replays_the_masked_index_gradient_as_a_run_without_it():
    """Under the tracking mode index_backward takes the out-of-place index_put (every tensor is
    subclass-like while a Python mode is active), a second buffer of the input's size; the
    stand-in (kernels.index_accumulation) scatters into the zeros, as a run without the mode
    does, with the same gradient."""
    from vramplan.simulate._kernels import mode_overrides

    plain = AllocationTracker("cpu", strays="ignore")
    expected = _masked_index_backward(plain)
    tracker = AllocationTracker("cpu", overrides=mode_overrides(), strays="ignore")
    grad = _masked_index_backward(tracker)
    assert torch.equal(grad, expected)
    ops = [b.op for b in tracker.blocks]
    assert "aten.index_put.default" in [b.op for b in plain.blocks]
    assert "aten.index_put.default" not in ops and "aten.new_zeros.default" in ops


def _ops_twice(tracker):
    """The same ops twice over fresh inputs of the same layouts; the outputs' layouts."""
    layouts = []
    with tracker:
        for _ in range(2):
            x, w = meta(8, 16, dtype=torch.bfloat16), meta(32, 16, dtype=torch.bfloat16)
            outs = [x * 2, x + x, x * 2.0, torch.nn.functional.linear(x, w), x.float(), x.t().contiguous(),
                    torch.cat([x, x]), x.reshape(4, 32), x.view(-1), x.t().reshape(-1), *torch.sort(x.float())]
            outs[1].add_(1)
            layouts.append([(tuple(o.shape), o.stride(), o.dtype, o.untyped_storage().nbytes()) for o in outs])
            del x, w, outs
    return layouts, [(b.size, b.nbytes, b.alloc_event, b.free_event, b.op) for b in tracker.blocks]


def test_meta_layouts_answer_repeated_ops_as_their_kernels():
    """kernels.MetaLayouts: an op's second call with the same argument layouts gets new tensors of
    the layouts its kernel made, the same storages counted in the same order; views, in-place ops
    and out-of-place reshapes of a non-contiguous tensor still run (or are never replayed)."""
    from vramplan.simulate._kernels import MetaLayouts
    from vramplan.simulate._oplog import StepTracker

    layouts = MetaLayouts()
    with_cache = _ops_twice(StepTracker("meta", layouts=layouts))
    assert with_cache == _ops_twice(StepTracker("meta"))
    assert with_cache[0][0] == with_cache[0][1]
    known = {key[0].__name__: value for key, value in layouts._known.items()}
    assert known["mul.Tensor"] is not None and known["sort.default"] is not None
    assert "view.default" not in known and "add_.Tensor" not in known    # a view, an in-place op
    assert known["_unsafe_view.default"] is None      # its output shares the input's storage


def test_meta_layouts_keep_scalar_types_and_the_default_dtype_apart():
    """An int tensor times 2 stays int, times 2.0 is the default float dtype: neither answers the
    other, nor does a call under another default dtype."""
    from vramplan.simulate._kernels import MetaLayouts
    from vramplan.simulate._oplog import StepTracker

    tracker = StepTracker("meta", layouts=MetaLayouts())
    with tracker:
        ints = meta(4, dtype=torch.int64)
        dtypes = [(ints * 2).dtype, (ints * 2.0).dtype, (ints * True).dtype]
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)
        try:
            dtypes.append((ints * 2.0).dtype)
        finally:
            torch.set_default_dtype(previous)
    assert dtypes == [torch.int64, torch.float32, torch.int64, torch.float64]


def test_tensors_in_walks_arguments_as_pytree_does():
    from torch.utils._pytree import tree_leaves

    from vramplan.simulate._tracker import tensors_in

    a, b, c = meta(1), meta(2), torch.ones(3)
    trees = [a, 3, None, (a, [b, 1.5, (c,)], {"x": b, "y": [a]}), torch.sort(meta(4)), ([], (), {}),
             ((a, b), {"out": c, "dtype": torch.float16})]
    for tree in trees:
        assert [id(t) for t in tensors_in(tree)] == [id(t) for t in tree_leaves(tree) if isinstance(t, torch.Tensor)]


def test_the_collector_is_paused_inside_and_left_as_it_was():
    import gc

    from vramplan.simulate._step import collector_paused

    assert gc.isenabled()
    with collector_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    gc.disable()
    try:
        with collector_paused():
            assert not gc.isenabled()
        assert not gc.isenabled()
    finally:
        gc.enable()
