"""Speed of `plan`: a 20 x 20 batch x seq grid plus recommendations, cold (a fresh interpreter,
imports included) and warm, the grid alone within it, and the cold `vramplan plan` CLI.

Target (issue #5): a plan over a 20 x 20 grid plus recommendations under 0.5 s cold.
Run: python benchmarks/bench_plan.py

Measured on the 2-core CI-class machine (median of 7 cold runs: plan alone / with the imports;
the two columns one after the other, nothing else running):

    case                                        before the one-pass replay      now
    Llama-3-8B bs16 x 4096 on 24GB (1 GPU)       13.7 / 13.9 s (195 evals)      5.8 / 6.0 s (165)
    Llama-3-8B eager, no ckpt, 8k on T4          19.8 / 20.0 s (170)            7.2 / 7.4 s (87)
    Llama-2-70B bs4 x 4096 on 24GB, 2 x fsdp      9.2 /  9.4 s (63)             3.4 / 3.7 s (63)
    Llama-2-70B on 24GB, 8 x zero3 + offload     11.1 / 11.3 s (124)            5.5 / 5.7 s (124)
    cold `vramplan plan ... --json`               9.0 s                         3.7 s

Still short of the target: each grid cell that may fit is one replay of two steps (about 24 ms
for Llama-3-8B, 35 ms for Llama-2-70B, docs/allocator.md#one-pass-replay), and the grid alone
holds about 100 such cells in the 1-GPU and ZeRO-3 cases. "evaluations" counts full estimates:
a one-GPU yes/no the replay against the card answers with an OOM is not one.

2026-12-01 (eighth session), plan alone, median of 7, the session's starting code run the same
hour: 5.0 / 4.7 / 3.2 / 5.3 s (cold CLI 3.2 s) -> 5.6 / 5.8 / 5.5 / 9.6 s (cold CLI 4.1 s); an
hour later, the machine slower, the final code first: 6.3 / 7.0 / 4.5 / 7.0 s (CLI 3.5 s) ->
7.0 / 8.5 / 7.5 / 14.8 s (CLI 5.5 s).
Slower where ZeRO-3 now replays its own stream (docs/allocator.md#zero-3-stream) instead of
carrying the single-GPU replay's slack: every ZeRO-3 candidate of the minimum-hardware search
(cases 1-3: each GPU count its own program, with the all-gathers of two steps) and every cell of
case 4 (Llama-2-70B's all-gathers add about 19,000 events a step).

2026-12-01 (ninth session), plan alone, median of 7: 5.0 / 4.7 / 4.1 / 7.7 s (CLI 3.2 s), then the
session's starting code 4.3 / 4.6 / 3.9 / 6.7 s (CLI 2.6 s), then again 4.6 / 4.7 / 3.9 / 7.2 s (CLI
3.0 s). Case 1 keeps about 5%: its smaller-micro-batch changes now carry their gradient
accumulation (docs/autograd.md#gradient-accumulation-steps), a program with two micro-steps per step.
Where the time goes (case 1, profiled): 239 replays of about 27,000 events each (2.75 s, 0.42 us an
event), 0.36 s compiling programs, the rest composing estimates; the grid alone replays 108 cells.

2026-12-01 (tenth session), plan alone, median of 7, the machine slower this hour: 6.0 / 4.0 / 6.5 /
8.1 s (cold CLI 3.9 s). The session's starting code, run back to back with the final code in the
same hour, case 1: 5.61 / 5.97 / 5.48 s against 5.26 / 5.38 / 5.80 s; case 3: 6.09 / 5.82 / 5.78 s
against 5.34 / 5.47 / 5.64 s: no change. The allocator state at the decoder-layer boundaries of a
replay never repeats (Llama-3-8B 4 x 2048: the free list differs at each of the 32 forward
boundaries), so no exact periodic shortcut was found; the grid's ~108 exact replays alone take
about 1.3 s here.

2026-12-01 (eleventh session), plan alone, median of 7, nothing else running: 6.5 / 4.0 / 6.8 / 7.7 s
(cold CLI 5.1 s). Back to back with the session's starting code, 3 runs each while another benchmark
used the second core: case 1 6.0 / 6.1 / 7.3 s before, 6.9 / 7.2 / 8.1 s after; cases 2-4 unchanged
(4.3 / 4.2, 5.6 / 5.7, 8.1 / 7.9 s medians). Case 1 is slower because a setup with gradient
accumulation (its smaller-micro-batch changes) now replays every layer's backward
(docs/allocator.md#reduced-detail).

2026-12-01 (thirteenth session), plan alone, median of 7, nothing else running: 7.5 / 4.5 / 7.2 /
8.4 s (cold CLI 4.4 s); the session's starting code 7.4 / 4.1 / 6.4 / 8.4 s. The grid alone (the
20 x 20 cells through Evaluator.floor / need, one run each): 2.08 s (108 cells replayed, 1.63 s
of it in the replay), 0.41 s, 0.41 s and 6.1 s (101 cells, 4.6 s replaying ZeRO-3's streams):
within 0.5 s where few cells can fit, not where about 100 must be replayed. Tried and measured:
inlining split_free / merge_free into the replay's loop (no gain: 12.2 / 17.5 / 10.9 ms against
13.4 / 17.1 / 9.9 ms a replay, same results).

2026-12-01 (fourteenth session), plan alone, median of 7, nothing else running: 7.5 / 4.3 / 6.7 /
8.0 s (cold CLI 4.8 s). The load phase now plays each 4-bit weight's quantization on the device
(docs/allocator.md#quantization-on-load), about six more events per quantized Linear; one replay
of Llama-2-70B 1 x 2048 with a new seq 33.0 -> 37.0 ms, the same hour. The grid alone: 1.87 s
(108 cells replayed, 1.50 s of it in the replay), 0.40 s, 0.43 s, 6.6 s (101 cells, 4.9 s): still
over 0.5 s where about 100 cells must each be replayed.

2026-12-01 (fifteenth session), plan alone, median of 7: 6.6 / 3.8 / 5.3 / 8.0 s (cold CLI 5.6 s);
the session's starting code the same hour: 7.1 / 5.3 / 6.3 / 8.5 s (CLI 5.3 s). The estimate
replayed each layer's walk twice per setup (layer_stack and transient_sizes keyed one cache
differently): 5 tape replays a cell where 3 do, about 0.1 s of a 400-cell grid; FSDP's per-unit
shard sums and gathered units are cached per split. The grid alone, median of 3: 2.3 / 0.34 / 0.29 /
6.4 s (the starting code, medians of 5 the same hour: 2.6 / 0.54 / 0.62 s in cases 1-3): within 0.5 s where few cells are
replayed, not in cases 1 and 4 (108 and 101 cells, about 16 and 50 ms a replay). Tried and not
kept: Tape.replay as running sums (itertools.accumulate, per-tag prefix sums): 202 against 116 us
a replay of Llama-3-8B's layer, slower than the plain loop.

2026-12-02 (sixteenth session), plan alone, median of 7, a slow hour: 7.7 / 5.3 / 6.8 / 5.7 s (cold
CLI 7.2 s); the session's starting code right after: 9.1 / 5.4 / 7.3 / 10.3 s (CLI 6.6 s). The grid's
cells are now evaluated by worker processes forked from the planner (plan/_workers.py: one per
usable CPU, at most 8; two here), and a record's hash is computed once per instance (one GPU of
ZeRO-3's ZeroPartitions was hashed twice a cell, about 3 ms each: case 4's program cache and replay
cache keys). The grid alone (Evaluator and _grid over the 20 x 20 cells, no recommendations), median of
3, interleaved with the starting code: 1.44 / 0.31 / 0.33 / 3.76 s against 2.63 / 0.50 / 0.43 / 8.52 s,
the same cells and evaluations. On these 2 cores about 100 exact replays of 16-50 ms cannot go
under 0.5 s; more cores divide it further. Later the same session, the ranked changes' rounds and
the minimum hardware's engine searches went to the workers too (Evaluator.spread keeps what they
evaluated): 5.6 / 4.7 / 5.7 / 5.2 s (cold CLI 3.7 s; the grid within each plan 1.47 / 0.41 /
0.38 / 3.52 s), the starting code right after 7.7 / 4.3 / 5.5 / 7.7 s (CLI 5.1 s); cases 2 and 3
interleaved with it, 3 runs each: 4.0-4.3 s against 4.3-5.4 s and 4.5-5.0 s against 6.8-7.7 s.

2026-12-02 (seventeenth session), plan alone, median of 7, nothing else running: 5.1 / 3.8 / 4.2 / 4.3 s
(cold CLI 3.4 s); the grid within each plan 1.30 / 0.35 / 0.29 / 2.93 s. Cases 1 and 2 give the same
evaluations (171, 67) and the same grid as the session's starting code; case 1's first ranked change
is now "--batch 4, --grad-accum 4" where it was "--batch 7, --grad-accum 3" (21 sequences a step, not
the 16 asked): a smaller micro-batch keeps the effective batch only where it divides it.

2026-12-02 (eighteenth session), plan alone, median of 7, a slower hour: 5.1 / 4.6 / 6.0 / 5.7 s (cold
CLI 4.5 s), the grid within each plan 1.37 / 0.42 / 0.40 / 3.82 s; the session's starting code right
after: 5.6 / 4.8 / 5.8 / 5.9 s (CLI 4.9 s), grid 1.43 / 0.41 / 0.40 / 3.76 s. The minimum hardware now
judges each GPU count against the card (as `plan --gpus N` does) and estimates the smallest catalog
GPU on its own card: no change in time at these cases' sizes.
Tried again for the grid: cells with equal batch x seq products share no replay (the RoPE tables,
the causal mask and the position ids are sized by seq alone: 1 x 512 and 2 x 256 differ in 7 of
Llama-3-8B's 54 size slots); the load phase, the same for every
cell, is about 6% of a replay's large-pool events, too little to matter.

2026-12-02 (afternoon), plan alone, median of 7, a slow hour: 11.1 / 9.0 / 11.2 / 10.0 s (cold CLI 7.8 s), the
grid within each plan 2.83 / 0.83 / 0.72 / 6.31 s; cases 1 and 4 interleaved with the morning's code, 3 runs
each: 9.77 against 9.84 s and 10.30 against 10.13 s, no change. Tried for the grid: three pure-Python rewrites
of the one-pass replay (large-pool events only with the small pool's level precomputed; the same in 512-byte
units; the original loop with the large pool inlined), bit-identical on 474 captured cases and 0.80x, 0.83x
and 0.98x as fast: of about 140 M instructions a Llama-3-8B replay runs, some 82 M are the free list's own C
work (dicts, big-int keys, bisect, list shifts), which no Python rewrite removes.
"""
from __future__ import annotations

import statistics
import subprocess
import sys
import time

RUNS = 7
GRID = "batches=list(range(1, 21)), seqs=[256 * i for i in range(1, 21)]"
CASES = {
    # name: plan(...) arguments; each needs recommendations (the setup does not fit)
    "Llama-3-8B bs16 x 4096 on 24GB (1 GPU)": 'plan("meta-llama/Meta-Llama-3-8B", gpu="24GB", batch=16, seq=4096, {grid})',
    "Llama-3-8B eager, no ckpt, 8k on T4": ('plan("meta-llama/Meta-Llama-3-8B", gpu="T4", seq=8192, attn="eager", '
                                            'grad_ckpt=False, rank=64, {grid})'),
    "Llama-2-70B bs4 x 4096 on 24GB, 2 x fsdp": ('plan("meta-llama/Llama-2-70b", gpu="24GB", batch=4, seq=4096, gpus=2, '
                                                 'strategy="fsdp", {grid})'),
    "Llama-2-70B on 24GB, 8 x zero3 + offload": ('plan("meta-llama/Llama-2-70b", gpu="24GB", gpus=8, strategy="zero3", '
                                                 'offload="cpu", {grid})'),
}
CLI = [sys.executable, "-m", "vramplan.cli", "plan", "meta-llama/Meta-Llama-3-8B", "--gpu", "24GB", "--batch", "16",
       "--seq", "4096", "--json"]


def cold(call: str) -> tuple[float, float, int, float]:
    """(seconds for import + plan, seconds for plan alone, evaluations, seconds in the 20 x 20 grid)
    in a fresh interpreter; the grid is timed inside the plan (plan/_planner.py _grid), after the
    limits' searches, as a user's plan runs it."""
    code = (f"import time; t0 = time.perf_counter(); from vramplan import plan; t1 = time.perf_counter(); "
            f"import vramplan.plan._planner as P; grid = P._grid; spent = []; "
            f"P._grid = lambda *a, **k: (spent.append(time.perf_counter()), grid(*a, **k), "
            f"spent.append(time.perf_counter()))[1]; "
            f"p = {call.format(grid=GRID)}; t2 = time.perf_counter(); "
            f"print(t2 - t0, t2 - t1, p.evaluations, spent[1] - spent[0])")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split()
    return float(out[0]), float(out[1]), int(out[2]), float(out[3])


def main() -> None:
    print(f"{'case':<44}{'cold import+plan':>18}{'cold plan':>11}{'evals':>7}{'grid':>10}")
    for name, call in CASES.items():
        runs = [cold(call) for _ in range(RUNS)]
        total = statistics.median(r[0] for r in runs)
        alone = statistics.median(r[1] for r in runs)
        grid = statistics.median(r[3] for r in runs)
        print(f"{name:<44}{total * 1000:>15.0f} ms{alone * 1000:>8.0f} ms{runs[0][2]:>7}{grid * 1000:>7.0f} ms")
    times = []
    for _ in range(RUNS):
        start = time.perf_counter()
        subprocess.run(CLI, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    bare = []
    for _ in range(RUNS):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        bare.append(time.perf_counter() - start)
    print(f"cold `vramplan plan ... --json` (default grid): median {statistics.median(times) * 1000:.0f} ms "
          f"(bare interpreter {statistics.median(bare) * 1000:.0f} ms)")


if __name__ == "__main__":
    main()
