"""Graph rewriting: tables of (pattern, function) rules applied bottom-up to a fixpoint.

A rule is `(pattern, fn)`: `pattern` is an `Op`, a set of Ops, or a predicate on
the node; `fn(node)` returns a replacement `Node` or None for "no match".
Tables are lists, so they compose with `+`.  Rebuilt nodes are interned, so
structurally equal subexpressions become one object (CSE) and sharing survives.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from typing import Any

from .ir import COMMUTATIVE_OPS, INT32_MAX, INT32_MIN, DType, Node, Op, const

Pattern = Op | frozenset | Callable[[Node], bool]
Rule = tuple[Pattern, Callable[[Node], Node | None]]

MAX_REWRITES_PER_NODE = 100


def matches(pattern: Pattern, node: Node) -> bool:
    if isinstance(pattern, Op):
        return node.op == pattern
    if isinstance(pattern, (frozenset, set)):
        return node.op in pattern
    return pattern(node)


def graph_rewrite(root: Node, rules: list[Rule], name: str = "") -> Node:
    """Apply `rules` bottom-up until none fires; equal subexpressions come out as one shared node."""
    interned: dict[Node, Node] = {}
    done: dict[Node, Node] = {}

    def intern(node: Node) -> Node:
        return interned.setdefault(node, node)

    def rewrite(node: Node) -> Node:
        if node in done:
            return done[node]
        current = intern(node.replace(src=tuple(rewrite(s) for s in node.src)) if node.src else node)
        for _ in range(MAX_REWRITES_PER_NODE):
            replacement = first_match(rules, current)
            if replacement is None or replacement == current:
                break
            if replacement.loc is None and current.loc is not None:
                replacement = replacement.replace(loc=current.loc)
            current = rewrite(replacement)
        else:
            raise RuntimeError(f"rewrite pass {name!r} did not reach a fixpoint at {current!r}")
        done[node] = done[current] = current
        return current

    return rewrite(root)


def first_match(rules: list[Rule], node: Node) -> Node | None:
    for pattern, fn in rules:
        if matches(pattern, node):
            out = fn(node)
            if out is not None:
                return out
    return None


# ---------------------------------------------------------------- helpers


def is_const(node: Node, value: Any = None) -> bool:
    if node.op != Op.CONST:
        return False
    return value is None or (node.arg == value and type(node.arg) is type(value))


def all_const(node: Node) -> bool:
    return bool(node.src) and all(s.op == Op.CONST for s in node.src)


def folded(node: Node, value: Any) -> Node | None:
    """`value` as a constant of `node`'s dtype, or None when it cannot be represented faithfully."""
    if value is None:
        return None
    if node.dtype == DType.I32 and (isinstance(value, float) or not INT32_MIN <= int(value) <= INT32_MAX):
        return None
    if node.dtype == DType.F32:
        value = float(value)
        if math.isnan(value):
            return None
    return const(value, node.dtype, node.loc)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def _floor(x: float) -> float | int:
    return x if isinstance(x, int) else float(math.floor(x)) if math.isfinite(x) else x


def _round(x: float) -> float | int:
    return x if isinstance(x, int) else float(round(x)) if math.isfinite(x) else x  # round() halves to even


def _floordiv(a: Any, b: Any) -> Any:
    if isinstance(a, float) or isinstance(b, float):
        return float(math.floor(a / b))  # torch's float //: floor of the true quotient
    return a // b


def _cast(node: Node) -> Any:
    x = node.src[0].arg
    if node.dtype == DType.BOOL:
        return bool(x)
    if node.dtype == DType.I32:
        return int(x) if math.isfinite(x) else None  # truncation toward zero, as torch's .int()
    return float(x)


def _shift_left(a: int, count: int) -> int:
    wide = (a << min(max(count, 0), 31)) & 0xFFFFFFFF if count < 32 else 0  # int32 wrap-around, as the kernels
    return wide - 2**32 if wide >= 2**31 else wide


# Python/torch semantics of each op on Python scalars.  Errors (x/0, log(0), overflow) mean "do not fold":
# the runtime computes the IEEE result.
FOLD = {
    Op.NEG: operator.neg, Op.ABS: abs, Op.EXP: math.exp, Op.EXP2: lambda x: 2.0**x, Op.LOG: math.log,
    Op.LOG2: math.log2, Op.SQRT: math.sqrt, Op.RSQRT: lambda x: 1 / math.sqrt(x), Op.TANH: math.tanh,
    Op.SIGMOID: _sigmoid, Op.SIN: math.sin, Op.COS: math.cos, Op.TAN: math.tan, Op.ERF: math.erf,
    Op.LOG1P: math.log1p, Op.EXPM1: math.expm1, Op.FLOOR: _floor, Op.ROUND: _round,
    Op.ADD: operator.add, Op.SUB: operator.sub, Op.MUL: operator.mul, Op.DIV: operator.truediv,
    Op.FLOORDIV: _floordiv, Op.MOD: operator.mod, Op.POW: operator.pow, Op.MIN: min, Op.MAX: max,
    Op.LT: operator.lt, Op.LE: operator.le, Op.GT: operator.gt, Op.GE: operator.ge, Op.EQ: operator.eq,
    Op.NE: operator.ne, Op.AND: operator.and_, Op.OR: operator.or_, Op.XOR: operator.xor,
    Op.SHL: _shift_left, Op.SHR: lambda a, count: a >> min(max(count, 0), 31),
}  # fmt: skip


def fold(node: Node) -> Node | None:
    args = [s.arg for s in node.src]
    if node.op in (Op.MIN, Op.MAX) and any(isinstance(a, float) and math.isnan(a) for a in args):
        return None  # torch.minimum propagates NaN, Python's min does not
    if node.op == Op.POW and isinstance(args[0], int) and isinstance(args[1], int) and args[1] < 0:
        return None  # torch refuses integers to negative integer powers
    try:
        if node.op == Op.NOT:
            value = (not args[0]) if node.dtype == DType.BOOL else ~args[0]
        elif node.op == Op.CAST:
            value = _cast(node)
        elif node.op == Op.WHERE:
            value = args[1] if args[0] else args[2]
        else:
            value = FOLD[node.op](*args)
    except (ArithmeticError, ValueError, TypeError):
        return None
    if isinstance(value, complex):
        return None
    return folded(node, value)


# ---------------------------------------------------------------- rule tables

CONSTANT_FOLDING: list[Rule] = [
    (lambda n: n.op not in (Op.CONST, Op.ARG, Op.LOAD) and all_const(n), fold),  # op(c1, c2) -> c
]


def _const_second(n: Node) -> Node | None:
    a, b = n.src
    return n.replace(src=(b, a)) if a.op == Op.CONST and b.op != Op.CONST else None


CANONICAL_ORDER: list[Rule] = [
    (COMMUTATIVE_OPS, _const_second),  # c + x -> x + c (constants second, so identities need one side)
]

INVERSE_COMPARISON = {Op.LT: Op.GE, Op.LE: Op.GT, Op.GT: Op.LE, Op.GE: Op.LT, Op.EQ: Op.NE, Op.NE: Op.EQ}
LOSSLESS_CASTS = {(DType.BOOL, DType.I32), (DType.BOOL, DType.F32)}


def _second_is(value: Any) -> Callable[[Node], bool]:
    def check(n: Node) -> bool:
        return len(n.src) == 2 and is_const(n.src[1]) and n.src[1].arg == value and not isinstance(n.src[1].arg, bool)

    return check


def _int(n: Node) -> bool:
    return n.dtype in (DType.I32, DType.BOOL)


def _same_operands(n: Node) -> bool:
    return len(n.src) == 2 and n.src[0] is n.src[1] or (len(n.src) == 2 and n.src[0] == n.src[1])


ALGEBRA: list[Rule] = [
    (lambda n: n.op == Op.ADD and _second_is(0)(n), lambda n: n.src[0]),  # x + 0 -> x
    (lambda n: n.op == Op.SUB and _second_is(0)(n), lambda n: n.src[0]),  # x - 0 -> x
    (lambda n: n.op == Op.MUL and _second_is(1)(n), lambda n: n.src[0]),  # x * 1 -> x
    (lambda n: n.op == Op.DIV and _second_is(1)(n) and n.src[0].dtype == DType.F32, lambda n: n.src[0]),  # x / 1 -> x
    (lambda n: n.op == Op.POW and _second_is(1)(n), lambda n: n.src[0]),  # x ** 1 -> x
    (lambda n: n.op == Op.MUL and _int(n) and _second_is(0)(n), lambda n: const(0, n.dtype)),  # x * 0 -> 0 (ints)
    (lambda n: n.op == Op.FLOORDIV and _int(n) and _second_is(1)(n), lambda n: n.src[0]),  # x // 1 -> x (ints)
    (lambda n: n.op == Op.MOD and _int(n) and _second_is(1)(n), lambda n: const(0, n.dtype)),  # x % 1 -> 0 (ints)
    (lambda n: n.op == Op.SUB and _int(n) and _same_operands(n), lambda n: const(0, n.dtype)),  # x - x -> 0 (ints)
    (lambda n: n.op == Op.ADD and _int(n) and n.src[0].op == Op.ADD and is_const(n.src[1])  # (x + c1) + c2 -> x + c
     and is_const(n.src[0].src[1]), lambda n: _reassociate(n)),
    (lambda n: n.op == Op.SUB and _int(n) and is_const(n.src[1]),  # x - c -> x + (-c) (ints)
     lambda n: n.replace(op=Op.ADD, src=(n.src[0], const(-n.src[1].arg, n.dtype)))
     if -n.src[1].arg >= INT32_MIN and n.src[1].arg != 0 else None),
    (Op.NEG, lambda n: n.src[0].src[0] if n.src[0].op == Op.NEG else None),  # -(-x) -> x
    (Op.NOT, lambda n: n.src[0].src[0] if n.src[0].op == Op.NOT else None),  # not not x -> x
    (Op.ABS, lambda n: n.src[0] if n.src[0].op == Op.ABS else None),  # abs(abs(x)) -> abs(x)
    (lambda n: n.op in (Op.MIN, Op.MAX, Op.AND, Op.OR) and _same_operands(n), lambda n: n.src[0]),  # x & x -> x
    (lambda n: n.op == Op.AND and n.dtype == DType.BOOL and is_const(n.src[1], True), lambda n: n.src[0]),  # x & 1 -> x
    (lambda n: n.op == Op.AND and n.dtype == DType.BOOL and is_const(n.src[1], False), lambda n: n.src[1]),  # x & 0 -> 0
    (lambda n: n.op == Op.OR and n.dtype == DType.BOOL and is_const(n.src[1], False), lambda n: n.src[0]),  # x | 0 -> x
    (lambda n: n.op == Op.OR and n.dtype == DType.BOOL and is_const(n.src[1], True), lambda n: n.src[1]),  # x | 1 -> 1
    (lambda n: n.op == Op.XOR and n.dtype == DType.BOOL and is_const(n.src[1], False), lambda n: n.src[0]),  # x ^ 0 -> x
    (lambda n: n.op == Op.XOR and n.dtype == DType.BOOL and is_const(n.src[1], True),  # x ^ 1 -> not x
     lambda n: Node(Op.NOT, DType.BOOL, (n.src[0],))),
    (lambda n: n.op in (Op.EQ, Op.LE, Op.GE) and _same_operands(n) and _int(n.src[0]),
     lambda n: const(True)),  # x == x -> True (ints; a float may be NaN)
    (lambda n: n.op in (Op.NE, Op.LT, Op.GT) and _same_operands(n) and _int(n.src[0]),
     lambda n: const(False)),  # x < x -> False (ints)
    (lambda n: n.op == Op.NOT and n.src[0].op in INVERSE_COMPARISON and _int(n.src[0].src[0]),
     lambda n: n.src[0].replace(op=INVERSE_COMPARISON[n.src[0].op])),  # not (a < b) -> a >= b (ints)
    (lambda n: n.op == Op.WHERE and is_const(n.src[0]), lambda n: n.src[1] if n.src[0].arg else n.src[2]),  # where(T,a,b) -> a
    (lambda n: n.op == Op.WHERE and n.src[1] == n.src[2], lambda n: n.src[1]),  # where(c, a, a) -> a
    (lambda n: n.op == Op.WHERE and n.src[0].op == Op.NOT,
     lambda n: n.replace(src=(n.src[0].src[0], n.src[2], n.src[1]))),  # where(not c, a, b) -> where(c, b, a)
    (lambda n: n.op == Op.WHERE and is_const(n.src[1], True) and is_const(n.src[2], False),
     lambda n: n.src[0]),  # where(c, True, False) -> c
    (lambda n: n.op == Op.WHERE and is_const(n.src[1], False) and is_const(n.src[2], True),
     lambda n: Node(Op.NOT, DType.BOOL, (n.src[0],))),  # where(c, False, True) -> not c
    (lambda n: n.op == Op.CAST and n.src[0].dtype == n.dtype, lambda n: n.src[0]),  # cast_T(x: T) -> x
    (lambda n: n.op == Op.CAST and n.src[0].op == Op.CAST and _collapsible(n),
     lambda n: n.replace(src=n.src[0].src)),  # cast_T(cast_U(x)) -> cast_T(x) when cast_U loses nothing
]


def _collapsible(n: Node) -> bool:
    inner = n.src[0]
    x = inner.src[0].dtype
    nonzero_preserving = n.dtype == DType.BOOL and x == DType.I32 and inner.dtype == DType.F32
    return (x, inner.dtype) in LOSSLESS_CASTS or nonzero_preserving


def _reassociate(n: Node) -> Node | None:
    inner, c2 = n.src
    total = inner.src[1].arg + c2.arg
    if not INT32_MIN <= total <= INT32_MAX:
        return None
    return n.replace(src=(inner.src[0], const(total, n.dtype)))


SIMPLIFY = CONSTANT_FOLDING + CANONICAL_ORDER + ALGEBRA
