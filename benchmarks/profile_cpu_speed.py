"""Wall clock, CPU time and peak RSS of `vramplan profile --device cpu --random-weights` (issue #11).

    python benchmarks/profile_cpu_speed.py                      # the tiny ~20M llama (hidden 256, 4 layers, vocab 32000)
    python benchmarks/profile_cpu_speed.py --model Qwen/Qwen2.5-0.5B
    python benchmarks/profile_cpu_speed.py --root /path/to/other/checkout   # time another version

Runs the CLI as a user does (a fresh interpreter, the CPU default of 1 warm-up + 2 measured steps,
seq 2048) and prints the seconds, the CPU seconds of the CLI and its child run, their peak RSS
and the measured peak allocated bytes (which a speed change must leave as it was). A benchmark,
not a test: the figures depend on the machine and its load.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

TINY = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 256,
        "intermediate_size": 688, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4,
        "vocab_size": 32000, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a model id or config directory (default: the tiny llama above)")
    ap.add_argument("--root", default=ROOT, help="checkout whose vramplan runs (default: this one)")
    ap.add_argument("--steps", type=int, help="measured steps (default: the CLI's)")
    ap.add_argument("extra", nargs="*", help="more `vramplan profile` flags, after --")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            model = os.path.join(tmp, "tiny")
            os.makedirs(model)
            with open(os.path.join(model, "config.json"), "w") as f:
                json.dump(TINY, f)
        cmd = [sys.executable, "-m", "vramplan.cli", "profile", model, "--random-weights", "--device", "cpu",
               "--no-record", "--json", *(["--steps", str(args.steps)] if args.steps else []), *args.extra]
        env = dict(os.environ, PYTHONPATH=args.root)
        t0 = time.perf_counter()
        done = subprocess.run(cmd, cwd=args.root, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        sys.exit(f"profile failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    record = json.loads(done.stdout)
    measured = record.get("measured") or {}
    print(f"model: {args.model or 'tiny llama (hidden 256, 4 layers, vocab 32000)'}; root: {args.root}")
    print(f"wall {wall:.1f} s, CPU {usage.ru_utime + usage.ru_stime:.1f} s (CLI and child), "
          f"peak RSS {usage.ru_maxrss / 2**20:.2f} GiB (largest process)")
    print(f"peak allocated (measured): {measured.get('peak_allocated_bytes')}")


if __name__ == "__main__":
    main()
