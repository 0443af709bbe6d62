"""The rules query, key and value obey on every backend (the Triton kernels add their own: codegen/forward.py)."""

from __future__ import annotations

from typing import Any

import torch


def validate_inputs(query: Any, key: Any, value: Any, enable_gqa: bool) -> None:
    """ValueError / TypeError naming both values for every malformed combination of q, k, v."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.is_nested:  # as torch's flex_attention (2.10 on) refuses them
            raise ValueError(f"{name} is a nested (jagged) tensor, which flex_attention does not take: pack the "
                             "sequences into one [1, H, total, D] tensor and mask across them (a document mask)")
        if t.ndim != 4:
            raise ValueError(f"{name} must be 4-D [B, H, L, D], got {name}.ndim={t.ndim} (shape {tuple(t.shape)})")
        if not t.is_floating_point():
            raise TypeError(f"{name} must have a floating dtype, got {name}.dtype={t.dtype}")
    if not query.dtype == key.dtype == value.dtype:
        raise ValueError(f"q, k, v dtypes differ: {query.dtype=} {key.dtype=} {value.dtype=}")
    if not query.device == key.device == value.device:
        raise ValueError(f"q, k, v devices differ: {query.device=} {key.device=} {value.device=}")
    (_, q_heads, _, q_head_dim), (kv_batch, kv_heads, kv_len, k_head_dim) = query.shape, key.shape
    v_batch, v_heads, v_len, _ = value.shape
    if kv_batch != v_batch:
        raise ValueError(f"key batch {kv_batch=} != value batch {v_batch=}")
    if kv_heads != v_heads:
        raise ValueError(f"key heads {kv_heads=} != value heads {v_heads=}")
    if kv_len != v_len:
        raise ValueError(f"key length {kv_len=} != value length {v_len=}")
    if q_head_dim != k_head_dim:
        raise ValueError(f"{q_head_dim=} != {k_head_dim=}")
    if enable_gqa:
        if not (kv_heads > 0 and q_heads % kv_heads == 0):
            raise ValueError(f"{q_heads=} is not a multiple of {kv_heads=}")
    elif q_heads != kv_heads:
        raise ValueError(f"{q_heads=} != {kv_heads=}; pass enable_gqa=True for grouped-query attention")
