"""What DeepSpeed ZeRO-3 itself gathers, call by call, on a small Llama: the ground truth of
plan/_zero3.py (tests/test_zero3.py replays the same step and compares).

Runs DeepSpeed (CPU accelerator, gloo, one rank) on a 6-layer Llama with random weights, with
and without peft LoRA and gradient checkpointing, under several stage3 settings; after every
fetch_sub_module / release_sub_module of its PartitionedParameterCoordinator it records the
elements of the partitioned parameters that are gathered (AVAILABLE or INFLIGHT: the all-gather's
full-size tensor exists), in the third step (the trace recorded, the coordinator in steady state).

Needs deepspeed (not a test dependency; 0.19.8 on 2026-11-30) and writes
tests/data/zero3_coordinator.json.gz:
    DS_ACCELERATOR=cpu python benchmarks/zero3_coordinator.py
"""
from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "zero3_coordinator.json.gz"
CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 2000, "hidden_size": 512,
          "intermediate_size": 1376, "num_hidden_layers": 6, "num_attention_heads": 4, "num_key_value_heads": 4,
          "max_position_embeddings": 512, "tie_word_embeddings": False, "rms_norm_eps": 1e-6, "hidden_act": "silu"}
# (stage3_max_reuse_distance, stage3_prefetch_bucket_size, stage3_max_live_parameters, checkpointing, LoRA)
CASES = [
    (1_000_000_000, 50_000_000, 1_000_000_000, True, True),     # DeepSpeed's defaults
    (20_000_000, 0, 1_000_000_000, True, True),
    (10_000_000, 3_000_000, 1_000_000_000, True, True),
    (30_000_000, 3_000_000, 1_000_000_000, False, True),
    (20_000_000, 5_000_000, 1_000_000_000, True, False),
    (30_000_000, 50_000_000, 8_000_000, True, True),
    (5_000_000, 2_000_000, 1_000_000_000, False, False),
]
THRESHOLD = 100_000     # stage3_param_persistence_threshold (DeepSpeed's default)


def one(case: tuple, port: int) -> dict:
    """Run one case in this process (DeepSpeed initializes its process group once)."""
    import torch
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator as PPC
    from transformers import LlamaConfig, LlamaForCausalLM

    reuse, prefetch, live, ckpt, lora = case
    deepspeed.init_distributed(dist_backend="gloo")
    ds_config = {"train_micro_batch_size_per_gpu": 1,
                 "zero_optimization": {"stage": 3, "stage3_max_reuse_distance": reuse,
                                       "stage3_prefetch_bucket_size": prefetch,
                                       "stage3_param_persistence_threshold": THRESHOLD,
                                       "stage3_max_live_parameters": live},
                 "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "torch_adam": True}}}
    torch.manual_seed(0)
    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in CONFIG.items() if k not in ("model_type",
                                                                                             "architectures")}))
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if lora:
        from peft import LoraConfig, get_peft_model
        model.enable_input_require_grads()
        model = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear", lora_dropout=0.0))
    engine, _opt, _, _ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters()
                                                                              if p.requires_grad], config=ds_config)
    params = list(model.parameters())
    names = {id(m): n for n, m in model.named_modules()}
    state = {"step": -1}
    calls: list = []

    def gathered() -> int:
        return sum(int(p.ds_numel) for p in params if not p.ds_persist
                   and p.ds_status in (ZeroParamStatus.AVAILABLE, ZeroParamStatus.INFLIGHT))

    fetch, release = PPC.fetch_sub_module, PPC.release_sub_module

    def logged_fetch(self, module, forward):
        fetch(self, module, forward)
        if state["step"] == 2:
            calls.append(("fetch", names.get(id(module), "?"), forward, gathered()))

    def logged_release(self, module, forward=False):
        release(self, module, forward)
        if state["step"] == 2 and any(True for _ in module.parameters(recurse=False)):
            calls.append(("release", names.get(id(module), "?"), forward, gathered()))

    PPC.fetch_sub_module, PPC.release_sub_module = logged_fetch, logged_release
    ids = torch.randint(0, CONFIG["vocab_size"], (1, 32))
    for step in range(3):
        state["step"] = step
        engine.backward(engine(input_ids=ids, labels=ids).loss)
        engine.step()
    return {"reuse_distance": reuse, "prefetch_bucket": prefetch, "max_live": live, "grad_ckpt": ckpt,
            "lora": lora, "calls": calls}


def main() -> None:
    if len(sys.argv) == 3:      # a child: one case, printed as JSON
        print("CASE " + json.dumps(one(CASES[int(sys.argv[1])], int(sys.argv[2]))))
        return
    import deepspeed
    import torch
    import transformers
    import peft
    cases = []
    for i in range(len(CASES)):
        out = subprocess.run([sys.executable, __file__, str(i), str(29600 + i)], capture_output=True, text=True,
                             env={**os.environ, "DS_ACCELERATOR": "cpu"}, check=True).stdout
        cases.append(json.loads(next(line for line in out.splitlines() if line.startswith("CASE "))[5:]))
        print(f"case {i}: {len(cases[-1]['calls'])} calls", file=sys.stderr)
    data = {"config": CONFIG, "persistence_threshold": THRESHOLD, "element_bytes": 4, "rank": 8,
            "versions": {"deepspeed": deepspeed.__version__, "torch": torch.__version__,
                         "transformers": transformers.__version__, "peft": peft.__version__},
            "cases": cases}
    with gzip.open(OUT, "wt") as f:
        json.dump(data, f, separators=(",", ":"))
    print(f"wrote {OUT}", file=sys.stderr)


if __name__ == "__main__":
    main()
