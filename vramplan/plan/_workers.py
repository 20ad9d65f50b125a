"""Independent evaluations spread over worker processes forked from the planner.

Why: a grid cell that may fit, or a row of a sweep, is one exact replay of two training steps
through the allocator model (docs/allocator.md#one-pass-replay), 16 to 50 ms each in pure Python,
and a 20 x 20 grid holds about 100 of them; a ranked change or a GPU count of the minimum
hardware is a search of such replays. They do not depend on each other, so each worker takes the
next one while the others work (plan/_planner.py Evaluator.spread keeps what the workers
evaluated in the planner's caches).

Why fork: a forked worker starts in milliseconds with the planner's imports and caches (the
static memory, the compiled allocation programs); a spawned one would import and rebuild them
first, for longer than most grids take. So workers are used only where fork is safe and pays:
- the platform is Linux (Windows cannot fork; on macOS system libraries are not fork-safe, which
  is why multiprocessing starts processes by spawn there since Python 3.8) and the planner is not
  itself a daemonic worker (multiprocessing lets those have no children);
- the caller runs no other thread: a thread holding a lock at the fork leaves the child's copy
  locked for good (CPython's os.fork documentation);
- more than one CPU is this process's to use (os.sched_getaffinity) and there are at least
  MIN_ITEMS evaluations, or SLOW_ITEMS where each is a search of its own.

Each result comes back pickled (plain ints, strings, dicts); a worker that raises returns
nothing, and the parent evaluates that item itself, so the error is raised as the serial planner
would raise it. The results are the serial ones, item by item (tests/test_planner_workers.py:
the plan's grid, ranked changes and minimum hardware, and a sweep's frame).
"""
from __future__ import annotations

import os
import sys
import threading

MAX_WORKERS = 8     # past this, the grid's hundred replays leave most workers idle
MIN_ITEMS = 8       # fewer: forking costs more than it saves
SLOW_ITEMS = 2      # the least worth forking for where each item is a search of a second or more

_job = None         # the function the forked workers call (set before the fork, read in the child)


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the platform has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:              # macOS, Windows
        return os.cpu_count() or 1


def checked(workers: int | None) -> int | None:
    """`workers` as given, or a one-line error (core/_errors.py UsageError)."""
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        from vramplan.core._errors import UsageError
        raise UsageError(f"--workers must be a whole number of at least 1, got {workers!r}",
                         hint="e.g. --workers 4, or --workers 1 to evaluate in this process")
    return workers


def workers_for(items: int, workers: int | None = None, min_items: int = MIN_ITEMS) -> int:
    """How many processes evaluate `items` evaluations: `workers` as asked (None: one per usable
    CPU, at most MAX_WORKERS), 1 (in this process) where forking is unsafe or does not pay: fewer
    than `min_items` (a few for evaluations that each take seconds) and the module docstring."""
    import multiprocessing

    wanted = min(usable_cpus(), MAX_WORKERS) if workers is None else workers
    if wanted < 2 or items < max(min_items, 2):
        return 1
    if not sys.platform.startswith("linux") or multiprocessing.current_process().daemon:
        return 1
    if threading.active_count() > 1:
        return 1
    return min(wanted, items)


def spread(fn, count: int, workers: int | None = None, min_items: int = MIN_ITEMS) -> list:
    """[fn(0), ..., fn(count - 1)], evaluated by `workers_for(count, workers, min_items)` processes."""
    n = workers_for(count, checked(workers), min_items)
    if n == 1:
        return [fn(i) for i in range(count)]
    import multiprocessing

    global _job
    _job = fn
    try:
        with multiprocessing.get_context("fork").Pool(n) as pool:
            done = pool.map(_run, range(count), chunksize=1)
    finally:
        _job = None
    return [fn(i) if result is None else result[0] for i, result in enumerate(done)]


def _run(i: int):
    """In a worker: (fn(i),), or None where it raised (the parent raises it again)."""
    try:
        return (_job(i),)
    except Exception:
        return None
