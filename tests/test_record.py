"""core/_record.py: `@record` behaves as a frozen dataclass (repr, eq, hash, replace, pickling), with
its hash computed once per instance and never carried into another interpreter."""
import copy
import dataclasses
import os
import pickle
import subprocess
import sys

import pytest

from vramplan.core._record import record


@record
class Point:
    name: str
    xs: tuple
    note: str = dataclasses.field(default="", compare=False)


@dataclasses.dataclass(frozen=True)
class Twin:
    name: str
    xs: tuple
    note: str = dataclasses.field(default="", compare=False)


def test_it_behaves_as_the_frozen_dataclass():
    a, b = Point("a", (1, 2), note="x"), Point("a", (1, 2), note="y")
    twin = Twin("a", (1, 2), note="x")
    assert repr(a).replace("Point", "Twin") == repr(twin)
    assert a == b and hash(a) == hash(b) == hash(twin)      # `note` takes no part, as compare=False
    assert a != Point("a", (1, 3)) and a != twin             # another class is never equal
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.name = "b"
    assert dataclasses.replace(a, name="b") == Point("b", (1, 2))
    assert dataclasses.asdict(a) == {"name": "a", "xs": (1, 2), "note": "x"}


def test_the_hash_is_computed_once():
    calls = []

    class Counted(int):
        def __hash__(self):
            calls.append(1)
            return int.__hash__(self)

    p = Point("a", (Counted(3),))
    assert hash(p) == hash(p) == hash(("a", (3,)))
    assert len(calls) == 1


@pytest.mark.parametrize("clone", [lambda p: pickle.loads(pickle.dumps(p)), copy.copy, copy.deepcopy])
def test_a_copy_computes_its_own_hash(clone):
    p = Point("a", (1,))
    hash(p)
    q = clone(p)
    assert q == p and "_record_hash_value" not in vars(q) and hash(q) == hash(p)


def test_a_record_pickled_in_another_interpreter_hashes_as_one_made_here():
    """str hashes are salted per interpreter (PYTHONHASHSEED): a hash carried in the pickle would
    put an equal record in another dict slot."""
    code = (f"import pickle, sys; from {Point.__module__} import Point; p = Point('a', ('b',)); hash(p); "
            "sys.stdout.buffer.write(pickle.dumps(p))")
    env = {"PYTHONHASHSEED": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    blob = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, check=True).stdout
    p = pickle.loads(blob)
    assert p in {Point("a", ("b",)): 1}
