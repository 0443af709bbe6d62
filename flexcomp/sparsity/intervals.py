"""Abstract interpretation of a mask's IR over every tile at once.

Each node evaluates to per-tile tensors broadcastable to the grid [B, H, q blocks, kv blocks]:
ints and floats to an interval [lo, hi] (int64 / float64; bools as 0/1), booleans to
(can_be_true, can_be_false).  Every rule over-approximates what the evaluator can produce,
so "cannot be false" proves FULL and "cannot be true" proves EMPTY; anything else is PARTIAL.

Floats: bounds are widened by a few float32 ulps after each op (the evaluator rounds), and a
bound that may be NaN is NaN; a comparison with a possible NaN can be both true and false.
Ints: an interval leaving int32 is replaced by all of int32 (the evaluator wraps).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..ir import COMPARISON_OPS, INT32_MAX, INT32_MIN, DType, Node, Op
from .linear import Constraint, linear, literal_constraint
from .summaries import load_bounds

Tensor = torch.Tensor
Ival = tuple[Tensor, Tensor]
Truth = tuple[Tensor, Tensor]  # (can_be_true, can_be_false)
F32_REL, F32_ABS = 2.0**-20, 1e-30
F32_MAX = torch.finfo(torch.float32).max


def _t(x: float | bool, dtype: torch.dtype) -> Tensor:
    return torch.tensor(x, dtype=dtype).view(1, 1, 1, 1)


def widen(lo: Tensor, hi: Tensor) -> Ival:
    """Account for float32 rounding of the evaluator: a few ulps outward (infinities and NaN stay), and a bound
    past float32's range is infinite (exp(100) is finite in float64 but overflows in float32)."""
    lo = torch.where(torch.isfinite(lo), lo - lo.abs() * F32_REL - F32_ABS, lo)
    hi = torch.where(torch.isfinite(hi), hi + hi.abs() * F32_REL + F32_ABS, hi)
    return torch.where(lo < -F32_MAX, -math.inf, lo), torch.where(hi > F32_MAX, math.inf, hi)


def clamp_int(lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """int32 wrap-around: an interval leaving int32 becomes all of it; also returns where that happened."""
    wrapped = (lo < INT32_MIN) | (hi > INT32_MAX)
    return torch.where(wrapped, INT32_MIN, lo), torch.where(wrapped, INT32_MAX, hi), wrapped


def _corners(f: Callable[[Tensor, Tensor], Tensor], a: Ival, b: Ival) -> Ival:
    vals = [f(x, y) for x in a for y in b]
    return torch.stack(torch.broadcast_tensors(*vals)).amin(0), torch.stack(torch.broadcast_tensors(*vals)).amax(0)


def _nan_top(shape_like: Tensor) -> Ival:
    nan = torch.full_like(shape_like, float("nan"), dtype=torch.float64)
    return nan, nan


def _float_arith(op: Op, a: Ival, b: Ival) -> Ival:
    has_inf = lambda x: ~torch.isfinite(x[0]) | ~torch.isfinite(x[1])
    has_zero = lambda x: (x[0] <= 0) & (x[1] >= 0)
    if op in (Op.DIV, Op.FLOORDIV, Op.MOD, Op.POW):
        bad = has_zero(b) | has_inf(a) | has_inf(b)
        safe_b = (torch.where(bad, 1.0, b[0]), torch.where(bad, 1.0, b[1]))
        if op == Op.MOD:
            lo = torch.where(safe_b[0] > 0, 0.0, safe_b[0])
            hi = torch.where(safe_b[0] > 0, safe_b[1], 0.0)
        elif op == Op.POW:
            bad = bad | (a[0] <= 0)
            lo, hi = _corners(torch.pow, (torch.where(bad, 1.0, a[0]), torch.where(bad, 1.0, a[1])), safe_b)
        else:
            lo, hi = widen(*_corners(torch.div, a, safe_b))
            if op == Op.FLOORDIV:
                lo, hi = torch.floor(lo), torch.floor(hi)
        nan = torch.tensor(float("nan"), dtype=torch.float64)
        return widen(torch.where(bad, nan, lo), torch.where(bad, nan, hi))
    fn = {Op.ADD: torch.add, Op.SUB: torch.sub, Op.MUL: torch.mul}[op]
    lo, hi = _corners(fn, a, b)
    if op == Op.MUL:  # 0 * inf is NaN even when no corner shows it
        bad = (has_zero(a) & has_inf(b)) | (has_zero(b) & has_inf(a))
        lo, hi = torch.where(bad, float("nan"), lo), torch.where(bad, float("nan"), hi)
    return widen(lo, hi)


def _int_floordiv(a: Ival, b: Ival) -> Ival:
    ok = (b[0] > 0) | (b[1] < 0)
    safe_b = (torch.where(ok, b[0], 1), torch.where(ok, b[1], 1))
    lo, hi = _corners(lambda x, y: torch.div(x, y, rounding_mode="floor"), a, safe_b)
    return torch.where(ok, lo, INT32_MIN), torch.where(ok, hi, INT32_MAX)


def _int_mod(a: Ival, b: Ival) -> Ival:
    # x % d (Python): within one period of d it is exact; spanning a period boundary it is any residue
    single = (b[0] == b[1]) & (b[0] != 0)
    d = torch.where(single, b[0], 1)
    same_period = torch.div(a[0], d, rounding_mode="floor") == torch.div(a[1], d, rounding_mode="floor")
    exact_lo, exact_hi = torch.remainder(a[0], d), torch.remainder(a[1], d)
    pos, neg = b[0] > 0, b[1] < 0
    hull_lo = torch.where(pos, 0, torch.where(neg, b[0] + 1, INT32_MIN))
    hull_hi = torch.where(pos, b[1] - 1, torch.where(neg, 0, INT32_MAX))
    use_exact = single & same_period
    return torch.where(use_exact, exact_lo, hull_lo), torch.where(use_exact, exact_hi, hull_hi)


def _int_abs(a: Ival) -> Ival:
    lo = torch.where(a[0] >= 0, a[0], torch.where(a[1] <= 0, -a[1], 0))
    hi = torch.maximum(a[0].abs(), a[1].abs())
    return lo, hi


def _bitwise(op: Op, a: Ival, b: Ival) -> Ival:
    nonneg = (a[0] >= 0) & (b[0] >= 0)
    top = torch.maximum(a[1], b[1]).clamp(min=0)
    ones = torch.pow(2, torch.floor(torch.log2(top.double() + 1)) + 1).long() - 1  # all bits up to top's
    lo = {Op.AND: 0, Op.OR: torch.maximum(a[0], b[0]), Op.XOR: 0}[op]
    hi = {Op.AND: torch.minimum(a[1], b[1]), Op.OR: ones, Op.XOR: ones}[op]
    lo = torch.as_tensor(lo).expand_as(hi) if not isinstance(lo, Tensor) else lo
    return torch.where(nonneg, lo, INT32_MIN), torch.where(nonneg, hi, INT32_MAX)


def _shift(op: Op, a: Ival, count: Ival) -> Ival:
    # x << s and x >> s are monotone in x and in s (direction by x's sign): the corners bound them
    counts = (count[0].clamp(0, 31), count[1].clamp(0, 31))
    shift = torch.bitwise_left_shift if op == Op.SHL else torch.bitwise_right_shift
    lo, hi = _corners(shift, a, counts)
    if op == Op.SHL:  # counts of 32 or more give 0 (leaving int32 is the caller's clamp_int)
        shifted_out = count[1] >= 32
        lo, hi = torch.where(shifted_out, lo.clamp(max=0), lo), torch.where(shifted_out, hi.clamp(min=0), hi)
    return lo, hi


MONOTONE_FLOAT = {Op.EXP: torch.exp, Op.EXP2: torch.exp2, Op.TANH: torch.tanh, Op.SIGMOID: torch.sigmoid,
                  Op.FLOOR: torch.floor, Op.ERF: torch.erf, Op.EXPM1: torch.expm1, Op.ROUND: torch.round}  # fmt: skip
# increasing on [lowest, inf), NaN below: op -> (lowest, function)
DOMAIN_FROM = {Op.LOG: (0.0, torch.log), Op.LOG2: (0.0, torch.log2), Op.SQRT: (0.0, torch.sqrt),
               Op.LOG1P: (-1.0, torch.log1p)}  # fmt: skip


def _tan(a: Ival) -> Ival:
    # increasing within each branch (k pi - pi/2, k pi + pi/2): exact there; an interval that spans a pole
    # reaches every value; tan(+-inf) is NaN
    branch = lambda x: torch.floor((x + math.pi / 2) / math.pi)
    lo, hi = torch.tan(a[0]), torch.tan(a[1])
    one_branch = (branch(a[0]) == branch(a[1])) & (lo <= hi)
    finite = torch.isfinite(a[0]) & torch.isfinite(a[1])
    lo, hi = widen(torch.where(one_branch, lo, -math.inf), torch.where(one_branch, hi, math.inf))
    return torch.where(finite, lo, math.nan), torch.where(finite, hi, math.nan)


class Analyzer:
    """Interval/relational analysis of one IR over one grid of tiles.

    `args` maps ARG names to per-tile int64 [lo, hi] tensors; `tensors` holds the captured tables.
    """

    def __init__(self, args: dict[str, Ival], tensors: dict[str, Tensor]):
        self.args = args
        self.tensors = tensors
        self.ivals: dict[Node, Ival] = {}
        self.wrapped: dict[Node, Tensor] = {}
        self.truths: dict[Node, Truth] = {}
        self.lin_cache: dict = {}
        self.forms: dict[tuple, Ival] = {}
        self.no = torch.zeros((1, 1, 1, 1), dtype=torch.bool)

    # ------------------------------------------------------------ values

    def ival(self, node: Node) -> Ival:
        if node not in self.ivals:
            self.ivals[node] = self._ival(node)
        return self.ivals[node]

    def ival_float(self, node: Node) -> Ival:
        lo, hi = self.ival(node)
        return lo.double(), hi.double()

    def _ival(self, node: Node) -> Ival:
        if node.dtype == DType.BOOL:
            can_true, can_false = self.truth(node)
            return (~can_false).long(), can_true.long()
        if node.dtype == DType.F32:
            return self._float_ival(node)
        lo, hi = self._int_ival(node)
        lo, hi, wrapped = clamp_int(lo, hi)
        if node.op in (Op.ADD, Op.SUB, Op.NEG, Op.MUL):  # the affine forms see through these: track wrap-around
            for s in node.src:
                wrapped = wrapped | self.wrapped.get(s, self.no)
        self.wrapped[node] = wrapped
        return lo, hi

    def _int_ival(self, node: Node) -> Ival:
        op, src = node.op, node.src
        if op == Op.CONST:
            return _t(int(node.arg), torch.int64), _t(int(node.arg), torch.int64)
        if op == Op.ARG:
            return self.args[node.arg]
        if op == Op.LOAD:
            return self._load(node)
        if op == Op.CAST:
            return self._cast_to_int(src[0])
        if op == Op.WHERE:
            return self._where(node)
        vals = [self.ival(s) for s in src]
        if op in (Op.ADD, Op.SUB, Op.MUL):
            return _corners({Op.ADD: torch.add, Op.SUB: torch.sub, Op.MUL: torch.mul}[op], *vals)
        table: dict[Op, Callable[..., Ival]] = {
            Op.NEG: lambda a: (-a[1], -a[0]),
            Op.NOT: lambda a: (-a[1] - 1, -a[0] - 1),  # ~x = -x - 1
            Op.ABS: _int_abs,
            Op.FLOOR: lambda a: a,
            Op.ROUND: lambda a: a,
            Op.FLOORDIV: _int_floordiv,
            Op.MOD: _int_mod,
            Op.MIN: lambda a, b: (torch.minimum(a[0], b[0]), torch.minimum(a[1], b[1])),
            Op.MAX: lambda a, b: (torch.maximum(a[0], b[0]), torch.maximum(a[1], b[1])),
            Op.AND: lambda a, b: _bitwise(Op.AND, a, b),
            Op.OR: lambda a, b: _bitwise(Op.OR, a, b),
            Op.XOR: lambda a, b: _bitwise(Op.XOR, a, b),
            Op.SHL: lambda a, b: _shift(Op.SHL, a, b),
            Op.SHR: lambda a, b: _shift(Op.SHR, a, b),
        }
        if op in table:
            return table[op](*vals)
        return _t(INT32_MIN, torch.int64), _t(INT32_MAX, torch.int64)  # e.g. int pow: give up soundly

    def _cast_to_int(self, s: Node) -> Ival:
        lo, hi = self.ival(s)
        if s.dtype != DType.F32:
            return lo, hi
        ok = torch.isfinite(lo) & torch.isfinite(hi) & (lo > INT32_MIN) & (hi < INT32_MAX)
        return (torch.where(ok, torch.trunc(torch.where(ok, lo, 0.0)), INT32_MIN).long(),
                torch.where(ok, torch.trunc(torch.where(ok, hi, 0.0)), INT32_MAX).long())

    def _float_ival(self, node: Node) -> Ival:
        op, src = node.op, node.src
        if op == Op.CONST:
            v = float(node.arg)
            exact = torch.tensor(v, dtype=torch.float32).double().item() == v
            lo, hi = _t(v, torch.float64), _t(v, torch.float64)
            return (lo, hi) if exact else widen(lo, hi)
        if op == Op.ARG:
            lo, hi = self.args[node.arg]
            return lo.double(), hi.double()
        if op == Op.LOAD:
            lo, hi = self._load(node)
            return widen(lo.double(), hi.double())
        if op == Op.WHERE:
            return self._where(node)
        vals = [self.ival_float(s) for s in src]
        if op == Op.CAST:
            return widen(*vals[0])
        if op in (Op.ADD, Op.SUB, Op.MUL, Op.DIV, Op.FLOORDIV, Op.MOD, Op.POW):
            return _float_arith(op, *vals)
        a = vals[0]
        if op == Op.NEG:
            return -a[1], -a[0]
        if op == Op.ABS:
            lo = torch.where(a[0] >= 0, a[0], torch.where(a[1] <= 0, -a[1], 0.0))
            return lo, torch.maximum(a[0].abs(), a[1].abs())
        if op in MONOTONE_FLOAT:
            return widen(MONOTONE_FLOAT[op](a[0]), MONOTONE_FLOAT[op](a[1]))
        if op in DOMAIN_FROM:
            lowest, f = DOMAIN_FROM[op]
            bad = ~(a[0] >= lowest)
            return widen(torch.where(bad, float("nan"), f(a[0].clamp(min=lowest))),
                         torch.where(bad, float("nan"), f(a[1].clamp(min=lowest))))
        if op == Op.TAN:
            return _tan(a)
        if op == Op.RSQRT:
            bad = ~(a[0] > 0)
            return widen(torch.where(bad, float("nan"), torch.rsqrt(a[1].clamp(min=1e-300))),
                         torch.where(bad, float("nan"), torch.rsqrt(a[0].clamp(min=1e-300))))
        if op in (Op.SIN, Op.COS):
            bad = ~(torch.isfinite(a[0]) & torch.isfinite(a[1]))
            return torch.where(bad, float("nan"), -1.0), torch.where(bad, float("nan"), 1.0)
        if op in (Op.MIN, Op.MAX):
            f = torch.minimum if op == Op.MIN else torch.maximum
            return f(a[0], vals[1][0]), f(a[1], vals[1][1])
        return _nan_top(a[0])

    def _where(self, node: Node) -> Ival:
        can_true, can_false = self.truth(node.src[0])
        get = self.ival_float if node.dtype == DType.F32 else self.ival
        (a_lo, a_hi), (b_lo, b_hi) = get(node.src[1]), get(node.src[2])
        lo = torch.where(can_true & can_false, torch.minimum(a_lo, b_lo), torch.where(can_true, a_lo, b_lo))
        hi = torch.where(can_true & can_false, torch.maximum(a_hi, b_hi), torch.where(can_true, a_hi, b_hi))
        return lo, hi

    def _load(self, node: Node) -> Ival:
        ranges = [self.ival(s) for s in node.src]
        lo, hi = load_bounds(self.tensors[node.arg], ranges)
        if node.dtype == DType.I32:
            lo, hi, _ = clamp_int(lo, hi)
        return lo, hi

    # ------------------------------------------------------------ booleans

    def truth(self, node: Node) -> Truth:
        if node not in self.truths:
            self.truths[node] = self._truth(node)
        return self.truths[node]

    def _truth(self, node: Node) -> Truth:
        op = node.op
        if node.dtype == DType.BOOL and op in (Op.AND, Op.NOT) or op in COMPARISON_OPS:
            return self.conjunction(self.literals(node, False))
        if node.dtype == DType.BOOL and op == Op.OR:
            can_true, can_false = self.conjunction(self.literals(node, True))
            return can_false, can_true
        if node.dtype == DType.BOOL and op == Op.XOR:
            (at, af), (bt, bf) = self.truth(node.src[0]), self.truth(node.src[1])
            return (at & bf) | (af & bt), (at & bt) | (af & bf)
        if op == Op.WHERE:
            (ct, cf), (at, af), (bt, bf) = (self.truth(s) for s in node.src)
            return (ct & at) | (cf & bt), (ct & af) | (cf & bf)
        if op == Op.CONST:
            return _t(bool(node.arg), torch.bool), _t(not node.arg, torch.bool)
        src = node.src[0] if op == Op.CAST else node
        if op == Op.CAST and src.dtype == DType.BOOL:
            return self.truth(src)
        lo, hi = self.ival_float(src) if src.dtype == DType.F32 else self._int_ival(src)
        nan = torch.isnan(lo) | torch.isnan(hi) if src.dtype == DType.F32 else self.no
        return ~((lo == 0) & (hi == 0)) | nan, ((lo <= 0) & (hi >= 0)) & ~nan  # x != 0 (NaN is true)

    def literals(self, node: Node, negate: bool) -> list[tuple[Node, bool]]:
        """Flatten a conjunction (pushing NOT inward, De Morgan through OR) into signed literals."""
        if node.dtype == DType.BOOL and node.op == Op.NOT:
            return self.literals(node.src[0], not negate)
        if node.dtype == DType.BOOL and node.op == (Op.OR if negate else Op.AND):
            return [lit for s in node.src for lit in self.literals(s, negate)]
        return [(node, negate)]

    def conjunction(self, literals: list[tuple[Node, bool]]) -> Truth:
        """(can_be_true, can_be_false) of AND(literals); literals constraining one affine form are solved jointly."""
        can_true, can_false = torch.ones((1, 1, 1, 1), dtype=torch.bool), self.no
        groups: dict[tuple, list[Constraint]] = {}
        for node, negate in literals:
            con = literal_constraint(node, negate)
            if isinstance(con, bool):
                can_true, can_false = can_true & con, can_false | (not con)
                continue
            if con is None:
                t, f = self.comparison(node) if node.op in COMPARISON_OPS else self.truth(node)
                t, f = (f, t) if negate else (t, f)
                can_true, can_false = can_true & t, can_false | f
                continue
            t, f = self.constraint_truth([con])
            can_false = can_false | f
            if con.groupable:
                groups.setdefault(con.terms, []).append(con)
            else:
                can_true = can_true & t
        for cons in groups.values():
            can_true = can_true & self.constraint_truth(cons)[0]
        return can_true, can_false

    def form_range(self, terms: tuple[tuple[Node, int], ...]) -> Ival:
        if terms not in self.forms:  # a form's literals are judged alone, then together: one range for all
            self.forms[terms] = self._form_range(terms)
        return self.forms[terms]

    def _form_range(self, terms: tuple[tuple[Node, int], ...]) -> Ival:
        lo, hi = _t(0, torch.int64), _t(0, torch.int64)
        for atom, c in terms:
            a_lo, a_hi = self.ival(atom)
            lo, hi = (lo + c * a_lo, hi + c * a_hi) if c > 0 else (lo + c * a_hi, hi + c * a_lo)
        return lo, hi

    def _wrapped(self, con: Constraint) -> Tensor:
        out = self.no
        for s in con.sources:
            self.ival(s)
            for atom in linear(s, self.lin_cache)[0]:
                self.ival(atom)
            out = out | self.wrapped.get(s, self.no)
        return out

    def constraint_truth(self, cons: list[Constraint]) -> Truth:
        """Joint (can_be_true, can_be_false) of constraints on one form (can_be_false is of the first alone)."""
        r_lo, r_hi = self.form_range(cons[0].terms)
        wrapped = self.no
        for c in cons:
            wrapped = wrapped | self._wrapped(c)
        c0 = cons[0]
        if c0.neq is not None:
            single = (r_lo == r_hi) & (r_lo == c0.neq)
            return ~single | wrapped, ((r_lo <= c0.neq) & (r_hi >= c0.neq)) | wrapped
        if c0.negated:  # terms != residue (mod M)
            m, r = c0.modulus, c0.residue
            exists = (r_lo + torch.remainder(r - r_lo, m)) <= r_hi
            all_congruent = (r_lo == r_hi) & (torch.remainder(r_lo, m) == r) if m > 1 else torch.ones_like(exists)
            return ~all_congruent | wrapped, exists | wrapped
        lo, hi = r_lo, r_hi
        modulus, residue = 1, 0
        for c in cons:
            lo = lo if c.lo is None else lo.clamp(min=c.lo)
            hi = hi if c.hi is None else hi.clamp(max=c.hi)
            if c.modulus > 1 and modulus == 1:
                modulus, residue = c.modulus, c.residue
        first = lo + torch.remainder(residue - lo, modulus)
        can_true = first <= hi
        below = r_lo < c0.lo if c0.lo is not None else self.no
        above = r_hi > c0.hi if c0.hi is not None else self.no
        off_residue = ((r_lo != r_hi) | (torch.remainder(r_lo, c0.modulus) != c0.residue)) if c0.modulus > 1 else self.no
        return can_true | wrapped, below | above | off_residue | wrapped

    def comparison(self, node: Node) -> Truth:
        """A comparison outside the affine fragment (floats, or ints the algebra cannot use): intervals."""
        (a_lo, a_hi), (b_lo, b_hi) = (self.ival_float(s) for s in node.src)
        nan = torch.isnan(a_lo) | torch.isnan(a_hi) | torch.isnan(b_lo) | torch.isnan(b_hi)
        eq_t = (a_lo <= b_hi) & (b_lo <= a_hi)
        eq_f = ~((a_lo == a_hi) & (b_lo == b_hi) & (a_lo == b_lo))
        rules = {
            Op.LT: (a_lo < b_hi, a_hi >= b_lo), Op.LE: (a_lo <= b_hi, a_hi > b_lo),
            Op.GT: (a_hi > b_lo, a_lo <= b_hi), Op.GE: (a_hi >= b_lo, a_lo < b_hi),
            Op.EQ: (eq_t, eq_f), Op.NE: (eq_f, eq_t),
        }  # fmt: skip
        t, f = rules[node.op]
        return t | nan, f | nan
