"""IR semantics, executed with torch: the one definition every backend is checked against.

`evaluate(root, env, tensors)` computes a mod's IR on broadcastable torch
tensors: `env` maps ARG names to tensors (int32 indices, a float score),
`tensors` maps captured buffer names to their current values.  Everything is
plain differentiable torch, so gradients flow to the score and to captured
float tensors.
"""

from __future__ import annotations

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


def _true_div(a: Tensor, b: Tensor) -> Tensor:
    # int / int is float division, as in Python and torch
    return torch.true_divide(a, b)


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
    Op.FLOOR: _floor,
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

    Float nodes compute in `float_dtype` (default: the score's dtype if `env` has
    one, else float32).  The result may be a broadcast view: callers that need a
    full tensor expand it.
    """
    tensors = tensors or {}
    if float_dtype is None:
        score = env.get("score")
        float_dtype = score.dtype if isinstance(score, Tensor) and score.is_floating_point() else torch.float32
    device = next((t.device for t in env.values() if isinstance(t, Tensor)), torch.device("cpu"))
    values: dict[Node, Tensor] = {}
    for node in toposort(root):
        out_dtype = torch_dtype(node.dtype, float_dtype)
        if node.op == Op.CONST:
            value = torch.tensor(node.arg, dtype=out_dtype, device=device)
        elif node.op == Op.ARG:
            value = torch.as_tensor(env[node.arg], device=device)
        elif node.op == Op.LOAD:
            table = torch.as_tensor(tensors[node.arg]).to(device)
            value = _load(table, [values[s] for s in node.src], node.dtype, float_dtype)
        elif node.op == Op.CAST:
            value = values[node.src[0]]
        else:
            value = OP_TABLE[node.op](*(values[s] for s in node.src))
        values[node] = value if value.dtype == out_dtype else value.to(out_dtype)
    return values[root]


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
