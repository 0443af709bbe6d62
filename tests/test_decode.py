"""Split-KV decoding (codegen/decode.py) under Triton's interpreter, against the float64 reference: GQA packing,
split merging (including splits with nothing unmasked), block masks, score mods with captured tensors, fully
masked rows, the dispatch between the decode and the forward kernels, and a gpt-fast-style decode loop."""

from __future__ import annotations

import pytest
import torch
from flexcomp.codegen import decode as decode_module
from naive import assert_close_to_reference, naive_attention

import flexcomp as fc

TOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


@pytest.fixture
def decode_calls(monkeypatch):
    """How many calls took the decode kernel, and with how many splits."""
    calls = []
    run = decode_module.DecodeLaunch.run

    def counted(self, tensors):
        calls.append(self.splits)
        return run(self, tensors)

    monkeypatch.setattr(decode_module.DecodeLaunch, "run", counted)
    return calls


def _qkv(randn, B, Hq, Hkv, Lq, Lkv, D=16, Dv=None, dtype=torch.float32):
    return (randn(B, Hq, Lq, D, dtype=dtype), randn(B, Hkv, Lkv, D, dtype=dtype),
            randn(B, Hkv, Lkv, Dv or D, dtype=dtype))  # fmt: skip


def _check(q, k, v, decode_calls, splits=None, mask_fn=None, score_fn=None, merge="fused", **kwargs):
    options = {"BACKEND": "TRITON_DECODE", "DECODE_MERGE": merge} | ({"NUM_SPLITS": splits} if splits else {})
    out, lse = fc.flex_attention(
        q, k, v, enable_gqa=True, return_lse=True, backend="triton", kernel_options=options, **kwargs
    )
    ref_out, ref_lse = naive_attention(q, k, v, score_fn=score_fn, mask_fn=mask_fn, enable_gqa=True)
    assert_close_to_reference(out, lse, ref_out, ref_lse, atol=TOL[q.dtype])
    assert decode_calls and decode_calls[-1] == (splits or decode_calls[-1])
    return out, lse


def _counters_zero():
    return all(not counters.any() for counters in decode_module._ARRIVALS.values())


@pytest.mark.parametrize("group", [1, 2, 4, 8])
@pytest.mark.parametrize("q_len", [1, 3, 16])
def test_dense_gqa_packing_and_splits(randn, decode_calls, group, q_len):
    q, k, v = _qkv(randn, 2, 8, 8 // group, q_len, 203)
    _check(q, k, v, decode_calls, splits=4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_odd_head_dims(randn, decode_calls, dtype):
    q, k, v = _qkv(randn, 1, 4, 2, 2, 150, D=40, Dv=24, dtype=dtype)
    _check(q, k, v, decode_calls, splits=2)


def test_window_leaves_most_splits_empty(randn, decode_calls):
    """A sliding window at the end of the cache: most splits see no tile at all and must weigh 0 in the merge."""
    q, k, v = _qkv(randn, 2, 4, 2, 2, 300)

    def window(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx + 297) & (q_idx + 297 - kv_idx < 40)

    block_mask = fc.create_block_mask(window, None, None, 2, 300, device="cpu", BLOCK_SIZE=(16, 16))
    _check(q, k, v, decode_calls, splits=8, mask_fn=window, block_mask=block_mask)


def test_fully_masked_rows(randn, decode_calls):
    """Rows of query 1 see nothing: output 0 and lse -inf, never NaN, whatever the split."""
    q, k, v = _qkv(randn, 1, 4, 1, 3, 100)

    def skip_row_1(b, h, q_idx, kv_idx):
        return (q_idx != 1) & (kv_idx <= 60 + q_idx)

    block_mask = fc.create_block_mask(skip_row_1, None, None, 3, 100, device="cpu", BLOCK_SIZE=(16, 16))
    _check(q, k, v, decode_calls, splits=4, mask_fn=skip_row_1, block_mask=block_mask)
    out = fc.flex_attention(q, k, v, block_mask=block_mask, enable_gqa=True, backend="triton")
    assert torch.equal(out[:, :, 1], torch.zeros_like(out[:, :, 1]))


@pytest.mark.parametrize("q_len", [1, 3])
def test_bounds_that_floor_divide_the_query_rows(randn, decode_calls, q_len):
    """Closed-form bounds computing q_lo // 4 (found by tests/test_fuzz.py): the decode kernel passes q_lo as the
    literal 0 and, at one query row, Q_LEN - 1 as a constant, on which the rendered int casts did not exist."""
    q, k, v = _qkv(randn, 1, 4, 2, q_len, 90)

    def shrinking(b, h, q_idx, kv_idx):
        return kv_idx <= 60 - q_idx // 4 - q_idx

    block_mask = fc.create_block_mask(shrinking, None, None, q_len, 90, device="cpu", BLOCK_SIZE=(16, 16))
    assert block_mask.bounds is not None  # the closed form, not tables
    _check(q, k, v, decode_calls, splits=2, mask_fn=shrinking, block_mask=block_mask)


@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("q_len", [1, 3, 16])
def test_fused_merge_equals_separate(randn, decode_calls, group, q_len):
    """The last split to arrive merges (fused) as the separate launch does, both against float64: a window at the
    end of the cache leaves most of the 8 splits with nothing unmasked, and query row 1 sees nothing at all."""
    q, k, v = _qkv(randn, 2, 8, 8 // group, q_len, 260)

    def window_but_row_1(b, h, q_idx, kv_idx):
        return (q_idx != 1) & (kv_idx <= q_idx + 240) & (q_idx + 240 - kv_idx < 30)

    block_mask = fc.create_block_mask(window_but_row_1, None, None, q_len, 260, device="cpu", BLOCK_SIZE=(16, 16))
    fused, separate = (_check(q, k, v, decode_calls, splits=8, mask_fn=window_but_row_1, block_mask=block_mask,
                              merge=merge) for merge in ("fused", "separate"))  # fmt: skip
    torch.testing.assert_close(fused, separate, atol=0, rtol=2e-7)  # one merge_partials: fp32 rounding at most
    if q_len > 1:
        assert torch.equal(fused[0][:, :, 1], torch.zeros_like(fused[0][:, :, 1]))
        assert torch.isneginf(fused[1][:, :, 1]).all()
    assert _counters_zero()


def test_repeated_calls_find_the_counters_zero(randn, decode_calls):
    """Every launch leaves the arrival counters it counted on at zero, so the next call (the same plan, or another
    with more programs sharing the stream's counters) needs no memset."""
    q, k, v = _qkv(randn, 2, 4, 2, 2, 130)
    first = [_check(q, k, v, decode_calls, splits=4) for _ in range(2)]
    assert torch.equal(first[0][0], first[1][0]) and _counters_zero()
    wider = _qkv(randn, 3, 8, 1, 1, 70)
    _check(*wider, decode_calls, splits=2)
    _check(q, k, v, decode_calls, splits=4)
    assert _counters_zero() and decode_calls[-4:] == [4, 4, 2, 4]
    with pytest.raises(ValueError, match="DECODE_MERGE"):
        _check(q, k, v, decode_calls, merge="after")


def test_score_mod_with_captured_tensor_across_packed_heads(randn, decode_calls):
    """The packed rows belong to different query heads: a mod indexing by h reads each row's own head."""
    q, k, v = _qkv(randn, 2, 8, 2, 2, 77)
    bias = randn(8, 77)

    def biased(score, b, h, q_idx, kv_idx):
        return score + bias[h, kv_idx] * (q_idx + 1)

    _check(q, k, v, decode_calls, splits=2, score_fn=biased, score_mod=biased)


def test_mask_by_head_walks_each_heads_row(randn, decode_calls):
    """Tables that differ by head: heads are not packed, each walks its own table row."""
    q, k, v = _qkv(randn, 1, 8, 2, 2, 180)

    def by_head(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx + 20 * h + 17

    block_mask = fc.create_block_mask(by_head, 1, 8, 2, 180, device="cpu", BLOCK_SIZE=(16, 16))
    _check(q, k, v, decode_calls, splits=4, mask_fn=by_head, block_mask=block_mask)


def test_dispatch(randn, decode_calls):
    """Short queries take the decode kernel by default; torch's kernel_options force either kernel."""
    q, k, v = _qkv(randn, 1, 4, 2, 4, 64)
    ref_out, _ = naive_attention(q, k, v, enable_gqa=True)
    for options, decoded in ((None, True), ({"BACKEND": "TRITON"}, False),
                             ({"FORCE_USE_FLEX_ATTENTION": True}, False)):  # fmt: skip
        before = len(decode_calls)
        out = fc.flex_attention(q, k, v, enable_gqa=True, backend="triton", kernel_options=options)
        torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=2e-5)
        assert (len(decode_calls) > before) == decoded, options
    long_q = randn(1, 4, decode_module.DECODE_MAX_Q + 1, 16)
    before = len(decode_calls)
    fc.flex_attention(long_q, k, v, enable_gqa=True, backend="triton")
    assert len(decode_calls) == before
    with pytest.raises(ValueError, match="TRITON_DECODE"):
        fc.flex_attention(
            randn(1, 4, 200, 16), k, v, enable_gqa=True, backend="triton", kernel_options={"BACKEND": "TRITON_DECODE"}
        )


def test_gradients_through_a_decode_forward(randn, decode_calls):
    """The decode kernel's out and lse feed the forward kernels' backward."""
    q, k, v = (t.requires_grad_() for t in _qkv(randn, 1, 4, 2, 3, 50))
    out = fc.flex_attention(q, k, v, enable_gqa=True, backend="triton", kernel_options={"NUM_SPLITS": 2})
    assert decode_calls
    grad = randn(*out.shape)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    ref_out, _ = naive_attention(q, k, v, enable_gqa=True)
    ref_grads = torch.autograd.grad(ref_out, (q, k, v), grad.double())
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.double(), want.double(), atol=1e-4, rtol=1e-4)


def test_gpt_fast_decode_loop(randn, decode_calls):
    """gpt-fast's loop with the import changed: a causal block mask built once for the whole cache, sliced at
    each step's q block, its mask_mod shifted by the step's position (a captured tensor)."""
    max_len, heads, kv_heads = 96, 4, 2
    k_cache, v_cache = randn(1, kv_heads, max_len, 16), randn(1, kv_heads, max_len, 16)

    def causal(b, h, q_idx, kv_idx):
        return q_idx >= kv_idx

    full = fc.create_block_mask(causal, 1, 1, max_len, max_len, device="cpu", BLOCK_SIZE=16)
    for pos in (0, 17, 95):
        input_pos = torch.tensor([pos])
        offset = input_pos[0]

        def shifted(b, h, q_idx, kv_idx):
            return causal(b, h, q_idx + offset, kv_idx)  # noqa: B023 (called within its step, as in gpt-fast)

        step_mask = full[:, :, input_pos // 16]
        step_mask.mask_mod = shifted
        step_mask.seq_lengths = (1, max_len)
        q = randn(1, heads, 1, 16)
        out = fc.flex_attention(q, k_cache, v_cache, block_mask=step_mask, enable_gqa=True, backend="triton")
        ref_out, _ = naive_attention(q, k_cache[:, :, : pos + 1], v_cache[:, :, : pos + 1], enable_gqa=True)
        torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=2e-5)
    assert len(decode_calls) == 3


def test_packing_and_split_choices():
    """Heads are packed while their rows fit a tile and the tiles are the same for all of them; splits fill the
    GPU without cutting a list into pieces shorter than MIN_TILES_PER_SPLIT, in powers of two."""
    shape = decode_module.DecodeShape(batch=8, q_heads=32, q_len=1, kv_len=16384, gqa_group=4, sparse_q=128,
                                      tiles_per_head=False)  # fmt: skip
    assert decode_module.heads_packed(shape) == 4
    assert decode_module.heads_packed(decode_module.dataclasses.replace(shape, tiles_per_head=True)) == 1
    assert decode_module.heads_packed(decode_module.dataclasses.replace(shape, q_len=48)) == 2  # 4 x 48 > 128 rows
    assert decode_module.heads_packed(decode_module.dataclasses.replace(shape, gqa_group=6, q_len=32)) == 3
    cpu = torch.device("cpu")
    for programs, tiles in ((64, 256), (512, 64), (8, 4096), (2, 3)):
        splits = decode_module.split_count(programs, tiles, cpu, None)
        assert splits & (splits - 1) == 0 and splits >= 1
        assert splits == 1 or tiles // splits >= decode_module.MIN_TILES_PER_SPLIT
    assert decode_module.split_count(64, 256, cpu, {"NUM_SPLITS": 16}) == 16
    with pytest.raises(ValueError, match="power of two"):
        decode_module.split_count(64, 256, cpu, {"NUM_SPLITS": 3})
    assert "q block" in decode_module.why_not_decode(decode_module.dataclasses.replace(shape, q_len=100, sparse_q=64))
