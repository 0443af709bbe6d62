"""The names a traced mod reads: its globals and closure cells, the functools.partial arguments bound to it, and
those of the functions and mods it holds; the tracer names captured tensors by them."""

from __future__ import annotations

import functools
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class FreeRead:
    """A global, closure variable or functools.partial argument a traced mod may read, as it was when traced."""

    name: str
    where: str  # "global", "closure" or "partial"
    value: Any
    read: Callable[[], Any]  # the binding's current value
    scope: Any = None  # where it is bound (a globals dict or a closure cell), for its guard; None for a partial's


def free_reads(fn: types.FunctionType, seen: set[int]) -> list[FreeRead]:
    """Every closure variable and global `fn` may read, then those of the functions and mods they hold."""
    if id(fn) in seen:
        return []
    seen.add(id(fn))
    code, scope = fn.__code__, fn.__globals__
    reads = [FreeRead(name, "closure", cell.cell_contents, functools.partial(getattr, cell, "cell_contents"), cell)
             for name, cell in zip(code.co_freevars, fn.__closure__ or ()) if cell_is_bound(cell)]
    reads += [FreeRead(name, "global", scope[name], functools.partial(scope.__getitem__, name), scope)
              for name in global_names(code) if name in scope]
    for read in list(reads):
        for inner in held_functions(read.value, seen):
            reads += free_reads(inner, seen)
    return reads


def cell_is_bound(cell: types.CellType) -> bool:
    try:
        cell.cell_contents  # noqa: B018 (an unbound cell raises)
    except ValueError:
        return False
    return True


def global_names(code: types.CodeType) -> Iterator[str]:
    """The names `code` (and the code nested in it) looks up outside its locals: globals, and attribute names."""
    yield from code.co_names
    for nested in code.co_consts:
        if isinstance(nested, types.CodeType):
            yield from global_names(nested)


def held_functions(value: Any, seen: set[int]) -> Iterator[types.FunctionType]:
    """The Python functions a captured value would run when called: itself, a partial's, a Mod's."""
    if isinstance(value, types.FunctionType):
        yield value
    elif id(value) in seen:
        return
    elif isinstance(value, functools.partial):  # and_masks/or_masks hold their parts as a partial's tuple
        seen.add(id(value))
        for inner in (value.func, *value.args, *value.keywords.values()):
            for item in inner if isinstance(inner, tuple) else (inner,):
                yield from held_functions(item, seen)
    elif hasattr(value, "raw_ir"):  # a flexcomp Mod (duck-typed: the front end does not import mods.py)
        seen.add(id(value))
        yield from held_functions(getattr(value, "fn", None), seen)
