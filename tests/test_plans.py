"""Call plans (codegen/plans.py): a repeated call reuses what the first decided, and reads its own tensors.

Every check draws fresh inputs for each call and compares with the float64 oracle, so a plan that kept the first
call's tensors (or its captured tensors, or another block mask's tables) fails.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from flexcomp.codegen import backward, forward
from flexcomp.codegen.plans import PlanCache, clear_plans, layout
from naive import assert_close_to_reference, naive_attention

import flexcomp as fc


@pytest.fixture(autouse=True)
def no_plans():
    clear_plans()
    yield
    clear_plans()


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def run(q, k, v, **kwargs):
    return fc.flex_attention(q, k, v, backend="triton", return_lse=True, kernel_options={"BLOCK_M": 16, "BLOCK_N": 16},
                             **kwargs)


def test_a_repeated_call_reuses_its_plan_with_the_new_tensors(randn):
    block_mask = fc.create_block_mask(fc.mask_mod(causal), 1, 1, 40, 40, BLOCK_SIZE=16)
    for _ in range(3):
        q, k, v = randn(2, 2, 40, 16), randn(2, 2, 40, 16), randn(2, 2, 40, 16)
        out, lse = run(q, k, v, block_mask=block_mask)
        assert_close_to_reference(out, lse, *naive_attention(q, k, v, mask_fn=causal))
    assert len(forward._PLANS) == 1


def test_a_new_layout_makes_a_new_plan(randn):
    q, k, v = randn(1, 2, 32, 16), randn(1, 2, 32, 16), randn(1, 2, 32, 16)
    run(q, k, v)
    strided = randn(1, 32, 2, 16).transpose(1, 2)  # same shape, other strides
    out, lse = run(strided, k, v)
    assert_close_to_reference(out, lse, *naive_attention(strided, k, v))
    offset = randn(1, 2, 32, 16 + 1)[..., 1:]  # a view that starts 4 bytes in: another alignment
    out, lse = run(q, offset, v)
    assert_close_to_reference(out, lse, *naive_attention(q, offset, v))
    assert len(forward._PLANS) == 3


def test_self_attention_with_one_tensor_for_q_k_v(randn):
    x = randn(1, 2, 24, 16)
    run(x, x, x)
    x = randn(1, 2, 24, 16)
    out, lse = run(x, x, x)
    assert_close_to_reference(out, lse, *naive_attention(x, x, x))


def test_a_rebound_captured_tensor_is_read_at_every_call(randn):
    bias = randn(2, 32)

    @fc.score_mod
    def head_bias(score, b, h, q_idx, kv_idx):
        return score + bias[h, kv_idx]

    q, k, v = randn(1, 2, 32, 16), randn(1, 2, 32, 16), randn(1, 2, 32, 16)
    for _ in range(2):
        bias = randn(2, 32)  # rebound, same shape: the same plan, the new values
        out, lse = run(q, k, v, score_mod=head_bias)
        expected = naive_attention(q, k, v, score_fn=lambda s, b, h, i, j, t=bias: s + t.double()[h, j])
        assert_close_to_reference(out, lse, *expected)
    assert len(forward._PLANS) == 1


def test_a_plan_goes_with_its_block_mask(randn):
    """Nothing keeps a used block mask (or its tables) alive: its forward and backward plans go when it goes."""
    q, k, v = (randn(1, 1, 32, 16, requires_grad=True) for _ in range(3))
    block_mask = fc.create_block_mask(fc.mask_mod(causal), 1, 1, 32, 32, BLOCK_SIZE=16)
    out, lse = run(q, k, v, block_mask=block_mask)
    out.sum().backward()
    assert len(forward._PLANS) == 1 and len(backward._PLANS) == 1
    alive = weakref.ref(block_mask)
    del block_mask, out, lse  # the autograd graph holds the block mask until its outputs go
    gc.collect()
    assert alive() is None and len(forward._PLANS) == 0 and len(backward._PLANS) == 0


def test_another_block_mask_of_the_same_shape_gets_its_own_plan(randn):
    q, k, v = randn(1, 1, 48, 16), randn(1, 1, 48, 16), randn(1, 1, 48, 16)
    ids = torch.tensor([0] * 20 + [1] * 28, dtype=torch.int32)

    @fc.mask_mod
    def document(b, h, q_idx, kv_idx):
        return ids[q_idx] == ids[kv_idx]

    first = fc.create_block_mask(document, 1, 1, 48, 48, BLOCK_SIZE=16)
    run(q, k, v, block_mask=first)
    ids = torch.tensor([0] * 5 + [1] * 43, dtype=torch.int32)
    second = fc.create_block_mask(document, 1, 1, 48, 48, BLOCK_SIZE=16)
    out, lse = run(q, k, v, block_mask=second)
    assert_close_to_reference(out, lse, *naive_attention(q, k, v, mask_fn=lambda b, h, i, j: ids[i] == ids[j]))


def test_repeated_backward_with_a_learnable_bias(randn):
    bias = randn(2, 64, requires_grad=True)

    @fc.score_mod
    def rel_bias(score, b, h, q_idx, kv_idx):
        return score + bias[h, q_idx - kv_idx]

    block_mask = fc.create_block_mask(fc.mask_mod(causal), 1, 1, 40, 40, BLOCK_SIZE=16)
    for _ in range(2):
        q, k, v = (randn(1, 2, 40, 16, requires_grad=True) for _ in range(3))
        dout = randn(1, 2, 40, 16)
        out = fc.flex_attention(q, k, v, score_mod=rel_bias, block_mask=block_mask, backend="triton",
                                kernel_options={"BLOCK_M": 16, "BLOCK_N": 16})
        grads = torch.autograd.grad(out, (q, k, v, bias), dout)
        inputs = [t.detach().double().requires_grad_() for t in (q, k, v, bias)]
        ref, _ = naive_attention(*inputs[:3], mask_fn=causal,
                                 score_fn=lambda s, b, h, i, j, t=inputs[3]: s + t[h, (i - j) % 64])
        expected = torch.autograd.grad(ref, inputs, dout.double())
        for got, want in zip(grads, expected):
            torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)
    assert len(backward._PLANS) == 1


def test_plan_cache_finds_only_the_same_anchor():
    class Anchor:
        pass

    cache, anchor = PlanCache(size=2), Anchor()
    cache.put("key", anchor, "plan")
    assert cache.get("key", anchor) == "plan"
    assert cache.get("key", Anchor()) is None
    cache.put("a", None, 1)
    cache.put("b", None, 2)  # past the size: the least recently used ("key") goes
    assert cache.get("key", anchor) is None and cache.get("a", None) == 1


def test_layout_tells_alignment_and_strides_apart(randn):
    base = randn(2, 17)
    assert layout(base[:, :16]) != layout(base[:, 1:])
    assert layout(base[:, :16]) != layout(base[:, :16].contiguous())


def test_score_and_mask_mods_may_capture_tensors_of_the_same_name(randn):
    def biased(table):
        @fc.score_mod
        def bias(score, b, h, q_idx, kv_idx):
            return score + table[kv_idx]
        return bias

    def documents(table):
        @fc.mask_mod
        def same_document(b, h, q_idx, kv_idx):
            return table[q_idx] == table[kv_idx]
        return same_document

    weights = randn(32, requires_grad=True)
    ids = torch.tensor([0] * 12 + [1] * 20, dtype=torch.int32)
    block_mask = fc.create_block_mask(documents(ids), 1, 1, 32, 32, BLOCK_SIZE=16)
    q, k, v = (randn(1, 1, 32, 16, requires_grad=True) for _ in range(3))
    dout = randn(1, 1, 32, 16)
    out = fc.flex_attention(q, k, v, score_mod=biased(weights), block_mask=block_mask, backend="triton",
                            kernel_options={"BLOCK_M": 16, "BLOCK_N": 16})
    grads = torch.autograd.grad(out, (q, k, v, weights), dout)
    inputs = [t.detach().double().requires_grad_() for t in (q, k, v, weights)]
    ref, _ = naive_attention(*inputs[:3], mask_fn=lambda b, h, i, j: ids[i] == ids[j],
                             score_fn=lambda s, b, h, i, j: s + inputs[3][j])
    for got, want in zip(grads, torch.autograd.grad(ref, inputs, dout.double())):
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)


def test_a_replaced_table_or_mask_mod_is_not_served_stale(randn):
    q, k, v = randn(1, 1, 32, 16), randn(1, 1, 32, 16), randn(1, 1, 32, 16)
    block_mask = fc.create_block_mask(fc.mask_mod(causal), 1, 1, 32, 32, BLOCK_SIZE=16)
    run(q, k, v, block_mask=block_mask)
    block_mask.mask_mod = fc.mask_mod(lambda b, h, q_idx, kv_idx: q_idx - kv_idx <= 3)  # FULL tiles stay FULL
    out, lse = run(q, k, v, block_mask=block_mask)
    reference = naive_attention(q, k, v, dense_mask=_torch_semantics(block_mask, lambda i, j: i - j <= 3))
    assert_close_to_reference(out, lse, *reference)
    block_mask.full_kv_num_blocks = torch.zeros_like(block_mask.full_kv_num_blocks)  # no FULL tiles left
    out, lse = run(q, k, v, block_mask=block_mask)
    reference = naive_attention(q, k, v, dense_mask=_torch_semantics(block_mask, lambda i, j: i - j <= 3))
    assert_close_to_reference(out, lse, *reference)
    assert len(forward._PLANS) == 3


def _torch_semantics(block_mask, mask_fn):
    """The dense mask torch's flex attention computes: mask_fn inside PARTIAL tiles, everything in FULL ones."""
    q_len, kv_len = block_mask.seq_lengths
    bq, bkv = block_mask.BLOCK_SIZE
    i, j = torch.arange(q_len)[:, None], torch.arange(kv_len)[None, :]
    tiles = torch.zeros(q_len // bq, kv_len // bkv, dtype=torch.int8)
    for table, count, value in ((block_mask.kv_indices, block_mask.kv_num_blocks, 1),
                                (block_mask.full_kv_indices, block_mask.full_kv_num_blocks, 2)):
        for row in range(tiles.shape[0]):
            tiles[row, table[0, 0, row, :count[0, 0, row]].long()] = value
    cls = tiles.repeat_interleave(bq, 0).repeat_interleave(bkv, 1)
    return ((cls == 2) | ((cls == 1) & mask_fn(i, j)))[None, None]
