"""The score in the kernel's units: `score_mod(qk * sm_scale) * log2(e)`, with the scalings folded in.

The forward kernel's online softmax runs in base 2 (exp2 is one MUFU op), so every modded score is
multiplied by log2(e), and the mod itself sees `qk * sm_scale`.  Rendered literally that is two
multiplies per score element around the user's code, plus whatever scalar multiplies the mod does
itself (a softcap's `score / 30 ... * 30`).  Folded, the scalars meet and multiply once per q tile:

    tanh(qk * sm_scale / 30) * 30 * log2e       ->  tanh(qk * (sm_scale / 30)) * (30 * log2e)
    (qk * sm_scale + slope * d) * log2e         ->  qk * (sm_scale * log2e) + d * (slope * log2e)

`base2_form(ir)` returns IR over the raw `qk` (the ARG "score") and the ARG "sm_scale".  Only
multiplications and divisions by loop-invariant values (constants, and what depends on b, h, q_idx and
sm_scale alone: the kernel hoists those out of the kv loop) are moved: merged with another such factor,
or distributed over a sum that holds the score, where they then merge with the softmax scale; no
per-element operation is added.  Reassociating float products changes results by an ulp or so of the
score (as FMA contraction does), never more: no addition is reordered, and sums of index terms (exact
in float32, ops.float_index_form) are never split.
"""

from __future__ import annotations

import math

from flexcomp.ir import DType, Node, Op, arg, const, free_args, substitute
from flexcomp.rewrite import SIMPLIFY, Rule, graph_rewrite

LOG2E = math.log2(math.e)
LOOP_VARIANT_ARGS = frozenset({"score", "kv_idx"})  # what changes inside the kv loop (per score element)


def invariant(n: Node) -> bool:
    """A float value the kernel computes once per q tile (or a constant): multiplying by it twice can merge."""
    return n.dtype == DType.F32 and not (free_args(n) & LOOP_VARIANT_ARGS)


def _f32(op: Op, a: Node, b: Node) -> Node:
    return Node(op, DType.F32, (a, b))


def _scaled(n: Node) -> bool:
    """`n` is x * a or x / a with `a` invariant: a further invariant factor merges into `a`."""
    return n.op in (Op.MUL, Op.DIV) and n.dtype == DType.F32 and n.src[1].dtype == DType.F32 and invariant(n.src[1])


def _absorbs(n: Node) -> bool:
    """Multiplying `n` by an invariant costs no per-element operation beyond one that is already there."""
    if invariant(n) or _scaled(n):
        return True
    if n.op == Op.NEG:
        return _absorbs(n.src[0])
    if n.op in (Op.ADD, Op.SUB) and n.dtype == DType.F32 and all(s.dtype == DType.F32 for s in n.src):
        return all(_absorbs(s) for s in n.src)
    return False


def _worth_distributing(n: Node) -> bool:
    """Distribute a factor over a sum only where the score is: the factor then merges with the score's own
    (the softmax scale), and one side that does not absorb it costs a multiply that fuses into the add.
    Sums of index terms are left whole, so exact integer-valued arithmetic (ops.float_index_form) stays exact."""
    if "score" not in free_args(n):
        return False
    if n.op == Op.NEG:
        return True
    return all(s.dtype == DType.F32 for s in n.src) and sum(not _absorbs(s) for s in n.src) <= 1


def _invariant_first(n: Node) -> Node | None:
    a, b = n.src
    return n.replace(src=(b, a)) if invariant(a) and not invariant(b) else None


def _merge(n: Node) -> Node | None:
    """(x op1 a) op2 b with a, b invariant -> x op (a op' b): one per-element operation instead of two."""
    inner, b = n.src
    x, a = inner.src
    if inner.op == Op.MUL:
        return _f32(n.op, x, _f32(n.op, a, b)) if n.op == Op.MUL else _f32(Op.MUL, x, _f32(Op.DIV, a, b))
    return _f32(Op.DIV, x, _f32(Op.MUL, a, b)) if n.op == Op.DIV else _f32(Op.MUL, x, _f32(Op.DIV, b, a))


def _distribute(n: Node) -> Node | None:
    (s, c), op = n.src, n.src[0].op
    if op == Op.NEG:
        return Node(Op.NEG, DType.F32, (_f32(n.op, s.src[0], c),))
    return _f32(op, _f32(n.op, s.src[0], c), _f32(n.op, s.src[1], c))


def _scaling(n: Node) -> bool:
    return n.op in (Op.MUL, Op.DIV) and n.dtype == DType.F32 and not invariant(n) and invariant(n.src[1])


BASE2_RULES: list[Rule] = [
    # a * x -> x * a   (a invariant, x not: the invariant factor second)
    (lambda n: n.op == Op.MUL and n.dtype == DType.F32, _invariant_first),
    # (x * a) * b -> x * (a * b);  (x / a) * b -> x * (b / a);  (x * a) / b -> x * (a / b);  (x / a) / b -> x / (a * b)
    (lambda n: _scaling(n) and _scaled(n.src[0]) and not invariant(n.src[0]), _merge),
    # (x + y) * a -> x * a + y * a;  (x - y) * a -> x * a - y * a;  (-x) * a -> -(x * a)   (sums holding the score)
    (lambda n: _scaling(n) and n.src[0].op in (Op.ADD, Op.SUB, Op.NEG) and _worth_distributing(n.src[0]), _distribute),
]


def base2_form(score_ir: Node) -> Node:
    """IR for `score_ir(score := qk * sm_scale) * log2(e)`, over ARGs score (= qk) and sm_scale."""
    scaled = substitute(score_ir, {arg("score"): _f32(Op.MUL, arg("score"), arg("sm_scale"))})
    if scaled.dtype != DType.F32:
        scaled = Node(Op.CAST, DType.F32, (scaled,))
    return graph_rewrite(_f32(Op.MUL, scaled, const(LOG2E)), BASE2_RULES + SIMPLIFY, "base2")


def raw_score_form(node: Node) -> Node:
    """IR for `node(score := qk * sm_scale)` over the raw qk (the ARG "score") and sm_scale, its invariant
    factors merged as base2_form merges them (the backward's d score_mod / d score, beside base2_form's score,
    so the two share their subexpressions: a softcap's tanh(qk * (sm_scale / 30)))."""
    scaled = substitute(node, {arg("score"): _f32(Op.MUL, arg("score"), arg("sm_scale"))})
    return graph_rewrite(scaled, BASE2_RULES + SIMPLIFY, "raw score")
