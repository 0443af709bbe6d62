"""Guards: the captured Python values a compiled mod baked in, re-read at every call.

A mod's ints, floats, bools (any non-tensor value a name held at decoration: None, tuples of constants, dtypes,
the helper functions and mods it calls) become constants of its IR.  Each name read from a closure cell or a
module's globals gets a `Guard` recording where it lives and the value compiled in; `Mod.specialized` checks the
guards at every call (one dict or cell read and an `is` test each, in the common case) and, when a name now
holds another value, re-lowers the function for the live values, as torch's compiled flex_attention recompiles
on a failed guard.  Values are compared by type and value (`same_value`), so 1, 1.0 and True differ, and
0.0 and -0.0 differ too.  Captured tensors are not guarded here: they are read live, and their dtypes and shapes
are checked through the Mod's buffers.
"""

from __future__ import annotations

import types
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any

UNBOUND = object()  # what a deleted global or an emptied cell reads as: never equal to a compiled value

Scope = dict | types.CellType  # a module's globals (read by name) or a closure cell


@dataclass(frozen=True, eq=False)
class Guard:
    """`name` as read from `scope` (a globals dict, or a closure cell) held `value` when the mod was compiled."""

    name: str
    scope: Scope = field(repr=False)
    value: Any

    def live(self) -> Any:
        """What the name holds now (`UNBOUND` if nothing)."""
        if isinstance(self.scope, dict):
            return self.scope.get(self.name, UNBOUND)
        try:
            return self.scope.cell_contents
        except ValueError:  # an emptied cell (`del` of a nonlocal)
            return UNBOUND

    def holds(self) -> bool:
        """The name still holds the compiled value (the same object, or an equal one of the same type)."""
        live = self.live()
        return live is self.value or same_value(live, self.value)

    def where(self) -> str:
        return "global" if isinstance(self.scope, dict) else "closure variable"


def same_value(a: Any, b: Any) -> bool:
    """`a` and `b` are the same constant: of one type and equal (element-wise for tuples); floats by bits."""
    if type(a) is not type(b):
        return False
    if isinstance(a, tuple):
        return len(a) == len(b) and all(x is y or same_value(x, y) for x, y in zip(a, b))
    if isinstance(a, float):
        return a.hex() == b.hex()  # -0.0 != 0.0 (1 / x differs) and a NaN equals a NaN (else it recompiles forever)
    try:
        return bool(a == b)
    except (TypeError, ValueError, RuntimeError):  # == raises or is ambiguous (a tensor in a tuple)
        return False


def value_key(value: Any) -> Hashable:
    """A hashable stand-in for `value` under `same_value` (a cache key: equal keys for same values)."""
    if isinstance(value, tuple):
        return (tuple, tuple(value_key(v) for v in value))
    if isinstance(value, float):
        return (float, value.hex())
    try:
        return (type(value), hash(value), value)
    except TypeError:  # unhashable: by identity (a cache miss at worst: a hit is always re-checked)
        return (type(value), id(value))


def all_hold(guards: tuple[Guard, ...]) -> bool:
    """Every guard holds: the check on every call's path, so a plain loop (no generator, no key built)."""
    for guard in guards:
        if not guard.holds():
            return False
    return True


def live_key(guards: tuple[Guard, ...]) -> tuple[Hashable, ...]:
    """The guards' names with what they hold now, as a cache key for the mod compiled from those values."""
    return tuple((guard.name, value_key(guard.live())) for guard in guards)


def compiled_key(guards: tuple[Guard, ...]) -> tuple[Hashable, ...]:
    """The guards' names with the values compiled in: what `live_key` gives while they all hold."""
    return tuple((guard.name, value_key(guard.value)) for guard in guards)


@dataclass
class GuardTable:
    """The guards of one mod being lowered: one per (scope, name), in the order the names were first read."""

    guards: dict[tuple[int, str], Guard] = field(default_factory=dict)

    def add(self, name: str, scope: Scope, value: Any) -> None:
        self.guards.setdefault((id(scope), name), Guard(name, scope, value))

    def merge(self, guards: Iterable[Guard]) -> None:
        """Another mod's guards (a mod it calls, or the parts of and_masks/or_masks)."""
        for guard in guards:
            self.guards.setdefault((id(guard.scope), guard.name), guard)

    def freeze(self) -> tuple[Guard, ...]:
        return tuple(self.guards.values())


def describe_changes(guards: tuple[Guard, ...]) -> str:
    """`OFF: 0 -> 16` for each guard that no longer holds (for FLEXCOMP_DEBUG and error messages)."""
    changed = [g for g in guards if not g.holds()]
    return ", ".join(f"{g.where()} {g.name}: {g.value!r} -> {_show(g.live())}" for g in changed)


def _show(value: Any) -> str:
    return "<unbound>" if value is UNBOUND else repr(value)
