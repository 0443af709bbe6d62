"""The flexcomp IR: one node type, typed, structurally hashed.

A mod is a small DAG of `Node`s.  Leaves are constants (`CONST`), the mod's
parameters (`ARG`) and reads of captured tensors (`LOAD`); everything else is
an operator applied to its sources.  Nodes are frozen dataclasses, so two nodes
built the same way are equal and hash the same: that gives common
subexpression elimination for free (see `rewrite.py`) and a cache key for
generated kernels (see `structural_key`).

Types follow torch FlexAttention: indices are int32 (`I32`), score arithmetic
is float32 (`F32`; float64 when the inputs are float64), masks are `BOOL`.
"""

from __future__ import annotations

import enum
import hashlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any


class DType(enum.Enum):
    BOOL = "bool"
    I32 = "i32"
    F32 = "f32"

    def __repr__(self) -> str:
        return self.value


class Op(enum.Enum):
    # leaves
    CONST = "const"  # arg: a Python bool, int or float (float may be +-inf)
    ARG = "arg"  # arg: a name from ARG_DTYPES
    LOAD = "load"  # arg: captured buffer name; src: one i32 index per tensor dim
    # unary
    NEG = "neg"
    NOT = "not"  # logical not on bool, bitwise invert on i32 (torch's `~`)
    ABS = "abs"
    EXP = "exp"
    EXP2 = "exp2"
    LOG = "log"
    LOG2 = "log2"
    SQRT = "sqrt"
    RSQRT = "rsqrt"
    TANH = "tanh"
    SIGMOID = "sigmoid"
    SIN = "sin"
    COS = "cos"
    TAN = "tan"
    ERF = "erf"
    LOG1P = "log1p"  # log(1 + x), accurate for small x
    EXPM1 = "expm1"  # exp(x) - 1, accurate for small x
    FLOOR = "floor"
    ROUND = "round"  # to the nearest integer, halves to even (torch.round, Python's round)
    CAST = "cast"  # to the node's dtype
    # binary
    ADD = "add"
    SUB = "sub"
    MUL = "mul"
    DIV = "div"  # true division, always float
    FLOORDIV = "floordiv"  # Python semantics: rounds toward -inf
    MOD = "mod"  # Python semantics: result has the divisor's sign
    POW = "pow"
    MIN = "min"
    MAX = "max"
    LT = "lt"
    LE = "le"
    GT = "gt"
    GE = "ge"
    EQ = "eq"
    NE = "ne"
    AND = "and"  # logical on bool, bitwise on i32
    OR = "or"
    XOR = "xor"
    SHL = "shl"  # int32 a << b: wraps; a count of 32 or more gives 0, a negative count shifts by 0
    SHR = "shr"  # int32 a >> b: arithmetic (Python's floor(a / 2**b)); counts clamp to 0..31
    # ternary
    WHERE = "where"  # src: (cond, if_true, if_false)


UNARY_FLOAT_OPS = frozenset(
    {Op.EXP, Op.EXP2, Op.LOG, Op.LOG2, Op.SQRT, Op.RSQRT, Op.TANH, Op.SIGMOID, Op.SIN, Op.COS, Op.TAN, Op.ERF,
     Op.LOG1P, Op.EXPM1}
)
ARITHMETIC_OPS = frozenset({Op.ADD, Op.SUB, Op.MUL, Op.FLOORDIV, Op.MOD, Op.POW, Op.MIN, Op.MAX})
COMPARISON_OPS = frozenset({Op.LT, Op.LE, Op.GT, Op.GE, Op.EQ, Op.NE})
LOGICAL_OPS = frozenset({Op.AND, Op.OR, Op.XOR})
SHIFT_OPS = frozenset({Op.SHL, Op.SHR})
COMMUTATIVE_OPS = frozenset({Op.ADD, Op.MUL, Op.MIN, Op.MAX, Op.EQ, Op.NE, Op.AND, Op.OR, Op.XOR})

# The mods' parameters, by canonical name (users may name them as they like),
# plus the names the sparsity analysis uses for its closed-form loop bounds.
ARG_DTYPES: dict[str, DType] = {
    "score": DType.F32,
    "b": DType.I32,
    "h": DType.I32,
    "q_idx": DType.I32,
    "kv_idx": DType.I32,
    # bounds only: the first and last q index of a tile, and the sequence lengths
    "q_lo": DType.I32,
    "q_hi": DType.I32,
    "Q_LEN": DType.I32,
    "KV_LEN": DType.I32,
    # codegen only: the softmax scale, folded into a score_mod's own scalar factors (codegen/base2.py)
    "sm_scale": DType.F32,
}
SCORE_MOD_ARGS = ("score", "b", "h", "q_idx", "kv_idx")
MASK_MOD_ARGS = ("b", "h", "q_idx", "kv_idx")

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


@dataclass(frozen=True)
class Node:
    """One IR node.  `loc` (a `SourceLoc`, for error messages) is not part of equality."""

    op: Op
    dtype: DType
    src: tuple[Node, ...] = ()
    arg: Any = None
    loc: Any = field(default=None, compare=False, repr=False)

    # Hashing recurses through `src`; cache it so a DAG with sharing hashes in linear time.
    @cached_property
    def _hash(self) -> int:
        return hash((self.op, self.dtype, self.src, self.arg))

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        if self is other:
            return True
        if not isinstance(other, Node) or self._hash != other._hash:
            return False
        return (self.op, self.dtype, self.arg, self.src) == (other.op, other.dtype, other.arg, other.src)

    def __repr__(self) -> str:
        return f"<Node {self.op.value}:{self.dtype.value} arg={self.arg!r} n_src={len(self.src)}>"

    def __str__(self) -> str:
        return to_text(self)

    def replace(self, **changes: Any) -> Node:
        """A copy with some fields changed; returns `self` when nothing changes."""
        if all(getattr(self, k) is v for k, v in changes.items()):
            return self
        return Node(**{"op": self.op, "dtype": self.dtype, "src": self.src, "arg": self.arg, "loc": self.loc, **changes})


# ---------------------------------------------------------------- constructors


def const(value: bool | float, dtype: DType | None = None, loc: Any = None) -> Node:
    if dtype is None:
        dtype = DType.BOOL if isinstance(value, bool) else DType.I32 if isinstance(value, int) else DType.F32
    value = {DType.BOOL: bool, DType.I32: int, DType.F32: float}[dtype](value)
    return Node(Op.CONST, dtype, (), value, loc)


def arg(name: str, loc: Any = None) -> Node:
    return Node(Op.ARG, ARG_DTYPES[name], (), name, loc)


def load(buffer: str, dtype: DType, indices: tuple[Node, ...], loc: Any = None) -> Node:
    return Node(Op.LOAD, dtype, tuple(indices), buffer, loc)


# ---------------------------------------------------------------- typing


def promote(*dtypes: DType) -> DType:
    """torch's promotion among our three types: bool < i32 < f32."""
    order = [DType.BOOL, DType.I32, DType.F32]
    return max(dtypes, key=order.index)


def result_dtype(op: Op, src_dtypes: tuple[DType, ...]) -> DType:
    """The dtype of `op` applied to sources of `src_dtypes` (torch semantics)."""
    if op in COMPARISON_OPS:
        return DType.BOOL
    if op in UNARY_FLOAT_OPS or op == Op.DIV:
        return DType.F32
    if op == Op.WHERE:
        return promote(*src_dtypes[1:])
    if op in SHIFT_OPS:
        return DType.I32
    if op in LOGICAL_OPS or op == Op.NOT:
        return promote(*src_dtypes)  # bool stays bool; an int operand makes it bitwise i32
    if op in ARITHMETIC_OPS or op in (Op.NEG, Op.ABS, Op.FLOOR, Op.ROUND):
        # torch: bool arithmetic promotes to int64 (our i32); floor and round keep ints as ints
        return DType.I32 if promote(*src_dtypes) == DType.BOOL else promote(*src_dtypes)
    raise ValueError(f"no typing rule for {op}")


# ---------------------------------------------------------------- traversal


def toposort(root: Node) -> list[Node]:
    """Every distinct node reachable from `root`, sources before users."""
    order: list[Node] = []
    seen: set[Node] = set()
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:
        node, expanded = stack.pop()
        if expanded:
            order.append(node)
            continue
        if node in seen:
            continue
        seen.add(node)
        stack.append((node, True))
        stack.extend((s, False) for s in reversed(node.src) if s not in seen)
    return order


def walk(root: Node) -> Iterator[Node]:
    yield from toposort(root)


def free_args(root: Node) -> frozenset[str]:
    """Names of the ARGs the expression depends on."""
    return frozenset(n.arg for n in toposort(root) if n.op == Op.ARG)


def substitute(root: Node, mapping: dict[Node, Node]) -> Node:
    """Replace every occurrence of the keys of `mapping` (bottom-up, sharing preserved)."""
    done: dict[Node, Node] = {}
    for node in toposort(root):
        if node in mapping:
            done[node] = mapping[node]
        else:
            done[node] = node.replace(src=tuple(done[s] for s in node.src)) if node.src else node
    return done[root]


def map_nodes(root: Node, fn: Callable[[Node], Node | None]) -> Node:
    """Rebuild bottom-up; `fn(node_with_new_sources)` may return a replacement or None."""
    done: dict[Node, Node] = {}
    for node in toposort(root):
        rebuilt = node.replace(src=tuple(done[s] for s in node.src)) if node.src else node
        done[node] = fn(rebuilt) or rebuilt
    return done[root]


# ---------------------------------------------------------------- text form


def _format_const(value: Any) -> str:
    if isinstance(value, float):
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    return repr(value)


def to_text(root: Node) -> str:
    """An SSA-style listing, one node per line, e.g.

    %0 = arg q_idx : i32
    %1 = arg kv_idx : i32
    %2 = ge %0, %1 : bool
    return %2
    """
    names: dict[Node, str] = {}
    lines = []
    for node in toposort(root):
        name = f"%{len(names)}"
        names[node] = name
        if node.op == Op.CONST:
            rhs = f"const {_format_const(node.arg)}"
        elif node.op == Op.ARG:
            rhs = f"arg {node.arg}"
        elif node.op == Op.LOAD:
            rhs = f"load {node.arg}[{', '.join(names[s] for s in node.src)}]"
        else:
            rhs = f"{node.op.value} {', '.join(names[s] for s in node.src)}"
        lines.append(f"{name} = {rhs} : {node.dtype.value}")
    lines.append(f"return {names[root]}")
    return "\n".join(lines)


def to_expr(root: Node) -> str:
    """A one-line infix rendering, for short expressions such as loop bounds."""
    infix = {Op.ADD: "+", Op.SUB: "-", Op.MUL: "*", Op.DIV: "/", Op.FLOORDIV: "//", Op.MOD: "%",
             Op.POW: "**", Op.LT: "<", Op.LE: "<=", Op.GT: ">", Op.GE: ">=", Op.EQ: "==", Op.NE: "!=",
             Op.AND: "&", Op.OR: "|", Op.XOR: "^", Op.SHL: "<<", Op.SHR: ">>"}  # fmt: skip
    text: dict[Node, str] = {}
    for node in toposort(root):
        s = [text[x] for x in node.src]
        if node.op == Op.CONST:
            text[node] = _format_const(node.arg)
        elif node.op == Op.ARG:
            text[node] = node.arg
        elif node.op == Op.LOAD:
            text[node] = f"{node.arg}[{', '.join(s)}]"
        elif node.op in infix:
            text[node] = f"({s[0]} {infix[node.op]} {s[1]})"
        elif node.op == Op.NEG:
            text[node] = f"-{s[0]}"
        elif node.op == Op.NOT:
            text[node] = f"~{s[0]}"
        elif node.op == Op.CAST:
            text[node] = f"{node.dtype.value}({s[0]})"
        else:
            text[node] = f"{node.op.value}({', '.join(s)})"
    return text[root]


# ---------------------------------------------------------------- captured tensors


@dataclass(frozen=True)
class BufferSpec:
    """A captured tensor as the compiler sees it: name, dtype and shape, never its values."""

    name: str
    dtype: str  # torch dtype name without the prefix: "float32", "int64", "bool", ...
    shape: tuple[int, ...]

    @property
    def ir_dtype(self) -> DType:
        if self.dtype == "bool":
            return DType.BOOL
        if self.dtype.startswith(("int", "uint")):
            return DType.I32
        return DType.F32


def structural_key(kind: str, root: Node, buffers: tuple[BufferSpec, ...]) -> str:
    """A stable hex digest of a mod's meaning: the kernel cache key.

    Built from the text form (not Python's salted `hash`) so it is the same in
    every process.  Captured tensor values are not part of it; dtypes and shapes are.
    """
    text = f"{kind}\n{to_text(root)}\n{buffers!r}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]
