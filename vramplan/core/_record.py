"""`@record`: a frozen dataclass whose `__repr__`, `__eq__` and `__hash__` are three shared
functions instead of methods generated for each class.

Why: on Python 3.11, `dataclasses` compiles every generated method with `exec`, about 0.2 ms
each; a frozen dataclass gets six (`__init__`, `__repr__`, `__eq__`, `__hash__`, `__setattr__`,
`__delattr__`). The estimate path defines about 30 of them; sharing these three cut its
imports from about 70 to 59 ms of CPU and the stream module's from 9 to 7 ms, measured on a
cold `vramplan estimate` (benchmarks/bench_estimate.py), whose target is 250 ms.

The behaviour is the dataclass one (`dataclasses._process_class` in CPython 3.11):
- repr `QualName(field=value, ...)` over the fields with `repr=True`;
- equal when the other object is of the same class and the fields with `compare=True` are equal
  (else NotImplemented);
- the hash of the fields with `hash=True`, or `hash=None` and `compare=True`.
`fields()`, `replace()`, `asdict()` and pickling work as on any dataclass.

The hash is computed once per instance and kept beside its fields: a record is frozen, and the
planner hashes the same large ones again and again as cache keys (one GPU of ZeRO-3's
ZeroPartitions, whose all-gather segments took about 3 ms to hash, twice per grid cell). A
pickled or copied record leaves it behind: str hashes differ between interpreters.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from operator import attrgetter


def record(cls: type) -> type:
    """`@dataclass(frozen=True)` with the shared repr / eq / hash (the module docstring)."""
    cls = dataclass(frozen=True, repr=False, eq=False)(cls)
    own = fields(cls)
    cls._record_repr = tuple(f.name for f in own if f.repr)
    cls._record_compare = _values_of([f.name for f in own if f.compare])
    cls._record_hash = _values_of([f.name for f in own if (f.compare if f.hash is None else f.hash)])
    cls.__repr__ = _repr
    cls.__eq__ = _eq
    cls.__hash__ = _hash
    cls.__getstate__ = _getstate
    return cls


def _values_of(names: list[str]):
    """A function of an instance returning the tuple of these fields (attrgetter returns a bare
    value for one name)."""
    if len(names) > 1:
        return attrgetter(*names)
    if names:
        one = attrgetter(names[0])
        return lambda obj: (one(obj),)
    return lambda obj: ()


def _repr(self) -> str:
    cls = self.__class__
    return f"{cls.__qualname__}({', '.join(f'{n}={getattr(self, n)!r}' for n in cls._record_repr)})"


def _eq(self, other):
    if other.__class__ is self.__class__:
        values = self.__class__._record_compare
        return values(self) == values(other)
    return NotImplemented


_HASH = "_record_hash_value"   # the instance's hash, once computed (the module docstring)


def _hash(self) -> int:
    values = self.__dict__
    value = values.get(_HASH)
    if value is None:
        value = values[_HASH] = hash(self.__class__._record_hash(self))
    return value


def _getstate(self) -> dict:
    state = dict(self.__dict__)
    state.pop(_HASH, None)
    return state
