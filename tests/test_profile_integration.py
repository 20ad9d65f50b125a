"""MemoryCallback in a real (tiny, CPU) transformers Trainer run. torch.cuda's peak counter is
replaced by a scripted meter: the callback's own logic is what is tested."""
import json
import logging
import warnings

import pytest
from conftest import requires

pytestmark = requires("torch", "transformers", "peft")

from vramplan.integrations import MemoryCallback, setup_of  # noqa: E402

CONFIG = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 256, "max_position_embeddings": 512,
          "tie_word_embeddings": False}


class ScriptedMeter:
    available = True

    def __init__(self, peaks):
        self.peaks = list(peaks)
        self.resets = 0
        self.reads = 0

    def reset(self):
        self.resets += 1

    def peak(self):
        value = self.peaks[min(self.reads, len(self.peaks) - 1)]
        self.reads += 1
        return value


def lora_model():
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**CONFIG))
    return get_peft_model(model, LoraConfig(r=8, target_modules="all-linear", task_type="CAUSAL_LM"))


def train(callback, tmp_path, steps=3, **args):
    import torch
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(0)
    data = [{"input_ids": torch.randint(0, 256, (32,)), "labels": torch.randint(0, 256, (32,))} for _ in range(8)]
    targs = TrainingArguments(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=2, report_to=[],
                              use_cpu=True, save_strategy="no", logging_steps=1, disable_tqdm=True, **args)
    Trainer(model=lora_model(), args=targs, train_dataset=data, callbacks=[callback]).train()


def test_logs_estimate_measures_each_step_and_warns_on_excess(tmp_path, caplog):
    meter = ScriptedMeter([100_000, 2**30, 100_000])   # step 2 far above the tiny model's prediction
    cb = MemoryCallback(meter=meter)
    with caplog.at_level(logging.INFO, logger="vramplan"), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(cb, tmp_path)
    # the shape came from the first batch; the setup from the model and the arguments
    s = cb.estimate.setup
    # transformers TrainingArguments default_optim on torch >= 2.8: adamw_torch_fused
    assert (s.method, s.batch, s.seq, s.rank, s.grad_ckpt, s.optimizer) == ("lora", 2, 32, 8, False, "adamw_fused")
    assert set(s.targets) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert meter.resets == 3 and [h.step for h in cb.history] == [1, 2, 3]
    assert [h.exceeded for h in cb.history] == [False, True, False]
    assert any("predicted peak allocated" in r.message for r in caplog.records)
    excess = [w for w in caught if "above the prediction" in str(w.message)]
    assert len(excess) == 1 and "step 2" in str(excess[0].message)
    assert cb.summary()["max_peak_allocated_bytes"] == 2**30


def test_seq_given_estimates_at_train_start_and_margin(tmp_path):
    meter = ScriptedMeter([10**12])
    cb = MemoryCallback(seq=32, meter=meter, margin=10**9)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResourceWarning)   # the margin absorbs the excess
        train(cb, tmp_path, steps=1)
    assert cb.estimate.setup.seq == 32 and cb.history[0].exceeded is False


def test_no_cuda_measures_nothing_but_still_estimates(tmp_path):
    class NoCuda(ScriptedMeter):
        available = False
    cb = MemoryCallback(seq=32, meter=NoCuda([1]))
    train(cb, tmp_path, steps=1)
    assert cb.history == [] and cb.estimate is not None and "no CUDA" in cb.disabled_reason


def test_unknown_architecture_does_not_stop_training(tmp_path, caplog):
    cb = MemoryCallback(seq=32, meter=ScriptedMeter([1]))
    from vramplan.integrations import spec_of

    class Odd:
        config = type("C", (), {"to_dict": lambda self: {"model_type": "not-a-model"}})()

    with pytest.raises(Exception):
        spec_of(Odd())
    # through the Trainer: a model vramplan cannot read logs a warning and training continues
    import vramplan.integrations as integ
    real = integ.spec_of
    integ.spec_of = lambda model, model_id=None: spec_of(Odd())
    try:
        with caplog.at_level(logging.WARNING, logger="vramplan"):
            train(cb, tmp_path, steps=1)
    finally:
        integ.spec_of = real
    assert cb.estimate is None and any("cannot estimate" in r.message for r in caplog.records)
    assert len(cb.history) == 1 and cb.history[0].predicted_peak_allocated_bytes is None


@pytest.mark.bitsandbytes
def test_setup_is_read_off_a_quantized_peft_model(tmp_path):
    import torch
    from transformers import TrainingArguments

    from vramplan.core._models import spec_from_config
    from vramplan.core._setup import TrainSetup
    from vramplan.simulate._build import build

    spec = spec_from_config(CONFIG, "tiny", "test")
    built = build(spec, TrainSetup(quant="fp4", double_quant=False, rank=4, targets=("q_proj", "v_proj"), seq=16),
                  device="cpu")
    ckpt = "activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__ \
        else "gradient_checkpointing"
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=3, optim="paged_adamw_8bit",
                             bf16=False, use_cpu=True, report_to=[], **{ckpt: True})
    s = setup_of(built.model, args, seq=128)
    assert (s.method, s.quant, s.double_quant, s.dtype, s.rank, s.targets) == \
        ("qlora", "fp4", False, "bf16", 4, ("q_proj", "v_proj"))
    assert (s.batch, s.seq, s.grad_ckpt, s.optimizer, s.prepare_kbit, s.amp, s.grad_accum, s.adapter_dtype) == \
        (3, 128, True, "paged_adamw8bit", False, "none", 1, "fp32")
    assert s.reentrant is False
    assert json.dumps(s.to_dict())
    # use_reentrant in the checkpointing kwargs the Trainer passes on
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[],
                             **{ckpt: True, f"{ckpt}_kwargs": {"use_reentrant": True}})
    assert setup_of(built.model, args, seq=128).reentrant is True
    # gradient_accumulation_steps; LoRA weights TRL's SFTTrainer cast to bf16
    args = TrainingArguments(output_dir=str(tmp_path), gradient_accumulation_steps=16, use_cpu=True, report_to=[])
    assert setup_of(built.model, args, seq=128).grad_accum == 16
    for name, param in built.model.named_parameters():
        if param.requires_grad:
            param.data = param.data.to(torch.bfloat16)
    assert setup_of(built.model, args, seq=128).adapter_dtype == "bf16"
    # Trainer's bf16=True is autocast; adamw_torch_fused is the fused kernel, adamw_torch foreach
    for optim, expected in (("adamw_torch_fused", "adamw_fused"), ("adamw_torch", "adamw_foreach")):
        args = TrainingArguments(output_dir=str(tmp_path), optim=optim, bf16=True, use_cpu=True, report_to=[])
        s = setup_of(built.model, args, seq=128)
        assert (s.optimizer, s.amp, s.dtype) == (expected, "bf16", "bf16")
    # TRL's SFTConfig: SFTTrainer computes the loss with its fused lm_head
    trl = pytest.importorskip("trl", reason="TRL's SFTConfig needs trl")
    sft = trl.SFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to=[], bf16=False)
    assert setup_of(built.model, sft, seq=128).loss == "chunked"
    assert s.loss == "full"


@pytest.mark.parametrize("kwargs, message", [
    (dict(seq="abc"), "seq must be a whole number of tokens from 1 to 16,777,216, got 'abc'"),
    (dict(seq=32.7), "seq must be a whole number of tokens from 1 to 16,777,216, got 32.7"),
    (dict(seq=True), "seq must be a whole number of tokens from 1 to 16,777,216, got True"),
    (dict(seq=10**12), "seq must be a whole number of tokens from 1 to 16,777,216, got 1000000000000"),
    (dict(gpu="banana"), "unknown GPU 'banana'"),
    (dict(gpu="-5GB"), "GPU memory must be positive, got '-5GB'"),
    (dict(setup="foo"), "setup must be a TrainSetup, got str"),
    (dict(margin="x"), "margin must be a fraction >= 0, got 'x'"),
    (dict(margin=-1.5), "margin must be a fraction >= 0, got -1.5"),
    (dict(margin=float("nan")), "margin must be a fraction >= 0, got nan"),
    (dict(meter=object()), "meter must have reset() and peak(), got object"),
])
def test_bad_arguments_are_refused_before_training(kwargs, message):
    from vramplan.core._errors import VramplanError

    with pytest.raises(VramplanError) as info:
        MemoryCallback(**kwargs)
    assert info.value.message == message and info.value.hint


def test_fp32_weights_under_trainer_bf16_are_autocast_not_bf16_weights(tmp_path):
    # Trainer(bf16=True) over a float32 model runs autocast; the weights stay float32
    cb = MemoryCallback(seq=32, meter=ScriptedMeter([1]))
    train(cb, tmp_path, steps=1, bf16=True)
    assert (cb.estimate.setup.dtype, cb.estimate.setup.amp) == ("fp32", "bf16")


@pytest.mark.parametrize("optim", ["lion_32bit", "rmsprop"])
def test_an_optimizer_the_estimate_does_not_model_is_said_not_replaced(tmp_path, caplog, optim):
    cb = MemoryCallback(seq=32, meter=ScriptedMeter([1]))
    with caplog.at_level(logging.WARNING, logger="vramplan"):
        train(cb, tmp_path, steps=1, optim=optim)
    assert cb.estimate is None
    assert any(f"cannot estimate this run: optimizer '{optim}' is not modelled" in r.message for r in caplog.records)
