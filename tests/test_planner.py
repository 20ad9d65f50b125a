"""`plan` / `sweep`: the fast path equals the estimator, boundaries are exact (property tests),
recommendations fit and are ranked, impossible asks get an answer, the CLI contract, speed."""
import json
import subprocess
import sys
import textwrap

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import vramplan
from vramplan import TrainSetup, estimate
from vramplan.cli import main
from vramplan.core._errors import ModelError, UsageError
from vramplan.core._gpus import Gpu, catalog, resolve_gpu
from vramplan.core._models import resolve
from vramplan.plan._planner import TIGHT, Evaluator, _largest, plan, status_of
from vramplan.plan._sharding import Parallel, per_gpu

GiB = 2**30
MODELS = ["meta-llama/Llama-2-7b-hf", "meta-llama/Meta-Llama-3-8B", "mistralai/Mistral-7B-v0.1",
          "google/gemma-2-2b", "microsoft/Phi-3-mini-4k-instruct", "Qwen/Qwen2.5-0.5B", "mistralai/Mixtral-8x7B-v0.1"]
PARALLELS = [Parallel(), Parallel(2, "ddp"), Parallel(2, "fsdp"), Parallel(4, "fsdp", "cpu"),
             Parallel(2, "fsdp_grad_op"), Parallel(4, "zero2"), Parallel(8, "zero3"), Parallel(8, "zero3", "cpu")]
FAST = settings(max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

@st.composite
def setups(draw):
    method = draw(st.sampled_from(["qlora", "lora", "full"]))
    return TrainSetup(
        method=method,
        quant=draw(st.sampled_from(["nf4", "fp4", "int8"])),
        double_quant=draw(st.booleans()),
        rank=draw(st.sampled_from([1, 8, 16, 64])),
        targets=draw(st.sampled_from(["all-linear", "q_proj,v_proj"])),
        lora_dropout=draw(st.sampled_from([0.0, 0.1])),
        batch=draw(st.integers(1, 16)),
        seq=draw(st.integers(1, 8192)),
        grad_ckpt=draw(st.booleans()),
        attn=draw(st.sampled_from(["sdpa", "eager"])),
        optimizer=draw(st.sampled_from(["adamw", "adamw8bit", "paged_adamw", "sgd", "adafactor"])),
        prepare_kbit=method == "qlora" and draw(st.booleans()),
    )


@FAST
@given(model=st.sampled_from(MODELS), setup=setups(), parallel=st.sampled_from(PARALLELS))
def test_fast_path_equals_the_public_api(model, setup, parallel):
    spec = resolve(model)
    if setup.attn not in spec.arch.attention:
        setup = setup.with_(attn=spec.arch.attention[0])
    try:
        exact = per_gpu(spec, setup, parallel)
    except ModelError:  # e.g. q_proj on Phi-3's fused qkv_proj: both paths refuse alike
        with pytest.raises(ModelError):
            Evaluator(spec, parallel).estimate(setup)
        return
    fast = Evaluator(spec, parallel).estimate(setup)
    assert fast.components == exact.components
    assert fast.phase_peaks == exact.phase_peaks
    assert fast.device_total_bytes == exact.device_total_bytes
    if parallel.strategy == "single":
        # the planner's device total is estimate's: the same caching-allocator replay
        est = estimate(spec, setup)
        assert fast.device_total_bytes == est.device_total_bytes
        assert fast.components == est.components


def _fits(spec, setup, parallel, cap):
    """Through the public API only: vramplan.estimate on one GPU, sharding.per_gpu otherwise."""
    gpu = Gpu("test", cap)
    if parallel.strategy == "single":
        return estimate(spec, setup, gpu=gpu).fits
    return per_gpu(spec, setup, parallel, gpu=gpu).fits


@FAST
@given(model=st.sampled_from(MODELS[:6]), cap_gib=st.floats(6, 150), seq=st.integers(64, 8192),
       batch=st.integers(1, 8), parallel=st.sampled_from(PARALLELS), method=st.sampled_from(["qlora", "lora"]))
def test_max_batch_and_max_seq_are_exact_at_the_boundary(model, cap_gib, seq, batch, parallel, method):
    spec = resolve(model)
    cap = int(cap_gib * GiB)
    setup = TrainSetup(method=method, batch=batch, seq=seq, attn=spec.arch.attention[0])
    p = plan(spec, setup, cap, parallel=parallel, recommend=False, batches=[1], seqs=[seq])
    mb, ms = p.max_batch, p.max_seq
    if mb.value:
        assert _fits(spec, setup.with_(batch=mb.value), parallel, cap)
        assert mb.capped or not _fits(spec, setup.with_(batch=mb.value + 1), parallel, cap)
    else:
        assert not _fits(spec, setup.with_(batch=1), parallel, cap)
    if ms.value:
        assert _fits(spec, setup.with_(seq=ms.value), parallel, cap)
        assert ms.capped or not _fits(spec, setup.with_(seq=ms.value + 1), parallel, cap)
    else:
        assert not _fits(spec, setup.with_(seq=1), parallel, cap)
    assert (p.status != "no") == _fits(spec, setup, parallel, cap)
    assert not p.notes  # the fast path never disagreed with the public API


@given(st.lists(st.booleans(), min_size=1, max_size=200), st.integers(1, 300))
@settings(max_examples=200, deadline=None, database=None)
def test_search_returns_a_boundary_even_for_a_non_monotone_predicate(pattern, start):
    fits = lambda v: v <= len(pattern) and pattern[v - 1]  # noqa: E731
    v, capped = _largest(fits, start, 10_000)
    if v == 0:
        assert not fits(1)
    else:
        assert fits(v) and not fits(v + 1) and not capped


def test_search_caps_at_the_bound():
    assert _largest(lambda v: True, 3, 1000) == (1000, True)
    assert _largest(lambda v: v <= 37, 1, 1000) == (37, False)
    assert _largest(lambda v: False, 5, 1000) == (0, False)


def test_status_thresholds():
    cap = 100 * GiB
    assert status_of(cap + 1, cap) == "no"
    assert status_of(cap, cap) == "tight"
    assert status_of(int(cap * (1 - TIGHT)) + 1, cap) == "tight"
    assert status_of(int(cap * (1 - TIGHT)) - 1, cap) == "fits"


def test_grid_cells_are_the_estimate():
    spec = resolve("mistralai/Mistral-7B-v0.1")
    p = plan(spec, TrainSetup(), "RTX4090", batches=[1, 3, 8], seqs=[512, 4096])
    assert p.grid.batches == (1, 3, 8) and p.grid.seqs == (512, 4096)
    for row in p.grid.cells:
        for cell in row:
            est = estimate(spec, TrainSetup(batch=cell.batch, seq=cell.seq), gpu="RTX4090")
            if cell.lower_bound:   # not replayed: allocated + context alone exceed the GPU
                assert cell.need_bytes == est.peak_allocated_bytes + est.cuda_context_bytes > est.gpu.memory_bytes
                assert cell.need_bytes <= est.device_total_bytes and cell.status == "no"
            else:
                assert cell.need_bytes == est.device_total_bytes
            assert cell.status == est.status


def test_default_grid_brackets_the_limits():
    p = plan("meta-llama/Meta-Llama-3-8B", gpu="24GB")
    assert p.status == "fits" and not p.changes and p.minimum is None
    assert 1 in p.grid.batches and p.setup.seq in p.grid.seqs
    assert max(p.grid.batches) > p.max_batch.value and max(p.grid.seqs) > p.max_seq.value


def test_changes_fit_are_ranked_and_say_what_they_cost():
    setup = TrainSetup(batch=16, seq=4096, attn="eager", grad_ckpt=False)
    p = plan("meta-llama/Meta-Llama-3-8B", setup, "24GB")
    assert p.status == "no" and p.changes
    costs = [c.cost for c in p.changes]
    assert costs == sorted(costs)
    for c in p.changes:
        assert c.setup == setup.with_(**c.changes)
        assert estimate("meta-llama/Meta-Llama-3-8B", c.setup, gpu="24GB").fits
        assert c.need_bytes == estimate("meta-llama/Meta-Llama-3-8B", c.setup, gpu="24GB").device_total_bytes
        assert c.cost_text and c.sources and c.description.startswith("--")
    # eager -> sdpa is free and checkpointing is cheap: the best plan uses them, not a shorter context.
    best = p.changes[0]
    assert best.changes.get("attn") == "sdpa" or best.changes.get("grad_ckpt") or "batch" in best.changes
    assert any("gradient accumulation" in c.cost_text for c in p.changes)


def test_single_cheap_change_is_found_alone():
    # QLoRA 8B on a 17.25 GiB card with torch AdamW and eager attention at 5k: sdpa alone fits
    # (allocated + context 15.0 GiB; the allocator replay reserves 17.7 GiB on a larger card and
    # releases its cache to stay within this one: 17.23 GiB; on a 17 GiB card it runs out of
    # memory in the loss's backward, fragmentation), eager's allocated bytes and context alone
    # need 17.48 GiB. (A bare size assumes sm90 kernels, i.e. flash attention; on a T4 itself bf16
    # is refused and fp16 SDPA with grouped KV heads takes the math fallback, so sdpa does not
    # help there.)
    p = plan("meta-llama/Meta-Llama-3-8B", TrainSetup(seq=5120, attn="eager"), "17.25GiB")
    assert p.status == "no"
    assert p.changes[0].changes == {"attn": "sdpa"} and p.changes[0].cost == 0


def test_impossible_ask_gets_an_answer_not_an_error():
    p = plan("meta-llama/Llama-2-70b", TrainSetup(batch=8, seq=16384), "RTX3060")
    assert p.status == "no" and p.minimum is not None
    m = p.minimum
    assert "does not fit" in m.message and m.floor_bytes > 12 * GiB and m.floor_label
    assert m.smallest_gpu in (None, *[g.name for g in catalog()])
    json.dumps(p.to_dict())  # data all the way down


def test_minimum_names_gpus_and_engines():
    p = plan("meta-llama/Llama-2-70b", TrainSetup(), "RTX4090")
    m = p.minimum
    assert m.smallest_gpu == "L40S"   # the smallest catalog card holding 70B QLoRA alone
    assert m.options and all(o.need_bytes <= 24 * 10**9 for o in m.options)
    assert any(o.offload == "cpu" and o.cpu_bytes > 30 * GiB for o in m.options)
    assert any(o.strategy == "fsdp" and o.offload == "none" for o in m.options)


def test_survey_covers_the_catalog():
    p = plan("meta-llama/Llama-2-70b", gpu="all")
    assert p.gpu is None and p.grid is None and len(p.survey) == len(catalog())
    mems = [r.gpu.memory_bytes for r in p.survey]
    assert mems == sorted(mems)
    for r in p.survey:
        assert (r.status != "no") == (r.need_bytes <= r.gpu.memory_bytes)
        assert (r.max_batch >= 1) == (r.status != "no")


def test_plan_per_gpu_under_fsdp():
    one = plan("meta-llama/Llama-2-70b", gpu="24GB")
    two = plan("meta-llama/Llama-2-70b", gpu="24GB", gpus=2, strategy="fsdp")
    eight = plan("meta-llama/Llama-2-70b", gpu="24GB", gpus=8, strategy="zero3", offload="cpu")
    assert one.need_bytes > two.need_bytes > eight.need_bytes
    assert eight.status == "fits" and eight.max_batch.value >= 1


@pytest.mark.parametrize("kwargs, message", [
    (dict(gpu=None), "plan needs a GPU"),
    (dict(gpu="24GB", gpus=0), "--gpus must be positive"),
    (dict(gpu="24GB", gpus=2, strategy="pipeline"), "unknown strategy 'pipeline'"),
    (dict(gpu="24GB", tight=1.5), "--tight must be a fraction"),
    (dict(gpu="24GB", batches=list(range(1, 100))), "--grid-batch has 99 values"),
    (dict(gpu="24GB", batches=[0, 1]), "--batch must be positive"),
])
def test_bad_plan_input(kwargs, message):
    with pytest.raises(UsageError) as info:
        plan("llama-2-7b", **kwargs)
    assert message in str(info.value)


# --- sweep ----------------------------------------------------------------------------------------

@pytest.mark.pandas
def test_sweep_dataframe():
    df = vramplan.sweep("mistralai/Mistral-7B-v0.1", gpu="24GB", batch=[1, 2, 4, 8], seq=[512, 2048, 8192])
    assert len(df) == 12 and {"batch", "seq", "device_total_bytes", "status", "fits", "weights"} <= set(df.columns)
    assert str(df["device_total_bytes"].dtype) == "int64"
    row = df[(df.batch == 4) & (df.seq == 2048)].iloc[0]
    est = estimate("mistralai/Mistral-7B-v0.1", TrainSetup(batch=4, seq=2048), gpu="24GB")
    assert row.device_total_bytes == est.device_total_bytes and bool(row.fits) == est.fits
    multi = vramplan.sweep("llama-2-70b", gpus=[2, 4, 8], strategy=["fsdp", "zero3"], offload="cpu")
    assert len(multi) == 6 and "status" not in multi.columns


@pytest.mark.pandas
@pytest.mark.parametrize("kwargs, message", [
    (dict(colour=[1]), "unknown sweep axis colour"),
    (dict(batch=[]), "sweep axis batch is empty"),
    (dict(batch=[1, -1]), "--batch must be positive"),
    (dict(gpus=[2], strategy="ddp", offload="cpu"), "--offload cpu needs a sharding engine"),
])
def test_sweep_bad_input(kwargs, message):
    with pytest.raises(UsageError) as info:
        vramplan.sweep("llama-2-7b", **kwargs)
    assert message in str(info.value)


def test_import_vramplan_stays_light():
    code = textwrap.dedent("""
        import sys, vramplan
        assert callable(vramplan.plan) and callable(vramplan.sweep)
        heavy = [m for m in ("pandas", "matplotlib", "torch", "numpy") if m in sys.modules]
        print(",".join(heavy))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == ""


@pytest.mark.pandas
def test_module_import_does_not_shadow_the_sweep_function():
    from vramplan.plan._sweep import SETUP_FIELDS  # binds the submodule on the package

    assert SETUP_FIELDS and len(vramplan.sweep("llama-2-7b", batch=[1, 2])) == 2


# --- CLI ------------------------------------------------------------------------------------------

def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_plan_table(capsys):
    code, out, err = run(capsys, "plan", "meta-llama/Meta-Llama-3-8B", "--gpu", "24GB", "--batch", "16", "--seq", "4096")
    assert code == 0 and not err
    for text in ("DOES NOT FIT", "Largest batch at seq 4096", "Largest seq at batch 16", "GiB per GPU on 24GB",
                 "Changes that make it fit", "--batch"):
        assert text in out


def test_cli_plan_multi_gpu_names_how_parts_are_held(capsys):
    code, out, _ = run(capsys, "plan", "meta-llama/Llama-2-70b", "--gpu", "24GB", "--gpus", "2", "--strategy", "fsdp")
    assert code == 0
    for text in ("2 x fsdp", "sharded 1/N", "replicated", "gathered", "per rank", "_post_forward_reshard",
                 "BACKWARD_PRE"):
        assert text in out


def test_cli_plan_json(capsys):
    code, out, _ = run(capsys, "plan", "llama-2-7b", "--gpu", "A10G", "--gpus", "2", "--strategy", "zero2", "--json")
    assert code == 0
    d = json.loads(out)
    for key in ("status", "need_bytes", "max_batch", "max_seq", "grid", "changes", "estimate", "parallel"):
        assert key in d
    assert d["parallel"]["strategy"] == "zero2" and d["estimate"]["terms"]
    assert sum(t["bytes"] for t in d["estimate"]["terms"]) == d["estimate"]["peak_allocated_bytes"]


def test_cli_plan_all_gpus(capsys):
    code, out, _ = run(capsys, "plan", "meta-llama/Llama-2-70b", "--gpu", "all")
    assert code == 0 and "Every catalog GPU" in out and "H200" in out and "RTX3060" in out


@pytest.mark.parametrize("argv, message", [
    (["plan", "llama-2-7b"], "Error: plan needs a GPU"),
    (["plan", "llama-2-7b", "--gpu", "24GB", "--grid-batch", "1,,4"], "Error: --grid-batch '1,,4' is not a comma"),
    (["plan", "llama-2-7b", "--gpu", "24GB", "--grid-seq", "512,big"], "Error: --grid-seq '512,big': 'big' is not"),
    (["sweep", "llama-2-7b", "--batch", "1,2,x"], "Error: --batch '1,2,x': 'x' is not a whole number"),
    (["sweep", "llama-2-7b", "--seq", ""], "Error: --seq '' is not a comma-separated list"),
    pytest.param(["sweep", "llama-2-7b", "--gpus", "0,2", "--strategy", "fsdp"], "Error: --gpus must be positive",
                 marks=pytest.mark.pandas),
    pytest.param(["sweep", "llama-2-7b", "--method", "qlora,dora"], "Error: unknown method 'dora'",
                 marks=pytest.mark.pandas),
    pytest.param(["sweep", "llama-2-7b", "--csv", "/no/such/dir/x.csv"],
                 "Error: --csv /no/such/dir/x.csv: /no/such/dir does not exist",
                 marks=pytest.mark.pandas),
    (["plan", "llama-2-7b", "--gpu", "24GB", "--plot", "out.bmp"], "Error: cannot plot to 'out.bmp'"),
])
def test_cli_errors_are_one_line_exit_2(capsys, argv, message):
    code, _, err = run(capsys, *argv)
    assert code == 2 and err.startswith(message) and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.pandas
@pytest.mark.matplotlib
def test_cli_sweep_csv_and_plot(capsys, tmp_path):
    csv_path, png = tmp_path / "sweep.csv", tmp_path / "sweep.png"
    code, out, _ = run(capsys, "sweep", "mistralai/Mistral-7B-v0.1", "--gpu", "24GB", "--batch", "1,2,4,8",
                       "--seq", "512,2048,8192", "--csv", str(csv_path), "--plot", str(png))
    assert code == 0 and "CSV written" in out
    lines = csv_path.read_text().splitlines()
    assert len(lines) == 13 and "device_total_bytes" in lines[0]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.matplotlib
def test_cli_plan_plot(capsys, tmp_path):
    png = tmp_path / "breakdown.png"
    code, out, _ = run(capsys, "plan", "meta-llama/Meta-Llama-3-8B", "--gpu", "24GB", "--batch", "8",
                       "--plot", str(png))
    assert code == 0 and png.read_bytes()[:4] == b"\x89PNG"


def test_max_seq_stops_at_the_model_context():
    # TinyLlama's config: max_position_embeddings 2048; on an H200 far longer sequences would fit
    spec = resolve("TinyLlama/TinyLlama-1.1B-Chat-v1.0")
    p = plan(spec, TrainSetup(), "H200", recommend=False, batches=[1], seqs=[2048])
    assert (p.max_seq.value, p.max_seq.capped, p.max_seq.next_need_bytes) == (2048, True, None)
    assert p.max_seq.bound == "the model's context (max_position_embeddings)"
    assert p.max_batch.bound == "the sanity bound" and not p.max_batch.capped
    # a config that declares no context (Gemma 3 4B's text_config leaves it to Gemma3TextConfig):
    # the search's own bound
    from vramplan.plan._planner import seq_bound
    from vramplan.core._setup import MAX_SEQ
    assert seq_bound(resolve("google/gemma-3-4b-pt")) == MAX_SEQ


def test_no_recommend_skips_the_sharded_changes_too():
    """recommend=False (--no-recommend) skips every ranked change, the minimum hardware's 'with N
    GPUs these setup changes fit' included (this setup fits no GPU count as asked, where the
    minimum hardware otherwise searches setup changes under FSDP)."""
    kw = dict(gpu="8GB", grad_ckpt=False, loop="plain", batches=[1], seqs=[2048])
    quiet = plan("Qwen/Qwen2.5-0.5B", recommend=False, **kw)
    assert quiet.changes == () and quiet.minimum.changes == () and quiet.minimum.changes_parallel is None


def test_the_minimum_hardware_judges_each_gpu_count_as_plan_gpus_n_does():
    """Each engine's fewest GPUs is found against the card (its replay there, as `plan --gpus N`
    plans it): Llama-2-70B 4 x 4096 on 48GB is tight on 8 x fsdp and on 2 x zero3 + offload,
    which the need without a card (a card with room to spare) put over 48 GB."""
    p = plan("meta-llama/Llama-2-70b", gpu="48GB", batch=4, seq=4096, recommend=False, batches=[1], seqs=[4096])
    options = {(o.gpus, o.strategy, o.offload): o for o in p.minimum.options}
    for key in ((8, "fsdp", "none"), (2, "zero3", "cpu")):
        gpus, strategy, offload = key
        there = plan("meta-llama/Llama-2-70b", gpu="48GB", batch=4, seq=4096, gpus=gpus, strategy=strategy,
                     offload=offload, recommend=False, batches=[4], seqs=[4096])
        assert (options[key].need_bytes, options[key].status) == (there.need_bytes, there.status) != (None, "no")


def test_one_gpu_with_cpu_offload_is_not_judged_by_the_single_gpu_stream():
    """One GPU of FSDP or ZeRO-3 with CPU offload holds its weights on the CPU: the single-GPU
    replay (every weight on the device) running out of memory on the card is not its verdict, so
    the minimum hardware's option and `plan --gpus 1 --offload cpu` say the same."""
    kw = dict(gpu="48GB", batch=4, seq=1024, recipe="trainer", recommend=False, batches=[4], seqs=[1024])
    p = plan("meta-llama/Llama-2-70b", **kw)
    option = next(o for o in p.minimum.options if (o.gpus, o.strategy, o.offload) == (1, "fsdp", "cpu"))
    alone = plan("meta-llama/Llama-2-70b", gpus=1, strategy="fsdp", offload="cpu", **kw)
    assert (alone.need_bytes, alone.status, alone.estimate.allocator_oom) == (option.need_bytes, option.status, None)
    assert alone.status == "fits"


def test_the_smallest_catalog_gpu_is_judged_on_that_card():
    """A card short of the need without a card releases its cache and may still run the step:
    Qwen2.5-7B 4 x 4096 (51.7 GB with room to spare) runs on an L40S, as estimate there says."""
    p = plan("Qwen/Qwen2.5-7B", gpu="16GB", batch=4, seq=4096, recommend=False, batches=[4], seqs=[4096])
    assert p.minimum.smallest_gpu == "L40S"
    assert estimate("Qwen/Qwen2.5-7B", batch=4, seq=4096, gpu="L40S").status != "no"
    smaller = [g for g in catalog() if g.memory_bytes < resolve_gpu("L40S").memory_bytes]
    assert all(estimate("Qwen/Qwen2.5-7B", batch=4, seq=4096, gpu=g.name).status == "no" for g in smaller
               if g.cuda.bf16)


def test_recipe_changes_under_fsdp_save_per_gpu_bytes():
    kw = dict(gpu="24GB", gpus=2, strategy="fsdp", batch=8, seq=4096, batches=[8], seqs=[4096])
    p = plan("meta-llama/Meta-Llama-3-8B", **kw)
    saved = {tuple(r.change.changes.items()): r.saving_bytes for r in p.recipe_changes}
    before = p.estimate.peak_allocated_bytes
    after = plan("meta-llama/Meta-Llama-3-8B", optimizer="adamw8bit", recommend=False, **kw).estimate
    assert saved[(("optimizer", "adamw8bit"),)] == before - after.peak_allocated_bytes


def test_a_change_the_estimate_refuses_is_not_a_candidate():
    """A smaller micro-batch with gradient accumulation is refused for a tied embedding trained in
    full (estimate/_inventory.py static_memory): the plan drops that candidate and ranks the others,
    where it used to end with the refusal of a --grad-accum the user never gave."""
    p = plan("Qwen/Qwen3-0.6B", gpu="24GB", method="full", batch=8, batches=[8], seqs=[2048])
    assert p.status == "no" and p.changes
    assert all(c.changes.get("method", "full") != "full" for c in p.changes if "grad_accum" in c.changes)


def test_plan_and_estimate_report_one_fragmentation():
    """fragmentation_bytes is the replay's (peak reserved less the most allocated at that peak), in
    plan's JSON as in estimate's: plan reported the slack above peak allocated under that name."""
    kw = dict(gpu="24GB", seq=11000)
    est = estimate("Qwen/Qwen3-0.6B", **kw)
    p = plan("Qwen/Qwen3-0.6B", recommend=False, batches=[1], seqs=[11000], **kw)
    assert p.to_dict()["estimate"]["fragmentation_bytes"] == est.fragmentation_bytes
    assert est.fragmentation_bytes != est.allocator_overhead_bytes     # not the same figure here


def test_an_empty_grid_axis_is_refused():
    with pytest.raises(UsageError, match="--grid-batch has no values"):
        plan("Qwen/Qwen3-0.6B", gpu="24GB", batches=[], recommend=False)
