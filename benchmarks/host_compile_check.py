"""Host cost, on the eager path, of flexcomp's torch.compile support (issue 20): `flex_attention` and
`create_block_mask` ask `torch.compiler.is_compiling()` first, and take the custom op (flexcomp/custom_op.py) only
while Dynamo traces.  This times tiny eager calls on CPU, where the host's work is most of the call.

    python benchmarks/host_compile_check.py [--calls 2000] [--repeats 5]
    PYTHONPATH=/path/to/an/older/checkout python benchmarks/host_compile_check.py   # the same calls, before

Prints microseconds per call (the best of `--repeats` rounds of `--calls` calls) of: `is_compiling()` alone, a
reference-backend forward with a block mask passed in (B=1, H=1, L=32, D=16) with and without a score_mod, a
forward+backward, and create_block_mask (causal, L=128).  No GPU needed.

Measured on the shared 2-core box (load 4-6, OMP_NUM_THREADS=1, 500 calls, best of 5; two runs each), before
(7b7a84d, no torch.compile support) and after (9ce4553):

    call                               before            after
    is_compiling()                     0.09  0.09        0.09  0.10
    forward, block mask                1127  1103        1274   707
    forward, block mask + score_mod    1384   896        1446   832
    forward+backward, block mask       2943  2374        4335  2683
    create_block_mask (causal, L=128)  12.8  12.8        15.6  12.8

The eager path's only addition is the one is_compiling() per call (about 0.1 us); the rest of the spread is the
box's noise (the same code varies by +-40% between runs).
"""

from __future__ import annotations

import argparse
import time

import torch

import flexcomp as fc

L, D, MASK_LEN = 32, 16, 128


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def rel_bias(score, b, h, q_idx, kv_idx):
    return score + (kv_idx - q_idx) * 0.01


def best_us(fn, calls: int, repeats: int) -> float:
    """Microseconds per call: the best of `repeats` rounds (the shared box is noisy; the minimum is the cost)."""
    fn()
    rounds = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        rounds.append((time.perf_counter() - start) * 1e6 / calls)
    return min(rounds)


def cases() -> dict[str, callable]:
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, L, D, generator=generator) for _ in range(3))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    block_mask = fc.create_block_mask(causal, None, None, L, L, device="cpu", BLOCK_SIZE=16)

    def forward_backward():
        fc.flex_attention(*leaves, block_mask=block_mask, backend="reference").sum().backward()

    return {
        "torch.compiler.is_compiling()": torch.compiler.is_compiling,
        "forward, block mask": lambda: fc.flex_attention(q, k, v, block_mask=block_mask, backend="reference"),
        "forward, block mask + score_mod": lambda: fc.flex_attention(
            q, k, v, score_mod=rel_bias, block_mask=block_mask, backend="reference"
        ),
        "forward+backward, block mask": forward_backward,
        "create_block_mask (causal, L=128)": lambda: fc.create_block_mask(
            causal, None, None, MASK_LEN, MASK_LEN, device="cpu"
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"flexcomp from {fc.__file__}")
    print(f"{'call':36s} {'us/call':>9s}")
    for name, fn in cases().items():
        print(f"{name:36s} {best_us(fn, args.calls, args.repeats):9.2f}")


if __name__ == "__main__":
    main()
