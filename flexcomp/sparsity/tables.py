"""torch's ordered block tables (counts + ascending indices per row), built without dense [nq, nkv] maps.

Index tables are [..., rows, W] with W the largest count of any row (at least 1); entries past a
row's count are 0 and must not be read.  The exception, `spans_to_tables` without a band (document masks on the
GPU, where codegen.interval_kernel builds the same tables in one launch), uses torch's own width nkv so that no
host read is needed: O(tiles), and its unread entries are in range.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from ..evaluate import evaluate
from ..tiles import ClosedFormBounds, TileClass
from .host import on_device, on_host

Tensor = torch.Tensor
CHUNK_ELEMENTS = 1 << 22  # index entries built per band of rows: bounds the intermediates of a table


def mask_to_ordered(mask: Tensor, width: int | None = None) -> tuple[Tensor, Tensor]:
    """bool [..., R, N] -> (int32 counts [..., R], int32 ascending indices [..., R, W])."""
    counts = mask.sum(-1)
    width = max(1, int(counts.max().item()) if counts.numel() else 1) if width is None else width
    flat = mask.reshape(-1, mask.shape[-1])
    rows, cols = flat.nonzero(as_tuple=True)
    row_counts = counts.reshape(-1)
    starts = torch.cumsum(row_counts, 0) - row_counts
    slot = torch.arange(rows.numel(), device=mask.device) - starts[rows]
    out = torch.zeros(flat.shape[0], width, dtype=torch.int32, device=mask.device)
    out[rows, slot] = cols.to(torch.int32)
    return counts.to(torch.int32), out.reshape(*mask.shape[:-1], width)


def tiles_to_ordered(rows: Tensor, cols: Tensor, keep: Tensor, num_rows: int) -> tuple[Tensor, Tensor]:
    """Listed tiles (row-major int64 [T] rows and cols, bool keep [..., T]) -> (counts [..., R], indices [..., R, W])."""
    batch = keep.shape[:-1]
    keep2 = keep.reshape(-1, keep.shape[-1])
    n = keep2.shape[0]
    counts = torch.zeros(n, num_rows, dtype=torch.int64)
    counts.scatter_add_(1, rows.expand(n, -1), keep2.long())
    width = max(1, int(counts.max().item()) if counts.numel() else 1)
    row_start = torch.cumsum(counts, 1) - counts  # kept tiles before each row
    rank = torch.cumsum(keep2.long(), 1) - 1
    which, pos = keep2.nonzero(as_tuple=True)
    slot = rank[which, pos] - row_start[which, rows[pos]]
    out = torch.zeros(n, num_rows, width, dtype=torch.int32)
    out[which, rows[pos], slot] = cols[pos].to(torch.int32)
    return counts.to(torch.int32).view(*batch, num_rows), out.view(*batch, num_rows, width)


def _pad(indices: Tensor, width: int) -> Tensor:
    return torch.nn.functional.pad(indices, (0, width - indices.shape[-1]))


def rows_to_ordered(partial: list[Tensor], full: list[Tensor], device: torch.device) -> tuple[Tensor, ...]:
    """Bands of bool tile maps (along q blocks) -> kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices."""
    out = []
    for bands in (partial, full):
        parts = [mask_to_ordered(m) for m in bands]
        width = max(p[1].shape[-1] for p in parts)
        out.append(torch.cat([p[0] for p in parts], dim=-1))
        out.append(torch.cat([_pad(p[1], width) for p in parts], dim=-2))
    return tuple(on_device(out, device))  # one copy for the four tables


def classes_to_ordered(classes: Tensor) -> tuple[Tensor, ...]:
    """uint8 TileClass map [..., R, N] -> kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices at torch's
    dense width N, without a host sync (a stable sort puts each row's listed tiles first, ascending)."""
    out = []
    for cls in (TileClass.PARTIAL, TileClass.FULL):
        listed = classes == cls
        order = torch.sort(listed.to(torch.uint8), dim=-1, descending=True, stable=True).indices
        out += [listed.sum(-1, dtype=torch.int32), order.to(torch.int32)]
    return tuple(out)


def ordered_to_classes(num: Tensor, idx: Tensor, full_num: Tensor | None, full_idx: Tensor | None,
                       num_cols: int) -> Tensor:
    """uint8 TileClass map [..., rows, num_cols] from ordered tables (FULL wins where both list a tile)."""
    out = torch.zeros(*idx.shape[:-1], num_cols + 1, dtype=torch.uint8, device=idx.device)
    for n, i, cls in ((num, idx, TileClass.PARTIAL), (full_num, full_idx, TileClass.FULL)):
        if n is None:
            continue
        listed = torch.arange(i.shape[-1], device=i.device) < n[..., None]
        cols = torch.where(listed, i.long().clamp(0, num_cols - 1), num_cols)
        out.scatter_(-1, cols, torch.full_like(cols, int(cls), dtype=torch.uint8))
    return out[..., :num_cols]


def transpose_ordered(num: Tensor, idx: Tensor, num_cols: int) -> tuple[Tensor, Tensor]:
    """The q-major tables: for each kv block, the q blocks that list it (ascending), from the listed entries only."""
    *batch, rows, width = idx.shape
    idx2, num2 = idx.reshape(-1, rows, width), num.reshape(-1, rows)
    nbatch = idx2.shape[0]
    listed = torch.arange(width, device=idx.device) < num2[..., None]
    b = torch.arange(nbatch, device=idx.device).view(-1, 1, 1).expand(idx2.shape)[listed]
    r = torch.arange(rows, device=idx.device).view(1, -1, 1).expand(idx2.shape)[listed]
    c = idx2.long()[listed]
    key = (b * num_cols + c) * rows + r  # sort by (batch, column, row)
    order = torch.argsort(key)
    b, r, c = b[order], r[order], c[order]
    counts = torch.zeros(nbatch * num_cols, dtype=torch.int64, device=idx.device)
    counts.scatter_add_(0, b * num_cols + c, torch.ones_like(c))
    q_width = max(1, int(counts.max().item()) if counts.numel() else 1)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(c.numel(), device=idx.device) - starts[b * num_cols + c]
    out = torch.zeros(nbatch * num_cols, q_width, dtype=torch.int32, device=idx.device)
    out[b * num_cols + c, slot] = r.to(torch.int32)
    return counts.to(torch.int32).view(*batch, num_cols), out.view(*batch, num_cols, q_width)


# ---------------------------------------------------------------- closed-form bounds -> tables


def bounds_rows(bounds: ClosedFormBounds, grid, tensors: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per q block, kv-block ranges (int64 [nq] each): visited [a, c), full [f0, f1) with a <= f0 <= f1 <= c."""
    qb = torch.arange(grid.num_q_blocks, dtype=torch.int64)
    env = {"q_lo": (qb * grid.q_block).int(), "q_hi": (torch.clamp((qb + 1) * grid.q_block, max=grid.q_len) - 1).int(),
           "Q_LEN": torch.tensor(grid.q_len, dtype=torch.int32), "KV_LEN": torch.tensor(grid.kv_len, dtype=torch.int32),
           "b": torch.tensor(0, dtype=torch.int32), "h": torch.tensor(0, dtype=torch.int32)}
    tensors = on_host(tensors)
    value = lambda node: evaluate(node, env, tensors).long().expand(qb.shape).clamp(0, grid.kv_len)
    kv_lo, kv_hi, full_lo, full_hi = (value(n) for n in (bounds.kv_lo, bounds.kv_hi, bounds.full_lo, bounds.full_hi))
    bk, nkv = grid.kv_block, grid.num_kv_blocks
    a = kv_lo // bk
    c = torch.where(kv_hi > kv_lo, -(-kv_hi // bk), a)  # an empty range visits nothing
    f0 = -(-full_lo // bk)  # first block starting at or after full_lo
    f1 = torch.where(full_hi >= grid.kv_len, nkv, full_hi // bk)  # the last block is full if it reaches KV_LEN
    empty_full = f1 <= f0
    # an empty full range may sit anywhere in [a, c]: at the next full range's start keeps f0, f1 monotone
    # where they can be (causal's first row), so the q-major tables come from ranges (transpose_ranges)
    next_f0 = torch.where(empty_full, nkv, f0).flip(0).cummin(0).values.flip(0)
    at = torch.minimum(torch.maximum(next_f0, a), c)
    f0, f1 = torch.where(empty_full, at, f0.clamp(a, c)), torch.where(empty_full, at, f1.clamp(a, c))
    return a, f0, f1, c


def _range_indices(lo: Tensor, f0: Tensor, f1: Tensor, hi: Tensor, full: bool) -> Tensor:
    """Ascending index table [1, 1, R, W] of per-row ranges: [f0, f1) if `full`, else [lo, f0) + [f1, hi).

    Written into the preallocated table a band of rows (at most CHUNK_ELEMENTS entries, or one row) at a
    time, so the only intermediates are one band's: causal's full table alone is nq * nkv / 2 entries."""
    lo, f0, f1, hi = (t.to(torch.int32) for t in (lo, f0, f1, hi))  # int32 throughout
    starts, counts = (f0, f1 - f0) if full else (lo, (f0 - lo) + (hi - f1))
    width = max(1, int(counts.max().item()) if counts.numel() else 1)
    out = torch.empty(counts.numel(), width, dtype=torch.int32)
    j = torch.arange(width, dtype=torch.int32)
    step = max(1, CHUNK_ELEMENTS // width)
    for r in range(0, counts.numel(), step):
        rows, band = slice(r, r + step), out[r:r + step]
        torch.add(starts[rows, None], j, out=band)  # start + j
        if not full:  # past the left piece [lo, f0), jump the gap to f1
            band.add_((j >= (f0 - lo)[rows, None]) * (f1 - f0)[rows, None])
        band.masked_fill_(j >= counts[rows, None], 0)
    return out.view(1, 1, -1, width)


def transpose_ranges(ranges: tuple[Tensor, Tensor, Tensor, Tensor], num_cols: int) -> tuple[Tensor, ...] | None:
    """Per-column row ranges of monotone per-row ranges, in the same (lo, f0, f1, hi) form, or None.

    With lo, f0, f1, hi non-decreasing over rows, column k is FULL in rows [#(f1 <= k), #(f0 <= k)) and
    PARTIAL in [#(hi <= k), #(f1 <= k)) + [#(f0 <= k), #(lo <= k)), where #(x <= k) counts rows (a searchsorted)."""
    if any(bool((r[1:] < r[:-1]).any()) for r in ranges):
        return None
    a, f0, f1, c = ranges
    cols = torch.arange(num_cols, dtype=a.dtype)
    upto = lambda x: torch.searchsorted(x.contiguous(), cols, right=True)
    return upto(c), upto(f1), upto(f0), upto(a)


def rows_from_ranges(ranges: tuple[Tensor, ...] | Callable[[], tuple[Tensor, ...]], grid, device: torch.device,
                     counts: Callable[[], tuple[Tensor, Tensor]] | None = None,
                     ) -> dict[str, Callable[[], Tensor]]:
    """Lazy tables from per-row ranges (partial = [a, f0) + [f1, c), full = [f0, f1)): nothing is built until read.

    `ranges` may be a function, called (once, on the host) only when a table needs it; `counts`, when
    given, makes (kv_num_blocks, full_kv_num_blocks) without the ranges (e.g. on the device by
    `counts.build`: then nothing is copied to the device until an index table is read)."""
    ranges_now = ranges if callable(ranges) else (lambda: ranges)
    get_ranges = _once(ranges_now)
    view = lambda t: t.to(torch.int32).view(1, 1, -1).to(device)

    def counts_from_ranges() -> tuple[Tensor, Tensor]:
        a, f0, f1, c = get_ranges()
        return view((f0 - a) + (c - f1)), view(f1 - f0)

    get_counts = _once(counts or counts_from_ranges)
    tables = {"kv_num_blocks": lambda: get_counts()[0], "full_kv_num_blocks": lambda: get_counts()[1]}
    partial_indices = lambda: _range_indices(*get_ranges(), full=False).to(device)
    full_indices = lambda: _range_indices(*get_ranges(), full=True).to(device)

    by_col = _once(lambda: transpose_ranges(get_ranges(), grid.num_kv_blocks))
    transposed: dict[bool, tuple[Tensor, Tensor]] = {}

    def generic_transpose(full: bool) -> tuple[Tensor, Tensor]:  # ranges that are not monotone: from listed entries
        if full not in transposed:
            num = tables["full_kv_num_blocks" if full else "kv_num_blocks"]()
            transposed[full] = transpose_ordered(num, full_indices() if full else partial_indices(), grid.num_kv_blocks)
        return transposed[full]

    def q_counts(full: bool) -> Tensor:
        if by_col() is None:
            return generic_transpose(full)[0]
        lo, g0, g1, hi = by_col()
        return view((g1 - g0) if full else (g0 - lo) + (hi - g1))

    def q_indices(full: bool) -> Tensor:
        if by_col() is None:
            return generic_transpose(full)[1]
        return _range_indices(*by_col(), full=full).to(device)

    lazy = {**tables, "kv_indices": partial_indices, "full_kv_indices": full_indices,
            "q_num_blocks": lambda: q_counts(False), "q_indices": lambda: q_indices(False),
            "full_q_num_blocks": lambda: q_counts(True), "full_q_indices": lambda: q_indices(True)}
    return lazy


def _once(fn: Callable[[], object]) -> Callable[[], object]:
    """fn, called at most once (functools.cache costs ~3 us to wrap: this is on every lazy build)."""
    memo: list = []

    def call():
        if not memo:
            memo.append(fn())
        return memo[0]

    return call


# ---------------------------------------------------------------- per-row kv intervals -> tables


def interval_spans(lo: Tensor, hi: Tensor, grid) -> tuple[Tensor, ...]:
    """Per-row kv intervals [lo, hi) (int32 [nq * bq]; rows past Q_LEN repeat the last) -> kv-block spans.

    (touched [nq, bq] int32: 1 where the row is non-empty; first, end [nq, bq]: the kv blocks [first, end)
    a row meets; f0, f1 [nq, 1]: the kv blocks [f0, f1) every row of the q block covers, i.e. the FULL ones)."""
    nq, bq, bk, nkv, kv_len = grid.num_q_blocks, grid.q_block, grid.kv_block, grid.num_kv_blocks, grid.kv_len
    lo, hi = lo.view(nq, bq), hi.view(nq, bq)
    touched = (hi > lo).to(torch.int32)
    first, end = lo // bk, (hi + (bk - 1)) // bk  # an empty row's pair is harmless: its weight is 0
    f0 = (lo.amax(1, keepdim=True) + (bk - 1)) // bk  # an empty row has max lo >= min hi: no FULL block
    cover = hi.amin(1, keepdim=True)
    f1 = cover // bk if kv_len % bk == 0 else torch.where(cover >= kv_len, nkv, cover // bk)  # ragged last block
    return touched, first, end, f0, f1


def spans_to_tables(spans: tuple[Tensor, ...], grid, start: Tensor | None = None, width: int | None = None,
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices ([1, 1, nq(, width)] int32) from spans.

    Column c of q block i is kv block start[i] + c (start None: 0, width nkv: torch's dense layout).  A tile is
    non-empty where a difference array of the rows' [first, end) is positive; PARTIAL = non-empty and not FULL.
    No host sync: a fixed number of device ops, O(nq * width) memory."""
    touched, first, end, f0, f1 = spans
    nq, nkv = grid.num_q_blocks, grid.num_kv_blocks
    width = nkv if width is None else width
    local = (lambda t: t) if start is None else (lambda t: t - start)
    column = local if start is None else (lambda t: (t - start).clamp_(0, width))  # an empty row's may lie outside
    edges = torch.zeros(nq, width + 1, dtype=torch.int32, device=first.device)  # the band: its weight is 0
    edges.scatter_add_(1, column(first), touched).scatter_add_(1, column(end), -touched)
    nonempty = edges.cumsum(1, dtype=torch.int32)[:, :width] > 0
    col = columns(width, first.device)
    full = (col >= local(f0)) & (col < local(f1))
    partial = nonempty > full  # a > b on bools: a & ~b
    kv_indices = listed_first(partial, col)
    full_indices = (f0 + col).clamp_(max=nkv - 1)  # the entries past the count are never read: kept in range
    if start is not None:
        kv_indices += start
    view = lambda t: t.view(1, 1, nq, -1)
    return (partial.sum(1, dtype=torch.int32).view(1, 1, nq), view(kv_indices),
            full.sum(1, dtype=torch.int32).view(1, 1, nq), view(full_indices))


def listed_first(listed: Tensor, col: Tensor) -> Tensor:
    """Each row's column numbers, its listed ones first, each part ascending (int32): what a stable descending sort
    of `listed` returns as indices (torch's layout), placed by two running counts instead of a sort."""
    before = listed.cumsum(1, dtype=torch.int32)  # listed columns up to and including each one
    count = before[:, -1:]
    position = torch.where(listed, before - 1, count + col - before)  # unlisted: after every listed one
    return torch.empty_like(position).scatter_(1, position.long(), col.expand_as(position))


@functools.lru_cache(maxsize=64)
def columns(width: int, device: torch.device) -> Tensor:
    return torch.arange(width, dtype=torch.int32, device=device)
