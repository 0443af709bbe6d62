"""Paged decode beside contiguous decode: the issue's rows, same inputs, same process (issue 19 part 2: paged
decoding within 3% of the contiguous decode time, page size 128 and 16, pages shuffled).

    python benchmarks/bench_paged.py            # the issue's rows, bf16, D=128, Hq=32, Hkv=8 (GPU)
    python benchmarks/bench_paged.py --quick    # tiny shapes on CPU (reference backend): a smoke test
    TRITON_INTERPRET=1 python benchmarks/bench_paged.py --quick   # the same through the decode kernel
    python benchmarks/bench_paged.py --paged-options BLOCK_N=16   # A/B: the paged calls' kernel_options
    python benchmarks/bench_paged.py --probe --page-sizes 16     # every PROBE config, paged/contiguous per row

Contiguous: K/V [B, Hkv, Lkv, D], no mask (what bench_decode.py's "none" rows time).  Paged: one cache
[1, Hkv, n_pages * page_size, D] whose pages are handed out shuffled, read through
`PagedAttention.convert_logical_block_mask` of a logical mask at the default block size (128): the decode kernel
(with its fused merge: checked on each row) walks logical tiles and reads their rows through the page table (no
copy).  Outputs are checked against each other before timing; times are CUDA-event medians of calls replayed from
CUDA graphs, as bench_decode.py times them, and the eager ratio (host time included).  `tile` is the paged call's
kv tile: pages smaller than it are gathered per tile (codegen/ops.py physical_rows).
"""

from __future__ import annotations

import argparse
import os
import random

import torch
from bench_decode import ISSUE_ROWS, graphed, timed  # the issue's rows; CUDA graphs and CUDA-event medians
from flexcomp.codegen import decode as decode_module

import flexcomp as fc

QUICK_ROWS = [(2, 1, 64), (1, 3, 128)]
PAGE_SIZES = (128, 16)
# --probe: the paged calls' (kv tile, stages) tried against the default; small pages may want more bytes in flight
PROBE = [(64, 4), (64, 5), (128, 2), (128, 3), (32, 4), (32, 6)]


def paged_copy(k, v, page_size, device):
    """The same K/V in a paged cache, pages shuffled; returns (paged, k_cache, v_cache)."""
    B, H, L, D = k.shape
    n_pages = B * L // page_size
    paged = fc.PagedAttention(n_pages, page_size, B, device=device)
    paged.empty_pages = random.Random(0).sample(range(n_pages), n_pages)
    k_cache = torch.empty(1, H, n_pages * page_size, D, dtype=k.dtype, device=device)
    v_cache = torch.empty_like(k_cache)
    positions = torch.arange(L, device=device).view(1, -1)
    for b in range(B):
        paged.reserve(torch.tensor(b), torch.tensor(L))
        paged.assign(torch.tensor([b], device=device), positions, k[b : b + 1], v[b : b + 1], k_cache, v_cache)
    return paged, k_cache, v_cache


class DecodeLaunches:
    """The decode kernel's launches while inside: (kv tile, fused merge) of each (codegen/decode.py DecodeLaunch)."""

    def __enter__(self):
        self.seen, self.run = [], decode_module.DecodeLaunch.run
        seen, run = self.seen, self.run

        def recorded(launch, tensors):
            seen.append((launch.config.block_n, launch.kwargs["FUSED_MERGE"] or launch.splits == 1))
            return run(launch, tensors)

        decode_module.DecodeLaunch.run = recorded
        return self

    def __exit__(self, *exc):
        decode_module.DecodeLaunch.run = self.run


def bench_one(B, q_len, L, page_size, args, device, dtype):
    """(contiguous ms, paged ms, eager paged/contiguous, the paged call's kv tile)."""
    Hq, Hkv, D = args.heads, args.kv_heads, args.head_dim
    q = torch.randn(B, Hq, q_len, D, dtype=dtype, device=device)
    k, v = (torch.randn(B, Hkv, L, D, dtype=dtype, device=device) for _ in range(2))
    logical = fc.create_block_mask(fc.noop_mask, B, None, q_len, L, device=device)
    paged, k_cache, v_cache = paged_copy(k, v, page_size, device)
    converted = paged.convert_logical_block_mask(logical, batch_idx=torch.arange(B, device=device))

    backend = "triton" if device == "cuda" or os.environ.get("TRITON_INTERPRET") == "1" else "reference"

    def contiguous():
        return fc.flex_attention(q, k, v, enable_gqa=True, backend=backend)

    options = args.paged_options or None

    def paged_run():
        return fc.flex_attention(q, k_cache, v_cache, block_mask=converted, enable_gqa=True, backend=backend,
                                 kernel_options=options)  # fmt: skip

    with DecodeLaunches() as launches:
        torch.testing.assert_close(paged_run().float(), contiguous().float(), atol=2e-2, rtol=2e-2)
    if backend == "triton":  # both through the decode kernel, merged in it
        assert len(launches.seen) == 2 and all(fused for _, fused in launches.seen), launches.seen
    eager = timed(paged_run, device, args.repeats, 1) / timed(contiguous, device, args.repeats, 1)
    if device == "cuda":
        contiguous, paged_run = graphed(contiguous) or contiguous, graphed(paged_run) or paged_run
    times = timed(contiguous, device, args.repeats, args.inner), timed(paged_run, device, args.repeats, args.inner)
    return *times, eager, launches.seen[0][0] if launches.seen else "-"  # the paged call ran first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes on the CPU: a smoke test")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--inner", type=int, default=20)
    parser.add_argument("--paged-options", nargs="*", default=[], metavar="KEY=INT",
                        help="the paged calls' kernel_options (BLOCK_N=16: one page a tile; num_stages=4)")
    parser.add_argument("--page-sizes", type=int, nargs="*", default=None, help=f"default {PAGE_SIZES}")
    parser.add_argument("--probe", action="store_true", help="each row at every PROBE config too (GPU)")
    args = parser.parse_args()
    args.paged_options = dict(_option(o) for o in args.paged_options)
    device = "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
    rows, dtype = (QUICK_ROWS, torch.float32) if args.quick else (ISSUE_ROWS, torch.bfloat16)
    args.heads, args.kv_heads, args.head_dim = (4, 2, 16) if args.quick else (32, 8, 128)
    if args.quick:
        args.repeats, args.inner = 3, 1
    page_sizes = args.page_sizes or (PAGE_SIZES if not args.quick else (16, 32))
    variants = [args.paged_options]
    if args.probe:
        variants += [{**args.paged_options, "BLOCK_N": n, "num_stages": s} for n, s in PROBE]
    print("| B | Lq | Lkv | page | options | tile | contiguous us | paged us | paged/contiguous | eager |")
    print("|---" * 10 + "|")
    for B, q_len, L in rows:
        for page_size in page_sizes:
            for args.paged_options in variants:
                contig_ms, paged_ms, eager, tile = bench_one(B, q_len, L, page_size, args, device, dtype)
                shown = " ".join(f"{k}={v}" for k, v in args.paged_options.items()) or "default"
                print(f"| {B} | {q_len} | {L} | {page_size} | {shown} | {tile} | {contig_ms * 1e3:.1f} | "
                      f"{paged_ms * 1e3:.1f} | {paged_ms / contig_ms:.3f} | {eager:.2f} |", flush=True)  # fmt: skip


def _option(text: str) -> tuple[str, int]:
    key, _, value = text.partition("=")
    return key, int(value)


if __name__ == "__main__":
    main()
