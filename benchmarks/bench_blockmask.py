"""Block-mask construction: flexcomp (analysis, O(tiles)) beside torch's create_block_mask (O(L^2)).

Prints one table: build time and peak extra CPU memory (tracemalloc plus torch CPU allocations are
not both visible, so peak RSS growth is reported), exactness checks, the speed ratio against torch,
and the exact-tile fraction of analysis alone (tiles analysis decided / tiles brute force calls FULL
or EMPTY) for the standard variants.  Run: python benchmarks/bench_blockmask.py [--quick]
"""

from __future__ import annotations

import resource
import sys
import time

import torch

from flexcomp.blockmask import create_block_mask
from flexcomp.evaluate import evaluate
from flexcomp.ir import Op
from flexcomp.mods import Mod
from flexcomp.sparsity import standard as std
from flexcomp.sparsity.standard import node
from flexcomp.sparsity.tiles import Grid, analyze_rows, evaluate_tiles
from flexcomp.tiles import TileClass


def mod_of(mask, tensors=None, name="mask") -> Mod:
    from flexcomp.ir import BufferSpec

    tensors = dict(tensors or {})
    specs = tuple(BufferSpec(k, str(v.dtype).removeprefix("torch."), tuple(v.shape)) for k, v in tensors.items())

    def fn(b, h, q_idx, kv_idx):
        return evaluate(mask, {"b": b.int(), "h": h.int(), "q_idx": q_idx.int(), "kv_idx": kv_idx.int()}, tensors)

    return Mod("mask", name, mask, mask, specs, {k: (lambda v=v: v) for k, v in tensors.items()}, fn)


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn):
    before = rss_mb()
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start, rss_mb() - before


def long_masks(quick: bool) -> list[str]:
    rows = []
    L = 1 << (18 if quick else 20)
    for name, mask in (("causal", std.causal()), ("sliding window 4096", std.sliding_window(4096))):
        bm, secs, mem = timed(lambda m=mask: create_block_mask(mod_of(m), None, None, L, L, "cpu"))
        how = bm.explain().splitlines()[0].split(": ", 1)[1]
        rows.append(f"| {name} | {L} | {secs * 1e3:.1f} ms | {mem:.1f} MB | {bm.sparsity():.2f}% | {how} |")
    L = 1 << (16 if quick else 18)
    mask, tensors = std.document(L, 1000)
    mod = mod_of(mask, tensors, "document")
    bm, secs, mem = timed(lambda: create_block_mask(mod, None, None, L, L, "cpu"))
    classes = bm.tile_classes()[0, 0]
    grid = Grid(1, 1, L, L, 128, 128)
    sample = torch.randint(0, grid.num_q_blocks, (2000, 2), generator=torch.Generator().manual_seed(0))
    tiles = torch.cat([torch.zeros(2000, 2, dtype=torch.long), sample], 1)
    brute = evaluate_tiles(mask, tensors, grid, 0, tiles, "cpu")
    agree = int((brute == classes[sample[:, 0], sample[:, 1]]).sum())
    rows.append(f"| document x1000 | {L} | {secs * 1e3:.1f} ms | {mem:.1f} MB | {bm.sparsity():.2f}% | "
                f"{agree}/2000 sampled tiles equal brute force |")
    return rows


def versus_torch(quick: bool) -> str:
    from torch.nn.attention.flex_attention import create_block_mask as torch_cbm

    device = "cuda" if torch.cuda.is_available() else "cpu"
    L = 32768 if device == "cuda" or not quick else 4096
    mod = mod_of(std.sliding_window(1024))
    causal = lambda b, h, q, kv: q >= kv
    torch_cbm(causal, None, None, 256, 256, device=device)  # warm-up
    _, t_torch, _ = timed(lambda: torch_cbm(causal, None, None, L, L, device=device))
    _, t_ours, _ = timed(lambda: create_block_mask(mod_of(std.causal()), None, None, L, L, device))
    _, t_doc, _ = timed(lambda: create_block_mask(mod, None, None, L, L, device))
    return (f"causal at L={L} on {device}: torch {t_torch * 1e3:.1f} ms, flexcomp {t_ours * 1e3:.1f} ms "
            f"({t_torch / t_ours:.0f}x); flexcomp sliding window {t_doc * 1e3:.1f} ms")


def exact_fractions() -> list[str]:
    doc, doc_tensors = std.document(4096, 40)
    variants = {
        "causal": (std.causal(), {}, 4000, 3000), "sliding window": (std.sliding_window(500), {}, 4000, 4000),
        "prefix-LM": (std.prefix_lm(700), {}, 4000, 4000), "document": (doc, doc_tensors, 4096, 4096),
        "block-causal": (std.block_causal(300), {}, 4000, 4000),
        "dilated window": (std.dilated_window(501), {}, 4000, 4000),
        "2-D neighborhood (W=64, R=3)": (std.neighborhood(64, 3), {}, 4096, 4096),
        "2-D neighborhood (W=60, R=3)": (std.neighborhood(60, 3), {}, 3600, 3600),
        "document & causal": (node(Op.AND, doc, std.causal()), doc_tensors, 4096, 4096),
    }
    rows = []
    for name, (mask, tensors, q_len, kv_len) in variants.items():
        grid = Grid(1, 1, q_len, kv_len, 128, 128)
        analysis = analyze_rows(mask, tensors, grid, 0, grid.num_q_blocks)
        all_tiles = torch.stack(torch.meshgrid(torch.arange(grid.num_q_blocks), torch.arange(grid.num_kv_blocks),
                                               indexing="ij"), -1).reshape(-1, 2)
        tiles = torch.cat([torch.zeros(all_tiles.shape[0], 2, dtype=torch.long), all_tiles], 1)
        brute = evaluate_tiles(mask, tensors, grid, 0, tiles, "cpu").view(analysis.shape[-2:])
        decidable = brute != TileClass.PARTIAL
        decided = analysis[0, 0] != TileClass.PARTIAL
        wrong = int((decided & (analysis[0, 0] != brute)).sum())
        rows.append(f"| {name} | {int(decided.sum())}/{int(decidable.sum())} | "
                    f"{100 * int(decided.sum()) / max(1, int(decidable.sum())):.1f}% | {wrong} |")
    return rows


def main() -> None:
    quick = "--quick" in sys.argv
    print("| mask | L | build | peak extra RSS | sparsity | notes |\n|---|---|---|---|---|---|")
    print("\n".join(long_masks(quick)))
    print()
    print(versus_torch(quick))
    print("\n| variant (L~4096, 128x128 tiles) | analysis decided / decidable | exact fraction | wrong |\n|---|---|---|---|")
    print("\n".join(exact_fractions()))


if __name__ == "__main__":
    main()
