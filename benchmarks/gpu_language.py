"""The language's test gallery compiled for a real GPU (issue 17): the math functions of tests/test_math_ops.py and
the torch habits of tests/test_torch_habits.py, through the Triton backend on CUDA against float64 on the CPU.

    python benchmarks/gpu_language.py      # exits 1 on any failure

The tests run these under Triton's interpreter, which implements every math function with numpy: only a GPU
compile shows that each helper exists in the installed Triton and gives the same numbers.  Forward (out, lse) and
backward (dq, dk, dv); the math functions in float32 at L=250 (several tiles, a partial last one), the habits in
float32 and bfloat16 at their tables' L=48.
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import types
import zlib
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

# the test modules turn the interpreter on when imported: decide first (only `cpu` as argument wants it)
os.environ.setdefault("TRITON_INTERPRET", "1" if sys.argv[1:] == ["cpu"] else "0")

import torch

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS))

import test_math_ops as math_ops
import test_torch_habits as habits
from naive import naive_attention

import flexcomp as fc

# (out and lse, gradients): max error over the reference's RMS; bfloat16 rounds P and dS to 8 bits before each dot
TOLERANCE = {torch.float32: (2e-3, 5e-3), torch.bfloat16: (0.1, 0.25)}


# the tests' scales keep L=32 scores inside tan's and log1p's domains; 250^2 scores reach 4 sigma: smaller here
SCALES = {**math_ops.SCALES, "tan": 0.2, "log1p": 0.2}


def tensors_to(module: types.ModuleType, device: str) -> None:
    """Rebind the module's captured tensors on `device` (mods read them live at every call)."""
    for name, value in vars(module).items():
        if isinstance(value, torch.Tensor):
            setattr(module, name, value.to(device))


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    finite = want.isfinite()
    scale = want[finite].pow(2).mean().sqrt().clamp_min(1e-2)
    return float((got.detach().double().cpu()[finite] - want[finite]).abs().max() / scale)


def check(name: str, score_mod, mask_mod, score_dense, mask_dense, module, dtype, L: int, device: str,
          heads: int = 2) -> str:
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    # drawn in `dtype` so the float64 reference sees the same inputs: what remains is the kernel's rounding
    q, k, v, dout = (torch.randn(habits.B, heads, L, 64, generator=gen, dtype=torch.float64).to(dtype).double()
                     for _ in range(4))
    ref = [t.clone().requires_grad_() for t in (q, k, v)]
    want_out, want_lse = naive_attention(*ref, score_fn=score_dense, mask_fn=mask_dense)
    want_grads = torch.autograd.grad((want_out * dout).sum(), ref)
    tensors_to(module, device)
    try:
        inputs = [t.to(device, dtype).requires_grad_() for t in (q, k, v)]
        block_mask = fc.create_block_mask(mask_mod, habits.B, heads, L, L, device) if mask_mod else None
        out, lse = fc.flex_attention(*inputs, score_mod=score_mod, block_mask=block_mask, return_lse=True,
                                     backend="triton")
        grads = torch.autograd.grad((out * dout.to(device, dtype)).sum(), inputs)
    finally:
        tensors_to(module, "cpu")
    if out.isnan().any() or lse.isnan().any():
        raise AssertionError("NaN in the output")
    if not torch.equal(lse.isfinite().cpu(), want_lse.isfinite()):
        raise AssertionError("fully masked rows differ")
    errors = {"out": rel_err(out, want_out.detach()), "lse": rel_err(lse, want_lse.detach())}
    errors |= {f"d{n}": rel_err(g, w) for n, g, w in zip("qkv", grads, want_grads)}
    forward_tol, backward_tol = TOLERANCE[dtype]
    bad = {n: e for n, e in errors.items() if e > (forward_tol if n in ("out", "lse") else backward_tol)}
    if bad:
        raise AssertionError(f"relative errors {bad}")
    return " ".join(f"{n} {e:.1e}" for n, e in errors.items())


def scaled_score_mod(body, scale: float) -> fc.Mod:
    return fc.as_mod(lambda score, b, h, q_idx, kv_idx: body(score * scale), "score")


def cases():
    """(name, score_mod, mask_mod, dense score, dense mask, module holding their tensors)."""
    causal = habits.causal
    dense_causal = lambda b, h, q, kv: habits.elementwise(causal, b, h, q, kv)
    for name, (body, torch_fn) in math_ops.CASES.items():
        if name.startswith("round"):  # piecewise constant: no gradient to compare, and halves differ in float32
            continue
        scale = SCALES.get(name, 1.0)
        score_mod = scaled_score_mod(body, scale)
        yield (f"math {name}", score_mod, causal, lambda s, b, h, q, kv, f=torch_fn, c=scale: f(s * c),
               dense_causal, math_ops)
    for name, mask in habits.MASKS.items():
        yield (f"mask {name}", None, mask, None,
               lambda b, h, q, kv, m=mask: habits.elementwise(m, b, h, q, kv), habits)
    for name, score in habits.SCORES.items():
        yield (f"score {name}", score, causal,
               lambda s, b, h, q, kv, f=score: habits.elementwise(f, s, b, h, q, kv), dense_causal, habits)


def runs() -> list[tuple[int, str, torch.dtype]]:
    """(case index, name, dtype) of every run: a math function amplifies bfloat16's rounding of the scores (tan near
    its poles), so those run in float32, which shows whether the helpers exist and agree."""
    return [(i, case[0], dtype) for i, case in enumerate(cases())
            for dtype in ((torch.float32,) if case[0].startswith("math") else (torch.float32, torch.bfloat16))]


def run_one(index: int, dtype: torch.dtype, device: str) -> tuple[bool, str]:
    name, score_mod, mask_mod, score_dense, mask_dense, module = list(cases())[index]
    L = habits.L if module is habits else 250  # the habits' tables are sized for L=48; 250 has a partial tile
    try:
        return True, check(name, score_mod, mask_mod, score_dense, mask_dense, module, dtype, L, device)
    except Exception as exc:  # noqa: BLE001 (a crash is a failed case, reported with the rest)
        return False, f"{type(exc).__name__}: {str(exc)[:300]}"


def main(device: str = "cuda", workers: int = 12) -> int:
    """`device` "cpu" runs the same under Triton's interpreter (a smoke test of this script).  Each case compiles
    its own kernels (seconds each on a GPU): `workers` processes compile them side by side."""
    if device != "cpu" and not torch.cuda.is_available():
        print("gpu_language: no CUDA device")
        return 1
    todo = runs()
    results = []
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        jobs = [(i, dtype, device) for i, _, dtype in todo]
        done = map(run_one, *zip(*jobs)) if device == "cpu" else pool.map(run_one, *zip(*jobs))
        for (_, name, dtype), (ok, detail) in zip(todo, done):  # printed as they arrive, in order
            results.append((ok, detail))
            print(f"{'ok  ' if ok else 'FAIL'} {name:34s} {str(dtype)[6:]:9s} {detail}", flush=True)
    failures = sum(not ok for ok, _ in results)
    print(f"gpu_language: {len(todo) - failures} of {len(todo)} passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "cuda"))
