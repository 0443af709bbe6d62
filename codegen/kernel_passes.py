"""The kernel-shaping passes: IR -> IR rewrites that fit a mod to a kernel, after flexcomp/compiler.py's PASSES.

One flat named list, as the optimizer's: each pass is dumped under FLEXCOMP_DEBUG=1 and followed by the IR
validity check (compiler.check_ir), and both directions' templates shape their mods through `shape`.  Hoisting
(ops.hoistable) splits a shaped root into per-q-tile and per-kv-tile nodes rather than rewriting it, so it is
not a pass here.
"""

from __future__ import annotations

from collections.abc import Callable

from flexcomp.compiler import check_ir, debug
from flexcomp.grad import score_grad
from flexcomp.ir import Node

from .base2 import base2_form, raw_score_form
from .ops import float_index_form

KERNEL_PASSES: dict[str, Callable[[Node], Node]] = {
    "float_index": lambda ir: float_index_form(ir)[0],  # float(kv_idx expr) -> float arithmetic on a float iota
    "base2": base2_form,  # score_mod(qk * sm_scale) -> the same * log2(e), scalings folded into the mod's factors
    "derivative": score_grad,  # score_mod -> d score_mod / d score (reverse mode, flexcomp/grad.py)
    "raw_score": raw_score_form,  # f(score) -> f(qk * sm_scale), invariant factors merged as base2 merges them
}


def shape(ir: Node, passes: tuple[str, ...], name: str = "") -> Node:
    """`ir` through the named KERNEL_PASSES in order, each dumped (FLEXCOMP_DEBUG=1) and checked."""
    for pass_name in passes:
        ir = KERNEL_PASSES[pass_name](ir)
        debug(f"{name}: after kernel pass {pass_name}", ir)
        check_ir(ir)
    return ir
