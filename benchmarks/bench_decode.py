"""Decoding: a few query tokens against a long KV cache, flexcomp beside torch flex (compiled) and SDPA (issue 19).

    python benchmarks/bench_decode.py                 # the issue's table, then sliding windows and a score_mod
    python benchmarks/bench_decode.py --configs       # also the decode kernel at each tile/warps/stages config
    python benchmarks/bench_decode.py --probe-window  # only the window rows over splits x tiles x stages x merge
    TRITON_INTERPRET=1 python benchmarks/bench_decode.py --quick   # tiny shapes on CPU: a smoke test

bf16, D=128, Hq=32, Hkv=8, enable_gqa.  Bandwidth = the K and V bytes the call must read at least (the whole cache
without a mask; the window's rows with a sliding window) / time.  Columns: flexcomp's decode kernel (the default
for these lengths), flexcomp's forward kernel (kernel_options BACKEND="TRITON"), torch's flex_attention compiled,
SDPA (given no mask or score_mod: its column is the whole cache's unmasked read, for scale).  The ratio columns are
speedups of the decode kernel (the other's time / decode's).  Every output is checked against
torch flex (or SDPA) before timing; times are CUDA-event medians of back-to-back calls, same inputs, same process,
each call replayed from a CUDA graph (the GPU's time, as a serving loop with graphs sees it); `decode_eager` is the
decode kernel called from Python each time (host time included: short steps are bound by it).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

import flexcomp as fc

ISSUE_ROWS = [(8, 1, 16384), (8, 1, 32768), (1, 1, 131072), (8, 4, 16384), (8, 16, 16384), (64, 1, 4096)]
VARIANT_ROWS = [(8, 1, 16384), (8, 4, 16384), (8, 16, 16384)]
CROSSOVER_ROWS = [(8, 32, 16384), (8, 64, 16384), (8, 128, 16384), (64, 32, 4096), (64, 128, 4096)]  # decode vs forward
QUICK_ROWS = [(2, 1, 256), (1, 4, 300)]
WINDOW = 4096
SOFTCAP = 30.0
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def graphed(fn):
    """fn captured in a CUDA graph (replayed: the GPU's time without the host's), or None where capture fails."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            fn()
    except Exception as e:  # noqa: BLE001 (reported, then timed without a graph)
        print(f"  (no CUDA graph: {type(e).__name__}: {str(e).splitlines()[0][:100]})", flush=True)
        return None
    return graph.replay


def timed(fn, device: str, repeats: int, inner: int) -> float:
    """Median milliseconds per call of `inner` back-to-back calls (CUDA events; wall clock on the CPU)."""
    fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            stop.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(stop) / inner)
        else:
            began = time.perf_counter()
            fn()
            times.append((time.perf_counter() - began) * 1e3)
    return statistics.median(times)


def mods(variant: str, q_len: int, kv_len: int):
    """(flexcomp score_mod, flexcomp mask_mod, torch's plain functions, kv rows read per query) of a variant."""
    offset = kv_len - q_len  # the queries are the cache's last rows

    def window(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx + offset) & (q_idx + offset - kv_idx < WINDOW)

    def softcap(score, b, h, q_idx, kv_idx):
        return SOFTCAP * torch.tanh(score / SOFTCAP)

    if variant == "window":
        return None, window, (None, window), min(WINDOW + q_len - 1, kv_len)
    if variant == "softcap":
        return softcap, None, (softcap, None), kv_len
    return None, None, (None, None), kv_len


def bench_row(B: int, q_len: int, kv_len: int, variant: str, args, device: str) -> dict:
    Hq, Hkv, D = args.heads, args.kv_heads, args.head_dim
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q = torch.randn(B, Hq, q_len, D, dtype=dtype, device=device)
    k, v = (torch.randn(B, Hkv, kv_len, D, dtype=dtype, device=device) for _ in range(2))
    score_mod, mask_mod, (torch_score, torch_mask), rows = mods(variant, q_len, kv_len)
    block = fc.create_block_mask(mask_mod, 1, 1, q_len, kv_len, device=device) if mask_mod else None
    runs = {
        "decode": lambda: fc.flex_attention(
            q, k, v, score_mod=score_mod, block_mask=block, enable_gqa=True, backend="triton",
            kernel_options={"BACKEND": "TRITON_DECODE"},
        ),
        "forward": lambda: fc.flex_attention(
            q,
            k,
            v,
            score_mod=score_mod,
            block_mask=block,
            enable_gqa=True,
            backend="triton",
            kernel_options={"BACKEND": "TRITON"},
        ),
    }
    if device == "cuda":
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        compiled = torch.compile(flex_attention, dynamic=False)
        torch_block = create_block_mask(torch_mask, 1, 1, q_len, kv_len, device=device) if torch_mask else None
        runs["torch_flex"] = lambda: compiled(q, k, v, score_mod=torch_score, block_mask=torch_block, enable_gqa=True)
        runs["sdpa"] = lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    expected = runs.get("torch_flex", runs["forward"])()
    for name in ("decode", "forward"):
        torch.testing.assert_close(runs[name]().float(), expected.float(), atol=2e-2, rtol=2e-2)
    needed = 2 * B * Hkv * rows * D * q.element_size()
    row = {"B": B, "Lq": q_len, "Lkv": kv_len, "variant": variant}
    if device == "cuda":  # the kernels' time: each call replayed from a CUDA graph (as a serving loop runs them)
        runs = {"decode_eager": runs["decode"], **{n: graphed(fn) or fn for n, fn in runs.items()}}
    for name, fn in runs.items():
        ms = timed(fn, device, args.repeats, args.inner)
        bytes_read = 2 * k.numel() * k.element_size() if name == "sdpa" else needed  # SDPA reads it all, unmasked
        row[name] = {"ms": ms, "TBps": bytes_read / ms / 1e9}
    return row


def bench_configs(args, device: str) -> list[dict]:
    """The decode kernel at each (BLOCK_N, num_warps, num_stages) on the issue's first rows: the default table's data."""
    rows = []
    for B, q_len, kv_len in (ISSUE_ROWS[0], ISSUE_ROWS[2], ISSUE_ROWS[4]):
        q = torch.randn(B, args.heads, q_len, args.head_dim, dtype=torch.bfloat16, device=device)
        k, v = (
            torch.randn(B, args.kv_heads, kv_len, args.head_dim, dtype=torch.bfloat16, device=device) for _ in range(2)
        )
        bytes_read = 2 * k.numel() * k.element_size()
        for block_n in (32, 64, 128):
            for warps in (4, 8):
                for stages in (2, 3, 4):
                    options = {"BLOCK_N": block_n, "num_warps": warps, "num_stages": stages}

                    def run(q=q, k=k, v=v, options=options):
                        return fc.flex_attention(q, k, v, enable_gqa=True, kernel_options=options)

                    try:
                        ms = timed(run, device, 5, args.inner)
                    except fc.FlexcompError as e:
                        print(f"  {options}: {str(e).splitlines()[0][:80]}")
                        continue
                    rows.append({"B": B, "Lq": q_len, "Lkv": kv_len, **options, "TBps": bytes_read / ms / 1e9})
                    print(f"  B={B} Lq={q_len} Lkv={kv_len} {options}: {bytes_read / ms / 1e9:.2f} TB/s", flush=True)
    return rows


PROBE_SPLITS = (1, 2, 4, 8, 16)
PROBE_TILES = [(block_n, stages) for block_n in (32, 64, 128) for stages in (2, 3, 4)]
PROBE_MERGES = ("fused", "separate")


def probe_options(splits: int, block_n: int, stages: int, merge: str) -> dict:
    return {"BACKEND": "TRITON_DECODE", "NUM_SPLITS": splits, "BLOCK_N": block_n, "num_stages": stages,
            "DECODE_MERGE": merge}  # fmt: skip


PROBE_TILE = (64, 3)  # the default tile and stages (codegen/autotune.py DECODE_CONFIGS)
PROBE_TILE_SPLITS = (4, 8)  # the split counts the tile plane tries


def probe_grid(full: bool) -> list[dict]:
    """The probe's configs: every split count and merge at the default tile, and every tile and stage count at 4 and
    8 splits, fused (25 a row; the kernels compile in ~5 s each, so the whole cross product, 81 a row, is opt-in).
    One split has no merge: timed once (as "fused")."""
    merges = {merge: [s for s in PROBE_SPLITS if s > 1 or merge == "fused"] for merge in PROBE_MERGES}
    if full:
        return [probe_options(splits, block_n, stages, merge) for block_n, stages in PROBE_TILES
                for merge in PROBE_MERGES for splits in merges[merge]]  # fmt: skip
    split_plane = [probe_options(splits, *PROBE_TILE, merge) for merge in PROBE_MERGES for splits in merges[merge]]
    tile_plane = [probe_options(splits, block_n, stages, "fused") for block_n, stages in PROBE_TILES
                  for splits in PROBE_TILE_SPLITS if (block_n, stages) != PROBE_TILE]  # fmt: skip
    return split_plane + tile_plane


def window_inputs(B: int, q_len: int, kv_len: int, args, device: str):
    """(q, k, v, block mask) of a sliding-window row, seeded: the precompiling workers build the same call."""
    torch.manual_seed(0)
    q = torch.randn(B, args.heads, q_len, args.head_dim, dtype=torch.bfloat16, device=device)
    k, v = (torch.randn(B, args.kv_heads, kv_len, args.head_dim, dtype=torch.bfloat16, device=device)
            for _ in range(2))  # fmt: skip
    _, mask_mod, _, rows = mods("window", q_len, kv_len)
    return q, k, v, fc.create_block_mask(mask_mod, 1, 1, q_len, kv_len, device=device), rows


def _compile_row(job) -> int:
    """Run each config of `job` once (a worker process: fills Triton's and flexcomp's disk caches)."""
    (B, q_len, kv_len), configs, args = job
    q, k, v, block, _ = window_inputs(B, q_len, kv_len, args, "cuda")
    for options in configs:
        fc.flex_attention(q, k, v, block_mask=block, enable_gqa=True, backend="triton", kernel_options=options)
    torch.cuda.synchronize()
    return len(configs)


def precompile(configs: list[dict], args) -> None:
    """Compile every (row, config) in parallel processes: compiling ~240 kernels one after another would take
    minutes, timing them takes seconds.  The parent then loads each binary from the disk cache."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    workers = max(1, min(15, (os.cpu_count() or 2) - 1))
    per_row = -(-workers // len(VARIANT_ROWS))
    jobs = [(row, configs[i::per_row], args) for row in VARIANT_ROWS for i in range(per_row)]
    with ProcessPoolExecutor(len(jobs), mp_context=multiprocessing.get_context("spawn")) as pool:
        compiled = sum(pool.map(_compile_row, jobs))
    print(f"  precompiled {compiled} kernels in {len(jobs)} processes", flush=True)


def _stages_run() -> int:
    """The stages the last decode call's kernel launched with (fewer than asked where they did not fit)."""
    from flexcomp.codegen.forward import _PLANS

    plan = next(reversed(_PLANS._plans.values()))[1]
    return plan.decode.launch.kwargs["num_stages"]


def probe_call(run, expected: torch.Tensor, args) -> tuple[float, int]:
    """(ms per call replayed from a CUDA graph, the stages it ran with), its output checked first."""
    torch.testing.assert_close(run().float(), expected.float(), atol=2e-2, rtol=2e-2)
    stages = _stages_run()
    return timed(graphed(run) or run, "cuda", args.repeats, args.inner), stages


def probe_window(args) -> list[dict]:
    """The window rows (the calls whose fixed costs decide them) at every probe config, from CUDA graphs."""
    began = time.perf_counter()
    configs = probe_grid(args.probe_full)
    precompile(configs, args)
    results = []
    for B, q_len, kv_len in VARIANT_ROWS:
        q, k, v, block, rows = window_inputs(B, q_len, kv_len, args, "cuda")
        needed = 2 * B * args.kv_heads * rows * args.head_dim * q.element_size()
        expected = fc.flex_attention(q, k, v, block_mask=block, enable_gqa=True, kernel_options={"BACKEND": "TRITON"})
        for options in configs:
            run = functools.partial(fc.flex_attention, q, k, v, block_mask=block, enable_gqa=True, backend="triton",
                                    kernel_options=options)  # fmt: skip
            ms, stages = probe_call(run, expected, args)
            results.append({"Lq": q_len, **options, "stages_run": stages, "TBps": needed / ms / 1e9})
    print_probe(results)
    print(f"  probe took {time.perf_counter() - began:.0f} s", flush=True)
    return results


def print_probe(results: list[dict]) -> None:
    """One line per (BLOCK_N, stages, merge), one column per (Lq, splits); then each row's best config."""
    q_lens = [q_len for _, q_len, _ in VARIANT_ROWS]
    rate = {(r["Lq"], r["NUM_SPLITS"], r["BLOCK_N"], r["num_stages"], r["DECODE_MERGE"]): r for r in results}
    print("TB/s of the window rows (B=8, Lkv=16384, window 4096), CUDA graphs; columns Lq/splits; "
          "* = stages that did not fit and ran with fewer")  # fmt: skip
    print("| BLOCK_N | stages | merge | " + " | ".join(f"{q}/{s}" for q in q_lens for s in PROBE_SPLITS) + " |")
    print("|---" * (3 + len(q_lens) * len(PROBE_SPLITS)) + "|")
    for block_n, stages in PROBE_TILES:
        for merge in PROBE_MERGES:
            cells = []
            for q_len in q_lens:
                for splits in PROBE_SPLITS:
                    r = rate.get((q_len, splits, block_n, stages, "fused" if splits == 1 else merge))
                    cells.append("-" if r is None else f"{r['TBps']:.2f}" + ("*" if r["stages_run"] != stages else ""))
            if any(c != "-" for c in cells):
                print(f"| {block_n} | {stages} | {merge} | " + " | ".join(cells) + " |")
    for q_len in q_lens:
        best = max((r for r in results if r["Lq"] == q_len), key=lambda r: r["TBps"])
        print(f"  best at Lq={q_len}: {best['TBps']:.2f} TB/s with NUM_SPLITS={best['NUM_SPLITS']} "
              f"BLOCK_N={best['BLOCK_N']} stages={best['stages_run']} merge={best['DECODE_MERGE']}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes (CPU under TRITON_INTERPRET=1)")
    parser.add_argument("--configs", action="store_true", help="also sweep the decode kernel's launch configs")
    parser.add_argument("--probe-window", action="store_true",
                        help="only the window rows, over NUM_SPLITS x BLOCK_N x stages x merge (GPU, < 90 s)")  # fmt: skip
    parser.add_argument("--probe-full", action="store_true", help="with --probe-window: the whole cross product")
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--inner", type=int, default=20)
    parser.add_argument("--json", help="write the rows here")
    args = parser.parse_args()
    device = "cpu" if args.quick else "cuda"
    if args.quick:
        args.heads, args.kv_heads, args.head_dim, args.repeats, args.inner = 4, 2, 16, 1, 1
    if device == "cuda":
        print(torch.cuda.get_device_name(), "torch", torch.__version__, flush=True)
    if args.probe_window:
        args.repeats, args.inner = min(args.repeats, 5), min(args.inner, 10)  # ~240 configs: a few ms each
        results = probe_window(args)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)
        return
    if device == "cuda":
        torch._dynamo.config.recompile_limit = 1000  # torch flex compiles once per row's shapes
    plan = [(r, "none") for r in (QUICK_ROWS if args.quick else ISSUE_ROWS)]
    plan += [(r, variant) for variant in ("window", "softcap") for r in (QUICK_ROWS if args.quick else VARIANT_ROWS)]
    plan += [(r, "none") for r in ([] if args.quick else CROSSOVER_ROWS)]  # where the default should switch
    results = []
    names = ("decode", "decode_eager", "forward", "torch_flex", "sdpa")
    print(
        "| B | Lq | Lkv | variant | " + " | ".join(f"{n} TB/s" for n in names) + " | decode/torch_flex | decode/sdpa |"
    )
    print("|---" * (6 + len(names)) + "|")
    for (B, q_len, kv_len), variant in plan:
        row = bench_row(B, q_len, kv_len, variant, args, device)
        results.append(row)
        rates = [f"{row[n]['TBps']:.2f}" if n in row else "-" for n in names]
        ratios = [f"{row[n]['ms'] / row['decode']['ms']:.2f}x" if n in row else "-" for n in ("torch_flex", "sdpa")]
        print(f"| {B} | {q_len} | {kv_len} | {variant} | " + " | ".join(rates + ratios) + " |", flush=True)
    if args.configs and device == "cuda":
        results.append({"configs": bench_configs(args, device)})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
