"""A mod's parameters: called positionally with exactly (score,) b, h, q_idx, kv_idx, after any functools.partial
arguments.  Shared by the parser (__init__.py, lambdas.py) and the tracer."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

from ..errors import SignatureError, SourceLoc, UnsupportedConstructError
from .values import ALLOWED


def refuse_signature(fn: Callable, loc: SourceLoc, hint: str = ALLOWED) -> None:
    """A lambda or a traced mod takes plain parameters (a parsed `def`'s are checked on its tree)."""
    code = fn.__code__
    varargs = code.co_flags & (inspect.CO_VARARGS | inspect.CO_VARKEYWORDS)
    if varargs or code.co_kwonlyargcount or code.co_posonlyargcount or fn.__defaults__:
        raise UnsupportedConstructError(f"{'a lambda mod' if fn.__name__ == '<lambda>' else 'a mod'} takes plain "
                                        "parameters: no defaults, `*args`, `**kwargs`, `/` or keyword-only parameters",
                                        loc, hint)


def partial_bindings(params: list[str], fn_name: str, partial: functools.partial, loc: SourceLoc) -> dict[str, Any]:
    """The values a functools.partial binds, by parameter name.

    Calling the partial passes the mod's arguments positionally after the bound leading ones, so every
    keyword-bound parameter must come after the parameters left free.
    """
    leading = dict(zip(params, partial.args))
    unknown = set(partial.keywords) - set(params[len(leading):])
    if len(partial.args) > len(params) or unknown:
        raise SignatureError(f"functools.partial of {fn_name!r} binds {len(partial.args)} leading arguments and "
                             f"keywords {sorted(partial.keywords)}, but it takes ({', '.join(params)})", loc)
    free = [p for p in params[len(leading):] if p not in partial.keywords]
    if params[len(leading):len(leading) + len(free)] != free:
        raise SignatureError(f"functools.partial of {fn_name!r} binds {sorted(partial.keywords)} by keyword before "
                             f"the free parameters {free}: the mod's arguments would land on them", loc,
                             "bind the leading parameters positionally, or reorder the parameters")
    return leading | dict(partial.keywords)


def check_param_count(kind: str, canonical: tuple[str, ...], fn_name: str, free: int, bound: int,
                      loc: SourceLoc | None) -> None:
    """The parameters left free (after `bound` by a functools.partial) are the mod's `canonical` arguments."""
    if free != len(canonical):
        bound_text = f" ({bound} bound by functools.partial)" if bound else ""
        raise SignatureError(f"a {kind}_mod takes {len(canonical)} parameters ({', '.join(canonical)}), "
                             f"{fn_name!r} takes {free}{bound_text}", loc)
