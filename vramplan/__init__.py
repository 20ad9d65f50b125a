"""vramplan: peak GPU memory of QLoRA / LoRA / full fine-tuning, estimated, simulated, profiled.

The estimate path is pure Python: importing vramplan never imports torch, transformers, peft,
bitsandbytes, pandas or numpy.
"""
from .components import Component
from .errors import DependencyError, GpuError, ModelError, UsageError, VramplanError
from .estimator import Estimate, estimate
from .gpus import Gpu, resolve_gpu
from .models import ModelSpec, resolve as resolve_model
from .setup import TrainSetup
from .units import format_bytes, parse_size

__all__ = ["Component", "DependencyError", "Estimate", "Gpu", "GpuError", "ModelError", "ModelSpec",
           "Parallel", "TrainSetup", "UsageError", "VramplanError", "estimate", "format_bytes", "parse_size",
           "plan", "replay_allocations", "resolve_gpu", "resolve_model", "sweep"]
__version__ = "0.1.0"

# Loaded on first use, so `import vramplan` stays light (sweep imports pandas only when called).
_LAZY = {"plan": ("planner", "plan"), "sweep": ("sweep", "sweep"), "Parallel": ("sharding", "Parallel"),
         "replay_allocations": ("cuda.allocator", "replay_allocations")}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(f".{module}", __name__), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
