"""return_aux=AuxRequest(max_scores=True) on the generated kernels (Triton's interpreter): each row's largest score
after score_mod and mask, as torch's flex_attention returns it, against float64 attention; -inf on fully masked
rows; not differentiable; the gradients unchanged; under torch.compile too."""

from __future__ import annotations

import pytest
import torch
from naive import naive_attention

import flexcomp as fc

SMALL = {"BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 4, "num_stages": 1,
         "BLOCK_M1": 16, "BLOCK_N1": 16, "BLOCK_M2": 16, "BLOCK_N2": 16}  # fmt: skip
BOTH = fc.api.AuxRequest(lse=True, max_scores=True)
DOC = torch.tensor([0] * 11 + [1] * 20 + [2] * 22)  # document ids of 53 positions (rebound per test)


def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def strictly_before(b, h, q_idx, kv_idx):  # row 0 sees nothing: max -inf, out 0
    return q_idx > kv_idx


def same_doc(b, h, q_idx, kv_idx):
    return DOC[q_idx] == DOC[kv_idx]


def alibi(score, b, h, q_idx, kv_idx):
    return score + (kv_idx - q_idx) * 0.125 * (h + 1)


def softcap(score, b, h, q_idx, kv_idx):
    return 5.0 * torch.tanh(score / 5.0)


CASES = {  # name -> (score_mod, mask_mod)
    "dense": (None, None),  # scale folded into the exp2 (FOLD_SCALE): the max is rescaled
    "causal alibi": (alibi, causal),  # closed-form bounds
    "empty rows softcap": (softcap, strictly_before),
    "documents": (alibi, same_doc),  # tables walked (a captured tensor)
}


def attend(q, k, v, case, **kwargs):
    score_mod, mask_mod = CASES[case]
    return fc.flex_attention(q, k, v, score_mod=score_mod, mask_mod=mask_mod, backend="triton",
                             kernel_options=SMALL, return_aux=BOTH, **kwargs)  # fmt: skip


def expected(q, k, v, case, enable_gqa=False):
    score_mod, mask_mod = CASES[case]
    return naive_attention(q, k, v, score_mod, mask_mod, enable_gqa=enable_gqa, return_max=True)


def assert_max_close(got, want, atol):
    """The same fully masked rows (-inf), never NaN, finite maxima close."""
    assert got.dtype == torch.float32 and not got.isnan().any()
    finite = want.isfinite()
    assert torch.equal(got.isfinite(), finite) and (got[~finite] == -torch.inf).all()
    torch.testing.assert_close(got.double()[finite], want[finite], atol=atol, rtol=atol)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_max_scores_against_float64(case, dtype, randn):
    q, k, v = (randn(2, 3, 37 if name == "q" else 53, 16, dtype=dtype) for name in "qkv")
    out, aux = attend(q, k, v, case)
    want_out, want_lse, want_max = expected(q, k, v, case)
    assert_max_close(aux.max_scores, want_max, atol=1e-5)
    torch.testing.assert_close(aux.lse.double()[want_lse.isfinite()], want_lse[want_lse.isfinite()], atol=1e-4,
                               rtol=1e-4)  # fmt: skip
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.double(), want_out, atol=tol, rtol=tol)


def test_gqa_and_rows_the_kernels_pad(randn):
    """Grouped query heads, and float16 rows of 20 elements (read through zero-padded copies: autograd.pad_rows)."""
    q = randn(1, 4, 29, 20, dtype=torch.float16)
    k, v = (randn(1, 2, 29, 20, dtype=torch.float16) for _ in range(2))
    _, aux = attend(q, k, v, "causal alibi", enable_gqa=True)
    assert_max_close(aux.max_scores, expected(q, k, v, "causal alibi", enable_gqa=True)[2], atol=1e-4)


def test_a_decoding_shape_runs_the_forward_kernel(randn):
    """One query row would take the decode kernel, which writes no max: the forward kernel runs instead, and
    forcing the decode kernel says why it cannot."""
    q, k, v = randn(2, 4, 1, 16), randn(2, 4, 64, 16), randn(2, 4, 64, 16)
    _, aux = fc.flex_attention(q, k, v, score_mod=alibi, return_aux=BOTH, backend="triton")
    assert_max_close(aux.max_scores, naive_attention(q, k, v, alibi, return_max=True)[2], atol=1e-5)
    with pytest.raises(ValueError, match="max_scores"):
        fc.flex_attention(q, k, v, return_aux=BOTH, backend="triton", kernel_options={"BACKEND": "TRITON_DECODE"})


def test_not_differentiable_and_gradients_unchanged(randn):
    q, k, v = (randn(1, 2, 40, 16, requires_grad=True) for _ in range(3))
    slopes = randn(2, requires_grad=True)

    @fc.score_mod
    def learned(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx) * 0.1

    grads = []
    for request in (fc.api.AuxRequest(lse=True), BOTH):
        out, aux = fc.flex_attention(q, k, v, score_mod=learned, mask_mod=causal, backend="triton",
                                     kernel_options=SMALL, return_aux=request)  # fmt: skip
        if request.max_scores:
            assert not aux.max_scores.requires_grad
        grads.append(torch.autograd.grad((out.square().sum() + aux.lse.sum()), (q, k, v, slopes)))
    for with_max, without in zip(*grads):  # without max, 40 rows decode: another kernel, rounded otherwise
        torch.testing.assert_close(with_max, without, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_under_torch_compile(backend, randn):
    q, k, v = (randn(2, 2, 48, 16, requires_grad=True) for _ in range(3))
    block_mask = fc.create_block_mask(causal, None, None, 48, 48, device="cpu", BLOCK_SIZE=16)

    def attention(q, k, v):
        options = SMALL if backend == "triton" else None
        return fc.flex_attention(q, k, v, score_mod=alibi, block_mask=block_mask, return_aux=BOTH, backend=backend,
                                 kernel_options=options)  # fmt: skip

    out, aux = torch.compile(attention, fullgraph=True, backend="aot_eager")(q, k, v)
    want_out, want_lse, want_max = naive_attention(q, k, v, alibi, causal, return_max=True)
    assert_max_close(aux.max_scores, want_max, atol=1e-5)
    assert not aux.max_scores.requires_grad and aux.lse.requires_grad
    torch.testing.assert_close(out.double(), want_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(aux.lse.double(), want_lse, atol=1e-5, rtol=1e-5)
    eager = torch.autograd.grad(attention(q, k, v)[0].sum(), (q, k, v))
    for got, want in zip(torch.autograd.grad(out.sum(), (q, k, v)), eager):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
