"""codegen.base2.base2_form: the softmax's scalings folded into a score_mod, checked on IR with fresh random
inputs against the literal `score_mod(qk * sm_scale) * log2(e)` in float64, and by counting the operations
left inside the kv loop."""

from __future__ import annotations

import math

import pytest
import torch
from flexcomp.codegen.base2 import LOG2E, LOOP_VARIANT_ARGS, _f32, base2_form
from flexcomp.codegen.ops import float_index_form, variant_nodes

import flexcomp as fc
from flexcomp.evaluate import evaluate
from flexcomp.ir import Op, arg, const, free_args, substitute, toposort

SLOPES = torch.rand(4) + 0.1
BIAS = torch.randn(4, 64)


def alibi(score, b, h, q_idx, kv_idx):
    return score + SLOPES[h] * (kv_idx - q_idx)


def softcap(score, b, h, q_idx, kv_idx):
    return 30.0 * torch.tanh(score / 30.0)


def relative_bias(score, b, h, q_idx, kv_idx):
    return score + BIAS[h, (q_idx - kv_idx) % 64]


def rescaled(score, b, h, q_idx, kv_idx):
    return (score - 1.5) * 2.0 / SLOPES[h]


def negated(score, b, h, q_idx, kv_idx):
    return -(score * 0.5) + q_idx / 7


def squared(score, b, h, q_idx, kv_idx):
    return score * score - kv_idx


def branchy(score, b, h, q_idx, kv_idx):
    return torch.where(q_idx > kv_idx, score * 2.0, -score / 3.0)


def sigmoid_gate(score, b, h, q_idx, kv_idx):
    return torch.sigmoid(score) * 3.0 + score / SLOPES[h]


MODS = [alibi, softcap, relative_bias, rescaled, negated, squared, branchy, sigmoid_gate]


def literal_base2(mod, env: dict, scale: float) -> torch.Tensor:
    """The kernel's old arithmetic in float64: the mod on qk * scale, then times log2(e)."""
    tensors = {k: v.double() for k, v in mod.tensors().items()}
    env = {**env, "score": env["score"] * scale}
    return evaluate(mod.ir, env, tensors) * math.log2(math.e)


@pytest.mark.parametrize("fn", MODS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("float_index", [False, True])
def test_folded_form_equals_the_literal_one(fn, float_index):
    mod = fc.score_mod(fn)
    ir = float_index_form(mod.ir)[0] if float_index else mod.ir
    folded = base2_form(ir)
    generator = torch.Generator().manual_seed(hash((fn.__name__, float_index)) % 2**31)
    scale = float(torch.rand((), generator=generator)) + 0.05
    env = {
        "score": torch.randn(40, 48, generator=generator, dtype=torch.float64) * 20,
        "b": torch.tensor(1, dtype=torch.int32),
        "h": torch.randint(0, 4, (), generator=generator, dtype=torch.int32),
        "q_idx": torch.randint(0, 3000, (40, 1), generator=generator, dtype=torch.int32),
        "kv_idx": torch.randint(0, 3000, (1, 48), generator=generator, dtype=torch.int32),
    }
    want = literal_base2(mod, env, scale)
    got = evaluate(folded, {**env, "sm_scale": torch.tensor(scale, dtype=torch.float64)},
                   {k: v.double() for k, v in mod.tensors().items()})
    # float64 throughout, except where torch's promotion makes the mod itself float32 (int / int)
    torch.testing.assert_close(got.expand_as(want), want, rtol=1e-6, atol=1e-6 * float(want.abs().max()))


def per_element_ops(root) -> int:
    """Arithmetic nodes that depend on the score or kv_idx (the kv loop's per-element work; casts of the
    bare kv_idx are the kernel's per-tile iota)."""
    variant = variant_nodes([root], LOOP_VARIANT_ARGS)
    return sum(1 for n in toposort(root)
               if n in variant and n.op not in (Op.ARG, Op.CONST) and not (n.op == Op.CAST and n.src[0].op == Op.ARG))


@pytest.mark.parametrize(("fn", "before", "after"), [
    (alibi, 5, 4),  # qk*s, kv-q, *slope, +, *log2e  ->  qk*(s log2e), kv-q, *(slope log2e), +
    (softcap, 5, 3),  # qk*s, /30, tanh, *30, *log2e  ->  qk*(s/30), tanh, *(30 log2e)
    (rescaled, 5, 2),  # qk*s, -1.5, *2, /slope, *log2e  ->  qk*c1 - c2 (c1, c2 per q tile)
], ids=lambda x: getattr(x, "__name__", str(x)))
def test_scalar_factors_merge_out_of_the_loop(fn, before, after):
    mod = fc.score_mod(fn)
    ir = float_index_form(mod.ir)[0]
    literal = _f32(Op.MUL, substitute(ir, {arg("score"): _f32(Op.MUL, arg("score"), arg("sm_scale"))}), const(LOG2E))
    assert per_element_ops(literal) == before
    assert per_element_ops(base2_form(ir)) == after


def test_a_per_element_bias_leaves_an_fma():
    ir = float_index_form(fc.score_mod(relative_bias).ir)[0]
    literal = _f32(Op.MUL, substitute(ir, {arg("score"): _f32(Op.MUL, arg("score"), arg("sm_scale"))}), const(LOG2E))
    folded = base2_form(ir)
    assert per_element_ops(folded) == per_element_ops(literal)
    # (qk*s + bias)*log2e -> qk*(s log2e) + bias*log2e: the add and one multiply contract into an FFMA
    assert folded.op == Op.ADD and arg("score") in {s.src[0] for s in folded.src if s.op == Op.MUL}


def test_index_sums_are_never_split():
    """The float index form is exact integer arithmetic: a factor must multiply its sum, not each term."""
    mod = fc.score_mod(negated)
    for fn in (alibi, negated, sigmoid_gate):
        ir = float_index_form(fc.score_mod(fn).ir)[0]
        folded = base2_form(ir)
        index_sums = {n for n in toposort(ir) if n.op in (Op.ADD, Op.SUB) and "score" not in free_args(n)}
        assert index_sums <= set(toposort(folded)), fn.__name__
    assert mod is not None


def test_no_per_element_operation_is_ever_added():
    for fn in MODS:
        mod = fc.score_mod(fn)
        ir = float_index_form(mod.ir)[0]
        assert per_element_ops(base2_form(ir)) <= per_element_ops(ir) + 2, fn.__name__  # the two it replaces
