"""Backward-pass experiments on the GPU: one run diagnoses, sweeps configs and times.

    python benchmarks/tune_backward.py diagnose     # the D=192 dK error, under controlled variations
    python benchmarks/tune_backward.py sweep --head-dims 64 128 [--variants causal none softcap document]
        [--dq-schemes separate atomic] [--defaults] [--option-sets '{"pf": {"PREFETCH_INDEX": true}, ...}']
    python benchmarks/tune_backward.py all

`sweep` times flexcomp's backward alone (out.backward with the graph kept) per config of
`flexcomp.codegen.autotune.BACKWARD_CONFIGS`, with each kernel's time from torch.profiler, its
registers and spills, beside torch's compiled flex_attention backward on the same inputs.
`--dq-schemes` times each config under each dQ scheme (kernel_options BACKWARD_DQ; the atomic scheme runs
no dQ kernel, so configs differing only in their dQ tiles are timed once); `--defaults` times only the
config BACKWARD_CONFIGS holds for the head dim; `--option-sets` times each under each named set of extra
kernel_options too (an A/B in one process).  A summary table per (D, variant) closes the sweep.
Results go to stdout and to $OUT/tune_backward.json when OUT is set.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import torch
import torch._functorch.config as functorch_config
from flexcomp.codegen import autotune
from flexcomp.codegen import backward as bwd
from flexcomp.codegen.plans import clear_plans
from torch.nn.attention import flex_attention as torch_flex_module

import flexcomp as fc

# torch's compiled backward may donate its saved buffers, which forbids the retain_graph=True this script times
# the backward with (a RuntimeError when torch's backward runs twice on one graph)
functorch_config.donated_buffer = False
torch_flex = torch.compile(torch_flex_module.flex_attention, dynamic=False)
RESULTS: list[dict] = []


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def softcap(score, b, h, q_idx, kv_idx):
    return 20.0 * torch.tanh(score / 20.0)


DOC_IDS = torch.zeros(1, dtype=torch.int32)  # set per sweep: sorted document ids, 64 documents


def document_causal(b, h, q_idx, kv_idx):
    return (DOC_IDS[q_idx] == DOC_IDS[kv_idx]) & (q_idx >= kv_idx)


MASKS = {"causal": causal, "softcap": causal, "document": document_causal, "none": None}


def rel(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


# ---------------------------------------------------------------- the D=192 diagnosis


def naive64(q, k, v, scale, mask: bool, softcapped: bool = False):
    s = (q @ k.transpose(-1, -2)) * scale
    if softcapped:
        s = 20.0 * torch.tanh(s / 20.0)
    if mask:
        L, S = s.shape[-2:]
        keep = torch.arange(L, device=s.device)[:, None] >= torch.arange(S, device=s.device)[None, :]
        s = s.masked_fill(~keep, float("-inf"))
    return torch.softmax(s, -1) @ v


def grads_of(fn, tensors, dout):
    leaves = [t.detach().requires_grad_() for t in tensors]
    out = fn(*leaves)
    return torch.autograd.grad((out.float() * dout.float()).sum(), leaves)


def diagnose_case(label, shape, dtype=torch.bfloat16, mask=True, score=False, pad_to=None, options=None,
                  repeat=1, seed=0):
    B, Hq, Hkv, Lq, Lkv, D, Dv = shape
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q, k = (torch.randn(B, H, L, D, device="cuda", generator=gen) for H, L in ((Hq, Lq), (Hkv, Lkv)))
    v = torch.randn(B, Hkv, Lkv, Dv, device="cuda", generator=gen)
    dout = torch.randn(B, Hq, Lq, Dv, device="cuda", generator=gen)
    q, k, v = (t.to(dtype) for t in (q, k, v))
    scale = D ** -0.5
    ref = grads_of(lambda a, b, c: naive64(a, b, c, scale, mask, score), [t.double() for t in (q, k, v)], dout)
    block_mask = fc.create_block_mask(causal, None, None, Lq, Lkv, device="cuda") if mask else None
    score_mod = fc.score_mod(softcap) if score else None

    def ours(a, b, c):
        if pad_to:  # zero columns change no score; the kernel sees another head dim
            a, b = (torch.nn.functional.pad(t, (0, pad_to - D)) for t in (a, b))
        return fc.flex_attention(a, b, c, score_mod=score_mod, block_mask=block_mask, scale=scale,
                                 kernel_options=options, backend="triton")

    runs = [grads_of(ours, (q, k, v), dout) for _ in range(repeat)]
    got = runs[0]
    errs = {name: rel(g, r) for name, g, r in zip(("dq", "dk", "dv"), got, ref)}
    out, lse = fc.flex_attention(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale,
                                 kernel_options=options, return_lse=True, backend="triton")
    q64, k64, v64 = (t.double() for t in (q, k, v))
    out64, lse64 = fc.flex_attention(q64, k64, v64, score_mod=score_mod, block_mask=block_mask, scale=scale,
                                     return_lse=True, backend="reference")
    errs.update(out=rel(out, out64), lse=rel(lse, lse64))
    if not pad_to:  # the backward alone, from the exact forward's out and lse
        alone = bwd.flex_backward(q, k, v, out64.to(dtype), lse64.float(), dout.to(dtype), None, score_mod,
                                  block_mask, scale, False, options)
        errs.update({f"{n}|exact fwd": rel(g, r) for n, g, r in zip(("dq", "dk", "dv"), alone[:3], ref)})
    same = all(torch.equal(a, b) for run in runs[1:] for a, b in zip(run, got))
    dk_err, dk_ref = (got[1].double() - ref[1]), ref[1]
    by_rows = [rel_part(dk_err[..., r:r + 64, :], dk_ref[..., r:r + 64, :]) for r in range(0, Lkv, 64)]
    by_cols = [rel_part(dk_err[..., c:c + 64], dk_ref[..., c:c + 64]) for c in range(0, D, 64)]
    by_head = [rel_part(dk_err[:, h], dk_ref[:, h]) for h in range(Hkv)]
    line = (f"{label:34s} " + " ".join(f"{n}={e:.1e}" for n, e in errs.items()) + f" deterministic={same} "
            f"config={bwd.LAST_KERNELS.get('config')}\n    dk err by 64 kv rows {fmt(by_rows)}\n"
            f"    dk err by 64 cols {fmt(by_cols)} by head {fmt(by_head)}")
    print(line, flush=True)
    RESULTS.append({"kind": "diagnose", "label": label, **errs, "rows": by_rows, "cols": by_cols})


def rel_part(err, ref) -> float:
    return (err.norm() / ref.norm().clamp_min(1e-30)).item()


def fmt(values) -> str:
    return "[" + " ".join(f"{x:.1e}" for x in values) + "]"


def torch_flex_dk_error(shape, seed=0):
    B, Hq, Hkv, Lq, Lkv, D, Dv = shape
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q, k = (torch.randn(B, H, L, D, device="cuda", generator=gen) for H, L in ((Hq, Lq), (Hkv, Lkv)))
    v = torch.randn(B, Hkv, Lkv, Dv, device="cuda", generator=gen)
    dout = torch.randn(B, Hq, Lq, Dv, device="cuda", generator=gen)
    q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
    ref = grads_of(lambda a, b, c: naive64(a, b, c, D ** -0.5, True), [t.double() for t in (q, k, v)], dout)
    block_mask = torch_flex_module.create_block_mask(causal, 1, 1, Lq, Lkv, device="cuda")
    got = grads_of(lambda a, b, c: torch_flex(a, b, c, block_mask=block_mask), (q, k, v), dout)
    errs = " ".join(f"{n}={rel(g, r):.1e}" for n, g, r in zip(("dq", "dk", "dv"), got, ref))
    print(f"{'torch flex (control)':34s} {errs}", flush=True)


def diagnose() -> None:
    shape = (1, 2, 2, 330, 330, 192, 128)
    print("\n## D=192 dK diagnosis, shape (B, Hq, Hkv, Lq, Lkv, D, Dv) =", shape)
    diagnose_case("causal bf16 (x3)", shape, repeat=3)
    diagnose_case("no mask", shape, mask=False)
    diagnose_case("causal fp32", shape, dtype=torch.float32)
    diagnose_case("softcap + causal", shape, score=True)
    torch_flex_dk_error(shape)


# ---------------------------------------------------------------- the config sweep

SWEEP = {  # head dim -> configs (BLOCK_M1, BLOCK_N1, BLOCK_M2, BLOCK_N2, warps_dkdv, stages_dkdv, warps_dq, stages_dq)
    # each run times both kernels, so one entry pairs a dK/dV candidate with an independent dQ candidate
    64: [(64, 64, 64, 64, 4, 3, 4, 3), (64, 128, 128, 64, 8, 3, 8, 3), (32, 128, 128, 64, 4, 3, 8, 2),
         (64, 128, 128, 128, 8, 2, 8, 2), (128, 128, 64, 128, 8, 2, 4, 3), (64, 64, 128, 64, 4, 2, 8, 3),
         (32, 64, 128, 32, 4, 3, 4, 3), (64, 128, 64, 32, 4, 3, 4, 2)],
    128: [(64, 128, 128, 64, 8, 3, 8, 2), (64, 128, 128, 64, 8, 2, 8, 3), (32, 128, 64, 64, 4, 3, 4, 3),
          (64, 64, 128, 32, 4, 3, 8, 2), (32, 64, 64, 128, 4, 3, 8, 2), (64, 128, 64, 128, 8, 1, 8, 2),
          (128, 128, 128, 128, 8, 2, 8, 1), (32, 128, 128, 64, 8, 2, 4, 2)],
}


def kernel_times(fn, iters=5) -> dict[str, float]:
    """Mean ms per call of each CUDA kernel `fn` launches, by torch.profiler.  A kernel launched k > 1 times per call
    is reported per launch in order, as name#0 .. name#k-1 (flex_bwd run as two launches: dK/dV, then dQ)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    launches: dict[str, list[float]] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            launches.setdefault(event.name, []).append(event.device_time_total / 1e3)
    times: dict[str, float] = {}
    for name, durations in launches.items():
        per_call = max(len(durations) // iters, 1)
        for i, ms in enumerate(durations):
            label = f"{name}#{i % per_call}" if per_call > 1 else name
            times[label] = times.get(label, 0.0) + ms / iters
    return times


def short(times: dict[str, float]) -> str:
    """flex_bwd's launches (one: both parts; two: dK/dV then dQ), the delta kernel, and everything else."""
    labels = {"flex_bwd": "dkdv+dq", "flex_bwd#0": "dkdv", "flex_bwd#1": "dq", "flex_bwd_delta": "delta"}
    parts = [f"{labels[n]}={ms:.3f}" for n, ms in times.items() if n in labels]
    other = sum(ms for n, ms in times.items() if n not in labels)
    return " ".join(parts) + f" other={other:.3f}"


def documents(L: int, n_docs: int, gen: torch.Generator) -> torch.Tensor:
    """Sorted int32 document ids of L positions cut at n_docs - 1 random places (as bench_attention.py)."""
    cuts = torch.sort(torch.randperm(L - 1, device="cuda", generator=gen)[: n_docs - 1] + 1).values
    ids = torch.zeros(L, dtype=torch.int32, device="cuda")
    ids[cuts] = 1
    return ids.cumsum(0).to(torch.int32)


def density_of(mask_mod, L: int) -> float:
    """The fraction of (q, kv) pairs the mask keeps (counted in chunks of q rows: no L x L tensor)."""
    if mask_mod is None:
        return 1.0
    kv = torch.arange(L, device="cuda")
    kept = sum(int(mask_mod(0, 0, torch.arange(i, min(i + 512, L), device="cuda")[:, None], kv[None, :]).sum())
               for i in range(0, L, 512))
    return kept / (L * L)


def timed_configs(D: int, configs, defaults: bool, scheme: str) -> list[tuple]:
    """The configs to time for `scheme`: the atomic scheme has no dQ kernel, so one per dK/dV config."""
    if defaults:
        configs = [dataclasses.astuple(bwd.default_config(torch.bfloat16, D))]
    configs = configs or SWEEP[D]
    if scheme == "separate":
        return list(configs)
    first_per_dkdv: dict[tuple, tuple] = {}
    for c in configs:
        first_per_dkdv.setdefault((c[0], c[1], c[4], c[5]), c)  # (BLOCK_M1, BLOCK_N1, warps, stages) of dK/dV
    return list(first_per_dkdv.values())


def sweep(head_dims, variants, B=4, H=16, L=8192, configs=None, schemes=("separate",), defaults=False,
          option_sets=None) -> None:
    global DOC_IDS
    from triton.testing import do_bench

    option_sets = option_sets or {"": {}}

    print(f"\n## backward sweep B={B} H={H} L={L} bf16 (backward only; TFLOP/s = 2.5 x forward flops); "
          f"dQ schemes {schemes}")
    for D in head_dims:
        for variant in variants:
            gen = torch.Generator(device="cuda").manual_seed(D)
            q, k, v, dout = (torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16, generator=gen)
                             for _ in range(4))
            q, k, v = (t.requires_grad_() for t in (q, k, v))
            DOC_IDS = documents(L, 64, gen)
            mask_mod = MASKS[variant]
            score = softcap if variant == "softcap" else None
            flops = 2.5 * 4 * B * H * L * L * D * density_of(mask_mod, L)
            t_mask = torch_flex_module.create_block_mask(mask_mod, 1, 1, L, L, device="cuda") if mask_mod else None
            f_mask = fc.create_block_mask(mask_mod, 1, 1, L, L, device="cuda") if mask_mod else None
            f_score = fc.score_mod(score) if score else None

            def time_backward(out, dout=dout, leaves=(q, k, v)):
                ms = do_bench(lambda: out.backward(dout, retain_graph=True), warmup=25, rep=100,
                              return_mode="median", grad_to_none=list(leaves))
                return ms, kernel_times(lambda: out.backward(dout, retain_graph=True))

            out_ref = torch_flex(q, k, v, score_mod=score, block_mask=t_mask)
            ref_grads = torch.autograd.grad(out_ref, (q, k, v), dout, retain_graph=True)
            ms, times = time_backward(out_ref)  # (kernel_times accumulates into .grad: compare before it)
            print(f"D={D} {variant:8s} torch flex   {ms:7.3f} ms {flops / ms / 1e9:5.0f} TFLOP/s", flush=True)
            RESULTS.append({"kind": "sweep", "D": D, "variant": variant, "impl": "torch flex", "ms": ms,
                            "kernels": times})
            for scheme, config, (set_name, extra) in ((s, c, o) for s in schemes
                                                      for c in timed_configs(D, configs, defaults, s)
                                                      for o in option_sets.items()):
                key = (16, 64 if D <= 64 else 128)
                tables = (autotune.BACKWARD_CONFIGS, autotune.SPARSE_BACKWARD_CONFIGS)  # the config timed, every mask
                saved = [table.get(key) for table in tables]
                for table in tables:
                    table[key] = bwd.BackwardConfig(*config)
                bwd._chosen_config.cache_clear()  # the memoized choice and the call plans hold the old entry
                clear_plans()
                timed_as = scheme + (f":{set_name}" if set_name else "")  # the scheme, and the option set if named
                label = f"{timed_as:8s} {config!s:32s}"
                try:
                    for t in (q, k, v):
                        t.grad = None
                    bwd.LAST_KERNELS.clear()  # the atomic scheme launches no dQ kernel: report no stale one
                    out = fc.flex_attention(q, k, v, score_mod=f_score, block_mask=f_mask,
                                            kernel_options={"BACKWARD_DQ": scheme, **extra})
                    err = max(rel(g, r) for g, r in zip(torch.autograd.grad(out, (q, k, v), dout, retain_graph=True),
                                                         ref_grads))
                    used = bwd.LAST_KERNELS.get("config")
                    res = {n: (getattr(c, "n_regs", None), getattr(c, "n_spills", None))
                           for n, c in bwd.LAST_KERNELS.items() if n.startswith("flex")}
                    ms, times = time_backward(out)
                    print(f"D={D} {variant:8s} {label} {ms:7.3f} ms {flops / ms / 1e9:5.0f} TFLOP/s "
                          f"err={err:.1e} {short(times)} regs/spills={res}"
                          + ("" if used == bwd.BackwardConfig(*config) else f" FELL BACK to {used}"), flush=True)
                    RESULTS.append({"kind": "sweep", "D": D, "variant": variant, "impl": "flexcomp",
                                    "scheme": timed_as, "config": config, "ms": ms, "err": err, "kernels": times,
                                    "resources": res})
                except Exception as exc:  # noqa: BLE001 -- a config that fails is reported, the sweep goes on
                    print(f"D={D} {variant:8s} {label} FAILED {type(exc).__name__}: {str(exc)[:300]}",
                          flush=True)
                finally:
                    for table, entry in zip(tables, saved):
                        if entry is None:
                            table.pop(key)
                        else:
                            table[key] = entry
                    torch.cuda.empty_cache()
    summary([s + (":" + n if n else "") for s in schemes for n in option_sets])


def summary(schemes) -> None:
    """Per (D, variant): torch flex's ms, and each dQ scheme's best ms with its config and the ratio to torch."""
    print("\n| D | variant | torch flex ms | " + " | ".join(f"best {s} ms (config) | vs torch" for s in schemes) + " |")
    print("|---|---|---|" + "---|---|" * len(schemes))
    cases = dict.fromkeys((r["D"], r["variant"]) for r in RESULTS if r["kind"] == "sweep")
    for D, variant in cases:
        rows = [r for r in RESULTS if r["kind"] == "sweep" and (r["D"], r["variant"]) == (D, variant)]
        torch_ms = next((r["ms"] for r in rows if r["impl"] == "torch flex"), float("nan"))
        cells = []
        for scheme in schemes:
            ours = [r for r in rows if r.get("scheme") == scheme]
            best = min(ours, key=lambda r: r["ms"], default=None)
            cells.append(f"{best['ms']:.3f} {tuple(best['config'])} | {torch_ms / best['ms']:.2f}x" if best
                         else "- | -")
        print(f"| {D} | {variant} | {torch_ms:.3f} | " + " | ".join(cells) + " |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["diagnose", "sweep", "all"])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--variants", nargs="+", choices=list(MASKS), default=["causal"])
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--configs", help="JSON list of config tuples, replacing the built-in sweep")
    parser.add_argument("--dq-schemes", nargs="+", choices=bwd.BACKWARD_DQ_SCHEMES, default=["separate"],
                        help="time each config under each dQ scheme (kernel_options BACKWARD_DQ)")
    parser.add_argument("--defaults", action="store_true", help="time only the default config per head dim")
    parser.add_argument("--option-sets", help="JSON {name: extra kernel_options}: each config timed under each")
    args = parser.parse_args()
    t0 = time.time()
    import triton

    print(f"GPU {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    if args.what in ("diagnose", "all"):
        diagnose()
    if args.what in ("sweep", "all"):
        configs = [tuple(c) for c in json.loads(args.configs)] if args.configs else None
        sweep(args.head_dims, args.variants, L=args.length, configs=configs, schemes=tuple(args.dq_schemes),
              defaults=args.defaults, option_sets=json.loads(args.option_sets) if args.option_sets else None)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "tune_backward.json"), "w") as f:
            json.dump(RESULTS, f, indent=1, default=str)
    print(f"done in {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
