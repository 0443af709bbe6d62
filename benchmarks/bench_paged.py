"""Paged decode beside contiguous decode: one query token per request, same inputs, same process (issue 19).

    python benchmarks/bench_paged.py            # the issue's shapes, bf16, D=128, Hq=32, Hkv=8 (GPU)
    python benchmarks/bench_paged.py --quick    # tiny shapes on CPU (reference backend): a smoke test

Contiguous: K/V [B, Hkv, Lkv, D], no block mask (the decode kernel at its default tiles).  Paged: one cache
[1, Hkv, n_pages * page_size, D] whose pages are handed out shuffled, read through
`PagedAttention.convert_logical_block_mask` of a logical mask at the default block size (128), so the kernels
walk 128-row logical tiles and gather their rows page by page (no copy).  Both outputs are checked against each
other before timing.  Times are CUDA-event medians of calls replayed from CUDA graphs (the GPU's time) and of
eager calls (with the host's).
"""

from __future__ import annotations

import argparse
import random

import torch
from bench_decode import graphed, timed  # CUDA graphs and CUDA-event medians, shared with the decode benchmark

import flexcomp as fc

SHAPES = [(8, 16384), (8, 32768), (1, 131072), (64, 4096)]  # (batch, kv length)
QUICK_SHAPES = [(2, 64), (1, 128)]
PAGE_SIZES = (128, 16)


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


def bench_one(B, L, page_size, args, device, dtype):
    Hq, Hkv, D = args.heads, args.kv_heads, args.head_dim
    q = torch.randn(B, Hq, 1, D, dtype=dtype, device=device)
    k, v = (torch.randn(B, Hkv, L, D, dtype=dtype, device=device) for _ in range(2))
    logical = fc.create_block_mask(fc.noop_mask, B, None, 1, L, device=device)
    paged, k_cache, v_cache = paged_copy(k, v, page_size, device)
    converted = paged.convert_logical_block_mask(logical, batch_idx=torch.arange(B, device=device))

    def contiguous():
        return fc.flex_attention(q, k, v, enable_gqa=True)

    def paged_run():
        return fc.flex_attention(q, k_cache, v_cache, block_mask=converted, enable_gqa=True)

    torch.testing.assert_close(paged_run().float(), contiguous().float(), atol=2e-2, rtol=2e-2)
    times = {}
    for name, fn in (("contiguous", contiguous), ("paged", paged_run)):
        times[name] = timed(fn, device, args.repeats, 1)
        if device == "cuda":
            times[name + " graph"] = timed(graphed(fn) or fn, device, args.repeats, 10)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes on the CPU: a smoke test")
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
    shapes, dtype = (QUICK_SHAPES, torch.float32) if args.quick else (SHAPES, torch.bfloat16)
    args.heads, args.kv_heads, args.head_dim = (4, 2, 16) if args.quick else (32, 8, 128)
    args.repeats = 3 if args.quick else args.repeats
    columns = ["contiguous graph", "paged graph", "contiguous", "paged"] if device == "cuda" else ["contiguous", "paged"]
    print(f"{'B':>3} {'Lkv':>7} {'page':>5} " + " ".join(f"{c + ' ms':>18}" for c in columns)
          + f" {'paged/contig':>12}" + (f" {'eager':>6}" if device == "cuda" else ""))
    for B, L in shapes:
        for page_size in PAGE_SIZES if not args.quick else (16, 32):
            t = bench_one(B, L, page_size, args, device, dtype)
            ratio = t[columns[1]] / t[columns[0]]
            eager = f" {t['paged'] / t['contiguous']:>6.2f}" if device == "cuda" else ""
            print(f"{B:>3} {L:>7} {page_size:>5} " + " ".join(f"{t[c]:>18.4f}" for c in columns)
                  + f" {ratio:>12.3f}" + eager, flush=True)


if __name__ == "__main__":
    main()
