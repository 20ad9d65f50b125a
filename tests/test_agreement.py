"""estimate vs simulate: the analytic model held to the traced step (issue #2 / #3).

Small-but-real shapes (tests/configs/*.json: GQA, tied embeddings with q/k/v biases, fused
qkv/gate_up, Gemma2 soft-capping with four norms, a sliding window shorter than the
sequence, MoE) across methods, quantization, batch x
seq, checkpointing, attention kernels and optimizers. The static components must agree to the
byte; the peak within 3% (the issue's target). The larger 7B-70B matrix is
benchmarks/agreement.py.
"""
import json
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

from vramplan import TrainSetup, estimate  # noqa: E402
from vramplan.core.models import spec_from_config  # noqa: E402

CONFIGS = Path(__file__).parent / "configs"
TOLERANCE = 0.03
EXACT = ("weights", "quant_constants", "adapters", "optimizer_state")

CASES = [
    ("llama-gqa", dict(seq=512)),
    ("llama-gqa", dict(seq=512, grad_ckpt=False)),
    ("llama-gqa", dict(seq=1024)),
    ("llama-gqa", dict(seq=1024, grad_ckpt=False)),
    ("llama-gqa", dict(seq=512, attn="eager")),
    ("llama-gqa", dict(seq=512, attn="eager", grad_ckpt=False)),
    ("llama-gqa", dict(seq=256, batch=3, grad_ckpt=False)),
    ("llama-gqa", dict(seq=512, method="lora")),
    ("llama-gqa", dict(seq=512, method="full")),
    ("llama-gqa", dict(seq=512, method="full", grad_ckpt=False)),
    ("llama-gqa", dict(seq=512, quant="fp4", double_quant=False)),
    ("llama-gqa", dict(seq=512, quant="int8")),
    ("llama-gqa", dict(seq=512, quant="int8", grad_ckpt=False)),
    ("llama-gqa", dict(seq=512, dtype="fp16")),
    ("llama-gqa", dict(seq=512, prepare_kbit=True)),
    ("llama-gqa", dict(seq=512, optimizer="adamw8bit")),
    ("llama-gqa", dict(seq=512, optimizer="paged_adamw8bit")),
    ("llama-gqa", dict(seq=512, optimizer="adafactor")),
    ("llama-gqa", dict(seq=512, targets="q_proj,v_proj", rank=64)),
    ("llama-gqa", dict(seq=512, lora_dropout=0.05)),
    ("qwen2-tied-bias", dict(seq=512)),
    ("qwen2-tied-bias", dict(seq=512, grad_ckpt=False)),
    ("phi3-fused", dict(seq=512)),
    ("phi3-fused", dict(seq=512, grad_ckpt=False, prepare_kbit=True)),
    ("gemma2-softcap", dict(seq=512, attn="eager")),
    ("gemma2-softcap", dict(seq=512, attn="eager", grad_ckpt=False)),
    ("mistral-sliding", dict(seq=512)),
    ("mistral-sliding", dict(seq=512, grad_ckpt=False)),
    ("mixtral-moe", dict(seq=512)),
    ("mixtral-moe", dict(seq=512, grad_ckpt=False)),
    ("mixtral-moe", dict(seq=512, targets="q_proj,v_proj")),
]


def spec_of(name: str):
    return spec_from_config(json.loads((CONFIGS / f"{name}.json").read_text()), name, "tests/configs")


@pytest.mark.parametrize("name, flags", CASES, ids=[f"{n}-{'-'.join(f'{k}={v}' for k, v in f.items())}"
                                                    for n, f in CASES])
def test_estimate_agrees_with_simulate(name, flags):
    from vramplan.simulate import simulate as run

    spec, setup = spec_of(name), TrainSetup(**flags)
    trace, est = run(spec, setup), estimate(spec, setup)
    for component in EXACT:
        assert est.components[component] == trace.components[component], component
    assert est.paged_optimizer_bytes == trace.paged_bytes
    error = (est.peak_allocated_bytes - trace.peak_allocated_bytes) / trace.peak_allocated_bytes
    assert abs(error) <= TOLERANCE, (
        f"estimate {est.peak_allocated_bytes:,} ({est.peak_moment}) vs simulate {trace.peak_allocated_bytes:,} "
        f"({trace.peak_phase}/{trace.peak_module}/{trace.peak_op}): {error:+.2%}")


# Training recipes (issue #9, vramplan/core/recipes.py): autocast, fused AdamW, TRL's chunked
# loss, a plain loop's held logits, autocast over prepare_model_for_kbit_training's float32
# hidden states (qlora-paper), each on a few architectures.
RECIPE_CASES = [
    ("llama-gqa", "trainer", dict(seq=512)),
    ("llama-gqa", "trainer", dict(seq=512, grad_ckpt=False)),
    ("llama-gqa", "trainer", dict(seq=512, method="lora")),
    ("llama-gqa", "trainer", dict(seq=512, lora_dropout=0.05)),
    ("llama-gqa", "trl-sft", dict(seq=512)),
    ("llama-gqa", "trl-sft", dict(seq=512, method="full")),
    ("llama-gqa", "plain", dict(seq=512)),
    ("llama-gqa", "plain", dict(seq=512, loss="chunked")),
    ("qwen2-tied-bias", "trl-sft", dict(seq=512)),
    ("phi3-fused", "trainer", dict(seq=512)),
    ("phi3-fused", "plain", dict(seq=512)),
    ("gemma2-softcap", "trainer", dict(seq=512, attn="eager")),
    ("gemma2-softcap", "trl-sft", dict(seq=512, attn="eager")),
    ("mistral-sliding", "trainer", dict(seq=512, grad_ckpt=False)),
    ("mixtral-moe", "trainer", dict(seq=512)),
    ("llama-gqa", "qlora-paper", dict(seq=512)),
    ("llama-gqa", "qlora-paper", dict(seq=512, grad_ckpt=False)),
    ("phi3-fused", "qlora-paper", dict(seq=512)),
    ("mistral-sliding", "qlora-paper", dict(seq=512)),
]


@pytest.mark.parametrize("name, recipe, flags", RECIPE_CASES,
                         ids=[f"{n}-{r}-{'-'.join(f'{k}={v}' for k, v in f.items())}" for n, r, f in RECIPE_CASES])
def test_recipes_agree_with_simulate(name, recipe, flags):
    from vramplan.core.recipes import make_setup
    from vramplan.simulate import simulate as run

    spec, setup = spec_of(name), make_setup(recipe, **flags)
    trace, est = run(spec, setup), estimate(spec, setup)
    assert trace.strays == 0
    for component in EXACT:
        assert est.components[component] == trace.components[component], component
    error = (est.peak_allocated_bytes - trace.peak_allocated_bytes) / trace.peak_allocated_bytes
    assert abs(error) <= TOLERANCE, (
        f"estimate {est.peak_allocated_bytes:,} ({est.peak_moment}) vs simulate {trace.peak_allocated_bytes:,} "
        f"({trace.peak_phase}/{trace.peak_module}/{trace.peak_op}): {error:+.2%}")
