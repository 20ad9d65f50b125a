"""plan: what fits (planner.py), per-GPU memory under DDP / FSDP / ZeRO (sharding.py), and grids
of estimates (sweep.py; pandas is imported only when a sweep runs)."""
from vramplan.core.method_package import make_callable
from vramplan.plan.planner import plan
from vramplan.plan.sharding import Parallel
from vramplan.plan.sweep import sweep

__all__ = ["Parallel", "plan", "sweep"]

make_callable(__name__, plan)  # vramplan.plan(...) calls plan()
