"""Host-side pieces both directions' launches share (forward.py and backward.py): pipeline depth, buffer checks,
slot arguments, block-table arguments, the sparse-mask heuristic, the index prefetch and refined-table choices.

Shared here so that backward.py imports no internals of forward.py (issue 18)."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch

from flexcomp.tiles import ClosedFormBounds, block_size

from .launch import Slot

# Loops run with at least two pipeline stages: with one, Triton 3.6 on sm_90 stores each K and V tile to shared
# memory from registers, and there it computed wrong outputs (D=40, Dv=24: relative error 1.3) and faulted
# (benchmarks/gpu_sweep.py, issue 16).  kernel_options num_stages=1 is read as 2, as a hint torch's kernels may also
# adjust.
MIN_STAGES = 2


def table_args(num: torch.Tensor, idx: torch.Tensor, full_num: torch.Tensor, full_idx: torch.Tensor) -> list[Any]:
    """A direction's four block tables as params.block_tables declares them: each pointer, then its strides (0 where
    a dim has size 1: one table row serves every batch or head)."""
    return [x for t in (num, idx, full_num, full_idx)
            for x in (t, *(0 if size == 1 else stride for size, stride in zip(t.shape, t.stride())))]  # fmt: skip


def check_buffers(buffers: list[tuple[str, torch.Tensor]], device: torch.device) -> None:
    for name, t in buffers:
        if t.device != device:
            raise ValueError(
                f"captured tensor {name.split(':', 1)[1]!r} is on {t.device}, the inputs on {device}: create it on "
                f"the inputs' device (torch.tensor(..., device=q.device)), or move it once with `.to(q.device)` before "
                f"the mod is defined and capture the moved tensor; flexcomp does not copy it on every call"
            )


def slot_args(name: str, t: torch.Tensor) -> list[Any]:
    """A per-call tensor's arguments: its slot, then its strides (fixed: a plan's key holds the layout)."""
    return [Slot(name), *t.stride()]


SPARSE_BELOW = 0.25  # visited fraction of kv blocks under which smaller tiles win (measured: NOTES_forward.md)
MEMO_SIZE = 256  # block masks are often rebuilt every step: remember only the recent ones
# (id(bounds or kv_num_blocks), lengths, block size) -> (that object, kept alive so its id stays unique; sparse?)
_SPARSITY: OrderedDict[tuple, tuple[Any, bool]] = OrderedDict()


def is_sparse(block_mask: Any, bounds: ClosedFormBounds | None) -> bool:
    """Whether the q tiles visit under SPARSE_BELOW of the kv blocks on average (decided once per block mask).

    Closed-form bounds are evaluated on the host (no table is built); tables are summed on their
    device once (one sync per new block mask).  Keyed by the bounds or table object, which shallow
    copies of a block mask share."""
    anchor = bounds if bounds is not None else block_mask.kv_num_blocks
    key = (id(anchor), tuple(block_mask.seq_lengths), block_size(block_mask))
    hit = _SPARSITY.get(key)
    if hit is None:
        hit = _SPARSITY[key] = (anchor, _visited_fraction(block_mask, bounds) < SPARSE_BELOW)
        if len(_SPARSITY) > MEMO_SIZE:
            _SPARSITY.popitem(last=False)
    _SPARSITY.move_to_end(key)
    return hit[1]


def _visited_fraction(block_mask: Any, bounds: ClosedFormBounds | None) -> float:
    q_len, kv_len = block_mask.seq_lengths
    block_q, block_kv = block_size(block_mask)
    n_q, n_kv = -(-q_len // block_q), -(-kv_len // block_kv)
    if bounds is not None:
        from flexcomp.evaluate import evaluate

        q_lo = torch.arange(n_q, dtype=torch.int32) * block_q
        env = {"b": torch.zeros((), dtype=torch.int32), "h": torch.zeros((), dtype=torch.int32), "q_lo": q_lo,
               "q_hi": torch.clamp(q_lo + block_q, max=q_len) - 1, "Q_LEN": torch.tensor(q_len, dtype=torch.int32),
               "KV_LEN": torch.tensor(kv_len, dtype=torch.int32)}
        try:
            lo, hi = (evaluate(root, env).clamp(0, kv_len).expand(n_q) for root in (bounds.kv_lo, bounds.kv_hi))
        except Exception:  # noqa: BLE001 -- e.g. bounds that read captured tensors: a heuristic, so assume dense
            return 1.0
        return float((hi - lo).clamp_min(0).sum()) / max(n_q * kv_len, 1)
    visited = block_mask.kv_num_blocks.sum()
    if block_mask.full_kv_num_blocks is not None:
        visited = visited + block_mask.full_kv_num_blocks.sum()
    rows = block_mask.kv_num_blocks.shape[0] * block_mask.kv_num_blocks.shape[1] * n_q
    return float(visited) / max(rows * n_kv, 1)


def prefetch_index(num_stages: int, num_warps: int, sparse_mask: bool, kernel_options: dict | None) -> bool:
    """Whether a table walk reads each tile's index one step ahead of the loads it addresses (ops.walk_step).

    Without it Triton 3.6 drains every copy in flight each step, so it pays where the pipeline has tiles ahead
    (3+ stages) and nothing else hides the loads: one 8-warp program fills an SM, and a dense mask's walks are
    long.  The 4-warp programs of a sparse mask share an SM, hide each other's loads, walk a few tiles each and
    lose residency to its registers: the D=64 dQ kernel of a document mask ran 13% slower with it on the H100,
    where the dense one ran 7% faster (benchmarks/NOTES_backward.md).
    `kernel_options={"PREFETCH_INDEX": bool}` forces it either way (A/B timing)."""
    wanted = (kernel_options or {}).get("PREFETCH_INDEX")
    if wanted is not None:
        return bool(wanted)
    return num_stages >= 3 and (num_warps >= 8 or not sparse_mask)


def refine_wanted(kernel_options: dict | None) -> bool:
    """Whether table walks use the block mask refined to the kernel's tiles (`REFINE_TILES`, default on; off for
    A/B timing)."""
    return bool((kernel_options or {}).get("REFINE_TILES", True))


def walked_tiles(by_tiles: dict[tuple[int, int], Any], tiles: tuple[int, int], block: tuple[int, int]) -> tuple[int, int]:
    """The tile of the tables a kernel at `tiles` walks: the block mask refined to them if a plan made that, else
    the block mask's own `block`."""
    return tiles if tiles in by_tiles else block
