"""Closed-form kv ranges per q tile, derived with sympy (`ClosedFormBounds`, see flexcomp/tiles.py).

For a mask whose true set in each row q is one kv interval [lo(q), hi(q)), with lo and hi
(floor-)affine in q and monotone, the ranges over a tile of rows [q_lo, q_hi] are endpoint
values: visited = [min lo, max hi), full = [max lo, min hi).  Steps:

1. the boolean structure becomes an interval in kv: AND intersects (Max of lows, Min of highs);
   OR only joins two half-lines of the same side; NOT is pushed into comparisons;
2. each comparison `s*X + g(q) op 0`, X = kv or floor(a*kv + e) with a > 0, is solved for kv;
3. monotonicity in q is read off the expression (q, +, positive scaling, floor, Max, Min);
4. exactness is proven before bounds are offered: every row is non-empty and consecutive rows
   overlap (for all q >= 0), by writing q = M*t + r for M the lcm of the floor denominators,
   which makes every floor affine in t, and checking each (Max/Min of affine) piece for t >= 0.

Anything outside this fragment (tables, b/h, modulo of kv, !=) gives None.  int32 wrap-around
is not modeled: bounds assume indices and constants far from 2**31.
"""

from __future__ import annotations

import math
from functools import lru_cache

import sympy as sp

from ..ir import DType, Node, Op, arg, const, free_args
from ..tiles import ClosedFormBounds

Q, KV = sp.Symbol("q", integer=True), sp.Symbol("kv", integer=True)
T = sp.Symbol("t", integer=True, nonnegative=True)
MAX_PERIOD = 4096
ROW_OFF = 1 << 30  # a kv bound past any kv: a row's condition false gives [ROW_OFF, 0), true [0, ROW_OFF)


class _Unsupported(Exception):
    """The expression is outside the closed-form fragment."""


# ---------------------------------------------------------------- IR -> sympy

_SYM_ARITH = {Op.ADD: lambda a, b: a + b, Op.SUB: lambda a, b: a - b, Op.MUL: lambda a, b: a * b,
              Op.MIN: sp.Min, Op.MAX: sp.Max}  # fmt: skip


Params = dict  # Node -> sp.Symbol: kv-free subexpressions held opaque (row_bounds.py); None: none are


def to_sym(node: Node, params: Params | None = None) -> sp.Expr:
    """The i32 expression `node` in sympy; with `params`, every kv-free subexpression that is not q_idx or a
    constant becomes a symbol of its own (recorded there): a value constant within a row."""
    if node.dtype != DType.I32:
        raise _Unsupported(node.op)
    if node.op == Op.CONST:
        return sp.Integer(node.arg)
    if node.op == Op.ARG and node.arg in ("q_idx", "kv_idx"):
        return Q if node.arg == "q_idx" else KV
    if params is not None and "kv_idx" not in free_args(node):
        return _param(node, params)
    if node.op in _SYM_ARITH:
        return _SYM_ARITH[node.op](*(to_sym(s, params) for s in node.src))
    if node.op == Op.NEG:
        return -to_sym(node.src[0], params)
    if node.op == Op.ABS:
        return sp.Abs(to_sym(node.src[0], params))
    if node.op in (Op.FLOORDIV, Op.MOD) and node.src[1].op == Op.CONST and node.src[1].arg != 0:
        x, d = to_sym(node.src[0], params), sp.Integer(node.src[1].arg)
        return sp.floor(x / d) if node.op == Op.FLOORDIV else x - d * sp.floor(x / d)  # a // d, a % d
    raise _Unsupported(node.op)


# ---------------------------------------------------------------- the kv interval of a row

FLIP = {Op.LT: Op.GT, Op.LE: Op.GE, Op.GT: Op.LT, Op.GE: Op.LE, Op.EQ: Op.EQ}
NEGATE = {Op.LT: Op.GE, Op.LE: Op.GT, Op.GT: Op.LE, Op.GE: Op.LT, Op.EQ: Op.NE, Op.NE: Op.EQ}


def _param(node: Node, params: Params) -> sp.Symbol:
    if node not in params:
        params[node] = sp.Symbol(f"p{len(params)}", integer=True)
    return params[node]


def kv_interval(node: Node, negate: bool = False, params: Params | None = None) -> tuple[sp.Expr, sp.Expr]:
    """[lo, hi) with mask(q, kv) <=> lo <= kv < hi (lo may be -oo, hi oo); `params`: see to_sym."""
    op = node.op
    if node.dtype == DType.BOOL and op == Op.NOT:
        return kv_interval(node.src[0], not negate, params)
    if params is not None and node.dtype == DType.BOOL and "kv_idx" not in free_args(node):
        # a condition on the row alone (q_idx < lengths[b]): every kv or none, as 0/1 times a bound past any kv
        kept = _param(Node(Op.CAST, DType.I32, (Node(Op.NOT, DType.BOOL, (node,)) if negate else node,)), params)
        return (1 - kept) * ROW_OFF, kept * ROW_OFF
    if node.dtype == DType.BOOL and op in (Op.AND, Op.OR):
        (lo1, hi1), (lo2, hi2) = (kv_interval(s, negate, params) for s in node.src)
        if (op == Op.AND) != negate:  # a & b, or ~(a | b)
            return sp.Max(lo1, lo2), sp.Min(hi1, hi2)
        if lo1 == -sp.oo and lo2 == -sp.oo:  # kv < x | kv < y  ->  kv < max(x, y)
            return -sp.oo, sp.Max(hi1, hi2)
        if hi1 == sp.oo and hi2 == sp.oo:
            return sp.Min(lo1, lo2), sp.oo
        raise _Unsupported("a union of two kv ranges")
    if op == Op.CONST and node.dtype == DType.BOOL:
        return (-sp.oo, sp.oo) if bool(node.arg) != negate else (sp.oo, -sp.oo)
    if op not in FLIP and op != Op.NE:
        raise _Unsupported(op)
    cmp = NEGATE[op] if negate else op
    a, b = node.src
    for x, y, c in ((a, b, cmp), (b, a, FLIP.get(cmp, cmp))):
        if x.op == Op.ABS and c in (Op.LE, Op.LT):  # |x| <= y  ->  x <= y & -x <= y
            neg_x = Node(Op.NEG, DType.I32, (x.src[0],))
            both = Node(Op.AND, DType.BOOL, (Node(c, DType.BOOL, (x.src[0], y)), Node(c, DType.BOOL, (neg_x, y))))
            return kv_interval(both, params=params)
    return solve(to_sym(a, params) - to_sym(b, params), cmp)


def solve(expr: sp.Expr, cmp: Op) -> tuple[sp.Expr, sp.Expr]:
    """The kv interval of `expr cmp 0`."""
    indep, dep = sp.expand(expr).as_independent(KV, as_Add=True)
    if dep == 0:
        raise _Unsupported("a condition on q alone")
    s, x = dep.as_coeff_Mul()
    if not s.is_Rational or s == 0 or cmp == Op.NE:
        raise _Unsupported(dep)
    c = -indep / s
    cmp = FLIP[cmp] if s < 0 else cmp
    if cmp == Op.EQ:
        lo, _ = _bound(x, c, Op.GE)
        _, hi = _bound(x, c, Op.LE)
        return lo, hi
    return _bound(x, c, cmp)


def _bound(x: sp.Expr, c: sp.Expr, cmp: Op) -> tuple[sp.Expr, sp.Expr]:
    """The kv interval of `x cmp c`, x = kv or floor(a*kv + e) (a > 0), x an integer."""
    upper = cmp in (Op.LE, Op.LT)
    # integer x: x <= c <=> x <= floor(c);  x < c <=> x <= ceil(c) - 1;  x >= c <=> x >= ceil(c);  x > c <=> x >= floor(c) + 1
    f = {Op.LE: sp.floor(c), Op.LT: sp.ceiling(c) - 1, Op.GE: sp.ceiling(c), Op.GT: sp.floor(c) + 1}[cmp]
    if x == KV:
        return (-sp.oo, f + 1) if upper else (f, sp.oo)
    if isinstance(x, sp.floor):
        u = sp.expand(x.args[0])
        a = u.coeff(KV)
        e = u - a * KV
        if not (a.is_Rational and a > 0) or e.has(KV):
            raise _Unsupported(x)
        # floor(u) <= f <=> u < f + 1 <=> kv < (f + 1 - e)/a;  floor(u) >= f <=> kv >= (f - e)/a
        return (-sp.oo, sp.ceiling((f + 1 - e) / a)) if upper else (sp.ceiling((f - e) / a), sp.oo)
    raise _Unsupported(x)


# ---------------------------------------------------------------- monotonicity and proofs


def direction(e: sp.Expr) -> int | None:
    """+1 non-decreasing in q, -1 non-increasing, 0 constant, None unknown."""
    if not e.has(Q):
        return 0
    if e == Q:
        return 1
    if isinstance(e, (sp.Add, sp.Max, sp.Min)):
        return _combine([direction(a) for a in e.args])
    if isinstance(e, (sp.floor, sp.ceiling)):
        return direction(e.args[0])
    if isinstance(e, sp.Mul):
        coeff, rest = e.as_coeff_Mul()
        d = direction(rest)
        return None if d is None or not coeff.is_Rational else d * (1 if coeff > 0 else -1)
    return None


def _combine(dirs: list[int | None]) -> int | None:
    if None in dirs:
        return None
    signs = {d for d in dirs if d}
    return 0 if not signs else signs.pop() if len(signs) == 1 else None


def _period(e: sp.Expr) -> int:
    dens = [sp.expand(f.args[0]).coeff(Q) for f in e.atoms(sp.floor, sp.ceiling)]
    return math.lcm(1, *(int(sp.Rational(d).q) for d in dens if d.is_Rational))


def nonneg_for_all_q(e: sp.Expr) -> bool:
    """A proof (or False) that e(q) >= 0 for every integer q >= 0."""
    if e == sp.oo or (e.is_number and e >= 0):
        return True
    if e.is_number:
        return False
    m = _period(e)
    if m > MAX_PERIOD:
        return False
    return all(_nonneg_in_t(sp.expand(e.subs(Q, m * T + r))) for r in range(m))


def _nonneg_in_t(e: sp.Expr) -> bool:
    if e == sp.oo:
        return True
    if isinstance(e, sp.Min):
        return all(_nonneg_in_t(a) for a in e.args)
    if isinstance(e, sp.Max):
        return any(_nonneg_in_t(a) for a in e.args)
    if isinstance(e, sp.Add):
        for term in e.args:  # a + max(b, c) = max(a + b, a + c)
            inner = term if isinstance(term, (sp.Max, sp.Min)) else None
            if inner is not None:
                rest = e - term
                return _nonneg_in_t(type(inner)(*(sp.expand(x + rest) for x in inner.args)))
    if isinstance(e, sp.Mul):
        coeff, rest = e.as_coeff_Mul()
        if isinstance(rest, (sp.Max, sp.Min)) and coeff.is_Rational:
            flipped = type(rest) if coeff > 0 else (sp.Min if isinstance(rest, sp.Max) else sp.Max)
            return _nonneg_in_t(flipped(*(sp.expand(coeff * x) for x in rest.args)))
    try:
        poly = sp.Poly(e, T)
    except sp.PolynomialError:
        return False
    if poly.degree() > 1 or any(not c.is_number for c in poly.all_coeffs()):
        return False
    coeffs = poly.all_coeffs()
    slope, offset = (coeffs[0], coeffs[1]) if len(coeffs) == 2 else (0, coeffs[0])
    return bool(slope >= 0 and offset >= 0)


# ---------------------------------------------------------------- sympy -> IR


def to_ir(e: sp.Expr, q_node: Node, infinite: Node, nodes_of: dict | None = None) -> Node:
    """`e` as i32 IR: q is `q_node`, +-oo `infinite`, a parameter symbol its node (`nodes_of`)."""
    if e in (sp.oo, -sp.oo):
        return infinite
    if e.is_Integer:
        return const(int(e))
    if e == Q:
        return q_node
    if nodes_of and e in nodes_of:
        return nodes_of[e]

    def sub(x: sp.Expr) -> Node:
        return to_ir(x, q_node, infinite, nodes_of)

    if isinstance(e, (sp.Max, sp.Min)):
        op = Op.MAX if isinstance(e, sp.Max) else Op.MIN
        nodes = [sub(a) for a in e.args]
        out = nodes[0]
        for n in nodes[1:]:
            out = Node(op, DType.I32, (out, n))
        return out
    if isinstance(e, (sp.floor, sp.ceiling)):
        num, den = sp.fraction(sp.together(e.args[0]))
        if not den.is_Integer or den <= 0:
            raise _Unsupported(e)
        if isinstance(e, sp.floor):
            return Node(Op.FLOORDIV, DType.I32, (sub(sp.expand(num)), const(int(den))))
        neg = sub(sp.expand(-num))  # ceil(n/d) = -((-n) // d)
        return Node(Op.NEG, DType.I32, (Node(Op.FLOORDIV, DType.I32, (neg, const(int(den)))),))
    if isinstance(e, sp.Add):
        terms = list(e.as_ordered_terms())
        out = sub(terms[0])
        for t in terms[1:]:
            coeff, rest = t.as_coeff_Mul()
            if coeff.is_Rational and coeff < 0:
                out = Node(Op.SUB, DType.I32, (out, sub(-t)))
            else:
                out = Node(Op.ADD, DType.I32, (out, sub(t)))
        return out
    if isinstance(e, sp.Mul):
        coeff, rest = e.as_coeff_Mul()
        if coeff.is_Integer:
            if coeff == -1:
                return Node(Op.NEG, DType.I32, (sub(rest),))
            return Node(Op.MUL, DType.I32, (const(int(coeff)), sub(rest)))
    raise _Unsupported(e)


# ---------------------------------------------------------------- entry point


def derive_bounds(ir: Node) -> ClosedFormBounds | None:
    """Exact per-tile kv ranges of a mask, or None when they cannot be proven (see the module docstring)."""
    try:
        lo, hi = kv_interval(ir)
        lo, hi = sp.simplify(lo), sp.simplify(hi)
        d_lo, d_hi = direction(lo), direction(hi)
        if d_lo is None or d_hi is None or lo.free_symbols - {Q} or hi.free_symbols - {Q}:
            return None
        if not nonneg_for_all_q(hi - lo - 1):  # every row non-empty
            return None
        if d_lo >= 0 and d_hi >= 0 and not nonneg_for_all_q(hi - lo.subs(Q, Q + 1)):  # rows overlap
            return None
        if d_lo <= 0 and d_hi <= 0 and not nonneg_for_all_q(hi.subs(Q, Q + 1) - lo):
            return None
        q_lo, q_hi = arg("q_lo"), arg("q_hi")
        zero, kv_len = const(0), arg("KV_LEN")
        first, last = (q_lo, q_hi) if d_lo >= 0 else (q_hi, q_lo)  # rows where lo is smallest / largest
        h_first, h_last = (q_lo, q_hi) if d_hi >= 0 else (q_hi, q_lo)
        return ClosedFormBounds(kv_lo=to_ir(lo, first, zero), kv_hi=to_ir(hi, h_last, kv_len),
                                full_lo=to_ir(lo, last, zero), full_hi=to_ir(hi, h_first, kv_len))
    except (_Unsupported, TypeError, ValueError):
        return None


@lru_cache(maxsize=256)
def _cached(ir: Node) -> ClosedFormBounds | None:
    return derive_bounds(ir)


def closed_form_bounds(mod) -> ClosedFormBounds | None:
    """`ClosedFormBounds` for a mask Mod (or IR node), cached by IR; None when not provable."""
    ir = mod if isinstance(mod, Node) else mod.ir
    if mod is not ir and getattr(mod, "buffers", ()):
        return None
    return _cached(ir)
