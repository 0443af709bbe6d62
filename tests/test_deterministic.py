"""Deterministic gradients of captured tensors (torch.use_deterministic_algorithms(True)), interpreter, tiny shapes.

The dQ kernel then adds each program's contributions into its own slice of a [programs, numel]
float32 buffer and torch sums the slices; the cases check the gradients against float64 autograd of
the naive reference, that two runs agree bit for bit, the memory guard, and that the default stays atomic.
"""

from __future__ import annotations

import pytest
import torch
from flexcomp.codegen import backward
from flexcomp.codegen.backward import kernel_source_backward
from test_kernel_backward import (
    SMALL_TILES,
    alibi_window_case,
    block_mask_for,
    causal_mask,
    compare,
    relative_bias_case,
)

from flexcomp.autograd import triton_flex_attention
from flexcomp.errors import BackendError


@pytest.fixture
def deterministic():
    """torch's switch on for one test, restored even when it fails."""
    before, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_only)


@pytest.fixture
def partial_calls(monkeypatch):
    """The programs count of every deterministic-partials allocation (so a test knows which path ran)."""
    calls = []
    original = backward._deterministic_partials

    def spy(grads, programs):
        calls.append(programs)
        return original(grads, programs)

    monkeypatch.setattr(backward, "_deterministic_partials", spy)
    return calls


def gradients(randn, bias, case) -> list[torch.Tensor]:
    """d(sum(out * dO)) / d(q, k, v, bias) through the Triton path, for fresh inputs."""
    (Hq, Hkv), (Lq, Lkv), (D, Dv) = case["shapes"]
    B = case["B"]
    q, k, v = randn(B, Hq, Lq, D), randn(B, Hkv, Lkv, D), randn(B, Hkv, Lkv, Dv)
    grad_out = randn(B, Hq, Lq, Dv)
    block_mask = block_mask_for(case["mask"], B, Hq, Lq, Lkv, 16)
    inputs = [t.requires_grad_() for t in (q, k, v)] + [bias]
    out, _ = triton_flex_attention(*inputs[:3], case["score_mod"], block_mask, None, False, False, SMALL_TILES, bias)
    return list(torch.autograd.grad((out * grad_out).sum(), inputs))


def test_relative_bias_read_twice_matches_float64(randn, deterministic, partial_calls):
    bias, case = relative_bias_case(randn)
    compare(randn, tables=(bias,), **case)
    assert partial_calls == [2 * 2 * 3]  # one slice per dQ program: B * H * ceil(37 / 16)


def test_two_runs_are_bitwise_equal(rng, deterministic, partial_calls):
    def randn(*shape):
        return torch.randn(*shape, generator=rng)

    bias, case = relative_bias_case(randn)
    state = rng.get_state()
    runs = []
    for _ in range(2):
        rng.set_state(state)  # the same inputs both times
        runs.append(gradients(randn, bias, case))
    assert len(partial_calls) == 2
    for first, second in zip(*runs):
        assert first.abs().max() > 0
        assert torch.equal(first, second)


def test_per_head_slopes_with_gqa_match_float64(randn, deterministic, partial_calls):
    slopes, case = alibi_window_case(randn)
    compare(randn, **case, tables=(slopes,))
    assert partial_calls == [4 * 3]


def test_memory_guard_names_both_numbers(randn, deterministic, monkeypatch):
    monkeypatch.setattr(backward, "DETERMINISTIC_PARTIALS_LIMIT_BYTES", 1000)
    bias, case = relative_bias_case(randn)
    with pytest.raises(BackendError, match=r"does not have a deterministic implementation") as error:
        compare(randn, tables=(bias,), **case)
    message = str(error.value)
    assert "programs=12" in message and "numel=128" in message and "6144 bytes" in message
    assert "torch.use_deterministic_algorithms(False)" in message and "backend='reference'" in message


def test_memory_guard_warn_only_falls_back_to_atomics(randn, deterministic, monkeypatch):
    torch.use_deterministic_algorithms(True, warn_only=True)
    monkeypatch.setattr(backward, "DETERMINISTIC_PARTIALS_LIMIT_BYTES", 1000)
    bias, case = relative_bias_case(randn)
    with pytest.warns(UserWarning, match="does not have a deterministic implementation"):
        compare(randn, tables=(bias,), **case)


def test_default_path_stays_atomic(randn, partial_calls):
    assert not torch.are_deterministic_algorithms_enabled()
    bias, case = relative_bias_case(randn)
    compare(randn, tables=(bias,), **case)
    assert partial_calls == []
    text = kernel_source_backward(case["score_mod"], case["mask"], frozenset({"bias"}))
    assert "tl.atomic_add(gb_bias_ptr" in text and "add_in_order(gb_bias_ptr + slot * gb_bias_slot_stride" in text


def test_no_captured_gradient_allocates_no_partials(randn, deterministic, partial_calls):
    compare(randn, shapes=((1, 1), (20, 20), (16, 16)), mask=causal_mask(), mask_fn=lambda b, h, i, j: i >= j)
    assert partial_calls == []
