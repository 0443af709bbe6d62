"""Tile classification of a row band of q blocks: analysis first, evaluation of what it leaves undecided."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ..ir import Node
from ..tiles import TileClass
from .host import on_host
from .intervals import Analyzer

Tensor = torch.Tensor
EVAL_ELEMENTS = 1 << 22  # mask elements evaluated per batch of tiles: bounds the exact fallback's memory
SAMPLE_POINTS = 8  # rows (and columns) of a tile the exact fallback's first pass evaluates


@dataclass(frozen=True)
class Grid:
    """The tiling: batch/head extents actually analyzed (1 when the mask ignores b / h) and block sizes."""

    B: int
    H: int
    q_len: int
    kv_len: int
    q_block: int
    kv_block: int

    @property
    def num_q_blocks(self) -> int:
        return -(-self.q_len // self.q_block)

    @property
    def num_kv_blocks(self) -> int:
        return -(-self.kv_len // self.kv_block)

    def ranges(self, q0: int, q1: int, device: torch.device | str = "cpu") -> dict[str, tuple[Tensor, Tensor]]:
        """Per-tile [lo, hi] of every ARG over q blocks [q0, q1) (in-range elements only)."""
        qb = torch.arange(q0, q1, dtype=torch.int64, device=device)
        kb = torch.arange(self.num_kv_blocks, dtype=torch.int64, device=device)
        q_lo, q_hi = qb * self.q_block, torch.clamp((qb + 1) * self.q_block, max=self.q_len) - 1
        k_lo, k_hi = kb * self.kv_block, torch.clamp((kb + 1) * self.kv_block, max=self.kv_len) - 1
        b = torch.arange(self.B, dtype=torch.int64, device=device).view(-1, 1, 1, 1)
        h = torch.arange(self.H, dtype=torch.int64, device=device).view(1, -1, 1, 1)
        return {"b": (b, b), "h": (h, h), "q_idx": (q_lo.view(1, 1, -1, 1), q_hi.view(1, 1, -1, 1)),
                "kv_idx": (k_lo.view(1, 1, 1, -1), k_hi.view(1, 1, 1, -1))}

    def tile_ranges(self, q_blocks: Tensor, kv_blocks: Tensor) -> dict[str, tuple[Tensor, Tensor]]:
        """Per-tile [lo, hi] of every ARG for a list of tiles: q and kv both run along grid axis 2."""
        q_lo = q_blocks * self.q_block
        q_hi = torch.clamp((q_blocks + 1) * self.q_block, max=self.q_len) - 1
        k_lo = kv_blocks * self.kv_block
        k_hi = torch.clamp((kv_blocks + 1) * self.kv_block, max=self.kv_len) - 1
        b = torch.arange(self.B, dtype=torch.int64).view(-1, 1, 1, 1)
        h = torch.arange(self.H, dtype=torch.int64).view(1, -1, 1, 1)
        view = lambda t: t.view(1, 1, -1, 1)
        return {"b": (b, b), "h": (h, h), "q_idx": (view(q_lo), view(q_hi)), "kv_idx": (view(k_lo), view(k_hi))}


def analyze_rows(ir: Node, tensors: dict[str, Tensor], grid: Grid, q0: int, q1: int) -> Tensor:
    """uint8 TileClass [B, H, q1-q0, nkv] proven by interval/relational analysis (PARTIAL = undecided)."""
    tensors = on_host(tensors)
    can_true, can_false = Analyzer(grid.ranges(q0, q1), tensors).truth(ir)
    shape = (grid.B, grid.H, q1 - q0, grid.num_kv_blocks)
    can_true, can_false = can_true.expand(shape), can_false.expand(shape)
    out = torch.full(shape, int(TileClass.PARTIAL), dtype=torch.uint8)
    out[~can_true] = int(TileClass.EMPTY)
    out[~can_false & can_true] = int(TileClass.FULL)
    return out


def analyze_tiles(ir: Node, tensors: dict[str, Tensor], grid: Grid, q_blocks: Tensor, kv_blocks: Tensor,
                  chunk: int = 1 << 18) -> Tensor:
    """uint8 TileClass [B, H, T] of the listed tiles (int64 [T] q and kv block numbers), by the same analysis."""
    tensors = on_host(tensors)
    out = torch.empty(grid.B, grid.H, q_blocks.numel(), dtype=torch.uint8)
    step = max(1, chunk // (grid.B * grid.H))
    for start in range(0, q_blocks.numel(), step):
        qb, kb = q_blocks[start:start + step], kv_blocks[start:start + step]
        can_true, can_false = Analyzer(grid.tile_ranges(qb, kb), tensors).truth(ir)
        shape = (grid.B, grid.H, qb.numel(), 1)
        can_true, can_false = can_true.expand(shape)[..., 0], can_false.expand(shape)[..., 0]
        cls = torch.full(can_true.shape, int(TileClass.PARTIAL), dtype=torch.uint8)
        cls[~can_true] = int(TileClass.EMPTY)
        cls[~can_false & can_true] = int(TileClass.FULL)
        out[..., start:start + qb.numel()] = cls
    return out


def evaluate_tiles(ir: Node, tensors: dict[str, Tensor], grid: Grid, q0: int, tiles: Tensor,
                   device: torch.device | str) -> Tensor:
    """Exact classes of the listed tiles ([T, 4] rows of (b, h, q block - q0, kv block)), by evaluating the mask.

    Two passes: a sample of each tile (SAMPLE_POINTS rows by SAMPLE_POINTS columns, corners included) proves most
    undecided tiles PARTIAL, as they straddle an edge of the mask, for a few dozen elements each; only the tiles
    whose sample agrees everywhere (EMPTY or FULL ones, or an edge the sample missed) are evaluated in full."""
    tensors = {k: v.to(device) for k, v in tensors.items()}
    device = torch.device(device)
    out = _classes(ir, tensors, grid, q0, tiles, device, _sample(grid.q_block, device), _sample(grid.kv_block, device))
    rest = (out != TileClass.PARTIAL).nonzero()[:, 0]  # a mixed sample is a mixed tile: PARTIAL, decided
    if rest.numel():
        everything = _every(grid.q_block, device), _every(grid.kv_block, device)
        out[rest] = _classes(ir, tensors, grid, q0, tiles[rest], device, *everything)
    return out


@functools.lru_cache(maxsize=64)
def _sample(block: int, device: torch.device) -> Tensor:
    """SAMPLE_POINTS offsets spread over [0, block), first and last included (all of them in a small block); kept
    per device (a copy to a GPU waits for it), read only."""
    return torch.linspace(0, block - 1, min(block, SAMPLE_POINTS)).round().long().unique().to(device)


@functools.lru_cache(maxsize=64)
def _every(block: int, device: torch.device) -> Tensor:
    return torch.arange(block, device=device)  # made there: no copy


def _classes(ir: Node, tensors: dict[str, Tensor], grid: Grid, q0: int, tiles: Tensor, device: torch.device | str,
             q_offsets: Tensor, kv_offsets: Tensor) -> Tensor:
    """uint8 [T]: the class of the listed tiles' elements at (q_offsets x kv_offsets) within each tile, evaluated
    EVAL_ELEMENTS at a time.  An index past Q_LEN or KV_LEN is clamped to the last one, whose row or column lies in
    the same (last) tile: a repeat, which changes neither "some true" nor "some false", so no validity mask."""
    from ..evaluate import evaluate

    out = torch.empty(tiles.shape[0], dtype=torch.uint8)
    q_offsets, kv_offsets = q_offsets.to(device), kv_offsets.to(device)
    per_batch = max(1, EVAL_ELEMENTS // (q_offsets.numel() * kv_offsets.numel()))
    for start in range(0, tiles.shape[0], per_batch):
        t = tiles[start:start + per_batch].to(device)
        q = ((t[:, 2:3] + q0) * grid.q_block + q_offsets).clamp_(max=grid.q_len - 1)  # [T, rows]
        kv = (t[:, 3:4] * grid.kv_block + kv_offsets).clamp_(max=grid.kv_len - 1)  # [T, cols]
        env = {"b": t[:, 0].view(-1, 1, 1).int(), "h": t[:, 1].view(-1, 1, 1).int(),
               "q_idx": q[:, :, None].int(), "kv_idx": kv[:, None, :].int()}
        mask = evaluate(ir, env, tensors).expand(t.shape[0], q.shape[1], kv.shape[1]).reshape(t.shape[0], -1)
        some_true, all_true = mask.any(1), mask.all(1)
        cls = torch.where(all_true, int(TileClass.FULL), torch.where(some_true, int(TileClass.PARTIAL),
                                                                       int(TileClass.EMPTY)))
        out[start:start + t.shape[0]] = cls.to(torch.uint8).cpu()
    return out
