"""plan: what fits (_planner.py), per-GPU memory under DDP / FSDP / ZeRO (_sharding.py), and grids
of estimates (_sweep.py; pandas is imported only when a sweep runs)."""
from vramplan.core._method_package import make_callable
from vramplan.plan._planner import plan
from vramplan.plan._sharding import Parallel
from vramplan.plan._sweep import sweep

__all__ = ["Parallel", "plan", "sweep"]

make_callable(__name__, plan)  # vramplan.plan(...) calls plan()
