"""The Gluon Hopper backward (codegen/gluon/backward.py, issue 22) beside cuDNN SDPA and flexcomp's Triton kernels.

    python benchmarks/gluon_backward.py                  # H200: correctness, then the TFLOP/s table (< 150 s)
    python benchmarks/gluon_backward.py --compile-only   # any machine with Triton 3.6: AOT-compile the three kernels
                                                         # for sm_90 and print registers, spills, shared memory

On the GPU, each run (the default tiles, or tile overrides: --runs default STREAMED=32) is first tried alone at the
small shape in a child process (a wrong barrier phase hangs; the child is killed, the rest goes on).  Then dq, dk,
dv are checked against torch's SDPA math in float32 (autograd on float32 copies): max abs errors beside cuDNN's own
on the same bf16 inputs, at B=2 H=4 L=1024 for every config and fp16 once, and at the bench shape for two heads
(the kernels' grid is per head: a long-sequence error shows there).  out and lse come from the float32 reference,
so the check is the backward's alone.  Then forward+backward TFLOP/s (CUDA-event medians) at B=4 H=16 L=8192,
D=64/128, causal and not: the Gluon forward (version B) + this backward, cuDNN SDPA, flexcomp.flex_attention
(Triton); and the backward alone for Gluon and cuDNN.  TFLOP/s counts 4*B*H*L^2*D for the forward and 2.5 times
that for the backward (the dQ kernel's recomputed S and dP are not counted), half of it causal.  Each run goes in
its own try/except: one that fails is reported in a line and the others still print.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F
from gluon_attention import (
    CONFIGS,
    causal_mask,
    inputs,
    median_ms,
    parse_overrides,
    probe,
    ptx_summary,
    short,
    start_watchdog,
)
from torch.nn.attention import SDPBackend, sdpa_kernel

BENCH_SHAPE = (4, 16, 8192)  # B, H, L
CHECK_SHAPE = (2, 4, 1024)
CHECK_HEADS = ((0, 0), (3, 15))  # (b, h) of the bench shape checked against the reference
DEFAULT_RUNS = ["default", "STREAMED=32"]  # "default", or tile_config overrides "KEY=VALUE,KEY=VALUE"
KERNELS = ("preprocess", "dkdv", "dq")


def parse_tiles(run: str) -> dict:
    """'STREAMED=32,STAGES=2' -> {'STREAMED': 32, 'STAGES': 2}; 'default' -> {}."""
    return {} if run == "default" else parse_overrides(run)


def gluon_modules():
    """(codegen/gluon/attention.py, codegen/gluon/backward.py), imported late: Triton 3.6's Gluon API."""
    from flexcomp.codegen.gluon import attention, backward

    return attention, backward


# ---------------------------------------------------------------- compile only (no GPU)


def compile_only(runs: list[str]) -> int:
    """AOT-compile every kernel of every run at every config for sm_90; 1 if any failed."""
    import triton

    _, backward = gluon_modules()
    print(f"triton {triton.__version__}; target cuda sm_90")
    failed = 0
    jobs = [("default", "preprocess", head_dim, False) for head_dim in (64, 128)]
    jobs += [(run, kernel, d, c) for run in runs for kernel in KERNELS[1:] for d, c in CONFIGS]
    for run, kernel, head_dim, causal in jobs:
        name = f"{run} {kernel} D={head_dim} {'causal' if causal else 'no mask'}"
        start = time.perf_counter()
        try:
            compiled = backward.aot_compile(kernel, head_dim, causal, tiles=parse_tiles(run))
        except Exception as exc:  # noqa: BLE001 -- one kernel's failure is reported, the others still compile
            print(f"{name}: FAILED {short(exc)}")
            failed += 1
            continue
        print(f"{name}: {time.perf_counter() - start:.1f} s; {ptx_summary(compiled)}", flush=True)
    return 1 if failed else 0


# ---------------------------------------------------------------- correctness


def reference(q, k, v, do, causal: bool):
    """(out, lse, dq, dk, dv) in float32: SDPA math with autograd on float32 copies, one head at a time."""
    B, H, L, D = q.shape
    results = [
        torch.empty(B, H, L, *rest, dtype=torch.float32, device=q.device) for rest in ((D,), (), (D,), (D,), (D,))
    ]
    keep = torch.ones(L, L, dtype=torch.bool, device=q.device).tril() if causal else None
    for b in range(B):
        for h in range(H):
            qf, kf, vf = (t[b, h].float().requires_grad_() for t in (q, k, v))
            with sdpa_kernel(SDPBackend.MATH):
                out = F.scaled_dot_product_attention(qf, kf, vf, is_causal=causal)
            out.backward(do[b, h].float())
            with torch.no_grad():
                scores = qf @ kf.T * D**-0.5
                if keep is not None:
                    scores = scores.masked_fill(~keep, float("-inf"))
                for result, value in zip(results, (out, scores.logsumexp(-1), qf.grad, kf.grad, vf.grad)):
                    result[b, h] = value
    return results


def cudnn_grads(q, k, v, do, causal: bool):
    """cuDNN SDPA's (dq, dk, dv) on the same inputs."""
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        F.scaled_dot_product_attention(*leaves, is_causal=causal).backward(do)
    return [t.grad for t in leaves]


def errors(grads, ref) -> list[float]:
    return [(g.float() - r).abs().max().item() for g, r in zip(grads, ref)]


def check_case(backward, runs, q, k, v, do, causal, label, heads=None) -> dict[str, bool]:
    """One line of errors: each run's dq, dk, dv beside cuDNN's, against the float32 reference (on `heads`, the
    (b, h) pairs compared, or all).  A run is WRONG past 4x cuDNN's error or 1/64 of the gradient's largest
    magnitude, whichever is larger (bf16's own rounding of the result is up to 1/512 of it; P and dS are rounded to
    bf16 before their matmuls as in cuDNN; a wrong mask or scale is off by the magnitude), or on a NaN.  run -> ok."""
    pick = (lambda t: t) if heads is None else (lambda t: torch.stack([t[b, h] for b, h in heads]))
    sub = [pick(t) for t in (q, k, v, do)]
    out, lse, *ref = reference(*(t.unsqueeze(0) if heads is not None else t for t in sub), causal)
    if heads is not None:
        out, lse, ref = out[0], lse[0], [r[0] for r in ref]
    try:
        base = errors([pick(g) for g in cudnn_grads(q, k, v, do, causal)], ref)
        cells = ["cudnn: " + " ".join(f"{n} {e:.1e}" for n, e in zip(("dq", "dk", "dv"), base))]
    except Exception as exc:  # noqa: BLE001 -- the calibration only
        base, cells = [0.0] * 3, [f"cudnn: {short(exc)[:60]}"]
    verdicts = {}
    full_out, full_lse = gluon_inputs(out, lse, q, k, v, causal, heads)
    for run in runs:
        try:
            grads = backward.attention_backward(q, k, v, full_out, do, full_lse, causal, tiles=parse_tiles(run))
            torch.cuda.synchronize()
        except Exception as exc:  # noqa: BLE001 -- reported; the other runs still run
            cells.append(f"{run}: {short(exc)}")
            verdicts[run] = False
            continue
        errs = errors([pick(g) for g in grads], ref)
        scales = [r.abs().max().item() for r in ref]
        ok = all(e <= max(4 * b, s / 64) for e, b, s in zip(errs, base, scales))  # NaN compares false: not ok
        verdicts[run] = ok
        cells.append(
            f"{run}: " + " ".join(f"{n} {e:.1e}" for n, e in zip(("dq", "dk", "dv"), errs)) + ("" if ok else " WRONG")
        )
    print(f"  {label}: {'; '.join(cells)}", flush=True)
    return verdicts


def gluon_inputs(out, lse, q, k, v, causal, heads):
    """out (q's dtype) and lse for the whole batch: the reference's where it was computed; elsewhere (heads not
    checked) the Gluon forward's (version B), so every head of the launch sees a consistent out and lse."""
    if heads is None:
        return out.to(q.dtype), lse
    attention, _ = gluon_modules()
    full_out, full_lse = attention.attention_forward(q, k, v, causal=causal, version="B")
    for i, (b, h) in enumerate(heads):
        full_out[b, h], full_lse[b, h] = out[i].to(q.dtype), lse[i]
    return full_out, full_lse


def check(backward, runs: list[str]) -> dict[str, bool]:
    print("correctness (max abs error vs SDPA math in float32, autograd):")
    verdicts = dict.fromkeys(runs, True)
    cases = [(CHECK_SHAPE, d, c, torch.bfloat16) for d, c in CONFIGS] + [(CHECK_SHAPE, 128, True, torch.float16)]
    cases += [(BENCH_SHAPE, d, c, torch.bfloat16) for d, c in CONFIGS]
    for (B, H, L), head_dim, causal, dtype in cases:
        q, k, v, do = inputs(B, H, L, head_dim, dtype=dtype) + inputs(B, H, L, head_dim, seed=7, dtype=dtype)[:1]
        heads = CHECK_HEADS if L == BENCH_SHAPE[2] else None
        label = f"{str(dtype)[6:]} B={B} H={H} L={L} D={head_dim} {'causal ' if causal else 'no mask'}"
        label += f" heads {heads}" if heads else ""
        try:
            for run, ok in check_case(backward, runs, q, k, v, do, causal, label, heads).items():
                verdicts[run] &= ok
        except Exception as exc:  # noqa: BLE001 -- reported; the other cases still run
            print(f"  {label}: {short(exc)}")
        del q, k, v, do
    return verdicts


def probe_child(run: str) -> int:
    attention, backward = gluon_modules()
    B, H, L = CHECK_SHAPE
    for head_dim, causal in CONFIGS:
        q, k, v, do = inputs(B, H, L, head_dim) + inputs(B, H, L, head_dim, seed=7)[:1]
        out, lse = attention.attention_forward(q, k, v, causal=causal, version="B")
        backward.attention_backward(q, k, v, out, do, lse, causal, tiles=parse_tiles(run))
        torch.cuda.synchronize()
    return 0


# ---------------------------------------------------------------- timing


def implementations(runs: list[str], q, k, v, do, causal: bool) -> dict:
    """name -> (forward+backward callable, backward-alone callable or None), all on the same inputs."""
    import flexcomp as fc

    attention, backward = gluon_modules()
    L = q.shape[2]
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]

    def through_autograd(forward):
        def step():
            for t in leaves:
                t.grad = None
            forward(*leaves).backward(do)

        return step

    def cudnn(*args):
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return F.scaled_dot_product_attention(*args, is_causal=causal)

    forwards = {}  # each implementation's forward, run once by the first (warmup) call of its backward alone

    def once(name, forward):
        if name not in forwards:
            forwards[name] = forward()
        return forwards[name]

    def cudnn_backward():
        return torch.autograd.grad(once("cudnn", lambda: cudnn(*leaves)), leaves, do, retain_graph=True)

    def gluon_forward():
        return attention.attention_forward(q, k, v, causal=causal, version="B")

    impls = {"cudnn": (through_autograd(cudnn), cudnn_backward)}
    for run in runs:
        tiles = parse_tiles(run)

        def both(tiles=tiles):
            out, lse = gluon_forward()
            return backward.attention_backward(q, k, v, out, do, lse, causal=causal, tiles=tiles)

        def backward_alone(tiles=tiles):
            out, lse = once("gluon", gluon_forward)
            return backward.attention_backward(q, k, v, out, do, lse, causal=causal, tiles=tiles)

        impls[f"gluon {run}"] = (both, backward_alone)
    block_mask = fc.create_block_mask(causal_mask, 1, 1, L, L, device=q.device) if causal else None
    impls["flexcomp"] = (through_autograd(lambda *a: fc.flex_attention(*a, block_mask=block_mask)), None)
    return impls


def bench(runs: list[str]) -> None:
    B, H, L = BENCH_SHAPE
    names, rows = [], []
    for head_dim, causal in CONFIGS:
        q, k, v, do = inputs(B, H, L, head_dim, seed=1) + inputs(B, H, L, head_dim, seed=8)[:1]
        forward_flops = 4 * B * H * L * L * head_dim * (0.5 if causal else 1.0)
        cells = {}
        try:
            impls = implementations(runs, q, k, v, do, causal)
        except Exception as exc:  # noqa: BLE001 -- reported; the other configs still run
            print(f"  D={head_dim} causal={causal}: {short(exc)}", file=sys.stderr)
            continue
        for name, (both, bwd) in impls.items():
            for column, fn, flops in (
                (f"{name} fwd+bwd", both, 3.5 * forward_flops),
                (f"{name} bwd", bwd, 2.5 * forward_flops),
            ):
                if fn is None:
                    continue
                names += [column] if column not in names else []
                try:
                    cells[column] = f"{flops / median_ms(fn, warmup=3, reps=10) / 1e9:.0f}"
                except Exception as exc:  # noqa: BLE001 -- reported; the other implementations still run
                    print(f"  {column} D={head_dim} causal={causal}: {short(exc)}", file=sys.stderr)
                    cells[column] = "fail"
        rows.append((f"{'causal' if causal else 'no mask'} D={head_dim}", cells))
        print(f"  {rows[-1][0]}: " + ", ".join(f"{n} {c}" for n, c in cells.items()), flush=True)  # before a watchdog
        del q, k, v, do, impls
    print(f"\nTFLOP/s, bf16, B={B} H={H} L={L} (CUDA-event medians; fwd 4*BHL^2*D, bwd 2.5x; causal half)")
    print("| | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for label, cells in rows:
        print(f"| {label} | " + " | ".join(cells.get(n, "-") for n in names) + " |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compile-only", action="store_true", help="AOT-compile every kernel for sm_90, no GPU")
    parser.add_argument("--runs", nargs="*", default=DEFAULT_RUNS, help="'default' or tile overrides KEY=VALUE,...")
    parser.add_argument("--watchdog", type=float, default=150.0, help="exit (code 124) after this many seconds")
    parser.add_argument("--probe", help=argparse.SUPPRESS)  # the child of probe()
    args = parser.parse_args()
    if args.compile_only:
        return compile_only(args.runs)
    if args.probe:
        return probe_child(args.probe)
    start_watchdog(args.watchdog)
    start = time.perf_counter()
    try:
        _, backward = gluon_modules()
    except Exception as exc:  # noqa: BLE001 -- without Gluon there is nothing to run; say why
        print(f"cannot import codegen/gluon/backward.py: {short(exc)}")
        return 1
    torch.backends.cuda.matmul.allow_tf32 = False  # the float32 reference is float32
    print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}; runs {args.runs}")
    status = probe(args.runs, timeout=60.0, script=__file__)
    print("probe (each run alone at the small shape): " + "; ".join(f"{r} {s}" for r, s in status.items()), flush=True)
    runs = [run for run in args.runs if status[run] == "ok"]
    verdicts = check(backward, runs)
    bench([run for run in runs if verdicts[run]])
    print(f"\n{time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
