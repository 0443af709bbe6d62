"""Exact document-mask tables from per-row kv intervals (sparsity.equality.interval_tables) against brute force."""

from __future__ import annotations

import pytest
import torch
from test_blockmask import Ops, brute_classes, create_block_mask, mod_of

from flexcomp.ir import DType, Op, load
from flexcomp.sparsity import equality
from flexcomp.sparsity import standard as std
from flexcomp.sparsity.standard import node
from flexcomp.sparsity.tables import ordered_to_classes, transpose_ordered
from flexcomp.sparsity.tiles import Grid
from flexcomp.tiles import TileClass

CPU = torch.device("cpu")
DOC_Q, DOC_KV = load("DOC", DType.I32, (std.Q,)), load("DOC", DType.I32, (std.KV,))
RESTS = {  # conjuncts that leave one kv interval per row
    "none": None, "causal": std.causal(), "window": std.sliding_window(37),
    "offset": node(Op.LE, std.KV, node(Op.ADD, std.Q, std.c(5))),  # kv <= q + 5
    "band": node(Op.AND, node(Op.GE, std.KV, node(Op.SUB, std.Q, std.c(20))), node(Op.LT, std.KV, std.Q)),
}


def random_documents(length: int, seed: int, gaps: bool) -> torch.Tensor:
    """Sorted document ids with random lengths (some of one token); `gaps`: ids skip values."""
    g = torch.Generator().manual_seed(seed)
    steps = (torch.rand(length, generator=g) < 0.08).to(torch.int32)
    if gaps:
        steps *= torch.randint(1, 4, (length,), generator=g, dtype=torch.int32)
    return torch.cumsum(steps, 0).to(torch.int32) - 3  # negative ids too


def listed(num: torch.Tensor, idx: torch.Tensor) -> list[list[int]]:
    return [idx[0, 0, r, : num[0, 0, r]].tolist() for r in range(num.shape[-1])]


def check_tables(tables, mod, grid: Grid) -> None:
    """Every tile's class = brute force; indices ascending; the q-major transposes = those of the brute force."""
    nkv = grid.num_kv_blocks
    expected = brute_classes(mod, 1, 1, grid.q_len, grid.kv_len, (grid.q_block, grid.kv_block))
    assert torch.equal(ordered_to_classes(*tables, nkv), expected)
    for num, idx in (tables[:2], tables[2:]):
        assert num.dtype == idx.dtype == torch.int32 and num.shape == (1, 1, grid.num_q_blocks)
        assert all(row == sorted(set(row)) and all(0 <= k < nkv for k in row) for row in listed(num, idx))
    for cls, (num, idx) in ((TileClass.PARTIAL, tables[:2]), (TileClass.FULL, tables[2:])):
        rows = (expected[0, 0] == cls).T  # the kv blocks' q blocks
        assert listed(*transpose_ordered(num, idx, nkv)) == [r.nonzero()[:, 0].tolist() for r in rows]


@pytest.mark.parametrize("rest", sorted(RESTS))
@pytest.mark.parametrize("shape", [(300, 300, (16, 16)), (300, 257, (32, 8)), (173, 300, (8, 64)), (64, 64, (64, 64))])
def test_interval_tables_are_exact(rest: str, shape) -> None:
    q_len, kv_len, block = shape
    for seed, gaps in ((0, False), (1, True)):
        doc = random_documents(max(q_len, kv_len) + 7, seed, gaps)  # longer than both: reads a prefix
        mask = node(Op.EQ, DOC_Q, DOC_KV) if RESTS[rest] is None else node(Op.AND, RESTS[rest], node(Op.EQ, DOC_Q, DOC_KV))
        mod = mod_of(mask, {"DOC": doc})
        grid = Grid(1, 1, q_len, kv_len, *block)
        for sync_free in (True, False):  # dense sync-free (the GPU's) and banded (the CPU's)
            tables = equality.interval_tables(mask, {"DOC": doc}, grid, CPU, sync_free)
            check_tables(tables[:4], mod, grid)
            assert (tables[4] is None) == (not sync_free) and not (sync_free and bool(tables[4]))


@pytest.mark.parametrize("case", ["short table", "int64 table", "kv // 40", "swapped"])
def test_interval_tables_of_other_equalities(case: str) -> None:
    doc = random_documents(300, 2, gaps=True)
    if case == "short table":  # reads past the table clamp to its last entry: the evaluator's values
        doc = doc[:200]
    f, g = DOC_Q, DOC_KV
    if case == "kv // 40":
        f, g = node(Op.FLOORDIV, DOC_Q, std.c(5)), node(Op.FLOORDIV, std.KV, std.c(40))
    mask = node(Op.AND, std.causal(), node(Op.EQ, g, f) if case == "swapped" else node(Op.EQ, f, g))
    tensors = {"DOC": doc.long() if case == "int64 table" else doc}
    mod = mod_of(mask, tensors)
    grid = Grid(1, 1, 300, 290, 16, 32)
    for sync_free in (True, False):
        check_tables(equality.interval_tables(mask, tensors, grid, CPU, sync_free)[:4], mod, grid)
    bm = create_block_mask(mod, None, None, 300, 290, "cpu", (16, 32))
    assert bm.decided_by == {"equality intervals": 19 * 10}, bm.explain()


def test_banded_tables_equal_dense_ones(monkeypatch) -> None:
    doc = random_documents(5000, 3, gaps=False)
    mask = node(Op.AND, std.causal(), node(Op.EQ, DOC_Q, DOC_KV))
    grid = Grid(1, 1, 5000, 4990, 64, 32)
    dense = equality.interval_tables(mask, {"DOC": doc}, grid, CPU, sync_free=True)
    monkeypatch.setattr(equality, "DENSE_TILES", 0)
    banded = equality.interval_tables(mask, {"DOC": doc}, grid, CPU, sync_free=True)
    assert banded[1].shape[-1] < dense[1].shape[-1] == grid.num_kv_blocks
    assert all(torch.equal(a, b) for a, b in ((dense[0], banded[0]), (dense[2], banded[2])))
    assert listed(*dense[:2]) == listed(*banded[:2]) and listed(*dense[2:4]) == listed(*banded[2:4])


def test_unsorted_table_is_all_partial_without_sync_or_none_with() -> None:
    doc = random_documents(300, 4, gaps=False)[torch.randperm(300, generator=torch.Generator().manual_seed(0))]
    mask = node(Op.EQ, DOC_Q, DOC_KV)
    grid = Grid(1, 1, 300, 300, 32, 32)
    assert equality.interval_tables(mask, {"DOC": doc}, grid, CPU, sync_free=False) is None
    tables = equality.interval_tables(mask, {"DOC": doc}, grid, CPU, sync_free=True)
    classes = ordered_to_classes(*tables[:4], grid.num_kv_blocks)
    assert (classes == TileClass.PARTIAL).all()  # the kernel evaluates the mask on every tile: right, not exact
    assert bool(tables[4])  # the device flag that the BlockMask's report reads
    bm = create_block_mask(mod_of(mask, {"DOC": doc}), None, None, 300, 300, "cpu", 32)  # CPU: the analysis path
    assert "equality intervals" not in bm.decided_by


def test_masks_outside_the_fragment_have_no_plan() -> None:
    eq = node(Op.EQ, DOC_Q, DOC_KV)
    assert equality.interval_plan(node(Op.AND, node(Op.NE, std.Q, std.KV), eq)) is None  # two kv pieces per row
    assert equality.interval_plan(node(Op.AND, node(Op.LT, std.Q, std.c(9)), eq)) is None  # a condition on q alone
    assert equality.interval_plan(node(Op.OR, std.causal(), eq)) is None
    plan = equality.interval_plan(node(Op.AND, std.sliding_window(8), eq))
    assert plan is not None and plan.same and plan.lo is not None and plan.hi is not None


def test_sync_free_build_reads_nothing_on_the_host() -> None:
    """No .item() / bool() / nonzero / tolist on the GPU's path (one launch: test_interval_kernel counts its ops)."""
    L = 4096
    mask, tensors = std.document(L, 9)
    mask = node(Op.AND, mask, std.causal())
    grid = Grid(1, 1, L, L, 128, 128)
    equality.interval_tables(mask, tensors, grid, CPU, sync_free=True)  # the cached row bounds
    with Ops() as ops:
        equality.interval_tables(mask, tensors, grid, CPU, sync_free=True)
    host_reads = {"_local_scalar_dense.default", "nonzero.default", "item.default", "is_nonzero.default"}
    assert not host_reads & set(ops.names), ops.names
    with Ops() as ops:  # the CPU's path: one host read (the band width and the sortedness together)
        equality.interval_tables(mask, tensors, grid, CPU, sync_free=False)
    assert "nonzero.default" not in ops.names
