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
import inspect
import textwrap
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
    """What the decision needs: lengths, heads, the block mask's q block, whether its tiles vary by head and whether
    the call asks for max_scores (return_aux), which only the forward kernel writes."""

    batch: int
    q_heads: int
    q_len: int
    kv_len: int
    gqa_group: int
    sparse_q: int
    tiles_per_head: bool
    output_max: bool = False


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
    if shape.output_max:
        return "return_aux asks for max_scores, which only the forward kernel computes"
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
            "O_PART": Slot("o_part"), "L2_PART": Slot("l2_part"), "ARRIVALS": Slot("arrivals"),
            "PACK": self.pack, "N_SPLITS": self.splits, "HAS_FULL": has_full,
            "FUSED_MERGE": fused_merge(kernel_options) and self.splits > 1,
            "SPARSE_KV": sparse_kv, "TILES_PER_BLOCK": sparse_kv // self.config.block_n,
            "BLOCK_M": max(next_power_of_2(self.pack * shape.q_len), MIN_BLOCK), "BLOCK_N": self.config.block_n,
            "EVEN_KV": shape.kv_len % sparse_kv == 0 and not values.get("PAGE_SIZE"),  # a paged request ends anywhere
        })  # fmt: skip
        self.grid = (self.splits, programs)
        self.launch: PreparedLaunch | None = None
        self.merge = None  # the separate merge launch, where the splits do not merge themselves
        if self.splits > 1 and not self.kwargs["FUSED_MERGE"]:
            self.merge = merge_launch(shape, self.dv, self.splits, values)
        if self.kwargs["FUSED_MERGE"]:
            reserve_graph_counters(device, programs)

    def run(self, tensors: dict[str, torch.Tensor]) -> None:
        """Attend into tensors["out"] and tensors["lse"] (allocated by the caller)."""
        parts = (self.shape.batch, self.shape.q_heads, self.shape.q_len, self.splits)
        split = self.splits > 1  # else the kernel writes out and lse itself
        tensors["o_part"] = torch.empty((*parts, self.dv) if split else (1,), dtype=torch.float32, device=self.device)
        tensors["l2_part"] = torch.empty(parts if split else (1,), dtype=torch.float32, device=self.device)
        fused = self.kwargs["FUSED_MERGE"]
        tensors["arrivals"] = arrival_counters(self.device, self.grid[1]) if fused else tensors["l2_part"]
        if self.launch is None:
            self.launch = self._first_launch(tensors)
        else:
            self.launch(tensors)
        if self.merge is not None:
            self.merge(tensors)

    def _first_launch(self, tensors: dict[str, torch.Tensor]) -> PreparedLaunch:
        """Launch at the config, or with fewer stages where it does not fit (a mod gathering from tables)."""
        launches = {stages: PreparedLaunch(self.kernel, self.grid, self.args,
                                           dict(self.kwargs, num_warps=self.config.num_warps, num_stages=stages))
                    for stages in dict.fromkeys((self.config.num_stages, 2))}  # fmt: skip
        stages = launch_first_fitting(launches, lambda s: launches[s](tensors),
                                      f"no decode launch fits this GPU at {self.config}")  # fmt: skip
        return launches[stages]


MERGES = ("fused", "separate")


def fused_merge(kernel_options: dict | None) -> bool:
    """Whether the last split of each row tile merges the splits (kernel_options DECODE_MERGE "fused", the
    default) or a second launch does ("separate"; kept for the A/B in benchmarks/bench_decode.py --probe-window)."""
    merge = (kernel_options or {}).get("DECODE_MERGE", "fused")
    if merge not in MERGES:
        raise ValueError(f"kernel_options DECODE_MERGE={merge!r} must be one of {MERGES}")
    return merge == "fused"


# The fused merge's arrival counters: int32, one per program of a split, zero between launches, with no memset.
# Why that holds: the kernel zeroes every counter it counted on (the last split of a row tile, once all have
# arrived), so a launch leaves its buffer as it found it, and two launches on one buffer must only not overlap:
# - eager calls: one buffer per (device, stream); launches on one stream run one after the other, and each stream
#   has its own, so calls on two streams may overlap.
# - CUDA graphs: one buffer per device for every capture, zeroed before the capture (by the plan, made at the
#   warm-up call torch requires before capturing): a graph replays without a memset node.  Graphs with decode calls
#   must then not be replayed at once on two streams (DECODE_MERGE="separate" there).  A plan first called inside a
#   capture gets zeros made in the graph (a memset node each replay: correct, slower).
# A buffer is never freed (a grown one is kept beside its successor): a captured graph holds its address for life.
GRAPHS = -1  # the stream key of the buffer captures use
_ARRIVALS: dict[tuple[torch.device, int], torch.Tensor] = {}
_RETIRED: list[torch.Tensor] = []


def arrival_counters(device: torch.device, count: int) -> torch.Tensor:
    """At least `count` int32 counters, zero, for a launch on the current stream of `device` (see above)."""
    if device.type != "cuda":
        return _counters((device, 0), count)  # the interpreter: one program at a time
    if torch.cuda.is_current_stream_capturing():
        counters = _ARRIVALS.get((device, GRAPHS))
        if counters is None or counters.numel() < count:
            return torch.zeros(count, dtype=torch.int32, device=device)  # a memset inside the graph
        return counters
    index = torch.cuda.current_device() if device.index is None else device.index
    return _counters((device, torch._C._cuda_getCurrentRawStream(index)), count)


def reserve_graph_counters(device: torch.device, count: int) -> None:
    """Make the captures' buffer hold `count` counters (outside a capture: zeroed now, before any graph uses it)."""
    if device.type == "cuda" and not torch.cuda.is_current_stream_capturing():
        _counters((device, GRAPHS), count)


def _counters(key: tuple[torch.device, int], count: int) -> torch.Tensor:
    counters = _ARRIVALS.get(key)
    if counters is None or counters.numel() < count:
        if counters is not None:
            _RETIRED.append(counters)
        size = max(next_power_of_2(count), 1024)  # doubling: what is retired stays under what is in use
        counters = _ARRIVALS[key] = torch.zeros(size, dtype=torch.int32, device=key[0])
    return counters


def decode_config(dtype: torch.dtype, head_dim: int, sparse_kv: int, kernel_options: dict | None) -> DecodeConfig:
    """The default for the dtype and head dim (codegen/autotune.py DECODE_CONFIGS), less what kernel_options set."""
    base = default_decode_config(32 if dtype == torch.float32 else 16, head_dim)
    options = kernel_options or {}
    block_n = tile_size(options, "BLOCK_N", base.block_n, sparse_kv)
    stages = max(options.get("num_stages", base.num_stages), 2)
    return DecodeConfig(block_n, options.get("num_warps", base.num_warps), stages, base.unsplit_stages)


def merge_launch(shape: DecodeShape, dv: int, splits: int, values: dict[str, Any]) -> PreparedLaunch:
    """out, lse <- the splits' partials (merge_partials) in a launch of its own: the A/B twin of the fused merge.
    Prepared once: through Triton's own launch path its host time (~20 us) outlasted short decode steps."""
    out_strides = [values[n] for n in ("stride_ob", "stride_oh", "stride_om", "stride_od")]
    lse_strides = [values[n] for n in ("stride_lb", "stride_lh", "stride_lm")]
    rows = shape.batch * shape.q_heads * shape.q_len
    args = [Slot("o_part"), Slot("l2_part"), Slot("out"), *out_strides, Slot("lse"), *lse_strides, shape.q_heads,
            shape.q_len, rows]  # fmt: skip
    constexprs = {"N_SPLITS": splits, "ROWS": MERGE_ROWS, "DV": dv, "BLOCK_DV": max(next_power_of_2(dv), MIN_BLOCK),
                  "num_warps": 4}  # fmt: skip
    return PreparedLaunch(merge_splits, (-(-rows // MERGE_ROWS),), args, constexprs)


MERGE_ROWS = 16  # rows of [B, H_Q, Q_LEN] per program of the separate merge


@triton.jit
def merge_partials(O_PART, L2_PART, part_row, row_in, N_SPLITS: tl.constexpr, ROWS: tl.constexpr, DV: tl.constexpr,
                   BLOCK_DV: tl.constexpr):  # fmt: skip
    """(out float32 [ROWS, BLOCK_DV], lse in natural log [ROWS]) of the rows whose partials start at
    part_row * N_SPLITS in the workspaces: each split weighted by its share of the row's softmax mass (exact
    log-sum-exp; a split with nothing unmasked has lse -inf and weight 0; a row with nothing anywhere gets 0 and
    -inf).  Loads bypass L1 (.cg): in the fused merge other programs wrote them, and L1 is not coherent.
    Both merges call this one function (pasted into the generated kernels' module): the same arithmetic, equal up
    to the order a reduction takes in the compiled code (fp32 rounding)."""
    splits = tl.arange(0, N_SPLITS)
    cols = tl.arange(0, BLOCK_DV)
    lse2 = tl.load(L2_PART + part_row[:, None] * N_SPLITS + splits[None, :], mask=row_in[:, None],
                   other=float("-inf"), cache_modifier=".cg")  # fmt: skip
    m = tl.max(lse2, 1)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    weight = tl.math.exp2(lse2 - m_safe[:, None])
    total = tl.sum(weight, 1)
    acc = tl.zeros([ROWS, BLOCK_DV], dtype=tl.float32)
    for s in range(N_SPLITS):
        w = tl.sum(tl.where(splits[None, :] == s, weight, 0.0), 1)  # column s of weight
        part = tl.load(O_PART + (part_row * N_SPLITS + s)[:, None] * DV + cols[None, :],
                       mask=row_in[:, None] & (cols[None, :] < DV), other=0.0, cache_modifier=".cg")  # fmt: skip
        acc += part * w[:, None]
    empty = total == 0.0
    out = acc / tl.where(empty, 1.0, total)[:, None]
    lse = tl.where(empty, float("-inf"), (m_safe + tl.math.log2(tl.where(empty, 1.0, total))) * 0.6931471805599453)
    return out, lse


MERGE_SOURCE = textwrap.dedent(inspect.getsource(merge_partials.fn))  # for the generated module (forward_source.py)


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
    N_ROWS,
    N_SPLITS: tl.constexpr,
    ROWS: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_DV: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # rows of [B, H_Q, Q_LEN]
    row_in = rows < N_ROWS
    out, lse = merge_partials(O_PART, L2_PART, rows, row_in, N_SPLITS, ROWS, DV, BLOCK_DV)
    q = rows % Q_LEN
    h = (rows // Q_LEN) % H_Q
    b = rows // (Q_LEN * H_Q)
    cols = tl.arange(0, BLOCK_DV)
    out_ptrs = Out + (b * stride_ob + h * stride_oh + q * stride_om)[:, None] + cols[None, :] * stride_od
    tl.store(out_ptrs, out.to(Out.dtype.element_ty), mask=row_in[:, None] & (cols[None, :] < DV))
    tl.store(Lse + b * stride_lb + h * stride_lh + q * stride_lm, lse, mask=row_in)
