"""Names for objects that torch.compile's tracer must pass around as constants (flexcomp/custom_op.py).

Dynamo hands a function it runs while tracing (`torch._dynamo.assume_constant_result`) only constants: strings,
numbers, tuples, functions; a Mod is none of these in every torch version.  Each of those objects
gets a name when it is made, and the tracer passes the name."""

from __future__ import annotations

import itertools
import weakref
from typing import Any

_OBJECTS: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()
_COUNT = itertools.count()


def new_ref(obj: Any, kind: str) -> str:
    """A new name for `obj` (held weakly: the name goes when the object does)."""
    name = f"{kind}-{next(_COUNT)}"
    _OBJECTS[name] = obj
    return name


def resolve(value: Any) -> Any:
    """The object a name stands for; anything else (a function, None) as it is."""
    return _OBJECTS[value] if isinstance(value, str) else value
