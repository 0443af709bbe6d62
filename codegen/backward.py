"""The backward pass: generated dK/dV and dQ kernels, launched from torch.

`flex_backward` takes what the forward saved (q, k, v, out, lse) and the incoming
gradients (of out, and of lse when it was returned) and returns dq, dk, dv and
the gradients of the score_mod's captured float tensors named in `grad_buffers`.
The kernels recompute P from q, k and lse (no O(L^2) state); a small kernel first
computes delta = rowsum(dO * O) minus dlse (d lse_i / d s_ij = P_ij folds into it) and the
lse in base 2, once per row.
Block sizes, warps and stages per kernel are data (`autotune.BACKWARD_CONFIGS`), measured on an H100.

dQ has two schemes, chosen by kernel_options["BACKWARD_DQ"] (default `DEFAULT_BACKWARD_DQ`):
"separate" runs a dQ kernel that recomputes S and dP per q tile (7 matmuls per tile pair; each program
owns its output rows and stores them once: dq, dk, dv are deterministic); "atomic" (FlashAttention-2's)
has the dK/dV kernel add dS K into a float32 dQ buffer with atomics (5 matmuls; the order of the adds,
so dq's last bits, vary from run to run), then one torch op scales and casts it.  Under
torch.use_deterministic_algorithms(True) the separate scheme is always used.
The captured tensors' gradients are float32 atomics by default; under
`torch.use_deterministic_algorithms(True)` the dQ kernel instead adds into its own slice of a
[programs, numel] float32 buffer and torch sums the slices (bitwise reproducible, bounded by
`DETERMINISTIC_PARTIALS_LIMIT_BYTES`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import warnings
from typing import Any

import torch

from flexcomp.blockmask import refine_block_mask
from flexcomp.errors import BackendError
from flexcomp.mods import Mod
from flexcomp.tiles import block_size

from . import autotune
from .autotune import MIN_BLOCK, BackwardConfig, next_power_of_2, tile_size
from .backward_source import backward_source
from .cache import cache_key, load_generated
from .host import (
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
from .ops import dot_precision
from .params import (
    BACKWARD,
    BACKWARD_DK,
    BACKWARD_DO,
    BACKWARD_DQ,
    BACKWARD_DV,
    K_TENSOR,
    Q_TABLE_NAMES,
    Q_TENSOR,
    TABLE_NAMES,
    V_TENSOR,
    Group,
    bind_tensor,
)
from .plans import PlanCache, contiguous_strides, layout, live_buffers, options_key, row_alignment

DEFAULT_SPARSE_BLOCK = 128  # tile size of the synthesized all-FULL tables when there is no block mask
DELTA_BLOCK_M = 64
# Deterministic mode's partial gradients ([dQ programs, numel] float32 per captured tensor) may use at most this
DETERMINISTIC_PARTIALS_LIMIT_BYTES = 1 << 30
BACKWARD_DQ_SCHEMES = ("separate", "atomic")
DEFAULT_BACKWARD_DQ = "separate"  # "atomic" once it is measured faster on the GPU (benchmarks/NOTES_backward.md)
LAST_KERNELS: dict[str, Any] = {}  # kernel name -> the last launch's compiled kernel (n_regs, n_spills), for tuning


def backward_module(score_mod: Mod | None, mask_mod: Mod | None, grad_buffers: frozenset[str]):
    parts = ("backward", score_mod.key if score_mod else "-", mask_mod.key if mask_mod else "-",
             ",".join(sorted(grad_buffers)))
    return load_generated("flex_bwd", _cache_key(parts), lambda: backward_source(score_mod, mask_mod, grad_buffers))


@functools.lru_cache(maxsize=256)  # a sha256 of the generator's version and the parts: once per variant, not per call
def _cache_key(parts: tuple[str, ...]) -> str:
    return cache_key(*parts)


def kernel_source_backward(score_mod: Mod | None, mask_mod: Mod | None,
                           grad_buffers: frozenset[str] = frozenset()) -> str:
    """The generated backward source, for reading."""
    return backward_source(score_mod, mask_mod, grad_buffers)


# ---------------------------------------------------------------- block tables


def _all_full_tables(rows: int, cols: int, device: torch.device):
    """Tables listing every tile FULL: attention without a block mask walks all of them."""
    num = torch.full((1, 1, rows), cols, dtype=torch.int32, device=device)
    idx = torch.arange(cols, dtype=torch.int32, device=device).expand(1, 1, rows, cols).contiguous()
    empty_num = torch.zeros_like(num)
    return empty_num, idx, num, idx


def _tables(block_mask: Any, q_major: bool, q_len: int, kv_len: int, sparse: tuple[int, int], device):
    """(num, idx, full_num, full_idx) as contiguous int32; missing FULL tables become empty ones.

    Made once per call plan (codegen/plans.py), which keeps them as long as its block mask lives."""
    if block_mask is None:
        n_q, n_kv = math.ceil(q_len / sparse[0]), math.ceil(kv_len / sparse[1])
        return _all_full_tables(n_kv if q_major else n_q, n_q if q_major else n_kv, device)
    prefix = "q" if q_major else "kv"
    num, idx = getattr(block_mask, f"{prefix}_num_blocks"), getattr(block_mask, f"{prefix}_indices")
    full_num, full_idx = getattr(block_mask, f"full_{prefix}_num_blocks"), getattr(block_mask, f"full_{prefix}_indices")
    if num is None:
        raise ValueError(f"the block mask has no {prefix}_num_blocks table; the backward pass needs it")
    if full_num is None:
        full_num, full_idx = torch.zeros_like(num), idx[..., :1]
    return tuple(t.to(device=device, dtype=torch.int32).contiguous() for t in (num, idx, full_num, full_idx))


def _table_args(names: tuple[str, ...], tables: tuple[torch.Tensor, ...]) -> dict[str, Any]:
    """`names` (a params.block_tables group's) -> the four tables' pointers and strides."""
    return dict(zip(names, table_args(*tables), strict=True))


def _bind_slot(group: Group, name: str, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """`group`'s names -> the per-call tensor `name` (a slot) and its strides."""
    return bind_tensor(group, Slot(name), tensors[name].stride())


# ---------------------------------------------------------------- launch


def default_config(dtype: torch.dtype, head_dim: int, sparse_mask: bool = False) -> BackwardConfig:
    return autotune.default_backward_config(32 if dtype == torch.float32 else 16, head_dim, sparse_mask)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)  # (triton.cdiv is a constexpr function: ~10 us a call on the host)


def choose_config(kernel_options: dict[str, Any] | None, sparse: tuple[int, int], dtype: torch.dtype,
                  head_dim: int, sparse_mask: bool = False) -> BackwardConfig:
    options = kernel_options or {}
    try:
        return _chosen_config(tuple(sorted(options.items())), sparse, dtype, head_dim, sparse_mask)
    except TypeError:  # an unhashable option value: decide without the memo
        return _chosen_config.__wrapped__(tuple(sorted(options.items())), sparse, dtype, head_dim, sparse_mask)


@functools.lru_cache(maxsize=256)  # on every backward call's path
def _chosen_config(option_items: tuple, sparse: tuple[int, int], dtype: torch.dtype, head_dim: int,
                   sparse_mask: bool) -> BackwardConfig:
    options = dict(option_items)
    base = default_config(dtype, head_dim, sparse_mask)
    blocks = {}
    for name in ("BLOCK_M1", "BLOCK_N1", "BLOCK_M2", "BLOCK_N2"):
        limit = sparse[0] if name.startswith("BLOCK_M") else sparse[1]
        blocks[name] = tile_size(options, name, getattr(base, name), limit)
    warps = {k: options["num_warps"] for k in ("warps_dkdv", "warps_dq") if "num_warps" in options}
    stages = {k: max(options["num_stages"], MIN_STAGES) for k in ("stages_dkdv", "stages_dq")
              if "num_stages" in options}
    return dataclasses.replace(base, **blocks, **warps, **stages)


def atomic_dq(kernel_options: dict[str, Any] | None) -> bool:
    """Whether dQ is added from the dK/dV kernel with atomics: kernel_options' BACKWARD_DQ (or the default),
    never under torch.use_deterministic_algorithms(True), which the separate dQ kernel serves."""
    scheme = (kernel_options or {}).get("BACKWARD_DQ", DEFAULT_BACKWARD_DQ)
    if scheme not in BACKWARD_DQ_SCHEMES:
        raise ValueError(f"kernel_options BACKWARD_DQ={scheme!r} must be one of {BACKWARD_DQ_SCHEMES}")
    return scheme == "atomic" and not torch.are_deterministic_algorithms_enabled()


def launch_parts(config: BackwardConfig, atomic: bool, kernel_options: dict[str, Any] | None) -> tuple[str, ...]:
    """flex_bwd's launches for `config`: the dK/dV part alone (atomic dQ), both parts in one launch, or one each.

    One launch lets the dQ programs fill the SMs the last dK/dV programs leave idle (two launches wait for the
    slowest dK/dV program), but it has one warp count, one pipeline depth and the larger part's registers.  So it is
    the default where each part's program fills an SM on its own (8 warps): H100, D=128, backward alone, one launch
    against two: no mask 13.46 / 13.64 ms, causal 7.00 / 7.12, softcap 8.39 / 8.62.  The 4-warp programs of D=64
    share an SM, and there the dQ programs lost residency to the dK/dV part's registers (causal 4.01 / 3.88 ms).
    kernel_options={"ONE_BACKWARD_LAUNCH": bool} forces it either way where the parts agree."""
    if atomic:
        return ("dkdv",)
    agree = (config.warps_dkdv, config.stages_dkdv) == (config.warps_dq, config.stages_dq)
    one = (kernel_options or {}).get("ONE_BACKWARD_LAUNCH", config.warps_dkdv >= 8)
    return ("dkdv+dq",) if one and agree else ("dkdv", "dq")


@functools.lru_cache(maxsize=64)  # on every call's path
def fallbacks(config: BackwardConfig) -> tuple[BackwardConfig, ...]:
    """The chosen config, then MIN_STAGES stages (codegen/forward.py says why no fewer), then halved tiles: a mod
    that gathers from tables can need more shared memory."""
    configs = [config, dataclasses.replace(config, stages_dkdv=MIN_STAGES, stages_dq=MIN_STAGES)]
    while max(configs[-1].BLOCK_N1, configs[-1].BLOCK_M2) > MIN_BLOCK:
        c = configs[-1]
        configs.append(dataclasses.replace(c, BLOCK_M1=max(c.BLOCK_M1 // 2, MIN_BLOCK),
                                           BLOCK_N1=max(c.BLOCK_N1 // 2, MIN_BLOCK),
                                           BLOCK_M2=max(c.BLOCK_M2 // 2, MIN_BLOCK),
                                           BLOCK_N2=max(c.BLOCK_N2 // 2, MIN_BLOCK)))
    return tuple(configs)


def _deterministic_partials(grads: dict[str, torch.Tensor], programs: int) -> dict[str, torch.Tensor]:
    """Zeroed [programs, *shape] float32 buffers, one slice per dQ program; raises when they would be too large.

    Under torch.use_deterministic_algorithms(True, warn_only=True) an oversized request warns and returns {}
    (the caller then uses atomics), as torch's own ops without a deterministic implementation do.
    """
    numel = sum(g.numel() for g in grads.values())
    needed = programs * numel * 4
    if needed > DETERMINISTIC_PARTIALS_LIMIT_BYTES:
        message = (f"flexcomp's Triton backward for captured-tensor gradients does not have a deterministic "
                   f"implementation within {DETERMINISTIC_PARTIALS_LIMIT_BYTES=} bytes ({programs=} dQ programs x "
                   f"{numel=} gradient elements x 4 bytes = {needed} bytes), but you set "
                   f"'torch.use_deterministic_algorithms(True)'. You can call torch.use_deterministic_algorithms(False) "
                   f"(or pass warn_only=True) to accept float32 atomics, use backend='reference', or raise "
                   f"flexcomp.codegen.backward.DETERMINISTIC_PARTIALS_LIMIT_BYTES.")
        if not torch.is_deterministic_algorithms_warn_only_enabled():
            raise BackendError(message)
        warnings.warn(message, stacklevel=5)
        return {}
    return {name: torch.zeros((programs, *g.shape), dtype=torch.float32, device=g.device) for name, g in grads.items()}


def _compiled_mask_mod(block_mask: Any) -> Mod | None:
    mask_mod = block_mask.mask_mod if block_mask is not None else None
    if mask_mod is not None and not isinstance(mask_mod, Mod):
        raise TypeError("the block mask's mask_mod must be a flexcomp Mod for the Triton backward")
    return mask_mod


def _score_buffers(score_mod: Mod | None, captured: dict[str, torch.Tensor] | None) -> list[tuple[str, Any]]:
    """(slot name, tensor) of the score_mod's captured tensors: those given (the autograd Function's saved inputs),
    else their current values."""
    if score_mod is None or not score_mod.buffers:
        return []
    if captured is None or any(spec.name not in captured for spec in score_mod.buffers):
        captured = {**score_mod.tensors(), **(captured or {})}
    out = []
    for spec in score_mod.buffers:
        t = captured[spec.name]
        out.append((f"score:{spec.name}", t.view(torch.uint8) if t.dtype == torch.bool else t))
    return out


_PLANS = PlanCache()


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

    `captured` maps the score_mod's buffer names to their tensors (default: the mod's current values; the
    mask_mod's are always its current ones); `grad_buffers` names the score_mod's float buffers to
    differentiate.  A repeated call reuses its plan (codegen/plans.py), as the forward does.
    """
    mask_mod = _compiled_mask_mod(block_mask)
    tensors = {"q": query, "k": key, "v": value, "out": out, "lse": lse.to(torch.float32).contiguous(),
               "do": grad_out, **dict(_score_buffers(score_mod, captured)), **dict(live_buffers(mask_mod, "mask:"))}
    if grad_lse is not None:
        tensors["dlse"] = grad_lse.to(torch.float32)
    grad_buffers = frozenset(grad_buffers)
    deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        plan_key = (tuple((name, layout(t)) for name, t in tensors.items()), id(score_mod), id(block_mask),
                    id(mask_mod), getattr(block_mask, "version", 0), scale, enable_gqa, options_key(kernel_options),
                    grad_buffers, deterministic,
                    deterministic and torch.is_deterministic_algorithms_warn_only_enabled())
    except TypeError:  # unhashable kernel_options: no plan kept
        plan_key = None
    plan = _PLANS.get(plan_key, block_mask) if plan_key is not None else None
    if plan is None:
        plan = BackwardPlan(tensors, score_mod, mask_mod, block_mask, scale, enable_gqa, kernel_options, grad_buffers)
        if plan_key is not None:
            _PLANS.put(plan_key, block_mask, plan)
    return plan.run(tensors)


class BackwardPlan:
    """Everything a backward call launches, for one key of codegen/plans.py: checked and decided once.

    The launches are prepared at the first run, from its tensors (an output's strides are those torch gives it)."""

    def __init__(self, tensors: dict[str, torch.Tensor], score_mod: Mod | None, mask_mod: Mod | None,
                 block_mask: Any, scale: float | None, enable_gqa: bool, kernel_options: dict[str, Any] | None,
                 grad_buffers: frozenset[str]):
        query, key, value = tensors["q"], tensors["k"], tensors["v"]
        B, Hq, Lq, D = query.shape
        Hkv, Lkv, Dv = key.shape[1], key.shape[2], value.shape[3]
        group = Hq // Hkv if enable_gqa else 1
        if Hq != Hkv * group:
            raise ValueError(f"{Hq=} != {Hkv=} * {group=}; pass enable_gqa=True for grouped-query attention")
        if query.dtype == torch.float64:
            raise TypeError("the Triton backward does not support float64; use backend='reference'")
        check_buffers([(n, t) for n, t in tensors.items() if ":" in n], query.device)
        self.mods = (score_mod, mask_mod)  # kept alive: the plan's key holds their ids
        self.scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
        self.dims, self.group = (B, Hq, Hkv, Lq, Lkv, D, Dv), group
        self.dtype, self.device = query.dtype, query.device
        sparse = block_size(block_mask) if block_mask is not None else (DEFAULT_SPARSE_BLOCK, DEFAULT_SPARSE_BLOCK)
        sparse_mask = block_mask is not None and is_sparse(block_mask, getattr(block_mask, "bounds", None))
        self.config = choose_config(kernel_options, sparse, query.dtype, max(D, Dv), sparse_mask)
        self.sparse_mask = sparse_mask
        self.atomic = atomic_dq(kernel_options)
        self.kernel_options = kernel_options
        if block_mask is None:  # the synthesized tables' tile: as small as the kernels' tiles, so no tile is wasted
            sparse = (max(self.config.BLOCK_M1, self.config.BLOCK_M2), max(self.config.BLOCK_N1, self.config.BLOCK_N2))
        self.sparse = sparse
        self.module = backward_module(score_mod, mask_mod, grad_buffers)
        # the tables each kernel walks, by their tiles: the block mask's, and where the config's tiles are smaller,
        # the same mask at those tiles (flexcomp.blockmask.refine_block_mask), dK/dV's q-major and dQ's kv-major
        self.q_tables = {sparse: _tables(block_mask, True, Lq, Lkv, sparse, query.device)}
        self.kv_tables = {sparse: _tables(block_mask, False, Lq, Lkv, sparse, query.device)} if not self.atomic else {}
        if block_mask is not None and refine_wanted(kernel_options):
            config, refined = self.config, {}
            wanted = [((config.BLOCK_M1, config.BLOCK_N1), self.q_tables)]
            wanted += [((config.BLOCK_M2, config.BLOCK_N2), self.kv_tables)] if not self.atomic else []
            for tiles, by_tiles in wanted:
                if tiles not in refined:
                    refined[tiles] = refine_block_mask(block_mask, tiles, B, Hq)
                if refined[tiles] is not None:
                    by_tiles[tiles] = _tables(refined[tiles], by_tiles is self.q_tables, Lq, Lkv, tiles, query.device)
        specs = score_mod.buffers if score_mod is not None else ()
        self.grad_specs = [s for s in specs if s.name in grad_buffers]
        self.grad_dtypes = {s.name: tensors[f"score:{s.name}"].dtype for s in self.grad_specs}
        self.deterministic = bool(self.grad_specs) and torch.are_deterministic_algorithms_enabled()
        self.launches: dict[tuple[str, bool, BackwardConfig | None], PreparedLaunch] = {}
        self.fitted: BackwardConfig | None = None  # the config that ran, once one has

    def run(self, tensors: dict[str, torch.Tensor]):
        B, Hq, _, Lq, _, D, Dv = self.dims
        lse = tensors["lse"]
        tensors["delta"], tensors["lse2"] = torch.empty_like(lse), torch.empty_like(lse)
        self._launch("delta", None, tensors)(tensors)
        dq, dk, dv = tensors["dq"], tensors["dk"], tensors["dv"] = (
            torch.empty_like(tensors["q"]), torch.empty_like(tensors["k"]), torch.empty_like(tensors["v"]))
        grads = {s.name: torch.zeros(s.shape, dtype=torch.float32, device=self.device) for s in self.grad_specs}
        tensors.update({f"grad:{name}": g for name, g in grads.items()})
        if self.atomic:  # dK/dV's float32 dQ sums
            tensors["dq_sums"] = torch.zeros((B, Hq, Lq, D), dtype=torch.float32, device=self.device)
        if self.fitted is not None:
            self._gradients(self.fitted, tensors)
        else:
            self.fitted = LAST_KERNELS["config"] = launch_first_fitting(
                fallbacks(self.config), lambda config: self._first_gradients(config, tensors),
                f"no backward launch configuration fits this GPU for {D=}, {Dv=}, {self.dtype}")
        if self.atomic:
            torch.mul(tensors["dq_sums"], self.scale, out=dq)  # scale and cast in one pass
        return dq, dk, dv, {name: g.to(self.grad_dtypes[name]) for name, g in grads.items()}

    def _first_gradients(self, config: BackwardConfig, tensors: dict[str, torch.Tensor]) -> None:
        """`_gradients` while fitting a config: every sum from zero (a retry after running out of resources must
        not add twice), and each compiled kernel remembered for tuning scripts."""
        for name, t in tensors.items():
            if name.startswith("grad:") or name == "dq_sums":
                t.zero_()
        self._gradients(config, tensors, record=True)

    def _gradients(self, config: BackwardConfig, tensors: dict[str, torch.Tensor], record: bool = False) -> None:
        """The dK/dV and (unless dK/dV adds dQ with atomics) dQ programs at `config`'s tiles, in one launch or two
        (`launch_parts`), and the captured tensors' gradients."""
        partials = {}
        if self.deterministic and not self.atomic:
            grads = {spec.name: tensors[f"grad:{spec.name}"] for spec in self.grad_specs}
            partials = _deterministic_partials(grads, self.dq_programs(config))
            tensors.update({f"partial:{name}": p for name, p in partials.items()})
        for parts in launch_parts(config, self.atomic, self.kernel_options):
            compiled = self._launch(parts, config, tensors, partials=bool(partials) and "dq" in parts)(tensors)
            if record:
                LAST_KERNELS[f"flex_bwd:{parts}"] = compiled
        for name, p in partials.items():
            torch.sum(p, 0, out=tensors[f"grad:{name}"])  # a fixed-order reduction over the programs' slices

    def dq_programs(self, config: BackwardConfig) -> int:
        B, Hq, _, Lq, _, _, _ = self.dims
        return _cdiv(Lq, config.BLOCK_M2) * B * Hq

    def _launch(self, kind: str, config: BackwardConfig | None, tensors: dict[str, torch.Tensor],
                partials: bool = False) -> PreparedLaunch:
        """The prepared launch of `kind` ("delta", or the parts "dkdv", "dq", "dkdv+dq") at `config`, made once;
        `partials`: the dQ programs add captured gradients into deterministic slices."""
        key = (kind, partials, config)
        launch = self.launches.get(key)
        if launch is None:
            if kind == "delta":
                launch = self._delta_launch(tensors)
            else:
                launch = self._gradient_launch(config, tensors, kind, partials)
            self.launches[key] = launch
        return launch

    def _delta_launch(self, tensors: dict[str, torch.Tensor]) -> PreparedLaunch:
        B, Hq, _, Lq, _, _, Dv = self.dims
        has_dlse = "dlse" in tensors
        dlse = slot_args("dlse", tensors["dlse"]) if has_dlse else [Slot("delta"), 0, 0, 0]
        return PreparedLaunch(
            self.module.flex_bwd_delta, (_cdiv(Lq, DELTA_BLOCK_M), B * Hq),
            [*slot_args("out", tensors["out"]), *slot_args("do", tensors["do"]), *dlse, Slot("lse"), Slot("delta"),
             Slot("lse2"), Lq, Hq],
            {"HAS_DLSE": has_dlse, "BLOCK_M": DELTA_BLOCK_M, "BLOCK_DV": max(16, next_power_of_2(Dv)), "DV": Dv,
             "EVEN_Q": Lq % DELTA_BLOCK_M == 0, "num_warps": 4})

    def _inputs_and_constants(self, tensors: dict[str, torch.Tensor]) -> tuple[dict[str, Any], list[Any], dict[str, Any]]:
        """(q, k, v, dO with their strides, by name; the captured tensors with theirs; the constexprs both kernels
        share)."""
        _, _, _, _, _, D, Dv = self.dims
        groups = ((Q_TENSOR, "q"), (K_TENSOR, "k"), (V_TENSOR, "v"), (BACKWARD_DO, "do"))
        qkvdo = {n: x for group, name in groups for n, x in _bind_slot(group, name, tensors).items()}
        mod_args = [x for name, t in tensors.items() if name.startswith(("score:", "mask:")) for x in slot_args(name, t)]
        constants = {"D": D, "DV": Dv, "BLOCK_D": max(16, next_power_of_2(D)), "BLOCK_DV": max(16, next_power_of_2(Dv)),
                     "GQA_GROUP": self.group,
                     "DOT_PRECISION": dot_precision(self.dtype, os.environ.get("TRITON_INTERPRET") == "1"),
                     # tanh on the MUFU unit for 16-bit inputs, as the forward (never under the interpreter: no asm)
                     "FAST_TANH": self.dtype in (torch.float16, torch.bfloat16) and self.device.type == "cuda"}
        return qkvdo, mod_args, constants

    def _gradient_launch(self, config: BackwardConfig, tensors: dict[str, torch.Tensor], parts: str,
                         partials: bool) -> PreparedLaunch:
        """flex_bwd running `parts` ("dkdv", "dq" or both, "dkdv+dq") on a 1-D grid, dK/dV programs first."""
        B, Hq, Hkv, Lq, Lkv, _, _ = self.dims
        dkdv, dq = "dkdv" in parts, "dq" in parts
        qkvdo, mod_args, constants = self._inputs_and_constants(tensors)
        constants["ROW_ALIGN"] = row_alignment(*((tensors[name].element_size(), tensors[name].stride())
                                                 for name in ("q", "k", "v", "do", "dq", "dk", "dv")))
        kv_tiles, q_tiles = _cdiv(Lkv, config.BLOCK_N1), _cdiv(Lq, config.BLOCK_M2)
        dkdv_programs = kv_tiles * B * Hkv if dkdv else 0
        q_sparse = walked_tiles(self.q_tables, (config.BLOCK_M1, config.BLOCK_N1), self.sparse)
        # the atomic scheme has no dQ programs and no kv-major tables: KV_TABLES, never read, get the q-major ones
        kv_sparse = walked_tiles(self.kv_tables, (config.BLOCK_M2, config.BLOCK_N2), self.sparse) if dq else q_sparse
        kv_tables = self.kv_tables[kv_sparse] if dq else self.q_tables[q_sparse]
        part_constants = {
            "DKDV_PART": dkdv, "SPARSE_Q1": q_sparse[0], "SPARSE_KV1": q_sparse[1], "BLOCK_M1": config.BLOCK_M1,
            "BLOCK_N1": config.BLOCK_N1, "EVEN_Q1": Lq % q_sparse[0] == 0, "EVEN_KV1": Lkv % config.BLOCK_N1 == 0,
            "PREFETCH_INDEX1": prefetch_index(config.stages_dkdv, config.warps_dkdv, self.sparse_mask,
                                              self.kernel_options),
            "ATOMIC_DQ": self.atomic,
            "DQ_PART": dq, "SPARSE_Q2": kv_sparse[0], "SPARSE_KV2": kv_sparse[1], "BLOCK_M2": config.BLOCK_M2,
            "BLOCK_N2": config.BLOCK_N2, "EVEN_Q2": Lq % config.BLOCK_M2 == 0, "EVEN_KV2": Lkv % kv_sparse[1] == 0,
            "PREFETCH_INDEX2": prefetch_index(config.stages_dq, config.warps_dq, self.sparse_mask, self.kernel_options),
            "DETERMINISTIC": partials,
        }
        grid = (dkdv_programs + (self.dq_programs(config) if dq else 0),)
        args, kwargs = BACKWARD.bind({
            **qkvdo, "LSE2": Slot("lse2"), "DELTA": Slot("delta"), "DQ_ACC": Slot("dq_sums" if self.atomic else "delta"),
            **_bind_slot(BACKWARD_DQ, "dq", tensors), **_bind_slot(BACKWARD_DK, "dk", tensors),
            **_bind_slot(BACKWARD_DV, "dv", tensors),
            **_table_args(Q_TABLE_NAMES, self.q_tables[q_sparse]), **_table_args(TABLE_NAMES, kv_tables),
            "mod_buffers": mod_args, "grad_buffers": self._grad_args(self.dq_programs(config) if partials else None),
            "sm_scale": self.scale, "Q_LEN": Lq, "KV_LEN": Lkv, "H_Q": Hq, "H_KV": Hkv,
            "dkdv_programs": dkdv_programs, "kv_tiles": kv_tiles, "q_tiles": q_tiles,
            **constants, **part_constants,
        })  # fmt: skip
        return PreparedLaunch(self.module.flex_bwd, grid, args, dict(
            kwargs, num_warps=config.warps_dkdv if dkdv else config.warps_dq,
            num_stages=config.stages_dkdv if dkdv else config.stages_dq))

    def _grad_args(self, programs: int | None) -> list[Any]:
        """Each gradient's buffer, its strides and its slice stride: the [programs, *shape] partials' when
        `programs` is given (deterministic mode), else the gradient's own and 0."""
        args = []
        for spec in self.grad_specs:
            if programs is not None:
                strides = contiguous_strides((programs, *spec.shape))
                args += [Slot(f"partial:{spec.name}"), *strides[1:], strides[0]]
            else:
                args += [Slot(f"grad:{spec.name}"), *contiguous_strides(tuple(spec.shape)), 0]
        return args
