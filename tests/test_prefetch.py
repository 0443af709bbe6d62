"""Table walks that read each tile's index a step ahead (`PREFETCH_INDEX`, codegen/ops.py walk_step) compute what
the plain walks compute.

The switch changes only when an index is read, so under the interpreter both walks give the same bits; each is
also compared against float64.  The masks gather from captured tensors (no closed form: the kernels walk tables),
with rows of the block mask that list no tile at all, and lengths that are not multiples of the tiles.
"""

from __future__ import annotations

import pytest
import torch
from flexcomp.codegen import launch as launch_module
from flexcomp.codegen.forward import prefetch_index
from flexcomp.codegen.plans import clear_plans
from naive import assert_close_to_reference, naive_attention
from test_kernel_backward import program_parts

import flexcomp as fc

GATE = torch.zeros(2, 8, 8, dtype=torch.bool)  # [H, q blocks of 16, kv blocks of 16]


@fc.mask_mod
def gated(b, h, q_idx, kv_idx):
    return GATE[h, q_idx // 16, kv_idx // 16] & ((q_idx + kv_idx) % 3 != 0)


@pytest.fixture(autouse=True)
def gate(rng):
    """A fresh random gate whose first q block attends nowhere (a row of the tables with no tile)."""
    global GATE
    GATE = torch.rand(2, 8, 8, generator=rng) < 0.5
    GATE[:, 0, :] = False
    clear_plans()
    yield
    clear_plans()


def dense_meaning(B: int, H: int, L: int) -> torch.Tensor:
    q, kv = torch.arange(L)[:, None], torch.arange(L)[None, :]
    keep = GATE[:, q // 16, kv // 16] & ((q + kv) % 3 != 0)
    return keep[None].expand(B, H, L, L)


def recorded_prefetch(monkeypatch) -> list[bool]:
    """PREFETCH_INDEX of every table-walking launch while the test runs."""
    seen, real = [], launch_module.launch_kernel

    def record(kernel, grid, *args, **kwargs):
        seen.extend(part["PREFETCH_INDEX"] for _, part in program_parts(kernel.fn.__name__, kwargs) if "SPARSE_Q" in part)
        return real(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(launch_module, "launch_kernel", record)
    return seen


def test_the_forward_gives_the_same_bits_either_way(monkeypatch, randn) -> None:
    B, H, L, D = 1, 2, 117, 16
    block_mask = fc.create_block_mask(gated, B, H, L, L, device="cpu", BLOCK_SIZE=16)
    seen = recorded_prefetch(monkeypatch)
    q, k, v = randn(B, H, L, D), randn(B, H, L, D), randn(B, H, L, D)
    results = {}
    for prefetch in (True, False):
        options = {"BLOCK_M": 16, "BLOCK_N": 16, "num_stages": 3, "PREFETCH_INDEX": prefetch}
        results[prefetch] = fc.flex_attention(q, k, v, block_mask=block_mask, backend="triton", return_lse=True,
                                              kernel_options=options)
        assert_close_to_reference(*results[prefetch], *naive_attention(q, k, v, dense_mask=dense_meaning(B, H, L)))
    assert seen == [True, False]
    assert torch.equal(results[True][0], results[False][0]) and torch.equal(results[True][1], results[False][1])
    assert torch.all(results[True][1][:, :, :16] == float("-inf"))  # the row with no tile


def test_the_backward_gives_the_same_bits_either_way(monkeypatch, randn) -> None:
    B, H, L, D = 1, 2, 101, 16
    block_mask = fc.create_block_mask(gated, B, H, L, L, device="cpu", BLOCK_SIZE=16)
    seen = recorded_prefetch(monkeypatch)
    q, k, v, grad_out = (randn(B, H, L, D) for _ in range(4))
    ref = [t.double().requires_grad_() for t in (q, k, v)]
    out, _ = naive_attention(*ref, dense_mask=dense_meaning(B, H, L))
    (out * grad_out.double()).sum().backward()
    grads = {}
    for prefetch in (True, False):
        ours = [t.clone().requires_grad_() for t in (q, k, v)]
        options = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_M1": 16, "BLOCK_N1": 16, "BLOCK_M2": 16, "BLOCK_N2": 16,
                   "num_stages": 3, "PREFETCH_INDEX": prefetch}
        (fc.flex_attention(*ours, block_mask=block_mask, backend="triton", kernel_options=options) * grad_out).sum() \
            .backward()
        grads[prefetch] = [t.grad for t in ours]
        for mine, want in zip(grads[prefetch], ref):
            torch.testing.assert_close(mine.double(), want.grad, atol=2e-4, rtol=2e-4)
    assert seen == [True, True, True, False, False, False]  # forward, dK/dV, dQ per pass
    assert all(torch.equal(a, b) for a, b in zip(grads[True], grads[False]))


@pytest.mark.parametrize(("stages", "warps", "sparse", "expected"), [
    (3, 8, False, True), (3, 8, True, True), (3, 4, False, True),  # a tile ahead, nothing else hides the loads
    (3, 4, True, False),  # short walks of programs that share an SM: the registers cost more than it saves
    (2, 8, False, False), (1, 4, False, False),  # no tile ahead to overlap
])
def test_the_default_reads_ahead_only_where_a_pipeline_has_tiles_ahead(stages, warps, sparse, expected) -> None:
    assert prefetch_index(stages, warps, sparse, None) is expected
    assert prefetch_index(stages, warps, sparse, {"PREFETCH_INDEX": not expected}) is (not expected)
