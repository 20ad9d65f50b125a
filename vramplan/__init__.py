"""vramplan: peak GPU memory of QLoRA / LoRA / full fine-tuning, estimated, simulated, profiled.

    vramplan/core/      the shared vocabulary: setup, models + catalog, architectures, GPUs, units,
                        errors, memory components
    vramplan/cuda/      every CUDA fact (kernel choices, the caching allocator, the CUDA context)
    vramplan/estimate/  method 1: the analytic estimate, pure Python
    vramplan/simulate/  method 2: the real step on the meta device (torch on use)
    vramplan/profile/   method 3: real steps measured on a GPU (torch in a child process)
    vramplan/plan/      what fits: planner, multi-GPU sharding, sweeps
    vramplan/render/    tables and plots
    vramplan/cli/       the command line, one module per command

Importing vramplan never imports torch, transformers, peft, bitsandbytes, pandas or numpy.
"""
from vramplan.core._components import Component
from vramplan.core._errors import DependencyError, GpuError, ModelError, UsageError, VramplanError
from vramplan.core._gpus import Gpu, resolve_gpu
from vramplan.core._models import ModelSpec, resolve as resolve_model
from vramplan.core._setup import TrainSetup
from vramplan.core._units import format_bytes, parse_size
from vramplan.estimate import Estimate, estimate
from vramplan.version import __version__

__all__ = ["AllocatorReplay", "Component", "DependencyError", "Estimate", "Gpu", "GpuError", "ModelError", "ModelSpec",
           "Parallel", "ProfileOptions", "TrainSetup", "Trace", "UsageError", "VramplanError", "estimate",
           "format_bytes", "parse_size", "plan", "profile", "replay_allocations", "resolve_gpu", "resolve_model", "simulate", "sweep"]


def __getattr__(name: str):
    """simulate, profile, plan and the allocator model load on first use, so that `import vramplan` stays light; each of
    these packages is callable as its function (core/_method_package.py)."""
    if name in ("simulate", "Trace"):
        import vramplan.simulate
        return vramplan.simulate if name == "simulate" else vramplan.simulate.Trace
    if name in ("profile", "ProfileOptions"):
        import vramplan.profile
        return vramplan.profile if name == "profile" else vramplan.profile.ProfileOptions
    if name in ("plan", "sweep", "Parallel"):
        import vramplan.plan
        return vramplan.plan if name == "plan" else getattr(vramplan.plan, name)
    if name in ("replay_allocations", "AllocatorReplay"):
        from vramplan.cuda import _replay
        return getattr(_replay, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
