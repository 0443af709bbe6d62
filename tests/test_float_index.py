"""Exact float index arithmetic (codegen.ops.float_index_form): the rules on IR, the host-side range guard,
and the forward kernel (Triton interpreter) with the rewrite on, against the float64 oracle and bit for bit
against the same kernel with the rewrite off."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
from flexcomp.codegen import flex_forward, kernel_source
from flexcomp.codegen import forward as forward_module
from flexcomp.codegen.ops import FLOAT_EXACT_LIMIT, cast_f32, float_index_exact, float_index_form

import flexcomp as fc
from flexcomp.evaluate import evaluate
from flexcomp.ir import DType, Node, Op, arg, const, load, to_expr

Q, KV, B, H = arg("q_idx"), arg("kv_idx"), arg("b"), arg("h")


def i32(op: Op, *src: Node) -> Node:
    return Node(op, DType.I32, src)


def f32(op: Op, *src: Node) -> Node:
    return Node(op, DType.F32, src)


def fconst(x: float) -> Node:
    return const(float(x), DType.F32)


def ranges(lq: int, lkv: int, batch: int = 2, heads: int = 4) -> tuple:
    return (("b", 0, batch - 1), ("h", 0, heads - 1), ("q_idx", 0, lq - 1), ("kv_idx", 0, lkv - 1))


# ---------------------------------------------------------------- the rules, on IR

REWRITES = [
    # cast_f32(a - b) -> cast_f32(a) - cast_f32(b)
    (cast_f32(i32(Op.SUB, KV, Q)), f32(Op.SUB, cast_f32(KV), cast_f32(Q))),
    # cast_f32(a + c) -> cast_f32(a) + float(c)
    (cast_f32(i32(Op.ADD, KV, const(7))), f32(Op.ADD, cast_f32(KV), fconst(7))),
    # cast_f32(-a) -> 0.0 - cast_f32(a)
    (cast_f32(i32(Op.NEG, KV)), f32(Op.SUB, fconst(0), cast_f32(KV))),
    # cast_f32(a * c) -> cast_f32(a) * c, either side
    (cast_f32(i32(Op.MUL, KV, const(3))), f32(Op.MUL, cast_f32(KV), fconst(3))),
    (cast_f32(i32(Op.MUL, const(3), KV)), f32(Op.MUL, cast_f32(KV), fconst(3))),
    # negative multiplier: 0.0 - cast_f32(a) * |c| (never -0.0)
    (cast_f32(i32(Op.MUL, KV, const(-2))), f32(Op.SUB, fconst(0), f32(Op.MUL, cast_f32(KV), fconst(2)))),
    (cast_f32(i32(Op.MUL, KV, const(0))), fconst(0)),
    # floordiv is not affine: it stays a leaf, converted as a whole (hoisted when it is q-only)
    (cast_f32(i32(Op.SUB, i32(Op.FLOORDIV, Q, const(3)), KV)),
     f32(Op.SUB, cast_f32(i32(Op.FLOORDIV, Q, const(3))), cast_f32(KV))),
    (cast_f32(i32(Op.SUB, i32(Op.FLOORDIV, KV, const(3)), Q)),
     f32(Op.SUB, cast_f32(i32(Op.FLOORDIV, KV, const(3))), cast_f32(Q))),
    # a product of two indices is not rewritten, but the sum around it is
    (cast_f32(i32(Op.ADD, i32(Op.MUL, KV, Q), B)), f32(Op.ADD, cast_f32(i32(Op.MUL, KV, Q)), cast_f32(B))),
    # a loop-invariant cast is left alone (it is hoisted out of the kv loop whole)
    (cast_f32(i32(Op.SUB, Q, H)), cast_f32(i32(Op.SUB, Q, H))),
]


@pytest.mark.parametrize("before, after", REWRITES, ids=[to_expr(b) for b, _ in REWRITES])
def test_rule_rewrites(before, after):
    rewritten, _ = float_index_form(before)
    assert rewritten == after, f"{to_expr(rewritten)} != {to_expr(after)}"


def test_rewrite_reaches_casts_inside_float_expressions():
    slope = load("SLOPES", DType.F32, (H,))
    score = arg("score")
    alibi = f32(Op.ADD, score, f32(Op.MUL, slope, cast_f32(i32(Op.SUB, KV, Q))))
    rewritten, region = float_index_form(alibi)
    assert rewritten == f32(Op.ADD, score, f32(Op.MUL, slope, f32(Op.SUB, cast_f32(KV), cast_f32(Q))))
    assert region == {i32(Op.SUB, KV, Q), KV, Q}


AFFINE = cast_f32(i32(Op.ADD, i32(Op.SUB, i32(Op.MUL, KV, const(-3)), i32(Op.NEG, Q)),
                      i32(Op.ADD, i32(Op.MUL, const(5), H), i32(Op.SUB, B, const(11)))))


def test_rewrite_is_bit_identical(rng):
    """Every rule at once, evaluated on indices near the top of the guarded range: same bits, signed zeros too."""
    lq = lkv = 2**22  # |kv * -3 - q| < 2^24
    rewritten, _ = float_index_form(AFFINE)
    assert rewritten != AFFINE and float_index_exact(AFFINE, ranges(lq, lkv))
    n = 4096
    env = {"q_idx": torch.randint(0, lq, (n, 1), generator=rng, dtype=torch.int32),
           "kv_idx": torch.randint(0, lkv, (1, n), generator=rng, dtype=torch.int32),
           "b": torch.tensor(1, dtype=torch.int32), "h": torch.tensor(3, dtype=torch.int32)}
    env["kv_idx"][0, :4] = torch.tensor([0, 1, 2, lkv - 1])
    env["q_idx"][:4, 0] = torch.tensor([0, 1, 2, lq - 1])
    exact, fast = evaluate(AFFINE, env), evaluate(rewritten, env)
    assert exact.dtype == fast.dtype == torch.float32
    assert torch.equal(exact.view(torch.int32), fast.view(torch.int32))
    zero = cast_f32(i32(Op.MUL, i32(Op.SUB, KV, Q), const(-4)))  # int 0 -> +0.0; a naive x * -4.0 gives -0.0
    both = [evaluate(x, {"q_idx": torch.tensor([5], dtype=torch.int32), "kv_idx": torch.tensor([5], dtype=torch.int32)})
            for x in (zero, float_index_form(zero)[0])]
    assert torch.equal(both[0].view(torch.int32), both[1].view(torch.int32))


# ---------------------------------------------------------------- the guard


def test_guard_accepts_ordinary_lengths():
    assert float_index_exact(AFFINE, ranges(8192, 8192))
    assert float_index_exact(cast_f32(i32(Op.SUB, KV, Q)), ranges(FLOAT_EXACT_LIMIT, FLOAT_EXACT_LIMIT))


def test_guard_falls_back_on_large_lengths():
    # kv * -3 reaches -3 * 2^23 > 2^24 in magnitude
    assert not float_index_exact(AFFINE, ranges(2**23, 2**23))
    assert not float_index_exact(cast_f32(i32(Op.SUB, KV, Q)), ranges(8, FLOAT_EXACT_LIMIT + 2))
    assert not float_index_exact(cast_f32(i32(Op.SUB, KV, Q)), ranges(FLOAT_EXACT_LIMIT + 2, 8))


def test_guard_refuses_unbounded_leaves_and_no_op_rewrites():
    table = load("OFFSETS", DType.I32, (H,))  # an int read from a tensor: no range known
    assert not float_index_exact(cast_f32(i32(Op.ADD, KV, table)), ranges(64, 64))
    assert float_index_exact(cast_f32(i32(Op.ADD, KV, i32(Op.MOD, table, const(100)))), ranges(64, 64))
    assert not float_index_exact(cast_f32(i32(Op.SUB, Q, H)), ranges(64, 64))  # nothing to rewrite
    assert not float_index_exact(f32(Op.ADD, arg("score"), fconst(1)), ranges(64, 64))


# ---------------------------------------------------------------- the kernel

slopes = torch.rand(3) + 0.1


@fc.score_mod
def alibi(score, b, h, q_idx, kv_idx):
    return score + slopes[h] * (kv_idx - q_idx)


@fc.score_mod
def relative_half(score, b, h, q_idx, kv_idx):
    return score + (kv_idx - q_idx) * 0.5


@fc.score_mod
def floordiv_offset(score, b, h, q_idx, kv_idx):
    return score + (q_idx // 3 - kv_idx).float() * 0.25


@fc.score_mod
def negated_affine(score, b, h, q_idx, kv_idx):
    return score + 0.02 * (-(kv_idx * 3) + q_idx - 2 * h + b)


@fc.mask_mod
def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def run(q, k, v, score_mod, block_mask=None):
    return flex_forward(q, k, v, score_mod, block_mask, q.shape[-1] ** -0.5, False, True,
                        {"BLOCK_M": 16, "BLOCK_N": 16, "BACKEND": "TRITON"})  # the forward kernel, not decoding


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("FLEXCOMP_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "flexcomp-cache"))


@pytest.mark.parametrize("mod", [alibi, relative_half, floordiv_offset, negated_affine], ids=lambda m: m.name)
def test_kernel_float_index_matches_oracle_and_exact_path(mod, randn, naive_attention, monkeypatch):
    B_, H_, Lq, Lkv, D = 2, 3, 37, 53, 16
    q, k, v = randn(B_, H_, Lq, D), randn(B_, H_, Lkv, D), randn(B_, H_, Lkv, D)
    from flexcomp.blockmask import create_block_mask

    bm = create_block_mask(causal, B_, H_, Lq, Lkv, device="cpu", BLOCK_SIZE=32) if mod is alibi else None
    chosen = []
    real = forward_module.float_index
    monkeypatch.setattr(forward_module, "float_index", lambda *a: chosen.append(real(*a)) or chosen[-1])
    out, lse = run(q, k, v, mod, bm)
    assert chosen == [True]
    ref_out, ref_lse = naive_attention(q, k, v, mod.fn, causal.fn if bm is not None else None)
    torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=2e-5)
    finite = ref_lse.isfinite()
    torch.testing.assert_close(lse.double()[finite], ref_lse[finite], atol=2e-5, rtol=2e-5)
    monkeypatch.setattr(forward_module, "float_index", lambda *a: False)
    exact_out, exact_lse = run(q, k, v, mod, bm)
    assert torch.equal(out, exact_out) and torch.equal(lse, exact_lse)


def test_kernel_source_has_the_float_form_only_where_it_rewrites():
    text = kernel_source(floordiv_offset, None)
    body = text[text.index("def score_mod_float("):text.index("def score_mod_float_fast(")]
    assert "kv_idx_f" in body.split(":", 1)[1] and "floordiv_by_positive" not in body  # q_idx // 3 is hoisted
    hoisted = text[text.index("def score_mod_hoisted("):text.index("def score_mod(")]
    assert "floordiv_by_positive(q_idx, 3)" in hoisted
    plain = kernel_source(fc.score_mod(_softcap), None)
    stub = plain[plain.index("def score_mod_float("):plain.index("def score_mod_float_fast(")]
    assert "return score" in stub and "tanh" not in stub


def _softcap(score, b, h, q_idx, kv_idx):
    return 20.0 * torch.tanh(score / 20.0)


def test_host_guard_uses_the_lengths():
    assert forward_module.float_index(alibi, 4, 16, 8192 + 128, 8192 + 128)
    assert not forward_module.float_index(alibi, 4, 16, 8, FLOAT_EXACT_LIMIT + 128)
    assert not forward_module.float_index(None, 4, 16, 64, 64)
