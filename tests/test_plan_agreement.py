"""`plan` says what `estimate` says: the survey of every catalog GPU (`--gpu all`) row by row as
`plan --gpu <that card>`, --arch as estimate takes it, the grid flags named in their errors, and
a ranked batch change that keeps the effective batch it claims to keep."""
import json

import pytest

from vramplan.cli import main
from vramplan.core._gpus import resolve_gpu
from vramplan.core._setup import make_setup
from vramplan.plan._planner import Evaluator, _apply, _candidates
from vramplan.plan._sharding import Parallel
from vramplan.core._models import resolve

LLAMA = "meta-llama/Llama-2-7b"


def run_json(capsys, *argv):
    code = main(list(argv) + ["--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


def run_error(capsys, *argv) -> str:
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert code == 2 and not out and err.count("\n") == 1 and "Traceback" not in err
    return err.strip()


def _survey(capsys, *flags) -> tuple[dict, dict]:
    """(`plan --gpu all --batch 4` rows by card name, the whole answer): the bug bash's case"""
    d = run_json(capsys, "plan", LLAMA, "--gpu", "all", "--batch", "4", "--no-recommend", *flags)
    return {r["gpu"]["name"]: r for r in d["survey"]}, d


def test_survey_rows_are_each_cards_estimate_and_plan(capsys):
    # RTX3060, RTX3090, RTX6000-Ada and H200 run other kernels than an H100 (their need differs);
    # T4 and V100 default to fp16 as estimate does there
    rows, _ = _survey(capsys)
    for card in ("RTX3060", "RTX3090", "RTX6000-Ada", "H200", "T4", "V100-16GB"):
        est = run_json(capsys, "estimate", LLAMA, "--gpu", card, "--batch", "4")
        assert (rows[card]["need_bytes"], rows[card]["status"]) == (est["device_total_bytes"], est["status"]), card
        assert rows[card]["error"] is None
    assert rows["RTX3060"]["status"] == "tight"
    # the largest batch and sequence as `plan --gpu <card>` finds them (the bug bash: H100 42 vs 52)
    for card in ("H100-80GB", "RTX3060"):
        one = run_json(capsys, "plan", LLAMA, "--gpu", card, "--batch", "4", "--no-recommend",
                       "--grid-batch", "4", "--grid-seq", "2048")
        assert (rows[card]["max_batch"], rows[card]["max_seq"]) == (one["max_batch"]["value"], one["max_seq"]["value"])
        assert rows[card]["need_bytes"] == one["need_bytes"] and rows[card]["status"] == one["status"]


def test_survey_uses_the_allocator_settings(capsys):
    conf = "expandable_segments:True"
    rows, d = _survey(capsys, "--alloc-conf", conf)
    assert d["alloc_conf"] == conf
    est = run_json(capsys, "estimate", LLAMA, "--gpu", "RTX3060", "--batch", "4", "--alloc-conf", conf)
    assert (rows["RTX3060"]["need_bytes"], rows["RTX3060"]["status"]) == (est["device_total_bytes"], est["status"])


def test_survey_marks_cards_without_bf16_when_bf16_is_asked(capsys):
    rows, _ = _survey(capsys, "--dtype", "bf16")
    for card in ("T4", "V100-16GB", "V100-32GB"):
        assert rows[card]["status"] is None and rows[card]["need_bytes"] is None
        assert rows[card]["error"] == run_error(capsys, "estimate", LLAMA, "--gpu", card, "--dtype", "bf16") \
            .removeprefix("Error: ")
    assert rows["A10G"]["error"] is None and rows["A10G"]["status"] == "fits"


def test_survey_refuses_arch(capsys):
    assert run_error(capsys, "plan", LLAMA, "--gpu", "all", "--arch", "sm75") == (
        "Error: --arch sm75 contradicts --gpu all: each catalog GPU has its own "
        "(hint: give --arch only with a bare size such as --gpu 16GB)")


@pytest.mark.parametrize("flags", [
    ("--arch", "sm75", "--dtype", "fp16"),
    ("--arch", "sm80"),
    ("--arch", "sm70", "--dtype", "fp16", "--batch", "2"),
])
def test_plan_honours_arch_as_estimate_does(capsys, flags):
    est = run_json(capsys, "estimate", LLAMA, "--gpu", "16GB", *flags)
    p = run_json(capsys, "plan", LLAMA, "--gpu", "16GB", *flags, "--no-recommend", "--grid-batch", "1",
                 "--grid-seq", "2048")
    assert (p["need_bytes"], p["status"]) == (est["device_total_bytes"], est["status"])


def test_plan_refuses_bf16_on_an_arch_without_it_as_estimate_does(capsys):
    flags = ("--gpu", "16GB", "--arch", "sm75", "--dtype", "bf16")
    assert run_error(capsys, "plan", LLAMA, *flags) == run_error(capsys, "estimate", LLAMA, *flags) == (
        "Error: an sm75 GPU has no bf16 hardware; bf16 training is not planned there "
        "(hint: use --dtype fp16 (or dtype='fp16'))")


@pytest.mark.parametrize("flag, value, message", [
    ("--grid-batch", "0,1", "Error: --grid-batch must be positive, got 0 (hint: e.g. --grid-batch 4)"),
    ("--grid-seq", "-5", "Error: --grid-seq must be positive, got -5 (hint: e.g. --grid-seq 4)"),
    ("--grid-seq", "512,99999999", "Error: --grid-seq 99999999 is beyond any real run"),
])
def test_grid_errors_name_the_grid_flag(capsys, flag, value, message):
    assert run_error(capsys, "plan", LLAMA, "--gpu", "24GB", flag, value).startswith(message)


def test_smaller_batch_with_accumulation_keeps_the_effective_batch():
    # the bug bash: 16 on 24GB under --recipe trainer became "--batch 12, --grad-accum 2" (24)
    spec = resolve(LLAMA)
    setup = make_setup("trainer", batch=16, attn=spec.arch.default_attention)
    gpu = resolve_gpu("24GB")
    ev = Evaluator(spec, Parallel(), gpu)
    (batch,) = [c for c in _candidates(spec, setup) if c.search == "batch"]
    new, changes, _cost, texts = _apply(ev, setup, (batch,), gpu.memory_bytes)
    assert new.batch < 16 and new.batch * new.grad_accum == 16 * setup.grad_accum
    assert changes == {"batch": new.batch, "grad_accum": new.grad_accum}
    assert texts[0].startswith(f"gradient accumulation x{new.grad_accum} keeps the effective batch")
