"""Compile a generated forward kernel for Hopper (sm_90) on any machine, and count instructions in its PTX.

    python benchmarks/aot_forward.py                                  # ALiBi D=64, FLOAT_INDEX off vs on
    python benchmarks/aot_forward.py --variant causal --head-dim 128 --block 128 128 \
        --ab FOLD_SCALE=0 FOLD_SCALE=1 --loops

No GPU needed: Triton's own backend and bundled ptxas compile for a named target.
It answers questions that would otherwise cost device time (does a constexpr path
compile, did an instruction leave the inner loop).  Arguments are specialized as a
real bf16 launch at B=4, H=16, L=8192 specializes them: 16-divisible pointers and
strides carry tt.divisibility, unit strides become the constant 1 (without that the
loads are scalar and the PTX is not what the GPU runs).

--loops prints, for every PTX basic block that issues wgmma (the kv loop bodies:
the FULL tiles' loop and the PARTIAL tiles' loop), its FP32 and conversion
instruction counts, and the kernel's register and spill figures from ptxas.
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
import subprocess
import tempfile
import time
from collections import Counter

import torch
import triton
from flexcomp.codegen.forward import _module_and_key
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import flexcomp as fc

SLOPES = torch.rand(16)
DOC_IDS = torch.arange(8192, dtype=torch.int32) // 128


def alibi(score, b, h, q_idx, kv_idx):
    return score + SLOPES[h] * (kv_idx - q_idx)


def softcap(score, b, h, q_idx, kv_idx):
    return 30.0 * torch.tanh(score / 30.0)


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def sliding_window(b, h, q_idx, kv_idx):
    return (q_idx >= kv_idx) & (q_idx - kv_idx <= 1024)


def document_causal(b, h, q_idx, kv_idx):
    return (DOC_IDS[q_idx] == DOC_IDS[kv_idx]) & (q_idx >= kv_idx)


# name -> (score_mod, mask_mod): bench_attention's variants
VARIANTS = {"none": (None, None), "causal": (None, causal), "alibi": (alibi, causal), "softcap": (softcap, causal),
            "window": (None, sliding_window), "document": (None, document_causal)}
FORWARD_POINTERS = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "Out": "*bf16", "Lse": "*fp32", "MaxScores": "*fp32",
                    "KV_NUM": "*i32", "KV_IDX": "*i32", "FULL_NUM": "*i32", "FULL_IDX": "*i32",
                    "PAGE_TABLE": "*i32", "KV_LENS": "*i32"}
# the PTX instructions that the softmax spends per score element, by family (prefix match on the opcode)
COUNTED = ("fma.rn.f32", "mul.f32", "mul.rn.f32", "add.f32", "add.rn.f32", "sub.f32", "max.f32", "min.f32",
           "selp.f32", "selp.b32", "ex2.approx", "cvt.rn.bf16x2.f32", "cvt.rn.f32.s32", "tanh.approx", "setp",
           "mul.wide", "add.s64", "mov.b32", "wgmma.mma_async", "cp.async.cg", "cp.async.bulk")


def signature(params: list[str], constexprs: dict, pointers: dict[str, str] = FORWARD_POINTERS) -> dict[str, str]:
    """Argument types as a bf16 launch would specialize them (captured tables and their gradients are `*_ptr`)."""
    def kind(p: str) -> str:
        if p in constexprs:
            return "constexpr"
        if p in pointers:
            return pointers[p]
        return "*fp32" if p.endswith("_ptr") else "fp32" if p == "sm_scale" else "i32"
    return {p: kind(p) for p in params}


def launch_ints(B: int, H: int, L: int, D: int) -> dict[str, int]:
    """The integer arguments of a contiguous [B, H, L, D] launch (tables unused: closed-form bounds)."""
    ints = {}
    for t in ("q", "k", "v", "o"):
        ints |= {f"stride_{t}b": H * L * D, f"stride_{t}h": L * D, f"stride_{t}{'n' if t in 'kv' else 'm'}": D}
    ints |= {"stride_qd": 1, "stride_kd": 1, "stride_vd": 1, "stride_od": 1,
             "stride_lb": H * L, "stride_lh": L, "stride_lm": 1, "Q_LEN": L, "KV_LEN": L, "H_Q": H, "GQA_GROUP": 1}
    return ints


def specialize(params: list[str], constexprs: dict, ints: dict[str, int]) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) as triton's launcher makes them: ints equal to 1 become constants,
    multiples of 16 (and every pointer: torch allocations are 256-byte aligned) get tt.divisibility 16."""
    constexprs = dict(constexprs)
    attrs = {}
    for i, p in enumerate(params):
        if p in constexprs:
            continue
        value = ints.get(p, 0)  # unknown ints: table strides and the like, 0 here (bounds path)
        if p in FORWARD_POINTERS or p.endswith("_ptr"):
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif p == "sm_scale":
            continue
        elif value == 1:
            constexprs[p] = 1
        elif value % 16 == 0:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return signature(params, constexprs), constexprs, attrs


def compile_forward(variant: str, D: int, block: tuple[int, int], warps: int, stages: int, extra: dict):
    score_fn, mask_fn = VARIANTS[variant]
    score = fc.score_mod(score_fn) if score_fn else None
    mask = fc.mask_mod(mask_fn) if mask_fn else None
    block_mask = fc.create_block_mask(mask, 1, 1, 8192, 8192) if mask else None
    if block_mask is None:
        from flexcomp.codegen.forward import DENSE_BOUNDS, NOOP_MASK
        mask, bounds = NOOP_MASK, DENSE_BOUNDS
    else:
        mask, bounds = block_mask.mask_mod, getattr(block_mask, "bounds", None)
    module, _ = _module_and_key(score, mask, bounds)
    kernel = module.flex_forward_kernel
    params = list(inspect.signature(kernel.fn).parameters)
    constexprs = {"HAS_SCORE_MOD": score is not None, "USE_BOUNDS": bounds is not None, "HAS_FULL": bounds is None,
                  "SPARSE_Q": 128, "SPARSE_KV": 128, "TILES_PER_BLOCK": 128 // block[1], "BLOCK_M": block[0],
                  "BLOCK_N": block[1], "BLOCK_D": D, "BLOCK_DV": D, "D": D, "DV": D, "DOT_PRECISION": "tf32",
                  "EVEN_Q": True, "EVEN_KV": True, "FAST_TANH": score is not None,
                  "USE_TMA": False, "FLOAT_INDEX": variant == "alibi", "FOLD_SCALE": score is None,
                  "PREFETCH_INDEX": False, "ROW_ALIGN": 8,  # contiguous 16-bit rows: 16-byte vectors
                  "PAGE_SIZE": 0,  # contiguous K/V (no page table)
                  "OUTPUT_MAX": False}
    constexprs.update(extra)
    missing = [p for p in params if p.isupper() and p not in constexprs and inspect.signature(kernel.fn).parameters[
        p].default is not inspect.Parameter.empty]
    assert not missing, f"constexprs with defaults that the tool does not set (they would compile as i32): {missing}"
    sig, constexprs, attrs = specialize(params, constexprs, launch_ints(4, 16, 8192, D))
    start = time.time()
    compiled = triton.compile(ASTSource(kernel, sig, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": warps, "num_stages": stages, "enable_fp_fusion": True})
    return compiled, time.time() - start


def loop_blocks(ptx: str) -> list[tuple[str, Counter]]:
    """(label, opcode counts) of each PTX basic block that issues wgmma: the kv loop bodies."""
    blocks, label, body = [], "entry", []
    for line in ptx.splitlines():
        m = re.match(r"^\$(L__BB\w+):", line.strip())
        if m:
            blocks.append((label, body))
            label, body = m.group(1), []
        elif line.strip() and not line.strip().startswith(("//", ".loc", "}")):
            body.append(line.strip())
    blocks.append((label, body))
    out = []
    for label, body in blocks:
        ops = Counter(re.sub(r"^@!?%p\d+\s+", "", x).split()[0].rstrip(";") for x in body)
        if any(op.startswith("wgmma.mma_async") for op in ops):
            out.append((label, ops))
    return out


def family_counts(ops: Counter) -> dict[str, int]:
    return {f: sum(n for op, n in ops.items() if op.startswith(f)) for f in COUNTED
            if sum(n for op, n in ops.items() if op.startswith(f))}


NVIDIA_BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def _ptxas() -> str:
    """The bundled ptxas that reads the PTX version Triton emits (3.9 ships the newer one as ptxas-blackwell)."""
    newer = os.path.join(NVIDIA_BIN, "ptxas-blackwell")
    return newer if os.path.exists(newer) else os.path.join(NVIDIA_BIN, "ptxas")


def ptxas_report(ptx: str) -> str:
    """ptxas -v's register / spill line for the kernel (the bundled ptxas, sm_90a)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        run = subprocess.run([_ptxas(), "-arch=sm_90a", "-v", path, "-o", path + ".o"],
                             capture_output=True, text=True, check=False)
    used = re.search(r"Used (\d+) registers", run.stderr)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", run.stderr)
    return f"regs {used.group(1) if used else '?'}, spill st/ld {spill.groups() if spill else '?'}"


def disassemble(cubin: bytes) -> str:
    """The SASS text of a cubin (the bundled nvdisasm)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        return subprocess.run([os.path.join(NVIDIA_BIN, "nvdisasm"), "-c", path], capture_output=True, check=False,
                              text=True).stdout


def sass_loops(cubin: bytes) -> list[tuple[str, Counter]]:
    """(label, SASS opcode counts) of each SASS basic block that issues HGMMA (nvdisasm of the cubin)."""
    text = disassemble(cubin)
    blocks, label, ops = [], "entry", Counter()
    for line in text.splitlines():
        m = re.match(r"^\s*\.(L_x_\d+):", line)
        if m:
            blocks.append((label, ops))
            label, ops = m.group(1), Counter()
            continue
        m = re.search(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)", line)
        if m:
            ops[m.group(1)] += 1
    blocks.append((label, ops))
    return [(lb, c) for lb, c in blocks if any(op.startswith("HGMMA") for op in c)]


SASS_COUNTED = ("HGMMA", "FFMA", "FMUL", "FADD", "FMNMX", "FSEL", "FSETP", "MUFU.EX2", "MUFU.TANH", "F2FP", "I2F",
                "IMAD", "IADD3", "ISETP", "SEL", "LDGSTS", "UTMALDG", "BAR", "SYNCS", "WARPGROUP", "LDS", "STS", "MOV",
                "SHFL")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="alibi")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--block", type=int, nargs=2, default=(128, 64))
    parser.add_argument("--warps", type=int, default=8)
    parser.add_argument("--stages", type=int, default=3)
    parser.add_argument("--ab", nargs="*", default=["FLOAT_INDEX=0", "FLOAT_INDEX=1"],
                        help="constexpr settings to compile one after the other, NAME=int (comma-join several)")
    parser.add_argument("--loops", action="store_true", help="per-loop-body instruction counts")
    args = parser.parse_args()
    for setting in args.ab:
        extra = {k: bool(int(v)) if v in ("0", "1") else int(v)
                 for k, v in (kv.split("=") for kv in setting.split(",") if kv)}
        compiled, seconds = compile_forward(args.variant, args.head_dim, tuple(args.block), args.warps,
                                            args.stages, extra)
        ptx = compiled.asm["ptx"]
        meta = compiled.metadata
        print(f"{args.variant} D={args.head_dim} {args.block[0]}x{args.block[1]}w{args.warps}s{args.stages} "
              f"{setting or 'default'}: {seconds:.1f}s; {ptxas_report(ptx)}, shared {meta.shared // 1024} KiB; "
              f"cvt.rn.f32.s32 {ptx.count('cvt.rn.f32.s32')}, wgmma {ptx.count('wgmma.mma_async')}, "
              f"setmaxnreg {ptx.count('setmaxnreg')}")
        if args.loops:
            for label, ops in loop_blocks(ptx):
                print(f"    PTX {label}: {sum(ops.values())} instructions; {family_counts(ops)}")
            for label, ops in sass_loops(compiled.asm["cubin"]):
                counts = {f: sum(n for op, n in ops.items() if op.startswith(f)) for f in SASS_COUNTED}
                print(f"    SASS {label}: {sum(ops.values())} instructions; {({k: n for k, n in counts.items() if n})}")


if __name__ == "__main__":
    main()
