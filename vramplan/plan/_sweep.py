"""`vramplan sweep`: the per-GPU estimate over a product of setups, as a pandas DataFrame.

pandas is imported only inside `sweep()` (the estimate path never imports it). Bytes stay
int64 columns; the verdict is core/_verdict.py, as for every command.
"""
from __future__ import annotations

import dataclasses
from dataclasses import asdict
from itertools import product

from vramplan.core._components import ALLOCATED
from vramplan.core._errors import UsageError, VramplanError, require
from vramplan.core._gpus import Gpu, resolve_gpu
from vramplan.core._models import ModelSpec, resolve
from vramplan.core._verdict import verdict
from vramplan.cuda._arch import default_dtype, target_arch
from vramplan.plan._planner import TIGHT, Evaluator, checked_tight
from vramplan.core._setup import TrainSetup, apply_flags, check_given, parse_targets
from vramplan.plan._sharding import Parallel
from vramplan.plan._workers import checked as checked_workers, spread

SETUP_FIELDS = tuple(f.name for f in dataclasses.fields(TrainSetup))
PARALLEL_AXES = ("gpus", "strategy", "offload")
MAX_ROWS = 100_000


def _values(name: str, value) -> list:
    """An axis: a list (or tuple/range, except for targets whose tuple is one value) of values."""
    if name == "targets":
        values = value if isinstance(value, list) else [value]
        values = [parse_targets(v) if isinstance(v, str) else tuple(v) for v in values]
    elif isinstance(value, (list, tuple, range)):
        values = list(value)
    else:
        values = [value]
    if not values:
        raise UsageError(f"sweep axis {name} is empty", hint=f"give at least one value for {name}")
    return values


def sweep(model: str | ModelSpec, gpu: str | int | Gpu | None = None, *, setup: TrainSetup | None = None,
          gpus=1, strategy=None, offload="none", tight: float = TIGHT, alloc_conf=None, workers: int | None = None,
          given=(), **axes):
    """One row per combination of the given values, e.g.
    sweep("mistralai/Mistral-7B-v0.1", gpu="24GB", batch=[1, 2, 4, 8], seq=[512, 2048, 8192]).
    Any TrainSetup field may be a list; so may gpus, strategy and offload. A combination that cannot
    run is kept as a row with `error` (the one-line reason) and fits None; every other row has
    error None. Without `setup` the compute dtype is estimate()'s default for `gpu` (fp16 below
    sm80). `given`: fields of `setup` the caller set explicitly (the CLI's flags): every row keeps
    them and checks them against its method, as estimate does with the same flags. `workers`:
    processes that evaluate the rows (None: one per CPU where forking is safe; plan/_workers.py)."""
    checked_workers(workers)
    checked_tight(tight)
    pd = require("pandas", "export")
    spec = model if isinstance(model, ModelSpec) else resolve(model)
    g = resolve_gpu(gpu) if gpu is not None else None
    # as estimate(): the model's attention, bf16 where the GPU has it, else fp16
    base = setup or TrainSetup(attn=spec.arch.default_attention, dtype=default_dtype(target_arch(g)))
    unknown = sorted(set(axes) - set(SETUP_FIELDS))
    if unknown:
        raise UsageError(f"unknown sweep axis {', '.join(unknown)}",
                         hint=f"axes are TrainSetup fields ({', '.join(SETUP_FIELDS)}) and gpus, strategy, offload")
    grid = {name: _values(name, value) for name, value in axes.items()}
    par_grid = {"gpus": _values("gpus", gpus), "strategy": _values("strategy", strategy),
                "offload": _values("offload", offload)}
    names = list(grid) + list(par_grid)
    combos = 1
    for v in (*grid.values(), *par_grid.values()):
        combos *= len(v)
    if combos > MAX_ROWS:
        raise UsageError(f"sweep of {combos:,} setups is too large (max {MAX_ROWS:,})", hint="give fewer values")
    if set(given) - set(SETUP_FIELDS):
        raise UsageError(f"given names no TrainSetup field: {', '.join(sorted(set(given) - set(SETUP_FIELDS)))}",
                         hint=f"given takes TrainSetup fields ({', '.join(SETUP_FIELDS)})")
    kept = {name: getattr(base, name) for name in given}

    def build(chosen: dict) -> TrainSetup | VramplanError:
        """The setup of one combination of the setup axes, or why it cannot be one."""
        try:
            if chosen.get("recipe") is not None:
                # a swept recipe sets its own defaults, as recipe= does everywhere (apply_flags); the
                # given flags and the other swept values stand over them
                s = apply_flags(None, {"attn": base.attn, "batch": base.batch, "seq": base.seq, **kept, **chosen})
            else:
                s = base.with_(**{**kept, **chosen})   # a given flag stands where a swept value leaves it
            check_given(s, (*given, *chosen))  # a value the row's method does not use (quant with full)
        except VramplanError as exc:
            return exc
        return s
    setups = {values: build(dict(zip(grid, values))) for values in product(*grid.values())}
    runs: list[set] = [set() for _ in grid]   # per axis: the values some combination is a setup with
    for values, s in setups.items():
        if not isinstance(s, VramplanError):
            for j, value in enumerate(values):
                runs[j].add(value)
    for j, (name, values) in enumerate(grid.items()):
        # A typo or an out-of-range value is bad input, not rows: a value refused alone that no
        # combination is a setup with. One valid with another axis' value (--dtype fp32 with
        # --method lora under --recipe trainer's autocast) is judged in its combinations, as
        # estimate judges the flags; those it cannot run in are rows with their reasons.
        for value in values:
            alone = build({name: value}) if value not in runs[j] else None
            if isinstance(alone, VramplanError):
                raise alone

    def parallel(gpus_, strategy_, offload_) -> Parallel | VramplanError:
        try:
            return Parallel(gpus=gpus_, strategy=strategy_, offload=offload_)
        except VramplanError as exc:
            return exc
    plans = {values: parallel(*values) for values in product(*par_grid.values())}
    for j, values in enumerate(par_grid.values()):
        # as for the setup axes: a value no combination can run with is bad input (a typo), one that
        # runs with some (--offload cpu with fsdp, not ddp) makes rows with reasons for the others
        for value in values:
            with_it = [p for key, p in plans.items() if key[j] == value]
            if all(isinstance(p, VramplanError) for p in with_it):
                raise with_it[0]
    evaluators: dict[Parallel, Evaluator] = {}
    combinations = list(product(*grid.values(), *par_grid.values()))

    def one(i: int) -> tuple[dict, VramplanError | None]:
        """(the row of combination i, the error that made it a row without figures)"""
        chosen = dict(zip(names, combinations[i]))
        row = {"model": spec.id, "gpu": g.name if g else None, "gpu_memory_bytes": g.memory_bytes if g else None,
               "gpus": chosen.pop("gpus"), "strategy": chosen.pop("strategy"), "offload": chosen.pop("offload")}
        try:
            s = setups[combinations[i][:len(grid)]]
            par = plans[combinations[i][len(grid):]]
            for reason in (s, par):
                if isinstance(reason, VramplanError):
                    raise reason
            row.update({"gpus": par.gpus, "strategy": par.strategy, "offload": par.offload})
            ev = evaluators.get(par)
            if ev is None:
                ev = evaluators[par] = Evaluator(spec, par, g, alloc_conf)
            est = ev.estimate(s, g)
        except VramplanError as exc:
            # A combination that cannot run (Gemma-2 with sdpa, quant with full, ...) is a row with
            # its reason, not the end of the sweep.
            d = {**asdict(base), **chosen}
            d["targets"] = ",".join(d["targets"])
            row.update(d)
            row.update({"fits": None, "error": str(exc)})
            return row, exc
        d = s.to_dict()
        d["targets"] = ",".join(s.targets)
        row.update(d)
        row.update({c.value: est.components[c.value] for c in ALLOCATED})
        row.update({"peak_allocated_bytes": est.peak_allocated_bytes, "peak_reserved_bytes": est.reserved_bytes,
                    "device_total_bytes": est.device_total_bytes, "cpu_bytes": est.cpu_bytes,
                    "paged_optimizer_bytes": est.paged_optimizer_bytes, "peak_phase": est.peak_phase})
        if g is not None:
            row["headroom_bytes"] = g.memory_bytes - est.device_total_bytes
            row["status"] = verdict(est.device_total_bytes, g.memory_bytes, tight, est.allocator_oom)
            row["fits"] = row["status"] != "no"
        row["error"] = None
        return row, None

    # a row from a worker process (plan/_workers.py) carries its error as text only
    rows = spread(lambda i: one(i)[0], len(combinations), workers)
    if all(r["error"] for r in rows):
        raise one(0)[1]  # nothing ran: the reason itself is the answer
    df = pd.DataFrame(rows)
    # Byte columns stay integers (nullable Int64: error rows have no figures).
    for col in df.columns:
        if col.endswith("_bytes") or col in {c.value for c in ALLOCATED}:
            if df[col].isna().any():
                df[col] = df[col].astype("Int64")
    df = df[[c for c in df.columns if c != "error"] + ["error"]].astype({"error": object})
    df["error"] = df["error"].where(df["error"].notna(), None)
    if g is None:
        df = df.drop(columns=["gpu", "gpu_memory_bytes"])
    return df
