"""The float32 ALiBi slope gradient on the GPU: its relative error against float64, flexcomp's paths beside torch's.

    python benchmarks/alibi_slope_grad.py                       # CUDA
    SKIP_TORCH=1 FLEXCOMP_FP_FUSION=0 python benchmarks/alibi_slope_grad.py   # flexcomp alone, no FMA fusion

Rows: plain float32 math (the reference backend), flexcomp by default, with the forward kernel instead of the decode
kernel, with atomic dQ, under deterministic algorithms, flexcomp's backward alone fed the float64 forward's out and
lse, and torch's flex_attention compiled.  The slope's gradient
sums dS * (kv - q) over rows of dS that sum to zero, so it cancels; with slopes near 1 over ~1700 keys flexcomp's
error was 10-40x torch's on the H200 (session 12), and not on the interpreter.  (Session 12 also ran it with
Triton's TRITON_DEFAULT_FP_FUSION=0, which changed nothing because flexcomp's launches set the option themselves:
FLEXCOMP_FP_FUSION is the switch that reaches them.)
"""

from __future__ import annotations

import os

import torch
from torch.nn.attention.flex_attention import flex_attention as torch_flex

import flexcomp as fc

SLOPES = None  # float [Hq], read live by the mod
OPTIONS = {"flexcomp": None, "fwd kernel": {"BACKEND": "TRITON"}, "atomic dq": {"BACKWARD_DQ": "atomic"}}
CASES = [(7, 1692, 256, 16, 1.0), (7, 1692, 64, 64, 1.0), (128, 1692, 64, 64, 1.0), (7, 1692, 64, 64, 0.05)]


def alibi(score, b, h, q_idx, kv_idx):
    return score + SLOPES[h] * (kv_idx - q_idx)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def case(q_len: int, kv_len: int, dim: int, dim_v: int, slope_scale: float, seed: int = 1) -> None:
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(1, 4, q_len, dim, device="cuda", generator=g)
    k = torch.randn(1, 2, kv_len, dim, device="cuda", generator=g)
    v = torch.randn(1, 2, kv_len, dim_v, device="cuda", generator=g)
    dout = torch.randn(1, 4, q_len, dim_v, device="cuda", generator=g)
    slopes = torch.rand(4, device="cuda", generator=g) * slope_scale

    def grads(attention, dtype, **kwargs):  # (d slopes, d q)
        global SLOPES
        SLOPES = slopes.to(dtype).clone().requires_grad_()
        qq, kk, vv = (t.to(dtype).requires_grad_() for t in (q, k, v))
        out = attention(qq, kk, vv, score_mod=alibi, enable_gqa=True, **kwargs)
        return torch.autograd.grad((out * dout.to(dtype)).sum(), [SLOPES, qq])

    ref = grads(fc.flex_attention, torch.float64, backend="reference")
    rows = {"f32 math": grads(fc.flex_attention, torch.float32, backend="reference")}
    for label, options in OPTIONS.items():
        rows[label] = grads(fc.flex_attention, torch.float32, kernel_options=options)
    torch.use_deterministic_algorithms(True)
    rows["deterministic"] = grads(fc.flex_attention, torch.float32)
    torch.use_deterministic_algorithms(False)
    rows["bwd alone"] = backward_alone(q, k, v, dout, slopes)
    if not os.environ.get("SKIP_TORCH"):
        rows["torch flex"] = grads(torch.compile(torch_flex), torch.float32)
    errors = "  ".join(f"{k}: dslopes {rel(g[0], ref[0]):.1e} dq {rel(g[1], ref[1]):.1e}" for k, g in rows.items())
    print(f"Lq={q_len} Lkv={kv_len} D={dim} Dv={dim_v} slopes*{slope_scale}: {errors}", flush=True)


def backward_alone(q, k, v, dout, slopes) -> tuple:
    """(d slopes, d q) of flexcomp's backward kernels fed the float64 forward's out and lse (rounded to float32):
    which of the two directions loses the digits."""
    from flexcomp.codegen.backward import flex_backward

    global SLOPES
    SLOPES = slopes.double()
    out64, lse64 = fc.flex_attention(*(t.double() for t in (q, k, v)), score_mod=alibi, enable_gqa=True,
                                     return_lse=True, backend="reference")  # fmt: skip
    SLOPES = slopes.float()
    mod = fc.score_mod(alibi)
    dq, _, _, grads = flex_backward(q, k, v, out64.float(), lse64.float(), dout, None, mod, None, None, True, None,
                                    captured={"SLOPES": SLOPES}, grad_buffers=frozenset({"SLOPES"}))  # fmt: skip
    return grads["SLOPES"], dq


if __name__ == "__main__":
    print("FLEXCOMP_FP_FUSION", os.environ.get("FLEXCOMP_FP_FUSION", "(default: on)"))
    for args in CASES:
        case(*args)
