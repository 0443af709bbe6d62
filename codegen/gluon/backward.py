"""An attention backward in Gluon for Hopper (sm_90), no mods (causal or not): dq, dk, dv (issue 22's last step).

    dq, dk, dv = attention_backward(q, k, v, out, do, lse, causal=True)   # lse: attention_forward's (natural log)

Three launches, flexcomp's backward structure (codegen/backward_source.py) written by hand:

* `_preprocess`: delta = rowsum(dO * O) in float32, and lse in base 2 (lse * log2 e), one row per thread row;
* the dK/dV kernel (`_backward`, KV_SIDE): one CTA of 8 warps per 128-row kv tile.  K and V stay in shared memory;
  the q tiles (Q and dO, 64 rows) stream through a STAGES-deep TMA ring, one "ready" mbarrier per slot, refilled by
  the same warps once the step that read the slot retired.  Its tiles are [kv, q]: S^T = K Q^T and dP^T = V dO^T
  (async wgmmas from shared memory), P^T = exp2(S^T * scale * log2 e - lse2), dV += P^T dO with P^T a register
  operand, dS^T = P^T (dP^T - delta), dK += dS^T Q.  No register transpose: the [kv, q] orientation makes P^T and
  dS^T the A operands as they come out of the softmax;
* the dQ kernel (`_backward`, not KV_SIDE): one CTA of 8 warps per 128-row q tile, Q and dO resident, K and V
  streamed: S = Q K^T, dP = dO V^T, P, dS as above, dQ += dS K.

A separate dQ kernel, not atomic dQ from the dK/dV kernel: it costs 2 more matmuls of the 7 (S and dP recomputed),
but it needs no dS transpose (dQ = dS K wants dS, the dK/dV kernel holds dS^T: a pass through shared memory and a
permuted A operand per step), no float32 dQ buffer with its B*H*L*D atomics and conversion launch, and it is
deterministic.  Both kernels are one @gluon.jit function (`_backward`) with the side a constexpr: the resident pair
(X1, X2) and the streamed pair (Y1, Y2) give T1 = X1 Y1^T and T2 = X2 Y2^T on either side.

Every wgmma retires inside its step (an accumulator in flight across the loop's back edge makes ptxas serialize
all of them, C7514; see benchmarks/NOTES_forward.md).  Inside a dK/dV step: T1, T2 issued together; T1 retired,
P^T computed while T2 runs; dV += P^T dO issued; T2 retired, dS^T computed while dV's wgmma runs; dK += dS^T Q
issued; both retired.  The dQ step overlaps the same way, with dQ += dS K last.  No warp specialization yet
(version B of the forward is the model for a next step: a producer warp and ping-pong consumers).

Compile-checked for sm_90 with Triton 3.6 (benchmarks/gluon_backward.py --compile-only); not dispatched from
flexcomp.  lse is natural-log, as attention_forward (codegen/gluon/attention.py) and flexcomp's forward return it.
"""

from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from .attention import (
    DTYPES,
    LOG2E,
    _descriptor,
    _descriptor_type,
    _fill_ring,
    _invalidate_barriers,
    _issue_kv,
    _mma_layout,
    _ready_barriers,
    _ring,
    compile_sm90,
)

LOG2E_GL = gl.constexpr(LOG2E)
PREPROCESS_ROWS = 128  # rows of one _preprocess program; the [B*H*L] rows are a multiple (L is a multiple of 128)


def tile_config(head_dim: int, tiles: dict | None = None) -> dict:
    """Tiles of both kernels.  RESIDENT: rows a CTA keeps (its kv tile on the dK/dV side, its q tile on the dQ
    side); STREAMED: rows of one ring tile.  8 warps: two warpgroups of 64 resident rows each.  Registers per thread
    on the dK/dV side at D=128: dK and dV 64 + 64, S^T and dP^T 32 + 32, P^T and dS^T as bf16 operands 16 + 16
    (under 255, the cap at 256 threads).  Shared memory at D=128: K and V 64 KiB + 3 stages of Q and dO at 32 KiB
    = 160 KiB; the dQ side the same (Q and dO 64 KiB, K and V tiles of 64 rows).  `tiles` overrides entries
    (an A/B run: {"STREAMED": 32}), for both kernels."""
    assert head_dim in (64, 128), f"{head_dim=} must be 64 or 128"
    return {"RESIDENT": 128, "STREAMED": 64, "STAGES": 3 if head_dim == 128 else 4, "num_warps": 8} | (tiles or {})


# ---------------------------------------------------------------- preprocess: delta and base-2 lse


@gluon.jit
def _preprocess(o_ptr, do_ptr, lse_ptr, delta_ptr, lse2_ptr, HEAD_DIM: gl.constexpr, ROWS: gl.constexpr):
    """delta = rowsum(dO * O) (float32) and lse2 = lse * log2 e for ROWS rows of the [B*H*L, D] view."""
    layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [gl.num_warps(), 1], [1, 0])
    rows = gl.program_id(0) * ROWS + gl.arange(0, ROWS, gl.SliceLayout(1, layout))
    cols = gl.arange(0, HEAD_DIM, gl.SliceLayout(0, layout))
    offsets = rows[:, None] * HEAD_DIM + cols[None, :]
    o = gl.load(o_ptr + offsets).to(gl.float32)
    do = gl.load(do_ptr + offsets).to(gl.float32)
    gl.store(delta_ptr + rows, gl.sum(o * do, 1))
    gl.store(lse2_ptr + rows, gl.load(lse_ptr + rows) * LOG2E_GL)


# ---------------------------------------------------------------- the dK/dV and dQ kernels


@gluon.jit
def _tile_range(seq_len, RESIDENT: gl.constexpr, STREAMED: gl.constexpr, KV_SIDE: gl.constexpr, CAUSAL: gl.constexpr):
    """(this CTA's first resident row in the [B*H*L, D] view, its head's first row, its resident offset in the
    sequence, and the streamed tiles lo <= t < hi it visits, split at mid).  Causal: on the dK/dV side the q tiles
    [lo, mid) cross the diagonal (masked) and [mid, hi) lie below it; on the dQ side the kv tiles [lo, mid) lie left
    of it and [mid, hi) cross it.  Grid axis 0 walks one head's tiles (the resident CTAs share its rows in L2);
    causal launches the longest walks first."""
    block = gl.program_id(0)
    bh = gl.program_id(1)
    n_streamed = seq_len // STREAMED
    if CAUSAL and not KV_SIDE:
        block = gl.num_programs(0) - 1 - block  # the last q tiles see the most kv tiles
    start = block * RESIDENT
    lo = 0
    mid = 0
    hi = n_streamed
    if CAUSAL:
        if KV_SIDE:  # q tiles with a row at or below kv row `start`; masked while a row lies above the tile's last
            lo = start // STREAMED
            mid = gl.minimum(gl.cdiv(start + RESIDENT, STREAMED), n_streamed)
        else:  # kv tiles with a column at or left of the tile's last row; masked from the first row's tile on
            mid = start // STREAMED
            hi = gl.minimum(gl.cdiv(start + RESIDENT, STREAMED), n_streamed)
    return bh * seq_len + start, bh * seq_len, start, lo, mid, hi


@gluon.jit
def _causal_keep(t, res_start, str_start, KV_SIDE: gl.constexpr):
    """Where q >= kv in a [resident, streamed] tile (rows are kv on the dK/dV side, q on the dQ side)."""
    rows = res_start + gl.arange(0, t.shape[0], gl.SliceLayout(1, t.type.layout))
    cols = str_start + gl.arange(0, t.shape[1], gl.SliceLayout(0, t.type.layout))
    if KV_SIDE:
        return cols[None, :] >= rows[:, None]
    else:
        return rows[:, None] >= cols[None, :]


@gluon.jit
def _operand(x, acc_layout: gl.constexpr, dtype: gl.constexpr):
    """A [resident, streamed] float32 tile as the register A operand of a wgmma into `acc_layout`."""
    return gl.convert_layout(x.to(dtype), gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2))


@gluon.jit
def _step(i, acc1, acc2, ring, stats, res_start, qk_scale, KV_SIDE: gl.constexpr, MASKED: gl.constexpr):
    """Streamed tile i: T1 = X1 Y1^T, T2 = X2 Y2^T, P = exp2(T1 * qk_scale - lse2), dS = P (T2 - delta);
    dK/dV side: acc1 (dK) += dS^T Q, acc2 (dV) += P^T dO; dQ side: acc1 (dQ) += dS K (acc2 unused).  Every wgmma
    retires before the return; then the slot takes the ring's tile i - lo + STAGES."""
    x1, x2, y1_ring, y2_ring, ready, y1_desc, y2_desc, head_row, lo, hi = ring
    lse2_ptr, delta_ptr = stats
    STAGES: gl.constexpr = y1_ring.shape[0]
    STREAMED: gl.constexpr = y1_ring.shape[1]
    RESIDENT: gl.constexpr = x1.shape[0]
    t_layout: gl.constexpr = _mma_layout(gl.num_warps(), STREAMED)
    r = i - lo
    slot = r % STAGES
    str_start = i * STREAMED
    if KV_SIDE:  # the streamed tile's q rows: per column of the [kv, q] tile
        q_idx = head_row + str_start + gl.arange(0, STREAMED, gl.SliceLayout(0, t_layout))
        lse2 = gl.load(lse2_ptr + q_idx)[None, :]
    else:  # the resident q rows
        lse2 = _stats_rows(lse2_ptr, head_row + res_start, RESIDENT, t_layout)
    mbarrier.wait(ready.index(slot), (r // STAGES) & 1)
    y1 = y1_ring.index(slot)
    y2 = y2_ring.index(slot)
    zero = gl.zeros([RESIDENT, STREAMED], gl.float32, t_layout)
    t1_tok = warpgroup_mma(x1, y1.permute((1, 0)), zero, use_acc=False, is_async=True)
    t2_tok = warpgroup_mma(x2, y2.permute((1, 0)), zero, use_acc=False, is_async=True)
    t1 = warpgroup_mma_wait(1, deps=(t1_tok,))
    p = gl.exp2(t1 * qk_scale - lse2)
    if MASKED:
        p = gl.where(_causal_keep(p, res_start, str_start, KV_SIDE), p, 0.0)
    acc_layout: gl.constexpr = acc1.type.layout
    # delta loaded once P is out: with lse2 (16 columns a thread each) live across the wgmmas, the causal dK/dV
    # kernel at D=128 spilled
    if KV_SIDE:
        delta = gl.load(delta_ptr + q_idx)[None, :]
    else:
        delta = _stats_rows(delta_ptr, head_row + res_start, RESIDENT, t_layout)
    if KV_SIDE:  # dV += P^T dO runs while dS^T is computed
        acc2_tok = warpgroup_mma(_operand(p, acc_layout, y2.dtype), y2, acc2, is_async=True)
        t2 = warpgroup_mma_wait(1, deps=(t2_tok,))
    else:
        t2 = warpgroup_mma_wait(0, deps=(t2_tok,))
    ds = p * (t2 - delta)
    acc1_tok = warpgroup_mma(_operand(ds, acc_layout, y1.dtype), y1, acc1, is_async=True)
    if KV_SIDE:
        acc1, acc2 = warpgroup_mma_wait(0, deps=(acc1_tok, acc2_tok))
    else:
        acc1 = warpgroup_mma_wait(0, deps=(acc1_tok,))
    # both warpgroups are done with the slot (the barrier): it takes the ring's tile r + STAGES
    gl.thread_barrier()
    refill = r + STAGES
    row = head_row + (lo + refill) * STREAMED
    _issue_kv(y1_desc, y2_desc, row, ready.index(slot), y1_ring.index(slot), y2_ring.index(slot), lo + refill < hi)
    return acc1, acc2


@gluon.jit
def _stats_rows(ptr, row, RESIDENT: gl.constexpr, t_layout: gl.constexpr):
    """lse2 or delta of the resident q rows, broadcast along the columns of a [q, kv] tile."""
    return gl.load(ptr + row + gl.arange(0, RESIDENT, gl.SliceLayout(1, t_layout)))[:, None]


@gluon.jit
def _store_tile(acc, scale, x_smem, out_desc, row):
    """acc * scale in the output's dtype through shared memory (a resident tile's buffer, no longer read) and TMA."""
    x_smem.store((acc * scale).to(x_smem.dtype))
    fence_async_shared()
    tma.async_copy_shared_to_global(out_desc, [row, 0], x_smem)


@gluon.jit
def _backward(
    x1_desc,
    x2_desc,
    y1_desc,
    y2_desc,
    out1_desc,
    out2_desc,
    lse2_ptr,
    delta_ptr,
    qk_scale,
    sm_scale,
    seq_len,
    KV_SIDE: gl.constexpr,
    CAUSAL: gl.constexpr,
    STAGES: gl.constexpr,
):
    """dK/dV side (KV_SIDE): X = (K, V) resident, Y = (Q, dO) streamed, out = (dK, dV).
    dQ side: X = (Q, dO), Y = (K, V), out1 = dQ (out2 unused)."""
    RESIDENT: gl.constexpr = x1_desc.block_type.shape[0]
    HEAD_DIM: gl.constexpr = x1_desc.block_type.shape[1]
    STREAMED: gl.constexpr = y1_desc.block_type.shape[0]
    gl.static_assert(STAGES >= 2, "a ring of at least two slots")
    acc_layout: gl.constexpr = _mma_layout(gl.num_warps(), HEAD_DIM)
    res_row, head_row, res_start, lo, mid, hi = _tile_range(seq_len, RESIDENT, STREAMED, KV_SIDE, CAUSAL)

    x1 = gl.allocate_shared_memory(x1_desc.dtype, [RESIDENT, HEAD_DIM], x1_desc.layout)
    x2 = gl.allocate_shared_memory(x2_desc.dtype, [RESIDENT, HEAD_DIM], x2_desc.layout)
    y1_ring, y2_ring = _ring(y1_desc, y2_desc, STAGES)
    x_ready, ready = _ready_barriers(STAGES)

    _issue_kv(x1_desc, x2_desc, res_row, x_ready, x1, x2, True)
    _fill_ring(y1_desc, y2_desc, head_row, ready, y1_ring, y2_ring, lo, hi)
    mbarrier.wait(x_ready, 0)

    acc1 = gl.zeros([RESIDENT, HEAD_DIM], gl.float32, acc_layout)
    acc2 = gl.zeros([RESIDENT, HEAD_DIM], gl.float32, acc_layout)
    ring = (x1, x2, y1_ring, y2_ring, ready, y1_desc, y2_desc, head_row, lo, hi)
    stats = (lse2_ptr, delta_ptr)
    # the diagonal's tiles in a loop of their own: the mask is a constexpr, no branch in the loop
    if CAUSAL:
        for i in range(lo, mid):
            acc1, acc2 = _step(i, acc1, acc2, ring, stats, res_start, qk_scale, KV_SIDE, KV_SIDE)
        for i in range(mid, hi):
            acc1, acc2 = _step(i, acc1, acc2, ring, stats, res_start, qk_scale, KV_SIDE, not KV_SIDE)
    else:
        for i in range(lo, hi):
            acc1, acc2 = _step(i, acc1, acc2, ring, stats, res_start, qk_scale, KV_SIDE, False)

    _invalidate_barriers(x_ready, ready)
    gl.thread_barrier()  # both warpgroups' last wgmmas read X: retired before X is overwritten
    _store_tile(acc1, sm_scale, x1, out1_desc, res_row)  # dK = scale dS^T Q, or dQ = scale dS K
    if KV_SIDE:
        _store_tile(acc2, 1.0, x2, out2_desc, res_row)  # dV = P^T dO
    tma.store_wait(0)


# ---------------------------------------------------------------- host side


def unsupported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tiles: dict | None = None) -> str | None:
    """Why the kernels cannot run these inputs, or None."""
    if not (q.shape == k.shape == v.shape and q.dim() == 4):
        return f"q, k, v must be equal [B, H, L, D] (no GQA, Lq == Lkv): {q.shape=} {k.shape=} {v.shape=}"
    if not (q.dtype == k.dtype == v.dtype and q.dtype in DTYPES):
        return f"{q.dtype=} must be bfloat16 or float16"
    if q.shape[-1] not in (64, 128):
        return f"head dim {q.shape[-1]} must be 64 or 128"
    config = tile_config(q.shape[-1], tiles)
    if q.shape[2] % config["RESIDENT"] or q.shape[2] % config["STREAMED"]:
        return f"L={q.shape[2]} must be a multiple of the tiles {config['RESIDENT']} and {config['STREAMED']}"
    return None


def attention_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    do: torch.Tensor,
    lse: torch.Tensor,
    causal: bool = False,
    scale: float | None = None,
    tiles: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of out = softmax(q k^T * scale) v at the output gradient do; lse [B, H, L] natural log (as
    attention_forward returns it).  `tiles` overrides entries of tile_config (an A/B run)."""
    why = unsupported(q, k, v, tiles)
    assert why is None, why
    B, H, L, D = q.shape
    config = tile_config(D, tiles)
    scale = D**-0.5 if scale is None else scale
    q, k, v, out, do = (t.contiguous() for t in (q, k, v, out, do))
    delta = torch.empty((B, H, L), dtype=torch.float32, device=q.device)
    lse2 = torch.empty_like(delta)
    _preprocess[(B * H * L // PREPROCESS_ROWS,)](
        out, do, lse.contiguous(), delta, lse2, HEAD_DIM=D, ROWS=PREPROCESS_ROWS, num_warps=4
    )
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    res, streamed = config["RESIDENT"], config["STREAMED"]
    grid = (L // res, B * H)
    constexprs = {"CAUSAL": causal, "STAGES": config["STAGES"], "num_warps": config["num_warps"]}
    resident = [_descriptor(t, res) for t in (k, v)]
    stream = [_descriptor(t, streamed) for t in (q, do)]
    outs = [_descriptor(t, res) for t in (dk, dv)]
    runtime = (lse2, delta, scale * LOG2E, scale, L)
    _backward[grid](*resident, *stream, *outs, *runtime, KV_SIDE=True, **constexprs)
    resident = [_descriptor(t, res) for t in (q, do)]
    stream = [_descriptor(t, streamed) for t in (k, v)]
    dq_desc = _descriptor(dq, res)
    _backward[grid](*resident, *stream, dq_desc, dq_desc, *runtime, KV_SIDE=False, **constexprs)
    return dq, dk, dv


# ---------------------------------------------------------------- ahead-of-time compile (no GPU needed)


def aot_compile(
    kernel: str,
    head_dim: int,
    causal: bool,
    dtype: torch.dtype = torch.bfloat16,
    seq_len: int = 8192,
    tiles: dict | None = None,
):
    """Compile "preprocess", "dkdv" or "dq" for sm_90 without a GPU, specialized as a contiguous launch at seq_len
    specializes it (pointers and seq_len 16-divisible).  Returns triton's CompiledKernel."""
    assert kernel in ("preprocess", "dkdv", "dq"), kernel
    config = tile_config(head_dim, tiles)
    if kernel == "preprocess":
        element = f"*{DTYPES[dtype][1]}"
        pointers = {"o_ptr": element, "do_ptr": element, "lse_ptr": "*fp32", "delta_ptr": "*fp32", "lse2_ptr": "*fp32"}
        constexprs = {"HEAD_DIM": head_dim, "ROWS": PREPROCESS_ROWS}
        return compile_sm90(_preprocess, pointers, constexprs, list(pointers), {"num_warps": 4})
    res_type = _descriptor_type(dtype, config["RESIDENT"], head_dim)
    str_type = _descriptor_type(dtype, config["STREAMED"], head_dim)
    signature = {"x1_desc": res_type, "x2_desc": res_type, "y1_desc": str_type, "y2_desc": str_type,
                 "out1_desc": res_type, "out2_desc": res_type, "lse2_ptr": "*fp32", "delta_ptr": "*fp32",
                 "qk_scale": "fp32", "sm_scale": "fp32", "seq_len": "i32"}  # fmt: skip
    constexprs = {"KV_SIDE": kernel == "dkdv", "CAUSAL": causal, "STAGES": config["STAGES"]}
    divisible = ["lse2_ptr", "delta_ptr"] + (["seq_len"] if seq_len % 16 == 0 else [])
    return compile_sm90(_backward, signature, constexprs, divisible, {"num_warps": config["num_warps"]})
