"""Front end: a mod's Python source -> typed IR.

The source is read with `inspect`, parsed with the lark grammar in
grammar/mods.lark, and lowered by `FunctionLowering`, a visitor over the lark
tree that builds `Node`s.  Every node gets the `SourceLoc` of the code it came
from, and every refusal is a `FlexcompError` that points at the user's line.

Typing inserts explicit CASTs wherever torch would promote implicitly, so
backends never need promotion rules of their own.
"""

from __future__ import annotations

import builtins
import inspect
import math
import numbers
import re
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from lark import Token, Tree
from lark.exceptions import LarkError, UnexpectedInput
from lark.indenter import DedentError

from .errors import (
    FlexcompError,
    FlexcompSyntaxError,
    FlexcompTypeError,
    SignatureError,
    SourceLoc,
    UndefinedNameError,
    UnsupportedConstructError,
)
from .grammar import mod_parser
from .ir import (
    ARG_DTYPES,
    ARITHMETIC_OPS,
    COMPARISON_OPS,
    INT32_MAX,
    INT32_MIN,
    LOGICAL_OPS,
    MASK_MOD_ARGS,
    SCORE_MOD_ARGS,
    BufferSpec,
    DType,
    Node,
    Op,
    arg,
    const,
    load,
    map_nodes,
    promote,
    result_dtype,
    substitute,
)

ALLOWED = (
    "Allowed in a mod: parameters, locals, int/float/bool literals, + - * / // % ** and comparisons, & | ^ ~, "
    "and/or/not, if/elif/else, `x if c else y`, torch/math functions, captured ints, floats and tensors, "
    "and calls to other mods and plain helper functions (see docs/language.md)."
)

# ---------------------------------------------------------------- compile-time values
# A lowered expression is a `Node`, or one of these: things that exist only while compiling.


@dataclass(frozen=True)
class Module:
    name: str  # "torch" or "math"


@dataclass(frozen=True)
class Builtin:
    key: str  # a key of BUILTIN_CALLS


@dataclass(frozen=True)
class PyFunction:
    fn: Callable


@dataclass(frozen=True)
class ModRef:
    mod: Any


@dataclass(frozen=True)
class Captured:
    """A captured tensor before indexing."""

    spec: BufferSpec


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


NONE = Text("<None>")  # only meaningful as clamp's missing bound

Value = Any  # Node | Module | Builtin | PyFunction | ModRef | Captured | TorchDType | Text | Method

UNARY_FLOAT = {"exp": Op.EXP, "exp2": Op.EXP2, "log": Op.LOG, "log2": Op.LOG2, "sqrt": Op.SQRT, "rsqrt": Op.RSQRT,
               "tanh": Op.TANH, "sigmoid": Op.SIGMOID, "sin": Op.SIN, "cos": Op.COS}  # fmt: skip
TORCH_FUNCS = {**{n: n for n in UNARY_FLOAT}, "abs": "abs", "floor": "floor", "where": "where", "minimum": "min2",
               "maximum": "max2", "clamp": "clamp", "clip": "clamp", "neg": "neg", "negative": "neg",
               "logical_and": "logical_and", "logical_or": "logical_or", "logical_not": "logical_not",
               "pow": "pow", "remainder": "mod", "floor_divide": "floordiv"}  # fmt: skip
MATH_FUNCS = {"exp": "exp", "log": "log", "log2": "log2", "sqrt": "sqrt", "tanh": "tanh", "sin": "sin", "cos": "cos",
              "floor": "floor", "fabs": "abs"}  # fmt: skip
PY_BUILTINS = {"abs": "abs", "min": "min", "max": "max", "int": "int", "float": "float", "bool": "bool", "pow": "pow"}
METHODS = {**{n: n for n in UNARY_FLOAT}, "abs": "abs", "floor": "floor", "neg": "neg", "clamp": "clamp",
           "clip": "clamp", "float": "float", "double": "float", "half": "float", "bfloat16": "float", "int": "int",
           "long": "int", "bool": "bool", "to": "to", "type": "to", "minimum": "min2", "maximum": "max2",
           "pow": "pow", "logical_not": "logical_not", "logical_and": "logical_and", "logical_or": "logical_or",
           "sqrt": "sqrt", "remainder": "mod"}  # fmt: skip
TORCH_DTYPES = {"float32": DType.F32, "float": DType.F32, "float64": DType.F32, "double": DType.F32,
                "float16": DType.F32, "half": DType.F32, "bfloat16": DType.F32, "int32": DType.I32,
                "int": DType.I32, "int64": DType.I32, "long": DType.I32, "int16": DType.I32, "int8": DType.I32,
                "uint8": DType.I32, "bool": DType.BOOL}  # fmt: skip
MODULE_CONSTANTS = {"torch": {"inf": math.inf, "pi": math.pi, "e": math.e, "nan": math.nan},
                    "math": {"inf": math.inf, "pi": math.pi, "e": math.e, "tau": math.tau, "nan": math.nan}}  # fmt: skip
MODULES = {"torch": torch, "math": math}


def known_callable(value: Any) -> str | None:
    """The BUILTIN_CALLS key of a torch/math/builtin function object (however it was imported)."""
    for module, table in ((torch, TORCH_FUNCS), (math, MATH_FUNCS), (builtins, PY_BUILTINS)):
        for name, key in table.items():
            if getattr(module, name, None) is value:
                return key
    return None


# ---------------------------------------------------------------- source


@dataclass
class Source:
    """A function's source as parsed, and how to map parser positions back to the file."""

    fn_name: str
    file: str
    first_line: int  # file line of the parsed text's line 1
    indent: list[int]  # characters removed from each parsed line
    lines: list[str]  # the file's lines, unchanged
    text: str = ""

    def loc(self, item: Tree | Token | None, fallback: SourceLoc | None = None) -> SourceLoc | None:
        if isinstance(item, Tree):
            if item.meta.empty:
                return fallback
            line, col, end_line, end_col = item.meta.line, item.meta.column, item.meta.end_line, item.meta.end_column
        elif isinstance(item, Token) and item.line is not None:
            line, col, end_line, end_col = item.line, item.column, item.end_line, item.end_column
        else:
            return fallback
        return self.at(line, col, end_col if end_line == line else None)

    def at(self, line: int, column: int, end_column: int | None = None) -> SourceLoc:
        shift = self.indent[line - 1] if 0 < line <= len(self.indent) else 0
        text = self.lines[line - 1] if 0 < line <= len(self.lines) else ""
        end = end_column + shift if end_column is not None else None
        return SourceLoc(self.file, self.first_line + line - 1, column + shift, text, self.fn_name, end)


DEF_LINE = re.compile(r"\s*(async\s+)?def\s")


def read_source(fn: Callable) -> Source:
    name = getattr(fn, "__name__", repr(fn))
    try:
        lines, first = inspect.getsourcelines(fn)
        file = inspect.getsourcefile(fn) or fn.__code__.co_filename
    except (OSError, TypeError) as e:
        raise SignatureError(f"cannot read the source of {name!r} ({e}); define mods with `def` in a file") from None
    start = next((i for i, line in enumerate(lines) if DEF_LINE.match(line)), None)
    if start is None:
        what = "a lambda" if name == "<lambda>" else f"{name!r}"
        raise UnsupportedConstructError(f"cannot compile {what}: a mod must be a function defined with `def`",
                                        SourceLoc(file, first, 1, lines[0].rstrip("\n"), name), ALLOWED)
    lines = [line.rstrip("\r\n") for line in lines[start:]]
    def_indent = len(lines[0]) - len(lines[0].lstrip())
    indent = [min(def_indent, len(line) - len(line.lstrip())) for line in lines]
    text = "\n".join(line[cut:] for line, cut in zip(lines, indent)) + "\n"
    return Source(name, file, first + start, indent, lines, text)


SYNTAX_EXAMPLES = {
    "this statement is not part of the flexcomp language (no class, yield, try/except, match or nested decorators)": [
        "def f(x):\n    class A: pass\n",
        "def f(x):\n    yield x\n",
        "def f(x):\n    try:\n        pass\n    except E:\n        pass\n",
        "def f(x):\n    @d\n    def g(): pass\n",
    ],
    "a star-expression is not part of the flexcomp language": ["def f(x):\n    return *x\n", "def f(x):\n    a = *x\n"],
}


def parse_source(src: Source) -> Tree:
    """The lark tree of `src`'s function; a FlexcompSyntaxError with a caret if it does not parse."""
    parser = mod_parser()
    try:
        return parser.parse(src.text)
    except UnexpectedInput as e:
        label = e.match_examples(parser.parse, SYNTAX_EXAMPLES, use_accepts=True)
        token = getattr(e, "token", None)
        shown = f"`{token}`" if token is not None and str(token).strip() else "this"
        message = label or f"unexpected {shown}: not part of the flexcomp language"
        column = e.column
        if label and label.startswith("this statement"):  # the keyword lexes as a name: point at the statement
            line = src.text.splitlines()[e.line - 1]
            column = len(line) - len(line.lstrip()) + 1
        raise FlexcompSyntaxError(f"{message} (in mod {src.fn_name!r})", src.at(e.line, column), ALLOWED) from None
    except DedentError as e:
        raise FlexcompSyntaxError(f"inconsistent indentation in {src.fn_name!r}: {e}") from None
    except LarkError as e:
        raise FlexcompSyntaxError(f"cannot parse {src.fn_name!r}: {e}") from None


# ---------------------------------------------------------------- captured tensors


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


def checked_resolver(spec: BufferSpec, read: Callable[[], Any]) -> Callable[[], Any]:
    """Re-reads the binding at call time, refusing a tensor whose dtype or shape changed."""

    def resolve() -> Any:
        value = read()
        got = (str(value.dtype).removeprefix("torch."), tuple(value.shape)) if isinstance(value, torch.Tensor) else None
        if got != (spec.dtype, spec.shape):
            raise SignatureError(f"captured tensor {spec.name!r} changed after the mod was compiled: "
                                 f"compiled for {(spec.dtype, spec.shape)=}, now {got=}; re-decorate the mod")
        return value

    return resolve


# ---------------------------------------------------------------- typed node builders


def cast(x: Node, dtype: DType, loc: Any = None) -> Node:
    return x if x.dtype == dtype else Node(Op.CAST, dtype, (x,), None, loc or x.loc)


def to_bool(x: Node, loc: Any = None) -> Node:
    return cast(x, DType.BOOL, loc)


def unary(op: Op, x: Node, loc: Any) -> Node:
    if op == Op.NOT and x.dtype == DType.F32:
        raise FlexcompTypeError("`~` needs a bool or an int, got a float", loc, "use `not` or a comparison")
    if op in (Op.NEG, Op.ABS, Op.FLOOR) and x.dtype == DType.BOOL:
        x = cast(x, DType.I32, loc)
    if result_dtype(op, (x.dtype,)) == DType.F32:
        x = cast(x, DType.F32, loc)
    return Node(op, result_dtype(op, (x.dtype,)), (x,), None, loc)


def binary(op: Op, a: Node, b: Node, loc: Any) -> Node:
    if op == Op.DIV:
        a, b = cast(a, DType.F32, loc), cast(b, DType.F32, loc)
    elif op in LOGICAL_OPS:
        if DType.F32 in (a.dtype, b.dtype):
            raise FlexcompTypeError(f"`{OP_SYMBOL[op]}` needs bools or ints, got a float", loc,
                                    "compare first, e.g. `(x > 0) & (y > 0)`")
        common = promote(a.dtype, b.dtype)
        a, b = cast(a, common, loc), cast(b, common, loc)
    elif op in ARITHMETIC_OPS or op in COMPARISON_OPS:
        common = promote(a.dtype, b.dtype)
        if common == DType.BOOL and op in ARITHMETIC_OPS:
            common = DType.I32
        a, b = cast(a, common, loc), cast(b, common, loc)
    return Node(op, result_dtype(op, (a.dtype, b.dtype)), (a, b), None, loc)


def where(c: Node, a: Node, b: Node, loc: Any) -> Node:
    common = promote(a.dtype, b.dtype)
    a, b = cast(a, common, loc), cast(b, common, loc)
    return Node(Op.WHERE, common, (to_bool(c, loc), a, b), None, loc)


def logical(op: Op, a: Node, b: Node, loc: Any) -> Node:
    return Node(op, DType.BOOL, (to_bool(a, loc), to_bool(b, loc)), None, loc)


def int_const(value: int, loc: Any, what: str = "integer") -> Node:
    if not INT32_MIN <= value <= INT32_MAX:
        raise FlexcompTypeError(f"{what} {value} does not fit in int32", loc, "indices and int constants are int32")
    return const(int(value), DType.I32, loc)


OP_SYMBOL = {Op.ADD: "+", Op.SUB: "-", Op.MUL: "*", Op.DIV: "/", Op.FLOORDIV: "//", Op.MOD: "%", Op.POW: "**",
             Op.AND: "&", Op.OR: "|", Op.XOR: "^", Op.LT: "<", Op.LE: "<=", Op.GT: ">", Op.GE: ">=", Op.EQ: "==",
             Op.NE: "!="}  # fmt: skip
BINOPS = {v: k for k, v in OP_SYMBOL.items()}

# lark rule -> how the construct is named when refused
UNSUPPORTED_RULES = {
    "for_stmt": "`for` loops", "while_stmt": "`while` loops", "with_stmt": "`with` statements",
    "try_stmt": "`try` statements", "funcdef": "nested function definitions", "import_stmt": "`import`",
    "global_stmt": "`global`/`nonlocal`", "assert_stmt": "`assert`", "del_stmt": "`del`", "raise_stmt": "`raise`",
    "loop_control": "`break`/`continue`", "lambda_expr": "`lambda`",
    "comprehension_expr": "comprehensions and generator expressions", "list_display": "list displays",
    "dict_display": "dict and set displays", "walrus": "the walrus operator `:=`", "ellipsis": "`...`",
    "imag_lit": "complex numbers", "await_expr": "`await`", "starred": "`*args`/`**kwargs` in calls",
    "tuple": "tuples", "slice": "slices", "param_default": "default parameter values", "param_kwargs": "`**kwargs`",
}  # fmt: skip


# ---------------------------------------------------------------- lowering


@dataclass
class Context:
    """State shared by a mod and the helpers inlined into it."""

    buffers: BufferTable = field(default_factory=BufferTable)
    stack: list[Any] = field(default_factory=list)  # code objects being lowered, to refuse recursion


class FunctionLowering:
    """Lowers one function's lark tree to IR; helpers get their own instance, sharing the Context."""

    def __init__(self, ctx: Context, fn: Callable, src: Source, funcdef: Tree):
        self.ctx, self.fn, self.src, self.funcdef = ctx, fn, src, funcdef
        self.def_loc = src.loc(funcdef)
        self.check_return: Callable[[Node, SourceLoc], Node] | None = None  # set for the mod itself

    # ------------------------------------------------ entry points

    def params(self) -> list[str]:
        is_async, _name, params, _returns, _body = self.funcdef.children
        if is_async is not None:
            self.refuse("async functions", self.funcdef)
        names = []
        for p in params.children if params is not None else []:
            if p.data == "param_star":
                self.refuse("`*args`" if p.children[1] is not None else "keyword-only parameters", p)
            if p.data in UNSUPPORTED_RULES:
                self.refuse(UNSUPPORTED_RULES[p.data], p)
            if p.data == "param":
                names.append(str(p.children[0]))
        return names

    def lower_body(self, env: dict[str, Value]) -> Node:
        result = self.block(self.statements(self.funcdef.children[-1]), env)
        if result is None:
            raise FlexcompTypeError(f"{self.src.fn_name!r} does not return a value on every path", self.def_loc,
                                    "every branch of an if/elif/else must end in `return`, or the function must "
                                    "end with one")
        return result

    # ------------------------------------------------ statements

    @staticmethod
    def statements(suite: Tree) -> list[Tree]:
        simple = [suite] if suite.data == "simple_stmt" else suite.children
        out = []
        for stmt in simple:
            if stmt.data == "simple_stmt":
                out.extend(c for c in stmt.children if c is not None)
            else:
                out.append(stmt)
        return out

    def block(self, stmts: list[Tree], env: dict[str, Value]) -> Node | None:
        """The value returned by `stmts` (None if control falls off the end)."""
        for i, stmt in enumerate(stmts):
            kind = stmt.data
            if kind == "return_stmt":
                if stmt.children[0] is None:
                    self.refuse("a bare `return` (a mod must return a value)", stmt)
                value = self.as_node(self.expr(stmt.children[0], env), stmt.children[0])
                return self.check_return(value, self.src.loc(stmt)) if self.check_return else value
            if kind == "if_stmt":
                if any(s.data == "return_stmt" for s in stmt.iter_subtrees()):
                    return self.if_returning(self.if_branches(stmt), stmt, stmts[i + 1:], env)
                self.if_assigning(self.if_branches(stmt), env)
            elif kind == "assign":
                self.assign(stmt, env)
            elif kind == "augassign":
                self.augassign(stmt, env)
            elif kind == "annassign":
                target, _annotation, value = stmt.children
                if value is not None:
                    self.bind(target, self.expr(value, env), env)
            elif kind == "expr_stmt":
                if stmt.children[0].data != "string":  # docstrings and bare strings are comments
                    self.expr(stmt.children[0], env)  # an unsupported call is the better message
                    self.refuse("an expression statement (its value would be discarded)", stmt)
            elif kind != "pass_stmt":
                self.refuse(UNSUPPORTED_RULES.get(kind, f"`{kind}`"), stmt)
        return None

    @staticmethod
    def if_branches(stmt: Tree) -> tuple[list[tuple[Tree, Tree]], Tree | None]:
        test, body, *rest = stmt.children
        branches = [(test, body)] + [tuple(c.children) for c in rest if c is not None and c.data == "elif_clause"]
        orelse = next((c.children[0] for c in rest if c is not None and c.data == "else_clause"), None)
        return branches, orelse

    def if_returning(self, parts: tuple, stmt: Tree, rest: list[Tree], env: dict[str, Value]) -> Node | None:
        # Each branch continues with the statements after the if: a select of the paths' results.
        branches, orelse = parts
        if not branches:
            return self.block((self.statements(orelse) if orelse is not None else []) + rest, dict(env))
        (test, body), later = branches[0], branches[1:]
        cond = self.condition(test, env)
        if_true = self.block(self.statements(body) + rest, dict(env))
        if_false = self.if_returning((later, orelse), stmt, rest, env)
        if if_true is None or if_false is None:
            return None
        return where(cond, if_true, if_false, self.src.loc(test))

    def if_assigning(self, parts: tuple, env: dict[str, Value]) -> None:
        # No branch returns: run each on a copy of the locals, then select every local that differs.
        branches, orelse = parts
        if not branches:
            if orelse is not None:
                self.block(self.statements(orelse), env)
            return
        (test, body), later = branches[0], branches[1:]
        cond = self.condition(test, env)
        env_true, env_false = dict(env), dict(env)
        self.block(self.statements(body), env_true)
        self.if_assigning((later, orelse), env_false)
        loc = self.src.loc(test)
        for name in set(env_true) | set(env_false):
            a, b = env_true.get(name), env_false.get(name)
            if a is None or b is None:
                env.pop(name, None)  # bound on one path only: using it later is an error
            elif a is b or a == b:
                env[name] = a
            else:
                env[name] = where(cond, self.as_node(a, test), self.as_node(b, test), loc)

    def condition(self, test: Tree, env: dict[str, Value]) -> Node:
        return to_bool(self.as_node(self.expr(test, env), test), self.src.loc(test))

    def assign(self, stmt: Tree, env: dict[str, Value]) -> None:
        *targets, value_tree = stmt.children
        value = self.expr_or_tuple(value_tree, env)
        for target in targets:
            self.bind(target, value, env)

    def expr_or_tuple(self, tree: Tree, env: dict[str, Value]) -> Value:
        if tree.data == "tuple":
            return tuple(self.expr(c, env) for c in tree.children if c is not None)
        return self.expr(tree, env)

    def bind(self, target: Tree, value: Value, env: dict[str, Value]) -> None:
        if target.data == "name":
            env[str(target.children[0])] = value
        elif target.data == "tuple" and isinstance(value, tuple):
            names = [c for c in target.children if c is not None]
            if len(names) != len(value):
                raise FlexcompTypeError(f"cannot unpack {len(value)} values into {len(names)} names",
                                        self.src.loc(target))
            for t, v in zip(names, value):
                self.bind(t, v, env)
        else:
            self.refuse("assignment to anything but a local name", target)

    def augassign(self, stmt: Tree, env: dict[str, Value]) -> None:
        target, op, value = stmt.children
        if target.data != "name":
            self.refuse("augmented assignment to anything but a local name", target)
        symbol = str(op)[:-1]
        if symbol not in BINOPS:
            self.refuse(f"`{op}`", op)
        left = self.as_node(self.expr(target, env), target)
        env[str(target.children[0])] = self.arith(symbol, left, self.as_node(self.expr(value, env), value), op)

    # ------------------------------------------------ expressions

    def expr(self, tree: Tree, env: dict[str, Value]) -> Value:
        if tree.data in UNSUPPORTED_RULES:
            self.refuse(UNSUPPORTED_RULES[tree.data], tree)
        method = getattr(self, f"expr_{tree.data}", None)
        if method is None:
            self.refuse(f"`{tree.data}`", tree)
        return method(tree, env)

    def expr_name(self, tree: Tree, env: dict[str, Value]) -> Value:
        name = str(tree.children[0])
        if name in env:
            return env[name]
        return self.resolve_free(name, self.src.loc(tree))

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
        if any("f" in p[: p.index(p[-1])].lower() for p in parts):
            self.refuse("f-strings", tree)
        return Text("".join(p[p.index(p[-1]):].strip("'\"") for p in parts))

    def expr_none(self, tree: Tree, env: dict[str, Value]) -> Text:
        return NONE

    def expr_paren(self, tree: Tree, env: dict[str, Value]) -> Value:
        return self.expr(tree.children[0], env)

    def expr_ifexp(self, tree: Tree, env: dict[str, Value]) -> Node:
        body, test, orelse = tree.children
        cond = self.condition(test, env)
        a, b = self.as_node(self.expr(body, env), body), self.as_node(self.expr(orelse, env), orelse)
        return where(cond, a, b, self.src.loc(tree))

    def expr_boolop(self, tree: Tree, env: dict[str, Value]) -> Node:
        left, op, right = tree.children
        a, b = self.as_node(self.expr(left, env), left), self.as_node(self.expr(right, env), right)
        return logical(Op.AND if op == "and" else Op.OR, a, b, self.src.loc(tree))

    def expr_unary(self, tree: Tree, env: dict[str, Value]) -> Node:
        op, operand = tree.children
        x = self.as_node(self.expr(operand, env), operand)
        loc = self.src.loc(tree)
        if op == "not":
            return Node(Op.NOT, DType.BOOL, (to_bool(x, loc),), None, loc)
        if op == "+":
            return x
        return unary(Op.NEG if op == "-" else Op.NOT, x, loc)

    def expr_compare(self, tree: Tree, env: dict[str, Value]) -> Node:
        items = tree.children
        operands = [self.as_node(self.expr(t, env), t) for t in items[0::2]]
        result = None
        for i, op_tree in enumerate(items[1::2]):
            symbol = " ".join(str(t) for t in op_tree.children)
            if symbol not in BINOPS:
                self.refuse(f"`{symbol}` comparisons", op_tree)
            loc = self.src.loc(op_tree)
            pair = binary(BINOPS[symbol], operands[i], operands[i + 1], loc)
            result = pair if result is None else logical(Op.AND, result, pair, loc)  # a < b < c -> a<b & b<c
        return result

    def expr_binop(self, tree: Tree, env: dict[str, Value]) -> Node:
        left, op, right = tree.children
        a, b = self.as_node(self.expr(left, env), left), self.as_node(self.expr(right, env), right)
        return self.arith(str(op), a, b, op)

    def arith(self, symbol: str, a: Node, b: Node, where_: Token) -> Node:
        if symbol in ("<<", ">>"):
            self.refuse("shift operators `<<`/`>>`", where_)
        if symbol == "@":
            self.refuse("matrix multiplication `@`", where_)
        return binary(BINOPS[symbol], a, b, self.src.loc(where_))

    def expr_attribute(self, tree: Tree, env: dict[str, Value]) -> Value:
        base_tree, name_token = tree.children
        base, name = self.expr(base_tree, env), str(name_token)
        loc = self.src.loc(tree)
        if isinstance(base, Module):
            return self.module_attribute(base.name, name, loc)
        if isinstance(base, Captured) and not base.spec.shape:
            base = self.as_node(base, base_tree)
        if isinstance(base, Node) and name in METHODS:
            return Method(base, name)
        raise UnsupportedConstructError(f"attribute `.{name}` of {describe(base)} is not supported", loc, ALLOWED)

    def module_attribute(self, module: str, name: str, loc: SourceLoc) -> Value:
        if name in MODULE_CONSTANTS[module]:
            return const(MODULE_CONSTANTS[module][name], DType.F32, loc)
        funcs = TORCH_FUNCS if module == "torch" else MATH_FUNCS
        if name in funcs:
            return Builtin(funcs[name])
        if module == "torch" and name in TORCH_DTYPES:
            return TorchDType(TORCH_DTYPES[name], name)
        raise UnsupportedConstructError(f"`{module}.{name}` is not supported in a mod", loc,
                                        f"supported: {', '.join(sorted(funcs))}; {ALLOWED}")

    def expr_subscript(self, tree: Tree, env: dict[str, Value]) -> Node:
        base_tree, subscripts = tree.children
        base = self.expr(base_tree, env)
        loc = self.src.loc(tree)
        if not isinstance(base, Captured):
            raise UnsupportedConstructError(f"subscript of {describe(base)}: only captured tensors can be indexed",
                                            loc, ALLOWED)
        items = [c for c in subscripts.children if c is not None]
        indices = []
        for item in items:
            if item.data == "slice":
                self.refuse("slices", item)
            index = self.as_node(self.expr(item, env), item)
            if index.dtype != DType.I32:
                raise FlexcompTypeError(f"index into {base.spec.name!r} must be an int, got {index.dtype.value}",
                                        self.src.loc(item), "use int(...) or // to make an integer index")
            indices.append(index)
        ndim = len(base.spec.shape)
        if len(indices) != ndim:
            raise FlexcompTypeError(f"captured tensor {base.spec.name!r} has {ndim} dims (shape {base.spec.shape}) "
                                    f"but is indexed with {len(indices)} indices", loc)
        return load(base.spec.name, base.spec.ir_dtype, tuple(indices), loc)

    def expr_call(self, tree: Tree, env: dict[str, Value]) -> Node:
        callee_tree, arguments = tree.children
        callee = self.expr(callee_tree, env)
        loc = self.src.loc(tree)
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
        if isinstance(callee, Builtin):
            return self.call_builtin(callee.key, args, kwargs, loc)
        if isinstance(callee, Method):
            return self.call_method(callee, args, kwargs, loc)
        if isinstance(callee, TorchDType):
            return self.call_builtin("float" if callee.dtype == DType.F32 else callee.dtype.value, args, kwargs, loc)
        if isinstance(callee, ModRef):
            return self.call_mod(callee.mod, args, kwargs, loc)
        if isinstance(callee, PyFunction):
            return self.call_function(callee.fn, args, kwargs, loc)
        raise UnsupportedConstructError(f"calling {describe(callee)} is not supported", loc, ALLOWED)

    # ------------------------------------------------ calls

    def call_builtin(self, key: str, args: list, kwargs: dict, loc: SourceLoc) -> Node:
        if key == "float" and len(args) == 1 and isinstance(args[0][0], Text) and not kwargs:
            return self.float_of_text(args[0][0].value, loc)
        if key == "clamp":
            return self.clamp(args, kwargs, loc)
        if kwargs:
            raise UnsupportedConstructError(f"keyword arguments to `{key}` are not supported", loc, ALLOWED)
        xs = [self.as_node(v, t) for v, t in args]
        arity = {"where": (3, 3), "min": (2, 99), "max": (2, 99), "min2": (2, 2), "max2": (2, 2), "pow": (2, 2),
                 "mod": (2, 2), "floordiv": (2, 2), "logical_and": (2, 2), "logical_or": (2, 2)}.get(key, (1, 1))
        if not arity[0] <= len(xs) <= arity[1]:
            want = f"{arity[0]}" if arity[0] == arity[1] else f"at least {arity[0]}"
            raise SignatureError(f"`{key}` takes {want} arguments here, got {len(xs)}", loc)
        return self.apply_builtin(key, xs, loc)

    def apply_builtin(self, key: str, xs: list[Node], loc: SourceLoc) -> Node:
        if key in UNARY_FLOAT:
            return unary(UNARY_FLOAT[key], xs[0], loc)
        simple = {"abs": Op.ABS, "floor": Op.FLOOR, "neg": Op.NEG}
        if key in simple:
            return unary(simple[key], xs[0], loc)
        if key in ("int", "float", "bool"):
            return cast(xs[0], {"int": DType.I32, "float": DType.F32, "bool": DType.BOOL}[key], loc)
        if key == "where":
            return where(xs[0], xs[1], xs[2], loc)
        if key in ("min", "max", "min2", "max2"):
            op = Op.MIN if key.startswith("min") else Op.MAX
            result = xs[0]
            for x in xs[1:]:
                result = binary(op, result, x, loc)
            return result
        if key == "logical_not":
            return Node(Op.NOT, DType.BOOL, (to_bool(xs[0], loc),), None, loc)
        if key in ("logical_and", "logical_or"):
            return logical(Op.AND if key == "logical_and" else Op.OR, xs[0], xs[1], loc)
        return binary({"pow": Op.POW, "mod": Op.MOD, "floordiv": Op.FLOORDIV}[key], xs[0], xs[1], loc)

    def clamp(self, args: list, kwargs: dict, loc: SourceLoc) -> Node:
        names = ["input", "min", "max"]
        if len(args) > 3 or set(kwargs) - set(names):
            raise SignatureError(f"clamp takes (input, min=None, max=None), got {len(args)} positional arguments "
                                 f"and keywords {sorted(kwargs)}", loc)
        bound = dict(zip(names, args)) | kwargs
        if "input" not in bound:
            raise SignatureError("clamp needs an input", loc)
        nodes = {k: self.as_node(v, t) for k, (v, t) in bound.items() if v is not NONE}
        result = nodes["input"]
        if "min" in nodes:
            result = binary(Op.MAX, result, nodes["min"], loc)
        if "max" in nodes:
            result = binary(Op.MIN, result, nodes["max"], loc)
        return result

    def call_method(self, method: Method, args: list, kwargs: dict, loc: SourceLoc) -> Node:
        key = METHODS[method.name]
        if key == "to":
            targets = [v for v, _ in args] + [v for k, (v, _) in kwargs.items() if k == "dtype"]
            if len(targets) != 1 or not isinstance(targets[0], TorchDType):
                raise UnsupportedConstructError(f"`.{method.name}(...)` needs exactly one torch dtype argument", loc,
                                                "e.g. `x.to(torch.float32)`")
            return cast(method.receiver, targets[0].dtype, loc)
        return self.call_builtin(key, [(method.receiver, None)] + args, kwargs, loc)

    def float_of_text(self, text: str, loc: SourceLoc) -> Node:
        try:
            value = float(text)
        except ValueError:
            raise FlexcompTypeError(f"float({text!r}) is not a number", loc) from None
        return const(value, DType.F32, loc)

    def call_mod(self, mod: Any, args: list, kwargs: dict, loc: SourceLoc) -> Node:
        names = SCORE_MOD_ARGS if mod.kind == "score" else MASK_MOD_ARGS
        if kwargs or len(args) != len(names):
            raise SignatureError(f"{mod.kind}_mod {mod.name!r} takes {len(names)} positional arguments "
                                 f"({', '.join(names)}), got {len(args)}" + (" and keywords" if kwargs else ""), loc)
        mapping = {}
        for name, (value, tree) in zip(names, args):
            node = self.as_node(value, tree)
            want = ARG_DTYPES[name]
            if want == DType.I32 and node.dtype == DType.F32:
                raise FlexcompTypeError(f"argument {name!r} of {mod.name!r} must be an int, got a float",
                                        self.src.loc(tree, loc))
            mapping[arg(name)] = cast(node, want, loc)
        body = self.ctx.buffers.merge(mod.buffers, mod.resolvers, mod.raw_ir)
        return substitute(body, mapping)

    def call_function(self, fn: Callable, args: list, kwargs: dict, loc: SourceLoc) -> Node:
        code = getattr(fn, "__code__", None)
        if code in self.ctx.stack:
            chain = " -> ".join(c.co_name for c in self.ctx.stack) + f" -> {code.co_name}"
            raise UnsupportedConstructError(f"recursive call to {fn.__name__!r} ({chain})", loc,
                                            "mods are inlined, so recursion is not supported")
        src = read_source(fn)
        helper = FunctionLowering(self.ctx, fn, src, parse_source(src).children[-1])
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

    # ------------------------------------------------ names

    def resolve_free(self, name: str, loc: SourceLoc) -> Value:
        """A name not bound locally: closure cell, then globals, then the allowed builtins."""
        code = self.fn.__code__
        if name in code.co_freevars:
            cell = self.fn.__closure__[code.co_freevars.index(name)]
            try:
                value = cell.cell_contents
            except ValueError:
                raise UndefinedNameError(f"free variable {name!r} is not bound yet", loc) from None
            return self.capture(name, value, lambda: cell.cell_contents, loc)
        if name in self.fn.__globals__:
            return self.capture(name, self.fn.__globals__[name], lambda: self.fn.__globals__[name], loc)
        if name in PY_BUILTINS:
            return Builtin(PY_BUILTINS[name])
        if hasattr(builtins, name):
            raise UnsupportedConstructError(f"the builtin `{name}` is not supported in a mod", loc,
                                            f"supported builtins: {', '.join(PY_BUILTINS)}")
        raise UndefinedNameError(f"name {name!r} is not defined", loc,
                                 "a mod may use its parameters, its locals, and names bound in its closure or module")

    def capture(self, name: str, value: Any, read: Callable[[], Any], loc: SourceLoc) -> Value:
        if isinstance(value, bool):
            return const(value, DType.BOOL, loc)
        if isinstance(value, numbers.Integral):
            return int_const(int(value), loc, f"captured int {name!r} =")
        if isinstance(value, numbers.Real):
            return const(float(value), DType.F32, loc)
        if isinstance(value, torch.Tensor):
            spec = tensor_spec(name, value, loc)
            return Captured(BufferSpec(self.ctx.buffers.add(spec, checked_resolver(spec, read)), spec.dtype,
                                       spec.shape))
        if isinstance(value, torch.dtype):
            return TorchDType({**TORCH_DTYPES}.get(str(value).removeprefix("torch."), DType.F32), str(value))
        if isinstance(value, types.ModuleType) and value in MODULES.values():
            return Module(value.__name__)
        key = known_callable(value)
        if key is not None:
            return Builtin(key)
        from .mods import Mod

        if isinstance(value, Mod):
            return ModRef(value)
        if isinstance(value, types.FunctionType):
            return PyFunction(value)
        raise SignatureError(f"{name!r} is a {type(value).__module__}.{type(value).__qualname__}: a mod can capture "
                             "only ints, floats, bools, torch tensors, torch/math, other mods and plain functions", loc)

    # ------------------------------------------------ helpers

    def as_node(self, value: Value, tree: Any) -> Node:
        if isinstance(value, Node):
            return value
        loc = self.src.loc(tree, self.def_loc) if tree is not None else self.def_loc
        if isinstance(value, Captured):
            if not value.spec.shape:
                return load(value.spec.name, value.spec.ir_dtype, (), loc)
            raise FlexcompTypeError(f"captured tensor {value.spec.name!r} has shape {value.spec.shape}: index it "
                                    f"with {len(value.spec.shape)} indices, e.g. {value.spec.name}[h, q_idx]", loc)
        if value is NONE:
            raise UnsupportedConstructError("`None` not supported in a mod (only as a clamp bound)", loc, ALLOWED)
        if isinstance(value, Text):
            raise UnsupportedConstructError("string literals (only float(\"inf\") and float(\"-inf\"))", loc, ALLOWED)
        raise FlexcompTypeError(f"{describe(value)} cannot be used as a value", loc, ALLOWED)

    def refuse(self, construct: str, tree: Any) -> None:
        raise UnsupportedConstructError(f"{construct} not supported in a mod (in {self.src.fn_name!r})",
                                        self.src.loc(tree, self.def_loc), ALLOWED)


def describe(value: Value) -> str:
    if isinstance(value, Module):
        return f"module `{value.name}`"
    if isinstance(value, Builtin):
        return f"function `{value.key}`"
    if isinstance(value, PyFunction):
        return f"function `{value.fn.__name__}`"
    if isinstance(value, ModRef):
        return f"mod `{value.mod.name}`"
    if isinstance(value, Captured):
        return f"captured tensor `{value.spec.name}`"
    if isinstance(value, TorchDType):
        return f"dtype `{value.name}`"
    if isinstance(value, Method):
        return f"method `.{value.name}`"
    if isinstance(value, tuple):
        return "a tuple"
    if isinstance(value, Node):
        return f"a {value.dtype.value} value"
    return type(value).__name__


# ---------------------------------------------------------------- entry point


@dataclass(frozen=True)
class Lowered:
    raw_ir: Node
    buffers: tuple[BufferSpec, ...]
    resolvers: dict[str, Callable[[], Any]]
    loc: SourceLoc | None


def lower_function(fn: Callable, kind: str) -> Lowered:
    """Parse and lower `fn` as a score_mod (kind "score") or mask_mod ("mask")."""
    if not isinstance(fn, types.FunctionType):
        raise SignatureError(f"a {kind}_mod must be a plain Python function, got {type(fn).__name__}")
    src = read_source(fn)
    ctx = Context(stack=[fn.__code__])
    lowering = FunctionLowering(ctx, fn, src, parse_source(src).children[-1])
    try:
        return _lower_mod(lowering, kind)
    except FlexcompError:
        raise
    except RecursionError:
        raise UnsupportedConstructError(f"{src.fn_name!r} is nested too deeply to compile", lowering.def_loc) from None


def _lower_mod(lowering: FunctionLowering, kind: str) -> Lowered:
    params = lowering.params()
    canonical = SCORE_MOD_ARGS if kind == "score" else MASK_MOD_ARGS
    if len(params) != len(canonical):
        raise SignatureError(f"a {kind}_mod takes {len(canonical)} parameters ({', '.join(canonical)}), "
                             f"{lowering.src.fn_name!r} takes {len(params)}", lowering.def_loc)
    env = {p: arg(c, lowering.def_loc) for p, c in zip(params, canonical)}
    lowering.check_return = check_score_return if kind == "score" else check_mask_return
    root = lowering.lower_body(env)
    ctx = lowering.ctx
    return Lowered(root, tuple(ctx.buffers.specs.values()), dict(ctx.buffers.resolvers), lowering.def_loc)


def check_score_return(value: Node, loc: SourceLoc) -> Node:
    if value.dtype == DType.BOOL:
        raise FlexcompTypeError("a score_mod must return a number, this returns a bool", loc,
                                "to mask, return torch.where(cond, score, float('-inf')) or use a mask_mod")
    return cast(value, DType.F32, loc)


def check_mask_return(value: Node, loc: SourceLoc) -> Node:
    if value.dtype != DType.BOOL:
        raise FlexcompTypeError(f"a mask_mod must return a bool, this returns {value.dtype.value}", loc,
                                "return a comparison, e.g. `q_idx >= kv_idx`")
    return value
