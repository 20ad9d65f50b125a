"""simulate's two-step allocation stream (simulate/_reserved.py two_step_events) on hand-made
measured steps: what is made once, what each step makes, and where a plain loop's outputs go.
Torch-free: the stream is data (simulate/_shortcut.py Stream, VBlock)."""
from vramplan.simulate._reserved import is_matmul, two_step_events
from vramplan.simulate._shortcut import Stream, VBlock

FWD, OPT = ("forward", "", None), ("optimizer", "", None)


def block(size, made, freed, component="activations", where=FWD):
    return VBlock(size, made, freed, where, "aten.mm.default", component)


def test_a_plain_loops_outputs_are_freed_in_the_second_step_where_the_previous_ones_are():
    """The measured step: the weight and the previous step's logits registered live (events 1, 2);
    a temporary (3..6) and the step's own logits (4, kept past the step); the previous logits
    freed at event 5, when model() returns. In two steps from a fresh load there is no previous
    step before the warm-up: its logits are freed in the second step at event 5, after the
    second step made its own."""
    weight = block(1000, 1, None, "weights")
    previous = block(50, 2, 5)
    temporary, logits = block(30, 3, 6), block(50, 4, None, "logits_loss")
    stream = Stream([weight, previous, temporary, logits], [(3, 6, FWD, "aten.mm.default")], 6, 2)
    assert two_step_events(stream) == [
        ("alloc", ("live", 1), 1000),
        ("alloc", (0, 3), 30), ("alloc", (0, 4), 50), ("free", (0, 3)),
        ("alloc", (1, 3), 30), ("alloc", (1, 4), 50), ("free", (0, 4)), ("free", (1, 3)),
    ]


def test_what_a_step_keeps_without_a_plain_loop_is_made_once():
    """A storage the step makes and never frees (here one whose size matches nothing the step
    found alive before it) is made in the warm-up step only; the optimizer state, registered
    before the measured step, is made where the warm-up's optimizer phase starts."""
    state = block(80, 1, None, "optimizer_state")
    kept, temporary = block(40, 2, None), block(30, 3, 4)
    stream = Stream([state, kept, temporary], [(2, 3, FWD, "aten.mm.default"), (3, 4, OPT, "aten.add.Tensor")], 4, 1)
    assert two_step_events(stream) == [
        ("alloc", (0, 2), 40), ("alloc", ("live", 1), 80), ("alloc", (0, 3), 30), ("free", (0, 3)),
        ("alloc", (1, 3), 30), ("free", (1, 3)),
    ]


def test_every_overload_of_a_torch_matmul_calls_cublas():
    """The thread's cuBLAS workspace is made at its first matmul: out= overloads count (TRL's
    chunked log-prob backward starts with `torch.mm(..., out=tile)`), other ops do not."""
    assert all(is_matmul(op) for op in ("aten.mm.default", "aten.mm.out", "aten.addmm.dtype_out",
                                        "aten.bmm.default", "aten.baddbmm.out"))
    assert not any(is_matmul(op) for op in ("aten.mul.Tensor", "aten.mmm.default", "bitsandbytes.gemm_4bit.default",
                                            "aten.matmul.default", ""))
