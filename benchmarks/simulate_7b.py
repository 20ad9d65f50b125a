"""Speed and result of vramplan.simulate on a Llama-2-7b-shaped model (hidden 4096, 32 layers,
intermediate 11008, vocab 32000), QLoRA nf4 + double quant, bf16, rank 16 all-linear, AdamW,
sdpa, batch 1, seq 2048, gradient checkpointing on and off.

    python benchmarks/simulate_7b.py            # prints one JSON object per setup

No weights are needed: the shapes come from the config below. Besides the peak and its
components, `layer_backward_max` is the highest allocated total reached while a decoder layer's
backward (or its recomputation) ran, the second candidate for the peak after the loss."""
from __future__ import annotations

import json
import time

from vramplan.core._models import spec_from_config
from vramplan.core._setup import TrainSetup
from vramplan.simulate import simulate as run

LLAMA2_7B = dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
                 max_position_embeddings=4096, rms_norm_eps=1e-5)


def main() -> None:
    spec = spec_from_config(LLAMA2_7B, "llama-2-7b-shaped", "benchmarks/simulate_7b.py")
    for grad_ckpt in (True, False):
        setup = TrainSetup(seq=2048, batch=1, rank=16, grad_ckpt=grad_ckpt)
        t0 = time.perf_counter()
        trace = run(spec, setup)
        wall = time.perf_counter() - t0
        layer_bw = max((row[-1] for row in trace.timeline
                        if row[1] == "backward" and row[2].startswith("model.layers.")), default=0)
        print(json.dumps({
            "grad_ckpt": grad_ckpt, "seconds": round(wall, 1),
            "peak_allocated_bytes": trace.peak_allocated_bytes,
            "peak_GiB": round(trace.peak_allocated_bytes / 2**30, 3),
            "peak_phase": trace.peak_phase, "peak_module": trace.peak_module, "peak_op": trace.peak_op,
            "components": trace.components, "phase_peaks": trace.phase_peaks,
            "boundaries": trace.boundaries, "layer_backward_max": layer_bw,
            "attention": trace.attention, "timeline_rows": len(trace.timeline),
        }, indent=1))


if __name__ == "__main__":
    main()
