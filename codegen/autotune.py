"""Launch config spaces of every kernel (forward and backward) as data: measured default tables, the block
fitting both directions share, and the forward's opt-in autotuning remembered on disk.

The default (`default_config`) costs nothing: a table measured on an H100
(benchmarks/NOTES_forward.md).  Autotuning, asked for with
`kernel_options={"autotune": True}` or `FLEXCOMP_AUTOTUNE=1`, times every
candidate that `keep` admits once per (kernel, head dims, dtype, GPU, lengths)
and writes the winner to `<cache dir>/autotune_forward.json`, so later calls and
later processes pay nothing.  Progress goes to stderr.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from triton.runtime.errors import OutOfResources

from flexcomp.errors import BackendError

from .cache import _write_atomically, cache_dir

MIN_BLOCK = 16  # tl.dot's smallest tile side


@dataclass(frozen=True)
class LaunchConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    use_tma: bool = False  # K and V through Hopper tensor descriptors (forward.tma_layout_ok decides if it can)


# (bits per element, head dim up to) -> the default config, measured on an H100 (bf16, L=8192;
# benchmarks/NOTES_forward.md).  fp32 and D=256 entries are torch's defaults, not measured here.
DEFAULTS: dict[tuple[int, int], LaunchConfig] = {
    (32, 64): LaunchConfig(128, 32, 4, 3),
    (32, 128): LaunchConfig(32, 64, 4, 3),
    (32, 256): LaunchConfig(32, 32, 4, 3),
    (16, 64): LaunchConfig(128, 64, 8, 3),
    (16, 128): LaunchConfig(128, 128, 8, 3),
    (16, 256): LaunchConfig(64, 32, 4, 3),
}
# the same for sparse block masks (few kv blocks per q tile): smaller tiles waste less on partial ones
SPARSE_DEFAULTS: dict[tuple[int, int], LaunchConfig] = {
    (16, 64): LaunchConfig(64, 64, 4, 3),
    (16, 128): LaunchConfig(64, 64, 4, 3),
}
# dense masks with a score_mod at small head dims: the mod's per-element work makes the kernel issue-bound, and
# two 4-warp programs per SM hide it better than one 8-warp program (ALiBi D=64 1.94 -> 1.55 ms, causal unchanged)
SCORE_MOD_DEFAULTS: dict[tuple[int, int], LaunchConfig] = {
    (16, 64): LaunchConfig(128, 64, 4, 3),
}


@dataclass(frozen=True)
class BackwardConfig:
    """Tiles of the dK/dV kernel (M1 q rows per step, N1 kv rows per program) and of the dQ kernel (M2, N2)."""

    BLOCK_M1: int
    BLOCK_N1: int
    BLOCK_M2: int
    BLOCK_N2: int
    warps_dkdv: int
    stages_dkdv: int
    warps_dq: int
    stages_dq: int


# (bits per element, head dim up to) -> config; see benchmarks/NOTES_backward.md for the measurements.
# kernel_options (BLOCK_M1, BLOCK_N1, BLOCK_M2, BLOCK_N2, num_warps, num_stages) override any entry.
BACKWARD_CONFIGS: dict[tuple[int, int], BackwardConfig] = {
    (32, 64): BackwardConfig(32, 64, 64, 32, 4, 3, 4, 3),
    (32, 128): BackwardConfig(32, 64, 64, 32, 4, 3, 4, 3),
    (32, 256): BackwardConfig(32, 64, 64, 32, 4, 3, 4, 3),
    (16, 64): BackwardConfig(64, 64, 64, 64, 4, 3, 4, 3),
    (16, 128): BackwardConfig(64, 128, 128, 64, 8, 3, 8, 3),
    (16, 256): BackwardConfig(32, 64, 64, 32, 4, 3, 4, 3),
}
# where sparse masks (codegen/host.py is_sparse) differ: their short walks of 4-warp programs gain nothing from a third
# stage, which needs the index prefetch (host.prefetch_index) that costs them residency
SPARSE_BACKWARD_CONFIGS: dict[tuple[int, int], BackwardConfig] = {
    (16, 64): BackwardConfig(64, 64, 64, 64, 4, 2, 4, 3),
}

@dataclass(frozen=True)
class DecodeConfig:
    """The split-KV decoding kernel's kv tile and launch (its rows are the packed query rows, chosen by the host)."""

    block_n: int
    num_warps: int
    num_stages: int
    unsplit_stages: int = 0  # stages where the grid is full without splitting (0: num_stages)


# (bits per element, head dim up to) -> config.  Decoding streams K and V: 4 warps and three stages of 64-row tiles
# (96 KiB at D=128, bf16: two programs per SM) measured best or within 2% of it on the H200 at Lq = 1 and 16 with
# splits; where the batch fills the GPU unsplit (B=64, 512 programs) four stages read 4.44 TB/s against three's
# 3.98 (benchmarks/NOTES_decode.md).  The other entries keep those bytes per stage; they are not measured.
DECODE_CONFIGS: dict[tuple[int, int], DecodeConfig] = {
    (32, 64): DecodeConfig(64, 4, 3),
    (32, 128): DecodeConfig(32, 4, 3),
    (32, 256): DecodeConfig(16, 4, 3),
    (16, 64): DecodeConfig(128, 4, 3, 4),
    (16, 128): DecodeConfig(64, 4, 3, 4),
    (16, 256): DecodeConfig(32, 4, 3),
}


def default_decode_config(bits: int, head_dim: int) -> DecodeConfig:
    return DECODE_CONFIGS[(bits, head_dim_bucket(head_dim))]


# What autotuning tries: every combination, less what `keep` rejects.
BLOCKS_M = (64, 128)
BLOCKS_N = (32, 64, 128)
WARPS = (4, 8)
STAGES = (2, 3, 4)
TMA = (False, True)  # tried only where forward.tma_layout_ok holds (sm_90+, aligned K/V): mixed on the H100


def next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def head_dim_bucket(head_dim: int) -> int:
    return next(d for d in (64, 128, 256) if next_power_of_2(head_dim) <= d)


def default_config(bits: int, head_dim: int, sparse: bool = False, score_mod: bool = False) -> LaunchConfig:
    key = (bits, head_dim_bucket(head_dim))
    if sparse:
        return SPARSE_DEFAULTS.get(key, DEFAULTS[key])
    return SCORE_MOD_DEFAULTS.get(key, DEFAULTS[key]) if score_mod else DEFAULTS[key]


def default_backward_config(bits: int, head_dim: int, sparse_mask: bool = False) -> BackwardConfig:
    key = (bits, head_dim_bucket(head_dim))
    return SPARSE_BACKWARD_CONFIGS.get(key, BACKWARD_CONFIGS[key]) if sparse_mask else BACKWARD_CONFIGS[key]


def fit_block(size: int, limit: int) -> int:
    """The largest power of two <= size (down to MIN_BLOCK) that divides the block mask's block size `limit`."""
    while size > MIN_BLOCK and limit % size:
        size //= 2
    return size


def tile_size(options: dict, name: str, default: int, limit: int) -> int:
    """A kernel tile side: kernel_options[name] where given (a power of two >= MIN_BLOCK dividing the block mask's
    block size `limit`, else a ValueError naming both), else `default` fitted to `limit` (fit_block).  The one
    check of every kernel's tile options: forward, backward and decode."""
    if name not in options:
        size = fit_block(default, limit)
        if limit % size:
            raise BackendError(f"block mask block size {limit} is not a multiple of {MIN_BLOCK}")
        return size
    size = int(options[name])
    if size < MIN_BLOCK or size & (size - 1) or limit % size:
        raise ValueError(f"kernel_options {name}={size} must be a power of two >= {MIN_BLOCK} dividing the block "
                         f"mask's block size {limit}")  # fmt: skip
    return size


def keep(c: LaunchConfig, bits: int, head_dim: int, sparse: tuple[int, int]) -> bool:
    """Configs worth timing: tiles that divide the block mask's blocks and fit in registers and shared memory."""
    if sparse[0] % c.block_m or sparse[1] % c.block_n:
        return False
    d = next_power_of_2(head_dim)
    # fp32 accumulators: BLOCK_M x (BLOCK_N + D) floats over the threads; past ~192 per thread it spills
    if c.block_m * (c.block_n + d) // (32 * c.num_warps) > 192:
        return False
    # K and V tiles per pipeline stage, plus q
    smem = (c.num_stages * 2 * c.block_n * d + c.block_m * d) * bits // 8
    return smem <= 200 * 1024 and not (c.block_m == 128 and c.num_warps == 4 and d >= 128)


def candidates(bits: int, head_dim: int, sparse: tuple[int, int], tma: bool = False) -> list[LaunchConfig]:
    """Every combination that `keep` admits; with `tma`, each also with K/V through tensor descriptors."""
    loads = TMA if tma else (False,)
    every = [LaunchConfig(m, n, w, s, t) for t in loads for m in BLOCKS_M for n in BLOCKS_N for w in WARPS
             for s in STAGES]
    return [c for c in every if keep(c, bits, head_dim, sparse)]


def wanted(kernel_options: dict | None) -> bool:
    return bool((kernel_options or {}).get("autotune")) or os.environ.get("FLEXCOMP_AUTOTUNE") == "1"


def _table_path() -> Path:
    return cache_dir() / "autotune_forward.json"


def _read_table() -> dict:
    try:
        return json.loads(_table_path().read_text())
    except (OSError, ValueError):
        return {}


def _milliseconds(fn: Callable[[], None], on_gpu: bool) -> float:
    if on_gpu:
        from triton.testing import do_bench

        return do_bench(fn, warmup=5, rep=25, return_mode="median")
    fn()  # the interpreter (tests): host clock, median of three
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[1]


def tuned_config(key: str, configs: list[LaunchConfig], run: Callable[[LaunchConfig], None],
                 on_gpu: bool = True) -> LaunchConfig:
    """The fastest of `configs` for `key` (timed once, then read from disk). `run` launches one config."""
    known = _read_table().get(key)
    if known is not None:
        return LaunchConfig(**known)
    best, best_ms = configs[0], float("inf")
    for i, config in enumerate(configs):
        try:
            ms = _milliseconds(lambda config=config: run(config), on_gpu)
        except OutOfResources:
            ms = float("inf")
        print(f"flexcomp autotune [{i + 1}/{len(configs)}] {config}: {ms:.3f} ms", file=sys.stderr, flush=True)
        if ms < best_ms:
            best, best_ms = config, ms
    print(f"flexcomp autotune: chose {best} ({best_ms:.3f} ms) for {key}", file=sys.stderr, flush=True)
    table = _read_table()  # re-read: another process may have added entries meanwhile
    table[key] = asdict(best)
    _table_path().parent.mkdir(parents=True, exist_ok=True)
    _write_atomically(_table_path(), json.dumps(table, indent=1, sort_keys=True))
    return best
