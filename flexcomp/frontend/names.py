"""Name resolution: closure cells, globals and builtins, and the captured tensors' buffer table."""

from __future__ import annotations

import builtins
import functools
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import SignatureError, SourceLoc, UndefinedNameError, UnsupportedConstructError
from ..guards import GuardTable, Scope
from ..ir import BufferSpec, Node, Op, map_nodes
from .builders import number
from .calls import MODULES, PY_BUILTINS, ir_dtype, known_callable
from .values import NONE, Builtin, Captured, ModBase, ModRef, Module, PyFunction, TorchDType, Value


@dataclass
class BufferTable:
    """The captured tensors of one mod being built, with renaming on name clashes."""

    specs: dict[str, BufferSpec] = field(default_factory=dict)
    resolvers: dict[str, Callable[[], Any]] = field(default_factory=dict)

    def add(self, spec: BufferSpec, resolver: Callable[[], Any]) -> str:
        """The buffer name to use for `spec`: shared when it is the same tensor under the same name."""
        if spec.name in self.specs and self.specs[spec.name] == spec and self.resolvers[spec.name]() is resolver():
            return spec.name
        name, i = spec.name, 1
        while name in self.specs:
            name, i = f"{spec.name}_{i}", i + 1
        self.specs[name] = BufferSpec(name, spec.dtype, spec.shape)
        self.resolvers[name] = resolver
        return name

    def merge(self, specs: tuple[BufferSpec, ...], resolvers: Any, root: Node) -> Node:
        """Add another mod's buffers; returns its IR with LOADs renamed where names clashed."""
        renames = {s.name: self.add(s, resolvers[s.name]) for s in specs}
        if all(k == v for k, v in renames.items()):
            return root
        return map_nodes(root, lambda n: n.replace(arg=renames[n.arg]) if n.op == Op.LOAD else None)


def tensor_spec(name: str, tensor: torch.Tensor, loc: SourceLoc | None) -> BufferSpec:
    dtype = str(tensor.dtype).removeprefix("torch.")
    if tensor.is_complex() or tensor.dim() > 4:
        raise SignatureError(f"captured tensor {name!r} ({dtype}, shape {tuple(tensor.shape)}) is not supported: "
                             "tensors must be real or bool with at most 4 dims", loc)
    return BufferSpec(name, dtype, tuple(tensor.shape))


def resolve_free(fn: Callable, name: str, buffers: BufferTable, loc: SourceLoc, guards: GuardTable) -> Value:
    """A name not bound locally: closure cell, then globals, then the allowed builtins.

    A non-tensor value is compiled in as it is now, so `guards` records where it was read (see flexcomp/guards.py);
    tensors are read live through `buffers`."""
    code = fn.__code__
    if name in code.co_freevars:
        cell = fn.__closure__[code.co_freevars.index(name)]
        try:
            value = cell.cell_contents
        except ValueError:
            raise UndefinedNameError(f"free variable {name!r} is not bound yet", loc) from None
        guard_unless_live(guards, name, cell, value)
        return capture(name, value, lambda: cell.cell_contents, buffers, loc)
    if name in fn.__globals__:
        value = fn.__globals__[name]
        guard_unless_live(guards, name, fn.__globals__, value)
        return capture(name, value, lambda: fn.__globals__[name], buffers, loc)
    if name in PY_BUILTINS:
        return Builtin(PY_BUILTINS[name])
    if hasattr(builtins, name):
        raise UnsupportedConstructError(f"the builtin `{name}` is not supported in a mod", loc,
                                        f"supported builtins: {', '.join(PY_BUILTINS)}")
    raise UndefinedNameError(f"name {name!r} is not defined", loc,
                             "a mod may use its parameters, its locals, and names bound in its closure or module")


def guard_unless_live(guards: GuardTable, name: str, scope: Scope, value: Any) -> None:
    """Guard `name` unless its value is read at every call anyway (a tensor) or is a module (torch, math: never
    rebound in practice, and a guard would cost every call a read)."""
    if not isinstance(value, (torch.Tensor, types.ModuleType)):
        guards.add(name, scope, value)


def capture(name: str, value: Any, read: Callable[[], Any], buffers: BufferTable, loc: SourceLoc | None) -> Value:
    """The compile-time value of a captured Python object.

    `read` re-reads a tensor's binding at call time: `Mod.specialized` compares the live tensor's dtype and
    shape with the compiled ones and re-lowers the function when they differ.
    """
    if value is None:
        return NONE  # only `x is None` / `x is not None` can use it
    scalar = number(value, loc, f"captured int {name!r} =")
    if scalar is not None:
        return scalar
    if isinstance(value, torch.Tensor):
        spec = tensor_spec(name, value, loc)
        return Captured(BufferSpec(buffers.add(spec, read), spec.dtype, spec.shape))
    if isinstance(value, (tuple, list)):  # a compile-time bundle; a tensor in it re-reads its slot
        return tuple(capture(f"{name}_{i}", v, functools.partial(lambda i: read()[i], i), buffers, loc)
                     for i, v in enumerate(value))
    if isinstance(value, torch.dtype):
        return TorchDType(ir_dtype(value), str(value))
    if isinstance(value, types.ModuleType) and value in MODULES.values():
        return Module(value.__name__)
    key = known_callable(value)
    if key is not None:
        return Builtin(key)
    if isinstance(value, ModBase):
        return ModRef(value)
    if isinstance(value, types.FunctionType):
        return PyFunction(value)
    refuse_autograd_function(name, value, loc)
    raise SignatureError(f"{name!r} is a {type(value).__module__}.{type(value).__qualname__}: a mod can capture "
                         "only ints, floats, bools, None, torch tensors, tuples/lists of those, torch/math, "
                         "other mods and plain functions", loc)


def refuse_autograd_function(name: str, value: Any, loc: SourceLoc | None) -> None:
    """A torch.autograd.Function (or its `.apply`) in a mod: say why it cannot be used, and what to write."""
    owner = getattr(value, "__self__", value)  # `Cube.apply` is bound to the class
    if isinstance(owner, type) and issubclass(owner, torch.autograd.Function):
        raise UnsupportedConstructError(
            f"{name!r} is the torch.autograd.Function {owner.__name__!r}: a mod cannot call "
            f"{owner.__name__}.apply, because flexcomp compiles the mod's Python source and derives its gradient "
            "from the ops it uses", loc,
            f"write {owner.__name__}.forward's computation inline in the mod (torch ops only); its backward is "
            "derived automatically",
        )
