"""The one fit verdict every command uses (estimate, plan, sweep, simulate, the MemoryCallback).

A setup's device total is the CUDA context plus the caching allocator's peak reserved memory
(docs/allocator.md#verdict). Against a GPU of `capacity` bytes:
- "no":    the total exceeds the capacity, or the allocator model ran out of memory below it
           (fragmentation: no cached block fits and no new segment can be had);
- "tight": it fits with less headroom than `tight` (a fraction of the capacity) leaves;
- "fits":  otherwise.
The default band, 5% of the GPU, is what the model does not capture (docs/allocator.md#verdict):
the CUDA context varies by up to 380 MB between lazy and eager module loading (pytorch PR #86509:
287 MB vs 667 MB; 0.5-1.6% of a 24-80 GB GPU), the analytic estimate is held to 3% of the
simulated step (tests/test_agreement.py), and the small-pool lumping of the estimate's replay
drops up to ~0.5%.
"""
from __future__ import annotations

TIGHT = 0.05
STATUSES = ("fits", "tight", "no")


def verdict(need: int, capacity: int, tight: float = TIGHT, oom: dict | None = None) -> str:
    """fits / tight / no for a device total of `need` bytes on a GPU of `capacity` bytes."""
    if need > capacity or oom:
        return "no"
    return "tight" if capacity - need < tight * capacity else "fits"
