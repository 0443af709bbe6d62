"""Derivatives of a score_mod, as IR: what the backward kernels multiply dS by.

Reverse mode over the DAG: the root's adjoint is 1; each node, visited users
first, hands its sources their share of its adjoint through a rule from
`VJP_RULES` (op -> vector-Jacobian product).  Only float (`F32`) nodes carry
adjoints: integer and bool values (indices, comparisons, casts to int) are
constant as far as differentiation goes, so they contribute zero.

`score_grad(root)` is the adjoint of the `score` ARG; `load_grads(root)` is the
adjoint of every float LOAD (a read of a captured tensor), which the backward
kernel scatters into that tensor's gradient at the load's indices.  Ties and
branch picks follow torch's autograd conventions, so the result equals
`torch.autograd` run on `flexcomp.evaluate` of the same IR.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from .ir import DType, Node, Op, const, promote, result_dtype, toposort

F32 = DType.F32
Adjoint = Node | None  # None means zero


# ---------------------------------------------------------------- builders with local simplification


def _is_const(node: Node, value: float) -> bool:
    return node.op == Op.CONST and node.dtype != DType.BOOL and node.arg == value


def _fold(op: Op, *src: Node) -> Node | None:
    """Constant-fold float arithmetic on constants (ints promote as in the IR)."""
    if not all(s.op == Op.CONST and s.dtype != DType.BOOL for s in src):
        return None
    values = [float(s.arg) for s in src]
    folded = {Op.ADD: lambda a, b: a + b, Op.SUB: lambda a, b: a - b, Op.MUL: lambda a, b: a * b,
              Op.NEG: lambda a: -a}.get(op)  # fmt: skip
    if folded is None or result_dtype(op, tuple(s.dtype for s in src)) != F32:
        return None
    return const(folded(*values), F32)


def _as(node: Node, dtype: DType) -> Node:
    if node.dtype == dtype:
        return node
    return const(node.arg, dtype) if node.op == Op.CONST else Node(Op.CAST, dtype, (node,))


def _node(op: Op, *src: Node) -> Node:
    """op(*src) with explicit casts to the operands' common dtype (the IR invariant compiler.check_ir checks)."""
    operands = src[1:] if op == Op.WHERE else src
    common = promote(*(s.dtype for s in operands))
    operands = tuple(_as(s, common) for s in operands)
    src = (src[0], *operands) if op == Op.WHERE else operands
    return _fold(op, *src) or Node(op, result_dtype(op, tuple(s.dtype for s in src)), tuple(src))


def _f32(node: Node) -> Node:
    """Adjoints are always float: an int partial (`score * h` -> h) is cast."""
    if node.dtype == F32:
        return node
    if node.op == Op.CONST:
        return const(float(node.arg), F32)
    return Node(Op.CAST, F32, (node,))


def num(value: float) -> Node:
    return const(value, F32)


def mul(a: Node, b: Node) -> Node:
    if _is_const(a, 1):  # 1 * b -> b
        return _f32(b)
    if _is_const(b, 1):  # a * 1 -> a
        return _f32(a)
    if _is_const(a, -1):  # -1 * b -> -b
        return neg(b)
    if _is_const(b, -1):  # a * -1 -> -a
        return neg(a)
    return _node(Op.MUL, a, b)


def add(a: Node, b: Node) -> Node:
    if _is_const(a, 0):  # 0 + b -> b
        return _f32(b)
    if _is_const(b, 0):  # a + 0 -> a
        return _f32(a)
    if b.op == Op.NEG:  # a + -b -> a - b
        return sub(a, b.src[0])
    return _node(Op.ADD, a, b)


def sub(a: Node, b: Node) -> Node:
    if _is_const(b, 0):  # a - 0 -> a
        return _f32(a)
    if _is_const(a, 0):  # 0 - b -> -b
        return neg(b)
    return _node(Op.SUB, a, b)


def neg(a: Node) -> Node:
    if a.op == Op.NEG:  # --a -> a
        return _f32(a.src[0])
    return _node(Op.NEG, a)


def div(a: Node, b: Node) -> Node:
    if _is_const(b, 1):  # a / 1 -> a
        return _f32(a)
    return _node(Op.DIV, a, b)


def where(cond: Node, a: Node, b: Node) -> Node:
    if a == b:  # where(c, a, a) -> a
        return _f32(a)
    return _node(Op.WHERE, cond, _f32(a), _f32(b))


def fn(op: Op, *src: Node) -> Node:
    if op == Op.POW and _is_const(src[1], 1):  # a ** 1 -> a
        return _f32(src[0])
    return _node(op, *src)


# ---------------------------------------------------------------- vector-Jacobian rules
# Each rule gets the node y = op(x, ...) and its adjoint g, and returns one adjoint
# contribution per source (None: zero).  Contributions to int/bool sources are ignored.

Rule = Callable[[Node, Node], tuple[Adjoint, ...]]
LN2 = math.log(2.0)
TWO_OVER_SQRT_PI = 2.0 / math.sqrt(math.pi)


def _min_max_share(first: Node, second: Node, g: Node, wins: Op) -> Node:
    # torch splits a tie evenly: g where first wins, g/2 on a tie, 0 where it loses
    win = _node(wins, first, second)
    tie = _node(Op.EQ, first, second)
    return where(win, g, where(tie, mul(num(0.5), g), num(0.0)))


def _pow_rule(y: Node, g: Node) -> tuple[Adjoint, ...]:
    base, exponent = y.src
    zero = num(0.0)
    # d a^b / da = b * a^(b-1), taken as 0 where b == 0 (torch's pow_backward)
    d_base = mul(g, mul(exponent, fn(Op.POW, base, sub(exponent, num(1.0)))))
    if not (exponent.op == Op.CONST and exponent.arg != 0):
        d_base = where(_node(Op.EQ, exponent, zero), zero, d_base)
    # d a^b / db = a^b * ln(a), taken as 0 where a == 0 and b >= 0 (torch's pow_backward_exponent)
    base_zero = _node(Op.AND, _node(Op.EQ, base, zero), _node(Op.GE, exponent, zero))
    d_exponent = where(base_zero, zero, mul(g, mul(y, fn(Op.LOG, base))))
    return d_base, d_exponent


VJP_RULES: dict[Op, Rule] = {
    Op.NEG: lambda y, g: (neg(g),),  # d -x = -1
    Op.ABS: lambda y, g: (where(_node(Op.GT, y.src[0], num(0.0)), g,  # d |x| = sign(x), 0 at 0
                                where(_node(Op.LT, y.src[0], num(0.0)), neg(g), num(0.0))),),
    Op.EXP: lambda y, g: (mul(g, y),),  # d exp(x) = exp(x)
    Op.EXP2: lambda y, g: (mul(g, mul(y, num(LN2))),),  # d 2^x = 2^x ln 2
    Op.LOG: lambda y, g: (div(g, y.src[0]),),  # d ln x = 1/x
    Op.LOG2: lambda y, g: (div(g, mul(y.src[0], num(LN2))),),  # d log2 x = 1/(x ln 2)
    Op.SQRT: lambda y, g: (div(g, mul(num(2.0), y)),),  # d sqrt(x) = 1/(2 sqrt(x))
    Op.RSQRT: lambda y, g: (mul(g, mul(num(-0.5), mul(y, mul(y, y)))),),  # d x^-1/2 = -1/2 x^-3/2
    Op.TANH: lambda y, g: (mul(g, sub(num(1.0), mul(y, y))),),  # d tanh(x) = 1 - tanh(x)^2
    Op.SIGMOID: lambda y, g: (mul(g, mul(y, sub(num(1.0), y))),),  # d s(x) = s(x)(1 - s(x))
    Op.SIN: lambda y, g: (mul(g, fn(Op.COS, y.src[0])),),  # d sin x = cos x
    Op.COS: lambda y, g: (neg(mul(g, fn(Op.SIN, y.src[0]))),),  # d cos x = -sin x
    Op.TAN: lambda y, g: (mul(g, add(num(1.0), mul(y, y))),),  # d tan x = 1 + tan(x)^2
    Op.ERF: lambda y, g: (mul(g, mul(num(TWO_OVER_SQRT_PI), fn(Op.EXP, neg(mul(y.src[0], y.src[0]))))),),  # 2/sqrt(pi) e^-x^2
    Op.LOG1P: lambda y, g: (div(g, add(num(1.0), y.src[0])),),  # d log(1 + x) = 1/(1 + x)
    Op.EXPM1: lambda y, g: (mul(g, add(y, num(1.0))),),  # d (e^x - 1) = e^x = expm1(x) + 1
    Op.FLOOR: lambda y, g: (None,),  # d floor(x) = 0 (piecewise constant)
    Op.ROUND: lambda y, g: (None,),  # d round(x) = 0 (piecewise constant)
    Op.CAST: lambda y, g: (g,),  # d f32(x) = 1 for a float x; int casts carry no adjoint
    Op.ADD: lambda y, g: (g, g),  # d (a + b) = (1, 1)
    Op.SUB: lambda y, g: (g, neg(g)),  # d (a - b) = (1, -1)
    Op.MUL: lambda y, g: (mul(g, y.src[1]), mul(g, y.src[0])),  # d (a b) = (b, a)
    Op.DIV: lambda y, g: (div(g, y.src[1]),  # d (a / b) = (1/b, -a/b^2)
                          neg(div(mul(g, y.src[0]), mul(y.src[1], y.src[1])))),
    Op.FLOORDIV: lambda y, g: (None, None),  # d floor(a / b) = 0
    Op.MOD: lambda y, g: (g, neg(mul(g, fn(Op.FLOORDIV, *y.src)))),  # d (a - b floor(a/b)) = (1, -floor(a/b))
    Op.POW: _pow_rule,  # d a^b = (b a^(b-1), a^b ln a)
    Op.MIN: lambda y, g: (_min_max_share(*y.src, g, Op.LT), _min_max_share(y.src[1], y.src[0], g, Op.LT)),
    Op.MAX: lambda y, g: (_min_max_share(*y.src, g, Op.GT), _min_max_share(y.src[1], y.src[0], g, Op.GT)),
    Op.LOAD: lambda y, g: tuple(None for _ in y.src),  # indices are ints: a read's adjoint stays on the read
    Op.WHERE: lambda y, g: (None, where(y.src[0], g, num(0.0)), where(y.src[0], num(0.0), g)),  # picks a branch
}


# ---------------------------------------------------------------- reverse mode


def adjoints(root: Node) -> dict[Node, Node]:
    """d root / d node for every float node that root depends on (absent: zero)."""
    if root.dtype != F32:
        return {}
    adjoint: dict[Node, Node] = {root: num(1.0)}
    for node in reversed(toposort(root)):
        g = adjoint.get(node)
        if g is None or not node.src or node.dtype != F32:
            continue
        rule = VJP_RULES.get(node.op)
        if rule is None:
            raise NotImplementedError(f"no derivative rule for float op {node.op.value}")
        for source, share in zip(node.src, rule(node, g)):
            if share is None or source.dtype != F32:
                continue
            adjoint[source] = add(adjoint[source], share) if source in adjoint else _f32(share)
    return adjoint


def _simplified(node: Node) -> Node:
    from .compiler import optimize  # the front end's rule tables: constant folding, algebra, CSE

    return optimize(node, "derivative")


def score_grad(root: Node) -> Node:
    """d score_mod / d score, as F32 IR over the mod's ARGs and captured tensors."""
    return _simplified(adjoints(root).get(Node(Op.ARG, F32, (), "score"), num(0.0)))


def load_grads(root: Node) -> list[tuple[Node, Node]]:
    """(load, d root / d load) for every read of a captured float tensor that root depends on.

    Structurally equal reads are one node, whose adjoint already sums all its uses;
    reads of one tensor at different indices are separate entries, each to be
    scattered (accumulated) into that tensor's gradient.
    """
    grads = adjoints(root)
    return [(node, _simplified(grads[node])) for node in toposort(root) if node.op == Op.LOAD and node in grads]
