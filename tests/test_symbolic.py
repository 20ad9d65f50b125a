"""Sizes as polynomials in batch and sequence (vramplan/estimate/_symbolic.py), torch-free: every
evaluation is compared with the same quantity computed directly with integers at that point.
The block is the caching allocator's 512 B rounding (c10/cuda/CUDACachingAllocator.cpp
`round_size`, kMinBlockSize; docs/allocator.md#constants)."""
from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from vramplan.estimate._symbolic import B, BLOCK, S, S16, S32, S128, Size, Sym, alloc, rounded_bytes, variables

POINTS = [(1, 1), (1, 15), (1, 16), (1, 17), (2, 100), (3, 127), (4, 129), (8, 2048), (7, 4095), (16, 8192)]
batches, seqs = st.integers(1, 64), st.integers(1, 32768)
coefs = st.integers(-4096, 4096)


def round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def test_block_is_512_bytes():
    # c10/cuda/CUDACachingAllocator.cpp: kMinBlockSize = 512, every request rounded up to it
    assert BLOCK == 512


@pytest.mark.parametrize("batch, seq", POINTS)
def test_variables_round_the_sequence_as_kernels_do(batch, seq):
    v = variables(batch, seq)
    assert (v["b"], v["s"]) == (batch, seq)
    for name, m in (("s16", 16), ("s32", 32), ("s128", 128)):
        assert v[name] % m == 0 and seq <= v[name] < seq + m, name


@pytest.mark.parametrize("batch, seq", POINTS)
def test_polynomials_evaluate_as_direct_arithmetic(batch, seq):
    v = variables(batch, seq)
    s128 = round_up(seq, 128)
    hidden, heads, vocab = 4096, 32, 32000
    # bf16 hidden states, fp32 logits, a kernel's per-head fp32 logsumexp over the padded sequence,
    # an int64 mask: each against the same product written out with integers
    assert (B * S * hidden * 2).eval(v) == batch * seq * hidden * 2
    assert (B * S * vocab * 4).eval(v) == batch * seq * vocab * 4
    assert (B * heads * S128 * 4).eval(v) == batch * heads * s128 * 4
    assert (B * S * S * 8 + 64).eval(v) == batch * seq * seq * 8 + 64
    assert ((B + 1) * (S16 + S * -1)).eval(v) == (batch + 1) * (round_up(seq, 16) - seq)
    assert (S32 * 3 // 3).eval(v) == round_up(seq, 32)


@pytest.mark.parametrize("batch, seq", POINTS)
def test_a_size_rounds_each_allocation_on_its_own(batch, seq):
    v = variables(batch, seq)
    a, b = B * S * 2 + 1, B * 3
    size = alloc(a) + alloc(b) + 2 * alloc(S128 * 4)
    direct = (round_up(batch * seq * 2 + 1, 512) + round_up(batch * 3, 512)
              + 2 * round_up(round_up(seq, 128) * 4, 512))
    assert size.eval(v) == direct
    assert alloc(a + b).eval(v) == round_up(batch * seq * 2 + 1 + batch * 3, 512)   # one allocation
    assert (3 * size).eval(v) == 3 * direct and (size * 0).eval(v) == 0


def test_zero_sizes_are_empty_and_add_as_nothing():
    assert not alloc(0) and not alloc(Sym.const(0)) and not (B + B * -1)
    assert alloc(0).eval(variables(3, 5)) == 0 and rounded_bytes(Sym.const(-7).key(), {}) == 0
    assert (alloc(B) + 0) == alloc(B) and (0 + alloc(B)) == alloc(B)


def test_non_divisible_polynomial_division_is_refused():
    with pytest.raises(ValueError):
        (B * 3 + 1) // 2


@settings(max_examples=200, deadline=None)
@given(st.integers(-(10**9), 10**9))
def test_rounding_is_the_smallest_block_multiple_at_or_above(n):
    r = rounded_bytes(Sym.const(n).key(), {})
    if n <= 0:
        assert r == 0
    else:
        assert r % 512 == 0 and n <= r < n + 512


@settings(max_examples=150, deadline=None)
@given(batches, seqs, st.lists(st.tuples(coefs, st.sampled_from(["1", "b", "s", "bs", "ss", "bs128"])),
                               min_size=1, max_size=5),
       st.lists(st.tuples(coefs, st.sampled_from(["1", "b", "s16", "bs32"])), min_size=1, max_size=4))
def test_sum_and_product_evaluate_as_the_integers(batch, seq, p_terms, q_terms):
    v = variables(batch, seq)
    monomials = {"1": (Sym.const(1), 1), "b": (B, batch), "s": (S, seq), "bs": (B * S, batch * seq),
                 "ss": (S * S, seq * seq), "bs128": (B * S128, batch * round_up(seq, 128)),
                 "s16": (S16, round_up(seq, 16)), "bs32": (B * S32, batch * round_up(seq, 32))}
    p = sum((c * monomials[m][0] for c, m in p_terms), Sym({}))
    q = sum((c * monomials[m][0] for c, m in q_terms), Sym({}))
    p_int = sum(c * monomials[m][1] for c, m in p_terms)
    q_int = sum(c * monomials[m][1] for c, m in q_terms)
    assert p.eval(v) == p_int and q.eval(v) == q_int
    assert (p + q).eval(v) == p_int + q_int
    assert (p * q).eval(v) == p_int * q_int
    assert (p * 7).eval(v) == 7 * p_int and (p + 5).eval(v) == p_int + 5
    assert alloc(p).eval(v) == (round_up(p_int, 512) if p_int > 0 else 0)


@settings(max_examples=100, deadline=None)
@given(batches, seqs, st.lists(st.tuples(st.integers(1, 10**6), st.integers(1, 4)), min_size=1, max_size=6))
def test_size_is_the_sum_of_rounded_parts(batch, seq, parts):
    v = variables(batch, seq)
    size = sum((count * alloc(B * S * per_token) for per_token, count in parts), Size())
    assert size.eval(v) == sum(count * round_up(batch * seq * per_token, 512) for per_token, count in parts)
