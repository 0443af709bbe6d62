"""An attention forward in Gluon for Hopper (sm_90): causal or not, or (version B) a variant's mods; out and lse.

    out, lse = attention_forward(q, k, v, causal=True)            # q, k, v: [B, H, L, D] bf16/fp16
    out, lse = attention_forward(q, k, v, version="B")            # warp-specialized, ping-pong
    out, lse = attention_forward(q, k, v, version="B", mods=...)  # GluonMods from codegen/gluon/dispatch.py

Version A (`_forward_a`): one partition of 8 warps (two warpgroups running the same code) on a
128-row Q tile.  Q is TMA-loaded once; K and V tiles stream through a STAGES-deep shared-memory
ring, each slot with its own "ready" mbarrier, refilled by the same warps as soon as the wgmma
that read it has retired.  S = QK^T and O += PV are async wgmmas; the loop is software-pipelined
inside the warpgroup: S of tile j+1 is issued before the softmax of tile j, and O += P V of tile j
runs during the softmax of tile j+1 (O is rescaled only after that wgmma retired).

Version B (`_forward_b`): gl.warp_specialize into a producer warp that issues every TMA load (Q once, then
K/V tiles into the ring, waiting on per-slot "empty" mbarriers that both consumers arrive on) and two
consumer warpgroups of 64 rows each.  The consumers take turns on the tensor cores (two "turn" mbarriers):
in its turn a consumer issues S_j = Q K_j^T and O += P_{j-1} V_{j-1}, passes the turn, and runs the softmax
of tile j while the other consumer's wgmmas run (FA3's ping-pong; inside a consumer the softmax of j
overlaps its own P_{j-1} V_{j-1}).  setmaxnreg moves registers from the producer (24) to the consumers (240).
Each CTA visits the kv tiles lo <= t < hi of its rows (_kv_range: all, causal's, or a mask's closed-form bounds),
masking only those outside the full run [full_lo, full_hi); tile_config's overrides (CONSUMERS=3, SPLIT=1,
Q_ROWS, BLOCK_N, STAGES) are the A/B runs of benchmarks/gluon_attention.py.  Mods (score, mask, tile bounds) are
@gluon.jit functions passed as constexprs, rendered by codegen/gluon/mods.py from the Triton kernel's renderers.

lse is natural-log, like flexcomp's forward: the softmax runs in base 2 on scores pre-multiplied
by scale * log2(e), so lse = (m + log2(l)) * ln(2).

flexcomp dispatches to version B with kernel_options={"BACKEND": "GLUON"} (codegen/gluon/dispatch.py);
benchmarks/gluon_attention.py measures it against cuDNN, flexcomp's Triton kernel and torch flex.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

LOG2E = math.log2(math.e)
LN2 = gl.constexpr(math.log(2.0))
PRODUCER_REGS = gl.constexpr(24)  # version B's producer warpgroup after setmaxnreg (see tile_config)


# ---------------------------------------------------------------- device helpers


@gluon.constexpr_function
def _mma_layout(num_warps, instr_n):
    """The wgmma accumulator layout of a [rows, instr_n] tile: warps stacked along rows (16 rows each)."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, instr_n, 16])


@gluon.jit
def _issue_tile(desc, row, bar, dest, pred):
    """One TMA load of a [rows, D] tile into `dest`, completing `bar` (skipped when pred is false)."""
    mbarrier.expect(bar, desc.block_type.nbytes, pred=pred)
    tma.async_copy_global_to_shared(desc, [row, 0], bar, dest, pred=pred)


@gluon.jit
def _issue_kv(k_desc, v_desc, row, bar, k_dest, v_dest, pred):
    """TMA loads of a K tile and a V tile into one ring slot, both completing the slot's one barrier
    (one expect and one wait per tile instead of two: each mbarrier op costs the CTA a bar.sync)."""
    mbarrier.expect(bar, k_desc.block_type.nbytes + v_desc.block_type.nbytes, pred=pred)
    tma.async_copy_global_to_shared(k_desc, [row, 0], bar, k_dest, pred=pred)
    tma.async_copy_global_to_shared(v_desc, [row, 0], bar, v_dest, pred=pred)


@gluon.jit
def _ring(desc1, desc2, STAGES: gl.constexpr):
    """A STAGES-deep shared-memory ring for a pair of streamed tiles (K and V; the backward's Y1 and Y2)."""
    rows: gl.constexpr = desc1.block_type.shape[0]
    cols: gl.constexpr = desc1.block_type.shape[1]
    ring1 = gl.allocate_shared_memory(desc1.dtype, [STAGES, rows, cols], desc1.layout)
    ring2 = gl.allocate_shared_memory(desc2.dtype, [STAGES, rows, cols], desc2.layout)
    return ring1, ring2


@gluon.jit
def _ready_barriers(STAGES: gl.constexpr):
    """(the resident tiles' "ready" mbarrier, one per ring slot), each completed by one TMA transaction."""
    resident_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    ring_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(resident_ready, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(ring_ready.index(i), count=1)
    fence_async_shared()  # the barriers' init is visible to the TMA unit before it signals them
    return resident_ready, ring_ready


@gluon.jit
def _fill_ring(desc1, desc2, row, ring_ready, ring1, ring2, first, end):
    """The prologue's loads: slot s takes streamed tile first + s of the head whose rows start at `row` (in the
    [B*H*L, D] view), where that tile is before `end`."""
    STAGES: gl.constexpr = ring1.shape[0]
    ROWS: gl.constexpr = ring1.shape[1]
    for s in gl.static_range(STAGES):
        tile = first + s
        _issue_kv(desc1, desc2, row + tile * ROWS, ring_ready.index(s), ring1.index(s), ring2.index(s), tile < end)


@gluon.jit
def _invalidate_barriers(resident_ready, ring_ready):
    STAGES: gl.constexpr = ring_ready.shape[0]
    mbarrier.invalidate(resident_ready)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(ring_ready.index(i))


@gluon.jit
def _issue_qk(q_smem, k_ring, kv_ready, tile, STAGES: gl.constexpr, s_layout: gl.constexpr):
    """Wait for tile `tile`'s K and V and issue S = Q K^T as an async wgmma (a fresh accumulator)."""
    slot = tile % STAGES
    mbarrier.wait(kv_ready.index(slot), (tile // STAGES) & 1)
    BLOCK_M: gl.constexpr = q_smem.shape[0]
    BLOCK_N: gl.constexpr = k_ring.shape[1]
    s_zero = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
    return warpgroup_mma(q_smem, k_ring.index(slot).permute((1, 0)), s_zero, use_acc=False, is_async=True)


@gluon.jit
def _online_softmax(s, m_i, l_i, qk_scale, q_start, kv_start, masked):
    """One kv tile of the base-2 online softmax: (p, alpha, m, l).  m is in scaled base-2 units
    (row max of s * scale * log2(e)), so p = exp2(s * qk_scale - m) is one FFMA and one EX2."""
    if masked:  # a tile on the causal diagonal: kv > q is -inf
        rows = q_start + gl.arange(0, s.shape[0], gl.SliceLayout(1, s.type.layout))
        cols = kv_start + gl.arange(0, s.shape[1], gl.SliceLayout(0, s.type.layout))
        s = gl.where(rows[:, None] >= cols[None, :], s, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
    p = gl.exp2(s * qk_scale - m_new[:, None])
    alpha = gl.exp2(m_i - m_new)
    return p, alpha, m_new, l_i * alpha + gl.sum(p, 1)


@gluon.jit
def _pv_operand(p, o_layout: gl.constexpr, dtype: gl.constexpr):
    """P as the register A operand of O += P V."""
    return gl.convert_layout(p.to(dtype), gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2))


@gluon.jit
def _rescale(acc, alpha):
    """O * alpha per row (alpha comes in the S tile's row layout)."""
    return acc * gl.convert_layout(alpha, gl.SliceLayout(1, acc.type.layout))[:, None]


@gluon.jit
def _store_out(acc, m_i, l_i, o_desc, out_smem, lse_ptr, row):
    """O / l through shared memory and one TMA store; lse = (m + log2 l) * ln 2 (natural log)."""
    o_layout: gl.constexpr = acc.type.layout
    l_i = gl.where(l_i == 0.0, 1.0, l_i)  # a fully masked row (mods): O = 0 and lse = -inf (m = -inf), never 0/0
    acc = acc / gl.convert_layout(l_i, gl.SliceLayout(1, o_layout))[:, None]
    out_smem.store(acc.to(out_smem.dtype))
    fence_async_shared()
    tma.async_copy_shared_to_global(o_desc, [row, 0], out_smem)
    rows = row + gl.arange(0, out_smem.shape[0], m_i.type.layout)
    gl.store(lse_ptr + rows, (m_i + gl.log2(l_i)) * LN2)
    tma.store_wait(0)


@gluon.jit
def _tile_coordinates(seq_len, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr):
    """(first row of this Q tile in the [B*H*L, D] view, its first kv row, its q offset in the sequence,
    kv tiles to visit, first masked kv tile).  Grid axis 0 walks the q tiles of one head, so the CTAs
    resident together share a few heads' K and V in L2; causal launches the longest rows first."""
    m_block = gl.program_id(0)
    bh = gl.program_id(1)
    if CAUSAL:
        m_block = gl.num_programs(0) - 1 - m_block
        n_tiles = (m_block + 1) * (BLOCK_M // BLOCK_N)
        first_masked = m_block * (BLOCK_M // BLOCK_N)
    else:
        n_tiles = seq_len // BLOCK_N
        first_masked = n_tiles
    q_start = m_block * BLOCK_M
    return bh * seq_len + q_start, bh * seq_len, q_start, n_tiles, first_masked


# ---------------------------------------------------------------- version A: one partition, pipelined in the warpgroup


@gluon.jit
def _step_a(
    j, s, p, acc, m_i, l_i, ring, qk_scale, q_start, s_layout: gl.constexpr, MASKED: gl.constexpr, LAST: gl.constexpr
):
    """Tile j of version A.  Enters with s = S_j (retired), p = P_{j-1} (zeros for j = 0) and O through tile j-2
    scaled to m_{j-1}; issues O += P_{j-1} V_{j-1}, then S_{j+1} (not for the LAST tile), runs the softmax of
    tile j while both run, rescales O once the P V retired and refills that tile's slot.  Returns
    (S_{j+1}, P_j, O through j-1 scaled to m_j, m_j, l_j) with every wgmma retired: an accumulator in flight
    across the loop's back edge makes ptxas serialize all wgmmas (C7514: the loop's copies read it)."""
    q_smem, k_ring, v_ring, kv_ready, k_desc, v_desc, kv_row, n_tiles = ring
    STAGES: gl.constexpr = k_ring.shape[0]
    BLOCK_N: gl.constexpr = k_ring.shape[1]
    prev = gl.maximum(j - 1, 0)  # j = 0: P is zeros and tile 0's V (landed: S_0 waited for it) any V
    acc_tok = warpgroup_mma(p, v_ring.index(prev % STAGES), acc, is_async=True)
    if not LAST:
        s_tok = _issue_qk(q_smem, k_ring, kv_ready, j + 1, STAGES, s_layout)
    p, alpha, m_i, l_i = _online_softmax(s, m_i, l_i, qk_scale, q_start, j * BLOCK_N, MASKED)
    acc = _rescale(warpgroup_mma_wait(0 if LAST else 1, deps=(acc_tok,)), alpha)
    if not LAST:
        # tile j-1's slot is free in both warpgroups (the barrier): it takes tile j-1+STAGES
        gl.thread_barrier()
        refill = prev + STAGES
        slot = refill % STAGES
        _issue_kv(
            k_desc,
            v_desc,
            kv_row + refill * BLOCK_N,
            kv_ready.index(slot),
            k_ring.index(slot),
            v_ring.index(slot),
            (j >= 1) & (refill < n_tiles),
        )
        s = warpgroup_mma_wait(0, deps=(s_tok,))
    o_layout: gl.constexpr = acc.type.layout
    return s, _pv_operand(p, o_layout, v_ring.dtype), acc, m_i, l_i


@gluon.jit
def _forward_a(
    q_desc,
    k_desc,
    v_desc,
    o_desc,
    lse_ptr,
    qk_scale,
    seq_len,
    CAUSAL: gl.constexpr,
    STAGES: gl.constexpr,
    num_warps: gl.constexpr,
):
    BLOCK_M: gl.constexpr = q_desc.block_type.shape[0]
    HEAD_DIM: gl.constexpr = q_desc.block_type.shape[1]
    BLOCK_N: gl.constexpr = k_desc.block_type.shape[0]
    s_layout: gl.constexpr = _mma_layout(num_warps, BLOCK_N)
    o_layout: gl.constexpr = _mma_layout(num_warps, HEAD_DIM)
    # tile t is loaded in step t+1-STAGES (when tile t-STAGES's P V retires, freeing its slot) and waited
    # in step t-1: STAGES >= 3 puts the load first (else the kernel hangs)
    gl.static_assert(STAGES >= 3, "a ring slot is refilled in the iteration after its tile's P V")
    q_row, kv_row, q_start, n_tiles, first_masked = _tile_coordinates(seq_len, BLOCK_M, BLOCK_N, CAUSAL)

    q_smem = gl.allocate_shared_memory(q_desc.dtype, [BLOCK_M, HEAD_DIM], q_desc.layout)
    k_ring, v_ring = _ring(k_desc, v_desc, STAGES)
    q_ready, kv_ready = _ready_barriers(STAGES)

    _issue_tile(q_desc, q_row, q_ready, q_smem, True)
    _fill_ring(k_desc, v_desc, kv_row, kv_ready, k_ring, v_ring, 0, n_tiles)
    mbarrier.wait(q_ready, 0)

    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
    l_i = gl.zeros([BLOCK_M], gl.float32, gl.SliceLayout(1, s_layout))
    acc = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, o_layout)
    p = gl.zeros([BLOCK_M, BLOCK_N], q_desc.dtype, gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2))
    s = warpgroup_mma_wait(0, deps=(_issue_qk(q_smem, k_ring, kv_ready, 0, STAGES, s_layout),))
    ring = (q_smem, k_ring, v_ring, kv_ready, k_desc, v_desc, kv_row, n_tiles)
    # the causal diagonal's tiles in a loop of their own: the mask is a constexpr, no branch in the loop
    unmasked_end = gl.minimum(first_masked, n_tiles - 1)
    for j in range(unmasked_end):
        s, p, acc, m_i, l_i = _step_a(j, s, p, acc, m_i, l_i, ring, qk_scale, q_start, s_layout, False, False)
    if CAUSAL:
        for j in range(unmasked_end, n_tiles - 1):
            s, p, acc, m_i, l_i = _step_a(j, s, p, acc, m_i, l_i, ring, qk_scale, q_start, s_layout, True, False)
    last = n_tiles - 1
    s, p, acc, m_i, l_i = _step_a(last, s, p, acc, m_i, l_i, ring, qk_scale, q_start, s_layout, CAUSAL, True)
    acc = warpgroup_mma_wait(0, deps=(warpgroup_mma(p, v_ring.index(last % STAGES), acc, is_async=True),))

    _invalidate_barriers(q_ready, kv_ready)
    _store_out(acc, m_i, l_i, o_desc, q_smem, lse_ptr, q_row)


# ---------------------------------------------------------------- version B: producer warp + ping-pong consumers


@gluon.jit
def _kv_range(
    seq_len,
    heads,
    CTA_M: gl.constexpr,
    BLOCK_N: gl.constexpr,
    CAUSAL: gl.constexpr,
    MASK_FN: gl.constexpr,
    TILES_FN: gl.constexpr,
):
    """This CTA's work: (its first Q row in the [B*H*L, D] view, its head's first kv row, its q offset in the
    sequence, b, h, and the kv tiles lo <= t < hi it visits, of which full_lo <= t < full_hi need no mask).
    Grid axis 0 walks the q tiles of one head (the resident CTAs share a few heads' K/V in L2); causal launches
    the longest rows first.  TILES_FN: a mask's closed-form bounds in tiles (codegen/gluon/mods.py)."""
    m_block = gl.program_id(0)
    bh = gl.program_id(1)
    if CAUSAL:
        m_block = gl.num_programs(0) - 1 - m_block
    q_start = m_block * CTA_M
    b = bh // heads
    h = bh % heads
    n_kv = seq_len // BLOCK_N
    lo = 0
    hi = n_kv
    full_lo = 0
    full_hi = n_kv
    if CAUSAL:  # tiles wholly at or left of the CTA's first row are full; the diagonal's are masked
        hi = gl.minimum(gl.cdiv(q_start + CTA_M, BLOCK_N), n_kv)
        full_hi = q_start // BLOCK_N
    elif TILES_FN is not None:
        lo, hi, full_lo, full_hi = TILES_FN(b, h, q_start, gl.minimum(q_start + CTA_M, seq_len) - 1, seq_len, BLOCK_N)
        # rows with no kv at all still visit one tile, masked (the bounds are sound: the mask is false there), so
        # neither the ring protocol nor the empty rows' output (0, lse -inf) need a case of their own
        empty = hi <= lo
        lo = gl.where(empty, gl.minimum(lo, n_kv - 1), lo)
        hi = gl.where(empty, lo + 1, hi)
        full_lo = gl.where(empty, hi, full_lo)
        full_hi = gl.where(empty, hi, full_hi)
    elif MASK_FN is not None:  # a mask without bounds: every tile, all masked
        full_hi = 0
    return bh * seq_len + q_start, bh * seq_len, q_start, b, h, lo, hi, full_lo, full_hi


@gluon.jit
def _softmax_b(
    s,
    m_i,
    l_i,
    scales,
    b,
    h,
    q_start,
    kv_start,
    masked,
    CAUSAL: gl.constexpr,
    SCORE_FN: gl.constexpr,
    MASK_FN: gl.constexpr,
):
    """_online_softmax with mods: SCORE_FN returns the score in the kernel's base-2 units (codegen/base2.py,
    scale and log2(e) folded in), else the raw q.k is scaled inside the exp2's FMA; a `masked` tile applies
    the causal diagonal or MASK_FN.  Where a row may have seen nothing unmasked yet (mods), m = -inf subtracts 0."""
    qk_scale, sm_scale = scales
    rows = q_start + gl.arange(0, s.shape[0], gl.SliceLayout(1, s.type.layout))
    cols = kv_start + gl.arange(0, s.shape[1], gl.SliceLayout(0, s.type.layout))
    if SCORE_FN is not None:
        scored, s = gl.broadcast(SCORE_FN(s, b, h, rows[:, None], cols[None, :], sm_scale).to(gl.float32), s)
        s = scored
    if masked:
        if CAUSAL:
            s = gl.where(rows[:, None] >= cols[None, :], s, float("-inf"))
        elif MASK_FN is not None:
            s = gl.where(MASK_FN(b, h, rows[:, None], cols[None, :]), s, float("-inf"))
    if SCORE_FN is not None:
        m_new = gl.maximum(m_i, gl.max(s, 1))
    else:
        m_new = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
    m_use = m_new
    if SCORE_FN is not None or MASK_FN is not None:
        m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
    if SCORE_FN is not None:
        p = gl.exp2(s - m_use[:, None])
    else:
        p = gl.exp2(s * qk_scale - m_use[:, None])
    alpha = gl.exp2(m_i - m_use)
    return p, alpha, m_new, l_i * alpha + gl.sum(p, 1)


@gluon.jit
def _producer(
    q_desc,
    k_desc,
    v_desc,
    q_smem,
    k_ring,
    v_ring,
    bars,
    seq_len,
    heads,
    CAUSAL: gl.constexpr,
    MASK_FN: gl.constexpr,
    TILES_FN: gl.constexpr,
):
    """One warp: every consumer's Q tile, then the CTA's K/V tiles into the ring as slots come free."""
    q_ready, kv_ready, kv_empty, _turn = bars
    CONSUMERS: gl.constexpr = q_smem.shape[0]
    Q_ROWS: gl.constexpr = q_desc.block_type.shape[0]
    STAGES: gl.constexpr = k_ring.shape[0]
    BLOCK_N: gl.constexpr = k_ring.shape[1]
    q_row, kv_row, _q_start, _b, _h, lo, hi, _full_lo, _full_hi = _kv_range(
        seq_len, heads, CONSUMERS * Q_ROWS, BLOCK_N, CAUSAL, MASK_FN, TILES_FN
    )
    mbarrier.expect(q_ready, CONSUMERS * q_desc.block_type.nbytes)
    for c in gl.static_range(CONSUMERS):  # rows past the tensor's end are zero-filled (and counted)
        tma.async_copy_global_to_shared(q_desc, [q_row + c * Q_ROWS, 0], q_ready, q_smem.index(c))
    for i in range(hi - lo):
        slot = i % STAGES
        # a fresh barrier's "previous phase" counts as complete: the first STAGES waits pass at once
        mbarrier.wait(kv_empty.index(slot), ((i // STAGES) & 1) ^ 1)
        _issue_kv(
            k_desc,
            v_desc,
            kv_row + (lo + i) * BLOCK_N,
            kv_ready.index(slot),
            k_ring.index(slot),
            v_ring.index(slot),
            True,
        )


@gluon.jit
def _consumer_step(
    i,
    p,
    acc,
    m_i,
    l_i,
    ring,
    softmax_args,
    masked,
    WG: gl.constexpr,
    CAUSAL: gl.constexpr,
    SCORE_FN: gl.constexpr,
    MASK_FN: gl.constexpr,
):
    """Ring entry i >= 1 (kv tile lo + i) of consumer WG.  Enters with p = P_{i-1} and O through i-2 scaled to
    m_{i-1}; in its turn issues S_i = Q K_i^T and O += P_{i-1} V_{i-1} and hands the turn to the next consumer,
    runs the softmax of tile i under both, retires them, releases slot i-1 and rescales O."""
    q_mine, k_ring, v_ring, kv_ready, kv_empty, turn, lo = ring
    CONSUMERS: gl.constexpr = turn.shape[0]
    STAGES: gl.constexpr = k_ring.shape[0]
    BLOCK_N: gl.constexpr = k_ring.shape[1]
    s_layout: gl.constexpr = _mma_layout(4, BLOCK_N)
    o_layout: gl.constexpr = _mma_layout(4, k_ring.shape[2])
    scales, b, h, q_start = softmax_args
    mbarrier.wait(turn.index(WG), i & 1)
    s_tok = _issue_qk(q_mine, k_ring, kv_ready, i, STAGES, s_layout)
    acc_tok = warpgroup_mma(p, v_ring.index((i - 1) % STAGES), acc, is_async=True)
    mbarrier.arrive(turn.index((WG + 1) % CONSUMERS))
    s = warpgroup_mma_wait(1, deps=(s_tok,))  # S_i retired; O += P_{i-1} V_{i-1} still running
    p, alpha, m_i, l_i = _softmax_b(
        s, m_i, l_i, scales, b, h, q_start, (lo + i) * BLOCK_N, masked, CAUSAL, SCORE_FN, MASK_FN
    )
    p = _pv_operand(p, o_layout, k_ring.dtype)
    acc = warpgroup_mma_wait(0, deps=(acc_tok,))
    gl.thread_barrier()  # every warp of this warpgroup retired its reads of tile i-1 before the one arrive
    mbarrier.arrive(kv_empty.index((i - 1) % STAGES))
    return p, _rescale(acc, alpha), m_i, l_i


@gluon.jit
def _consumer(
    WG: gl.constexpr,
    shared,
    CAUSAL: gl.constexpr,
    SPLIT: gl.constexpr,
    SCORE_FN: gl.constexpr,
    MASK_FN: gl.constexpr,
    TILES_FN: gl.constexpr,
):
    """One warpgroup, rows [WG * Q_ROWS, (WG + 1) * Q_ROWS) of the CTA's Q tile.  Ping-pong: a consumer issues
    its two wgmmas only in its turn and hands the turn to the next right after, so its softmax of tile i runs
    while the others' wgmmas use the tensor cores.  SPLIT: the masked tiles (before and after the full run) and
    the full ones in loops of their own, the mask a constexpr (no mask code or branch in the full loop).
    `shared`: what every consumer gets, (q_smem, k_ring, v_ring, bars, o_desc, lse_ptr, scales, seq_len, heads)."""
    q_smem, k_ring, v_ring, bars, o_desc, lse_ptr, scales, seq_len, heads = shared
    q_ready, kv_ready, kv_empty, turn = bars
    CONSUMERS: gl.constexpr = q_smem.shape[0]
    Q_ROWS: gl.constexpr = q_smem.shape[1]
    STAGES: gl.constexpr = k_ring.shape[0]
    BLOCK_N: gl.constexpr = k_ring.shape[1]
    HEAD_DIM: gl.constexpr = k_ring.shape[2]
    HAS_MASK: gl.constexpr = CAUSAL or MASK_FN is not None
    s_layout: gl.constexpr = _mma_layout(4, BLOCK_N)
    o_layout: gl.constexpr = _mma_layout(4, HEAD_DIM)
    q_row, _kv_row, q_start, b, h, lo, hi, full_lo, full_hi = _kv_range(
        seq_len, heads, CONSUMERS * Q_ROWS, BLOCK_N, CAUSAL, MASK_FN, TILES_FN
    )
    q_row += WG * Q_ROWS
    q_start += WG * Q_ROWS
    q_mine = q_smem.index(WG)
    if WG == CONSUMERS - 1:
        mbarrier.arrive(turn.index(0))  # consumer 0 takes the first turn
    mbarrier.wait(q_ready, 0)

    m_i = gl.full([Q_ROWS], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
    l_i = gl.zeros([Q_ROWS], gl.float32, gl.SliceLayout(1, s_layout))
    acc = gl.zeros([Q_ROWS, HEAD_DIM], gl.float32, o_layout)
    softmax_args = (scales, b, h, q_start)
    mbarrier.wait(turn.index(WG), 0)
    s_tok = _issue_qk(q_mine, k_ring, kv_ready, 0, STAGES, s_layout)
    mbarrier.arrive(turn.index((WG + 1) % CONSUMERS))
    s = warpgroup_mma_wait(0, deps=(s_tok,))
    first_masked = False
    if HAS_MASK:
        first_masked = (lo < full_lo) | (lo >= full_hi)
    p, _alpha, m_i, l_i = _softmax_b(
        s, m_i, l_i, scales, b, h, q_start, lo * BLOCK_N, first_masked, CAUSAL, SCORE_FN, MASK_FN
    )
    p = _pv_operand(p, o_layout, k_ring.dtype)
    ring = (q_mine, k_ring, v_ring, kv_ready, kv_empty, turn, lo)
    n = hi - lo
    # invariant at the top of entry i: O holds entries < i-1 scaled to m_{i-1}; p = P_{i-1} (relative to m_{i-1})
    if SPLIT and HAS_MASK:
        for i in range(1, full_lo - lo):
            p, acc, m_i, l_i = _consumer_step(
                i, p, acc, m_i, l_i, ring, softmax_args, True, WG, CAUSAL, SCORE_FN, MASK_FN
            )
        for i in range(gl.maximum(full_lo - lo, 1), full_hi - lo):
            p, acc, m_i, l_i = _consumer_step(
                i, p, acc, m_i, l_i, ring, softmax_args, False, WG, CAUSAL, SCORE_FN, MASK_FN
            )
        for i in range(gl.maximum(full_hi - lo, 1), n):
            p, acc, m_i, l_i = _consumer_step(
                i, p, acc, m_i, l_i, ring, softmax_args, True, WG, CAUSAL, SCORE_FN, MASK_FN
            )
    else:
        for i in range(1, n):
            masked = False
            if HAS_MASK:
                masked = (lo + i < full_lo) | (lo + i >= full_hi)
            p, acc, m_i, l_i = _consumer_step(
                i, p, acc, m_i, l_i, ring, softmax_args, masked, WG, CAUSAL, SCORE_FN, MASK_FN
            )
    acc_tok = warpgroup_mma(p, v_ring.index((n - 1) % STAGES), acc, is_async=True)
    acc = warpgroup_mma_wait(0, deps=(acc_tok,))
    if q_start < seq_len:  # with 3 consumers the last CTA's last consumer can lie wholly past the sequence
        _store_out(acc, m_i, l_i, o_desc, q_mine, lse_ptr, q_row)


@gluon.jit
def _forward_b(
    q_desc,
    k_desc,
    v_desc,
    o_desc,
    lse_ptr,
    qk_scale,
    sm_scale,
    seq_len,
    heads,
    CAUSAL: gl.constexpr,
    STAGES: gl.constexpr,
    CONSUMERS: gl.constexpr,
    SPLIT: gl.constexpr,
    CONSUMER_REGS: gl.constexpr,
    SCORE_FN: gl.constexpr,
    MASK_FN: gl.constexpr,
    TILES_FN: gl.constexpr,
    num_warps: gl.constexpr,
):
    """Warp-specialized: a producer warp (TMA) and CONSUMERS warpgroups of Q_ROWS rows each in ping-pong,
    registers moved from the producer to the consumers (setmaxnreg)."""
    gl.static_assert(num_warps == 4, "the default partition is one consumer warpgroup")
    gl.static_assert(CONSUMERS == 2 or CONSUMERS == 3, "two or three consumer warpgroups")
    Q_ROWS: gl.constexpr = q_desc.block_type.shape[0]
    HEAD_DIM: gl.constexpr = q_desc.block_type.shape[1]
    q_smem = gl.allocate_shared_memory(q_desc.dtype, [CONSUMERS, Q_ROWS, HEAD_DIM], q_desc.layout)
    k_ring, v_ring = _ring(k_desc, v_desc, STAGES)
    q_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    kv_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    kv_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [CONSUMERS, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_ready, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(kv_ready.index(i), count=1)
        mbarrier.init(kv_empty.index(i), count=CONSUMERS)  # every consumer releases a slot
    for i in gl.static_range(CONSUMERS):
        mbarrier.init(turn.index(i), count=1)
    fence_async_shared()
    bars = (q_ready, kv_ready, kv_empty, turn)
    shared = (q_smem, k_ring, v_ring, bars, o_desc, lse_ptr, (qk_scale, sm_scale), seq_len, heads)
    # Gluon 3.6 takes the partitions' (function, args) pairs only as literals inside the call (a tuple variable may
    # not hold the mods' functions): one call per consumer count
    # fmt: off
    if CONSUMERS == 2:
        gl.warp_specialize([(_consumer, (0, shared, CAUSAL, SPLIT, SCORE_FN, MASK_FN, TILES_FN)),
                            (_consumer, (1, shared, CAUSAL, SPLIT, SCORE_FN, MASK_FN, TILES_FN)),
                            (_producer, (q_desc, k_desc, v_desc, q_smem, k_ring, v_ring, bars, seq_len, heads, CAUSAL,
                                         MASK_FN, TILES_FN))],
                           [4, 1], [CONSUMER_REGS, PRODUCER_REGS])
    else:
        gl.warp_specialize([(_consumer, (0, shared, CAUSAL, SPLIT, SCORE_FN, MASK_FN, TILES_FN)),
                            (_consumer, (1, shared, CAUSAL, SPLIT, SCORE_FN, MASK_FN, TILES_FN)),
                            (_consumer, (2, shared, CAUSAL, SPLIT, SCORE_FN, MASK_FN, TILES_FN)),
                            (_producer, (q_desc, k_desc, v_desc, q_smem, k_ring, v_ring, bars, seq_len, heads, CAUSAL,
                                         MASK_FN, TILES_FN))],
                           [4, 4, 1], [CONSUMER_REGS, CONSUMER_REGS, PRODUCER_REGS])
    # fmt: on


# ---------------------------------------------------------------- host side

KERNELS = {"A": _forward_a, "B": _forward_b}
DTYPES = {torch.bfloat16: (gl.bfloat16, "bf16"), torch.float16: (gl.float16, "fp16")}


@dataclass(frozen=True)
class GluonMods:
    """A variant's rendered mods (codegen/gluon/mods.py): @gluon.jit functions the kernel calls as constexprs.
    score: (qk, b, h, q_idx, kv_idx, sm_scale) -> score in base-2 units; mask: (b, h, q_idx, kv_idx) -> keep;
    tiles: (b, h, q_lo, q_hi, Q_LEN, BLOCK_N) -> kv tiles (lo, hi, full_lo, full_hi).  None: not there."""

    score: object = None
    mask: object = None
    tiles: object = None


NO_MODS = GluonMods()


def tile_config(version: str, head_dim: int, tiles: dict | None = None) -> dict:
    """Tile sizes and launch options of a version at a head dim, with `tiles` overriding entries (an A/B run:
    {"CONSUMERS": 3}).  Q_ROWS: rows of one Q descriptor tile (a consumer's); CTA_M: rows per thread block;
    maxnreg: the launch's register cap, which warp specialization redistributes (None: ptxas decides).

    A: during the softmax of tile j a thread holds S_j, the in-flight S_{j+1}, the in-flight P_{j-1} (a wgmma
    operand), P_j and O.  With a 128-wide kv tile that is too many registers for ptxas to keep the wgmmas
    asynchronous in the causal kernels (it serializes them, C7511), so A takes 64 at both head dims (D=64:
    124 registers without a mask, two blocks per SM).  STAGES=4 refills a slot two tiles before it is needed.
    B: 12 warps (4 + 4 + the producer's warpgroup) at 168 registers = 64512 of the SM's 65536; the producer
    keeps 24, each consumer gets REGS=240 (S 64, P 32, O 32-64 registers per thread at BLOCK_N=128).  Shared
    memory at D=128: Q 32 KiB + 3 stages of K and V at 64 KiB = 224 KiB, under Hopper's 227 KiB per block.
    B with CONSUMERS=3 (FA3's D=64 shape, 192 q rows): 16 warps at 128 = 3 x 160 + 24 (x 128 threads) of
    65536, 2 stages at D=128 (Q 48 KiB).  SPLIT=1: masked and full kv tiles in loops of their own."""
    assert version in KERNELS, f"{version=} is not one of {sorted(KERNELS)}"
    assert head_dim in (64, 128), f"{head_dim=} must be 64 or 128"
    tiles = tiles or {}
    if version == "A":
        return {"Q_ROWS": 128, "CTA_M": 128, "BLOCK_N": 64, "STAGES": 4, "num_warps": 8, "maxnreg": None} | tiles
    consumers = tiles.get("CONSUMERS", 2)
    assert consumers in (2, 3), f"{consumers=} must be 2 or 3"
    stages = (3 if consumers == 2 else 2) if head_dim == 128 else 4
    config = {
        "Q_ROWS": 64,
        "BLOCK_N": 128,
        "STAGES": stages,
        "CONSUMERS": consumers,
        "SPLIT": 0,
        "REGS": 240 if consumers == 2 else 160,
        "num_warps": 4,
        "maxnreg": 168 if consumers == 2 else 128,
    }
    config |= tiles
    return config | {"CTA_M": config["Q_ROWS"] * consumers}


def _layout(block: list[int], dtype: torch.dtype):
    return gl.NVMMASharedLayout.get_default_for(block, DTYPES[dtype][0])


def _descriptor(t: torch.Tensor, rows: int) -> TensorDescriptor:
    """A TMA descriptor over t viewed as [B*H*L, D], one [rows, D] tile per copy."""
    flat = t.reshape(-1, t.shape[-1])
    block = [rows, t.shape[-1]]
    return TensorDescriptor(flat, list(flat.shape), list(flat.stride()), block, _layout(block, t.dtype))


def unsupported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: dict) -> str | None:
    """Why the kernel cannot run these inputs at `config`'s tiles, or None (flexcomp's dispatch reads this)."""
    if not (q.shape == k.shape == v.shape and q.dim() == 4):
        return f"q, k, v must be equal [B, H, L, D] (no GQA, Lq == Lkv): {q.shape=} {k.shape=} {v.shape=}"
    if not (q.dtype == k.dtype == v.dtype and q.dtype in DTYPES):
        return f"{q.dtype=} must be bfloat16 or float16"
    if q.shape[-1] not in (64, 128):
        return f"head dim {q.shape[-1]} must be 64 or 128"
    if not (q.is_contiguous() and k.is_contiguous() and v.is_contiguous()):
        return "q, k, v must be contiguous"
    L = q.shape[2]
    if L % config["Q_ROWS"] or L % config["BLOCK_N"] or L < config["CTA_M"]:
        return f"{L=} must be a multiple of the q tile {config['Q_ROWS']} and the kv tile {config['BLOCK_N']}"
    return None


def check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, config: dict) -> None:
    why = unsupported(q, k, v, config)
    assert why is None, why


def _constexprs(version: str, config: dict, causal: bool, mods: GluonMods) -> dict:
    """The kernel's constexpr arguments at a config (A takes no mods)."""
    constexprs = {"CAUSAL": causal, "STAGES": config["STAGES"]}
    if version == "A":
        assert mods == NO_MODS, "version A has no mods; use version B"
        return constexprs | {"num_warps": config["num_warps"]}
    return constexprs | {
        "CONSUMERS": config["CONSUMERS"], "SPLIT": bool(config["SPLIT"]), "CONSUMER_REGS": config["REGS"],
        "SCORE_FN": mods.score, "MASK_FN": mods.mask, "TILES_FN": mods.tiles, "num_warps": config["num_warps"],
    }  # fmt: skip


def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    scale: float | None = None,
    version: str = "A",
    tiles: dict | None = None,
    mods: GluonMods = NO_MODS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out [B, H, L, D] in q's dtype, lse [B, H, L] float32, natural log) of softmax(q k^T * scale) v.
    `tiles` overrides entries of tile_config (an A/B of tile sizes: {"BLOCK_N": 128, "STAGES": 3}); `mods`
    (version B): a variant's rendered score_mod, mask_mod and tile bounds (codegen/gluon/mods.py)."""
    B, H, L, D = q.shape
    config = tile_config(version, D, tiles)
    check_inputs(q, k, v, config)
    scale = D**-0.5 if scale is None else scale
    assert scale > 0 or mods.score is not None, f"{scale=} must be positive (the row max is taken before scaling)"
    out = torch.empty_like(q)
    lse = torch.empty((B, H, L), dtype=torch.float32, device=q.device)
    descriptors = (
        _descriptor(q, config["Q_ROWS"]),
        _descriptor(k, config["BLOCK_N"]),
        _descriptor(v, config["BLOCK_N"]),
        _descriptor(out, config["Q_ROWS"]),
    )
    grid = (triton.cdiv(L, config["CTA_M"]), B * H)
    runtime = (lse, scale * LOG2E, L) if version == "A" else (lse, scale * LOG2E, scale, L, H)
    KERNELS[version][grid](
        *descriptors, *runtime, **_constexprs(version, config, causal, mods), maxnreg=config["maxnreg"]
    )
    return out, lse


# ---------------------------------------------------------------- ahead-of-time compile (no GPU needed)


def _descriptor_type(dtype: torch.dtype, rows: int, head_dim: int) -> str:
    """The signature string triton's launcher gives a Gluon TensorDescriptor argument."""
    block = [rows, head_dim]
    return f"tensordesc<{DTYPES[dtype][1]}[{rows}, {head_dim}],{_layout(block, dtype)!r}>"


def aot_compile(
    version: str,
    head_dim: int,
    causal: bool,
    dtype: torch.dtype = torch.bfloat16,
    seq_len: int = 8192,
    tiles: dict | None = None,
    mods: GluonMods = NO_MODS,
):
    """Compile one version for sm_90 without a GPU, specialized as a contiguous launch at seq_len
    specializes it (seq_len and lse's pointer 16-divisible).  Returns triton's CompiledKernel."""
    config = tile_config(version, head_dim, tiles)
    kernel = KERNELS[version]
    q_type = _descriptor_type(dtype, config["Q_ROWS"], head_dim)
    kv_type = _descriptor_type(dtype, config["BLOCK_N"], head_dim)
    signature = {"q_desc": q_type, "k_desc": kv_type, "v_desc": kv_type, "o_desc": q_type, "lse_ptr": "*fp32",
                 "qk_scale": "fp32"}  # fmt: skip
    if version == "B":
        signature |= {"sm_scale": "fp32"}
    signature |= {"seq_len": "i32"} | ({"heads": "i32"} if version == "B" else {})
    divisible = ["lse_ptr"] + (["seq_len"] if seq_len % 16 == 0 else [])
    options = {"num_warps": config["num_warps"], "maxnreg": config["maxnreg"]}
    return compile_sm90(kernel, signature, _constexprs(version, config, causal, mods), divisible, options)


def compile_sm90(kernel, signature: dict[str, str], constexprs: dict, divisible: list[str], options: dict):
    """Compile a @gluon.jit kernel for sm_90 without a GPU: `signature` holds the runtime arguments' types (the
    constexprs are added here), and the arguments named in `divisible` are specialized as 16-divisible, as a
    launch specializes torch's 256-byte aligned pointers and lengths that are multiples of 16."""
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    signature = signature | dict.fromkeys(constexprs, "constexpr")
    names = list(signature)
    attrs = {(names.index(name),): [["tt.divisibility", 16]] for name in divisible}
    source = GluonASTSource(kernel, signature, constexprs, attrs)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
