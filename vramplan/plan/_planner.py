"""`vramplan plan`: what fits, what to change, and how it spreads over several GPUs.

Built on the analytic estimator: `plan()` asks the same question ("does this setup fit on this
GPU, per GPU under this engine?") many times, through `Evaluator`, which calls `estimate()` with
the static memory cached per setup (it does not depend on batch or sequence) and spreads it with
`sharding.distribute`. Every device total is the estimate's: CUDA context + the caching-allocator
replay's peak reserved (estimate/_reserved.py), so a setup gets one number and one verdict in
every command. A setup whose allocated bytes plus context alone exceed the GPU does not fit
whatever the allocator does (reserved >= allocated): it is answered without a replay
(`Evaluator.floor`); on one GPU, a replay against the card that runs out of memory is a "no"
without the unlimited replay its number would take (`Evaluator.fits`, docs/allocator.md#verdict).
Every boundary the planner reports (largest batch, longest sequence) is re-checked through the
public API.

Verdicts: core/_verdict.py (fits / tight under 5% headroom / no, or no where the replay against
the card runs out of memory below it).

Cost model of the recommended changes (a ranking heuristic, each term with its source; lower is
cheaper; combinations add their costs):
  0.00  eager -> sdpa attention: no cost, usually faster (PyTorch scaled_dot_product_attention docs)
  0.00  caching-allocator settings (expandable_segments, max_split_size_mb): the step itself is
        unchanged (plan/_allocator_changes.py, PyTorch CUDA semantics docs)
  0.02  double quantization on: ~0.37 bits/param saved, negligible speed cost (QLoRA paper, sec. 3)
  0.05  paged optimizer: free until the GPU runs short, then state pages over PCIe (bitsandbytes
        paged optimizers; QLoRA paper, sec. 3)
  0.05  8-bit optimizer: block-wise 8-bit states match 32-bit Adam (Dettmers et al. 2022,
        "8-bit Optimizers via Block-wise Quantization")
  0.05  no LoRA dropout / no prepare_model_for_kbit_training fp32 cast: small regularization or
        stability changes (peft LoraConfig / prepare_model_for_kbit_training docs)
  0.10+ smaller micro-batch with gradient accumulation: same effective batch, lower GPU
        utilization (HF "Methods and tools for efficient training on a single GPU")
  0.10  fp32 -> bf16 compute
  0.15  int8 -> nf4 base weights (QLoRA paper: NF4 beats int8/fp4 at equal bits)
  0.15 x log2(r_old / r_new)  lower LoRA rank (Hu et al. 2021, sec. 7.2: small ranks often suffice)
  0.30  gradient checkpointing: one extra forward per layer in backward, ~+20-33% step time
        (Chen et al. 2016 "Training Deep Nets with Sublinear Memory Cost"; HF single-GPU docs: ~20%)
  0.35  LoRA -> QLoRA (4-bit base): dequantization costs step time; NF4 + DQ matches 16-bit LoRA
        quality (QLoRA paper, sec. 5)
  0.40 / 0.50  adapters on attention only / on q,v only (QLoRA paper, sec. 4: LoRA on all linear
        layers is needed to match full fine-tuning)
  0.30 x (1 + log2(s_old / s_new))  shorter sequence: examples past the new length are
        truncated or split
  0.70 / 0.80  full fine-tuning -> LoRA / QLoRA: a different method
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import field
from itertools import combinations, islice

from vramplan.core._errors import UsageError, VramplanError
from vramplan.core._record import record
from vramplan.estimate._estimator import Estimate, card_replay, estimate
from vramplan.core._gpus import Gpu, catalog, resolve_gpu
from vramplan.cuda._arch import default_dtype, target_arch
from vramplan.estimate._inventory import static_memory
from vramplan.estimate._reserved import conf_of
from vramplan.core._models import ModelSpec, resolve
from vramplan.core._setup import ALL_LINEAR, MAX_BATCH, MAX_SEQ, TrainSetup, apply_flags, library_setup
from vramplan.plan._sharding import (FSDP, Parallel, ShardedEstimate, accumulation_modelled, base_estimate,
                                    distribute, effective_setup, one_gpu_fsdp_modelled, parallel_of, per_gpu,
                                    replays_own_stream, smallest_per_gpu, splits_for)

from vramplan.core._verdict import TIGHT, verdict
from vramplan.plan._workers import MIN_ITEMS, SLOW_ITEMS, checked as checked_workers, spread
MAX_GRID = 64            # cells per axis: a grid is for reading, 20 x 20 is plenty
MAX_CHANGES = 8          # ranked changes shown
MIN_GPU_COUNTS = (1, 2, 4, 8, 16, 32, 64)
MIN_ENGINES = (("fsdp", "none"), ("zero3", "none"), ("fsdp", "cpu"), ("zero3", "cpu"))


def status_of(need: int, capacity: int, tight: float = TIGHT) -> str:
    """core/_verdict.py: the same rule as estimate, sweep and the MemoryCallback."""
    return verdict(need, capacity, tight)


def checked_tight(tight) -> float:
    """The 'tight' fraction as given, or the one-line error `plan` and `sweep` both give for it."""
    if isinstance(tight, bool) or not isinstance(tight, (int, float)) or not 0 <= tight < 1:  # nan too
        raise UsageError(f"--tight must be a fraction in [0, 1), got {tight!r}", hint="e.g. --tight 0.05")
    return tight


# --- the fast, cached evaluation path ------------------------------------------------------------

class Evaluator:
    """Per-GPU need of setups of one model under one Parallel, cached.

    Composes estimator pieces exactly as estimator.estimate does; static memory is cached per
    setup without batch/seq. `exact()` goes through the public API (estimate + per_gpu)."""

    def __init__(self, spec: ModelSpec, parallel: Parallel, gpu: Gpu | None = None, alloc_conf=None):
        self.spec, self.parallel = spec, parallel
        self.gpu = gpu          # whose CUDA kernels the estimate assumes (cuda/_arch.py)
        self.alloc_conf = alloc_conf   # caching-allocator settings of the replay (None: the environment's)
        self._static: dict = {}
        self._floor: dict = {}
        self._need: dict = {}
        self._exact: dict = {}
        self._on_card: dict = {}     # setup -> whether the replay against the card runs out of memory
        self._smallest: dict = {}    # setup -> the smallest GPU memory it runs on (smallest_card)
        self.calls = 0

    def spread(self, fn, count: int, workers: int | None, min_items: int = MIN_ITEMS) -> list:
        """[fn(0), ..., fn(count - 1)] over forked worker processes (plan/_workers.py), each
        worker's new floors, needs, card replays and exact estimates kept in this evaluator's
        caches, as if it had evaluated them itself: `calls` counts each setup estimated anew once."""
        caches = (self._floor, self._need, self._on_card, self._exact)
        parent = os.getpid()

        def run(i: int) -> tuple:
            before = [len(cache) for cache in caches]   # entries are only ever added, in order
            value = fn(i)
            if os.getpid() == parent:       # evaluated here: the caches already hold it
                return value, None
            return value, [{k: cache[k] for k in islice(cache, n, None)} for cache, n in zip(caches, before)]
        done = spread(run, count, workers, min_items)
        for _value, new in done:
            for cache, entries in zip(caches, new or ()):
                for key, entry in entries.items():
                    if key not in cache:
                        cache[key] = entry
                        self.calls += cache is self._need
        return [value for value, _new in done]

    def quick(self, setup: TrainSetup) -> Estimate:
        run = effective_setup(setup, self.parallel)
        return base_estimate(self.spec, run, self.parallel, self.gpu, self.alloc_conf, static=self._static_of(run))

    def estimate(self, setup: TrainSetup, gpu: Gpu | None = None) -> ShardedEstimate:
        quick = self.quick(setup)
        return distribute(quick, self.parallel, gpu=gpu, split=splits_for(self.spec, quick.setup, self.parallel))

    def need(self, setup: TrainSetup) -> int:
        """Per-GPU device total (what NVML would show) for `setup`."""
        return self._evaluate(setup)[0]

    def fits(self, setup: TrainSetup, cap: int) -> bool:
        """The device total is within `cap` and the allocator replay against this evaluator's GPU
        did not run out of memory (fragmentation) on the way (core/_verdict.py). Reserved memory is
        never below allocated, so a setup whose allocated peak plus context alone exceeds `cap`
        does not fit whatever the replay says: it is answered without one. On one GPU, a replay
        against the card that runs out of memory is a "no" whatever the need: the unlimited
        replay the need would take is not run (`_fails_on_card`)."""
        if setup not in self._need and (self.floor(setup) > cap or self._fails_on_card(setup, cap)):
            return False
        need, oom = self._evaluate(setup)
        return need <= cap and not oom

    def floor(self, setup: TrainSetup) -> int:
        """A lower bound of the per-GPU device total: peak allocated + CUDA context + NCCL."""
        return self._without_replay(setup)[1]

    def _without_replay(self, setup: TrainSetup) -> tuple[Estimate, int]:
        """(the single-GPU estimate without the allocator replay, floor), cached per setup."""
        value = self._floor.get(setup)
        if value is None:
            run = effective_setup(setup, self.parallel)
            quick = estimate(self.spec, run, static=self._static_of(run), gpu=self.gpu, replay=False)
            e = distribute(quick, self.parallel, split=splits_for(self.spec, quick.setup, self.parallel),
                           replay=False)
            value = self._floor[setup] = (quick, e.peak_allocated_bytes + e.cuda_context_bytes + e.comm_bytes)
        return value

    def _fails_on_card(self, setup: TrainSetup, cap: int) -> bool:
        """On this evaluator's card: whether the replay against the card runs out of memory
        (estimator.card_replay, as estimate() runs it; for a spread run replaying its own stream,
        sharding.distribute's)."""
        if self.gpu is None or cap != self.gpu.memory_bytes:
            return False
        fails = self._on_card.get(setup)
        if fails is None:
            fails = self._on_card[setup] = self._replay_on_card(setup, cap)
        return fails

    def _replay_on_card(self, setup: TrainSetup, cap: int) -> bool:
        if self.parallel.strategy != "single":
            if not replays_own_stream(self.parallel):
                return False
            quick, _ = self._without_replay(setup)
            quick = dataclasses.replace(quick, alloc_conf=conf_of(self.alloc_conf).text)   # as base_estimate records it
            return distribute(quick, self.parallel, gpu=self.gpu, split=splits_for(self.spec, quick.setup, self.parallel),
                              need=False).allocator_oom is not None
        quick, _ = self._without_replay(setup)
        oom = card_replay(self.spec, quick.setup, self._static_of(quick.setup), quick.cuda_arch, self.alloc_conf,
                          quick.peak_allocated_bytes, cap - quick.cuda_context_bytes, need=False)[2]
        return oom is not None

    def _static_of(self, run: TrainSetup):
        key = run.with_(batch=1, seq=1)
        static = self._static.get(key)
        if static is None:
            static = self._static[key] = static_memory(self.spec, run)
        return static

    def _evaluate(self, setup: TrainSetup) -> tuple[int, dict | None]:
        """(device total, the replay's allocator OOM against this evaluator's GPU or None)."""
        value = self._need.get(setup)
        if value is None:
            self.calls += 1
            est = self.estimate(setup, self.gpu)
            value = self._need[setup] = (est.device_total_bytes, est.allocator_oom)
        return value

    def status(self, setup: TrainSetup, cap: int, tight: float) -> str:
        """core/_verdict.py on this setup's device total and replay."""
        need, oom = self._evaluate(setup)
        return verdict(need, cap, tight, oom)

    def exact(self, setup: TrainSetup) -> int:
        """The same number through the public API (estimate() inside sharding.per_gpu)."""
        return self._exact_estimate(setup).device_total_bytes

    def smallest_card(self, setup: TrainSetup) -> int | None:
        """Where `setup` does not fit this evaluator's GPU: the smallest GPU memory it runs on
        (estimator.smallest_card; per GPU where FSDP, DDP, ZeRO-2 or ZeRO-3 replay their own stream,
        sharding.smallest_per_gpu); None where it fits, and for the other engines."""
        if self.gpu is None:
            return None
        if setup not in self._smallest:      # about six replays: the plan and its minimum both ask
            if self.parallel.strategy != "single":
                value = smallest_per_gpu(self.spec, setup, self.parallel, self.gpu, self.alloc_conf)
            else:
                from vramplan.estimate._estimator import estimate
                value = estimate(self.spec, setup, gpu=self.gpu, alloc_conf=self.alloc_conf).smallest_gpu_bytes
            self._smallest[setup] = value
        return self._smallest[setup]

    def exact_oom(self, setup: TrainSetup) -> dict | None:
        """The public API's allocator out-of-memory on this evaluator's GPU, or None."""
        return self._exact_estimate(setup).allocator_oom

    def exact_fits(self, setup: TrainSetup, cap: int) -> bool:
        est = self._exact_estimate(setup)
        return est.device_total_bytes <= cap and not est.allocator_oom

    def _exact_estimate(self, setup: TrainSetup) -> ShardedEstimate:
        value = self._exact.get(setup)
        if value is None:
            value = self._exact[setup] = per_gpu(self.spec, setup, self.parallel, gpu=self.gpu,
                                                 alloc_conf=self.alloc_conf)
        return value


def seq_bound(spec: ModelSpec) -> int:
    """The longest sequence the limits search: the context the config declares
    (max_position_embeddings; a longer one runs under RoPE, but the model was not trained for it,
    which the estimate warns about), else MAX_SEQ."""
    context = spec.config.get("max_position_embeddings")
    if isinstance(context, bool) or not isinstance(context, int) or context < 1:
        return MAX_SEQ
    return min(context, MAX_SEQ)


def _largest(fits, start: int, upper: int) -> tuple[int, bool]:
    """A boundary v in [1, upper]: fits(v) and (v == upper or not fits(v + 1)); 0 when fits(1) is
    False. Doubles from `start`, then bisects. Returns (v, capped) with capped = v == upper."""
    if not fits(1):
        return 0, False
    lo, hi = 1, None
    probe = min(max(start, 1), upper)
    while hi is None:
        if probe > lo and not fits(probe):
            hi = probe
        else:
            lo = max(lo, probe)
            if lo >= upper:
                return upper, True
            probe = min(2 * lo, upper)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo, False


# --- results -------------------------------------------------------------------------------------

@record
class Limit:
    """The largest value of one field (batch or seq) that fits, the other fields as requested.
    value 0: not even 1 fits. capped: value is the search's bound and still fits (MAX_BATCH; for
    seq the model's context, seq_bound)."""
    field: str
    value: int
    need_bytes: int | None       # per-GPU device total at value
    next_need_bytes: int | None  # at value + 1 (None when capped)
    capped: bool = False
    bound: str = "the sanity bound"   # what capped it
    # the caching allocator's out-of-memory on this GPU at value + 1 (estimator.card_replay's
    # allocator_oom), or None: there next_need_bytes is what a larger card would reserve, not what
    # this one lacks
    next_oom: dict | None = None
    next_smallest_gpu_bytes: int | None = None   # the smallest GPU memory value + 1 runs on (one GPU)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@record
class Cell:
    batch: int
    seq: int
    need_bytes: int
    status: str
    # need_bytes is a lower bound (peak allocated + context: reserved is never less) where that
    # alone exceeds the GPU; the allocator is not replayed for a cell that cannot fit anyway
    lower_bound: bool = False

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@record
class Grid:
    batches: tuple[int, ...]
    seqs: tuple[int, ...]
    cells: tuple[tuple[Cell, ...], ...]   # cells[i][j]: seqs[i] x batches[j]

    def to_dict(self) -> dict:
        return {"batches": list(self.batches), "seqs": list(self.seqs),
                "cells": [[c.to_dict() for c in row] for row in self.cells]}


@record
class Change:
    """A change to the setup that makes it fit, with its new per-GPU need and its cost."""
    description: str
    changes: dict               # TrainSetup field -> new value
    setup: TrainSetup
    need_bytes: int
    headroom_bytes: int
    status: str
    cost: float                 # ranking score (module docstring), lower is cheaper
    cost_text: str
    sources: tuple[str, ...]

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["setup"] = self.setup.to_dict()
        d["changes"] = {k: list(v) if isinstance(v, tuple) else v for k, v in self.changes.items()}
        d["sources"] = list(self.sources)
        return d


@record
class Option:
    """A hardware answer: this many GPUs under this engine, per-GPU need."""
    gpus: int
    strategy: str
    offload: str
    need_bytes: int
    status: str
    cpu_bytes: int = 0          # pinned host memory per rank for what is offloaded

    @property
    def label(self) -> str:
        return Parallel(self.gpus, self.strategy, self.offload).label

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "label": self.label}


@record
class Minimum:
    """What it would take when the requested setup does not fit: never an error, an answer."""
    single_gpu_bytes: int              # the setup on one GPU, no sharding
    smallest_gpu: str | None           # smallest catalog GPU that holds it alone
    options: tuple[Option, ...]        # per engine, the fewest GPUs of the requested kind that fit
    floor_bytes: int                   # least per-GPU need found (up to 64 GPUs, with offload)
    floor_label: str
    message: str
    # When no GPU count fits the setup as asked: setup changes that fit under `changes_parallel`.
    changes_parallel: Parallel | None = None
    changes: tuple[Change, ...] = ()

    def to_dict(self) -> dict:
        return {"single_gpu_bytes": self.single_gpu_bytes, "smallest_gpu": self.smallest_gpu,
                "options": [o.to_dict() for o in self.options], "floor_bytes": self.floor_bytes,
                "floor_label": self.floor_label, "message": self.message,
                "changes_parallel": self.changes_parallel.to_dict() if self.changes_parallel else None,
                "changes": [c.to_dict() for c in self.changes]}


@record
class GpuRow:
    """One card of a survey (plan gpu="all"), as `plan` answers for that card alone; a card the
    setup cannot run on (bf16 below sm80, ...) has only `error`, its one-line reason."""
    gpu: Gpu
    status: str | None
    need_bytes: int | None
    headroom_bytes: int | None
    max_batch: int | None
    max_seq: int | None
    error: str | None = None

    def to_dict(self) -> dict:
        return {"gpu": self.gpu.to_dict(), "status": self.status, "need_bytes": self.need_bytes,
                "headroom_bytes": self.headroom_bytes, "max_batch": self.max_batch, "max_seq": self.max_seq,
                "error": self.error}


@record
class Plan:
    model: ModelSpec
    setup: TrainSetup
    parallel: Parallel
    gpu: Gpu | None                      # None for a survey of the catalog (gpu="all")
    estimate: ShardedEstimate            # per-GPU estimate of the requested setup
    status: str | None                   # fits / tight / no (None for a survey)
    tight: float
    max_batch: Limit | None
    max_seq: Limit | None
    grid: Grid | None
    changes: tuple[Change, ...]
    minimum: Minimum | None
    survey: tuple[GpuRow, ...] = ()
    notes: tuple[str, ...] = ()
    evaluations: int = field(default=0, compare=False)
    recipe_changes: tuple = ()           # plan/recipe_changes.RankedChange, largest saving first
    allocator_changes: tuple = ()        # plan/allocator_changes.AllocatorChange, lowest device total first
    smallest_gpu_bytes: int | None = None   # status "no" on one GPU: the smallest GPU memory it runs on

    @property
    def fits(self) -> bool | None:
        return None if self.status is None else self.status != "no"

    @property
    def need_bytes(self) -> int:
        return self.estimate.device_total_bytes

    @property
    def headroom_bytes(self) -> int | None:
        return None if self.gpu is None else self.gpu.memory_bytes - self.need_bytes

    def to_dict(self) -> dict:
        return {
            "model": self.model.to_dict(), "setup": self.setup.to_dict(), "parallel": self.parallel.to_dict(),
            "gpu": self.gpu.to_dict() if self.gpu else None, "status": self.status, "fits": self.fits,
            "tight_fraction": self.tight, "need_bytes": self.need_bytes, "headroom_bytes": self.headroom_bytes,
            "estimate": self.estimate.to_dict(),
            "max_batch": self.max_batch.to_dict() if self.max_batch else None,
            "max_seq": self.max_seq.to_dict() if self.max_seq else None,
            "grid": self.grid.to_dict() if self.grid else None,
            "changes": [c.to_dict() for c in self.changes],
            "minimum": self.minimum.to_dict() if self.minimum else None,
            "survey": [r.to_dict() for r in self.survey],
            "notes": list(self.notes),
            "recipe_changes": [r.to_dict() for r in self.recipe_changes],
            "allocator_changes": [a.to_dict() for a in self.allocator_changes],
            "smallest_gpu_bytes": self.smallest_gpu_bytes,
            "alloc_conf": self.estimate.alloc_conf,
        }


# --- the planner ----------------------------------------------------------------------------------

def plan(model: str | ModelSpec, setup: TrainSetup | None = None, gpu: str | int | Gpu | None = None, *,
         gpus: int = 1, strategy: str | None = None, offload: str = "none", parallel: Parallel | None = None,
         batches=None, seqs=None, tight: float = TIGHT, recommend: bool = True, alloc_conf=None,
         workers: int | None = None, card_setup=None, **flags) -> Plan:
    """What fits on `gpu` (a size, a catalog name, or "all" for every catalog GPU), per GPU under
    `gpus` x `strategy` (+ `offload`): largest micro-batch at the requested seq, longest seq at
    the requested batch, a batch x seq grid, ranked changes that make a non-fitting setup fit,
    and the minimum hardware when nothing does. `flags` are TrainSetup fields. `alloc_conf`:
    PYTORCH_CUDA_ALLOC_CONF settings of the caching-allocator replay (None: the environment's);
    the other settings that matter are ranked with their computed effect. `workers`: processes
    that evaluate the grid's cells, the ranked changes and the minimum hardware's searches (None: one
    per CPU where forking is safe; plan/_workers.py). `card_setup`: for gpu="all", a function of a
    catalog Gpu giving the setup `plan` plans on that card alone (the CLI's: estimate's defaults for
    it); default `setup`, each card with its own default dtype where neither `setup` nor a dtype flag
    was given."""
    spec = model if isinstance(model, ModelSpec) else resolve(model)
    survey = isinstance(gpu, str) and gpu.strip().lower() == "all"
    dtype_defaulted = setup is None and "dtype" not in flags and flags.get("recipe") is None   # a recipe names its dtype
    # as estimate(): bf16 where the planned GPU has it, else fp16 (cuda/_arch.py default_dtype)
    single = isinstance(gpu, (str, int, Gpu)) and not survey
    dtype = default_dtype(target_arch(resolve_gpu(gpu), None)) if single else TrainSetup.dtype
    setup = library_setup(setup, flags, dtype, spec.arch.default_attention)
    par = parallel_of(gpus, strategy, offload, parallel)
    checked_tight(tight)
    checked_workers(workers)
    if gpu is None:
        raise UsageError("plan needs a GPU", hint="e.g. --gpu 24GB, --gpu A100-80GB, or --gpu all")
    notes: list[str] = []
    if survey:
        if card_setup is None:
            # as plan() resolves one card below: its own default dtype where none was given
            card_setup = ((lambda g: apply_flags(None, {**flags, "attn": setup.attn,
                                                        "dtype": default_dtype(target_arch(g, None))}))
                          if dtype_defaulted else (lambda g: setup))
        return _survey(spec, setup, card_setup, par, tight, notes, alloc_conf, workers)
    g = resolve_gpu(gpu)
    ev = Evaluator(spec, par, g, alloc_conf)
    cap = g.memory_bytes
    est = per_gpu(spec, setup, par, gpu=g, alloc_conf=alloc_conf)
    need = est.device_total_bytes
    status = verdict(need, cap, tight, est.allocator_oom)

    max_batch = _limit(ev, setup, "batch", cap, MAX_BATCH, notes)
    max_seq = _limit(ev, setup, "seq", cap, seq_bound(spec), notes)
    grid = _grid(ev, setup, cap, tight, batches, seqs, max_batch, max_seq, workers)
    changes: tuple[Change, ...] = ()
    minimum = None
    allocator = _allocator_changes(spec, setup, par, g, tight, alloc_conf) if recommend else ()
    if status == "no":
        if recommend:
            changes = _recommend(ev, spec, setup, g, tight, workers)
            # an allocator setting that makes it fit changes nothing in the step: it ranks first
            changes = tuple(Change(f"--alloc-conf {a.alloc_conf}", {"alloc_conf": a.alloc_conf}, setup,
                                   a.need_bytes, cap - a.need_bytes, a.status, 0.0, a.text, (a.source,))
                            for a in allocator if a.status != "no") + changes
            changes = changes[:MAX_CHANGES]
        minimum = _minimum(spec, setup, par, g, tight, ev, with_changes=recommend and not changes,
                           workers=workers)
    from vramplan.plan._recipe_changes import ranked_recipe_changes
    # each change's saving on the per-GPU peak allocated, on that card's kernels (Evaluator.floor:
    # peak allocated + context, the context the same either side)
    recipe = ranked_recipe_changes(spec, setup, need=ev.floor) if recommend else ()
    return Plan(model=spec, setup=setup, parallel=par, gpu=g, estimate=est, status=status, tight=tight,
                max_batch=max_batch, max_seq=max_seq, grid=grid, changes=changes, minimum=minimum,
                notes=tuple(notes), evaluations=ev.calls, recipe_changes=recipe, allocator_changes=allocator,
                smallest_gpu_bytes=ev.smallest_card(setup) if status == "no" else None)


def _allocator_changes(spec: ModelSpec, setup: TrainSetup, par: Parallel, gpu: Gpu, tight: float, alloc_conf):
    """The documented anti-fragmentation settings, each replayed on this setup (_allocator_changes.py)."""
    from vramplan.plan._allocator_changes import ranked_allocator_changes

    def evaluate(conf: str):
        e = per_gpu(spec, setup, par, gpu=gpu, alloc_conf=conf)
        return e.device_total_bytes, verdict(e.device_total_bytes, gpu.memory_bytes, tight, e.allocator_oom)
    return ranked_allocator_changes(alloc_conf, evaluate)


def _limit(ev: Evaluator, setup: TrainSetup, name: str, cap: int, upper: int, notes: list[str]) -> Limit:
    """Largest `name` that fits, exact at the boundary: found on the fast path, then checked with
    the public API at value and value + 1 (and searched again on it if they ever disagree)."""
    start = getattr(setup, name)

    def search(fits):
        return _largest(lambda v: fits(setup.with_(**{name: v}), cap), start, upper)

    value, capped = search(ev.fits)
    at = lambda v: ev.exact(setup.with_(**{name: v}))  # noqa: E731
    fits = lambda v: ev.exact_fits(setup.with_(**{name: v}), cap)  # noqa: E731
    ok = (value == 0 and not fits(1)) or (value > 0 and fits(value) and (capped or not fits(value + 1)))
    if not ok:
        notes.append(f"the fast path disagreed with estimate() at {name}={value}; searched with estimate() "
                     "instead (report this: the planner's composition of the estimator is out of date)")
        value, capped = search(ev.exact_fits)
    bound = ("the model's context (max_position_embeddings)" if name == "seq" and upper < MAX_SEQ
             else "the sanity bound")
    after = None if capped else setup.with_(**{name: value + 1 if value else 1})
    return Limit(name, value, at(value) if value else None, None if after is None else ev.exact(after), capped, bound,
                 None if after is None else ev.exact_oom(after), None if after is None else ev.smallest_card(after))


def _axis(values, around: int, limit: int, lowest: int, upper: int) -> tuple[int, ...]:
    """Default grid axis: powers of two from `lowest` to twice the largest fitting value, plus the
    requested value; at most 10 entries (the largest kept)."""
    if values is not None:
        return tuple(values)
    top = max(around, limit, lowest) * 2
    out = {around}
    v = lowest
    while v <= min(top, upper):
        out.add(v)
        v *= 2
    return tuple(sorted(out)[-10:])


def _grid(ev: Evaluator, setup: TrainSetup, cap: int, tight: float, batches, seqs,
          max_batch: Limit, max_seq: Limit, workers: int | None = None) -> Grid:
    bs = _axis(batches, setup.batch, max_batch.value, 1, MAX_BATCH)
    ss = _axis(seqs, setup.seq, max_seq.value, 256, MAX_SEQ)
    for label, axis in (("batch", bs), ("seq", ss)):
        if not axis:
            raise UsageError(f"--grid-{label} has no values", hint=f"e.g. --grid-{label} 1,2,4 (or leave it out)")
        if len(axis) > MAX_GRID:
            raise UsageError(f"--grid-{label} has {len(axis)} values (max {MAX_GRID})", hint="give fewer values")
    setups = [setup.with_(batch=b, seq=s) for s in ss for b in bs]

    def cell(i: int) -> Cell:
        one = setups[i]
        floor = ev.floor(one)
        if floor > cap:
            return Cell(one.batch, one.seq, floor, "no", lower_bound=True)
        return Cell(one.batch, one.seq, ev.need(one), ev.status(one, cap, tight))

    cells = ev.spread(cell, len(setups), workers)
    return Grid(bs, ss, tuple(tuple(cells[i:i + len(bs)]) for i in range(0, len(cells), len(bs))))


# --- recommendations ------------------------------------------------------------------------------

@record
class _Candidate:
    """A fixed change (changes set) or a searched one (search names a field to maximize)."""
    key: str                    # one per field family: a combination never sets a field twice
    changes: dict
    cost: float
    text: str
    source: str
    search: str | None = None   # "rank" | "batch" | "seq"


SRC_SDPA = "PyTorch scaled_dot_product_attention docs; transformers attn_implementation='sdpa'"
SRC_PAGED = "bitsandbytes paged optimizers (NVIDIA unified memory); QLoRA paper sec. 3"
SRC_8BIT = "Dettmers et al. 2022, 8-bit Optimizers via Block-wise Quantization"
SRC_CKPT = ("Chen et al. 2016, Training Deep Nets with Sublinear Memory Cost; HF docs 'Methods and tools for "
            "efficient training on a single GPU' (~20% slower)")
SRC_ACCUM = "HF docs: gradient accumulation keeps the effective batch with smaller micro-batches"
SRC_RANK = "Hu et al. 2021 (LoRA), sec. 7.2: small ranks often suffice"
SRC_TARGETS = "Dettmers et al. 2023 (QLoRA), sec. 4: LoRA on all linear layers is needed to match full fine-tuning"
SRC_QLORA = "Dettmers et al. 2023 (QLoRA), sec. 5: NF4 + double quantization matches 16-bit LoRA"
SRC_DQ = "Dettmers et al. 2023 (QLoRA), sec. 3: double quantization saves ~0.37 bits/param"
SRC_SEQ = "truncating or packing to a shorter context changes which tokens are trained on"
SRC_KBIT = "peft prepare_model_for_kbit_training casts non-quantized weights to fp32 for stability"
SRC_DROPOUT = "peft LoRA dropout keeps an fp32 dropout output of every adapted input for backward"


def _candidates(spec: ModelSpec, setup: TrainSetup) -> list[_Candidate]:
    out: list[_Candidate] = []
    add = lambda *a, **k: out.append(_Candidate(*a, **k))  # noqa: E731
    if setup.attn == "eager":
        if "sdpa" in spec.arch.attention:
            add("attn", {"attn": "sdpa"}, 0.0, "none: SDPA is usually faster than eager attention", SRC_SDPA)
    if setup.quantized and setup.quant != "int8" and not setup.double_quant:
        add("double_quant", {"double_quant": True}, 0.02, "negligible: slightly more dequantization work", SRC_DQ)
    # torch AdamW's foreach and fused variants keep the same states as "adamw"
    opt = "adamw" if setup.optimizer in ("adamw_foreach", "adamw_fused") else setup.optimizer
    paged_text = "no slowdown until the GPU runs short; then optimizer state pages over PCIe"
    eight_text = "8-bit optimizer states: same accuracy as 32-bit Adam in the paper's benchmarks"
    if opt in ("adamw", "adamw8bit"):
        add("optimizer", {"optimizer": "paged_" + opt}, 0.05, paged_text, SRC_PAGED)
    if opt in ("adamw", "paged_adamw"):
        add("optimizer", {"optimizer": opt.replace("adamw", "adamw8bit")}, 0.05, eight_text, SRC_8BIT)
    if opt == "adamw":
        add("optimizer", {"optimizer": "paged_adamw8bit"}, 0.08, f"{eight_text}; {paged_text}",
            f"{SRC_8BIT}; {SRC_PAGED}")
    from vramplan.plan._recipe_changes import recipe_candidates
    for rc in recipe_candidates(spec, setup):    # the loop's own changes (issue #9)
        if rc.key != "optimizer" or rc.changes["optimizer"] == "adamw_fused":
            if rc.key != "kbit":                  # prepare_kbit is offered below
                add(rc.key, rc.changes, rc.cost, rc.text, rc.source)
    if setup.lora_dropout and setup.uses_adapters:
        add("dropout", {"lora_dropout": 0.0}, 0.05, "no LoRA dropout regularization", SRC_DROPOUT)
    if setup.prepare_kbit:
        add("kbit", {"prepare_kbit": False}, 0.05, "embeddings, norms and lm_head stay 16-bit", SRC_KBIT)
    if setup.dtype == "fp32":
        add("dtype", {"dtype": "bf16"}, 0.10, "bf16 compute (Ampere or newer)", "bf16 mixed-precision training")
    if setup.quantized and setup.quant == "int8":
        add("quant", {"quant": "nf4"}, 0.15, "4-bit NF4 base weights instead of int8", SRC_QLORA)
    if not setup.grad_ckpt:
        add("ckpt", {"grad_ckpt": True}, 0.30, "~+20-33% step time: layers are recomputed in backward", SRC_CKPT)
    if setup.method == "lora":
        add("method", {"method": "qlora", "quant": "nf4", "double_quant": True}, 0.35,
            "4-bit base weights: dequantization adds step time", SRC_QLORA)
    if setup.method == "full":
        add("method", {"method": "qlora", "quant": "nf4", "double_quant": True}, 0.80,
            "a different method: 4-bit base + LoRA adapters instead of all weights", SRC_QLORA)
        add("method", {"method": "lora"}, 0.70, "a different method: LoRA adapters instead of all weights",
            SRC_RANK)
    if setup.uses_adapters:
        leaves = {l.leaf for l in spec.layer_linears}
        if setup.targets == (ALL_LINEAR,) or len(setup.targets) > 4:
            attn = ("q_proj", "k_proj", "v_proj", "o_proj")
            if set(attn) <= leaves:
                add("targets", {"targets": attn}, 0.40, "adapters on attention projections only", SRC_TARGETS)
        if set(setup.targets) != {"q_proj", "v_proj"} and {"q_proj", "v_proj"} <= leaves:
            add("targets", {"targets": ("q_proj", "v_proj")}, 0.50, "adapters on q_proj, v_proj only", SRC_TARGETS)
        if setup.rank > 1:
            add("rank", {}, 0.15, "fewer trainable parameters", SRC_RANK, search="rank")
    if setup.batch > 1:
        add("batch", {}, 0.10, "lower GPU utilization", SRC_ACCUM, search="batch")
    if setup.seq > 1:
        add("seq", {}, 0.30, "examples longer than the new length are truncated or split", SRC_SEQ, search="seq")
    return out


def _apply(ev: Evaluator, setup: TrainSetup, cands: tuple[_Candidate, ...], cap: int):
    """Apply fixed changes, then maximize searched fields (rank, then batch, then seq) so the
    result fits. Returns (new setup, changes, cost, texts) or None, also where the estimate
    refuses a changed setup (a tied embedding trained in full under the smaller micro-batch's
    gradient accumulation, a chunked loss on a model without it): not a candidate."""
    try:
        return _applied(ev, setup, cands, cap)
    except VramplanError:
        return None


def _applied(ev: Evaluator, setup: TrainSetup, cands: tuple[_Candidate, ...], cap: int):
    changes: dict = {}
    for c in cands:
        changes.update(c.changes)
    try:
        new = setup.with_(**changes)
    except Exception:  # noqa: BLE001 - an invalid combination is simply not a candidate
        return None
    cost = sum(c.cost for c in cands if not c.search)
    texts = [c.text for c in cands if not c.search]
    order = {"rank": 0, "batch": 1, "seq": 2}
    for c in sorted((c for c in cands if c.search), key=lambda c: order[c.search]):
        if ev.fits(new, cap):
            return None  # fits without this search: the smaller combination dominates
        name = c.search
        old = getattr(setup, name)
        if name == "rank":
            # LoRA ranks people use: halve until it fits (r/2, r/4, ... >= 1).
            value = 0
            r = old // 2
            while r >= 1:
                if ev.fits(new.with_(rank=r), cap):
                    value = r
                    break
                r //= 2
            if not value:
                return None
            cost += c.cost * math.log2(old / value)
            texts.append(c.text)
            new = new.with_(rank=value)
            changes[name] = value
        else:
            # a smaller micro-batch keeps the effective batch with gradient accumulation, modelled on
            # one GPU and under DDP (its second micro-step runs beside every .grad: TrainSetup.grad_accum;
            # sharding.accumulation_modelled); a sharding engine's own accumulation is not
            accumulates = accumulation_modelled(ev.parallel)

            def variant(v: int) -> TrainSetup:
                if name == "batch" and accumulates:
                    return new.with_(batch=v, grad_accum=setup.grad_accum * -(-old // v))
                return new.with_(**{name: v})
            value, _ = _largest(lambda v: ev.fits(variant(v), cap), max(1, old // 2), old - 1)
            if name == "batch":
                # accumulation keeps the effective batch only where the micro-batch divides it: the
                # largest divisor that fits (16 -> 8 x 2, not 12 x 2 = 24)
                value = next((d for d in range(value, 0, -1) if old % d == 0 and ev.fits(variant(d), cap)), 0)
            if not value:
                return None
            new = variant(value)
            changes[name] = value
            if name == "batch":
                accum = -(-old // value)
                cost += c.cost + 0.03 * math.log2(old / value)
                texts.append(f"gradient accumulation x{accum} keeps the effective batch; {c.text}")
                if accumulates:
                    changes["grad_accum"] = new.grad_accum
            else:
                cost += c.cost * (1 + math.log2(old / value))
                texts.append(c.text.replace("the new length", f"{value} tokens"))
    if not ev.fits(new, cap):
        return None
    return new, changes, cost, texts


def _prune(ev: Evaluator, setup: TrainSetup, combo: tuple, cap: int) -> tuple:
    """Drop members of a stacked combination that are not needed (the costliest first) as long
    as the rest still fits at a lower cost."""
    best = _apply(ev, setup, combo, cap)
    if best is None:
        return combo
    for member in sorted((c for c in combo if not c.search), key=lambda c: -c.cost):
        rest = tuple(c for c in combo if c is not member)
        res = _apply(ev, setup, rest, cap) if rest else None
        if res is not None and res[2] <= best[2]:
            combo, best = rest, res
    return combo


def _describe(setup: TrainSetup, changes: dict) -> str:
    """The change as CLI flags: `--grad-ckpt, --rank 8 (was 64)`."""
    parts = []
    for k, v in changes.items():
        old = getattr(setup, k)
        flag = k.replace("_", "-")
        if v == old:
            continue
        if isinstance(v, bool):
            parts.append(f"--{flag}" if v else f"--no-{flag}")
        else:
            show = lambda x: ",".join(x) if isinstance(x, tuple) else x  # noqa: E731
            parts.append(f"--{flag} {show(v)} (was {show(old)})")
    return ", ".join(parts)


def _recommend(ev: Evaluator, spec: ModelSpec, setup: TrainSetup, gpu: Gpu, tight: float,
               workers: int | None = None) -> tuple[Change, ...]:
    """The cheapest changes that make `setup` fit: each candidate alone, pairs of those that do not
    fit alone, then stacks of the cheapest fixed changes (pruned), with and without the searched
    ones. The combinations of each round are evaluated over `workers` (Evaluator.spread), then kept
    in the serial order."""
    cap = gpu.memory_bytes
    cands = _candidates(spec, setup)
    found: dict[TrainSetup, Change] = {}

    def outcome(combo: tuple) -> tuple | None:
        """_apply's result for `combo` with its need and fit through the public API, or None"""
        res = _apply(ev, setup, combo, cap)
        if res is None:
            return None
        return res, ev.exact(res[0]), ev.exact_fits(res[0], cap)

    def keep(combo: tuple, known: tuple | None) -> bool:
        if known is None:
            return False
        (new, changes, cost, texts), need, fits = known
        if new in found and found[new].cost <= cost:
            return True
        if not fits:
            return False
        found[new] = Change(_describe(setup, changes), changes, new, need, cap - need,
                            status_of(need, cap, tight), round(cost, 3), "; ".join(texts),
                            tuple(dict.fromkeys(c.source for c in combo)))
        return True

    def outcomes(combos: list) -> list:
        return ev.spread(lambda i: outcome(combos[i]), len(combos), workers, min_items=SLOW_ITEMS)

    singles = [(c,) for c in cands]
    alone = [i for i, (combo, known) in enumerate(zip(singles, outcomes(singles))) if keep(combo, known)]
    if len(found) < 3:
        # Pairs of changes that do not fit alone (a pair holding one that does is dominated).
        pairs = [(a, b) for (i, a), (j, b) in combinations(enumerate(cands), 2)
                 if a.key != b.key and i not in alone and j not in alone]
        for combo, known in zip(pairs, outcomes(pairs)):
            keep(combo, known)
    # Stacks: the cheapest fixed changes accumulated (each prefix), alone and with the searches.
    fixed, seen = [], set()
    for c in sorted(cands, key=lambda c: c.cost):
        if not c.search and c.key not in seen and c.key not in ("method", "targets"):
            fixed.append(c)
            seen.add(c.key)
    searched = [c for c in cands if c.search]
    for k in range(2, len(fixed) + 1):
        stack = _prune(ev, setup, tuple(fixed[:k]), cap)
        if keep(stack, outcome(stack)):
            break
        extras = [tuple(fixed[:k]) + extra for extra in (*[(x,) for x in searched], tuple(searched))]

        def pruned(i: int) -> tuple:
            combo = _prune(ev, setup, extras[i], cap)
            return combo, outcome(combo)
        for combo, known in ev.spread(pruned, len(extras), workers, min_items=SLOW_ITEMS):
            keep(combo, known)
    ranked = sorted(found.values(), key=lambda c: (c.cost, c.need_bytes))
    return tuple(ranked[:MAX_CHANGES])


# --- hardware answers -------------------------------------------------------------------------------

def _holding_gpu(spec: ModelSpec, setup: TrainSetup, single_ev: Evaluator, alloc_conf) -> Gpu | None:
    """The smallest catalog GPU `setup` runs on alone, as `estimate --gpu CARD` judges it there:
    the cards from the smallest memory it runs on with the planned card's kernels up
    (Evaluator.smallest_card: a card short of the device total releases its cache first), each
    estimated on its own card (its kernels, its CUDA context, the replay against it) until one
    does not say "no"; a card that cannot run the setup at all (bf16 below sm80) is passed over."""
    least = single_ev.smallest_card(setup) or single_ev.floor(setup)   # floor: allocated + context
    for card in sorted(catalog(), key=lambda g: g.memory_bytes):
        if card.memory_bytes < least:
            continue
        try:
            est = estimate(spec, setup, gpu=card, alloc_conf=alloc_conf, smallest=False)
        except VramplanError:
            continue
        if est.status != "no":
            return card
    return None


def _status_on_card(est, cap: int, tight: float) -> str:
    """core/_verdict.py on an estimate made against the card: its device total and allocator OOM."""
    return verdict(est.device_total_bytes, cap, tight, est.allocator_oom)


def _minimum(spec: ModelSpec, setup: TrainSetup, par: Parallel, gpu: Gpu, tight: float,
             ev: Evaluator, with_changes: bool = True, workers: int | None = None) -> Minimum:
    """The fewest GPUs of this kind each engine needs, and where none does, the setup changes that
    fit once sharded; the engines' searches and those changes' are spread over `workers`."""
    cap = gpu.memory_bytes
    single_ev = ev if par.strategy == "single" else Evaluator(spec, Parallel(), gpu)
    single = single_ev.need(setup)
    holding = _holding_gpu(spec, setup, single_ev, ev.alloc_conf)
    fitting = [holding] if holding else []
    options = []
    # gradient accumulation is modelled on one GPU and under DDP (plan/_sharding.py accumulation_modelled),
    # whose replicas need no less than one GPU: no sharding engine is tried
    engines = () if setup.accumulates else MIN_ENGINES

    def engine(i: int) -> list:
        """(Parallel, its estimate or None) per GPU count of engine i, up to the first that fits: a
        candidate whose allocated bytes alone pass the card (Evaluator.floor) is not an option and
        needs more than any option, so its replay waits until no option is found, when the least
        need of all is reported"""
        strategy, offload = engines[i]
        out = []
        for n in MIN_GPU_COUNTS:
            p = Parallel(n, strategy, offload)
            if n == 1 and (offload == "none" or (strategy in FSDP and not one_gpu_fsdp_modelled(setup, p))):
                continue
            candidate = Evaluator(spec, p, gpu)
            if candidate.floor(setup) > cap:
                out.append((p, None))
                continue
            out.append((p, candidate.estimate(setup, gpu)))   # against the card, as `plan --gpus N` plans it
            if _status_on_card(out[-1][1], cap, tight) != "no":
                break
        return out
    tried = [t for per_engine in spread(engine, len(engines), workers, min_items=SLOW_ITEMS) for t in per_engine]
    for p, est in tried:
        status = None if est is None else _status_on_card(est, cap, tight)
        if status not in (None, "no"):
            options.append(Option(p.gpus, p.strategy, p.offload, est.device_total_bytes, status, est.cpu_bytes))
    if not options:   # the least need of all: the candidates passed over for their floor, estimated now
        missing = [i for i, (_p, est) in enumerate(tried) if est is None]
        filled = spread(lambda j: Evaluator(spec, tried[missing[j]][0], gpu).estimate(setup, gpu), len(missing),
                        workers, min_items=SLOW_ITEMS)
        for i, est in zip(missing, filled):
            tried[i] = (tried[i][0], est)
    floor, floor_label, floor_est = None, "", None
    for p, est in tried:
        if est is None:
            continue
        if floor is None or est.device_total_bytes < floor:
            floor, floor_label, floor_est = est.device_total_bytes, p.label, est
    options.sort(key=lambda o: (o.gpus, o.offload != "none", o.need_bytes))
    gib = lambda n: f"{n / 2**30:,.2f} GiB"  # noqa: E731
    if setup.accumulates:
        msg = (f"{setup.batch} x {setup.seq} tokens with --grad-accum {setup.grad_accum} needs {gib(single)} on one "
               f"GPU, more than {gpu.name} ({gib(cap)}); gradient accumulation is modelled on one GPU and under DDP, "
               "which holds as much per GPU, so no sharding engine was tried (without --grad-accum `plan` tries "
               "FSDP and ZeRO-3)")
        floor, floor_label = single, Parallel().label
    elif options:
        best = options[0]
        msg = (f"{setup.batch} x {setup.seq} tokens needs {gib(single)} on one GPU; on {gpu.name} it takes "
               f"{best.label} ({gib(best.need_bytes)} per GPU)")
    else:
        per_rank = floor_est.components["activations"] + floor_est.components["logits_loss"]
        msg = (f"the setup as asked ({setup.batch} x {setup.seq} tokens per GPU) does not fit on {gpu.name} "
               f"({gib(cap)}) with up to {MIN_GPU_COUNTS[-1]} GPUs under FSDP or ZeRO-3, with or without CPU "
               f"offload: the least per-GPU need found is {gib(floor)} ({floor_label}), of which "
               f"{gib(per_rank)} is one micro-batch's activations and logits, which more GPUs do not shrink")
    if fitting:
        msg += f"; the smallest catalog GPU that holds it alone is {fitting[0].name}"
    else:
        msg += "; no catalog GPU holds it alone"
    changes_parallel, changes = None, ()
    if not options and with_changes and not setup.accumulates:
        # No GPU count holds this micro-batch: which setup changes fit once the model is sharded?
        # The engine whose cheapest change costs least wins (fewer GPUs on a tie).
        sharded = [Parallel(n, "fsdp", offload) for n in (2, 4, 8) for offload in ("none", "cpu")]
        found_each = spread(lambda i: _recommend(Evaluator(spec, sharded[i], gpu), spec, setup, gpu, tight),
                            len(sharded), workers, min_items=SLOW_ITEMS)
        for p, found in zip(sharded, found_each):
            if found and (not changes or found[0].cost < changes[0].cost):
                changes_parallel, changes = p, found
        if changes:
            msg += f"; with {changes_parallel.label} these setup changes fit"
    return Minimum(single, fitting[0].name if fitting else None, tuple(options), floor, floor_label, msg,
                   changes_parallel, changes)


def _survey(spec: ModelSpec, setup: TrainSetup, card_setup, par: Parallel, tight: float, notes: list[str],
            alloc_conf=None, workers: int | None = None) -> Plan:
    """Every catalog GPU, each row what `plan` says on that card alone: the setup planned there
    (`card_setup`: its own default dtype where none was given), its CUDA kernels and the allocator
    settings, for the need, the verdict and the largest batch and sequence (`_limit`'s search on
    the fast path, without its re-check through estimate(): a disagreement there is a planner bug
    the property tests catch). A card the setup cannot run on is a row with its reason; where no
    card can, the first reason is the answer. One card per worker process."""
    cards = sorted(catalog(), key=lambda g: g.memory_bytes)

    def card(i: int) -> tuple[GpuRow, int, VramplanError | None]:
        """(card i's row, the setups its evaluator estimated, the error that made it a row without figures)"""
        g, cap = cards[i], cards[i].memory_bytes
        try:
            s = card_setup(g)
            est = per_gpu(spec, s, par, gpu=g, alloc_conf=alloc_conf)
        except VramplanError as exc:
            return GpuRow(g, None, None, None, None, None, error=str(exc)), 0, exc
        ev = Evaluator(spec, par, g, alloc_conf)
        need = est.device_total_bytes
        mb = _largest(lambda v: ev.fits(s.with_(batch=v), cap), s.batch, MAX_BATCH)[0]
        ms = _largest(lambda v: ev.fits(s.with_(seq=v), cap), s.seq, seq_bound(spec))[0]
        return GpuRow(g, verdict(need, cap, tight, est.allocator_oom), need, cap - need, mb, ms), ev.calls, None

    # a worker process (plan/_workers.py) returns the row and its count; an error only as the row's text
    done = spread(lambda i: card(i)[:2], len(cards), workers)
    rows = [row for row, _calls in done]
    ran = [i for i, r in enumerate(rows) if r.error is None]
    if not ran:
        raise card(0)[2]
    est = per_gpu(spec, setup, par, alloc_conf=alloc_conf)   # the setup as given, on no particular card
    minimum, calls = None, sum(c for _row, c in done)
    if all(r.status in (None, "no") for r in rows):
        largest = cards[ran[-1]]
        ev = Evaluator(spec, par, largest, alloc_conf)
        minimum = _minimum(spec, card_setup(largest), par, largest, tight, ev, workers=workers)
        calls += ev.calls
    return Plan(model=spec, setup=setup, parallel=par, gpu=None, estimate=est, status=None, tight=tight,
                max_batch=None, max_seq=None, grid=None, changes=(), minimum=minimum, survey=tuple(rows),
                notes=tuple(notes), evaluations=calls)
