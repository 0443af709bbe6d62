"""BlockMask: torch FlexAttention's block-sparse tables, built from the IR in O(tiles), not O(L^2).

`create_block_mask` classifies every (b, h, q block, kv block) tile EMPTY / PARTIAL / FULL:

1. closed form: masks whose per-row kv range is an affine or floor-affine function of q
   (causal, sliding window, prefix-LM, block-causal, offset causal, their intersections) get
   `bounds` (a `ClosedFormBounds`) and tables computed from them per q block, in O(q blocks);
2. document-style masks (`f(q) == g(kv)` with g sorted, and conjuncts that keep one kv interval per row,
   e.g. `DOC[q] == DOC[kv] & (q >= kv)`): exact tables from each row's kv interval, on the device
   (sparsity.equality.interval_tables; on a GPU one Triton launch, no host sync: whether the ids were
   sorted is a device flag, read by `decided_by` on first use);
3. otherwise interval/relational analysis of the IR, a band of q blocks at a time, with
   captured tensors summarized per block (`flexcomp.sparsity`);
4. tiles the analysis leaves PARTIAL are evaluated exactly on the device, in bounded-memory
   batches (sparsity.tiles.evaluate_tiles: the work is that of the undecided tiles alone), unless
   `exact=False`.  So by default every table is exact: an EMPTY tile is never listed and a FULL tile
   is always FULL, as in torch's create_block_mask.

Layout is torch's: kv_num_blocks [B, H, nq] int32 and kv_indices [B, H, nq, W] int32 (PARTIAL
tiles, ascending), full_kv_num_blocks / full_kv_indices (FULL tiles), and the q-major transposes
q_num_blocks / q_indices / full_q_num_blocks / full_q_indices.  B and H are 1 when the mask does
not read b / h.  W is the largest count in any row (torch pads to nkv; consumers read only the
first num_blocks entries of a row, so both layouts are valid).

Lazy: with closed-form bounds every table is materialized on first access, and the build issues no device
op: the forward kernel computes its loop ranges from the bounds and reads no table (`table_dims` and
`device` answer the shape checks), so a forward-only user never pays for them.  The counts, when read, are
built on the device from their cached symbolic form (sparsity.counts: causal is an arange and a full, no
copy, no sync); causal's full index table is inherently O(nq * nkv).  Otherwise the q-major tables are lazy.
"""

from __future__ import annotations

import copy
import functools
import itertools
from collections.abc import Callable
from typing import Any

import torch

from .ir import free_args
from .mods import Mod, specialized_mod
from .sparsity import closed_form_bounds
from .sparsity import counts as device_counts
from .sparsity.equality import candidate_ranges, interval_tables, ranges_to_tiles
from .sparsity.host import on_device, on_host
from .sparsity.row_bounds import row_bound_tables, row_bounds
from .sparsity.tables import (
    bounds_rows,
    classes_to_ordered,
    ordered_to_classes,
    rows_from_ranges,
    rows_to_ordered,
    tiles_to_ordered,
    transpose_ordered,
)
from .sparsity.tiles import Grid, analyze_rows, analyze_tiles, evaluate_tiles
from .tiles import ClosedFormBounds, TileClass, block_pair, block_size, table_dims

Tensor = torch.Tensor
DEFAULT_BLOCK = 128
ANALYSIS_TILES = 1 << 20  # tiles analyzed per band of q blocks: bounds the analysis' memory

_TABLES = ("kv_num_blocks", "kv_indices", "full_kv_num_blocks", "full_kv_indices",
           "q_num_blocks", "q_indices", "full_q_num_blocks", "full_q_indices")  # fmt: skip


class BlockMask:
    """torch's BlockMask fields and methods, plus `bounds`, `decided_by`, `explain()` and `tile_classes()`."""

    def __init__(self, seq_lengths: tuple[int, int], BLOCK_SIZE: int | tuple[int, int], mask_mod: Any,
                 tables: dict[str, Tensor | None], lazy: dict[str, Callable[[], Tensor]] | None = None,
                 bounds: ClosedFormBounds | None = None,
                 decided_by: dict[str, int] | Callable[[], dict[str, int]] | None = None,
                 table_dims: tuple[int, int, int] | None = None, device: torch.device | None = None):
        self.seq_lengths = (int(seq_lengths[0]), int(seq_lengths[1]))
        self._dims, self._device = table_dims, device  # what a lazy kv_num_blocks will be, without building it
        self.BLOCK_SIZE = block_pair(BLOCK_SIZE)
        self.mask_mod = mask_mod
        self.bounds = bounds
        self.decided_by = decided_by
        self._tables = dict(tables)
        self._lazy = dict(lazy or {})
        self.version = 0  # bumped when a table is replaced
        self.built_for: tuple[int, int] | None = None  # (B, H) create_block_mask was asked for, where the tables
        # broadcast (size 1) a dim the mask does not read; `shape` reports them, as torch's BlockMask does

    def _get(self, name: str) -> Tensor | None:
        if name not in self._tables and name in self._lazy:
            self._tables[name] = self._lazy.pop(name)()
        return self._tables.get(name)

    def _set(self, name: str, value: Tensor | None) -> None:
        self._lazy.pop(name, None)
        self._tables[name] = value
        self.version += 1  # call plans (codegen/plans.py) key on it: a replaced table is not served stale
        self.bounds = None  # the closed form described the tables it came with: the kernel now walks the tables

    @property
    def decided_by(self) -> dict[str, int]:
        """How many tiles each method decided; a function until first read where that rests on a device flag
        (document masks on the GPU: whether the ids were sorted), so that the build needs no host sync."""
        if callable(self._decided_by):
            self._decided_by = self._decided_by()
        return self._decided_by

    @decided_by.setter
    def decided_by(self, value: dict[str, int] | Callable[[], dict[str, int]] | None) -> None:
        self._decided_by = value if callable(value) else dict(value or {})

    kv_num_blocks = property(lambda self: self._get("kv_num_blocks"), lambda self, v: self._set("kv_num_blocks", v))
    kv_indices = property(lambda self: self._get("kv_indices"), lambda self, v: self._set("kv_indices", v))
    full_kv_num_blocks = property(lambda self: self._get("full_kv_num_blocks"),
                                  lambda self, v: self._set("full_kv_num_blocks", v))
    full_kv_indices = property(lambda self: self._get("full_kv_indices"),
                               lambda self, v: self._set("full_kv_indices", v))
    q_num_blocks = property(lambda self: self._get("q_num_blocks"), lambda self, v: self._set("q_num_blocks", v))
    q_indices = property(lambda self: self._get("q_indices"), lambda self, v: self._set("q_indices", v))
    full_q_num_blocks = property(lambda self: self._get("full_q_num_blocks"),
                                 lambda self, v: self._set("full_q_num_blocks", v))
    full_q_indices = property(lambda self: self._get("full_q_indices"), lambda self, v: self._set("full_q_indices", v))

    # ------------------------------------------------------------ construction

    @classmethod
    def from_kv_blocks(cls, kv_num_blocks: Tensor, kv_indices: Tensor, full_kv_num_blocks: Tensor | None = None,
                       full_kv_indices: Tensor | None = None, BLOCK_SIZE: int | tuple[int, int] = DEFAULT_BLOCK,
                       mask_mod: Any = None, seq_lengths: tuple[int, int] | None = None,
                       compute_q_blocks: bool = True) -> BlockMask:
        """A BlockMask from hand-built kv tables (as torch's): the q-major tables are derived lazily."""
        if kv_indices.dim() < 2:
            raise ValueError(f"kv_indices must have at least 2 dims, got {tuple(kv_indices.shape)=}")
        if (full_kv_num_blocks is None) != (full_kv_indices is None):
            raise ValueError("full_kv_num_blocks and full_kv_indices must be both given or both omitted")
        block = block_pair(BLOCK_SIZE)
        if seq_lengths is None:
            seq_lengths = (kv_indices.shape[-2] * block[0], kv_indices.shape[-1] * block[1])
        if mask_mod is None:
            from .mods import noop_mask

            mask_mod = noop_mask
        tables: dict[str, Tensor | None] = {"kv_num_blocks": kv_num_blocks, "kv_indices": kv_indices,
                                            "full_kv_num_blocks": full_kv_num_blocks, "full_kv_indices": full_kv_indices}
        mask = cls(seq_lengths, block, mask_mod, tables)
        nkv = -(-mask.seq_lengths[1] // block[1])
        if compute_q_blocks:  # one transpose per kind, shared by its counts and indices
            kv_tables = {"": (kv_num_blocks, kv_indices), "full_": (full_kv_num_blocks, full_kv_indices)}
            memo: dict[str, tuple[Tensor, Tensor]] = {}  # (functools.cache's wrapper costs more than this build)

            def transposed(kind: str) -> tuple[Tensor, Tensor]:
                if kind not in memo:
                    memo[kind] = transpose_ordered(*kv_tables[kind], nkv)
                return memo[kind]

            for kind, (num, _) in kv_tables.items():
                names = (f"{kind}q_num_blocks", f"{kind}q_indices")
                if num is None:
                    mask._tables.update(dict.fromkeys(names))
                    continue
                for part, name in enumerate(names):
                    mask._lazy[name] = lambda kind=kind, part=part: transposed(kind)[part]
        else:
            mask._tables.update({name: None for name in _TABLES[4:]})
        return mask

    # ------------------------------------------------------------ views

    def with_paged(self, view: Any) -> BlockMask:
        """This mask over a paged cache's logical positions (`view`: a flexcomp.paging.PagedView): the same tiles
        and bounds, tables shared; the kernels read K/V through the view's page table."""
        twin = copy.copy(self)
        twin.paged = view
        return twin

    @property
    def num_blocks(self) -> tuple[int, int]:
        """(q blocks, kv blocks) of the tiling."""
        return (-(-self.seq_lengths[0] // self.BLOCK_SIZE[0]), -(-self.seq_lengths[1] // self.BLOCK_SIZE[1]))

    @property
    def table_dims(self) -> tuple[int, int, int]:
        """kv_num_blocks' shape (B|1, H|1, q blocks), read without building a lazy table."""
        if self._dims is None or self._tables.get("kv_num_blocks") is not None:
            return tuple(self.kv_num_blocks.shape)
        return self._dims

    @property
    def device(self) -> torch.device:
        """The tables' device, read without building a lazy table."""
        if self._device is None or self._tables.get("kv_num_blocks") is not None:
            return self.kv_num_blocks.device
        return self._device

    @property
    def shape(self) -> tuple[int, ...]:
        """torch's (B, H, Q_LEN, KV_LEN): the batch and heads the mask was made for (its tables may hold 1 of a dim
        the mask does not read: `table_dims`)."""
        return (self.built_for or self.table_dims[:2]) + self.seq_lengths

    def tile_classes(self) -> Tensor:
        """uint8 TileClass map [B|1, H|1, nq, nkv] (O(tiles): for inspection and tests)."""
        nq, nkv = self.num_blocks
        return ordered_to_classes(self.kv_num_blocks, self.kv_indices, self.full_kv_num_blocks,
                                  self.full_kv_indices, nkv)[..., :nq, :]

    def to_dense(self) -> Tensor:
        """int32 [B, H, nq, nkv]: 1 where the kernel visits the tile (PARTIAL or FULL), as torch's."""
        return (self.tile_classes() != TileClass.EMPTY).to(torch.int32)

    def numel(self) -> int:
        out = 1
        for n in self.shape:
            out *= n
        return out

    def sparsity(self) -> float:
        """Percent of the attention matrix in skipped tiles (torch's formula)."""
        computed = int(self.kv_num_blocks.sum().item())
        if self.full_kv_num_blocks is not None:
            computed += int(self.full_kv_num_blocks.sum().item())
        return 100 * (1 - computed * self.BLOCK_SIZE[0] * self.BLOCK_SIZE[1] / self.numel())

    def to_string(self, grid_size: int | tuple[int, int] = (20, 20), limit: int = 4) -> str:
        """torch's text picture: one character pair per group of tiles (█ all visited, ░ some, ' ' none)."""
        dense = self.to_dense()
        *batch_dims, rows, cols = dense.shape
        if grid_size == -1:
            max_rows, max_cols = rows, cols
        else:
            max_rows, max_cols = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
        row_step, col_step = max(1, -(-rows // max_rows)), max(1, -(-cols // max_cols))
        chars = {1.0: "█", 0.0: " "}
        pictures = []
        for count, batch_idx in enumerate(itertools.product(*[range(n) for n in batch_dims])):
            if count == limit:
                pictures += ["...", "To print out more, set BlockMask.to_string(limit=N)",
                             "You can also index (BlockMask[batch, head]) to choose a specific batch or head"]
                break
            grid = dense[batch_idx].float()
            lines = [f"{batch_idx}"]
            for r in range(0, rows, row_step):
                line = ""
                for c in range(0, cols, col_step):
                    line += chars.get(grid[r:r + row_step, c:c + col_step].mean().item(), "░") * 2
                lines.append(line)
            pictures.append("\n".join(lines) + "\n")
        return "\n".join(pictures)

    def explain(self) -> str:
        """How the tiles were decided, e.g. 'closed form: 36 tiles; analysis: 0; evaluation: 0'."""
        parts = [f"{how}: {n} tiles" for how, n in self.decided_by.items()]
        bounds = "none" if self.bounds is None else (
            f"kv in [{_expr(self.bounds.kv_lo)}, {_expr(self.bounds.kv_hi)}), "
            f"full in [{_expr(self.bounds.full_lo)}, {_expr(self.bounds.full_hi)})")
        return f"BlockMask {self.shape}, BLOCK_SIZE={self.BLOCK_SIZE}: " + "; ".join(parts) + f"\nbounds: {bounds}"

    def __getitem__(self, index: Any) -> BlockMask:
        """Index the batch/head/q-block dims of every table (ints keep their dim, as torch's)."""
        if torch.compiler.is_compiling():  # a decode step slicing the full mask (gpt-fast): lazy tables built first
            _tables_built(self)
        index = index if isinstance(index, tuple) else (index,)
        padded = (*index, slice(None), slice(None), slice(None))[:3]
        sizes = self.kv_num_blocks.shape[:3]
        index = tuple((slice(i % n, i % n + 1) if isinstance(i, int) else i) for i, n in zip(padded, sizes))
        pick = lambda t: None if t is None else t[index]
        sliced = BlockMask.from_kv_blocks(pick(self.kv_num_blocks), pick(self.kv_indices),
                                          pick(self.full_kv_num_blocks), pick(self.full_kv_indices),
                                          BLOCK_SIZE=self.BLOCK_SIZE, mask_mod=self.mask_mod,
                                          seq_lengths=self.seq_lengths, compute_q_blocks=True)
        if self.built_for is not None:  # the dims torch's tables would have, indexed as they would be
            whole = (*self.built_for, sizes[2])
            dims = [(slice(i % n, i % n + 1) if isinstance(i, int) else i) for i, n in zip(padded, whole)]
            sliced.built_for = tuple(torch.empty(whole, device="meta")[tuple(dims)].shape[:2])
        return sliced

    def to(self, device: torch.device | str) -> BlockMask:
        tables = {name: (None if t is None else t.to(device)) for name in _TABLES for t in [getattr(self, name)]}
        moved = BlockMask(self.seq_lengths, self.BLOCK_SIZE, self.mask_mod, tables, bounds=self.bounds,
                          decided_by=self.decided_by)
        moved.built_for = self.built_for
        return moved

    def __str__(self) -> str:
        return f"BlockMask(shape={self.shape}, sparsity={self.sparsity():.2f}%, \n{self.to_string().strip()}\n)"

    def __repr__(self) -> str:
        shapes = {name: (None if name in self._lazy else _shape(self._tables.get(name))) for name in _TABLES[:4]}
        name = getattr(self.mask_mod, "name", getattr(self.mask_mod, "__name__", self.mask_mod))
        return (f"BlockMask(shape={self.shape}, BLOCK_SIZE={self.BLOCK_SIZE}, "
                + ", ".join(f"{k}={v if v is not None else 'lazy'}" for k, v in shapes.items())
                + f", sparsity={self.sparsity():.2f}%, mask_mod={name}, decided_by={self.decided_by})")


def _shape(t: Tensor | None) -> tuple[int, ...] | None:
    return None if t is None else tuple(t.shape)


def _expr(node: Any) -> str:
    from .ir import to_expr

    return to_expr(node)


# ---------------------------------------------------------------- building


def _block_sizes(BLOCK_SIZE: int | tuple[int, int]) -> tuple[int, int]:
    """`block_pair`, for the user's argument: checked."""
    if isinstance(BLOCK_SIZE, int) or len(BLOCK_SIZE) == 2:
        block = block_pair(BLOCK_SIZE)
        if min(block) >= 1:
            return block
    raise ValueError(f"BLOCK_SIZE must be a positive int or a (Q, KV) pair, got {BLOCK_SIZE=}")


@torch._dynamo.assume_constant_result
def _tables_built(block_mask: BlockMask) -> int:
    """Build a block mask's lazy kv tables now, while torch.compile traces (outside the graph: their build has
    data-dependent sizes); the traced code then reads them as the graph's inputs."""
    for name in _TABLES[:4]:
        block_mask._get(name)
    return block_mask.version


def _indexed(device: torch.device) -> torch.device:
    """"cuda" as the device its tensors land on ("cuda:0"): a lazy BlockMask reports its device before any exists."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def create_block_mask(mask_mod: Any, B: int | None, H: int | None, Q_LEN: int, KV_LEN: int, device: Any = None,
                      BLOCK_SIZE: int | tuple[int, int] = DEFAULT_BLOCK, *, exact: bool = True) -> BlockMask:
    """torch's create_block_mask, from the mask's IR: O(tiles) time and memory (see the module docstring).

    B / H of None give batch / head dims of size 1; a mask that does not read b / h keeps tables of size 1 there
    (broadcast), while `shape` says (B, H, ...) as torch's.
    The tiles the analysis cannot decide are evaluated element by element (bounded memory, on `device`), so the
    tables are exact; `exact=False` leaves them PARTIAL instead (sound, cheaper to build, more tiles visited).
    """
    if torch.compiler.is_compiling():  # a description the op builds at each length (flexcomp/custom_op.py)
        from .custom_op import traced_block_mask

        return traced_block_mask(mask_mod, B, H, Q_LEN, KV_LEN, device, BLOCK_SIZE, exact)
    return eager_block_mask(mask_mod, B, H, Q_LEN, KV_LEN, device, BLOCK_SIZE, exact=exact)


def eager_block_mask(mask_mod: Any, B: int | None, H: int | None, Q_LEN: int, KV_LEN: int, device: Any = None,
                     BLOCK_SIZE: int | tuple[int, int] = DEFAULT_BLOCK, *, exact: bool = True) -> BlockMask:
    """create_block_mask, built now (also while torch.compile traces)."""
    if Q_LEN < 1 or KV_LEN < 1:
        raise ValueError(f"sequence lengths must be positive, got {Q_LEN=} {KV_LEN=}")
    mod = specialized_mod(mask_mod, "mask")
    device = _indexed(torch.device(device) if device is not None else _default_device())
    block_mask = _build(mod, B, H, Q_LEN, KV_LEN, device, _block_sizes(BLOCK_SIZE), evaluate=exact)
    block_mask.built_for = (B or 1, H or 1)
    return block_mask


def _build(mod: Mod, B: int | None, H: int | None, Q_LEN: int, KV_LEN: int, device: torch.device,
           block: tuple[int, int], evaluate: bool) -> BlockMask:
    """create_block_mask's work; `evaluate`: whether the tiles the analysis leaves undecided are evaluated."""
    q_block, kv_block = block
    used = _free_args(mod.ir)
    grid = Grid(B=(B or 1) if "b" in used else 1, H=(H or 1) if "h" in used else 1, q_len=Q_LEN, kv_len=KV_LEN,
                q_block=q_block, kv_block=kv_block)
    bounds = closed_form_bounds(mod)
    if bounds is not None and not ({"b", "h"} & used):
        return _from_bounds(mod, bounds, grid, device)
    return _from_analysis(mod, grid, device, evaluate, bounds)


@functools.lru_cache(maxsize=256)
def _free_args(ir: Any) -> frozenset[str]:
    return free_args(ir)  # an IR walk: once per IR, not per call (the hash of a Node is cached)


def _from_bounds(mod: Mod, bounds: ClosedFormBounds, grid: Grid, device: torch.device) -> BlockMask:
    """Tables from the closed-form kv ranges: the counts now, built on `device` from the bounds' symbolic
    form (sparsity.counts: an arange or two, no copy, no sync); the index tables on first access."""
    # [nq] kv-block ranges on the host: partial [a, f0) + [f1, c), full [f0, f1); only for the index tables
    ranges = lambda: bounds_rows(bounds, grid, mod.tensors())
    values = device_counts.symbolic_counts(bounds, grid.q_len, grid.kv_len, grid.q_block, grid.kv_block)
    counts = None if values is None else lambda: device_counts.build(values, grid.num_q_blocks, device)
    lazy = rows_from_ranges(ranges, grid, device, counts)
    decided = {"closed form": grid.num_q_blocks * grid.num_kv_blocks}
    return BlockMask((grid.q_len, grid.kv_len), (grid.q_block, grid.kv_block), mod, {}, lazy, bounds, decided,
                     table_dims=(1, 1, grid.num_q_blocks), device=device)


def _from_analysis(mod: Mod, grid: Grid, device: torch.device, evaluate: bool,
                   bounds: ClosedFormBounds | None) -> BlockMask:
    """Exact per-row intervals of a document-style mask on the device, or dense bands of q blocks through the
    analysis, or only the candidate tiles of a document-style mask."""
    tensors = mod.tensors()
    tables = interval_tables(mod.ir, tensors, grid, device, sync_free=device.type != "cpu", kernel=_table_kernel)
    if tables is not None:
        *tables, unsorted = tables
        return _finish(mod, grid, tables, bounds, _interval_report(grid.num_q_blocks * grid.num_kv_blocks, unsorted))
    host = on_host(tensors)  # the analysis reads the captured tensors on the host: one device read for all
    rows = row_bounds(mod.ir)
    if rows is not None:  # each row one kv interval: its ends evaluated row by row, no tile analysis
        tables = on_device(list(row_bound_tables(rows, host, grid)), device)
        return _finish(mod, grid, tables, bounds, {"row bounds": grid.B * grid.H * grid.num_q_blocks * grid.num_kv_blocks})
    ranges = candidate_ranges(mod.ir, host, grid)
    if ranges is not None:
        return _from_candidates(mod, grid, device, evaluate, bounds, ranges, host)
    nq, nkv = grid.num_q_blocks, grid.num_kv_blocks
    band = max(1, ANALYSIS_TILES // max(1, grid.B * grid.H * nkv))
    bands = [(q0, min(nq, q0 + band)) for q0 in range(0, nq, band)]
    classes = [analyze_rows(mod.ir, host, grid, q0, q1) for q0, q1 in bands]
    undecided = sum(int((c == TileClass.PARTIAL).sum().item()) for c in classes)
    counts = _report(mod, grid, evaluate, undecided, skipped=0)
    partial_rows, full_rows = [], []
    for (q0, _), cls in zip(bands, classes):
        if evaluate and undecided:
            tiles = (cls == TileClass.PARTIAL).nonzero()
            if tiles.numel():
                cls[tuple(tiles.T)] = evaluate_tiles(mod.ir, tensors, grid, q0, tiles, device)
        partial_rows.append(cls == TileClass.PARTIAL)
        full_rows.append(cls == TileClass.FULL)
    tables = rows_to_ordered(partial_rows, full_rows, device)
    return _finish(mod, grid, tables, bounds, counts)


def _table_kernel(*args: Any) -> tuple[Tensor, ...]:
    """codegen.interval_kernel.launch (Triton, imported when a GPU build first needs it)."""
    from .codegen import interval_kernel

    return interval_kernel.launch(*args)


def _from_candidates(mod: Mod, grid: Grid, device: torch.device, evaluate: bool, bounds: ClosedFormBounds | None,
                     ranges: tuple[Tensor, Tensor], host: dict[str, Tensor]) -> BlockMask:
    """`f(q) == g(kv) & ...` with g monotone: tiles outside each row's kv range are EMPTY (sparsity.equality).
    `host`: the captured tensors on the host, for the analysis."""
    tensors = mod.tensors()
    rows, cols = ranges_to_tiles(*ranges)
    cls = analyze_tiles(mod.ir, host, grid, rows, cols)  # [B, H, T]
    skipped = grid.B * grid.H * (grid.num_q_blocks * grid.num_kv_blocks - rows.numel())
    undecided = int((cls == TileClass.PARTIAL).sum().item())
    counts = _report(mod, grid, evaluate, undecided, skipped)
    if evaluate and undecided:
        b, h, t = (cls == TileClass.PARTIAL).nonzero(as_tuple=True)
        tiles = torch.stack([b, h, rows[t], cols[t]], 1)
        cls[b, h, t] = evaluate_tiles(mod.ir, tensors, grid, 0, tiles, device)
    partial = tiles_to_ordered(rows, cols, cls == TileClass.PARTIAL, grid.num_q_blocks)
    full = tiles_to_ordered(rows, cols, cls == TileClass.FULL, grid.num_q_blocks)
    tables = tuple(t.to(device) for t in (*partial, *full))
    return _finish(mod, grid, tables, bounds, counts)


UNSORTED_IDS = "undecided (PARTIAL, not evaluated: the equality's kv side is not sorted)"


def _interval_report(tiles: int, unsorted: Tensor | None) -> dict[str, int] | Callable[[], dict[str, int]]:
    """decided_by of exact interval tables; where sortedness is a device flag (no sync in the build), a function
    that reads it: an unsorted kv side made every tile PARTIAL (right, not exact)."""
    if unsorted is None:
        return {"equality intervals": tiles}
    return lambda: {UNSORTED_IDS if bool(unsorted) else "equality intervals": tiles}


def _report(mod: Mod, grid: Grid, evaluate: bool, undecided: int, skipped: int) -> dict[str, int]:
    """decided_by: the tiles each method decided (`skipped`: by the equality ranges; `undecided`: left to evaluation)."""
    total = grid.B * grid.H * grid.num_q_blocks * grid.num_kv_blocks
    how = "summary" if mod.buffers else "analysis"
    counts = {"equality ranges": skipped, how: total - skipped - undecided,
              "evaluation" if evaluate else "undecided (PARTIAL, not evaluated)": undecided}
    return {k: v for k, v in counts.items() if v or k == how}


def _finish(mod: Mod, grid: Grid, tables: tuple[Tensor, ...], bounds: ClosedFormBounds | None,
            counts: dict[str, int] | Callable[[], dict[str, int]]) -> BlockMask:
    mask = BlockMask.from_kv_blocks(*tables, BLOCK_SIZE=(grid.q_block, grid.kv_block), mask_mod=mod,
                                    seq_lengths=(grid.q_len, grid.kv_len))
    mask.bounds, mask.decided_by = bounds, counts  # counts: a dict, or a function read on first use
    return mask


REFINE_MAX_TILES = 1 << 24  # tiles of the finer grid (B x H x rows x cols) past which no block mask is refined


def refine_block_mask(block_mask: Any, tiles: tuple[int, int], batch: int, heads: int) -> BlockMask | None:
    """`block_mask` at a kernel's smaller (q, kv) tiles, with the same meaning, or None where that does not apply.

    A FULL block's sub-tiles stay FULL and an unlisted block's stay unlisted; a PARTIAL block's are classified
    from its mask_mod by the analysis alone (never evaluated): EMPTY ones leave the kernel's loops, FULL ones
    skip the mask, the rest stay PARTIAL.  This is torch's meaning (the mask applies in PARTIAL blocks only)
    whoever built the tables.  None when the tiles do not divide the blocks, the mask_mod is not a Mod, or the
    finer grid has over REFINE_MAX_TILES tiles (`batch` / `heads`: the call's, for a mask that reads b / h)."""
    block = block_size(block_mask)
    mod = block_mask.mask_mod
    if block == tiles or block[0] % tiles[0] or block[1] % tiles[1] or not isinstance(mod, Mod):
        return None
    q_len, kv_len = block_mask.seq_lengths
    used = _free_args(mod.ir)
    B, H = (batch if "b" in used else 1), (heads if "h" in used else 1)
    nb, nh, _ = table_dims(block_mask)
    fine = -(-q_len // tiles[0]), -(-kv_len // tiles[1])
    if max(nb, B) * max(nh, H) * fine[0] * fine[1] > REFINE_MAX_TILES:
        return None
    coarse = ordered_to_classes(block_mask.kv_num_blocks, block_mask.kv_indices, block_mask.full_kv_num_blocks,
                                block_mask.full_kv_indices, -(-kv_len // block[1]))[..., :-(-q_len // block[0]), :]
    inherited = (coarse.repeat_interleave(block[0] // tiles[0], -2)
                 .repeat_interleave(block[1] // tiles[1], -1)[..., :fine[0], :fine[1]])
    device = inherited.device
    own = _build(mod, B, H, q_len, kv_len, device, tiles, evaluate=False).tile_classes()
    classes = torch.where(inherited == TileClass.PARTIAL, own, inherited)
    return BlockMask.from_kv_blocks(*classes_to_ordered(classes), BLOCK_SIZE=tiles, mask_mod=mod,
                                    seq_lengths=(q_len, kv_len))


def create_mask(mask_mod: Any, B: int | None, H: int | None, Q_LEN: int, KV_LEN: int, device: Any = None) -> Tensor:
    """The dense bool mask [B, H, Q_LEN, KV_LEN] (O(L^2): for small sizes and tests, as torch's)."""
    from .evaluate import evaluate, index_grid

    mod = specialized_mod(mask_mod, "mask")
    device = torch.device(device) if device is not None else _default_device()
    B, H = B or 1, H or 1
    env = index_grid(B, H, Q_LEN, KV_LEN, device)
    tensors = {k: v.to(device) for k, v in mod.tensors().items()}
    return evaluate(mod.ir, env, tensors).expand(B, H, Q_LEN, KV_LEN).contiguous()
