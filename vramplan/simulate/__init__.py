"""simulate: the real transformers + peft + bitsandbytes training step, run on the meta device
under an allocation tracker.

    from vramplan.simulate import run
    trace = run(spec, setup)          # -> Trace; trace.peak_allocated_bytes, trace.components, ...

Modules: build.py (model, quantization, adapters, optimizer as a user script builds them),
tracker.py (the TorchDispatchMode allocation tracker), kernels.py (meta stand-ins for CUDA
kernels and data-dependent ops), run.py (the step, attribution, Trace). torch, transformers, peft
and bitsandbytes are imported only when `run` is called.
"""
from __future__ import annotations

from .run import Trace, run

__all__ = ["run", "Trace"]
