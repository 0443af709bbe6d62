"""flexcomp.grad against torch.autograd run on flexcomp.evaluate of the same IR (float64)."""

from __future__ import annotations

import math
import random

import pytest
import torch

from flexcomp.evaluate import evaluate, index_grid, safe_index
from flexcomp.grad import load_grads, score_grad
from flexcomp.ir import DType, Node, Op, arg, const, load, promote, result_dtype

F32, I32 = DType.F32, DType.I32
SHAPE = (2, 3, 5, 7)  # B, H, Q, KV


def op(kind: Op, *src: Node) -> Node:
    """A node with explicit casts of its operands to their common dtype, as the front end builds them."""
    operands = src[1:] if kind == Op.WHERE else src
    common = promote(*(s.dtype for s in operands))
    operands = tuple(s if s.dtype == common else Node(Op.CAST, common, (s,)) for s in operands)
    src = (src[0], *operands) if kind == Op.WHERE else operands
    return Node(kind, result_dtype(kind, tuple(s.dtype for s in src)), tuple(src))


def f(value: float) -> Node:
    return const(value, F32)


def i(value: int) -> Node:
    return const(value, I32)


score, b, h, q, kv = (arg(n) for n in ("score", "b", "h", "q_idx", "kv_idx"))


def make_inputs(seed: int, tables: dict[str, tuple[int, ...]]):
    gen = torch.Generator().manual_seed(seed)
    env = index_grid(*SHAPE)
    env["score"] = torch.randn(SHAPE, generator=gen, dtype=torch.float64)
    tensors = {name: torch.randn(shape, generator=gen, dtype=torch.float64) for name, shape in tables.items()}
    upstream = torch.randn(SHAPE, generator=gen, dtype=torch.float64)
    return env, tensors, upstream


def autograd_reference(root: Node, env, tensors, upstream, constants):
    """d(sum(upstream * mod)) w.r.t. the score and every float table, by torch.autograd."""
    score_in = env["score"].clone().requires_grad_()
    tables = {k: v.clone().requires_grad_() for k, v in tensors.items()}
    out = evaluate(root, {**env, "score": score_in}, {**tables, **constants}, torch.float64).expand(SHAPE)
    leaves = [score_in, *tables.values()]
    if not out.requires_grad:  # a constant (floor, casts to int...): every gradient is zero
        return torch.zeros_like(score_in), {k: torch.zeros_like(v) for k, v in tables.items()}
    grads = torch.autograd.grad((out * upstream).sum(), leaves, allow_unused=True)
    as_dense = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, leaves)]
    return as_dense[0], dict(zip(tables, as_dense[1:]))


def derived(root: Node, env, tensors, upstream):
    """The same gradients from flexcomp.grad's IR: multiply, then scatter-add at the load indices."""
    d_score = upstream * evaluate(score_grad(root), env, tensors, torch.float64).expand(SHAPE)
    d_tables = {k: torch.zeros_like(v) for k, v in tensors.items() if v.is_floating_point()}
    for node, d_load in load_grads(root):
        table = tensors[node.arg]
        contribution = upstream * evaluate(d_load, env, tensors, torch.float64).expand(SHAPE)
        raw = [evaluate(s, env, tensors, torch.float64).expand(SHAPE) for s in node.src]
        where = tuple(safe_index(ix, table.shape[d]) for d, ix in enumerate(raw))
        if where:
            d_tables[node.arg].index_put_(where, contribution, accumulate=True)
        else:
            d_tables[node.arg] += contribution.sum()
    return d_score, d_tables


def assert_close_where_defined(got, ref, min_defined: float):
    # where torch's own gradient is inf or nan (0 * inf at a -inf score...) the derivative is undefined
    defined = ref.isfinite()
    assert defined.float().mean() >= min_defined
    torch.testing.assert_close(got[defined], ref[defined])


def check(root: Node, tables: dict[str, tuple[int, ...]] | None = None, seed: int = 0, env_patch=None, constants=None,
          min_defined=0.3):
    env, tensors, upstream = make_inputs(seed, tables or {})
    if env_patch:
        env_patch(env)
    ref_score, ref_tables = autograd_reference(root, env, tensors, upstream, constants or {})
    got_score, got_tables = derived(root, env, {**tensors, **(constants or {})}, upstream)
    assert_close_where_defined(got_score, ref_score, min_defined)
    for name in ref_tables:
        assert_close_where_defined(got_tables[name], ref_tables[name], min_defined)
    return ref_score, ref_tables


# ---------------------------------------------------------------- the variants researchers train


def test_softcap_with_learnable_cap():
    cap = load("cap", F32, (h,))
    root = op(Op.MUL, op(Op.TANH, op(Op.DIV, score, cap)), cap)  # cap * tanh(score / cap)
    _, ref_tables = check(root, {"cap": (SHAPE[1],)})
    assert ref_tables["cap"].abs().min() > 0


def test_alibi_with_learnable_slopes():
    slope = load("slopes", F32, (h,))
    root = op(Op.ADD, score, op(Op.MUL, slope, op(Op.SUB, kv, q)))  # score + slope[h] * (kv - q)
    assert score_grad(root) == f(1.0)
    check(root, {"slopes": (SHAPE[1],)})


def test_relative_bias_table_read_with_index_arithmetic_and_twice():
    # two reads of one table: at the relative position (may be negative: wraps) and at a bucket
    rel = load("bias", F32, (h, op(Op.SUB, q, kv)))
    bucket = load("bias", F32, (op(Op.MOD, op(Op.ADD, h, i(1)), i(3)), op(Op.FLOORDIV, kv, i(2))))
    root = op(Op.ADD, op(Op.ADD, score, rel), op(Op.MUL, bucket, i(2)))
    grads = load_grads(root)
    assert [node for node, _ in grads] == [rel, bucket] or {n for n, _ in grads} == {rel, bucket}
    _, ref_tables = check(root, {"bias": (SHAPE[1], 8)})
    assert ref_tables["bias"].abs().sum() > 0


def test_same_read_used_twice_sums_its_uses():
    rel = load("bias", F32, (op(Op.SUB, kv, q),))
    root = op(Op.ADD, op(Op.MUL, score, rel), op(Op.EXP, rel))  # score * t + exp(t)
    assert len(load_grads(root)) == 1
    check(root, {"bias": (11,)})


def test_scalar_table_and_int_table_have_no_grad_entry():
    temperature = load("temperature", F32, ())
    offsets = load("offsets", I32, (h,))
    root = op(Op.MUL, op(Op.ADD, score, offsets), temperature)
    assert [node for node, _ in load_grads(root)] == [temperature]
    check(root, {"temperature": ()}, constants={"offsets": torch.tensor([3, -1, 7])})


def test_mask_style_where_and_non_float_paths_give_zero():
    causal = op(Op.GE, q, kv)
    root = op(Op.WHERE, causal, op(Op.MUL, score, f(0.5)), f(-math.inf))
    check(root)
    assert score_grad(op(Op.FLOOR, score)) == f(0.0)
    int_path = Node(Op.CAST, F32, (Node(Op.CAST, I32, (score,)),))
    assert score_grad(int_path) == f(0.0)


# ---------------------------------------------------------------- torch's conventions at ties and kinks


def test_min_max_split_ties_evenly_like_torch():
    def integral_scores(env):
        env["score"] = env["score"].mul(2).round()  # many exact ties with kv_idx, 0 and each other

    for root in (
        op(Op.MAX, score, f(0.0)),
        op(Op.MIN, score, kv),
        op(Op.MAX, kv, score),
        op(Op.MIN, score, score),
        op(Op.MAX, op(Op.MUL, score, f(2.0)), score),
        op(Op.ABS, score),
    ):
        ref, _ = check(root, env_patch=integral_scores)
        assert ref.abs().sum() > 0


def test_pow_conventions():
    def with_zeros(env):
        env["score"] = torch.where(env["score"] > 0.5, torch.zeros_like(env["score"]), env["score"].abs() + 0.1)

    table = {"e": (SHAPE[1],)}
    check(op(Op.POW, score, i(3)), env_patch=with_zeros)
    check(op(Op.POW, score, f(2.5)), env_patch=with_zeros)
    check(op(Op.POW, op(Op.ADD, op(Op.ABS, score), f(0.5)), load("e", F32, (h,))), table)
    check(op(Op.POW, f(2.0), score))


@pytest.mark.parametrize("kind", [Op.EXP, Op.EXP2, Op.LOG, Op.LOG2, Op.SQRT, Op.RSQRT, Op.TANH, Op.SIGMOID,
                                  Op.SIN, Op.COS, Op.FLOOR, Op.NEG, Op.ABS])  # fmt: skip
def test_each_unary_rule(kind):
    positive = op(Op.ADD, op(Op.MUL, score, score), f(0.25))
    check(op(kind, positive))
    check(op(Op.MUL, op(kind, positive), load("w", F32, (q,))), {"w": (SHAPE[2],)})


@pytest.mark.parametrize("kind", [Op.ADD, Op.SUB, Op.MUL, Op.DIV, Op.MOD, Op.FLOORDIV, Op.MIN, Op.MAX, Op.POW])
def test_each_binary_rule(kind):
    other = op(Op.ADD, op(Op.ABS, load("t", F32, (kv,))), f(0.5))
    base = op(Op.ADD, op(Op.ABS, score), f(0.5))
    check(op(kind, base, other), {"t": (SHAPE[3],)})
    check(op(kind, other, base), {"t": (SHAPE[3],)})


# ---------------------------------------------------------------- random mods


def random_mod(rng: random.Random, depth: int) -> Node:
    """A random float expression over the score, two learnable tables and the indices, kept in-domain."""
    if depth == 0:
        choice = rng.randrange(5)
        if choice == 0:
            return Node(Op.CAST, F32, (op(Op.SUB, q, kv),))
        if choice == 1:
            return load("bias", F32, (op(Op.MOD, op(Op.SUB, kv, q), i(9)),))
        if choice == 2:
            return load("slopes", F32, (h,))
        if choice == 3:
            return f(rng.choice([0.5, -1.5, 2.0]))
        return score
    x = random_mod(rng, depth - 1)
    y = random_mod(rng, rng.randrange(depth))
    positive = op(Op.ADD, op(Op.ABS, x), f(0.5))
    bounded = op(Op.TANH, x)
    choices = [
        lambda: op(Op.ADD, x, y), lambda: op(Op.SUB, x, y), lambda: op(Op.MUL, x, y),
        lambda: op(Op.DIV, x, op(Op.ADD, op(Op.ABS, y), f(0.5))),
        lambda: op(Op.EXP, bounded), lambda: op(Op.EXP2, bounded), lambda: op(Op.LOG, positive),
        lambda: op(Op.LOG2, positive), lambda: op(Op.SQRT, positive), lambda: op(Op.RSQRT, positive),
        lambda: op(Op.TANH, x), lambda: op(Op.SIGMOID, x), lambda: op(Op.SIN, x), lambda: op(Op.COS, x),
        lambda: op(Op.MIN, x, y), lambda: op(Op.MAX, x, y), lambda: op(Op.ABS, x), lambda: op(Op.NEG, x),
        lambda: op(Op.POW, positive, op(Op.MUL, op(Op.TANH, y), f(2.0))),
        lambda: op(Op.POW, x, i(rng.choice([0, 1, 2, 3]))),
        lambda: op(Op.WHERE, op(Op.GT, x, y), x, op(Op.MUL, y, f(0.5))),
        lambda: op(Op.WHERE, op(Op.GE, q, kv), x, f(-math.inf)),
        lambda: op(Op.MOD, x, op(Op.ADD, op(Op.ABS, y), f(1.5))), lambda: op(Op.FLOOR, x),
        lambda: load("bias", F32, (op(Op.MOD, Node(Op.CAST, I32, (op(Op.FLOOR, x),)), i(9)),)),
    ]  # fmt: skip
    return rng.choice(choices)()


@pytest.mark.parametrize("seed", range(200))
def test_random_mods(seed):
    rng = random.Random(seed)
    root = random_mod(rng, rng.randrange(2, 5))
    check(root, {"bias": (9,), "slopes": (SHAPE[1],)}, seed=seed, min_defined=0.0)  # may overflow anywhere
