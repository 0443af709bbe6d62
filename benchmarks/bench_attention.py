"""flexcomp beside torch FlexAttention (compiled) and SDPA: same inputs, same process.

    python benchmarks/bench_attention.py                 # the full table (GPU)
    python benchmarks/bench_attention.py --quick         # fewer variants, one head dim
    python benchmarks/bench_attention.py --json out.json

For every variant it first checks flexcomp's output (and gradients with
--backward) against torch's flex_attention on the same inputs, then times the
forward (and forward+backward) of each implementation with
triton.testing.do_bench (median).  TFLOP/s counts only unmasked work:
4*B*H*Lq*Lkv*D*density forward, 3.5x that forward+backward.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
import zlib
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention import flex_attention as torch_flex_module

import flexcomp as fc

torch_flex = torch.compile(torch_flex_module.flex_attention, dynamic=False)
# one compiled flex per variant and head dim: past dynamo's default limit of 8 torch would run unfused
torch._dynamo.config.recompile_limit = 256


# ---------------------------------------------------------------- the variants, as plain functions
# Plain functions on purpose: torch's flex_attention gets exactly what flexcomp gets.

WINDOW = 1024
PREFIX = 2048
SOFTCAP = 30.0
DILATION = 2


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def sliding_window(b, h, q_idx, kv_idx):
    return (q_idx >= kv_idx) & (q_idx - kv_idx <= WINDOW)


def prefix_lm(b, h, q_idx, kv_idx):
    return (kv_idx < PREFIX) | (q_idx >= kv_idx)


def dilated_window(b, h, q_idx, kv_idx):
    return (q_idx >= kv_idx) & (q_idx - kv_idx <= WINDOW) & ((q_idx - kv_idx) % DILATION == 0)


def softcap(score, b, h, q_idx, kv_idx):
    return SOFTCAP * torch.tanh(score / SOFTCAP)


DOC_IDS = None  # set per run: int32 [L], sorted document ids
SLOPES = None  # set per run: float32 [H]


def document_causal(b, h, q_idx, kv_idx):
    return (DOC_IDS[q_idx] == DOC_IDS[kv_idx]) & (q_idx >= kv_idx)


def document(b, h, q_idx, kv_idx):
    return DOC_IDS[q_idx] == DOC_IDS[kv_idx]


def alibi(score, b, h, q_idx, kv_idx):
    return score + SLOPES[h] * (kv_idx - q_idx)


@dataclass
class Variant:
    name: str
    mask_mod: object = None
    score_mod: object = None
    gqa: int = 1  # query heads per kv head
    sdpa_causal: bool | None = None  # SDPA runs this variant (None: it cannot)


VARIANTS = [
    Variant("no mask", sdpa_causal=False),
    Variant("causal", causal, sdpa_causal=True),
    Variant("sliding window 1024", sliding_window),
    Variant("document + causal", document_causal),
    Variant("document (64 docs)", document),
    Variant("prefix-LM 2048", prefix_lm),
    Variant("dilated window", dilated_window),
    Variant("ALiBi + causal", causal, alibi),
    Variant("tanh softcap 30 + causal", causal, softcap),
    Variant("GQA 4:1 causal", causal, gqa=4, sdpa_causal=True),
]
QUICK = {"causal", "sliding window 1024", "tanh softcap 30 + causal", "document + causal"}


# ---------------------------------------------------------------- measuring


@dataclass
class Row:
    variant: str
    head_dim: int
    density: float
    max_rel_err: float
    ms: dict = field(default_factory=dict)  # impl -> forward ms
    ms_fwd_bwd: dict = field(default_factory=dict)
    grad_rel_err: float | None = None
    first_call_s: dict = field(default_factory=dict)  # impl -> seconds of its first call (code generation, compile)


def first_call(fn) -> tuple[torch.Tensor, float]:
    """The result and wall time of a first call: what a user waits for at a variant's first use
    (flexcomp: kernel generation and Triton's compile, unless the disk cache has them; torch: Dynamo and Inductor)."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - start


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def mask_density(mask_mod, length: int, device) -> float:
    """Fraction of (q, kv) pairs the mask keeps, counted in row chunks (b = h = 0)."""
    if mask_mod is None:
        return 1.0
    kept = 0
    kv = torch.arange(length, device=device, dtype=torch.int32)[None, :]
    zero = torch.zeros((), device=device, dtype=torch.int32)
    for start in range(0, length, 1024):
        q = torch.arange(start, min(start + 1024, length), device=device, dtype=torch.int32)[:, None]
        kept += mask_mod(zero, zero, q, kv).sum().item()
    return kept / length**2


def bench(fn, backward: bool, grads=None, leaves=()) -> float:
    """Median ms of fn() (backward: of fn().backward(grads)).  The leaves' .grad are set to None before each timed
    call, as a training step's optimizer.zero_grad() does by default: otherwise every call after the first also
    times autograd adding the new gradients into the old (~0.4 ms at D=128, the same for every implementation)."""
    from triton.testing import do_bench

    if not backward:
        return do_bench(fn, warmup=50, rep=200, return_mode="median")

    def fwd_bwd():
        out = fn()
        out.backward(grads)

    return do_bench(fwd_bwd, warmup=50, rep=200, return_mode="median", grad_to_none=list(leaves))


def run_variant(v: Variant, B: int, H: int, L: int, D: int, backward: bool, dtype,
                kernel_options: dict | None = None) -> Row:
    global DOC_IDS, SLOPES
    device = "cuda"
    gen = torch.Generator(device=device).manual_seed(zlib.crc32(f"{v.name} {D}".encode()))  # same inputs every run
    n_docs = 64
    cuts = torch.sort(torch.randperm(L - 1, device=device, generator=gen)[: n_docs - 1] + 1).values
    DOC_IDS = torch.zeros(L, dtype=torch.int32, device=device)
    DOC_IDS[cuts] = 1
    DOC_IDS = DOC_IDS.cumsum(0).to(torch.int32)
    SLOPES = torch.exp2(-8.0 * torch.arange(1, H + 1, device=device) / H).float()

    Hkv = H // v.gqa
    q = torch.randn(B, H, L, D, device=device, dtype=dtype, generator=gen, requires_grad=backward)
    k = torch.randn(B, Hkv, L, D, device=device, dtype=dtype, generator=gen, requires_grad=backward)
    val = torch.randn(B, Hkv, L, D, device=device, dtype=dtype, generator=gen, requires_grad=backward)
    dout = torch.randn(B, H, L, D, device=device, dtype=dtype, generator=gen)
    gqa = v.gqa > 1

    t_mask = torch_flex_module.create_block_mask(v.mask_mod, 1, 1, L, L, device=device) if v.mask_mod else None
    f_mask = fc.create_block_mask(v.mask_mod, 1, 1, L, L, device=device) if v.mask_mod else None
    f_score = fc.score_mod(v.score_mod) if v.score_mod else None

    impls = {
        "flexcomp": lambda: fc.flex_attention(q, k, val, score_mod=f_score, block_mask=f_mask, enable_gqa=gqa,
                                              kernel_options=kernel_options),
        "torch flex": lambda: torch_flex(q, k, val, score_mod=v.score_mod, block_mask=t_mask, enable_gqa=gqa),
    }
    if v.sdpa_causal is not None:
        for name, backend in (("sdpa flash", SDPBackend.FLASH_ATTENTION), ("sdpa cudnn", SDPBackend.CUDNN_ATTENTION)):
            def sdpa(backend=backend):
                with sdpa_kernel(backend):
                    return F.scaled_dot_product_attention(q, k, val, is_causal=v.sdpa_causal, enable_gqa=gqa)
            impls[name] = sdpa

    (expected, torch_first), (got, ours_first) = first_call(impls["torch flex"]), first_call(impls["flexcomp"])
    row = Row(v.name, D, mask_density(v.mask_mod, L, device), rel_err(got, expected))
    row.first_call_s = {"flexcomp": ours_first, "torch flex": torch_first}
    if backward:
        expected.backward(dout)
        ref_grads = [t.grad.clone() for t in (q, k, val)]
        for t in (q, k, val):
            t.grad = None
        got.backward(dout)
        row.grad_rel_err = max(rel_err(t.grad, g) for t, g in zip((q, k, val), ref_grads))
        for t in (q, k, val):
            t.grad = None

    for name, fn in impls.items():
        try:
            with torch.no_grad():
                row.ms[name] = bench(fn, backward=False)
            if backward:
                row.ms_fwd_bwd[name] = bench(fn, backward=True, grads=dout, leaves=(q, k, val))
        except Exception as exc:  # noqa: BLE001 -- an implementation that cannot run this shape is reported, not fatal
            print(f"  {name} failed on {v.name}: {type(exc).__name__}: {str(exc)[:200]}", file=sys.stderr)
    return row


def tflops(row: Row, ms: float, B: int, H: int, L: int, backward: bool) -> float:
    flops = 4 * B * H * L * L * row.head_dim * row.density * (3.5 if backward else 1.0)
    return flops / (ms * 1e-3) / 1e12


def print_table(rows: list[Row], B: int, H: int, L: int, backward: bool) -> None:
    """One table per head dim, each with its geometric mean speed-up over torch flex and its slowest row."""
    key = "ms_fwd_bwd" if backward else "ms"
    title = "forward+backward" if backward else "forward"
    for D in sorted({r.head_dim for r in rows}, reverse=True):
        print(f"\n### {title}, D={D}: B={B} H={H} L={L}, TFLOP/s counting unmasked work\n")
        print("| variant | D | density | flexcomp ms | TFLOP/s | torch flex ms | TFLOP/s | vs flex | cuDNN TFLOP/s "
              "| vs cuDNN | err |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        ratios = []
        for r in (r for r in rows if r.head_dim == D):
            ms = getattr(r, key)
            ours, flex, cudnn = ms.get("flexcomp"), ms.get("torch flex"), ms.get("sdpa cudnn")
            if ours is None:
                continue
            speedup = flex / ours if flex else float("nan")
            if flex:
                ratios.append(speedup)
            cudnn_cols = (f"{tflops(r, cudnn, B, H, L, backward):.0f} | {cudnn / ours:.2f}x" if cudnn else "- | -")
            err = r.grad_rel_err if backward else r.max_rel_err
            flex_cols = f"{flex:.3f} | {tflops(r, flex, B, H, L, backward):.0f}" if flex else "- | -"
            print(f"| {r.variant} | {r.head_dim} | {r.density:.3f} | {ours:.3f} | "
                  f"{tflops(r, ours, B, H, L, backward):.0f} | {flex_cols} | {speedup:.2f}x | {cudnn_cols} | {err:.1e} |")
        if ratios:
            geo = math.exp(sum(map(math.log, ratios)) / len(ratios))
            print(f"\ngeometric mean speed-up over torch flex ({title}, D={D}): {geo:.3f}x; slowest {min(ratios):.2f}x")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--backward", action="store_true", help="also time forward+backward and check gradients")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", nargs="*", help="variant names to run")
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--kernel-options", help='flexcomp\'s kernel_options as JSON, e.g. \'{"REFINE_TILES": false}\'')
    parser.add_argument("--max-err", type=float, default=2e-2, help="fail when flexcomp differs more than this")
    parser.add_argument("--warm-cache", action="store_true",
                        help="keep flexcomp's and Triton's disk caches (default: fresh ones, so first calls are cold)")
    args = parser.parse_args()
    if not args.warm_cache:
        for var in ("FLEXCOMP_CACHE_DIR", "TRITON_CACHE_DIR"):
            os.environ[var] = tempfile.mkdtemp(prefix=var.lower() + "_")
    if not torch.cuda.is_available():
        print("this benchmark needs a CUDA GPU", file=sys.stderr)
        return 2

    import triton

    print(f"date {time.strftime('%Y-%m-%d')}, GPU {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"triton {triton.__version__}, python {platform.python_version()}")
    variants = [v for v in VARIANTS if (not args.quick or v.name in QUICK) and (not args.only or v.name in args.only)]
    rows = []
    for D in args.head_dims:
        for v in variants:
            t0 = time.time()
            row = run_variant(v, args.batch, args.heads, args.length, D, args.backward, torch.bfloat16,
                              json.loads(args.kernel_options) if args.kernel_options else None)
            rows.append(row)
            print(f"  {v.name:28s} D={D:3d} err={row.max_rel_err:.1e}"
                  + f" first call: flexcomp {row.first_call_s['flexcomp']:.1f}s, torch {row.first_call_s['torch flex']:.1f}s"
                  + (f" grad_err={row.grad_rel_err:.1e}" if row.grad_rel_err is not None else "")
                  + f"  ({time.time() - t0:.0f}s)", file=sys.stderr, flush=True)
    print_table(rows, args.batch, args.heads, args.length, backward=False)
    if args.backward:
        print_table(rows, args.batch, args.heads, args.length, backward=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=1)
    worst = max(max(r.max_rel_err, r.grad_rel_err or 0.0) for r in rows)
    if worst > args.max_err or math.isnan(worst):
        print(f"FAILED: flexcomp differs from torch flex by {worst:.2e} > {args.max_err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
