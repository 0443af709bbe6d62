"""The optimizer: a flat list of named passes over the IR.

With FLEXCOMP_DEBUG=1 the IR is printed to stderr after each pass.
"""

from __future__ import annotations

import os
import sys

from .ir import DType, Node, Op, result_dtype, toposort
from .rewrite import ALGEBRA, CANONICAL_ORDER, CONSTANT_FOLDING, SIMPLIFY, graph_rewrite

PASSES = [
    ("fold_constants", CONSTANT_FOLDING),
    ("canonicalize", CANONICAL_ORDER + CONSTANT_FOLDING),
    ("simplify", SIMPLIFY),
    ("algebra_cleanup", ALGEBRA + CONSTANT_FOLDING),
]


def optimize(root: Node, name: str = "") -> Node:
    """`root` simplified by each pass of PASSES in turn; CSE comes from the rewriter's interning."""
    debug(f"{name}: raw", root)
    for pass_name, rules in PASSES:
        root = graph_rewrite(root, rules, name=pass_name)
        debug(f"{name}: after {pass_name}", root)
    check_ir(root)
    return root


def debugging() -> bool:
    return os.environ.get("FLEXCOMP_DEBUG", "") not in ("", "0")


def debug(title: str, root: Node) -> None:
    if debugging():
        print(f"--- {title}\n{root}", file=sys.stderr)


def check_ir(root: Node) -> None:
    """IR invariants every pass keeps: sources' dtypes agree (casts are explicit) and each dtype is its op's."""
    for node in toposort(root):
        problem = ir_problem(node)
        if problem:
            raise AssertionError(f"invalid IR node {node!r}: {problem}\n{root}")


def ir_problem(node: Node) -> str | None:
    if node.op in (Op.CONST, Op.ARG, Op.CAST):
        return None
    if node.op == Op.LOAD:
        return None if all(s.dtype == DType.I32 for s in node.src) else "LOAD indices must be i32"
    dtypes = tuple(s.dtype for s in node.src)
    operands = dtypes[1:] if node.op == Op.WHERE else dtypes
    if node.op == Op.WHERE and dtypes[0] != DType.BOOL:
        return "WHERE condition must be bool"
    if len(set(operands)) > 1:
        return f"operands of different dtypes {operands} (a CAST is missing)"
    if result_dtype(node.op, dtypes) != node.dtype:
        return f"dtype {node.dtype.value} but {node.op.value} of {dtypes} gives {result_dtype(node.op, dtypes).value}"
    return None
