"""`vramplan plan --deepspeed CONFIG`: a DeepSpeed config file as the per-GPU Parallel
(plan/_deepspeed_config.py). "auto" values as transformers' HfTrainerDeepSpeedConfig fills them
from the hidden size; what the file cannot mean for vramplan is refused with one line."""
import json
import os

import pytest

from vramplan.cli import main
from vramplan.core._errors import UsageError
from vramplan.core._models import resolve
from vramplan.plan._deepspeed_config import parallel_from_deepspeed
from vramplan.plan._sharding import DS_REDUCE_BUCKET, per_gpu

LLAMA2_7B = resolve("meta-llama/Llama-2-7b-hf")
# the ZeRO-3 example of the transformers docs (main_classes/deepspeed), "auto" where it has it
HF_ZERO3 = {"bf16": {"enabled": "auto"},
            "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu", "pin_memory": True},
                                  "offload_param": {"device": "cpu", "pin_memory": True}, "overlap_comm": True,
                                  "contiguous_gradients": True, "sub_group_size": 1e9, "reduce_bucket_size": "auto",
                                  "stage3_prefetch_bucket_size": "auto", "stage3_param_persistence_threshold": "auto",
                                  "stage3_max_live_parameters": 1e9, "stage3_max_reuse_distance": 1e9,
                                  "stage3_gather_16bit_weights_on_model_save": True}}


def write(tmp_path, config, name="ds.json"):
    path = tmp_path / name
    path.write_text(json.dumps(config))
    return path


def test_auto_values_are_the_hf_trainers(tmp_path):
    p = parallel_from_deepspeed(write(tmp_path, HF_ZERO3), 4, LLAMA2_7B)
    h = 4096
    assert (p.gpus, p.strategy, p.offload, p.overlap_comm) == (4, "zero3", "cpu", True)
    assert p.reduce_bucket_size == h * h and p.prefetch_bucket_size == int(0.9 * h * h)
    assert p.param_persistence_threshold == 10 * h
    assert p.max_live_parameters == p.max_reuse_distance == 1_000_000_000


def test_absent_keys_keep_deepspeeds_defaults_and_change_the_estimate(tmp_path):
    plain = parallel_from_deepspeed(write(tmp_path, {"zero_optimization": {"stage": 2}}), 2, LLAMA2_7B)
    assert (plain.strategy, plain.offload, plain.reduce_bucket_size) == ("zero2", "none", DS_REDUCE_BUCKET)
    hf = dict(HF_ZERO3, zero_optimization=dict(HF_ZERO3["zero_optimization"], offload_optimizer={"device": "none"},
                                               offload_param={"device": "none"}))
    auto = parallel_from_deepspeed(write(tmp_path, hf), 2, LLAMA2_7B)
    # hidden^2 elements of reduce bucket instead of 5e8: 32 MiB instead of 0.93 GiB per GPU
    assert per_gpu(LLAMA2_7B, None, auto).peak_allocated_bytes < \
        per_gpu(LLAMA2_7B, None, gpus=2, strategy="zero3").peak_allocated_bytes - 800 * 2**20


def run_plan(capsys, tmp_path, config, *flags):
    path = config if isinstance(config, str) else write(tmp_path, config)
    code = main(["plan", "meta-llama/Llama-2-7b-hf", "--gpu", "24GB", "--gpus", "2", "--deepspeed", str(path),
                 "--no-recommend", *flags])
    return code, capsys.readouterr()


@pytest.mark.parametrize("config, flags, message", [
    ({"zero_optimization": {"stage": 3}}, ("--strategy", "fsdp"),
     "--strategy fsdp contradicts {path} (zero_optimization.stage 3) (hint: drop --strategy: the config decides it)"),
    ({"zero_optimization": {"stage": 3}}, ("--offload", "cpu"),
     "--offload cpu contradicts {path} (offload none) (hint: drop --offload: the config decides it)"),
    ({"zero_optimization": {"stage": 1}}, (), "the DeepSpeed config {path} sets zero_optimization.stage 1 "
                                              "(hint: vramplan plans stage 2 and stage 3)"),
    ({"train_batch_size": 8}, (), "the DeepSpeed config {path} has no zero_optimization section"),
    ({"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}}, (),
     "{path} offloads offload_param to 'nvme' (hint: vramplan models offload to the CPU only)"),
    ({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}, (),
     "{path} offloads the optimizer but not the other: not modelled"),
    ({"zero_optimization": {"stage": 3, "stage3_max_reuse_distance": "auto"}}, (),
     "zero_optimization.stage3_max_reuse_distance in {path} is 'auto' (hint: a whole number of elements up to "
     "2.81e+14, e.g. 5e8)"),
    ({"zero_optimization": {"stage": [2]}}, (),
     "the DeepSpeed config {path} sets zero_optimization.stage [2] (hint: vramplan plans stage 2 and stage 3)"),
    ({"zero_optimization": {"stage": 2, "reduce_bucket_size": float("inf")}}, (),
     "zero_optimization.reduce_bucket_size in {path} is inf (hint: a whole number of elements up to 2.81e+14, "
     "e.g. 5e8 or \"auto\")"),
    ({"zero_optimization": {"stage": 2, "reduce_bucket_size": float("nan")}}, (),
     "zero_optimization.reduce_bucket_size in {path} is nan"),
    # its bytes would pass the 2**64 the replay packs sizes under
    ({"zero_optimization": {"stage": 3, "reduce_bucket_size": 1e30}}, (),
     "zero_optimization.reduce_bucket_size in {path} is 1e+30"),
    # the micro-batch is the config's; accumulation under ZeRO is not modelled
    ({"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 2}}, ("--batch", "4"),
     "--batch 4 contradicts {path} (train_micro_batch_size_per_gpu: 2) (hint: drop --batch: the config decides it)"),
    ({"gradient_accumulation_steps": 4, "zero_optimization": {"stage": 3}}, (),
     "{path} sets gradient_accumulation_steps 4: accumulation under ZeRO is not modelled (hint: plan the peak of "
     "one micro-step: set it to 1 in a copy of the config)"),
    ({"train_micro_batch_size_per_gpu": 0, "zero_optimization": {"stage": 2}}, (),
     "train_micro_batch_size_per_gpu in {path} is 0"),
    ({"fp16": {"enabled": True}, "zero_optimization": {"stage": 2}}, ("--dtype", "bf16"),
     "--dtype bf16 contradicts {path} (its enabled fp16 / bf16 section: fp16) (hint: drop --dtype: the config "
     "decides it)"),
    ({"fp16": {"enabled": True}, "bf16": {"enabled": True}, "zero_optimization": {"stage": 2}}, (),
     "{path} enables both fp16 and bf16"),
    # "bfloat16": DeepSpeed's older name of the bf16 section
    ({"bfloat16": {"enabled": True}, "zero_optimization": {"stage": 2}}, ("--dtype", "fp16"),
     "--dtype fp16 contradicts {path} (its enabled fp16 / bf16 section: bf16)"),
])
def test_what_cannot_be_planned_is_one_line(capsys, tmp_path, config, flags, message):
    code, out = run_plan(capsys, tmp_path, config, *flags)
    path = tmp_path / "ds.json"
    assert code == 2 and out.out == ""
    assert out.err.startswith("Error: " + message.format(path=path)) and out.err.count("\n") == 1


def test_an_unreadable_file_is_one_line(capsys, tmp_path):
    code, out = run_plan(capsys, tmp_path, str(tmp_path / "missing.json"))
    assert code == 2 and out.err.startswith(f"Error: cannot read the DeepSpeed config {tmp_path / 'missing.json'}: ")
    (tmp_path / "bad.json").write_text("{")
    code, out = run_plan(capsys, tmp_path, str(tmp_path / "bad.json"))
    assert code == 2 and out.err.startswith(f"Error: the DeepSpeed config {tmp_path / 'bad.json'} is not JSON: ")
    (tmp_path / "deep.json").write_text('{"zero_optimization": ' + "[" * 100_000 + "]" * 100_000 + "}")
    code, out = run_plan(capsys, tmp_path, str(tmp_path / "deep.json"))
    assert code == 2 and out.err.startswith(f"Error: the DeepSpeed config {tmp_path / 'deep.json'} is not JSON: ")
    assert out.err.count("\n") == 1
    for other in ("folder", "pipe"):
        path = tmp_path / other
        path.mkdir() if other == "folder" else os.mkfifo(path)
        code, out = run_plan(capsys, tmp_path, str(path))
        assert code == 2 and out.err.startswith(f"Error: the DeepSpeed config {path} is not a regular file (hint: ")


def test_the_plan_uses_the_file(capsys, tmp_path):
    code, out = run_plan(capsys, tmp_path, HF_ZERO3, "--json")
    assert code == 0
    par = json.loads(out.out)["parallel"]
    assert (par["gpus"], par["strategy"], par["offload"]) == (2, "zero3", "cpu")
    assert (par["reduce_bucket_size"], par["prefetch_bucket_size"], par["param_persistence_threshold"]) == \
        (4096 * 4096, int(0.9 * 4096 * 4096), 10 * 4096)
    with pytest.raises(UsageError):
        parallel_from_deepspeed(write(tmp_path, {"zero_optimization": {"stage": 3, "overlap_comm": "yes"}}),
                                2, LLAMA2_7B)


@pytest.mark.parametrize("config, flags, batch", [
    ({"train_micro_batch_size_per_gpu": 2}, (), 2), ({"train_micro_batch_size_per_gpu": 2}, ("--batch", "2"), 2),
    ({"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto"}, ("--batch", "3"), 3),
    ({}, (), 1)])
def test_the_configs_micro_batch_is_the_plans(capsys, tmp_path, config, flags, batch):
    """train_micro_batch_size_per_gpu is what each rank runs: planned, not left at --batch's default."""
    code, out = run_plan(capsys, tmp_path, {**config, "zero_optimization": {"stage": 2}}, *flags, "--json")
    assert code == 0, out.err
    assert json.loads(out.out)["setup"]["batch"] == batch


def test_the_configs_16_bit_dtype_is_the_plans(capsys, tmp_path):
    """An enabled fp16 section is what the engine casts the module to: planned as --dtype fp16
    (it was planned in bf16, the default); "auto" leaves the default."""
    for section, dtype in (({"fp16": {"enabled": True}}, "fp16"), ({"bf16": {"enabled": "auto"}}, "bf16")):
        code, out = run_plan(capsys, tmp_path, {**section, "zero_optimization": {"stage": 2}}, "--json")
        assert code == 0, out.err
        assert json.loads(out.out)["setup"]["dtype"] == dtype
