"""kv_num_blocks / full_kv_num_blocks of closed-form bounds, built on the device in a handful of launches.

The bounds are evaluated symbolically in the q-block index i = 0..nq-1: a value is a `Lin`,
min(max(s*i + o, lo), hi) (q_lo = bq*i; q_hi = bq*i + bq - 1 when bq divides Q_LEN), kept so while
the algebra allows (+ and - of affine forms, * by a constant, // by a divisor of s, min / max with
a constant), and every comparison, clamp and `where` that it decides (`le`) costs nothing.  Where
it does not, the value becomes a `Dev`: a recipe of one torch op on the device with a known
interval.  The recipe is cached per (bounds, lengths, block sizes), so a rebuild only replays
it: causal and sliding window with 128-divisible lengths are an arange and a full (no copy,
no sync), the sliding window's partial count a few more elementwise ops.

The tables equal those of `tables.bounds_rows` (tests check it on a sweep of masks and grids);
anything outside this fragment (loads of captured tensors, ops other than integer arithmetic)
returns None and the caller falls back to building them on the host.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import torch

from ..ir import Node, Op
from ..tiles import ClosedFormBounds

Tensor = torch.Tensor
INT32 = (-(2**31), 2**31 - 1)  # values outside it would wrap in the int32 tables: refused


class _Unsupported(Exception):
    """Outside the symbolic fragment: the caller builds the counts on the host."""


@dataclass(frozen=True)
class Lin:
    """min(max(s*i + o, lo), hi) over i in [0, n); lo / hi None when that side is not clipped."""

    s: int
    o: int
    lo: int | None = None
    hi: int | None = None


@dataclass(frozen=True, eq=False)
class Dev:
    """A device tensor [n] made by `make(get)` (get: a value -> its tensor or int) with values in [lo, hi]."""

    make: Callable[[Callable[[Value], Tensor | int]], Tensor]
    lo: int
    hi: int


Value = Lin | Dev


def const(k: int) -> Lin:
    return Lin(0, k)


def is_const(v: Value) -> bool:
    return isinstance(v, Lin) and v.s == 0


class Sym:
    """Symbolic arithmetic over i in [0, n)."""

    def __init__(self, n: int):
        self.n = n

    # ------------------------------------------------------------ normal forms and intervals

    def lin(self, s: int, o: int, lo: int | None = None, hi: int | None = None) -> Lin:
        """Clips that never bind dropped; a clip that binds everywhere gives a constant."""
        a, b = sorted((o, s * (self.n - 1) + o))
        if lo is not None and hi is not None and lo >= hi:
            return const(hi)  # min(max(x, lo), hi) with lo >= hi is hi
        if lo is not None and lo >= b:
            return const(lo if hi is None else min(lo, hi))
        if hi is not None and hi <= a:
            return const(hi)
        lo = None if lo is not None and lo <= a else lo
        hi = None if hi is not None and hi >= b else hi
        return Lin(0, o) if s == 0 else Lin(s, o, lo, hi)

    def interval(self, v: Value) -> tuple[int, int]:
        if isinstance(v, Dev):
            return v.lo, v.hi
        a, b = sorted((v.o, v.s * (self.n - 1) + v.o))
        clip = lambda x: min(max(x, v.lo if v.lo is not None else x), v.hi if v.hi is not None else x)
        return clip(a), clip(b)

    def le(self, x: Value, y: Value) -> bool:
        """A proof that x <= y for every i (False: unknown)."""
        if self.interval(x)[1] <= self.interval(y)[0]:
            return True
        if isinstance(x, Dev) or isinstance(y, Dev):
            return False
        if x.hi is not None and self.le(const(x.hi), y):  # min(., hi) <= hi <= y
            return True
        if x.lo is not None or x.hi is not None:  # min(max(A, lo), hi) <= max(A, lo) <= y
            return self.le(Lin(x.s, x.o), y) and (x.lo is None or self.le(const(x.lo), y))
        if y.lo is not None or y.hi is not None:  # x <= min(max(B, lo), hi) <=> x <= max(B, lo) and x <= hi
            below_hi = y.hi is None or self.le(x, const(y.hi))
            return below_hi and (self.le(x, Lin(y.s, y.o)) or (y.lo is not None and self.le(x, const(y.lo))))
        return min(y.o - x.o, (y.s - x.s) * (self.n - 1) + y.o - x.o) >= 0  # affine y - x at both ends

    # ------------------------------------------------------------ arithmetic

    def add(self, x: Value, y: Value) -> Value:
        if isinstance(x, Lin) and isinstance(y, Lin):
            if x.lo is None and x.hi is None:
                x, y = y, x
            if y.lo is None and y.hi is None:
                if y.s == 0:  # clip(A) + k = clip(A + k)
                    shift = lambda c: None if c is None else c + y.o
                    return self.lin(x.s + y.s, x.o + y.o, shift(x.lo), shift(x.hi))
                if y.s + x.s == 0 and (x.lo is None) != (x.hi is None):  # B + max(A, lo) = max(k, B + lo), A + B = k
                    k = x.o + y.o
                    if x.lo is not None:
                        return self.lin(y.s, y.o + x.lo, lo=k)
                    return self.lin(y.s, y.o + x.hi, hi=k)
                if x.lo is None and x.hi is None:
                    return self.lin(x.s + y.s, x.o + y.o)
        lo_x, hi_x = self.interval(x)
        lo_y, hi_y = self.interval(y)
        return self.dev(lambda get: get(x) + get(y), lo_x + lo_y, hi_x + hi_y)

    def neg(self, x: Value) -> Value:
        if isinstance(x, Lin):
            flip = lambda c: None if c is None else -c
            return self.lin(-x.s, -x.o, flip(x.hi), flip(x.lo))  # -min(max(A, lo), hi) = min(max(-A, -hi), -lo)
        return self.dev(lambda get: -get(x), -x.hi, -x.lo)

    def sub(self, x: Value, y: Value) -> Value:
        out = self.add(x, self.neg(y))
        if isinstance(out, Lin):
            return out
        return self.dev(lambda get: get(x) - get(y), out.lo, out.hi)  # reuses y's tensor (a table, often)

    def mul(self, x: Value, y: Value) -> Value:
        if not is_const(y):
            x, y = y, x
        if not is_const(y):
            raise _Unsupported("a product of two q-dependent values")
        k = y.o
        if k < 0:
            return self.neg(self.mul(x, const(-k)))
        if isinstance(x, Lin):
            scale = lambda c: None if c is None else c * k
            return self.lin(x.s * k, x.o * k, scale(x.lo), scale(x.hi))
        return self.dev(lambda get: get(x) * k, x.lo * k, x.hi * k)

    def floordiv(self, x: Value, y: Value) -> Value:
        if not is_const(y) or y.o == 0:
            raise _Unsupported("a division by a q-dependent value or by zero")
        d = y.o
        if d < 0:  # x // d = (-x) // (-d)
            return self.floordiv(self.neg(x), const(-d))
        if isinstance(x, Lin) and x.s % d == 0:  # floor is monotone: it commutes with the clips
            div = lambda c: None if c is None else c // d
            return self.lin(x.s // d, x.o // d, div(x.lo), div(x.hi))
        lo, hi = self.interval(x)
        return self.dev(lambda get: torch.div(get(x), d, rounding_mode="floor"), lo // d, hi // d)

    def mod(self, x: Value, y: Value) -> Value:
        return self.sub(x, self.mul(y, self.floordiv(x, y)))  # x % d = x - d * (x // d)

    def minimum(self, x: Value, y: Value) -> Value:
        if self.le(x, y):
            return x
        if self.le(y, x):
            return y
        if is_const(x):
            x, y = y, x
        if is_const(y) and isinstance(x, Lin):  # min(max(A, lo), hi), then min with k
            return self.lin(x.s, x.o, x.lo, y.o if x.hi is None else min(x.hi, y.o))
        (lo_x, hi_x), (lo_y, hi_y) = self.interval(x), self.interval(y)
        return self.dev(lambda get: _binary(torch.minimum, get(x), get(y)), min(lo_x, lo_y), min(hi_x, hi_y))

    def maximum(self, x: Value, y: Value) -> Value:
        if self.le(x, y):
            return y
        if self.le(y, x):
            return x
        if is_const(x):
            x, y = y, x
        if is_const(y) and isinstance(x, Lin) and x.hi is None:  # max(max(A, lo), k)
            return self.lin(x.s, x.o, y.o if x.lo is None else max(x.lo, y.o))
        (lo_x, hi_x), (lo_y, hi_y) = self.interval(x), self.interval(y)
        return self.dev(lambda get: _binary(torch.maximum, get(x), get(y)), max(lo_x, lo_y), max(hi_x, hi_y))

    def absolute(self, x: Value) -> Value:
        lo, hi = self.interval(x)
        if lo >= 0:
            return x
        if hi <= 0:
            return self.neg(x)
        return self.dev(lambda get: torch.abs(get(x)), 0, max(-lo, hi))

    def where_lt(self, x: Value, y: Value, if_true: Value, if_false: Value) -> Value:
        """x < y ? if_true : if_false."""
        if self.le(self.add(x, const(1)), y):
            return if_true
        if self.le(y, x):
            return if_false
        (lo_t, hi_t), (lo_f, hi_f) = self.interval(if_true), self.interval(if_false)
        return self.dev(lambda get: torch.where(_binary(torch.lt, get(x), get(y)), get(if_true), get(if_false)),
                        min(lo_t, lo_f), max(hi_t, hi_f))

    def dev(self, make: Callable, lo: int, hi: int) -> Dev:
        if lo < INT32[0] or hi > INT32[1]:
            raise _Unsupported("int32 overflow")
        return Dev(make, lo, hi)


def _binary(fn: Callable, a: Tensor | int, b: Tensor | int) -> Tensor:
    """fn of a tensor and a tensor or int (torch.minimum / maximum / lt need two tensors)."""
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return fn(a, b)
    t, k = (a, b) if isinstance(a, Tensor) else (b, a)
    if fn is torch.minimum:
        return t.clamp(max=k)
    if fn is torch.maximum:
        return t.clamp(min=k)
    return torch.lt(a, b) if isinstance(a, Tensor) else torch.gt(b, a)  # fn is torch.lt


# ---------------------------------------------------------------- bounds -> counts

_ARITH = {Op.ADD: Sym.add, Op.SUB: Sym.sub, Op.MUL: Sym.mul, Op.FLOORDIV: Sym.floordiv, Op.MOD: Sym.mod,
          Op.MIN: Sym.minimum, Op.MAX: Sym.maximum}  # fmt: skip


def _evaluate(sym: Sym, node: Node, env: dict[str, Value], memo: dict[Node, Value]) -> Value:
    if node in memo:
        return memo[node]
    if node.op == Op.CONST and isinstance(node.arg, int) and not isinstance(node.arg, bool):
        out = const(node.arg)
    elif node.op == Op.ARG and node.arg in env:
        out = env[node.arg]
    elif node.op in _ARITH:
        out = _ARITH[node.op](sym, *(_evaluate(sym, s, env, memo) for s in node.src))
    elif node.op == Op.NEG:
        out = sym.neg(_evaluate(sym, node.src[0], env, memo))
    elif node.op == Op.ABS:
        out = sym.absolute(_evaluate(sym, node.src[0], env, memo))
    else:
        raise _Unsupported(node.op)
    memo[node] = out
    return out


def symbolic_counts(bounds: ClosedFormBounds, q_len: int, kv_len: int, q_block: int,
                    kv_block: int) -> tuple[Value, Value] | None:
    """(partial count, full count) per q block as values, mirroring `tables.bounds_rows`; None if unsupported."""
    return _cached_counts(bounds, q_len, kv_len, q_block, kv_block)


@lru_cache(maxsize=256)
def _cached_counts(bounds: ClosedFormBounds, q_len: int, kv_len: int, bq: int, bk: int) -> tuple[Value, Value] | None:
    try:
        return _counts(bounds, q_len, kv_len, bq, bk)
    except _Unsupported:
        return None


def _counts(bounds: ClosedFormBounds, q_len: int, kv_len: int, bq: int, bk: int) -> tuple[Value, Value]:
    nq, nkv = -(-q_len // bq), -(-kv_len // bk)
    sym = Sym(nq)
    q_lo = sym.lin(bq, 0)
    q_hi = sym.lin(bq, bq - 1, hi=q_len - 1)
    env = {"q_lo": q_lo, "q_hi": q_hi, "Q_LEN": const(q_len), "KV_LEN": const(kv_len), "b": const(0), "h": const(0)}
    memo: dict[Node, Value] = {}
    clamp = lambda v: sym.minimum(sym.maximum(v, const(0)), const(kv_len))
    kv_lo, kv_hi, full_lo, full_hi = (clamp(_evaluate(sym, n, env, memo))
                                      for n in (bounds.kv_lo, bounds.kv_hi, bounds.full_lo, bounds.full_hi))
    ceil = lambda v: sym.neg(sym.floordiv(sym.neg(v), const(bk)))
    a = sym.floordiv(kv_lo, const(bk))
    c = sym.where_lt(kv_lo, kv_hi, ceil(kv_hi), a)  # an empty range visits nothing
    f0 = ceil(full_lo)  # first block starting at or after full_lo
    f1 = sym.floordiv(full_hi, const(bk))  # the last block is full if full_hi reaches KV_LEN:
    if kv_len % bk:  # KV_LEN // bk is nkv already when bk divides KV_LEN
        f1 = sym.where_lt(full_hi, const(kv_len), f1, const(nkv))
    inside = lambda v: sym.minimum(sym.maximum(v, a), c)
    # bounds_rows moves an empty full range inside [a, c]: its count is 0 and the partial one c - a either way
    full = sym.maximum(sym.sub(inside(f1), inside(f0)), const(0))
    partial = sym.sub(sym.sub(c, a), full)
    return partial, full


def build(values: tuple[Value, ...], n: int, device: torch.device) -> list[Tensor]:
    """The int32 tensors [1, 1, n] of the values, on `device`: one op per arange / full / recorded op."""
    made: dict[int, Tensor | int] = {}

    def get(v: Value) -> Tensor | int:
        key = id(v)
        if key not in made:
            made[key] = v.make(get) if isinstance(v, Dev) else _lin_tensor(v, n, device)
        return made[key]

    out = []
    for v in values:
        t = get(v)
        if isinstance(t, int):
            t = torch.full((n,), t, dtype=torch.int32, device=device)
        elif t.dtype != torch.int32:
            t = t.to(torch.int32)  # a where of two constants
        out.append((t.clone() if any(t is o for o in out) else t).view(1, 1, n))
    return out


def _lin_tensor(v: Lin, n: int, device: torch.device) -> Tensor | int:
    if v.s == 0:
        return v.o
    end = v.o + v.s * n
    if min(v.o, end) < INT32[0] or max(v.o, end) > INT32[1]:
        raise OverflowError(f"closed-form bound {v} leaves int32 over {n=} q blocks")
    t = torch.arange(v.o, end, v.s, dtype=torch.int32, device=device)
    return t.clamp_(v.lo, v.hi) if v.lo is not None or v.hi is not None else t
