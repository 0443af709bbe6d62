"""Sweep forward launch configs and kernel switches per variant and head dim, beside torch flex and cuDNN, in one process.

    python benchmarks/tune_forward.py --head-dims 64 128 --only causal "document + causal" \
        --configs 128x128w8s3 128x64w8s3 nofold tma 128x64w8s3+tma

Each column is a kernel_options override: a config BLOCK_M x BLOCK_N, warps, stages (`128x64w8s3`),
switches (`tma`: K/V through tensor descriptors; `nofold`: FOLD_SCALE off, the softmax scale as a
separate multiply), or both joined by `+`.  The default column always runs.  Before timing, every
column is compiled in parallel worker processes (B=1 inputs of the same specialization), so the
sweep's time goes to measuring.  Each variant's default output is checked against torch's
flex_attention, and every column's output against the default's.  Prints one table row per variant
and, per switch column, its time relative to the default.
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import sys
import time
import zlib

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_attention as ba

import flexcomp as fc

SWITCHES = {"tma": {"USE_TMA": True}, "nofold": {"FOLD_SCALE": False}, "fold": {"FOLD_SCALE": True},
            "norefine": {"REFINE_TILES": False}, "prefetch": {"PREFETCH_INDEX": True},
            "noprefetch": {"PREFETCH_INDEX": False}}


def parse_config(text: str) -> dict:
    """`128x64w8s3`, a switch of SWITCHES, or several joined by `+` -> kernel_options."""
    options: dict = {}
    for part in text.split("+"):
        if part in SWITCHES:
            options.update(SWITCHES[part])
            continue
        blocks, rest = part.split("w")
        m, n = blocks.split("x")
        w, st = rest.split("s")
        options.update({"BLOCK_M": int(m), "BLOCK_N": int(n), "num_warps": int(w), "num_stages": int(st)})
    return options


def setup(v: ba.Variant, B: int, H: int, L: int, D: int):
    """Inputs and masks as bench_attention.run_variant makes them (same seed)."""
    device = "cuda"
    gen = torch.Generator(device=device).manual_seed(zlib.crc32(f"{v.name} {D}".encode()))  # as bench_attention
    cuts = torch.sort(torch.randperm(L - 1, device=device, generator=gen)[:63] + 1).values
    doc = torch.zeros(L, dtype=torch.int32, device=device)
    doc[cuts] = 1
    ba.DOC_IDS = doc.cumsum(0).to(torch.int32)
    ba.SLOPES = torch.exp2(-8.0 * torch.arange(1, H + 1, device=device) / H).float()
    Hkv = H // v.gqa
    q = torch.randn(B, H, L, D, device=device, dtype=torch.bfloat16, generator=gen)
    k = torch.randn(B, Hkv, L, D, device=device, dtype=torch.bfloat16, generator=gen)
    val = torch.randn(B, Hkv, L, D, device=device, dtype=torch.bfloat16, generator=gen)
    f_mask = fc.create_block_mask(v.mask_mod, 1, 1, L, L, device=device) if v.mask_mod else None
    f_score = fc.score_mod(v.score_mod) if v.score_mod else None
    return q, k, val, f_mask, f_score


def _warm(job) -> str:
    """Compile one (variant, D, config) in a worker: a B=1 launch has the same specialization."""
    name, D, H, L, options = job
    v = next(x for x in ba.VARIANTS if x.name == name)
    q, k, val, f_mask, f_score = setup(v, 1, H, L, D)
    t0 = time.time()
    try:
        with torch.no_grad():
            fc.flex_attention(q, k, val, score_mod=f_score, block_mask=f_mask, enable_gqa=v.gqa > 1,
                              kernel_options=options)
        torch.cuda.synchronize()
        return f"{name} D={D} {options}: {time.time() - t0:.1f}s"
    except Exception as exc:  # noqa: BLE001 -- reported; the timing pass reports it again
        return f"{name} D={D} {options}: FAILED {type(exc).__name__}: {str(exc)[:120]}"


def measure(v: ba.Variant, D: int, args, configs: list) -> tuple:
    q, k, val, f_mask, f_score = setup(v, args.batch, args.heads, args.length, D)
    gqa = v.gqa > 1
    density = ba.mask_density(v.mask_mod, args.length, "cuda")
    flops = 4 * args.batch * args.heads * args.length**2 * D * density
    times, err = {}, float("nan")

    def ours(options=None):
        return fc.flex_attention(q, k, val, score_mod=f_score, block_mask=f_mask, enable_gqa=gqa,
                                 kernel_options=options)

    with torch.no_grad():
        if not args.no_flex:
            t_mask = (ba.torch_flex_module.create_block_mask(v.mask_mod, 1, 1, args.length, args.length,
                                                             device="cuda") if v.mask_mod else None)

            def flex():
                return ba.torch_flex(q, k, val, score_mod=v.score_mod, block_mask=t_mask, enable_gqa=gqa)

            def cudnn():
                with ba.sdpa_kernel(ba.SDPBackend.CUDNN_ATTENTION):
                    return ba.F.scaled_dot_product_attention(q, k, val, is_causal=v.sdpa_causal, enable_gqa=gqa)

            err = ba.rel_err(ours(), flex())
            times["flex"] = ba.bench(flex, backward=False)
            if v.sdpa_causal is not None:
                times["cudnn"] = ba.bench(cudnn, backward=False)
        reference = ours()
        for c in configs:
            label, options = ("default", None) if c is None else c
            try:
                diff = (ours(options).float() - reference.float()).abs().max().item()
                if diff > 0.05:  # bf16 outputs of unit-scale inputs: a wrong kernel, not rounding
                    print(f"  {v.name} D={D} {label}: output differs from the default by {diff:.3g}", file=sys.stderr)
                times[label] = ba.bench(lambda options=options: ours(options), backward=False)
            except Exception as exc:  # noqa: BLE001
                print(f"  {v.name} D={D} {label}: {type(exc).__name__}: {str(exc)[:160]}", file=sys.stderr)
        # back-to-back calls without the L2 flush: far above the event time means the host is the bottleneck
        ours()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(50):
            ours()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t0) / 50 * 1e3
    mine = {k_: t for k_, t in times.items() if k_ not in ("flex", "cudnn")}
    times["wall"] = wall
    best = min(mine, key=mine.get)
    cells = " ".join(f"{k_}={t:.3f}" for k_, t in times.items())
    print(f"  {v.name} D={D} err={err:.1e} best={best} {cells}", file=sys.stderr, flush=True)
    return v.name, D, err, times, best, flops


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--head-dims", type=int, nargs="+", default=[128])
    parser.add_argument("--only", nargs="*", help="variant names")
    parser.add_argument("--configs", nargs="*", default=[], help="e.g. 128x128w8s3; the default config always runs")
    parser.add_argument("--workers", type=int, default=12)
    parser.add_argument("--no-flex", action="store_true", help="skip torch flex and cuDNN")
    args = parser.parse_args()
    torch._dynamo.config.recompile_limit = 256  # one compiled flex per variant and head dim, not a fallback
    variants = [v for v in ba.VARIANTS if not args.only or v.name in args.only]
    configs = [None] + [(c, parse_config(c)) for c in args.configs]

    t0 = time.time()
    jobs = [(v.name, D, args.heads, args.length, c and c[1]) for D in args.head_dims for v in variants
            for c in configs]
    with mp.get_context("spawn").Pool(args.workers) as pool:
        for line in pool.imap_unordered(_warm, jobs):
            print("  warm", line, file=sys.stderr, flush=True)
    print(f"compiled {len(jobs)} kernels in {time.time() - t0:.0f}s", file=sys.stderr, flush=True)

    rows = []
    for D in args.head_dims:
        for v in variants:
            rows.append(measure(v, D, args, configs))
    print("\n| variant | D | err | flex ms | cuDNN ms | default ms | best | best ms | TFLOP/s | vs flex | vs cuDNN |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    ratios = []
    for name, D, err, times, best, flops in rows:
        flex, cudnn, ours = times.get("flex"), times.get("cudnn"), times[best]
        if flex:
            ratios.append(flex / times["default"])
        print(f"| {name} | {D} | {err:.1e} | {flex or 0:.3f} | {cudnn or 0:.3f} | {times['default']:.3f} | {best} | "
              f"{ours:.3f} | {flops / ours / 1e9:.0f} | {(flex or math.nan) / ours:.2f}x | "
              f"{(cudnn or math.nan) / ours:.2f}x |")
    if ratios:
        geo = math.exp(sum(map(math.log, ratios)) / len(ratios))
        print(f"\ndefault config vs torch flex: geometric mean {geo:.2f}x, slowest {min(ratios):.2f}x")
    labels = [c[0] for c in configs if c is not None]
    if labels:  # each column against the default: < 1 is faster
        print("\n| variant | D | " + " | ".join(labels) + " |")
        print("|---|---|" + "---|" * len(labels))
        for name, D, _, times, _, _ in rows:
            cells = [f"{times[x] / times['default']:.3f}" if x in times else "-" for x in labels]
            print(f"| {name} | {D} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
