"""Block masks refined to the kernel's tiles (flexcomp.blockmask.refine_block_mask) mean what the block mask means.

A block mask's meaning is torch's: FULL tiles attend everywhere, PARTIAL tiles where the mask_mod is true, other
tiles nowhere.  Every test compares that meaning element by element, on fresh random masks, before and after.
"""

from __future__ import annotations

import pytest
import torch
from flexcomp.codegen import launch as launch_module
from flexcomp.codegen.plans import clear_plans
from naive import assert_close_to_reference, naive_attention
from test_kernel_backward import program_parts

import flexcomp as fc
from flexcomp.blockmask import BlockMask, refine_block_mask
from flexcomp.tiles import TileClass, block_size

# captured tensors (shapes fixed when the mods compile), redrawn for every test by the `captures` fixture
DOC = torch.zeros(200, dtype=torch.int32)  # document ids
GATE = torch.zeros(3, 25, 25, dtype=torch.bool)  # [H, q blocks of 8, kv blocks of 8]
WIDTH = torch.zeros(3, dtype=torch.int32)  # a window width per head


@fc.mask_mod
def document(b, h, q_idx, kv_idx):
    return DOC[q_idx] == DOC[kv_idx]


@fc.mask_mod
def document_causal(b, h, q_idx, kv_idx):
    return (DOC[q_idx] == DOC[kv_idx]) & (q_idx >= kv_idx)


@fc.mask_mod
def gated(b, h, q_idx, kv_idx):
    return GATE[h, q_idx // 8, kv_idx // 8]


@fc.mask_mod
def window_per_head(b, h, q_idx, kv_idx):
    return (q_idx >= kv_idx) & (q_idx - kv_idx < WIDTH[h])


MASKS = {"document": document, "document_causal": document_causal, "gated": gated,
         "window_per_head": window_per_head}


@pytest.fixture(autouse=True)
def captures(rng):
    """Fresh captured tensors for every test: sorted document ids of random lengths, a random gate and widths."""
    global DOC, GATE, WIDTH
    cuts = torch.randint(0, 200, (6,), generator=rng).sort().values
    DOC = torch.bucketize(torch.arange(200), cuts, right=True).to(torch.int32)
    GATE = torch.rand(3, 25, 25, generator=rng) < 0.4
    WIDTH = torch.randint(1, 60, (3,), generator=rng, dtype=torch.int32)
    clear_plans()
    yield
    clear_plans()


def meaning(block_mask, B: int, H: int) -> torch.Tensor:
    """bool [B, H, Lq, Lkv]: where the kernel attends under `block_mask` (torch's meaning of the tables)."""
    q_len, kv_len = block_mask.seq_lengths
    bq, bk = block_size(block_mask)
    classes = block_mask.tile_classes().repeat_interleave(bq, -2).repeat_interleave(bk, -1)[..., :q_len, :kv_len]
    inside = fc.create_mask(block_mask.mask_mod, B, H, q_len, kv_len, "cpu")
    return ((classes == TileClass.FULL) | ((classes == TileClass.PARTIAL) & inside)).expand(B, H, q_len, kv_len)


def visited(block_mask) -> int:
    """Elements in the tiles the kernel visits (a tile's full area, as the kernel computes it)."""
    bq, bk = block_size(block_mask)
    return int((block_mask.tile_classes() != TileClass.EMPTY).sum()) * bq * bk


@pytest.mark.parametrize("name", MASKS)
@pytest.mark.parametrize("lengths", [(200, 200), (131, 177)])
@pytest.mark.parametrize("block, tiles", [(32, (16, 16)), (32, (16, 32)), ((32, 64), (8, 16)), (32, (32, 8))])
def test_refined_tables_mean_what_the_block_mask_means(name, lengths, block, tiles) -> None:
    B, H = 2, 3
    coarse = fc.create_block_mask(MASKS[name], B, H, *lengths, device="cpu", BLOCK_SIZE=block)
    fine = refine_block_mask(coarse, tiles, B, H)
    assert fine is not None and block_size(fine) == tiles
    assert torch.equal(meaning(fine, B, H), meaning(coarse, B, H))
    assert visited(fine) <= visited(coarse)


def test_refinement_drops_empty_sub_tiles_of_a_document_mask() -> None:
    coarse = fc.create_block_mask(document, 1, 1, 200, 200, device="cpu", BLOCK_SIZE=64)
    fine = refine_block_mask(coarse, (16, 16), 1, 1)
    assert visited(fine) < visited(coarse)
    assert fine.kv_num_blocks.sum() + fine.full_kv_num_blocks.sum() > coarse.kv_num_blocks.sum()


def random_tables(rng, rows: int, cols: int, heads: int) -> BlockMask:
    """A hand-built block mask (as torch's from_kv_blocks) with random EMPTY / PARTIAL / FULL blocks."""
    classes = torch.randint(0, 3, (1, heads, rows, cols), generator=rng)
    listed = lambda cls: ((classes == cls).sum(-1).to(torch.int32),  # the blocks of a class first, ascending
                          torch.argsort((classes != cls).to(torch.int8), dim=-1, stable=True).to(torch.int32))
    (num, idx), (full_num, full_idx) = listed(TileClass.PARTIAL), listed(TileClass.FULL)
    return BlockMask.from_kv_blocks(num, idx, full_num, full_idx, BLOCK_SIZE=32, mask_mod=document,
                                    seq_lengths=(rows * 32 - 5, cols * 32 - 9))


def test_hand_built_tables_keep_their_meaning(rng) -> None:
    """FULL blocks the mask_mod would call PARTIAL stay FULL, PARTIAL blocks where it is false everywhere go."""
    coarse = random_tables(rng, 7, 7, 3)
    fine = refine_block_mask(coarse, (16, 8), 2, 3)
    assert torch.equal(meaning(fine, 2, 3), meaning(coarse, 2, 3))


def test_no_refinement_where_it_cannot_apply() -> None:
    coarse = fc.create_block_mask(document, 1, 1, 200, 200, device="cpu", BLOCK_SIZE=32)
    assert refine_block_mask(coarse, (32, 32), 1, 1) is None  # the same tiles
    assert refine_block_mask(coarse, (24, 16), 1, 1) is None  # tiles that do not divide the blocks


def launches(monkeypatch, names=("SPARSE_Q", "SPARSE_KV", "TILES_PER_BLOCK", "BLOCK_N")) -> list[dict]:
    """The constexprs `names` of every launch (the backward's: of each part it runs) that has `SPARSE_Q`, while the
    test runs."""
    seen, real = [], launch_module.launch_kernel

    def record(kernel, grid, *args, **kwargs):
        for _, part in program_parts(kernel.fn.__name__, kwargs):
            if "SPARSE_Q" in part:
                seen.append({k: part[k] for k in names if k in part})
        return real(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(launch_module, "launch_kernel", record)
    return seen


@pytest.mark.parametrize("name", ["document", "document_causal", "gated"])
def test_the_forward_walks_the_refined_tables_and_agrees_with_float64(monkeypatch, randn, name) -> None:
    B, H, L = 2, 3, 131
    block_mask = fc.create_block_mask(MASKS[name], B, H, L, L, device="cpu", BLOCK_SIZE=32)
    expected = meaning(block_mask, B, H)
    seen = launches(monkeypatch)
    for refine in (True, False):
        q, k, v = randn(B, H, L, 16), randn(B, H, L, 16), randn(B, H, L, 16)
        out, lse = fc.flex_attention(q, k, v, block_mask=block_mask, backend="triton", return_lse=True,
                                     kernel_options={"BLOCK_M": 16, "BLOCK_N": 16, "REFINE_TILES": refine})
        assert_close_to_reference(out, lse, *naive_attention(q, k, v, dense_mask=expected))
    assert seen[0] == {"SPARSE_Q": 16, "SPARSE_KV": 16, "TILES_PER_BLOCK": 1, "BLOCK_N": 16}
    assert seen[-1] == {"SPARSE_Q": 32, "SPARSE_KV": 32, "TILES_PER_BLOCK": 2, "BLOCK_N": 16}


@pytest.mark.parametrize("name", ["document_causal", "gated"])
def test_the_backward_walks_refined_tables_and_agrees_with_float64(monkeypatch, randn, name) -> None:
    """dK/dV walks q-major tables at (BLOCK_M1, BLOCK_N1), dQ kv-major ones at (BLOCK_M2, BLOCK_N2)."""
    B, H, L, D = 1, 3, 101, 16
    block_mask = fc.create_block_mask(MASKS[name], B, H, L, L, device="cpu", BLOCK_SIZE=32)
    expected = meaning(block_mask, B, H)
    seen = launches(monkeypatch, ("SPARSE_Q", "SPARSE_KV", "BLOCK_M", "BLOCK_N"))
    q, k, v, grad_out = (randn(B, H, L, D) for _ in range(4))
    ref = [t.double().requires_grad_() for t in (q, k, v)]
    out, _ = naive_attention(*ref, dense_mask=expected)
    (out * grad_out.double()).sum().backward()
    for refine in (True, False):
        ours = [t.clone().requires_grad_() for t in (q, k, v)]
        options = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_M1": 16, "BLOCK_N1": 32, "BLOCK_M2": 32, "BLOCK_N2": 16,
                   "REFINE_TILES": refine}
        got = fc.flex_attention(*ours, block_mask=block_mask, backend="triton", kernel_options=options)
        (got * grad_out).sum().backward()
        for mine, want in zip(ours, ref):
            torch.testing.assert_close(mine.grad.double(), want.grad, atol=2e-4, rtol=2e-4)
    kernels = [s for s in seen if "BLOCK_M" in s]
    refined = {(s["BLOCK_M"], s["BLOCK_N"]): (s["SPARSE_Q"], s["SPARSE_KV"]) for s in kernels[:3]}
    assert refined == {(16, 16): (16, 16), (16, 32): (16, 32), (32, 16): (32, 16)}
    assert all((s["SPARSE_Q"], s["SPARSE_KV"]) == (32, 32) for s in kernels[3:])
