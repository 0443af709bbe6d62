"""Tile analysis and closed-form bounds against brute-force evaluation on the dense grid."""

from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flexcomp import ir
from flexcomp.evaluate import evaluate
from flexcomp.ir import DType, Node, Op
from flexcomp.sparsity import standard as std
from flexcomp.sparsity.closed_form import derive_bounds
from flexcomp.sparsity.row_bounds import row_bound_tables, row_bounds
from flexcomp.sparsity.tables import ordered_to_classes
from flexcomp.sparsity.tiles import Grid, analyze_rows, analyze_tiles
from flexcomp.tiles import TileClass

Q, KV, H = ir.arg("q_idx"), ir.arg("kv_idx"), ir.arg("h")
INT_TABLE = torch.tensor([3, -2, 7, 7, 0, 5, -9, 1, 4, 4, 4, 2, 8, -1, 6, 0] * 4, dtype=torch.int32)
BOOL_TABLE = torch.rand(3, 7, 9, generator=torch.Generator().manual_seed(0)) < 0.5
TENSORS = {"TI": INT_TABLE, "TB": BOOL_TABLE}


def node(op: Op, *src: Node) -> Node:
    return Node(op, ir.result_dtype(op, tuple(s.dtype for s in src)), tuple(src))


def brute_force(mask: Node, grid: Grid, tensors: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(any true, any false) per tile over in-range elements, from the dense mask."""
    env = {"b": torch.zeros(1, 1, 1, 1, dtype=torch.int32),
           "h": torch.arange(grid.H, dtype=torch.int32).view(1, -1, 1, 1),
           "q_idx": torch.arange(grid.q_len, dtype=torch.int32).view(1, 1, -1, 1),
           "kv_idx": torch.arange(grid.kv_len, dtype=torch.int32).view(1, 1, 1, -1)}
    dense = evaluate(mask, env, tensors).expand(1, grid.H, grid.q_len, grid.kv_len)
    nq, nk, bq, bk = grid.num_q_blocks, grid.num_kv_blocks, grid.q_block, grid.kv_block
    padded = torch.full((1, grid.H, nq * bq, nk * bk), -1, dtype=torch.int8)
    padded[..., : grid.q_len, : grid.kv_len] = dense.to(torch.int8)
    tiles = padded.view(1, grid.H, nq, bq, nk, bk).permute(0, 1, 2, 4, 3, 5).reshape(1, grid.H, nq, nk, -1)
    return (tiles == 1).any(-1), (tiles == 0).any(-1)


def exact_classes(any_true: torch.Tensor, any_false: torch.Tensor) -> torch.Tensor:
    return torch.where(~any_true, 0, torch.where(~any_false, 2, 1)).to(torch.uint8)


def assert_sound(mask: Node, grid: Grid, tensors: dict) -> torch.Tensor:
    got = analyze_rows(mask, tensors, grid, 0, grid.num_q_blocks).expand(1, grid.H, -1, -1)
    any_true, any_false = brute_force(mask, grid, tensors)
    wrong_empty = (got == TileClass.EMPTY) & any_true
    wrong_full = (got == TileClass.FULL) & any_false
    assert not wrong_empty.any(), f"EMPTY tile with a true element:\n{ir.to_text(mask)}"
    assert not wrong_full.any(), f"FULL tile with a false element:\n{ir.to_text(mask)}"
    return got


# ---------------------------------------------------------------- the standard variants

ODD_SHAPES = [(130, 97, 16, 32), (200, 200, 32, 32), (77, 150, 8, 16)]
BOUNDED = {"causal": std.causal(), "sliding_window": std.sliding_window(40), "prefix_lm": std.prefix_lm(50),
           "block_causal": std.block_causal(24), "offset_causal": std.offset_causal(13),
           "causal_window_prefix": node(Op.AND, std.prefix_lm(30), std.sliding_window(60))}
_doc, _doc_tensors = std.document(200, 9)
VARIANTS = {name: (mask, {}, ODD_SHAPES) for name, mask in BOUNDED.items()}
VARIANTS.update({
    "document": (_doc, _doc_tensors, [(200, 200, 16, 16), (200, 200, 7, 32)]),
    "document_causal": (node(Op.AND, _doc, std.causal()), _doc_tensors, [(200, 200, 16, 8)]),
    "dilated": (std.dilated_window(21), {}, ODD_SHAPES + [(60, 50, 1, 1)]),
    "neighborhood": (std.neighborhood(8, 2), {}, [(64, 64, 16, 16), (64, 64, 8, 32), (64, 48, 16, 8)]),
})


# ---------------------------------------------------------------- random mask programs

consts = st.integers(-12, 12)
divisors = st.integers(-7, 7).filter(lambda d: d != 0)


def int_exprs(depth: int) -> st.SearchStrategy[Node]:
    leaves = st.one_of(st.sampled_from([Q, KV, Q, KV, H]), consts.map(ir.const))
    if depth == 0:
        return leaves
    sub = int_exprs(depth - 1)
    return st.one_of(
        leaves,
        st.tuples(st.sampled_from([Op.ADD, Op.SUB, Op.MIN, Op.MAX]), sub, sub).map(lambda t: node(t[0], t[1], t[2])),
        st.tuples(sub, consts).map(lambda t: node(Op.MUL, t[0], ir.const(t[1]))),
        st.tuples(st.sampled_from([Op.FLOORDIV, Op.MOD]), sub, divisors).map(
            lambda t: node(t[0], t[1], ir.const(t[2]))),
        sub.map(lambda x: node(Op.ABS, x)),
        sub.map(lambda x: node(Op.NEG, x)),
        sub.map(lambda x: ir.load("TI", DType.I32, (x,))),
        st.tuples(bool_exprs(depth - 1), sub, sub).map(lambda t: node(Op.WHERE, *t)),
    )


def bool_exprs(depth: int) -> st.SearchStrategy[Node]:
    ints = int_exprs(max(0, depth - 1))
    compare = st.tuples(st.sampled_from([Op.LT, Op.LE, Op.GT, Op.GE, Op.EQ, Op.NE]), ints, ints).map(
        lambda t: node(t[0], t[1], t[2]))
    gate = st.tuples(ints, ints).map(lambda t: ir.load("TB", DType.BOOL, (H, t[0], t[1])))
    congruence = st.tuples(ints, divisors, consts).map(
        lambda t: node(Op.EQ, node(Op.MOD, t[0], ir.const(t[1])), ir.const(t[2])))
    leaves = st.one_of(compare, compare, gate, congruence)
    if depth == 0:
        return leaves
    sub = bool_exprs(depth - 1)
    return st.one_of(
        leaves,
        st.tuples(st.sampled_from([Op.AND, Op.OR, Op.XOR]), sub, sub).map(lambda t: node(t[0], t[1], t[2])),
        sub.map(lambda x: node(Op.NOT, x)),
    )


grids = st.builds(Grid, B=st.just(1), H=st.integers(1, 3), q_len=st.integers(1, 70), kv_len=st.integers(1, 70),
                  q_block=st.sampled_from([1, 2, 3, 8, 16]), kv_block=st.sampled_from([1, 4, 5, 16, 32]))


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mask=bool_exprs(3), grid=grids)
def test_analysis_never_contradicts_brute_force(mask: Node, grid: Grid) -> None:
    assert_sound(mask, grid, TENSORS)


# ---------------------------------------------------------------- closed-form bounds

half_lines = st.one_of(
    st.tuples(st.sampled_from([Op.LE, Op.LT, Op.GE, Op.GT, Op.EQ]), consts).map(
        lambda t: node(t[0], KV, node(Op.ADD, Q, ir.const(t[1])))),
    st.tuples(st.sampled_from([Op.LE, Op.LT, Op.GE, Op.GT]), st.integers(0, 60)).map(
        lambda t: node(t[0], KV, ir.const(t[1]))),
    st.tuples(st.sampled_from([Op.LE, Op.EQ, Op.GE]), st.integers(1, 9), consts).map(
        lambda t: node(t[0], node(Op.FLOORDIV, KV, ir.const(t[1])),
                       node(Op.ADD, node(Op.FLOORDIV, Q, ir.const(t[1])), ir.const(t[2] // 4)))),
    st.integers(0, 20).map(lambda w: node(Op.LE, node(Op.ABS, node(Op.SUB, Q, KV)), ir.const(w))),
    st.tuples(st.integers(1, 3), consts).map(lambda t: node(Op.LE, node(Op.MUL, ir.const(t[0]), KV),
                                                            node(Op.ADD, Q, ir.const(t[1])))),
)
kv_ranges = st.recursive(half_lines, lambda sub: st.one_of(
    st.tuples(st.sampled_from([Op.AND, Op.OR]), sub, sub).map(lambda t: node(t[0], t[1], t[2])),
    sub.map(lambda x: node(Op.NOT, x))), max_leaves=4)


def bounds_per_block(bounds, grid: Grid) -> list[tuple[int, int, int, int]]:
    out = []
    for qb in range(grid.num_q_blocks):
        env = {"q_lo": torch.tensor(qb * grid.q_block, dtype=torch.int32),
               "q_hi": torch.tensor(min((qb + 1) * grid.q_block, grid.q_len) - 1, dtype=torch.int32),
               "KV_LEN": torch.tensor(grid.kv_len, dtype=torch.int32), "Q_LEN": torch.tensor(grid.q_len)}
        vals = [int(evaluate(n, env, {}).clamp(0, grid.kv_len)) for n in
                (bounds.kv_lo, bounds.kv_hi, bounds.full_lo, bounds.full_hi)]
        out.append(tuple(vals))
    return out


def brute_ranges(mask: Node, grid: Grid) -> list[tuple[set[int], set[int]]]:
    env = {"q_idx": torch.arange(grid.q_len, dtype=torch.int32)[:, None],
           "kv_idx": torch.arange(grid.kv_len, dtype=torch.int32)[None]}
    dense = evaluate(mask, env, {}).expand(grid.q_len, grid.kv_len)
    out = []
    for qb in range(grid.num_q_blocks):
        rows = dense[qb * grid.q_block: (qb + 1) * grid.q_block]
        out.append((set(rows.any(0).nonzero().flatten().tolist()), set(rows.all(0).nonzero().flatten().tolist())))
    return out


def assert_bounds_exact(mask: Node, grid: Grid) -> None:
    bounds = derive_bounds(mask)
    if bounds is None:
        return
    for (lo, hi, flo, fhi), (union, inter) in zip(bounds_per_block(bounds, grid), brute_ranges(mask, grid)):
        assert union == set(range(lo, hi)), f"visited range [{lo}, {hi}) != brute force {sorted(union)}"
        assert inter == set(range(flo, fhi)), f"full range [{flo}, {fhi}) != brute force {sorted(inter)}"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mask=kv_ranges, grid=grids)
def test_closed_form_bounds_equal_brute_force(mask: Node, grid: Grid) -> None:
    assert_bounds_exact(mask, grid)


def test_bounds_offered_for_standard_masks() -> None:
    for name, mask in BOUNDED.items():
        assert derive_bounds(mask) is not None, name
        for shape in [(130, 97, 16, 32), (64, 200, 32, 16), (100, 100, 7, 9)]:
            assert_bounds_exact(mask, Grid(1, 1, *shape))


def test_no_bounds_outside_the_fragment() -> None:
    for name in ("dilated", "document", "neighborhood"):
        assert derive_bounds(VARIANTS[name][0]) is None, name
    assert derive_bounds(node(Op.NE, Q, KV)) is None
    assert derive_bounds(node(Op.EQ, node(Op.MOD, KV, ir.const(3)), ir.const(0))) is None


# ---------------------------------------------------------------- standard variants: analysis alone is exact


def test_standard_variants_exact_by_analysis() -> None:
    for name, (mask, tensors, shapes) in VARIANTS.items():
        for q_len, kv_len, bq, bk in shapes:
            grid = Grid(1, 1, q_len, kv_len, bq, bk)
            got = assert_sound(mask, grid, tensors)
            expected = exact_classes(*brute_force(mask, grid, tensors))
            inexact = int((got != expected).sum())
            assert inexact == 0, f"{name} at {(q_len, kv_len, bq, bk)}: {inexact} tiles left PARTIAL"


def test_float_math_is_sound() -> None:
    score = node(Op.MUL, node(Op.DIV, Q, ir.const(7.0)), ir.const(float("inf")))
    masks = [node(Op.LT, score, ir.const(3.0)),
             node(Op.GE, node(Op.EXP, node(Op.DIV, node(Op.SUB, KV, Q), ir.const(10.0))), ir.const(0.5)),
             node(Op.NE, node(Op.SQRT, node(Op.SUB, Q, KV)), ir.const(2.0))]
    for mask in masks:
        assert_sound(mask, Grid(1, 1, 50, 40, 8, 8), {})


# ---------------------------------------------------------------- lists of tiles (the document path's analysis)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mask=bool_exprs(3), grid=grids, seed=st.integers(0, 2**16))
def test_tile_list_analysis_never_contradicts_brute_force(mask: Node, grid: Grid, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    count = 1 + grid.num_q_blocks * grid.num_kv_blocks // 2
    q_blocks = torch.randint(0, grid.num_q_blocks, (count,), generator=gen)
    kv_blocks = torch.randint(0, grid.num_kv_blocks, (count,), generator=gen)
    got = analyze_tiles(mask, TENSORS, grid, q_blocks, kv_blocks)[0]  # [H, T]
    any_true, any_false = (t[0][:, q_blocks, kv_blocks] for t in brute_force(mask, grid, TENSORS))
    assert not ((got == TileClass.EMPTY) & any_true).any(), ir.to_text(mask)
    assert not ((got == TileClass.FULL) & any_false).any(), ir.to_text(mask)


# ---------------------------------------------------------------- row bounds (ends read from h and tables)

row_terms = st.one_of(  # kv-free integer terms a row bound may read: a head's table entry, a row's, a constant
    consts.map(ir.const), st.just(Q), st.just(node(Op.ADD, Q, ir.load("TI", DType.I32, (H,)))),
    st.integers(1, 7).map(lambda d: ir.load("TI", DType.I32, (node(Op.FLOORDIV, Q, ir.const(d)),))))
param_half_lines = st.one_of(
    half_lines,
    st.tuples(st.sampled_from([Op.LE, Op.LT, Op.GE, Op.GT, Op.EQ]), row_terms, consts).map(
        lambda t: node(t[0], node(Op.ADD, KV, ir.const(t[2])), t[1])),
    st.tuples(st.sampled_from([Op.LT, Op.GE]), row_terms, consts).map(  # a condition on the row alone
        lambda t: node(t[0], Q, node(Op.ADD, t[1], ir.const(t[2])))),
)
param_kv_ranges = st.recursive(param_half_lines, lambda sub: st.one_of(
    st.tuples(st.sampled_from([Op.AND, Op.OR]), sub, sub).map(lambda t: node(t[0], t[1], t[2])),
    sub.map(lambda x: node(Op.NOT, x))), max_leaves=4)


def assert_row_bounds_exact(mask: Node, grid: Grid) -> bool:
    """Where row_bounds offers ends, its tables' classes equal brute force's exactly; whether it offered."""
    bounds = row_bounds(mask)
    if bounds is None:
        return False
    tables = row_bound_tables(bounds, TENSORS, grid)
    got = ordered_to_classes(*tables, grid.num_kv_blocks)[..., : grid.num_q_blocks, :]
    expected = exact_classes(*brute_force(mask, grid, TENSORS))
    assert torch.equal(got.expand_as(expected), expected), f"row bounds tables != brute force:\n{ir.to_text(mask)}"
    return True


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mask=param_kv_ranges, grid=grids)
def test_row_bound_tables_equal_brute_force(mask: Node, grid: Grid) -> None:
    assert_row_bounds_exact(mask, grid)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mask=bool_exprs(3), grid=grids)
def test_row_bounds_of_any_program_are_exact_or_refused(mask: Node, grid: Grid) -> None:
    assert_row_bounds_exact(mask, grid)


def test_row_bounds_are_offered_for_parametric_masks() -> None:
    offered = [node(Op.LT, node(Op.ADD, KV, ir.const(3)), node(Op.ADD, Q, ir.load("TI", DType.I32, (H,)))),
               node(Op.AND, node(Op.LT, Q, ir.load("TI", DType.I32, (H,))), node(Op.LE, KV, Q))]
    refused = [node(Op.NE, KV, Q), node(Op.LT, ir.load("TI", DType.I32, (KV,)), Q),
               node(Op.OR, node(Op.LT, KV, ir.const(3)), node(Op.GT, KV, ir.load("TI", DType.I32, (H,))))]
    assert all(row_bounds(m) is not None for m in offered)
    assert all(row_bounds(m) is None for m in refused)
