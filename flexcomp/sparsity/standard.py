"""The standard mask variants as hand-built IR (no front end needed): for tests and the benchmark.

Each builder returns (mask IR, captured tensors).  The image for `neighborhood` is `width` x `width`
pixels in row-major order, so q and kv run over width**2 positions.
"""

from __future__ import annotations

import torch

from .. import ir
from ..ir import DType, Node, Op

Q, KV = ir.arg("q_idx"), ir.arg("kv_idx")


def node(op: Op, *src: Node) -> Node:
    return Node(op, ir.result_dtype(op, tuple(s.dtype for s in src)), tuple(src))


def c(value: int) -> Node:
    return ir.const(value)


def causal() -> Node:
    return node(Op.GE, Q, KV)  # q >= kv


def sliding_window(window: int) -> Node:
    return node(Op.AND, node(Op.GE, Q, KV), node(Op.LT, node(Op.SUB, Q, KV), c(window)))  # 0 <= q - kv < W


def prefix_lm(prefix: int) -> Node:
    return node(Op.OR, node(Op.LT, KV, c(prefix)), node(Op.LE, KV, Q))  # kv < P | kv <= q


def block_causal(chunk: int) -> Node:
    return node(Op.LE, node(Op.FLOORDIV, KV, c(chunk)), node(Op.FLOORDIV, Q, c(chunk)))  # kv//C <= q//C


def offset_causal(offset: int) -> Node:
    return node(Op.LE, KV, node(Op.ADD, Q, c(offset)))  # kv <= q + (KV_LEN - Q_LEN), captured as a constant


def dilated_window(window: int, dilation: int = 2) -> Node:
    diff = node(Op.SUB, Q, KV)
    return node(Op.AND, node(Op.EQ, node(Op.MOD, diff, c(dilation)), c(0)), node(Op.LE, node(Op.ABS, diff), c(window)))


def neighborhood(width: int, radius: int) -> Node:
    rows = node(Op.SUB, node(Op.FLOORDIV, Q, c(width)), node(Op.FLOORDIV, KV, c(width)))
    cols = node(Op.SUB, node(Op.MOD, Q, c(width)), node(Op.MOD, KV, c(width)))
    return node(Op.AND, node(Op.LE, node(Op.ABS, rows), c(radius)), node(Op.LE, node(Op.ABS, cols), c(radius)))


def document(length: int, num_docs: int, seed: int = 0) -> tuple[Node, dict[str, torch.Tensor]]:
    """DOC[q] == DOC[kv] with `num_docs` sorted documents of random lengths."""
    gen = torch.Generator().manual_seed(seed)
    cuts = torch.randperm(length - 1, generator=gen)[: num_docs - 1] + 1
    doc = torch.zeros(length, dtype=torch.int32)
    doc[cuts.sort().values] = 1
    doc = torch.cumsum(doc, 0).to(torch.int32)
    mask = node(Op.EQ, ir.load("DOC", DType.I32, (Q,)), ir.load("DOC", DType.I32, (KV,)))
    return mask, {"DOC": doc}
