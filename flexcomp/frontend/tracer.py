"""Tracing a mod whose source cannot be read (a plain REPL, `python -c`, `exec`): the same IR, built by running it.

The function is called once with stand-ins (`Traced`) for its parameters.  Every Python operator, torch function
and tensor method applied to a stand-in builds its node through the parser's own builders and call table
(builders.py, calls.py), and a captured tensor indexed by stand-ins (`BIAS[h, q_idx]`, seen through
`__torch_function__`) becomes a LOAD in the same buffer table, so the IR, the sparsity analysis and the kernels
are those of the parsed source.  Captured Python scalars are read while tracing, as the parser reads them.

What Python itself decides while the function runs (`if`, `and`/`or`/`not`, `bool()`, `int()`, a loop bound) cannot
be recorded: each is refused with a FlexcompError that says what to write instead, at the user's line.
"""

from __future__ import annotations

import functools
import sys
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import (
    FlexcompError,
    FlexcompTypeError,
    SourceLoc,
    UndefinedNameError,
    UnsupportedConstructError,
)
from ..guards import Guard, GuardTable
from ..ir import COMPARISON_OPS, BufferSpec, DType, Node, Op, arg, load, toposort
from .builders import OP_SYMBOL, binary, cast, clamp, inline_mod, number, unary
from .calls import METHODS, apply_rule, bind_clamp, ir_dtype, known_callable
from .frames import code_loc, comparison_written, traceback_loc, user_frame_loc
from .free_names import FreeRead, free_reads
from .functions import FUNCTIONS, call_function, split_inputs
from .names import BufferTable, guard_unless_live, tensor_spec
from .signature import check_param_count, partial_bindings, refuse_signature

TRACED_ALLOWED = (
    "A mod whose source cannot be read is traced: it may use + - * / // % ** and comparisons, & | ^ ~, abs(), "
    "torch functions and tensor methods (torch.where for a choice), captured ints, floats and tensors indexed by "
    "its arguments (see docs/language.md, 'Mods without a source file')."
)

# Python dunder or torch.Tensor method name -> binary op: `__add__`, `Tensor.add` -> ADD; `__truediv__`, `.div` -> DIV
BINARY_NAMES = {op.value: op for op in OP_SYMBOL} | {"truediv": Op.DIV}
MIRRORED = {Op.LT: Op.GT, Op.GT: Op.LT, Op.LE: Op.GE, Op.GE: Op.LE}  # 3 < x runs x.__gt__(3): x > 3 -> 3 < x
UNARY_DUNDERS = {"neg": Op.NEG, "invert": Op.NOT, "abs": Op.ABS, "floor": Op.FLOOR}  # -x, ~x, abs(x), math.floor(x)

# What Python asks of a value to decide something itself -> (what the user wrote, what to write instead)
TRUTH = (
    ("a Python `if`, `and`/`or`/`not`, `x if c else y`, a chained comparison, `min()`/`max()` or `bool()` on a traced "
    "value"),
    ("write the choice as data: torch.where(cond, a, b) for if/else, & | ~ for and/or/not, (a < b) & (b < c) for a "
    "chain, torch.minimum/torch.maximum for min/max"),
)
INTEGER = (
    "`int()`, `range()`, a loop bound or a Python list index from a traced value",
    ("cast with x.int() or x.long(); index captured tensors directly (TABLE[q_idx]); loop bounds must not depend on "
    "the mod's arguments"),
)
REFUSED = {
    "bool": TRUTH, "int": INTEGER, "index": INTEGER,
    "float": ("`float()` or a `math.` function of a traced value",
              "use x.float() and the torch functions (torch.exp, torch.sqrt, ...)"),
    "iter": ("iterating over a traced value", "a traced value is one number per (b, h, q_idx, kv_idx)"),
    "len": ("`len()` of a traced value", "a traced value is one number per (b, h, q_idx, kv_idx)"),
    "round": ("`round()` of a traced value", "use torch.floor(x + 0.5)"),
    "trunc": ("`math.trunc()` of a traced value", "use x.int() (truncates toward zero)"),
    "ceil": ("`math.ceil()` of a traced value", "use -torch.floor(-x)"),
}  # fmt: skip


@dataclass(frozen=True)
class TracedMod:
    root: Node  # what the function returned, not yet checked against its kind
    buffers: tuple[BufferSpec, ...]
    resolvers: dict[str, Callable[[], Any]]
    loc: SourceLoc
    guards: tuple[Guard, ...]  # every free name it may read that is not read live (scalars are baked into the IR)


def trace_mod(fn: types.FunctionType, partial: functools.partial | None, kind: str,
              canonical: tuple[str, ...]) -> TracedMod:
    """Run `fn` (or `partial`, which wraps it) on stand-ins for the `canonical` arguments; its result's IR."""
    code = fn.__code__
    def_loc = code_loc(code, code.co_firstlineno)
    refuse_signature(fn, def_loc, TRACED_ALLOWED)
    params = list(code.co_varnames[:code.co_argcount])
    bound = partial_bindings(params, fn.__name__, partial, def_loc) if partial is not None else {}
    check_param_count(kind, canonical, fn.__name__, len(params) - len(bound), len(bound), def_loc)
    reads = [FreeRead(name, "partial", value, functools.partial(bound.get, name)) for name, value in bound.items()]
    reads += free_reads(fn, set())
    trace = Trace(fn.__name__, def_loc, reads, BufferTable(), GuardTable())
    result = trace.run(partial or fn, [Traced(arg(name, def_loc), trace) for name in canonical])
    root = trace.node(result, def_loc, "its return value")
    table = trace.buffers
    return TracedMod(root, tuple(table.specs.values()), dict(table.resolvers), def_loc, trace.guards.freeze())


def trace_call(fn: types.FunctionType, args: list[Node], kwargs: dict[str, Node], buffers: BufferTable,
               guards: GuardTable) -> Node:
    """A helper without readable source called by a parsed mod: traced on its arguments' nodes, inlined."""
    code = fn.__code__
    trace = Trace(fn.__name__, code_loc(code, code.co_firstlineno), free_reads(fn, set()), buffers, guards)
    keywords = {name: trace.traced(node) for name, node in kwargs.items()}
    result = trace.run(functools.partial(fn, **keywords), [trace.traced(node) for node in args])
    return trace.node(result, trace.def_loc, "its return value")


def inline_traced_mod(mod: Any, args: tuple) -> Traced:
    """A Mod called on stand-ins (`Mod.__call__`): its parsed IR inlined, as the parser inlines a call to a mod."""
    trace = next(a.trace for a in args if isinstance(a, Traced))
    loc = trace.loc()
    return trace.traced(inline_mod(mod, [trace.node(a, loc) for a in args], trace.buffers, trace.guards, loc))


# ---------------------------------------------------------------- the trace


class Trace:
    """One function being traced: the stand-ins' shared state (captured tensors, buffer table, locations)."""

    def __init__(self, fn_name: str, def_loc: SourceLoc, reads: list[FreeRead], buffers: BufferTable,
                 guards: GuardTable):
        self.fn_name, self.def_loc, self.buffers, self.guards = fn_name, def_loc, buffers, guards
        for read in reads:  # a scalar read while tracing is baked in: rebinding it re-traces, as for a parsed mod
            if read.scope is not None:
                guard_unless_live(guards, read.name, read.scope, read.value)
        # captured tensors by identity; the first name wins (the function's own before its helpers')
        self.tensors = {id(r.value): r for r in reversed(reads) if isinstance(r.value, torch.Tensor)}

    def run(self, fn: Callable, standins: list[Traced]) -> Any:
        try:
            return fn(*standins)
        except FlexcompError:
            raise
        except RecursionError:
            raise UnsupportedConstructError(f"{self.fn_name!r} is nested too deeply to trace", self.def_loc) from None
        except NameError as e:
            raise UndefinedNameError(f"{e} (tracing {self.fn_name!r})", traceback_loc(e.__traceback__, self.def_loc),
                                     "a mod may use its parameters, its locals, and names bound in its closure or "
                                     "module") from None
        except Exception as e:  # noqa: BLE001 (the user's code failed on a stand-in: say where, not in the tracer)
            raise UnsupportedConstructError(f"tracing {self.fn_name!r} failed: {type(e).__name__}: {e}",
                                            traceback_loc(e.__traceback__, self.def_loc), TRACED_ALLOWED) from None

    def loc(self) -> SourceLoc:
        """The user's line being traced now."""
        return user_frame_loc(sys._getframe(1), self.def_loc)

    def traced(self, node: Node) -> Traced:
        return Traced(node, self)

    def node(self, value: Any, loc: SourceLoc, what: str = "a value") -> Node:
        """A value met while tracing, as an IR node: a stand-in, a Python scalar (a constant) or a 0-d tensor."""
        if isinstance(value, Traced):
            return value.node
        scalar = number(value, loc)
        if scalar is not None:
            return scalar
        if isinstance(value, torch.Tensor):
            return self.load(value, (), loc)
        if isinstance(value, PartlyIndexed):
            return self.load(value.tensor, value.indices, loc)  # raises: too few indices
        raise FlexcompTypeError(f"{type(value).__name__} {value!r} cannot be {what} in mod {self.fn_name!r}", loc,
                                TRACED_ALLOWED)

    def refuse(self, what: str, hint: str) -> None:
        raise UnsupportedConstructError(f"{what} is not supported in {self.fn_name!r}: its source cannot be read, "
                                        "so it is traced, and tracing runs it once on stand-ins for its arguments",
                                        self.loc(), hint)

    # ------------------------------------------------ operations

    def binary(self, op: Op, a: Any, b: Any) -> Traced:
        loc = self.loc()
        return self.traced(binary(op, self.node(a, loc), self.node(b, loc), loc))

    def compare(self, op: Op, x: Traced, other: Any) -> Traced:
        """`x < other`, or `other > x` when that is what the user wrote (Python mirrors it onto x's method)."""
        mirrored = MIRRORED.get(op)
        if mirrored is not None and comparison_written(sys._getframe(1)) == OP_SYMBOL[mirrored]:
            return self.binary(mirrored, other, x)
        return self.binary(op, x, other)

    def unary(self, op: Op, x: Traced) -> Traced:
        loc = self.loc()
        return self.traced(unary(op, x.node, loc))

    def builtin(self, key: str, spelled: str, args: tuple, kwargs: dict) -> Traced:
        """A call-table function (calls.BUILTINS) applied to traced arguments."""
        loc = self.loc()
        if key == "clamp":
            return self.clamp(args, kwargs, loc)
        if key in FUNCTIONS:  # torch's keyword parameters and defaults: F.gelu(x, approximate="tanh")
            return self.function(key, args, kwargs, loc)
        if kwargs:
            raise UnsupportedConstructError(f"keyword arguments to `{spelled}` are not supported", loc, TRACED_ALLOWED)
        return self.traced(apply_rule(key, spelled, [self.node(a, loc) for a in args], loc))

    def function(self, key: str, args: tuple, kwargs: dict, loc: SourceLoc) -> Traced:
        inputs, rest, kwargs = split_inputs(key, list(args), kwargs, loc)
        options = {k: v.node if isinstance(v, Traced) else v for k, v in kwargs.items()}
        rest = [a.node if isinstance(a, Traced) else a for a in rest]
        return self.traced(call_function(key, [self.node(x, loc) for x in inputs], rest, options, loc))

    def clamp(self, args: tuple, kwargs: dict, loc: SourceLoc) -> Traced:
        bound = {k: self.node(v, loc) for k, v in bind_clamp(list(args), kwargs, loc).items() if v is not None}
        return self.traced(clamp(bound["input"], bound.get("min"), bound.get("max"), loc))

    def method(self, receiver: Any, name: str, *args: Any, **kwargs: Any) -> Traced:
        """`x.name(...)` through the call table's METHODS: x.exp() -> exp(x), x.to(torch.float32) -> CAST."""
        key = METHODS[name]
        if key != "to":
            return self.builtin(key, f".{name}", (receiver, *args), kwargs)
        loc = self.loc()
        targets = [*args, *(v for k, v in kwargs.items() if k == "dtype")]
        if len(targets) != 1 or not isinstance(targets[0], torch.dtype):
            raise UnsupportedConstructError(f"`.{name}(...)` needs exactly one torch dtype argument", loc,
                                            "e.g. `x.to(torch.float32)`")
        return self.traced(cast(self.node(receiver, loc), ir_dtype(targets[0]), loc))

    def torch_call(self, func: Callable, args: tuple, kwargs: dict) -> Any:
        """A torch function or tensor method that met a stand-in (`Traced.__torch_function__`)."""
        name = getattr(func, "__name__", "")
        if name == "__getitem__":
            return self.index(*args)
        key = known_callable(func)
        if key is not None:
            return self.builtin(key, f"torch.{name}", args, kwargs)
        is_method = getattr(torch.Tensor, name, None) is func
        if is_method:  # a method of a captured tensor: SCALE * x, SCALE.maximum(x)
            if name.strip("_") in BINARY_NAMES and len(args) == 2 and not kwargs:
                return self.binary(BINARY_NAMES[name.strip("_")], *args)
            if name in METHODS:
                return self.method(args[0], name, *args[1:], **kwargs)
        spelled = f"torch.Tensor.{name}" if is_method else f"torch.{name}"
        raise UnsupportedConstructError(f"`{spelled}` is not supported in a mod (tracing {self.fn_name!r})",
                                        self.loc(), TRACED_ALLOWED)

    # ------------------------------------------------ captured tensors

    def index(self, tensor: torch.Tensor, index: Any, leading: tuple[Node, ...] = ()) -> Traced | PartlyIndexed:
        """`TABLE[h, q_idx]` (or `TABLE[h][q_idx]`) with traced indices -> LOAD."""
        loc = self.loc()
        known = set(self.buffers.specs)
        spec = self.buffer(tensor, loc)
        items = index if isinstance(index, tuple) else (index,)
        indices = leading + tuple(self.index_node(spec, item, loc) for item in items)
        if spec.name not in known:
            self.register_before_its_indices(spec.name, indices)
        if len(indices) < len(spec.shape):
            return PartlyIndexed(self, tensor, indices)
        return self.traced(self.load(tensor, indices, loc, spec))

    def register_before_its_indices(self, name: str, indices: tuple[Node, ...]) -> None:
        """Buffers in the parser's order: it meets `T` of `T[U[i]]` before `U`, Python calls U's __getitem__ first."""
        inner = {n.arg for i in indices for n in toposort(i) if n.op == Op.LOAD}
        order = list(self.buffers.specs)
        first_inner = next((k for k, other in enumerate(order) if other in inner), None)
        if first_inner is None:
            return
        order.insert(first_inner, order.pop(order.index(name)))
        self.buffers.specs = {k: self.buffers.specs[k] for k in order}
        self.buffers.resolvers = {k: self.buffers.resolvers[k] for k in order}

    def index_node(self, spec: BufferSpec, item: Any, loc: SourceLoc) -> Node:
        if item is None or item is Ellipsis or isinstance(item, (slice, torch.Tensor, list)):
            raise UnsupportedConstructError(f"indexing captured tensor {spec.name!r} with {type(item).__name__} "
                                            "is not supported", loc, "index with one int per dim: TABLE[h, q_idx]")
        node = self.node(item, loc, "an index")
        if node.dtype != DType.I32:
            raise FlexcompTypeError(f"index into {spec.name!r} must be an int, got {node.dtype.value}", loc,
                                    "use x.int() or // to make an integer index")
        return node

    def load(self, tensor: torch.Tensor, indices: tuple[Node, ...], loc: SourceLoc,
             spec: BufferSpec | None = None) -> Node:
        spec = spec or self.buffer(tensor, loc)
        if len(indices) != len(spec.shape):
            hint = f"index it with {len(spec.shape)} indices, e.g. {spec.name}[h, q_idx]" if spec.shape else None
            raise FlexcompTypeError(f"captured tensor {spec.name!r} has {len(spec.shape)} dims (shape {spec.shape}) "
                                    f"but is indexed with {len(indices)} indices", loc, hint)
        return load(spec.name, spec.ir_dtype, indices, loc)

    def buffer(self, tensor: torch.Tensor, loc: SourceLoc) -> BufferSpec:
        """The buffer of a captured tensor, found by identity among the names the function reads."""
        read = self.tensors.get(id(tensor))
        if read is None or read.value is not tensor:
            raise UnsupportedConstructError(f"{self.fn_name!r} uses a tensor (shape {tuple(tensor.shape)}) that is "
                                            "not one of its globals, closure variables or functools.partial arguments: a tensor made "
                                            "inside a traced mod, or computed from captured tensors alone, is computed "
                                            "once while tracing", loc, "a traced mod reads captured tensors by name: "
                                            "bind the tensor to a global or a closure variable, and compute with it "
                                            "inside the mod only together with the mod's arguments")
        spec = tensor_spec(read.name, tensor, loc)
        return BufferSpec(self.buffers.add(spec, read.read), spec.dtype, spec.shape)


# ---------------------------------------------------------------- the stand-in


class Traced:
    """A symbolic value of a traced mod: a mod argument, or anything computed from one.  Holds its IR node."""

    __slots__ = ("node", "trace")

    def __init__(self, node: Node, trace: Trace):
        self.node, self.trace = node, trace

    __hash__ = object.__hash__  # `==` builds a node, so hash by identity (as torch.Tensor does)

    def __repr__(self) -> str:
        return f"<traced {self.node.dtype.value} value in {self.trace.fn_name!r}>"

    @classmethod
    def __torch_function__(cls, func: Callable, types: tuple, args: tuple = (), kwargs: dict | None = None) -> Any:
        trace = next(a.trace for a in flatten(args, kwargs or {}) if isinstance(a, Traced))
        return trace.torch_call(func, args, kwargs or {})

    def __pos__(self) -> Traced:
        return self

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        if name in METHODS:
            return functools.partial(self.trace.method, self, name)
        raise UnsupportedConstructError(f"attribute `.{name}` of a traced {self.node.dtype.value} value is not "
                                        f"supported (tracing {self.trace.fn_name!r})", self.trace.loc(),
                                        TRACED_ALLOWED)


class PartlyIndexed:
    """A captured tensor indexed with fewer indices than it has dims (`TABLE[h]` of `TABLE[h][q_idx]`)."""

    __slots__ = ("indices", "tensor", "trace")

    def __init__(self, trace: Trace, tensor: torch.Tensor, indices: tuple[Node, ...]):
        self.trace, self.tensor, self.indices = trace, tensor, indices

    def __getitem__(self, index: Any) -> Traced | PartlyIndexed:
        return self.trace.index(self.tensor, index, self.indices)


def flatten(args: tuple, kwargs: dict) -> Iterator[Any]:
    for a in (*args, *kwargs.values()):
        yield from (a if isinstance(a, (tuple, list)) else (a,))


def binary_dunder(op: Op, reflected: bool) -> Callable[[Traced, Any], Traced]:
    if reflected:  # 2 - x -> x.__rsub__(2) -> SUB(2, x)
        return lambda self, other: self.trace.binary(op, other, self)
    if op in COMPARISON_OPS:
        return lambda self, other: self.trace.compare(op, self, other)
    return lambda self, other: self.trace.binary(op, self, other)


def unary_dunder(op: Op) -> Callable[[Traced], Traced]:
    return lambda self: self.trace.unary(op, self)


def refused_dunder(what: str, hint: str) -> Callable[..., Any]:
    return lambda self, *args: self.trace.refuse(what, hint)


# The operator protocol, generated from the tables above: __add__/__radd__ ... __lt__, __neg__ ..., __bool__ ...
for _name, _op in BINARY_NAMES.items():
    setattr(Traced, f"__{_name}__", binary_dunder(_op, reflected=False))
    if _op not in COMPARISON_OPS:  # Python reflects a comparison by flipping it: 2 < x -> x.__gt__(2)
        setattr(Traced, f"__r{_name}__", binary_dunder(_op, reflected=True))
for _name, _op in UNARY_DUNDERS.items():
    setattr(Traced, f"__{_name}__", unary_dunder(_op))
for _name, (_what, _hint) in REFUSED.items():
    setattr(Traced, f"__{_name}__", refused_dunder(_what, _hint))
