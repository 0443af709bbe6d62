"""Compile a generated forward kernel for Hopper (sm_90) on any machine, and count instructions in its PTX.

    python benchmarks/aot_forward.py [--head-dim 64]

No GPU needed: Triton's own backend and bundled ptxas compile for a named target.
It answers questions that would otherwise cost device time (does a constexpr path
compile, did an instruction leave the inner loop).  Here: ALiBi + causal with the
float-index rewrite (FLOAT_INDEX) off and on, counting int->float conversions
(cvt.rn.f32.s32) and tensor-core instructions (wgmma) in the PTX.
"""

from __future__ import annotations

import argparse
import inspect
import time

import torch
import triton
from flexcomp.codegen.forward import _module_and_key
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import flexcomp as fc

SLOPES = torch.rand(16)


def alibi(score, b, h, q_idx, kv_idx):
    return score + SLOPES[h] * (kv_idx - q_idx)


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


FORWARD_POINTERS = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "Out": "*bf16", "Lse": "*fp32",
                    "KV_NUM": "*i32", "KV_IDX": "*i32", "FULL_NUM": "*i32", "FULL_IDX": "*i32"}


def signature(params: list[str], constexprs: dict, pointers: dict[str, str] = FORWARD_POINTERS) -> dict[str, str]:
    """Argument types as a bf16 launch would specialize them (captured tables and their gradients are `*_ptr`)."""
    def kind(p: str) -> str:
        if p in constexprs:
            return "constexpr"
        if p in pointers:
            return pointers[p]
        return "*fp32" if p.endswith("_ptr") else "fp32" if p == "sm_scale" else "i32"
    return {p: kind(p) for p in params}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--head-dim", type=int, default=64)
    D = parser.parse_args().head_dim
    score, mask = fc.score_mod(alibi), fc.mask_mod(causal)
    module, _ = _module_and_key(score, mask, fc.create_block_mask(mask, 1, 1, 8192, 8192).bounds)
    kernel = module.flex_forward_kernel
    params = list(inspect.signature(kernel.fn).parameters)
    for float_index in (False, True):
        constexprs = {"HAS_SCORE_MOD": True, "USE_BOUNDS": True, "HAS_FULL": False, "SPARSE_Q": 128,
                      "SPARSE_KV": 128, "TILES_PER_BLOCK": 2, "BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_D": D,
                      "BLOCK_DV": D, "D": D, "DV": D, "DOT_PRECISION": "tf32", "UPCAST_DOT": False, "EVEN_Q": True,
                      "EVEN_KV": True, "FAST_TANH": False, "USE_TMA": False, "FLOAT_INDEX": float_index}
        start = time.time()
        compiled = triton.compile(ASTSource(kernel, signature(params, constexprs), constexprs),
                                  target=GPUTarget("cuda", 90, 32), options={"num_warps": 8, "num_stages": 3})
        ptx = compiled.asm["ptx"]
        print(f"D={D} FLOAT_INDEX={float_index}: compiled in {time.time() - start:.1f}s; "
              f"cvt.rn.f32.s32 {ptx.count('cvt.rn.f32.s32')}, wgmma {ptx.count('wgmma.mma_async')}")


if __name__ == "__main__":
    main()
