"""IR semantics, executed with torch: the one definition every backend is checked against.

`evaluate(root, env, tensors)` computes a mod's IR on broadcastable torch
tensors: `env` maps ARG names to tensors (int32 indices, a float score),
`tensors` maps captured buffer names to their current values.  Everything is
plain differentiable torch, so gradients flow to the score and to captured
float tensors.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping

import torch

from .ir import DType, Node, Op, toposort

Tensor = torch.Tensor


def _floordiv(a: Tensor, b: Tensor) -> Tensor:
    # Python's //: rounds toward -inf, for ints and floats alike
    if a.is_floating_point() or b.is_floating_point():
        return torch.floor(a / b)
    return torch.div(a, b, rounding_mode="floor")


def _floor(a: Tensor) -> Tensor:
    return torch.floor(a) if a.is_floating_point() else a


def _round(a: Tensor) -> Tensor:
    return torch.round(a) if a.is_floating_point() else a  # halves to even; an int is already whole


def _true_div(a: Tensor, b: Tensor) -> Tensor:
    # int / int is float division, as in Python and torch
    return torch.true_divide(a, b)


def _shift_left(a: Tensor, count: Tensor) -> Tensor:
    # int32 wrap-around computed in int64; a count of 32 or more shifts every bit out
    wide = (a.long() << count.clamp(0, 31).long()) & 0xFFFFFFFF
    wrapped = torch.where(wide >= 2**31, wide - 2**32, wide).to(a.dtype)
    return torch.where(count >= 32, torch.zeros_like(wrapped), wrapped)


def _shift_right(a: Tensor, count: Tensor) -> Tensor:
    return torch.bitwise_right_shift(a, count.clamp(0, 31).to(a.dtype))  # arithmetic, as Python's >>


# op -> torch function of the evaluated sources
OP_TABLE: dict[Op, Callable[..., Tensor]] = {
    Op.NEG: torch.neg,
    Op.NOT: torch.bitwise_not,  # logical not on bool, bitwise invert on ints
    Op.ABS: torch.abs,
    Op.EXP: torch.exp,
    Op.EXP2: torch.exp2,
    Op.LOG: torch.log,
    Op.LOG2: torch.log2,
    Op.SQRT: torch.sqrt,
    Op.RSQRT: torch.rsqrt,
    Op.TANH: torch.tanh,
    Op.SIGMOID: torch.sigmoid,
    Op.SIN: torch.sin,
    Op.COS: torch.cos,
    Op.TAN: torch.tan,
    Op.ERF: torch.erf,
    Op.LOG1P: torch.log1p,
    Op.EXPM1: torch.expm1,
    Op.FLOOR: _floor,
    Op.ROUND: _round,
    Op.ADD: torch.add,
    Op.SUB: torch.sub,
    Op.MUL: torch.mul,
    Op.DIV: _true_div,
    Op.FLOORDIV: _floordiv,
    Op.MOD: torch.remainder,  # Python's %: the result takes the divisor's sign
    Op.POW: torch.pow,
    Op.MIN: torch.minimum,
    Op.MAX: torch.maximum,
    Op.LT: torch.lt,
    Op.LE: torch.le,
    Op.GT: torch.gt,
    Op.GE: torch.ge,
    Op.EQ: torch.eq,
    Op.NE: torch.ne,
    Op.AND: torch.bitwise_and,
    Op.OR: torch.bitwise_or,
    Op.XOR: torch.bitwise_xor,
    Op.SHL: _shift_left,
    Op.SHR: _shift_right,
    Op.WHERE: torch.where,
}


def torch_dtype(dtype: DType, float_dtype: torch.dtype = torch.float32) -> torch.dtype:
    return {DType.BOOL: torch.bool, DType.I32: torch.int32, DType.F32: float_dtype}[dtype]


def safe_index(index: Tensor, size: int) -> Tensor:
    """Python's negative-index wrap, then a clamp into [0, size): never an out-of-bounds read.

    torch would raise on an index that is still out of range after wrapping; the
    kernels cannot raise, so both clamp, and the reference agrees with them.
    """
    index = index.long()
    index = torch.where(index < 0, index + size, index)
    return index.clamp(0, max(size - 1, 0))


def _load(table: Tensor, indices: list[Tensor], dtype: DType, float_dtype: torch.dtype) -> Tensor:
    if len(indices) != table.dim():
        raise ValueError(f"captured tensor has {table.dim()} dims but is read with {len(indices)} indices")
    if not indices:
        value = table
    else:
        indices = torch.broadcast_tensors(*[safe_index(i, table.shape[d]) for d, i in enumerate(indices)])
        value = table[tuple(indices)]
    return value.to(torch_dtype(dtype, float_dtype))


def evaluate(
    root: Node,
    env: Mapping[str, Tensor],
    tensors: Mapping[str, Tensor] | None = None,
    float_dtype: torch.dtype | None = None,
) -> Tensor:
    """The value of `root` with ARGs bound by `env` and LOADs reading `tensors` (broadcasting).

    Float nodes follow torch's type promotion, as a score_mod run by torch does: a literal is a Python
    float (it takes the other operand's dtype), ints become float32 (torch's default dtype), float32 meeting
    float64 gives float64.  So with a float64 score, `score + 0.1 * (kv_idx - q_idx)` computes the bias in
    float32 and only the sum in float64, exactly as torch.  Float tables load as float32, except float64
    tables in float64 attention (a float64 score): a float32 attention never turns float64, as in the kernels.
    An explicit `float_dtype` instead computes every float node in that dtype.  The result may be a
    broadcast view: callers that need a full tensor expand it.
    """
    tensors = tensors or {}
    score = env.get("score")
    wide = isinstance(score, Tensor) and score.dtype == torch.float64
    device = next((t.device for t in env.values() if isinstance(t, Tensor)), torch.device("cpu"))
    values: dict[Node, Tensor] = {}
    literal: set[Node] = set()  # float values made of constants only: Python floats, weak in promotion
    for node in toposort(root):
        if node.op == Op.CONST:
            value = torch.tensor(node.arg, dtype=_const_dtype(node.dtype, float_dtype), device=device)
            literal.add(node)
        elif node.op == Op.ARG:
            value = torch.as_tensor(env[node.arg], device=device)
        elif node.op == Op.LOAD:
            table = torch.as_tensor(tensors[node.arg]).to(device)
            value = _load(table, [values[s] for s in node.src], node.dtype, float_dtype or _load_dtype(table, wide))
        else:
            compute = float_dtype or _promoted(node.src, values, literal)
            sources = [_as_float(values[s], compute) for s in node.src]
            value = sources[0] if node.op == Op.CAST else OP_TABLE[node.op](*sources)
            if all(s in literal for s in node.src):
                literal.add(node)
            out_dtype = torch_dtype(node.dtype, compute)
            value = value if value.dtype == out_dtype else value.to(out_dtype)
        values[node] = value
    return values[root]


def _const_dtype(dtype: DType, float_dtype: torch.dtype | None) -> torch.dtype:
    return torch_dtype(dtype, float_dtype or torch.float64)  # a float literal keeps Python's double until used


def _load_dtype(table: Tensor, wide: bool) -> torch.dtype:
    return torch.float64 if wide and table.dtype == torch.float64 else torch.float32


def _promoted(sources: tuple[Node, ...], values: dict[Node, Tensor], literal: set[Node]) -> torch.dtype:
    """torch's result dtype for floats meeting: the widest non-literal float, else float32 (the default dtype)."""
    dtypes = [values[s].dtype for s in sources if s not in literal and values[s].is_floating_point()]
    return functools.reduce(torch.promote_types, dtypes) if dtypes else torch.float32


def _as_float(value: Tensor, dtype: torch.dtype) -> Tensor:
    """Float operands in the op's dtype; ints and bools are left for torch to promote."""
    return value.to(dtype) if value.is_floating_point() and value.dtype != dtype else value


def index_grid(
    batch: int, heads: int, q_len: int, kv_len: int, device: torch.device | str = "cpu", q_start: int = 0, kv_start: int = 0
) -> dict[str, Tensor]:
    """int32 ARG tensors shaped to broadcast to [batch, heads, q_len, kv_len]."""
    def ramp(n: int, start: int, shape: tuple[int, ...]) -> Tensor:
        return torch.arange(start, start + n, dtype=torch.int32, device=device).view(shape)

    return {
        "b": ramp(batch, 0, (-1, 1, 1, 1)),
        "h": ramp(heads, 0, (1, -1, 1, 1)),
        "q_idx": ramp(q_len, q_start, (1, 1, -1, 1)),
        "kv_idx": ramp(kv_len, kv_start, (1, 1, 1, -1)),
    }
