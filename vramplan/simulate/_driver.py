"""simulate(): the identical-layers shortcut where it applies, the full trace otherwise."""
from __future__ import annotations

import dataclasses
import time

from vramplan.core._errors import UsageError
from vramplan.core._gpus import resolve_gpu
from vramplan.cuda._arch import check_dtype, default_dtype, target_arch
from vramplan.core._setup import TrainSetup, library_setup
from vramplan.simulate import _shortcut as shortcut
from vramplan.simulate._build import refuse_4bit_experts, simulation_spec
from vramplan.simulate._step import Progress, Simulation, Trace, collector_paused, require_packages


def simulate(spec, setup: TrainSetup | None = None, device: str = "meta", exact: bool = False,
        progress: Progress | None = None, *, gpu=None, arch=None,
        alloc_conf=None, **flags) -> Trace:
    """Simulate one steady-state training step of `spec` under `setup` on `device`. `spec` is a
    core.models.ModelSpec, a build.ConfigSpec (a type only transformers knows), or a model name.

    device "meta" emulates a CUDA GPU (no memory, no compute: shapes only): the kernels of `gpu`'s
    architecture (a catalog name or core.gpus.Gpu), of `arch` ("sm75") with a bare size or no GPU,
    else of the H100 estimate assumes too (cuda/_arch.py target_arch); bf16 on a GPU without it is
    refused as estimate refuses it. "cpu" runs the same step for real on small models (the check
    that the meta emulation is faithful).

    On meta, unless `exact`, a model deeper than layers.TRACED_LAYERS decoder layers is traced at
    that depth and the step of the full depth is rebuilt from it (_shortcut.py): the same result,
    byte for byte, in a fraction of the time and memory. It falls back to the full trace by
    itself when the traced layers turn out not to be identical.

    progress(stage, done, total) is called as decoder layers run (forward and backward of the
    warm-up and of the measured step). The cyclic garbage collector is paused meanwhile
    (_step.collector_paused)."""
    if isinstance(spec, str):      # a model name: the registry's spec, or one transformers builds
        spec = simulation_spec(spec)
    elif not hasattr(spec, "model_type"):
        raise UsageError(f"simulate takes a model name, a config path or a ModelSpec, got {type(spec).__name__}",
                         hint="e.g. simulate('meta-llama/Llama-2-7b-hf', batch=4)")
    if device not in ("meta", "cpu"):
        raise UsageError(f"simulate runs on 'meta' (or 'cpu' for small real runs), not {device!r}",
                         hint="use `vramplan profile` to measure on a GPU")
    gpu = resolve_gpu(gpu) if gpu is not None else None
    cuda_arch = target_arch(gpu, arch)
    # the keywords and defaults estimate() takes (its dtype for the GPU, the model's attention)
    default_attn = "sdpa"           # transformers' pick for a model the registry does not know
    if setup is None and "attn" not in flags and getattr(spec, "analytic", True):
        default_attn = spec.arch.default_attention
    setup = library_setup(setup, flags, default_dtype(cuda_arch), default_attn)
    refuse_4bit_experts(spec, setup)
    check_dtype(cuda_arch, setup.dtype, setup)
    with collector_paused():
        return _run(spec, setup, device, exact, progress, cuda_arch, alloc_conf, gpu)


def _run(spec, setup: TrainSetup, device: str, exact: bool, progress, cuda_arch, alloc_conf, gpu=None) -> Trace:
    t0 = time.perf_counter()
    require_packages(setup)
    notes: list[str] = []
    if device == "meta" and not exact:
        if shortcut.applies(spec):
            trace, why = shortcut.run_shortcut(spec, setup, progress=progress, arch=cuda_arch,
                                                   alloc_conf=alloc_conf, gpu=gpu)
            if trace is not None:
                return _with_seconds(trace, time.perf_counter() - t0)
            notes.append(f"identical-layers shortcut not used ({why}): every layer traced")
    with Simulation(spec, setup, device, progress=progress, arch=cuda_arch) as sim:
        sim.warm_up()
        tracker = sim.measure()
        trace = sim.trace(tracker, time.perf_counter() - t0)
        trace = shortcut.with_reserved(trace, shortcut.stream_of(tracker), alloc_conf, gpu)
    if notes:
        trace = dataclasses.replace(trace, notes=trace.notes + tuple(notes))
    return trace


def _with_seconds(trace: Trace, seconds: float) -> Trace:
    return dataclasses.replace(trace, seconds=round(seconds, 3))


