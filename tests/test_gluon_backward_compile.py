"""The Gluon Hopper backward (codegen/gluon/backward.py) compiles for sm_90 with the Triton it was written for.

Gluon's API moves between Triton releases; the kernels target 3.6 (the GPU image's).  Elsewhere (CI runs 3.9)
the test is skipped.  No GPU needed: benchmarks/gluon_backward.py --compile-only compiles ahead of time.
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


def test_preprocess_dkdv_and_dq_kernels_compile_for_sm90_with_async_wgmma():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile for real, not interpret
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gluon_backward.py"), "--compile-only"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    lines = [line for line in run.stdout.splitlines() if " D=" in line]
    assert sum(" preprocess " in line for line in lines) == 2, run.stdout  # D=64 and 128
    for kernel in ("dkdv", "dq"):  # every run at D=64/128, causal or not
        assert sum(f" {kernel} D=" in line for line in lines) == 8, run.stdout
    for line in lines:
        assert "FAILED" not in line, line
        if " preprocess " in line:
            continue
        # the dK/dV kernel issues S^T, dP^T, dV, dK per step (the dQ kernel S, dP, dQ), in two loops when causal
        assert int(re.search(r"wgmma.mma_async (\d+)", line).group(1)) > 0, line
        assert "wgmma async" in line, line  # ptxas kept the wgmmas asynchronous (no C7514: all retire in the step)
        if line.startswith("default ") and "dkdv D=128 causal" not in line:
            assert "spill st/ld ('0', '0')" in line, line  # (the causal dK/dV kernel at D=128 spills 16 bytes)
