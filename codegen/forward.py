"""Launching the generated forward kernel: checks, configs, arguments."""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
import triton

from flexcomp.blockmask import refine_block_mask
from flexcomp.checks import validate_inputs
from flexcomp.errors import BackendError
from flexcomp.ir import arg, const, free_args
from flexcomp.mods import Mod
from flexcomp.tiles import ClosedFormBounds, block_size, table_device, table_dims

from . import autotune
from .autotune import MIN_BLOCK, LaunchConfig, next_power_of_2
from .cache import cache_key, load_generated
from .decode import MAX_PACKED_ROWS, DecodeLaunch, DecodeShape, decode_wanted
from .forward_source import bounds_text, forward_source
from .gluon.dispatch import gluon_forward, gluon_wanted
from .host import (
    MEMO_SIZE,
    MIN_STAGES,
    check_buffers,
    is_sparse,
    prefetch_index,
    refine_wanted,
    slot_args,
    table_args,
    walked_tiles,
)
from .launch import PreparedLaunch, Slot, launch_first_fitting
from .ops import dot_precision, float_index_exact
from .params import FORWARD, FORWARD_LSE, FORWARD_OUT, K_TENSOR, Q_TENSOR, TABLE_NAMES, V_TENSOR, bind_tensor
from .plans import PlanCache, contiguous_strides, layout, live_buffers, options_key, row_alignment

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
FAST_TANH_DTYPES = (torch.float16, torch.bfloat16)  # fp32 inputs keep the precise tanh


def default_config(dtype: torch.dtype, head_dim: int, sparse: bool = False, score_mod: bool = False) -> LaunchConfig:
    return autotune.default_config(32 if dtype == torch.float32 else 16, head_dim, sparse, score_mod)


def choose_config(dtype: torch.dtype, head_dim: int, block_size: tuple[int, int], kernel_options: dict | None,
                  base: LaunchConfig | None = None, sparse: bool = False, score_mod: bool = False) -> LaunchConfig:
    options = kernel_options or {}
    base = base or default_config(dtype, max(head_dim, MIN_BLOCK), sparse, score_mod)
    block_m = autotune.tile_size(options, "BLOCK_M", base.block_m, block_size[0])
    block_n = autotune.tile_size(options, "BLOCK_N", base.block_n, block_size[1])
    stages = max(options.get("num_stages", base.num_stages), MIN_STAGES)
    return LaunchConfig(block_m, block_n, options.get("num_warps", base.num_warps), stages,
                        bool(options.get("USE_TMA", base.use_tma)))


# ---------------------------------------------------------------- source and kernel


def kernel_key(score_mod: Mod | None, mask_mod: Mod, bounds: ClosedFormBounds | None) -> str:
    return cache_key("forward", score_mod.key if score_mod else "none", mask_mod.key, bounds_text(bounds))


# ids of what the key hashes -> (those objects, kept alive so their ids stay unique; module, key)
_MODULES_BY_ID: OrderedDict[tuple[int, ...], tuple[tuple, Any, str]] = OrderedDict()


def _module_and_key(score_mod: Mod | None, mask_mod: Mod, bounds: ClosedFormBounds | None) -> tuple[Any, str]:
    """Hashing the IR to a key costs ~0.1 ms of host time per call: remember it per (mods, bounds) objects."""
    mods = [m for m in (score_mod, mask_mod) if m is not None]
    parts = (score_mod, mask_mod, bounds, *(x for m in mods for x in (m.ir, m.buffers)))
    ids = tuple(map(id, parts))
    hit = _MODULES_BY_ID.get(ids)
    if hit is None:
        key = kernel_key(score_mod, mask_mod, bounds)
        module = load_generated("forward", key, lambda: forward_source(score_mod, mask_mod, bounds))
        hit = _MODULES_BY_ID[ids] = (parts, module, key)
        if len(_MODULES_BY_ID) > MEMO_SIZE:
            _MODULES_BY_ID.popitem(last=False)
    _MODULES_BY_ID.move_to_end(ids)
    return hit[1], hit[2]


# ---------------------------------------------------------------- checks


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, enable_gqa: bool) -> None:
    """The rules of every backend (flexcomp.checks), then the kernel's own: one batch size (flex_attention has
    broadcast a batch-1 key and value already), a dtype, device and head dims the kernel supports."""
    validate_inputs(q, k, v, enable_gqa)
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"query batch {q.shape[0]} != key/value batch {k.shape[0]}: the Triton kernel takes them "
                         "broadcast to one batch (flexcomp.flex_attention does that)")
    if q.dtype not in SUPPORTED_DTYPES:
        raise BackendError(f"the Triton kernel supports float16, bfloat16, float32; got {q.dtype=} "
                           "(use backend='reference')")
    if q.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise BackendError(f"the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1); got {q.device=}")
    if max(q.shape[-1], v.shape[-1]) > MAX_HEAD_DIM:
        raise BackendError(f"head dims up to {MAX_HEAD_DIM} are supported; got D={q.shape[-1]}, Dv={v.shape[-1]}")


def check_block_mask(block_mask: Any, q: torch.Tensor, kv_len: int) -> None:
    q_len = q.shape[-2]
    block_mask_q_len, block_mask_kv_len = block_mask.seq_lengths
    if (q_len, kv_len) != (block_mask_q_len, block_mask_kv_len):
        raise ValueError(f"block mask built for other lengths: {q_len=}, {kv_len=} but "
                         f"{block_mask_q_len=}, {block_mask_kv_len=}")
    nb, nh, rows = dims = table_dims(block_mask)
    needed_rows = -(-q_len // block_size(block_mask)[0])
    if nb not in (1, q.shape[0]) or nh not in (1, q.shape[1]) or rows < needed_rows:
        raise ValueError(f"block mask tables of shape {dims} do not fit "
                         f"B={q.shape[0]}, Hq={q.shape[1]} with {needed_rows} q blocks")


# ---------------------------------------------------------------- entry point


_PLANS = PlanCache()


def flex_forward(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    score_mod: Mod | None,
    block_mask: Any,
    scale: float,
    enable_gqa: bool,
    return_lse: bool,
    kernel_options: dict | None = None,
    return_max: bool = False,
) -> tuple[torch.Tensor, ...]:
    """Run the generated forward kernel: (out [B, Hq, Lq, Dv] in the input dtype, lse [B, Hq, Lq] float32), and
    with `return_max` a third, max_scores [B, Hq, Lq] float32 (return_aux's: each row's largest score after the
    mods, -inf where fully masked; only the forward kernel computes it, so such calls never decode or go to Gluon).

    lse is always computed (natural log; -inf on fully masked rows); `return_lse`
    is accepted for symmetry with the API, which drops it.  A repeated call (same layouts, mods, block
    mask, scale and options) reuses its plan (codegen/plans.py): no checks or configs are redone.
    """
    del return_lse
    if not return_max and gluon_wanted(kernel_options):  # the hand-scheduled Hopper kernel where it fits
        result = gluon_forward(query, key, value, score_mod, block_mask, scale, enable_gqa)
        if result is not None:
            return result
        kernel_options = {k: v for k, v in kernel_options.items() if k != "BACKEND"}  # the rest as with AUTO
    mask_mod = block_mask.mask_mod if block_mask is not None else NOOP_MASK
    buffers = live_buffers(score_mod, "score:") + live_buffers(mask_mod, "mask:")
    try:
        plan_key = (layout(query), layout(key), layout(value), *(layout(t) for _, t in buffers), id(score_mod),
                    id(block_mask), id(mask_mod), getattr(block_mask, "version", 0), scale, enable_gqa,
                    options_key(kernel_options), return_max)
    except TypeError:  # unhashable kernel_options: no plan kept
        plan_key = None
    plan = _PLANS.get(plan_key, block_mask) if plan_key is not None else None
    if plan is None:
        plan = ForwardPlan(query, key, value, score_mod, block_mask, scale, enable_gqa, kernel_options, buffers,
                           return_max)
        if plan_key is not None:
            _PLANS.put(plan_key, block_mask, plan)
    return plan.run({"q": query, "k": key, "v": value, **dict(buffers)})


class ForwardPlan:
    """Everything a forward call launches, for one key of codegen/plans.py: checked and decided once."""

    def __init__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, score_mod: Mod | None, block_mask: Any,
                 scale: float | None, enable_gqa: bool, kernel_options: dict | None,
                 buffers: list[tuple[str, torch.Tensor]], output_max: bool = False):
        check_inputs(q, k, v, enable_gqa)
        check_buffers(buffers, q.device)
        block_mask = block_mask if block_mask is not None else dense_block_mask(q, k)
        paged = getattr(block_mask, "paged", None)  # flexcomp.paging.PagedView: K/V are a paged cache
        Lkv = paged.kv_len if paged is not None else k.shape[2]
        check_block_mask(block_mask, q, Lkv)
        scale = scale if scale is not None else q.shape[-1] ** -0.5
        mask_mod = block_mask.mask_mod
        if not isinstance(mask_mod, Mod) or (score_mod is not None and not isinstance(score_mod, Mod)):
            raise BackendError("the Triton kernel needs compiled mods (flexcomp.score_mod / flexcomp.mask_mod)")
        self.mods = (score_mod, mask_mod)  # kept alive: the plan's key holds their ids
        bounds = getattr(block_mask, "bounds", None)
        B, Hq, Lq, D = q.shape
        Hkv, Dv = k.shape[1], v.shape[-1]
        self.out_shape, self.lse_shape, self.dtype, self.device = (B, Hq, Lq, Dv), (B, Hq, Lq), q.dtype, q.device
        self.sparse = sparse_q, sparse_kv = block_size(block_mask)
        self.sparse_mask = is_sparse(block_mask, bounds)
        self.config = choose_config(q.dtype, D, self.sparse, kernel_options, sparse=self.sparse_mask,
                                    score_mod=score_mod is not None)
        module, self.key = _module_and_key(score_mod, mask_mod, bounds)
        self.kernel = module.flex_forward_kernel
        self.interpreted = os.environ.get("TRITON_INTERPRET") == "1"
        # the tables each launch walks, by their tiles: the block mask's, and where the config's kernel tiles are
        # smaller, the same mask at those tiles (empty sub-tiles out of the loops: flexcomp.blockmask.refine_block_mask)
        self.tables = {self.sparse: index_tables(block_mask, bounds is not None)}
        decode_shape = DecodeShape(B, Hq, Lq, Lkv, Hq // Hkv, sparse_q, tiles_per_head(block_mask, bounds), output_max)
        decoding = decode_wanted(decode_shape, kernel_options)
        tiles = (self.config.block_m, self.config.block_n)
        refined = None if bounds is not None or decoding or not refine_wanted(kernel_options) else \
            refine_block_mask(block_mask, tiles, B, Hq)
        if refined is not None:
            self.tables[tiles] = index_tables(refined, False)
        out_strides = contiguous_strides(self.out_shape)
        self.values = {  # by name, as codegen/params.py FORWARD declares them; the tables come per launch
            **bind_tensor(Q_TENSOR, Slot("q"), q.stride()), **bind_tensor(K_TENSOR, Slot("k"), k.stride()),
            **bind_tensor(V_TENSOR, Slot("v"), v.stride()), **bind_tensor(FORWARD_OUT, Slot("out"), out_strides),
            **bind_tensor(FORWARD_LSE, Slot("lse"), contiguous_strides(self.lse_shape)),
            "mod_buffers": [x for name, t in buffers for x in slot_args(name, t)],
            "sm_scale": float(scale), "Q_LEN": Lq, "KV_LEN": Lkv, "H_Q": Hq, "GQA_GROUP": Hq // Hkv,
            **paged_values(paged, q),
        }  # fmt: skip
        self.constexprs = {
            "HAS_SCORE_MOD": score_mod is not None, "USE_BOUNDS": bounds is not None,
            "BLOCK_D": max(next_power_of_2(D), MIN_BLOCK), "BLOCK_DV": max(next_power_of_2(Dv), MIN_BLOCK),
            "D": D, "DV": Dv,
            "DOT_PRECISION": dot_precision(q.dtype, self.interpreted),
            "FAST_TANH": score_mod is not None and q.dtype in FAST_TANH_DTYPES and not self.interpreted,
            "FLOAT_INDEX": float_index(score_mod, B, Hq, Lq + sparse_q, Lkv + sparse_kv),
            "FOLD_SCALE": fold_scale(score_mod, float(scale), kernel_options),
            "ROW_ALIGN": row_alignment(*((t.element_size(), t.stride()) for t in (q, k, v)),
                                       (q.element_size(), out_strides)),
        }  # fmt: skip
        self.output_max = output_max  # the forward kernel's alone (decode_wanted said no)
        self.decode = None  # codegen/decode.py: few query rows against a long kv cache
        if decoding:
            self.decode = DecodeLaunch(module, decode_shape, (D, Dv), q.dtype, q.device, self.values, {
                **self.constexprs,  # its rows reach q_idx up to Lq + MAX_PACKED_ROWS (padding rows)
                "FLOAT_INDEX": float_index(score_mod, B, Hq, Lq + MAX_PACKED_ROWS, Lkv + sparse_kv),
            }, self.tables[self.sparse], sparse_kv, kernel_options)
        self.tma_layout = tma_layout_ok(k, v) and not self.interpreted and paged is None
        self.kernel_options, self.dims = kernel_options, (D, Dv, Lq, Lkv, Hq // Hkv)
        self.launches: dict[LaunchConfig, PreparedLaunch] = {}
        self.fitted: LaunchConfig | None = None  # the config that ran, once one has

    def run(self, tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """(out, lse), and max_scores third when the plan outputs it."""
        tensors["out"] = out = torch.empty(self.out_shape, dtype=self.dtype, device=self.device)
        tensors["lse"] = lse = torch.empty(self.lse_shape, dtype=torch.float32, device=self.device)
        results = (out, lse)
        if self.output_max:
            tensors["max_scores"] = torch.empty(self.lse_shape, dtype=torch.float32, device=self.device)
            results += (tensors["max_scores"],)
        if self.decode is not None:
            self.decode.run(tensors)
        elif self.fitted is not None:
            if self.fitted.use_tma and self.tma_layout:
                _install_allocator()  # per call: Triton keeps the allocator per thread
            self.launches[self.fitted](tensors)
        else:
            config = self._tuned(tensors) if autotune.wanted(self.kernel_options) else self.config
            self.fitted = launch_first_fitting(fallbacks(config), lambda c: self._launch(c)(tensors),
                                               f"no launch configuration fits this GPU for D={self.dims[0]}, "
                                               f"Dv={self.dims[1]}, {self.dtype}")
        return results

    def _launch(self, config: LaunchConfig) -> PreparedLaunch:
        """The launch at `config`'s tiles (made once per config)."""
        launch = self.launches.get(config)
        if launch is None:
            Lq, Lkv = self.out_shape[2], self.dims[3]
            sparse = walked_tiles(self.tables, (config.block_m, config.block_n), self.sparse)
            has_full, tables = self.tables[sparse]
            args, kwargs = FORWARD.bind({
                **self.values, **self.constexprs, **dict(zip(TABLE_NAMES, tables, strict=True)),
                "HAS_FULL": has_full, "SPARSE_Q": sparse[0], "SPARSE_KV": sparse[1],
                "OUTPUT_MAX": self.output_max,  # else MaxScores is never written: lse's pointer stands in
                "MaxScores": Slot("max_scores" if self.output_max else "lse"),
                "BLOCK_M": config.block_m, "BLOCK_N": config.block_n, "TILES_PER_BLOCK": sparse[1] // config.block_n,
                "EVEN_Q": Lq % config.block_m == 0,
                # every kv tile in bounds (a table walk visits whole sparse blocks; a paged request ends anywhere)
                "EVEN_KV": Lkv % sparse[1] == 0 and self.values["PAGE_SIZE"] == 0,
                "USE_TMA": config.use_tma and self._tma_possible(),
                "PREFETCH_INDEX": not self.constexprs["USE_BOUNDS"]
                and prefetch_index(config.num_stages, config.num_warps, self.sparse_mask, self.kernel_options),
            })  # fmt: skip
            launch = self.launches[config] = PreparedLaunch(
                self.kernel, (-(-Lq // config.block_m), self.out_shape[0] * self.out_shape[1]), args,
                dict(kwargs, num_warps=config.num_warps, num_stages=config.num_stages))
        return launch

    def _tma_possible(self) -> bool:
        """Whether K/V may go through tensor descriptors (installing the scratch allocator they need)."""
        return self.tma_layout and _install_allocator()

    def _tuned(self, tensors: dict[str, torch.Tensor]) -> LaunchConfig:
        D, Dv, Lq, Lkv, group = self.dims
        bits = 32 if self.dtype == torch.float32 else 16
        with_tma = "USE_TMA" not in (self.kernel_options or {}) and self._tma_possible()
        configs = [choose_config(self.dtype, D, self.sparse, self.kernel_options, c)
                   for c in autotune.candidates(bits, max(D, Dv), self.sparse, tma=with_tma)]
        tune_key = (f"{self.key} {self.dtype} D={D} Dv={Dv} Lq~{next_power_of_2(Lq)} "
                    f"Lkv~{next_power_of_2(Lkv)} gqa={group} tma={with_tma} {_device_name(self.device)}")
        return autotune.tuned_config(tune_key, list(dict.fromkeys(configs)) or [self.config],
                                     lambda c: self._launch(c)(tensors),
                                     on_gpu=self.device.type == "cuda" and not self.interpreted)


def paged_values(paged: Any, q: torch.Tensor) -> dict[str, Any]:
    """The PAGED_KV arguments (codegen/params.py): a PagedView's page-table rows and request lengths, or stand-ins
    that the kernel never reads (PAGE_SIZE 0)."""
    if paged is None:
        stand_in = _stand_in(q.device)
        return {"PAGE_TABLE": stand_in, "stride_pgb": 0, "KV_LENS": stand_in, "PAGE_SIZE": 0}
    return {"PAGE_TABLE": paged.page_rows, "stride_pgb": paged.page_rows.stride(0), "KV_LENS": paged.lengths,
            "PAGE_SIZE": paged.page_size}  # fmt: skip


def tiles_per_head(block_mask: Any, bounds: ClosedFormBounds | None) -> bool:
    """Whether query heads may visit different kv tiles: tables with a head dim, or closed-form bounds reading h."""
    if bounds is not None:
        return any("h" in free_args(getattr(bounds, f)) for f in ("kv_lo", "kv_hi", "full_lo", "full_hi"))
    return table_dims(block_mask)[1] > 1


def float_index(score_mod: Mod | None, batch: int, heads: int, q_bound: int, kv_bound: int) -> bool:
    """Whether the kernel may compute the score mod's int->float index casts in float (ops.float_index_form).

    The bounds pad the lengths by a sparse block: the last tiles evaluate the mod past the end (those
    scores are masked or never stored, but the range check covers them too)."""
    if score_mod is None:
        return False
    ranges = (("b", 0, batch - 1), ("h", 0, heads - 1), ("q_idx", 0, q_bound - 1), ("kv_idx", 0, kv_bound - 1))
    return float_index_exact(score_mod.ir, ranges)


def fold_scale(score_mod: Mod | None, scale: float, kernel_options: dict | None) -> bool:
    """Whether the kernel scales raw q.k inside the exp2's FMA (one FFMA per score, not FMUL + FADD).

    Only without a score_mod (the mod needs the scaled score), and only for a finite scale > 0 (then
    max(qk) * c equals max(qk * c) and -inf stays -inf).  On unless `kernel_options={"FOLD_SCALE": False}`
    (kept for the A/B in benchmarks/tune_forward.py)."""
    wanted = (kernel_options or {}).get("FOLD_SCALE", True)
    return bool(wanted) and score_mod is None and math.isfinite(scale) and scale > 0


def tma_layout_ok(k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether K and V can go through Hopper's tensor copy engine: sm_90+, unit last stride, 16-byte aligned
    rows and bases.  A config asks for it (LaunchConfig.use_tma): off by default, on with
    `kernel_options={"USE_TMA": True}` (torch's key) or where autotuning picks it; on the H100 it measured
    3-10% slower than the cp.async pointer loads on plain causal, faster on ALiBi D=64
    (benchmarks/NOTES_forward.md).  Descriptors made on the device also need a scratch allocator
    (`_install_allocator`, called by ForwardPlan when a launch uses them)."""
    if k.device.type != "cuda" or torch.cuda.get_device_capability(k.device)[0] < 9:
        return False
    for t in (k, v):
        size = t.element_size()
        if t.stride(-1) != 1 or t.data_ptr() % 16 or any(s * size % 16 for s in t.stride()[:-1]):
            return False
    return True


def _install_allocator() -> bool:
    # checked on every call: triton keeps the allocator in a ContextVar, so each thread starts without one
    try:
        from triton.runtime import _allocation
    except ImportError:
        return False
    current = getattr(_allocation, "_allocator", None)
    current = current.get() if hasattr(current, "get") else current
    if isinstance(current, getattr(_allocation, "NullAllocator", ())):
        triton.set_allocator(_scratch)
    return True


def _scratch(size: int, alignment: int, stream: int | None) -> torch.Tensor:
    return torch.empty(size, dtype=torch.int8, device="cuda")


@functools.cache
def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


@functools.lru_cache(maxsize=64)  # on every call's path
def fallbacks(config: LaunchConfig) -> tuple[LaunchConfig, ...]:
    """The chosen config, then smaller ones: a mod that gathers from tables can need more shared memory.  Never
    fewer than MIN_STAGES stages (see there)."""
    smaller = [dataclasses.replace(config, num_stages=MIN_STAGES)]
    while smaller[-1].block_n > MIN_BLOCK or smaller[-1].block_m > MIN_BLOCK:
        last = smaller[-1]
        if last.block_n >= last.block_m and last.block_n > MIN_BLOCK:
            smaller.append(dataclasses.replace(last, block_n=last.block_n // 2))
        else:
            smaller.append(dataclasses.replace(last, block_m=last.block_m // 2))
    return (config, *smaller)


NOOP_MASK = Mod("mask", "noop_mask", const(True), const(True))
DENSE_BOUNDS = ClosedFormBounds(const(0), arg("KV_LEN"), const(0), arg("KV_LEN"))


@dataclass
class DenseBlockMask:
    """No mask: every kv tile is FULL, by closed-form bounds, so the tables are never read."""

    seq_lengths: tuple[int, int]
    kv_num_blocks: torch.Tensor
    kv_indices: torch.Tensor
    BLOCK_SIZE: tuple[int, int] = (128, 128)
    mask_mod: Mod = NOOP_MASK
    full_kv_num_blocks: torch.Tensor | None = None
    full_kv_indices: torch.Tensor | None = None
    bounds: ClosedFormBounds = DENSE_BOUNDS


def dense_block_mask(q: torch.Tensor, k: torch.Tensor) -> DenseBlockMask:
    rows = -(-q.shape[-2] // 128)
    num = torch.zeros((1, 1, rows), dtype=torch.int32, device=q.device)
    return DenseBlockMask((q.shape[-2], k.shape[-2]), num, num[..., None])


def index_tables(block_mask: Any, use_bounds: bool) -> tuple[bool, list[Any]]:
    """(has FULL tables, the four tables' pointers and strides).  With bounds no table is read,
    so none is touched either: flexcomp's BlockMask builds them lazily, and causal's is O(L^2 / block^2)."""
    if use_bounds:
        stand_in = _stand_in(table_device(block_mask))
        return False, [stand_in, 0, 0, 0, stand_in, 0, 0, 0, 0] * 2
    num, idx = block_mask.kv_num_blocks, block_mask.kv_indices
    full_num, full_idx = block_mask.full_kv_num_blocks, block_mask.full_kv_indices
    has_full = full_num is not None and full_idx is not None
    if not has_full:
        full_num, full_idx = num, idx
    return has_full, table_args(num, idx, full_num, full_idx)


@functools.cache
def _stand_in(device: torch.device) -> torch.Tensor:
    """A pointer for the table arguments of a kernel that reads none (closed-form bounds)."""
    return torch.zeros(1, dtype=torch.int32, device=device)


def kernel_source(score_mod: Mod | None, mask_mod: Mod | None, **specialization: Any) -> str:
    """The generated forward kernel's Python/Triton source (what `flex_forward` runs).

    `specialization` may give `bounds` (a ClosedFormBounds, or None for the
    index-table walk); dtypes, head dims and block sizes are constexprs of the
    one kernel, so they do not change the text.
    """
    unknown = set(specialization) - {"bounds"}
    if unknown:
        raise TypeError(f"unknown specialization {sorted(unknown)}; known: ['bounds']")
    return forward_source(score_mod, mask_mod or NOOP_MASK, specialization.get("bounds"))
