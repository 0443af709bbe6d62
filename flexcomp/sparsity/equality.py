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
"""

from __future__ import annotations

import torch

from ..evaluate import evaluate
from ..ir import DType, Node, Op, free_args

Tensor = torch.Tensor


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
    tensors = {k: v.detach().cpu() for k, v in tensors.items()}
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
