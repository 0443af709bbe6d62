"""Lambdas (and functools.partial) as mods, as torch users write them: each compiled IR, run by flexcomp.evaluate,
equals the lambda itself run by torch; errors inside a lambda point at its file, line and column."""

from __future__ import annotations

import functools
import inspect
import linecache

import pytest
import torch
from mod_check import assert_ir_matches, mod_args, mod_inputs

import flexcomp as fc
import flexcomp.mods as fm
from flexcomp.errors import FlexcompTypeError, SignatureError, UnsupportedConstructError
from flexcomp.frontend import lambdas

N = 256
WINDOW = 6
BIAS = torch.randn(4)
FTABLE = torch.randn(8)


def check(mod: fm.Mod, fn, rng: torch.Generator) -> None:
    """mod's IR (raw and optimized) evaluated on random indices == `fn` called on the same index tensors."""
    env = mod_inputs(rng, N)
    assert_ir_matches(mod, torch.as_tensor(fn(*mod_args(mod, env))), env)


def position_of(snippet: str, fn) -> tuple[int, int]:
    """1-based line and column of `snippet` at or after the line where `fn` (a lambda) starts."""
    file, first = inspect.getsourcefile(fn), fn.__code__.co_firstlineno
    for line in range(first, first + 10):
        col = linecache.getline(file, line).find(snippet)
        if col >= 0:
            return line, col + 1
    raise AssertionError(f"{snippet!r} not found after line {first}")


# ---------------------------------------------------------------- compiled lambdas equal the lambdas


def test_single_line_mask_and_score_lambdas(rng):
    causal = lambda b, h, q, kv: q >= kv
    doubled = lambda s, b, h, q, kv: s * 2 + (q - kv) // 3
    check(fm.as_mod(causal, "mask"), causal, rng)
    check(fm.as_mod(doubled, "score"), doubled, rng)
    assert fm.as_mod(causal, "mask").name == "<lambda>"


def test_two_lambdas_on_one_line_are_told_apart(rng):
    first, second = (lambda b, h, q, kv: q >= kv), (lambda b, h, q, kv: (q - kv) % 5 == 0)
    a, b = fm.mask_mod(first), fm.mask_mod(second)
    assert a.key != b.key
    check(a, first, rng)
    check(b, second, rng)


def test_same_parameters_twice_on_one_line(rng):
    pair = [lambda s, b, h, q, kv: s + q, lambda s, b, h, q, kv: s - kv]
    for fn in pair:
        check(fm.score_mod(fn), fn, rng)


def test_multi_line_lambda_inside_create_block_mask(rng):
    def mask(b, h, q, kv):
        return (q >= kv) & (q - kv <= WINDOW)

    bm = fc.create_block_mask(
        lambda b, h, q, kv: (q >= kv)
        & (q - kv
           <= WINDOW),
        1, 1, 128, 128, device="cpu")
    check(bm.mask_mod, mask, rng)
    dense = fc.create_block_mask(mask, 1, 1, 128, 128, device="cpu")
    assert torch.equal(bm.tile_classes(), dense.tile_classes())


def test_lambda_capturing_a_tensor_and_a_closure_int(rng):
    shift = 3  # a closure int

    def make():
        return lambda s, b, h, q, kv: s + BIAS[h] * (q - kv + shift)

    fn = make()
    mod = fm.as_mod(fn, "score")
    assert [spec.name for spec in mod.buffers] == ["BIAS"]
    check(mod, fn, rng)


def test_lambda_calling_a_lambda_helper(rng):
    near = lambda q, kv: abs(q - kv) <= WINDOW
    fn = lambda b, h, q, kv: torch.where(h % 2 == 0, near(q, kv), q >= kv)
    check(fm.mask_mod(fn), fn, rng)


def test_flex_attention_with_lambdas_matches_the_oracle(randn, naive_attention):
    q, k, v = (randn(1, 2, 40, 8) for _ in range(3))
    score = lambda s, b, h, qi, kv: s * 2
    out = fc.flex_attention(q, k, v, score_mod=score, mask_mod=lambda b, h, qi, kv: qi >= kv, backend="reference")
    expected, _ = naive_attention(q, k, v, score_fn=score, mask_fn=lambda b, h, qi, kv: qi >= kv)
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- functools.partial


def windowed(b, h, q, kv, window):
    return (q >= kv) & (q - kv <= window)


def head_scaled(scale, table, s, b, h, q, kv):
    return s * scale + table[h]


def test_partial_binds_keywords_and_leading_arguments(rng):
    by_keyword = functools.partial(windowed, window=4)
    check(fm.as_mod(by_keyword, "mask"), by_keyword, rng)
    assert fm.as_mod(by_keyword, "mask").name == "partial(windowed)"
    table = torch.randn(4)
    leading = functools.partial(head_scaled, 0.5, table)
    mod = fm.as_mod(leading, "score")
    assert [spec.name for spec in mod.buffers] == ["table"]
    check(mod, leading, rng)


def test_partial_of_a_lambda(rng):
    fn = functools.partial(lambda b, h, q, kv, w: q - kv < w, w=9)
    check(fm.mask_mod(fn), fn, rng)


def test_partial_with_a_keyword_before_the_free_parameters_is_refused():
    with pytest.raises(SignatureError, match="by keyword before the free parameters"):
        fm.score_mod(functools.partial(head_scaled, table=BIAS, scale=1.0))


def test_partial_binding_an_unusable_value_is_refused():
    with pytest.raises(SignatureError, match="'window' is a builtins.str"):
        fm.mask_mod(functools.partial(windowed, window="wide"))


# ---------------------------------------------------------------- errors point into the lambda


def test_error_in_a_lambda_points_at_line_and_column():
    fn = lambda b, h, q, kv: FTABLE[q / 2] > 0
    with pytest.raises(FlexcompTypeError, match="index into 'FTABLE' must be an int") as info:
        fm.mask_mod(fn)
    loc = info.value.loc
    assert (loc.file, loc.line, loc.column) == (__file__, *position_of("q / 2", fn))
    assert "q / 2" in str(info.value) and "^^^^^" in str(info.value)


def test_error_on_a_later_line_of_a_multi_line_lambda():
    fn = (lambda b, h, q, kv:
          (q >= kv)
          & (q @ 1 > kv))
    with pytest.raises(UnsupportedConstructError, match="matrix multiplication") as info:
        fm.mask_mod(fn)
    assert (info.value.loc.line, info.value.loc.column) == position_of("@", fn)


def test_second_lambda_on_a_line_reports_its_own_error():
    good, bad = (lambda b, h, q, kv: q > kv), (lambda b, h, q, kv: q)
    fm.mask_mod(good)
    with pytest.raises(FlexcompTypeError, match="must return a bool") as info:
        fm.mask_mod(bad)
    line, col = position_of("lambda b, h, q, kv: q)", bad)
    assert (info.value.loc.line, info.value.loc.column) == (line, col + len("lambda b, h, q, kv: "))


def test_lambda_with_defaults_is_refused():
    with pytest.raises(UnsupportedConstructError, match="no defaults"):
        fm.mask_mod(lambda b, h, q, kv=0: q > kv)


def test_lambda_with_wrong_arity_is_refused():
    with pytest.raises(SignatureError, match="takes 4 parameters"):
        fm.mask_mod(lambda b, q, kv: q > kv)


# ---------------------------------------------------------------- without instruction positions (Python 3.10)


def test_fallback_by_arity_tells_lambdas_apart_by_parameters(monkeypatch, rng):
    monkeypatch.setattr(lambdas, "body_span_from_positions", lambda code, lines: None)
    mask, score = (lambda b, h, q, kv: (q >= kv) & (h < 2)), (lambda s, b, h, q, kv: s - kv)
    check(fm.mask_mod(mask), mask, rng)
    check(fm.score_mod(score), score, rng)
    spread = fm.as_mod(
        lambda b, h, q, kv: (q >= kv)
        & (q - kv <= WINDOW), "mask")
    check(spread, functools.partial(windowed, window=WINDOW), rng)


def test_fallback_by_arity_refuses_ambiguous_lines(monkeypatch):
    monkeypatch.setattr(lambdas, "body_span_from_positions", lambda code, lines: None)
    first, second = (lambda b, h, q, kv: q >= kv), (lambda b, h, q, kv: q <= kv)  # noqa: F841
    with pytest.raises(SignatureError, match="cannot tell which lambda"):
        fm.mask_mod(first)
