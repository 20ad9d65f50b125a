"""simulate: the real transformers + peft + bitsandbytes training step, run on the meta device
under an allocation tracker.

    from vramplan import simulate
    trace = simulate(spec, setup)     # -> Trace; trace.peak_allocated_bytes, trace.components, ...

Modules: build.py (model, quantization, adapters, optimizer as a user script builds them),
tracker.py (the TorchDispatchMode allocation tracker), oplog.py (the tracker plus an op log),
kernels.py (meta stand-ins for CUDA kernels and data-dependent ops), attribution.py (phase,
module and component of each allocation), step.py (the full step and its Trace), shortcut.py (the
identical-layers shortcut), driver.py (chooses between them), compare.py (side by side with the
estimate). torch, transformers, peft and bitsandbytes are imported only when a step runs.
"""
from vramplan.core.method_package import make_callable
from vramplan.simulate.driver import simulate
from vramplan.simulate.step import Trace

__all__ = ["Trace", "simulate"]

make_callable(__name__, simulate)  # vramplan.simulate(...) calls simulate()
