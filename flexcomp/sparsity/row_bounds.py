"""Masks whose every row is one kv interval with ends computed row by row: exact tables without a tile analysis.

closed_form.py proves bounds that hold for every q from the mask's algebra alone, so it refuses what users capture
per batch, per head or per call: `kv_idx < lengths[b]`, left padding `kv_idx >= start[b]`, a causal mask shifted by
`offsets[0]` (transformers' masks, a serving loop's lengths).  Here the same algebra (closed_form.kv_interval)
runs with every kv-free integer subexpression held opaque, a parameter that is constant within a row; a kv-free
condition (`q_idx < q_lengths[b]`) keeps a row whole or empties it.  When the mask's true set in every row is then
one interval [lo, hi), `row_bounds` returns lo and hi as IR, and `row_bound_tables` evaluates them for every
(b, h, q) row at once (O(B * H * Q_LEN) integer work on the host) and turns the rows into torch's ordered tables
through tables.interval_spans / spans_to_tables, which are exact: a tile is listed where some row meets it, FULL
where every row of its q block covers it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from types import SimpleNamespace

import sympy as sp
import torch

from ..evaluate import evaluate
from ..ir import Node, arg, const
from .closed_form import _Unsupported, kv_interval, to_ir
from .tables import interval_spans, spans_to_tables

Tensor = torch.Tensor


@dataclass(frozen=True)
class RowBounds:
    """mask(b, h, q, kv) <=> lo <= kv < hi, for kv in [0, KV_LEN).  lo and hi are i32 IR over b, h, q_idx, the
    mask's captured tensors and KV_LEN (an unbounded end is 0 or KV_LEN); hi <= lo is an empty row."""

    lo: Node
    hi: Node


@lru_cache(maxsize=256)
def row_bounds(ir: Node) -> RowBounds | None:
    """The mask's per-row kv interval, or None where a row's true set may not be one interval (an OR of two
    ranges, `!=`, a float, kv inside a table read or times a row's value)."""
    params: dict[Node, sp.Symbol] = {}
    try:
        lo, hi = kv_interval(ir, params=params)
        nodes_of = {symbol: node for node, symbol in params.items()}
        q_idx = arg("q_idx")
        return RowBounds(to_ir(lo, q_idx, const(0), nodes_of), to_ir(hi, q_idx, arg("KV_LEN"), nodes_of))
    except (_Unsupported, TypeError, ValueError):
        return None


ROW_CHUNK = 1 << 22  # rows whose ends are evaluated at once: bounded host memory with many batches and heads


def row_bound_tables(bounds: RowBounds, tensors: dict[str, Tensor], grid) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices ([B, H, nq(, width)] int32, on the host) of
    the mask on `grid`, `width` the widest q block's band of kv blocks; `tensors`: the captured tensors, on the host.
    The (b, h) pairs go in groups of at most ROW_CHUNK rows (one pair at least)."""
    pairs, nq = grid.B * grid.H, grid.num_q_blocks
    step = max(1, ROW_CHUNK // (nq * grid.q_block))
    parts = [_pair_tables(bounds, tensors, grid, torch.arange(p0, min(pairs, p0 + step), dtype=torch.int32))
             for p0 in range(0, pairs, step)]  # fmt: skip
    width = max(part[1].shape[-1] for part in parts)
    pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[-1]))  # entries past a count are never read
    kv_num, kv_indices, full_num, full_indices = (torch.cat([pad(t) if t.dim() == 2 else t for t in tables])
                                                  for tables in zip(*parts))  # fmt: skip
    shape = (grid.B, grid.H, nq)
    return kv_num.view(shape), kv_indices.view(*shape, -1), full_num.view(shape), full_indices.view(*shape, -1)


def _pair_tables(bounds: RowBounds, tensors: dict[str, Tensor], grid, pairs: Tensor) -> tuple[Tensor, ...]:
    """The tables ([P * nq] counts, [P * nq, width] indices) of the (b, h) pairs numbered `pairs` (b * H + h)."""
    nq, bq = grid.num_q_blocks, grid.q_block
    rows = torch.arange(nq * bq, dtype=torch.int32).clamp_(max=grid.q_len - 1)  # rows past Q_LEN repeat the last
    env = {"b": (pairs // grid.H).view(-1, 1), "h": (pairs % grid.H).view(-1, 1), "q_idx": rows.view(1, -1),
           "KV_LEN": torch.tensor(grid.kv_len, dtype=torch.int32)}  # fmt: skip
    lo, hi = (evaluate(end, env, tensors).long().expand(len(pairs), nq * bq).clamp(0, grid.kv_len).reshape(-1)
              for end in (bounds.lo, bounds.hi))
    # every (b, h, q block) is a q block of one tall grid: the spans and tables are per q block already
    tall = SimpleNamespace(num_q_blocks=len(pairs) * nq, q_block=bq, kv_block=grid.kv_block,
                           num_kv_blocks=grid.num_kv_blocks, kv_len=grid.kv_len)
    spans = interval_spans(lo, hi, tall)
    start = spans[1].amin(1, keepdim=True)  # each q block's band of kv blocks (a window's tables stay narrow)
    width = max(1, int((spans[2].amax(1, keepdim=True) - start).max()))
    kv_num, kv_indices, full_num, full_indices = spans_to_tables(spans, tall, start, width)
    return kv_num.view(-1), kv_indices.view(len(pairs) * nq, -1), full_num.view(-1), full_indices.view(len(pairs) * nq, -1)
