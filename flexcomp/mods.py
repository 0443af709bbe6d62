"""Compiled mods: what `@score_mod` and `@mask_mod` turn a function into."""

from __future__ import annotations

import functools
import operator
import weakref
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import ModKindError, SignatureError, SourceLoc
from .frontend.tracer import Traced, inline_traced_mod
from .frontend.values import ModBase
from .guards import Guard, GuardTable, all_hold, compiled_key, describe_changes, live_key
from .ir import BufferSpec, DType, Node, Op, structural_key
from .ir import const as ir_const
from .paging import from_torch_paged
from .refs import new_ref


@dataclass(eq=False)
class Mod(ModBase):
    """A score_mod or mask_mod, parsed and lowered to IR.

    `ir` is the optimized IR and `raw_ir` the IR as parsed.  `buffers` describes
    the captured tensors (name, dtype, shape); `resolvers` fetch their current
    values, so a tensor updated in place (or a global rebound to a tensor of the
    same shape and dtype) is seen at every call.  The IR and kernels specialize on
    the buffers' dtypes and shapes, and on the captured ints, floats, bools and
    other non-tensor values, baked in as constants; `guards` records where each
    was read (flexcomp/guards.py).  When a global or closure cell is rebound to a
    tensor of another shape or dtype, or to another value, `specialized()`
    re-lowers the function for the live values (as torch's flex_attention
    recompiles).  `fn` is the user's function; calling the Mod calls it, so a Mod
    can also be passed to torch's own flex_attention.
    """

    kind: str  # "score" or "mask"
    name: str
    ir: Node
    raw_ir: Node
    buffers: tuple[BufferSpec, ...] = ()
    resolvers: Mapping[str, Callable[[], Any]] = field(default_factory=dict)
    fn: Callable | None = None
    loc: SourceLoc | None = None
    relower: Callable[[], Mod] | None = field(default=None, repr=False)  # rebuilds the Mod from live values
    guards: tuple[Guard, ...] = field(default=(), repr=False)  # the captured non-tensor values compiled in
    variants: dict[Hashable, Mod] = field(default_factory=dict, repr=False)  # shared by all variants
    latest: Mod | None = field(default=None, repr=False)  # the variant the last call got, tried first
    ref: str = field(default="", repr=False)  # this Mod's name for torch.compile's tracer (flexcomp/refs.py)

    def __post_init__(self) -> None:
        self.ref = new_ref(self, f"{self.kind}-mod")

    @functools.cached_property
    def key(self) -> str:
        """Kernel cache key: the IR and the buffers' dtypes and shapes, not their values (computed once: a Mod's IR
        and buffer specs never change; a captured tensor of another shape makes a new Mod variant)."""
        return structural_key(self.kind, self.ir, self.buffers)

    def tensors(self) -> dict[str, Any]:
        """The captured tensors' current values, by buffer name; they must still fit `buffers`."""
        values = self._live_values()
        live = self._live_specs(values)
        if live != self.buffers:
            compiled, now = _spec_changes(self.buffers, live)
            raise SignatureError(f"captured tensor changed after the mod was compiled: {compiled=} != {now=}; "
                                 f"{self.name}.specialized() gives the mod for the live tensors", self.loc)
        return values

    def specialized(self) -> Mod:
        """This Mod if the values it captured still fit what it was compiled for (tensors: dtype and shape; other
        values: type and value), else the function re-lowered for the live ones (cached per buffer-spec and
        guard-value tuple, so alternating values compile once each).  On every call's path: a few reads."""
        if self._fits_live_values():
            return self
        if self.latest is not None and self.latest._fits_live_values():  # a rebinding kept: no key built
            return self.latest
        key = (self._live_specs(self._live_values()), live_key(self.guards))
        variant = self.variants.get(key)
        if variant is None or not variant._fits_live_values():  # a hit is re-checked: its own guards may differ
            variant = self._relowered()
            self._remember(key, variant)
        self.latest = variant
        return variant

    def _fits_live_values(self) -> bool:
        if not all_hold(self.guards):
            return False
        return not self.buffers or self._live_specs(self._live_values()) == self.buffers

    def _relowered(self) -> Mod:
        if self.relower is not None:
            return self.relower()
        self.tensors()  # raises if a tensor changed: nothing to re-lower from
        raise SignatureError(f"a value captured by {self.kind}_mod {self.name!r} changed after it was compiled "
                             f"({describe_changes(self.guards)}) and it cannot be re-lowered", self.loc)

    def _own_key(self) -> tuple[Hashable, ...]:
        return self.buffers, compiled_key(self.guards)

    def _remember(self, key: Hashable, variant: Mod) -> None:
        self.variants.setdefault(self._own_key(), self)
        while len(self.variants) >= MAX_VARIANTS:
            del self.variants[next(iter(self.variants))]  # the oldest
        variant.variants = self.variants
        self.variants[variant._own_key()] = variant
        self.variants[key] = variant

    def _live_values(self) -> dict[str, Any]:
        return {spec.name: self.resolvers[spec.name]() for spec in self.buffers}

    def _live_specs(self, values: dict[str, Any]) -> tuple[BufferSpec, ...]:
        if all(_still_fits(spec, values[spec.name]) for spec in self.buffers):
            return self.buffers  # the common case, on every call's path: no specs built
        from .frontend.names import tensor_spec

        for spec in self.buffers:
            value = values[spec.name]
            if not isinstance(value, torch.Tensor):
                raise SignatureError(f"{spec.name!r}, captured by {self.kind}_mod {self.name!r} as a tensor, is now "
                                     f"a {type(value).__name__}: a captured tensor can be rebound only to a tensor",
                                     self.loc)
        return tuple(tensor_spec(spec.name, values[spec.name], self.loc) for spec in self.buffers)

    def __call__(self, *args: Any) -> Any:
        if any(isinstance(a, Traced) for a in args):  # called by a mod being traced: inline this mod's IR
            return inline_traced_mod(self, args)
        if self.fn is not None:
            return self.fn(*args)
        from .reference import evaluate_mod

        return evaluate_mod(self, *args)

    def __repr__(self) -> str:
        return f"<flexcomp {self.kind}_mod {self.name} key={self.key}>"


MAX_VARIANTS = 16  # re-lowered Mods kept per function (torch's recompile limit is 8)


def _still_fits(spec: BufferSpec, value: Any) -> bool:
    """`value` is a tensor of the spec's dtype and shape (what frontend.names.tensor_spec would record)."""
    return isinstance(value, torch.Tensor) and value.dtype == _torch_dtype(spec.dtype) and value.shape == spec.shape


@functools.cache
def _torch_dtype(name: str) -> Any:
    return getattr(torch, name, None)


def _spec_changes(compiled: tuple[BufferSpec, ...], live: tuple[BufferSpec, ...]) -> tuple[list, list]:
    changed = [(a, b) for a, b in zip(compiled, live) if a != b]
    return ([(a.name, a.dtype, a.shape) for a, _ in changed], [(b.name, b.dtype, b.shape) for _, b in changed])


# ---------------------------------------------------------------- decorators and composition


def _compile(fn: Callable, kind: str) -> Mod:
    from .frontend import lower_function

    lowered = lower_function(fn, kind)
    name = mod_name(fn, kind)
    return Mod(kind, name, _optimized(lowered.raw_ir, name, getattr(fn, "__code__", None)), lowered.raw_ir,
               lowered.buffers, lowered.resolvers, fn, lowered.loc, relower=functools.partial(_compile, fn, kind),
               guards=lowered.guards)  # fmt: skip


_OPTIMIZED: dict = {}  # (raw IR, name, code) -> optimized IR
OPTIMIZED_CACHE_SIZE = 512


def _optimized(raw: Node, name: str, origin: Any) -> Node:
    """`optimize(raw)`, kept per raw IR: closures made anew at every step lower to the same IR.  The key holds the
    code (`origin`) too, because IR equality ignores source locations and errors must point at this function."""
    from .compiler import debugging, optimize

    if debugging():  # FLEXCOMP_DEBUG=1 shows every pass: run them
        return optimize(raw, name)
    key = (raw, name, origin)
    hit = _OPTIMIZED.get(key)
    if hit is None:
        hit = _OPTIMIZED[key] = optimize(raw, name)
        if len(_OPTIMIZED) > OPTIMIZED_CACHE_SIZE:
            del _OPTIMIZED[next(iter(_OPTIMIZED))]
    return hit


def mod_name(fn: Callable, kind: str) -> str:
    """The function's name; a functools.partial is named after the function it wraps."""
    if isinstance(fn, functools.partial):
        return f"partial({mod_name(fn.func, kind)})"
    return getattr(fn, "__name__", kind)


def score_mod(fn: Callable) -> Mod:
    """Decorator (or call on a lambda): compile `fn(score, b, h, q_idx, kv_idx)` now; errors point at the line."""
    return _compile_unless_tracing(fn, "score")


def mask_mod(fn: Callable) -> Mod:
    """Decorator (or call on a lambda): compile `fn(b, h, q_idx, kv_idx) -> bool` now; errors point at the line."""
    return _compile_unless_tracing(fn, "mask")


def _compile_unless_tracing(fn: Callable, kind: str) -> Mod | Callable:
    """Inside a function torch.compile traces, `fn` as it is: the entry points take plain functions and compile them
    at trace time (flexcomp/custom_op.py), while compiling here would read source files, which Dynamo refuses."""
    if torch.compiler.is_compiling():
        return fn
    return _compile(fn, kind)


_LAZY: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # plain function -> {kind: Mod}


def as_mod(fn_or_mod: Mod | Callable | None, kind: str) -> Mod | None:
    """A Mod of `kind` ("score" or "mask") from a Mod, a function, lambda or functools.partial (compiled once,
    cached per object), or None.  A Mod of the other kind or a non-callable is a `ModKindError`."""
    if fn_or_mod is None:
        return None
    if kind not in ("score", "mask"):
        raise ValueError(f"{kind=} must be 'score' or 'mask'")
    if isinstance(fn_or_mod, Mod):
        if fn_or_mod.kind != kind:
            raise ModKindError(f"expected a {kind}_mod, got {fn_or_mod.kind}_mod {fn_or_mod.name!r} "
                               f"({fn_or_mod.kind=} != {kind=})", fn_or_mod.loc)
        return fn_or_mod
    if not callable(fn_or_mod):
        raise ModKindError(f"{kind}_mod must be a function or a flexcomp Mod, got {type(fn_or_mod).__name__}")
    try:
        cached = _LAZY.setdefault(fn_or_mod, {})
    except TypeError:  # not weak-referenceable: compile every time
        cached = {}
    if kind not in cached:
        cached[kind] = _compile(from_torch_paged(fn_or_mod), kind)
    return cached[kind]


def specialized_mod(fn_or_mod: Mod | Callable | None, kind: str) -> Mod | None:
    """`as_mod`, specialized for the captured tensors as they are now (`Mod.specialized`): what entry points run."""
    mod = as_mod(fn_or_mod, kind)
    return None if mod is None else mod.specialized()


def _combine(op: Op, name: str, mods: tuple) -> Mod:
    from .frontend import BufferTable

    table, guards = BufferTable(), GuardTable()
    parts = [specialized_mod(m, "mask") for m in mods]
    raw = ir_const(op == Op.AND)
    for m in parts:
        guards.merge(m.guards)  # a part's captured value rebound re-lowers the composite (its relower re-specializes)
        body = table.merge(m.buffers, m.resolvers, m.raw_ir)
        raw = body if raw.op == Op.CONST else Node(op, DType.BOOL, (raw, body))
    full_name = f"{name}({', '.join(m.name for m in parts)})"
    return Mod("mask", full_name, _optimized(raw, full_name, tuple(m.loc for m in parts)), raw,
               tuple(table.specs.values()), dict(table.resolvers),
               _combined_fn(op, parts), relower=functools.partial(_combine, op, name, tuple(parts)),
               guards=guards.freeze())


def _combined_fn(op: Op, parts: list[Mod]) -> Callable:
    """As torch's and_masks/or_masks: calling the composite calls each part's own Python function.

    A partial rather than a closure, so that `inspect.getsource` does not show this helper as the user's code.
    """
    combine = operator.and_ if op == Op.AND else operator.or_
    return functools.partial(_call_parts, combine, op == Op.AND, tuple(parts))


def _call_parts(combine: Callable, identity: bool, parts: tuple[Mod, ...], *args: Any) -> Any:
    return functools.reduce(combine, (part(*args) for part in parts), identity)


def and_masks(*mods: Mod | Callable) -> Mod:
    """A mask_mod true where every one of `mods` is true (no mods: everywhere)."""
    return _combine(Op.AND, "and_masks", mods)


def or_masks(*mods: Mod | Callable) -> Mod:
    """A mask_mod true where any one of `mods` is true (no mods: nowhere)."""
    return _combine(Op.OR, "or_masks", mods)


def _attend_everywhere(b: Any, h: Any, q_idx: Any, kv_idx: Any) -> bool:
    return True


noop_mask = Mod("mask", "noop_mask", ir_const(True), ir_const(True), fn=_attend_everywhere)
