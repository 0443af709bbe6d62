"""IR -> Triton expression text, through one op table.

Shared by every kernel template (forward now, backward later): a template asks
`render_block` for the SSA lines of some IR roots, given the names under which
the mod's arguments (and any values computed earlier, e.g. hoisted out of a
loop) are available, and pastes them into its text.

Typing follows flexcomp/ir.py: each operand is coerced to the dtype the op works
in (the node's dtype for arithmetic, the promoted source dtype for comparisons),
so Triton's own promotion rules never decide anything.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

from flexcomp.errors import BackendError
from flexcomp.ir import BufferSpec, DType, Node, Op, promote, toposort

TL_DTYPE = {DType.BOOL: "tl.int1", DType.I32: "tl.int32", DType.F32: "tl.float32"}
MAX_POW_UNROLL = 8  # x ** n with a constant |n| <= this becomes a product


@dataclass(frozen=True)
class Operand:
    """A source as the op table sees it: its node and its text, coerced on request."""

    node: Node
    text: str
    as_tensor: bool = False  # a constant that must be a 0-d tensor, not a Python literal

    def as_(self, dtype: DType) -> str:
        if self.node.op == Op.CONST:
            return (tensor_literal if self.as_tensor else literal)(self.node.arg, dtype)
        if self.node.dtype == dtype:
            return self.text
        if dtype == DType.BOOL:
            return f"({self.text} != 0)"
        return f"{self.text}.to({TL_DTYPE[dtype]})"


def literal(value: bool | float, dtype: DType) -> str:
    """A Python literal of `value` in `dtype` (Triton types bare literals weakly, like torch scalars)."""
    if dtype == DType.BOOL:
        return repr(bool(value))
    if dtype == DType.I32:
        return f"({int(value)})" if value < 0 else str(int(value))
    value = float(value)
    if math.isinf(value):
        return 'float("inf")' if value > 0 else 'float("-inf")'
    if math.isnan(value):
        return 'float("nan")'
    return f"({value!r})" if value < 0 else repr(value)


def tensor_literal(value: bool | float, dtype: DType) -> str:
    """A 0-d tensor: for constants that would otherwise reach a tl.* call or a return as Python values."""
    return f"tl.full([], {literal(value, dtype)}, {TL_DTYPE[dtype]})"


# ---------------------------------------------------------------- the op table

Rule = Callable[[Node, list[Operand]], str]


def _float_call(fn: str) -> Rule:
    return lambda n, a: f"{fn}({a[0].as_(DType.F32)})"


def _infix(symbol: str) -> Rule:  # both operands in the node's dtype
    return lambda n, a: f"({a[0].as_(n.dtype)} {symbol} {a[1].as_(n.dtype)})"


def _compare(symbol: str) -> Rule:  # both operands in their promoted dtype
    def rule(n: Node, a: list[Operand]) -> str:
        dt = promote(*(s.dtype for s in n.src))
        return f"({a[0].as_(dt)} {symbol} {a[1].as_(dt)})"

    return rule


def _call2(fn: str) -> Rule:
    return lambda n, a: f"{fn}({a[0].as_(n.dtype)}, {a[1].as_(n.dtype)})"


def _floordiv(n: Node, a: list[Operand]) -> str:
    x, y = (o.as_(n.dtype) for o in a)
    if n.dtype == DType.F32:
        return f"tl.floor({x} / {y})"
    if n.src[1].op == Op.CONST and n.src[1].arg > 0:
        return f"floordiv_by_positive({x}, {y})"
    return f"floordiv_i32({x}, {y})"


def _mod(n: Node, a: list[Operand]) -> str:
    x, y = (o.as_(n.dtype) for o in a)
    if n.dtype == DType.F32:
        return f"({x} - {y} * tl.floor({x} / {y}))"
    if n.src[1].op == Op.CONST and n.src[1].arg > 0:
        return f"mod_by_positive({x}, {y})"
    return f"mod_i32({x}, {y})"


def _pow(n: Node, a: list[Operand]) -> str:
    base, exponent = a[0].as_(n.dtype), n.src[1]
    if exponent.op == Op.CONST and float(exponent.arg).is_integer() and abs(exponent.arg) <= MAX_POW_UNROLL:
        k = int(exponent.arg)
        if k < 0 and n.dtype == DType.I32:
            raise BackendError(f"integer ** negative constant is undefined: {k=}", loc=n.loc)
        product = " * ".join([base] * abs(k)) or literal(1, n.dtype)
        return f"({product})" if k >= 0 else f"(1.0 / ({product}))"
    if n.dtype == DType.I32:
        raise BackendError("integer ** with a non-constant (or large) exponent is not supported", loc=n.loc)
    if exponent.op == Op.CONST and exponent.arg == 0.5:
        return f"tl.sqrt({base})"
    # a ** b = 2 ** (b * log2 a): NaN for a < 0, as torch gives for non-integer b
    return f"tl.exp2({a[1].as_(DType.F32)} * tl.log2({base}))"


def _cast(n: Node, a: list[Operand]) -> str:
    return a[0].as_(n.dtype)  # float -> int truncates toward zero in both torch and Triton


def _not(n: Node, a: list[Operand]) -> str:
    return f"({a[0].as_(DType.BOOL)} == 0)" if n.dtype == DType.BOOL else f"(~{a[0].as_(n.dtype)})"


def _where(n: Node, a: list[Operand]) -> str:
    return f"tl.where({a[0].as_(DType.BOOL)}, {a[1].as_(n.dtype)}, {a[2].as_(n.dtype)})"


OP_RULES: dict[Op, Rule] = {
    Op.NEG: lambda n, a: f"(-{a[0].as_(n.dtype)})",
    Op.NOT: _not,
    Op.ABS: lambda n, a: f"tl.abs({a[0].as_(n.dtype)})",
    Op.EXP: _float_call("tl.exp"),
    Op.EXP2: _float_call("tl.exp2"),
    Op.LOG: _float_call("tl.log"),
    Op.LOG2: _float_call("tl.log2"),
    Op.SQRT: _float_call("tl.sqrt"),
    Op.RSQRT: _float_call("tl.rsqrt"),
    Op.TANH: lambda n, a: f"tanh_f32({a[0].as_(DType.F32)})",
    Op.SIGMOID: _float_call("tl.sigmoid"),
    Op.SIN: _float_call("tl.sin"),
    Op.COS: _float_call("tl.cos"),
    Op.FLOOR: lambda n, a: f"tl.floor({a[0].as_(n.dtype)})" if n.dtype == DType.F32 else a[0].as_(n.dtype),  # int: floor(x) = x
    Op.CAST: _cast,
    Op.ADD: _infix("+"),
    Op.SUB: _infix("-"),
    Op.MUL: _infix("*"),
    Op.DIV: lambda n, a: f"({a[0].as_(DType.F32)} / {a[1].as_(DType.F32)})",
    Op.FLOORDIV: _floordiv,
    Op.MOD: _mod,
    Op.POW: _pow,
    Op.MIN: _call2("tl.minimum"),
    Op.MAX: _call2("tl.maximum"),
    Op.LT: _compare("<"),
    Op.LE: _compare("<="),
    Op.GT: _compare(">"),
    Op.GE: _compare(">="),
    Op.EQ: _compare("=="),
    Op.NE: _compare("!="),
    Op.AND: _infix("&"),
    Op.OR: _infix("|"),
    Op.XOR: _infix("^"),
    Op.WHERE: _where,
}

# Small @triton.jit helpers the rules above call; every generated file starts with them.
PRELUDE = '''
@triton.jit
def floordiv_i32(a, b):
    # Triton's // truncates toward zero (C); Python's floors: step down when the signs differ
    q = a // b
    return q - (((a % b) != 0) & ((a < 0) != (b < 0))).to(tl.int32)


@triton.jit
def mod_i32(a, b):
    # Python's % takes the divisor's sign; Triton's takes the dividend's
    r = a % b
    return tl.where((r != 0) & ((r < 0) != (b < 0)), r + b, r)


@triton.jit
def floordiv_by_positive(a, b):
    return a // b - ((a % b) < 0).to(tl.int32)


@triton.jit
def mod_by_positive(a, b):
    r = a % b
    return tl.where(r < 0, r + b, r)


@triton.jit
def tanh_f32(x):
    # 2 sigmoid(2x) - 1: saturates to +-1 without overflow for large |x|
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def wrap_index(i, size):
    # Python's negative indices count from the end; anything still out of range is clamped, never read wild
    i = tl.where(i < 0, i + size, i)
    return tl.minimum(tl.maximum(i, 0), size - 1)
'''

# ---------------------------------------------------------------- captured tensors


def identifier(name: str) -> str:
    return re.sub(r"\W", "_", name)


def buffer_params(prefix: str, buffers: tuple[BufferSpec, ...]) -> list[str]:
    """Kernel parameters for captured tensors: a pointer and one stride per dim (shapes are constants)."""
    params = []
    for spec in buffers:
        base = f"{prefix}_{identifier(spec.name)}"
        params += [f"{base}_ptr"] + [f"{base}_stride{d}" for d in range(len(spec.shape))]
    return params


LOAD_CAST = {DType.BOOL: " != 0", DType.I32: ".to(tl.int32)", DType.F32: ".to(tl.float32)"}


def _render_load(n: Node, a: list[Operand], prefix: str, buffers: dict[str, BufferSpec]) -> str:
    spec = buffers[n.arg]
    base = f"{prefix}_{identifier(spec.name)}"
    terms = []
    for d, (index, size) in enumerate(zip(a, spec.shape)):
        if index.node.op == Op.CONST:  # fold the wrap and clamp now
            i = int(index.node.arg)
            i = min(max(i + size if i < 0 else i, 0), size - 1)
            terms.append(f"{i} * {base}_stride{d}")
        else:
            terms.append(f"wrap_index({index.as_(DType.I32)}, {size}) * {base}_stride{d}")
    return f"(tl.load({base}_ptr + {' + '.join(terms) or '0'}){LOAD_CAST[spec.ir_dtype]})"


# ---------------------------------------------------------------- rendering


def render_block(
    roots: list[Node],
    names: dict[Node, str],
    prefix: str,
    buffers: tuple[BufferSpec, ...],
    buffer_prefix: str,
    indent: str = "    ",
) -> tuple[list[str], list[str]]:
    """SSA lines computing `roots`, and each root's text.

    `names` maps nodes already available (ARGs, values hoisted earlier) to variable
    names; it is extended with every node this block assigns.  Constants are
    inlined as literals, except where all of an op's sources are constants (or a
    root is one): those become 0-d tensors so no tl.* call sees a Python number.
    """
    by_name = {spec.name: spec for spec in buffers}
    lines: list[str] = []
    for root in roots:
        for node in toposort(root):
            if node in names or node.op == Op.CONST:
                continue
            if node.op == Op.ARG:
                raise BackendError(f"argument {node.arg!r} is not available here", loc=node.loc)
            all_const = node.op != Op.LOAD and all(s.op == Op.CONST for s in node.src)
            operands = [Operand(s, names.get(s, ""), all_const) for s in node.src]
            if node.op == Op.LOAD:
                expr = _render_load(node, operands, buffer_prefix, by_name)
            elif node.op in OP_RULES:
                expr = OP_RULES[node.op](node, operands)
            else:
                raise BackendError(f"no Triton rule for op {node.op.value}", loc=node.loc)
            name = f"{prefix}{len(names)}"
            names[node] = name
            lines.append(f"{indent}{name} = {expr}")
    results = [names[r] if r in names else tensor_literal(r.arg, r.dtype) for r in roots]
    return lines, results


def variant_nodes(roots: list[Node], loop_args: frozenset[str]) -> set[Node]:
    """Nodes that depend on an ARG in `loop_args` (they must be computed inside the loop)."""
    variant: set[Node] = set()
    for root in roots:
        for node in toposort(root):
            if (node.op == Op.ARG and node.arg in loop_args) or any(s in variant for s in node.src):
                variant.add(node)
    return variant


def hoistable(roots: list[Node], loop_args: frozenset[str]) -> list[Node]:
    """Loop-invariant computed nodes that the loop body uses: compute them once, before the loop."""
    variant = variant_nodes(roots, loop_args)
    used_by_loop = {s for node in variant for s in node.src} | set(roots)
    seen, hoisted = set(), []
    for root in roots:
        for node in toposort(root):
            if node in used_by_loop and node not in variant and node.op not in (Op.CONST, Op.ARG) and node not in seen:
                seen.add(node)
                hoisted.append(node)
    return hoisted

