"""Speed and memory of `vramplan simulate`: the identical-layers shortcut (default) and the full
trace (--exact), each in a fresh process, and the command itself.

    python benchmarks/simulate_speed.py            # markdown table; --json for one object per run
    python benchmarks/simulate_speed.py --quick    # the default mode only

Per run, from a child process that calls the library: `import_s` (the packages the setup needs,
imported as simulate imports them: vramplan.simulate._step.require_packages, i.e. torch,
transformers, peft, and bitsandbytes for qlora or a bitsandbytes optimizer, with the cyclic
garbage collector paused), `trace_s` (vramplan.simulate.simulate, what Trace.seconds reports),
`process_s` (the whole child process: interpreter start, vramplan's own imports, the imports above,
model resolution, trace, interpreter exit), and the child's peak resident memory (resource.getrusage
ru_maxrss). The peak and its components are printed too, so the two modes can be compared byte for
byte. In the default mode `cli_s` is the wall time of the command a user runs,
`python -m vramplan.cli simulate MODEL ... --json` in a fresh process (the estimate beside the trace
included), whose peak is checked against the child's.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

CASES = [
    ("meta-llama/Llama-2-70b-hf", dict(method="qlora", seq=2048)),
    ("mistralai/Mixtral-8x7B-v0.1", dict(method="qlora", seq=2048)),
]

CHILD = r"""
import json, resource, sys, time
from vramplan.core._models import resolve
from vramplan.core._setup import TrainSetup
from vramplan.simulate import simulate as run
from vramplan.simulate._step import require_packages
model, setup, exact = sys.argv[1], TrainSetup(**json.loads(sys.argv[2])), sys.argv[3] == "1"
t0 = time.perf_counter()
require_packages(setup)
t1 = time.perf_counter()
trace = run(resolve(model), setup, exact=exact)
print(json.dumps({"import_s": round(t1 - t0, 2), "trace_s": trace.seconds,
                  "rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                  "peak_allocated_bytes": trace.peak_allocated_bytes, "components": trace.components,
                  "peak_phase": trace.peak_phase, "peak_module": trace.peak_module,
                  "layers_traced": trace.layers_traced, "extrapolated": trace.extrapolated}))
"""


def measure(model: str, setup: dict, exact: bool) -> dict:
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", CHILD, model, json.dumps(setup), "1" if exact else "0"],
                         capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result.update(model=model, setup=setup, mode="--exact" if exact else "default",
                  process_s=round(time.perf_counter() - t0, 2))
    return result


def measure_cli(model: str, setup: dict) -> tuple[float, int]:
    """(wall seconds, peak allocated bytes) of `python -m vramplan.cli simulate MODEL ... --json`."""
    flags = [x for k, v in setup.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "vramplan.cli", "simulate", model, *flags, "--json"],
                         capture_output=True, text=True, check=True)
    seconds = round(time.perf_counter() - t0, 2)
    return seconds, json.loads(out.stdout)["peak_allocated_bytes"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--quick", action="store_true", help="default mode only")
    args = ap.parse_args()
    results = []
    for model, setup in CASES:
        for exact in ((False,) if args.quick else (False, True)):
            r = measure(model, setup, exact)
            if not exact:
                r["cli_s"], cli_peak = measure_cli(model, setup)
                if cli_peak != r["peak_allocated_bytes"]:
                    raise SystemExit(f"{model}: the command's peak {cli_peak:,} differs from the library's "
                                     f"{r['peak_allocated_bytes']:,}")
            results.append(r)
            if args.json:
                print(json.dumps(r), flush=True)
    if args.json:
        return
    print("| model | setup | mode | layers traced | trace s | process s | imports s | command s | peak RSS MiB "
          "| peak allocated (bytes) |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        s = r["setup"]
        cli = f"{r['cli_s']:.1f}" if "cli_s" in r else "-"
        print(f"| {r['model']} | {s['method']} seq {s['seq']} | {r['mode']} | {r['layers_traced']} | {r['trace_s']:.1f} "
              f"| {r['process_s']:.1f} | {r['import_s']:.1f} | {cli} | {r['rss_mib']:.0f} | {r['peak_allocated_bytes']:,} |")
    by_model: dict = {}
    for r in results:
        by_model.setdefault(r["model"], []).append(r)
    for model, rs in by_model.items():
        if len(rs) == 2:
            same = all(rs[0][k] == rs[1][k] for k in ("peak_allocated_bytes", "components", "peak_phase", "peak_module"))
            print(f"\n{model}: default and --exact {'agree byte for byte' if same else 'DIFFER'}", end="")
    print()


if __name__ == "__main__":
    main()
