"""profile: real training steps with memory measured (torch.cuda counters, NVML), stored as
records next to the estimate for the same setup, and compared.

    from vramplan.profile import profile, ProfileOptions
    record, path = profile("meta-llama/Llama-2-7b-hf", TrainSetup(seq=2048),
                           ProfileOptions(device="cuda", random_weights=True), out="profiles")

Modules: session.py (the parent: child launch, NVML sampling, the record), runner.py (the
training run in a child process), materialize.py (random weights tensor by tensor on the
device), meters.py (torch.cuda / CPU allocation counters), nvml.py (the sampler thread),
record.py + store.py (the record and its atomic files), compare.py, plot.py, render.py.
Importing this package imports nothing heavy; torch and friends load in the child process.
"""
from __future__ import annotations

from vramplan.core.method_package import make_callable
from vramplan.profile.record import Record
from vramplan.profile.session import ProfileOptions, profile

__all__ = ["ProfileOptions", "Record", "profile"]

make_callable(__name__, profile)  # vramplan.profile(...) calls profile()
