"""Peak reserved of the estimate's reduced-detail stream (K exact decoder layers at each end, the
middle layers' net allocations only) against its full stream (every event of every layer), under
the default allocator settings and under expandable_segments (docs/allocator.md#reduced-detail).

Run: python benchmarks/reserved_detail.py [K]   (K defaults to estimate/_reserved.py EXACT_LAYERS)
"""
import sys
import time

from vramplan.core._models import resolve
from vramplan.core._setup import TrainSetup
from vramplan.estimate._events import step_stream
from vramplan.estimate._inventory import static_memory
from vramplan.cuda._reserved import replay_stream
from vramplan.cuda._alloc_conf import AllocConf
from vramplan.estimate._reserved import EXACT_LAYERS

K = int(sys.argv[1]) if len(sys.argv) > 1 else EXACT_LAYERS
cases = [("meta-llama/Llama-2-70b-hf", {}), ("meta-llama/Llama-2-7b", {}), ("meta-llama/Llama-2-7b", {"seq": 512}),
 ("meta-llama/Llama-2-7b", {"seq": 4096, "batch": 2}), ("meta-llama/Llama-2-7b", {"grad_ckpt": False, "seq": 512}),
 ("meta-llama/Meta-Llama-3-8B", {"seq": 4096}), ("mistralai/Mistral-7B-v0.1", {"method": "lora", "seq": 1024}),
 ("google/gemma-3-12b-pt", {"seq": 2048}), ("Qwen/Qwen3-8B", {"batch": 4, "seq": 1024}),
 ("Qwen/Qwen2.5-0.5B", {"batch": 8, "seq": 1024}), ("meta-llama/Llama-2-13b-hf", {"seq": 1024, "grad_ckpt": False}),
 ("Qwen/Qwen3-32B", {"seq": 2048}), ("meta-llama/Meta-Llama-3-8B", {"method": "full", "seq": 1024, "optimizer": "adamw8bit"})]
for conf in ["", "expandable_segments:True"]:
  worst = 0
  for m, kw in cases:
    spec, setup = resolve(m), TrainSetup(**kw)
    st = static_memory(spec, setup)
    t = time.perf_counter(); full = replay_stream(step_stream(spec, setup, st).events, AllocConf.parse(conf), None, lump_small=True); t1 = time.perf_counter()
    red = replay_stream(step_stream(spec, setup, st, exact_layers=K).events, AllocConf.parse(conf), None, lump_small=True); t2 = time.perf_counter()
    err = (red.peak_reserved_bytes - full.peak_reserved_bytes) / full.peak_reserved_bytes * 100
    worst = max(worst, abs(err))
    print(f"{m[-22:]:22} {str(kw)[:40]:40} full {full.peak_reserved_bytes/2**30:7.2f} red {red.peak_reserved_bytes/2**30:7.2f} err {err:+.2f}% alloc {red.peak_allocated_bytes-full.peak_allocated_bytes:+d} t {t1-t:.3f} {t2-t1:.3f}")
  print(conf, "worst", worst)
