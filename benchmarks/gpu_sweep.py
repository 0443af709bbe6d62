"""Randomized GPU correctness sweep: the generated kernels against float64, forward and backward.

    python benchmarks/gpu_sweep.py                      # every head-dim pair, then random cases; exits 1 on a failure
    python benchmarks/gpu_sweep.py --seed 7 --random 400 --workers 8
    python benchmarks/gpu_sweep.py --subset sanitizer   # the small set run under compute-sanitizer
    python benchmarks/gpu_sweep.py --subset decode --random 200   # short queries: the split-KV decode kernel
    python benchmarks/gpu_sweep.py --replay '{"D": 40, ...}'   # one case, as printed by a failure

A case is a head-dim pair (D, Dv), a dtype, a GQA ratio, batch/lengths (odd, Lq != Lkv), a mask (none,
closed-form, table-walked, over a captured tensor) and a score_mod (none, pure, over learnable captured tensors).
Each runs the Triton backend forward (out, lse) and backward (dq, dk, dv, captured-tensor grads) against the
reference backend in float64 on the same inputs.  Before every case the CUDA caching allocator's free memory is
filled with NaN, so an output element the kernel never writes shows as NaN instead of a lucky zero.

Cases are spread over worker processes (compiling kernels is the slow part and runs on the host).  Every
case line is printed as JSON-able parameters, so a failure is replayed with --replay.
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing as mp
import os
import random
import sys
import time

import torch

import flexcomp as fc

HEAD_DIMS = (16, 24, 32, 40, 48, 64, 72, 80, 96, 112, 128, 160, 192, 256)
DTYPES = ("bfloat16", "float16", "float32")
GQA_RATIOS = (1, 2, 4, 8)
MASKS = ("none", "causal", "offset_window", "document", "captured_prefix", "empty_rows")
EXTRA_MASKS = ("issue_window",)
SCORES = ("none", "softcap", "alibi", "rel_bias")
TOLERANCE = {"bfloat16": 3e-2, "float16": 5e-3, "float32": 5e-4}
# Captured tensors' gradients are judged in float32 runs only.  With 16-bit inputs they are sums over every
# (q, kv) pair of dS * d score / d param, where each row of dS sums to ~0 and the backward's
# delta = rowsum(dO * out) is read from the 16-bit output (as in FlashAttention and torch's flex): the
# cancellation leaves relative errors of 1e-2..1 against float64 (ALiBi slopes), which measure the inputs'
# precision, not the kernel.  They are printed for every run.
CAPTURED_GRADS = ("dslopes", "dbias")
DEVICE = os.environ.get("SWEEP_DEVICE", "cuda")  # "cpu" under TRITON_INTERPRET=1: a smoke test of this script
MAX_HEAD_DIM = 256  # codegen.forward.MAX_HEAD_DIM: larger dims must be refused with a clear error


# ------------------------------------------------------------------ the mods (module globals: read live)

OFFSET = 0  # the offset window's q/kv shift, set per case
WINDOW = 96
DOC = torch.zeros(1, dtype=torch.int32)  # int32 document ids (each case rebinds these four on its device)
PREFIX = torch.zeros(1, dtype=torch.int32)  # int32 per-batch prefix length
SLOPES = torch.zeros(1)  # learnable float32 [Hq]
BIAS = torch.zeros(4096)  # learnable float32 [4096]


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def offset_window(b, h, q_idx, kv_idx):  # a closed-form band shifted by OFFSET
    return (kv_idx <= q_idx + OFFSET) & (q_idx + OFFSET - kv_idx < WINDOW)


def issue_window(b, h, q_idx, kv_idx):  # issue 16's block mask, verbatim
    return (kv_idx <= q_idx + 133) & (q_idx + 133 - kv_idx < 96)


def document(b, h, q_idx, kv_idx):  # table-walked
    return (DOC[q_idx] == DOC[kv_idx]) & (q_idx >= kv_idx)


def captured_prefix(b, h, q_idx, kv_idx):  # prefix-LM: a per-batch prefix length read from a captured tensor
    return (kv_idx < PREFIX[b]) | (q_idx >= kv_idx)


def empty_rows(b, h, q_idx, kv_idx):  # every 7th row fully masked: out 0, lse -inf
    return (q_idx % 7 != 3) & (kv_idx <= q_idx + 5)


def softcap(score, b, h, q_idx, kv_idx):
    return 20.0 * torch.tanh(score / 20.0)


def alibi(score, b, h, q_idx, kv_idx):
    return score + SLOPES[h] * (kv_idx - q_idx)


def rel_bias(score, b, h, q_idx, kv_idx):
    return score + BIAS[(q_idx - kv_idx) % 4096] + 0.5 * BIAS[kv_idx % 97]


# ------------------------------------------------------------------ cases


def head_dim_pairs() -> list[dict]:
    """Every (D, Dv) pair, bf16, no mask, one small shape with ragged lengths: the pairs themselves are the test."""
    cases = []
    for i, (d, dv) in enumerate((d, dv) for d in HEAD_DIMS for dv in HEAD_DIMS):
        cases.append({"D": d, "Dv": dv, "dtype": ("bfloat16", "float16")[i % 2], "B": 1, "Hkv": 2, "gqa": (1, 4)[i % 2],
                          "Lq": 200 + i % 7, "Lkv": 333 - i % 5, "mask": ("none", "offset_window")[i % 2],
                          "score": ("none", "alibi")[(i // 2) % 2], "backward": True, "seed": i})
    return cases


def random_cases(count: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    cases = []
    for i in range(count):
        lq = rng.choice([1, 2, 15, 16, 17, 63, 64, 65, 127, 129]) if rng.random() < 0.25 else \
            int(2 ** rng.uniform(0, 11.6))
        lkv = lq if rng.random() < 0.2 else int(2 ** rng.uniform(0, 11.6))
        cases.append({"D": rng.choice(HEAD_DIMS), "Dv": rng.choice(HEAD_DIMS), "dtype": rng.choice(DTYPES),
                          "B": rng.choice([1, 2]), "Hkv": rng.choice([1, 2]), "gqa": rng.choice(GQA_RATIOS), "Lq": lq, "Lkv": lkv,
                          "mask": rng.choice(MASKS), "score": rng.choice(SCORES), "backward": rng.random() < 0.7,
                          "pad": rng.choice([0, 0, 0, 0, 0, 0, 1, 4, 8, 24]), "seed": seed * 100003 + i})
    return cases


def decode_cases(count: int, seed: int) -> list[dict]:
    """Short queries against longer caches: the split-KV decode kernel (codegen/decode.py), its GQA packing and
    split merge, every mask and score_mod; some with gradients (the decode forward feeding the backward)."""
    rng = random.Random(seed + 1)
    cases = []
    for i in range(count):
        cases.append({"D": rng.choice(HEAD_DIMS), "Dv": rng.choice(HEAD_DIMS), "dtype": rng.choice(DTYPES),
                      "B": rng.choice([1, 2, 3]), "Hkv": rng.choice([1, 2]), "gqa": rng.choice(GQA_RATIOS),
                      "Lq": rng.choice([1, 1, 2, 3, 4, 7, 16, 33, 64]), "Lkv": int(2 ** rng.uniform(4, 13.5)),
                      "mask": rng.choice(MASKS), "score": rng.choice(SCORES), "backward": rng.random() < 0.25,
                      "pad": rng.choice([0, 0, 0, 1, 8]), "seed": seed * 100019 + i,
                      "options": rng.choice([None, None, {"NUM_SPLITS": rng.choice([1, 2, 8, 32])}])})
    return cases


def sanitizer_cases() -> list[dict]:
    """A small set under compute-sanitizer memcheck: issue 16's shapes, ragged edges, table walks, both passes."""
    base = {"B": 1, "Hkv": 2, "gqa": 4, "Lq": 200, "Lkv": 333, "backward": True, "seed": 1}
    return [dict(base, D=40, Dv=24, dtype="bfloat16", mask="none", score="none"),
            dict(base, D=40, Dv=24, dtype="float16", mask="offset_window", score="none"),
            dict(base, D=40, Dv=24, dtype="bfloat16", mask="document", score="alibi"),
            dict(base, D=72, Dv=160, dtype="bfloat16", mask="captured_prefix", score="rel_bias"),
            dict(base, D=256, Dv=256, dtype="bfloat16", mask="causal", score="softcap", Lq=129, Lkv=65),
            dict(base, D=16, Dv=16, dtype="float32", mask="empty_rows", score="none", Lq=17, Lkv=1),
            dict(base, D=128, Dv=128, dtype="bfloat16", mask="document", score="none", Lq=1000, Lkv=1000),
            dict(base, D=40, Dv=24, dtype="bfloat16", mask="offset_window", score="alibi", Lq=3, Lkv=2000,
                 options={"NUM_SPLITS": 8}),  # the decode kernel: packed rows, split workspaces, the merge
            dict(base, D=128, Dv=128, dtype="float16", mask="empty_rows", score="none", Lq=1, Lkv=777)]


def config_cases() -> list[dict]:
    """Issue 16's first shape under every forward/backward tile config, and with 16-element-aligned row strides."""
    base = dict(ISSUE_CASES[0], backward=True)
    cases = [dict(base, pad=pad) for pad in (0, 1, 2, 4, 8, 24, 40)]
    cases += [dict(base, D=d, Dv=dv, pad=pad) for d, dv in ((36, 20), (72, 24), (33, 17)) for pad in (0, 1)]
    for m, n, warps, stages in itertools.product((64, 128), (32, 64, 128), (4, 8), (1, 2, 3)):
        cases.append(dict(base, backward=False, options={"BLOCK_M": m, "BLOCK_N": n, "num_warps": warps,
                                                             "num_stages": stages}))
    for m, n in itertools.product((16, 32, 64, 128), (16, 32, 64, 128)):
        cases.append(dict(base, options={"BLOCK_M1": m, "BLOCK_N1": n, "BLOCK_M2": n, "BLOCK_N2": m}))
    return cases


ISSUE_CASES = [  # issue 16's reports, exactly
    {"D": 40, "Dv": 24, "dtype": "bfloat16", "B": 1, "Hkv": 2, "gqa": 4, "Lq": 200, "Lkv": 333, "mask": "none", "score": "none",
         "backward": True, "seed": 16},
    {"D": 40, "Dv": 24, "dtype": "float16", "B": 1, "Hkv": 8, "gqa": 1, "Lq": 200, "Lkv": 333, "mask": "none", "score": "alibi",
         "backward": True, "seed": 17},
    {"D": 40, "Dv": 24, "dtype": "bfloat16", "B": 1, "Hkv": 2, "gqa": 4, "Lq": 200, "Lkv": 333, "mask": "issue_window", "score": "none",
         "backward": True, "seed": 18},
]


# ------------------------------------------------------------------ one case


def poison_free_memory() -> None:
    """Fill what the caching allocator holds free with NaN, so unwritten outputs read NaN."""
    torch.cuda.empty_cache()  # then the outputs are cut from the blocks poisoned here
    for size in (1 << 10, 1 << 16, 1 << 20, 1 << 24, 1 << 26):  # the small and the large pool, 256 MiB at most
        torch.empty(size, dtype=torch.float32, device=DEVICE).fill_(float("nan"))


def rel_err(a, b) -> float:
    """||a - b|| / ||b||, with ||b|| floored at an RMS of 1e-2: a gradient that is 0 in exact arithmetic (one
    key per row: dS = P (dP - delta) = 0) is judged by its absolute rounding (float32's, ~1e-6 of terms of size
    ~1), not divided by 1e-17."""
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-2 * b.numel() ** 0.5)).item()


def float32_math_errors(q, k, v, dout, kwargs, ref_grads) -> dict[str, float]:
    """The captured tensors' gradient errors of plain float32 attention math (the reference backend: scores
    materialized, softmax, autograd) on the same inputs: what float32 itself leaves of a cancelling sum."""
    global SLOPES, BIAS
    SLOPES, BIAS = (t.detach().float().clone().requires_grad_() for t in (SLOPES, BIAS))  # read live by the mods
    qf, kf, vf = (t.detach().float() for t in (q, k, v))
    out, _ = fc.flex_attention(qf, kf, vf, backend="reference", **kwargs)
    grads = torch.autograd.grad((out * dout.float()).sum(), [SLOPES, BIAS], allow_unused=True)
    return {label: rel_err(got, ref) for label, got, ref in zip(CAPTURED_GRADS, grads, ref_grads[-2:])
            if got is not None and ref is not None and ref.abs().sum() > 0}


def run_case(case: dict) -> tuple[bool, str]:
    global OFFSET, DOC, PREFIX, SLOPES, BIAS
    g = torch.Generator(device=DEVICE).manual_seed(case["seed"])
    dtype = getattr(torch, case["dtype"])
    B, Hkv, Lq, Lkv, D, Dv = (case[k] for k in ("B", "Hkv", "Lq", "Lkv", "D", "Dv"))
    Hq, backward = Hkv * case["gqa"], case["backward"]
    OFFSET = case.get("offset", (case["seed"] % 200) - 50)
    DOC = (torch.rand(max(Lq, Lkv), device=DEVICE, generator=g) < 0.02).cumsum(0).to(torch.int32)
    PREFIX = torch.randint(0, max(Lkv, 1), (B,), device=DEVICE, generator=g, dtype=torch.int32)
    SLOPES = torch.rand(Hq, device=DEVICE, generator=g).requires_grad_(backward)
    BIAS = torch.randn(4096, device=DEVICE, generator=g).requires_grad_(backward)

    def draw(*shape, pad=0):  # pad: a view of the first shape[-1] columns of wider rows (unaligned strides)
        full = torch.randn(*shape[:-1], shape[-1] + pad, device=DEVICE, generator=g).to(dtype)
        return full[..., :shape[-1]].detach().requires_grad_(backward)

    pad = case.get("pad", 0)
    q, k, v = draw(B, Hq, Lq, D, pad=pad), draw(B, Hkv, Lkv, D, pad=pad), draw(B, Hkv, Lkv, Dv, pad=pad)
    dout = torch.randn(B, Hq, Lq, Dv, device=DEVICE, generator=g).to(dtype)
    mask_fn = MASK_FNS[case["mask"]]
    score_fn = SCORE_FNS[case["score"]]
    block_mask = fc.create_block_mask(mask_fn, B, None, Lq, Lkv, device=DEVICE) if mask_fn else None
    kwargs = {"score_mod": score_fn, "block_mask": block_mask, "enable_gqa": Hq != Hkv, "return_lse": True}
    options = case.get("options")

    if max(D, Dv) > MAX_HEAD_DIM:
        try:
            fc.flex_attention(q, k, v, backend="triton", **kwargs)
        except fc.FlexcompError as exc:
            return True, f"refused: {exc}"
        return False, "a head dim over the maximum was not refused"

    if DEVICE == "cuda":
        poison_free_memory()
    out, lse = fc.flex_attention(q, k, v, backend="triton", kernel_options=options, **kwargs)
    leaves = [t for t in (q, k, v, SLOPES, BIAS) if t.requires_grad]
    grads = torch.autograd.grad((out.float() * dout.float()).sum(), leaves, allow_unused=True) if backward else []
    if DEVICE == "cuda":
        torch.cuda.synchronize()

    q64, k64, v64 = (t.detach().double().requires_grad_(backward) for t in (q, k, v))
    SLOPES, BIAS = (t.detach().clone().requires_grad_(backward) for t in (SLOPES, BIAS))  # read live by the mods
    with torch.set_grad_enabled(backward):
        ref_out, ref_lse = fc.flex_attention(q64, k64, v64, backend="reference", **kwargs)
    errs = {"out": rel_err(out, ref_out)}
    finite = torch.isfinite(ref_lse)
    problems = []
    if not torch.equal(torch.isfinite(lse), finite):
        problems.append("lse finiteness differs")
    if finite.any():
        errs["lse"] = rel_err(lse[finite], ref_lse[finite])
    if out.isnan().any():  # say where: which (b, h, row)s, and whether the reference masks those rows entirely
        nan_rows = out.isnan().any(-1)
        empty = (~finite & nan_rows).sum().item()
        problems.append(f"NaN in out: {nan_rows.sum().item()} rows ({empty} of them fully masked), "
                        f"first at (b, h, row) {nan_rows.nonzero()[0].tolist()}")
    if backward:
        ref_leaves = [t for t in (q64, k64, v64, SLOPES, BIAS) if t.requires_grad]
        ref_grads = torch.autograd.grad((ref_out * dout.double()).sum(), ref_leaves, allow_unused=True)
        for label, got, ref in zip(("dq", "dk", "dv", "dslopes", "dbias"), grads, ref_grads):
            if ref is None or ref.abs().sum() == 0:
                continue
            if got is None or got.isnan().any():
                problems.append(f"{label} missing or NaN")
                continue
            errs[label] = rel_err(got, ref)
    tolerance = TOLERANCE[case["dtype"]]
    judged = {k: e for k, e in errs.items() if case["dtype"] == "float32" or k not in CAPTURED_GRADS}
    limits = dict.fromkeys(judged, tolerance)
    if backward and any(k in CAPTURED_GRADS and e > tolerance for k, e in judged.items()):
        # a captured tensor's gradient that cancels (ALiBi slopes: dS * (kv - q) over rows of dS summing to 0)
        # loses digits to float32 in any implementation: judged against plain float32 math's error, four times over
        baseline = float32_math_errors(q, k, v, dout, kwargs, ref_grads)
        errs.update({f"f32math_{k}": e for k, e in baseline.items()})
        limits.update({k: max(tolerance, 4 * e) for k, e in baseline.items()})
    problems += [f"{k}={e:.1e}" for k, e in judged.items() if not e <= limits[k]]
    detail = " ".join(f"{k}={e:.1e}" for k, e in errs.items())
    return not problems, detail + ("  PROBLEMS: " + ", ".join(problems) if problems else "")


def worker(cases: list[tuple[int, dict]], queue) -> None:
    global MASK_FNS, SCORE_FNS
    MASK_FNS = {"none": None, **{name: fc.mask_mod(globals()[name]) for name in MASKS[1:] + EXTRA_MASKS}}
    SCORE_FNS = {"none": None, **{name: fc.score_mod(globals()[name]) for name in SCORES[1:]}}
    for index, case in cases:
        queue.put(("start", index, None, 0.0))
        t0 = time.time()
        try:
            ok, detail = run_case(case)
        except Exception as exc:  # noqa: BLE001 -- a crash is a failed case, reported with the rest
            ok, detail = False, f"{type(exc).__name__}: {str(exc)[:400]}"
            if "CUDA error" in str(exc) or "illegal" in str(exc):
                queue.put(("done", index, (ok, detail), time.time() - t0))
                os._exit(3)  # the CUDA context is lost: a fresh worker takes the rest of this one's cases
        queue.put(("done", index, (ok, detail), time.time() - t0))


def run_all(cases: list[dict], workers: int) -> int:
    """Run `cases` over `workers` processes; a worker that dies (a kernel fault) is replaced by a fresh one that
    takes the cases it had not started."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    pending = {w: [(i, cases[i]) for i in range(w, len(cases), workers)] for w in range(workers)}
    procs = {w: ctx.Process(target=worker, args=(pending[w], queue)) for w in pending if pending[w]}
    for p in procs.values():
        p.start()
    results, started, t0 = {}, set(), time.time()
    while len(results) < len(cases):
        try:
            kind, index, result, seconds = queue.get(timeout=5)
        except Exception:  # noqa: BLE001 -- queue.Empty: replace dead workers, stop if nothing can progress
            for w, p in list(procs.items()):
                left = [(i, c) for i, c in pending[w] if i not in results]
                if p.is_alive() or not left:
                    continue
                crashed = [i for i, _ in left if i in started]
                for i in crashed:  # died inside this case without reporting it
                    results[i] = (False, "the worker process died in this case")
                    print(f"FAIL  died {json.dumps(cases[i], sort_keys=True)}  the worker process died", flush=True)
                pending[w] = [(i, c) for i, c in left if i not in results]
                if pending[w]:
                    procs[w] = ctx.Process(target=worker, args=(pending[w], queue))
                    procs[w].start()
            continue
        if kind == "start":
            started.add(index)
            continue
        results[index] = result
        ok, detail = result
        print(f"{'ok  ' if ok else 'FAIL'} {seconds:5.1f}s {json.dumps(cases[index], sort_keys=True)}  {detail}",
              flush=True)
    for p in procs.values():
        p.join(timeout=30)
    failures = sum(not ok for ok, _ in results.values())
    print(f"gpu_sweep: {len(cases) - failures}/{len(cases)} cases passed, {failures} failed "
          f"in {time.time() - t0:.0f}s", flush=True)
    return 1 if failures else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subset", choices=("all", "pairs", "random", "sanitizer", "issue", "configs", "decode"),
                        default="all")
    parser.add_argument("--random", type=int, default=300, help="random cases after the head-dim pairs")
    parser.add_argument("--seed", type=int, default=int(time.time()) % 100000)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--replay", help="one case's JSON as a failure prints it (or a JSON list of cases)")
    args = parser.parse_args()
    if args.replay:  # one case's JSON, or a list of them
        cases = json.loads(args.replay)
        cases = cases if isinstance(cases, list) else [cases]
    else:
        print(f"gpu_sweep: seed {args.seed}", flush=True)
        cases = {"pairs": head_dim_pairs, "issue": lambda: ISSUE_CASES, "sanitizer": sanitizer_cases, "configs": config_cases,
                 "random": lambda: random_cases(args.random, args.seed),
                 "decode": lambda: decode_cases(args.random, args.seed),
                 "all": lambda: ISSUE_CASES + config_cases() + head_dim_pairs() + random_cases(args.random, args.seed)
                 + decode_cases(args.random // 2, args.seed)}[args.subset]()
    return run_all(cases, min(args.workers, len(cases)))


if __name__ == "__main__":
    sys.exit(main())
