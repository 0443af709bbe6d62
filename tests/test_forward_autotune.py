"""Forward autotuning (interpreter): the winner is timed once, written to the cache dir, then reused."""

from __future__ import annotations

import json
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch
from flexcomp.codegen import autotune

import flexcomp as fc


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def test_autotune_times_once_and_remembers(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FLEXCOMP_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(autotune, "BLOCKS_M", (16,))
    monkeypatch.setattr(autotune, "BLOCKS_N", (16, 32))
    monkeypatch.setattr(autotune, "WARPS", (4,))
    monkeypatch.setattr(autotune, "STAGES", (2,))
    bm = fc.create_block_mask(causal, 1, 1, 64, 64, device="cpu", BLOCK_SIZE=32)
    q, k, v = (torch.randn(1, 2, 64, 16, dtype=torch.float64).float() for _ in range(3))
    out = fc.flex_attention(q, k, v, block_mask=bm, backend="triton", kernel_options={"autotune": True})
    scores = (q.double() @ k.double().transpose(-1, -2)) / 4.0
    scores = scores.masked_fill(~torch.ones(64, 64, dtype=torch.bool).tril(), float("-inf"))
    expected = torch.softmax(scores, -1) @ v.double()
    assert (out.double() - expected).abs().max() < 1e-4
    progress = capsys.readouterr().err
    assert "[2/2]" in progress and "chose" in progress
    (entry,) = json.loads((tmp_path / "autotune_forward.json").read_text()).values()
    assert entry["block_m"] == 16 and entry["block_n"] in (16, 32)

    fc.flex_attention(q, k, v, block_mask=bm, backend="triton", kernel_options={"autotune": True})
    assert "flexcomp autotune" not in capsys.readouterr().err  # read from disk, not timed again


def test_candidates_respect_the_block_mask_and_shared_memory():
    configs = autotune.candidates(16, 128, (128, 128))
    assert configs and all(128 % c.block_m == 0 and 128 % c.block_n == 0 for c in configs)
    assert all(autotune.keep(c, 16, 128, (128, 128)) for c in configs)
    assert not autotune.keep(autotune.LaunchConfig(128, 128, 8, 4), 16, 256, (128, 128))  # 4 stages of 128x256
    assert all(c.block_n <= 64 for c in autotune.candidates(16, 128, (64, 64)))


def test_tma_is_a_config_axis_only_where_possible():
    plain = autotune.candidates(16, 64, (128, 128))
    both = autotune.candidates(16, 64, (128, 128), tma=True)
    assert not any(c.use_tma for c in plain)
    assert {c for c in both if not c.use_tma} == set(plain)
    assert {autotune.LaunchConfig(c.block_m, c.block_n, c.num_warps, c.num_stages) for c in both if c.use_tma} == set(plain)
    # tables written before the axis existed still load (no use_tma key: pointer loads)
    old_entry = json.loads('{"block_m": 128, "block_n": 64, "num_warps": 8, "num_stages": 3}')
    assert autotune.LaunchConfig(**old_entry).use_tma is False


def test_use_tma_option_reaches_the_config():
    from flexcomp.codegen.forward import choose_config

    q = torch.randn(1, 1, 256, 64, dtype=torch.bfloat16)
    assert choose_config(q.dtype, q.shape[-1], (128, 128), {"USE_TMA": True}).use_tma
    assert not choose_config(q.dtype, q.shape[-1], (128, 128), None).use_tma
    assert choose_config(q.dtype, q.shape[-1], (128, 128), {"USE_TMA": True}, autotune.LaunchConfig(64, 64, 4, 3)).use_tma


def test_default_config_for_score_mods_at_small_head_dims():
    from flexcomp.codegen.autotune import LaunchConfig
    from flexcomp.codegen.forward import default_config

    assert default_config(torch.bfloat16, 64, score_mod=True) == LaunchConfig(128, 64, 4, 3)
    assert default_config(torch.bfloat16, 64) == LaunchConfig(128, 64, 8, 3)
    assert default_config(torch.bfloat16, 64, sparse=True, score_mod=True) == default_config(torch.bfloat16, 64, sparse=True)
    assert default_config(torch.bfloat16, 128, score_mod=True) == default_config(torch.bfloat16, 128)
