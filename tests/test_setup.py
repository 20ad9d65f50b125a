import pytest

from vramplan.core._errors import UsageError
from vramplan.core._setup import TrainSetup


def test_defaults_are_the_plain_qlora_recipe():
    s = TrainSetup()
    assert (s.method, s.quant, s.double_quant, s.dtype, s.rank, s.targets) == \
        ("qlora", "nf4", True, "bf16", 16, ("all-linear",))
    assert (s.batch, s.seq, s.grad_ckpt, s.attn, s.optimizer) == (1, 2048, True, "sdpa", "adamw")


@pytest.mark.parametrize("field, value, message", [
    ("method", "dora", "unknown method 'dora'"),
    ("quant", "nf3", "unknown quant 'nf3'"),
    ("optimizer", "lion", "unknown optimizer 'lion'"),
    ("attn", "flash", "unknown attn 'flash'"),
    ("dtype", "fp8", "unknown dtype 'fp8'"),
    ("batch", 0, "--batch must be positive, got 0"),
    ("seq", -5, "--seq must be positive, got -5"),
    ("rank", 0, "--rank must be positive, got 0"),
    ("batch", 10**9, "--batch 1000000000 is beyond any real run"),
    ("seq", 2.5, "--seq must be a whole number"),
    ("lora_dropout", 1.5, "--lora-dropout must be in [0, 1)"),
])
def test_bad_values_name_the_flag(field, value, message):
    with pytest.raises(UsageError) as info:
        TrainSetup(**{field: value})
    assert message in str(info.value)


def test_targets_parse_from_text():
    assert TrainSetup(targets="q_proj, v_proj").targets == ("q_proj", "v_proj")
    with pytest.raises(UsageError):
        TrainSetup(targets="all-linear,q_proj")
    with pytest.raises(UsageError):
        TrainSetup(targets=" , ")


def test_to_dict_hides_quant_flags_without_quantization():
    assert TrainSetup(method="lora").to_dict()["quant"] is None
    assert TrainSetup().to_dict()["quant"] == "nf4"


@pytest.mark.parametrize("flags, message", [
    # "false" is truthy: taken as given it would silently turn checkpointing on
    (dict(grad_ckpt="false"), "grad_ckpt must be true or false, got 'false'"),
    (dict(double_quant="no"), "double_quant must be true or false, got 'no'"),
    (dict(prepare_kbit="yes"), "prepare_kbit must be true or false, got 'yes'"),
    (dict(lora_dropout="0.1"), "--lora-dropout must be a number in [0, 1), got '0.1'"),
    (dict(lora_dropout=None), "--lora-dropout must be a number in [0, 1), got None"),
    (dict(targets=123), "--targets must be module names, got 123"),
    (dict(targets=["all-linear", "q_proj"]), "--targets all-linear cannot be combined with module names"),
    (dict(targets=("all-linear", "q_proj")), "--targets all-linear cannot be combined with module names"),
])
def test_library_values_of_the_wrong_type_are_refused(flags, message):
    with pytest.raises(UsageError) as exc:
        TrainSetup(**flags)
    assert exc.value.message == message


def test_a_list_of_targets_is_a_tuple():
    assert TrainSetup(targets=["q_proj", "v_proj"]).targets == ("q_proj", "v_proj")


def test_library_calls_check_what_they_are_given():
    from vramplan import estimate, replay_allocations
    from vramplan.core._gpus import resolve_gpu

    with pytest.raises(UsageError, match="setup must be a TrainSetup, got str"):
        estimate("llama-2-7b", "x")
    with pytest.raises(UsageError, match=r"GPU size 24 bytes is not a plausible GPU memory size \(hint: a number is "
                                         r"bytes"):
        estimate("llama-2-7b", gpu=24)
    assert resolve_gpu(24e9) == resolve_gpu(24_000_000_000)
    for events in (None, [1, 2], [("alloc", ["key"], 512)]):
        with pytest.raises(UsageError, match=r"events must be an iterable of \('alloc', key, nbytes"):
            replay_allocations(events)
