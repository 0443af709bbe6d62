"""The backward pass: generated dK/dV and dQ kernels, launched from torch.

`flex_backward` takes what the forward saved (q, k, v, out, lse) and the incoming
gradients (of out, and of lse when it was returned) and returns dq, dk, dv and
the gradients of the score_mod's captured float tensors named in `grad_buffers`.
The kernels recompute P from q, k and lse (no O(L^2) state); delta = rowsum(dO * O)
is computed here with torch, minus dlse (d lse_i / d s_ij = P_ij folds into it).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import triton

from flexcomp.mods import Mod

from .backward_source import backward_source
from .cache import cache_key, load_generated

DEFAULT_BLOCKS = {"BLOCK_M1": 32, "BLOCK_N1": 64, "BLOCK_M2": 64, "BLOCK_N2": 32}
DEFAULT_SPARSE_BLOCK = 128  # tile size of the synthesized all-FULL tables when there is no block mask


def backward_module(score_mod: Mod | None, mask_mod: Mod | None, grad_buffers: frozenset[str]):
    parts = ["backward", score_mod.key if score_mod else "-", mask_mod.key if mask_mod else "-",
             ",".join(sorted(grad_buffers))]
    return load_generated("flex_bwd", cache_key(*parts),
                          lambda: backward_source(score_mod, mask_mod, grad_buffers))


def kernel_source_backward(score_mod: Mod | None, mask_mod: Mod | None,
                           grad_buffers: frozenset[str] = frozenset()) -> str:
    """The generated backward source, for reading."""
    return backward_source(score_mod, mask_mod, grad_buffers)


# ---------------------------------------------------------------- block tables


def _block_sizes(block_mask: Any) -> tuple[int, int]:
    size = block_mask.BLOCK_SIZE
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _all_full_tables(batch: int, rows: int, cols: int, device: torch.device):
    """Tables listing every tile FULL: attention without a block mask walks all of them."""
    num = torch.full((1, 1, rows), cols, dtype=torch.int32, device=device)
    idx = torch.arange(cols, dtype=torch.int32, device=device).expand(1, 1, rows, cols).contiguous()
    empty_num = torch.zeros_like(num)
    return empty_num, idx, num, idx


def _tables(block_mask: Any, q_major: bool, q_len: int, kv_len: int, sparse: tuple[int, int], device):
    """(num, idx, full_num, full_idx) as contiguous int32; missing FULL tables become empty ones."""
    if block_mask is None:
        n_q, n_kv = math.ceil(q_len / sparse[0]), math.ceil(kv_len / sparse[1])
        return _all_full_tables(1, n_kv if q_major else n_q, n_q if q_major else n_kv, device)
    prefix = "q" if q_major else "kv"
    num, idx = getattr(block_mask, f"{prefix}_num_blocks"), getattr(block_mask, f"{prefix}_indices")
    full_num, full_idx = getattr(block_mask, f"full_{prefix}_num_blocks"), getattr(block_mask, f"full_{prefix}_indices")
    if num is None:
        raise ValueError(f"the block mask has no {prefix}_num_blocks table; the backward pass needs it")
    if full_num is None:
        full_num, full_idx = torch.zeros_like(num), idx[..., :1]
    return tuple(t.to(device=device, dtype=torch.int32).contiguous() for t in (num, idx, full_num, full_idx))


def _table_args(num: torch.Tensor, idx: torch.Tensor, full_idx: torch.Tensor) -> list[int]:
    tb, th, rows = num.shape
    return [th if tb > 1 else 0, 1 if th > 1 else 0, rows, idx.shape[-1], full_idx.shape[-1]]


# ---------------------------------------------------------------- launch


def _choose_blocks(kernel_options: dict[str, Any] | None, sparse: tuple[int, int]) -> dict[str, int]:
    options = kernel_options or {}
    blocks = {}
    for name, default in DEFAULT_BLOCKS.items():
        limit = sparse[0] if name.startswith("BLOCK_M") else sparse[1]
        size = int(options.get(name, min(default, limit)))
        if size < 16 or size & (size - 1) or limit % size:
            raise ValueError(f"kernel_options {name}={size} must be a power of two >= 16 that divides the "
                             f"block mask's block size {limit=}")
        blocks[name] = size
    return blocks


def _strides(t: torch.Tensor) -> list[int]:
    return list(t.stride())


def _buffer_args(mod: Mod | None, tensors: dict[str, torch.Tensor], device) -> list[Any]:
    args = []
    for spec in mod.buffers if mod is not None else ():
        t = tensors[spec.name]
        t = t.to(device) if t.device != device else t
        args += [t, *_strides(t)]
    return args


def flex_backward(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    grad_out: torch.Tensor,
    grad_lse: torch.Tensor | None,
    score_mod: Mod | None,
    block_mask: Any,
    scale: float | None,
    enable_gqa: bool,
    kernel_options: dict[str, Any] | None = None,
    captured: dict[str, torch.Tensor] | None = None,
    grad_buffers: frozenset[str] = frozenset(),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """(dq, dk, dv, {buffer name: gradient}) of flex attention; gradients in their tensors' dtypes.

    `captured` maps the score_mod's and mask_mod's buffer names to their tensors (default:
    the mods' current values); `grad_buffers` names the score_mod's float buffers to differentiate.
    """
    B, Hq, Lq, D = query.shape
    Hkv, Lkv, Dv = key.shape[1], key.shape[2], value.shape[3]
    group = Hq // Hkv if enable_gqa else 1
    if Hq != Hkv * group:
        raise ValueError(f"{Hq=} != {Hkv=} * {group=}; pass enable_gqa=True for grouped-query attention")
    if query.dtype == torch.float64:
        raise TypeError("the Triton backward does not support float64; use backend='reference'")
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    mask_mod = block_mask.mask_mod if block_mask is not None else None
    mask_mod = mask_mod if isinstance(mask_mod, Mod) else None
    if block_mask is not None and block_mask.mask_mod is not None and mask_mod is None:
        raise TypeError("the block mask's mask_mod must be a flexcomp Mod for the Triton backward")
    captured = dict(captured or {})
    for mod in (score_mod, mask_mod):
        if mod is not None and any(spec.name not in captured for spec in mod.buffers):
            captured = {**mod.tensors(), **captured}
    device = query.device
    sparse = _block_sizes(block_mask) if block_mask is not None else (DEFAULT_SPARSE_BLOCK, DEFAULT_SPARSE_BLOCK)
    blocks = _choose_blocks(kernel_options, sparse)
    if block_mask is None:
        sparse = (max(blocks["BLOCK_M1"], blocks["BLOCK_M2"]), max(blocks["BLOCK_N1"], blocks["BLOCK_N2"]))
    module = backward_module(score_mod, mask_mod, frozenset(grad_buffers))

    lse = lse.to(torch.float32).contiguous()
    delta = (grad_out.to(torch.float32) * out.to(torch.float32)).sum(-1)
    if grad_lse is not None:
        delta = delta - grad_lse.to(torch.float32)  # d lse_i / d s_ij = P_ij: dS_ij += P_ij * dlse_i
    delta = delta.contiguous()
    dq, dk, dv = torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)
    grads = {name: torch.zeros(captured[name].shape, dtype=torch.float32, device=device) for name in grad_buffers}
    mod_args = _buffer_args(score_mod, captured, device) + _buffer_args(mask_mod, captured, device)
    grad_specs = [s for s in (score_mod.buffers if score_mod else ()) if s.name in grad_buffers]
    grad_args = [x for s in grad_specs for x in (grads[s.name], *_strides(grads[s.name]))]
    shapes = {"D": D, "DV": Dv, "BLOCK_D": max(16, triton.next_power_of_2(D)),
              "BLOCK_DV": max(16, triton.next_power_of_2(Dv)), "GQA_GROUP": group, "SPARSE_Q": sparse[0],
              "SPARSE_KV": sparse[1], "DOT_PRECISION": "ieee" if query.dtype == torch.float32 else "tf32"}
    options = {k: v for k, v in (kernel_options or {}).items() if k in ("num_warps", "num_stages")}
    qkvdo = [query, *_strides(query), key, *_strides(key), value, *_strides(value), grad_out, *_strides(grad_out)]

    num, idx, full_num, full_idx = _tables(block_mask, True, Lq, Lkv, sparse, device)
    grid = (triton.cdiv(Lkv, blocks["BLOCK_N1"]), B * Hkv)
    module.flex_bwd_dkdv[grid](*qkvdo, lse, delta, dk, *_strides(dk), dv, *_strides(dv),
                               num, idx, full_num, full_idx, *_table_args(num, idx, full_idx), *mod_args,
                               scale, Lq, Lkv, Hq, Hkv, BLOCK_M=blocks["BLOCK_M1"], BLOCK_N=blocks["BLOCK_N1"],
                               **shapes, **options)
    num, idx, full_num, full_idx = _tables(block_mask, False, Lq, Lkv, sparse, device)
    grid = (triton.cdiv(Lq, blocks["BLOCK_M2"]), B * Hq)
    module.flex_bwd_dq[grid](*qkvdo, lse, delta, dq, *_strides(dq),
                             num, idx, full_num, full_idx, *_table_args(num, idx, full_idx), *mod_args, *grad_args,
                             scale, Lq, Lkv, Hq, BLOCK_M=blocks["BLOCK_M2"], BLOCK_N=blocks["BLOCK_N2"],
                             **shapes, **options)
    return dq, dk, dv, {name: g.to(captured[name].dtype) for name, g in grads.items()}



