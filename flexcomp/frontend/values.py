"""Compile-time values: what a lowered expression can be besides an IR `Node`.

They exist only while compiling (a module, a function, an unindexed captured tensor...) and must be
consumed by a call, an attribute or a subscript before they reach the IR.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..ir import BufferSpec, DType, Node

ALLOWED = (
    "Allowed in a mod: parameters, locals, int/float/bool literals, + - * / // % ** and comparisons, & | ^ ~ << >>, "
    "and/or/not, if/elif/else, `x if c else y`, tuples, `for` over range(constant), torch/math functions, "
    "captured ints, floats, tensors and tuples, "
    "and calls to other mods and plain helper functions (see docs/language.md)."
)


@dataclass(frozen=True)
class Module:
    name: str  # "torch" or "math"


@dataclass(frozen=True)
class Builtin:
    key: str  # a key of calls.BUILTINS


@dataclass(frozen=True)
class PyFunction:
    fn: Callable


class ModBase:
    """What the front end knows of a compiled mod: mods.Mod subclasses it, so that a captured mod is recognized
    without the front end importing mods (mods imports the front end; the layering test checks the rule)."""


@dataclass(frozen=True)
class ModRef:
    mod: Any


@dataclass(frozen=True)
class Captured:
    """A captured tensor before (full) indexing; `bias[b][h]` keeps the leading indices until the last one."""

    spec: BufferSpec
    indices: tuple[Node, ...] = ()

    @property
    def shape(self) -> tuple[int, ...]:
        """The dims not indexed yet."""
        return self.spec.shape[len(self.indices):]


@dataclass(frozen=True)
class TorchDType:
    dtype: DType
    name: str


@dataclass(frozen=True)
class Text:
    value: str


@dataclass(frozen=True)
class Method:
    receiver: Node
    name: str


@dataclass(frozen=True)
class RangeValue:
    """`range(...)` with constant bounds: what an unrolled `for` loop iterates over."""

    items: tuple[Node, ...]


@dataclass(frozen=True)
class Row:
    """A small 1-D vector known element by element (`a[q_idx]` of a [L, 3] table): arithmetic is elementwise
    and `.sum()` adds the elements, so `((a[q_idx] - a[kv_idx]) ** 2).sum()` unrolls to scalar IR."""

    items: tuple[Node, ...]


NONE = Text("<None>")  # clamp's missing bound, or a captured None (tested with `is None`)

Value = Any  # Node | Module | Builtin | PyFunction | ModRef | Captured | TorchDType | Text | Method | tuple

DESCRIPTIONS: dict[type, Callable[[Any], str]] = {
    Module: lambda v: f"module `{v.name}`",
    Builtin: lambda v: f"function `{v.key}`",
    PyFunction: lambda v: f"function `{v.fn.__name__}`",
    ModRef: lambda v: f"mod `{v.mod.name}`",
    Captured: lambda v: f"captured tensor `{v.spec.name}`",
    TorchDType: lambda v: f"dtype `{v.name}`",
    Method: lambda v: f"method `.{v.name}`",
    tuple: lambda v: "a tuple",
    RangeValue: lambda v: "a range",
    Row: lambda v: f"a row of {len(v.items)} values",
    Node: lambda v: f"a {v.dtype.value} value",
}


def describe(value: Value) -> str:
    """How an error message names `value`."""
    describe_as = DESCRIPTIONS.get(type(value))
    return describe_as(value) if describe_as else type(value).__name__
