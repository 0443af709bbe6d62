"""GPU correctness sweep: the generated kernels against the float64 reference, forward and backward.

    python benchmarks/gpu_check.py            # on a CUDA machine; exits 1 on any failure
    python benchmarks/gpu_check.py --shard 2/4   # every 4th check from the third: run 4 at once to cut compile time

Covers what the interpreter tests cannot reach: real tile sizes and num_warps,
bf16 tensor-core dots, odd lengths, GQA, head dims 16..256 (non-powers of two),
Dv != D, fp16/bf16/fp32, fully masked rows and learnable captured tensors; then every
example of the gallery on CUDA (benchmarks/gpu_examples.py).
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time

import torch
from gpu_examples import example_names, run_all

import flexcomp as fc

DEVICE = "cuda"
TOLERANCE = {torch.bfloat16: 3e-2, torch.float16: 5e-3, torch.float32: 5e-4}

WINDOW = 300
DOC = None  # int32 document ids, set per case
BIAS = None  # learnable float32 [2 * L] relative bias
SLOPES = None  # learnable float32 [H]


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def sliding_window(b, h, q_idx, kv_idx):
    return (q_idx >= kv_idx) & (q_idx - kv_idx <= WINDOW)


def document(b, h, q_idx, kv_idx):
    return DOC[q_idx] == DOC[kv_idx]


def empty_rows(b, h, q_idx, kv_idx):
    return (q_idx % 7 != 3) & (kv_idx <= q_idx + 5)  # every 7th row fully masked


def softcap(score, b, h, q_idx, kv_idx):
    return 20.0 * torch.tanh(score / 20.0)


def alibi(score, b, h, q_idx, kv_idx):
    return score + SLOPES[h] * (kv_idx - q_idx)


def rel_bias(score, b, h, q_idx, kv_idx):
    return score + BIAS[q_idx - kv_idx + 2000] + 0.5 * BIAS[kv_idx % 97]


CASES = [  # (name, mask_mod, score_mod)
    ("none", None, None),
    ("causal", causal, None),
    ("sliding window", sliding_window, None),
    ("document", document, None),
    ("fully masked rows", empty_rows, None),
    ("softcap + causal", causal, softcap),
    ("alibi (learnable) + window", sliding_window, alibi),
    ("relative bias (learnable)", causal, rel_bias),
]
SHAPES = [  # (B, Hq, Hkv, Lq, Lkv, D, Dv)
    (2, 4, 4, 1024, 1024, 128, 128),
    (1, 8, 2, 777, 1500, 64, 64),
    (2, 2, 2, 300, 300, 96, 96),
    (1, 4, 1, 513, 513, 48, 80),
    (1, 2, 2, 256, 384, 256, 256),
    (1, 2, 2, 200, 200, 16, 16),
    (1, 2, 2, 330, 330, 192, 128),
]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def check(name, mask_fn, score_fn, shape, dtype, backward: bool, with_max: bool = False) -> tuple[bool, str]:
    """One case against float64; `with_max` also asks for return_aux's max_scores (the OUTPUT_MAX kernels)."""
    global DOC, BIAS, SLOPES
    B, Hq, Hkv, Lq, Lkv, D, Dv = shape
    DOC = (torch.arange(max(Lq, Lkv), device=DEVICE) // 97).to(torch.int32)
    BIAS = torch.randn(4096, device=DEVICE, requires_grad=backward)
    SLOPES = torch.rand(Hq, device=DEVICE, requires_grad=backward)
    q = torch.randn(B, Hq, Lq, D, device=DEVICE, dtype=dtype, requires_grad=backward)
    k = torch.randn(B, Hkv, Lkv, D, device=DEVICE, dtype=dtype, requires_grad=backward)
    v = torch.randn(B, Hkv, Lkv, Dv, device=DEVICE, dtype=dtype, requires_grad=backward)
    dout = torch.randn(B, Hq, Lq, Dv, device=DEVICE, dtype=dtype)
    block_mask = fc.create_block_mask(mask_fn, None, None, Lq, Lkv, device=DEVICE) if mask_fn else None
    kwargs = {"score_mod": score_fn, "block_mask": block_mask, "enable_gqa": Hq != Hkv,
              "return_aux": fc.AuxRequest(lse=True, max_scores=with_max)}

    out, (lse, max_scores) = fc.flex_attention(q, k, v, backend="triton", **kwargs)
    leaves = [t for t in (q, k, v, BIAS, SLOPES) if t.requires_grad]
    if backward:
        grads = torch.autograd.grad((out.float() * dout.float()).sum(), leaves, allow_unused=True)
    with torch.no_grad() if not backward else torch.enable_grad():
        q64, k64, v64 = (t.detach().double().requires_grad_(backward) for t in (q, k, v))
        # fresh float32 leaves (a captured tensor's dtype is part of the compiled mod); the reference computes in float64
        BIAS64, SLOPES64 = BIAS.detach().clone().requires_grad_(backward), SLOPES.detach().clone().requires_grad_(backward)
        BIAS, SLOPES = BIAS64, SLOPES64  # the mods read the globals live
        ref_out, (ref_lse, ref_max) = fc.flex_attention(q64, k64, v64, backend="reference", **kwargs)
    errs = {"out": rel_err(out, ref_out)}
    finite = torch.isfinite(ref_lse)
    errs["lse"] = rel_err(lse[finite], ref_lse[finite])
    ok = bool(torch.equal(torch.isfinite(lse), finite)) and not out.isnan().any().item()
    if with_max:
        errs["max"] = rel_err(max_scores[finite], ref_max[finite])
        ok = ok and bool(torch.equal(torch.isfinite(max_scores), finite))
    if backward:
        ref_leaves = [t for t in (q64, k64, v64, BIAS64, SLOPES64) if t.requires_grad]
        ref_grads = torch.autograd.grad((ref_out * dout.double()).sum(), ref_leaves, allow_unused=True)
        for label, g, r in zip(("dq", "dk", "dv", "dbias", "dslopes"), grads, ref_grads):
            if r is not None and r.abs().sum() > 0:
                errs[label] = rel_err(g, r) if g is not None else float("inf")
    ok = ok and all(e <= TOLERANCE[dtype] for e in errs.values())
    return ok, " ".join(f"{k}={e:.1e}" for k, e in errs.items())


def check_repeat_launches() -> tuple[bool, str]:
    """codegen.launch's direct path and codegen/plans.py: a repeated call (same plan) gives the first call's bits,
    a call with fresh tensors of the same layout (the same plan, other pointers) matches float64, and a misaligned
    view (another specialization) is not served the aligned kernel: it matches float64 too."""
    from flexcomp.codegen import launch

    mask = fc.create_block_mask(fc.mask_mod(causal), 1, 1, 333, 333, device=DEVICE)
    score = fc.score_mod(softcap)
    gen = torch.Generator(device=DEVICE).manual_seed(7)
    numel = 2 * 4 * 333 * 64

    def draw() -> list[torch.Tensor]:
        return [torch.randn(numel + 1, device=DEVICE, dtype=torch.bfloat16, generator=gen) for _ in range(4)]

    def views(buffers: list[torch.Tensor], offset: int) -> list[torch.Tensor]:
        return [b[offset:offset + numel].view(2, 4, 333, 64) for b in buffers]

    def run(buffers: list[torch.Tensor], offset: int) -> list[torch.Tensor]:
        *qkv, dout = views(buffers, offset)
        q, k, v = (t.detach().requires_grad_() for t in qkv)
        out = fc.flex_attention(q, k, v, score_mod=score, block_mask=mask)
        return [out, *torch.autograd.grad(out, (q, k, v), dout)]

    def errors(got: list[torch.Tensor], buffers: list[torch.Tensor], offset: int) -> list[float]:
        *qkv, dout = views(buffers, offset)
        q, k, v = (t.double().requires_grad_() for t in qkv)
        ref = fc.flex_attention(q, k, v, score_mod=score, block_mask=mask, backend="reference")
        return [rel_err(a, r) for a, r in zip(got, [ref, *torch.autograd.grad(ref, (q, k, v), dout.double())])]

    buffers = draw()
    first = run(buffers, 0)
    hits = launch.FAST_LAUNCHES[0]
    again = run(buffers, 0)
    direct = launch.FAST_LAUNCHES[0] - hits
    same = all(torch.equal(a, b) for a, b in zip(first, again))
    fresh = draw()
    errs = errors(run(fresh, 0), fresh, 0) + errors(run(buffers, 1), buffers, 1)  # data_ptr % 16 == 2: recompiled
    ok = direct > 0 and same and max(errs) <= TOLERANCE[torch.bfloat16]
    return ok, (f"direct launches on repeat: {direct}; repeat bitwise equal: {same}; fresh tensors, then misaligned "
                f"views, vs float64: {' '.join(f'{e:.1e}' for e in errs)}")


def all_checks() -> list[tuple[str, object]]:
    """Every check as (label, thunk returning (ok, detail)), in a fixed order that --shard slices."""
    checks = [("repeat launches", check_repeat_launches)]
    runs = list(itertools.product(CASES, SHAPES[:2], [torch.bfloat16], [True]))
    runs += list(itertools.product(CASES[:2] + CASES[5:6], SHAPES[2:], [torch.bfloat16], [True]))
    runs += list(itertools.product(CASES[1:3] + CASES[6:7], SHAPES[1:2], [torch.float16, torch.float32], [True]))
    for (name, mask_fn, score_fn), shape, dtype, backward in runs:
        label = f"{name:28s} {shape!s:34s} {dtype!s:15s}"
        checks.append((label, lambda a=(name, mask_fn, score_fn, shape, dtype, backward): check(*a)))
    for (name, mask_fn, score_fn), dtype in itertools.product(CASES[3:6], [torch.bfloat16, torch.float32]):
        label = f"{name + ' + max_scores':28s} {SHAPES[1]!s:34s} {dtype!s:15s}"
        checks.append((label, lambda a=(name, mask_fn, score_fn, SHAPES[1], dtype, True, True): check(*a)))
    for example in example_names():  # the gallery on CUDA (issue 24: captured tensors on the wrong device)
        checks.append((f"example {example}", lambda e=example: (run_all(DEVICE, [e]) == 0, "(line above)")))
    return checks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shard", default="0/1", help="K/N: run checks K, K+N, K+2N, ... (0 <= K < N)")
    shard, shards = (int(x) for x in parser.parse_args().shard.split("/"))
    t0 = time.time()
    mine = all_checks()[shard::shards]
    failures = 0
    for label, thunk in mine:
        try:
            ok, detail = thunk()
        except Exception as exc:  # noqa: BLE001 -- a crash is a failed check, reported with the rest
            ok, detail = False, f"{type(exc).__name__}: {str(exc)[:300]}"
        failures += not ok
        if not label.startswith("example "):  # run_all printed the example's own line
            print(f"{'ok  ' if ok else 'FAIL'} {label} {detail}", flush=True)
    print(f"{len(mine) - failures}/{len(mine)} GPU checks passed in {time.time() - t0:.0f}s "
          f"(shard {shard}/{shards})", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
