"""benchmarks/gpu_sweep.py on the CPU (its smoke mode): a float32 ALiBi backward case is judged, captured gradients
included, so the sweep the GPU runs cannot rot between device sessions."""

import json
import os
import subprocess
import sys
from pathlib import Path

SWEEP = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu_sweep.py"


def test_a_float32_alibi_backward_case_passes_on_the_interpreter():
    case = {"B": 1, "D": 32, "Dv": 16, "Hkv": 1, "Lkv": 100, "Lq": 5, "backward": True, "dtype": "float32", "gqa": 2,
            "mask": "causal", "options": None, "pad": 0, "score": "alibi", "seed": 11}  # fmt: skip
    env = dict(os.environ, SWEEP_DEVICE="cpu", TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, str(SWEEP), "--replay", json.dumps(case), "--workers", "1"],
                         capture_output=True, text=True, env=env, timeout=600, check=False)  # fmt: skip
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "dslopes=" in run.stdout and "1/1 cases passed" in run.stdout
