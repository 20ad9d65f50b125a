"""The autograd walk (vramplan/estimate/_walk.py) on small hand-made op lists, torch-free.

Each expected figure is worked out by hand in the comments from PyTorch's rules
(docs/autograd.md): a storage dies after its last forward use unless an op saved it for backward
(#when-storages-die); a saved tensor is released once its node's backward has run; a second
gradient for one tensor is added in place into the buffered one, or summed into a new buffer
while another input shares it (#gradient-accumulation); non-reentrant checkpointing saves nothing in forward
and recomputes up to the last op that saves a tensor, then its frames unwind
(#non-reentrant-checkpointing). Sizes are multiples of 512 B unless a test is about rounding, so
the caching allocator's 512 B block (symbolic.BLOCK, docs/allocator.md#constants) does not blur
the arithmetic.
"""
from __future__ import annotations

from hypothesis import given, settings, strategies as st

from vramplan.estimate._symbolic import B, S, variables
from vramplan.estimate._walk import ACT, GRAD, TMP, Op, Tensor, walk

KiB = 1024


def run(ops, given, batch=1, seq=1, **kw):
    return walk(ops, given, **kw).replay(variables(batch, seq))


def silu_then_norm(silu_saves: tuple):
    # silu(x) -> h, saves its input x (derivatives.yaml silu_backward(grad, self));
    # norm(h) -> n saves nothing here (a stand-in for an op whose backward needs only sizes)
    return [Op("silu", ("x",), (Tensor("h", 1 * KiB),), saves=silu_saves, grads=(("x", 1 * KiB),)),
            Op("norm", ("h",), (Tensor("n", 1 * KiB),), grads=(("h", 1 * KiB),))]


def test_a_saved_tensor_lives_until_its_backward_and_a_local_dies_after_its_last_use():
    r = run(silu_then_norm(("x",)), {"x": 1 * KiB}, keep=("n",), backward=True, grad_of={"n": 1 * KiB},
            needs_grad=frozenset({"x"}))
    # forward: x 1K; silu allocates h -> 2K; x is saved, so it stays; norm allocates n -> 3K
    # (the peak, marked while the op runs); h's last use was norm and nobody saved it -> dropped: x + n
    assert r.forward_peak == {ACT: 3 * KiB} and r.forward_peak_op == "norm"
    assert r.forward_end == {ACT: 2 * KiB}
    # backward: grad(n) 1K -> 3K; norm.backward allocates grad(h) 1K -> 4K (the peak), frees grad(n) -> 3K;
    # silu.backward allocates grad(x) -> 4K (not higher), frees grad(h) and its saved x -> 2K
    assert r.backward_peak == {ACT: 4 * KiB} and r.backward_peak_op == "norm.backward"
    assert r.end == {ACT: 2 * KiB}          # n (kept by the caller) + grad(x)


def test_an_unsaved_input_dies_after_its_last_forward_use():
    r = run(silu_then_norm(()), {"x": 1 * KiB}, keep=("n",))
    # x is freed right after silu (its last use, not saved): silu peak x + h = 2K, then
    # norm: h + n = 2K, h dies -> n alone
    assert r.forward_peak == {ACT: 2 * KiB} and r.forward_peak_op == "silu"
    assert r.end == {ACT: 1 * KiB}


def test_nothing_is_saved_when_no_input_needs_a_gradient():
    # silu would save x, but x does not require grad and the op has no trainable parameters:
    # autograd records no node, so x dies after silu (docs/autograd.md#saved-only-when-needed)
    assert run(silu_then_norm(("x",)), {"x": 1 * KiB}, keep=("n",)).forward_peak == {ACT: 2 * KiB}
    needed = run(silu_then_norm(("x",)), {"x": 1 * KiB}, keep=("n",), needs_grad=frozenset({"x"}))
    assert needed.forward_peak == {ACT: 3 * KiB}          # x + h + n at norm


def test_an_output_nobody_reads_or_keeps_dies_after_its_op():
    r = run(silu_then_norm(()), {"x": 1 * KiB})
    assert r.end == {}          # n: no later op reads it, not kept -> freed after norm


def test_gradient_pass_through_allocates_nothing():
    # clone(x) -> y: backward hands grad(y) to x unchanged (grads bytes 0); a copy with its own
    # gradient buffer (grads bytes 1K) is the contrast
    def ops(grad_bytes):
        return [Op("clone", ("x",), (Tensor("y", 1 * KiB),), grads=(("x", grad_bytes),))]

    kw = dict(keep=("y",), backward=True, grad_of={"y": 1 * KiB}, needs_grad=frozenset({"x"}))
    through = run(ops(0), {"x": 1 * KiB}, **kw)
    # forward: x + y = 2K, x dies (unsaved) -> y; backward: y + grad(y) = 2K, and grad(y) becomes grad(x)
    assert through.forward_peak == {ACT: 2 * KiB} and through.forward_end == {ACT: 1 * KiB}
    assert through.backward_peak == {ACT: 2 * KiB} and through.end == {ACT: 2 * KiB}
    copied = run(ops(1 * KiB), {"x": 1 * KiB}, **kw)
    # y + grad(y) + grad(x) = 3K at clone.backward, then grad(y) is freed
    assert copied.backward_peak == {ACT: 3 * KiB} and copied.end == {ACT: 2 * KiB}


def test_a_second_gradient_is_added_in_place_into_the_buffered_one():
    ops = [Op("f", ("x",), (Tensor("a", 1 * KiB),), grads=(("x", 2 * KiB),)),
           Op("g", ("x",), (Tensor("b", 1 * KiB),), grads=(("x", 2 * KiB),))]
    r = run(ops, {"x": 2 * KiB}, keep=("a", "b"), backward=True, grad_of={"a": 1 * KiB, "b": 1 * KiB},
            needs_grad=frozenset({"x"}))
    # forward: x, a, b = 4K at g; x dies after g (its last use, unsaved) -> a + b
    assert r.forward_peak == {ACT: 4 * KiB} and r.forward_end == {ACT: 2 * KiB}
    # backward: a + b + grad(a) + grad(b) = 4K; g.backward: + grad(x)#1 -> 6K, grad(b) freed -> 5K;
    # f.backward: + grad(x)#2 -> 7K (the peak), grad(a) freed as f's apply returns -> 6K (engine.cpp
    # evaluate_function: a node's incoming gradients die before its results reach the next input
    # buffer); accumulate: the buffer holds the only reference to grad(x)#1, so #2 is added into it
    # (input_buffer.cpp, old_var.add_(var)) and freed -> 4K = a + b + grad(x). A new buffer for the
    # sum would have made 8K.
    assert r.backward_peak == {ACT: 7 * KiB} and r.backward_peak_op == "f.backward"
    assert r.end == {ACT: 4 * KiB}


def test_a_second_gradient_is_summed_out_of_place_while_another_input_shares_the_first():
    # s = add(x, y) hands grad(s) to x and y unchanged: both buffers hold one tensor, so when f's
    # gradient for x arrives the buffered one has another reference and the sum is a new tensor
    ops = [Op("f", ("x",), (Tensor("a", 1 * KiB),), grads=(("x", 1 * KiB),)),
           Op("add", ("x", "y"), (Tensor("s", 1 * KiB),), grads=(("x", 0), ("y", 0)))]
    r = run(ops, {"x": 1 * KiB, "y": 1 * KiB}, keep=("a", "s"), backward=True,
            grad_of={"a": 1 * KiB, "s": 1 * KiB}, needs_grad=frozenset({"x", "y"}))
    # forward: x, y, a, s = 4K at add; x and y die after it -> a + s
    assert r.forward_peak == {ACT: 4 * KiB} and r.forward_end == {ACT: 2 * KiB}
    # backward: a + s + grad(a) + grad(s) = 4K; add.backward: grad(s) becomes x's and y's;
    # f.backward: + grad(x)#2 -> 5K, grad(a) freed -> 4K; accumulate: grad(s) is y's too, so the
    # sum is a new buffer -> 5K, then grad(x)#2 freed and grad(s) stays as y's -> 4K
    assert r.backward_peak == {ACT: 5 * KiB}
    assert r.end == {ACT: 4 * KiB}


def test_checkpoint_recomputes_up_to_the_last_saving_op_and_frees_what_only_its_frames_held():
    ops = [Op("up", ("x",), (Tensor("h", 2 * KiB),), saves=("x",), grads=(("x", 1 * KiB),)),
           Op("act", ("h",), (Tensor("g", 2 * KiB),), saves=("h",), grads=(("h", 2 * KiB),)),
           Op("down", ("g",), (Tensor("y", 1 * KiB),), grads=(("g", 2 * KiB),))]   # saves nothing
    kw = dict(keep=("x", "y"), backward=True, grad_of={"y": 1 * KiB}, needs_grad=frozenset({"x"}))
    r = run(ops, {"x": 1 * KiB}, save=False, **kw)
    # forward, nothing saved: x 1K; up +h -> 3K; act +g -> 5K (peak), h dies -> 3K; down +y -> 4K,
    # g dies -> x + y = 2K
    assert r.forward_peak == {ACT: 5 * KiB} and r.forward_peak_op == "act"
    assert r.forward_end == {ACT: 2 * KiB}
    # backward: grad(y) -> 3K; down.backward needs nothing saved: + grad(g) 2K -> 5K, grad(y) freed -> 4K.
    # act.backward needs h: recompute up (+h -> 6K, saves x), then act, the last op that saves
    # anything; it saves only its input h, which autograd's generated code saves before the kernel
    # runs, so checkpoint's early stop raises before g is allocated (docs/autograd.md); 6K.
    # act.backward: + grad(h) 2K -> 8K (the peak), grad(g) and saved h freed -> 4K; up.backward:
    # + grad(x) -> 5K, grad(h) freed -> 4K; up's saved x released, the last saved tensor: the
    # checkpoint frame lets go of its input x -> 3K; y is kept by the caller
    assert r.backward_peak == {ACT: 8 * KiB} and r.backward_peak_op == "act.backward"
    assert r.end == {ACT: 2 * KiB}           # y + grad(x)
    # the recompute marks only up: act stops in its pack hook, and down is never re-run
    tape = walk(ops, {"x": 1 * KiB}, save=False, **kw)
    backward_marks = [e[1] for e in tape.events[tape.events.index((2,)):] if e[0] == 0]
    assert backward_marks == ["down.backward", "up", "act.backward", "up.backward"]
    # saving in forward instead: x (kept) and h saved; peak at act: x + h + g = 5K; end of forward
    # x + h + y = 4K (g dies, h saved); no recompute in backward
    saved = run(ops, {"x": 1 * KiB}, save=True, **kw)
    assert saved.forward_end == {ACT: 4 * KiB}
    # backward: 4K + grad(y) = 5K; down.backward + grad(g) -> 7K, - grad(y) -> 6K;
    # act.backward + grad(h) -> 8K, - grad(g) - h -> 4K; up.backward + grad(x) -> 5K
    assert saved.backward_peak == {ACT: 8 * KiB} and saved.backward_peak_op == "act.backward"


def test_frozen_input_gets_no_gradient_and_temporaries_and_parameter_gradients_are_tagged():
    # a LoRA-style op on a frozen input: its trainable parameters make its output require grad
    # (and it saves x); the dequantized weight is a temporary of the forward and of the backward
    ops = [Op("lora", ("x",), (Tensor("y", 1 * KiB),), saves=("x",), grads=(("x", 1 * KiB),),
              work=4 * KiB, bwd_work=4 * KiB, param_grads=1536)]
    r = run(ops, {"x": 1 * KiB}, keep=("y",), backward=True, grad_of={"y": 1 * KiB})
    # forward: x + y = 2K activations, + 4K temporary while the op runs
    assert r.forward_peak == {ACT: 2 * KiB, TMP: 4 * KiB} and r.forward_end == {ACT: 2 * KiB}
    # backward: x + y + grad(y) = 3K; + .grad 1536 B; x needs no gradient (nothing made it
    # require one), + 4K temporary during the backward
    assert r.backward_peak == {ACT: 3 * KiB, GRAD: 1536, TMP: 4 * KiB}
    # after: grad(y) and the saved x freed -> y + the parameter gradient
    assert r.end == {ACT: 1 * KiB, GRAD: 1536}


def test_buffers_made_before_the_outputs_are_freed_once_the_outputs_exist():
    # bitsandbytes' dequantize + F.linear: absmax (1K), the dequantized weight (4K), then the
    # output (2K); the two buffers die when the op returns, the output lives on
    ops = [Op("gemm", ("x",), (Tensor("y", 2 * KiB),), work_before=(1 * KiB, 4 * KiB))]
    tape = walk(ops, {"x": 1 * KiB}, keep=("y",))
    r = tape.replay(variables(1, 1))
    assert r.forward_peak == {ACT: 3 * KiB, TMP: 5 * KiB} and r.forward_end == {ACT: 2 * KiB}
    sizes = [size for size, _tag in tape.table]
    order = [(kind, sizes[event[1]].eval(variables(1, 1))) for event in tape.events if (kind := event[0]) in (1, -1)]
    # x (given), the buffers in order, then the output, then the buffers freed; x dies after its
    # last use
    assert order == [(1, 1 * KiB), (1, 1 * KiB), (1, 4 * KiB), (1, 2 * KiB), (-1, 1 * KiB), (-1, 4 * KiB),
                     (-1, 1 * KiB)]


def test_each_allocation_is_rounded_to_512_bytes_on_its_own():
    # 1000 B -> 1024, 1 B -> 512, 513 -> 1024: the sum of rounded sizes, not the rounded sum
    ops = [Op("a", ("x",), (Tensor("h", 1),)), Op("b", ("h",), (Tensor("n", 513),))]
    r = run(ops, {"x": 1000}, keep=("n",))
    assert r.forward_peak == {ACT: 1024 + 512} and r.forward_peak_op == "a"     # x + h; b: h + n = 1536 too
    assert r.end == {ACT: 1024}


def test_symbolic_sizes_replay_as_direct_arithmetic_at_each_batch_and_seq():
    # hidden 64 in bf16: x is b*s*64*2 bytes; the MLP's h is 4x that; n as x
    ops = silu_then_norm(("x",))
    ops = [ops[0]._replace(outputs=(Tensor("h", B * S * 512),)), ops[1]._replace(outputs=(Tensor("n", B * S * 128),))]
    tape = walk(ops, {"x": B * S * 128}, keep=("n",), needs_grad=frozenset({"x"}))

    def r(n):   # the caching allocator's 512 B block
        return -(-n // 512) * 512

    for batch, seq in [(1, 1), (1, 3), (2, 7), (3, 100), (8, 2048), (5, 4097)]:
        x, h, n = r(batch * seq * 128), r(batch * seq * 512), r(batch * seq * 128)
        got = tape.replay(variables(batch, seq))
        # silu: x + h; norm: x (saved) + h + n, then h dies
        assert got.forward_peak == {ACT: x + h + n}, (batch, seq)
        assert got.end == {ACT: x + n}, (batch, seq)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 5000), min_size=2, max_size=8))
def test_a_chain_of_unsaved_ops_peaks_at_the_largest_input_output_pair(sizes):
    # t0 -> t1 -> ... : op i reads t(i) and writes t(i+1); nothing saved, so while op i runs the
    # live set is exactly t(i) and t(i+1), and t(i) dies right after
    ops = [Op(f"op{i}", (f"t{i}",), (Tensor(f"t{i + 1}", sizes[i + 1]),)) for i in range(len(sizes) - 1)]
    r = run(ops, {"t0": sizes[0]}, keep=(f"t{len(sizes) - 1}",))

    def rounded(n):
        return -(-n // 512) * 512

    pairs = [rounded(a) + rounded(b) for a, b in zip(sizes, sizes[1:])]
    assert sum(r.forward_peak.values()) == max(pairs)
    assert r.forward_peak_op == f"op{pairs.index(max(pairs))}"      # the first op to reach it
    assert r.end == {ACT: rounded(sizes[-1])}



# --- Tape.replay against the plain event loop ------------------------------------------------------

def replay_event_by_event(tape, values: dict):
    """Tape.replay's result by its definition, one event at a time: the live bytes per tag after
    each allocation and free; at each mark, the live total plus the mark's extra, the first highest
    one per part kept with its bytes per tag; a phase end closes the forward part."""
    from vramplan.estimate._symbolic import rounded_bytes
    from vramplan.estimate._walk import WalkResult

    size = [sum(rounded_bytes(key, values) * count for key, count in nbytes.parts) for nbytes, _tag in tape.table]
    tag = [t for _nbytes, t in tape.table]
    live: dict = {}
    best, best_total, best_op, forward = {}, -1, "", None
    for event in tape.events:
        if event[0] in (1, -1):
            live[tag[event[1]]] = live.get(tag[event[1]], 0) + event[0] * size[event[1]]
        elif event[0] == 0:
            extra = size[event[2]] if event[2] >= 0 else 0
            if sum(live.values()) + extra > best_total:
                best_total, best_op, best = sum(live.values()) + extra, event[1], dict(live)
                if extra:
                    best[tag[event[2]]] = best.get(tag[event[2]], 0) + extra
        else:
            forward = (best, best_op, dict(live))
            best, best_total, best_op = {}, -1, ""

    def named(parts: dict) -> dict:
        return {k: v for k, v in sorted(parts.items()) if v}
    end = named(live)
    if forward is None:
        return WalkResult(named(best), end, {}, end, best_op)
    return WalkResult(named(forward[0]), named(forward[2]), named(best), end, forward[1], best_op)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["alloc", "free", "mark", "end"]), st.integers(0, 6000),
                          st.sampled_from([ACT, GRAD, TMP])), max_size=40))
def test_replay_equals_the_event_loop_on_any_tape(script):
    # random allocations, frees of what is alive, marks with and without an extra, and phase ends
    # (more than one: only the last closes the forward part)
    from vramplan.estimate._walk import Tape, alloc

    table, events, alive = [], [], []
    for kind, n, tag in script:
        if kind == "alloc" or (kind == "free" and not alive):
            table.append((alloc(B * S * n), tag))
            events.append((1, len(table) - 1))
            alive.append(len(table) - 1)
        elif kind == "free":
            events.append((-1, alive.pop(n % len(alive))))
        elif kind == "mark":
            extra = -1
            if n % 3:
                table.append((alloc(n), tag))
                extra = len(table) - 1
            events.append((0, f"op{len(events)}", extra))
        else:
            events.append((2,))
    tape = Tape(tuple(table), tuple(events))
    for batch, seq in [(1, 1), (2, 100), (3, 4097)]:
        assert tape.replay(variables(batch, seq)) == replay_event_by_event(tape, variables(batch, seq))


def test_replay_equals_the_event_loop_on_catalog_tapes():
    # every tape the estimate walks for a few families and setups: layers (first and others), head
    from vramplan.core._models import resolve
    from vramplan.core._setup import TrainSetup, make_setup
    from vramplan.cuda._arch import ASSUMED
    from vramplan.estimate._ops import _head_tape, _layer_tapes, _structure

    cases = [("meta-llama/Meta-Llama-3-8B", TrainSetup()), ("meta-llama/Meta-Llama-3-8B", TrainSetup(attn="eager", grad_ckpt=False)),
             ("google/gemma-3-1b-pt", TrainSetup(attn="eager")), ("allenai/OLMo-2-1124-7B", TrainSetup(method="full", grad_ckpt=False)),
             ("mistralai/Mixtral-8x7B-v0.1", make_setup("trl-sft")), ("Qwen/Qwen3-8B", make_setup("qlora-paper"))]
    checked = 0
    for model, setup in cases:
        spec = resolve(model)
        for window in (False, True):
            structure = _structure(spec, setup, ASSUMED, window, True, False)
            inner, first, _dequant = _layer_tapes(spec, structure)
            for tape in (inner, first, _head_tape(spec, structure)):
                for batch, seq in [(1, 512), (3, 2048), (2, 4097)]:
                    assert tape.replay(variables(batch, seq)) == replay_event_by_event(tape, variables(batch, seq))
                    checked += 1
    assert checked == len(cases) * 2 * 3 * 3
