"""Training recipes (issue #9): the registry, the flags, what each loop change does to the
estimate, the autocast emulation, and meta vs a real CPU run under each recipe."""
from __future__ import annotations

import json
from dataclasses import fields

import pytest

from vramplan import estimate
from vramplan.cli import main
from vramplan.core._errors import UsageError
from vramplan.core._recipes import RECIPE_FIELDS, RECIPES
from vramplan.core._setup import make_setup
from vramplan.core._setup import TrainSetup
from vramplan.estimate._quant import alloc
from vramplan.cuda._arch import ASSUMED  # noqa: E402
from vramplan.cuda._cublas import step_workspace_bytes  # noqa: E402

CUBLAS = step_workspace_bytes(ASSUMED)   # the emulated H100's two cuBLAS workspaces (vramplan/cuda/_cublas.py)


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# --- the registry -------------------------------------------------------------------------------

def test_every_recipe_default_that_differs_from_the_plain_setup_names_its_source():
    base = TrainSetup()
    for recipe in RECIPES.values():
        cited = {f for f, _ in recipe.sources}
        changed = {f for f in RECIPE_FIELDS if getattr(recipe, f) != getattr(base, f) and f not in ("targets",)}
        assert changed <= cited, (recipe.name, changed - cited)
        assert all(src.strip() for _, src in recipe.sources)


def test_recipes_are_frozen_and_cover_the_issue():
    assert set(RECIPES) == {"trainer", "trl-sft", "qlora-paper", "plain"}
    with pytest.raises(Exception):
        RECIPES["trainer"].amp = "none"
    assert {f.name for f in fields(TrainSetup)} >= set(RECIPE_FIELDS)


def test_recipe_values_from_their_sources():
    t, trl, paper, plain = (RECIPES[n] for n in ("trainer", "trl-sft", "qlora-paper", "plain"))
    assert (t.amp, t.optimizer, t.loss, t.loop) == ("bf16", "adamw_fused", "full", "trainer")
    assert (trl.amp, trl.grad_ckpt, trl.loss, trl.reentrant) == ("bf16", True, "chunked", False)
    assert (paper.prepare_kbit, paper.optimizer, paper.rank, paper.amp, paper.recast) == (
        True, "paged_adamw", 64, "bf16", True)
    assert not any(r.recast for r in (t, trl, plain))
    assert (plain.amp, plain.optimizer, plain.loop) == ("none", "adamw", "plain")


def test_explicit_flags_override_a_recipe():
    s = make_setup("trl-sft", optimizer="adamw8bit", loss="full", seq=512)
    assert (s.recipe, s.optimizer, s.loss, s.amp, s.seq) == ("trl-sft", "adamw8bit", "full", "bf16", 512)
    assert make_setup(None) == TrainSetup()


def test_cli_recipe_and_override(capsys):
    code, out, _ = run(capsys, "estimate", "llama-2-7b", "--recipe", "trl-sft", "--optimizer", "adamw", "--json")
    assert code == 0
    data = json.loads(out)
    s = data["setup"]
    assert (s["recipe"], s["amp"], s["loss"], s["optimizer"]) == ("trl-sft", "bf16", "chunked", "adamw")
    assert data["assumptions"][1].startswith("recipe trl-sft (TRL 1.16")


@pytest.mark.parametrize("name", ["trainer", "trl-sft", "qlora-paper"])
def test_the_library_applies_a_recipe_as_the_cli_does(capsys, name):
    code, out, _ = run(capsys, "estimate", "llama-2-7b", "--recipe", name, "--seq", "512", "--json")
    cli = json.loads(out)
    api = estimate("llama-2-7b", recipe=name, seq=512)
    assert code == 0 and api.setup == make_setup(name, seq=512, attn=api.setup.attn)
    assert api.to_dict()["setup"] == cli["setup"]
    assert (api.peak_allocated_bytes, api.peak_reserved_bytes) == (cli["peak_allocated_bytes"], cli["peak_reserved_bytes"])


def test_plan_and_sweep_apply_a_recipe_as_estimate_does():
    pytest.importorskip("pandas")
    from vramplan import plan, sweep

    want = estimate("llama-2-7b", gpu="24GB", recipe="trainer", seq=512).device_total_bytes
    assert plan("llama-2-7b", gpu="24GB", recipe="trainer", seq=512, recommend=False).need_bytes == want
    rows = sweep("llama-2-7b", gpu="24GB", recipe=["trainer", None], seq=512, workers=1)
    assert list(rows["device_total_bytes"]) == [want, estimate("llama-2-7b", gpu="24GB", seq=512).device_total_bytes]


def test_library_recipe_with_a_ready_setup_or_an_unknown_field_is_refused():
    with pytest.raises(UsageError, match=r"recipe='trainer' sets a new setup's defaults and cannot apply to setup="):
        estimate("llama-2-7b", TrainSetup(), recipe="trainer")
    with pytest.raises(UsageError, match=r"unknown setup field 'batch_size'"):
        estimate("llama-2-7b", batch_size=4)


def test_the_recipe_line_names_what_the_run_overrides(capsys):
    code, out, _ = run(capsys, "estimate", "llama-2-7b", "--recipe", "trainer", "--optimizer", "adamw8bit",
                       "--amp", "none", "--no-grad-ckpt", "--json")
    line = json.loads(out)["assumptions"][1]
    assert code == 0 and line.startswith("recipe trainer (") and "autocast bf16, adamw_fused" in line
    assert line.endswith("; this run differs in: amp none, optimizer adamw8bit, grad_ckpt off"), line
    code, out, _ = run(capsys, "estimate", "llama-2-7b", "--recipe", "trainer", "--json")
    assert "differs" not in json.loads(out)["assumptions"][1]


def test_recast_applies_to_qlora_py_configuration_only(capsys):
    """qlora.py's recast exists with 4-bit, prepare_model_for_kbit_training, bf16 and autocast: typed
    alone it is one Error line; a recipe whose other flags leave that configuration drops it, and
    so does a variation of the setup (the planner's 'no autocast' change)."""
    code, _, err = run(capsys, "estimate", "llama-2-7b", "--recast")
    assert code == 2
    assert err == ("Error: --recast is qlora.py's bf16 cast after get_peft_model: it applies with --method qlora "
                   "(nf4 or fp4), --prepare-kbit, --dtype bf16 and --amp bf16 (hint: give those flags, or "
                   "--no-recast)\n")
    assert make_setup("qlora-paper", prepare_kbit=False).recast is False
    paper = make_setup("qlora-paper")
    assert paper.recast and paper.with_(amp="none").recast is False and paper.with_(seq=4096).recast
    assert make_setup("qlora-paper", recast=False).recast is False


def test_recast_halves_the_adapters_and_drops_their_autocast_casts():
    """bf16 LoRA weights: half the bytes, and nothing for autocast to cast and cache per layer
    (ops.autocast_cache); bnb's 32-bit paged states stay float32 (paged, so not on the device)."""
    from vramplan.core._models import resolve
    from vramplan.estimate._ops import autocast_cache

    spec = resolve("meta-llama/Llama-2-7b")
    fp32, bf16 = make_setup("qlora-paper", recast=False), make_setup("qlora-paper")
    a, b = estimate(spec, fp32), estimate(spec, bf16)
    assert b.components["adapters"] * 2 == a.components["adapters"]
    assert autocast_cache(spec, fp32) > 0 and autocast_cache(spec, bf16) == 0
    assert b.peak_allocated_bytes < a.peak_allocated_bytes


def test_cli_without_recipe_says_so(capsys):
    code, out, _ = run(capsys, "estimate", "llama-2-7b", "--json")
    assert json.loads(out)["assumptions"][1].startswith("recipe none: no autocast")


def test_unknown_recipe_is_one_line(capsys):
    code, _, err = run(capsys, "estimate", "llama-2-7b", "--recipe", "axolotl")
    assert code == 2
    assert err.strip() == ("Error: unknown recipe 'axolotl' "
                           "(hint: --recipe takes one of: trainer, trl-sft, qlora-paper, plain)")


@pytest.mark.parametrize("flags, message", [
    (dict(amp="bf16", dtype="fp32"), "--amp bf16 is modelled for bf16 weights, or fp32 weights with --method "
                                     "lora / full (got --dtype fp32, --method qlora)"),
    (dict(amp="bf16", dtype="fp16", method="lora"), "--amp bf16 is modelled for bf16 weights, or fp32 weights "
                                                    "with --method lora / full (got --dtype fp16, --method lora)"),
    (dict(amp="bf16", dtype="fp32", method="full", attn="eager"), "--amp bf16 over --dtype fp32 is modelled for "
                                                                  "--attn sdpa"),
    (dict(amp="bf16", prepare_kbit=True, attn="eager"),
     "--amp bf16 with --prepare-kbit and --attn eager is modelled with --recast"),
    (dict(amp="bf16", prepare_kbit=True, quant="int8"), "--amp bf16 with --prepare-kbit is modelled for 4-bit "
                                                        "quantization"),
    (dict(loop="eager"), "unknown loop 'eager'"),
    (dict(loss="fused"), "unknown loss 'fused'"),
])
def test_bad_step_flags(flags, message):
    with pytest.raises(UsageError) as e:
        TrainSetup(**flags)
    assert str(e.value).split(" (hint:")[0] == message


# --- what each change does to the estimate ------------------------------------------------------

def test_plain_loop_holds_one_more_bf16_logits_tensor():
    """Issue #9: +0.26 GB on Llama-2-7B at 4k tokens (4096 x 32000 x 2 bytes)."""
    trainer = estimate("llama-2-7b", seq=4096)
    plain = estimate("llama-2-7b", seq=4096, loop="plain")
    assert plain.peak_allocated_bytes - trainer.peak_allocated_bytes == alloc(4096 * 32000 * 2)


def test_a_loop_that_deletes_its_outputs_starts_the_next_forward_without_them():
    """`del out` after opt.step() (Answer.AI's train.py): the backward and the optimizer step hold the
    logits as a plain loop does, the forward holds no previous step's: one logits tensor less, and
    the embedding leaf and its .grad the previous graph held (checkpointing, frozen embedding:
    ops.held_graph_leaf)."""
    plain = estimate("llama-2-7b", seq=4096, loop="plain")
    deleted = estimate("llama-2-7b", seq=4096, loop="plain-del")
    logits, leaf = alloc(4096 * 32000 * 2), alloc(4096 * 4096 * 2)
    assert plain.phase_peaks["forward"] - deleted.phase_peaks["forward"] == logits + 2 * leaf
    assert deleted.phase_peaks["backward"] == plain.phase_peaks["backward"]
    assert deleted.phase_peaks["optimizer"] == plain.phase_peaks["optimizer"]
    assert deleted.peak_reserved_bytes < plain.peak_reserved_bytes
    assert any("`del out` before the next forward" in a for a in deleted.assumptions)


def test_fused_adamw_has_no_workspace_and_a_device_step_per_tensor():
    foreach = estimate("llama-2-7b", optimizer="adamw")
    fused = estimate("llama-2-7b", optimizer="adamw_fused")
    tensors = 7 * 2 * 32   # LoRA A and B on 7 linears per layer, 32 layers
    assert fused.components["optimizer_state"] - foreach.components["optimizer_state"] == tensors * 512
    # the only temporaries left at the optimizer moment are the cached cuBLAS workspaces (cuda/_cublas.py)
    cublas = CUBLAS
    assert fused.moments["optimizer"]["temporaries"] == cublas < foreach.moments["optimizer"]["temporaries"]
    assert estimate("llama-2-7b", optimizer="adamw_foreach").peak_allocated_bytes == foreach.peak_allocated_bytes


def test_chunked_loss_has_no_full_logits():
    full = estimate("llama-2-7b", seq=4096, batch=2)
    chunked = estimate("llama-2-7b", seq=4096, batch=2, loss="chunked")
    logits32 = alloc(2 * 4096 * 32000 * 4)
    assert full.moments["backward.loss"]["logits_loss"] >= 2 * logits32
    assert chunked.moments["backward.loss"]["logits_loss"] < logits32 // 4


def test_chunked_loss_refuses_a_lora_on_lm_head():
    with pytest.raises(UsageError, match="reads lm_head.weight directly"):
        estimate("llama-2-7b", loss="chunked", targets="q_proj,lm_head")


def test_autocast_drops_peft_fp32_input_copies():
    """bnb LoRA under autocast: no fp32 copy of each adapted input (docs/recipes.md)."""
    pure = estimate("llama-2-7b", seq=4096, grad_ckpt=False, loss="chunked")
    amp = estimate("llama-2-7b", seq=4096, grad_ckpt=False, loss="chunked", amp="bf16")
    assert amp.peak_allocated_bytes < pure.peak_allocated_bytes


def test_planner_ranks_recipe_changes_by_saving():
    import vramplan
    p = vramplan.plan("llama-2-7b", gpu="24GB", seq=4096, recipe=None, loop="plain")
    savings = [r.saving_bytes for r in p.recipe_changes]
    assert savings == sorted(savings, reverse=True)
    by = {tuple(r.change.changes.items()): r.saving_bytes for r in p.recipe_changes}
    assert by[(("loop", "trainer"),)] > 0 and by[(("loss", "chunked"),)] > 0
    assert p.to_dict()["recipe_changes"][0]["saving_bytes"] == savings[0]
    # TRL's bf16 LoRA weights, offered where the adapters are float32
    assert by[(("adapter_dtype", "bf16"),)] > 0
    trl = vramplan.plan("llama-2-7b", make_setup("trl-sft", seq=4096), gpu="24GB")
    assert not any("adapter_dtype" in r.change.changes for r in trl.recipe_changes)


# --- the autocast emulation ---------------------------------------------------------------------

torch = pytest.importorskip("torch")


def test_emulated_autocast_casts_per_cuda_lists_and_caches_weights():
    from vramplan.simulate._autocast import emulate_cuda_autocast

    F = torch.nn.functional
    x = torch.zeros(4, 8, device="meta")
    w = torch.nn.Parameter(torch.zeros(3, 8, device="meta"))
    with emulate_cuda_autocast() as state:
        assert not torch.is_autocast_enabled()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            assert torch.is_autocast_enabled() and torch.get_autocast_dtype("meta") == torch.bfloat16
            y = F.linear(x, w)
            assert y.dtype == torch.bfloat16
            cast = state.cache[id(w)][1]
            F.linear(x, w)
            assert state.cache[id(w)][1] is cast           # one cast per region
            assert torch.softmax(y, -1).dtype == torch.float32   # fp32_set_opt_dtype
            assert torch.rsqrt(y).dtype == torch.float32        # fp32
            assert (y * y).dtype == torch.bfloat16              # not listed: input dtype
            with torch.autocast("cuda", enabled=False):
                assert F.linear(x, w).dtype == torch.float32
        assert not state.cache and not torch.is_autocast_enabled()


def test_emulated_autocast_casts_a_frozen_weight_per_call_and_saves_the_cast():
    """autocast_mode.cpp cached_cast caches float32 leaves that require grad only: a frozen
    float32 weight is cast on every call, and mm keeps that cast for the input's gradient."""
    from vramplan.simulate._autocast import emulate_cuda_autocast

    F = torch.nn.functional
    w = torch.zeros(3, 8, device="meta")                       # frozen: requires_grad=False
    x = torch.zeros(4, 8, device="meta", requires_grad=True) * 2   # a hidden state: no leaf
    with emulate_cuda_autocast() as state:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            before = state.casts
            y = F.linear(x, w)
            F.linear(x, w)
            assert state.casts - before == 4 and not state.cache   # input and weight, twice; nothing cached
            assert y.grad_fn._saved_mat2.dtype == torch.bfloat16    # the weight's cast, held for backward
            view = torch.nn.Parameter(torch.zeros(8, 3, device="meta")).t()
            F.linear(x, view)
            assert not state.cache                                  # a view is never cached


def test_amp_over_fp32_refuses_moe_layers_in_the_estimate():
    from vramplan.core._models import spec_from_config
    import json
    from pathlib import Path

    config = json.loads((Path(__file__).parent / "configs" / "mixtral-moe.json").read_text())
    spec = spec_from_config(config, "mixtral-moe", "tests/configs")
    with pytest.raises(UsageError, match="not modelled for mixture-of-experts layers"):
        estimate(spec, TrainSetup(method="lora", dtype="fp32", amp="bf16", seq=512))


def test_checkpoint_recomputation_reenters_emulated_autocast():
    from torch.utils.checkpoint import checkpoint

    from vramplan.simulate._autocast import emulate_cuda_autocast

    seen = []

    def body(t, w):
        seen.append(torch.is_autocast_enabled())
        return torch.nn.functional.linear(t, w)

    x = torch.zeros(4, 8, device="meta", requires_grad=True)
    w = torch.nn.Parameter(torch.zeros(3, 8, device="meta"))
    with emulate_cuda_autocast():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = checkpoint(body, x, w, use_reentrant=False)
        out.float().sum().backward()
    assert seen == [True, True] and out.dtype == torch.bfloat16


# --- meta vs a real CPU run, per recipe ---------------------------------------------------------

pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")


@pytest.mark.parametrize("recipe, flags, model_type", [
    ("plain", {}, "llama"), (None, {"optimizer": "adamw_fused"}, "llama"), ("trainer", {}, "llama"),
    ("trl-sft", {}, "llama"), ("qlora-paper", {}, "llama"),
    # eager attention under autocast over float32 hidden states, the mask 16-bit after the recast
    ("qlora-paper", {"attn": "eager"}, "llama"), ("qlora-paper", {"attn": "eager"}, "gemma2"),
    ("trainer", {"dtype": "fp32", "method": "lora"}, "llama")])
def test_meta_agrees_with_a_real_cpu_run_per_recipe(tiny_spec, recipe, flags, model_type):
    """On the CPU autocast is real CPU autocast (torch.autocast("cpu")), fused AdamW is torch's CPU
    kernel and TRL's loss takes its off-CUDA path; the static state must match to the byte."""
    from vramplan.simulate import simulate

    spec, setup = tiny_spec(model_type), make_setup(recipe, seq=32, rank=8, **flags)
    meta, cpu = simulate(spec, setup, device="meta"), simulate(spec, setup, device="cpu")
    cublas = CUBLAS   # the meta run emulates an H100's cached cuBLAS workspace; the CPU has none
    assert meta.boundaries["start"] - cublas == cpu.boundaries["start"]
    assert meta.boundaries["optimizer_end"] - cublas == cpu.boundaries["optimizer_end"]
    peak = meta.peak_allocated_bytes - cublas
    from vramplan.simulate._chunked_loss import trl_available
    if setup.loss == "chunked" and trl_available():
        # TRL's own loss off CUDA (no Triton) scores every position, not the labelled ones, and
        # upcasts the gradient GEMMs' operands; the meta run takes its CUDA path (trl_cuda_path)
        assert cpu.peak_allocated_bytes > peak
    else:
        assert abs(peak - cpu.peak_allocated_bytes) <= 0.01 * cpu.peak_allocated_bytes


def test_chunked_loss_off_cuda_upcasts_its_operands(tiny_spec):
    """TRL's _addmm_fp32 off CUDA: acc.addmm_(a.float(), b.float()); on CUDA addmm(out_dtype=fp32)
    copies nothing, so the CPU run needs more in the loss backward than the meta (CUDA) run."""
    from vramplan.simulate import simulate

    spec, setup = tiny_spec("llama"), make_setup(None, seq=32, rank=8, loss="chunked")
    meta, cpu = simulate(spec, setup, device="meta"), simulate(spec, setup, device="cpu")
    assert meta.boundaries["backward_end"] - CUBLAS == cpu.boundaries["backward_end"]
    assert cpu.peak_allocated_bytes > meta.peak_allocated_bytes - CUBLAS


@pytest.mark.parametrize("recipe, flags", [("trl-sft", {}), (None, {"loss": "chunked"}),
                                           ("trl-sft", {"loop": "plain"})])
def test_the_chunked_loss_stand_in_is_trls_own_cuda_path_on_meta(tiny_spec, monkeypatch, recipe, flags):
    """With TRL installed simulate runs TRL's own add_fused_lm_head down its CUDA path
    (_chunked_loss.trl_cuda_path); without it, the stand-in. The two steps must be the same
    allocations: peak, every boundary and the components at the peak."""
    pytest.importorskip("trl", reason="needs TRL (pip install 'vramplan[trl]') to compare with its own loss")
    from vramplan.simulate import _chunked_loss, simulate

    spec = tiny_spec("llama", vocab_size=40000)      # two vocabulary chunks of 32768
    setup = make_setup(recipe, seq=64, batch=2, rank=8, **flags)
    real = simulate(spec, setup, device="meta")
    monkeypatch.setattr(_chunked_loss, "trl_available", lambda: False)
    stand_in = simulate(spec, setup, device="meta")
    assert (real.peak_allocated_bytes, real.boundaries, real.components) == \
        (stand_in.peak_allocated_bytes, stand_in.boundaries, stand_in.components)


def test_profile_refuses_autocast_on_the_cpu(capsys):
    from vramplan.cli import main

    code = main(["profile", "meta-llama/Llama-2-7b-hf", "--random-weights", "--device", "cpu", "--recipe", "trainer"])
    assert code == 2
    assert capsys.readouterr().err == (
        "Error: --amp bf16 on the CPU runs CPU autocast, whose op lists differ from CUDA's "
        "(hint: profile it on a GPU, or use `vramplan simulate` for the CUDA step)\n")


@pytest.mark.pandas
def test_sweep_keeps_the_recipes_optimizer_unless_one_is_typed(tmp_path):
    """sweep's optimizer and dtype axes are swept only when typed: a --recipe's own stand."""
    import pandas as pd

    out = tmp_path / "sweep.csv"
    assert main(["sweep", "meta-llama/Llama-2-7b", "--recipe", "qlora-paper", "--gpu", "24GB",
                 "--batch", "1,2", "--csv", str(out)]) == 0
    df = pd.read_csv(out)
    assert set(df["optimizer"]) == {"paged_adamw"} and set(df["amp"]) == {"bf16"}
    assert main(["sweep", "meta-llama/Llama-2-7b", "--recipe", "qlora-paper", "--gpu", "24GB",
                 "--optimizer", "adamw,adamw8bit", "--csv", str(out)]) == 0
    assert set(pd.read_csv(out)["optimizer"]) == {"adamw", "adamw8bit"}


# --- TRL's bf16 LoRA weights on a quantized model (docs/recipes.md#trl-bf16-adapters) --------------

def test_trl_sft_casts_a_quantized_models_adapters_to_bf16_only():
    assert make_setup("trl-sft").adapter_dtype == "bf16"
    assert make_setup("trl-sft", method="lora").adapter_dtype == "fp32"      # `if _is_quantized_model`
    assert make_setup("trl-sft", adapter_dtype="fp32").adapter_dtype == "fp32"
    assert make_setup("trainer").adapter_dtype == "fp32"
    # a variation that leaves the quantized model leaves the cast too
    assert make_setup("trl-sft").with_(method="lora").adapter_dtype == "fp32"
    assert TrainSetup().adapters_16bit is False and make_setup("qlora-paper").adapters_16bit is True


def test_bf16_adapters_halve_adapters_gradients_and_adam_states():
    """LoRA A/B, their .grad and torch AdamW's exp_avg / exp_avg_sq follow the parameter dtype
    (adam.py _init_group: zeros_like(p)); fused AdamW's `step` scalars stay float32."""
    from vramplan.core._models import resolve
    from vramplan.estimate._inventory import static_memory

    spec = resolve("llama-2-7b")
    fp32 = static_memory(spec, TrainSetup(optimizer="adamw_fused"))
    bf16 = static_memory(spec, TrainSetup(optimizer="adamw_fused", adapter_dtype="bf16"))
    n = fp32.trainable_params     # Llama-2-7B's LoRA A / B shapes are whole multiples of 512 bytes
    assert (fp32.adapters, fp32.gradients, fp32.optimizer_state - bf16.optimizer_state) == \
        (2 * bf16.adapters, 2 * bf16.gradients, 2 * 2 * n) == (4 * n, 4 * n, 4 * n)
    assert any("adapters in bf16 (TRL SFTTrainer's cast" in a
               for a in estimate("llama-2-7b", adapter_dtype="bf16").assumptions)


def test_adapter_dtype_flag_validation(capsys):
    code = main(["estimate", "llama-2-7b", "--adapter-dtype", "fp16"])
    assert (code, capsys.readouterr().err) == (
        2, "Error: unknown adapter-dtype 'fp16' (hint: --adapter-dtype takes one of: fp32, bf16)\n")
    code = main(["estimate", "llama-2-7b", "--adapter-dtype", "bf16", "--method", "lora"])
    assert (code, capsys.readouterr().err) == (
        2, "Error: --adapter-dtype bf16 is modelled for --method qlora with --dtype bf16, and --amp bf16 where "
           "--prepare-kbit makes the hidden states float32 (hint: give those flags, or --adapter-dtype fp32)\n")
    # LoRA on fused MoE expert stacks (peft ParamWrapper): bf16 factors are the parameters' own views
    assert main(["estimate", "mistralai/Mixtral-8x7B-v0.1", "--recipe", "trl-sft", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["setup"]["adapter_dtype"] == "bf16"
    assert main(["estimate", "llama-2-7b", "--adapter-dtype", "bf16", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["setup"]["adapter_dtype"] == "bf16"
