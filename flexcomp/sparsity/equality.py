"""Document-style masks: an AND whose one term is `f(q) == g(kv)` with g non-decreasing in kv.

`DOC[q] == DOC[kv]` (sorted document ids), `q // 64 == kv // 64`, `SEG[q] == kv // 128` all have
this shape.  The term can be true on a tile only where the value range of f over the q block meets
the value range of g over the kv block.  With g non-decreasing, the per-block minima and maxima of g
are non-decreasing too, so for each q block the kv blocks that can meet are one contiguous range,
found by two searchsorted calls: classification costs O(nq log nkv) plus the analysis of the
non-empty tiles, instead of O(nq * nkv).  Tiles outside the ranges are EMPTY, exactly (the term is
false on every element there, so the AND is); the ones inside go through the ordinary analysis.

f and g are evaluated once per position (O(L)) with the evaluator, so int32 wrap-around and the
clamped reads of captured tensors are those of the kernel.  A g that is not monotone gives None.

Exact and on the device (`interval_tables`): when every other conjunct is one kv interval per row
(`lo(q) <= kv < hi(q)`, closed_form.kv_interval: causal, sliding window, ...) and the mask reads only
q_idx and kv_idx, each row's true set is the interval [searchsorted_left(g, f(q)), searchsorted_right(g, f(q)))
cut by [lo(q), hi(q)), and `tables.spans_to_tables` turns the rows' intervals into exact tables.  Up to
`DENSE_TILES` tiles and with `sync_free` (the GPU) the tables come in torch's dense width nkv from one Triton
launch (codegen.interval_kernel: the searches, the spans and the tables, element for element those of the torch
ops, which remain for a CPU outside Triton's interpreter) and five allocations, with no host sync: f and g are the
captured int32 / int64 table itself where they read it by the index, the row bounds are cached.  An unsorted g is
then found in the same launch and makes every tile PARTIAL (the kernel evaluates the mask everywhere: right, not
exact); the launch leaves a device flag that the BlockMask's `decided_by` reads when first asked.  Otherwise (the
CPU, where a host read is free, or past `DENSE_TILES`) one host read gets the band of kv blocks the q blocks meet
(tables and work nq x band, not nq x nkv) and the sortedness: an unsorted g gives None (the analysis path, exact).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass

import sympy as sp
import torch

from ..evaluate import evaluate
from ..ir import INT32_MAX, INT32_MIN, DType, Node, Op, arg, const, free_args, substitute, toposort
from . import closed_form
from .host import on_host
from .tables import columns, interval_spans, spans_to_tables

Tensor = torch.Tensor
DENSE_TILES = 1 << 22  # up to this many tiles the tables are built dense (nq x nkv), with no host sync


def conjuncts(node: Node) -> list[Node]:
    """The terms of a top-level AND of booleans (a & (b & c) -> [a, b, c])."""
    if node.dtype == DType.BOOL and node.op == Op.AND:
        return [t for s in node.src for t in conjuncts(s)]
    return [node]


def equality_term(ir: Node) -> tuple[Node, Node] | None:
    """(f, g) for the first conjunct `f(q) == g(kv)` (either side order), f reading only q_idx, g only kv_idx."""
    for term in conjuncts(ir):
        if term.op != Op.EQ or any(s.dtype != DType.I32 for s in term.src):
            continue
        a, b = term.src
        for f, g in ((a, b), (b, a)):
            if free_args(f) == {"q_idx"} and free_args(g) == {"kv_idx"}:
                return f, g
    return None


def block_extremes(values: Tensor, block: int) -> tuple[Tensor, Tensor]:
    """Per-block (min, max) of a [L] vector; the last block reads its in-range elements only."""
    n = -(-values.numel() // block)
    padded = torch.cat([values, values[-1:].expand(n * block - values.numel())]).view(n, block)
    return padded.amin(1), padded.amax(1)


def _values(node: Node, name: str, length: int, tensors: dict[str, Tensor]) -> Tensor:
    index = torch.arange(length, dtype=torch.int32)
    return evaluate(node, {name: index}, tensors).expand(length).to(torch.int64)


def candidate_ranges(ir: Node, tensors: dict[str, Tensor], grid) -> tuple[Tensor, Tensor] | None:
    """Per q block, the kv blocks [start, end) where the equality term can hold (int64 [nq] each), or None."""
    term = equality_term(ir)
    if term is None:
        return None
    f, g = term
    tensors = on_host(tensors)
    g_vals = _values(g, "kv_idx", grid.kv_len, tensors)
    if g_vals.numel() > 1 and bool((g_vals[1:] < g_vals[:-1]).any()):
        return None
    f_lo, f_hi = block_extremes(_values(f, "q_idx", grid.q_len, tensors), grid.q_block)
    g_lo, g_hi = block_extremes(g_vals, grid.kv_block)
    start = torch.searchsorted(g_hi, f_lo, side="left")  # first kv block with max g >= min f
    end = torch.searchsorted(g_lo, f_hi, side="right")  # first kv block with min g > max f
    return start, torch.maximum(start, end)


def ranges_to_tiles(start: Tensor, end: Tensor) -> tuple[Tensor, Tensor]:
    """(q block, kv block) int64 [T] of every tile in the per-row ranges, row-major."""
    counts = end - start
    rows = torch.repeat_interleave(torch.arange(start.numel()), counts)
    offsets = torch.arange(rows.numel()) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    return rows, start[rows] + offsets


# ---------------------------------------------------------------- exact tables from per-row intervals


@dataclass(frozen=True)
class IntervalPlan:
    """mask = `f(q) == g(kv)` & `lo(q) <= kv < hi(q)`; lo / hi None when unbounded; `same`: f(i) = g(i)."""

    f: Node
    g: Node
    same: bool
    lo: Node | None
    hi: Node | None


@functools.lru_cache(maxsize=256)
def interval_plan(ir: Node) -> IntervalPlan | None:
    """The plan of a document-style mask whose other conjuncts are one kv interval per row, or None."""
    term = equality_term(ir)
    if term is None or free_args(ir) - {"q_idx", "kv_idx"}:
        return None
    f, g = term
    rest = [t for t in conjuncts(ir) if not (t.op == Op.EQ and set(t.src) == {f, g})]
    lo, hi = -sp.oo, sp.oo
    try:
        for t in rest:
            t_lo, t_hi = closed_form.kv_interval(t)
            lo, hi = sp.Max(lo, t_lo), sp.Min(hi, t_hi)
        lo, hi = sp.simplify(lo), sp.simplify(hi)
        if (lo.free_symbols | hi.free_symbols) - {closed_form.Q}:
            return None
        q = arg("q_idx")
        lo_ir = None if lo == -sp.oo else closed_form.to_ir(lo, q, const(INT32_MIN))
        hi_ir = None if hi == sp.oo else closed_form.to_ir(hi, q, const(INT32_MAX))
    except (closed_form._Unsupported, TypeError, ValueError, AttributeError):
        return None
    if sp.oo in (lo, -hi):  # a row range that is empty for every q: not worth a special case
        return None
    same = substitute(f, {arg("q_idx"): arg("kv_idx")}) == g
    return IntervalPlan(f, g, same, lo_ir, hi_ir)


def _positions(node: Node, name: str, length: int, tensors: dict[str, Tensor], device: torch.device) -> Tensor:
    """int32 [length]: node at positions 0..length-1 of `name` (a 1-D table read by the index itself: a slice)."""
    if node.op == Op.LOAD and node.src == (arg(name),) and tensors[node.arg].dim() == 1:
        table = tensors[node.arg]
        if table.numel() >= length:  # index in range: no wrap, no clamp
            return table[:length].to(device=device, dtype=torch.int32)
    index = torch.arange(length, dtype=torch.int32, device=device)
    return evaluate(node, {name: index}, tensors).expand(length).to(torch.int32)


@functools.lru_cache(maxsize=8)  # int32 [L] on the device each
def _row_bound(node: Node, q_len: int, kv_len: int, rows: int, device: torch.device) -> Tensor:
    """int32 [rows]: a bound over q at rows 0..rows-1 (rows past Q_LEN repeat the last) clamped into [0, KV_LEN];
    cached: it reads no tensor."""
    q = torch.arange(rows, dtype=torch.int32, device=device).clamp_(max=q_len - 1)
    return evaluate(node, {"q_idx": q}, {}).expand(rows).clamp(0, kv_len).to(torch.int32)


def row_intervals(plan: IntervalPlan, tensors: dict[str, Tensor], grid, device: torch.device,
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """int32 [nq * bq] lo, hi (each row's kv interval, rows past Q_LEN repeat the last) and g's unsortedness."""
    rows = grid.num_q_blocks * grid.q_block
    g = _positions(plan.g, "kv_idx", grid.kv_len, tensors, device)
    f = g[:grid.q_len] if plan.same and grid.q_len <= grid.kv_len else _positions(plan.f, "q_idx", grid.q_len,
                                                                                   tensors, device)
    if rows > grid.q_len:
        f = torch.cat([f, f[-1:].expand(rows - grid.q_len)])
    lo = torch.searchsorted(g, f, out_int32=True)
    hi = torch.searchsorted(g, f, right=True, out_int32=True)
    if plan.lo is not None:
        lo = torch.maximum(lo, _row_bound(plan.lo, grid.q_len, grid.kv_len, rows, device))
    if plan.hi is not None:
        hi = torch.minimum(hi, _row_bound(plan.hi, grid.q_len, grid.kv_len, rows, device))
    return lo, hi, (g[1:] < g[:-1]).any()


def interval_tables(ir: Node, tensors: dict[str, Tensor], grid, device: torch.device, sync_free: bool,
                    kernel: Callable | None = None) -> tuple[Tensor, ...] | None:
    """kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices, unsorted; or None (see the module docstring).

    `kernel` launches the one-launch tables (codegen.interval_kernel.launch, passed in by the caller so that
    sparsity imports neither Triton nor codegen); None: the torch ops build the same tables.

    `unsorted` is None where the host knows g is sorted (the banded path), else a device tensor read by no one
    here: nonzero where g turned out unsorted and every tile was made PARTIAL (the tables are then right, not
    exact; a report that claims exactness reads it, a sync there and only there)."""
    plan = interval_plan(ir)
    if plan is None:
        return None
    dense = sync_free and grid.num_q_blocks * grid.num_kv_blocks <= DENSE_TILES
    if dense and kernel is not None and _kernel_runs(device, grid):
        return _kernel_tables(plan, tensors, grid, device, kernel)
    tensors = {k: v.detach().to(device) for k, v in tensors.items()}
    lo, hi, unsorted = row_intervals(plan, tensors, grid, device)
    spans = interval_spans(lo, hi, grid)
    if dense:  # a device with no Triton here (a CPU outside the interpreter): the same tables from torch ops
        return (*_unless_unsorted(spans_to_tables(spans, grid), unsorted, grid.num_kv_blocks), unsorted)
    start = spans[1].amin(1, keepdim=True)  # a band of columns per q block, its width read on the host
    width, unsorted = torch.stack([(spans[2].amax(1, keepdim=True) - start).max(), unsorted.long()]).tolist()
    return None if unsorted else (*spans_to_tables(spans, grid, start, max(1, width)), None)


def _unless_unsorted(tables: tuple[Tensor, ...], unsorted: Tensor, nkv: int) -> tuple[Tensor, ...]:
    """The tables, or every tile PARTIAL where g turned out unsorted (decided on the device: no sync)."""
    kv_num, kv_indices, full_num, full_indices = tables
    return (torch.where(unsorted, nkv, kv_num), torch.where(unsorted, columns(nkv, unsorted.device), kv_indices),
            torch.where(unsorted, 0, full_num), full_indices)


# ---------------------------------------------------------------- the same tables in one Triton launch

KERNEL_ROWS = 1024  # q blocks up to this size go through the kernel (one program holds a block's rows)
_KERNEL_DTYPES = (torch.int32, torch.int64)  # captured tables the kernel reads as they are (as int32)


def _kernel_runs(device: torch.device, grid) -> bool:
    """The kernel (codegen.interval_kernel) runs on CUDA devices, and on CPU tensors under Triton's interpreter."""
    if grid.q_block > KERNEL_ROWS:
        return False
    # TRITON_INTERPRET=1, as api.choose_backend and codegen read it (other spellings run the torch ops: same tables)
    return device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def _kernel_tables(plan: IntervalPlan, tensors: dict[str, Tensor], grid, device: torch.device, kernel: Callable,
                   ) -> tuple[Tensor, ...]:
    """`interval_tables`' dense sync-free tables from one launch (f, g, the row bounds: no op where they are a
    captured int32 / int64 table on the device and cached bounds); `unsorted` is an int32 [1] device flag."""
    g = _kernel_positions(plan.g, "kv_idx", grid.kv_len, tensors, device)
    f = g if plan.same and grid.q_len <= grid.kv_len else _kernel_positions(plan.f, "q_idx", grid.q_len, tensors,
                                                                            device)
    rows = grid.num_q_blocks * grid.q_block
    lo = None if plan.lo is None else _row_bound(plan.lo, grid.q_len, grid.kv_len, rows, device)
    hi = None if plan.hi is None else _row_bound(plan.hi, grid.q_len, grid.kv_len, rows, device)
    return kernel(f, g, lo, hi, grid, device)


def _kernel_positions(node: Node, name: str, length: int, tensors: dict[str, Tensor], device: torch.device,
                      ) -> Tensor:
    """A contiguous int32 / int64 vector on `device` whose first `length` entries are node at 0..length-1 of `name`
    (read as int32): the captured table itself where node reads it by the index (no op), cached where node reads
    no tensor, else evaluated."""
    buffer = _direct_read(node, name)
    if buffer is not None:
        table = tensors[buffer]
        if table.dim() == 1 and table.numel() >= length and table.dtype in _KERNEL_DTYPES:
            if not _on(table, device):
                table = table.to(device)
            return table if table.is_contiguous() else table.contiguous()
    if not _reads_tensors(node):
        return _free_positions(node, name, length, device)
    tensors = {k: v.detach().to(device) for k, v in tensors.items()}
    return _positions(node, name, length, tensors, device).contiguous()


def _on(table: Tensor, device: torch.device) -> bool:
    here = table.device
    if here == device:
        return True
    return here.type == device.type == "cuda" and device.index is None and here.index == torch.cuda.current_device()


@functools.lru_cache(maxsize=256)
def _direct_read(node: Node, name: str) -> str | None:
    """The buffer of `TABLE[name]` (a 1-D read by the index itself), else None."""
    return node.arg if node.op == Op.LOAD and node.src == (arg(name),) else None


@functools.lru_cache(maxsize=256)
def _reads_tensors(node: Node) -> bool:
    return any(n.op == Op.LOAD for n in toposort(node))


@functools.lru_cache(maxsize=8)  # int32 [L] on the device each
def _free_positions(node: Node, name: str, length: int, device: torch.device) -> Tensor:
    """`_positions` of a node that reads no tensor: cached, like the row bounds."""
    return _positions(node, name, length, {}, device).contiguous()
