"""Host cost of `Mod.specialized()`, the check every call makes that the mod still fits what it captured.

    python benchmarks/host_specialize.py [--calls 200000]

Prints microseconds per call of `specialized()` for mods capturing nothing, one int, four ints (one read in a
helper), a tensor, and an and_masks of two guarded parts; then the same after a rebinding (the cached variant
is found: `Mod.latest`), to compare with the guard-free baseline.  No GPU needed.

Measured on the shared 2-core CPU box (noisy; 50000 calls), before guards (main at c354800, which ignored a
rebound scalar) and after:

    mod                  before: unchanged  rebound    after: unchanged  rebound
    no capture                       0.19     0.19                0.31     0.30
    one int                          0.27     0.15                0.60     1.50
    four ints (helper)               0.16     0.35                1.55     3.35
    one tensor                       7.3      5.0                 3.6      2.7
    and_masks of both                0.17     0.20                1.66     2.73

About 0.3 us per guarded name per mod per call; a flex_attention call checks its score_mod and mask_mod.
"""

from __future__ import annotations

import argparse
import time

import torch

import flexcomp as fc

OFF, A, B, C = 0, 1, 2, 3
WIDTH = 8
TABLE = torch.zeros(16, dtype=torch.int32)


def helper(q_idx, kv_idx):
    return q_idx - kv_idx < WIDTH


@fc.mask_mod
def no_capture(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


@fc.mask_mod
def one_int(b, h, q_idx, kv_idx):
    return kv_idx <= q_idx + OFF


@fc.mask_mod
def four_ints(b, h, q_idx, kv_idx):
    return (kv_idx <= q_idx + A * B - C) & helper(q_idx, kv_idx)


@fc.mask_mod
def one_tensor(b, h, q_idx, kv_idx):
    return TABLE[q_idx % 16] == TABLE[kv_idx % 16]


composed = fc.and_masks(one_int, four_ints)
MODS = {
    "no capture": no_capture,
    "one int": one_int,
    "four ints (helper)": four_ints,
    "one tensor": one_tensor,
    "and_masks of both": composed,
}


def us_per_call(mod: fc.Mod, calls: int) -> float:
    specialized = mod.specialized
    start = time.perf_counter()
    for _ in range(calls):
        specialized()
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200_000)
    calls = parser.parse_args().calls
    global OFF, WIDTH
    print(f"{'mod':<22} {'unchanged (us/call)':>20} {'after rebinding (us/call)':>26}")
    for name, mod in MODS.items():
        unchanged = us_per_call(mod, calls)
        OFF, WIDTH = 5, 4  # the mods that read them re-specialize once, then find the variant
        rebound = us_per_call(mod, calls)
        OFF, WIDTH = 0, 8
        print(f"{name:<22} {unchanged:>20.3f} {rebound:>26.3f}")


if __name__ == "__main__":
    main()
