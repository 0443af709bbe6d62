"""Typed IR node builders: explicit CASTs wherever torch would promote implicitly.

Backends never need promotion rules of their own because every operand pair reaching them already agrees.
"""

from __future__ import annotations

import numbers
from typing import Any

from ..errors import FlexcompTypeError, SignatureError
from ..ir import (
    ARG_DTYPES,
    ARITHMETIC_OPS,
    COMPARISON_OPS,
    INT32_MAX,
    INT32_MIN,
    LOGICAL_OPS,
    MASK_MOD_ARGS,
    SCORE_MOD_ARGS,
    SHIFT_OPS,
    DType,
    Node,
    Op,
    arg,
    const,
    promote,
    result_dtype,
    substitute,
)
from ..rewrite import fold

OP_SYMBOL = {Op.ADD: "+", Op.SUB: "-", Op.MUL: "*", Op.DIV: "/", Op.FLOORDIV: "//", Op.MOD: "%", Op.POW: "**",
             Op.AND: "&", Op.OR: "|", Op.XOR: "^", Op.LT: "<", Op.LE: "<=", Op.GT: ">", Op.GE: ">=", Op.EQ: "==",
             Op.NE: "!=", Op.SHL: "<<", Op.SHR: ">>"}  # fmt: skip
BINOPS = {v: k for k, v in OP_SYMBOL.items()}


def cast(x: Node, dtype: DType, loc: Any = None) -> Node:
    return x if x.dtype == dtype else Node(Op.CAST, dtype, (x,), None, loc or x.loc)


def to_bool(x: Node, loc: Any = None) -> Node:
    return cast(x, DType.BOOL, loc)


def unary(op: Op, x: Node, loc: Any) -> Node:
    if op == Op.NOT and x.dtype == DType.F32:
        raise FlexcompTypeError("`~` needs a bool or an int, got a float", loc, "use `not` or a comparison")
    if op in (Op.NEG, Op.ABS, Op.FLOOR) and x.dtype == DType.BOOL:
        x = cast(x, DType.I32, loc)
    if result_dtype(op, (x.dtype,)) == DType.F32:
        x = cast(x, DType.F32, loc)
    return Node(op, result_dtype(op, (x.dtype,)), (x,), None, loc)


def binary(op: Op, a: Node, b: Node, loc: Any) -> Node:
    if op == Op.DIV:
        a, b = cast(a, DType.F32, loc), cast(b, DType.F32, loc)
    elif op in LOGICAL_OPS:
        if DType.F32 in (a.dtype, b.dtype):
            raise FlexcompTypeError(f"`{OP_SYMBOL[op]}` needs bools or ints, got a float", loc,
                                    "compare first, e.g. `(x > 0) & (y > 0)`")
        common = promote(a.dtype, b.dtype)
        a, b = cast(a, common, loc), cast(b, common, loc)
    elif op in SHIFT_OPS:  # ints only; a bool counts as 0/1
        if DType.F32 in (a.dtype, b.dtype):
            raise FlexcompTypeError(f"`{OP_SYMBOL[op]}` needs ints, got a float", loc, "use int(...) first")
        a, b = cast(a, DType.I32, loc), cast(b, DType.I32, loc)
    elif op in ARITHMETIC_OPS or op in COMPARISON_OPS:
        common = promote(a.dtype, b.dtype)
        if common == DType.BOOL and op in ARITHMETIC_OPS:  # True + True is 2, as in torch
            common = DType.I32
        a, b = cast(a, common, loc), cast(b, common, loc)
    return Node(op, result_dtype(op, (a.dtype, b.dtype)), (a, b), None, loc)


def where(c: Node, a: Node, b: Node, loc: Any) -> Node:
    common = promote(a.dtype, b.dtype)
    a, b = cast(a, common, loc), cast(b, common, loc)
    return Node(Op.WHERE, common, (to_bool(c, loc), a, b), None, loc)


def clamp(x: Node, lo: Node | None, hi: Node | None, loc: Any) -> Node:
    # ints: clamp(x, lo, hi) -> MIN(MAX(x, lo), hi), a missing bound left out (what the sparsity algebra reads);
    # floats: WHERE(x < lo, lo, x), then WHERE(x > hi, hi, x), so that at a bound x keeps its whole gradient, as
    # torch's clamp (MAX splits it at a tie, as torch.maximum) and NaN stays NaN
    if DType.F32 not in (x.dtype, *(b.dtype for b in (lo, hi) if b is not None)):
        if lo is not None:
            x = binary(Op.MAX, x, lo, loc)
        return x if hi is None else binary(Op.MIN, x, hi, loc)
    x = cast(x, DType.F32, loc)
    for bound, outside in ((lo, Op.LT), (hi, Op.GT)):
        if bound is not None:
            bound = cast(bound, DType.F32, loc)
            x = where(binary(outside, x, bound, loc), bound, x, loc)
    return x


def logical(op: Op, a: Node, b: Node, loc: Any) -> Node:
    return Node(op, DType.BOOL, (to_bool(a, loc), to_bool(b, loc)), None, loc)


def logical_not(x: Node, loc: Any) -> Node:
    return Node(Op.NOT, DType.BOOL, (to_bool(x, loc),), None, loc)


def int_const(value: int, loc: Any, what: str = "integer") -> Node:
    if not INT32_MIN <= value <= INT32_MAX:
        raise FlexcompTypeError(f"{what} {value} does not fit in int32", loc, "indices and int constants are int32")
    return const(int(value), DType.I32, loc)


def number(value: Any, loc: Any, what: str = "integer") -> Node | None:
    """A Python bool, int or float as a constant node (bool, int32, float32), or None for anything else."""
    if isinstance(value, bool):
        return const(value, DType.BOOL, loc)
    if isinstance(value, numbers.Integral):
        return int_const(int(value), loc, what)
    if isinstance(value, numbers.Real):
        return const(float(value), DType.F32, loc)
    return None


def is_nan(x: Node, loc: Any) -> Node:
    # isnan(x) -> x != x
    return binary(Op.NE, x, x, loc)


def constant(node: Node) -> Node | None:
    """`node` folded to a CONST when it is computed from constants only (`-1`, `N - 1`), else None."""
    if node.op == Op.CONST:
        return node
    sources = tuple(constant(s) for s in node.src)
    if not sources or None in sources:
        return None
    return fold(node.replace(src=sources))


def add_all(items: tuple[Node, ...], loc: Any) -> Node:
    """items[0] + items[1] + ... (torch's sum of a bool or int row is an int)."""
    total = items[0] if items[0].dtype != DType.BOOL else cast(items[0], DType.I32, loc)
    for x in items[1:]:
        total = binary(Op.ADD, total, x, loc)
    return total


def inline_mod(mod: Any, args: list[Node], buffers: Any, guards: Any, loc: Any,
               arg_locs: list[Any] | None = None) -> Node:
    """A call to another mod: its raw IR (its captured tensors merged into `buffers`, a BufferTable, and its
    guards into `guards`, a GuardTable) with its canonical arguments replaced by `args`."""
    names = SCORE_MOD_ARGS if mod.kind == "score" else MASK_MOD_ARGS
    if len(args) != len(names):
        raise SignatureError(f"{mod.kind}_mod {mod.name!r} takes {len(names)} positional arguments "
                             f"({', '.join(names)}), got {len(args)}", loc)
    mapping = {}
    for i, (name, node) in enumerate(zip(names, args)):
        want = ARG_DTYPES[name]
        if want == DType.I32 and node.dtype == DType.F32:
            raise FlexcompTypeError(f"argument {name!r} of {mod.name!r} must be an int, got a float",
                                    arg_locs[i] if arg_locs else loc)
        mapping[arg(name)] = cast(node, want, loc)
    mod = mod.specialized()  # the called mod's captured values as they are now
    if guards is not None:
        guards.merge(mod.guards)  # and re-read at every call of the caller
    return substitute(buffers.merge(mod.buffers, mod.resolvers, mod.raw_ir), mapping)
