"""Rewrite rules: each fires, the fixpoint terminates, sharing survives; composition keeps buffers apart."""

from __future__ import annotations

import math

import pytest
import torch

import flexcomp.mods as fm
from flexcomp.compiler import check_ir, optimize
from flexcomp.evaluate import evaluate
from flexcomp.ir import DType, Node, Op, arg, const, toposort
from flexcomp.rewrite import ALGEBRA, CONSTANT_FOLDING, SIMPLIFY, graph_rewrite

q, kv, score = arg("q_idx"), arg("kv_idx"), arg("score")
c, c2 = Node(Op.LT, DType.BOOL, (q, kv)), Node(Op.GT, DType.BOOL, (q, kv))


def n(op: Op, *src: Node, dtype: DType | None = None) -> Node:
    from flexcomp.ir import result_dtype

    return Node(op, dtype or result_dtype(op, tuple(s.dtype for s in src)), src)


def cast(x: Node, dtype: DType) -> Node:
    return Node(Op.CAST, dtype, (x,))


RULE_CASES = [
    # before, after
    (n(Op.ADD, q, const(0)), q),
    (n(Op.ADD, const(0), q), q),
    (n(Op.SUB, score, const(0.0)), score),
    (n(Op.MUL, score, const(1.0)), score),
    (n(Op.DIV, score, const(1.0)), score),
    (n(Op.POW, score, const(1.0)), score),
    (n(Op.MUL, q, const(0)), const(0)),
    (n(Op.FLOORDIV, q, const(1)), q),
    (n(Op.MOD, q, const(1)), const(0)),
    (n(Op.SUB, q, q), const(0)),
    (n(Op.ADD, n(Op.ADD, q, const(2)), const(3)), n(Op.ADD, q, const(5))),
    (n(Op.SUB, q, const(4)), n(Op.ADD, q, const(-4))),
    (n(Op.NEG, n(Op.NEG, score)), score),
    (n(Op.NOT, n(Op.NOT, c)), c),
    (n(Op.ABS, n(Op.ABS, score)), n(Op.ABS, score)),
    (n(Op.MIN, q, q), q),
    (n(Op.AND, c, c), c),
    (n(Op.AND, c, const(True)), c),
    (n(Op.AND, const(False), c), const(False)),
    (n(Op.OR, c, const(False)), c),
    (n(Op.OR, c, const(True)), const(True)),
    (n(Op.XOR, c, const(False)), c),
    (n(Op.XOR, c, const(True)), n(Op.GE, q, kv)),
    (n(Op.LE, q, q), const(True)),
    (n(Op.NE, kv, kv), const(False)),
    (n(Op.NOT, c), n(Op.GE, q, kv)),
    (n(Op.WHERE, const(True), score, const(1.0)), score),
    (n(Op.WHERE, const(False), score, const(1.0)), const(1.0)),
    (n(Op.WHERE, c, score, score), score),
    (n(Op.WHERE, n(Op.NOT, n(Op.EQ, score, score)), score, const(0.0)),
     n(Op.WHERE, n(Op.EQ, score, score), const(0.0), score)),
    (n(Op.WHERE, c, const(True), const(False)), c),
    (n(Op.WHERE, c, const(False), const(True)), n(Op.GE, q, kv)),
    (cast(q, DType.I32), q),
    (cast(cast(c, DType.I32), DType.F32), cast(c, DType.F32)),
    (cast(cast(q, DType.F32), DType.BOOL), cast(q, DType.BOOL)),
    # constant folding, Python semantics
    (n(Op.FLOORDIV, const(-7), const(2)), const(-4)),
    (n(Op.MOD, const(-7), const(3)), const(2)),
    (n(Op.MOD, const(7), const(-3)), const(-2)),
    (n(Op.DIV, const(7.0), const(2.0)), const(3.5)),
    (n(Op.NOT, const(5)), const(-6)),
    (cast(const(-2.7), DType.I32), const(-2)),
    (cast(const(3), DType.BOOL), const(True)),
    (n(Op.EXP, const(0.0)), const(1.0)),
    (n(Op.NEG, const(math.inf)), const(-math.inf)),
]


@pytest.mark.parametrize("before, after", RULE_CASES, ids=[str(i) for i in range(len(RULE_CASES))])
def test_rule_fires(before, after):
    out = graph_rewrite(before, SIMPLIFY)
    assert out == after, f"\n{before}\n->\n{out}\nexpected\n{after}"
    check_ir(out)


NOT_FOLDED = [
    n(Op.SUB, score, score),  # NaN - NaN is NaN, not 0
    n(Op.MUL, score, const(0.0)),  # inf * 0 is NaN
    n(Op.LE, score, score),  # NaN <= NaN is False
    n(Op.DIV, const(1.0), const(0.0)),  # left to IEEE at runtime
    n(Op.FLOORDIV, const(1), const(0)),
    n(Op.POW, const(2), const(-1)),  # torch refuses int ** negative int
    n(Op.ADD, const(2**31 - 1), const(1)),  # would leave int32
    cast(cast(score, DType.I32), DType.F32),  # truncation is not lossless
    n(Op.NOT, n(Op.LT, score, const(0.0))),  # not (x < 0) is not x >= 0 for NaN
]


@pytest.mark.parametrize("node", NOT_FOLDED, ids=[str(i) for i in range(len(NOT_FOLDED))])
def test_unsafe_rewrites_do_not_fire(node):
    assert graph_rewrite(node, SIMPLIFY) == node


def test_fold_matches_torch_on_random_constants():
    g = torch.Generator().manual_seed(0)
    for op in (Op.ADD, Op.SUB, Op.MUL, Op.FLOORDIV, Op.MOD, Op.MIN, Op.MAX, Op.AND, Op.OR, Op.XOR, Op.LT, Op.EQ):
        for _ in range(20):
            a, b = (int(x) for x in torch.randint(-50, 50, (2,), generator=g))
            b = b or 1
            node = n(op, const(a), const(b))
            out = graph_rewrite(node, CONSTANT_FOLDING)
            assert out.op == Op.CONST
            assert out.arg == evaluate(node, {}).item(), (op, a, b)


def test_fixpoint_terminates_and_preserves_sharing():
    shared = n(Op.ADD, n(Op.MUL, q, const(1)), const(0))  # -> q
    d = n(Op.SUB, shared, kv)
    root = n(Op.AND, n(Op.GE, d, const(0)), n(Op.LT, n(Op.SUB, q, kv), const(8)))
    out = graph_rewrite(root, SIMPLIFY)
    nodes = toposort(out)
    subs = [x for x in nodes if x.op == Op.SUB]
    assert len(subs) == 1  # q*1+0 - kv and q - kv became one node
    users = [x for x in nodes if subs[0] in x.src]
    assert all(any(s is subs[0] for s in u.src) for u in users)  # one object, not equal copies
    assert graph_rewrite(out, SIMPLIFY) == out


def test_optimize_prints_each_pass_with_debug(monkeypatch, capsys):
    monkeypatch.setenv("FLEXCOMP_DEBUG", "1")
    optimize(n(Op.ADD, q, const(0)), "demo")
    err = capsys.readouterr().err
    assert "demo: after fold_constants" in err and "demo: after simplify" in err


def test_algebra_table_rules_have_comments():
    import inspect

    import flexcomp.rewrite as rw

    source = inspect.getsource(rw)
    body = source[source.index("ALGEBRA: list[Rule] = ["):]
    assert body.count("# ") >= len(ALGEBRA)


# ---------------------------------------------------------------- composition

DOC = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])


def make_doc_mask(doc: torch.Tensor):
    DOCS = doc

    @fm.mask_mod
    def doc_mask(b, h, q_idx, kv_idx):
        return DOCS[q_idx % 8] == DOCS[kv_idx % 8]
    return doc_mask


def make_window(width: int, table: torch.Tensor):
    def window(b, h, q_idx, kv_idx):
        return (q_idx - kv_idx <= width) & (table[h] > 0)

    return window


def grid() -> dict[str, torch.Tensor]:
    return {"b": torch.zeros(1, 1, 1, 1, dtype=torch.int32), "h": torch.arange(4, dtype=torch.int32).view(1, 4, 1, 1),
            "q_idx": torch.arange(-4, 12, dtype=torch.int32).view(1, 1, -1, 1),
            "kv_idx": torch.arange(-4, 12, dtype=torch.int32).view(1, 1, 1, -1)}


def run(mod, env):
    return evaluate(mod.ir, env, mod.tensors())


@pytest.mark.parametrize("combine, reduce", [(fm.and_masks, torch.logical_and), (fm.or_masks, torch.logical_or)])
def test_composition_keeps_same_named_buffers_apart(combine, reduce):
    a = make_doc_mask(torch.tensor([0, 0, 0, 1, 1, 2, 2, 2]))
    b = make_doc_mask(torch.tensor([0, 1, 1, 1, 1, 1, 1, 3]))
    w = make_window(3, torch.tensor([1, -1, 1, 1]))
    mod = combine(a, b, w)
    assert sorted(s.name for s in mod.buffers) == ["DOCS", "DOCS_1", "table"]
    assert mod.kind == "mask"
    env = grid()
    expected = reduce(reduce(run(a, env), run(b, env)), run(fm.as_mod(w, "mask"), env))
    assert torch.equal(run(mod, env), expected)
    assert torch.equal(mod(*env.values()), expected)  # calling a composed Mod calls its parts


def test_composition_shares_the_same_tensor():
    a = make_doc_mask(DOC)
    mod = fm.and_masks(a, a)
    assert [s.name for s in mod.buffers] == ["DOCS"]
    assert mod.ir == a.ir  # x & x -> x


def test_noop_and_empty_compositions():
    env = grid()
    assert fm.noop_mask.ir == const(True)
    assert fm.and_masks().ir == const(True)
    assert fm.or_masks().ir == const(False)
    a = make_doc_mask(DOC)
    assert fm.and_masks(a, fm.noop_mask).ir == a.ir
    assert fm.or_masks(a, fm.noop_mask).ir == const(True)
    assert bool(torch.as_tensor(fm.noop_mask(*env.values())).all())


def test_composition_refuses_score_mods():
    @fm.score_mod
    def bias(score, b, h, q, kv):
        return score + 1

    with pytest.raises(fm.SignatureError, match="expected a mask_mod, got score_mod"):
        fm.and_masks(bias)


def test_composed_mod_inlines_into_another_mod():
    both = fm.and_masks(make_doc_mask(torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])),
                        make_doc_mask(torch.tensor([0, 1, 1, 1, 1, 1, 1, 3])))

    def outer(b, h, q_idx, kv_idx):
        return both(b, h, q_idx, kv_idx) | (q_idx == kv_idx)

    mod = fm.mask_mod(outer)
    env = grid()
    expected = run(both, env) | (env["q_idx"] == env["kv_idx"])
    assert torch.equal(run(mod, env), expected)
