"""`sweep` says what `estimate` says: every flag estimate takes reaches the rows (or is refused),
the GPU's default dtype and --arch as estimate takes them, a swept value judged in its own
combination, --tight checked as `plan` checks it, and no output left behind by a failed command."""
import json
import math

import pytest

import vramplan
from vramplan.cli import main
from vramplan.cli._flags import setup_flags

pytestmark = pytest.mark.pandas

QWEN = "Qwen/Qwen2.5-0.5B"

# One case per flag of `estimate` (cli/_flags.py setup_flags): the flags, on a model where it matters.
CASES = [
    (QWEN, "--gpu", "16GB", "--arch", "sm75", "--dtype", "fp16"),
    (QWEN, "--gpu", "16GB", "--arch", "sm80"),
    (QWEN, "--method", "lora"),
    (QWEN, "--quant", "int8"),
    (QWEN, "--no-double-quant"),
    (QWEN, "--dtype", "fp16"),
    (QWEN, "--rank", "8"),
    (QWEN, "--targets", "q_proj,v_proj"),
    (QWEN, "--lora-dropout", "0.1"),
    (QWEN, "--batch", "2"),
    (QWEN, "--seq", "512"),
    (QWEN, "--grad-accum", "2"),
    (QWEN, "--no-grad-ckpt"),
    (QWEN, "--grad-ckpt", "--ckpt-reentrant"),
    (QWEN, "--no-ckpt-reentrant"),
    (QWEN, "--attn", "eager"),
    (QWEN, "--optimizer", "adamw8bit"),
    (QWEN, "--prepare-kbit"),
    (QWEN, "--no-prepare-kbit"),
    (QWEN, "--prepare-kbit", "--amp", "bf16", "--recast"),
    (QWEN, "--recipe", "qlora-paper", "--no-recast"),
    (QWEN, "--adapter-dtype", "bf16"),
    ("mistralai/Mixtral-8x7B-v0.1", "--gpu", "A100-80GB", "--experts", "4bit"),
    (QWEN, "--amp", "bf16"),
    (QWEN, "--loop", "plain"),
    (QWEN, "--loss", "chunked"),
    (QWEN, "--recipe", "trl-sft"),
    (QWEN, "--alloc-conf", "expandable_segments:True"),
    # a flag given with a swept value that leaves it (estimate refuses --recast with --method lora)
    (QWEN, "--method", "lora", "--prepare-kbit", "--amp", "bf16", "--recast"),
    (QWEN, "--method", "full", "--targets", "q_proj,v_proj"),
]
NOT_SETUP = {"-h", "--help", "--json", "--gpu"}   # --gpu: every case has one


def outcome(capsys, command: str, model: str, *flags):
    """(device total, status) of the one row, or the one-line error"""
    argv = [command, model, *flags, "--json"]
    if "--gpu" not in flags:
        argv += ["--gpu", "24GB"]
    code = main(argv)
    out, err = capsys.readouterr()
    if code:
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err
        return err.strip()
    d = json.loads(out)
    if command == "sweep":
        (d,) = d
    return d["device_total_bytes"], d["status"]


def test_sweep_rows_are_the_estimate_for_every_estimate_flag(capsys):
    # the bug bash: --experts never reached the rows, nor --arch; every flag of estimate has a case
    options = [a.option_strings for a in setup_flags()._actions if a.option_strings]
    covered = {f for case in CASES for f in case[1:] if f.startswith("-")} | NOT_SETUP
    assert [o for o in options if not covered & set(o)] == []
    differ = []
    for model, *flags in CASES:
        sweep, estimate = outcome(capsys, "sweep", model, *flags), outcome(capsys, "estimate", model, *flags)
        if sweep != estimate:
            differ.append((" ".join(flags), sweep, estimate))
    assert differ == []


def test_sweep_defaults_to_the_gpus_dtype():
    df = vramplan.sweep("meta-llama/Llama-2-7b", gpu="T4")
    est = vramplan.estimate("meta-llama/Llama-2-7b", gpu="T4")
    assert df["dtype"].tolist() == ["fp16"] and df["device_total_bytes"].tolist() == [est.device_total_bytes]


def test_sweep_arch_needs_a_bare_size(capsys):
    assert main(["sweep", QWEN, "--arch", "sm75", "--dtype", "fp16"]) == 2
    assert capsys.readouterr().err == ("Error: sweep --arch sm75 needs a bare --gpu size (hint: e.g. --gpu 16GB "
                                       "--arch sm75, or `vramplan estimate` without --gpu)\n")


def test_a_swept_value_is_judged_in_its_own_combination(capsys):
    # --dtype fp32 under --recipe trainer's bf16 autocast runs with --method lora, not with qlora
    flags = ("--gpu", "24GB", "--method", "lora", "--dtype", "fp32", "--recipe", "trainer")
    assert outcome(capsys, "sweep", "meta-llama/Llama-2-7b", *flags) == \
        outcome(capsys, "estimate", "meta-llama/Llama-2-7b", *flags)
    assert main(["sweep", QWEN, "--gpu", "24GB", "--method", "qlora,lora", "--dtype", "fp32", "--recipe", "trainer",
                 "--json"]) == 0
    qlora, lora = json.loads(capsys.readouterr().out)
    assert qlora["error"].startswith("--amp bf16 (--recipe trainer's) is modelled for bf16 weights") and lora["error"] is None
    # a value no combination runs with is still bad input
    assert main(["sweep", QWEN, "--method", "qlora,dora"]) == 2
    assert capsys.readouterr().err.startswith("Error: unknown method 'dora'")


@pytest.mark.parametrize("tight", ["1.5", "-1", "nan"])
def test_sweep_checks_tight_as_plan_does(capsys, tight):
    for command in ("sweep", "plan"):
        assert main([command, QWEN, "--gpu", "24GB", "--tight", tight]) == 2
        shown = repr(float(tight)) if not math.isnan(float(tight)) else "nan"
        assert capsys.readouterr().err == (f"Error: --tight must be a fraction in [0, 1), got {shown} "
                                           "(hint: e.g. --tight 0.05)\n")


@pytest.mark.parametrize("plot", ["o1.txt", "missing/o1.png"])
def test_a_failed_plot_leaves_no_csv(capsys, tmp_path, plot):
    csv = tmp_path / "o1.csv"
    assert main(["sweep", QWEN, "--gpu", "24GB", "--csv", str(csv), "--plot", str(tmp_path / plot)]) == 2
    assert capsys.readouterr().err.startswith(f"Error: cannot plot to {str(tmp_path / plot)!r}")
    assert list(tmp_path.iterdir()) == []


def test_sweep_json_has_null_where_a_row_has_no_value(capsys):
    assert main(["sweep", QWEN, "--gpu", "24GB", "--method", "qlora,lora,full", "--json"]) == 0
    text = capsys.readouterr().out
    assert "NaN" not in text        # no JSON number
    rows = json.loads(text)
    assert [r["quant"] for r in rows] == ["nf4", None, None]
    assert all(isinstance(r["device_total_bytes"], int) for r in rows)


def test_grid_flags_with_gpu_all_are_refused(capsys):
    assert main(["plan", QWEN, "--gpu", "all", "--grid-batch", "1,2"]) == 2
    assert capsys.readouterr().err.startswith("Error: --grid-batch / --grid-seq shape one GPU's grid; --gpu all has none")


def test_a_recipe_list_in_the_library_is_one_error():
    with pytest.raises(vramplan.UsageError, match=r"unknown recipe \['trainer'\]"):
        vramplan.estimate(QWEN, recipe=["trainer"])


def test_a_parallel_combination_that_cannot_run_is_a_row_with_its_reason():
    """--offload cpu runs with fsdp but not ddp, --strategy single with 1 GPU but not 2: those
    combinations are rows with their reasons, the others are computed as plan computes them."""
    df = vramplan.sweep(QWEN, "8GB", gpus=2, strategy=["ddp", "fsdp"], offload=["none", "cpu"])
    rows = {(r.strategy, r.offload): r for r in df.itertuples()}
    assert rows[("ddp", "cpu")].error.startswith("--offload cpu needs a sharding engine, not ddp")
    assert rows[("fsdp", "cpu")].error is None and rows[("ddp", "none")].error is None
    single = vramplan.plan(QWEN, gpu="8GB", gpus=2, strategy="fsdp", offload="cpu", recommend=False)
    assert rows[("fsdp", "cpu")].device_total_bytes == single.need_bytes
    df = vramplan.sweep(QWEN, "8GB", gpus=[1, 2], strategy=["single", "ddp"])
    bad = df[df.error.notna()]
    assert list(zip(bad.gpus, bad.strategy)) == [(2, "single")]


def test_a_parallel_value_no_combination_runs_with_is_bad_input(capsys):
    assert main(["sweep", QWEN, "--gpu", "8GB", "--gpus", "2", "--strategy", "ddp,fsdpp"]) == 2
    assert capsys.readouterr().err.startswith("Error: unknown strategy 'fsdpp'")
