"""Reentrant gradient checkpointing (torch.utils.checkpoint(use_reentrant=True), CheckpointFunction;
docs/autograd.md#reentrant-checkpointing): the walk on a hand-made op list, the setting and its
flags, what the estimate says, and meta vs a real CPU run. estimate vs simulate for reentrant
setups is in tests/test_agreement.py (cases with reentrant=True)."""
from __future__ import annotations

import json

import pytest

from vramplan import estimate
from vramplan.cli import main
from vramplan.core._errors import UsageError
from vramplan.core._recipes import RECIPES
from vramplan.core._setup import TrainSetup, make_setup
from vramplan.estimate._symbolic import variables
from vramplan.estimate._walk import ACT, Op, Tensor, walk

KiB = 1024


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# --- the walk --------------------------------------------------------------------------------------

def three_ops(lse: int = 0):
    """up saves its input, act saves its input (and a grad-mode-only output of `lse` bytes when
    given), down saves nothing: the layer's last op, like the residual add."""
    act_out = (Tensor("g", 2 * KiB),) + ((Tensor("lse", lse),) if lse else ())
    return [Op("up", ("x",), (Tensor("h", 2 * KiB),), saves=("x",), grads=(("x", 1 * KiB),)),
            Op("act", ("h",), act_out, saves=("h",) + (("lse",) if lse else ()), grads=(("h", 2 * KiB),)),
            Op("down", ("g",), (Tensor("y", 1 * KiB),), grads=(("g", 2 * KiB),))]


KW = dict(keep=("x",), backward=True, grad_of={"y": 1 * KiB}, needs_grad=frozenset({"x"}), save=False)


def test_reentrant_recomputes_the_whole_segment_and_holds_its_output_and_incoming_gradient():
    tape = walk(three_ops(), {"x": 1 * KiB}, reentrant=True, **KW)
    r = tape.replay(variables(1, 1))
    # forward under no_grad: x 1K; up +h -> 3K; act +g -> 5K (peak), h dies -> 3K; down +y -> 4K,
    # g dies; y is nobody's input and not kept (it is the next segment's input) -> x alone
    assert r.forward_peak == {ACT: 5 * KiB} and r.forward_peak_op == "act"
    assert r.forward_end == {ACT: 1 * KiB}
    # backward: grad(y) 1K -> 2K; CheckpointFunction.backward re-runs all three ops with saving:
    # up +h -> 4K, act +g -> 6K, down +y -> 7K, g dies (down saves nothing) -> 5K, y held.
    # down.backward: + grad(g) -> 7K; grad(y) is still an argument of the Python backward: kept.
    # act.backward: + grad(h) -> 9K (the peak), grad(g) and saved h freed -> 5K; up.backward:
    # + grad(x) -> 6K, grad(h) freed -> 4K. backward returns: grad(y) and y freed -> x + grad(x)
    assert r.backward_peak == {ACT: 9 * KiB} and r.backward_peak_op == "act.backward"
    assert r.end == {ACT: 2 * KiB}
    marks = [e[1] for e in tape.events[tape.events.index((2,)):] if e[0] == 0]
    assert marks == ["up", "act", "down", "down.backward", "act.backward", "up.backward"]
    # non-reentrant on the same ops: recompute from act.backward, early stop before act's output,
    # grad(y) freed after down.backward, y never recomputed: x + h + grad(g) + grad(h) = 7K; the
    # checkpoint frame's input x goes with up's saved x, the last saved tensor: grad(x) alone
    plain = walk(three_ops(), {"x": 1 * KiB}, **KW).replay(variables(1, 1))
    assert plain.forward_peak == r.forward_peak
    assert plain.backward_peak == {ACT: 7 * KiB} and plain.end == {ACT: 1 * KiB}


def test_reentrant_first_forward_makes_no_grad_mode_only_outputs():
    # act also makes a 1K logsumexp only when grad mode is on (the memory-efficient kernel):
    # the no_grad forward peaks at x + h + g = 5K without it, the non-reentrant forward
    # (grad mode on, nothing saved) at 6K with it; the recomputation makes and saves it, so the
    # reentrant backward peak is 9K + 1K
    reentrant = walk(three_ops(lse=KiB), {"x": 1 * KiB}, reentrant=True, grad_only=("lse",), **KW)
    r = reentrant.replay(variables(1, 1))
    assert r.forward_peak == {ACT: 5 * KiB}
    assert r.backward_peak == {ACT: 10 * KiB}
    plain = walk(three_ops(lse=KiB), {"x": 1 * KiB}, grad_only=("lse",), **KW).replay(variables(1, 1))
    assert plain.forward_peak == {ACT: 6 * KiB}


# --- the setting -----------------------------------------------------------------------------------

def test_setting_defaults_off_and_recipes_set_it():
    assert TrainSetup().reentrant is False and not TrainSetup().reentrant_ckpt
    assert TrainSetup(reentrant=True).reentrant_ckpt
    assert not TrainSetup(reentrant=True, grad_ckpt=False).reentrant_ckpt
    for name, r in RECIPES.items():
        assert make_setup(name).reentrant is r.reentrant
    assert make_setup("trainer", reentrant=True).reentrant is True     # an explicit flag overrides
    assert TrainSetup(reentrant=True, grad_ckpt=False).to_dict()["reentrant"] is None
    assert TrainSetup(reentrant=True).to_dict()["reentrant"] is True


def test_bad_reentrant_value_is_refused():
    with pytest.raises(UsageError, match="--ckpt-reentrant must be true or false"):
        TrainSetup(reentrant="yes")


def test_cli_flag_changes_the_estimate_and_says_so(capsys):
    code, out, _ = run(capsys, "estimate", "llama-2-7b", "--seq", "1024", "--ckpt-reentrant", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["setup"]["reentrant"] is True
    assert any(a.startswith("gradient checkpointing (reentrant, use_reentrant=True)") for a in data["assumptions"])
    code, out, _ = run(capsys, "estimate", "llama-2-7b", "--seq", "1024", "--json")
    plain = json.loads(out)
    assert plain["setup"]["reentrant"] is False
    assert "gradient checkpointing (non-reentrant) on every decoder layer" in plain["assumptions"]
    assert data["phase_peaks"]["forward"] == plain["phase_peaks"]["forward"]


def test_only_the_layer_backward_moments_change():
    # the forward is the same (no grad-mode-only output with flash attention, no int8 ctx);
    # the layers' backward moments move (recomputed output and incoming gradient held, the
    # recomputation before any of the layer's backward instead of at its last saving op)
    plain = estimate("llama-2-7b", seq=4096, replay=False)
    reentrant = estimate("llama-2-7b", seq=4096, reentrant=True, replay=False)
    for name in ("forward.layer", "forward.loss", "backward.loss", "optimizer"):
        assert reentrant.moments[name] == plain.moments[name], name
    for name in ("backward.top_layer", "backward.bottom_layer"):
        assert reentrant.moments[name] != plain.moments[name], name


def test_cli_reentrant_without_checkpointing_is_one_line(capsys):
    code, _, err = run(capsys, "estimate", "llama-2-7b", "--ckpt-reentrant", "--no-grad-ckpt")
    assert code == 2
    assert err.strip() == ("Error: --ckpt-reentrant contradicts --no-grad-ckpt (hint: reentrant is a gradient "
                           "checkpointing flavour and --no-grad-ckpt turns checkpointing off; drop one of them)")
    # a recipe's reentrant is not the user's: turning checkpointing off is fine
    assert run(capsys, "estimate", "llama-2-7b", "--recipe", "trainer", "--no-grad-ckpt", "--json")[0] == 0


def test_int8_matmul_inputs_are_not_kept_by_a_no_grad_forward():
    from vramplan.core._models import resolve
    from vramplan.estimate._ops import int8_ctx_inputs

    spec = resolve("llama-2-7b")
    assert int8_ctx_inputs(spec, TrainSetup(quant="int8", seq=512)) > 0
    assert int8_ctx_inputs(spec, TrainSetup(quant="int8", seq=512, reentrant=True)) == 0


def test_sdpa_kernel_that_depends_on_requires_grad_is_refused():
    from vramplan.core._models import spec_from_config

    # head dim 208 on an sm86 card: flash without gradients, not with them (docs/cuda-kernels.md)
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 1664,
              "intermediate_size": 4096, "num_hidden_layers": 2, "num_attention_heads": 8,
              "num_key_value_heads": 8, "vocab_size": 512}
    spec = spec_from_config(config, "hd208", "test config")
    estimate(spec, TrainSetup(seq=512, reentrant=True), arch="sm90")      # sm90 has no such rule
    estimate(spec, TrainSetup(seq=512), arch="sm86")                      # non-reentrant: one kernel
    with pytest.raises(UsageError, match="--ckpt-reentrant on sm86: SDPA runs flash in the no_grad first forward"):
        estimate(spec, TrainSetup(seq=512, reentrant=True), arch="sm86")


# --- meta vs a real CPU run ------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["qlora", "lora", "full"])
def test_meta_agrees_with_a_real_cpu_run_under_reentrant_checkpointing(tiny_spec, method):
    """The real CheckpointFunction on the CPU (no kernel stand-ins there) against the meta trace:
    the persistent state to the byte, the peak within 1% once the emulated H100's cuBLAS
    workspaces are taken off (as tests/test_recipes.py does per recipe)."""
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")
    from vramplan.cuda._arch import ASSUMED
    from vramplan.cuda._cublas import step_workspace_bytes
    from vramplan.simulate import simulate

    cublas = step_workspace_bytes(ASSUMED)
    spec, setup = tiny_spec("llama"), TrainSetup(method=method, seq=32, rank=8, reentrant=True)
    meta, cpu = simulate(spec, setup, device="meta"), simulate(spec, setup, device="cpu")
    assert meta.boundaries["start"] - cublas == cpu.boundaries["start"]
    assert meta.boundaries["optimizer_end"] - cublas == cpu.boundaries["optimizer_end"]
    peak = meta.peak_allocated_bytes - cublas
    assert abs(peak - cpu.peak_allocated_bytes) <= 0.01 * cpu.peak_allocated_bytes


def test_reentrant_recomputation_reenters_emulated_autocast():
    """CheckpointFunction records the autocast state in forward and re-enters it around the
    recomputation in backward (checkpoint.py _get_autocast_kwargs, torch.amp.autocast): the meta
    emulation answers both, so the recomputed layer runs under autocast as on CUDA."""
    torch = pytest.importorskip("torch")
    from torch.utils.checkpoint import checkpoint

    from vramplan.simulate._autocast import emulate_cuda_autocast

    seen = []

    def body(t, w):
        seen.append((torch.is_grad_enabled(), torch.is_autocast_enabled()))
        return torch.nn.functional.linear(t, w)

    x = torch.zeros(4, 8, device="meta", requires_grad=True)
    w = torch.nn.Parameter(torch.zeros(3, 8, device="meta"))
    with emulate_cuda_autocast():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = checkpoint(body, x, w, use_reentrant=True)
        out.float().sum().backward()
    # the first forward under no_grad, the recomputation with grad, both under autocast
    assert seen == [(False, True), (True, True)] and out.dtype == torch.bfloat16
