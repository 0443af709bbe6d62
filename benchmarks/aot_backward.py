"""Compile the generated backward kernels for Hopper (sm_90) on any machine and report what ptxas made of them.

    python benchmarks/aot_backward.py [--head-dims 64 128] [--variants causal softcap rel_bias] [--dq-only]

No GPU needed (Triton's own backend and bundled ptxas, as benchmarks/aot_forward.py does).  Per variant and
head dim, at the H100 configs of `BACKWARD_CONFIGS`, it compiles

* flex_bwd's dK/dV part alone with ATOMIC_DQ off (the separate scheme) and on (the atomic-dQ scheme: the dQ
  tile's `red.global.add.f32`, and for rel_bias the captured table's gradient scattered there too),
* its dQ part alone with the captured gradient's scatter atomic and DETERMINISTIC (ordered plain adds, no atomics),
* both parts in one launch (the default where their warps agree),

and prints registers, stack and spill instructions (STL/LDL in the cubin's SASS), local-memory instructions in the PTX, the atomics
(`red`/`atom`, with their vector width) and the wgmma count.  rel_bias is a learnable relative-position bias
read twice plus causal; softcap is tanh softcapping plus causal.
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
from aot_forward import disassemble, signature
from flexcomp.codegen.autotune import BACKWARD_CONFIGS
from flexcomp.codegen.backward import backward_module
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

import flexcomp as fc

BIAS = torch.randn(16, 512)


def rel_bias(score, b, h, q_idx, kv_idx):
    return score + BIAS[h, q_idx - kv_idx] + 0.5 * BIAS[h, kv_idx // 3]


def softcap(score, b, h, q_idx, kv_idx):
    return 20.0 * torch.tanh(score / 20.0)


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


VARIANTS = {"causal": (None, causal), "softcap": (softcap, causal), "rel_bias": (rel_bias, causal)}
POINTERS = {p: "*bf16" for p in ("Q", "K", "V", "DO", "DQ", "DK_OUT", "DV_OUT")}
POINTERS |= {p: "*fp32" for p in ("LSE", "LSE2", "DELTA", "DQ_ACC")}
POINTERS |= {p: "*i32" for p in ("KV_NUM", "KV_IDX", "FULL_NUM", "FULL_IDX", "Q_NUM", "Q_IDX", "FULL_Q_NUM",
                                 "FULL_Q_IDX")}


def launch_ints(B: int, H: int, L: int, D: int) -> dict[str, int]:
    """The integer arguments of a contiguous [B, H, L, D] bf16 launch (ones become constants, as Triton's launcher)."""
    ints = {"Q_LEN": L, "KV_LEN": L, "H_Q": H, "H_KV": H, "dkdv_programs": B * H * L // 128,
            "kv_tiles": L // 128, "q_tiles": L // 128}
    for s in ("q", ""):  # a mask's [1, 1, rows(, cols)] tables, broadcast over batch and heads (params.block_tables)
        for table in ("n", "fn", "i", "fi"):
            ints |= {f"stride_{s}{table}b": 0, f"stride_{s}{table}h": 0}
        ints |= {f"stride_{s}nm": 1, f"stride_{s}fnm": 1, f"stride_{s}im": L // 128, f"stride_{s}fim": L // 128,
                 f"stride_{s}in": 1, f"stride_{s}fin": 1}
    for t in ("q", "k", "v", "do", "dq", "dk", "dv"):
        row = "n" if t in ("k", "v", "dk", "dv") else "m"
        ints |= {f"stride_{t}b": H * L * D, f"stride_{t}h": L * D, f"stride_{t}{row}": D, f"stride_{t}d": 1}
    return ints


def specialize(params: list[str], constexprs: dict, ints: dict[str, int]) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) as Triton's launcher makes them: ints equal to 1 become constants,
    multiples of 16 and every pointer (torch allocations are 256-byte aligned) get tt.divisibility 16."""
    constexprs, attrs = dict(constexprs), {}
    for i, p in enumerate(params):
        value = ints.get(p)
        if p in constexprs or p == "sm_scale":
            continue
        if p in POINTERS or p.endswith("_ptr"):
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif value == 1:
            constexprs[p] = 1
        elif value is not None and value % 16 == 0 and value:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return signature(params, constexprs, POINTERS), constexprs, attrs


def sass_usage(cubin: bytes) -> str:
    """Registers and stack from the cubin, and its spill instructions (STL/LDL in the SASS: spills are ptxas's,
    so the PTX cannot show them)."""
    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        usage = subprocess.run([os.path.join(tools, "cuobjdump"), "--dump-resource-usage", path],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([os.path.join(tools, "cuobjdump"), "-sass", path], capture_output=True, text=True,
                              check=True).stdout
    regs, stack = re.search(r"REG:(\d+)", usage), re.search(r"STACK:(\d+)", usage)
    stores, loads = len(re.findall(r"\bSTL\b", sass)), len(re.findall(r"\bLDL\b", sass))
    return (f"{regs.group(1) if regs else '?'} regs, stack {stack.group(1) if stack else '?'} bytes, "
            f"STL {stores} LDL {loads}")


def atomics(ptx: str) -> str:
    """Each distinct red/atom instruction (opcode with its modifiers) and how often it occurs."""
    found = Counter(m.group(0) for m in re.finditer(r"\b(?:red|atom)(?:\.[a-z0-9]+)+", ptx))
    return ", ".join(f"{op} x{n}" for op, n in sorted(found.items())) or "none"


def sass_loop_spans(cubin: bytes) -> list[tuple[str, int, Counter]]:
    """(label, instructions, opcode counts) from each backward branch's target to the branch: whole loops,
    the blocks a predicated atomic splits off included."""
    text = disassemble(cubin)
    ops, labels, spans = [], {}, []
    for line in text.splitlines():
        m = re.match(r"^\s*\.(L_x_\d+):", line)
        if m:
            labels[m.group(1)] = len(ops)
            continue
        m = re.search(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)([^;]*)", line)
        if m:
            ops.append(m.group(1))
            target = re.search(r"`?\(?\.(L_x_\d+)", m.group(2)) if m.group(1) == "BRA" else None
            if target and target.group(1) in labels:
                start = labels[target.group(1)]
                spans.append((target.group(1), len(ops) - start, Counter(ops[start:])))
    return spans


LOOP_COUNTED = ("HGMMA", "ISETP", "PLOP3", "SEL", "LDG", "LDGSTS", "RED", "IMAD", "IADD3", "LEA", "FSEL", "FSETP")


def report(label: str, kernel, constexprs: dict, D: int, warps: int, stages: int, loops: bool = False) -> None:
    """Compile `kernel` for sm_90 as a contiguous bf16 [4, 16, 8192, D] launch would, and print what came out."""
    start = time.time()
    params = list(inspect.signature(kernel.fn).parameters)
    constexprs = {k: v for k, v in constexprs.items() if k in params}  # a template without EVEN_Q ignores it
    sig, constexprs, attrs = specialize(params, constexprs, launch_ints(4, 16, 8192, D))
    compiled = triton.compile(ASTSource(kernel, sig, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": warps, "num_stages": stages, "enable_fp_fusion": True})
    ptx = compiled.asm["ptx"]
    local = ptx.count("ld.local") + ptx.count("st.local")
    print(f"{label}: {time.time() - start:.0f}s; {sass_usage(compiled.asm['cubin'])}; "
          f"shared {compiled.metadata.shared // 1024} KiB; ld/st.local in PTX {local}; "
          f"wgmma {ptx.count('wgmma.mma_async')}; atomics: {atomics(ptx)}", flush=True)
    if loops:
        for block, size, ops in sass_loop_spans(compiled.asm["cubin"]):
            counts = {f: sum(n for op, n in ops.items() if op.startswith(f)) for f in LOOP_COUNTED}
            if counts["HGMMA"]:  # the tile loops (the GQA loop around them has them too, and is reported last)
                print(f"    SASS loop at {block}: {size} instructions; {({k: n for k, n in counts.items() if n})}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[128])
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=["causal", "rel_bias"])
    parser.add_argument("--dq-only", action="store_true", help="only the dQ kernel (the scatter's two modes)")
    parser.add_argument("--ragged", action="store_true",
                        help="compile as for lengths that are not multiples of the tiles (every load masked)")
    parser.add_argument("--loops", action="store_true", help="per-loop-body SASS instruction counts")
    args = parser.parse_args()
    for variant in args.variants:
        score_fn, mask_fn = VARIANTS[variant]
        score, mask = fc.score_mod(score_fn) if score_fn else None, fc.mask_mod(mask_fn)
        module = backward_module(score, mask, frozenset({"BIAS"}) if variant == "rel_bias" else frozenset())
        for D in args.head_dims:
            config = BACKWARD_CONFIGS[(16, max(64, triton.next_power_of_2(D)))]
            shared = {"GQA_GROUP": 1, "BLOCK_D": triton.next_power_of_2(D), "BLOCK_DV": triton.next_power_of_2(D),
                      "D": D, "DV": D, "DOT_PRECISION": "tf32", "FAST_TANH": variant == "softcap",
                      "ATOMIC_DQ": False, "DETERMINISTIC": False, "ROW_ALIGN": 8}
            for n, (m_tile, n_tile, stages) in enumerate(((config.BLOCK_M1, config.BLOCK_N1, config.stages_dkdv),
                                                          (config.BLOCK_M2, config.BLOCK_N2, config.stages_dq)), 1):
                shared |= {f"SPARSE_Q{n}": 128, f"SPARSE_KV{n}": 128, f"BLOCK_M{n}": m_tile, f"BLOCK_N{n}": n_tile,
                           f"EVEN_Q{n}": not args.ragged, f"EVEN_KV{n}": not args.ragged,
                           f"PREFETCH_INDEX{n}": stages >= 3}
            dkdv = {**shared, "DKDV_PART": True, "DQ_PART": False}
            dq = {**shared, "DKDV_PART": False, "DQ_PART": True}
            dkdv_tiles = f"{config.BLOCK_M1}x{config.BLOCK_N1}, {config.warps_dkdv}w {config.stages_dkdv}s"
            dq_tiles = f"{config.BLOCK_M2}x{config.BLOCK_N2}, {config.warps_dq}w {config.stages_dq}s"
            if not args.dq_only:
                for atomic in (False, True):
                    report(f"{variant} D={D} dK/dV ATOMIC_DQ={atomic} ({dkdv_tiles})", module.flex_bwd,
                           {**dkdv, "ATOMIC_DQ": atomic}, D, config.warps_dkdv, config.stages_dkdv, args.loops)
            for deterministic in (False, True) if variant == "rel_bias" else (False,):
                report(f"{variant} D={D} dQ DETERMINISTIC={deterministic} ({dq_tiles})", module.flex_bwd,
                       {**dq, "DETERMINISTIC": deterministic}, D, config.warps_dq, config.stages_dq, args.loops)
            if not args.dq_only and (config.warps_dkdv, config.stages_dkdv) == (config.warps_dq, config.stages_dq):
                report(f"{variant} D={D} dK/dV + dQ in one launch ({dkdv_tiles}; {dq_tiles})", module.flex_bwd,
                       {**shared, "DKDV_PART": True, "DQ_PART": True}, D, config.warps_dkdv, config.stages_dkdv,
                       args.loops)

if __name__ == "__main__":
    main()
