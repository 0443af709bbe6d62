"""A paged KV cache with torch's PagedAttention API (vLLM's PagedAttention, Kwon et al. 2023, on FlexAttention).

K/V of every request live in one shared cache [1, H, n_pages * page_size, D], cut into pages handed out from a
free list.  `convert_logical_block_mask` rewrites a block mask's kv_indices from logical tiles to the physical
tiles holding them, so the kernels read K/V through the page table with no gather; the converted mods map a
physical kv position back to its logical one through the captured `physical_to_logical` table, so user mods see
logical positions.  A position in an unassigned page is masked.  Same semantics as
`torch.nn.attention.experimental._paged_attention.PagedAttention`; the code is flexcomp's own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .sparsity.tables import columns, listed_first

UNASSIGNED = -1


@dataclass(frozen=True)
class PagedView:
    """How the Triton kernels read a paged cache directly: logical kv positions through each request's page
    table row, the logical block mask's tiles walked (closed-form bounds and FULL tiles kept), the mods
    unconverted.  Made by `convert_logical_block_mask`; the kernels' `PAGE_SIZE` (codegen/params.py PAGED_KV)."""

    page_rows: Tensor  # int32 [B, n_pages]: request b's logical page -> physical page (UNASSIGNED past its pages)
    lengths: Tensor  # int32 [B]: request b's kv positions end here (its reserved pages, or kv_len where given)
    page_size: int
    kv_len: int  # the logical block mask's kv length
    source: tuple  # (PagedAttention, batch_idx) of the conversion: which converted score_mods it stands for


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class PagedAttention:
    """Page table, free list and physical-to-logical map for up to `max_batch_size` requests."""

    def __init__(self, n_pages: int, page_size: int, max_batch_size: int, device: Any = "cuda") -> None:
        if n_pages <= 0 or page_size <= 0 or max_batch_size <= 0:
            raise ValueError(
                f"n_pages, page_size and max_batch_size must be positive, got {n_pages=}, "
                f"{page_size=}, {max_batch_size=}"
            )
        self.n_pages, self.page_size = n_pages, page_size
        # page_table[request, logical page] -> physical page; physical_to_logical[request, physical page] -> logical
        self.page_table = torch.full((max_batch_size, n_pages), UNASSIGNED, dtype=torch.int64, device=device)
        self.physical_to_logical = torch.full_like(self.page_table, UNASSIGNED)
        self.capacity = torch.zeros(max_batch_size, dtype=torch.int64, device=device)
        self.empty_pages = list(range(n_pages - 1, -1, -1))  # popped from the end: page 0 first, like torch

    def reserve(self, batch_idx: Tensor | int, seq_len: Tensor | int) -> None:
        """Grow request `batch_idx`'s capacity to at least `seq_len` tokens (whole pages)."""
        row, want, have = int(batch_idx), int(seq_len), int(self.capacity[int(batch_idx)])
        if want <= have:
            return
        n_new = _cdiv(want - have, self.page_size)
        if n_new > len(self.empty_pages):
            raise AssertionError(f"requested {n_new} pages but there are only {len(self.empty_pages)} empty pages")
        pages = self.empty_pages[-n_new:]
        del self.empty_pages[-n_new:]
        first = have // self.page_size
        device = self.page_table.device
        physical = torch.tensor(pages, dtype=torch.int64, device=device)
        logical = torch.arange(first, first + n_new, dtype=torch.int64, device=device)
        self.page_table[row, first : first + n_new] = physical
        self.physical_to_logical[row, physical] = logical  # in place: converted mods captured this tensor
        self.capacity[row] += n_new * self.page_size

    def erase(self, batch_idx: Tensor | int) -> None:
        """Free every page of request `batch_idx`."""
        row = int(batch_idx)
        pages = self.page_table[row][self.page_table[row] != UNASSIGNED]
        self.empty_pages += pages.tolist()
        self.physical_to_logical[row, pages] = UNASSIGNED
        self.page_table[row] = UNASSIGNED
        self.capacity[row] = 0

    def assign(
        self, batch_idx: Tensor, input_pos: Tensor, k_val: Tensor, v_val: Tensor, k_cache: Tensor, v_cache: Tensor
    ) -> None:
        """Write k_val/v_val [B, H, S, D] of requests batch_idx [B] at logical positions input_pos [B, S]."""
        if k_val.requires_grad or v_val.requires_grad:
            raise RuntimeError("val must not require gradient")
        B, H, S, _ = k_val.shape
        _check_assign_shapes(batch_idx, input_pos, k_val, v_val, k_cache, v_cache)
        logical_page, offset = input_pos // self.page_size, input_pos % self.page_size
        physical_page = torch.gather(self.page_table[batch_idx.long()], 1, logical_page.long())
        if (physical_page == UNASSIGNED).any():
            raise RuntimeError("assign: a position lies past the reserved capacity; call reserve first")
        address = (physical_page * self.page_size + offset).reshape(-1)
        k_cache[:, :, address, :] = k_val.transpose(0, 1).reshape(1, H, B * S, -1)
        v_cache[:, :, address, :] = v_val.transpose(0, 1).reshape(1, H, B * S, -1)

    def convert_logical_block_mask(
        self, block_mask: Any, batch_idx: Tensor | None = None, kv_len: Tensor | None = None
    ) -> Any:
        """The block mask over the physical cache: same tiles, kv_indices pointing at the pages that hold them.

        The logical mask's kv block must divide page_size (a page is then several whole tiles) or be a multiple
        of it.  A larger logical tile spans pages that are not adjacent: the converted tables list it page by
        page, while flexcomp's Triton kernels walk the logical tiles themselves and gather each tile's rows
        through the page table (`PagedView`), so a logical mask at the default block size keeps full-size tiles
        over small pages.
        """
        from .blockmask import BlockMask

        logical = block_mask
        kv_block = block_mask.BLOCK_SIZE[1]
        if self.page_size % kv_block and kv_block % self.page_size:
            raise ValueError(
                f"page_size ({self.page_size}) and the block mask's KV block size ({kv_block}) must divide one "
                f"another: build the logical block mask with BLOCK_SIZE=(q_block, {self.page_size})"
            )
        batch = block_mask.shape[0]  # the batch it was made for (flexcomp's tables may broadcast it), as torch's
        if kv_block > self.page_size:
            block_mask, kv_block = _split_kv_blocks(block_mask, kv_block // self.page_size), self.page_size
        B = block_mask.kv_indices.shape[0]
        rows = torch.arange(batch, device=self.page_table.device) if batch_idx is None else batch_idx.long()
        if B == 1 and len(rows) > 1:  # a mask broadcast over the batch: each request has its own pages
            block_mask, B = _expand_batch(block_mask, len(rows)), len(rows)
        if kv_len is not None and block_mask.full_kv_num_blocks is not None:
            # a FULL tile skips the mask: one reaching past kv_len[b] must run the paged mask's length check
            block_mask = _full_as_partial(block_mask)
        tiles_per_page = self.page_size // kv_block
        page_table = self.page_table[rows]

        def to_physical(num: Tensor | None, indices: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
            """Logical tiles -> physical ones; a tile in an unassigned page is dropped (it holds no tokens)."""
            if indices is None:
                return None, None
            logical = indices.long().reshape(B, -1)
            pages = torch.gather(page_table, 1, (logical // tiles_per_page).clamp(max=self.n_pages - 1))
            physical = (pages.clamp(min=0) * tiles_per_page + logical % tiles_per_page).view(indices.shape)
            listed = torch.arange(indices.shape[-1], device=indices.device) < num[..., None]
            keep = listed & (pages.view(indices.shape) != UNASSIGNED)
            order = _kept_first(keep)
            # width n_pages * tiles_per_page: the physical indices can exceed the logical mask's width
            wide = torch.zeros(
                (*indices.shape[:-1], self.n_pages * tiles_per_page), dtype=torch.int32, device=indices.device
            )
            wide[..., : indices.shape[-1]] = torch.gather(physical, -1, order).to(torch.int32)
            return keep.sum(-1).to(torch.int32), wide

        kv_num, kv_indices = to_physical(block_mask.kv_num_blocks, block_mask.kv_indices)
        full_num, full_indices = to_physical(block_mask.full_kv_num_blocks, block_mask.full_kv_indices)
        converted = BlockMask.from_kv_blocks(
            kv_num,
            kv_indices,
            full_num,
            full_indices,
            BLOCK_SIZE=block_mask.BLOCK_SIZE,
            mask_mod=self.get_mask_mod(block_mask.mask_mod, kv_len, batch_idx),
            seq_lengths=(block_mask.seq_lengths[0], self.n_pages * self.page_size),
        )
        converted.paged_logical = self._logical_view(logical, rows, kv_len, batch_idx)
        return converted

    def _logical_view(self, logical: Any, rows: Tensor, kv_len: Tensor | None, batch_idx: Tensor | None) -> Any:
        """The logical block mask with a PagedView: what the kernels run instead of the converted mask."""
        logical_len = logical.seq_lengths[1]
        if logical_len > self.n_pages * self.page_size or not hasattr(logical, "with_paged"):
            return None  # beyond what the page table addresses, or torch's BlockMask: the converted mask runs
        lengths = self.capacity[rows]
        if kv_len is not None:
            lengths = torch.minimum(lengths, kv_len.to(lengths.device).long())
        view = PagedView(self.page_table[rows].to(torch.int32).contiguous(), lengths.to(torch.int32).contiguous(),
                         self.page_size, logical_len, (self, batch_idx))  # fmt: skip
        return logical.with_paged(view)

    def get_mask_mod(self, mask_mod: Any = None, kv_len: Tensor | None = None, batch_idx: Tensor | None = None) -> Any:
        """`mask_mod` on logical kv positions, as a mask_mod on physical ones (unassigned positions masked)."""
        logical_index = self._logical_index(kv_len, batch_idx)
        user = mask_mod

        def paged_mask(b, h, q_idx, physical_kv_idx):
            logical_kv_idx, valid = logical_index(b, physical_kv_idx)
            if user is None:
                return valid
            return valid & user(b, h, q_idx, logical_kv_idx)

        return paged_mask

    def get_score_mod(
        self, score_mod: Any = None, kv_len: Tensor | None = None, batch_idx: Tensor | None = None
    ) -> Any:
        """`score_mod` on logical kv positions, as a score_mod on physical ones (unassigned positions -inf)."""
        logical_index = self._logical_index(kv_len, batch_idx)
        user = score_mod

        def paged_score(score, b, h, q_idx, physical_kv_idx):
            logical_kv_idx, valid = logical_index(b, physical_kv_idx)
            modded = score if user is None else user(score, b, h, q_idx, logical_kv_idx)
            return torch.where(valid, modded, -float("inf"))

        paged_score.paged_logical = (self, batch_idx, score_mod)  # what the paged kernels run instead
        return paged_score

    def _logical_index(self, kv_len: Tensor | None, batch_idx: Tensor | None):
        """A helper (b, physical_kv_idx) -> (logical_kv_idx, valid) reading the captured page map."""
        table, page_size = self.physical_to_logical, self.page_size
        # rows[b] is the page-table row of the mask's batch b (identity when the batch is the whole table)
        rows = (torch.arange(table.shape[0], device=table.device) if batch_idx is None else batch_idx).to(torch.int32)
        lengths = kv_len

        def logical_index(b, physical_kv_idx):
            logical_page = table[rows[b], physical_kv_idx // page_size]
            logical_kv_idx = logical_page * page_size + physical_kv_idx % page_size
            valid = logical_page >= 0
            if lengths is not None:
                valid = valid & (logical_kv_idx < lengths[b])
            return logical_kv_idx, valid

        return logical_index


def direct_paged(block_mask: Any, score_mod: Any) -> tuple[Any, Any]:
    """(block mask, score_mod) the Triton kernels run for a call on a paged cache: where `block_mask` came from
    flexcomp's `convert_logical_block_mask` and `score_mod` is None or that PagedAttention's `get_score_mod` (same
    batch_idx), the logical mask with its PagedView and the user's own score_mod, so that K/V are read through the
    page table with the logical tiles' bounds, FULL tiles and mods; else both as given (the converted mods see
    physical positions, as torch's)."""
    logical = getattr(block_mask, "paged_logical", None)
    if logical is None:
        return block_mask, score_mod
    paged, batch_idx = logical.paged.source
    if score_mod is not None:
        marked = getattr(getattr(score_mod, "fn", score_mod), "paged_logical", None)
        if marked is None or marked[0] is not paged or marked[1] is not batch_idx:  # (tensors: by identity)
            return block_mask, score_mod
        score_mod = marked[2]
    return logical, score_mod


def _expand_batch(block_mask: Any, batch: int) -> Any:
    """The batch-1 block mask repeated over `batch` requests (same tiles; the pages then differ per request)."""
    from .blockmask import BlockMask

    def grow(table: Tensor | None) -> Tensor | None:
        return None if table is None else table.expand(batch, *table.shape[1:]).contiguous()

    return BlockMask.from_kv_blocks(
        grow(block_mask.kv_num_blocks),
        grow(block_mask.kv_indices),
        grow(block_mask.full_kv_num_blocks),
        grow(block_mask.full_kv_indices),
        BLOCK_SIZE=block_mask.BLOCK_SIZE,
        mask_mod=block_mask.mask_mod,
        seq_lengths=block_mask.seq_lengths,
    )


def _kept_first(keep: Tensor) -> Tensor:
    """Each row's positions, its kept ones first, each part in order (int64, for gather): what a stable sort of
    ~keep returns, placed by sparsity.tables.listed_first's running counts."""
    width = keep.shape[-1]
    return listed_first(keep.reshape(-1, width), columns(width, keep.device)).view(keep.shape).long()


def _split_kv_blocks(block_mask: Any, parts: int) -> Any:
    """The same tiles listed at a kv block `parts` times smaller (a logical tile as its pages).  The last block may
    reach past the mask's kv length (a block of 64 over 96 rows): its finer tiles there are not listed, so that each
    row lists at most ceil(length / finer block) tiles, as a mask built at the finer block would."""
    from .blockmask import BlockMask

    q_block, kv_block = block_mask.BLOCK_SIZE
    tiles = -(-block_mask.seq_lengths[1] // (kv_block // parts))  # finer tiles inside the kv length

    def split(num: Tensor | None, indices: Tensor | None) -> tuple[Tensor | None, Tensor | None]:
        if indices is None:
            return None, None
        step = torch.arange(parts, device=indices.device, dtype=indices.dtype)
        finer = (indices[..., None] * parts + step).flatten(-2)
        listed = torch.arange(indices.shape[-1], device=indices.device) < num[..., None]
        keep = (listed[..., None] & (finer.view(*indices.shape, parts) < tiles)).flatten(-2)
        order = _kept_first(keep)
        return keep.sum(-1).to(num.dtype), torch.gather(finer, -1, order).contiguous()

    kv_num, kv_indices = split(block_mask.kv_num_blocks, block_mask.kv_indices)
    full_num, full_indices = split(block_mask.full_kv_num_blocks, block_mask.full_kv_indices)
    return BlockMask.from_kv_blocks(kv_num, kv_indices, full_num, full_indices, BLOCK_SIZE=(q_block, kv_block // parts),
                                    mask_mod=block_mask.mask_mod, seq_lengths=block_mask.seq_lengths)


def _full_as_partial(block_mask: Any) -> Any:
    """The same block mask with its FULL tiles listed as PARTIAL (the mask then runs on every visited tile)."""
    from .blockmask import BlockMask

    def valid(num: Tensor, indices: Tensor) -> Tensor:
        return torch.arange(indices.shape[-1], device=indices.device) < num[..., None]

    indices = torch.cat([block_mask.kv_indices, block_mask.full_kv_indices], dim=-1)
    keep = torch.cat(
        [
            valid(block_mask.kv_num_blocks, block_mask.kv_indices),
            valid(block_mask.full_kv_num_blocks, block_mask.full_kv_indices),
        ],
        dim=-1,
    )
    order = _kept_first(keep)
    # a row lists each kv block once, as PARTIAL or FULL: at most nkv entries, though the two tables side by side
    # are twice torch's dense width (wider than the physical cache's table for a mask built at its capacity)
    width = min(indices.shape[-1], -(-block_mask.seq_lengths[1] // block_mask.BLOCK_SIZE[1]))
    return BlockMask.from_kv_blocks(
        block_mask.kv_num_blocks + block_mask.full_kv_num_blocks,
        torch.gather(indices, -1, order)[..., :width].contiguous(),
        BLOCK_SIZE=block_mask.BLOCK_SIZE,
        mask_mod=block_mask.mask_mod,
        seq_lengths=block_mask.seq_lengths,
    )


def _check_assign_shapes(
    batch_idx: Tensor, input_pos: Tensor, k_val: Tensor, v_val: Tensor, k_cache: Tensor, v_cache: Tensor
) -> None:
    B, H, S, _ = k_val.shape
    checks = [
        (batch_idx.shape[0] == B, f"val batch {B} != batch_idx length {batch_idx.shape[0]}"),
        (k_cache.shape[1] == H, f"val heads {H} != cache heads {k_cache.shape[1]}"),
        (input_pos.shape[-1] == S, f"val length {S} != input_pos length {input_pos.shape[-1]}"),
        (k_val.shape[3] == k_cache.shape[3], "k_val and k_cache head dims differ"),
        (v_val.shape[3] == v_cache.shape[3], "v_val and v_cache head dims differ"),
    ]
    for ok, problem in checks:
        if not ok:
            raise RuntimeError(f"assign: {problem}")


_TORCH_PAGED_MODULE = "torch.nn.attention.experimental._paged_attention"
_TORCH_PAGED_MODS = {
    "PagedAttention.get_mask_mod.<locals>.new_mask_mod": "mask",
    "PagedAttention.get_score_mod.<locals>.new_score_mod": "score",
}


def from_torch_paged(fn: Any) -> Any:
    """torch's PagedAttention mods capture `self` (an object a mod cannot capture): the same mod rebuilt on
    flexcomp's PagedAttention, sharing torch's physical_to_logical tensor.  Any other callable passes through."""
    kind = _TORCH_PAGED_MODS.get(getattr(fn, "__qualname__", ""))
    if kind is None or getattr(fn, "__module__", None) != _TORCH_PAGED_MODULE:
        return fn
    captured = dict(zip(fn.__code__.co_freevars, (cell.cell_contents for cell in fn.__closure__), strict=True))
    torch_paged = captured["self"]
    shim = PagedAttention.__new__(PagedAttention)
    shim.page_size, shim.physical_to_logical = torch_paged.page_size, torch_paged.physical_to_logical
    from torch.nn.attention import flex_attention as torch_flex

    if kind == "mask":
        inner = captured["mask_mod"]
        return shim.get_mask_mod(None if inner is torch_flex.noop_mask else inner, captured["kv_len"])
    inner = captured["score_mod"]
    return shim.get_score_mod(None if inner is torch_flex._identity else inner, captured["kv_len"])
