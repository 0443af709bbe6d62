"""The backward kernels' source: one template, the mods and their derivatives rendered into it.

Three generated @triton.jit helpers carry everything variant-specific:

* `modded_scores(score, b, h, q_idx, kv_idx, KV_LEN, IS_FULL, ...)` -> (modded score with masked
  entries at -inf, d score_mod / d score), the score_mod and its derivative rendered together so
  they share subexpressions (tanh of a softcap is computed once);
* `scatter_captured(ds, score, b, h, q_idx, kv_idx, ...)` adds ds * d score_mod / d load into a
  float32 gradient buffer at each load's (wrapped, clamped) indices, summed over the tile axes the
  indices do not depend on first, so a per-head table costs one atomic per tile, not one per element;
* the template's two kernels call them: `flex_bwd_dkdv` (one program per kv tile, walking the
  q-major block tables, summing over the q heads of a GQA group) and `flex_bwd_dq` (one program per
  q tile, walking the kv-major tables; it also scatters the captured tensors' gradients).
"""

from __future__ import annotations

import inspect

from flexcomp.grad import load_grads, score_grad
from flexcomp.ir import BufferSpec, Node, Op, arg, free_args, to_text
from flexcomp.mods import Mod

from .ops import PRELUDE, buffer_params, identifier, render_block

MOD_ARGS = {"score": "score", "b": "b", "h": "h", "q_idx": "q_idx", "kv_idx": "kv_idx"}
SCORE_PREFIX, MASK_PREFIX, GRAD_PREFIX = "sb", "mb", "gb"


def _render(roots: list[Node], names: dict[Node, str], prefix: str, buffers: tuple[BufferSpec, ...],
            indent: str = "    ") -> tuple[list[str], list[str]]:
    """ops.render_block with the captured tensors' parameters named by `prefix` (as buffer_params names them)."""
    if "buffer_prefix" in inspect.signature(render_block).parameters:
        return render_block(roots, names, prefix, buffers, buffer_prefix=prefix, indent=indent)
    return render_block(roots, names, prefix, buffers, indent=indent)


def _function(name: str, params: list[str], lines: list[str]) -> str:
    return f"@triton.jit\ndef {name}({', '.join(params)}):\n" + "\n".join(lines)


def _args(names: list[str]) -> str:
    """`a, b, ` (trailing separator, so an empty list leaves no stray comma)."""
    return "".join(f"{n}, " for n in names)


def _mod_names(kind: str) -> dict[Node, str]:
    names = ("score", "b", "h", "q_idx", "kv_idx") if kind == "score" else ("b", "h", "q_idx", "kv_idx")
    return {arg(a): MOD_ARGS[a] for a in names}


def render_modded_scores(score_mod: Mod | None, mask_mod: Mod | None) -> str:
    score_ir = score_mod.ir if score_mod is not None else arg("score")
    score_buffers = tuple(score_mod.buffers) if score_mod is not None else ()
    mask_buffers = tuple(mask_mod.buffers) if mask_mod is not None else ()
    lines, (modded, dmod) = _render([score_ir, score_grad(score_ir)], _mod_names("score"), SCORE_PREFIX, score_buffers)
    lines.append("    keep = kv_idx < KV_LEN")
    if mask_mod is not None:
        mask_lines, (keep,) = _render([mask_mod.ir], _mod_names("mask"), MASK_PREFIX, mask_buffers, " " * 8)
        lines += ["    if not IS_FULL:", *mask_lines, f"        keep = keep & {keep}"]
    lines += [f"    modded = tl.where(keep, {modded}, float(\"-inf\"))", f"    return modded, {dmod}"]
    params = ["score", "b", "h", "q_idx", "kv_idx", "KV_LEN", *buffer_params(SCORE_PREFIX, score_buffers),
              *buffer_params(MASK_PREFIX, mask_buffers), "IS_FULL: tl.constexpr"]
    return _function("modded_scores", params, lines)


def _reduce_over_free_axes(value: str, index_nodes: tuple[Node, ...]) -> str:
    """Sum a [BLOCK_M, BLOCK_N] contribution over the tile axes its target indices do not vary along."""
    used = frozenset().union(*(free_args(i) for i in index_nodes)) if index_nodes else frozenset()
    along_q, along_kv = "q_idx" in used, "kv_idx" in used
    if along_q and along_kv:
        return value
    if along_q:
        return f"tl.sum({value}, 1)[:, None]"
    if along_kv:
        return f"tl.sum({value}, 0)[None, :]"
    return f"tl.sum(tl.sum({value}, 1), 0)"


def render_scatter(score_mod: Mod | None, grad_buffers: frozenset[str]) -> str:
    """scatter_captured(...): the captured float tensors' gradient contributions of one tile."""
    buffers = tuple(score_mod.buffers) if score_mod is not None else ()
    specs = {spec.name: spec for spec in buffers}
    grads = [(load, d) for load, d in load_grads(score_mod.ir)] if score_mod is not None else []
    grads = [(load, d) for load, d in grads if load.arg in grad_buffers]
    names = _mod_names("score")
    roots = [d for _, d in grads] + [i for load, _ in grads for i in load.src if i.op != Op.CONST]
    lines, _ = _render(roots, names, SCORE_PREFIX, buffers)
    for n, (load, d) in enumerate(grads):
        spec = specs[load.arg]
        d_text = names.get(d) or _render([d], names, SCORE_PREFIX, buffers)[1][0]
        lines.append(f"    c{n} = tl.where(ds == 0.0, 0.0, ds * {d_text})  # d mod / d {load.arg}[...]")
        lines.append(f"    tl.atomic_add({_grad_address(spec, load, names)}, "
                     f"{_reduce_over_free_axes(f'c{n}', load.src)})")
    lines.append("    return")
    params = ["ds", "score", "b", "h", "q_idx", "kv_idx", *buffer_params(SCORE_PREFIX, buffers),
              *_grad_params(buffers, grad_buffers)]
    return _function("scatter_captured", params, lines)


def _grad_params(buffers: tuple[BufferSpec, ...], grad_buffers: frozenset[str]) -> list[str]:
    return buffer_params(GRAD_PREFIX, tuple(b for b in buffers if b.name in grad_buffers))


def _grad_address(spec: BufferSpec, load: Node, names: dict[Node, str]) -> str:
    base = f"{GRAD_PREFIX}_{identifier(spec.name)}"
    terms = []
    for d, (index, size) in enumerate(zip(load.src, spec.shape)):
        if index.op == Op.CONST:  # wrap and clamp now, as the forward's loads do
            i = int(index.arg)
            terms.append(f"{min(max(i + size if i < 0 else i, 0), size - 1)} * {base}_stride{d}")
        else:
            terms.append(f"wrap_index({names[index]}.to(tl.int32), {size}) * {base}_stride{d}")
    return f"{base}_ptr + {' + '.join(terms) or '0'}"


def describe(mod: Mod | None, kind: str, grad_buffers: frozenset[str] = frozenset()) -> str:
    if mod is None:
        return f"# {kind}_mod: none"
    text = "\n".join(f"#   {line}" for line in to_text(mod.ir).splitlines())
    out = f"# {kind}_mod {mod.name} (key {mod.key})\n{text}"
    if kind == "score":
        d = "\n".join(f"#   {line}" for line in to_text(score_grad(mod.ir)).splitlines())
        out += f"\n# d {kind}_mod / d score:\n{d}"
        for load, grad in load_grads(mod.ir):
            if load.arg in grad_buffers:
                g = "\n".join(f"#   {line}" for line in to_text(grad).splitlines())
                out += f"\n# d {kind}_mod / d {load.arg}[...] (scattered into its gradient):\n{g}"
    return out


def backward_source(score_mod: Mod | None, mask_mod: Mod | None, grad_buffers: frozenset[str]) -> str:
    score_buffers = tuple(score_mod.buffers) if score_mod is not None else ()
    mask_buffers = tuple(mask_mod.buffers) if mask_mod is not None else ()
    mod_buffers = _args(buffer_params(SCORE_PREFIX, score_buffers) + buffer_params(MASK_PREFIX, mask_buffers))
    grad_params = _args(_grad_params(score_buffers, grad_buffers))
    scatter_call = (f"scatter_captured(ds, score, b, h, q_idx, kv_idx, "
                    f"{_args(buffer_params(SCORE_PREFIX, score_buffers))}{grad_params})" if grad_params else "")
    header = "\n".join(["# Generated by flexcomp.codegen: the FlexAttention backward kernels for this variant.",
                        describe(score_mod, "score", grad_buffers), describe(mask_mod, "mask")])
    kernel = BACKWARD_TEMPLATE.replace("{MOD_BUFFERS}", mod_buffers).replace("{GRAD_BUFFERS}", grad_params)
    kernel = kernel.replace("{SCATTER}", scatter_call or "pass  # no captured tensor needs a gradient")
    parts = [header, "import triton\nimport triton.language as tl", PRELUDE.strip(),
             render_modded_scores(score_mod, mask_mod), render_scatter(score_mod, grad_buffers), kernel.strip()]
    return "\n\n\n".join(parts) + "\n"


# The template.  {NAME} holes take generated argument lists.  Every tile recomputes
# P = exp(modded score - lse) from q, k and the saved lse; dS = P * (dP - delta), where
# delta = rowsum(dO * O) - dlse (the returned lse's gradient: d lse_i / d s_ij = P_ij).
BACKWARD_TEMPLATE = '''
@triton.jit
def probabilities(q, kt, lse, b, h, offs_m, offs_n, sm_scale, KV_LEN,
                  {MOD_BUFFERS}IS_FULL: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """(P, the raw score, d score_mod / d score) of one [BLOCK_M, BLOCK_N] tile."""
    score = tl.dot(q, kt, input_precision=DOT_PRECISION) * sm_scale
    modded, dmod = modded_scores(score, b, h, offs_m[:, None], offs_n[None, :], KV_LEN, {MOD_BUFFERS}IS_FULL)
    # lse = -inf marks a fully masked row (and rows past Q_LEN are loaded as +inf): P = 0 there
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    p = tl.exp(modded - lse[:, None])
    return p, score, dmod


@triton.jit
def dkdv_tiles(
    dk, dv, kt, vt, Q, DO, LSE, DELTA,
    stride_qm, stride_qd, stride_dom, stride_dod,
    index_row, n_blocks, b, h, offs_n, sm_scale, Q_LEN, KV_LEN,
    {MOD_BUFFERS}
    IS_FULL: tl.constexpr, SPARSE_Q: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Accumulate dK (unscaled) and dV of one kv tile over the q tiles of `n_blocks` sparse q blocks."""
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    for i in range(0, n_blocks * (SPARSE_Q // BLOCK_M)):
        block = tl.load(index_row + i // (SPARSE_Q // BLOCK_M)).to(tl.int32)
        offs_m = block * SPARSE_Q + (i % (SPARSE_Q // BLOCK_M)) * BLOCK_M + tl.arange(0, BLOCK_M)
        q_in = offs_m < Q_LEN
        q = tl.load(Q + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                    mask=q_in[:, None] & (offs_d[None, :] < D), other=0.0)
        do = tl.load(DO + offs_m[:, None] * stride_dom + offs_dv[None, :] * stride_dod,
                     mask=q_in[:, None] & (offs_dv[None, :] < DV), other=0.0)
        lse = tl.load(LSE + offs_m, mask=q_in, other=float("inf"))
        delta = tl.load(DELTA + offs_m, mask=q_in, other=0.0)
        p, score, dmod = probabilities(q, kt, lse, b, h, offs_m, offs_n, sm_scale, KV_LEN,
                                       {MOD_BUFFERS}IS_FULL, DOT_PRECISION)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PRECISION)
        dp = tl.dot(do, vt, input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dscore = tl.where(ds == 0.0, 0.0, ds * dmod)  # masked entries stay 0 even where dmod is not finite
        dk += tl.dot(tl.trans(dscore.to(q.dtype)), q, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def flex_bwd_dkdv(
    Q, stride_qb, stride_qh, stride_qm, stride_qd,
    K, stride_kb, stride_kh, stride_kn, stride_kd,
    V, stride_vb, stride_vh, stride_vn, stride_vd,
    DO, stride_dob, stride_doh, stride_dom, stride_dod,
    LSE, DELTA,  # contiguous float32 [B, H_Q, Q_LEN]
    DK_OUT, stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    DV_OUT, stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    Q_NUM, Q_IDX, FULL_Q_NUM, FULL_Q_IDX,  # contiguous int32 [TB, TH, kv blocks(, cols)]
    table_b, table_h, table_rows, table_cols, full_table_cols,  # table_b/h: 0 where the mask broadcasts
    {MOD_BUFFERS}
    sm_scale, Q_LEN, KV_LEN, H_Q, H_KV,
    GQA_GROUP: tl.constexpr, SPARSE_Q: tl.constexpr, SPARSE_KV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H_KV
    h_kv = bh % H_KV
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    kv_in = offs_n < KV_LEN
    b64 = b.to(tl.int64)
    kt = tl.load(K + b64 * stride_kb + h_kv.to(tl.int64) * stride_kh + offs_n[None, :] * stride_kn
                 + offs_d[:, None] * stride_kd, mask=kv_in[None, :] & (offs_d[:, None] < D), other=0.0)
    vt = tl.load(V + b64 * stride_vb + h_kv.to(tl.int64) * stride_vh + offs_n[None, :] * stride_vn
                 + offs_dv[:, None] * stride_vd, mask=kv_in[None, :] & (offs_dv[:, None] < DV), other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    sparse_n = (pid_n * BLOCK_N) // SPARSE_KV
    for g in range(0, GQA_GROUP):  # dK, dV of a kv head sum over the q heads that read it
        h = h_kv * GQA_GROUP + g
        row = (b * table_b + h * table_h) * table_rows + sparse_n
        Q_bh = Q + b64 * stride_qb + h.to(tl.int64) * stride_qh
        DO_bh = DO + b64 * stride_dob + h.to(tl.int64) * stride_doh
        lse_row = (b64 * H_Q + h) * Q_LEN
        dk, dv = dkdv_tiles(dk, dv, kt, vt, Q_bh, DO_bh, LSE + lse_row, DELTA + lse_row,
                            stride_qm, stride_qd, stride_dom, stride_dod,
                            Q_IDX + row * table_cols, tl.load(Q_NUM + row), b, h, offs_n, sm_scale, Q_LEN, KV_LEN,
                            {MOD_BUFFERS}
                            False, SPARSE_Q, BLOCK_M, BLOCK_D, BLOCK_DV, D, DV, DOT_PRECISION)
        dk, dv = dkdv_tiles(dk, dv, kt, vt, Q_bh, DO_bh, LSE + lse_row, DELTA + lse_row,
                            stride_qm, stride_qd, stride_dom, stride_dod,
                            FULL_Q_IDX + row * full_table_cols, tl.load(FULL_Q_NUM + row), b, h, offs_n, sm_scale,
                            Q_LEN, KV_LEN,
                            {MOD_BUFFERS}
                            True, SPARSE_Q, BLOCK_M, BLOCK_D, BLOCK_DV, D, DV, DOT_PRECISION)
    tl.store(DK_OUT + b64 * stride_dkb + h_kv.to(tl.int64) * stride_dkh + offs_n[:, None] * stride_dkn
             + offs_d[None, :] * stride_dkd, (dk * sm_scale).to(DK_OUT.dtype.element_ty),
             mask=kv_in[:, None] & (offs_d[None, :] < D))
    tl.store(DV_OUT + b64 * stride_dvb + h_kv.to(tl.int64) * stride_dvh + offs_n[:, None] * stride_dvn
             + offs_dv[None, :] * stride_dvd, dv.to(DV_OUT.dtype.element_ty),
             mask=kv_in[:, None] & (offs_dv[None, :] < DV))


@triton.jit
def dq_tiles(
    dq, q, do, lse, delta, K, V,
    stride_kn, stride_kd, stride_vn, stride_vd,
    index_row, n_blocks, b, h, offs_m, sm_scale, KV_LEN,
    {MOD_BUFFERS}{GRAD_BUFFERS}
    IS_FULL: tl.constexpr, SPARSE_KV: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, D: tl.constexpr, DV: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Accumulate dQ (unscaled) of one q tile over the kv tiles of `n_blocks` sparse kv blocks."""
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q_idx = offs_m[:, None]
    for i in range(0, n_blocks * (SPARSE_KV // BLOCK_N)):
        block = tl.load(index_row + i // (SPARSE_KV // BLOCK_N)).to(tl.int32)
        offs_n = block * SPARSE_KV + (i % (SPARSE_KV // BLOCK_N)) * BLOCK_N + tl.arange(0, BLOCK_N)
        kv_in = offs_n < KV_LEN
        kt = tl.load(K + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                     mask=kv_in[None, :] & (offs_d[:, None] < D), other=0.0)
        vt = tl.load(V + offs_n[None, :] * stride_vn + offs_dv[:, None] * stride_vd,
                     mask=kv_in[None, :] & (offs_dv[:, None] < DV), other=0.0)
        p, score, dmod = probabilities(q, kt, lse, b, h, offs_m, offs_n, sm_scale, KV_LEN,
                                       {MOD_BUFFERS}IS_FULL, DOT_PRECISION)
        dp = tl.dot(do, vt, input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dscore = tl.where(ds == 0.0, 0.0, ds * dmod)
        dq += tl.dot(dscore.to(q.dtype), tl.trans(kt), input_precision=DOT_PRECISION)
        kv_idx = offs_n[None, :]
        {SCATTER}
    return dq


@triton.jit
def flex_bwd_dq(
    Q, stride_qb, stride_qh, stride_qm, stride_qd,
    K, stride_kb, stride_kh, stride_kn, stride_kd,
    V, stride_vb, stride_vh, stride_vn, stride_vd,
    DO, stride_dob, stride_doh, stride_dom, stride_dod,
    LSE, DELTA,  # contiguous float32 [B, H_Q, Q_LEN]
    DQ, stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    KV_NUM, KV_IDX, FULL_KV_NUM, FULL_KV_IDX,  # contiguous int32 [TB, TH, q blocks(, cols)]
    table_b, table_h, table_rows, table_cols, full_table_cols,
    {MOD_BUFFERS}{GRAD_BUFFERS}
    sm_scale, Q_LEN, KV_LEN, H_Q,
    GQA_GROUP: tl.constexpr, SPARSE_Q: tl.constexpr, SPARSE_KV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H_Q
    h = bh % H_Q
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q_in = offs_m < Q_LEN
    b64 = b.to(tl.int64)
    h_kv64 = (h // GQA_GROUP).to(tl.int64)
    q = tl.load(Q + b64 * stride_qb + h.to(tl.int64) * stride_qh + offs_m[:, None] * stride_qm
                + offs_d[None, :] * stride_qd, mask=q_in[:, None] & (offs_d[None, :] < D), other=0.0)
    do = tl.load(DO + b64 * stride_dob + h.to(tl.int64) * stride_doh + offs_m[:, None] * stride_dom
                 + offs_dv[None, :] * stride_dod, mask=q_in[:, None] & (offs_dv[None, :] < DV), other=0.0)
    lse_row = (b64 * H_Q + h) * Q_LEN
    lse = tl.load(LSE + lse_row + offs_m, mask=q_in, other=float("inf"))
    delta = tl.load(DELTA + lse_row + offs_m, mask=q_in, other=0.0)
    K_bh = K + b64 * stride_kb + h_kv64 * stride_kh
    V_bh = V + b64 * stride_vb + h_kv64 * stride_vh
    row = (b * table_b + h * table_h) * table_rows + (pid_m * BLOCK_M) // SPARSE_Q
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dq = dq_tiles(dq, q, do, lse, delta, K_bh, V_bh, stride_kn, stride_kd, stride_vn, stride_vd,
                  KV_IDX + row * table_cols, tl.load(KV_NUM + row), b, h, offs_m, sm_scale, KV_LEN,
                  {MOD_BUFFERS}{GRAD_BUFFERS}
                  False, SPARSE_KV, BLOCK_N, BLOCK_D, BLOCK_DV, D, DV, DOT_PRECISION)
    dq = dq_tiles(dq, q, do, lse, delta, K_bh, V_bh, stride_kn, stride_kd, stride_vn, stride_vd,
                  FULL_KV_IDX + row * full_table_cols, tl.load(FULL_KV_NUM + row), b, h, offs_m, sm_scale, KV_LEN,
                  {MOD_BUFFERS}{GRAD_BUFFERS}
                  True, SPARSE_KV, BLOCK_N, BLOCK_D, BLOCK_DV, D, DV, DOT_PRECISION)
    tl.store(DQ + b64 * stride_dqb + h.to(tl.int64) * stride_dqh + offs_m[:, None] * stride_dqm
             + offs_d[None, :] * stride_dqd, (dq * sm_scale).to(DQ.dtype.element_ty),
             mask=q_in[:, None] & (offs_d[None, :] < D))
'''
