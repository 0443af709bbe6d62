"""Per-block summaries of captured tensors: the min and max a LOAD can return on each tile.

A LOAD `T[i0, i1, ...]` whose every index depends on at most one tile axis (b, h, q or kv)
is summarized exactly on the bounding box of its index ranges: each table dimension is
reduced (min and max) over the index range of each block of its axis, then the reduced
tables are gathered onto the tile grid.  An index that mixes axes, or may leave the table
(the evaluator wraps negatives and clamps, see `evaluate.safe_index`), reads the whole dimension.
Bool tables reduce to any/all, as 0/1.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor
AXES = ("b", "h", "q_idx", "kv_idx")
GATHER_BUDGET = 1 << 25  # elements per gather; ranges longer than this are reduced in slices
DEDUP_MIN = 4096  # range lists longer than this are deduplicated before reducing
POINT_MAX = 1 << 16  # per-tile index values past which a point read is not looked for


def axis_of(shape: torch.Size) -> int | None:
    """The single grid axis along which an interval varies (None: constant)."""
    varying = [d for d, n in enumerate(shape) if n > 1]
    return varying[0] if len(varying) == 1 else (None if not varying else -1)


def _reduce_dim(table: Tensor, dim: int, lo: Tensor, hi: Tensor, op: str) -> Tensor:
    """Reduce `table` along `dim` over [lo[i], hi[i]] for each i: the dim becomes len(lo)."""
    if lo.numel() > DEDUP_MIN:  # a list of tiles repeats each block's range: reduce each distinct range once
        key = lo * (int(hi.max().item()) + 1) + hi
        distinct, inverse = torch.unique(key, return_inverse=True)
        if distinct.numel() < lo.numel() // 2:
            first = torch.empty_like(distinct).scatter_(0, inverse, torch.arange(lo.numel(), device=lo.device))
            return _reduce_ranges(table, dim, lo[first], hi[first], op).index_select(dim, inverse)
    return _reduce_ranges(table, dim, lo, hi, op)


def _reduce_ranges(table: Tensor, dim: int, lo: Tensor, hi: Tensor, op: str) -> Tensor:
    span = int((hi - lo).max().item()) + 1 if lo.numel() else 1
    moved = table.movedim(dim, 0)
    out = []
    rows_per_slice = max(1, GATHER_BUDGET // max(1, span * moved[0].numel()))
    for start in range(0, lo.numel(), rows_per_slice):
        l, h = lo[start:start + rows_per_slice], hi[start:start + rows_per_slice]
        idx = torch.minimum(l[:, None] + torch.arange(span, device=l.device), h[:, None])  # repeat hi: min/max safe
        picked = moved[idx.reshape(-1)].reshape(idx.shape[0], span, *moved.shape[1:])
        out.append(picked.amin(dim=1) if op == "min" else picked.amax(dim=1))
    return torch.cat(out).movedim(0, dim)


def _reduce_paired(table: Tensor, first: int, dim: int, lo: Tensor, hi: Tensor, op: str) -> Tensor:
    """Reduce `dim` over [lo[i], hi[i]] for the i-th entry of the already reduced dim `first`: `dim` becomes 1.

    Two indices along one grid axis (T[q // 64, q % 64], or a list of tiles where q and kv share the
    axis) pair up entry by entry; reducing each alone and gathering the outer product would be n**2."""
    moved = table.movedim((first, dim), (0, 1))
    span = int((hi - lo).max().item()) + 1 if lo.numel() else 1
    rows_per_slice = max(1, GATHER_BUDGET // max(1, span * moved[0, 0].numel()))
    out = []
    for start in range(0, lo.numel(), rows_per_slice):
        l, h = lo[start:start + rows_per_slice], hi[start:start + rows_per_slice]
        idx = torch.minimum(l[:, None] + torch.arange(span, device=l.device), h[:, None])
        picked = moved[start:start + l.numel()][torch.arange(l.numel(), device=l.device)[:, None], idx]
        out.append(picked.amin(dim=1) if op == "min" else picked.amax(dim=1))
    return torch.cat(out).unsqueeze(1).movedim((0, 1), (first, dim))


def _point_read(table: Tensor, index_ranges: list[tuple[Tensor, Tensor]], grid_dims: int) -> Tensor | None:
    """`table[indices]` per tile where every index is one value per tile (`start[b]`, `offsets[0]`), each along
    at most one grid axis and inside the table: what the reductions below would give, by one gather; else None."""
    if table.dim() != len(index_ranges):
        return None
    for (lo, hi), size in zip(index_ranges, table.shape):
        if lo.shape != hi.shape or axis_of(lo.shape) == -1 or lo.numel() > POINT_MAX or not torch.equal(lo, hi):
            return None
        if not bool(((lo >= 0) & (lo <= size - 1)).all()):
            return None
    if not index_ranges:
        return table.reshape([1] * grid_dims)
    return table[tuple(lo.to(device=table.device, dtype=torch.int64) for lo, _ in index_ranges)]


def load_bounds(table: Tensor, index_ranges: list[tuple[Tensor, Tensor]], grid_dims: int = 4) -> tuple[Tensor, Tensor]:
    """[lo, hi] of `table[indices]` per tile, given each index's per-tile [lo, hi] (grid-broadcast tensors)."""
    table = table.detach()
    if table.dtype == torch.bool:
        table = table.to(torch.int64)
    table = table.to(torch.float64) if table.is_floating_point() else table.to(torch.int64)
    point = _point_read(table, index_ranges, grid_dims)
    if point is not None:
        return point, point
    tmin, tmax = table, table
    gather: list[Tensor] = []
    reduced_along: dict[int, int] = {}  # grid axis -> the table dim already reduced along it
    for dim, (lo, hi) in enumerate(index_ranges):
        size = table.shape[dim]
        axis = axis_of(torch.broadcast_shapes(lo.shape, hi.shape))
        inside = bool(((lo >= 0) & (hi <= size - 1)).all().item())
        if axis == -1 or not inside:  # mixed axes or a wrapped/clamped read: the whole dimension
            lo1, hi1 = torch.zeros(1, dtype=torch.int64), torch.full((1,), size - 1, dtype=torch.int64)
            axis = None
        else:
            shape = [1] * grid_dims
            if axis is not None:
                shape[axis] = max(lo.shape[axis], hi.shape[axis])
            lo1, hi1 = lo.expand(shape).reshape(-1), hi.expand(shape).reshape(-1)
        lo1, hi1 = lo1.to(tmin.device), hi1.to(tmin.device)
        if axis is not None and axis in reduced_along:
            first = reduced_along[axis]
            tmin = _reduce_paired(tmin, first, dim, lo1, hi1, "min")
            tmax = _reduce_paired(tmax, first, dim, lo1, hi1, "max")
            gather.append(torch.zeros([1] * grid_dims, dtype=torch.int64, device=tmin.device))
            continue
        tmin = _reduce_dim(tmin, dim, lo1, hi1, "min")
        tmax = _reduce_dim(tmax, dim, lo1, hi1, "max")
        if axis is not None:
            reduced_along[axis] = dim
        view = [1] * grid_dims
        if axis is not None:
            view[axis] = lo1.numel()
        gather.append(torch.arange(lo1.numel(), device=tmin.device).view(view))
    if not gather:
        return tmin.reshape([1] * grid_dims), tmax.reshape([1] * grid_dims)
    return tmin[tuple(gather)], tmax[tuple(gather)]
