"""The Gluon Hopper forward (codegen/gluon/attention.py, issue 22) beside cuDNN SDPA and flexcomp's Triton kernel.

    python benchmarks/gluon_attention.py                  # H200: correctness, then the TFLOP/s tables (< 170 s)
    python benchmarks/gluon_attention.py --compile-only   # any machine with Triton 3.6: AOT-compile every version
                                                          # for sm_90 and print registers, spills, shared memory

On the GPU, every version is first checked against torch's SDPA math in float32 (max abs error of out and lse, at
B=2 H=4 L=1024 and at the bench shapes), then timed with CUDA events (median) at B=4 H=16 L=8192, D=64 and 128,
causal and not, beside cuDNN SDPA and flexcomp.flex_attention (a causal block mask), on the same inputs.
TFLOP/s counts unmasked work: 4*B*H*L^2*D, half of it causal.  Each run (a version, or a version with tile
overrides: --runs A B "A:BLOCK_N=128,STAGES=3") goes in its own try/except, so one that fails to compile or run
is reported in a line and the others still print.

Then the variants (VARIANTS: sliding window, ALiBi, softcap), whose mods flexcomp renders into version B
(codegen/gluon/mods.py): each checked against flexcomp's float32 reference backend, then timed at D=128 (--variant-dims)
beside flexcomp's Triton kernel, flexcomp with kernel_options BACKEND='GLUON' (the dispatch, host time included)
and torch's flex_attention (torch.compile'd).  TFLOP/s there counts the dense work (4*B*H*L^2*D) for all.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BENCH_SHAPE = (4, 16, 8192)  # B, H, L
CHECK_SHAPE = (2, 4, 1024)
CONFIGS = [(64, False), (64, True), (128, False), (128, True)]  # (head dim, causal)
# what runs: a version, or a version with tile_config overrides ("A:BLOCK_N=128,STAGES=3")
# issue 22 step 1's A/B (predictions in NOTES_forward.md): SPLIT=1 masked and full kv tiles in loops of their own;
# CONSUMERS=3 192-row CTAs; Q_ROWS=128,BLOCK_N=64 two 128-row consumers on 64-wide kv tiles (D=64's candidates)
DEFAULT_RUNS = ["B", "B:SPLIT=1", "B:CONSUMERS=3", "B:CONSUMERS=3,SPLIT=1", "B:Q_ROWS=128,BLOCK_N=64"]
VARIANT_RUNS = ["B", "B:SPLIT=1"]  # the runs the variants take


def sliding_window(b, h, q_idx, kv_idx):
    return (q_idx >= kv_idx) & (q_idx - kv_idx < 1024)


def causal_mask(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def alibi(score, b, h, q_idx, kv_idx):
    return score + (kv_idx - q_idx) * 2.0 ** (-(h + 1) * 0.5)  # 16 heads' slopes 2^-0.5 .. 2^-8


def softcap(score, b, h, q_idx, kv_idx):
    return 30.0 * torch.tanh(score / 30.0)


# name -> (score_mod, mask_mod), plain functions: torch's flex_attention gets exactly what flexcomp gets
VARIANTS = {"sliding window": (None, sliding_window), "alibi causal": (alibi, causal_mask), "softcap": (softcap, None)}


def parse_run(run: str) -> tuple[str, dict]:
    """'A:BLOCK_N=128,STAGES=3' -> ('A', {'BLOCK_N': 128, 'STAGES': 3})."""
    version, _, overrides = run.partition(":")
    return version, parse_overrides(overrides)


def parse_overrides(text: str) -> dict:
    """'BLOCK_N=128,STAGES=3' -> {'BLOCK_N': 128, 'STAGES': 3}; '' -> {}."""
    return {key: int(value) for key, value in (item.split("=") for item in text.split(",") if item)}


def gluon_module():
    """codegen/gluon/attention.py, imported late: it imports triton.experimental.gluon, whose API is 3.6's."""
    from flexcomp.codegen.gluon import attention

    return attention


def short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {' | '.join(line.strip() for line in text[-3:])[:300]}"


# ---------------------------------------------------------------- compile only (no GPU)


def ptx_summary(kernel) -> str:
    """ptxas's report for sm_90 (the ptxas Triton itself runs there): registers, spills, and whether it serialized
    the wgmmas (C75xx: an async accumulator it cannot keep in flight); shared memory; the PTX's op counts."""
    import re
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    ptx = kernel.asm["ptx"]
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/kernel.ptx"
        with open(path, "w") as f:
            f.write(ptx)
        log = subprocess.run(
            [get_ptxas(90).path, "-arch=sm_90a", "-v", path, "-o", path + ".o"],
            capture_output=True,
            text=True,
            check=False,
        ).stderr
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    serialized = sorted(set(re.findall(r"\((C75\d\d)\) Potential Performance Loss: wgmma", log)))
    counts = {op: ptx.count(op) for op in ("wgmma.mma_async", "wgmma.wait_group", "bar.sync", "setmaxnreg")}
    return (
        f"regs {regs.group(1) if regs else '?'}, spill st/ld {spills.groups() if spills else '?'}, "
        f"wgmma {'SERIALIZED ' + '/'.join(serialized) if serialized else 'async'}, "
        f"shared {kernel.metadata.shared // 1024} KiB, " + ", ".join(f"{op} {n}" for op, n in counts.items())
    )


def variant_mods(variant: str, L: int, device: str):
    """(flexcomp score_mod, block mask, the Gluon kernel's GluonMods) of a VARIANTS entry at length L."""
    from flexcomp.codegen.gluon.dispatch import kernel_mods

    import flexcomp as fc

    score_fn, mask_fn = VARIANTS[variant]
    score = fc.score_mod(score_fn) if score_fn else None
    block_mask = fc.create_block_mask(mask_fn, 1, 1, L, L, device=device) if mask_fn else None
    return score, block_mask, kernel_mods(score, block_mask)


def compile_only(runs: list[str], variant_dims: list[int]) -> int:
    """AOT-compile every run at every config for sm_90, and the variants' runs; 1 if any failed."""
    import triton

    attention = gluon_module()
    print(f"triton {triton.__version__}; target cuda sm_90")
    jobs = [(run, head_dim, causal, None) for run in runs for head_dim, causal in CONFIGS]
    jobs += [(run, d, False, variant) for variant in VARIANTS for run in VARIANT_RUNS for d in variant_dims]
    failed = 0
    for run, head_dim, causal, variant in jobs:
        version, tiles = parse_run(run)
        name = f"{run} {variant} D={head_dim}" if variant else f"{run} D={head_dim} {'causal' if causal else 'no mask'}"
        start = time.perf_counter()
        try:
            mods = variant_mods(variant, 8192, "cpu")[2] if variant else attention.NO_MODS
            kernel = attention.aot_compile(version, head_dim, causal, tiles=tiles, mods=mods)
        except Exception as exc:  # noqa: BLE001 -- one version's failure is reported, the others still compile
            print(f"{name}: FAILED {short(exc)}")
            failed += 1
            continue
        print(f"{name}: {time.perf_counter() - start:.1f} s; {ptx_summary(kernel)}")
    return 1 if failed else 0


# ---------------------------------------------------------------- correctness


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) in float32 by torch's SDPA math backend and logsumexp, a few heads at a time (bounded memory)."""
    B, H, L, D = q.shape
    out = torch.empty(B, H, L, D, dtype=torch.float32, device=q.device)
    lse = torch.empty(B, H, L, dtype=torch.float32, device=q.device)
    keep = torch.ones(L, L, dtype=torch.bool, device=q.device).tril() if causal else None
    heads = max(1, (1 << 29) // (L * L))  # ~2 GiB of float32 scores per chunk
    for b in range(B):
        for h in range(0, H, heads):
            qf, kf, vf = (t[b, h : h + heads].float() for t in (q, k, v))
            with sdpa_kernel(SDPBackend.MATH):
                out[b, h : h + heads] = F.scaled_dot_product_attention(qf, kf, vf, is_causal=causal)
            scores = qf @ kf.transpose(-1, -2) * D**-0.5
            if keep is not None:
                scores = scores.masked_fill(~keep, float("-inf"))
            lse[b, h : h + heads] = scores.logsumexp(-1)
    return out, lse


def inputs(B: int, H: int, L: int, D: int, seed: int = 0, dtype=torch.bfloat16) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return tuple(torch.randn(B, H, L, D, device="cuda", dtype=dtype, generator=gen) for _ in range(3))


def run_forward(attention, run: str, q, k, v, causal: bool, mods=None):
    version, tiles = parse_run(run)
    mods = attention.NO_MODS if mods is None else mods
    return attention.attention_forward(q, k, v, causal=causal, version=version, tiles=tiles, mods=mods)


def cudnn_forward(q, k, v, causal: bool) -> torch.Tensor:
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


# bf16 keeps 8 bits: out's rounding alone is up to |out| * 2^-9 (~0.01 at |out| ~ 5, a row attending to one key),
# P's rounding before P V as much again; a wrong rescale or mask is off by 0.1 or more.  cuDNN's error is printed
# beside ours as the calibration.
OUT_TOLERANCE = 3e-2
LSE_TOLERANCE = 1e-3  # lse is float32 from exact bf16 products: only exp2/log2 and summation order differ


def error_cell(attention, run: str, q, k, v, causal: bool, ref_out, ref_lse) -> tuple[str, str | None]:
    """(the run's max abs errors as text, None or why it failed)."""
    try:
        out, lse = run_forward(attention, run, q, k, v, causal)
        torch.cuda.synchronize()
    except Exception as exc:  # noqa: BLE001 -- reported; the other runs still run
        return f"{run}: FAILED", short(exc)
    err_out = (out.float() - ref_out).abs().max().item()
    err_lse = (lse - ref_lse).abs().max().item()
    ok = err_out < OUT_TOLERANCE and err_lse < LSE_TOLERANCE  # NaN compares false: not ok
    return f"{run}: out {err_out:.1e} lse {err_lse:.1e}{'' if ok else ' WRONG'}", None if ok else "wrong"


def check(attention, runs: list[str]) -> dict[tuple, str]:
    """Max abs error of each run's out and lse against the float32 reference; (run, D, causal) -> failure.
    bf16 at every config and both shapes; fp16 once (D=128 causal, the small shape, the default tiles)."""
    failures = {}
    print("correctness (max abs error vs SDPA math in float32):")
    fp16 = [(CHECK_SHAPE, 128, True, torch.float16, [run for run in runs if ":" not in run])]
    bf16 = [(shape, d, c, torch.bfloat16, runs) for shape in (CHECK_SHAPE, BENCH_SHAPE) for d, c in CONFIGS]
    for (B, H, L), head_dim, causal, dtype, checked in bf16[:4] + fp16 + bf16[4:]:
        q, k, v = inputs(B, H, L, head_dim, dtype=dtype)
        ref_out, ref_lse = reference(q, k, v, causal)
        cells = []
        for run in checked:
            text, why = error_cell(attention, run, q, k, v, causal, ref_out, ref_lse)
            cells.append(text)
            if why is not None and dtype == torch.bfloat16:
                failures[(run, head_dim, causal)] = why
            elif why is not None and why != "wrong":
                print(f"  {run} fp16: {why}")
        try:
            cells.append(f"cudnn: out {(cudnn_forward(q, k, v, causal).float() - ref_out).abs().max().item():.1e}")
        except Exception as exc:  # noqa: BLE001 -- the calibration only
            cells.append(f"cudnn: {short(exc)[:60]}")
        label = f"{str(dtype)[6:]} B={B} H={H} L={L} D={head_dim} {'causal ' if causal else 'no mask'}"
        print(f"  {label}: {'; '.join(cells)}", flush=True)
        del q, k, v, ref_out, ref_lse
    for key, why in failures.items():
        if why != "wrong":
            print(f"  {key[0]} D={key[1]} causal={key[2]}: {why}")
    return failures


def probe(runs: list[str], timeout: float = 90.0, script: str = __file__) -> dict[str, str]:
    """Each run at the small shape in a child process (`script --probe RUN`), all at once: a kernel whose barrier
    phases are wrong hangs, and here that costs its own run (killed at the timeout), not the whole benchmark.
    run -> ok / hung / error.  The children's compiles land in Triton's disk cache, so the parent's are hits."""
    children = {
        run: subprocess.Popen(
            [sys.executable, script, "--probe", run], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for run in runs
    }
    deadline = time.monotonic() + timeout
    status = {}
    for run, child in children.items():
        try:
            output, _ = child.communicate(timeout=max(1.0, deadline - time.monotonic()))
            status[run] = (
                "ok"
                if child.returncode == 0
                else f"exit {child.returncode}: {' | '.join(output.strip().splitlines()[-2:])[-300:]}"
            )
        except subprocess.TimeoutExpired:
            child.kill()
            child.communicate()
            status[run] = f"hung (killed after {timeout:.0f} s)"
    return status


def probe_child(run: str) -> int:
    """--probe: one run at the small shape, every config, and every variant if the variants take the run (the
    parent reads the exit code)."""
    attention = gluon_module()
    B, H, L = CHECK_SHAPE
    for head_dim, causal in CONFIGS:
        q, k, v = inputs(B, H, L, head_dim)
        run_forward(attention, run, q, k, v, causal)
        torch.cuda.synchronize()
    for variant in VARIANTS if run in VARIANT_RUNS else ():
        q, k, v = inputs(B, H, L, 128)
        run_forward(attention, run, q, k, v, False, variant_mods(variant, L, "cuda")[2])
        torch.cuda.synchronize()
    return 0


# ---------------------------------------------------------------- timing


def median_ms(fn, warmup: int = 5, reps: int = 20) -> float:
    """Median of `reps` CUDA-event timings of fn(), after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def implementations(attention, runs: list[str], q, k, v, causal: bool) -> dict:
    """name -> zero-argument callable, all on the same q, k, v."""
    import flexcomp as fc

    L = q.shape[2]
    block_mask = fc.create_block_mask(causal_mask, 1, 1, L, L, device=q.device) if causal else None

    impls = {f"gluon {run}": (lambda run=run: run_forward(attention, run, q, k, v, causal)) for run in runs}
    impls["cudnn"] = lambda: cudnn_forward(q, k, v, causal)
    impls["flexcomp"] = lambda: fc.flex_attention(q, k, v, block_mask=block_mask)
    return impls


def bench(attention, runs: list[str], failures: dict) -> None:
    B, H, L = BENCH_SHAPE
    names = [f"gluon {run}" for run in runs] + ["cudnn", "flexcomp"]
    rows = []
    for head_dim, causal in CONFIGS:
        q, k, v = inputs(B, H, L, head_dim, seed=1)
        flops = 4 * B * H * L * L * head_dim * (0.5 if causal else 1.0)
        cells = {}
        for name, fn in implementations(attention, runs, q, k, v, causal).items():
            if name.startswith("gluon") and (name[6:], head_dim, causal) in failures:
                cells[name] = "fail" if failures[(name[6:], head_dim, causal)] != "wrong" else "wrong"
                continue
            try:
                cells[name] = f"{flops / median_ms(fn) / 1e9:.0f}"
            except Exception as exc:  # noqa: BLE001 -- reported; the other implementations still run
                print(f"  {name} D={head_dim} causal={causal}: {short(exc)}", file=sys.stderr)
                cells[name] = "fail"
        rows.append((f"{'causal' if causal else 'no mask'} D={head_dim}", cells))
        del q, k, v
    print(f"\nforward TFLOP/s, bf16, B={B} H={H} L={L} (CUDA-event medians; causal counts half the work)")
    print("| | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for label, cells in rows:
        print(f"| {label} | " + " | ".join(cells.get(n, "-") for n in names) + " |")


def variant_reference(q, k, v, score, block_mask) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) in float32 by flexcomp's reference backend (torch ops; O(L^2) memory, the small shape only)."""
    import flexcomp as fc

    return fc.flex_attention(q.float(), k.float(), v.float(), score, block_mask, return_lse=True, backend="reference")


def variant_impls(attention, runs: list[str], variant: str, q, k, v, with_torch: bool) -> dict:
    """name -> zero-argument callable returning out (or (out, lse)) for one variant, on the same q, k, v."""
    import flexcomp as fc

    score, block_mask, mods = variant_mods(variant, q.shape[2], "cuda")
    impls = {f"gluon {run}": (lambda run=run: run_forward(attention, run, q, k, v, False, mods)) for run in runs}
    impls["flexcomp GLUON"] = lambda: fc.flex_attention(
        q, k, v, score, block_mask, kernel_options={"BACKEND": "GLUON"}, return_lse=True
    )
    impls["flexcomp"] = lambda: fc.flex_attention(q, k, v, score, block_mask, return_lse=True)
    if with_torch:
        from torch.nn.attention import flex_attention as torch_flex_module

        torch_flex = torch.compile(torch_flex_module.flex_attention, dynamic=False)
        score_fn, mask_fn = VARIANTS[variant]
        torch_mask = torch_flex_module.create_block_mask(mask_fn, 1, 1, q.shape[2], q.shape[2]) if mask_fn else None
        impls["torch flex"] = lambda: torch_flex(q, k, v, score_mod=score_fn, block_mask=torch_mask)
    return impls


def variants(attention, runs: list[str], head_dims: list[int]) -> None:
    """The variants: max abs error against the reference at the small shape, then TFLOP/s at the bench shape."""
    print("\nvariants, correctness (max abs error vs flexcomp's reference backend in float32):")
    B, H, L = CHECK_SHAPE
    for variant in VARIANTS:
        q, k, v = inputs(B, H, L, 128, seed=2)
        ref_out, ref_lse = variant_reference(q, k, v, *variant_mods(variant, L, "cuda")[:2])
        cells = []
        for name, fn in variant_impls(attention, runs, variant, q, k, v, with_torch=False).items():
            try:
                out, lse = fn()
                err_out, err_lse = (out.float() - ref_out).abs().max().item(), (lse - ref_lse).abs().max().item()
                bad = not (err_out < OUT_TOLERANCE and err_lse < LSE_TOLERANCE)
                cells.append(f"{name}: out {err_out:.1e} lse {err_lse:.1e}{' WRONG' if bad else ''}")
            except Exception as exc:  # noqa: BLE001 -- reported; the others still run
                cells.append(f"{name}: {short(exc)}")
        print(f"  {variant} D=128: {'; '.join(cells)}", flush=True)
    B, H, L = BENCH_SHAPE
    rows, names = [], []
    for variant in VARIANTS:
        for head_dim in head_dims:
            q, k, v = inputs(B, H, L, head_dim, seed=3)
            flops = 4 * B * H * L * L * head_dim
            cells = {}
            for name, fn in variant_impls(attention, runs, variant, q, k, v, with_torch=True).items():
                names += [name] if name not in names else []
                try:
                    cells[name] = f"{flops / median_ms(fn) / 1e9:.0f}"
                except Exception as exc:  # noqa: BLE001 -- reported; the others still run
                    print(f"  {name} {variant} D={head_dim}: {short(exc)}", file=sys.stderr)
                    cells[name] = "fail"
            rows.append((f"{variant} D={head_dim}", cells))
    print(f"\nvariants, forward TFLOP/s (dense work), bf16, B={B} H={H} L={L}")
    print("| | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for label, cells in rows:
        print(f"| {label} | " + " | ".join(cells.get(n, "-") for n in names) + " |")


def start_watchdog(seconds: float) -> None:
    """End the process (exit 124) after `seconds`: a kernel whose barriers never complete hangs in synchronize, and
    would spend the device budget instead."""
    watchdog = threading.Timer(seconds, lambda: (print("watchdog: timed out (a kernel hung?)", flush=True),
                                                 os._exit(124)))  # fmt: skip
    watchdog.daemon = True
    watchdog.start()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compile-only", action="store_true", help="AOT-compile every run for sm_90, no GPU")
    parser.add_argument("--runs", nargs="*", default=DEFAULT_RUNS, help="versions, with tile overrides after ':'")
    parser.add_argument("--variant-dims", nargs="*", type=int, default=[128], help="head dims of the variants' table")
    parser.add_argument("--skip-variants", action="store_true", help="only the no mask / causal tables")
    parser.add_argument("--watchdog", type=float, default=170.0, help="exit (code 124) after this many seconds")
    parser.add_argument("--probe", help=argparse.SUPPRESS)  # the child of probe()
    args = parser.parse_args()
    if args.compile_only:
        return compile_only(args.runs, [] if args.skip_variants else [64, 128])
    if args.probe:
        return probe_child(args.probe)
    start_watchdog(args.watchdog)
    start = time.perf_counter()
    try:
        attention = gluon_module()
    except Exception as exc:  # noqa: BLE001 -- without Gluon there is nothing to run; say why
        print(f"cannot import codegen/gluon/attention.py: {short(exc)}")
        return 1
    torch.backends.cuda.matmul.allow_tf32 = False  # the float32 reference is float32
    print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}; runs {args.runs}")
    status = probe(args.runs)
    print(
        "probe (each run alone at the small shape, in a child process): "
        + "; ".join(f"{run} {why}" for run, why in status.items()),
        flush=True,
    )
    runs = [run for run in args.runs if not status[run].startswith("hung")]
    failures = check(attention, runs)
    bench(attention, runs, failures)
    if not args.skip_variants:
        variants(attention, [run for run in VARIANT_RUNS if status.get(run) == "ok"], args.variant_dims)
    print(f"\n{time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
