"""Every construct of the mod language: the compiled IR, run by flexcomp.evaluate, equals the Python function run by torch."""

from __future__ import annotations

import math

import pytest
import torch
from mod_check import assert_ir_matches, mod_args, mod_inputs

import flexcomp.mods as fm
from flexcomp.compiler import check_ir
from flexcomp.evaluate import evaluate
from flexcomp.ir import DType, Op, toposort

N = 192
GEN = torch.Generator().manual_seed(0)

VEC = torch.randn(4, generator=GEN)
IDX_TABLE = torch.randint(-3, 9, (4, 16), generator=GEN)  # int64, 2-D
BOOL_3D = torch.rand(2, 4, 8, generator=GEN) > 0.5
F64_4D = torch.randn(2, 4, 3, 5, dtype=torch.float64, generator=GEN)
I32_1D = torch.randint(0, 8, (8,), dtype=torch.int32, generator=GEN)
SCALAR_T = torch.tensor(1.75)
WINDOW = 5
SCALE = 0.125
FLAG = True


def inputs(seed: int) -> dict[str, torch.Tensor]:
    return mod_inputs(torch.Generator().manual_seed(seed), N)


def call_python(fn, args: list[torch.Tensor]) -> torch.Tensor:
    """The user's function run by torch: vectorized if it can be, else one element at a time."""
    try:
        out = fn(*args)
        if isinstance(out, torch.Tensor) and out.shape == args[-1].shape:
            return out
    except (RuntimeError, TypeError, ValueError):
        pass
    return torch.stack([torch.as_tensor(fn(*(a[i] for a in args))).reshape(()) for i in range(N)])


def check(mod: fm.Mod, seed: int = 1) -> None:
    env = inputs(seed)
    check_ir(mod.raw_ir)
    check_ir(mod.ir)
    assert_ir_matches(mod, call_python(mod.fn, mod_args(mod, env)), env, equal_nan=True)


# ---------------------------------------------------------------- score mods


def s_arith(score, b, h, q, kv):
    """Docstring is allowed."""
    return score * 2 + q - kv * 3 + (q + 1) / 4 - -b + +h


def s_floordiv_mod(score, b, h, q, kv):
    return score + (q - kv) // 3 + (q % 7) - (kv // -4) + (q - kv) % -5


def s_float_floordiv(score, b, h, q, kv):
    return score // 0.7 + score % 1.5


def s_pow(score, b, h, q, kv):
    return score**2 + (q % 4) ** 2 + 2.0 ** (kv % 3)


def s_locals(score, b, h, q, kv):
    d = q - kv
    d = d * 2  # reassigning a local
    x = score * 1.0  # a fresh tensor: `+=` below would otherwise modify score in place
    x += d
    x *= 0.5
    return x


def s_tuple_assign(score, b, h, q, kv):
    a, c = q + 1, kv - 1
    return score + a * c


def s_if_elif_else(score, b, h, q, kv):
    d = q - kv
    if d > 10:
        return score + 1.0
    elif d > 0:
        return score * d
    elif d == 0:
        return score
    else:
        return float("-inf")


def s_if_fallthrough(score, b, h, q, kv):
    if q < kv:
        return -math.inf
    if q - kv > WINDOW:
        return float("-inf")
    return score


def s_if_assign(score, b, h, q, kv):
    bias = 0.0
    if h == 1:
        bias = 1.5
    elif h == 2:
        bias = -2.0
    else:
        bias = SCALE * h
    return score + bias


def s_ifexp(score, b, h, q, kv):
    return score if q >= kv else score - 100.0


def s_where(score, b, h, q, kv):
    return torch.where(q >= kv, score, float("-inf")) + torch.where(kv > 3, 1, 0)


def s_minmax(score, b, h, q, kv):
    return score + min(q, kv) + max(q, kv, 3) * 0.5 + min(score, 0.25) + max(q, 1.5)


def s_torch_minmax(score, b, h, q, kv):
    return torch.minimum(score, torch.maximum(score * 0.5, score - 1))


def s_clamp(score, b, h, q, kv):
    return torch.clamp(score, min=-1.0, max=1.0) + torch.clamp(q - kv, -3, 3) + torch.clamp(score, None, 0.5) \
        + (q - kv).clamp(min=0)


def s_unary_torch(score, b, h, q, kv):
    x = score.abs() + 0.1
    return (torch.exp(score * 0.1) + torch.exp2(score * 0.1) + torch.log(x) + torch.log2(x) + torch.sqrt(x)
            + torch.rsqrt(x) + torch.tanh(score) + torch.sigmoid(score) + torch.sin(score) + torch.cos(score)
            + torch.floor(score) + torch.abs(score))


def s_methods(score, b, h, q, kv):
    return score.tanh() * 3 + score.exp().log() + score.sigmoid() + (q - kv).abs() + score.floor()


def s_math_funcs(score, b, h, q, kv):
    return score * math.exp(1.0) + math.log(2.0) + math.sqrt(9) + math.pi + math.e + math.tanh(0.5) + math.cos(0)


def s_abs_builtin(score, b, h, q, kv):
    return score - abs(q - kv) * SCALE + abs(score)


def s_casts(score, b, h, q, kv):
    return score + float(q) / 3 + (q - kv).float() + score.int() + (score * 4).long() + score.to(torch.int32) \
        + (q > kv).to(torch.float32) + int(score * 2.5) + (q > 0).int()


def s_bool_arith(score, b, h, q, kv):
    return score * (q >= kv) + (q > kv).float() + ((q > 3) & (kv > 3))


def s_consts(score, b, h, q, kv):
    return score * SCALE + WINDOW + (1 if FLAG else 0) + 0x10 + 1_000 + 1e-3 + torch.pi


def s_buffers(score, b, h, q, kv):
    return (score + VEC[h] + IDX_TABLE[h, (q - kv) % 16] + F64_4D[b, h, q % 3, kv % 5]
            + I32_1D[kv % 8] + SCALAR_T + BOOL_3D[b, h, q % 8])


def s_nested_index(score, b, h, q, kv):
    return score + VEC[I32_1D[q % 8] % 4] * SCALAR_T


def s_numeric_int_score(score, b, h, q, kv):
    return q - kv


def _rel(q, kv):
    return q - kv


def _bias(score, d):
    return score + d * SCALE


def _twice(x):
    y = _rel(x, 0)
    return y * 2


def s_helpers(score, b, h, q, kv):
    return _bias(score, _rel(q, kv)) + _twice(q) + _rel(kv=kv, q=q)


@fm.score_mod
def inner_score(score, b, h, q, kv):
    return score + VEC[h]


def s_calls_mod(score, b, h, q, kv):
    return inner_score(score * 2, b, h, q, kv) + inner_score(score, b, h, kv, q)


def make_closure(window: int, table: torch.Tensor):
    def s_closure(score, b, h, q, kv):
        return torch.where(abs(q - kv) <= window, score + table[h], -math.inf)

    return s_closure


SCORE_MODS = [s_arith, s_floordiv_mod, s_float_floordiv, s_pow, s_locals, s_tuple_assign, s_if_elif_else,
              s_if_fallthrough, s_if_assign, s_ifexp, s_where, s_minmax, s_torch_minmax, s_clamp, s_unary_torch,
              s_methods, s_math_funcs, s_abs_builtin, s_casts, s_bool_arith, s_consts, s_buffers, s_nested_index,
              s_numeric_int_score, s_helpers, s_calls_mod, make_closure(3, torch.randn(4, generator=GEN))]


@pytest.mark.parametrize("fn", SCORE_MODS, ids=lambda f: f.__name__)
def test_score_mod_matches_torch(fn):
    check(fm.score_mod(fn))


# ---------------------------------------------------------------- mask mods


def m_causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def m_chain(b, h, q, kv):
    return 0 <= q - kv < WINDOW


def m_chain3(b, h, q, kv):
    return -5 < q <= kv + 3 != 7


def m_bitwise(b, h, q, kv):
    return (q >= kv) & ~(kv == 3) | (h == 1) ^ (b == 0)


def m_int_bitwise(b, h, q, kv):
    return ((q & 7) | (kv ^ 3)) + ~kv > 0


def m_logical(b, h, q, kv):
    return q >= kv and not kv < 0 or h == 2


def m_truthiness(b, h, q, kv):
    return bool(q % 3) and (kv % 2 if kv > 0 else q)


def m_if(b, h, q, kv):
    if h == 0:
        return q >= kv
    elif h == 1:
        return q - kv < WINDOW
    return True


def m_doc_table(b, h, q, kv):
    """A document mask through a captured int table."""
    return DOC[q % 16] == DOC[kv % 16]


def m_bool_table(b, h, q, kv):
    return BOOL_3D[b, h, kv % 8] | (q == kv)


def m_logical_funcs(b, h, q, kv):
    return torch.logical_or(torch.logical_and(q > 0, kv > 0), torch.logical_not(q > kv))


def m_const_true(b, h, q, kv):
    return True


def m_uses_mask_mod(b, h, q, kv):
    return inner_mask(b, h, q, kv) & m_causal(b, h, kv, q)


def m_float_compare(b, h, q, kv):
    return q / 3 > kv * 0.5


DOC = torch.randint(0, 3, (16,), generator=GEN).sort().values


@fm.mask_mod
def inner_mask(b, h, q, kv):
    return DOC[q % 16] == DOC[kv % 16]


MASK_MODS = [m_causal, m_chain, m_chain3, m_bitwise, m_int_bitwise, m_logical, m_truthiness, m_if, m_doc_table,
             m_bool_table, m_logical_funcs, m_const_true, m_uses_mask_mod, m_float_compare]


@pytest.mark.parametrize("fn", MASK_MODS, ids=lambda f: f.__name__)
def test_mask_mod_matches_torch(fn):
    check(fm.mask_mod(fn))


# ---------------------------------------------------------------- IR shape and API


def test_ir_uses_canonical_arg_names_and_prints_ssa():
    mod = fm.mask_mod(m_causal)
    assert {n.arg for n in toposort(mod.ir) if n.op == Op.ARG} == {"q_idx", "kv_idx"}
    assert str(mod.ir) == "%0 = arg q_idx : i32\n%1 = arg kv_idx : i32\n%2 = ge %0, %1 : bool\nreturn %2"


def test_promotions_are_explicit_casts():
    mod = fm.score_mod(s_bool_arith)
    for node in toposort(mod.raw_ir):
        if node.op in (Op.ADD, Op.MUL):
            assert len({s.dtype for s in node.src}) == 1
    assert mod.ir.dtype == DType.F32


def test_int_score_is_cast_to_float():
    mod = fm.score_mod(s_numeric_int_score)
    assert mod.ir.op == Op.CAST and mod.ir.dtype == DType.F32


def test_buffers_described_and_resolved_live():
    mod = fm.score_mod(s_buffers)
    specs = {s.name: s for s in mod.buffers}
    assert specs["IDX_TABLE"].shape == (4, 16) and specs["IDX_TABLE"].dtype == "int64"
    assert specs["F64_4D"].ir_dtype == DType.F32 and specs["BOOL_3D"].ir_dtype == DType.BOOL
    assert specs["SCALAR_T"].shape == ()
    assert mod.tensors()["VEC"] is VEC


def test_captured_global_rebinding_is_seen():
    global REBOUND
    REBOUND = torch.zeros(4)
    mod = fm.score_mod(s_rebound)
    REBOUND = torch.arange(4.0)
    assert mod.tensors()["REBOUND"] is REBOUND
    env = inputs(3)
    torch.testing.assert_close(evaluate(mod.ir, env, mod.tensors()), env["score"] + env["h"].float())


REBOUND = torch.zeros(4)


def s_rebound(score, b, h, q, kv):
    return score + REBOUND[h]


def test_same_name_different_tensors_in_helpers_are_renamed():
    mod = fm.score_mod(make_two_tables())
    assert sorted(s.name for s in mod.buffers) == ["table", "table_1"]
    check(mod)


def make_inner(table):
    def inner(h):
        return table[h]

    return inner


def make_two_tables():
    inner = make_inner(torch.randn(4, generator=GEN))
    table = torch.randn(4, generator=GEN) * 10

    def two_tables(score, b, h, q, kv):
        return score + table[h] + inner(h)

    return two_tables


def test_as_mod_compiles_plain_functions_once_and_passes_mods_through():
    def local_mask(b, h, q, kv):
        return q >= kv

    first = fm.as_mod(local_mask, "mask")
    assert fm.as_mod(local_mask, "mask") is first
    assert fm.as_mod(first, "mask") is first
    assert fm.as_mod(None, "score") is None
    assert first.fn is local_mask


def test_decorated_mod_still_callable():
    mod = fm.mask_mod(m_causal)
    q, kv = torch.tensor([1, 2]), torch.tensor([2, 1])
    assert mod(0, 0, q, kv).tolist() == [False, True]
