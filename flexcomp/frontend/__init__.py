"""Front end: a mod's Python source -> typed IR.

The source of a `def` (source.py) or a lambda (lambdas.py) is read with `inspect`, parsed with the lark
grammar in grammar/mods.lark, with positions mapped back to the file (locations.py), and lowered by
`FunctionLowering` (statements.py, expressions.py, call_lowering.py), a visitor over the lark tree that builds
`Node`s through typed builders (builders.py) and the call table (calls.py).  Free names resolve through the
closure and globals (names.py); values.py holds what exists only while compiling (modules, functions,
unindexed tensors).  Every node gets the `SourceLoc` of the code it came from, and every refusal is a
`FlexcompError` that points at the user's line.  A function whose source `inspect` cannot read (a plain REPL,
`python -c`, `exec`) is traced instead (tracer.py, with frames.py and free_names.py): run once on stand-ins that
build the same nodes.  signature.py checks the parameters for both.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import FlexcompError, FlexcompTypeError, SignatureError, SourceLoc, UnsupportedConstructError
from ..guards import Guard
from ..ir import MASK_MOD_ARGS, SCORE_MOD_ARGS, BufferSpec, DType, Node, arg
from .builders import cast
from .expressions import Context
from .locations import SourceUnavailable
from .names import BufferTable, capture
from .signature import check_param_count, partial_bindings
from .source import read_function
from .statements import FunctionLowering
from .tracer import trace_mod

__all__ = ["BufferTable", "Lowered", "lower_function"]


@dataclass(frozen=True)
class Lowered:
    raw_ir: Node
    buffers: tuple[BufferSpec, ...]
    resolvers: dict[str, Callable[[], Any]]
    loc: SourceLoc | None
    guards: tuple[Guard, ...] = ()  # the captured non-tensor values compiled in


def lower_function(fn: Callable, kind: str) -> Lowered:
    """Parse and lower `fn` (a def, a lambda, or a functools.partial of one) as a score_mod or mask_mod."""
    partial = fn if isinstance(fn, functools.partial) else None
    if partial is not None:
        fn = partial.func
    if not isinstance(fn, types.FunctionType):
        raise SignatureError(f"a {kind}_mod must be a plain Python function, a lambda or a functools.partial of "
                             f"one, got {type(fn).__name__}")
    try:
        src, tree = read_function(fn)
    except SourceUnavailable:
        return lower_traced(fn, kind, partial)
    lowering = FunctionLowering(Context(stack=[fn.__code__]), fn, src, tree)
    try:
        return lower_mod(lowering, kind, partial)
    except FlexcompError:
        raise
    except RecursionError:
        raise UnsupportedConstructError(f"{src.fn_name!r} is nested too deeply to compile", lowering.def_loc) from None


def lower_mod(lowering: FunctionLowering, kind: str, partial: functools.partial | None) -> Lowered:
    canonical = SCORE_MOD_ARGS if kind == "score" else MASK_MOD_ARGS
    env = bind_partial(lowering, partial) if partial is not None else {}
    params = [p for p in lowering.params() if p not in env]
    check_param_count(kind, canonical, lowering.src.fn_name, len(params), len(env), lowering.def_loc)
    env |= {p: arg(c, lowering.def_loc) for p, c in zip(params, canonical)}
    lowering.check_return = check_score_return if kind == "score" else check_mask_return
    root = lowering.lower_body(env)
    buffers = lowering.ctx.buffers
    return Lowered(root, tuple(buffers.specs.values()), dict(buffers.resolvers), lowering.def_loc,
                   lowering.ctx.guards.freeze())


def lower_traced(fn: types.FunctionType, kind: str, partial: functools.partial | None) -> Lowered:
    """A mod without readable source (a REPL, `python -c`, `exec`), traced on stand-ins (tracer.py)."""
    traced = trace_mod(fn, partial, kind, SCORE_MOD_ARGS if kind == "score" else MASK_MOD_ARGS)
    check_return = check_score_return if kind == "score" else check_mask_return
    root = check_return(traced.root, traced.loc)
    return Lowered(root, traced.buffers, traced.resolvers, traced.loc, traced.guards)


def bind_partial(lowering: FunctionLowering, partial: functools.partial) -> dict[str, Any]:
    """The partial's bound arguments as captured values, by parameter name."""
    loc = lowering.def_loc
    values = partial_bindings(lowering.params(), lowering.src.fn_name, partial, loc)
    return {name: capture(name, value, functools.partial(values.get, name), lowering.ctx.buffers, loc)
            for name, value in values.items()}


def check_score_return(value: Node, loc: SourceLoc) -> Node:
    if value.dtype == DType.BOOL:
        raise FlexcompTypeError("a score_mod must return a number, this returns a bool", loc,
                                "to mask, return torch.where(cond, score, float('-inf')) or use a mask_mod")
    return cast(value, DType.F32, loc)


def check_mask_return(value: Node, loc: SourceLoc) -> Node:
    if value.dtype != DType.BOOL:
        raise FlexcompTypeError(f"a mask_mod must return a bool, this returns {value.dtype.value}", loc,
                                "return a comparison, e.g. `q_idx >= kv_idx`")
    return value
