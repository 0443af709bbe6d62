"""Relational reasoning: comparisons as constraints on affine forms of shared atoms.

`q >= kv` and `q - kv < W` are both constraints on the same form `q - kv`; keeping them
together (rather than bounding q and kv independently) makes causal and sliding-window
tiles exact: the diagonal tile comes out PARTIAL and every other tile FULL or EMPTY.

A comparison `A op B` between integers becomes `T' in [L, U]` (optionally `T' = r mod M`,
or `T' != k`) where `T'` is `lin(A) - lin(B)` without its constant, divided by the gcd of
its coefficients and signed so its first atom's coefficient is positive: equal `T'` give
equal group keys, whatever way the user wrote the comparison.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from fractions import Fraction

from ..ir import COMPARISON_OPS, DType, Node, Op, to_expr

Terms = tuple[tuple[Node, int], ...]

NEGATED = {Op.LT: Op.GE, Op.LE: Op.GT, Op.GT: Op.LE, Op.GE: Op.LT, Op.EQ: Op.NE, Op.NE: Op.EQ}
SWAPPED = {Op.LT: Op.GT, Op.LE: Op.GE, Op.GT: Op.LT, Op.GE: Op.LE, Op.EQ: Op.EQ, Op.NE: Op.NE}
# F = lhs - rhs; op -> the interval F lies in (None: unbounded)
FORM_RANGE = {Op.LE: (None, 0), Op.LT: (None, -1), Op.GE: (0, None), Op.GT: (1, None), Op.EQ: (0, 0)}


@dataclass(frozen=True)
class Constraint:
    """`terms` (normalized) lies in [lo, hi], is `residue` mod `modulus` (or not, if `negated`), or != `neq`."""

    terms: Terms
    lo: int | None = None
    hi: int | None = None
    modulus: int = 1
    residue: int = 0
    negated: bool = False  # a negated congruence: terms != residue (mod modulus)
    neq: int | None = None
    sources: tuple[Node, ...] = ()  # the nodes whose int32 wrap-around would invalidate the algebra

    @property
    def groupable(self) -> bool:
        return not self.negated and self.neq is None


def linear(node: Node, cache: dict[Node, tuple[dict[Node, int], int]]) -> tuple[dict[Node, int], int]:
    """`node` as {atom: coeff} + const: ADD/SUB/NEG/MUL-by-constant are unfolded, the rest are atoms."""
    if node in cache:
        return cache[node]
    op, src = node.op, node.src
    if op == Op.CONST and node.dtype != DType.F32:
        out: tuple[dict[Node, int], int] = ({}, int(node.arg))
    elif op in (Op.ADD, Op.SUB) and node.dtype == DType.I32:
        (ta, ca), (tb, cb) = linear(src[0], cache), linear(src[1], cache)
        sign = 1 if op == Op.ADD else -1
        terms = dict(ta)
        for atom, c in tb.items():
            terms[atom] = terms.get(atom, 0) + sign * c
        out = ({a: c for a, c in terms.items() if c}, ca + sign * cb)
    elif op == Op.NEG and node.dtype == DType.I32:
        t, c = linear(src[0], cache)
        out = ({a: -k for a, k in t.items()}, -c)
    elif op == Op.MUL and node.dtype == DType.I32 and any(not linear(s, cache)[0] for s in src):
        (ta, ca), (tb, cb) = linear(src[0], cache), linear(src[1], cache)
        (t, c), k = ((ta, ca), cb) if not tb else ((tb, cb), ca)
        out = ({a: k * v for a, v in t.items() if k * v}, k * c)
    else:
        out = ({node: 1}, 0)
    cache[node] = out
    return out


def _ceil(x: Fraction) -> int:
    return -((-x.numerator) // x.denominator)


def _floor(x: Fraction) -> int:
    return x.numerator // x.denominator


def normalize(terms: dict[Node, int], const: int, lo: int | None, hi: int | None,
              keys: dict[Node, str]) -> tuple[Terms, int | None, int | None, int, int]:
    """`terms + const in [lo, hi]` -> (T', lo', hi', scale, const) with T' = terms / scale in [lo', hi']."""
    order = sorted(terms, key=lambda a: keys.setdefault(a, to_expr(a)))
    g = math.gcd(*(abs(terms[a]) for a in order))
    scale = g if terms[order[0]] > 0 else -g
    norm = tuple((a, terms[a] // scale) for a in order)
    bounds = [None if v is None else Fraction(v - const, scale) for v in (lo, hi)]
    if scale < 0:
        bounds.reverse()
    new_lo = None if bounds[0] is None else _ceil(bounds[0])
    new_hi = None if bounds[1] is None else _floor(bounds[1])
    return norm, new_lo, new_hi, scale, const


def constraint_of(node: Node, negate: bool, lin_cache: dict, keys: dict[Node, str]) -> Constraint | bool | None:
    """The constraint a comparison literal states; True/False when it is constant; None when not affine."""
    if node.op not in COMPARISON_OPS or any(s.dtype == DType.F32 for s in node.src):
        return None
    op = NEGATED[node.op] if negate else node.op
    a, b = node.src
    for left, right, left_op in ((a, b, op), (b, a, SWAPPED[op])):
        if left.op == Op.MOD and left.src[1].op == Op.CONST and right.op == Op.CONST and op in (Op.EQ, Op.NE):
            return _congruence(left, int(right.arg), op == Op.NE, lin_cache, keys)
        if left.op == Op.ABS and right.op == Op.CONST and left_op in (Op.LE, Op.LT):
            c = int(right.arg) - (left_op == Op.LT)
            terms, const = linear(left.src[0], lin_cache)
            return _make(terms, const, -c, c, (left.src[0],), keys)
    ta, ca = linear(a, lin_cache)
    tb, cb = linear(b, lin_cache)
    terms = dict(ta)
    for atom, c in tb.items():
        terms[atom] = terms.get(atom, 0) - c
    terms = {k: v for k, v in terms.items() if v}
    const = ca - cb
    if op == Op.NE:
        if not terms:
            return const != 0
        t, lo, hi, _, _ = normalize(terms, const, 0, 0, keys)
        return Constraint(t, neq=lo, sources=(a, b)) if lo == hi else True
    lo, hi = FORM_RANGE[op]
    return _make(terms, const, lo, hi, (a, b), keys)


@functools.lru_cache(maxsize=4096)
def literal_constraint(node: Node, negate: bool) -> Constraint | bool | None:
    """`constraint_of`, kept per literal: it depends on the IR alone, and a mask rebuilt at every forward (its
    captured tensors new) has the same IR, so its block mask's analysis normalizes each comparison once."""
    return constraint_of(node, negate, {}, {})


def _make(terms: dict[Node, int], const: int, lo: int | None, hi: int | None, sources: tuple[Node, ...],
          keys: dict[Node, str]) -> Constraint | bool:
    if not terms:
        return (lo is None or const >= lo) and (hi is None or const <= hi)
    t, nlo, nhi, _, _ = normalize(terms, const, lo, hi, keys)
    if nlo is not None and nhi is not None and nlo > nhi:
        return False
    return Constraint(t, lo=nlo, hi=nhi, sources=sources)


def _congruence(mod: Node, r: int, negated: bool, lin_cache: dict, keys: dict[Node, str]) -> Constraint | bool | None:
    m = int(mod.src[1].arg)
    if m == 0:
        return None
    if not (0 <= r < m or m < r <= 0):  # Python's x % m never equals r
        return negated
    terms, const = linear(mod.src[0], lin_cache)
    if not terms:
        return ((const % m) == r) != negated
    t, _, _, scale, _ = normalize(terms, const, None, None, keys)
    if abs(scale) != 1:
        return None
    modulus = abs(m)
    residue = ((r - const) * scale) % modulus  # scale*T' + const = r (mod M)  <=>  T' = scale*(r - const)
    return Constraint(t, modulus=modulus, residue=residue, negated=negated, sources=(mod.src[0],))
