"""profile: real training steps with memory measured (torch.cuda counters, NVML), stored as
records next to the estimate for the same setup, and compared.

    from vramplan.profile import profile, ProfileOptions
    record, path = profile("meta-llama/Llama-2-7b-hf", TrainSetup(seq=2048),
                           ProfileOptions(device="cuda", random_weights=True), out="profiles")

Modules: _session.py (the parent: child launch, NVML sampling, the record), _runner.py (the
training run in a child process), _materialize.py (random weights tensor by tensor on the
device), _meters.py (torch.cuda / CPU allocation counters), _nvml.py (the sampler thread),
_record.py + _store.py (the record and its atomic files), _compare.py (record vs estimate).
Its tables and plots live in vramplan/render/.
Importing this package imports nothing heavy; torch and friends load in the child process.
"""
from __future__ import annotations

from vramplan.core._method_package import make_callable
from vramplan.profile._record import Record
from vramplan.profile._session import ProfileOptions, profile

__all__ = ["ProfileOptions", "Record", "profile"]

make_callable(__name__, profile)  # vramplan.profile(...) calls profile()
