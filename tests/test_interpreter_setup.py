"""Triton's interpreter is decided when Triton is imported: the README's demo must run on a CPU machine whose
environment does not set it, and a process that turns it on too late gets a clear error, not one from inside Triton."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

ENV_WITHOUT_INTERPRETER = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def run_python(args: list[str], tmp_path) -> subprocess.CompletedProcess:
    env = {**ENV_WITHOUT_INTERPRETER, "FLEXCOMP_CACHE_DIR": str(tmp_path / "cache")}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=600, check=False)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="on a GPU the demo runs compiled kernels")
def test_readme_demo_runs_without_the_interpreter_in_the_environment(tmp_path) -> None:
    run = run_python(["-m", "flexcomp.demo", "--length", "64"], tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    table = run.stdout[run.stdout.index("Triton kernel vs reference"):]
    assert table.count("  ok") == 5, table


def test_interpreter_turned_on_after_import_is_a_clear_error(tmp_path) -> None:
    script = tmp_path / "late.py"
    script.write_text(textwrap.dedent("""
        import os
        import torch
        import flexcomp as fc
        import triton  # imported with the interpreter off
        os.environ["TRITON_INTERPRET"] = "1"  # too late for Triton's own library

        DOCS = torch.tensor([0] * 40 + [1] * 24)

        def document(b, h, q_idx, kv_idx):
            return DOCS[q_idx] == DOCS[kv_idx]

        mask = fc.create_block_mask(document, 1, 1, 64, 64, device="cpu", BLOCK_SIZE=16)  # tables by torch ops
        q = torch.randn(1, 2, 64, 16)
        reference = fc.flex_attention(q, q, q, block_mask=mask, backend="reference")
        assert reference.isfinite().all()
        try:
            fc.flex_attention(q, q, q, block_mask=mask, backend="triton")
        except fc.FlexcompError as e:
            print("REFUSED:", e)
    """))
    run = run_python([str(script)], tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "REFUSED:" in run.stdout and "set after Triton was imported" in run.stdout, run.stdout


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="on a GPU the example runs compiled kernels")
def test_an_example_with_triton_runs_without_the_interpreter_in_the_environment(tmp_path) -> None:
    example = os.path.join(os.path.dirname(__file__), "..", "examples", "alibi.py")
    run = run_python([example, "--triton", "--quiet"], tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "ok   backend=triton" in run.stdout, run.stdout
