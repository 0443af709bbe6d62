"""Paged KV cache (flexcomp.PagedAttention and torch's): attention over shuffled pages equals the float64
reference on the logical, contiguous K/V, for prefill chunks and decode steps of requests of different lengths."""

from __future__ import annotations

import pytest
import torch
from naive import assert_close_to_reference, naive_attention
from torch.nn.attention.flex_attention import create_block_mask as torch_create_block_mask

import flexcomp as fc

H, HKV, D = 2, 1, 16


def _causal_from(offsets):
    """Causal over the logical cache for a query chunk that starts at offsets[b]."""

    def causal_chunk(b, h, q_idx, kv_idx):
        return q_idx + offsets[b] >= kv_idx

    return causal_chunk


def _window_from(offsets, window=5):
    def window_chunk(b, h, q_idx, kv_idx):
        return (q_idx + offsets[b] >= kv_idx) & (q_idx + offsets[b] - kv_idx < window)

    return window_chunk


def _bias_from(bias):
    def biased(score, b, h, q_idx, kv_idx):
        return score + bias[h, kv_idx]

    return biased


class Scene:
    """Requests of lengths `lengths` on a paged cache (pages handed out shuffled), and their contiguous K/V."""

    def __init__(self, paged_cls, randn, rng, lengths, page_size, n_pages, dtype):
        self.lengths, self.page_size = lengths, page_size
        self.paged = paged_cls(n_pages, page_size, len(lengths), device="cpu")
        self.paged.empty_pages = [int(p) for p in torch.randperm(n_pages, generator=rng)]
        self.k_cache = torch.zeros(1, HKV, n_pages * page_size, D, dtype=dtype)
        self.v_cache = torch.zeros_like(self.k_cache)
        self.k = [randn(1, HKV, n, D, dtype=dtype) for n in lengths]
        self.v = [randn(1, HKV, n, D, dtype=dtype) for n in lengths]
        for i, n in enumerate(lengths):
            self.fill(i, 0, n)

    def fill(self, i, start, stop):
        """reserve then assign request i's tokens [start, stop) (in two halves: assign appends)."""
        self.paged.reserve(torch.tensor(i), torch.tensor(stop))
        pos = torch.arange(start, stop).view(1, -1)
        self.paged.assign(
            torch.tensor([i]), pos, self.k[i][:, :, start:stop], self.v[i][:, :, start:stop], self.k_cache, self.v_cache
        )

    def max_len(self):
        return -(-max(self.lengths) // self.page_size) * self.page_size

    def padded(self, tensors):
        out = torch.zeros(len(tensors), HKV, self.max_len(), D, dtype=tensors[0].dtype)
        for i, t in enumerate(tensors):
            out[i, :, : t.shape[2]] = t[0]
        return out


def _run_and_check(scene, q, mask_fn, score_fn, backend, kv_block, fc_create, atol):
    B, _, S, _ = q.shape
    kv_len = torch.tensor(scene.lengths)
    logical = fc_create(mask_fn, B, None, S, scene.max_len(), device="cpu", BLOCK_SIZE=(16, kv_block))
    converted = scene.paged.convert_logical_block_mask(logical, kv_len=kv_len)
    score_mod = None if score_fn is None else scene.paged.get_score_mod(score_fn, kv_len)
    out, lse = fc.flex_attention(
        q,
        scene.k_cache,
        scene.v_cache,
        block_mask=converted,
        score_mod=score_mod,
        enable_gqa=True,
        return_lse=True,
        backend=backend,
    )
    lengths = kv_len

    def ref_mask(b, h, qi, ki):
        return mask_fn(b, h, qi, ki) & (ki < lengths[b])

    ref_out, ref_lse = naive_attention(
        q, scene.padded(scene.k), scene.padded(scene.v), score_fn=score_fn, mask_fn=ref_mask, enable_gqa=True
    )
    assert_close_to_reference(out.float(), lse, ref_out, ref_lse, atol=atol)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("page_size,kv_block", [(16, 16), (32, 16)])
def test_prefill_chunk_over_shuffled_pages(randn, rng, backend, page_size, kv_block):
    """A chunk of S new tokens per request attends to its cached prefix and itself (causal), pages shuffled."""
    lengths, S = [37, 20, 53], 8
    scene = Scene(
        fc.PagedAttention, randn, rng, lengths, page_size, n_pages=12 if page_size == 16 else 6, dtype=torch.float32
    )
    offsets = torch.tensor([n - S for n in lengths])
    q = randn(len(lengths), H, S, D)
    _run_and_check(scene, q, _causal_from(offsets), None, backend, kv_block, fc.create_block_mask, 2e-5)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_decode_window_and_captured_bias_bf16(randn, rng, backend):
    """One new token per request, sliding window plus a score_mod reading a captured tensor at logical kv_idx."""
    lengths = [9, 30, 17]
    scene = Scene(fc.PagedAttention, randn, rng, lengths, 16, n_pages=8, dtype=torch.bfloat16)
    offsets = torch.tensor([n - 1 for n in lengths])
    bias = randn(H, scene.max_len())
    q = randn(len(lengths), H, 1, D, dtype=torch.bfloat16)
    _run_and_check(scene, q, _window_from(offsets), _bias_from(bias), backend, 16, fc.create_block_mask, 3e-2)


@pytest.mark.parametrize("creator", ["flexcomp", "torch"])
def test_erase_and_reserve_again_reuses_pages(randn, rng, creator):
    """A finished request's pages go back to the free list and serve a new request correctly.  The logical mask
    spans the whole cache with tables at torch's dense width, so its PARTIAL and FULL lists side by side are
    wider than the physical table (the conversion once failed there)."""
    from torch.nn.attention.flex_attention import create_block_mask as torch_create

    lengths = [40, 24]
    scene = Scene(fc.PagedAttention, randn, rng, lengths, 16, n_pages=5, dtype=torch.float32)
    scene.paged.erase(torch.tensor(0))
    assert len(scene.paged.empty_pages) == 3 and int(scene.paged.capacity[0]) == 0
    scene.lengths[0] = 33
    scene.k[0], scene.v[0] = randn(1, HKV, 33, D), randn(1, HKV, 33, D)
    scene.fill(0, 0, 17)
    scene.fill(0, 17, 33)  # grows by one page
    offsets = torch.tensor([n - 4 for n in scene.lengths])
    q = randn(2, H, 4, D)
    create = fc.create_block_mask if creator == "flexcomp" else torch_create
    _run_and_check(scene, q, _causal_from(offsets), None, "reference", 16, create, 2e-5)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_torch_paged_attention_objects(randn, rng, backend):
    """torch's own PagedAttention: its converted block mask and mods run through flexcomp unchanged."""
    from torch.nn.attention.experimental._paged_attention import PagedAttention
    from torch.nn.attention.flex_attention import create_block_mask

    lengths, S = [26, 45], 4
    scene = Scene(PagedAttention, randn, rng, lengths, 16, n_pages=8, dtype=torch.float32)
    offsets = torch.tensor([n - S for n in lengths])
    bias = randn(H, scene.max_len())
    q = randn(2, H, S, D)
    _run_and_check(scene, q, _causal_from(offsets), _bias_from(bias), backend, 16, create_block_mask, 2e-5)


def test_page_and_tile_that_do_not_divide_are_refused(randn, rng):
    scene = Scene(fc.PagedAttention, randn, rng, [20], 12, n_pages=3, dtype=torch.float32)
    logical = fc.create_block_mask(_causal_from(torch.tensor([0])), 1, None, 16, 32, device="cpu", BLOCK_SIZE=16)
    with pytest.raises(ValueError, match="page_size"):
        scene.paged.convert_logical_block_mask(logical)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("S", [1, 8, 70])  # decode kernel, decode kernel with several rows, forward kernel
def test_tiles_larger_than_pages(randn, rng, backend, S):
    """Logical tiles of 32 over pages of 8: the kernels gather each tile's rows through the page table (the
    converted tables list the tile page by page for the reference), requests of different lengths."""
    lengths = [77, 40, 93]
    scene = Scene(fc.PagedAttention, randn, rng, lengths, 8, n_pages=40, dtype=torch.float32)
    offsets = torch.tensor([n - S for n in lengths])
    q = randn(len(lengths), H, S, D)
    bias = randn(H, scene.max_len())
    _run_and_check(scene, q, _window_from(offsets, 50), _bias_from(bias), backend, 32, fc.create_block_mask, 2e-5)


def test_kernels_read_pages_directly_with_the_logical_mods(randn, rng, monkeypatch):
    """flexcomp's converted mask and score_mod run as the logical mask and the user's score_mod over the page
    table; a score_mod that is not the PagedAttention's sees physical positions (torch's meaning) and so runs
    the converted mask."""
    from flexcomp.codegen import forward

    seen = []
    original = forward.paged_values
    monkeypatch.setattr(forward, "paged_values", lambda paged, q: seen.append(paged) or original(paged, q))
    forward._PLANS.clear()
    lengths = [30, 12]
    scene = Scene(fc.PagedAttention, randn, rng, lengths, 16, n_pages=6, dtype=torch.float32)
    q = randn(2, H, 1, D)
    logical = fc.create_block_mask(_causal_from(torch.tensor([29, 11])), 2, None, 1, 32, device="cpu",
                                   BLOCK_SIZE=(16, 16))  # fmt: skip
    converted = scene.paged.convert_logical_block_mask(logical)
    bias = randn(H, 32)
    for score_mod, direct in [(None, True), (scene.paged.get_score_mod(_bias_from(bias)), True),
                              (_bias_from(bias), False)]:  # fmt: skip
        seen.clear()
        fc.flex_attention(q, scene.k_cache, scene.v_cache, score_mod=score_mod, block_mask=converted,
                          enable_gqa=True, backend="triton")  # fmt: skip
        assert (seen[-1] is not None) == direct
        if direct:
            assert seen[-1].page_size == 16 and seen[-1].lengths.tolist() == [32, 16]


def test_reserve_past_the_free_pages_is_refused():
    paged = fc.PagedAttention(2, 16, 1, device="cpu")
    with pytest.raises(AssertionError, match="empty pages"):
        paged.reserve(torch.tensor(0), torch.tensor(40))


def test_paged_generation_example_matches_full_recomputation():
    """examples/paged_generation.py: continuous batching on the paged cache, every decoded token checked."""
    import importlib
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
    assert importlib.import_module("paged_generation").generate("cpu") == 16


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_batch_broadcast_mask_with_batch_idx_rows(randn, rng, backend):
    """A mask that does not read b (block mask batch 1) converted for page-table rows given out of order."""
    lengths = [30, 12, 41]
    scene = Scene(fc.PagedAttention, randn, rng, lengths, 16, n_pages=9, dtype=torch.float32)
    rows = torch.tensor([2, 0])
    kv_len = torch.tensor(lengths)[rows]
    logical = fc.create_block_mask(fc.noop_mask, 1, None, 3, scene.max_len(), device="cpu", BLOCK_SIZE=16)
    converted = scene.paged.convert_logical_block_mask(logical, batch_idx=rows, kv_len=kv_len)
    q = randn(2, H, 3, D)
    out, lse = fc.flex_attention(
        q, scene.k_cache, scene.v_cache, block_mask=converted, enable_gqa=True, return_lse=True, backend=backend
    )
    k, v = scene.padded(scene.k)[rows], scene.padded(scene.v)[rows]
    ref_out, ref_lse = naive_attention(q, k, v, mask_fn=lambda b, h, qi, ki: ki < kv_len[b], enable_gqa=True)
    assert_close_to_reference(out, lse, ref_out, ref_lse)


@pytest.mark.parametrize("creator", ["flexcomp", "torch"])
def test_mask_made_for_the_batch_without_reading_b(randn, rng, creator):
    """torch's habit: create_block_mask(mask, B, ...) for a mask that does not read b, converted without batch_idx.
    flexcomp's tables broadcast over the batch, but the mask is made for B requests (its shape says so, as torch's),
    so each request gets its own pages (found by tests/test_fuzz.py: batch 1 was converted, for request 0 only)."""
    lengths = [30, 12, 41]
    scene = Scene(fc.PagedAttention, randn, rng, lengths, 16, n_pages=9, dtype=torch.float32)
    create = fc.create_block_mask if creator == "flexcomp" else torch_create_block_mask

    def later(b, h, q_idx, kv_idx):
        return kv_idx >= q_idx

    assert create(later, 3, None, 2, scene.max_len(), device="cpu", BLOCK_SIZE=16).shape[0] == 3
    _run_and_check(scene, randn(3, H, 2, D), later, None, "triton", 16, create, 2e-5)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("creator", ["flexcomp", "torch"])
def test_logical_blocks_reaching_past_the_cache(randn, rng, backend, creator):
    """A logical KV block of 64 over 96 rows of pages of 16: the last block's finer tiles past row 96 are not listed,
    so a row's tiles fit the width the paged mask's FULL-as-PARTIAL step keeps (found by tests/test_fuzz.py: two of
    request 0's tiles were cut and rows 32-63 went unattended wherever the converted tables ran: the reference
    backend; the kernels read flexcomp's logical tables directly)."""
    lengths = [83, 74]
    scene = Scene(fc.PagedAttention, randn, rng, lengths, 16, n_pages=13, dtype=torch.float32)
    limit = torch.tensor([78, 53])  # request 0: block 0 FULL, block 1 PARTIAL

    def below(b, h, q_idx, kv_idx):
        return kv_idx < limit[b]

    create = fc.create_block_mask if creator == "flexcomp" else torch_create_block_mask
    _run_and_check(scene, randn(2, H, 8, D), below, None, backend, 64, create, 2e-5)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_tiles_of_unassigned_pages_are_dropped(randn, rng, backend):
    """No kv_len: a FULL logical tile whose page was never reserved holds no tokens and is left out."""
    lengths = [32, 16]
    scene = Scene(fc.PagedAttention, randn, rng, lengths, 16, n_pages=5, dtype=torch.float32)
    logical = fc.create_block_mask(fc.noop_mask, 1, None, 2, 48, device="cpu", BLOCK_SIZE=16)
    converted = scene.paged.convert_logical_block_mask(logical, batch_idx=torch.arange(2))
    assert converted.full_kv_num_blocks.view(-1).tolist() == [2, 1]
    q = randn(2, H, 2, D)
    out, lse = fc.flex_attention(
        q, scene.k_cache, scene.v_cache, block_mask=converted, enable_gqa=True, return_lse=True, backend=backend
    )
    k, v = torch.zeros(2, HKV, 48, D), torch.zeros(2, HKV, 48, D)
    k[:, :, :32], v[:, :, :32] = scene.padded(scene.k), scene.padded(scene.v)
    kv_len = torch.tensor(lengths)
    ref_out, ref_lse = naive_attention(q, k, v, mask_fn=lambda b, h, qi, ki: ki < kv_len[b], enable_gqa=True)
    assert_close_to_reference(out, lse, ref_out, ref_lse)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_gradients_through_the_paged_cache(randn, rng, backend):
    """Decode-shaped queries over shuffled pages, differentiated: dq and a captured bias's gradient equal the
    float64 reference's on the logical cache (the Triton forward here is the decode kernel, its backward the
    training kernels)."""
    lengths = [21, 40]
    scene = Scene(fc.PagedAttention, randn, rng, lengths, 16, n_pages=8, dtype=torch.float32)
    offsets = torch.tensor([n - 2 for n in lengths])
    bias = randn(H, scene.max_len(), requires_grad=True)
    q = randn(len(lengths), H, 2, D, requires_grad=True)
    kv_len = torch.tensor(lengths)
    logical = fc.create_block_mask(_causal_from(offsets), 2, None, 2, scene.max_len(), device="cpu",
                                   BLOCK_SIZE=(16, 16))  # fmt: skip
    converted = scene.paged.convert_logical_block_mask(logical, kv_len=kv_len)
    score_mod = scene.paged.get_score_mod(_bias_from(bias), kv_len)
    out = fc.flex_attention(q, scene.k_cache, scene.v_cache, block_mask=converted, score_mod=score_mod,
                            enable_gqa=True, backend=backend)  # fmt: skip
    dout = randn(*out.shape)
    grads = torch.autograd.grad((out * dout).sum(), (q, bias))

    def ref_mask(b, h, qi, ki):
        return _causal_from(offsets)(b, h, qi, ki) & (ki < kv_len[b])

    ref_out, _ = naive_attention(q, scene.padded(scene.k), scene.padded(scene.v), score_fn=_bias_from(bias),
                                 mask_fn=ref_mask, enable_gqa=True)  # fmt: skip
    ref_grads = torch.autograd.grad((ref_out * dout.double()).sum(), (q, bias))
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.double(), want.double(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("page_size", [16, 32])
def test_decode_kernel_merges_splits_over_shuffled_pages(randn, rng, page_size):
    """Decode steps over shuffled pages through the decode kernel, cut into 4 splits: the fused merge (the last
    split to arrive) and the separate launch both equal float64 on the logical cache, and each other."""
    from flexcomp.codegen import decode as decode_module

    lengths = [45, 20, 61]
    scene = Scene(fc.PagedAttention, randn, rng, lengths, page_size, n_pages=160 // page_size, dtype=torch.float32)
    kv_len = torch.tensor(lengths)
    q = randn(len(lengths), H, 2, D)
    logical = fc.create_block_mask(fc.noop_mask, len(lengths), None, 2, scene.max_len(), device="cpu",
                                   BLOCK_SIZE=(16, 16))  # fmt: skip
    converted = scene.paged.convert_logical_block_mask(logical, batch_idx=torch.arange(len(lengths)), kv_len=kv_len)
    outs = {}
    for merge in ("fused", "separate"):
        options = {"BACKEND": "TRITON_DECODE", "NUM_SPLITS": 4, "DECODE_MERGE": merge}
        outs[merge] = fc.flex_attention(q, scene.k_cache, scene.v_cache, block_mask=converted, enable_gqa=True,
                                        return_lse=True, backend="triton", kernel_options=options)  # fmt: skip
    ref_out, ref_lse = naive_attention(q, scene.padded(scene.k), scene.padded(scene.v),
                                       mask_fn=lambda b, h, qi, ki: ki < kv_len[b], enable_gqa=True)  # fmt: skip
    assert_close_to_reference(*outs["fused"], ref_out, ref_lse)
    torch.testing.assert_close(outs["fused"], outs["separate"], atol=0, rtol=2e-7)
    assert all(not counters.any() for counters in decode_module._ARRIVALS.values())
