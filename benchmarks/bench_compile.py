"""What a variant costs before its kernel runs: decoration, block-mask analysis, kernel source.

    python benchmarks/bench_compile.py          # any machine; no GPU needed

For each variant of bench_attention.py: the decoration (lark parse, lowering to IR,
the optimizer's passes) and the generation of the Triton source (rendering the IR
into the template), each timed cold (caches cleared) as the median of several runs.
Triton's own compile of the generated source, and the first launch, happen at the
first call on a GPU: bench_attention.py reports that first call per variant.
"""

from __future__ import annotations

import statistics
import sys
import time

import bench_attention as ba
from flexcomp.codegen.forward import kernel_source

import flexcomp as fc


def median_ms(fn, repeat: int = 7) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def fmt(ms: float | None) -> str:
    return "-" if ms is None else f"{ms:.1f} ms"


def decorate(fn, kind: str):
    # a fresh decoration each time: the as_mod cache would hand back the same Mod
    return fc.mask_mod(fn) if kind == "mask" else fc.score_mod(fn)


def main() -> int:
    import torch

    ba.DOC_IDS = (torch.arange(8192) // 128).to(torch.int32)
    ba.SLOPES = torch.rand(16)
    print("| variant | decorate mask_mod | decorate score_mod | create_block_mask L=8192 (first / again) | kernel source |")
    print("|---|---|---|---|---|")
    for v in ba.VARIANTS:
        mask_ms = median_ms(lambda v=v: decorate(v.mask_mod, "mask")) if v.mask_mod else None
        score_ms = median_ms(lambda v=v: decorate(v.score_mod, "score")) if v.score_mod else None
        mask = decorate(v.mask_mod, "mask") if v.mask_mod else fc.noop_mask
        score = decorate(v.score_mod, "score") if v.score_mod else None
        start = time.perf_counter()
        block_mask = fc.create_block_mask(mask, 1, 1, 8192, 8192)
        first_ms = (time.perf_counter() - start) * 1e3
        again_ms = median_ms(lambda mask=mask: fc.create_block_mask(mask, 1, 1, 8192, 8192))
        source_ms = median_ms(lambda s=score, m=mask, b=block_mask.bounds: kernel_source(s, m, bounds=b))
        print(f"| {v.name} | {fmt(mask_ms)} | {fmt(score_ms)} | {first_ms:.1f} / {again_ms:.2f} ms | {source_ms:.1f} ms |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
