"""simulate: the real transformers + peft + bitsandbytes training step, run on the meta device
under an allocation tracker.

    from vramplan import simulate
    trace = simulate(spec, setup)     # -> Trace; trace.peak_allocated_bytes, trace.components, ...

Modules: _build.py (model, quantization, adapters, optimizer as a user script builds them),
_tracker.py (the TorchDispatchMode allocation tracker), _oplog.py (the tracker plus an op log),
_kernels.py (meta stand-ins for CUDA kernels and data-dependent ops), _attribution.py (phase,
module and component of each allocation), _step.py (the full step and its Trace), _shortcut.py (the
identical-layers shortcut), _driver.py (chooses between them), _compare.py (side by side with the
estimate). torch, transformers, peft and bitsandbytes are imported only when a step runs.
"""
from vramplan.core._method_package import make_callable
from vramplan.simulate._driver import simulate
from vramplan.simulate._step import Trace

__all__ = ["Trace", "simulate"]

make_callable(__name__, simulate)  # vramplan.simulate(...) calls simulate()
