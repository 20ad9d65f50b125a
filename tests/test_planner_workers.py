"""plan/_workers.py: the grid's cells evaluated in forked worker processes give the serial grid,
cell for cell, with the same count of full estimates; a worker's error is raised as the serial
planner raises it; workers are used only where forking is safe and pays."""
import multiprocessing
import os
import sys
import threading

import pytest

from vramplan.core._errors import UsageError
from vramplan.core._models import resolve
from vramplan.core._setup import TrainSetup
from vramplan.plan import _workers
from vramplan.plan._planner import plan
from vramplan.plan._workers import MIN_ITEMS, spread, workers_for

forks = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="workers are forked on Linux only")


def alone() -> None:
    """Workers are used only while no other thread runs (plan/_workers.py)."""
    if threading.active_count() > 1:
        pytest.skip(f"{threading.active_count() - 1} other thread(s) running in this test process")


@forks
def test_the_grid_from_workers_is_the_serial_grid():
    """Mistral-7B QLoRA on a 24 GB card, 8 x 5 cells: some not replayed (allocated alone exceeds
    the card), some replayed and fitting, some replayed and not."""
    alone()
    spec = resolve("mistralai/Mistral-7B-v0.1")
    args = dict(batches=[1, 2, 3, 4, 6, 8, 12, 16], seqs=[512, 1024, 2048, 4096, 8192], recommend=False)
    assert workers_for(40, 2) == 2
    serial = plan(spec, TrainSetup(), "RTX4090", workers=1, **args)
    spread_ = plan(spec, TrainSetup(), "RTX4090", workers=2, **args)
    assert spread_.grid == serial.grid
    assert spread_.evaluations == serial.evaluations
    kinds = {(c.lower_bound, c.status) for row in serial.grid.cells for c in row}
    assert {(True, "no"), (False, "fits"), (False, "no")} <= kinds, kinds


@forks
def test_items_are_evaluated_in_the_workers_in_order():
    alone()
    parent = os.getpid()
    done = spread(lambda i: (i * i, os.getpid()), 3 * MIN_ITEMS, 2)
    assert [v for v, _pid in done] == [i * i for i in range(3 * MIN_ITEMS)]
    assert parent not in {pid for _v, pid in done}


@forks
def test_a_workers_error_is_raised_as_the_serial_planner_raises_it():
    alone()
    parent = os.getpid()

    def cell(i):
        if i == 5:
            raise UsageError(f"item {i} raised in {'the parent' if os.getpid() == parent else 'a worker'}", hint="h")
        return i
    with pytest.raises(UsageError, match="item 5 raised in the parent"):
        spread(cell, 2 * MIN_ITEMS, 2)


def test_workers_only_where_forking_is_safe_and_pays(monkeypatch):
    alone()
    monkeypatch.setattr(_workers, "usable_cpus", lambda: 16)
    assert workers_for(400) == _workers.MAX_WORKERS
    assert workers_for(400, 3) == 3 and workers_for(10, 32) == 10
    assert workers_for(400, 1) == 1
    assert workers_for(MIN_ITEMS - 1) == 1                  # too few to pay for the fork
    monkeypatch.setattr(_workers, "usable_cpus", lambda: 1)
    assert workers_for(400) == 1
    monkeypatch.setattr(_workers, "usable_cpus", lambda: 16)
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()
    try:
        assert workers_for(400) == 1                        # a lock held at the fork stays held
    finally:
        stop.set()
        other.join()
    monkeypatch.setattr(multiprocessing, "current_process", lambda: type("P", (), {"daemon": True})())
    assert workers_for(400) == 1                            # a daemonic process has no children
    monkeypatch.undo()
    monkeypatch.setattr(_workers, "usable_cpus", lambda: 16)
    monkeypatch.setattr(sys, "platform", "darwin")
    assert workers_for(400) == 1                            # fork only where it is safe


@pytest.mark.parametrize("bad", [0, -2, 1.5, "4", True])
def test_a_bad_worker_count_is_a_usage_error(bad):
    with pytest.raises(UsageError, match="--workers must be a whole number of at least 1"):
        plan("mistralai/Mistral-7B-v0.1", gpu="RTX4090", workers=bad)


@forks
@pytest.mark.pandas
def test_a_sweep_from_workers_is_the_serial_sweep():
    """Rows that run and rows that cannot (Gemma-2 has no SDPA path), the same frame either way."""
    import vramplan

    alone()
    axes = dict(attn=["sdpa", "eager"], batch=[1, 2, 4, 8], seq=[512, 2048])
    serial = vramplan.sweep("gemma-2-2b", gpu="24GB", workers=1, **axes)
    spread_ = vramplan.sweep("gemma-2-2b", gpu="24GB", workers=2, **axes)
    assert serial.equals(spread_) and list(serial.dtypes) == list(spread_.dtypes)
    assert serial["error"].notna().sum() == 8 and serial["fits"].notna().sum() == 8
