"""simulate: the real transformers + peft + bitsandbytes training step, run on the meta device
under an allocation tracker.

    from vramplan.simulate import run
    trace = run(spec, setup)          # -> Trace; trace.peak_allocated_bytes, trace.components, ...

Modules: build.py (model, quantization, adapters, optimizer as a user script builds them),
tracker.py (the TorchDispatchMode allocation tracker), oplog.py (the tracker plus an op log),
kernels.py (meta stand-ins for CUDA kernels and data-dependent ops), step.py (the step,
attribution, Trace), layers.py (the identical-layers shortcut). torch, transformers, peft and
bitsandbytes are imported only when `run` is called.
"""
from __future__ import annotations

import sys as _sys

from . import step as _step
from .step import Trace, run

# Deprecated module name: step.py was run.py, whose name the function `run` shadowed. Code that
# still does `from vramplan.simulate.run import StepContext` (vramplan.profile) keeps working.
_sys.modules.setdefault(__name__ + ".run", _step)

__all__ = ["run", "Trace"]
