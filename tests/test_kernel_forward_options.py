"""The forward kernel's A/B switch kernel_options FOLD_SCALE, under Triton's interpreter: each setting against
the float64 oracle, and the two paths against each other."""

from __future__ import annotations

import math
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
from flexcomp.codegen import flex_forward
from flexcomp.codegen.forward import fold_scale
from naive import assert_close_to_reference as check

import flexcomp as fc

SMALL = {"BLOCK_M": 16, "BLOCK_N": 16}  # two kernel tiles per 32-wide sparse block


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("FLEXCOMP_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "flexcomp-cache"))


@fc.mask_mod
def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


@fc.mask_mod
def sliding_window(b, h, q_idx, kv_idx):
    return (q_idx >= kv_idx) & (q_idx - kv_idx <= 20)


DOC_IDS = torch.tensor([0] * 13 + [1] * 30 + [2] * 7 + [3] * 25)


@fc.mask_mod
def document_causal(b, h, q_idx, kv_idx):
    return (DOC_IDS[q_idx] == DOC_IDS[kv_idx]) & (q_idx >= kv_idx)


@fc.mask_mod
def starts_at_20(b, h, q_idx, kv_idx):
    return (q_idx >= 20) & (kv_idx <= q_idx)


@fc.score_mod
def softcap(score, b, h, q_idx, kv_idx):
    return 3.0 * torch.tanh(score / 3.0)


def run(q, k, v, mask=None, score=None, scale=None, **options):
    lq, lkv = q.shape[-2], k.shape[-2]
    block_mask = fc.create_block_mask(mask, 1, 1, lq, lkv, device="cpu", BLOCK_SIZE=32) if mask else None
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return flex_forward(q, k, v, score, block_mask, scale, False, True, {**SMALL, **options})


# (mask, Lq, Lkv): closed-form bounds (causal, window), table walk (document), ragged lengths everywhere
CASES = [(None, 37, 53), (causal, 45, 45), (sliding_window, 50, 70), (document_causal, 75, 75)]


@pytest.mark.parametrize("mask, lq, lkv", CASES, ids=lambda x: getattr(x, "name", str(x)))
def test_fold_scale_against_float64_and_unfolded(randn, naive_attention, mask, lq, lkv):
    q, k, v = randn(2, 2, lq, 16), randn(2, 2, lkv, 16), randn(2, 2, lkv, 16)
    scale = 0.2 + torch.rand(1, generator=torch.Generator().manual_seed(lq)).item()
    folded = run(q, k, v, mask, scale=scale, FOLD_SCALE=True)
    plain = run(q, k, v, mask, scale=scale, FOLD_SCALE=False)
    check(*folded, *naive_attention(q, k, v, mask_fn=mask.fn if mask else None, scale=scale))
    # the interpreter has no FMA: qk * c - m rounds twice on both paths, and max(qk) * c == max(qk * c)
    # for c > 0 (rounding is monotone), so the two paths agree bit for bit there (on the GPU the fold's
    # FFMA rounds once: closer to float64, not equal)
    assert torch.equal(folded[0], plain[0]) and torch.equal(folded[1], plain[1])


@pytest.mark.parametrize("fold", [False, True])
def test_fully_masked_rows_with_and_without_fold(randn, naive_attention, fold):
    q, k, v = randn(1, 2, 40, 16), randn(1, 2, 40, 16), randn(1, 2, 40, 16)
    out, lse = run(q, k, v, starts_at_20, FOLD_SCALE=fold)
    assert torch.equal(out[:, :, :20], torch.zeros(1, 2, 20, 16))
    assert torch.isneginf(lse[:, :, :20]).all()
    check(out, lse, *naive_attention(q, k, v, mask_fn=starts_at_20.fn))


@pytest.mark.parametrize("scale", [0.0, -0.3, 0.25])
def test_scales_the_fold_must_not_take(randn, naive_attention, scale):
    # c <= 0 breaks max(qk) * c == max(qk * c): the host keeps the unfolded path
    q, k, v = randn(1, 1, 33, 16), randn(1, 1, 33, 16), randn(1, 1, 33, 16)
    check(*run(q, k, v, causal, scale=scale), *naive_attention(q, k, v, mask_fn=causal.fn, scale=scale))


def test_fold_scale_host_rule():
    assert fold_scale(None, 0.125, None) and fold_scale(None, 0.125, {"FOLD_SCALE": True})
    assert not fold_scale(None, 0.125, {"FOLD_SCALE": False})
    assert not fold_scale(softcap, 0.125, None)  # the mod needs the scaled score
    for bad in (0.0, -0.125, math.inf, math.nan):
        assert not fold_scale(None, bad, None), bad


@pytest.mark.parametrize("mask, score", [(causal, None), (document_causal, softcap)], ids=["causal", "doc-softcap"])
def test_fold_scale_through_the_api(randn, naive_attention, mask, score):
    # torch-style prefixed key; with a score_mod the switch changes nothing (the mod needs the scaled score)
    q, k, v = randn(1, 2, 75, 16), randn(1, 2, 75, 16), randn(1, 2, 75, 16)
    block_mask = fc.create_block_mask(mask, 1, 1, 75, 75, device="cpu", BLOCK_SIZE=32)
    out, lse = fc.flex_attention(q, k, v, score_mod=score, block_mask=block_mask, return_lse=True,
                                 kernel_options={**SMALL, "fwd_FOLD_SCALE": False})
    check(out, lse, *naive_attention(q, k, v, score.fn if score else None, mask.fn))
