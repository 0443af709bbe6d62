"""The one runner every example calls: compile a variant, show what was built, run it, check it.

`run_example(score_mod=..., mask_mod=..., q_len=..., ...)` prints the parsed and
optimized IR, the tile classes of the block mask at (q_len, kv_len), the
generated kernel source when codegen is there, then runs flexcomp at a small
size on whatever device exists (an example's captured tensors are built there
by its `example(device)`) and compares with a dense float64 attention that
calls the user's Python functions directly (never flexcomp's own evaluator).
Exits 1 on a mismatch.  Flags: --triton (the Triton backend; under the
interpreter when there is no GPU), --q-len/--kv-len (tile-analysis size), --quiet.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import math
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import torch

INDEX_DTYPE = torch.int32


# ---------------------------------------------------------------- the independent oracle


def _user_fn(mod: Any) -> Callable:
    """The user's own Python function behind a Mod (a plain callable passes through)."""
    fn = getattr(mod, "fn", None)
    return fn if fn is not None else mod


def _index_grid(batch: int, heads: int, q_len: int, kv_len: int, device) -> tuple[torch.Tensor, ...]:
    def ramp(n: int, dim: int) -> torch.Tensor:
        shape = [1, 1, 1, 1]
        shape[dim] = n
        return torch.arange(n, dtype=INDEX_DTYPE, device=device).view(shape)

    return ramp(batch, 0), ramp(heads, 1), ramp(q_len, 2), ramp(kv_len, 3)


def _call_elementwise(fn: Callable, shape: tuple[int, ...], score: torch.Tensor | None, device) -> torch.Tensor:
    """Call `fn` once per element with 0-d tensors: Python `if`, `and`, `min` on tensors just work."""
    out = []
    for b, h, q, kv in torch.cartesian_prod(*(torch.arange(n) for n in shape)).tolist():
        idx = [torch.tensor(i, dtype=INDEX_DTYPE, device=device) for i in (b, h, q, kv)]
        args = idx if score is None else [score[b, h, q, kv], *idx]
        out.append(torch.as_tensor(fn(*args), device=device))  # a Python `True` lands where the tensors are
    return torch.stack(out).view(shape)


def evaluate_user_fn(
    mod: Any, batch: int, heads: int, q_len: int, kv_len: int, score: torch.Tensor | None = None, device="cpu"
):
    """The user's function on the full [B, H, Q, KV] index grid on `device`, where its captured tensors live
    (a float64 score when given).

    Vectorized first (one call on broadcast index tensors); if the function uses
    data-dependent Python control flow, which cannot run on a whole tensor, it is
    called element by element instead.  Either way it is the user's Python.
    """
    fn = _user_fn(mod)
    shape = (batch, heads, q_len, kv_len)
    grid = _index_grid(*shape, device)
    try:
        value = torch.as_tensor(fn(*grid) if score is None else fn(score, *grid), device=device)
        return value.expand(shape).clone()
    except (RuntimeError, TypeError, IndexError):
        return _call_elementwise(fn, shape, score, device)


def dense_attention(q, k, v, score_mod=None, mask_mod=None, scale=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 attention with full [B, H, Q, KV] matrices: (output, lse).  GQA by repeating kv heads."""
    q, k, v = (t.detach().double() for t in (q, k, v))  # float64 on the inputs' (and captured tensors') device
    batch, heads, q_len, head_dim = q.shape
    kv_len = k.shape[2]
    k = k.repeat_interleave(heads // k.shape[1], dim=1)
    v = v.repeat_interleave(heads // v.shape[1], dim=1)
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    scores = q @ k.transpose(-1, -2) * scale
    if score_mod is not None:
        scores = evaluate_user_fn(score_mod, batch, heads, q_len, kv_len, score=scores, device=q.device).double()
    if mask_mod is not None:
        keep = evaluate_user_fn(mask_mod, batch, heads, q_len, kv_len, device=q.device).bool()
        scores = scores.masked_fill(~keep, -math.inf)
    lse = torch.logsumexp(scores, dim=-1)
    finite_lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    weights = torch.exp(scores - finite_lse[..., None])  # a fully masked row: all zeros, no NaN
    return (weights @ v).cpu(), lse.cpu()


def brute_force_tiles(mask_mod, batch: int, heads: int, q_len: int, kv_len: int, block_size: int) -> torch.Tensor:
    """[B, H, n_q_blocks, n_kv_blocks] tile classes (0 empty, 1 partial, 2 full) from the dense mask."""
    keep = evaluate_user_fn(mask_mod, batch, heads, q_len, kv_len).bool()
    n_q, n_kv = -(-q_len // block_size), -(-kv_len // block_size)
    padded_any = torch.zeros(batch, heads, n_q * block_size, n_kv * block_size, dtype=torch.bool)
    padded_all = torch.ones_like(padded_any)  # out-of-range elements do not count
    padded_any[..., :q_len, :kv_len] = keep
    padded_all[..., :q_len, :kv_len] = keep
    tiles_any = padded_any.view(batch, heads, n_q, block_size, n_kv, block_size).any(5).any(3)
    tiles_all = padded_all.view(batch, heads, n_q, block_size, n_kv, block_size).all(5).all(3)
    return torch.where(tiles_all, 2, torch.where(tiles_any, 1, 0))


# ---------------------------------------------------------------- showing what was built


def _section(title: str) -> None:
    print(f"\n== {title}")


def show_ir(*mods: Any) -> None:
    from flexcomp.ir import to_text

    for mod in mods:
        _section(f"{mod.kind}_mod {mod.name}: parsed IR")
        print(to_text(mod.raw_ir))
        _section(f"{mod.kind}_mod {mod.name}: optimized IR")
        print(to_text(mod.ir))


def show_tiles(mask_mod, batch: int, heads: int, q_len: int, kv_len: int, block_size: int):
    import flexcomp as fc
    from flexcomp.ir import to_expr

    _section(f"tiles of {mask_mod.name} at B={batch} H={heads} Q={q_len} KV={kv_len} BLOCK_SIZE={block_size}")
    block_mask = fc.create_block_mask(mask_mod, batch, heads, q_len, kv_len, device=default_device(),
                                      BLOCK_SIZE=block_size)
    counts = torch.bincount(torch.as_tensor(block_mask.tile_classes()).flatten().long(), minlength=3).tolist()
    print(f"EMPTY {counts[0]}  PARTIAL {counts[1]}  FULL {counts[2]}  sparsity {block_mask.sparsity():.1f}%")
    bounds = getattr(block_mask, "bounds", None)
    if bounds is not None:
        for field in ("kv_lo", "kv_hi", "full_lo", "full_hi"):
            print(f"  {field:8s}= {to_expr(getattr(bounds, field))}")
    return block_mask


def show_kernel(score_mod, mask_mod) -> None:
    kernel_source = getattr(importlib.import_module("flexcomp.codegen"), "kernel_source", None)
    if kernel_source is None:
        _section("kernel source: codegen not available yet")
        return
    _section("generated kernel source")
    print(kernel_source(score_mod, mask_mod))


# ---------------------------------------------------------------- running and checking


def check_against_dense(
    score_mod=None, mask_mod=None, *, batch=1, heads=2, q_len=128, kv_len=128, head_dim=16,
    block_size=32, backend="auto", device=None, seed=0,
) -> float:
    """Run flexcomp on random inputs and return the max abs error against `dense_attention`; raises on mismatch."""
    import flexcomp as fc

    device = device or default_device()
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, heads, n, head_dim, generator=gen).to(device) for n in (q_len, kv_len, kv_len))
    masking = {}
    if mask_mod is not None and _have_block_masks():
        masking["block_mask"] = fc.create_block_mask(mask_mod, batch, heads, q_len, kv_len, device=device,
                                                     BLOCK_SIZE=block_size)
    elif mask_mod is not None:
        masking["mask_mod"] = mask_mod
    out, lse = fc.flex_attention(q, k, v, score_mod=score_mod, return_lse=True, backend=backend, **masking)
    want_out, want_lse = dense_attention(q, k, v, score_mod, mask_mod)
    err = (out.double().cpu() - want_out).abs().max().item()
    lse_ok = torch.allclose(lse.double().cpu(), want_lse, atol=1e-4, rtol=1e-4)  # also -inf == -inf
    if not (err < 1e-4 and lse_ok):
        raise AssertionError(f"flexcomp ({backend}, {device}) disagrees with dense float64: {err=:.3g} {lse_ok=}")
    return err


def _parse_args(q_len: int, kv_len: int) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="compile, show and check this attention variant")
    parser.add_argument("--triton", action="store_true", help="check the Triton backend (interpreter on CPU)")
    parser.add_argument("--q-len", type=int, default=q_len, help="sequence length for the tile analysis")
    parser.add_argument("--kv-len", type=int, default=None, help="default: the example's, or --q-len when given")
    parser.add_argument("--quiet", action="store_true", help="only the check")
    args = parser.parse_args()
    if args.kv_len is None:
        args.kv_len = kv_len if args.q_len == q_len else args.q_len
    return args


def _have_block_masks() -> bool:
    return importlib.util.find_spec("flexcomp.blockmask") is not None


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def run_example(example: Callable[[str], dict] | None = None, **spec: Any) -> None:
    """Compile, show and check one variant; the `if __name__ == "__main__"` of every example.

    `run_example(example)`: an example with captured tensors passes its `example(device)` builder, called here
    with the device the check runs on (a captured tensor must live on the inputs' device); one without passes
    its spec as keywords, `run_example(**EXAMPLE)`.
    """
    _run_spec(**(example(default_device()) if example is not None else spec))


def _run_spec(
    score_mod=None, mask_mod=None, *, q_len=1024, kv_len=None, batch=1, heads=2, head_dim=16,
    block_size=128, check_q_len=None, check_kv_len=None,
) -> None:
    args = _parse_args(q_len, kv_len or q_len)
    if args.triton and not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        # Triton's interpreter must be on when Triton is imported, which importing flexcomp has done: run again
        sys.exit(subprocess.run([sys.executable, *sys.argv], env={**os.environ, "TRITON_INTERPRET": "1"},
                                check=False).returncode)  # fmt: skip
    mods = [m for m in (score_mod, mask_mod) if m is not None]
    check_q = check_q_len or min(args.q_len, 128)
    check_kv = check_kv_len or min(args.kv_len, 128)
    if not args.quiet:
        show_ir(*mods)
        if mask_mod is not None and not _have_block_masks():
            _section("tiles: flexcomp.create_block_mask not available yet")
        elif mask_mod is not None:
            show_tiles(mask_mod, batch, heads, args.q_len, args.kv_len, block_size)
        show_kernel(score_mod, mask_mod)
    backends = ["auto"] + (["triton"] if args.triton else [])
    _section(f"check against dense float64 at B={batch} H={heads} Q={check_q} KV={check_kv}")
    for backend in backends:
        try:
            err = check_against_dense(score_mod, mask_mod, batch=batch, heads=heads, q_len=check_q,
                                      kv_len=check_kv, head_dim=head_dim, backend=backend)
        except AssertionError as mismatch:
            print(f"FAIL {mismatch}")
            sys.exit(1)
        print(f"ok   backend={backend}: max abs error {err:.2e}")
