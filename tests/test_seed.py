"""The test seed: printed where `pytest -q` shows it, and the same on every xdist worker (issue 16, part 4)."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

PROBE = '''
import os


def test_{i}(rng):
    with open(os.path.join(os.path.dirname(__file__), "seeds", "{i}"), "w") as f:
        f.write(str(rng.initial_seed()))
'''


def run_probe(tmp_path: Path, *args: str, env: dict | None = None) -> tuple[str, list[int]]:
    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    for i in range(4):
        (tmp_path / f"test_probe_{i}.py").write_text(PROBE.format(i=i))
    out = tmp_path / "seeds"
    out.mkdir()
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args, str(tmp_path)],
                            capture_output=True, text=True, cwd=tmp_path, check=False,
                            env={**os.environ, **(env or {})}, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout, [int((out / str(i)).read_text()) for i in range(4)]


def test_quiet_xdist_run_prints_the_seed_every_worker_used(tmp_path):
    stdout, seeds = run_probe(tmp_path, "-n", "2")
    printed = re.search(r"FLEXCOMP_TEST_SEED=(\d+)", stdout)
    assert printed, stdout
    # each test's generator is derived from the session seed and its id: replaying the printed seed gives the same
    replay = tmp_path / "replay"
    replay.mkdir()
    _, replayed = run_probe(replay, env={"FLEXCOMP_TEST_SEED": printed.group(1)})
    assert replayed == seeds
