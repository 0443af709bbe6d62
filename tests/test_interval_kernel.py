"""The one-launch document-mask tables (codegen.interval_kernel, under Triton's interpreter) against the torch path
(tables.spans_to_tables on equality.row_intervals: element for element, all four tables) and per-element brute force."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import functools

import pytest
import torch
from flexcomp.codegen import interval_kernel
from test_blockmask import Ops, brute_classes, mod_of
from test_equality import DOC_KV, DOC_Q, RESTS

import flexcomp as fc
from flexcomp import blockmask
from flexcomp.blockmask import create_block_mask
from flexcomp.ir import Op
from flexcomp.sparsity import equality
from flexcomp.sparsity import standard as std
from flexcomp.sparsity.standard import node
from flexcomp.sparsity.tables import interval_spans, ordered_to_classes, spans_to_tables
from flexcomp.sparsity.tiles import Grid
from flexcomp.tiles import TileClass

CPU = torch.device("cpu")


def documents(length: int, block: int, rng: torch.Generator, gaps: bool = False) -> torch.Tensor:
    """Sorted int32 ids of documents of random lengths: single tokens, short ones, ones longer than a block."""
    lengths = []
    while sum(lengths) < length:
        kind = int(torch.randint(3, (), generator=rng))
        low, high = ((1, 2), (2, block), (block + 1, 3 * block + 2))[kind]
        lengths.append(int(torch.randint(low, high, (), generator=rng)))
    steps = torch.randint(1, 4, (len(lengths),), generator=rng) if gaps else torch.ones(len(lengths), dtype=torch.int64)
    ids = torch.cumsum(steps, 0) - int(torch.randint(0, 5, (), generator=rng))  # negative ids too
    return ids.repeat_interleave(torch.tensor(lengths))[:length].to(torch.int32)


def torch_path(mask, tensors, grid: Grid) -> tuple[torch.Tensor, ...]:
    """The tables of the torch ops the kernel replaces (and the unsortedness flag)."""
    lo, hi, unsorted = equality.row_intervals(equality.interval_plan(mask), tensors, grid, CPU)
    return (*spans_to_tables(interval_spans(lo, hi, grid), grid), unsorted)


def kernel_path(mask, tensors, grid: Grid) -> tuple[torch.Tensor, ...]:
    return equality.interval_tables(mask, tensors, grid, CPU, sync_free=True, kernel=interval_kernel.launch)


def with_rest(rest: str, eq=None):
    eq = node(Op.EQ, DOC_Q, DOC_KV) if eq is None else eq
    return eq if RESTS[rest] is None else node(Op.AND, RESTS[rest], eq)


def assert_same_tables(got, expected) -> None:
    names = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices")
    for name, a, b in zip(names, got[:4], expected[:4]):
        assert a.dtype == b.dtype == torch.int32 and a.shape == b.shape, (name, a.shape, b.shape)
        assert torch.equal(a, b), (name, (a != b).nonzero()[:5].tolist())
    assert int(got[4]) == 0 and not bool(expected[4])


SHAPES = [(256, 256, 32, 32), (301, 187, 16, 64), (150, 333, 24, 40), (37, 120, 64, 8)]  # ragged, Lq != Lkv, odd


@pytest.mark.parametrize("rest", ["none", "causal", "window", "band"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kernel_tables_equal_the_torch_path_and_brute_force(rest: str, shape, rng) -> None:
    q_len, kv_len, q_block, kv_block = shape
    doc = documents(max(q_len, kv_len) + 5, min(q_block, kv_block), rng, gaps=rest == "band")
    mask, tensors = with_rest(rest), {"DOC": doc}
    grid = Grid(1, 1, q_len, kv_len, q_block, kv_block)
    got = kernel_path(mask, tensors, grid)
    assert_same_tables(got, torch_path(mask, tensors, grid))
    expected = brute_classes(mod_of(mask, tensors), 1, 1, q_len, kv_len, (q_block, kv_block))
    assert torch.equal(ordered_to_classes(*got[:4], grid.num_kv_blocks), expected)


@pytest.mark.parametrize("case", ["int64 table", "short table", "kv // 40", "swapped", "q longer than kv"])
def test_kernel_reads_tables_and_evaluated_sides(case: str, rng) -> None:
    """f and g as the kernel gets them: the captured table itself (int32 or int64), or evaluated (cached if it
    reads no tensor); a short table's reads clamp to its last entry, as the evaluator's."""
    q_len, kv_len = (290, 170) if case == "q longer than kv" else (170, 290)
    doc = documents(300, 16, rng, gaps=True)
    f, g = DOC_Q, DOC_KV
    if case == "short table":
        doc = doc[:200]
    if case == "kv // 40":
        f, g = node(Op.FLOORDIV, DOC_Q, std.c(5)), node(Op.FLOORDIV, std.KV, std.c(40))
    eq = node(Op.EQ, g, f) if case == "swapped" else node(Op.EQ, f, g)
    tensors = {"DOC": doc.long() if case == "int64 table" else doc}
    mask, grid = with_rest("causal", eq), Grid(1, 1, q_len, kv_len, 32, 16)
    got = kernel_path(mask, tensors, grid)
    assert_same_tables(got, torch_path(mask, tensors, grid))
    expected = brute_classes(mod_of(mask, tensors), 1, 1, q_len, kv_len, (32, 16))
    assert torch.equal(ordered_to_classes(*got[:4], grid.num_kv_blocks), expected)


# sorted documents but for one swapped pair, seen only by the first two programs' slices of g (not the last's):
# the searches are then nearly right, so tables that assumed sorted ids would call tiles EMPTY that are not
SHUFFLED_DOC = torch.tensor([0] * 40 + [1] * 40 + [2] * 16, dtype=torch.int32)
SHUFFLED_DOC[[10, 45]] = SHUFFLED_DOC[[45, 10]]


@fc.mask_mod
def shuffled_document(b, h, q_idx, kv_idx):
    return SHUFFLED_DOC[q_idx] == SHUFFLED_DOC[kv_idx]


def gpu_path(monkeypatch) -> None:
    """create_block_mask as on a GPU: the sync-free interval tables (here: the kernel under the interpreter)."""
    forced = functools.partial(lambda build, *args, sync_free, kernel: build(*args, sync_free=True, kernel=kernel),
                               equality.interval_tables)
    monkeypatch.setattr(blockmask, "interval_tables", forced)


def test_unsorted_ids_make_every_tile_partial_and_the_report_says_so(monkeypatch, randn, naive_attention) -> None:
    mask, grid = shuffled_document.ir, Grid(1, 1, 96, 96, 32, 16)
    tensors = {"SHUFFLED_DOC": SHUFFLED_DOC}
    for _ in range(2):  # the scratch clears itself: the next launch starts from zero
        unsorted = kernel_path(mask, tensors, grid)
        assert int(unsorted[4]) == 1
        assert (ordered_to_classes(*unsorted[:4], grid.num_kv_blocks) == TileClass.PARTIAL).all()
        assert torch.equal(unsorted[1][0, 0], torch.arange(6, dtype=torch.int32).expand(3, -1))
        ordered = {"SHUFFLED_DOC": SHUFFLED_DOC.sort().values}
        sorted_tables = kernel_path(mask, ordered, grid)
        assert int(sorted_tables[4]) == 0
        expected = brute_classes(mod_of(mask, ordered), 1, 1, 96, 96, (32, 16))
        assert torch.equal(ordered_to_classes(*sorted_tables[:4], 6), expected)

    gpu_path(monkeypatch)
    bm = create_block_mask(shuffled_document, 1, 1, 96, 96, "cpu", (32, 16))
    assert callable(bm._decided_by)  # the build read nothing back: the report resolves on first read
    assert bm.decided_by == {blockmask.UNSORTED_IDS: 3 * 6}, bm.explain()
    assert "equality intervals" not in bm.explain()
    q, k, v = randn(1, 2, 96, 16), randn(1, 2, 96, 16), randn(1, 2, 96, 16)
    out, lse = fc.flex_attention(q, k, v, block_mask=bm, return_lse=True, backend="triton",
                                 kernel_options={"BLOCK_M": 32, "BLOCK_N": 16})
    ref_out, ref_lse = naive_attention(q, k, v, mask_fn=shuffled_document.fn)
    torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-5, rtol=2e-5)


def test_sorted_ids_report_exact_intervals_lazily(monkeypatch, rng) -> None:
    mask, tensors = with_rest("causal"), {"DOC": documents(200, 16, rng)}
    gpu_path(monkeypatch)
    bm = create_block_mask(mod_of(mask, tensors), None, None, 200, 180, "cpu", (16, 32))
    assert callable(bm._decided_by)
    assert bm.decided_by == {"equality intervals": 13 * 6} and bm.decided_by is bm.decided_by
    expected = brute_classes(mod_of(mask, tensors), 1, 1, 200, 180, (16, 32))
    assert torch.equal(bm.tile_classes(), expected)
    assert torch.equal(bm.to("cpu").tile_classes(), expected) and bm.to("cpu").decided_by == bm.decided_by


class RecordedLaunches:
    """Stands in for the kernel: records launches, runs nothing (so only the wrapper's torch ops are seen)."""

    def __init__(self):
        self.grids: list[tuple[int, ...]] = []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return lambda *args, **kwargs: None


@pytest.mark.parametrize("rest", ["none", "causal"])
def test_the_build_is_one_launch_and_allocations(rest: str, monkeypatch) -> None:
    """The GPU's path: one launch, one allocation whose views are the outputs (no kernel), no host read;
    bounds and plans cached."""
    L = 4096
    doc_mask, tensors = std.document(L, 9)
    mask = doc_mask if rest == "none" else node(Op.AND, doc_mask, std.causal())
    grid = Grid(1, 1, L, L, 128, 128)
    launches = RecordedLaunches()
    monkeypatch.setattr(interval_kernel, "interval_tables_kernel", launches)
    kernel_path(mask, tensors, grid)  # the cached row bounds
    with Ops() as ops:
        kernel_path(mask, tensors, grid)
    assert ops.names == ["empty.memory_format"] + ["as_strided.default"] * 5, ops.names
    assert launches.grids == [(32, 1, 1), (32, 1, 1)]


def test_large_query_blocks_take_the_torch_ops(monkeypatch, rng) -> None:
    """A q block too large for one program's rows: the same tables from torch ops (no launch)."""
    monkeypatch.setattr(equality, "KERNEL_ROWS", 16)
    launches = RecordedLaunches()
    monkeypatch.setattr(interval_kernel, "interval_tables_kernel", launches)
    mask, tensors = with_rest("window"), {"DOC": documents(200, 16, rng)}
    grid = Grid(1, 1, 200, 200, 32, 16)
    assert_same_tables(kernel_path(mask, tensors, grid), torch_path(mask, tensors, grid))
    assert launches.grids == []
