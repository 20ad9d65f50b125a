"""Sizes as polynomials in the batch and sequence length, evaluated late.

A decoder layer's op list and autograd walk depend on the setup's structure (method, kernels,
checkpointing), not on batch x seq, which only scale the tensors. So the walk is recorded once as
a tape of allocations and frees whose sizes are `Size`s, and replayed with numbers for each batch
x seq (graph.replay). A Size is a sum of allocations, each one polynomial rounded up to the
caching allocator's block on its own, exactly as quant.alloc rounds a concrete tensor.

Variables: b (batch), s (seq), and the roundings kernels apply to the sequence: s16, s32, s128
(seq rounded up to a multiple of 16, 32, 128).
"""
from __future__ import annotations

from vramplan.core._record import record

BLOCK = 512


class Sym:
    """An integer polynomial: {monomial (sorted tuple of variable names): coefficient}."""

    __slots__ = ("terms",)

    def __init__(self, terms: dict):
        self.terms = {k: v for k, v in terms.items() if v}

    @staticmethod
    def var(name: str) -> "Sym":
        return Sym({(name,): 1})

    @staticmethod
    def const(value: int) -> "Sym":
        return Sym({(): int(value)})

    def __add__(self, other):
        other = _sym(other)
        out = dict(self.terms)
        for k, v in other.terms.items():
            out[k] = out.get(k, 0) + v
        return Sym(out)

    __radd__ = __add__

    def __mul__(self, other):
        if isinstance(other, int):  # the common case in the op builders: a scalar factor
            return Sym({k: v * other for k, v in self.terms.items()}) if other else Sym({})
        other = _sym(other)
        out: dict = {}
        for k1, v1 in self.terms.items():
            for k2, v2 in other.terms.items():
                k = tuple(sorted(k1 + k2))
                out[k] = out.get(k, 0) + v1 * v2
        return Sym(out)

    __rmul__ = __mul__

    def __floordiv__(self, other: int):
        if any(v % other for v in self.terms.values()):
            raise ValueError(f"{self} is not divisible by {other}")
        return Sym({k: v // other for k, v in self.terms.items()})

    def __bool__(self) -> bool:
        return bool(self.terms)

    def key(self) -> tuple:
        return tuple(sorted(self.terms.items()))

    def eval(self, values: dict) -> int:
        return poly_bytes(self.key(), values)

    def __repr__(self) -> str:
        return " + ".join(f"{v}*{'*'.join(k) or '1'}" for k, v in self.terms.items()) or "0"


def _sym(x) -> Sym:
    return x if isinstance(x, Sym) else Sym.const(x)


@record
class Size:
    """A sum of separately rounded allocations (each a Sym), times a count."""
    parts: tuple = ()      # ((Sym key tuple, count), ...)

    def __add__(self, other):
        if isinstance(other, int) and other == 0:
            return self
        counts = dict(self.parts)
        for k, c in other.parts:
            counts[k] = counts.get(k, 0) + c
        return Size(tuple(sorted(counts.items())))

    __radd__ = __add__

    def __mul__(self, n: int):
        return Size(tuple((k, c * n) for k, c in self.parts if c * n))

    __rmul__ = __mul__

    def __bool__(self) -> bool:
        return bool(self.parts)

    def eval(self, values: dict) -> int:
        return sum(count * rounded_bytes(key, values) for key, count in self.parts)

def in_order(*sizes: Size) -> Size:
    """Allocations made one after the other in this order, as one Size (`+` sorts its parts, which
    sets the order a transient's allocations are played in: a kernel's workspaces, made in the
    order its source makes them)."""
    return Size(tuple(part for size in sizes for part in size.parts))


def poly_bytes(key: tuple, values: dict) -> int:
    """Evaluate a polynomial given as Sym.key() ((monomial, coefficient) pairs)."""
    nbytes = 0
    for monomial, coef in key:
        term = coef
        for name in monomial:
            term *= values[name]
        nbytes += term
    return nbytes


def rounded_bytes(key: tuple, values: dict) -> int:
    """One allocation of the polynomial `key`, rounded up to the caching allocator's block."""
    nbytes = poly_bytes(key, values)
    return -(-nbytes // BLOCK) * BLOCK if nbytes > 0 else 0


def alloc(nbytes) -> Size:
    """One allocation of `nbytes` (a Sym or an int), rounded when evaluated."""
    sym = _sym(nbytes)
    return Size(((sym.key(), 1),)) if sym else Size()


def variables(batch: int, seq: int) -> dict:
    def rnd(n: int, m: int) -> int:
        return -(-n // m) * m
    return {"b": batch, "s": seq, "s16": rnd(seq, 16), "s32": rnd(seq, 32), "s128": rnd(seq, 128),
            "nt": min(batch * (seq - 1), TOKEN_TILE)}


# TRL's chunked log-prob projects at most this many tokens at a time (trl/kernels/chunked_logprob.py
# TOKEN_CHUNK_SIZE); "nt" is the rows of its tile buffer for the b * (s - 1) labelled tokens
TOKEN_TILE = 4096
NT = Sym.var("nt")
B, S = Sym.var("b"), Sym.var("s")
S16, S32, S128 = Sym.var("s16"), Sym.var("s32"), Sym.var("s128")
