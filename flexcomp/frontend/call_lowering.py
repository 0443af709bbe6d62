"""Lowering calls: builtins through the call table, tensor methods, other mods (substituted) and plain
helper functions (inlined: lowered with the caller's arguments bound to their parameters)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lark import Tree

from ..errors import FlexcompTypeError, SignatureError, SourceLoc, UnsupportedConstructError
from ..ir import DType, Node, const
from .builders import cast, clamp, inline_mod
from .calls import CAST_KEYS, METHODS, apply_rule, bind_clamp
from .locations import SourceUnavailable
from .source import read_function
from .tracer import trace_call
from .values import ALLOWED, NONE, Builtin, Method, ModRef, PyFunction, Text, TorchDType, Value, describe

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
        if kwargs:
            raise UnsupportedConstructError(f"keyword arguments to `{key}` are not supported", loc, ALLOWED)
        return apply_rule(key, key, [self.as_node(v, t) for v, t in args], loc)

    def clamp(self, args: list[Argument], kwargs: dict, loc: SourceLoc) -> Node:
        bound = bind_clamp(args, kwargs, loc)
        nodes = {k: self.as_node(v, t) for k, (v, t) in bound.items() if v is not NONE}
        return clamp(nodes["input"], nodes.get("min"), nodes.get("max"), loc)

    def call_method(self, method: Method, args: list[Argument], kwargs: dict, loc: SourceLoc) -> Node:
        key = METHODS[method.name]
        if key != "to":  # x.exp() -> exp(x)
            return self.call_builtin(key, [(method.receiver, None)] + args, kwargs, loc)
        targets = [v for v, _ in args] + [v for k, (v, _) in kwargs.items() if k == "dtype"]
        if len(targets) != 1 or not isinstance(targets[0], TorchDType):
            raise UnsupportedConstructError(f"`.{method.name}(...)` needs exactly one torch dtype argument", loc,
                                            "e.g. `x.to(torch.float32)`")
        return cast(method.receiver, targets[0].dtype, loc)

    def call_mod(self, mod: Any, args: list[Argument], kwargs: dict, loc: SourceLoc) -> Node:
        """Another mod's raw IR with its canonical arguments replaced by this call's."""
        if kwargs:
            raise SignatureError(f"{mod.kind}_mod {mod.name!r} takes positional arguments only, got keywords", loc)
        nodes = [self.as_node(value, tree) for value, tree in args]
        return inline_mod(mod, nodes, self.ctx.buffers, loc, [self.src.loc(tree, loc) for _, tree in args])

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
            return trace_call(fn, nodes, {k: self.as_node(v, t) for k, (v, t) in kwargs.items()}, self.ctx.buffers)
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
