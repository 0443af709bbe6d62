"""Every refusal is a FlexcompError naming the construct, with file, line and a caret under the right column."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

import flexcomp.mods as fm
from flexcomp.errors import (
    FlexcompSyntaxError,
    FlexcompTypeError,
    ModKindError,
    SignatureError,
    UndefinedNameError,
    UnsupportedConstructError,
)

A_LIST = [1, 2, 3]
A_DICT = {"a": 1}
A_STR = "hello"
AN_ARRAY = np.arange(4)
TABLE = torch.arange(16).view(4, 4)
FTABLE = torch.randn(8)
HUGE = 2**40


def e_for(b, h, q, kv):
    for i in range(q):  # a data-dependent trip count (a constant one is unrolled)
        q = q + i
    return q > kv


def e_while(b, h, q, kv):
    while q > 0:
        q = q - 1
    return q > kv


def e_lambda(b, h, q, kv):
    return (lambda x: x)(q) > kv  # noqa: PLC3002


def e_comprehension(b, h, q, kv):
    return max([i for i in range(3)]) > kv


def e_string(b, h, q, kv):
    return "abc" == kv


def e_fstring(b, h, q, kv):
    return f"{q}" == kv


def e_import(b, h, q, kv):
    import os  # noqa: F401

    return q > kv


def e_global(b, h, q, kv):
    global TABLE  # noqa: PLW0602
    return q > kv


def e_walrus(b, h, q, kv):
    return (y := q) > kv  # noqa: F841


def e_star_args(*args):
    return True


def e_kwonly(b, h, *, q, kv):
    return q > kv


def e_default(b, h, q, kv=0):
    return q > kv


def e_list_capture(b, h, q, kv):
    return q > A_LIST


def e_dict_capture(b, h, q, kv):
    return q > A_DICT


def e_str_capture(b, h, q, kv):
    return q > A_STR


def e_numpy_capture(b, h, q, kv):
    return q > AN_ARRAY


def e_undefined(b, h, q, kv):
    return q > NOT_DEFINED_ANYWHERE  # noqa: F821


def e_float_index(b, h, q, kv):
    return FTABLE[q / 2] > 0


def e_index_count(b, h, q, kv):
    return TABLE[q % 4] > 0


def e_unindexed(b, h, q, kv):
    return TABLE > q


def e_subscript_non_tensor(b, h, q, kv):
    return q[0] > kv


def e_unknown_attr(b, h, q, kv):
    return q.shape > kv


def e_unknown_torch(b, h, q, kv):
    return torch.nn.functional.softmax(q) > kv


def e_mask_returns_int(b, h, q, kv):
    return q - kv


def s_score_returns_bool(score, b, h, q, kv):
    return score > 0


def e_arity(b, h, q):
    return q > 0


def e_not_every_path(b, h, q, kv):
    if q > kv:
        return True


def e_huge(b, h, q, kv):
    return q > HUGE


def e_float_bitwise(b, h, q, kv):
    return (q / 2) & kv > 0


def e_recursive(b, h, q, kv):
    return _recurse(q) > kv


def _recurse(x):
    return _recurse(x - 1)


def e_class(b, h, q, kv):
    class A:
        pass

    return q > kv


def e_yield(b, h, q, kv):
    yield q > kv


def e_star_expr(b, h, q, kv):
    a = *q, kv
    return a


def e_print(b, h, q, kv):
    print(q)
    return q > kv


def e_shift(b, h, q, kv):
    return (q << 1.5) > kv


def e_in(b, h, q, kv):
    return q in kv


def e_slice(b, h, q, kv):
    return TABLE[1:2, 0] > q


CASES = [
    # fn, kind, error type, words in the message, text under the caret
    (e_for, "mask", UnsupportedConstructError, "known when the mod is compiled", "range(q)"),
    (e_while, "mask", UnsupportedConstructError, "`while` loops", "while q > 0:"),
    (e_lambda, "mask", UnsupportedConstructError, "`lambda`", "lambda x: x"),
    (e_comprehension, "mask", UnsupportedConstructError, "comprehension", "[i for i in range(3)]"),
    (e_string, "mask", UnsupportedConstructError, "string literals", '"abc"'),
    (e_fstring, "mask", UnsupportedConstructError, "f-strings", 'f"{q}"'),
    (e_import, "mask", UnsupportedConstructError, "`import`", "import os"),
    (e_global, "mask", UnsupportedConstructError, "`global`", "global TABLE"),
    (e_walrus, "mask", UnsupportedConstructError, "walrus", "y := q"),
    (e_star_args, "mask", UnsupportedConstructError, "`*args`", "*args"),
    (e_kwonly, "mask", UnsupportedConstructError, "keyword-only", "*"),
    (e_default, "mask", UnsupportedConstructError, "default parameter values", "kv=0"),
    (e_list_capture, "mask", FlexcompTypeError, "a tuple cannot be used as a value", "A_LIST"),  # a list is one
    (e_dict_capture, "mask", SignatureError, "'A_DICT' is a builtins.dict", "A_DICT"),
    (e_str_capture, "mask", SignatureError, "'A_STR' is a builtins.str", "A_STR"),
    (e_numpy_capture, "mask", SignatureError, "'AN_ARRAY' is a numpy.ndarray", "AN_ARRAY"),
    (e_undefined, "mask", UndefinedNameError, "'NOT_DEFINED_ANYWHERE' is not defined", "NOT_DEFINED_ANYWHERE"),
    (e_float_index, "mask", FlexcompTypeError, "index into 'FTABLE' must be an int", "q / 2"),
    (e_index_count, "mask", FlexcompTypeError, "has 2 dims", "TABLE[q % 4]"),
    (e_unindexed, "mask", FlexcompTypeError, "index it with 2 indices", "TABLE"),
    (e_subscript_non_tensor, "mask", UnsupportedConstructError, "only captured tensors and tuples can be indexed", "q[0]"),
    (e_unknown_attr, "mask", UnsupportedConstructError, "attribute `.shape`", "q.shape"),
    (e_unknown_torch, "mask", UnsupportedConstructError, "`torch.nn.functional.softmax` is not supported", "torch.nn.functional.softmax"),
    (e_mask_returns_int, "mask", FlexcompTypeError, "mask_mod must return a bool", "return q - kv"),
    (s_score_returns_bool, "score", FlexcompTypeError, "score_mod must return a number", "return score > 0"),
    (e_arity, "mask", SignatureError, "takes 4 parameters", "def e_arity(b, h, q):"),
    (e_not_every_path, "mask", FlexcompTypeError, "does not return a value on every path", "def e_not_every_path"),
    (e_huge, "mask", FlexcompTypeError, "does not fit in int32", "HUGE"),
    (e_float_bitwise, "mask", FlexcompTypeError, "`&` needs bools or ints", "&"),
    (e_recursive, "mask", UnsupportedConstructError, "recursive call to '_recurse'", (_recurse, "_recurse(x - 1)")),
    (e_class, "mask", FlexcompSyntaxError, "this statement is not part of the flexcomp language", "class A"),
    (e_yield, "mask", FlexcompSyntaxError, "this statement is not part of the flexcomp language", "yield"),
    (e_star_expr, "mask", FlexcompSyntaxError, "star-expression", "*"),
    (e_print, "mask", UnsupportedConstructError, "builtin `print`", "print"),
    (e_shift, "mask", FlexcompTypeError, "needs ints, got a float", "<<"),
    (e_in, "mask", UnsupportedConstructError, "`in` comparisons", "in"),
    (e_slice, "mask", UnsupportedConstructError, "slices", "1:2"),
]


def expected_position(fn, snippet: str) -> tuple[str, int, int]:
    """File, line and 1-based column of the first occurrence of `snippet` in `fn`'s source."""
    lines, first = inspect.getsourcelines(fn)
    for i in [*range(1, len(lines)), 0]:  # the body first, then the def line
        col = lines[i].split("#")[0].find(snippet)
        if col >= 0:
            return inspect.getsourcefile(fn), first + i, col + 1
    raise AssertionError(f"{snippet!r} not in the source of {fn.__name__}")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c[0].__name__)
def test_error_names_construct_and_points_at_it(case):
    fn, kind, error, words, snippet = case
    at = fn
    if isinstance(snippet, tuple):  # the error is in a helper
        at, snippet = snippet
    decorate = fm.mask_mod if kind == "mask" else fm.score_mod
    with pytest.raises(error) as info:
        decorate(fn)
    err = info.value
    text = str(err)
    assert words in err.message, text
    file, line, col = expected_position(at, snippet)
    assert err.loc is not None, text
    assert (err.loc.file, err.loc.line, err.loc.column) == (file, line, col), text
    assert f'File "{file}", line {line}, column {col}' in text
    source_line, caret_line = text.splitlines()[2:4]
    stripped = inspect.getsourcelines(at)[0][line - inspect.getsourcelines(at)[1]].lstrip()
    assert source_line.strip() == stripped.rstrip()
    assert caret_line.index("^") - 4 == col - 1 - (len(err.loc.text) - len(err.loc.text.lstrip()))
    assert "Traceback" not in text and "lark" not in text.lower()


def test_as_mod_kind_mismatch():
    mod = fm.mask_mod(e_arity_ok)
    with pytest.raises(ModKindError, match=r"expected a score_mod, got mask_mod 'e_arity_ok' \(fn_or_mod.kind='mask' "
                       r"!= kind='score'\)") as info:
        fm.as_mod(mod, "score")
    assert isinstance(info.value, SignatureError) and isinstance(info.value, TypeError)
    assert info.value.loc == mod.loc
    with pytest.raises(ModKindError, match="mask_mod must be a function or a flexcomp Mod, got int"):
        fm.as_mod(3, "mask")


def e_arity_ok(b, h, q, kv):
    return q >= kv


def test_changed_captured_tensor_is_refused():
    global RESIZED
    RESIZED = torch.randn(4)
    mod = fm.score_mod(s_resized)
    RESIZED = torch.randn(5)
    with pytest.raises(SignatureError, match="changed after the mod was compiled"):
        mod.tensors()


RESIZED = torch.randn(4)


def s_resized(score, b, h, q, kv):
    return score + RESIZED[h]
