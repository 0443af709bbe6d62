"""kernel_options={"BACKEND": "GLUON"} (codegen/gluon/dispatch.py) where the Gluon kernel cannot run: the call takes
the Triton kernel, its result equals the float64 reference, and FLEXCOMP_DEBUG=1 says why.  Also the mods' Gluon
text (codegen/gluon/mods.py), which needs no Gluon to render.  No GPU: the Triton interpreter."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
from flexcomp.codegen.forward import NOOP_MASK
from flexcomp.codegen.gluon.dispatch import why_not_gluon
from flexcomp.codegen.gluon.mods import gluon_mods_source
from naive import assert_close_to_reference as check

import flexcomp as fc

GLUON = {"BACKEND": "GLUON"}


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("FLEXCOMP_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "flexcomp-cache"))


@fc.mask_mod
def sliding_window(b, h, q_idx, kv_idx):
    return (q_idx >= kv_idx) & (q_idx - kv_idx <= 20)


@fc.score_mod
def softcap(score, b, h, q_idx, kv_idx):
    return 3.0 * torch.tanh(score / 3.0)


def test_backend_gluon_on_the_interpreter_runs_triton_says_why_and_is_right(randn, naive_attention, capfd, monkeypatch):
    monkeypatch.setenv("FLEXCOMP_DEBUG", "1")
    q, k, v = randn(1, 2, 48, 16), randn(1, 2, 48, 16), randn(1, 2, 48, 16)
    block_mask = fc.create_block_mask(sliding_window, 1, 1, 48, 48, device="cpu", BLOCK_SIZE=32)
    out, lse = fc.flex_attention(
        q, k, v, softcap, block_mask=block_mask, kernel_options=GLUON, return_lse=True, backend="triton"
    )
    check(out, lse, *naive_attention(q, k, v, score_fn=softcap.fn, mask_fn=sliding_window.fn))
    assert (
        "BACKEND='GLUON': the Triton kernel runs this call: the Gluon kernel runs on CUDA only"
        in capfd.readouterr().err
    )


def test_why_not_gluon_names_the_first_rule_that_fails(randn):
    q = randn(1, 1, 128, 64)
    assert "CUDA only (q on cpu" in why_not_gluon(q, q, q, None, None, False)


class _Mask:  # the two fields of a block mask the mod rules read
    def __init__(self, mask_mod, bounds):
        self.mask_mod, self.bounds = mask_mod, bounds


def test_the_mod_rules_refuse_captured_tensors_and_masks_without_bounds(monkeypatch):
    from flexcomp.codegen.gluon import dispatch

    doc = torch.tensor([0] * 64 + [1] * 64)
    document = fc.mask_mod(lambda b, h, q_idx, kv_idx: doc[q_idx] == doc[kv_idx])
    assert "capture tensors" in dispatch._why_not_mods(None, _Mask(document, object()))
    assert "no closed-form bounds" in dispatch._why_not_mods(None, _Mask(sliding_window, None))
    assert dispatch._why_not_mods(softcap, _Mask(sliding_window, object())) == ""
    assert dispatch._why_not_mods(softcap, None) == ""


def test_backend_gluon_is_a_known_kernel_option():
    with pytest.raises(ValueError, match="Invalid BACKEND"):
        fc.flex_attention(*(torch.randn(1, 1, 16, 16) for _ in range(3)), kernel_options={"BACKEND": "GLUONS"})


@pytest.mark.parametrize("score, mask", [(softcap, sliding_window), (None, NOOP_MASK)])
def test_the_gluon_text_is_the_triton_renderings_with_gluon_decorators(score, mask):
    bounds = fc.create_block_mask(mask.fn, 1, 1, 64, 64, device="cpu").bounds if mask is not NOOP_MASK else None
    text = gluon_mods_source(score, mask, bounds)
    compile(text, "gluon_mods.py", "exec")  # valid Python
    assert "@triton.jit" not in text and "@gluon.jit\ndef gluon_mask(" in text
    assert "from triton.experimental.gluon import language as tl" in text
    if score is not None:
        assert "tanh_approx(" in text.split("def score_mod(")[1].split("@gluon.jit")[0]  # softcap's tanh on the MUFU
