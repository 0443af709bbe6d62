"""Host (CPU) cost of one call, flexcomp beside torch flex: for small or very sparse problems the GPU
finishes before the next launch is issued, and the time per call is the host's.

    python benchmarks/profile_host.py [--variant "document + causal"] [--head-dim 64] [--calls 200]

Per implementation and mode (forward, forward+backward): the wall time of `--calls` back-to-back calls
with one synchronize at the end (what a training loop sees when the host is the bottleneck), the GPU time
of one call (CUDA events around a synchronized call), and for flexcomp the cProfile top functions by
own time.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_attention as ba

import flexcomp as fc


def ms_per_call(fn, calls: int, wait: bool) -> float:
    """Wall time per call of `calls` back-to-back calls; `wait`: until the GPU is done (what a loop sees), else
    only the host's part (calls issued without waiting: the GPU queue holds them; synchronized after timing)."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    if wait:
        torch.cuda.synchronize()
    elapsed = (time.perf_counter() - start) * 1e3 / calls
    torch.cuda.synchronize()
    return elapsed


def without_triton_launches(fn):
    """fn with every Triton launch skipped (JITFunction.run returns at once): flexcomp's own host cost."""
    from triton.runtime.jit import JITFunction

    def call():
        original = JITFunction.run
        JITFunction.run = lambda self, *args, **kwargs: None
        try:
            return fn()
        finally:
            JITFunction.run = original
    return call


def gpu_ms(fn) -> float:
    torch.cuda.synchronize()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return begin.elapsed_time(end)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", default="document + causal")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    v = next(x for x in ba.VARIANTS if x.name == args.variant)
    B, H, L, D = 4, 16, 8192, args.head_dim
    device = "cuda"
    ba.DOC_IDS = torch.repeat_interleave(torch.arange(64, dtype=torch.int32, device=device), L // 64)
    ba.SLOPES = torch.exp2(-8.0 * torch.arange(1, H + 1, device=device) / H).float()
    q, k, val = (torch.randn(B, H, L, D, device=device, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    dout = torch.randn_like(q)
    f_mask = fc.create_block_mask(v.mask_mod, 1, 1, L, L, device=device) if v.mask_mod else None
    t_mask = ba.torch_flex_module.create_block_mask(v.mask_mod, 1, 1, L, L, device=device) if v.mask_mod else None
    f_score = fc.score_mod(v.score_mod) if v.score_mod else None
    impls = {"flexcomp": lambda: fc.flex_attention(q, k, val, score_mod=f_score, block_mask=f_mask),
             "torch flex": lambda: ba.torch_flex(q, k, val, score_mod=v.score_mod, block_mask=t_mask)}
    calls = min(args.calls, 50)  # the host-time runs must not fill the GPU's launch queue
    for name, fn in impls.items():
        step = lambda fn=fn: fn().backward(dout)
        with torch.no_grad():
            fwd = ms_per_call(fn, args.calls, True), gpu_ms(fn), ms_per_call(fn, calls, False)
        both = ms_per_call(step, args.calls, True), gpu_ms(step), ms_per_call(step, calls, False)
        print(f"{name:10s} forward: {fwd[0]:.3f} ms/call back to back, GPU {fwd[1]:.3f} ms, host {fwd[2]:.3f} ms | "
              f"forward+backward: {both[0]:.3f} ms/call, GPU {both[1]:.3f} ms, host {both[2]:.3f} ms", flush=True)
    ours = impls["flexcomp"]
    with torch.no_grad():
        bare_fwd = ms_per_call(without_triton_launches(ours), calls, False)
    bare_both = ms_per_call(without_triton_launches(lambda: ours().sum().backward()), calls, False)
    print(f"flexcomp host without its Triton launches: forward {bare_fwd:.3f} ms, forward+backward "
          f"{bare_both:.3f} ms (the backward's sum() adds two torch ops)", flush=True)
    for label, call in (("forward", lambda: impls["flexcomp"]()), ("forward+backward",
                                                                    lambda: impls["flexcomp"]().backward(dout))):
        profile = cProfile.Profile()
        grad = torch.enable_grad() if label != "forward" else torch.no_grad()
        with grad:
            profile.enable()
            for _ in range(args.calls):
                call()
            profile.disable()
        torch.cuda.synchronize()
        print(f"\n## flexcomp {label}: top {args.top} by own time over {args.calls} calls")
        pstats.Stats(profile).sort_stats("tottime").print_stats(args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
