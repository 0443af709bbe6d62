"""The forward kernel's source: one template, the user's mods rendered into it.

The template's logic is specialized by tl.constexpr flags (HAS_SCORE_MOD,
USE_BOUNDS, HAS_FULL, IS_FULL...); only the mods' own code, their captured-tensor
parameters and the closed-form bounds are pasted in as text.  Head dims, dtypes
and block sizes are constexprs too, so one generated file serves every shape and
Triton's own cache keeps one binary per specialization.

Mod code is split in two (see ops.hoistable): what depends only on b, h and
q_idx is computed once per q tile (`*_hoisted`), the rest per kv tile.
"""

from __future__ import annotations

import inspect
import textwrap
from dataclasses import dataclass

from flexcomp.ir import arg, to_expr, to_text
from flexcomp.mods import Mod
from flexcomp.tiles import ClosedFormBounds

from .decode import MERGE_SOURCE
from .kernel_passes import shape
from .ops import (
    KERNEL_HELPERS,
    PRELUDE,
    args_text,
    buffer_params,
    cast_f32,
    fill_holes,
    hoistable,
    lhs_text,
    render_block,
)
from .params import DECODE, FORWARD, FORWARD_ROW_ALIGNED, TABLE_NAMES, render_row_aligned

LOOP_ARGS = frozenset({"score", "kv_idx"})  # what changes from one kv tile to the next
MOD_ARG_NAMES = {"score": "score", "b": "b", "h": "h", "q_idx": "q_idx", "kv_idx": "kv_idx", "sm_scale": "sm_scale"}
SCORE_FUNCTION_ARGS = ("score", "b", "h", "q_idx", "kv_idx", "sm_scale")  # score = the raw q.k (base2_form)
BOUND_ARG_NAMES = {"b": "b", "h": "h", "q_lo": "q_lo", "q_hi": "q_hi", "Q_LEN": "Q_LEN", "KV_LEN": "KV_LEN"}


@dataclass(frozen=True)
class ModCode:
    """One mod, rendered: its functions' text and the names the template threads through."""

    functions: str
    hoisted: list[str]  # values the kernel computes per q tile and hands to the loop
    buffers: list[str]  # captured-tensor parameters
    float_functions: str = ""  # score mods: `score_mod_float`, the exact float index form (ops.float_index_form)


FLOAT_INDEX_NAME = "kv_idx_f"  # the kernel's float32 kv_idx: start_n + arange, converted per tile, not per element


def render_mod(mod: Mod | None, kind: str) -> ModCode:
    """The mod's kernel functions.  A score_mod is rendered in the kernel's units (codegen/base2.py): it takes
    the raw q.k and sm_scale and returns `score_mod(qk * sm_scale) * log2(e)`, its scalar factors merged."""
    prefix = "s" if kind == "score" else "m"
    arg_names = SCORE_FUNCTION_ARGS if kind == "score" else ("b", "h", "q_idx", "kv_idx")
    float_params = list(arg_names) + [FLOAT_INDEX_NAME]
    pre_args = [a for a in arg_names if a not in LOOP_ARGS]
    if mod is None:  # no score_mod: the identity, never called (HAS_SCORE_MOD is False)
        hoisted = _function(f"{kind}_mod_hoisted", pre_args, [], "0")
        floats = _function(f"{kind}_mod_float", float_params, [], "score") if kind == "score" else ""
        return ModCode(hoisted + "\n\n\n" + _function(f"{kind}_mod", list(arg_names), [], "score"), [], [], floats)
    buffers = tuple(mod.buffers)
    params = buffer_params(f"{prefix}b", buffers)
    bp = f"{prefix}b"
    base2 = ("base2",) if kind == "score" else ()
    ir, float_ir = shape(mod.ir, base2, mod.name), shape(mod.ir, ("float_index", *base2), mod.name)
    roots = [ir]
    if kind == "score" and float_ir != ir:
        roots.append(float_ir)  # both forms' loop invariants are hoisted; the kernel uses one set
    names = {arg(a): MOD_ARG_NAMES[a] for a in arg_names if a not in LOOP_ARGS}
    pre_lines, hoisted = render_block(hoistable(roots, LOOP_ARGS), names, f"{prefix}h", buffers, bp)
    names.update({arg(a): MOD_ARG_NAMES[a] for a in arg_names if a in LOOP_ARGS})
    float_names = {**names, cast_f32(arg("kv_idx")): FLOAT_INDEX_NAME}
    lines, (result,) = render_block([ir], names, prefix, buffers, bp)
    text = _function(f"{kind}_mod_hoisted", pre_args + params, pre_lines, ", ".join(hoisted) or "0")
    text += "\n\n\n" + _function(f"{kind}_mod", list(arg_names) + hoisted + params, lines, result)
    floats = ""
    if kind == "score":
        float_params += hoisted + params
        if len(roots) == 1:  # nothing to rewrite: never called (the host sets FLOAT_INDEX only after a rewrite)
            floats = _function("score_mod_float", float_params, [], "score")
        else:
            float_lines, (float_result,) = render_block([float_ir], float_names, "sf", buffers, bp)
            floats = _function("score_mod_float", float_params, float_lines, float_result)
    return ModCode(text, hoisted, params, floats)


def render_bounds(bounds: ClosedFormBounds | None, mask_mod: Mod) -> str:
    """`kv_bounds(...) -> (kv_lo, kv_hi, full_lo, full_hi)`, unclamped, as the analysis gave them."""
    params = ["b", "h", "q_lo", "q_hi", "Q_LEN", "KV_LEN"] + buffer_params("mb", tuple(mask_mod.buffers))
    if bounds is None:  # never called (USE_BOUNDS is False); here so the template always resolves
        return _function("kv_bounds", params, [], "0, KV_LEN, 0, 0")
    roots = [bounds.kv_lo, bounds.kv_hi, bounds.full_lo, bounds.full_hi]
    names = {arg(a): n for a, n in BOUND_ARG_NAMES.items()}
    lines, results = render_block(roots, names, "k", tuple(mask_mod.buffers), "mb")
    ints = params[:6]  # the decode kernel passes q_lo = 0; Q_LEN may be specialized (1)
    entry = f"    {', '.join(ints)} = {', '.join(f'as_i32({n})' for n in ints)}"
    return _function("kv_bounds", params, [entry, *lines], ", ".join(results))


def _function(name: str, params: list[str], lines: list[str], result: str) -> str:
    body = "\n".join(lines + [f"    return {result}"])
    return f"@triton.jit\ndef {name}({', '.join(params)}):\n{body}"


def _comment(text: str) -> str:
    return "\n".join(f"#   {line}".rstrip() for line in text.splitlines())


def describe(mod: Mod | None, kind: str) -> str:
    if mod is None:
        return f"# {kind}_mod: none"
    head = f"# {kind}_mod {mod.name} (key {mod.key})"
    source = ""
    if mod.fn is not None:
        try:
            source = "\n#  source:\n" + _comment(textwrap.dedent(inspect.getsource(mod.fn)))
        except (OSError, TypeError):
            pass
    buffers = "".join(f"\n#  captures {b.name}: {b.dtype}{list(b.shape)}" for b in mod.buffers)
    return f"{head}{source}{buffers}\n#  IR:\n{_comment(to_text(mod.ir))}"


def describe_bounds(bounds: ClosedFormBounds | None) -> str:
    if bounds is None:
        return "# loop bounds: read from the block mask's index tables"
    fields = ("kv_lo", "kv_hi", "full_lo", "full_hi")
    return "# loop bounds: closed form\n" + "\n".join(f"#   {f} = {to_expr(getattr(bounds, f))}" for f in fields)


def forward_source(score_mod: Mod | None, mask_mod: Mod, bounds: ClosedFormBounds | None) -> str:
    score, mask = render_mod(score_mod, "score"), render_mod(mask_mod, "mask")
    header = "\n".join([
        "# Generated by flexcomp.codegen: the FlexAttention forward kernel for this variant.",
        describe(score_mod, "score"),
        describe(mask_mod, "mask"),
        describe_bounds(bounds),
    ])  # fmt: skip
    fill = {
        "SCORE_HOISTED": args_text(score.hoisted),
        "MASK_HOISTED": args_text(mask.hoisted),
        "SCORE_BUFFERS": args_text(score.buffers),
        "MASK_BUFFERS": args_text(mask.buffers),
        "SCORE_HOISTED_LHS": lhs_text(score.hoisted),
        "MASK_HOISTED_LHS": lhs_text(mask.hoisted),
        "TABLE_ARGS": args_text(list(TABLE_NAMES)),
        "FORWARD_PARAMS": FORWARD.render({"mod_buffers": score.buffers + mask.buffers}),  # the declaration in codegen/params.py
        "DECODE_PARAMS": DECODE.render({"mod_buffers": score.buffers + mask.buffers}),
        "MERGE_PARTIALS": MERGE_SOURCE,
        "ROW_ALIGNED": render_row_aligned(FORWARD_ROW_ALIGNED),
    }
    kernel = fill_holes(FORWARD_TEMPLATE + DECODE_TEMPLATE, fill)
    parts = [header, "import triton\nimport triton.language as tl", PRELUDE.strip(), KERNEL_HELPERS.strip(),
             score.functions, fast_variant(score.functions, "score_mod"), score.float_functions,
             fast_variant(score.float_functions, "score_mod_float"), mask.functions,
             render_bounds(bounds, mask_mod), kernel.strip()]
    text = "\n\n\n".join(parts)
    return "\n".join(line.rstrip() for line in text.splitlines()) + "\n"


def fast_variant(functions: str, name: str) -> str:
    """`{name}_fast`: the function `name` with tanh on the MUFU unit (the kernel calls it when FAST_TANH)."""
    body = functions[functions.index(f"@triton.jit\ndef {name}("):]
    return body.replace(f"def {name}(", f"def {name}_fast(").replace("tanh_f32(", "tanh_approx(")


def bounds_text(bounds: ClosedFormBounds | None) -> str:
    if bounds is None:
        return "none"
    return "\n".join(to_text(getattr(bounds, f)) for f in ("kv_lo", "kv_hi", "full_lo", "full_hi"))


# The template.  {NAME} holes take the generated argument lists above.
FORWARD_TEMPLATE = '''
@triton.jit
def attend_tiles(
    acc, l_i, m_i, q,
    K, stride_kn, stride_kd,
    V, stride_vn, stride_vd,
    b, h, q_idx, sm_scale, KV_LEN,
    i_lo, i_hi,  # the tiles walked: [i_lo, i_hi) of the program's list (a split-KV program walks a part of it)
    first_lo, n_first, second_lo,  # the list when USE_BOUNDS: two runs of consecutive tiles (closed_form_tiles)
    kv_index_row, stride_kv_index,  # else the block mask's kv_indices row
    {SCORE_HOISTED}{MASK_HOISTED}{SCORE_BUFFERS}{MASK_BUFFERS}
    IS_FULL: tl.constexpr, USE_BOUNDS: tl.constexpr, HAS_SCORE_MOD: tl.constexpr,
    SPARSE_KV: tl.constexpr, TILES_PER_BLOCK: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    CHECK_KV: tl.constexpr, FAST_TANH: tl.constexpr, USE_TMA: tl.constexpr, FLOAT_INDEX: tl.constexpr,
    FOLD_SCALE: tl.constexpr, PREFETCH_INDEX: tl.constexpr, page_row=None, PAGE_SIZE: tl.constexpr = 0,
):
    \"\"\"Online softmax over the kv tiles [i_lo, i_hi) of one list; PAGE_SIZE > 0: K/V through a page table.\"\"\"
    qk_scale = sm_scale * 1.4426950408889634  # scores in base 2
    if USE_TMA:  # Hopper's bulk tensor copies for K and V (host checked 16-byte alignment, unit last stride)
        k_desc = tl.make_tensor_descriptor(K, [KV_LEN, D], [stride_kn, 1], [BLOCK_N, BLOCK_D])
        v_desc = tl.make_tensor_descriptor(V, [KV_LEN, DV], [stride_vn, 1], [BLOCK_N, BLOCK_DV])
    else:
        k_desc, v_desc = K, V  # unused
    ahead = walk_ahead(kv_index_row, stride_kv_index, i_lo, i_hi, SPARSE_KV, BLOCK_N, PREFETCH_INDEX)  # (off with bounds)
    if PAGE_SIZE > 0:  # a paged cache: each tile's page entries are read one tile ahead (as PREFETCH_INDEX reads
        # block indices): read in the step whose K/V loads they address, they stall Triton's pipeline
        rows_next = tile_rows(tile_start(i_lo, i_hi, first_lo, n_first, second_lo, kv_index_row, stride_kv_index,
                                         USE_BOUNDS, SPARSE_KV, BLOCK_N), KV_LEN, page_row, BLOCK_N, PAGE_SIZE)
    for i in range(i_lo, i_hi):
        if USE_BOUNDS:
            start_n = tile_start(i, i_hi, first_lo, n_first, second_lo, kv_index_row, stride_kv_index, True,
                                 SPARSE_KV, BLOCK_N)
        else:
            start_n, ahead = walk_step(kv_index_row, stride_kv_index, i, i_hi, ahead, SPARSE_KV, BLOCK_N,
                                       PREFETCH_INDEX)
        # the tile's online-softmax step; FULL tiles (IS_FULL) never evaluate the mask
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kv_in = offs_n < KV_LEN
        if PAGE_SIZE > 0:
            rows = rows_next
            rows_next = tile_rows(tile_start(i + 1, i_hi, first_lo, n_first, second_lo, kv_index_row,
                                             stride_kv_index, USE_BOUNDS, SPARSE_KV, BLOCK_N),
                                  KV_LEN, page_row, BLOCK_N, PAGE_SIZE)  # at the last tile: a spare read, in bounds
            kt = load_kv_rows(K, rows, kv_in, stride_kn, stride_kd, BLOCK_D, D, True, CHECK_KV)
        elif USE_TMA:  # the copy engine zero-fills rows past KV_LEN and columns past D
            kt = tl.trans(k_desc.load([start_n, 0]))
        else:
            kt = load_kv_tile(K, start_n, stride_kn, stride_kd, KV_LEN, BLOCK_N, BLOCK_D, D, True, CHECK_KV)
        qk = mma(q, kt, None, DOT_PRECISION)
        kv_idx = offs_n[None, :]
        if HAS_SCORE_MOD:  # score_mod(q.k * scale) * log2(e), the scalings folded into the mod (codegen/base2.py)
            if FLOAT_INDEX:  # int->float casts of kv_idx expressions in float: exact, the host checked the range
                kv_idx_f = (start_n.to(tl.float32) + tl.arange(0, BLOCK_N).to(tl.float32))[None, :]
                if FAST_TANH:
                    score = score_mod_float_fast(qk, b, h, q_idx, kv_idx, sm_scale, kv_idx_f,
                                                 {SCORE_HOISTED}{SCORE_BUFFERS})
                else:
                    score = score_mod_float(qk, b, h, q_idx, kv_idx, sm_scale, kv_idx_f,
                                            {SCORE_HOISTED}{SCORE_BUFFERS})
            elif FAST_TANH:
                score = score_mod_fast(qk, b, h, q_idx, kv_idx, sm_scale, {SCORE_HOISTED}{SCORE_BUFFERS})
            else:
                score = score_mod(qk, b, h, q_idx, kv_idx, sm_scale, {SCORE_HOISTED}{SCORE_BUFFERS})
            score = tl.broadcast_to(score.to(tl.float32), (BLOCK_M, BLOCK_N))
        elif FOLD_SCALE:  # raw q.k: the scale goes into the row max and the exp2's FMA below (qk_scale > 0)
            score = qk
        else:
            score = qk * qk_scale
        if not IS_FULL:
            keep = mask_mod(b, h, q_idx, kv_idx, {MASK_HOISTED}{MASK_BUFFERS})
            score = tl.where(keep, score, float("-inf"))
        if CHECK_KV:
            score = tl.where(kv_in[None, :], score, float("-inf"))
        # base-2 online softmax; a row with nothing unmasked yet keeps m = -inf, so subtract 0 instead
        if FOLD_SCALE and not HAS_SCORE_MOD:  # max(qk) * c == max(qk * c) for c > 0, also with -inf entries
            m_new = tl.maximum(m_i, tl.max(score, 1) * qk_scale)
        else:
            m_new = tl.maximum(m_i, tl.max(score, 1))
        if ((not IS_FULL) or HAS_SCORE_MOD) or CHECK_KV:  # else every score here is finite
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_safe = m_new
        alpha = tl.math.exp2(m_i - m_safe)
        if FOLD_SCALE and not HAS_SCORE_MOD:
            p = tl.math.exp2(score * qk_scale - m_safe[:, None])  # one FFMA per element; -inf stays -inf
        else:
            p = tl.math.exp2(score - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if PAGE_SIZE > 0:
            v = load_kv_rows(V, rows, kv_in, stride_vn, stride_vd, BLOCK_DV, DV, False, CHECK_KV)
        elif USE_TMA:
            v = v_desc.load([start_n, 0])
        else:
            v = load_kv_tile(V, start_n, stride_vn, stride_vd, KV_LEN, BLOCK_N, BLOCK_DV, DV, False, CHECK_KV)
        acc = mma(p.to(v.dtype), v, acc * alpha[:, None], DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def attend_lists(
    q,
    K, stride_kn, stride_kd,
    V, stride_vn, stride_vd,
    b, h, q_idx, sm_scale, KV_LEN,
    n_partial, n_full, first_lo, n_first, second_lo, partial_row, full_lo, full_row,  # program_tiles' two lists
    stride_in, stride_fin,  # the block mask's kv_indices rows, walked unless USE_BOUNDS
    split,  # this program's part of each list when they are cut into N_SPLITS (split-KV decoding)
    page_row,  # PAGE_SIZE > 0: the request's page-table row (paged_request)
    {SCORE_HOISTED}{MASK_HOISTED}{SCORE_BUFFERS}{MASK_BUFFERS}
    USE_BOUNDS: tl.constexpr, HAS_SCORE_MOD: tl.constexpr, SPARSE_KV: tl.constexpr, N_SPLITS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    CHECK_KV: tl.constexpr, FAST_TANH: tl.constexpr, USE_TMA: tl.constexpr, FLOAT_INDEX: tl.constexpr,
    FOLD_SCALE: tl.constexpr, PREFETCH_INDEX: tl.constexpr, PAGE_SIZE: tl.constexpr,
):
    \"\"\"Online softmax over a program's kv tiles from the empty state (no row seen yet): its PARTIAL list, then
    its FULL one (attend_tiles per list).  Returns (acc, l_i, m_i), acc not yet divided by l_i.\"\"\"
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for part in tl.static_range(2):  # unrolled: one loop over the PARTIAL tiles (mask applied), one over the FULL
        if part == 0:  # two runs of consecutive tiles (USE_BOUNDS), else a kv_indices row
            n_tiles, run_lo, n_run, run2_lo, index_row, stride_index = (n_partial, first_lo, n_first, second_lo,
                                                                         partial_row, stride_in)
        else:  # one run
            n_tiles, run_lo, n_run, run2_lo, index_row, stride_index = (n_full, full_lo, n_full, full_lo,
                                                                         full_row, stride_fin)
        i_lo, i_hi = split_tiles(n_tiles, split, N_SPLITS)
        acc, l_i, m_i = attend_tiles(
            acc, l_i, m_i, q, K, stride_kn, stride_kd, V, stride_vn, stride_vd, b, h, q_idx, sm_scale, KV_LEN,
            i_lo, i_hi, run_lo, n_run, run2_lo, index_row, stride_index,
            {SCORE_HOISTED}{MASK_HOISTED}{SCORE_BUFFERS}{MASK_BUFFERS}
            part == 1, USE_BOUNDS, HAS_SCORE_MOD, SPARSE_KV, SPARSE_KV // BLOCK_N,
            BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV, D, DV, DOT_PRECISION, CHECK_KV, FAST_TANH, USE_TMA, FLOAT_INDEX,
            FOLD_SCALE, PREFETCH_INDEX, page_row, PAGE_SIZE,
        )
    return acc, l_i, m_i


@triton.jit
def flex_forward_kernel(
{FORWARD_PARAMS}
):
{ROW_ALIGNED}
    # q tiles in reverse: under a causal-like mask the last ones are the longest, so they start first
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H_Q
    h = bh % H_Q
    q_lo = pid_m * BLOCK_M
    offs_m = q_lo + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    b64 = b.to(tl.int64)
    kv_h64 = (h // GQA_GROUP).to(tl.int64)
    q = load_tile(Q + b64 * stride_qb + h.to(tl.int64) * stride_qh + offs_m[:, None] * stride_qm
                  + offs_d[None, :] * stride_qd,
                  offs_m[:, None] < Q_LEN, offs_d[None, :] < D, not EVEN_Q, BLOCK_D != D)
    K_bh = K + b64 * stride_kb + kv_h64 * stride_kh
    V_bh = V + b64 * stride_vb + kv_h64 * stride_vh
    page_row, kv_len = paged_request(b, PAGE_TABLE, stride_pgb, KV_LENS, KV_LEN, PAGE_SIZE)

    q_idx = offs_m[:, None]
    {SCORE_HOISTED_LHS} = score_mod_hoisted(b, h, q_idx, sm_scale, {SCORE_BUFFERS})
    {MASK_HOISTED_LHS} = mask_mod_hoisted(b, h, q_idx, {MASK_BUFFERS})

    # The kv tiles this q tile visits: PARTIAL ones (mask applied) and FULL ones (mask skipped)
    if USE_BOUNDS:
        q_hi = tl.minimum(q_lo + BLOCK_M, Q_LEN) - 1
        kv_lo, kv_hi, full_lo, full_hi = kv_bounds(b, h, q_lo, q_hi, Q_LEN, KV_LEN, {MASK_BUFFERS})
    else:
        kv_lo, kv_hi, full_lo, full_hi = 0, 0, 0, 0
    n_partial, n_full, first_lo, n_first, second_lo, partial_row, full_lo, full_row = program_tiles(
        kv_lo, kv_hi, full_lo, full_hi, b, h, q_lo // SPARSE_Q, {TABLE_ARGS}
        KV_LEN, USE_BOUNDS, HAS_FULL, BLOCK_N, TILES_PER_BLOCK)

    acc, l_i, m_i = attend_lists(
        q, K_bh, stride_kn, stride_kd, V_bh, stride_vn, stride_vd, b, h, q_idx, sm_scale, kv_len,
        n_partial, n_full, first_lo, n_first, second_lo, partial_row, full_lo, full_row, stride_in, stride_fin, 0,
        page_row,
        {SCORE_HOISTED}{MASK_HOISTED}{SCORE_BUFFERS}{MASK_BUFFERS}
        USE_BOUNDS, HAS_SCORE_MOD, SPARSE_KV, 1, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV, D, DV, DOT_PRECISION,
        not EVEN_KV, FAST_TANH, USE_TMA, FLOAT_INDEX, FOLD_SCALE, PREFETCH_INDEX, PAGE_SIZE,
    )

    # a fully masked row has l = 0: output 0 and lse -inf, never 0/0
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    row_in = offs_m < Q_LEN
    out_ptrs = (Out + b64 * stride_ob + h.to(tl.int64) * stride_oh + offs_m[:, None] * stride_om
                + offs_dv[None, :] * stride_od)
    out = out.to(Out.dtype.element_ty)
    if EVEN_Q and BLOCK_DV == DV:
        tl.store(out_ptrs, out)
    else:
        tl.store(out_ptrs, out, mask=row_in[:, None] & (offs_dv[None, :] < DV))
    lse_offsets = b64 * stride_lb + h.to(tl.int64) * stride_lh + offs_m * stride_lm
    tl.store(Lse + lse_offsets, lse, mask=row_in)
    if OUTPUT_MAX:  # the row's largest score after score_mod and mask (-inf when fully masked), natural units
        tl.store(MaxScores + lse_offsets, m_i * 0.6931471805599453, mask=row_in)
'''


# Decoding: a few query rows against a long kv cache (codegen/decode.py chooses it and says why).  One program per
# (split, batch, pack of PACK query heads sharing a kv head): every query row of those heads in one tile of rows,
# so each K/V tile is read once for all of them, and the kv list cut into N_SPLITS parts so that short-q problems
# still fill the GPU.  Same tiles, mods and lists as the forward; only the rows and the epilogue differ.  The
# merge of the splits' partials (decode.merge_partials) is pasted in: the last split of a row tile to finish runs it.
DECODE_TEMPLATE = '''


{MERGE_PARTIALS}


@triton.jit
def store_rows(Out, stride_ob, stride_oh, stride_om, stride_od, Lse, stride_lb, stride_lh, stride_lm,
               b64, head_of_row, q_of_row, row_in, out, lse, DV: tl.constexpr, BLOCK_DV: tl.constexpr):
    \"\"\"The final out and lse (natural log) of a decode tile's rows: row r is query head head_of_row[r], row q_of_row[r].\"\"\"
    offs_dv = tl.arange(0, BLOCK_DV)
    row_off = head_of_row.to(tl.int64) * stride_oh + q_of_row * stride_om
    tl.store(Out + b64 * stride_ob + row_off[:, None] + offs_dv[None, :] * stride_od, out.to(Out.dtype.element_ty),
             mask=row_in[:, None] & (offs_dv[None, :] < DV))
    tl.store(Lse + b64 * stride_lb + head_of_row.to(tl.int64) * stride_lh + q_of_row * stride_lm, lse, mask=row_in)


@triton.jit
def flex_decode_kernel(
{DECODE_PARAMS}
):
{ROW_ALIGNED}
    split = tl.program_id(0)
    pid = tl.program_id(1)
    b = pid // (H_Q // PACK)
    h0 = (pid % (H_Q // PACK)) * PACK  # the pack's first query head
    # row r of the tile: query head h0 + r // Q_LEN, query row r % Q_LEN (rows past PACK * Q_LEN: padding)
    rows = tl.arange(0, BLOCK_M)
    head_of_row = h0 + tl.minimum(rows // Q_LEN, PACK - 1)
    q_of_row = rows - (head_of_row - h0) * Q_LEN
    row_in = rows < PACK * Q_LEN
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    b64 = b.to(tl.int64)
    kv_h64 = (h0 // GQA_GROUP).to(tl.int64)
    row_off = head_of_row.to(tl.int64) * stride_qh + q_of_row * stride_qm
    q = load_tile(Q + b64 * stride_qb + row_off[:, None] + offs_d[None, :] * stride_qd,
                  row_in[:, None], offs_d[None, :] < D, True, BLOCK_D != D)
    K_bh = K + b64 * stride_kb + kv_h64 * stride_kh
    V_bh = V + b64 * stride_vb + kv_h64 * stride_vh
    page_row, kv_len = paged_request(b, PAGE_TABLE, stride_pgb, KV_LENS, KV_LEN, PAGE_SIZE)

    q_idx = q_of_row[:, None]
    if PACK == 1:
        h = h0
    else:
        h = head_of_row[:, None]
    {SCORE_HOISTED_LHS} = score_mod_hoisted(b, h, q_idx, sm_scale, {SCORE_BUFFERS})
    {MASK_HOISTED_LHS} = mask_mod_hoisted(b, h, q_idx, {MASK_BUFFERS})

    # every row lies in q block 0 (the host checked Q_LEN <= the block mask's q block), and the packed heads share
    # one tile list (the host packs only where the tables and bounds are the same for every head)
    if USE_BOUNDS:
        kv_lo, kv_hi, full_lo, full_hi = kv_bounds(b, h0, 0, Q_LEN - 1, Q_LEN, KV_LEN, {MASK_BUFFERS})
    else:
        kv_lo, kv_hi, full_lo, full_hi = 0, 0, 0, 0
    n_partial, n_full, first_lo, n_first, second_lo, partial_row, full_lo, full_row = program_tiles(
        kv_lo, kv_hi, full_lo, full_hi, b, h0, 0, {TABLE_ARGS}
        KV_LEN, USE_BOUNDS, HAS_FULL, BLOCK_N, TILES_PER_BLOCK)
    acc, l_i, m_i = attend_lists(
        q, K_bh, stride_kn, stride_kd, V_bh, stride_vn, stride_vd, b, h, q_idx, sm_scale, kv_len,
        n_partial, n_full, first_lo, n_first, second_lo, partial_row, full_lo, full_row, stride_in, stride_fin, split,
        page_row,
        {SCORE_HOISTED}{MASK_HOISTED}{SCORE_BUFFERS}{MASK_BUFFERS}
        USE_BOUNDS, HAS_SCORE_MOD, SPARSE_KV, N_SPLITS, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV, D, DV, DOT_PRECISION,
        not EVEN_KV, FAST_TANH, False, FLOAT_INDEX, FOLD_SCALE, PREFETCH_INDEX, PAGE_SIZE,
    )

    # a row with nothing unmasked in this split has l = 0: output 0 and lse -inf (the merge weighs it 0)
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse2 = tl.where(empty, float("-inf"), m_i + tl.math.log2(l_safe))
    if N_SPLITS == 1:
        store_rows(Out, stride_ob, stride_oh, stride_om, stride_od, Lse, stride_lb, stride_lh, stride_lm,
                   b64, head_of_row, q_of_row, row_in, out, lse2 * 0.6931471805599453, DV, BLOCK_DV)
    else:  # workspaces [B, H_Q, Q_LEN, N_SPLITS(, DV)], contiguous
        part_row = (b64 * H_Q + head_of_row) * Q_LEN + q_of_row
        part = part_row * N_SPLITS + split
        tl.store(O_PART + part[:, None] * DV + offs_dv[None, :], out, mask=row_in[:, None] & (offs_dv[None, :] < DV))
        tl.store(L2_PART + part, lse2, mask=row_in)
        if FUSED_MERGE:  # the last split of this row tile to finish merges every split's partial (no second launch)
            tl.debug_barrier()  # every thread's stores issued before the arrival is counted (released with it)
            arrived = tl.atomic_add(ARRIVALS + pid, 1, sem="acq_rel")
            if arrived == N_SPLITS - 1:  # the others' stores are visible (acquired); merge_partials reads past L1
                tl.debug_barrier()  # every thread's loads after the acquire (as inductor's grid barrier does)
                out, lse = merge_partials(O_PART, L2_PART, part_row, row_in, N_SPLITS, BLOCK_M, DV, BLOCK_DV)
                store_rows(Out, stride_ob, stride_oh, stride_om, stride_od, Lse, stride_lb, stride_lh, stride_lm,
                           b64, head_of_row, q_of_row, row_in, out, lse, DV, BLOCK_DV)
                tl.store(ARRIVALS + pid, 0)  # all splits have arrived: zero again for the next launch on this buffer
'''
