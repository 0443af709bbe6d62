"""`python -m flexcomp show|viz`: text and JSON output, the PNG, and errors in the user's file."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from flexcomp.cli import main

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flexcomp", *args], check=False, capture_output=True, text=True,
                          timeout=300)


def test_show_text_lists_ir_tiles_and_kernel(capsys):
    assert main(["show", str(EXAMPLES / "sliding_window.py"), "--q-len", "1024", "--block-size", "128"]) == 0
    out = capsys.readouterr().out
    assert "-- parsed IR" in out and "-- optimized IR" in out
    assert "const 256 : i32" in out  # the window, folded in as a constant
    # causal & window 256 at 8 x 8 tiles of 128: 8 diagonal + 6 window-edge tiles partial, 7 full (one tile behind the diagonal), the rest empty
    assert "EMPTY 43  PARTIAL 14  FULL 7" in out
    assert "@triton.jit" in out


def test_show_json_counts_tiles(capsys):
    assert main(["show", f"{EXAMPLES / 'causal.py'}:causal", "--json", "--q-len", "512", "--block-size", "128",
                 "--no-kernel"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [m["name"] for m in report["mods"]] == ["causal"]
    assert "ge" in report["mods"][0]["ir"]
    # causal at 4 x 4 tiles: 6 above the diagonal empty, 4 diagonal partial, 6 below full
    assert report["tiles"]["counts"] == {"EMPTY": 6, "PARTIAL": 4, "FULL": 6}
    assert report["kernel_source"] is None
    assert sum(report["tiles"]["decided_by"].values()) == 16  # every tile decided, by some method


def test_show_picks_captured_buffers(capsys):
    assert main(["show", str(EXAMPLES / "moba.py"), "--json", "--no-kernel"]) == 0
    report = json.loads(capsys.readouterr().out)
    buffers = {b["name"]: b for m in report["mods"] for b in m["buffers"]}
    assert buffers["gate"]["dtype"] == "bool" and buffers["gate"]["shape"] == [2, 16, 16]


def test_viz_writes_a_png(tmp_path):
    output = tmp_path / "mask.png"
    result = run_cli("viz", str(EXAMPLES / "streaming_llm.py"), "--q-len", "1024", "-o", str(output))
    assert result.returncode == 0, result.stderr
    data = output.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert 600 <= width <= 2000 and 300 <= height <= 1200, (width, height)


BAD_MOD = """\
import flexcomp as fc


@fc.mask_mod
def bad(b, h, q_idx, kv_idx):
    return (lambda x: x)(q_idx) >= kv_idx
"""


def test_error_in_user_file_exits_2_with_caret(tmp_path):
    path = tmp_path / "bad_mod.py"
    path.write_text(BAD_MOD)
    result = run_cli("show", str(path))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "lambda" in result.stderr and f'File "{path}", line 6' in result.stderr
    assert "^" in result.stderr


@pytest.mark.parametrize("target, message", [("missing.py", "no such file"), ("causal.py:nope", "no mod named nope")])
def test_bad_target_exits_2(target, message, capsys):
    path, _, name = target.partition(":")
    arg = str(EXAMPLES / path) + (f":{name}" if name else "")
    assert main(["show", arg]) == 2
    assert message in capsys.readouterr().err


def test_file_without_mods_exits_2(tmp_path, capsys):
    path = tmp_path / "plain.py"
    path.write_text(textwrap.dedent("X = 1\n"))
    assert main(["show", str(path)]) == 2
    assert "no score_mod or mask_mod" in capsys.readouterr().err
