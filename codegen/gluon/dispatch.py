"""kernel_options={"BACKEND": "GLUON"}: a forward call on sm_90 runs the Gluon kernel where it fits, else Triton.

`why_not_gluon` is the one list of what the Gluon forward (attention.py, version B; mods from mods.py) cannot
run; the first reason that applies sends the call to the Triton kernel and is printed under FLEXCOMP_DEBUG=1.
The cheap checks come first, so a CPU or pre-Hopper call never imports Gluon.
"""

from __future__ import annotations

import os
import sys
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
import triton

from flexcomp.mods import Mod

GLUON_TRITON = "3.6"  # the Gluon API the kernels are written against
GLUON_DTYPES = (torch.float16, torch.bfloat16)
GLUON_HEAD_DIMS = (64, 128)
GLUON_TILE = 128  # rows of a CTA (2 consumers x 64) and of a kv tile: lengths must be multiples


def gluon_wanted(kernel_options: dict | None) -> bool:
    return (kernel_options or {}).get("BACKEND") == "GLUON"


def why_not_gluon(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, score_mod: Mod | None, block_mask: Any, enable_gqa: bool
) -> str:
    """Why the Gluon forward cannot run this call ("" where it can)."""
    why = _why_not_inputs(q, k, v, enable_gqa) or _why_not_mods(score_mod, block_mask)
    if why:
        return why
    from .mods import unsupported_ops  # imports Gluon: only once every cheap check passed

    mask_mod = block_mask.mask_mod if block_mask is not None else None
    missing = _memoized((unsupported_ops, score_mod, mask_mod), lambda: unsupported_ops(score_mod, mask_mod))
    return f"the mods call tl.{', tl.'.join(missing)}, which Gluon {GLUON_TRITON} lacks" if missing else ""


def _why_not_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, enable_gqa: bool) -> str:
    # each rule: what the kernel needs -> why not
    if q.device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return f"the Gluon kernel runs on CUDA only (q on {q.device.type}, no interpreter)"
    major, minor = torch.cuda.get_device_capability(q.device)
    if (major, minor) != (9, 0):
        return f"the Gluon kernel is written for sm_90; this GPU is sm_{major}{minor}"
    if not triton.__version__.startswith(GLUON_TRITON):
        return f"the Gluon kernel is written against Triton {GLUON_TRITON}'s Gluon; this is Triton {triton.__version__}"
    if any(t.requires_grad for t in (q, k, v)):  # (inside autograd's forward grad mode is off: not a sign)
        return "q, k or v requires grad: the Gluon kernel is forward only"
    if q.dtype not in GLUON_DTYPES or not q.dtype == k.dtype == v.dtype:
        return f"{q.dtype=}, {k.dtype=}, {v.dtype=}: the Gluon kernel takes float16 or bfloat16 throughout"
    if not q.shape == k.shape == v.shape or enable_gqa:
        return f"{q.shape=}, {k.shape=}, {v.shape=}: the Gluon kernel needs equal shapes (no GQA, Lq == Lkv, Dv == D)"
    if q.shape[-1] not in GLUON_HEAD_DIMS:
        return f"head dim {q.shape[-1]}: the Gluon kernel takes {GLUON_HEAD_DIMS}"
    if q.shape[2] % GLUON_TILE:
        return f"L={q.shape[2]} is not a multiple of the Gluon kernel's {GLUON_TILE}-row tiles"
    if not (q.is_contiguous() and k.is_contiguous() and v.is_contiguous()):
        return "q, k, v must be contiguous for the Gluon kernel's TMA descriptors"
    return ""


def _why_not_mods(score_mod: Mod | None, block_mask: Any) -> str:
    if block_mask is None:
        return ""
    mask_mod = block_mask.mask_mod
    if not isinstance(mask_mod, Mod) or (score_mod is not None and not isinstance(score_mod, Mod)):
        return "the Gluon kernel needs compiled mods"
    if getattr(block_mask, "paged", None) is not None:
        return "a paged KV cache: the Gluon kernel reads K and V as [B, H, L, D]"
    if any(m is not None and m.buffers for m in (score_mod, mask_mod)):
        return "the mods capture tensors, which the Gluon kernel does not take yet"
    if getattr(block_mask, "bounds", None) is None:
        return "the mask has no closed-form bounds (the Gluon kernel does not read block-mask tables)"
    return ""


def gluon_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    score_mod: Mod | None,
    block_mask: Any,
    scale: float | None,
    enable_gqa: bool,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(out, lse) from the Gluon kernel, or None (and why, under FLEXCOMP_DEBUG=1) where it cannot run the call."""
    why = why_not_gluon(q, k, v, score_mod, block_mask, enable_gqa)
    if why:
        _debug(f"kernel_options BACKEND='GLUON': the Triton kernel runs this call: {why}")
        return None
    from .attention import attention_forward

    _debug("kernel_options BACKEND='GLUON': the Gluon kernel runs this call")
    return attention_forward(q, k, v, scale=scale, version="B", mods=kernel_mods(score_mod, block_mask))


def kernel_mods(score_mod: Mod | None, block_mask: Any):
    """attention.GluonMods of a call: its score_mod, and its block mask's mask_mod and closed-form bounds
    (none for no mask or torch's noop_mask), rendered by mods.py.  Imports Gluon."""
    from ..forward import NOOP_MASK
    from .attention import GluonMods

    noop = block_mask is None or block_mask.mask_mod.key == NOOP_MASK.key
    if score_mod is None and noop:
        return GluonMods()
    mask_mod, bounds = (NOOP_MASK, None) if noop else (block_mask.mask_mod, block_mask.bounds)
    return _memoized((score_mod, mask_mod, bounds), lambda: _rendered(score_mod, mask_mod, bounds))


def _rendered(score_mod: Mod | None, mask_mod: Mod, bounds: Any):
    from .attention import GluonMods
    from .mods import gluon_mods_module

    module = gluon_mods_module(score_mod, mask_mod, bounds)
    return GluonMods(
        score=module.gluon_score if score_mod is not None else None,
        mask=module.gluon_mask if bounds is not None else None,
        tiles=module.gluon_tiles if bounds is not None else None,
    )


# ids of a call's mods (and block mask) -> (those objects, kept alive so their ids stay unique; the result): the
# rendering and the file's key cost host time on every call otherwise
_MEMO: OrderedDict[tuple[int, ...], tuple[tuple, Any]] = OrderedDict()
MEMO_SIZE = 64


def _memoized(parts: tuple, make: Callable[[], Any]) -> Any:
    ids = tuple(map(id, parts))
    hit = _MEMO.get(ids)
    if hit is None:
        hit = _MEMO[ids] = (parts, make())
        if len(_MEMO) > MEMO_SIZE:
            _MEMO.popitem(last=False)
    _MEMO.move_to_end(ids)
    return hit[1]


def _debug(message: str) -> None:
    if os.environ.get("FLEXCOMP_DEBUG", "") not in ("", "0"):
        print(message, file=sys.stderr)
