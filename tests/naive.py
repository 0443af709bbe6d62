"""Dense float64 attention, written without flexcomp: the oracle for every test (small shapes only)."""

from __future__ import annotations

import math

import torch


def naive_attention(q, k, v, score_fn=None, mask_fn=None, scale=None, enable_gqa=False, dense_mask=None,
                    return_max=False):
    """(out, lse) of softmax(score_fn(q k^T * scale) masked by mask_fn) @ v, in float64; with `return_max` also
    each row's largest masked score (torch's return_aux max_scores).

    `score_fn(score, b, h, q_idx, kv_idx)` and `mask_fn(b, h, q_idx, kv_idx)` are plain
    callables on broadcast int64 index tensors.  `dense_mask` ([B or 1, H or 1, Lq, Lkv] bool)
    replaces `mask_fn` when given.  A fully masked row gives out 0, lse -inf and max -inf.
    """
    B, Hq, Lq, D = q.shape
    Hkv, Lkv = k.shape[1], k.shape[2]
    if enable_gqa:
        k = k.repeat_interleave(Hq // Hkv, dim=1)
        v = v.repeat_interleave(Hq // Hkv, dim=1)
    scale = 1 / math.sqrt(D) if scale is None else scale
    s = torch.einsum("bhqd,bhkd->bhqk", q.double(), k.double()) * scale
    b = torch.arange(B).view(B, 1, 1, 1)
    h = torch.arange(Hq).view(1, Hq, 1, 1)
    qi = torch.arange(Lq).view(1, 1, Lq, 1)
    ki = torch.arange(Lkv).view(1, 1, 1, Lkv)
    if score_fn is not None:
        s = score_fn(s, b, h, qi, ki).double().expand(B, Hq, Lq, Lkv)
    keep = torch.ones(B, Hq, Lq, Lkv, dtype=torch.bool)
    if dense_mask is not None:
        keep = keep & dense_mask
    elif mask_fn is not None:
        keep = keep & mask_fn(b, h, qi, ki)
    s = s.masked_fill(~keep, -math.inf)
    lse = torch.logsumexp(s, dim=-1)
    weights = torch.exp(s - torch.where(lse.isinf(), 0.0, lse)[..., None])
    out = weights @ v.double()
    return (out, lse, s.amax(-1)) if return_max else (out, lse)


def assert_close_to_reference(out, lse, ref_out, ref_lse, atol=2e-5):
    """A kernel's (out, lse) against the float64 reference's: no NaN, the same fully masked rows, values close."""
    assert not out.isnan().any() and not lse.isnan().any()
    torch.testing.assert_close(out.double(), ref_out, atol=atol, rtol=atol)
    finite = ref_lse.isfinite()
    assert torch.equal(lse.isfinite(), finite)
    torch.testing.assert_close(lse.double()[finite], ref_lse[finite], atol=atol, rtol=atol)
