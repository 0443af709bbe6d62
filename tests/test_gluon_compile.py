"""The Gluon Hopper forward (codegen/gluon/attention.py) compiles for sm_90 with the Triton it was written for.

Gluon's API moves between Triton releases; the kernels target 3.6 (the GPU image's).  Elsewhere (CI runs 3.9)
the test is skipped.  No GPU needed: benchmarks/gluon_attention.py --compile-only compiles ahead of time.
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


def test_every_version_and_rendered_variant_compiles_for_sm90_and_the_defaults_keep_wgmma_async_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile for real, not interpret
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gluon_attention.py"), "--compile-only"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    lines = [line for line in run.stdout.splitlines() if " D=" in line]
    assert len(lines) >= 8, run.stdout  # the default runs (B and its A/B overrides) at D=64/128, causal or not
    for variant in ("sliding window", "alibi causal", "softcap"):  # mods rendered into B (codegen/gluon/mods.py)
        assert sum(f"B {variant} D=" in line for line in lines) == 2, run.stdout  # D=64 and 128
    for line in lines:
        assert "FAILED" not in line, line
        assert int(re.search(r"wgmma.mma_async (\d+)", line).group(1)) > 0, line
        if ":" not in line.split(" D=")[0]:  # a default tile config, not an A/B override
            assert "spill st/ld ('0', '0')" in line, line
            assert "wgmma async" in line, line  # ptxas did not serialize the wgmmas (the kernels' whole point)
