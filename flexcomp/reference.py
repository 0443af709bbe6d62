"""The reference backend: chunked attention in plain torch ops, on any device.

It is the CPU path of `flex_attention` and the oracle the generated kernels are
tested against.  Scores are computed a (q chunk x kv chunk) rectangle at a time
and folded into a streaming log-sum-exp, so memory is bounded by a budget of
score elements, never B x H x Lq x Lkv.  Everything is out-of-place torch, so
autograd differentiates it (query, key, value and captured float tensors).

Block-mask semantics are torch's kernel semantics: tiles the BlockMask lists
nowhere are EMPTY and skipped, tiles in `full_kv_indices` are FULL and skip
mask_mod, tiles in `kv_indices` are PARTIAL and apply it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.utils.checkpoint

from .ir import MASK_MOD_ARGS, SCORE_MOD_ARGS
from .tiles import TileClass, block_size

DEFAULT_CHUNK_ELEMENTS = 2**24  # score elements live per (q chunk x kv chunk) rectangle


# ---------------------------------------------------------------- running mods


def _specialized(mod: Any) -> Any:
    """A Mod specialized for its captured tensors as they are now (once per call); a plain function as is."""
    from .mods import Mod

    return mod.specialized() if isinstance(mod, Mod) else mod


def _as_callable(mod: Any) -> Callable[..., torch.Tensor]:
    """A (specialized) Mod runs through its IR (the semantics codegen must match); a plain function is called as is."""
    from .mods import Mod

    if isinstance(mod, Mod):
        tensors = mod.tensors()  # once per call, not per rectangle
        return lambda *args: _run_ir(mod, tensors, *args)
    return mod


def evaluate_mod(mod: Any, *args: Any) -> torch.Tensor:
    """Run `mod`'s IR, specialized for its captured tensors as they are now, on `args`, given in the order of its
    canonical parameters."""
    mod = mod.specialized()
    return _run_ir(mod, mod.tensors(), *args)


def _run_ir(mod: Any, tensors: dict[str, torch.Tensor], *args: Any) -> torch.Tensor:
    from .evaluate import evaluate

    names = SCORE_MOD_ARGS if mod.kind == "score" else MASK_MOD_ARGS
    if len(args) != len(names):
        raise TypeError(f"{mod.kind}_mod {mod.name} takes {len(names)} arguments ({', '.join(names)}), got {len(args)}")
    env = {name: _as_arg_tensor(name, value) for name, value in zip(names, args)}
    device = next((t.device for t in env.values() if isinstance(t, torch.Tensor)), None)
    tensors = {name: t.to(device) if device is not None else t for name, t in tensors.items()}
    return evaluate(mod.ir, env, tensors)


def _as_arg_tensor(name: str, value: Any) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    return torch.tensor(value, dtype=torch.float32 if name == "score" else torch.int32)


# ---------------------------------------------------------------- block-mask tiles


def tile_map(block_mask: Any) -> torch.Tensor:
    """The BlockMask's tables as a dense [B, H, q blocks, kv blocks] int8 map of `TileClass` (O(tiles))."""
    q_len, kv_len = block_mask.seq_lengths
    q_block, kv_block = block_size(block_mask)
    num_kv_blocks = math.ceil(kv_len / kv_block)
    num_q_blocks = math.ceil(q_len / q_block)
    tiles = _scatter_tiles(block_mask.kv_num_blocks, block_mask.kv_indices, num_kv_blocks, TileClass.PARTIAL, None)
    if block_mask.full_kv_num_blocks is not None:
        tiles = _scatter_tiles(block_mask.full_kv_num_blocks, block_mask.full_kv_indices, num_kv_blocks,
                               TileClass.FULL, tiles)
    return tiles[:, :, :num_q_blocks]


def _scatter_tiles(num_blocks: torch.Tensor, indices: torch.Tensor, num_kv_blocks: int, cls: TileClass,
                   tiles: torch.Tensor | None) -> torch.Tensor:
    # Entries past num_blocks are padding: send them to a spill column that is dropped.
    listed = torch.arange(indices.shape[-1], device=indices.device) < num_blocks[..., None]
    columns = torch.where(listed, indices.long().clamp(0, num_kv_blocks), num_kv_blocks)
    if tiles is None:
        tiles = torch.zeros(*indices.shape[:-1], num_kv_blocks + 1, dtype=torch.int8, device=indices.device)
    else:
        tiles = torch.cat([tiles, tiles.new_zeros(*tiles.shape[:-1], 1)], dim=-1)
    tiles = tiles.scatter(-1, columns, torch.full_like(columns, int(cls), dtype=torch.int8))
    return tiles[..., :num_kv_blocks]


class _Tiles:
    """Per-element tile classes for one rectangle, from the dense tile map."""

    def __init__(self, block_mask: Any, device: torch.device):
        self.map = tile_map(block_mask).to(device)
        self.q_block, self.kv_block = block_size(block_mask)

    def rectangle(self, q0: int, q1: int, k0: int, k1: int) -> torch.Tensor:
        """[Bm, Hm, q1-q0, k1-k0] tile classes (Bm, Hm may be 1 and broadcast)."""
        sub = self._blocks(q0, q1, k0, k1)
        q_rows = torch.arange(q0, q1, device=sub.device) // self.q_block - q0 // self.q_block
        kv_cols = torch.arange(k0, k1, device=sub.device) // self.kv_block - k0 // self.kv_block
        return sub[:, :, q_rows][:, :, :, kv_cols]

    def classes_in(self, q0: int, q1: int, k0: int, k1: int) -> set[int]:
        return set(self._blocks(q0, q1, k0, k1).unique().tolist())

    def _blocks(self, q0: int, q1: int, k0: int, k1: int) -> torch.Tensor:
        """The tile map's entries for the blocks that rows [q0, q1) and columns [k0, k1) touch."""
        qb0, qb1 = q0 // self.q_block, (q1 - 1) // self.q_block + 1
        kb0, kb1 = k0 // self.kv_block, (k1 - 1) // self.kv_block + 1
        return self.map[:, :, qb0:qb1, kb0:kb1]


# ---------------------------------------------------------------- attention


def reference_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    score_mod: Any = None,
    block_mask: Any = None,
    scale: float | None = None,
    enable_gqa: bool = False,
    return_lse: bool = False,
    **options: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(out, lse or None): `reference_attention_aux` without max_scores; `options` are its keywords."""
    out, lse, _ = reference_attention_aux(query, key, value, score_mod, block_mask, scale, enable_gqa, **options)
    return out, (lse if return_lse else None)


def reference_attention_aux(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    score_mod: Any = None,
    block_mask: Any = None,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    mask_mod: Any = None,
    q_chunk: int | None = None,
    kv_chunk: int | None = None,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention with torch FlexAttention's semantics; returns (out, lse, max_scores).

    lse and max_scores ([B, Hq, Lq], in float32, float64 for float64 inputs, as torch) are the log-sum-exp
    and the maximum of each row's modded, masked scores (-inf for a fully masked row); max_scores has no gradient.

    `score_mod` / `mask_mod` may be Mods or plain functions.  `mask_mod` is used
    only without a `block_mask` (then it applies everywhere, as if every tile were
    PARTIAL); with a block mask, its own `mask_mod` and tile tables decide.
    `q_chunk` / `kv_chunk` force chunk sizes (tests); otherwise they come from
    `chunk_elements`.  Inputs are not validated here: `flex_attention` does that.
    """
    B, Hq, Lq, D = query.shape
    Hkv, Lkv = key.shape[1], key.shape[2]
    work = torch.float64 if query.dtype == torch.float64 else torch.float32
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    tiles = _Tiles(block_mask, query.device) if block_mask is not None else None
    if block_mask is not None:
        mask_mod = block_mask.mask_mod
    score_mod, mask_mod = _specialized(score_mod), _specialized(mask_mod)
    plan = _Plan(
        score_fn=_as_callable(score_mod) if score_mod is not None else None,
        mask_fn=_as_callable(mask_mod) if mask_mod is not None else None,
        tiles=tiles, scale=scale, work=work, groups=Hq // Hkv,
    )
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    needs_grad = needs_grad or _mods_need_grad(score_mod)
    # With autograd, one q chunk's whole kv sweep is saved for backward: size q chunks for that.
    cq, ck = _chunk_sizes(B * Hq, Lq, Lkv, chunk_elements, whole_rows=needs_grad)
    cq, ck = q_chunk or cq, kv_chunk or ck
    q = query.to(work)
    k, v = key.to(work), value.to(work)
    chunks = []
    for q0 in range(0, Lq, cq):
        q1 = min(q0 + cq, Lq)
        rows = q[:, :, q0:q1]
        if needs_grad:  # backward recomputes one q chunk at a time instead of keeping every rectangle
            chunks.append(torch.utils.checkpoint.checkpoint(_attend_rows, plan, rows, k, v, q0, ck,
                                                            use_reentrant=False))
        else:
            chunks.append(_attend_rows(plan, rows, k, v, q0, ck))
    out, lse, max_scores = (torch.cat(parts, dim=2) if len(parts) > 1 else parts[0] for parts in zip(*chunks))
    if needs_grad and not out.requires_grad:  # every tile EMPTY: nothing read q, k or v
        learnable = [t for t in (query, key, value, *_mod_tensors(score_mod)) if t.requires_grad]
        out, lse = _ZeroGradient.apply(out, lse, *learnable)
    return out.to(query.dtype), lse, max_scores.detach()  # lse in float32 (float64 for float64), as torch


class _ZeroGradient(torch.autograd.Function):
    """(out, lse) unchanged, as functions of `inputs` whose gradients are zero.

    A call whose block mask is entirely EMPTY computes its output from no input, yet torch's flex_attention
    returns outputs that require grad, and `.backward()` gives zero gradients: so does this."""

    @staticmethod
    def forward(ctx, out, lse, *inputs):
        ctx.inputs = [(t.shape, t.dtype, t.device) for t in inputs]
        return out.clone(), lse.clone()

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        return None, None, *(torch.zeros(shape, dtype=dtype, device=device) for shape, dtype, device in ctx.inputs)


def _mod_tensors(score_mod: Any) -> list[torch.Tensor]:
    return list(score_mod.tensors().values()) if hasattr(score_mod, "tensors") else []


def _mods_need_grad(score_mod: Any) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in _mod_tensors(score_mod))


def _chunk_sizes(bh: int, Lq: int, Lkv: int, budget: int, whole_rows: bool) -> tuple[int, int]:
    """(q chunk, kv chunk) with bh * cq * ck <= budget; with `whole_rows`, bh * cq * Lkv <= budget."""
    per_head = max(1, budget // max(bh, 1))
    ck = _round_down(min(Lkv, 1024, per_head))
    cq = _round_down(min(Lq, max(1, per_head // (Lkv if whole_rows else ck))))
    return cq, ck


def _round_down(n: int) -> int:
    """Multiples of 128 keep chunks on tile boundaries, so EMPTY tiles skip whole rectangles."""
    return n - n % 128 if n >= 128 else n


class _Plan:
    """What every rectangle needs: the mods, the tile map, the scale and the working dtype."""

    def __init__(self, score_fn, mask_fn, tiles, scale, work, groups):
        self.score_fn, self.mask_fn, self.tiles = score_fn, mask_fn, tiles
        self.scale, self.work, self.groups = scale, work, groups

    def scores(self, q: torch.Tensor, k: torch.Tensor, q0: int, k0: int) -> torch.Tensor | None:
        """Masked, modded scores [B, Hq, cq, ck]; None when every tile of the rectangle is EMPTY."""
        q1, k1 = q0 + q.shape[2], k0 + k.shape[2]
        classes = self.tiles.classes_in(q0, q1, k0, k1) if self.tiles is not None else {int(TileClass.PARTIAL)}
        if classes == {int(TileClass.EMPTY)}:
            return None
        B, Hq, cq, D = q.shape
        # GQA: q head h reads kv head h // groups, so group q heads under their kv head.
        grouped = q.reshape(B, Hq // self.groups, self.groups, cq, D)
        s = (grouped @ k.unsqueeze(2).transpose(-2, -1)).reshape(B, Hq, cq, k.shape[2]) * self.scale
        idx = self._indices(B, Hq, q0, q1, k0, k1, s.device)
        if self.score_fn is not None:
            s = torch.broadcast_to(self.score_fn(s, *idx).to(self.work), s.shape)
        keep = self._keep(classes, idx, q0, q1, k0, k1)
        return s if keep is None else torch.where(keep, s, -math.inf)

    def _keep(self, classes, idx, q0, q1, k0, k1) -> torch.Tensor | None:
        """The mask for a rectangle, or None when everything in it is kept."""
        if self.tiles is None:
            return None if self.mask_fn is None else self.mask_fn(*idx).bool()
        if classes == {int(TileClass.FULL)}:
            return None
        cls = self.tiles.rectangle(q0, q1, k0, k1)
        keep = cls == int(TileClass.FULL)
        if int(TileClass.PARTIAL) in classes:
            partial = self.mask_fn(*idx).bool() if self.mask_fn is not None else True
            keep = keep | ((cls == int(TileClass.PARTIAL)) & partial)
        return keep

    @staticmethod
    def _indices(B, Hq, q0, q1, k0, k1, device) -> tuple[torch.Tensor, ...]:
        def ramp(lo, hi, dim):
            shape = [1, 1, 1, 1]
            shape[dim] = hi - lo
            return torch.arange(lo, hi, dtype=torch.int32, device=device).reshape(shape)

        return ramp(0, B, 0), ramp(0, Hq, 1), ramp(q0, q1, 2), ramp(k0, k1, 3)


def _attend_rows(plan: _Plan, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q0: int, ck: int):
    """One q chunk against every kv chunk, folded with a streaming log-sum-exp -> (out, lse)."""
    B, Hq, cq, _ = q.shape
    shape, work, device = (B, Hq, cq, 1), plan.work, q.device
    m = torch.full(shape, -math.inf, dtype=work, device=device)  # running max
    total = torch.zeros(shape, dtype=work, device=device)  # running sum of exp(s - m)
    acc = torch.zeros((B, Hq, cq, v.shape[-1]), dtype=work, device=device)  # running exp(s - m) @ v
    for k0 in range(0, k.shape[2], ck):
        s = plan.scores(q, k[:, :, k0:k0 + ck], q0, k0)
        if s is None:
            continue
        # The max only shifts the exponent and softmax does not depend on it, so it needs no gradient.
        m_new = torch.maximum(m, s.detach().amax(dim=-1, keepdim=True))
        shift = torch.where(m_new == -math.inf, 0.0, m_new)  # exp(-inf - -inf) would be nan
        p = torch.exp(s - shift)
        rescale = torch.exp(m - shift)
        total = total * rescale + p.sum(dim=-1, keepdim=True)
        acc = acc * rescale + _weighted_values(p, v[:, :, k0:k0 + ck], plan.groups)
        m = m_new
    empty = total == 0  # fully masked rows: out 0, lse -inf
    safe_total = torch.where(empty, 1.0, total)
    lse = torch.where(empty, -math.inf, m + torch.log(safe_total))
    return acc / safe_total, lse.squeeze(-1), m.squeeze(-1)


def _weighted_values(p: torch.Tensor, v: torch.Tensor, groups: int) -> torch.Tensor:
    B, Hq, cq, ck = p.shape
    grouped = p.reshape(B, Hq // groups, groups, cq, ck) @ v.unsqueeze(2)
    return grouped.reshape(B, Hq, cq, v.shape[-1])
