"""Split-KV decoding (flash-decoding): a few query rows against a long kv cache, read at memory speed.

With Lq small, the forward's grid (q tiles x batch x query heads) has few programs, each re-reading its kv head's
whole cache: GQA's query heads read the same K/V tiles Hq/Hkv times, and B * Hq programs cannot fill the GPU.  The
decode kernel (`flex_decode_kernel`, generated beside the forward in codegen/forward_source.py) packs the query
heads that share a kv head and all their query rows into one tile of rows, so each K/V tile is read once, and cuts
each program's kv tile list into N_SPLITS parts run in parallel.  Each split writes its normalized output and
base-2 lse; `merge_splits` combines them exactly (a split with nothing unmasked has lse -inf and weight 0; a row
with nothing unmasked anywhere gets output 0 and lse -inf, as the forward).

Chosen for Lq <= DECODE_MAX_Q (and Lq within one q block of the block mask) unless kernel_options say otherwise:
torch's keys, BACKEND="TRITON_DECODE" forces it, BACKEND="TRITON" or FORCE_USE_FLEX_ATTENTION=True forbid it.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

from .autotune import MIN_BLOCK, DecodeConfig, default_decode_config, next_power_of_2, tile_size
from .launch import PreparedLaunch, Slot, launch_first_fitting
from .params import DECODE, TABLE_NAMES

# Query lengths up to this take the decode kernel by default (benchmarks/bench_decode.py measured the crossing;
# benchmarks/NOTES_decode.md).
DECODE_MAX_Q = 64
MAX_PACKED_ROWS = 128  # rows of one program's tile: query heads packed x query rows
MIN_TILES_PER_SPLIT = 4  # a split shorter than this spends more on its epilogue and the merge than it saves
PROGRAMS_PER_SM = 2  # splits are added until the grid covers the SMs this many times over


@dataclass(frozen=True)
class DecodeShape:
    """What the decision needs: lengths, heads, the block mask's q block and whether its tiles vary by head."""

    batch: int
    q_heads: int
    q_len: int
    kv_len: int
    gqa_group: int
    sparse_q: int
    tiles_per_head: bool


def decode_wanted(shape: DecodeShape, kernel_options: dict | None) -> bool:
    """Whether the call takes the decode kernel (raises where kernel_options force it and it cannot)."""
    options = kernel_options or {}
    backend = options.get("BACKEND", "AUTO")
    if backend == "TRITON_DECODE":
        why = why_not_decode(shape)
        if why:
            raise ValueError(
                f"kernel_options BACKEND='TRITON_DECODE', but the decode kernel cannot run this call: {why}"
            )
        return True
    if backend != "AUTO" or options.get("FORCE_USE_FLEX_ATTENTION"):
        return False
    return shape.q_len <= DECODE_MAX_Q and not why_not_decode(shape)


def why_not_decode(shape: DecodeShape) -> str:
    if shape.q_len > MAX_PACKED_ROWS:
        return f"Lq={shape.q_len} is over {MAX_PACKED_ROWS} rows"
    if shape.q_len > shape.sparse_q:
        return f"Lq={shape.q_len} spans more than one q block of the block mask (BLOCK_SIZE {shape.sparse_q})"
    return ""


def heads_packed(shape: DecodeShape) -> int:
    """The most query heads of one kv head whose rows fit a tile; 1 where the block mask differs by head (each
    head walks its own tiles)."""
    if shape.tiles_per_head:
        return 1
    pack = shape.gqa_group
    while pack > 1 and (pack * shape.q_len > MAX_PACKED_ROWS or shape.gqa_group % pack):
        pack -= 1
    return pack


def split_count(programs: int, kv_tiles: int, device: torch.device, kernel_options: dict | None) -> int:
    """Splits per (batch, head pack): enough programs to cover the SMs PROGRAMS_PER_SM times, each split at
    least MIN_TILES_PER_SPLIT kv tiles long.  A power of two, so that the merge reads whole tiles."""
    wanted = (kernel_options or {}).get("NUM_SPLITS")
    if wanted is not None:
        if not isinstance(wanted, int) or wanted < 1 or wanted & (wanted - 1):
            raise ValueError(f"kernel_options NUM_SPLITS={wanted!r} must be a power of two")
        return wanted
    target = -(-PROGRAMS_PER_SM * _sm_count(device) // max(programs, 1))
    splits = max(1, min(target, kv_tiles // MIN_TILES_PER_SPLIT))
    return 1 << (splits.bit_length() - 1)


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a few splits, so tests cover the merge
    return torch.cuda.get_device_properties(device).multi_processor_count


class DecodeLaunch:
    """The decode kernel's launches for one call plan (codegen/forward.py ForwardPlan decides when).

    `values` and `constexprs` are the forward plan's, by the names both declarations share (codegen/params.py);
    the tables are the block mask's own (the decode kernel walks whole sparse blocks: no refined tables)."""

    def __init__(self, module: Any, shape: DecodeShape, dims: tuple[int, int], dtype: torch.dtype,
                 device: torch.device, values: dict[str, Any], constexprs: dict[str, Any],
                 tables: tuple[bool, list[Any]], sparse_kv: int, kernel_options: dict | None):  # fmt: skip
        self.kernel, self.shape, self.dv, self.device = module.flex_decode_kernel, shape, dims[1], device
        self.config = decode_config(dtype, max(*dims, MIN_BLOCK), sparse_kv, kernel_options)
        self.pack = heads_packed(shape)
        programs = shape.batch * shape.q_heads // self.pack
        self.splits = split_count(programs, -(-shape.kv_len // self.config.block_n), device, kernel_options)
        if self.splits == 1 and self.config.unsplit_stages and "num_stages" not in (kernel_options or {}):
            self.config = dataclasses.replace(self.config, num_stages=self.config.unsplit_stages)
        has_full, table_values = tables
        self.args, self.kwargs = DECODE.bind({
            **values, **constexprs, **dict(zip(TABLE_NAMES, table_values, strict=True)),
            "O_PART": Slot("o_part"), "L2_PART": Slot("l2_part"),
            "PACK": self.pack, "N_SPLITS": self.splits, "HAS_FULL": has_full,
            "SPARSE_KV": sparse_kv, "TILES_PER_BLOCK": sparse_kv // self.config.block_n,
            "BLOCK_M": max(next_power_of_2(self.pack * shape.q_len), MIN_BLOCK), "BLOCK_N": self.config.block_n,
            "EVEN_KV": shape.kv_len % sparse_kv == 0 and not values.get("PAGE_SIZE"),  # a paged request ends anywhere
        })  # fmt: skip
        self.grid = (self.splits, programs)
        self.launch: PreparedLaunch | None = None
        self.merge = merge_launch(shape, self.dv, self.splits, values) if self.splits > 1 else None

    def run(self, tensors: dict[str, torch.Tensor]) -> None:
        """Attend into tensors["out"] and tensors["lse"] (allocated by the caller)."""
        parts = (self.shape.batch, self.shape.q_heads, self.shape.q_len, self.splits)
        split = self.merge is not None  # else the kernel writes out and lse itself
        tensors["o_part"] = torch.empty((*parts, self.dv) if split else (1,), dtype=torch.float32, device=self.device)
        tensors["l2_part"] = torch.empty(parts if split else (1,), dtype=torch.float32, device=self.device)
        if self.launch is None:
            self.launch = self._first_launch(tensors)
        else:
            self.launch(tensors)
        if split:
            self.merge(tensors)

    def _first_launch(self, tensors: dict[str, torch.Tensor]) -> PreparedLaunch:
        """Launch at the config, or with fewer stages where it does not fit (a mod gathering from tables)."""
        launches = {stages: PreparedLaunch(self.kernel, self.grid, self.args,
                                           dict(self.kwargs, num_warps=self.config.num_warps, num_stages=stages))
                    for stages in dict.fromkeys((self.config.num_stages, 2))}  # fmt: skip
        stages = launch_first_fitting(launches, lambda s: launches[s](tensors),
                                      f"no decode launch fits this GPU at {self.config}")  # fmt: skip
        return launches[stages]


def decode_config(dtype: torch.dtype, head_dim: int, sparse_kv: int, kernel_options: dict | None) -> DecodeConfig:
    """The default for the dtype and head dim (codegen/autotune.py DECODE_CONFIGS), less what kernel_options set."""
    base = default_decode_config(32 if dtype == torch.float32 else 16, head_dim)
    options = kernel_options or {}
    block_n = tile_size(options, "BLOCK_N", base.block_n, sparse_kv)
    stages = max(options.get("num_stages", base.num_stages), 2)
    return DecodeConfig(block_n, options.get("num_warps", base.num_warps), stages, base.unsplit_stages)


def merge_launch(shape: DecodeShape, dv: int, splits: int, values: dict[str, Any]) -> PreparedLaunch:
    """out, lse <- the splits' outputs weighted by their share of the row's softmax mass (exact log-sum-exp).
    Prepared once: through Triton's own launch path its host time (~20 us) outlasted short decode steps."""
    out_strides = [values[n] for n in ("stride_ob", "stride_oh", "stride_om", "stride_od")]
    lse_strides = [values[n] for n in ("stride_lb", "stride_lh", "stride_lm")]
    args = [Slot("o_part"), Slot("l2_part"), Slot("out"), *out_strides, Slot("lse"), *lse_strides, shape.q_heads,
            shape.q_len]  # fmt: skip
    constexprs = {"N_SPLITS": splits, "DV": dv, "BLOCK_DV": max(next_power_of_2(dv), MIN_BLOCK), "num_warps": 4}
    return PreparedLaunch(merge_splits, (shape.batch * shape.q_heads * shape.q_len,), args, constexprs)


@triton.jit
def merge_splits(
    O_PART,
    L2_PART,
    Out,
    stride_ob,
    stride_oh,
    stride_om,
    stride_od,
    Lse,
    stride_lb,
    stride_lh,
    stride_lm,
    H_Q,
    Q_LEN,
    N_SPLITS: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # one (batch, query head, query row)
    q = row % Q_LEN
    h = (row // Q_LEN) % H_Q
    b = row // (Q_LEN * H_Q)
    splits = tl.arange(0, N_SPLITS)
    cols = tl.arange(0, BLOCK_DV)
    lse2 = tl.load(L2_PART + row * N_SPLITS + splits)
    m = tl.max(lse2, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    weight = tl.math.exp2(lse2 - m_safe)  # 0 for splits with nothing unmasked
    total = tl.sum(weight, 0)
    parts = tl.load(O_PART + (row * N_SPLITS + splits)[:, None] * DV + cols[None, :], mask=cols[None, :] < DV)
    empty = total == 0.0
    out = tl.sum(parts * weight[:, None], 0) / tl.where(empty, 1.0, total)
    tl.store(
        Out + b * stride_ob + h * stride_oh + q * stride_om + cols * stride_od,
        out.to(Out.dtype.element_ty),
        mask=cols < DV,
    )
    lse = tl.where(empty, float("-inf"), (m_safe + tl.math.log2(tl.where(empty, 1.0, total))) * 0.6931471805599453)
    tl.store(Lse + b * stride_lb + h * stride_lh + q * stride_lm, lse)
