"""Masks whose rows are single kv intervals with ends read from captured tensors (flexcomp/sparsity/row_bounds.py):
their tables are built row by row, and must equal torch's create_block_mask (tests/test_blockmask.py
assert_tables_match_torch), on fresh random tensors."""

from __future__ import annotations

import pytest
import torch
from test_blockmask import assert_tables_match_torch

import flexcomp as fc
from flexcomp.blockmask import create_block_mask
from flexcomp.sparsity.row_bounds import row_bounds

B, H = 3, 2
SHAPES = [(300, 310, 32), (1, 200, (16, 64)), (77, 64, 16), (130, 129, 128)]  # q_len, kv_len, block


def tensors_for(rng: torch.Generator, q_len: int, kv_len: int) -> dict[str, torch.Tensor]:
    """Per-batch padding runs, per-head windows, per-batch query lengths and prefixes, two offsets: fresh each run."""
    ints = lambda lo, hi, n: torch.randint(lo, hi, (n,), generator=rng, dtype=torch.int32)
    start = ints(0, kv_len, B)
    return {"start": start, "end": torch.minimum(start + ints(0, kv_len + 1, B), torch.tensor(kv_len)),
            "offsets": ints(0, kv_len, 2), "window": ints(1, kv_len + 2, H), "q_lens": ints(0, q_len + 1, B),
            "prefix": ints(0, kv_len, B)}  # fmt: skip


def masks(t: dict[str, torch.Tensor]) -> dict:
    """The mask functions, reading `t` through closures (so the same function runs under torch and flexcomp)."""
    start, end, offsets, window, q_lens, prefix = (t[k] for k in ("start", "end", "offsets", "window", "q_lens",
                                                                  "prefix"))

    def padded_causal(b, h, q_idx, kv_idx):  # transformers' causal + left padding, at a decode step's offsets
        return (q_idx + offsets[0] >= kv_idx + offsets[1]) & (kv_idx + offsets[1] >= start[b]) & (
            kv_idx + offsets[1] < end[b])

    def head_windows(b, h, q_idx, kv_idx):  # a window per head, queries past each request's length masked
        return (q_idx < q_lens[b]) & (kv_idx <= q_idx) & (q_idx - kv_idx < window[h])

    def prefix_lm(b, h, q_idx, kv_idx):  # a prefix per request: bidirectional inside, causal after
        return (kv_idx < prefix[b]) | (kv_idx <= q_idx)

    def block_causal_shifted(b, h, q_idx, kv_idx):  # floor division by a constant, around a captured offset
        return (kv_idx + offsets[0]) // 8 <= (q_idx + offsets[0]) // 8

    def kv_lengths(b, h, q_idx, kv_idx):
        return kv_idx < end[b]

    return {f.__name__: f for f in (padded_causal, head_windows, prefix_lm, block_causal_shifted, kv_lengths)}


NAMES = list(masks(tensors_for(torch.Generator().manual_seed(0), 4, 4)))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_row_bound_tables_equal_torch(rng, name, shape) -> None:
    q_len, kv_len, block = shape
    fn = masks(tensors_for(rng, q_len, kv_len))[name]
    mod = fc.mask_mod(fn)
    assert row_bounds(mod.ir) is not None, "this mask's rows are single kv intervals"
    mask = create_block_mask(mod, B, H, q_len, kv_len, device="cpu", BLOCK_SIZE=block)
    assert set(mask.decided_by) == {"row bounds"}
    assert_tables_match_torch(mask, mod, fn, B, H)


def test_masks_that_are_not_one_interval_per_row_are_left_to_the_analysis(rng) -> None:
    t = tensors_for(rng, 64, 64)
    start, end = t["start"], t["end"]

    def outside_run(b, h, q_idx, kv_idx):  # two kv ranges per row
        return (kv_idx < start[b]) | (kv_idx >= end[b])

    def not_diagonal(b, h, q_idx, kv_idx):
        return kv_idx != q_idx

    for fn in (outside_run, not_diagonal):
        mod = fc.mask_mod(fn)
        assert row_bounds(mod.ir) is None
        mask = create_block_mask(mod, B, H, 64, 64, device="cpu", BLOCK_SIZE=16)
        assert "row bounds" not in mask.decided_by
        assert_tables_match_torch(mask, mod, fn, B, H)


@pytest.mark.parametrize("name", ["padded_causal", "head_windows"])
def test_attention_and_gradients_through_row_bound_tables_match_float64(rng, randn, naive_attention, name) -> None:
    """The tables (and the q-major ones the backward walks, derived from them) feed the kernels (interpreter) and
    the reference backend alike; outputs and gradients against float64."""
    fn = masks(tensors_for(rng, 70, 90))[name]
    mask = fc.create_block_mask(fc.mask_mod(fn), B, H, 70, 90, device="cpu", BLOCK_SIZE=32)
    assert set(mask.decided_by) == {"row bounds"}
    q, k, v = (randn(B, H, n, 16, requires_grad=True) for n in (70, 90, 90))
    dout = randn(B, H, 70, 16)
    wide = [t.detach().double().requires_grad_() for t in (q, k, v)]
    expected, _ = naive_attention(*wide, mask_fn=fn)
    expected_grads = torch.autograd.grad(expected, wide, dout.double())
    for backend in ("reference", "triton"):
        out = fc.flex_attention(q, k, v, block_mask=mask, backend=backend)
        grads = torch.autograd.grad(out, (q, k, v), dout)
        torch.testing.assert_close(out.double(), expected, atol=2e-5, rtol=2e-5)
        for got, want in zip(grads, expected_grads):
            torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)


def test_pairs_in_groups_give_the_same_tables(rng, monkeypatch) -> None:
    """Many (b, h) pairs are evaluated a group at a time (bounded memory); groups of one pair, whose bands differ in
    width (a window per head), concatenate to the tables of one group."""
    from flexcomp.sparsity import row_bounds as module

    fn = masks(tensors_for(rng, 300, 310))["head_windows"]
    mod = fc.mask_mod(fn)
    whole = create_block_mask(mod, B, H, 300, 310, device="cpu", BLOCK_SIZE=32)
    monkeypatch.setattr(module, "ROW_CHUNK", 1)
    grouped = create_block_mask(mod, B, H, 300, 310, device="cpu", BLOCK_SIZE=32)
    assert torch.equal(grouped.tile_classes(), whole.tile_classes())
    assert_tables_match_torch(grouped, mod, fn, B, H)
