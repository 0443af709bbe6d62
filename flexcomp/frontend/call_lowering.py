"""Lowering calls: builtins through the call table, tensor methods, other mods (substituted) and plain
helper functions (inlined: lowered with the caller's arguments bound to their parameters)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lark import Tree

from ..errors import FlexcompTypeError, SignatureError, SourceLoc, UnsupportedConstructError
from ..ir import DType, Node, Op, const
from .builders import add_all, binary, cast, clamp, constant, inline_mod, int_const
from .calls import CAST_KEYS, METHODS, STRUCTURAL_KEYS, apply_rule, bind_clamp
from .functions import FUNCTIONS, call_function, split_inputs
from .locations import SourceUnavailable
from .source import read_function
from .tracer import trace_call
from .values import (
    ALLOWED,
    NONE,
    Builtin,
    Captured,
    Method,
    ModRef,
    PyFunction,
    RangeValue,
    Text,
    TorchDType,
    Value,
    describe,
)

Argument = tuple[Value, Any]  # a lowered argument and its tree (for error positions)


class CallLowering:
    """The call half of expression lowering (mixed into ExpressionLowering, which provides expr/as_node)."""

    def expr_call(self, tree: Tree, env: dict[str, Value]) -> Node:
        callee_tree, arguments = tree.children
        callee = self.expr(callee_tree, env)
        args, kwargs = self.call_arguments(arguments, env)
        loc = self.src.loc(tree)
        if isinstance(callee, TorchDType):  # torch.float32(x) -> float(x)
            callee = Builtin(CAST_KEYS[callee.dtype])
        lower_call = {Builtin: lambda: self.call_builtin(callee.key, args, kwargs, loc),
                      Method: lambda: self.call_method(callee, args, kwargs, loc),
                      ModRef: lambda: self.call_mod(callee.mod, args, kwargs, loc),
                      PyFunction: lambda: self.call_function(callee.fn, args, kwargs, loc)}.get(type(callee))
        if lower_call is None:
            raise UnsupportedConstructError(f"calling {describe(callee)} is not supported", loc, ALLOWED)
        return lower_call()

    def call_arguments(self, arguments: Tree | None, env: dict[str, Value]) -> tuple[list, dict]:
        args, kwargs = [], {}
        for a in arguments.children if arguments is not None else []:
            if a is None:
                continue
            if a.data == "comprehension":
                self.refuse("comprehensions and generator expressions", a)
            if a.data == "kwarg":
                kwargs[str(a.children[0])] = (self.expr(a.children[1], env), a.children[1])
            else:
                args.append((self.expr(a, env), a))
        return args, kwargs

    def call_builtin(self, key: str, args: list[Argument], kwargs: dict, loc: SourceLoc) -> Node:
        if key == "float" and len(args) == 1 and isinstance(args[0][0], Text) and not kwargs:
            return float_of_text(args[0][0].value, loc)  # float("-inf")
        if key == "clamp":
            return self.clamp(args, kwargs, loc)
        if key in STRUCTURAL_KEYS:
            return self.call_structural(key, None, args, kwargs, loc)
        if key in FUNCTIONS:  # torch's keyword parameters and defaults: F.gelu(x, approximate="tanh")
            return self.call_activation(key, args, kwargs, loc)
        if kwargs:
            raise UnsupportedConstructError(f"keyword arguments to `{key}` are not supported", loc, ALLOWED)
        return apply_rule(key, key, [self.as_node(v, t) for v, t in args], loc)

    def clamp(self, args: list[Argument], kwargs: dict, loc: SourceLoc) -> Node:
        bound = bind_clamp(args, kwargs, loc)
        nodes = {k: self.as_node(v, t) for k, (v, t) in bound.items() if v is not NONE}
        return clamp(nodes["input"], nodes.get("min"), nodes.get("max"), loc)

    def call_activation(self, key: str, args: list[Argument], kwargs: dict, loc: SourceLoc) -> Node:
        inputs, rest, kwargs = split_inputs(key, args, kwargs, loc)
        options = {k: v for k, (v, _) in kwargs.items()}
        return call_function(key, [self.as_node(*x) for x in inputs], [v for v, _ in rest], options, loc)

    def call_method(self, method: Method, args: list[Argument], kwargs: dict, loc: SourceLoc) -> Node:
        key = METHODS[method.name]
        if key in STRUCTURAL_KEYS:
            return self.call_structural(key, method.receiver, args, kwargs, loc)
        if key != "to":  # x.exp() -> exp(x)
            return self.call_builtin(key, [(method.receiver, None)] + args, kwargs, loc)
        targets = [v for v, _ in args] + [v for k, (v, _) in kwargs.items() if k == "dtype"]
        if len(targets) != 1 or not isinstance(targets[0], TorchDType):
            raise UnsupportedConstructError(f"`.{method.name}(...)` needs exactly one torch dtype argument", loc,
                                            "e.g. `x.to(torch.float32)`")
        return cast(method.receiver, targets[0].dtype, loc)

    def call_structural(self, key: str, receiver: Any, args: list[Argument], kwargs: dict, loc: SourceLoc) -> Value:
        """Calls answered at compile time: range/len, a captured tensor's size/dim, and scalar constructors."""
        if key in ("new_ones", "new_zeros", "new_full"):
            return self.new_scalar(key, receiver, args, kwargs, loc)
        if key in ("sum", "dot"):
            return self.row_reduction(key, receiver, args, kwargs, loc)
        if kwargs:
            raise UnsupportedConstructError(f"keyword arguments to `{key}` are not supported", loc, ALLOWED)
        values = [v for v, _ in args]
        if key == "range":
            return RangeValue(tuple(int_const(i, loc) for i in range(*self.constant_ints(args, "range", loc))))
        if key == "len":
            if len(values) != 1 or not isinstance(values[0], (tuple, Captured)):
                raise SignatureError("`len` takes one tuple or captured tensor", loc)
            sized = values[0]
            return int_const(len(sized) if isinstance(sized, tuple) else sized.shape[0], loc)
        shape = receiver.shape if isinstance(receiver, Captured) else ()  # a scalar value has shape ()
        if key == "dim":
            return int_const(len(shape), loc)
        if not values:  # x.size() -> the shape
            return tuple(int_const(n, loc) for n in shape)
        (dim,) = self.constant_ints(args, "size", loc)
        if not -len(shape) <= dim < len(shape):
            raise FlexcompTypeError(f"size({dim}) of a tensor with {len(shape)} dims", loc)
        return int_const(shape[dim], loc)

    def row_reduction(self, key: str, receiver: Any, args: list[Argument], kwargs: dict, loc: SourceLoc) -> Node:
        # row.sum() -> r0 + r1 + ...; torch.dot(a, b) -> (a * b).sum()
        rows = ([(receiver, None)] if receiver is not None else []) + args
        dims = [v for k, (v, _) in kwargs.items() if k == "dim"]
        if key == "sum" and len(rows) == 2:  # row.sum(-1), torch.sum(row, -1)
            dims, rows = dims + [rows[1][0]], rows[:1]
        if set(kwargs) - {"dim"} or len(rows) != (2 if key == "dot" else 1) or not all(self.is_row(v) for v, _ in rows):
            raise SignatureError(f"`{key}` takes {'two rows' if key == 'dot' else 'one row (and dim=-1 or 0)'} of "
                                 "a captured tensor indexed down to its last dim", loc)
        if dims and constant(self.as_node(dims[0], None)).arg not in (0, -1):
            raise SignatureError(f"`{key}` of a row: dim must be 0 or -1", loc)
        items = [self.as_row(v, t).items for v, t in rows]
        if key == "dot":
            items = [tuple(binary(Op.MUL, x, y, loc) for x, y in zip(*items))]
        return add_all(items[0], loc)

    def constant_ints(self, args: list[Argument], what: str, loc: SourceLoc) -> list[int]:
        nodes = [constant(self.as_node(v, t)) or self.as_node(v, t) for v, t in args]
        if not all(n.op == Op.CONST and n.dtype == DType.I32 for n in nodes):
            raise UnsupportedConstructError(f"`{what}` needs int arguments known when the mod is compiled (captured "
                                            "ints, literals, shapes), not values computed from b, h, q_idx or kv_idx",
                                            loc, "unroll to a constant bound and mask out the extra iterations: "
                                            "`for i in range(MAX): acc += torch.where(i < n, term, 0)`")
        return [n.arg for n in nodes]

    def new_scalar(self, key: str, receiver: Any, args: list[Argument], kwargs: dict, loc: SourceLoc) -> Node:
        # b.new_ones((), dtype=torch.bool) -> a bool constant True; the receiver only lends its dtype
        names = ["size", "fill_value"] if key == "new_full" else ["size"]
        bound = dict(zip(names, args)) | kwargs
        if len(args) > len(names) or set(bound) - {*names, "dtype", "device"} or set(names) - set(bound):
            raise SignatureError(f"`.{key}` takes ({', '.join(names)}, dtype=...)", loc)
        if bound["size"][0] != ():
            raise UnsupportedConstructError(f"`.{key}` of a non-scalar size: a mod computes one value", loc,
                                            f"use `.{key}(())` for a scalar")
        dtype = bound["dtype"][0].dtype if "dtype" in bound else self.as_node(receiver, None).dtype
        if key == "new_full":
            return cast(self.as_node(*bound["fill_value"]), dtype, loc)
        one = key == "new_ones"
        return const({DType.BOOL: one, DType.I32: int(one), DType.F32: float(one)}[dtype], dtype, loc)

    def call_mod(self, mod: Any, args: list[Argument], kwargs: dict, loc: SourceLoc) -> Node:
        """Another mod's raw IR with its canonical arguments replaced by this call's."""
        if kwargs:
            raise SignatureError(f"{mod.kind}_mod {mod.name!r} takes positional arguments only, got keywords", loc)
        nodes = [self.as_node(value, tree) for value, tree in args]
        return inline_mod(mod, nodes, self.ctx.buffers, self.ctx.guards, loc,
                          [self.src.loc(tree, loc) for _, tree in args])

    def call_function(self, fn: Callable, args: list[Argument], kwargs: dict, loc: SourceLoc) -> Node:
        """A plain helper (def or lambda), inlined: its body lowered with the arguments bound."""
        code = getattr(fn, "__code__", None)
        if code in self.ctx.stack:
            chain = " -> ".join(c.co_name for c in self.ctx.stack) + f" -> {code.co_name}"
            raise UnsupportedConstructError(f"recursive call to {fn.__name__!r} ({chain})", loc,
                                            "mods are inlined, so recursion is not supported")
        try:
            helper = type(self)(self.ctx, fn, *read_function(fn))
        except SourceUnavailable:  # a helper typed at a REPL: traced with this call's arguments
            nodes = [self.as_node(v, t) for v, t in args]
            return trace_call(fn, nodes, {k: self.as_node(v, t) for k, (v, t) in kwargs.items()},
                              self.ctx.buffers, self.ctx.guards)
        params = helper.params()
        bound = dict(zip(params, (v for v, _ in args)))
        for k, (v, _) in kwargs.items():
            if k not in params or k in bound:
                raise SignatureError(f"{fn.__name__}() got an unexpected or repeated argument {k!r}", loc)
            bound[k] = v
        if len(args) > len(params) or len(bound) != len(params):
            raise SignatureError(f"{fn.__name__}() takes {len(params)} arguments ({', '.join(params)}), "
                                 f"got {len(args) + len(kwargs)}", loc)
        self.ctx.stack.append(code)
        try:
            return helper.lower_body(bound)
        finally:
            self.ctx.stack.pop()


def float_of_text(text: str, loc: SourceLoc) -> Node:
    try:
        value = float(text)
    except ValueError:
        raise FlexcompTypeError(f"float({text!r}) is not a number", loc) from None
    return const(value, DType.F32, loc)
