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
