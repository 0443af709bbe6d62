"""codegen.kernel_passes: the named kernel-shaping passes, each dumped under FLEXCOMP_DEBUG=1 and checked."""

from __future__ import annotations

import pytest
import torch
from flexcomp.codegen import kernel_passes

import flexcomp as fc
from flexcomp.evaluate import evaluate
from flexcomp.ir import DType, Node, Op, arg


@fc.score_mod
def softcap(score, b, h, q_idx, kv_idx):
    return 30 * torch.tanh(score / 30) + kv_idx * 0.5


def test_each_pass_is_dumped_and_base2_keeps_the_meaning(monkeypatch, capsys, rng) -> None:
    monkeypatch.setenv("FLEXCOMP_DEBUG", "1")
    shaped = kernel_passes.shape(softcap.ir, ("float_index", "base2"), "softcap")
    err = capsys.readouterr().err
    assert "softcap: after kernel pass float_index" in err and "softcap: after kernel pass base2" in err
    qk = torch.randn(16, generator=rng) * 4
    env = {"score": qk, "sm_scale": torch.tensor(0.125), "b": torch.tensor(0, dtype=torch.int32),
           "h": torch.tensor(1, dtype=torch.int32), "q_idx": torch.tensor(3, dtype=torch.int32),
           "kv_idx": torch.arange(16, dtype=torch.int32)}
    expected = (30 * torch.tanh(qk.double() * 0.125 / 30) + torch.arange(16) * 0.5) * 1.4426950408889634
    torch.testing.assert_close(evaluate(shaped, env).double(), expected, rtol=1e-5, atol=1e-5)


def test_a_pass_that_breaks_the_ir_is_caught(monkeypatch) -> None:
    bad = Node(Op.ADD, DType.F32, (arg("score"), arg("q_idx")))  # i32 + f32 with no CAST
    monkeypatch.setitem(kernel_passes.KERNEL_PASSES, "broken", lambda ir: bad)
    with pytest.raises(AssertionError, match="CAST is missing"):
        kernel_passes.shape(softcap.ir, ("broken",))
