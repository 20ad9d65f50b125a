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
           "TrainSetup", "UsageError", "VramplanError", "estimate", "format_bytes", "parse_size",
           "resolve_gpu", "resolve_model"]
__version__ = "0.1.0"
