"""A DeepSpeed config file as the per-GPU plan's Parallel: `zero_optimization`'s stage, offload,
buckets and ZeRO-3 gathering settings (docs/allocator.md#zero-3-gathering), with the HF Trainer's
"auto" values resolved from the model's hidden size as transformers does
(transformers/integrations/deepspeed.py HfTrainerDeepSpeedConfig.trainer_config_finalize:
reduce_bucket_size = hidden^2, stage3_prefetch_bucket_size = int(0.9 * hidden^2),
stage3_param_persistence_threshold = 10 * hidden). Settings it does not read are left to the
engine's defaults; settings it cannot model are refused, not ignored.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from vramplan.core._errors import UsageError
from vramplan.core._models import ModelSpec
from vramplan.plan._sharding import Parallel

STAGES = {2: "zero2", 3: "zero3"}
# Element counts past any model (2**48, 281 trillion): a larger bucket or threshold is a typo, and its
# bytes would pass the 2**64 the allocator replay packs sizes under (cuda/_fast_replay.py keys)
MAX_ELEMENTS = 1 << 48
HINT = "see https://www.deepspeed.ai/docs/config-json/#zero-optimizations-for-fp16-training-enhancements"


def parallel_from_deepspeed(path: str | Path, gpus: int, spec: ModelSpec, strategy: str | None = None,
                            offload: str | None = None) -> Parallel:
    """The Parallel of a DeepSpeed config file for `gpus` ranks of `spec`. `strategy` / `offload`
    given on the command line must agree with the file."""
    name = str(path)
    config = _read(path)
    zero = config.get("zero_optimization") if isinstance(config, dict) else None
    if not isinstance(zero, dict):
        raise UsageError(f"the DeepSpeed config {name} has no zero_optimization section",
                         hint="vramplan plans ZeRO-2 and ZeRO-3 runs: " + HINT)
    stage = zero.get("stage", 0)
    if isinstance(stage, bool) or not isinstance(stage, int) or stage not in STAGES:
        raise UsageError(f"the DeepSpeed config {name} sets zero_optimization.stage {stage!r}",
                         hint="vramplan plans stage 2 and stage 3")
    found = STAGES[stage]
    if strategy is not None and Parallel(gpus, strategy).strategy != found:
        raise UsageError(f"--strategy {strategy} contradicts {name} (zero_optimization.stage {stage})",
                         hint="drop --strategy: the config decides it")
    kind = _offload(zero, found, name)
    if offload is not None and offload != kind:
        raise UsageError(f"--offload {offload} contradicts {name} (offload {kind})",
                         hint="drop --offload: the config decides it")
    hidden = spec.hidden
    fields = {"reduce_bucket_size": _count(zero, "reduce_bucket_size", hidden * hidden, name)}
    if found == "zero3":
        fields["prefetch_bucket_size"] = _count(zero, "stage3_prefetch_bucket_size", int(0.9 * hidden * hidden), name)
        fields["param_persistence_threshold"] = _count(zero, "stage3_param_persistence_threshold", 10 * hidden, name)
        fields["max_live_parameters"] = _count(zero, "stage3_max_live_parameters", None, name)
        fields["max_reuse_distance"] = _count(zero, "stage3_max_reuse_distance", None, name)
    overlap = zero.get("overlap_comm")
    if overlap is not None and not isinstance(overlap, bool):
        raise UsageError(f"zero_optimization.overlap_comm in {name} is {overlap!r}", hint="true or false")
    return Parallel(gpus, found, kind, overlap_comm=overlap, **{k: v for k, v in fields.items() if v is not None})


def _read(path: str | Path):
    """The config file's JSON, or the one-line error for a file that cannot be read or is not JSON."""
    name = str(path)
    if Path(path).exists() and not Path(path).is_file():   # reading a named pipe waits for a writer for ever
        raise UsageError(f"the DeepSpeed config {name} is not a regular file",
                         hint="give the path of the JSON file passed to deepspeed / TrainingArguments(deepspeed=...)")
    try:
        return json.loads(Path(path).read_text())
    except OSError as exc:
        raise UsageError(f"cannot read the DeepSpeed config {name}: {exc.strerror or exc}",
                         hint="give the path of the JSON file passed to deepspeed / TrainingArguments(deepspeed=...)"
                         ) from None
    except (ValueError, RecursionError) as exc:     # ValueError: JSONDecodeError, UnicodeDecodeError
        raise UsageError(f"the DeepSpeed config {name} is not JSON: {str(exc).splitlines()[0] if str(exc) else 'it nests too deeply'}",
                         hint="DeepSpeed reads a JSON file; check it with `python -m json.tool`") from None


def setup_from_deepspeed(path: str | Path) -> dict:
    """The TrainSetup fields the config decides: `batch`, its train_micro_batch_size_per_gpu (the
    micro-batch each rank runs), and `dtype`, fp16 or bf16 where its `fp16` / `bf16` section is
    enabled (the engine casts the module to it: deepspeed/runtime/engine.py
    _configure_distributed_model). "auto" (the HF Trainer fills it from its own arguments) and
    absent keys decide nothing. Its gradient_accumulation_steps past 1 is refused: accumulation
    under ZeRO (the engine's reduced gradient partitions kept across micro-steps) is not modelled
    (plan/_sharding.py accumulation_modelled)."""
    name = str(path)
    config = _read(path)
    if not isinstance(config, dict):
        return {}
    steps = config.get("gradient_accumulation_steps")
    if steps not in (None, "auto", 1) or steps is True:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise UsageError(f"gradient_accumulation_steps in {name} is {steps!r}", hint='a whole number >= 1 or "auto"')
        raise UsageError(f"{name} sets gradient_accumulation_steps {steps}: accumulation under ZeRO is not modelled",
                         hint="plan the peak of one micro-step: set it to 1 in a copy of the config")
    out = {}
    micro = config.get("train_micro_batch_size_per_gpu")
    if micro not in (None, "auto"):
        if isinstance(micro, bool) or not isinstance(micro, int) or micro < 1:
            raise UsageError(f"train_micro_batch_size_per_gpu in {name} is {micro!r}",
                             hint='a whole number >= 1 or "auto"')
        out["batch"] = micro
    enabled = []
    # "bfloat16" is DeepSpeed's older name of the bf16 section (deepspeed/runtime/config.py
    # get_bfloat16_config reads either)
    for key, dtype in (("fp16", "fp16"), ("bf16", "bf16"), ("bfloat16", "bf16")):
        section = config.get(key)
        flag = section.get("enabled", False) if isinstance(section, dict) else None
        if flag not in (None, False, True, "auto"):
            raise UsageError(f"{key}.enabled in {name} is {flag!r}", hint='true, false or "auto"')
        if flag is True and dtype not in enabled:
            enabled.append(dtype)
    if len(enabled) > 1:
        raise UsageError(f"{name} enables both fp16 and bf16", hint="DeepSpeed trains in one of them")
    if enabled:
        out["dtype"] = enabled[0]
    return out

def _offload(zero: dict, strategy: str, name: str) -> str:
    """The Parallel offload: "cpu" where the config offloads what that means for the engine
    (ZeRO-2: the optimizer; ZeRO-3: the optimizer and the parameters), "none" where it offloads
    nothing."""
    devices = {}
    for key in ("offload_optimizer", "offload_param"):
        section = zero.get(key)
        device = section.get("device", "none") if isinstance(section, dict) else "none"
        if device not in ("none", "cpu", None):
            raise UsageError(f"{name} offloads {key} to {device!r}", hint="vramplan models offload to the CPU only")
        devices[key] = device or "none"
    wanted = ("offload_optimizer",) if strategy == "zero2" else ("offload_optimizer", "offload_param")
    if strategy == "zero2" and devices["offload_param"] != "none":
        raise UsageError(f"{name} sets offload_param under ZeRO-2", hint="DeepSpeed offloads parameters at stage 3 only")
    states = {devices[key] for key in wanted}
    if len(states) > 1:
        raise UsageError(f"{name} offloads {'the optimizer' if devices['offload_optimizer'] == 'cpu' else 'the parameters'}"
                         " but not the other: not modelled",
                         hint="vramplan's ZeRO-3 offload moves both the optimizer and the parameters to the CPU")
    return states.pop()


def _count(zero: dict, key: str, auto: int | None, name: str) -> int | None:
    """A whole number of elements: an int, a float such as 1e9, or "auto" (the HF Trainer's value);
    None where the key is absent (the engine's default)."""
    value = zero.get(key)
    if value is None:
        return None
    if value == "auto" and auto is not None:
        return auto
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0 \
            or value != int(value) or value > MAX_ELEMENTS:
        raise UsageError(f"zero_optimization.{key} in {name} is {value!r}",
                         hint=f"a whole number of elements up to {MAX_ELEMENTS:.3g}, e.g. 5e8"
                         + (' or "auto"' if auto is not None else ""))
    return int(value)
