"""Code written for torch's FlexAttention, accepted as written (issue 17, the front-end structure).

Each mod below is written the way torch users write them: torch's own and_masks/or_masks/noop_mask, helpers
returning tuples, chained indexing of captured tensors, a captured tensor's shape, `x is None`, bit shifts and
small unrolled loops.  Every one runs through the reference backend and the Triton interpreter, forward and
backward, against float64 attention whose scores and mask come from the user's own function evaluated element
by element (vmapped, as torch evaluates it); every mask's block mask visits no more tiles than torch's.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
from naive import assert_close_to_reference, naive_attention
from test_block_visits import dense_classes, torch_classes
from torch.nn.attention.flex_attention import and_masks, noop_mask, or_masks

import flexcomp as fc
from flexcomp.errors import UnsupportedConstructError
from flexcomp.tiles import TileClass

B, H, L, D = 2, 2, 48, 16
W = 8  # the image width of the 2-D masks (L = 6 rows of 8)
GEN = torch.Generator().manual_seed(17)


def elementwise(fn, *args: torch.Tensor) -> torch.Tensor:
    """`fn` applied to every element of the broadcast int32 index grid, as torch's vmap applies it."""
    *rest, last = torch.broadcast_tensors(*args)
    flat = [a.reshape(-1) for a in rest] + [last.reshape(-1)]
    ints = [a if a.is_floating_point() else a.to(torch.int32) for a in flat]
    return torch.func.vmap(fn)(*ints).reshape(last.shape)


# ---------------------------------------------------------------- the gallery


def get_x_y(idx):
    return idx // W, idx % W


def manhattan(b, h, q_idx, kv_idx):  # a helper returning a tuple, unpacked twice
    q_x, q_y = get_x_y(q_idx)
    kv_x, kv_y = get_x_y(kv_idx)
    return abs(q_x - kv_x) + abs(q_y - kv_y) <= 3


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def sliding_window(b, h, q_idx, kv_idx):
    return q_idx - kv_idx <= 10


def prefix(b, h, q_idx, kv_idx):
    return kv_idx < 6


def block_causal(b, h, q_idx, kv_idx):  # bit shifts: 16-token blocks
    return (q_idx >> 4) >= (kv_idx >> 4)


PAIR = (5, 20)  # a captured tuple of constants
INTERVALS = torch.tensor([[0, 12], [12, 30], [30, 48]], dtype=torch.int32)
DOCUMENT = torch.repeat_interleave(torch.arange(3, dtype=torch.int32), torch.tensor([12, 18, 18]))
TOPK = torch.randint(0, 3, (B, H, 3), generator=GEN, dtype=torch.int32)


def document_interval(b, h, q_idx, kv_idx):  # chained indexing: intervals[doc][0]
    doc = DOCUMENT[q_idx]
    return (INTERVALS[doc][0] <= kv_idx) & (kv_idx < INTERVALS[doc][1]) & (kv_idx <= q_idx)


def top_block(b, h, q_idx, kv_idx):  # topk[b, h][q // 16]: a chosen 16-key block per 16-query block
    return (kv_idx // 16 == TOPK[b, h][q_idx // 16]) | (q_idx == kv_idx)


def tuple_window(b, h, q_idx, kv_idx):  # a captured tuple indexed by constants
    low, high = PAIR[0], PAIR[-1]
    return (q_idx - kv_idx >= -low) & (q_idx - kv_idx <= high)


MASKS = {
    "manhattan": manhattan,
    "torch_and_masks": and_masks(causal, sliding_window),
    "torch_or_masks": or_masks(prefix, causal),
    "torch_noop_mask": noop_mask,
    "block_causal_shift": block_causal,
    "document_interval": document_interval,
    "top_block": top_block,
    "tuple_window": tuple_window,
}

BIAS = torch.randn(B, H, L, generator=GEN)
EDGE_WEIGHT = torch.randn(4, generator=GEN)
EDGE_FEATURE = torch.randn(L, 4, generator=GEN)
ROPE_Q, ROPE_K = torch.randn(L, 3, generator=GEN), torch.randn(L, 3, generator=GEN)
ALIBI = None


def chained_bias(score, b, h, q_idx, kv_idx):  # bias[b][h][q_idx], sized by its shape
    return score + bias_scale() * BIAS[b][h][kv_idx] / BIAS.shape[-1] * BIAS.size(2) / BIAS.ndim


def bias_scale():
    return 0.5


def optional_alibi(score, b, h, q_idx, kv_idx):  # `is None` on a captured name is a constant
    if ALIBI is not None:
        return score + ALIBI[h] * (kv_idx - q_idx)
    return score * 1.5 if BIAS is not None else score


def path_edge_bias(score, b, h, q_idx, kv_idx):  # Graphormer-style: a loop over the path positions, unrolled
    bias = 0.0
    for i in range(EDGE_WEIGHT.shape[0]):
        bias = bias + EDGE_WEIGHT[i] * (EDGE_FEATURE[q_idx, i] - EDGE_FEATURE[kv_idx, i])
    return score + bias


def rope_dot(score, b, h, q_idx, kv_idx):  # a small dot product over a captured row
    dot = 0.0
    for d in range(len(ROPE_Q[0])):
        dot += ROPE_Q[q_idx][d] * ROPE_K[kv_idx][d]
    return score + 0.3 * dot


def shifted_bucket(score, b, h, q_idx, kv_idx):  # arithmetic >> on negative distances, << on ints
    bucket = (kv_idx - q_idx) >> 2
    return score + 0.1 * bucket + ((h << 1) - (b << 3 >> 2))


def torch_combinator_score(score, b, h, q_idx, kv_idx):  # new_full / new_zeros of a scalar are constants
    return score + b.new_full((), 0.25, dtype=torch.float32) * h + q_idx.new_zeros(()) - kv_idx.new_ones(())


POINTS = torch.randn(L, 3, generator=GEN)


def euclidean(score, b, h, q_idx, kv_idx):  # whole-row arithmetic on a small captured row, then .sum()
    distance = ((POINTS[q_idx] - POINTS[kv_idx]) ** 2).sum()
    return score - distance + 0.1 * torch.dot(ROPE_Q[q_idx], ROPE_K[kv_idx]) + (ROPE_Q[q_idx] * 2).sum(dim=-1)


SCORES = {
    "chained_bias": chained_bias,
    "optional_alibi": optional_alibi,
    "path_edge_bias": path_edge_bias,
    "rope_dot": rope_dot,
    "shifted_bucket": shifted_bucket,
    "torch_combinator_score": torch_combinator_score,
    "euclidean": euclidean,
}


# ---------------------------------------------------------------- attention against float64


def attend(backend: str, randn, score_fn=None, mask_fn=None):
    dtype = torch.float64 if backend == "reference" else torch.float32
    q, k, v = (randn(B, H, L, D, dtype=dtype, requires_grad=True) for _ in range(3))
    block_mask = fc.create_block_mask(mask_fn, B, H, L, L, "cpu", 16) if mask_fn is not None else None
    options = {"BLOCK_M": 16, "BLOCK_N": 16} if backend == "triton" else None
    out, lse = fc.flex_attention(
        q, k, v, score_mod=score_fn, block_mask=block_mask, return_lse=True, backend=backend, kernel_options=options
    )
    score_dense = (lambda s, b, h, qi, ki: elementwise(score_fn, s, b, h, qi, ki)) if score_fn else None
    mask_dense = (lambda b, h, qi, ki: elementwise(mask_fn, b, h, qi, ki)) if mask_fn else None
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    want_out, want_lse = naive_attention(qd, kd, vd, score_fn=score_dense, mask_fn=mask_dense)
    # the dense oracle runs the user's function on float32 captured tables, so float32 rounding enters both sides
    atol = 1e-6 if backend == "reference" else 2e-5
    assert_close_to_reference(out, lse, want_out.detach(), want_lse.detach(), atol=atol)
    grad = randn(B, H, L, D, dtype=dtype)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(want_out, (qd, kd, vd), grad.double())
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, atol=1e-6 if backend == "reference" else 5e-5, rtol=1e-4)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("name", sorted(MASKS))
def test_mask_habits_match_float64(name: str, backend: str, randn, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("FLEXCOMP_CACHE_DIR", str(tmp_path / "cache"))
    attend(backend, randn, mask_fn=MASKS[name])


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("name", sorted(SCORES))
def test_score_habits_match_float64(name: str, backend: str, randn, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("FLEXCOMP_CACHE_DIR", str(tmp_path / "cache"))
    attend(backend, randn, score_fn=SCORES[name], mask_fn=causal)


@pytest.mark.parametrize("name", sorted(MASKS))
def test_masks_visit_no_more_tiles_than_torch(name: str) -> None:
    mask, block = MASKS[name], (16, 16)
    ours = fc.create_block_mask(mask, B, H, L, L, "cpu", block).tile_classes().expand(B, H, -1, -1)
    grid = [torch.arange(n).view([-1 if d == i else 1 for d in range(4)]) for i, n in enumerate((B, H, L, L))]
    assert torch.equal(ours, dense_classes(elementwise(mask, *grid), block))
    theirs = torch_classes(mask, B, H, L, L, block)
    visited, torch_visited = ours != TileClass.EMPTY, theirs != TileClass.EMPTY
    assert not (visited & ~torch_visited).any(), name


# ---------------------------------------------------------------- the structure itself, and what is refused


def test_shifts_follow_python_on_int32() -> None:
    counts = torch.tensor([0, 1, 5, 31, 40], dtype=torch.int32)
    values = torch.tensor([-1000, -7, 0, 9, 123456], dtype=torch.int32)

    def shifted(b, h, q_idx, kv_idx):
        return (q_idx >> kv_idx) + (kv_idx << 2)

    ir = fc.score_mod(lambda score, b, h, q_idx, kv_idx: score + shifted(b, h, q_idx, kv_idx)).ir
    from flexcomp.evaluate import evaluate

    for v in values.tolist():
        for c in counts.tolist():
            env = {
                "score": torch.tensor(0.0),
                "b": torch.tensor(0),
                "h": torch.tensor(0),
                "q_idx": torch.tensor(v, dtype=torch.int32),
                "kv_idx": torch.tensor(c, dtype=torch.int32),
            }
            got = float(evaluate(ir, env))
            assert got == float((v >> c) + (c << 2)), (v, c)


def test_torch_combinators_compile_to_the_same_ir_as_ours() -> None:
    theirs = fc.mask_mod(and_masks(causal, sliding_window)).ir
    ours = fc.and_masks(causal, sliding_window).ir
    assert theirs == ours


def test_data_dependent_loop_bound_is_refused_with_a_hint() -> None:
    def loop_to_q(score, b, h, q_idx, kv_idx):
        for i in range(q_idx):
            score = score + i
        return score

    with pytest.raises(UnsupportedConstructError, match="known when the mod is compiled") as info:
        _ = fc.score_mod(loop_to_q).ir
    assert "range(MAX)" in str(info.value)


def test_captured_tensor_missing_indices_says_how_many() -> None:
    def short(score, b, h, q_idx, kv_idx):
        return score + BIAS[b] * 2

    with pytest.raises(fc.FlexcompError, match="2 more indices"):
        _ = fc.score_mod(short).ir


def test_a_row_must_be_reduced() -> None:
    def unreduced(score, b, h, q_idx, kv_idx):
        return score + POINTS[q_idx] * 2

    with pytest.raises(fc.FlexcompError, match="a row of 3 values"):
        _ = fc.score_mod(unreduced).ir


def test_the_interval_analysis_sees_through_shifts() -> None:
    """Without evaluating the mask (exact=False), the shift rules alone decide every block-causal tile."""
    ours = fc.create_block_mask(block_causal, None, None, 128, 128, "cpu", 16, exact=False)
    assert set(ours.decided_by) == {"analysis"}, ours.explain()
    grid = [torch.arange(n).view([-1 if d == i else 1 for d in range(4)]) for i, n in enumerate((1, 1, 128, 128))]
    assert torch.equal(ours.tile_classes(), dense_classes(elementwise(block_causal, *grid), (16, 16)))
