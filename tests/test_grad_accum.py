"""Gradient accumulation (--grad-accum, docs/autograd.md#gradient-accumulation-steps): the tape of a
micro-step after the first, worked by hand; the estimator's moments; the planner's smaller
micro-batch; the refusals, their text pinned. Estimate vs simulate: tests/test_agreement.py; the
stream's peak: tests/test_reserved.py; a real CPU run: tests/test_profile_run.py."""
import json

import pytest

from vramplan import TrainSetup, estimate
from vramplan.cli import main
from vramplan.core._errors import UsageError
from vramplan.core._setup import make_setup
from vramplan.estimate._walk import GRAD, Op, Tensor, accumulating, walk

MiB = 2**20


def _frees_after(tape, tid) -> list:
    """The events between the allocation of `tid` and its free (None where it is never freed)."""
    events = list(tape.events)
    start = events.index((1, tid))
    if (-1, tid) not in events:
        return None
    return events[start + 1:events.index((-1, tid))]


def test_a_new_parameter_gradient_lives_across_its_op_only():
    """Two linears with trainable weights (param_grads 4 and 2 MiB): the first micro-step keeps both
    gradients (stolen into .grad); after it each is added into .grad and freed right after its op's
    backward, before the next op runs."""
    ops = [Op("a", ["x"], [Tensor("h", 8 * MiB)], saves=("x",), grads=(("x", 8 * MiB),), param_grads=4 * MiB),
           Op("b", ["h"], [Tensor("y", 8 * MiB)], saves=("h",), grads=(("h", 8 * MiB),), param_grads=2 * MiB)]
    tape = walk(ops, {"x": 8 * MiB}, backward=True, grad_of={"y": 8 * MiB}, needs_grad=frozenset({"x"}))
    grads = [tid for tid, (_size, tag) in enumerate(tape.table) if tag == GRAD]
    assert len(grads) == 2 and all(_frees_after(tape, tid) is None for tid in grads)
    acc = accumulating(tape)
    assert acc.table == tape.table and len(acc.events) == len(tape.events) + 2
    for tid in grads:
        between = _frees_after(acc, tid)
        marks = [e for e in between if e[0] == 0]
        assert len(marks) == 1 and between[-1] == marks[0]      # freed right after its own op's mark
    # b's gradient (made first in backward) is gone before a's op runs
    b_grad, a_grad = sorted(grads, key=lambda tid: list(acc.events).index((1, tid)))
    assert list(acc.events).index((-1, b_grad)) < list(acc.events).index((1, a_grad))
    # the forward is the same; the backward's peak (at b's op: 8 MiB each of x, h, the incoming
    # and the new input gradient, b's 2 MiB gradient) too; what is left at the end differs by both
    first, later = tape.replay({}), acc.replay({})
    assert later.forward_peak == first.forward_peak and later.backward_peak == first.backward_peak
    assert first.backward_peak == {"activations": 32 * MiB, GRAD: 2 * MiB}
    assert first.end[GRAD] == 6 * MiB and GRAD not in later.end


def test_accumulating_moments_hold_every_gradient():
    setup = TrainSetup(seq=1024, grad_accum=4)
    est, one = estimate("llama-2-7b", setup), estimate("llama-2-7b", setup.with_(grad_accum=1))
    from vramplan.core._models import resolve
    from vramplan.estimate._inventory import static_memory

    grads = static_memory(resolve("llama-2-7b"), setup).gradients
    assert est.moments["forward.layer.accumulating"]["gradients"] == grads
    assert est.moments["forward.layer.accumulating"]["activations"] == est.moments["forward.layer"]["activations"]
    assert est.moments["forward.loss.accumulating"]["gradients"] == grads
    assert est.peak_allocated_bytes > one.peak_allocated_bytes
    assert set(est.phase_peaks) == {"forward", "backward", "optimizer"}
    # every grad_accum > 1 is one prediction: later micro-steps repeat the second
    assert estimate("llama-2-7b", setup.with_(grad_accum=2)).peak_allocated_bytes == est.peak_allocated_bytes
    assert "forward.layer.accumulating" not in one.moments
    assert any(a.startswith("gradient accumulation over 4 micro-steps") for a in est.assumptions)
    assert not any(a.startswith("gradient accumulation") for a in one.assumptions)


def test_qlora_paper_accumulates_sixteen_micro_steps():
    assert make_setup("qlora-paper").grad_accum == 16
    assert make_setup("qlora-paper", grad_accum=1).grad_accum == 1
    assert make_setup("trainer").grad_accum == make_setup("trl-sft").grad_accum == 1


def test_plan_shrinks_the_micro_batch_with_accumulation_modelled():
    from vramplan.plan._planner import plan

    p = plan("meta-llama/Meta-Llama-3-8B", gpu="24GB", batch=16, seq=4096, batches=[1], seqs=[4096])
    batch = [c for c in p.changes if "batch" in c.changes]
    assert batch
    for c in batch:
        accum = -(-16 // c.changes["batch"])
        assert c.changes["grad_accum"] == c.setup.grad_accum == accum
        assert f"--grad-accum {accum} (was 1)" in c.description
        assert c.need_bytes == estimate("meta-llama/Meta-Llama-3-8B", c.setup, gpu="24GB").device_total_bytes


def test_ddp_accumulates_as_one_gpu_beside_its_buckets():
    """Under DDP the micro-steps before the last run under no_sync (no bucket touched), the last
    copies each accumulated .grad into its bucket in place: per GPU, the accumulation adds what it
    adds on one GPU, and the replay of one GPU's own stream runs the same micro-steps."""
    from vramplan.plan._sharding import Parallel, per_gpu

    for method in ("qlora", "lora", "full"):
        setup = TrainSetup(method=method, batch=2, seq=1024)
        acc = setup.with_(grad_accum=8)
        one, one_acc = estimate("llama-2-7b", setup), estimate("llama-2-7b", acc)
        ddp, ddp_acc = (per_gpu("llama-2-7b", s, Parallel(2, "ddp"), gpu="A100-80GB") for s in (setup, acc))
        assert ddp_acc.peak_allocated_bytes - ddp.peak_allocated_bytes == \
            one_acc.peak_allocated_bytes - one.peak_allocated_bytes
        for phase in ("forward", "backward", "optimizer"):
            assert ddp_acc.phase_peaks[phase] - ddp.phase_peaks[phase] == \
                one_acc.phase_peaks[phase] - one.phase_peaks[phase]
        assert ddp_acc.device_total_bytes >= ddp.device_total_bytes
    assert any(a.startswith("gradient accumulation under DDP: the first 7 micro-steps") for a in ddp_acc.assumptions)
    assert not any("no_sync" in a for a in ddp.assumptions)


def test_plan_under_ddp_shrinks_the_micro_batch_with_accumulation():
    from vramplan.plan._planner import plan

    p = plan("meta-llama/Meta-Llama-3-8B", gpu="24GB", batch=16, seq=4096, gpus=2, strategy="ddp",
             batches=[1], seqs=[4096])
    batch = [c for c in p.changes if "batch" in c.changes]
    assert batch and all(c.changes["grad_accum"] == -(-16 // c.changes["batch"]) for c in batch)


def test_a_setup_that_accumulates_gets_no_multi_gpu_answer(capsys):
    assert main(["plan", "meta-llama/Meta-Llama-3-8B", "--gpu", "24GB", "--batch", "16", "--seq", "4096",
                 "--grad-accum", "4", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["status"] == "no" and data["minimum"]["options"] == []
    assert "gradient accumulation is modelled on one GPU and under DDP" in data["minimum"]["message"]


@pytest.mark.parametrize("argv, message", [
    (["estimate", "llama-2-7b", "--grad-accum", "0"], "Error: --grad-accum must be positive, got 0"),
    (["plan", "llama-2-7b", "--gpu", "24GB", "--gpus", "2", "--strategy", "fsdp", "--grad-accum", "2"],
     "Error: --grad-accum 2 is modelled on one GPU and under DDP, not under fsdp (hint: drop --grad-accum (the "
     "peak of one micro-step), or plan one GPU or DDP)"),
    (["plan", "llama-2-7b", "--gpu", "24GB", "--gpus", "4", "--strategy", "zero3", "--recipe", "qlora-paper"],
     "Error: --grad-accum 16 is modelled on one GPU and under DDP, not under zero3"),
    (["estimate", "Qwen/Qwen2.5-0.5B", "--method", "full", "--grad-accum", "2"],
     "Error: --grad-accum 2 with a tied embedding trained in full is not modelled (hint: use --grad-accum 1 (the "
     "peak of one micro-step), or --method lora / qlora)"),
    (["estimate", "Qwen/Qwen2.5-0.5B", "--recipe", "qlora-paper", "--method", "full"],
     "Error: --grad-accum 16 (--recipe qlora-paper's) with a tied embedding trained in full is not modelled"),
])
def test_refusals_are_one_line(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1


def test_setup_validation():
    with pytest.raises(UsageError, match="--grad-accum must be a whole number"):
        TrainSetup(grad_accum=1.5)
    assert TrainSetup(grad_accum=3).accumulates and not TrainSetup().accumulates


def test_plan_names_the_micro_steps(capsys):
    assert main(["plan", "llama-2-7b", "--recipe", "qlora-paper", "--gpus", "2", "--gpu", "24GB"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "batch 1 x seq 2048 x 16 micro-steps, paged_adamw" in out and "— 2 x ddp" in out
