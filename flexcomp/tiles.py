"""The records the sparsity analysis hands to codegen.  Nothing here knows of Triton.

Tiles are (b, h, q-block, kv-block) rectangles of the attention matrix.  A tile
is EMPTY when the mask is false on every in-range element (the kernel never
visits it), FULL when it is true on every in-range element (the kernel skips
mask_mod there), PARTIAL otherwise.  Elements past Q_LEN or KV_LEN do not count:
the kernel bounds-checks the last tile of each row and column whatever its class.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from .ir import Node


class TileClass(enum.IntEnum):
    EMPTY = 0
    PARTIAL = 1
    FULL = 2


@dataclass(frozen=True)
class ClosedFormBounds:
    """Per-tile kv ranges as IR expressions, so a kernel can compute its own loop bounds.

    The expressions are i32 IR over the ARGs `q_lo` and `q_hi` (the first and last
    q index of a tile, inclusive), `b`, `h`, `Q_LEN` and `KV_LEN`, and may read the
    mod's captured tensors.  For every q in [q_lo, q_hi]:

    * the mask is false for every kv outside [kv_lo, kv_hi);
    * the mask is true for every kv in [full_lo, full_hi) (intersected with [0, KV_LEN)).

    (Today's producer, flexcomp.sparsity.closed_form, derives bounds only for masks
    without captured tensors, over q_lo, q_hi and KV_LEN; codegen accepts the
    wider form.)  Either range may be empty (lo >= hi).  Neither is clamped to [0, KV_LEN]: the
    consumer clamps.  Both are exact for the masks they are offered for (causal,
    sliding window, prefix-LM, block-causal, offset causal...): no tighter range holds.
    """

    kv_lo: Node
    kv_hi: Node
    full_lo: Node
    full_hi: Node


def block_size(block_mask: Any) -> tuple[int, int]:
    """A block mask's (q, kv) tile size; its BLOCK_SIZE may be one int for both axes or a (q, kv) pair."""
    return block_pair(block_mask.BLOCK_SIZE)


def table_dims(block_mask: Any) -> tuple[int, int, int]:
    """(B|1, H|1, q blocks) of a block mask's kv tables; flexcomp's answers without building a lazy table."""
    dims = getattr(block_mask, "table_dims", None)
    return tuple(dims) if dims is not None else tuple(block_mask.kv_num_blocks.shape[:3])


def table_device(block_mask: Any) -> Any:
    """The device of a block mask's tables; flexcomp's answers without building a lazy table."""
    device = getattr(block_mask, "device", None)
    return device if device is not None else block_mask.kv_num_blocks.device


def block_pair(size: int | tuple[int, int]) -> tuple[int, int]:
    """(q, kv) from one int for both axes or a (q, kv) pair."""
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
