"""The Gluon Hopper kernels (codegen/gluon/attention.py, codegen/gluon/backward.py) compile for sm_90 with the
Triton they were written for.

Gluon's API moves between Triton releases; the kernels target 3.6 (the GPU image's).  Elsewhere (CI runs 3.9)
the tests are skipped.  No GPU needed: the benchmarks' --compile-only compiles ahead of time.
"""

import os
import pathlib
import re
import subprocess
import sys

import pytest
import triton

ROOT = pathlib.Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    not triton.__version__.startswith("3.6"),
    reason=f"the Gluon kernels are written against Triton 3.6's Gluon API; this is Triton {triton.__version__}",
)


def compiled_lines(script: str, *args: str) -> tuple[list[str], str]:
    """(the report lines of `benchmarks/<script> --compile-only`, one per compiled kernel, and the whole output)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile for real, not interpret
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--compile-only", *args],
                         capture_output=True, text=True, env=env, timeout=600, check=False)  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    lines = [line for line in run.stdout.splitlines() if " D=" in line]
    for line in lines:
        assert "FAILED" not in line, line
    return lines, run.stdout


def test_every_version_and_rendered_variant_compiles_for_sm90_and_the_defaults_keep_wgmma_async_without_spills():
    lines, stdout = compiled_lines("gluon_attention.py")
    assert len(lines) >= 8, stdout  # the default runs (B and its A/B overrides) at D=64/128, causal or not
    for variant in ("sliding window", "alibi causal", "softcap"):  # mods rendered into B (codegen/gluon/mods.py)
        assert sum(f"B {variant} D=" in line for line in lines) == 2, stdout  # D=64 and 128
    for line in lines:
        assert int(re.search(r"wgmma.mma_async (\d+)", line).group(1)) > 0, line
        if ":" not in line.split(" D=")[0]:  # a default tile config, not an A/B override
            assert "spill st/ld ('0', '0')" in line, line
            assert "wgmma async" in line, line  # ptxas did not serialize the wgmmas (the kernels' whole point)


def test_version_a_compiles_for_sm90_too():
    """Version A (one consumer warpgroup, the benchmarks' A/B twin of B) shares B's barrier-ring helpers."""
    lines, stdout = compiled_lines("gluon_attention.py", "--runs", "A", "--skip-variants")
    assert len(lines) >= 4 and all(line.startswith("A ") for line in lines), stdout  # D=64/128, causal or not
    for line in lines:
        assert int(re.search(r"wgmma.mma_async (\d+)", line).group(1)) > 0, line


def test_backward_preprocess_dkdv_and_dq_kernels_compile_for_sm90_with_async_wgmma():
    lines, stdout = compiled_lines("gluon_backward.py")
    assert sum(" preprocess " in line for line in lines) == 2, stdout  # D=64 and 128
    for kernel in ("dkdv", "dq"):  # every run at D=64/128, causal or not
        assert sum(f" {kernel} D=" in line for line in lines) == 8, stdout
    for line in lines:
        if " preprocess " in line:
            continue
        # the dK/dV kernel issues S^T, dP^T, dV, dK per step (the dQ kernel S, dP, dQ), in two loops when causal
        assert int(re.search(r"wgmma.mma_async (\d+)", line).group(1)) > 0, line
        assert "wgmma async" in line, line  # ptxas kept the wgmmas asynchronous (no C7514: all retire in the step)
        if line.startswith("default ") and "dkdv D=128 causal" not in line:
            assert "spill st/ld ('0', '0')" in line, line  # (the causal dK/dV kernel at D=128 spills 16 bytes)
