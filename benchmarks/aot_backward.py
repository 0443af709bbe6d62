"""Compile the generated dQ kernel for Hopper (sm_90) on any machine, atomic and deterministic scatter alike.

    python benchmarks/aot_backward.py [--head-dim 64]

No GPU needed (Triton's own backend and bundled ptxas, as benchmarks/aot_forward.py does).  The variant
is a learnable relative-position bias read twice plus causal, so the dQ kernel scatters the table's
gradient: DETERMINISTIC=False with float32 atomics (atom.global.add in the PTX), DETERMINISTIC=True
with ordered plain adds into the program's own slice (no atomics).
"""

from __future__ import annotations

import argparse
import inspect
import time

import torch
import triton
from aot_forward import signature
from flexcomp.codegen.backward import backward_module
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import flexcomp as fc

BIAS = torch.randn(16, 512)


def rel_bias(score, b, h, q_idx, kv_idx):
    return score + BIAS[h, q_idx - kv_idx] + 0.5 * BIAS[h, kv_idx // 3]


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


POINTERS = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "DO": "*bf16", "DQ": "*bf16", "LSE": "*fp32", "DELTA": "*fp32",
            "KV_NUM": "*i32", "KV_IDX": "*i32", "FULL_KV_NUM": "*i32", "FULL_KV_IDX": "*i32"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--head-dim", type=int, default=64)
    D = parser.parse_args().head_dim
    score, mask = fc.score_mod(rel_bias), fc.mask_mod(causal)
    kernel = backward_module(score, mask, frozenset({"BIAS"})).flex_bwd_dq
    params = list(inspect.signature(kernel.fn).parameters)
    for deterministic in (False, True):
        constexprs = {"GQA_GROUP": 1, "SPARSE_Q": 128, "SPARSE_KV": 128, "BLOCK_M": 128, "BLOCK_N": 64,
                      "BLOCK_D": D, "BLOCK_DV": D, "D": D, "DV": D, "DOT_PRECISION": "tf32", "HAS_SCORE_MOD": True,
                      "EVEN_KV": True, "FAST_TANH": False, "DETERMINISTIC": deterministic}
        start = time.time()
        compiled = triton.compile(ASTSource(kernel, signature(params, constexprs, POINTERS), constexprs),
                                  target=GPUTarget("cuda", 90, 32), options={"num_warps": 8, "num_stages": 2})
        ptx = compiled.asm["ptx"]
        print(f"dQ D={D} DETERMINISTIC={deterministic}: compiled in {time.time() - start:.1f}s; "
              f"atom.global {ptx.count('atom.global')}, red.global {ptx.count('red.global')}, "
              f"bar.sync {ptx.count('bar.sync')}, wgmma {ptx.count('wgmma.mma_async')}, "
              f"cubin {len(compiled.asm['cubin'])} bytes")


if __name__ == "__main__":
    main()
