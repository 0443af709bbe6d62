"""The atomic-dQ backward (kernel_options BACKWARD_DQ="atomic"): the dK/dV kernel adds dS K into a float32 dQ
buffer and scatters the captured tensors' gradients; the dQ kernel does not run.

Same harness as tests/test_kernel_backward.py (Triton interpreter, float64 autograd of naive attention);
each case also checks which kernels ran, so a silent fallback to the separate scheme fails.
"""

from __future__ import annotations

import pytest
import torch
from flexcomp.codegen import backward
from flexcomp.codegen.backward import kernel_source_backward
from test_kernel_backward import (
    EVEN_CASES,
    SMALL_TILES,
    alibi_window_case,
    assert_flags,
    causal_mask,
    compare,
    even_lengths_case,
    recorded_launches,
    relative_bias_case,
)

import flexcomp as fc
from flexcomp.autograd import triton_flex_attention

ATOMIC = {**SMALL_TILES, "BACKWARD_DQ": "atomic"}


@pytest.fixture
def launches(monkeypatch) -> list[tuple[str, dict]]:
    """(kernel name, its constexpr keyword arguments) of every backward launch."""
    return recorded_launches(monkeypatch)


def assert_atomic_ran(launches) -> None:
    names = [name for name, _ in launches]
    assert "dq" not in names and names.count("dkdv") == 1, names
    assert all(kwargs["ATOMIC_DQ"] for name, kwargs in launches if name == "dkdv")


def causal_case() -> dict:
    return {"mask": causal_mask(), "mask_fn": lambda b, h, i, j: i >= j}


def test_causal_ragged_batched(randn, launches):
    compare(randn, shapes=((2, 2), (45, 45), (16, 16)), **causal_case(), B=2, options=ATOMIC)
    assert_atomic_ran(launches)


def test_no_mask_cross_lengths_with_lse_gradient(randn, launches):
    compare(randn, shapes=((2, 2), (21, 50), (16, 32)), use_lse=True, options=ATOMIC)
    assert_atomic_ran(launches)


def test_learnable_softcap_scattered_from_the_dkdv_kernel(randn, launches):
    cap = (randn(2).abs() + 2).requires_grad_()

    @fc.score_mod
    def softcap(score, b, h, q_idx, kv_idx):
        return cap[h] * torch.tanh(score / cap[h])

    compare(randn, shapes=((2, 2), (21, 29), (16, 16)), score_mod=softcap, use_lse=True, options=ATOMIC,
            score_fn=lambda s, b, h, i, j, t: t[h] * torch.tanh(s / t[h]), tables=(cap,))
    assert_atomic_ran(launches)


def test_relative_bias_read_along_both_tile_axes(randn, launches):
    """bias[h, q - kv] varies along both tile axes, bias[h, kv // 3] along kv only: both of scatter_captured_kv's
    reductions, on the dK/dV kernel's [kv, q] tiles."""
    bias, case = relative_bias_case(randn)
    compare(randn, **case, tables=(bias,), options=ATOMIC)
    assert_atomic_ran(launches)


def test_learnable_alibi_gqa_window(randn, launches):
    """GQA: the kv program adds into the dQ rows of every q head of its group."""
    slopes, case = alibi_window_case(randn)
    compare(randn, **case, tables=(slopes,), options=ATOMIC)
    assert_atomic_ran(launches)


def test_head_dim_192_value_dim_128_ragged_causal(randn, launches):
    compare(randn, shapes=((2, 2), (33, 33), (192, 128)), **causal_case(), options=ATOMIC)
    assert_atomic_ran(launches)


def test_fully_masked_rows_get_exact_zeros(randn, launches):
    @fc.mask_mod
    def late_causal(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx >= 20)

    ours, _ = compare(randn, shapes=((1, 1), (40, 40), (16, 16)), mask=late_causal,
                      mask_fn=lambda b, h, i, j: (i >= j) & (i >= 20), options=ATOMIC)
    assert ours[0].grad[:, :, :20].abs().max() == 0
    assert_atomic_ran(launches)


def test_half_precision_gqa_causal_lse(randn, launches):
    compare(randn, shapes=((2, 1), (32, 32), (16, 32)), **causal_case(), enable_gqa=True, use_lse=True,
            dtype=torch.float16, block=32, options={**ATOMIC, "BLOCK_N1": 32})
    assert_atomic_ran(launches)


def gradients(randn, options) -> list[torch.Tensor]:
    q, k, v, grad_out = (randn(1, 2, 37, 16) for _ in range(4))
    leaves = [t.requires_grad_() for t in (q, k, v)]
    out, _ = triton_flex_attention(*leaves, None, None, None, False, False, options)
    return torch.autograd.grad(out, leaves, grad_out)


def test_dk_dv_are_the_separate_schemes_bit_for_bit(randn, rng):
    """The atomic scheme only adds dQ's dot to the dK/dV kernel: dk and dv do not change (interpreter: same
    arithmetic, same order), and dq agrees with the separate kernel's to rounding."""
    state = rng.get_state()
    separate = gradients(randn, {**SMALL_TILES, "BACKWARD_DQ": "separate"})
    rng.set_state(state)
    atomic = gradients(randn, ATOMIC)
    assert torch.equal(separate[1], atomic[1]) and torch.equal(separate[2], atomic[2])
    torch.testing.assert_close(atomic[0], separate[0], atol=1e-5, rtol=1e-5)


def test_deterministic_algorithms_use_the_separate_dq_kernel(randn, launches):
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        compare(randn, shapes=((1, 1), (20, 20), (16, 16)), **causal_case(), options=ATOMIC)
    finally:
        torch.use_deterministic_algorithms(previous)
    names = [name for name, _ in launches]
    assert "dq" in names
    assert not any(kwargs["ATOMIC_DQ"] for name, kwargs in launches if name == "dkdv")


def test_default_scheme_is_the_module_constant(randn, launches, monkeypatch):
    """DEFAULT_BACKWARD_DQ is the one line that picks the scheme when kernel_options does not."""
    monkeypatch.setattr(backward, "DEFAULT_BACKWARD_DQ", "atomic")
    compare(randn, shapes=((1, 1), (20, 20), (16, 16)), **causal_case())
    assert_atomic_ran(launches)


def test_bad_scheme_names_the_value(randn):
    q = randn(1, 1, 16, 16)
    with pytest.raises(ValueError, match=r"BACKWARD_DQ='fused' must be one of \('separate', 'atomic'\)"):
        backward.flex_backward(q, q, q, q, q[..., 0], q, None, None, None, None, False, {"BACKWARD_DQ": "fused"})


def test_the_option_passes_the_api_with_torch_prefixes(randn, launches):
    q, k, v = (randn(1, 1, 16, 16).requires_grad_() for _ in range(3))
    out = fc.flex_attention(q, k, v, kernel_options={**SMALL_TILES, "bwd_BACKWARD_DQ": "atomic"}, backend="triton")
    out.sum().backward()
    assert_atomic_ran(launches)
    assert torch.isfinite(q.grad).all() and q.grad.abs().max() > 0


def test_source_has_both_scatters_and_the_dq_atomic():
    scale = torch.ones(3)

    @fc.score_mod
    def scaled(score, b, h, q_idx, kv_idx):
        return score * scale[h]

    text = kernel_source_backward(scaled, causal_mask(), frozenset({"scale"}))
    assert "def scatter_captured(" in text and "def scatter_captured_kv(" in text
    assert "scatter_captured_kv(ds, score, b, h, q_idx, kv_idx, " in text
    assert "dq_ptrs = DQ_ACC + offs_m[None, :] * D + offs_d[:, None]" in text
    assert 'tl.atomic_add(dq_ptrs, dq_t, sem="relaxed")' in text  # unmasked where Q_LEN and D allow it
    assert 'tl.atomic_add(dq_ptrs, dq_t, mask=q_in[None, :] & (offs_d[:, None] < D), sem="relaxed")' in text


@pytest.mark.parametrize("name", list(EVEN_CASES))
def test_atomic_adds_unmasked_only_where_lengths_are_tile_multiples(randn, launches, name):
    bias, case, flags = even_lengths_case(randn, name)
    compare(randn, **{**case, "options": {**case["options"], **ATOMIC}}, tables=(bias,))
    assert_atomic_ran(launches)
    assert_flags(launches, flags)
