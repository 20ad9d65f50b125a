"""plan/_workers.py: the grid's cells, the ranked changes, the minimum hardware's searches and a
sweep's rows evaluated in forked worker processes give the serial answer, with the same count of full estimates; a
worker's error is raised as the serial planner raises it; workers are used only where forking is
safe and pays."""
import multiprocessing
import os
import subprocess
import sys
import textwrap
import threading

import pytest

from vramplan.core._errors import UsageError
from vramplan.plan import _workers
from vramplan.plan._planner import plan
from vramplan.plan._workers import MIN_ITEMS, workers_for

forks = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="workers are forked on Linux only")


def fresh(code: str) -> str:
    """Run `code` in a fresh interpreter (this test process may run threads an earlier test left,
    and workers are never forked beside another thread); its standard output."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.returncode == 0, done.stderr
    return done.stdout


@forks
def test_the_grid_from_workers_is_the_serial_grid():
    """Mistral-7B QLoRA on a 24 GB card, 8 x 5 cells: some not replayed (allocated alone exceeds
    the card), some replayed and fitting, some replayed and not."""
    out = fresh("""
        from vramplan.core._models import resolve
        from vramplan.core._setup import TrainSetup
        from vramplan.plan._planner import plan
        from vramplan.plan._workers import workers_for

        assert workers_for(40, 2) == 2
        spec = resolve("mistralai/Mistral-7B-v0.1")
        args = dict(batches=[1, 2, 3, 4, 6, 8, 12, 16], seqs=[512, 1024, 2048, 4096, 8192], recommend=False)
        serial = plan(spec, TrainSetup(), "RTX4090", workers=1, **args)
        spread = plan(spec, TrainSetup(), "RTX4090", workers=2, **args)
        kinds = {(c.lower_bound, c.status) for row in serial.grid.cells for c in row}
        print(spread.grid == serial.grid, spread.evaluations == serial.evaluations,
              kinds >= {(True, "no"), (False, "fits"), (False, "no")})
    """)
    assert out.split() == ["True", "True", "True"]


@forks
def test_the_minimum_hardware_from_workers_is_the_serial_answer():
    """TinyLlama at 32 x 8192 on a T4: no GPU count holds one micro-batch's logits, so every engine
    is searched and the setup changes that fit under FSDP are looked for (as a plan does where
    its own ranked changes found none), one search per worker."""
    out = fresh("""
        import json
        from vramplan.core._gpus import resolve_gpu
        from vramplan.core._models import resolve
        from vramplan.core._setup import TrainSetup
        from vramplan.plan._planner import TIGHT, Evaluator, _minimum
        from vramplan.plan._sharding import Parallel

        spec, gpu = resolve("TinyLlama/TinyLlama-1.1B-Chat-v1.0"), resolve_gpu("T4")
        setup = TrainSetup(batch=32, seq=8192, dtype="fp16")

        def minimum(workers):
            ev = Evaluator(spec, Parallel(), gpu)
            return _minimum(spec, setup, Parallel(), gpu, TIGHT, ev, with_changes=True, workers=workers)
        serial, spread = minimum(1), minimum(2)
        same = json.dumps(serial.to_dict(), sort_keys=True) == json.dumps(spread.to_dict(), sort_keys=True)
        print(same, len(serial.options), len(serial.changes) > 0)
    """)
    assert out.split() == ["True", "0", "True"]


@forks
def test_the_ranked_changes_from_workers_are_the_serial_ones():
    """Each round of recommendations (alone, pairs, pruned stacks) evaluated over two workers: the
    same changes in the same order, and the same count of full estimates."""
    out = fresh("""
        import json
        from vramplan.plan._planner import plan

        args = dict(gpu="T4", batch=32, seq=8192, batches=[1, 2], seqs=[512])
        serial = plan("TinyLlama/TinyLlama-1.1B-Chat-v1.0", workers=1, **args)
        spread = plan("TinyLlama/TinyLlama-1.1B-Chat-v1.0", workers=2, **args)
        same = json.dumps(serial.to_dict(), sort_keys=True) == json.dumps(spread.to_dict(), sort_keys=True)
        print(same, serial.evaluations == spread.evaluations, len(serial.changes) >= 3)
    """)
    assert out.split() == ["True", "True", "True"]


@forks
def test_items_are_evaluated_in_the_workers_in_order():
    out = fresh(f"""
        import os
        from vramplan.plan._workers import spread

        parent = os.getpid()
        done = spread(lambda i: (i * i, os.getpid()), {3 * MIN_ITEMS}, 2)
        print([v for v, _pid in done] == [i * i for i in range({3 * MIN_ITEMS})], parent in {{p for _v, p in done}})
    """)
    assert out.split() == ["True", "False"]


@forks
def test_a_workers_error_is_raised_as_the_serial_planner_raises_it():
    out = fresh(f"""
        import os
        from vramplan.core._errors import UsageError
        from vramplan.plan._workers import spread

        parent = os.getpid()

        def cell(i):
            if i == 5:
                raise UsageError(f"item {{i}} raised in {{'the parent' if os.getpid() == parent else 'a worker'}}",
                                 hint="h")
            return i
        try:
            spread(cell, {2 * MIN_ITEMS}, 2)
        except UsageError as exc:
            print(exc)
    """)
    assert out.startswith("item 5 raised in the parent")


def test_workers_only_where_forking_is_safe_and_pays(monkeypatch):
    monkeypatch.setattr(_workers, "usable_cpus", lambda: 16)
    monkeypatch.setattr(threading, "active_count", lambda: 1)
    assert workers_for(400) == _workers.MAX_WORKERS
    assert workers_for(400, 3) == 3 and workers_for(10, 32) == 10
    assert workers_for(400, 1) == 1
    assert workers_for(MIN_ITEMS - 1) == 1                  # too few to pay for the fork
    assert workers_for(4, min_items=2) == 4 and workers_for(1, min_items=1) == 1
    monkeypatch.setattr(_workers, "usable_cpus", lambda: 1)
    assert workers_for(400) == 1
    monkeypatch.setattr(_workers, "usable_cpus", lambda: 16)
    monkeypatch.setattr(threading, "active_count", lambda: 2)
    assert workers_for(400) == 1                            # a lock held at the fork stays held
    monkeypatch.setattr(threading, "active_count", lambda: 1)
    monkeypatch.setattr(sys, "platform", "darwin")
    assert workers_for(400) == 1                            # fork only where it is safe
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(multiprocessing, "current_process", lambda: type("P", (), {"daemon": True})())
    assert workers_for(400) == 1                            # a daemonic process has no children


@pytest.mark.parametrize("bad", [0, -2, 1.5, "4", True])
def test_a_bad_worker_count_is_a_usage_error(bad):
    with pytest.raises(UsageError, match="--workers must be a whole number of at least 1"):
        plan("mistralai/Mistral-7B-v0.1", gpu="RTX4090", workers=bad)


@forks
@pytest.mark.pandas
def test_a_sweep_from_workers_is_the_serial_sweep():
    """Rows that run and rows that cannot (Gemma-2 has no SDPA path), the same frame either way."""
    out = fresh("""
        import vramplan

        axes = dict(attn=["sdpa", "eager"], batch=[1, 2, 4, 8], seq=[512, 2048])
        serial = vramplan.sweep("gemma-2-2b", gpu="24GB", workers=1, **axes)
        spread = vramplan.sweep("gemma-2-2b", gpu="24GB", workers=2, **axes)
        print(serial.equals(spread), list(serial.dtypes) == list(spread.dtypes))
        print(serial["error"].notna().sum(), serial["fits"].notna().sum())
    """)
    assert out.split() == ["True", "True", "8", "8"]
