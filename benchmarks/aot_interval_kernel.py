"""Compile the document-mask table kernel (codegen/interval_kernel.py) for Hopper (sm_90) on any machine.

    python benchmarks/aot_interval_kernel.py

No GPU needed (Triton's backend and bundled ptxas, as benchmarks/aot_forward.py).  For each variant (row bounds
or not, int32 or int64 ids, 128 or 64 rows per q block) it prints the compile time, ptxas' registers and spills,
and the synchronization the "last program" scheme rests on: the CTA barriers and the acq_rel atomics, in order.
"""

from __future__ import annotations

import inspect
import itertools
import os
import re
import time

os.environ["TRITON_INTERPRET"] = "0"  # the compiled kernel, not the interpreter's

import triton
from aot_forward import ptxas_report
from flexcomp.codegen import interval_kernel
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


def compile_variant(has_bounds: bool, ids: str, rows: int):
    kernel = interval_kernel.interval_tables_kernel
    params = list(inspect.signature(kernel.fn).parameters)
    constexprs = {"HAS_LO": has_bounds, "HAS_HI": has_bounds, "ROWS": rows, "COLS": max(16, min(256, 8192 // rows)),
                  "CHECK": interval_kernel.CHECK}
    signature = {p: "constexpr" if p in constexprs else (ids if p in ("f_ptr", "g_ptr") else "*i32")
                 if p.endswith("_ptr") else "i32" for p in params}
    attrs = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(params) if p.endswith("_ptr")}
    start = time.time()
    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": 4})
    return compiled, time.time() - start


def synchronization(ptx: str) -> str:
    """The kernel's barriers and atomics in program order, runs of barriers collapsed (bar.sync x3)."""
    events = [m.group(0) for m in re.finditer(r"bar\.sync|atom\.global\.\w+\.\w+\.\w+", ptx)]
    out = []
    for event, run in itertools.groupby(events):
        n = len(list(run))
        out.append(event if n == 1 else f"{event} x{n}")
    return ", ".join(out[-8:])  # the tail: the scheme at the end of the kernel


def main() -> None:
    for has_bounds, ids, rows in itertools.product((False, True), ("*i32", "*i64"), (128, 64)):
        compiled, seconds = compile_variant(has_bounds, ids, rows)
        ptx = compiled.asm["ptx"]
        print(f"bounds={has_bounds} ids={ids} rows={rows}: {seconds:.1f} s, {ptxas_report(ptx)}; "
              f"end of kernel: {synchronization(ptx)}")


if __name__ == "__main__":
    main()
