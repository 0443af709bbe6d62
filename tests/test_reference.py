"""flexcomp.reference against the naive float64 oracle and against torch's own flex_attention."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn.attention.flex_attention import create_block_mask as torch_create_block_mask

from flexcomp.ir import BufferSpec, DType, Node, Op, arg, const, load, result_dtype
from flexcomp.mods import Mod
from flexcomp.reference import reference_attention, tile_map
from flexcomp.tiles import TileClass

F32, I32 = DType.F32, DType.I32
score, b, h, q, kv = (arg(n) for n in ("score", "b", "h", "q_idx", "kv_idx"))


def op(kind: Op, *src: Node) -> Node:
    return Node(kind, result_dtype(kind, tuple(s.dtype for s in src)), tuple(src))


def ir_mod(kind: str, name: str, root: Node, fn=None, **captured: torch.Tensor) -> Mod:
    """A Mod built straight from IR (fn=None, so calling it runs the IR, as the reference does)."""
    specs = tuple(BufferSpec(n, str(t.dtype).removeprefix("torch."), tuple(t.shape)) for n, t in captured.items())
    resolvers = {n: (lambda t=t: t) for n, t in captured.items()}
    return Mod(kind, name, root, root, specs, resolvers, fn)


# ---------------------------------------------------------------- variants: plain functions and their IR

WINDOW, PREFIX, CAP = 16, 9, 20.0


def causal_fn(b_, h_, q_, kv_):
    return q_ >= kv_


def window_fn(b_, h_, q_, kv_):
    return (q_ >= kv_) & (q_ - kv_ <= WINDOW)


def prefix_fn(b_, h_, q_, kv_):
    return (kv_ < PREFIX) | (q_ >= kv_)


def softcap_fn(s, b_, h_, q_, kv_):
    return CAP * torch.tanh(s / CAP)


CAUSAL_IR = op(Op.GE, q, kv)
WINDOW_IR = op(Op.AND, CAUSAL_IR, op(Op.LE, op(Op.SUB, q, kv), const(WINDOW)))
PREFIX_IR = op(Op.OR, op(Op.LT, kv, const(PREFIX)), CAUSAL_IR)
SOFTCAP_IR = op(Op.MUL, const(CAP), op(Op.TANH, op(Op.DIV, score, const(CAP))))


def alibi(slopes: torch.Tensor):
    def fn(s, b_, h_, q_, kv_):
        return s + slopes[h_] * (kv_ - q_)

    root = op(Op.ADD, score, op(Op.MUL, load("slopes", F32, (h,)), op(Op.SUB, kv, q)))
    return fn, ir_mod("score", "alibi", root, slopes=slopes)


def document(doc_ids: torch.Tensor):
    def fn(b_, h_, q_, kv_):
        return doc_ids[q_] == doc_ids[kv_]

    root = op(Op.EQ, load("doc", I32, (q,)), load("doc", I32, (kv,)))
    return fn, ir_mod("mask", "document", root, doc=doc_ids)


def variant(name: str, Hq: int, L: int, gen: torch.Generator):
    """(score_fn, score Mod, mask_fn, mask Mod) for a named variant at Hq heads and lengths up to L."""
    if name == "alibi":
        slopes = torch.exp2(-torch.arange(1, Hq + 1, dtype=torch.float32) * 8 / Hq)
        return (*alibi(slopes), None, None)
    if name == "document":
        doc_ids = torch.randint(0, 4, (L,), generator=gen).sort().values
        return (None, None, *document(doc_ids))
    masks = {"causal": (causal_fn, CAUSAL_IR), "window": (window_fn, WINDOW_IR), "prefix": (prefix_fn, PREFIX_IR)}
    if name in masks:
        fn, root = masks[name]
        return None, None, fn, ir_mod("mask", name, root)
    if name == "softcap":
        return softcap_fn, ir_mod("score", "softcap", SOFTCAP_IR), None, None
    return None, None, None, None


VARIANTS = ["none", "causal", "window", "alibi", "softcap", "document", "prefix"]
SHAPES = [  # B, Hq, Hkv, Lq, Lkv, D, Dv
    (2, 4, 4, 37, 37, 16, 16),
    (1, 4, 2, 1, 200, 16, 8),
    (2, 2, 1, 200, 37, 8, 24),
    (1, 2, 2, 130, 131, 16, 16),
]


def qkv(randn, shape, dtype, requires_grad=False):
    B, Hq, Hkv, Lq, Lkv, D, Dv = shape
    return (randn(B, Hq, Lq, D, dtype=dtype, requires_grad=requires_grad),
            randn(B, Hkv, Lkv, D, dtype=dtype, requires_grad=requires_grad),
            randn(B, Hkv, Lkv, Dv, dtype=dtype, requires_grad=requires_grad))


def assert_lse_close(lse, expected, **tol):
    assert torch.equal(lse.isinf(), expected.isinf())
    finite = ~expected.isinf()
    torch.testing.assert_close(lse[finite].double(), expected[finite].double(), **tol)


# ---------------------------------------------------------------- against the oracles


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", VARIANTS)
def test_matches_naive_float64(name, shape, rng, randn, naive_attention):
    Hq, Hkv, Lq, Lkv = shape[1:5]
    score_fn, score_mod, mask_fn, mask_mod = variant(name, Hq, max(Lq, Lkv), rng)
    q_, k_, v_ = qkv(randn, shape, torch.float64)
    out, lse = reference_attention(q_, k_, v_, score_mod, None, None, Hq != Hkv, True, mask_mod=mask_mod)
    want, want_lse = naive_attention(q_, k_, v_, score_fn, mask_fn, None, Hq != Hkv)
    assert out.dtype == torch.float64 and lse.dtype == torch.float64
    torch.testing.assert_close(out, want, atol=1e-10, rtol=1e-10)
    assert_lse_close(lse, want_lse, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("shape", SHAPES[:3], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", VARIANTS)
def test_matches_torch_flex_attention(name, shape, rng, randn, torch_flex):
    Hq, Hkv, Lq, Lkv = shape[1:5]
    score_fn, score_mod, mask_fn, mask_mod = variant(name, Hq, max(Lq, Lkv), rng)
    q_, k_, v_ = qkv(randn, shape, torch.float32)
    block_mask = torch_create_block_mask(mask_fn, None, None, Lq, Lkv, device="cpu") if mask_fn else None
    want, want_lse = torch_flex.flex_attention(q_, k_, v_, score_fn, block_mask, enable_gqa=Hq != Hkv,
                                               return_lse=True)
    out, lse = reference_attention(q_, k_, v_, score_mod, None, None, Hq != Hkv, True, mask_mod=mask_mod)
    torch.testing.assert_close(out, want, atol=2e-5, rtol=2e-5)
    assert_lse_close(lse, want_lse, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_dtypes(dtype, rng, randn, naive_attention):
    shape = (1, 2, 2, 45, 70, 16, 16)
    _, _, mask_fn, mask_mod = variant("window", 2, 70, rng)
    q_, k_, v_ = qkv(randn, shape, dtype)
    out, lse = reference_attention(q_, k_, v_, None, None, 0.3, False, True, mask_mod=mask_mod)
    want, want_lse = naive_attention(q_, k_, v_, None, mask_fn, 0.3)
    assert out.dtype == dtype
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    tol = {torch.float64: 1e-10, torch.float32: 1e-5}.get(dtype, 1e-2)
    torch.testing.assert_close(out.double(), want, atol=tol, rtol=tol)
    assert_lse_close(lse, want_lse, atol=1e-5 if dtype != torch.float64 else 1e-10, rtol=1e-5)


def test_fully_masked_rows_give_zero_and_minus_inf(randn, naive_attention):
    q_, k_, v_ = qkv(randn, (2, 2, 2, 40, 33, 8, 8), torch.float32, requires_grad=True)
    late = ir_mod("mask", "late", op(Op.GE, q, const(10)))  # rows 0..9 see nothing
    out, lse = reference_attention(q_, k_, v_, None, None, None, False, True, mask_mod=late, q_chunk=4, kv_chunk=8)
    want, want_lse = naive_attention(q_.detach(), k_.detach(), v_.detach(), None, lambda b_, h_, q_i, kv_i: q_i >= 10)
    assert not out.isnan().any() and not lse.isnan().any()
    assert torch.equal(out[:, :, :10], torch.zeros_like(out[:, :, :10]))
    assert lse[:, :, :10].eq(-math.inf).all() and lse[:, :, 10:].isfinite().all()
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)
    assert_lse_close(lse, want_lse, atol=1e-5, rtol=1e-5)
    (out.sum() + lse[:, :, 10:].sum()).backward()
    for t in (q_, k_, v_):
        assert t.grad.isfinite().all()
    assert q_.grad[:, :, :10].abs().max() == 0


def test_everything_masked(randn):
    q_, k_, v_ = qkv(randn, (1, 1, 1, 5, 7, 4, 4), torch.float32)
    never = ir_mod("mask", "never", op(Op.LT, kv, const(0)))
    out, lse = reference_attention(q_, k_, v_, None, None, None, False, True, mask_mod=never)
    assert torch.equal(out, torch.zeros_like(out)) and lse.eq(-math.inf).all()


# ---------------------------------------------------------------- chunking


@pytest.mark.parametrize("chunks", [(1, 1), (3, 5), (64, 7), (7, 200)])
@pytest.mark.parametrize("name", ["causal", "alibi", "document"])
def test_chunk_sizes_do_not_change_the_result(name, chunks, rng, randn):
    shape = (1, 2, 2, 50, 60, 8, 8)
    _, score_mod, _, mask_mod = variant(name, 2, 60, rng)
    q_, k_, v_ = qkv(randn, shape, torch.float64)
    whole, whole_lse = reference_attention(q_, k_, v_, score_mod, None, None, False, True, mask_mod=mask_mod,
                                           q_chunk=10**6, kv_chunk=10**6)
    out, lse = reference_attention(q_, k_, v_, score_mod, None, None, False, True, mask_mod=mask_mod,
                                   q_chunk=chunks[0], kv_chunk=chunks[1])
    torch.testing.assert_close(out, whole, atol=1e-12, rtol=1e-12)
    assert_lse_close(lse, whole_lse, atol=1e-12, rtol=1e-12)


def test_element_budget_bounds_the_chunks(randn, naive_attention, monkeypatch):
    import flexcomp.reference as ref

    seen = []
    real = ref._Plan.scores

    def spy(self, q_, k_, q0, k0):
        s = real(self, q_, k_, q0, k0)
        seen.append(q_.shape[0] * q_.shape[1] * q_.shape[2] * k_.shape[2])
        return s

    monkeypatch.setattr(ref._Plan, "scores", spy)
    q_, k_, v_ = qkv(randn, (2, 2, 2, 300, 290, 8, 8), torch.float64)
    out, _ = reference_attention(q_, k_, v_, None, None, None, False, False, chunk_elements=2**12)
    assert len(seen) > 4 and max(seen) <= 2**12
    torch.testing.assert_close(out, naive_attention(q_, k_, v_)[0], atol=1e-10, rtol=1e-10)


# ---------------------------------------------------------------- block-mask tile semantics


def dense_from_tiles(tiles: torch.Tensor, block: int, Lq: int, Lkv: int, mask_fn) -> torch.Tensor:
    """What torch's kernel computes: FULL tiles keep everything, PARTIAL apply the mask, EMPTY drop all."""
    cls = tiles.repeat_interleave(block, dim=2)[:, :, :Lq].repeat_interleave(block, dim=3)[..., :Lkv]
    qi, ki = torch.arange(Lq).view(-1, 1), torch.arange(Lkv).view(1, -1)
    return (cls == TileClass.FULL) | ((cls == TileClass.PARTIAL) & mask_fn(None, None, qi, ki))


def test_block_mask_made_from_the_mask_equals_the_mask(rng, randn, naive_attention):
    shape = (2, 2, 2, 70, 53, 8, 8)
    _, _, mask_fn, mask_mod = variant("window", 2, 70, rng)
    q_, k_, v_ = qkv(randn, shape, torch.float64)
    block_mask = torch_create_block_mask(mask_fn, None, None, 70, 53, device="cpu", BLOCK_SIZE=16)
    block_mask.mask_mod = mask_mod
    out, lse = reference_attention(q_, k_, v_, None, block_mask, None, False, True, q_chunk=10, kv_chunk=12)
    want, want_lse = naive_attention(q_, k_, v_, None, mask_fn)
    torch.testing.assert_close(out, want, atol=1e-10, rtol=1e-10)
    assert_lse_close(lse, want_lse, atol=1e-10, rtol=1e-10)


def test_hand_edited_tiles_follow_torch_kernel_semantics(rng, randn, naive_attention):
    """A tile marked FULL skips mask_mod, a tile listed nowhere is skipped: as in torch's kernels."""
    L, block = 64, 16
    q_, k_, v_ = qkv(randn, (1, 1, 1, L, L, 8, 8), torch.float64)
    block_mask = torch_create_block_mask(causal_fn, None, None, L, L, device="cpu", BLOCK_SIZE=block)
    # q block 2: diagonal tile (2, 2) becomes FULL; off-diagonal tile (2, 0) becomes EMPTY.
    block_mask.kv_num_blocks[0, 0, 2] = 0
    block_mask.full_kv_num_blocks[0, 0, 2] = 2
    block_mask.full_kv_indices[0, 0, 2, :2] = torch.tensor([1, 2])
    tiles = tile_map(block_mask)
    assert tiles[0, 0, 2].tolist() == [TileClass.EMPTY, TileClass.FULL, TileClass.FULL, TileClass.EMPTY]
    assert tiles[0, 0, 3].tolist() == [TileClass.FULL] * 3 + [TileClass.PARTIAL]
    block_mask.mask_mod = ir_mod("mask", "causal", CAUSAL_IR)
    out, lse = reference_attention(q_, k_, v_, None, block_mask, None, False, True, q_chunk=12, kv_chunk=40)
    dense = dense_from_tiles(tiles, block, L, L, causal_fn)
    assert not torch.equal(dense, dense_from_tiles(tile_map(torch_create_block_mask(
        causal_fn, None, None, L, L, device="cpu", BLOCK_SIZE=block)), block, L, L, causal_fn))
    want, want_lse = naive_attention(q_, k_, v_, dense_mask=dense)
    torch.testing.assert_close(out, want, atol=1e-10, rtol=1e-10)
    assert_lse_close(lse, want_lse, atol=1e-10, rtol=1e-10)


def test_block_mask_per_batch_and_head_broadcasts(randn, naive_attention):
    """A block mask with B=1 broadcasts over batch; one with all heads keeps them apart."""
    B, H, L = 3, 2, 40
    q_, k_, v_ = qkv(randn, (B, H, H, L, L, 8, 8), torch.float64)

    def per_head(b_, h_, q_i, kv_i):
        return (q_i >= kv_i) | (h_ == 1)

    root = op(Op.OR, CAUSAL_IR, op(Op.EQ, h, const(1)))
    block_mask = torch_create_block_mask(per_head, 1, H, L, L, device="cpu", BLOCK_SIZE=16)
    block_mask.mask_mod = ir_mod("mask", "per_head", root)
    out, _ = reference_attention(q_, k_, v_, None, block_mask, None, False, False, q_chunk=16, kv_chunk=16)
    torch.testing.assert_close(out, naive_attention(q_, k_, v_, None, per_head)[0], atol=1e-10, rtol=1e-10)


def test_empty_rectangles_are_skipped(randn, monkeypatch):
    import flexcomp.reference as ref

    visited = []
    real = ref._attend_rows.__globals__["_weighted_values"]
    monkeypatch.setattr(ref, "_weighted_values", lambda p, v, g: visited.append(1) or real(p, v, g))
    q_, k_, v_ = qkv(randn, (1, 1, 1, 256, 256, 8, 8), torch.float32)
    block_mask = torch_create_block_mask(causal_fn, None, None, 256, 256, device="cpu", BLOCK_SIZE=32)
    reference_attention(q_, k_, v_, None, block_mask, None, False, False, q_chunk=32, kv_chunk=32)
    assert len(visited) == 8 * 9 // 2  # the lower triangle of an 8 x 8 grid of rectangles


# ---------------------------------------------------------------- autograd


def test_gradcheck_tiny_float64(rng, randn):
    slopes = torch.rand(2, generator=rng, dtype=torch.float64).requires_grad_(True)
    _, alibi_mod = alibi(slopes)
    q_, k_, v_ = qkv(randn, (1, 2, 2, 5, 6, 3, 4), torch.float64, requires_grad=True)
    causal = ir_mod("mask", "causal", CAUSAL_IR)

    def run(q_, k_, v_, slopes_):
        alibi_mod.resolvers["slopes"] = lambda: slopes_
        out, lse = reference_attention(q_, k_, v_, alibi_mod, None, None, False, True, mask_mod=causal,
                                       q_chunk=2, kv_chunk=4)
        return out, lse

    assert torch.autograd.gradcheck(run, (q_, k_, v_, slopes))


@pytest.mark.parametrize("name", ["causal", "alibi", "softcap"])
def test_gradients_match_naive(name, rng, randn, naive_attention):
    shape = (2, 4, 2, 33, 47, 8, 8)
    score_fn, score_mod, mask_fn, mask_mod = variant(name, 4, 47, rng)
    q_, k_, v_ = qkv(randn, shape, torch.float64, requires_grad=True)
    out, lse = reference_attention(q_, k_, v_, score_mod, None, None, True, True, mask_mod=mask_mod,
                                   q_chunk=8, kv_chunk=16)
    want, want_lse = naive_attention(q_, k_, v_, score_fn, mask_fn, None, True)
    up, up_lse = torch.randn_like(out), torch.randn_like(lse)
    got = torch.autograd.grad((out * up).sum() + (lse * up_lse).sum(), (q_, k_, v_))
    expected = torch.autograd.grad((want * up).sum() + (want_lse * up_lse).sum(), (q_, k_, v_))
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, atol=1e-10, rtol=1e-10)


def test_evaluate_mod_runs_the_ir(randn):
    slopes = randn(3)
    _, mod = alibi(slopes)
    s = randn(2, 3, 4, 5)
    bi, hi = torch.arange(2).view(2, 1, 1, 1), torch.arange(3).view(1, 3, 1, 1)
    qi, ki = torch.arange(4).view(1, 1, 4, 1), torch.arange(5).view(1, 1, 1, 5)
    torch.testing.assert_close(mod(s, bi, hi, qi, ki), s + slopes[hi] * (ki - qi))
    assert ir_mod("mask", "causal", CAUSAL_IR)(0, 0, 3, 2).item() is True


def test_mods_specialize_once_per_call_not_per_rectangle(rng, randn, naive_attention, monkeypatch):
    """Many (q chunk x kv chunk) rectangles, but each Mod is specialized and its tensors read once per call."""
    score_fn, score_mod, _, _ = variant("alibi", 2, 40, rng)
    doc_ids = torch.arange(40) // 7
    doc_fn, doc_mod = document(doc_ids)
    calls = {"specialized": 0, "tensors": 0}

    def counting(method):
        original = getattr(Mod, method)

        def counted(self):
            calls[method] += 1
            return original(self)
        return counted

    for method in calls:
        monkeypatch.setattr(Mod, method, counting(method))
    q_, k_, v_ = qkv(randn, (1, 2, 2, 40, 40, 8, 8), torch.float64)
    out, lse = reference_attention(q_, k_, v_, score_mod, None, None, False, True, mask_mod=doc_mod,
                                   q_chunk=8, kv_chunk=8)  # 25 rectangles
    assert calls == {"specialized": 2, "tensors": 3}  # each mod's tensors once, the score_mod's once more for grad
    want, want_lse = naive_attention(q_, k_, v_, score_fn, doc_fn, None, True)
    torch.testing.assert_close(out, want, atol=1e-10, rtol=1e-10)
    assert_lse_close(lse, want_lse, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("name", ["causal", "window", "document", "prefix"])
def test_flexcomp_block_masks(name, rng, randn, naive_attention):
    """Block masks from flexcomp's own create_block_mask: same tiles as ours, same answer as the dense mask."""
    from flexcomp.blockmask import create_block_mask

    Lq, Lkv = 150, 150
    _, _, mask_fn, mask_mod = variant(name, 2, 150, rng)
    q_, k_, v_ = qkv(randn, (2, 2, 1, Lq, Lkv, 8, 8), torch.float64)
    block_mask = create_block_mask(mask_mod, None, None, Lq, Lkv, device="cpu", BLOCK_SIZE=32)
    assert torch.equal(tile_map(block_mask).long(), block_mask.tile_classes().long())
    out, lse = reference_attention(q_, k_, v_, None, block_mask, None, True, True, q_chunk=64, kv_chunk=64)
    want, want_lse = naive_attention(q_, k_, v_, None, mask_fn, None, True)
    torch.testing.assert_close(out, want, atol=1e-10, rtol=1e-10)
    assert_lse_close(lse, want_lse, atol=1e-10, rtol=1e-10)


# ---------------------------------------------------------------- float64: torch's type promotion, node by node


def relative_bias_fn(s, b_, h_, q_, kv_):
    return s + 0.1 * (kv_ - q_)  # the bias meets no float64 value: torch computes it in float32


def test_float64_index_terms_compute_in_float32_as_torch(randn, torch_flex):
    import flexcomp as fc

    q_ = randn(1, 2, 4, 8, dtype=torch.float64)
    k_, v_ = randn(1, 2, 3000, 8, dtype=torch.float64), randn(1, 2, 3000, 8, dtype=torch.float64)
    want, want_lse = torch_flex.flex_attention(q_, k_, v_, relative_bias_fn, return_lse=True)
    out, lse = reference_attention(q_, k_, v_, fc.score_mod(relative_bias_fn), return_lse=True)
    torch.testing.assert_close(out, want, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(lse, want_lse, atol=1e-12, rtol=1e-12)
    # float64 all the way (the other reading) is visibly different at these indices: the test can tell them apart
    everywhere = lambda s, b_, h_, q_, kv_: s + 0.1 * (kv_ - q_).double()
    _, all_f64_lse = reference_attention(q_, k_, v_, everywhere, return_lse=True)
    assert (all_f64_lse - want_lse).abs().max() > 1e-7


def test_evaluate_promotes_like_torch():
    from flexcomp.evaluate import evaluate, index_grid

    env = {**index_grid(1, 1, 5, 4000), "score": torch.randn(1, 1, 5, 4000, dtype=torch.float64)}
    bias = Node(Op.MUL, F32, (const(0.1), Node(Op.CAST, F32, (op(Op.SUB, kv, q),))))  # 0.1 * float(kv - q)
    scaled = Node(Op.MUL, F32, (score, const(0.1)))  # a literal takes the score's dtype, exactly
    got_bias, got_scaled = (evaluate(n, env) for n in (bias, scaled))
    i, j = env["q_idx"].long(), env["kv_idx"].long()
    assert got_bias.dtype == torch.float32 and torch.equal(got_bias, 0.1 * (j - i))
    assert got_scaled.dtype == torch.float64 and torch.equal(got_scaled, env["score"] * 0.1)
    assert evaluate(bias, env, float_dtype=torch.float64).dtype == torch.float64  # the explicit override
