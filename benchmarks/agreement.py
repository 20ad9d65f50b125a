"""Simulate vs estimate over catalog models 7B-70B: how far the analytic estimate is from the
traced step (the CPU reference): the step's peak, each phase's own peak (forward, backward,
optimizer) and which phase holds the peak.

    python benchmarks/agreement.py                 # ~10 minutes on 2 cores; writes benchmarks/agreement.md
    python benchmarks/agreement.py --quick         # the base setup per model only
    python benchmarks/agreement.py --small         # every method x (1x512, 4x2048) x checkpointing, SDPA
    python benchmarks/agreement.py --full          # paged_adamw8bit in every cell too (~15 minutes)
    python benchmarks/agreement.py --json out.json # also every component, both sides
    python benchmarks/agreement.py --gpu T4        # the kernels of another GPU (default: an H100)
    python benchmarks/agreement.py --recipes --out benchmarks/agreement-recipes.md
                                                   # every recipe x method x (1x512, 4x2048), the
                                                   # recipe's own checkpointing, attention, optimizer

Llama 4 (its router is an nn.Linear that all-linear LoRA would wrap, which peft cannot run) gets LoRA
on q/k/v/o_proj instead, named in the setup column.

The estimate is called only through `vramplan.estimate`, so the table reflects whatever the
estimator is when this runs. Setups (r=16 all-linear, nf4 + double quant for QLoRA, bf16): every
method (qlora, lora) x batch/seq (1x512, 1x2048, 4x2048, 1x8192) x gradient checkpointing (on,
off) x attention (sdpa, eager; Gemma-2 eager only, as transformers 5 runs it) with AdamW, plus
paged_adamw8bit for every method x batch/seq with checkpointing and sdpa: 40 setups per model
(24 for Gemma-2). simulate uses its identical-layers shortcut (exact).
error % = (estimate - simulate) / simulate; a phase's error compares that phase's own peak.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

MODELS = ["meta-llama/Llama-2-7b-hf", "meta-llama/Llama-2-13b-hf", "meta-llama/Llama-2-70b-hf",
          "meta-llama/Meta-Llama-3-8B", "mistralai/Mistral-7B-v0.1", "mistralai/Mixtral-8x7B-v0.1",
          "Qwen/Qwen2.5-7B", "google/gemma-2-9b", "microsoft/Phi-3-mini-4k-instruct",
          "Qwen/Qwen3-8B", "Qwen/Qwen3-32B", "google/gemma-3-1b-pt", "google/gemma-3-4b-pt",
          "google/gemma-3-12b-pt", "allenai/OLMo-2-1124-7B", "microsoft/phi-4", "HuggingFaceTB/SmolLM3-3B-Base"]

BASE = dict(method="qlora", batch=1, seq=2048, grad_ckpt=True, attn="sdpa", optimizer="adamw")
METHODS = ("qlora", "lora")
SHAPES = ((1, 512), (1, 2048), (4, 2048), (1, 8192))          # batch x seq
CKPT = (True, False)
ATTN = ("sdpa", "eager")
OPTIMIZERS = ("adamw", "paged_adamw8bit")
ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
RECIPES = ("trainer", "trl-sft", "qlora-paper", "plain")     # core/_recipes.py


def small_matrix() -> list[dict]:
    """Every method x (1x512, 4x2048) x checkpointing on/off, SDPA, AdamW: 8 setups per model."""
    return [dict(method=m, batch=b, seq=s, grad_ckpt=c, attn="sdpa", optimizer="adamw")
            for m in METHODS for b, s in (SHAPES[0], SHAPES[2]) for c in CKPT]


def recipe_matrix() -> list[dict]:
    """Every recipe x method x (1x512, 4x2048): the rest (dtype, autocast, optimizer,
    checkpointing, loss, loop, rank, prepare_model_for_kbit_training) is the recipe's own. The
    QLoRA paper's script quantizes (prepare_model_for_kbit_training needs a quantized model), so
    its rows are QLoRA only."""
    return [dict(recipe=r, method=m, batch=b, seq=s)
            for r in RECIPES for m in METHODS for b, s in (SHAPES[0], SHAPES[2])
            if r != "qlora-paper" or m == "qlora"]


def matrix(full: bool) -> list[dict]:
    """Every method x batch/seq x checkpointing x attention with AdamW; paged_adamw8bit for every
    method x batch/seq with checkpointing and sdpa (--full: paged_adamw8bit everywhere too)."""
    out = []
    for opt in OPTIMIZERS:
        for method in METHODS:
            for batch, seq in SHAPES:
                for ckpt in CKPT:
                    for attn in ATTN:
                        if opt != "adamw" and not full and (not ckpt or attn != "sdpa"):
                            continue
                        out.append(dict(method=method, batch=batch, seq=seq, grad_ckpt=ckpt, attn=attn, optimizer=opt))
    return out


OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "agreement.md")


def label(setup) -> str:
    parts = [f"{setup.recipe}:"] if setup.recipe else []
    parts += [setup.method, f"{setup.batch}x{setup.seq}", "ckpt" if setup.grad_ckpt else "no-ckpt", setup.attn]
    if setup.optimizer != "adamw":
        parts.append(setup.optimizer)
    if setup.grad_accum > 1:
        parts.append(f"x{setup.grad_accum} micro-steps")
    if setup.adapter_dtype == "bf16":
        parts.append("bf16 LoRA")
    if setup.targets != ("all-linear",):
        parts.append("LoRA " + "/".join(setup.targets))
    return " ".join(parts)


def setups_for(model: str, quick: bool, full: bool = False, small: bool = False, recipes: bool = False):
    from vramplan.core._errors import VramplanError
    from vramplan.core._models import resolve
    from vramplan.core._setup import make_setup

    arch = resolve(model).arch
    seen = []
    cases = [BASE] if quick else recipe_matrix() if recipes else small_matrix() if small else matrix(full)
    for kw in cases:
        if kw.get("attn", "sdpa") not in arch.attention:
            kw = {**kw, "attn": arch.default_attention}   # transformers 5 runs Gemma-2 and gpt-oss eager only
        if arch.linear_router:
            # Llama 4: all-linear would wrap the router, which peft cannot run (refused on both
            # sides), so these rows put LoRA on the attention projections
            kw = {**kw, "targets": ATTENTION_TARGETS}
        kw = dict(kw)
        try:
            setup = make_setup(kw.pop("recipe", None), **kw)
        except VramplanError as exc:   # a recipe this model cannot run (stated, as the CLI refuses it)
            print(f"# {model}: {exc}", file=sys.stderr)
            continue
        if setup not in seen:
            seen.append(setup)
    return seen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the base setup per model only")
    ap.add_argument("--full", action="store_true", help="the whole product, paged_adamw8bit everywhere (~15 min)")
    ap.add_argument("--small", action="store_true", help="every method x (1x512, 4x2048) x checkpointing, SDPA")
    ap.add_argument("--recipes", action="store_true",
                    help="every recipe x method x (1x512, 4x2048) with the recipe's own defaults")
    ap.add_argument("--models", help="comma-separated subset of the catalog ids above")
    ap.add_argument("--json", metavar="PATH", help="also write every row with both sides' components")
    ap.add_argument("--sim-from", metavar="JSON",
                    help="take the simulate side of each row from an earlier run's --json where it has the row "
                         "(leave out of it every row a simulate change since touches), simulating the others; "
                         "the header names the file")
    ap.add_argument("--out", default=OUT, help=f"markdown file to write (default {OUT})")
    ap.add_argument("--gpu", help="catalog GPU whose CUDA kernels both sides emulate (default: an H100); "
                                  "16-bit setups use fp16 on GPUs without bf16")
    args = ap.parse_args()

    import vramplan
    from vramplan.simulate import simulate as run

    models = args.models.split(",") if args.models else MODELS
    rows, t0 = [], time.perf_counter()
    stored = {}
    if args.sim_from:
        with open(args.sim_from) as f:
            stored = {(r["model"], r["setup"]): r for r in json.load(f)}
    sim_keys = ("sim", "sim_phase", "sim_reserved", "sim_components", "sim_module", "sim_phase_peaks")
    for model in models:
        spec = vramplan.resolve_model(model)
        for setup in setups_for(model, args.quick, args.full, args.small, args.recipes):
            if args.gpu:
                from vramplan.cuda._arch import default_dtype, target_arch
                setup = setup.with_(dtype=default_dtype(target_arch(vramplan.resolve_gpu(args.gpu))))
            t = time.perf_counter()
            row = {"model": spec.id, "setup": label(setup)}
            old = stored.get((spec.id, row["setup"])) if stored else None
            if old:
                row.update({k: old.get(k) for k in sim_keys})
            else:
                try:
                    trace = run(spec, setup, gpu=args.gpu)
                    row.update(sim=trace.peak_allocated_bytes, sim_phase=trace.peak_phase,
                               sim_reserved=trace.peak_reserved_bytes,
                               sim_components=trace.components, sim_module=trace.peak_module,
                               sim_phase_peaks=dict(trace.phase_peaks))
                except vramplan.VramplanError as exc:
                    row.update(sim=None, sim_phase=f"error: {exc.message}")
            try:
                est = vramplan.estimate(spec, setup, gpu=args.gpu)
                row.update(est=est.peak_allocated_bytes, est_phase=est.peak_phase, est_components=dict(est.components),
                           est_reserved=est.peak_reserved_bytes,
                           est_phase_peaks=dict(est.phase_peaks))
            except Exception as exc:  # noqa: BLE001 - the estimator may be mid-rewrite: report, go on
                row.update(est=None, est_phase=f"error: {type(exc).__name__}: {exc}"[:120])
            row["seconds"] = round(time.perf_counter() - t, 1)
            rows.append(row)
            print(format_row(row), flush=True, file=sys.stderr)
    table = render(rows, time.perf_counter() - t0, args.sim_from)
    print(table)
    with open(args.out, "w") as f:
        f.write(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


def error_pct(row, key: str = "") -> float | None:
    """(estimate - simulate) / simulate of the peak allocated, or with key="reserved" of the peak
    reserved (each side's own caching-allocator replay: the estimate's reduced-detail stream,
    simulate's every storage; docs/allocator.md#estimate-stream)."""
    sim, est = row.get("sim" + (f"_{key}" if key else "")), row.get("est" + (f"_{key}" if key else ""))
    if sim and est is not None:
        return 100.0 * (est - sim) / sim
    return None


PHASES = ("forward", "backward", "optimizer")


def phase_error_pct(row, phase: str) -> float | None:
    """(estimate - simulate) / simulate of one phase's own peak."""
    sim, est = row.get("sim_phase_peaks") or {}, row.get("est_phase_peaks") or {}
    if sim.get(phase) and est.get(phase) is not None:
        return 100.0 * (est[phase] - sim[phase]) / sim[phase]
    return None


def pct(err) -> str:
    return "-" if err is None else f"{err:+.2f}%"


def gib(n) -> str:
    return "-" if n is None else f"{n / 2**30:.3f}"


def format_row(row) -> str:
    phases = " | ".join(pct(phase_error_pct(row, p)) for p in PHASES)
    return (f"| {row['model']} | {row['setup']} | {gib(row.get('sim'))} | {gib(row.get('est'))} | "
            f"{pct(error_pct(row))} | {phases} | {row.get('sim_phase', '-')} | {row.get('est_phase', '-')} | "
            f"{gib(row.get('sim_reserved'))} | {gib(row.get('est_reserved'))} | {pct(error_pct(row, 'reserved'))} |")


def render(rows, seconds: float, sim_from: str | None = None) -> str:
    import platform

    import torch
    import transformers

    errs = [abs(e) for e in map(error_pct, rows) if e is not None]
    same_phase = sum(1 for r in rows if r.get("sim_phase") == r.get("est_phase"))
    lines = [
        "# Simulate vs estimate: peak allocated and peak reserved over catalog models",
        "",
        f"Generated by `python benchmarks/agreement.py{''.join(' ' + a for a in sys.argv[1:])}` on "
        f"{datetime.date.today().isoformat()} "
        f"({platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}; "
        f"{len(rows)} setups in {seconds / 60:.1f} min). simulate: the traced step (identical-layers shortcut, "
        "exact; every layer traced under gradient accumulation, whose two micro-steps it does not rebuild)" + (f", taken where it has the row from the earlier run's rows in {sim_from} (written "
                    f"{datetime.datetime.fromtimestamp(os.path.getmtime(sim_from)).isoformat(timespec='minutes')}, "
                    "holding only rows no simulate change since touches), the other rows simulated in this run"
                    if sim_from else "") +
        "; estimate: `vramplan.estimate` as it was at that time. error % = (estimate - simulate) / simulate.",
        "",
        f"Summary: mean |error| {sum(errs) / len(errs):.2f}%, max |error| {max(errs):.2f}%, "
        f"{sum(e <= 1 for e in errs)}/{len(errs)} within 1%, {sum(e <= 5 for e in errs)}/{len(errs)} within 5%; "
        f"peak phase agrees in {same_phase}/{len(rows)}." if errs else "Summary: no comparable rows.",
        "",
    ]
    for phase in PHASES:   # each phase's own peak, as tests/test_agreement.py checks it
        perrs = [abs(e) for e in (phase_error_pct(r, phase) for r in rows) if e is not None]
        if perrs:
            lines.append(f"{phase} peak: mean |error| {sum(perrs) / len(perrs):.2f}%, max |error| {max(perrs):.2f}%, "
                         f"{sum(e <= 1 for e in perrs)}/{len(perrs)} within 1%, "
                         f"{sum(e <= 3 for e in perrs)}/{len(perrs)} within 3%.")
    rerrs = [e for e in (error_pct(r, "reserved") for r in rows) if e is not None]
    if rerrs:
        lines.append(f"peak reserved (caching-allocator replay, default settings): mean |error| "
                     f"{sum(map(abs, rerrs)) / len(rerrs):.2f}%, from {min(rerrs):+.2f}% to {max(rerrs):+.2f}%, "
                     f"{sum(abs(e) <= 1 for e in rerrs)}/{len(rerrs)} within 1%, "
                     f"{sum(abs(e) <= 3 for e in rerrs)}/{len(rerrs)} within 3%.")
    lines += [
        "",
        "| model | setup | simulate peak (GiB) | estimate peak (GiB) | error % | forward error % | "
        "backward error % | optimizer error % | simulate phase | estimate phase | simulate reserved (GiB) | "
        "estimate reserved (GiB) | reserved error % |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---|---:|---:|---:|",
    ]
    lines += [format_row(r) for r in rows]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
