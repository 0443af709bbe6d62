"""The backward kernels' source: one template, the mods and their derivatives rendered into it.

Three generated @triton.jit helpers carry everything variant-specific:

* `modded_scores(score, b, h, q_idx, kv_idx, KV_LEN, IS_FULL, ...)` -> (modded score with masked
  entries at -inf, d score_mod / d score), the score_mod and its derivative rendered together so
  they share subexpressions (tanh of a softcap is computed once);
* `scatter_captured(ds, score, b, h, q_idx, kv_idx, ...)` adds ds * d score_mod / d load into a
  float32 gradient buffer at each load's (wrapped, clamped) indices, summed over the tile axes the
  indices do not depend on first, so a per-head table costs one atomic per tile, not one per element.
  Under DETERMINISTIC (torch.are_deterministic_algorithms_enabled()) it instead adds, without atomics
  and in a fixed order, into the program's own slice of a [programs, numel] buffer that torch then sums;
* the template's kernels call them: `flex_bwd_delta` (delta = rowsum(dO * O) - dlse) and `flex_bwd`, whose
  1-D grid holds dK/dV programs (one per kv tile, walking its q tiles with `dkdv_tiles`, summing over the q
  heads of a GQA group; its tiles are [kv, q], S^T = K Q^T, so P^T and dS^T feed the dV and dK dots without
  a register transpose, which on the H100 miscompiled for a padded 256-wide dK) and then dQ programs
  (one per q tile, heaviest first, walking its kv tiles with `dq_tiles`; it also scatters the captured
  tensors' gradients).  Each program's two tile lists (PARTIAL, FULL) come from `program_tiles`, as the
  forward's do.  The constexprs DKDV_PART and DQ_PART say which parts a launch runs: both in one launch,
  or one part per launch (codegen/backward.py `launch_parts`).
  The mods only broadcast, so they run unchanged on either orientation.

Under ATOMIC_DQ (kernel_options BACKWARD_DQ="atomic") the dK/dV kernel also computes dQ's part dS K of each
tile, adds it into a float32 [B, H_Q, Q_LEN, D] buffer with relaxed atomics (`red.global.add`), and scatters
the captured tensors' gradients (`scatter_captured_kv`, its [kv, q] tiles); the dQ kernel is not launched.
Five matmuls per tile pair instead of seven (S and dP are not recomputed), at the price of D float32 atomic
adds per q row per kv tile; the sum's order varies from run to run.
"""

from __future__ import annotations

from flexcomp.grad import load_grads, score_grad
from flexcomp.ir import MASK_MOD_ARGS, SCORE_MOD_ARGS, BufferSpec, Node, Op, arg, free_args, to_text
from flexcomp.mods import Mod

from .kernel_passes import shape
from .ops import KERNEL_HELPERS, PRELUDE, args_text, buffer_params, fill_holes, identifier, render_block
from .params import BACKWARD, BACKWARD_ROW_ALIGNED, Q_TABLE_NAMES, TABLE_NAMES, render_row_aligned

SCORE_PREFIX, MASK_PREFIX, GRAD_PREFIX = "sb", "mb", "gb"


def _render(roots: list[Node], names: dict[Node, str], prefix: str, buffers: tuple[BufferSpec, ...],
            indent: str = "    ") -> tuple[list[str], list[str]]:
    """ops.render_block with the captured tensors' parameters named by `prefix` (as buffer_params names them)."""
    return render_block(roots, names, prefix, buffers, buffer_prefix=prefix, indent=indent)


def _function(name: str, params: list[str], lines: list[str]) -> str:
    return f"@triton.jit\ndef {name}({', '.join(params)}):\n" + "\n".join(lines)


def _mod_names(kind: str) -> dict[Node, str]:
    """The mod's ARGs, named in the generated helpers as in the IR."""
    return {arg(a): a for a in (SCORE_MOD_ARGS if kind == "score" else MASK_MOD_ARGS)}


def _buffers(mod: Mod | None) -> tuple[BufferSpec, ...]:
    return tuple(mod.buffers) if mod is not None else ()


def _commented(node: Node) -> str:
    return "\n".join(f"#   {line}" for line in to_text(node).splitlines())


def render_modded_scores(score_mod: Mod | None, mask_mod: Mod | None) -> str:
    """modded_scores(qk, sm_scale, ...): the modded score in base-2 units (what exp2 takes) and d score_mod /
    d score, then the ragged edge and the mask as -inf.

    Both are rendered over the raw q.k with the scalings folded in (codegen/base2.py, as the forward does: no
    multiply per element beyond the mod's own) and together, so they share subexpressions (a softcap's tanh is
    computed once).  Where the derivative is the constant 1 (no score_mod, ALiBi, additive biases) it is not rendered."""
    score_ir = score_mod.ir if score_mod is not None else arg("score")
    dmod = shape(score_ir, ("derivative",), "score_mod")
    names = {**_mod_names("score"), arg("score"): "qk", arg("sm_scale"): "sm_scale"}  # the ARG score is the raw q.k
    score_buffers, mask_buffers = _buffers(score_mod), _buffers(mask_mod)
    modded = shape(score_ir, ("base2",), "score_mod")
    roots = [modded] if _is_one(dmod) else [modded, shape(dmod, ("raw_score",), "d score_mod")]
    lines, (modded, *dmod_text) = _render(roots, names, SCORE_PREFIX, score_buffers)
    lines.append(f"    modded = {modded}")
    lines += ["    if not EVEN_KV:  # the last kv tile reaches past KV_LEN",
              "        modded = tl.where(kv_idx < KV_LEN, modded, float(\"-inf\"))"]
    if mask_mod is not None:
        mask_lines, (keep,) = _render([mask_mod.ir], _mod_names("mask"), MASK_PREFIX, mask_buffers, " " * 8)
        lines += ["    if not IS_FULL:", *mask_lines, f"        modded = tl.where({keep}, modded, float(\"-inf\"))"]
    lines.append(f"    return modded, {dmod_text[0] if dmod_text else 1.0}")
    params = ["qk", "sm_scale", "b", "h", "q_idx", "kv_idx", "KV_LEN", *buffer_params(SCORE_PREFIX, score_buffers),
              *buffer_params(MASK_PREFIX, mask_buffers), "IS_FULL: tl.constexpr", "EVEN_KV: tl.constexpr"]
    return _function("modded_scores", params, lines)


def _is_one(node: Node) -> bool:
    return node.op == Op.CONST and float(node.arg) == 1.0


def render_dscore(score_mod: Mod | None) -> str:
    """dS of the raw score: dS of the modded score times d mod / d score (skipped where that is the constant 1)."""
    if score_mod is None or _is_one(score_grad(score_mod.ir)):
        return "dscore = ds"
    return "dscore = tl.where(ds == 0.0, 0.0, ds * dmod)  # masked entries stay 0 even where dmod is not finite"


def _tile_axes(index_nodes: tuple[Node, ...]) -> tuple[bool, bool]:
    """Whether a load's indices vary along the tile's q axis, and along its kv axis."""
    used = frozenset().union(*(free_args(i) for i in index_nodes)) if index_nodes else frozenset()
    return "q_idx" in used, "kv_idx" in used


def _reduce_over_free_axes(value: str, index_nodes: tuple[Node, ...], kv_major: bool) -> str:
    """Sum a tile's contribution over the axes its target indices do not vary along; the tile is
    [BLOCK_M, BLOCK_N] (q rows: the dQ kernel) or, `kv_major`, [BLOCK_N, BLOCK_M] (the dK/dV kernel)."""
    along_q, along_kv = _tile_axes(index_nodes)
    if along_q and along_kv:
        return value
    if along_q or along_kv:
        kept_axis = 0 if along_q != kv_major else 1
        return f"tl.sum({value}, {1 - kept_axis})" + ("[:, None]" if kept_axis == 0 else "[None, :]")
    return f"tl.sum(tl.sum({value}, 1), 0)"


def render_scatter(score_mod: Mod | None, grad_buffers: frozenset[str], kv_major: bool = False) -> str:
    """scatter_captured(...) (scatter_captured_kv for the dK/dV kernel's [kv, q] tiles): the captured float
    tensors' gradient contributions of one tile."""
    buffers = _buffers(score_mod)
    specs = {spec.name: spec for spec in buffers}
    all_grads = load_grads(score_mod.ir) if score_mod is not None else []
    grads = [(load, d) for load, d in all_grads if load.arg in grad_buffers]
    names = _mod_names("score")
    roots = [d for _, d in grads] + [i for load, _ in grads for i in load.src if i.op != Op.CONST]
    lines, _ = _render(roots, names, SCORE_PREFIX, buffers)
    for n, (load, d) in enumerate(grads):
        spec = specs[load.arg]
        d_text = names.get(d) or _render([d], names, SCORE_PREFIX, buffers)[1][0]
        lines.append(f"    c{n} = tl.where(ds == 0.0, 0.0, ds * {d_text})  # d mod / d {load.arg}[...]")
        base, offset = _grad_base(spec), _grad_offset(spec, load, names)
        reduced = _reduce_over_free_axes(f"c{n}", load.src, kv_major)
        add = "add_in_order" if any(_tile_axes(load.src)) else "add_one"  # one entry per tile needs no ordering
        lines += ["    if DETERMINISTIC:  # into this program's own slice of the partials, in a fixed order",
                  f"        {add}({base}_ptr + slot * {base}_slot_stride, {offset}, {reduced})",
                  "    else:",
                  f"        tl.atomic_add({base}_ptr + {offset}, {reduced})"]
    lines.append("    return")
    params = ["ds", "score", "b", "h", "q_idx", "kv_idx", *buffer_params(SCORE_PREFIX, buffers),
              *_grad_params(buffers, grad_buffers), "slot", "DETERMINISTIC: tl.constexpr"]
    return _function("scatter_captured_kv" if kv_major else "scatter_captured", params, lines)


def _grad_params(buffers: tuple[BufferSpec, ...], grad_buffers: frozenset[str]) -> list[str]:
    """Each gradient's pointer and strides, then the stride between programs' slices (deterministic mode; else 0)."""
    params = []
    for spec in buffers:
        if spec.name in grad_buffers:
            params += [*buffer_params(GRAD_PREFIX, (spec,)), f"{_grad_base(spec)}_slot_stride"]
    return params


def _grad_base(spec: BufferSpec) -> str:
    return f"{GRAD_PREFIX}_{identifier(spec.name)}"


def _grad_offset(spec: BufferSpec, load: Node, names: dict[Node, str]) -> str:
    """The element offset of a load's (wrapped, clamped) indices in the gradient buffer."""
    base = _grad_base(spec)
    terms = []
    for d, (index, size) in enumerate(zip(load.src, spec.shape)):
        if index.op == Op.CONST:  # wrap and clamp now, as the forward's loads do
            i = int(index.arg)
            terms.append(f"{min(max(i + size if i < 0 else i, 0), size - 1)} * {base}_stride{d}")
        else:
            terms.append(f"wrap_index({names[index]}.to(tl.int32), {size}) * {base}_stride{d}")
    return f"({' + '.join(terms) or '0'})"


def describe(mod: Mod | None, kind: str, grad_buffers: frozenset[str] = frozenset()) -> str:
    if mod is None:
        return f"# {kind}_mod: none"
    out = f"# {kind}_mod {mod.name} (key {mod.key})\n{_commented(mod.ir)}"
    if kind == "score":
        out += f"\n# d {kind}_mod / d score:\n{_commented(score_grad(mod.ir))}"
        for load, grad in load_grads(mod.ir):
            if load.arg in grad_buffers:
                out += f"\n# d {kind}_mod / d {load.arg}[...] (scattered into its gradient):\n{_commented(grad)}"
    return out


def backward_source(score_mod: Mod | None, mask_mod: Mod | None, grad_buffers: frozenset[str]) -> str:
    score_buffers, mask_buffers = _buffers(score_mod), _buffers(mask_mod)
    mod_params = buffer_params(SCORE_PREFIX, score_buffers) + buffer_params(MASK_PREFIX, mask_buffers)
    grad_list = _grad_params(score_buffers, grad_buffers)
    grad_params = args_text(grad_list)
    scatter_args = f"ds, score, b, h, q_idx, kv_idx, {args_text(buffer_params(SCORE_PREFIX, score_buffers))}{grad_params}"
    no_scatter = "pass  # no captured tensor needs a gradient"
    scatter_call = f"scatter_captured({scatter_args}slot, DETERMINISTIC)" if grad_params else no_scatter
    scatter_kv_call = f"scatter_captured_kv({scatter_args}0, False)" if grad_params else no_scatter
    header = "\n".join(["# Generated by flexcomp.codegen: the FlexAttention backward kernels for this variant.",
                        describe(score_mod, "score", grad_buffers), describe(mask_mod, "mask")])
    signature = BACKWARD.render({"mod_buffers": mod_params, "grad_buffers": grad_list})  # codegen/params.py
    kernel = fill_holes(BACKWARD_TEMPLATE, {
        "BACKWARD_PARAMS": signature, "ROW_ALIGNED": render_row_aligned(BACKWARD_ROW_ALIGNED),
        "MOD_BUFFERS": args_text(mod_params), "GRAD_BUFFERS": grad_params,
        "Q_TABLES": args_text(list(Q_TABLE_NAMES)), "KV_TABLES": args_text(list(TABLE_NAMES)),
        "SCATTER": scatter_call, "SCATTER_KV": scatter_kv_call, "DSCORE": render_dscore(score_mod),
    })  # fmt: skip
    modded = render_modded_scores(score_mod, mask_mod)
    fast = modded.replace("def modded_scores(", "def modded_scores_fast(").replace("tanh_f32(", "tanh_approx(")
    parts = [header, "import triton\nimport triton.language as tl", PRELUDE.strip(), KERNEL_HELPERS.strip(), modded, fast,
             render_scatter(score_mod, grad_buffers), render_scatter(score_mod, grad_buffers, kv_major=True),
             kernel.strip()]
    return "\n\n\n".join(parts) + "\n"


# The template.  {NAME} holes take generated argument lists.  Every tile recomputes
# P = exp(modded score - lse) from q, k and the saved lse; dS = P * (dP - delta), where
# delta = rowsum(dO * O) - dlse (the returned lse's gradient: d lse_i / d s_ij = P_ij).
# Exponentials are base 2: flex_bwd_delta scales lse by log2(e) once per row, and modded_scores returns
# base-2 scores (where the mod's derivative is 1, with the scalings folded: exp2's argument is one FFMA).
BACKWARD_TEMPLATE = '''
@triton.jit
def flex_bwd_delta(
    O, stride_ob, stride_oh, stride_om, stride_od,
    DO, stride_dob, stride_doh, stride_dom, stride_dod,
    DLSE, stride_lb, stride_lh, stride_lm,
    LSE, DELTA, LSE2,  # contiguous float32 [B, H_Q, Q_LEN]
    Q_LEN, H_Q,
    HAS_DLSE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr, DV: tl.constexpr,
    EVEN_Q: tl.constexpr = False,
):
    """delta = rowsum(dO * O) - dlse, in float32; and lse2, the lse in the base-2 form the tile loops use
    (computed once per row here, not once per tile there)."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b64 = (bh // H_Q).to(tl.int64)
    h64 = (bh % H_Q).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    q_in = offs_m < Q_LEN
    dv_in = offs_dv[None, :] < DV
    o = load_tile(O + b64 * stride_ob + h64 * stride_oh + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od,
                  q_in[:, None], dv_in, not EVEN_Q, BLOCK_DV != DV)
    do = load_tile(DO + b64 * stride_dob + h64 * stride_doh + offs_m[:, None] * stride_dom
                   + offs_dv[None, :] * stride_dod, q_in[:, None], dv_in, not EVEN_Q, BLOCK_DV != DV)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if HAS_DLSE:
        delta -= load_rows(DLSE + b64 * stride_lb + h64 * stride_lh + offs_m * stride_lm, q_in, 0.0, not EVEN_Q)
    rows = bh.to(tl.int64) * Q_LEN + offs_m
    lse2 = log2_lse(load_rows(LSE + rows, q_in, 0.0, not EVEN_Q))
    if EVEN_Q:
        tl.store(DELTA + rows, delta)
        tl.store(LSE2 + rows, lse2)
    else:
        tl.store(DELTA + rows, delta, mask=q_in)
        tl.store(LSE2 + rows, lse2, mask=q_in)


@triton.jit
def load_rows(ptrs, rows_in, other, CHECK_ROWS: tl.constexpr):
    if CHECK_ROWS:
        x = tl.load(ptrs, mask=rows_in, other=other)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def store_tile(ptrs, x, rows_in, cols_in, CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr):
    if CHECK_ROWS and CHECK_COLS:
        tl.store(ptrs, x, mask=rows_in & cols_in)
    elif CHECK_ROWS:
        tl.store(ptrs, x, mask=rows_in)
    elif CHECK_COLS:
        tl.store(ptrs, x, mask=cols_in)
    else:
        tl.store(ptrs, x)


@triton.jit
def add_one(slice_ptr, offset, value):
    # a plain read-add-write: only this program touches its slice, and a scalar store is one thread's
    tl.store(slice_ptr + offset, tl.load(slice_ptr + offset) + value)


@triton.jit
def add_in_order(slice_ptr, offsets, values):
    """slice_ptr[offsets] += values without atomics, the same way on every run (deterministic mode).

    A tile's offsets repeat (a relative-position table is hit once per diagonal), so each distinct
    offset, in ascending order, gets the tl.sum (a fixed tree) of its values and one read-add-write.
    """
    offsets = tl.where(values == 0.0, 2147483647, tl.broadcast_to(offsets, values.shape))  # + 0 changes nothing
    target = tl.min(tl.min(offsets, 1), 0)
    while target < 2147483647:
        add_one(slice_ptr, target, tl.sum(tl.sum(tl.where(offsets == target, values, 0.0), 1), 0))
        target = tl.min(tl.min(tl.where(offsets > target, offsets, 2147483647), 1), 0)


@triton.jit
def log2_lse(lse):
    # lse = -inf marks a fully masked row: +inf there makes P = 0 (the tile loops load rows past Q_LEN as +inf)
    return tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634


@triton.jit
def probabilities(a, b_op, lse2, b, h, q_idx, kv_idx, sm_scale, KV_LEN,
                  {MOD_BUFFERS}IS_FULL: tl.constexpr, EVEN_KV: tl.constexpr,
                  FAST_TANH: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """(P, the score, d score_mod / d score) of one tile, a @ b_op = q.k^T or (dK/dV's orientation) k.q^T.

    q_idx, kv_idx and lse2 = lse * log2(e) come broadcastable along the tile's axes; the mods only broadcast.
    """
    qk = mma(a, b_op, None, DOT_PRECISION)
    if FAST_TANH:
        modded, dmod = modded_scores_fast(qk, sm_scale, b, h, q_idx, kv_idx, KV_LEN, {MOD_BUFFERS}IS_FULL, EVEN_KV)
    else:
        modded, dmod = modded_scores(qk, sm_scale, b, h, q_idx, kv_idx, KV_LEN, {MOD_BUFFERS}IS_FULL, EVEN_KV)
    p = tl.math.exp2(tl.broadcast_to(modded, qk.shape) - lse2)  # a mod may not vary along every axis
    score = qk * sm_scale  # natural units, for the captured tensors' gradients (dead code where none are taken)
    return p, score, dmod


@triton.jit
def listed_tiles(PART: tl.constexpr, n_partial, partial_row, stride_in, n_full, full_row, stride_fin):
    """(index row, its stride, tile count) of one of program_tiles' two lists: PART 0 the PARTIAL tiles, 1 the FULL."""
    if PART == 0:
        index_row, stride_index, n_tiles = partial_row, stride_in, n_partial
    else:
        index_row, stride_index, n_tiles = full_row, stride_fin, n_full
    return index_row, stride_index, n_tiles


@triton.jit
def dkdv_tiles(
    dk, dv, k, v, Q, DO, LSE2, DELTA, DQ_ACC,
    stride_qm, stride_qd, stride_dom, stride_dod,
    n_partial, partial_row, stride_in, n_full, full_row, stride_fin,  # the q tiles: program_tiles' two lists
    b, h, offs_n, sm_scale, Q_LEN, KV_LEN,
    {MOD_BUFFERS}{GRAD_BUFFERS}
    EVEN_KV: tl.constexpr, FAST_TANH: tl.constexpr, SPARSE_Q: tl.constexpr, EVEN_Q: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    DOT_PRECISION: tl.constexpr, ATOMIC_DQ: tl.constexpr, PREFETCH_INDEX: tl.constexpr,
):
    """Accumulate dK (unscaled) and dV of one kv tile over its q tiles, the PARTIAL list then the FULL one;
    under ATOMIC_DQ also add each q tile's dQ contribution (unscaled) into the float32 rows at DQ_ACC
    and scatter the captured tensors' gradients (the dQ kernel then does not run).

    Tiles are [BLOCK_N, BLOCK_M] (kv rows, q columns): P^T and dS^T come out of the dots in the
    layout the dV and dK dots take, so no register tile is transposed (dQ's dot reads dS^T transposed).
    EVEN_Q: Q_LEN is a multiple of SPARSE_Q, so no q tile of a listed block reaches past it: no row masks.
    """
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    kv_idx = offs_n[:, None]
    for part in tl.static_range(2):  # unrolled: one loop over the PARTIAL tiles (mask applied), one over the FULL
        index_row, stride_index, n_tiles = listed_tiles(part, n_partial, partial_row, stride_in, n_full, full_row,
                                                        stride_fin)
        ahead = walk_ahead(index_row, stride_index, 0, n_tiles, SPARSE_Q, BLOCK_M, PREFETCH_INDEX)
        for i in range(0, n_tiles):
            start_m, ahead = walk_step(index_row, stride_index, i, n_tiles, ahead, SPARSE_Q, BLOCK_M, PREFETCH_INDEX)
            offs_m = start_m + tl.arange(0, BLOCK_M)
            q_in = offs_m < Q_LEN
            qt = load_tile(Q + offs_m[None, :] * stride_qm + offs_d[:, None] * stride_qd,
                           q_in[None, :], offs_d[:, None] < D, not EVEN_Q, BLOCK_D != D)
            do = load_tile(DO + offs_m[:, None] * stride_dom + offs_dv[None, :] * stride_dod,
                           q_in[:, None], offs_dv[None, :] < DV, not EVEN_Q, BLOCK_DV != DV)
            lse2 = load_rows(LSE2 + offs_m, q_in, float("inf"), not EVEN_Q)
            delta = load_rows(DELTA + offs_m, q_in, 0.0, not EVEN_Q)
            p, score, dmod = probabilities(k, qt, lse2[None, :], b, h, offs_m[None, :], kv_idx, sm_scale, KV_LEN,
                                           {MOD_BUFFERS}part == 1, EVEN_KV, FAST_TANH, DOT_PRECISION)
            dv = mma(p.to(do.dtype), do, dv, DOT_PRECISION)
            dp = mma(v, tl.trans(do), None, DOT_PRECISION)
            ds = p * (dp - delta[None, :])
            {DSCORE}
            dscore_lp = dscore.to(qt.dtype)
            dk = mma(dscore_lp, tl.trans(qt), dk, DOT_PRECISION)
            if ATOMIC_DQ:  # dQ[q tile] += dS K, as dQ^T = K^T dS^T (k is in shared memory: its transpose is a view)
                dq_t = mma(tl.trans(k), dscore_lp, None, DOT_PRECISION)
                dq_ptrs = DQ_ACC + offs_m[None, :] * D + offs_d[:, None]
                if EVEN_Q and BLOCK_D == D:
                    tl.atomic_add(dq_ptrs, dq_t, sem="relaxed")
                elif EVEN_Q:
                    tl.atomic_add(dq_ptrs, dq_t, mask=offs_d[:, None] < D, sem="relaxed")
                else:
                    tl.atomic_add(dq_ptrs, dq_t, mask=q_in[None, :] & (offs_d[:, None] < D), sem="relaxed")
                q_idx = offs_m[None, :]
                {SCATTER_KV}
    return dk, dv


@triton.jit
def dq_tiles(
    dq, q, do, lse2, delta, K, V,
    stride_kn, stride_kd, stride_vn, stride_vd,
    n_partial, partial_row, stride_in, n_full, full_row, stride_fin,  # the kv tiles: program_tiles' two lists
    b, h, offs_m, sm_scale, KV_LEN,
    {MOD_BUFFERS}{GRAD_BUFFERS}slot,
    EVEN_KV: tl.constexpr, FAST_TANH: tl.constexpr, SPARSE_KV: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DETERMINISTIC: tl.constexpr, PREFETCH_INDEX: tl.constexpr,
):
    """Accumulate dQ (unscaled) of one q tile over its kv tiles, the PARTIAL list then the FULL one.
    EVEN_KV: KV_LEN is a multiple of SPARSE_KV, so no kv tile of a listed block reaches past it."""
    q_idx = offs_m[:, None]
    for part in tl.static_range(2):  # unrolled: one loop over the PARTIAL tiles (mask applied), one over the FULL
        index_row, stride_index, n_tiles = listed_tiles(part, n_partial, partial_row, stride_in, n_full, full_row,
                                                        stride_fin)
        ahead = walk_ahead(index_row, stride_index, 0, n_tiles, SPARSE_KV, BLOCK_N, PREFETCH_INDEX)
        for i in range(0, n_tiles):
            start_n, ahead = walk_step(index_row, stride_index, i, n_tiles, ahead, SPARSE_KV, BLOCK_N, PREFETCH_INDEX)
            offs_n = start_n + tl.arange(0, BLOCK_N)
            kt = load_kv_tile(K, start_n, stride_kn, stride_kd, KV_LEN, BLOCK_N, BLOCK_D, D, True, not EVEN_KV)
            vt = load_kv_tile(V, start_n, stride_vn, stride_vd, KV_LEN, BLOCK_N, BLOCK_DV, DV, True, not EVEN_KV)
            kv_idx = offs_n[None, :]
            p, score, dmod = probabilities(q, kt, lse2[:, None], b, h, q_idx, kv_idx, sm_scale, KV_LEN,
                                           {MOD_BUFFERS}part == 1, EVEN_KV, FAST_TANH, DOT_PRECISION)
            dp = mma(do, vt, None, DOT_PRECISION)
            ds = p * (dp - delta[:, None])
            {DSCORE}
            dq = mma(dscore.to(q.dtype), tl.trans(kt), dq, DOT_PRECISION)
            {SCATTER}
    return dq


@triton.jit
def flex_bwd(
{BACKWARD_PARAMS}
):
    """The gradients' programs, on a 1-D grid: first the dK/dV programs (DKDV_PART; one per kv tile, walking the
    q-major tables, summing over a GQA group's q heads), then the dQ programs (DQ_PART; one per q tile, heaviest
    first, walking the kv-major tables).  One launch may hold both: the dQ programs then fill the SMs the last
    dK/dV programs leave idle, where two launches would wait for the slowest dK/dV program.  Constexprs ending
    in 1 configure the dK/dV part, in 2 the dQ part (BackwardConfig's names); the parts of one launch share its
    warps and pipeline depth (Triton 3.6 does not pipeline a loop given its own depth by tl.range(num_stages=))."""
{ROW_ALIGNED}
    pid = tl.program_id(0)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    if DKDV_PART:
        if pid < dkdv_programs:  # dK, dV of kv tile pid_n of kv head row bh (and under ATOMIC_DQ dQ's parts)
            pid_n = pid % kv_tiles
            bh = pid // kv_tiles
            b = bh // H_KV
            h_kv = bh % H_KV
            offs_n = pid_n * BLOCK_N1 + tl.arange(0, BLOCK_N1)
            kv_in = offs_n < KV_LEN
            b64 = b.to(tl.int64)
            # EVEN_KV1: KV_LEN is a multiple of BLOCK_N1 (this tile is in bounds); EVEN_Q1: Q_LEN is a multiple of
            # SPARSE_Q1 (every q tile the tables list is)
            k = load_kv_tile(K + b64 * stride_kb + h_kv.to(tl.int64) * stride_kh, pid_n * BLOCK_N1, stride_kn,
                             stride_kd, KV_LEN, BLOCK_N1, BLOCK_D, D, False, not EVEN_KV1)
            v = load_kv_tile(V + b64 * stride_vb + h_kv.to(tl.int64) * stride_vh, pid_n * BLOCK_N1, stride_vn,
                             stride_vd, KV_LEN, BLOCK_N1, BLOCK_DV, DV, False, not EVEN_KV1)
            dk = tl.zeros([BLOCK_N1, BLOCK_D], dtype=tl.float32)
            dv = tl.zeros([BLOCK_N1, BLOCK_DV], dtype=tl.float32)
            for g in range(0, GQA_GROUP):  # dK, dV of a kv head sum over the q heads that read it
                h = h_kv * GQA_GROUP + g
                # its q tiles: a row of the q-major tables (no closed form: USE_BOUNDS False)
                n_partial, n_full, _, _, _, partial_row, _, full_row = program_tiles(
                    0, 0, 0, 0, b, h, (pid_n * BLOCK_N1) // SPARSE_KV1, {Q_TABLES}Q_LEN, False, True, BLOCK_M1,
                    SPARSE_Q1 // BLOCK_M1)
                lse_row = (b64 * H_Q + h) * Q_LEN
                dk, dv = dkdv_tiles(
                    dk, dv, k, v, Q + b64 * stride_qb + h.to(tl.int64) * stride_qh,
                    DO + b64 * stride_dob + h.to(tl.int64) * stride_doh,
                    LSE2 + lse_row, DELTA + lse_row, DQ_ACC + lse_row * D, stride_qm, stride_qd, stride_dom, stride_dod,
                    n_partial, partial_row, stride_qin, n_full, full_row, stride_qfin, b, h, offs_n, sm_scale, Q_LEN,
                    KV_LEN, {MOD_BUFFERS}{GRAD_BUFFERS}EVEN_KV1, FAST_TANH, SPARSE_Q1, EVEN_Q1, BLOCK_M1, BLOCK_D,
                    BLOCK_DV, D, DV, DOT_PRECISION, ATOMIC_DQ, PREFETCH_INDEX1)
            store_tile(DK_OUT + b64 * stride_dkb + h_kv.to(tl.int64) * stride_dkh + offs_n[:, None] * stride_dkn
                       + offs_d[None, :] * stride_dkd, (dk * sm_scale).to(DK_OUT.dtype.element_ty),
                       kv_in[:, None], offs_d[None, :] < D, not EVEN_KV1, BLOCK_D != D)
            store_tile(DV_OUT + b64 * stride_dvb + h_kv.to(tl.int64) * stride_dvh + offs_n[:, None] * stride_dvn
                       + offs_dv[None, :] * stride_dvd, dv.to(DV_OUT.dtype.element_ty),
                       kv_in[:, None], offs_dv[None, :] < DV, not EVEN_KV1, BLOCK_DV != DV)
    if DQ_PART:
        if pid >= dkdv_programs:  # dQ of q tile pid_m of q head row bh, and the captured tensors' gradients
            slot = pid - dkdv_programs  # DETERMINISTIC: this program's slice of the [programs, numel] partials
            # last q tiles first: under causal-like masks they have the most kv tiles, so the tail of the grid is short
            pid_m = q_tiles - 1 - slot % q_tiles
            bh = slot // q_tiles
            b = bh // H_Q
            h = bh % H_Q
            offs_m = pid_m * BLOCK_M2 + tl.arange(0, BLOCK_M2)
            q_in = offs_m < Q_LEN
            b64 = b.to(tl.int64)
            h_kv64 = (h // GQA_GROUP).to(tl.int64)
            # EVEN_Q2: Q_LEN is a multiple of BLOCK_M2 (this tile is in bounds); EVEN_KV2: KV_LEN is a multiple of
            # SPARSE_KV2 (every kv tile the tables list is)
            q = load_tile(Q + b64 * stride_qb + h.to(tl.int64) * stride_qh + offs_m[:, None] * stride_qm
                          + offs_d[None, :] * stride_qd, q_in[:, None], offs_d[None, :] < D, not EVEN_Q2, BLOCK_D != D)
            do = load_tile(DO + b64 * stride_dob + h.to(tl.int64) * stride_doh + offs_m[:, None] * stride_dom
                           + offs_dv[None, :] * stride_dod, q_in[:, None], offs_dv[None, :] < DV, not EVEN_Q2,
                           BLOCK_DV != DV)
            lse_row = (b64 * H_Q + h) * Q_LEN
            lse2 = load_rows(LSE2 + lse_row + offs_m, q_in, float("inf"), not EVEN_Q2)
            delta = load_rows(DELTA + lse_row + offs_m, q_in, 0.0, not EVEN_Q2)
            # its kv tiles: a row of the kv-major tables, as the forward's (no closed form: USE_BOUNDS False)
            n_partial, n_full, _, _, _, partial_row, _, full_row = program_tiles(
                0, 0, 0, 0, b, h, (pid_m * BLOCK_M2) // SPARSE_Q2, {KV_TABLES}KV_LEN, False, True, BLOCK_N2,
                SPARSE_KV2 // BLOCK_N2)
            dq = tl.zeros([BLOCK_M2, BLOCK_D], dtype=tl.float32)
            dq = dq_tiles(dq, q, do, lse2, delta, K + b64 * stride_kb + h_kv64 * stride_kh,
                          V + b64 * stride_vb + h_kv64 * stride_vh, stride_kn, stride_kd, stride_vn, stride_vd,
                          n_partial, partial_row, stride_in, n_full, full_row, stride_fin, b, h, offs_m, sm_scale,
                          KV_LEN, {MOD_BUFFERS}{GRAD_BUFFERS}slot.to(tl.int64),
                          EVEN_KV2, FAST_TANH, SPARSE_KV2, BLOCK_N2, BLOCK_D, BLOCK_DV, D, DV, DOT_PRECISION,
                          DETERMINISTIC, PREFETCH_INDEX2)
            store_tile(DQ + b64 * stride_dqb + h.to(tl.int64) * stride_dqh + offs_m[:, None] * stride_dqm
                       + offs_d[None, :] * stride_dqd, (dq * sm_scale).to(DQ.dtype.element_ty),
                       q_in[:, None], offs_d[None, :] < D, not EVEN_Q2, BLOCK_D != D)
'''
