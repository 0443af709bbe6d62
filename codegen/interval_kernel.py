"""One Triton launch for the exact block tables of a document mask (sparsity.equality's sync-free path, the GPU's).

The mask is `f(q) == g(kv) & lo(q) <= kv < hi(q)` with g sorted (sparsity.equality.IntervalPlan).  One program
per q block:

1. each row's kv interval: [searchsorted_left(g, f(q)), searchsorted_right(g, f(q))) cut by the row bounds,
   two vectorized binary searches over g (`steps` = KV_LEN.bit_length() halvings; rows past Q_LEN repeat the last);
2. the q block's band of kv blocks [min first, max end) over its non-empty rows: only there can a tile be
   non-empty, so only there is the per-column "does a row meet this kv block" work done (a [rows, COLS] compare
   per chunk of columns); FULL = the blocks every row covers, [f0, f1);
3. the tables in `tables.spans_to_tables`' dense layout and values, element for element: kv_indices lists the
   PARTIAL blocks ascending, then every other column ascending (a stable sort's order: a PARTIAL column goes to
   its rank among the PARTIAL ones, any other column c to P + c - rank, P the row's PARTIAL count: two passes
   over the band, tl.cumsum for the ranks); full_kv_indices is (f0 + column) clamped to nkv - 1.

Unsorted g, with no host sync: every program checks a slice of g (g[j + 1] < g[j]) and ORs what it saw into a
flag; then it counts itself done on an atomic counter (acq_rel, after a CTA barrier, so its table stores come
before its count); the program that draws the last ticket (all others are done and their stores visible to
it) reads and clears the flag, clears the counter (the scratch is zero again for the next launch on this
stream), writes the flag to `unsorted`, and if it was set rewrites the tables as every tile PARTIAL (kv_indices
0..nkv-1, full counts 0: the attention kernel evaluates the mask everywhere: right, not exact).  Then the full
index entries, which nothing reads (count 0), are those the searches gave, not the torch path's.
The scratch (int32 [2]) is one per device and stream: launches on one stream run one after another.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from .launch import PreparedLaunch, Slot
from .plans import contiguous_strides

Tensor = torch.Tensor
CHECK = 256  # neighbour pairs of g compared per step (and entries per step of the all-PARTIAL rewrite)


def launch(f: Tensor, g: Tensor, lo: Tensor | None, hi: Tensor | None, grid, device: torch.device,
           ) -> tuple[Tensor, ...]:
    """kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices ([1, 1, nq(, nkv)] int32) and unsorted
    (int32 [1]) from one launch; besides it, one allocation (views of it are the five outputs) and no sync."""
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        with torch.cuda.device(device.index):  # Triton launches on the current device
            return launch(f, g, lo, hi, grid, device)
    plan = _launch_plan(grid, lo is not None, hi is not None)
    # one allocation (on a GPU host each costs ~10 us); the five outputs are views at 16-byte aligned offsets
    buffer = torch.empty(plan.buffer_size, dtype=torch.int32, device=device)
    num, idx, full_num, full_idx, unsorted = (buffer.as_strided(*view) for view in plan.views)
    lo, hi = f if lo is None else lo, f if hi is None else hi
    plan.prepared(f, g, lo, hi)({"f": f, "g": g, "lo": lo, "hi": hi, "num": num, "idx": idx, "full_num": full_num,
                                 "full_idx": full_idx, "unsorted": unsorted, "sync": _scratch(device)})
    return num, idx, full_num, full_idx, unsorted


class _LaunchPlan:
    """What a launch needs besides the tensors: a function of the grid and which bounds exist (cached)."""

    def __init__(self, grid, has_lo: bool, has_hi: bool):
        nq, nkv, kv_len = grid.num_q_blocks, grid.num_kv_blocks, grid.kv_len
        rows = triton.next_power_of_2(grid.q_block)
        self.programs = (nq,)
        shapes = ((1, 1, nq), (1, 1, nq, nkv), (1, 1, nq), (1, 1, nq, nkv), (1,))
        sizes = [math.prod(shape) for shape in shapes]
        aligned = [-(-n // 4) * 4 for n in sizes]  # every output starts 16-byte aligned, as Triton specializes it
        offsets = [sum(aligned[:i]) for i in range(len(sizes))]
        self.views = [(shape, contiguous_strides(shape), offset) for shape, offset in zip(shapes, offsets)]
        self.buffer_size = sum(aligned)
        check_span = -(-(kv_len - 1) // nq)  # neighbour pairs of g per program
        self.ints = (grid.q_len, kv_len, grid.q_block, grid.kv_block, nkv, kv_len.bit_length(), check_span)
        self.constexprs = {"HAS_LO": has_lo, "HAS_HI": has_hi, "ROWS": rows,
                           "COLS": max(16, min(256, 8192 // rows)), "CHECK": CHECK}  # a [ROWS, COLS] compare <= 8192
        self._prepared: dict[tuple, PreparedLaunch] = {}

    def prepared(self, *inputs: Tensor) -> PreparedLaunch:
        """The launch for inputs (f, g, lo, hi) of these dtypes and alignments (the outputs' are fixed): prepared
        once, then a repeated build only fills in the tensors (codegen.launch.PreparedLaunch)."""
        kernel = interval_tables_kernel  # read at each build: the module's kernel may be replaced (tests record it)
        key = (kernel, *((t.dtype, t.device, t.data_ptr() % 16 == 0) for t in inputs))
        launch = self._prepared.get(key)
        if launch is None:
            names = ("f", "g", "lo", "hi", "num", "idx", "full_num", "full_idx", "unsorted", "sync")
            launch = self._prepared[key] = PreparedLaunch(kernel, self.programs, [*map(Slot, names), *self.ints],
                                                          self.constexprs)
        return launch


@functools.lru_cache(maxsize=64)
def _launch_plan(grid, has_lo: bool, has_hi: bool) -> _LaunchPlan:
    return _LaunchPlan(grid, has_lo, has_hi)


_SCRATCH: dict[object, Tensor] = {}


def _scratch(device: torch.device) -> Tensor:
    """int32 [2], zero between launches (the last program of each launch clears it): one per device and stream,
    since launches on one stream run one after another."""
    key = device
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        key = (index, torch._C._cuda_getCurrentRawStream(index))
    scratch = _SCRATCH.get(key)
    if scratch is None:
        scratch = _SCRATCH[key] = torch.zeros(2, dtype=torch.int32, device=device)
    return scratch


@triton.jit
def _searchsorted(g_ptr, values, kv_len, steps):
    """Per value, the first j in [0, kv_len) with g[j] >= value, and the first with g[j] > value (else kv_len).

    Both searches step together: their loads are independent, so each halving waits for one load latency."""
    left = tl.zeros_like(values)
    left_end = left + kv_len
    right, right_end = left, left_end
    for _ in range(steps):
        left_on, right_on = left < left_end, right < right_end
        left_mid, right_mid = left + ((left_end - left) >> 1), right + ((right_end - right) >> 1)
        left_g = tl.load(g_ptr + left_mid, mask=left_on, other=0).to(tl.int32)
        right_g = tl.load(g_ptr + right_mid, mask=right_on, other=0).to(tl.int32)
        left = tl.where(left_on & (left_g < values), left_mid + 1, left)
        left_end = tl.where(left_on & (left_g >= values), left_mid, left_end)
        right = tl.where(right_on & (right_g <= values), right_mid + 1, right)
        right_end = tl.where(right_on & (right_g > values), right_mid, right_end)
    return left, right


@triton.jit
def _partial_columns(c0, first, end, touched, band_hi, f0, f1, COLS: tl.constexpr):
    """(columns c0.., PARTIAL flags): some non-empty row meets the kv block, not every row covers it."""
    cols = c0 + tl.arange(0, COLS)
    meets = touched[:, None] & (first[:, None] <= cols[None, :]) & (cols[None, :] < end[:, None])
    nonempty = tl.max(meets.to(tl.int32), 0) > 0
    return cols, nonempty & ((cols < f0) | (cols >= f1)) & (cols < band_hi)


@triton.jit(do_not_specialize=["q_len", "kv_len", "nkv", "steps", "check_span"])
def interval_tables_kernel(
    f_ptr, g_ptr,  # f at q positions [Q_LEN], g at kv positions [KV_LEN]: int32 or int64 (read as int32)
    lo_ptr, hi_ptr,  # int32 [nq * q_block] row bounds in [0, KV_LEN] (read only with HAS_LO / HAS_HI)
    num_ptr, idx_ptr, full_num_ptr, full_idx_ptr,  # int32 [nq], [nq, nkv], [nq], [nq, nkv]
    unsorted_ptr,  # int32 [1]: 1 where g was found unsorted (then every tile is PARTIAL)
    sync_ptr,  # int32 [2] scratch: programs done, unsorted seen; zero between launches
    q_len, kv_len, q_block, kv_block, nkv, steps, check_span,
    HAS_LO: tl.constexpr, HAS_HI: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr, CHECK: tl.constexpr,
):
    qb = tl.program_id(0)
    r = tl.arange(0, ROWS)
    in_block = r < q_block
    row = qb * q_block + r
    f = tl.load(f_ptr + tl.minimum(row, q_len - 1)).to(tl.int32)
    lo, hi = _searchsorted(g_ptr, f, kv_len, steps)
    if HAS_LO:
        lo = tl.maximum(lo, tl.load(lo_ptr + row, mask=in_block, other=0))
    if HAS_HI:
        hi = tl.minimum(hi, tl.load(hi_ptr + row, mask=in_block, other=0))
    touched = in_block & (hi > lo)
    first, end = lo // kv_block, (hi + kv_block - 1) // kv_block
    band_lo = tl.min(tl.where(touched, first, nkv), 0)
    band_hi = tl.max(tl.where(touched, end, 0), 0)
    f0 = (tl.max(tl.where(in_block, lo, 0), 0) + kv_block - 1) // kv_block  # an empty row: f0 >= f1, no FULL
    cover = tl.min(tl.where(in_block, hi, kv_len), 0)
    f1 = tl.where(cover >= kv_len, nkv, cover // kv_block)  # a ragged last block is FULL if the rows reach KV_LEN

    num = 0
    for c0 in range(band_lo, band_hi, COLS):
        cols, partial = _partial_columns(c0, first, end, touched, band_hi, f0, f1, COLS)
        num += tl.sum(partial.to(tl.int32), 0)
    idx_row, full_row = idx_ptr + qb * nkv, full_idx_ptr + qb * nkv
    done = 0
    for c0 in range(band_lo, band_hi, COLS):  # the band: PARTIAL columns to their rank, the others after all
        cols, partial = _partial_columns(c0, first, end, touched, band_hi, f0, f1, COLS)
        p = partial.to(tl.int32)
        rank = done + tl.cumsum(p, 0) - p
        tl.store(idx_row + tl.where(partial, rank, num + cols - rank), cols, mask=cols < band_hi)
        done += tl.sum(p, 0)
    for c0 in range(0, nkv, COLS):  # outside the band nothing is PARTIAL: before it, after the count; after it, itself
        cols = c0 + tl.arange(0, COLS)
        outside = (cols < nkv) & ((cols < band_lo) | (cols >= band_hi))
        tl.store(idx_row + tl.where(cols < band_lo, num + cols, cols), cols, mask=outside)
        tl.store(full_row + cols, tl.minimum(f0 + cols, nkv - 1), mask=cols < nkv)
    tl.store(num_ptr + qb, num)
    tl.store(full_num_ptr + qb, tl.maximum(f1 - f0, 0))

    bad = 0  # this program's slice of g's neighbour pairs
    start = qb * check_span
    stop = tl.minimum(start + check_span, kv_len - 1)
    for j0 in range(start, stop, CHECK):
        j = j0 + tl.arange(0, CHECK)
        pair = j < stop
        a = tl.load(g_ptr + j, mask=pair, other=0).to(tl.int32)
        b = tl.load(g_ptr + j + 1, mask=pair, other=0).to(tl.int32)
        bad = tl.maximum(bad, tl.max((pair & (b < a)).to(tl.int32), 0))
    tl.atomic_max(sync_ptr + 1, bad, sem="acq_rel")
    tl.debug_barrier()  # every thread's table stores before the count below releases them
    ticket = tl.atomic_add(sync_ptr, 1, sem="acq_rel")
    if ticket == tl.num_programs(0) - 1:  # the last program: all tables written, every slice checked
        unsorted = tl.atomic_xchg(sync_ptr + 1, 0, sem="acq_rel")
        tl.atomic_xchg(sync_ptr, 0, sem="acq_rel")
        tl.store(unsorted_ptr, unsorted)
        if unsorted != 0:
            _every_tile_partial(num_ptr, idx_ptr, full_num_ptr, tl.num_programs(0), nkv, CHECK)


@triton.jit
def _every_tile_partial(num_ptr, idx_ptr, full_num_ptr, nq, nkv, FILL: tl.constexpr):
    """The tables of an unsorted g: every tile PARTIAL (kv_indices 0..nkv-1 per row), none FULL."""
    for k0 in range(0, nq * nkv, FILL):
        k = k0 + tl.arange(0, FILL)
        tl.store(idx_ptr + k, k % nkv, mask=k < nq * nkv)
    for k0 in range(0, nq, FILL):
        k = k0 + tl.arange(0, FILL)
        tl.store(num_ptr + k, tl.zeros_like(k) + nkv, mask=k < nq)
        tl.store(full_num_ptr + k, tl.zeros_like(k), mask=k < nq)
