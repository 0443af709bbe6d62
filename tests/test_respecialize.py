"""Captured tensors rebound to another shape or dtype re-specialize the mod (as torch recompiles), never error."""

from __future__ import annotations

import pytest
import torch

import flexcomp as fc
from flexcomp import frontend
from flexcomp.errors import FlexcompTypeError, SignatureError

BACKENDS = ["reference", "triton"]

DOC = torch.zeros(8, dtype=torch.int32)  # document id of every position; rebound by the tests
BIAS = torch.zeros(2)  # a per-head bias; rebound by the tests
POS = torch.zeros(8, dtype=torch.int32)  # an index table; rebound to float by one test


@fc.mask_mod
def same_document(b, h, q_idx, kv_idx):
    return DOC[q_idx] == DOC[kv_idx]


@fc.score_mod
def head_bias(score, b, h, q_idx, kv_idx):
    return score + BIAS[h]


@fc.mask_mod
def causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


@fc.mask_mod
def document_causal(b, h, q_idx, kv_idx):  # a mod calling a mod that captures DOC
    return same_document(b, h, q_idx, kv_idx) & (q_idx >= kv_idx)


def make_alibi(heads: int):
    """A closure over a slopes tensor, and a setter that rebinds the cell (as a benchmark loop would)."""
    slopes = torch.rand(heads)

    @fc.score_mod
    def alibi(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx)

    def set_heads(n: int) -> torch.Tensor:
        nonlocal slopes
        slopes = torch.rand(n)
        return slopes

    return alibi, set_heads


def random_documents(length: int, rng: torch.Generator) -> torch.Tensor:
    starts = torch.rand(length, generator=rng) < 0.3
    starts[0] = True
    return (starts.cumsum(0) - 1).to(torch.int32)


def attend(backend, randn, *, H=2, L=8, **kw):
    q, k, v = (randn(1, H, L, 16) for _ in range(3))
    return (q, k, v), fc.flex_attention(q, k, v, backend=backend, return_lse=True, **kw)


def assert_matches(got, want):
    out, lse = got
    want_out, want_lse = want
    torch.testing.assert_close(out.double(), want_out, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse.double(), want_lse, atol=2e-5, rtol=2e-5)


@pytest.fixture
def rebind(monkeypatch):
    """rebind(NAME, tensor): set a module global for this test only."""
    return lambda name, value: monkeypatch.setitem(globals(), name, value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_global_rebound_to_a_longer_sequence(backend, rebind, rng, randn, naive_attention):
    for length in (8, 13, 8):  # back to the first shape: the cached variant
        docs = random_documents(length, rng)
        rebind("DOC", docs)
        (q, k, v), got = attend(backend, randn, L=length, mask_mod=same_document)
        assert_matches(got, naive_attention(q, k, v, mask_fn=lambda b, h, i, j, d=docs: d[i] == d[j]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_closure_rebound_to_more_heads(backend, randn, naive_attention):
    alibi, set_heads = make_alibi(2)
    for heads in (2, 4):
        slopes = set_heads(heads)
        (q, k, v), got = attend(backend, randn, H=heads, score_mod=alibi)
        want = naive_attention(q, k, v, score_fn=lambda s, b, h, i, j, m=slopes: s + m.double()[h] * (j - i))
        assert_matches(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_dtype_change_of_a_float_table(backend, rebind, randn, naive_attention):
    bias = torch.randn(2, dtype=torch.float64)
    rebind("BIAS", bias)  # float32 when compiled, float64 now: loaded and cast to the score's dtype
    (q, k, v), got = attend(backend, randn, score_mod=head_bias)
    assert_matches(got, naive_attention(q, k, v, score_fn=lambda s, b, h, i, j: s + bias[h]))
    assert head_bias.specialized().buffers[0].dtype == "float64"


def test_composed_masks_respecialize_their_parts(rebind, rng, randn, naive_attention):
    both = fc.and_masks(same_document, causal)
    for length in (8, 11):
        docs = random_documents(length, rng)
        rebind("DOC", docs)
        (q, k, v), got = attend("reference", randn, L=length, mask_mod=both)
        want = naive_attention(q, k, v, mask_fn=lambda b, h, i, j, d=docs: (d[i] == d[j]) & (i >= j))
        assert_matches(got, want)
        assert both.specialized().buffers[0].shape == (length,)


def test_mod_calling_a_mod_respecializes(rebind, rng, randn, naive_attention):
    docs = random_documents(12, rng)
    rebind("DOC", docs)
    (q, k, v), got = attend("reference", randn, L=12, mask_mod=document_causal)
    assert_matches(got, naive_attention(q, k, v, mask_fn=lambda b, h, i, j: (docs[i] == docs[j]) & (i >= j)))


def test_block_mask_built_after_rebinding(rebind, rng, randn, naive_attention):
    docs = random_documents(300, rng)
    rebind("DOC", docs)
    block_mask = fc.create_block_mask(same_document, None, None, 300, 300, device="cpu")
    assert block_mask.mask_mod.buffers[0].shape == (300,)
    dense = fc.create_mask(same_document, None, None, 300, 300, device="cpu")
    assert torch.equal(dense[0, 0], docs[:, None] == docs[None, :])
    (q, k, v), got = attend("reference", randn, L=300, block_mask=block_mask)
    assert_matches(got, naive_attention(q, k, v, mask_fn=lambda b, h, i, j: docs[i] == docs[j]))


def test_variants_are_cached_per_shape(rebind, rng, monkeypatch):
    lowered = []
    real_lower = frontend.lower_function
    monkeypatch.setattr(frontend, "lower_function", lambda fn, kind: lowered.append(fn) or real_lower(fn, kind))
    mod = fc.mask_mod(same_document.fn)  # a fresh Mod, compiled for DOC of length 8
    lowered.clear()
    variants = {}
    for length in (5, 9, 5, 9, 5):
        rebind("DOC", random_documents(length, rng))
        variants.setdefault(length, mod.specialized())
        assert mod.specialized() is variants[length]
        assert variants[length].buffers[0].shape == (length,)
    assert len(lowered) == 2  # one re-lowering per new shape (8 was the compiled one), none when alternating
    assert variants[5].key != variants[9].key != mod.key


def test_in_place_changes_need_no_new_mod(rng, randn, naive_attention):
    DOC.copy_(random_documents(8, rng))
    assert same_document.specialized() is same_document
    (q, k, v), got = attend("reference", randn, mask_mod=same_document)
    docs = DOC.clone()
    assert_matches(got, naive_attention(q, k, v, mask_fn=lambda b, h, i, j: docs[i] == docs[j]))


def test_rebound_to_a_non_tensor_is_refused(rebind, randn):
    rebind("DOC", [0, 0, 1, 1, 1, 2, 2, 2])
    with pytest.raises(SignatureError, match="'DOC', captured by mask_mod 'same_document' as a tensor, is now a list"):
        attend("reference", randn, mask_mod=same_document)


def position_of_position(score, b, h, q_idx, kv_idx):
    return score + TABLE[POS[q_idx]]  # POS indexes TABLE, so it must stay an integer tensor


TABLE = torch.randn(8)


def test_index_table_turned_float_gets_the_front_ends_type_error(rebind, randn):
    mod = fc.score_mod(position_of_position)
    rebind("POS", torch.rand(8))
    with pytest.raises(FlexcompTypeError, match="index into 'TABLE' must be an int, got f32") as info:
        attend("reference", randn, score_mod=mod)
    assert info.value.loc.line == position_of_position.__code__.co_firstlineno + 1


def test_stale_mod_tensors_say_how_to_respecialize(rebind):
    rebind("DOC", torch.zeros(9, dtype=torch.int32))
    with pytest.raises(SignatureError, match=r"changed after the mod was compiled.*same_document.specialized\(\)"):
        same_document.tensors()
