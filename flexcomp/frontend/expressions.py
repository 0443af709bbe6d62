"""Lowering expressions: a visitor over the lark tree, one `expr_<rule>` method per grammar rule."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lark import Token, Tree

from ..errors import FlexcompTypeError, SourceLoc, UnsupportedConstructError
from ..guards import GuardTable
from ..ir import DType, Node, Op, const, load
from .builders import BINOPS, binary, constant, int_const, logical, logical_not, to_bool, unary, where
from .call_lowering import CallLowering
from .calls import METHODS, MODULE_CONSTANTS, NAMESPACE_FUNCS, SUBMODULES, TORCH_DTYPES
from .locations import Source
from .names import BufferTable, resolve_free
from .values import ALLOWED, NONE, Builtin, Captured, Method, Module, Row, Text, TorchDType, Value, describe

# lark rule -> how the construct is named when refused
UNSUPPORTED_RULES = {
    "for_stmt": "`for` loops", "while_stmt": "`while` loops", "with_stmt": "`with` statements",
    "try_stmt": "`try` statements", "funcdef": "nested function definitions", "import_stmt": "`import`",
    "global_stmt": "`global`/`nonlocal`", "assert_stmt": "`assert`", "del_stmt": "`del`", "raise_stmt": "`raise`",
    "loop_control": "`break`/`continue`", "lambda_expr": "`lambda`",
    "comprehension_expr": "comprehensions and generator expressions", "list_display": "list displays",
    "dict_display": "dict and set displays", "walrus": "the walrus operator `:=`", "ellipsis": "`...`",
    "imag_lit": "complex numbers", "await_expr": "`await`", "starred": "`*args`/`**kwargs` in calls",
    "slice": "slices", "param_default": "default parameter values", "param_kwargs": "`**kwargs`",
}  # fmt: skip

UNARY_OPS = {"-": Op.NEG, "~": Op.NOT}
MAX_ROW = 64  # elements of a captured row used as a vector (each one a load)  # `not` and unary `+` are handled apart


@dataclass
class Context:
    """State shared by a mod and the helpers inlined into it."""

    buffers: BufferTable = field(default_factory=BufferTable)
    guards: GuardTable = field(default_factory=GuardTable)  # the captured values compiled in (flexcomp/guards.py)
    stack: list[Any] = field(default_factory=list)  # code objects being lowered, to refuse recursion


class ExpressionLowering(CallLowering):
    """Lowers the expressions of one function (a `def` or a lambda); helpers get their own instance."""

    def __init__(self, ctx: Context, fn: Callable, src: Source, tree: Tree):
        self.ctx, self.fn, self.src, self.tree = ctx, fn, src, tree
        self.def_loc = src.loc(tree)
        self.check_return: Callable[[Node, SourceLoc], Node] | None = None  # set for the mod itself

    def expr(self, tree: Tree, env: dict[str, Value]) -> Value:
        if tree.data in UNSUPPORTED_RULES:
            self.refuse(UNSUPPORTED_RULES[tree.data], tree)
        method = getattr(self, f"expr_{tree.data}", None)
        if method is None:
            self.refuse(f"`{tree.data}`", tree)
        return method(tree, env)

    def node(self, tree: Tree, env: dict[str, Value]) -> Node:
        """`tree` lowered to an IR node (not a compile-time value)."""
        return self.as_node(self.expr(tree, env), tree)

    def expr_name(self, tree: Tree, env: dict[str, Value]) -> Value:
        name = str(tree.children[0])
        if name in env:
            return env[name]
        return resolve_free(self.fn, name, self.ctx.buffers, self.src.loc(tree), self.ctx.guards)

    def expr_int_lit(self, tree: Tree, env: dict[str, Value]) -> Node:
        return int_const(int(str(tree.children[0]), 0), self.src.loc(tree), "integer literal")

    def expr_float_lit(self, tree: Tree, env: dict[str, Value]) -> Node:
        return const(float(str(tree.children[0])), DType.F32, self.src.loc(tree))

    def expr_true(self, tree: Tree, env: dict[str, Value]) -> Node:
        return const(True, DType.BOOL, self.src.loc(tree))

    def expr_false(self, tree: Tree, env: dict[str, Value]) -> Node:
        return const(False, DType.BOOL, self.src.loc(tree))

    def expr_string(self, tree: Tree, env: dict[str, Value]) -> Text:
        parts = [str(t) for t in tree.children]
        if any("f" in p[: p.index(p[-1])].lower() for p in parts):  # the prefix before the opening quote
            self.refuse("f-strings", tree)
        return Text("".join(p[p.index(p[-1]):].strip("'\"") for p in parts))

    def expr_none(self, tree: Tree, env: dict[str, Value]) -> Text:
        return NONE

    def expr_paren(self, tree: Tree, env: dict[str, Value]) -> Value:
        return self.expr(tree.children[0], env)

    def expr_ifexp(self, tree: Tree, env: dict[str, Value]) -> Node:
        # both sides are computed, as in a vectorized kernel: a if c else b -> WHERE(c, a, b)
        body, test, orelse = tree.children
        cond = self.condition(test, env)
        if cond.op == Op.CONST:  # known at compile time (`x if bias is not None else y`): only one side exists
            return self.expr(body if cond.arg else orelse, env)
        return where(cond, self.node(body, env), self.node(orelse, env), self.src.loc(tree))

    def expr_boolop(self, tree: Tree, env: dict[str, Value]) -> Node:
        left, op, right = tree.children
        return logical(Op.AND if op == "and" else Op.OR, self.node(left, env), self.node(right, env),
                       self.src.loc(tree))

    def expr_unary(self, tree: Tree, env: dict[str, Value]) -> Node:
        op, operand = tree.children
        x = self.node(operand, env)
        loc = self.src.loc(tree)
        if op == "not":
            return logical_not(x, loc)
        return x if op == "+" else unary(UNARY_OPS[str(op)], x, loc)

    def expr_compare(self, tree: Tree, env: dict[str, Value]) -> Node:
        items = tree.children
        operands = [self.expr(t, env) for t in items[0::2]]
        result = None
        for i, op_tree in enumerate(items[1::2]):
            symbol = " ".join(str(t) for t in op_tree.children)
            loc = self.src.loc(op_tree)
            if symbol in ("is", "is not"):
                pair = self.identity_test(symbol, operands[i], operands[i + 1], op_tree)
            elif symbol not in BINOPS:
                self.refuse(f"`{symbol}` comparisons", op_tree)
            else:
                a, b = self.as_node(operands[i], items[2 * i]), self.as_node(operands[i + 1], items[2 * i + 2])
                pair = binary(BINOPS[symbol], a, b, loc)
            result = pair if result is None else logical(Op.AND, result, pair, loc)  # a < b < c -> a<b & b<c
        return result

    def identity_test(self, symbol: str, a: Value, b: Value, op_tree: Tree) -> Node:
        # x is None -> a constant: a captured name is specialized, so whether it is None is known
        if NONE not in (a, b):
            self.refuse("`is` comparisons other than `x is None` / `x is not None`", op_tree)
        return const((a is b) == (symbol == "is"), DType.BOOL, self.src.loc(op_tree))

    def expr_tuple(self, tree: Tree, env: dict[str, Value]) -> tuple:
        return tuple(self.expr(c, env) for c in tree.children if c is not None)

    def expr_binop(self, tree: Tree, env: dict[str, Value]) -> Value:
        left, op, right = tree.children
        a, b = self.expr(left, env), self.expr(right, env)
        if self.is_row(a) or self.is_row(b):  # elementwise over a small captured row
            rows = [self.as_row(v, t) if self.is_row(v) else None for v, t in ((a, left), (b, right))]
            n = len(next(r for r in rows if r is not None).items)
            items = [r.items if r is not None else (self.as_node(v, t),) * n
                     for r, v, t in zip(rows, (a, b), (left, right))]
            if any(len(i) != n for i in items):
                raise FlexcompTypeError(f"rows of different lengths ({n} and {len(items[1])})", self.src.loc(tree))
            return Row(tuple(self.arith(str(op), x, y, op) for x, y in zip(*items)))
        return self.arith(str(op), self.as_node(a, left), self.as_node(b, right), op)

    def is_row(self, value: Value) -> bool:
        return isinstance(value, Row) or isinstance(value, Captured) and len(value.shape) == 1

    def as_row(self, value: Value, tree: Tree) -> Row:
        if isinstance(value, Row):
            return value
        (n,) = value.shape
        if n > MAX_ROW:
            raise UnsupportedConstructError(f"a row of {n} values of {value.spec.name!r}: rows are unrolled, at "
                                            f"most {MAX_ROW} elements", self.src.loc(tree))
        loc = self.src.loc(tree)
        return Row(tuple(load(value.spec.name, value.spec.ir_dtype, value.indices + (int_const(i, loc),), loc)
                         for i in range(n)))

    def arith(self, symbol: str, a: Node, b: Node, op_token: Token) -> Node:
        if symbol == "@":
            self.refuse("matrix multiplication `@`", op_token)
        return binary(BINOPS[symbol], a, b, self.src.loc(op_token))

    def condition(self, test: Tree, env: dict[str, Value]) -> Node:
        return to_bool(self.node(test, env), self.src.loc(test))

    def expr_attribute(self, tree: Tree, env: dict[str, Value]) -> Value:
        base_tree, name_token = tree.children
        base, name = self.expr(base_tree, env), str(name_token)
        loc = self.src.loc(tree)
        if isinstance(base, Module):
            return module_attribute(base.name, name, loc)
        if isinstance(base, Captured) and name in ("shape", "ndim"):  # constants once specialized
            shape = tuple(int_const(n, loc) for n in base.shape)
            return shape if name == "shape" else int_const(len(shape), loc)
        if isinstance(base, Captured) and name in ("size", "dim"):
            return Method(base, name)
        if self.is_row(base) and name in ("sum", "dot"):
            return Method(self.as_row(base, base_tree), name)
        if isinstance(base, Captured) and not base.shape:  # a 0-d tensor is a value
            base = self.as_node(base, base_tree)
        if isinstance(base, Node) and name == "device":  # only ever passed on as `device=`, which is ignored
            return Text("<device>")
        if isinstance(base, Node) and name in METHODS:
            return Method(base, name)
        raise UnsupportedConstructError(f"attribute `.{name}` of {describe(base)} is not supported", loc, ALLOWED)

    def expr_subscript(self, tree: Tree, env: dict[str, Value]) -> Value:
        base_tree, subscripts = tree.children
        base = self.expr(base_tree, env)
        loc = self.src.loc(tree)
        items = [item for item in subscripts.children if item is not None]
        if isinstance(base, tuple):
            return self.tuple_item(base, items, env, loc)
        if not isinstance(base, Captured):
            raise UnsupportedConstructError(f"subscript of {describe(base)}: only captured tensors and tuples can "
                                            "be indexed", loc, ALLOWED)
        indices = base.indices + tuple(self.index(base, item, env) for item in items)
        ndim = len(base.spec.shape)
        if len(indices) > ndim:
            raise FlexcompTypeError(f"captured tensor {base.spec.name!r} has {ndim} dims (shape {base.spec.shape}) "
                                    f"but is indexed with {len(indices)} indices", loc)
        if len(indices) < ndim:  # bias[b][h][q]: one load once every dim has its index
            return Captured(base.spec, indices)
        return load(base.spec.name, base.spec.ir_dtype, indices, loc)

    def tuple_item(self, bundle: tuple, items: list[Tree], env: dict[str, Value], loc: SourceLoc) -> Value:
        index = constant(self.node(items[0], env)) if len(items) == 1 and items[0].data != "slice" else None
        if index is None or index.op != Op.CONST or index.dtype != DType.I32:
            raise UnsupportedConstructError("a tuple can be indexed only by one constant int", loc,
                                            "tuples exist at compile time; index captured tensors for runtime data")
        if not -len(bundle) <= index.arg < len(bundle):
            raise FlexcompTypeError(f"tuple index {index.arg} out of range for a tuple of {len(bundle)}", loc)
        return bundle[index.arg]

    def index(self, base: Captured, item: Tree, env: dict[str, Value]) -> Node:
        if item.data == "slice":
            self.refuse("slices", item)
        index = self.node(item, env)
        if index.dtype != DType.I32:
            raise FlexcompTypeError(f"index into {base.spec.name!r} must be an int, got {index.dtype.value}",
                                    self.src.loc(item), "use int(...) or // to make an integer index")
        return index

    # ------------------------------------------------ helpers

    def as_node(self, value: Value, tree: Any) -> Node:
        if isinstance(value, Node):
            return value
        loc = self.src.loc(tree, self.def_loc) if tree is not None else self.def_loc
        if isinstance(value, Captured):
            if not value.spec.shape:
                return load(value.spec.name, value.spec.ir_dtype, (), loc)
            missing = len(value.shape)
            raise FlexcompTypeError(f"captured tensor {value.spec.name!r} has {len(value.spec.shape)} dims (shape "
                                    f"{value.spec.shape}): index it with {missing}{' more' if value.indices else ''} "
                                    f"{'index' if missing == 1 else 'indices'} to use it as a value", loc,
                                    "its .shape, .size() and .ndim are constants; `is None` tests a captured None")
        if value is NONE:
            raise UnsupportedConstructError("`None` not supported in a mod (only as a clamp bound or in "
                                            "`x is None`)", loc, ALLOWED)
        if isinstance(value, Row):
            raise FlexcompTypeError(f"a row of {len(value.items)} values cannot be used as one value", loc,
                                    "reduce it (`.sum()`, `torch.dot(a, b)`) or index its last dim")
        if isinstance(value, tuple):
            raise FlexcompTypeError("a tuple cannot be used as a value", loc,
                                    "unpack it (`a, b = pair`) or index it with a constant (`pair[0]`)")
        if isinstance(value, Text):
            raise UnsupportedConstructError("string literals (only float(\"inf\") and float(\"-inf\"))", loc, ALLOWED)
        raise FlexcompTypeError(f"{describe(value)} cannot be used as a value", loc, ALLOWED)

    def refuse(self, construct: str, tree: Any) -> None:
        raise UnsupportedConstructError(f"{construct} not supported in a mod (in {self.src.fn_name!r})",
                                        self.src.loc(tree, self.def_loc), ALLOWED)


def module_attribute(module: str, name: str, loc: SourceLoc) -> Value:
    """`torch.<name>` / `math.<name>`: a constant, a function of the call table, or a dtype."""
    if name in MODULE_CONSTANTS.get(module, {}):
        return const(MODULE_CONSTANTS[module][name], DType.F32, loc)
    if (module, name) in SUBMODULES:  # torch.nn.functional, torch.special
        return Module(SUBMODULES[module, name])
    funcs = NAMESPACE_FUNCS[module]
    if name in funcs:
        return Builtin(funcs[name])
    if module == "torch" and name in TORCH_DTYPES:
        return TorchDType(TORCH_DTYPES[name], name)
    raise UnsupportedConstructError(f"`{module}.{name}` is not supported in a mod", loc,
                                    f"supported: {', '.join(sorted(funcs))}; {ALLOWED}")
